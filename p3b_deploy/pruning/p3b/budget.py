"""Inter-block budget: block benefit -> keep ratio per block, and the prune schedule.

Pure tensor math, no model (method page sections 4 and 5). Blocks are ordered attn0, mlp0,
attn1, ...; every per-block vector has 2*depth entries. Costs are parameters, or MACs when the
run budgets MACs; the allocation is the same either way.

All arithmetic is done in float64 so the budget equation holds to ~1e-12 relative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ...errors import P3BError

# A branch with no kept cost (removed) is costed as if it kept this fraction of its dense cost
# when benefit is divided by kept cost (step 4): keeps the division finite while still giving a
# removed branch whose benefit reappears a large per-parameter importance (reactivation).
KEPT_FLOOR_FRAC = 0.01

_F64 = torch.float64


def _vec(x: Any, name: str, n: Optional[int] = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=_F64).detach().cpu().reshape(-1)
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


# ------------------------------------------------------------------------------------------
# Steps 2-3: scale and soft clip
# ------------------------------------------------------------------------------------------
def squash(delta: torch.Tensor, scale: float, beta: float = 1.4) -> torch.Tensor:
    """Scale benefits so the maximum equals `scale`, then soft-clip to (0, scale).

    v = delta * s / max(delta);  v = softplus(beta v) - softplus(beta v - s).
    Where the method page is silent: non-finite entries carry no evidence and count as 0; if no
    block shows a positive benefit (max <= 0) there is nothing to rank by, so every block gets
    the same value, squash(s) (all blocks treated as equally useful)."""
    d = torch.nan_to_num(_vec(delta, "delta"), nan=0.0, posinf=0.0, neginf=0.0)
    top = d.max() if d.numel() else torch.tensor(0.0, dtype=_F64)
    v = torch.full_like(d, float(scale)) if top <= 0 else d * (float(scale) / top)
    return soft_clip(v, scale, beta)


def soft_clip(v: torch.Tensor, scale: float, beta: float = 1.4) -> torch.Tensor:
    """softplus(beta v) - softplus(beta v - s): a smooth clip of v to (0, s) (step 3)."""
    return F.softplus(beta * v) - F.softplus(beta * v - float(scale))


# ------------------------------------------------------------------------------------------
# Steps 1-5 + alpha mix + keep ratios
# ------------------------------------------------------------------------------------------
@dataclass
class BudgetState:
    """What allocation carries from one mask update to the next (step 5 smoothing)."""
    v_cls: Optional[torch.Tensor] = None  # previous smoothed class-token importance (None before the first update)
    v_patch: Optional[torch.Tensor] = None  # previous smoothed patch importance (None before the first update)
    b_cls: Optional[torch.Tensor] = None  # previous smoothed full-width class-token benefit (knapsack allocation)
    b_patch: Optional[torch.Tensor] = None  # previous smoothed full-width patch benefit (knapsack allocation)

    FIELDS = ("v_cls", "v_patch", "b_cls", "b_patch")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); absent entries are simply left out."""
        return {k: getattr(self, k).clone() for k in self.FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "BudgetState":
        return cls(**{k: _opt(d.get(k)) for k in cls.FIELDS})


def _opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype=_F64, device="cpu").clone()


def block_budget(dense_cost: torch.Tensor, other_cost: float, prune_ratio: float) -> float:
    """Cost the blocks may keep: (1 - R) * (sum dense + other) - other (non-block cost is never pruned)."""
    r = float(prune_ratio)
    if not (math.isfinite(r) and 0.0 <= r < 1.0):
        raise P3BError(f"prune ratio must be in [0, 1), got {prune_ratio}")
    total = float(dense_cost.sum()) + float(other_cost)
    budget = (1.0 - r) * total - float(other_cost)
    if budget <= 0:
        raise P3BError(f"prune ratio {r} leaves no budget for the transformer blocks: the never-pruned "
                       f"part (embeddings, head) is already {float(other_cost) / total:.1%} of the model")
    return budget


def _importance(mean_dpsi: Any, kept: torch.Tensor, dense: torch.Tensor, prev: Optional[torch.Tensor],
                cfg: Any) -> torch.Tensor:
    """Steps 2-5 for one probe type: squash, / kept cost, normalise to mean 1, smooth with prev."""
    v = squash(_vec(mean_dpsi, "mean benefit", dense.numel()), cfg.block_imp_scale, cfg.softplus_beta)
    v = v / torch.maximum(kept, KEPT_FLOOR_FRAC * dense).clamp_min(1e-12)
    m = v.mean()
    v = v / m if torch.isfinite(m) and m > 0 else torch.ones_like(v)
    if prev is not None:
        v = cfg.gamma * v + (1.0 - cfg.gamma) * _vec(prev, "previous importance", v.numel())
    return v


def keep_ratios(imp: torch.Tensor, dense_cost: torch.Tensor, budget: float) -> torch.Tensor:
    """kr_i = c * imp_i with sum(kr * dense) == budget, clamped to [0, 1] with rescaling.

    Blocks that would exceed 1 are fixed at 1 and c is recomputed over the others, repeated until
    none exceeds 1 (at most 2*depth rounds). If the free blocks' importance is all zero, the
    leftover budget is spread uniformly over them."""
    imp = torch.nan_to_num(imp.to(_F64), nan=0.0).clamp_min(0.0)
    dense = dense_cost.to(_F64)
    if budget >= float(dense.sum()):
        return torch.ones_like(imp)
    fixed = torch.zeros_like(imp, dtype=torch.bool)
    kr = torch.ones_like(imp)
    for _ in range(imp.numel() + 1):
        left = budget - float(dense[fixed].sum())
        free = ~fixed
        if not free.any():
            break
        weight = float((imp[free] * dense[free]).sum())
        kr = torch.where(fixed, torch.ones_like(imp), imp * (left / weight) if weight > 0
                         else torch.full_like(imp, left / float(dense[free].sum())))
        over = free & (kr > 1.0)
        if not over.any():
            break
        fixed |= over
    return kr.clamp(0.0, 1.0)


def allocate(mean_dpsi_cls: Any, mean_dpsi_patch: Any, kept_cost: Any, dense_cost: Any,
             other_cost: float, prune_ratio: float, state: BudgetState,
             cfg: Any) -> tuple[torch.Tensor, torch.Tensor, BudgetState]:
    """One inter-block allocation (method section 4): returns (kr_goal, imp, new state).

    `cfg` needs block_imp_scale, softplus_beta, gamma, alpha (a P3BConfig). `mean_dpsi_patch`
    may be None (no patch probe): imp is then v_cls alone. The returned kr_goal lies in [0, 1]
    and satisfies sum(kr_goal * dense_cost) + other_cost == (1 - R) * (sum(dense_cost) + other_cost)."""
    dense = _vec(dense_cost, "dense cost")
    kept = _vec(kept_cost, "kept cost", dense.numel())
    budget = block_budget(dense, other_cost, prune_ratio)
    v_cls = _importance(mean_dpsi_cls, kept, dense, state.v_cls, cfg)
    if mean_dpsi_patch is None:
        v_patch, imp = None, v_cls
    else:
        v_patch = _importance(mean_dpsi_patch, kept, dense, state.v_patch, cfg)
        imp = cfg.alpha * v_cls + (1.0 - cfg.alpha) * v_patch
    return keep_ratios(imp, dense, budget), imp, BudgetState(v_cls=v_cls, v_patch=v_patch)


# ------------------------------------------------------------------------------------------
# Block benefit at full width (the knapsack allocation's value scale)
# ------------------------------------------------------------------------------------------
# A branch measured at a small fraction of its width extrapolates its benefit by 1 / f(frac); the
# fraction is floored here so that a (nearly) removed branch's noise is amplified at most
# 1 / f(WIDTH_FLOOR) times (4.5x for the default f(x) = sqrt(x)).
WIDTH_FLOOR = 0.05


def width_value(frac: Any, exponent: float) -> torch.Tensor:
    """f(x) = x ** exponent: the share of a branch's full-width benefit that a branch keeping a
    fraction x of its width still delivers (concave for exponent < 1, f(0) = 0, f(1) = 1)."""
    return torch.as_tensor(frac, dtype=_F64).clamp(0.0, 1.0) ** float(exponent)


def full_benefit(mean_dpsi: Any, width_frac: Any, prev: Optional[torch.Tensor], cfg: Any) -> torch.Tensor:
    """One probe type's block benefit, as the branch would show it at full width, smoothed.

    Steps 1-3 and 5 of the method (mean, scale to s, soft clip, smoothing with gamma) with two
    changes for an allocation that may remove branches: the soft clip's value at zero benefit is
    subtracted (a block that does not help is worth 0, not ~7% of the best block), and instead of
    dividing by the kept parameters (step 4), the benefit measured at the branch's current width
    fraction is divided by f(fraction), the value curve the knapsack prices widths with. Normalised
    to mean 1 before smoothing, like step 4."""
    d = _vec(mean_dpsi, "mean benefit")
    zero = float(soft_clip(torch.zeros(1, dtype=_F64), cfg.block_imp_scale, cfg.softplus_beta))  # clip at v = 0
    s = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
    v = (squash(s, cfg.block_imp_scale, cfg.softplus_beta) - zero).clamp_min(0.0) if float(s.max()) > 0 \
        else torch.ones_like(s)  # no block shows a benefit: nothing to rank by, all equal
    frac = _vec(width_frac, "width fraction", v.numel()).clamp(WIDTH_FLOOR, 1.0)
    v = v / width_value(frac, cfg.width_exponent)
    m = v.mean()
    v = v / m if torch.isfinite(m) and m > 0 else torch.ones_like(v)
    if prev is not None:
        v = cfg.gamma * v + (1.0 - cfg.gamma) * _vec(prev, "previous benefit", v.numel())
    return v


def benefit_state(mean_dpsi_cls: Any, mean_dpsi_patch: Any, width_frac: Any, state: BudgetState,
                  cfg: Any) -> tuple[torch.Tensor, BudgetState]:
    """Full-width benefit per block, alpha-mixed over cls and patch probes (patch may be None)."""
    b_cls = full_benefit(mean_dpsi_cls, width_frac, state.b_cls, cfg)
    if mean_dpsi_patch is None:
        return b_cls, BudgetState(b_cls=b_cls)
    b_patch = full_benefit(mean_dpsi_patch, width_frac, state.b_patch, cfg)
    return cfg.alpha * b_cls + (1.0 - cfg.alpha) * b_patch, BudgetState(b_cls=b_cls, b_patch=b_patch)


def fixed_keep_ratios(value_or_list: Union[None, str, float, Sequence[float]], dense_cost: Any,
                      other_cost: float, prune_ratio: float) -> torch.Tensor:
    """Keep ratios that ignore block benefit (ablations / baselines).

    - None or "uniform": one value for every block, chosen so the model hits (1 - R) of its cost;
    - a float: that keep ratio for every block (the budget is then whatever it implies);
    - a list of 2*depth floats in [0, 1]: used as given (validated)."""
    dense = _vec(dense_cost, "dense cost")
    n = dense.numel()
    if value_or_list is None or value_or_list == "uniform":
        kr = block_budget(dense, other_cost, prune_ratio) / float(dense.sum())
        return torch.full((n,), min(kr, 1.0), dtype=_F64)
    if isinstance(value_or_list, (int, float)) and not isinstance(value_or_list, bool):
        vals = [float(value_or_list)] * n
    elif isinstance(value_or_list, (list, tuple)):
        vals = list(value_or_list)
        if len(vals) != n:
            raise P3BError(f"fixed keep ratio has {len(vals)} values, expected {n} (2 per layer: attn, mlp)")
    else:
        raise P3BError(f"fixed keep ratio must be a number, a list of {n} numbers or 'uniform', "
                       f"got {value_or_list!r}")
    try:
        kr = torch.tensor([float(v) for v in vals], dtype=_F64)
    except (TypeError, ValueError):
        raise P3BError(f"fixed keep ratio values must be numbers, got {vals!r}") from None
    if not torch.isfinite(kr).all() or (kr < 0).any() or (kr > 1).any():
        raise P3BError(f"fixed keep ratio values must lie in [0, 1], got {vals}")
    return kr


# ------------------------------------------------------------------------------------------
# Schedule (section 5), in optimizer steps
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Warm-up / sparsify / sharpen / frozen phases in optimizer steps (steps completed so far).

    Masks are updated at `start`, every `update_every` steps after it during sparsify and sharpen,
    and one last time at `final` (tau = tau_min: hard masks), after which they are frozen."""
    start: int  # end of warm-up: first mask update (progress 0)
    sparse: int  # end of sparsify: applied keep ratio reaches the goal (progress 1)
    final: int  # end of sharpen: tau reaches tau_min, last update, masks frozen
    update_every: int  # steps between mask updates
    tau_max: float = 0.1  # soft-mask temperature during sparsify
    tau_min: float = 0.0  # temperature at `final` (0 = hard 0/1 step)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.sparse <= self.final:
            raise P3BError(f"schedule must satisfy 0 <= start <= sparse <= final steps, got "
                           f"{self.start}, {self.sparse}, {self.final}")
        if self.update_every < 1:
            raise P3BError(f"update_every must be >= 1 step, got {self.update_every}")
        if not (0.0 <= self.tau_min <= self.tau_max):
            raise P3BError(f"need 0 <= tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")

    @classmethod
    def from_epochs(cls, start: float, sparse: float, final: float, steps_per_epoch: int,
                    update_every: Optional[int] = None, tau_max: float = 0.1,
                    tau_min: float = 0.0) -> "Schedule":
        """Convert epoch boundaries (floats allowed) to steps; update_every None -> ~3 per epoch."""
        if steps_per_epoch < 1:
            raise P3BError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
        s = lambda e: int(round(float(e) * steps_per_epoch))  # noqa: E731
        every = update_every if update_every is not None else max(1, round(steps_per_epoch / 3))
        return cls(s(start), s(sparse), s(final), int(every), float(tau_max), float(tau_min))

    def phase(self, step: int) -> str:
        if step < self.start:
            return "warmup"
        if step < self.sparse:
            return "sparsify"
        if step < self.final:
            return "sharpen"
        return "frozen"

    def progress(self, step: int) -> float:
        """(step - start) / (sparse - start) clipped to [0, 1]; a zero-length sparsify jumps to 1."""
        if step < self.start:
            return 0.0
        if self.sparse == self.start:
            return 1.0
        return min(1.0, (step - self.start) / (self.sparse - self.start))

    def tau(self, step: int) -> float:
        """tau_max up to `sparse`, then linear down to tau_min at `final` (and after)."""
        if step >= self.final:  # checked first: the last update (at final) is always tau_min
            return float(self.tau_min)
        if step <= self.sparse:
            return float(self.tau_max)
        f = (step - self.sparse) / (self.final - self.sparse)
        return float(self.tau_max + (self.tau_min - self.tau_max) * f)

    def applied(self, kr_goal: torch.Tensor, step: int) -> torch.Tensor:
        """kr_applied = 1 - (1 - kr_goal) * progress: the ramp from dense to the goal."""
        kr = torch.as_tensor(kr_goal, dtype=_F64)
        return 1.0 - (1.0 - kr) * self.progress(step)

    def is_update(self, step: int) -> bool:
        """True at start, every update_every steps after it, and at final; never after final."""
        if step < self.start or step > self.final:
            return False
        return step == self.final or (step - self.start) % self.update_every == 0
