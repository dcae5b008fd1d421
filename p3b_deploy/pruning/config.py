"""P3BConfig: the pruning method's settings on top of the training loop's (TrainConfig).

Defaults are what the benchmarks measured to work on the shipped transfer task (light benefit
probe, schedule at 25% / 50% / 75% of the run, embed dims kept whole); the method page's own
values are one flag away: `--preset paper` (or `P3BConfig.preset("paper")`). Config files
(YAML/JSON) are read first, CLI flags override them, and the resolved config is saved as
config.json next to every run. Epoch-valued fields are floats (fractional epochs allowed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ..configs import opt
from ..errors import P3BError
from ..train.config import TrainConfig

PROBES = ("reference", "light")
# Default learning rate of each probe kind's own param group (P3BConfig.probe_lr None). Reference:
# the method page's 5e-4. Light: 5e-3, chosen on benchmarks/results/probe_overhead.md: at 5e-4 the
# linear light probe is still far from trained when the first allocation is made, and its block
# ranking changed from seed to seed (rho 0.85); at 5e-3 it is stable (rho 0.97) and closer to the
# reference probe's ranking.
PROBE_LR = {"reference": 5e-4, "light": 5e-3}
BUDGETS = ("params", "macs", "latency")
# How a latency budget is spent (P3BConfig.allocation; pruning/p3b/latency.py): "auto" is the knapsack
# for --budget latency (benchmarks/results/latency_knapsack.md) and the method page's proportional
# rule for the params / MAC budgets, which have no table to price a removed branch with.
ALLOCATIONS = ("auto", "knapsack", "proportional")
GATE_FACTORS = {"attn_in": 1.0, "attn_qk": 1.0, "attn_out": 1.5,
                "mlp_in": 1.0, "mlp_hidden": 0.75, "mlp_out": 1.5}
# The method page's own setting (P3B paper): reference probe, residual dims pruned, schedule in
# absolute epochs 5 / 25 / 50 of a 50-epoch run, AdamW 1e-4.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"probe": "reference", "prune_residual": True, "epochs": 50.0, "start_epoch": 5.0,
              "sparse_epoch": 25.0, "final_epoch": 50.0, "lr": 1e-4},
}


def _gate_factors() -> dict[str, float]:
    return dict(GATE_FACTORS)


@dataclass
class P3BConfig(TrainConfig):
    # --- what to prune -------------------------------------------------------------------
    prune_ratio: float = opt(0.5, "fraction of the model's parameters (or MACs) to remove, in (0, 1)")
    method: str = opt("p3b", "pruning method: p3b, uniform, dense, or a Torch-Pruning baseline (tp-taylor, "
                             "tp-magnitude, tp-taylor-global, tp-magnitude-global)")
    budget: str = opt("params", "what the prune ratio counts; latency: --latency-target on --latency-table's device",
                      choices=BUDGETS)
    latency_table: Optional[str] = opt(None, "latency_table.json measured on the target device (p3b-deploy "
                                             "latency-table); needed by --budget latency, logged otherwise")
    target: Optional[str] = opt(None, "deployment target the plan is priced for (p3b_deploy.targets, e.g. ort-int8, "
                                      "openvino-int8): the latency table must have been timed on it; with "
                                      "--latency-target and no --latency-table, `prune` times a probe pack on it "
                                      "here first (RUN_DIR/latency_table.json) and budgets latency")
    latency_target: Optional[str] = opt(None, "with --budget latency: a fraction of the dense model's latency on "
                                              "the table's device (e.g. 0.5) or milliseconds (e.g. 12ms)")
    allocation: str = opt("auto", "how keep ratios follow block benefit: proportional (kr ~ importance, the method "
                                  "page) or knapsack (with --budget latency: each branch takes a width of the "
                                  "table's grid, 0 = removed, maximising benefit within the target); auto = knapsack "
                                  "for --budget latency, proportional otherwise", choices=ALLOCATIONS)
    width_exponent: float = opt(0.5, "knapsack: a branch keeping a fraction x of its width is worth x ** this of "
                                     "its full-width benefit (concave below 1)")
    fixed_keep_ratio: Optional[Union[float, list[float]]] = opt(
        None, "fixed keep ratio: one value or 2*depth comma-separated values (implies --method uniform)",
        flag="--keep-ratio")
    prune_residual: bool = opt(False, "also prune the embed dims each block reads/writes (the method as "
                                      "published; gather/scatter in the slim model); default: only head_dim "
                                      "and MLP hidden channels")
    # --- inter-block allocation (method page section 4) ----------------------------------
    block_imp_scale: float = opt(10.0, "s: block benefit scaled so its max equals s before the soft clip")
    softplus_beta: float = opt(1.4, "slope of the softplus soft clip to (0, s)")
    gamma: float = opt(0.2, "exponential smoothing weight of the new importance vs the previous one")
    alpha: float = opt(0.5, "importance = alpha * v_cls + (1 - alpha) * v_patch")
    # --- schedule (section 5): fractions of the run, or absolute epochs --------------------
    start_frac: float = opt(0.25, "end of warm-up (first mask update) as a fraction of --epochs")
    sparse_frac: float = opt(0.5, "keep ratios reach the goal at this fraction of --epochs")
    final_frac: float = opt(0.75, "masks hard and frozen at this fraction of --epochs")
    start_epoch: Optional[float] = opt(None, "end of warm-up in absolute epochs (overrides --start-frac)",
                                       flag="--prune-start")
    sparse_epoch: Optional[float] = opt(None, "epoch the keep ratios reach the goal (overrides --sparse-frac)",
                                        flag="--prune-sparse")
    final_epoch: Optional[float] = opt(None, "epoch the masks are hard and frozen (overrides --final-frac)",
                                       flag="--prune-final")
    update_every: Optional[int] = opt(None, "optimizer steps between mask updates (default ~3 per epoch)")
    tau_max: float = opt(0.1, "soft-mask temperature during sparsify")
    tau_min: float = opt(0.0, "temperature at the end of sharpen (0 = hard step)")
    # --- intra-block selection (section 6) -----------------------------------------------
    gate_factors: dict[str, float] = opt(factory=_gate_factors, help="per-gate multiplier of the normalised "
                                         "Taylor ranks", cli=False)
    threshold_iters: int = opt(4, "fixed-point iterations of the bilinear threshold search")
    # --- block-benefit probes (section 3) ------------------------------------------------
    probe: str = opt("light", "block-benefit probe: light (cls Linear + LN/Linear on the mean patch) or "
                              "reference (cls Linear + 2x Conv3x3 patch probe, the paper's)", choices=PROBES)
    probe_lr: Optional[float] = opt(None, "learning rate of the benefit probes (default 5e-3 light, 5e-4 reference)")

    def validate(self) -> None:
        """Raise P3BError for values a user can get wrong; called on construction."""
        super().validate()
        if self.method != "dense" and not 0.0 < float(self.prune_ratio) < 1.0:
            raise P3BError(f"prune ratio must be in (0, 1), got {self.prune_ratio}")
        if self.budget not in BUDGETS:
            raise P3BError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.budget == "latency" and (not self.latency_table or self.latency_target is None):
            raise P3BError("--budget latency needs --latency-table FILE and --latency-target (e.g. 0.5 or 12ms)")
        if self.target is not None:
            from ..targets import get_target
            get_target(self.target)
        if self.allocation not in ALLOCATIONS:
            raise P3BError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "knapsack" and self.budget != "latency":
            raise P3BError("--allocation knapsack needs --budget latency (a latency table prices each width, "
                           "a removed branch included)")
        if not 0.0 < float(self.width_exponent) <= 1.0:
            raise P3BError(f"width exponent must be in (0, 1], got {self.width_exponent}")
        if self.probe not in PROBES:
            raise P3BError(f"probe must be one of {PROBES}, got {self.probe!r}")
        if self.probe_lr is not None and not float(self.probe_lr) > 0:
            raise P3BError(f"probe lr must be > 0, got {self.probe_lr}")
        if not 0.0 <= self.start_frac <= self.sparse_frac <= self.final_frac <= 1.0:
            raise P3BError("schedule fractions must satisfy 0 <= start <= sparse <= final <= 1 "
                           f"(got {self.start_frac}, {self.sparse_frac}, {self.final_frac})")
        start, sparse, final = self.schedule()
        if not 0.0 <= start <= sparse <= final:
            raise P3BError("schedule must satisfy 0 <= prune-start <= prune-sparse <= prune-final "
                           f"(got epochs {start:g}, {sparse:g}, {final:g})")
        if self.method != "dense" and final > self.epochs + 1e-9:
            raise P3BError(f"the prune schedule ends at epoch {final:g} (prune-final) but the run has "
                           f"{self.epochs:g} epochs: it would not reach prune ratio {self.prune_ratio}; "
                           "lower --prune-start/--prune-sparse/--prune-final or raise --epochs")
        if self.update_every is not None and self.update_every < 1:
            raise P3BError(f"update-every must be >= 1 step, got {self.update_every}")
        unknown = set(self.gate_factors) - set(GATE_FACTORS)
        if unknown:
            raise P3BError(f"unknown gate factor(s) {sorted(unknown)}; known: {sorted(GATE_FACTORS)}")

    def schedule(self) -> tuple[float, float, float]:
        """(start, sparse, final) in epochs: absolute values where given, else fractions of the run."""
        pick = lambda ep, frac: float(ep) if ep is not None else float(frac) * float(self.epochs)  # noqa: E731
        return (pick(self.start_epoch, self.start_frac), pick(self.sparse_epoch, self.sparse_frac),
                pick(self.final_epoch, self.final_frac))

    @property
    def knapsack(self) -> bool:
        """Whether keep ratios come from the knapsack allocation (allocation resolved)."""
        return self.budget == "latency" and self.allocation in ("auto", "knapsack")

    @property
    def probe_lr_value(self) -> float:
        """The probes' learning rate: probe_lr, or the default of the probe kind."""
        return float(self.probe_lr) if self.probe_lr is not None else PROBE_LR[self.probe]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "P3BConfig":
        """A named preset (see PRESETS) with overrides applied."""
        if name not in PRESETS:
            raise P3BError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})
