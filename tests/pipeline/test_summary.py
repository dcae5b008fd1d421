"""summary.md's sentences are computed from the run: the residual I/O sentence and the goal line."""
from __future__ import annotations

from p3b_deploy.pipeline.summary import _goal, residual_io_sentence


def _s(built: int, plan: int, io: str = "dense", round_to: int = 1) -> dict:
    return {"params": {"dense": 1000, "slim": built, "plan_kept": plan}, "residual_io": io, "round_to": round_to}


def test_residual_io_sentence_says_what_was_built():
    assert residual_io_sentence(_s(500, 500)) == (
        "Residual reads/writes: `dense`: built parameters equal the plan's (no branch reads or writes a subset "
        "of the residual dims: nothing is zero-padded).")
    assert residual_io_sentence(_s(500, 500, "index")) == "Residual reads/writes: `index`: built parameters equal the plan's."
    assert residual_io_sentence(_s(560, 500)) == (
        "Residual reads/writes: `dense`: built parameters exceed the plan's by 60 (12.0%): branches that read or "
        "write fewer residual dims are zero-padded to all of them; the MACs above are the plan's.")
    assert residual_io_sentence(_s(520, 500, "index", round_to=8)) == (
        "Residual reads/writes: `index`: built parameters exceed the plan's by 20 (4.0%): kept counts are rounded "
        "up to multiples of 8; the MACs above are the plan's.")


def test_goal_line_names_the_latency_target_not_the_unused_prune_ratio():
    assert _goal({"budget": "params", "prune_ratio": 0.5}) == "prune ratio 0.5"
    assert _goal({"budget": "latency", "prune_ratio": 0.5, "latency_budget": {"target_ms": 0.4336}}) == (
        "latency budget: target 0.434 ms on the table (see Latency budget below)")
