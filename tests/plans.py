"""Seeded random plans for tests (surgery, export, bench): `from plans import random_plan`.

Each live branch keeps a random subset of every prunable group; some groups are kept whole
(None), some keep a single channel, some branches are removed, so one seed exercises many cases.
"""
from __future__ import annotations

import random

from p3b_deploy.plan import AttnPlan, LayerPlan, MlpPlan, Plan
from p3b_deploy.spec import ViTSpec


def _subset(rng: random.Random, n: int, keep: float, whole_prob: float = 0.2,
            one_prob: float = 0.1) -> list[int] | None:
    """None (all kept), a single index, or about keep*n random indices (at least 1), sorted."""
    u = rng.random()
    if u < whole_prob:
        return None
    if u < whole_prob + one_prob:
        return [rng.randrange(n)]
    k = max(1, min(n, round(n * keep * rng.uniform(0.5, 1.5))))
    return sorted(rng.sample(range(n), k))


def random_plan(spec: ViTSpec, seed: int, keep: float = 0.5, remove_prob: float = 0.1,
                qk: bool = True) -> Plan:
    """A valid random plan for `spec`. qk=False keeps q/k whole (for q/k-norm models)."""
    rng = random.Random(seed)
    D, H, hd, hid = spec.embed_dim, spec.num_heads, spec.head_dim, spec.mlp_hidden
    layers = []
    for _ in range(spec.depth):
        if rng.random() < remove_prob:
            attn = AttnPlan(removed=True)
        else:
            attn = AttnPlan(in_=_subset(rng, D, keep), heads=_subset(rng, H, keep),
                            qk=_subset(rng, hd, keep) if qk else None, v=_subset(rng, hd, keep),
                            out=_subset(rng, D, keep))
        if rng.random() < remove_prob:
            mlp = MlpPlan(removed=True)
        else:
            mlp = MlpPlan(in_=_subset(rng, D, keep), hidden=_subset(rng, hid, keep), out=_subset(rng, D, keep))
        layers.append(LayerPlan(attn=attn, mlp=mlp))
    plan = Plan.dense(spec)
    plan.layers = layers
    plan.meta = {"method": "random", "seed": seed}
    plan.validate(spec)
    return plan


def randomize_(model, seed: int = 0):
    """Re-draw every parameter in place so that no branch is negligible (timm's init scales
    layer-scale branches by ~1e-5): norm weights and layer-scale gammas ~ N(1, 0.1), biases
    ~ N(0, 0.1), matrices ~ N(0, 1/fan_in), tokens / pos embed ~ N(0, 0.5). Returns the model."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):
                p.copy_(1.0 + 0.1 * r)
            elif leaf == "bias":
                p.copy_(0.1 * r)
            elif p.dim() >= 2 and leaf == "weight":
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(0.5 * r)
    return model
