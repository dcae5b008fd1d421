"""Intra-block selection: which channels of each block P3B keeps (method page sections 2, 6, 7).

On top of `p3b_deploy.gates.Gates(model, tie_qkv=True)`: Taylor scores per gate element, the
rank-normalised, factor-weighted joint sort of a block's gates, the threshold search that hits a
block's cost target under bilinear costs, soft sigmoid masks, and the hard plan at the end.

Gates per block (the `attn_heads` gate stays 1 and is not scored):
  attention: attn_in (D), attn_qk (head_dim; q, k and v, tied), attn_out (D)
  MLP:       mlp_in (D), mlp_hidden (hidden), mlp_out (D)
Costs use p3b_deploy.spec's attn_params/mlp_params/attn_macs/mlp_macs, so what the search budgets
is exactly what the plan (and surgery) counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional

import torch
import torch.nn.functional as F

from ...errors import CheckpointError, P3BError
from ...models.gates import Gates
from ...plan import AttnPlan, LayerPlan, MlpPlan, Plan, dims_of
from ...spec import AttnDims, MlpDims, ViTSpec, attn_macs, attn_params, mlp_macs, mlp_params

BLOCK_GATES = {"attn": ("attn_in", "attn_qk", "attn_out"), "mlp": ("mlp_in", "mlp_hidden", "mlp_out")}
# Gates on the residual stream's embed dims (what a branch reads / writes); P3BConfig.prune_residual
# False keeps them whole, so only head_dim and MLP hidden channels are pruned.
RESIDUAL_GATES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
LOGIT_09 = -math.log(1.0 / 0.9 - 1.0)  # = ln 9: the soft mask is 0.9 at tau*n elements past the threshold
COSTS = ("params", "macs")


# ------------------------------------------------------------------------------------------
# Costs
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockDims:
    """One block (attn or mlp branch of a layer) of a model, for costing its gates."""
    spec: ViTSpec  # the dense model's structure
    block: int  # block index in attn0, mlp0, attn1, ... order

    @property
    def layer(self) -> int:
        return self.block // 2

    @property
    def kind(self) -> str:
        return "attn" if self.block % 2 == 0 else "mlp"

    @property
    def gates(self) -> tuple[str, ...]:
        return BLOCK_GATES[self.kind]

    def sizes(self) -> dict[str, int]:
        """Dense element count of each gate of the block."""
        L, D = self.spec.layers[self.layer], self.spec.embed_dim
        if self.kind == "attn":
            return {"attn_in": D, "attn_qk": L.attn.head_dim, "attn_out": D}
        return {"mlp_in": D, "mlp_hidden": L.mlp.hidden, "mlp_out": D}


def _raw_cost(dims: BlockDims, counts: Mapping[str, Any], cost: str) -> Any:
    """Bilinear cost of a live branch with kept `counts` (ints or broadcastable tensors)."""
    s, i = dims.spec, dims.layer
    if cost not in COSTS:
        raise P3BError(f"budget must be one of {COSTS}, got {cost!r}")
    if dims.kind == "attn":
        qk = counts["attn_qk"]  # P3B ties v to q/k
        d = AttnDims(counts["attn_in"], s.layers[i].attn.num_heads, qk, qk, counts["attn_out"])
        return attn_params(s, i, d) if cost == "params" else attn_macs(s, i, d)
    d = MlpDims(counts["mlp_in"], counts["mlp_hidden"], counts["mlp_out"])
    return mlp_params(s, i, d) if cost == "params" else mlp_macs(s, i, d)


def kept_block_cost(dims: BlockDims, counts: Mapping[str, Any], cost: str = "params") -> torch.Tensor:
    """Kept cost (int64) for kept counts per gate; 0 where any gate keeps nothing (branch removed)."""
    c = {g: torch.as_tensor(counts[g], dtype=torch.int64) for g in dims.gates}
    alive = torch.stack(torch.broadcast_tensors(*c.values())).gt(0).all(0)
    raw = torch.as_tensor(_raw_cost(dims, c, cost), dtype=torch.int64)
    return torch.where(alive, raw, torch.zeros_like(raw))


def dense_block_cost(dims: BlockDims, cost: str = "params") -> int:
    return int(_raw_cost(dims, dims.sizes(), cost))


def block_cost(dims: BlockDims, counts: Mapping[str, int], cost: str = "params") -> dict[str, int]:
    """Cost of one element of each gate given the other gates' kept counts (bilinear marginals).

    E.g. one MLP hidden channel = kept inputs of fc1 + fc1 bias + kept outputs of fc2. The jump
    when a gate's last element goes (the whole branch, norm included, disappears) is not part of
    the marginal; kept_block_cost includes it."""
    base = int(_raw_cost(dims, counts, cost))
    return {g: base - int(_raw_cost(dims, {**counts, g: counts[g] - 1}, cost)) for g in dims.gates}


# ------------------------------------------------------------------------------------------
# Soft masks and the per-block threshold search
# ------------------------------------------------------------------------------------------
def soft_mask(rank: torch.Tensor, t: float, n: int, tau: float) -> torch.Tensor:
    """m = sigmoid(ln9 * (rank - t) / (tau * n)): 0.5 at the threshold, 0.9 at tau*n past it.

    tau == 0 gives the hard step (rank > t -> 1, else 0)."""
    r = rank.to(torch.float64)
    if tau <= 0:
        return (r > t).to(torch.float32)
    return torch.sigmoid(LOGIT_09 * (r - t) / (tau * n)).to(torch.float32)


def gate_ranks(score: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Ranks 1..n by ascending score (1 = least important). Ties (and missing/NaN scores, read as
    0) are broken by channel index, so equal scores give a deterministic order."""
    s = torch.zeros(n, dtype=torch.float64) if score is None else torch.nan_to_num(
        score.detach().to("cpu", torch.float64).reshape(-1), nan=0.0)
    if s.numel() != n:
        raise ValueError(f"score has {s.numel()} elements, gate has {n}")
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(s, stable=True)] = torch.arange(1, n + 1)
    return rank


def _factor(factors: Mapping[str, float], gate: str) -> float:
    return float(factors.get(gate, 1.0))


def select_block(scores: Mapping[str, Optional[torch.Tensor]], factors: Mapping[str, float], dims: BlockDims,
                 target_removed: float, tau: float, cost: str = "params",
                 fixed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Soft masks for one block: remove low-ranked elements until `target_removed` cost is reached.

    Each gate's scores become normalised ranks rank/n in (0, 1], times the gate's factor; all gates
    are sorted together and removed in that order. The removed cost of every prefix of the sorted
    list is computed exactly (bilinear costs, branch removal included), and the prefix closest to
    the target wins (ties: the smaller one) -- an exact version of the reference's iterated search,
    so P3BConfig.threshold_iters is not needed (the result is what any number of iterations converges to).
    If the prefix empties a gate, the whole branch is removed: every gate gets threshold n + 0.5,
    so the hard masks are all zero (the gated model is then exactly the identity branch), while
    soft masks still leave the best elements partly on, so the branch can show benefit and return.
    Gate g's threshold index is t_g = k_g + 0.5 for k_g removed elements: kept (m >= 0.5) iff rank > t_g.
    Gates in `fixed` are never pruned (all ones): the search only runs over the other gates' elements,
    so emptying one of those still removes the whole branch."""
    names, sizes = dims.gates, dims.sizes()
    ranks = {g: gate_ranks(scores.get(g), sizes[g]) for g in names}
    keys = torch.cat([torch.full((sizes[g],), math.inf, dtype=torch.float64) if g in fixed
                      else ranks[g].double() / sizes[g] * _factor(factors, g) for g in names])
    gid = torch.cat([torch.full((sizes[g],), j, dtype=torch.int64) for j, g in enumerate(names)])
    order = torch.argsort(keys, stable=True)
    removed_n = torch.cumsum(F.one_hot(gid[order], len(names)), 0)
    removed_n = torch.cat([torch.zeros(1, len(names), dtype=torch.int64), removed_n])  # prefix 0..T
    kept = kept_block_cost(dims, {g: sizes[g] - removed_n[:, j] for j, g in enumerate(names)}, cost)
    removed_cost = dense_block_cost(dims, cost) - kept.double()
    prunable = 1 + sum(sizes[g] for g in names if g not in fixed)  # prefixes that leave `fixed` whole
    k = int(torch.argmin((removed_cost[:prunable] - float(target_removed)).abs()))
    k_g = {g: int(removed_n[k, j]) for j, g in enumerate(names)}
    if any(k_g[g] >= sizes[g] for g in names):
        k_g = dict(sizes)
    return {g: soft_mask(ranks[g], k_g[g] + 0.5, sizes[g], tau) for g in names}


def _gate_params(gates: Gates, dims: BlockDims) -> dict[str, torch.Tensor]:
    layer = gates.layers[dims.layer]
    return {g: getattr(layer, g) for g in dims.gates}


@torch.no_grad()
def update_masks(gates: Gates, scores: Mapping[str, torch.Tensor], kr_applied: Any, tau: float, cfg: Any) -> None:
    """Set every block's gate values (in place) from select_block.

    Block i's target is dense_cost_i * (1 - kr_applied_i), in cfg.budget units (params or MACs).
    `scores` maps 'L{layer}.{gate}' to mean Taylor scores (TaylorScores.mean()); missing -> all equal.
    cfg.prune_residual False keeps the RESIDUAL_GATES whole."""
    spec = gates.spec
    fixed = () if cfg.prune_residual else RESIDUAL_GATES
    cost = cfg.budget if cfg.budget in COSTS else "params"  # a latency budget selects channels by params
    kr = torch.as_tensor(kr_applied, dtype=torch.float64).reshape(-1)
    if kr.numel() != spec.num_blocks:
        raise ValueError(f"kr_applied has {kr.numel()} entries, expected {spec.num_blocks}")
    for b in range(spec.num_blocks):
        dims = BlockDims(spec, b)
        target = dense_block_cost(dims, cost) * (1.0 - float(kr[b]))
        block_scores = {g: scores.get(f"L{dims.layer}.{g}") for g in dims.gates}
        masks = select_block(block_scores, cfg.gate_factors, dims, target, tau, cost, fixed)
        for g, p in _gate_params(gates, dims).items():
            p.copy_(masks[g])
        v = gates.layers[dims.layer].attn_v
        if dims.kind == "attn" and v is not None:  # untied gates: v follows q/k as P3B ties them
            v.copy_(masks["attn_qk"])


# ------------------------------------------------------------------------------------------
# Hard masks -> counts and plan
# ------------------------------------------------------------------------------------------
def hard_keep(gates: Gates) -> list[dict[str, Optional[list[int]]]]:
    """Per block: kept indices (m >= 0.5) of each gate, or None for every gate if the branch is removed."""
    out = []
    for b in range(gates.spec.num_blocks):
        dims = BlockDims(gates.spec, b)
        keep = {g: torch.nonzero(p.detach() >= 0.5).flatten().tolist() for g, p in _gate_params(gates, dims).items()}
        out.append(None if any(not v for v in keep.values()) else keep)
    return out


def kept_cost(gates: Gates, spec: Optional[ViTSpec] = None, budget: str = "params") -> torch.Tensor:
    """Current kept params (or MACs) per block from hard masks (m >= 0.5), float64 (2*depth,)."""
    spec = spec or gates.spec
    vals = []
    for b, keep in enumerate(hard_keep(gates)):
        dims = BlockDims(spec, b)
        vals.append(0 if keep is None else int(kept_block_cost(dims, {g: len(keep[g]) for g in dims.gates}, budget)))
    return torch.tensor(vals, dtype=torch.float64)


def _idx(keep: list[int], n: int) -> Optional[list[int]]:
    return None if len(keep) == n else keep


def plan_from_gates(gates: Gates, spec: Optional[ViTSpec] = None, meta: Optional[dict] = None,
                    params_other: Optional[int] = None, keep_ratio: Optional[list[float]] = None) -> Plan:
    """The hard plan (m >= 0.5) of the current gates, with exact counts (Plan.with_counts).

    qk == v from the tied gate, heads None (all kept); a branch any of whose gates keeps nothing is
    removed. `params_other` (vit.nonblock_params(model)) is needed for the counts; if not given it
    is read from meta['params_other']. `keep_ratio` (e.g. the goal) defaults to the realised one."""
    spec = spec or gates.spec
    meta = dict(meta or {})
    other = params_other if params_other is not None else meta.get("params_other")
    if other is None:
        raise ValueError("plan_from_gates needs params_other = vit.nonblock_params(model) (or meta['params_other'])")
    layers = []
    keeps = hard_keep(gates)
    D = spec.embed_dim
    for i in range(spec.depth):
        a, m = keeps[2 * i], keeps[2 * i + 1]
        hd, hid = spec.layers[i].attn.head_dim, spec.layers[i].mlp.hidden
        ap = AttnPlan(removed=True) if a is None else AttnPlan(
            in_=_idx(a["attn_in"], D), qk=_idx(a["attn_qk"], hd), v=_idx(a["attn_qk"], hd), out=_idx(a["attn_out"], D))
        mp = MlpPlan(removed=True) if m is None else MlpPlan(
            in_=_idx(m["mlp_in"], D), hidden=_idx(m["mlp_hidden"], hid), out=_idx(m["mlp_out"], D))
        layers.append(LayerPlan(attn=ap, mlp=mp))
    plan = Plan(model=spec.name, img_size=spec.img_size[0], num_classes=spec.num_classes, dims=dims_of(spec),
                layers=layers, keep_ratio=None if keep_ratio is None else [float(x) for x in keep_ratio],
                meta=meta)
    return plan.with_counts(spec, int(other))


# ------------------------------------------------------------------------------------------
# Taylor scores (section 6) with all-reduce (section 7)
# ------------------------------------------------------------------------------------------
class TaylorScores:
    """Running sum of (m * dL/dm)^2 per gate element, and the number of steps summed.

    Call `accumulate()` once per optimizer step, after backward and before the next one: it reads
    the gates' gradients and then clears them (the gates are not in any optimizer, so nothing else
    would). `mean()` is what update_masks ranks; `reset()` after every mask update. The sums live
    in one flat buffer on the gates' device (one finiteness check per step, one all-reduce)."""

    SKIP = ("attn_heads",)  # P3B never prunes heads: that gate stays 1 and is not scored

    def __init__(self, gates: Gates) -> None:
        self.gates = gates
        self.params = {n: p for n, p in gates.named_gates() if n.split(".", 1)[1] not in self.SKIP}
        dev = next(iter(self.params.values())).device
        self.flat = torch.zeros(sum(p.numel() for p in self.params.values()), dtype=torch.float32, device=dev)
        self.sums: dict[str, torch.Tensor] = {}
        off = 0
        for n, p in self.params.items():
            self.sums[n] = self.flat[off:off + p.numel()].view(p.shape)
            off += p.numel()
        self.count = 0

    @torch.no_grad()
    def accumulate(self, grad_scale: float = 1.0) -> bool:
        """Add one step's scores; grads are divided by `grad_scale` (AMP loss scale) first.

        A step whose gate gradients are not finite (an fp16 overflow the scaler will skip) is not
        counted; returns whether the step was added. Gates without a gradient add zeros."""
        parts = [torch.zeros(p.numel(), device=self.flat.device) if p.grad is None
                 else (p.float() * p.grad.float() / grad_scale).square().reshape(-1) for p in self.params.values()]
        add = torch.cat(parts)
        ok = bool(torch.isfinite(add).all())
        if ok:
            self.flat += add
            self.count += 1
        for _, p in self.gates.named_gates():
            p.grad = None
        return ok

    def mean(self) -> dict[str, torch.Tensor]:
        """Average score per element since the last reset (zeros before any step)."""
        c = max(self.count, 1)
        return {n: s / c for n, s in self.sums.items()}

    def reset(self) -> None:
        self.flat.zero_()
        self.count = 0

    def all_reduce(self) -> None:
        """Sum scores and counts over ranks (no-op unless torch.distributed is initialised)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        buf = torch.cat([self.flat, torch.tensor([float(self.count)], device=self.flat.device)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.flat.copy_(buf[:-1])
        self.count = int(round(float(buf[-1])))

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {f"sum.{n}": s.detach().cpu().clone() for n, s in self.sums.items()}
        d["count"] = torch.tensor([self.count], dtype=torch.int64)
        return d

    def load_state_dict(self, d: Mapping[str, torch.Tensor]) -> None:
        want = {f"sum.{n}" for n in self.sums} | {"count"}
        if set(d) != want:
            missing, extra = sorted(want - set(d)), sorted(set(d) - want)
            raise CheckpointError(f"Taylor score state does not fit this model: missing {missing[:3]}, extra {extra[:3]}")
        for n, s in self.sums.items():
            t = d[f"sum.{n}"]
            if t.shape != s.shape:
                raise CheckpointError(f"Taylor score state for {n} has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            s.copy_(t)
        self.count = int(d["count"].reshape(-1)[0])
