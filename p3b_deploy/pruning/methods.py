"""Pruning methods behind one registry: name -> Method, reached by `create_method(name)`.

Every method turns (model, data, cfg, out_dir) into a run dir with a plan.json in the same
format, so surgery never knows who wrote the plan. The trainer-native methods live here:
- `p3b`: keep ratios from block benefit (the method),
- `uniform`: the same loop and intra-block selection, with one fixed keep ratio for every block
  (cfg.fixed_keep_ratio: None = the uniform value that hits the budget, a float, or a hand-set
  list of 2*depth values),
- `dense`: plain fine-tuning, no pruning (the dense ceiling; also the source-model trainer).
Other methods (e.g. Torch-Pruning criteria) register themselves with `register_method`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import P3BError

RunFn = Callable[..., Any]  # (model, data, cfg, out_dir, model_kwargs) -> PruneResult


@dataclass(frozen=True)
class Method:
    name: str  # registry key, the --method value
    description: str  # one line for --help
    run: RunFn  # (model, data, cfg, out_dir, model_kwargs) -> PruneResult


METHODS: dict[str, Method] = {}


def register_method(name: str, description: str) -> Callable[[RunFn], RunFn]:
    """Decorator: make `fn(model, data, cfg, out_dir, model_kwargs) -> PruneResult` a method."""
    def deco(fn: RunFn) -> RunFn:
        METHODS[name] = Method(name, description, fn)
        return fn
    return deco


def create_method(name: str) -> Method:
    if name not in METHODS:
        raise P3BError(f"unknown pruning method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _trainer_method(model, data, cfg, out_dir: str | os.PathLike | None, model_kwargs=None):
    from .engine import train_prune
    return train_prune(model, data, cfg, out_dir, model_kwargs)


register_method("p3b", "P3B: keep ratios from block benefit, reallocated at every mask update")(_trainer_method)
register_method("uniform", "same loop with a fixed keep ratio per block (uniform or --keep-ratio list)")(_trainer_method)
register_method("dense", "plain fine-tuning, no pruning (dense ceiling)")(_trainer_method)


# ------------------------------------------------------------------------------------------
# Torch-Pruning baselines: one-shot plans from TP importance criteria
# ------------------------------------------------------------------------------------------
# Names: tp-<criterion>[-global]. <criterion> is `taylor` (tp.importance.GroupTaylorImportance,
# |w * dL/dw| summed over the group) or `magnitude` (tp.importance.GroupMagnitudeImportance, L2).
# Without `-global` every prunable group keeps the same fraction of its channels ("uniform", TP's
# default local pruning); with `-global` all channels are ranked together on per-group
# mean-normalised scores (TP's global pruning) and removed lowest first until the budget is met.
# Prunable groups per layer (the residual width D is not pruned, as in TP's ViT examples):
#   - attention: head_dim channels, shared by all heads and by q/k/v (plan qk == v, heads kept);
#     a channel's score is the TP group score summed over q/k/v and heads (the TP group couples
#     qkv's output rows with proj's input columns);
#   - MLP: hidden channels (fc1 rows + fc2 columns, one TP group).
# At least one channel per group is kept, so no branch is removed. The plan is made once, at
# cfg.start_epoch (after the same warm-up as P3B), from `TP_CALIB_BATCHES` training batches
# (Taylor needs gradients); from then on the hard masks stay fixed for the rest of training.
TP_CRITERIA = ("taylor", "magnitude")
TP_CALIB_BATCHES = 8  # batches whose loss gradients feed the Taylor criterion


def tp_importance(criterion: str):
    """The Torch-Pruning importance object for `criterion` (no normalisation: we normalise per unit)."""
    import torch_pruning as tp
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    raise P3BError(f"unknown Torch-Pruning criterion '{criterion}'; known: {', '.join(TP_CRITERIA)}")


def tp_groups(model) -> list[tuple[Any, Any]]:
    """Per layer, the TP dependency groups rooted at qkv's and fc1's output channels."""
    import torch
    import torch_pruning as tp
    import warnings
    spec_in = next(model.parameters())
    size = model.patch_embed.img_size
    example = torch.zeros(1, model.patch_embed.proj.in_channels, *size, device=spec_in.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cls_token/pos_embed "unwrapped parameters": never pruned here
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    out = []
    for blk in model.blocks:
        qkv, fc1 = blk.attn.qkv, blk.mlp.fc1
        out.append((dg.get_pruning_group(qkv, tp.prune_linear_out_channels, idxs=list(range(qkv.out_features))),
                    dg.get_pruning_group(fc1, tp.prune_linear_out_channels, idxs=list(range(fc1.out_features)))))
    return out


def tp_channel_scores(model, groups, criterion: str) -> list[tuple[Any, Any]]:
    """Per layer (head_dim scores, hidden scores), each normalised to mean 1.

    Taylor reads the parameters' `.grad` (the caller runs backward first)."""
    imp = tp_importance(criterion)
    out = []
    for blk, (g_attn, g_mlp) in zip(model.blocks, groups):
        H, hd = blk.attn.num_heads, blk.attn.head_dim
        a = imp(g_attn).float().view(3, H, hd).sum((0, 1))
        m = imp(g_mlp).float()
        out.append((a / a.mean().clamp_min(1e-30), m / m.mean().clamp_min(1e-30)))
    return out


def _plan_for_keep(spec, keeps: list[tuple[list[int], list[int]]]):
    from ..plan import Plan
    plan = Plan.dense(spec)
    for L, (hd_keep, hid_keep), lp in zip(spec.layers, keeps, plan.layers):
        full_hd, full_hid = len(hd_keep) == L.attn.head_dim, len(hid_keep) == L.mlp.hidden
        lp.attn.qk = lp.attn.v = None if full_hd else sorted(hd_keep)
        lp.mlp.hidden = None if full_hid else sorted(hid_keep)
    return plan


def _cost(plan, spec, params_other: int, budget: str) -> int:
    c = plan.counts(spec, params_other)
    return c.macs if budget == "macs" else c.params


def plan_from_scores(spec, scores: list[tuple[Any, Any]], prune_ratio: float, params_other: int,
                     scope: str = "uniform", budget: str = "params", meta: dict | None = None):
    """A Plan keeping the highest-scoring channels so the model's cost is (1 - prune_ratio) of dense.

    scope "uniform": one keep fraction for every group (bisected to the budget, the MLP groups
    absorbing the head_dim rounding); "global": channels
    of all groups ranked together, removed lowest-score first while the cost is above the budget."""
    import torch
    if not 0.0 < prune_ratio < 1.0:
        raise P3BError(f"prune ratio must be in (0, 1), got {prune_ratio}")
    dense = _cost(_plan_for_keep(spec, [(list(range(a.numel())), list(range(m.numel()))) for a, m in scores]),
                  spec, params_other, budget)
    target = (1.0 - prune_ratio) * dense
    orders = [(torch.argsort(a, descending=True, stable=True).tolist(),
               torch.argsort(m, descending=True, stable=True).tolist()) for a, m in scores]
    if scope == "uniform":
        keep_n = _uniform_counts(spec, orders, target, params_other, budget)
    elif scope == "global":
        keep_n = _global_counts(spec, scores, target, params_other, budget)
    else:
        raise P3BError(f"scope must be 'uniform' or 'global', got {scope!r}")
    plan = _plan_for_keep(spec, [(oa[:na], om[:nm]) for (oa, om), (na, nm) in zip(orders, keep_n)])
    plan = plan.with_counts(spec, params_other)  # exact counts; keep_ratio = realised per block
    plan.meta = dict(meta or {}, target_cost=int(round(target)), budget=budget, scope=scope)
    return plan


def _uniform_counts(spec, orders, target: float, params_other: int, budget: str) -> list[tuple[int, int]]:
    """One keep fraction f for every group, bisected to the target; then, because one head_dim
    channel in every layer is a coarse step (~7% of the budget at 85% pruning), the MLP groups'
    common fraction is re-bisected with the attention counts fixed. Both fractions are then equal
    up to that rounding (at most 1/head_dim)."""
    def counts(fa: float, fm: float) -> list[tuple[int, int]]:
        return [(max(1, round(fa * len(oa))), max(1, round(fm * len(om)))) for oa, om in orders]

    def cost(n: list[tuple[int, int]]) -> int:
        return _cost(_plan_for_keep(spec, [(oa[:na], om[:nm]) for (oa, om), (na, nm) in zip(orders, n)]),
                     spec, params_other, budget)

    def closest(make) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(make(mid)) <= target else (lo, mid)
        return lo if abs(cost(make(lo)) - target) <= abs(cost(make(hi)) - target) else hi

    f = closest(lambda x: counts(x, x))
    g = closest(lambda x: counts(f, x))
    return counts(f, g)


def _global_counts(spec, scores, target: float, params_other: int, budget: str) -> list[tuple[int, int]]:
    """Remove channels lowest normalised score first (costs are linear in the kept channel count)."""
    import torch
    n = [[a.numel(), m.numel()] for a, m in scores]
    full = _plan_for_keep(spec, [(list(range(a)), list(range(m))) for a, m in n])
    cost = _cost(full, spec, params_other, budget)
    unit = []  # cost of one channel of (layer, kind): dense cost minus cost with one channel fewer
    for i, (a, m) in enumerate(n):
        for kind, size in ((0, a), (1, m)):
            keeps = [(list(range(x)), list(range(y))) for x, y in n]
            keeps[i] = (list(range(a - 1)), keeps[i][1]) if kind == 0 else (keeps[i][0], list(range(m - 1)))
            unit.append(cost - _cost(_plan_for_keep(spec, keeps), spec, params_other, budget))
    flat = torch.cat([torch.cat([a, m]) for a, m in scores])
    owner = [(i, kind) for i, (a, m) in enumerate(n) for kind, size in ((0, a), (1, m)) for _ in range(size)]
    for j in torch.argsort(flat, stable=True).tolist():
        if cost <= target:
            break
        i, kind = owner[j]
        if n[i][kind] > 1:
            n[i][kind] -= 1
            cost -= unit[2 * i + kind]
    return [(a, m) for a, m in n]


class OneShotPruner:
    """Trainer-side pruner of the TP baselines (same interface as p3b.pruner.Pruner).

    Nothing happens during warm-up; at the first optimizer step >= cfg.start_epoch the plan is
    made once from the TP criterion and set as hard gates, which never change afterwards."""

    probes = None  # no benefit probes: the trainer runs the plain model

    def __init__(self, model, cfg, steps_per_epoch: float, calib, criterion: str, scope: str) -> None:
        from ..models.gates import Gates
        from ..models.vit import describe, nonblock_params
        self.model, self.cfg, self.calib = model, cfg, calib
        self.criterion, self.scope = criterion, scope
        self.spec = describe(model)
        self.params_other = nonblock_params(model)
        self.start = round(cfg.schedule()[0] * steps_per_epoch)
        self.groups = tp_groups(model)  # traced before the gate hooks exist
        self.gates = Gates(model, self.spec, tie_qkv=True).requires_grad_(False)
        self.made: Any = None  # the one plan, once made
        self.history: list[dict[str, Any]] = []

    def begin_step(self, step: int) -> None: ...

    def observe(self, ce, step: int) -> None: ...

    def after_step(self, step: int, grad_scale: float = 1.0) -> None: ...

    def maybe_update(self, step: int) -> dict[str, Any] | None:
        if self.made is not None or step < self.start:
            return None
        self.made = self.make_plan()
        self.gates.set_plan(self.made)
        kr = [round(float(r), 6) for r in self.made.keep_ratio]
        rec = {"event": "mask_update", "step": step, "phase": "one-shot", "tau": 0.0,
               "kr_goal": kr, "kr_applied": kr, "imp": None, "dpsi_cls": None, "dpsi_patch": None,
               "kept_params": self.made.params["kept"], "dense_params": self.made.params["dense"]}
        self.history.append(rec)
        return rec

    def make_plan(self):
        """Scores from the TP criterion (Taylor: on gradients of `calib` batches) -> Plan."""
        import torch
        import torch.nn.functional as F
        model = self.model
        if self.criterion == "taylor":
            model.zero_grad(set_to_none=True)
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)  # same batches/augmentation on every rank
                for x, y in self.calib():
                    x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(model(x), y, label_smoothing=self.cfg.label_smoothing)
                    loss.backward()
        scores = tp_channel_scores(model, self.groups, self.criterion)
        model.zero_grad(set_to_none=True)
        meta = {"criterion": self.criterion, "tp_importance": type(tp_importance(self.criterion)).__name__}
        return plan_from_scores(self.spec, scores, self.cfg.prune_ratio, self.params_other,
                                self.scope, self.cfg.budget, meta)

    def plan(self, meta: dict[str, Any]):
        if self.made is None:
            raise P3BError("the Torch-Pruning plan is made at --prune-start; the run ended before it")
        from dataclasses import replace
        return replace(self.made, meta=dict(self.made.meta, **meta))

    def state_dict(self) -> dict[str, Any]:
        return {"plan": None if self.made is None else self.made.to_dict(), "history": self.history}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        from ..plan import Plan
        self.history = list(st["history"])
        self.made = None if st["plan"] is None else Plan.from_dict(st["plan"])
        if self.made is not None:
            self.gates.set_plan(self.made)


def _calib_batches(data, n: int = TP_CALIB_BATCHES):
    """The first `n` training batches in dataset order (a callable: fresh iterator each time)."""
    from itertools import islice
    from torch.utils.data import DataLoader
    ds = data.train.dataset
    return lambda: islice(iter(DataLoader(ds, batch_size=data.train.batch_size, shuffle=False)), n)


def _tp_method(criterion: str, scope: str) -> RunFn:
    def run(model, data, cfg, out_dir, model_kwargs=None):
        from .engine import train_prune
        if cfg.budget == "latency":
            raise P3BError("the Torch-Pruning baselines budget params or MACs; for a latency target use "
                           "--method p3b or uniform")
        factory = lambda m, spe: OneShotPruner(m, cfg, spe, _calib_batches(data), criterion, scope)  # noqa: E731
        return train_prune(model, data, cfg, out_dir, model_kwargs, pruner_factory=factory)
    return run


for _crit in TP_CRITERIA:
    for _scope, _suffix in (("uniform", ""), ("global", "-global")):
        register_method(f"tp-{_crit}{_suffix}",
                        f"Torch-Pruning {_crit} importance, {_scope} channel ratio, one shot at --prune-start"
                        )(_tp_method(_crit, _scope))
