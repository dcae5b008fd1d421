"""A P3B-shaped slim model without training: for sizing a geometry on the target device.

`preview_plan(spec, other, prune_ratio)` is a deterministic stand-in for what P3B produces: a
smooth, non-uniform per-block keep-ratio profile (a seeded sum of three sines around the mean),
scaled by bisection until the kept parameters are (1 - prune_ratio) of the dense model's. Inside
a block with keep ratio k the residual in/out dims keep k^0.3 and head_dim / MLP hidden keep
k^0.7 (P3B's gate factors make residual dims costlier to drop than hidden ones); k < 0.03
removes the branch. `residual=False` keeps the embed dims whole (the `prune` default) and cuts
head_dim / hidden by k. Which channels are kept is seeded random: the weights are random anyway.

`preview_slim(name, prune_ratio)` builds the timm model (random init, or a checkpoint), applies
such a plan with `slim` and returns the verified slim model; `p3b-deploy slim --preview MODEL`
saves it as a slim dir. Its latency is the point; its accuracy means nothing.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch.nn as nn

from ..errors import SurgeryError
from ..plan import AttnPlan, LayerPlan, MlpPlan, Plan
from ..spec import ViTSpec

RESIDUAL_EXP, HIDDEN_EXP = 0.3, 0.7  # kept residual dims ~ k^0.3, kept head_dim / hidden ~ k^0.7
REMOVE_BELOW = 0.03  # a branch with a smaller keep ratio is removed


def _pick(rng: random.Random, n: int, frac: float) -> list[int] | None:
    k = max(1, min(n, round(n * frac)))
    return None if k == n else sorted(rng.sample(range(n), k))


def shaped_plan(spec: ViTSpec, ratios: Sequence[float], seed: int = 0, residual: bool = True) -> Plan:
    """The plan for per-branch keep ratios (attn0, mlp0, attn1, ...) shaped as described above."""
    rng = random.Random(seed)
    D, hd, hid = spec.embed_dim, spec.head_dim, spec.mlp_hidden
    e_bot = HIDDEN_EXP if residual else 1.0
    res = (lambda k: _pick(rng, D, k ** RESIDUAL_EXP)) if residual else (lambda k: None)  # noqa: E731
    layers = []
    for i in range(spec.depth):
        ka, km = ratios[2 * i], ratios[2 * i + 1]
        attn = AttnPlan(removed=True) if ka < REMOVE_BELOW else AttnPlan(
            in_=res(ka), out=res(ka), qk=(q := _pick(rng, hd, ka ** e_bot)), v=q)
        mlp = MlpPlan(removed=True) if km < REMOVE_BELOW else MlpPlan(
            in_=res(km), out=res(km), hidden=_pick(rng, hid, km ** e_bot))
        layers.append(LayerPlan(attn=attn, mlp=mlp))
    plan = Plan.dense(spec)
    plan.layers = layers
    return plan


def keep_profile(n_branches: int, seed: int = 0) -> np.ndarray:
    """A smooth non-uniform profile with mean 1 over the branches (seeded)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_branches) / n_branches
    prof = 1 + sum(0.35 / (k + 1) * np.sin(2 * math.pi * (k + 1) * t + rng.uniform(0, 2 * math.pi)) for k in range(3))
    return prof / prof.mean()


def _solve(make: Callable[[float], Plan], target: int, count: Callable[[Plan], int]) -> Plan:
    """Bisection on a scale s in (0, 1] so that count(make(s)) ~= target (counts grow with s)."""
    lo, hi, best, best_err = 0.0, 1.0, None, None
    for _ in range(30):
        s = (lo + hi) / 2
        plan = make(s)
        n = count(plan)
        if best is None or abs(n - target) < best_err:
            best, best_err = plan, abs(n - target)
        if abs(n - target) / target < 0.002:
            break
        lo, hi = (s, hi) if n < target else (lo, s)
    return best  # type: ignore[return-value]


def preview_plan(spec: ViTSpec, other_params: int, prune_ratio: float, seed: int = 0, residual: bool = True) -> Plan:
    """A P3B-shaped plan keeping (1 - prune_ratio) of the dense parameters (within ~0.2%)."""
    if not 0.0 < prune_ratio < 1.0:
        raise SurgeryError(f"prune ratio must be in (0, 1), got {prune_ratio}")
    dense = Plan.dense(spec).counts(spec, other_params).params
    prof = keep_profile(2 * spec.depth, seed)
    plan = _solve(lambda s: shaped_plan(spec, list(np.clip(prof * s * 1.6, 0.0, 1.0)), seed, residual),
                  round((1 - prune_ratio) * dense), lambda p: p.counts(spec, other_params).params)
    plan.meta = {"method": "preview", "prune_ratio": prune_ratio, "seed": seed, "residual": residual,
                 "note": "P3B-shaped keep-ratio profile without training (random channels): for sizing only"}
    return plan


def preview_slim(model: str | nn.Module, prune_ratio: float = 0.5, *, seed: int = 0, residual: bool = True,
                 residual_io: str = "index", round_to: int = 1, **model_kwargs: Any) -> nn.Module:
    """The slim model of a P3B-shaped plan for `model` (a timm name: random init unless
    `checkpoint=` is given, through `load_model`; or a dense module), verified by `slim`."""
    from ..models.vit import describe, load_model, nonblock_params
    from .core import slim
    dense = load_model(model, **model_kwargs) if isinstance(model, str) else model
    dense = dense.eval()
    plan = preview_plan(describe(dense), nonblock_params(dense), prune_ratio, seed, residual)
    return slim(dense, plan, round_to=round_to, residual_io=residual_io)
