"""The pruning side of a training run: gates, Taylor scores, benefit probes, keep-ratio updates.

`Pruner` is what the trainer talks to; it keeps the loop readable:
    logits, ce = net(x, y)          # ce: probe CEs (None unless method p3b)
    pruner.observe(ce, step)        # ΔΨ sums since the last mask update
    ... backward, optimizer step ...
    pruner.after_step(step)         # Taylor scores from the gates' gradients
    record = pruner.maybe_update(step + 1)   # mask update on the Schedule, or None
The keep ratio per block comes from the block benefit (method "p3b") or from a fixed vector
("uniform" / hand-set), and is turned into masks by `masks.update_masks` either way.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...models.gates import Gates
from ...plan import Plan
from ...models.vit import count_model
from ...spec import ViTSpec
from .budget import BudgetState, Schedule, allocate, benefit_state, fixed_keep_ratios
from ..config import P3BConfig
from .latency import (LatencyCost, keep_ratios_of_widths, knapsack_widths, latency_keep_ratios,
                      uniform_latency_keep_ratio)
from .masks import BlockDims, TaylorScores, kept_cost, plan_from_gates, update_masks
from .probes import BenefitMeter, BenefitProbes


class Pruner:
    """Gates + scores + (optional) probes of one model, and the mask-update step of the method."""

    def __init__(self, model: nn.Module, spec: ViTSpec, cfg: P3BConfig, steps_per_epoch: float,
                 num_classes: int) -> None:
        self.spec, self.cfg = spec, cfg
        self.gates = Gates(model, spec, tie_qkv=True)
        self.taylor = TaylorScores(self.gates)
        self.schedule = Schedule.from_epochs(*cfg.schedule(),
                                             steps_per_epoch, cfg.update_every, cfg.tau_max, cfg.tau_min)
        device = next(model.parameters()).device
        self.probes = BenefitProbes(spec, num_classes, cfg.probe, cfg.probe_lr_value).to(device) \
            if cfg.method == "p3b" else None
        self.meter = BenefitMeter(spec.num_blocks, device)
        self.state = BudgetState()
        counts = count_model(model)
        macs = cfg.budget == "macs"  # a latency budget divides benefit by kept params, as the method page says
        self.cost_unit = "macs" if macs else "params"
        self.latency, self.latency_target_ms = _latency_cost(cfg, spec)
        self.dense_cost = torch.tensor(counts.macs_blocks if macs else counts.params_blocks, dtype=torch.float64)
        self.other_cost = float(counts.macs_other if macs else counts.params_other)
        self.params_other = counts.params_other
        self.dense_params = counts.params
        self.history: list[dict[str, Any]] = []  # one record per mask update
        self.widths: list[int] | None = None  # inner width per block chosen by the knapsack at the last update
        if cfg.fixed_keep_ratio is not None or (cfg.method != "p3b" and self.latency_target_ms is None):
            # refuse a bad vector before training
            fixed_keep_ratios(cfg.fixed_keep_ratio, self.dense_cost, self.other_cost, cfg.prune_ratio)

    # ------------------------------------------------------------------ per step
    def active(self, step: int) -> bool:
        """Whether step `step` (0-based) feeds the next mask update's statistics.

        Scores and benefits accumulate from the prune start until the masks freeze. The first
        update happens *at* the start (Schedule), so its statistics come from the last
        `update_every` warm-up steps: the same window length as every later update, measured
        with probes that have trained for most of the warm-up."""
        sch = self.schedule
        return sch.start - sch.update_every <= step < sch.final
    def begin_step(self, step: int) -> None:
        """Gate gradients are only needed while scores accumulate (saves backward work otherwise)."""
        self.gates.requires_grad_(self.active(step))

    @torch.no_grad()
    def observe(self, ce: dict[str, torch.Tensor] | None, step: int) -> None:
        if ce is not None and self.active(step):
            self.meter.update(ce)

    @torch.no_grad()
    def after_step(self, step: int, grad_scale: float = 1.0) -> None:
        """Accumulate Taylor scores from the gates' (AMP-unscaled) gradients; always clears them."""
        if self.active(step):
            self.taylor.accumulate(grad_scale)
        for p in self.gates.parameters():
            p.grad = None

    # ------------------------------------------------------------------ mask update
    def maybe_update(self, step: int) -> dict[str, Any] | None:
        """Run a mask update if the schedule says so at `step` (optimizer steps done)."""
        if not self.schedule.is_update(step):
            return None
        return self.update(step)

    def goal_keep_ratios(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Goal keep ratio per block (and the importance when it comes from block benefit)."""
        cfg = self.cfg
        lat = self.latency_target_ms is not None
        if lat and cfg.fixed_keep_ratio is None and (cfg.method != "p3b" or not self.history
                                                     and float(self.meter.count) == 0):
            return uniform_latency_keep_ratio(self.latency, self.latency_target_ms), None
        if cfg.method != "p3b" or cfg.fixed_keep_ratio is not None:
            goal = fixed_keep_ratios(cfg.fixed_keep_ratio, self.dense_cost, self.other_cost, cfg.prune_ratio)
            return goal, None
        if float(self.meter.count) == 0:  # nothing measured (e.g. start 0): keep the last goal
            last = self.history[-1]["kr_goal"] if self.history else None
            goal = fixed_keep_ratios(last, self.dense_cost, self.other_cost, cfg.prune_ratio)
            return goal, None
        dpsi_c, dpsi_p = self.meter.mean()
        if lat and cfg.knapsack:  # benefit per millisecond: one width of the table's grid per branch, 0 included
            imp, self.state = benefit_state(dpsi_c, dpsi_p, self.width_fractions(), self.state, cfg)
            self.widths, _ = knapsack_widths(imp, self.latency, self.latency_target_ms, cfg.width_exponent)
            return keep_ratios_of_widths(self.latency, self.widths), imp
        kept = kept_cost(self.gates, self.spec, self.cost_unit).to(torch.float64)
        goal, imp, self.state = allocate(dpsi_c, dpsi_p, kept, self.dense_cost, self.other_cost,
                                         cfg.prune_ratio, self.state, cfg)
        if lat:  # same importance, budget equation in table milliseconds
            goal = latency_keep_ratios(imp, self.latency, self.latency_target_ms)
        return goal, imp

    @torch.no_grad()
    def width_fractions(self) -> torch.Tensor:
        """Each branch's current inner width as a fraction of its dense width, from the soft masks
        (mean gate value of attn_qk / mlp_hidden): what its measured benefit was measured at."""
        out = []
        for b in range(self.spec.num_blocks):
            dims = BlockDims(self.spec, b)
            gate = getattr(self.gates.layers[dims.layer], "attn_qk" if dims.kind == "attn" else "mlp_hidden")
            out.append(float(gate.detach().float().mean()))
        return torch.tensor(out, dtype=torch.float64)

    def update(self, step: int) -> dict[str, Any]:
        """All-reduce the statistics, allocate keep ratios, recompute every block's mask."""
        self.taylor.all_reduce()
        self.meter.all_reduce()
        goal, imp = self.goal_keep_ratios()
        applied = self.schedule.applied(goal, step)
        tau = float(self.schedule.tau(step))
        update_masks(self.gates, self.taylor.mean(), applied, tau, self.cfg)
        dpsi_c, dpsi_p = self.meter.mean()
        kept = kept_cost(self.gates, self.spec, "params")
        rec = {"event": "mask_update", "step": step, "phase": self.schedule.phase(step), "tau": tau,
               "kr_goal": _floats(goal), "kr_applied": _floats(applied),
               "imp": _floats(imp) if imp is not None else None,
               "dpsi_cls": _floats(dpsi_c), "dpsi_patch": _floats(dpsi_p),
               "kept_params": int(kept.sum().item()) + self.params_other,
               "removed": [i for i, k in enumerate(kept.tolist()) if k == 0],
               "dense_params": self.dense_params}
        if self.latency is not None:
            rec.update(self._latency_record())
        if self.widths is not None and imp is not None:
            rec["widths_goal"] = list(self.widths)
        self.history.append(rec)
        self.taylor.reset()
        self.meter.reset()
        return rec

    def plan(self, meta: dict[str, Any]) -> Plan:
        """Hard (m >= 0.5) masks as a Plan with exact counts (+ predicted latency with a table)."""
        plan = plan_from_gates(self.gates, self.spec, meta, params_other=self.params_other)
        if self.latency is not None:
            plan.meta["latency"] = self._latency_record(plan)
        return plan

    def _latency_record(self, plan: Plan | None = None) -> dict[str, Any]:
        """Predicted latency of the current hard masks on the table's device (and the target)."""
        t = self.latency.table
        plan = plan or plan_from_gates(self.gates, self.spec, {}, params_other=self.params_other)
        pred = t.predict(plan)
        return {"pred_latency_ms": round(pred, 4), "dense_latency_ms": round(t.dense_ms, 4),
                "pred_speedup": round(t.dense_ms / pred, 4),
                "latency_target_ms": None if self.latency_target_ms is None else round(self.latency_target_ms, 4),
                "allocation": self._allocation() if self.latency_target_ms else None,
                "removed_branches": plan.removed_branches,
                "latency_table": {"path": str(self.cfg.latency_table), "target": t.target, "provider": t.provider,
                                  "batch": t.batch,
                                  "threads": t.threads, "device": t.device.get("cpu"), "date": t.date}}

    def _allocation(self) -> str:
        """How the latency target is spent (what `goal_keep_ratios` does): a hand-set vector, one keep
        ratio for every block (methods other than p3b), or P3B's knapsack / proportional rule."""
        if self.cfg.fixed_keep_ratio is not None:
            return "fixed"
        if self.cfg.method != "p3b":
            return "uniform"
        return "knapsack" if self.cfg.knapsack else "proportional"

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        st = {"gates": {k: v.detach().cpu().clone() for k, v in self.gates.state_dict().items()},
              "taylor": self.taylor.state_dict(), "meter": self.meter.state_dict(),
              "budget": self.state.state_dict(),
              "history": self.history}
        if self.probes is not None:
            st["probes"] = {k: v.detach().cpu().clone() for k, v in self.probes.state_dict().items()}
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.gates.load_state_dict(st["gates"])
        self.taylor.load_state_dict(st["taylor"])
        self.meter.load_state_dict(st["meter"])
        self.state = BudgetState.from_state_dict(st["budget"])
        self.history = list(st["history"])
        if self.probes is not None:
            self.probes.load_state_dict(st["probes"])


def _latency_cost(cfg: P3BConfig, spec: ViTSpec) -> tuple[LatencyCost | None, float | None]:
    """The table's cost model (when a table is given) and the target in ms (latency budget only)."""
    if not cfg.latency_table:
        return None, None
    from ...bench.latency_table import LatencyTable
    table = LatencyTable.load(cfg.latency_table)
    if cfg.target is not None:
        table.check_target(cfg.target)
    cost = LatencyCost(table, spec)
    if cfg.budget != "latency":
        return cost, None
    return cost, cost.table.target_ms(cfg.latency_target)


def _floats(t: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in t.detach().cpu().flatten()]
