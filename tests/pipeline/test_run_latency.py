"""`run` with a latency target: the summary sets predicted against measured speedup."""
from __future__ import annotations

import json

import pytest

from p3b_deploy.pipeline.latency import latency_markdown, latency_summary


def test_latency_summary_pairs_prediction_with_the_bench_row():
    rec = {"table": "OUT/latency_table.json", "batch": 1, "target_ms": 0.6, "dense_pred_ms": 1.2}
    meta = {"latency": {"pred_latency_ms": 0.59, "pred_speedup": 2.03, "allocation": "knapsack",
                        "removed_branches": 7}}
    rows = [{"model": "dense", "backend": "ort-cpu", "batch": 1, "median_ms": 1.3, "speedup": 1.0},
            {"model": "slim", "backend": "ort-cpu", "batch": 32, "median_ms": 9.0, "speedup": 2.5},
            {"model": "slim", "backend": "ort-cpu", "batch": 1, "median_ms": 0.7, "speedup": 1.86}]
    s = latency_summary(rec, meta, rows)
    assert (s["pred_speedup"], s["measured_speedup"], s["measured_ms"]) == (2.03, 1.86, 0.7)
    text = "\n".join(latency_markdown(s))
    assert "| slim | 0.600 ms | 0.590 ms | 0.700 ms |" in text and "2.03x" in text and "1.86x" in text
    assert "Allocation: knapsack, 7 branches removed" in text
    assert s["promise_kept"] is False and "**missed**: measured 0.700 ms > target 0.600 ms (+16.7%)" in text


def _deploy_rows(slim_ms: float) -> list[dict]:
    """Matrix rows as the deploy stage records them (a stand-in timing source)."""
    return [{"model": m, "target": t, "batch": 1, "median_ms": ms, "speedup": 1.3 / ms, "top1": top1}
            for m, t, ms, top1 in (("dense", "ort-fp32", 1.3, 94.0), ("slim", "ort-fp32", 0.9, 93.0),
                                   ("dense", "ort-int8", 1.1, 93.9), ("slim", "ort-int8", slim_ms, 92.8))]


@pytest.mark.parametrize("slim_ms, kept", [(0.55, True), (0.62, False)])
def test_promise_on_the_target_is_checked_against_its_deploy_row(slim_ms, kept):
    rec = {"table": "t.json", "target": "ort-int8", "batch": 1, "threads": 1, "target_ms": 0.6, "dense_pred_ms": 1.0}
    meta = {"latency": {"pred_latency_ms": 0.58, "pred_speedup": 1.72, "allocation": "knapsack", "removed_branches": 3}}
    bench = [{"model": "slim", "backend": "ort-cpu", "batch": 1, "median_ms": 0.3, "speedup": 4.0}]  # fp32: not T
    s = latency_summary(rec, meta, bench, _deploy_rows(slim_ms))
    assert s["measured_ms"] == slim_ms and s["top1"] == 92.8 and s["dense_measured_ms"] == 1.1
    assert s["measured_speedup"] == pytest.approx(1.1 / slim_ms)  # vs dense on the same target
    assert s["promise_kept"] is kept and s["measured_by"] == "deploy stage (ort-int8)"
    text = "\n".join(latency_markdown(s))
    assert text.startswith("## Latency budget on ort-int8")
    assert ("**kept**" in text) is kept and ("**missed**" in text) is (not kept)
    assert f"| slim | 0.600 ms | 0.580 ms | {slim_ms:.3f} ms | 92.80 |" in text


def test_promise_without_a_measurement_on_the_target_is_not_called_kept():
    rec = {"table": "t.json", "target": "openvino-int8", "batch": 1, "target_ms": 0.6, "dense_pred_ms": 1.0}
    s = latency_summary(rec, {"latency": {"pred_latency_ms": 0.5}}, [], [])
    assert s["promise_kept"] is None and "not checked" in "\n".join(latency_markdown(s))


@pytest.mark.slow
def test_run_with_target_and_latency_target(tmp_path):
    """`run --target ort-int8 --latency-target 0.6`: the pack is timed as int8, the knapsack prices on
    that table, the int8 file is exported and gated, dense and slim are timed on the target, and the
    summary checks the promise."""
    from p3b_deploy.bench.latency_table import LatencyTable
    from p3b_deploy.pipeline.run import RunConfig, run_pipeline
    cfg = RunConfig.from_dict({"out": str(tmp_path / "out"), "dense_baseline": False, "latency_target": "0.6",
                               "target": "ort-int8",
                               "prune": {"epochs": 1.0}, "bench": {"backends": ["ort-cpu"], "threads": 1,
                                                                   "min_seconds": 0.3, "batches": [1]}})
    res = run_pipeline(cfg)
    s = res.summary["latency_budget"]
    assert s["target"] == "ort-int8" and s["measured_by"] == "deploy stage (ort-int8)"
    assert s["pred_ms"] <= s["target_ms"] + 1e-9 and s["measured_ms"] > 0
    assert abs(s["top1"] - res.summary["accuracy"]["slim_top1"]) <= 5.0  # int8 on the target vs slim fp32 (1 epoch)
    assert s["promise_kept"] is (s["measured_ms"] <= s["target_ms"])
    assert s["allocation"] == "knapsack" and s["removed_branches"] >= 1  # run's latency target: the knapsack
    table = LatencyTable.load(tmp_path / "out" / "latency_table.json")
    assert table.target == "ort-int8" and table.correction["plans"] == 6
    assert json.loads((tmp_path / "out" / "run" / "plan.json").read_text())["meta"]["latency"]["latency_table"][
        "target"] == "ort-int8"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Latency budget on ort-int8" in md and ("**kept**" in md or "**missed**" in md)
    rows = {(r["model"], r["target"]) for r in res.summary["deploy"]["rows"]} if "deploy" in res.summary else None
    assert rows is None or ("slim", "ort-int8") in rows
