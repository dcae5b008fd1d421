"""Surgery: a dense timm ViT + a Plan -> a physically smaller ViT whose output equals the masked model's.

Inside a branch the coupled channels (MLP hidden: fc1 rows + bias + fc2 columns; attention: q/k/v
channels of the kept heads, qkv bias, proj columns) are cut with Torch-Pruning. Residual reads and
writes are per branch, so they cannot be cut through the shared residual stream: a slim branch
normalises over the full embed dim, gathers its kept input dims (`in_idx`), and adds its smaller
output into its kept residual dims (`out_idx`). A removed branch is the identity. Attention keeps
the dense model's softmax scale 1/sqrt(original head_dim).

The result is the same timm `VisionTransformer` object with `blocks[i]` replaced by `SlimBlock`s,
so `forward_features`, `forward_head`, `num_classes` and `pretrained_cfg` keep working. The
realised structure is recorded as `model.p3b_slim_config` (a `SlimConfig`) for `save_slim`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SurgeryError
from ..plan import AttnPlan, LayerPlan, MlpPlan, Plan
from ..models.vit import describe, model_kwargs_of, nonblock_params
from ..spec import RESIDUAL_IO, ViTSpec, count

# how a branch reads / writes its kept residual dims (realised per branch, recorded in SlimConfig):
#   "index":   Gather reads, index_add writes (ONNX ScatterND with Transposes around it)
#   "scatter": Gather reads, scatter_add writes on the last axis (ONNX ScatterElements, no Transposes)
#   "pad_in":  zero-padded full-D input weights (no read op), index_add writes
#   "pad_out": Gather reads, zero-padded full-D output weights (no write op)
#   "dense":   zero-padded full-D input and output weights: no index ops
#   "auto" (a request, never recorded): per branch "index" or "dense", whichever `auto_io`'s cost
#   rule prices lower. Padded modes hold more parameters and compute more MACs.
_PAD_IN = ("pad_in", "dense")  # modes whose first linear takes all D inputs
_PAD_OUT = ("pad_out", "dense")  # modes whose last linear writes all D outputs
# cost of one residual element read (Gather) or written (index_add: ScatterND + Transposes), in
# MACs of padded matmul (ORT CPU, 2 threads, deit_small; fit in benchmarks/results/residual_io.md)
INDEX_COST_MACS = 350.0


# --------------------------------------------------------------------------------------------
# Slim modules
# --------------------------------------------------------------------------------------------
class IdentityBranch(nn.Module):
    """A removed branch: the residual passes through unchanged."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return x


class _ResidualBranch(nn.Module):
    """Shared residual read/write of a slim branch: x -> x + write(gamma * f(read(norm(x)))).

    `in_idx` / `out_idx` are int64 buffers of the kept residual dims, or None when the branch
    reads / writes all of them (then no index op appears in the graph). A padded side (residual_io
    "pad_in" / "pad_out" / "dense") has None too: its zero-padded weights do the selection."""

    def __init__(self, norm: nn.Module, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None,
                 gamma: torch.Tensor | None, drop_path: nn.Module, scatter: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.scatter = scatter  # write with scatter_add on the last axis instead of index_add
        self.register_buffer("in_idx", in_idx)
        self.register_buffer("out_idx", out_idx)
        self.gamma = None if gamma is None else nn.Parameter(gamma)
        self.drop_path = drop_path

    def read(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # statistics over the full embed dim, as in the dense model
        return x if self.in_idx is None else x.index_select(-1, self.in_idx)

    def write(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.gamma is not None:
            y = y * self.gamma
        y = self.drop_path(y)
        if self.out_idx is None:
            return x + y
        if self.scatter:  # ONNX ScatterElements(add) on the last axis: no Transposes around it
            return x.scatter_add(-1, self.out_idx.expand(y.shape), y)
        return x.index_add(-1, self.out_idx, y)


class SlimAttention(_ResidualBranch):
    """Attention branch with kept heads, separate q/k and v head dims, and the original scale."""

    def __init__(self, norm: nn.Module, qkv: nn.Linear, proj: nn.Linear, num_heads: int, qk_dim: int,
                 v_dim: int, scale: float, q_norm: nn.Module, k_norm: nn.Module, attn_drop: float,
                 proj_drop: nn.Module, fused_attn: bool, in_idx: torch.Tensor | None = None,
                 out_idx: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                 drop_path: nn.Module | None = None, scatter: bool = False) -> None:
        super().__init__(norm, in_idx, out_idx, gamma, drop_path or nn.Identity(), scatter)
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = float(scale)  # 1/sqrt(original head_dim), NOT of qk_dim
        self.fused_attn = fused_attn
        self.attn_drop = float(attn_drop)
        self.qkv, self.q_norm, self.k_norm, self.proj, self.proj_drop = qkv, q_norm, k_norm, proj, proj_drop

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
               is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        H, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        qkv = self.qkv(x)
        if dq == dv:  # timm's layout: 3 view ops per block instead of 9 (torch eager at batch 1 pays
            # per op: 1.09x -> 1.14x vs dense on the 50% demo model, benchmarks/results/torch_eager_demo.md)
            q, k, v = qkv.reshape(B, N, 3, H, dq).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            # slices, not split([...]): ExecuTorch's edge lowering of split_with_sizes pins the batch
            # dim to the example's, so a dynamic-batch .pte then fails at any other batch size
            q, k, v = qkv[..., :H * dq], qkv[..., H * dq:2 * H * dq], qkv[..., 2 * H * dq:]
            q, k = q.reshape(B, N, H, dq).transpose(1, 2), k.reshape(B, N, H, dq).transpose(1, 2)
            v = v.reshape(B, N, H, dv).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                               is_causal=is_causal, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if is_causal:
                attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
            elif attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                    else attn + attn_mask
            attn = F.dropout(attn.softmax(dim=-1), p=p, training=self.training)
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, H * dv)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return self.write(x, self.attend(self.read(x), attn_mask, is_causal))


class SlimMlp(_ResidualBranch):
    """MLP branch with kept hidden channels."""

    def __init__(self, norm: nn.Module, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear,
                 drop1: nn.Module, drop2: nn.Module, in_idx: torch.Tensor | None = None,
                 out_idx: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                 drop_path: nn.Module | None = None, scatter: bool = False) -> None:
        super().__init__(norm, in_idx, out_idx, gamma, drop_path or nn.Identity(), scatter)
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = fc1, act, drop1, fc2, drop2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.read(x))))))
        return self.write(x, y)


class SlimBlock(nn.Module):
    """Replaces a timm Block: each branch owns its norm, residual read/write and layer scale."""

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.mlp(x)


# --------------------------------------------------------------------------------------------
# Config recorded on the slim model
# --------------------------------------------------------------------------------------------
@dataclass
class SlimConfig:
    """What `slim` built; enough (with timm) to rebuild the module and to describe it."""
    model: str  # timm model name of the dense source
    model_kwargs: dict[str, Any] | None  # timm.create_model kwargs rebuilding the dense skeleton (None: unknown)
    plan: dict  # the realised plan (after rounding), Plan.to_dict() with params/macs filled
    residual_io: list[str]  # per block (attn0, mlp0, ...): a RESIDUAL_IO value as realised, or "removed"
    scales: list[float]  # per layer: the original attention scale 1/sqrt(original head_dim)
    round_to: int = 1  # kept counts were rounded up to a multiple of this (1 = exact plan)
    params: dict[str, int] = field(default_factory=dict)  # {"dense", "slim"} parameter counts
    macs: dict[str, int] = field(default_factory=dict)  # {"dense", "slim"} MACs per image
    block_keep: list[float] = field(default_factory=list)  # per block: kept / dense parameters
    verified_max_abs_diff: float | None = None  # slim vs masked model on random input

    def to_dict(self) -> dict:
        return asdict(self)

    def get_plan(self) -> Plan:
        return Plan.from_dict(self.plan)


# --------------------------------------------------------------------------------------------
# Plan helpers
# --------------------------------------------------------------------------------------------
def _full(idx: Sequence[int] | None, n: int) -> list[int] | None:
    """Normalise: None, or a list that is not all of range(n)."""
    return None if idx is None or len(idx) == n else list(idx)


def _removed(keep: Sequence[int] | None, n: int) -> list[int]:
    if keep is None:
        return []
    k = set(keep)
    return [j for j in range(n) if j not in k]


def _round_idx(keep: list[int] | None, n: int, mult: int, scores: Sequence[float] | None) -> list[int] | None:
    if keep is None:
        return None
    target = min(n, -(-len(keep) // mult) * mult)
    if target == len(keep):
        return keep
    unused = [j for j in range(n) if j not in set(keep)]
    if scores is not None and len(scores) == n:
        unused.sort(key=lambda j: (-float(scores[j]), j))  # next most important first
    return _full(sorted(keep + unused[: target - len(keep)]), n)


_ATTN_KEYS = (("in_", "attn_in", "embed_dim"), ("qk", "attn_qk", "head_dim"),
              ("v", "attn_v", "head_dim"), ("out", "attn_out", "embed_dim"))
_MLP_KEYS = (("in_", "mlp_in", "embed_dim"), ("hidden", "mlp_hidden", "mlp_hidden"),
             ("out", "mlp_out", "embed_dim"))


def round_plan(plan: Plan, N: int, importance: dict[str, Sequence[float]] | None = None) -> Plan:
    """Round every kept channel count (in, qk, v, hidden, out; not heads) up to a multiple of N.

    Channels are re-added next-most-important first when scores exist — `importance` or
    plan.meta["importance"], keyed like the gates ("L{i}.attn_in", "L{i}.attn_qk", "L{i}.attn_v",
    "L{i}.attn_out", "L{i}.mlp_in", "L{i}.mlp_hidden", "L{i}.mlp_out") — else lowest unused indices.
    Stale params/macs are dropped; meta["round_to"] records N."""
    if not isinstance(N, int) or N < 1:
        raise SurgeryError(f"round_to must be a positive integer, got {N!r}")
    plan.validate()
    if N == 1:
        return replace(plan, layers=copy.deepcopy(plan.layers), meta={**plan.meta, "round_to": 1})
    imp = importance if importance is not None else plan.meta.get("importance")
    if not isinstance(imp, Mapping):  # no per-channel scores (older Torch-Pruning runs stored a class name here)
        imp = {}
    # P3B ties q/k/v into one gate: without separate v scores, use the qk scores for v
    imp = {**{k.replace("attn_qk", "attn_v"): v for k, v in imp.items() if k.endswith("attn_qk")}, **imp}
    imp = {(k + "den" if k.endswith(".mlp_hid") else k): v for k, v in imp.items()}  # plans written by p3b-deploy 0.1
    layers = []
    for i, L in enumerate(plan.layers):
        a, m = copy.deepcopy(L.attn), copy.deepcopy(L.mlp)
        for branch, keys in ((a, _ATTN_KEYS), (m, _MLP_KEYS)):
            if branch.removed:
                continue
            for attr, gate, dim in keys:
                n = plan.dims[dim]
                setattr(branch, attr, _round_idx(getattr(branch, attr), n, N, imp.get(f"L{i}.{gate}")))
        layers.append(LayerPlan(attn=a, mlp=m))
    out = replace(plan, layers=layers, params=None, macs=None, meta={**plan.meta, "round_to": N})
    out.validate()
    return out


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------
def _idx_buffer(keep: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if keep is None else torch.tensor(keep, dtype=torch.int64, device=device)


def _pad_linear(lin: nn.Linear, in_keep: list[int] | None, out_keep: list[int] | None, D: int) -> nn.Linear:
    """Zero-pad a pruned Linear back to full-D inputs and/or outputs ("dense" residual io)."""
    n_in = D if in_keep is not None else lin.in_features
    n_out = D if out_keep is not None else lin.out_features
    w = lin.weight.new_zeros(n_out, n_in)
    rows = slice(None) if out_keep is None else torch.tensor(out_keep, device=w.device)
    cols = slice(None) if in_keep is None else torch.tensor(in_keep, device=w.device)
    if in_keep is not None and out_keep is not None:
        w[rows[:, None], cols[None, :]] = lin.weight.data
    elif in_keep is not None:
        w[:, cols] = lin.weight.data
    else:
        w[rows] = lin.weight.data
    new = nn.Linear(n_in, n_out, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.new_zeros(n_out)
        b[rows] = lin.bias.data
        new.bias.data.copy_(b)
    return new


def _gamma(ls: nn.Module, keep: list[int] | None, dense_io: bool) -> torch.Tensor | None:
    """Layer-scale gamma of the kept output dims (zeros elsewhere for dense io); None without one."""
    if isinstance(ls, nn.Identity):
        return None
    g = ls.gamma.detach().clone()
    if keep is None:
        return g
    if dense_io:
        return torch.zeros_like(g).index_copy_(0, torch.tensor(keep, device=g.device), g[keep])
    return g[keep].clone()


def _shaped(lin: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    """A Linear of the kept shape whose weights are to be loaded (structure only: no cut, no copy)."""
    w = lin.weight
    return nn.Linear(n_in, n_out, bias=lin.bias is not None, device=w.device, dtype=w.dtype)


def _slim_attn(blk: nn.Module, a: AttnPlan, D: int, io: str, cut: bool = True) -> nn.Module:
    at = blk.attn
    H, hd = at.num_heads, at.head_dim
    heads, qk, v = a.heads or list(range(H)), a.qk or list(range(hd)), a.v or list(range(hd))
    in_, out = _full(a.in_, D), _full(a.out, D)
    keep_qkv = [t * H * hd + h * hd + c for t, chs in ((0, qk), (1, qk), (2, v)) for h in heads for c in chs]
    keep_proj = [h * hd + c for h in heads for c in v]
    if cut:
        import torch_pruning as tp
        qkv, proj = copy.deepcopy(at.qkv), copy.deepcopy(at.proj)
        # coupled cuts inside the branch: q/k/v rows (+ bias) of kept heads, proj columns
        for fn, layer, keep, n in ((tp.prune_linear_out_channels, qkv, keep_qkv, 3 * H * hd),
                                   (tp.prune_linear_in_channels, proj, keep_proj, H * hd),
                                   (tp.prune_linear_in_channels, qkv, in_, D),
                                   (tp.prune_linear_out_channels, proj, out, D)):
            drop = _removed(keep, n)
            if drop:
                fn(layer, drop)
    else:
        qkv = _shaped(at.qkv, D if in_ is None else len(in_), len(keep_qkv))
        proj = _shaped(at.proj, len(keep_proj), D if out is None else len(out))
    pad_in, dense_io = io in _PAD_IN, io in _PAD_OUT
    if pad_in and in_ is not None:
        qkv = _pad_linear(qkv, in_, None, D)
    if dense_io and out is not None:
        proj = _pad_linear(proj, None, out, D)
    dev = qkv.weight.device
    return SlimAttention(
        norm=copy.deepcopy(blk.norm1), qkv=qkv, proj=proj, num_heads=len(heads), qk_dim=len(qk),
        v_dim=len(v), scale=float(at.scale), q_norm=copy.deepcopy(at.q_norm), k_norm=copy.deepcopy(at.k_norm),
        attn_drop=float(at.attn_drop.p), proj_drop=copy.deepcopy(at.proj_drop),
        fused_attn=bool(at.fused_attn),
        in_idx=None if pad_in else _idx_buffer(in_, dev), out_idx=None if dense_io else _idx_buffer(out, dev),
        gamma=_gamma(blk.ls1, out, dense_io), drop_path=copy.deepcopy(blk.drop_path1), scatter=io == "scatter")


def _cut_mlp(mlp: nn.Module, hid_drop: list[int], in_: list[int] | None, out: list[int] | None, D: int) -> None:
    """Torch-Pruning cuts in place: hidden channels (coupled fc1 rows + bias / fc2 columns), residual in/out."""
    import torch_pruning as tp
    if hid_drop:
        # the dependency graph couples fc1 rows + fc1 bias with fc2 columns (through the activation)
        w = mlp.fc1.weight
        dg = tp.DependencyGraph().build_dependency(mlp, example_inputs=torch.zeros(1, 1, D, device=w.device,
                                                                                     dtype=w.dtype))
        dg.get_pruning_group(mlp.fc1, tp.prune_linear_out_channels, idxs=hid_drop).prune()
        if mlp.fc2.in_features != mlp.fc1.out_features:
            raise SurgeryError("torch_pruning did not couple fc1 outputs with fc2 inputs")
    if in_ is not None:
        tp.prune_linear_in_channels(mlp.fc1, _removed(in_, D))
    if out is not None:
        tp.prune_linear_out_channels(mlp.fc2, _removed(out, D))


def _slim_mlp(blk: nn.Module, m: MlpPlan, D: int, io: str, cut: bool = True) -> nn.Module:
    mlp = copy.deepcopy(blk.mlp)
    hid_drop = _removed(m.hidden, mlp.fc1.out_features)
    in_, out = _full(m.in_, D), _full(m.out, D)
    if cut:
        _cut_mlp(mlp, hid_drop, in_, out, D)
    else:
        hid = mlp.fc1.out_features - len(hid_drop)
        mlp.fc1 = _shaped(mlp.fc1, D if in_ is None else len(in_), hid)
        mlp.fc2 = _shaped(mlp.fc2, hid, D if out is None else len(out))
    pad_in, dense_io = io in _PAD_IN, io in _PAD_OUT
    fc1, fc2 = mlp.fc1, mlp.fc2
    if pad_in and in_ is not None:
        fc1 = _pad_linear(fc1, in_, None, D)
    if dense_io and out is not None:
        fc2 = _pad_linear(fc2, None, out, D)
    dev = fc1.weight.device
    return SlimMlp(norm=copy.deepcopy(blk.norm2), fc1=fc1, act=mlp.act, fc2=fc2,
                   drop1=mlp.drop1, drop2=mlp.drop2,
                   in_idx=None if pad_in else _idx_buffer(in_, dev), out_idx=None if dense_io else _idx_buffer(out, dev),
                   gamma=_gamma(blk.ls2, out, dense_io), drop_path=copy.deepcopy(blk.drop_path2),
                   scatter=io == "scatter")


def _resolve_io(residual_io: str | Sequence[str], n_blocks: int) -> list[str]:
    ios = [residual_io] * n_blocks if isinstance(residual_io, str) else list(residual_io)
    if len(ios) != n_blocks or any(io not in RESIDUAL_IO + ("auto",) for io in ios):
        raise SurgeryError(f"residual_io must be one of {RESIDUAL_IO + ('auto',)} or a list of {n_blocks} "
                           f"of them, got {residual_io!r}")
    return ios


def auto_io(D: int, n_in: int, n_out: int, w_in: int, w_out: int, index_cost: float = INDEX_COST_MACS) -> str:
    """Cheapest exact formulation of one branch, "index" or "dense", by a per-token cost rule.

    Padding the first linear (w_in outputs) to all D inputs costs (D - n_in) * w_in extra MACs
    and saves a Gather of n_in elements; padding the last linear (w_out inputs) to all D outputs
    costs (D - n_out) * w_out and saves an index_add of n_out elements. An element moved by an
    index op is priced at `index_cost` MACs. Read and write are decided together: padding one
    side alone was not faster in the measurements (pad_in / pad_out stay available by hand)."""
    moved = (n_in if n_in < D else 0) + (n_out if n_out < D else 0)
    extra = (D - n_in) * w_in + (D - n_out) * w_out
    return "dense" if moved and extra <= index_cost * moved else "index"


def _auto_branch(io: str, plan: Plan, i: int, attn: bool, D: int) -> str:
    if io != "auto":
        return io
    d = plan.attn_dims(i) if attn else plan.mlp_dims(i)
    if d is None:
        return "index"
    w_in, w_out = (d.heads * (2 * d.qk + d.v), d.heads * d.v) if attn else (d.hidden, d.hidden)
    return auto_io(D, d.n_in, d.n_out, w_in, w_out)


def _check_plan(plan: Plan, spec: ViTSpec) -> None:
    plan.validate(spec)
    if any((L.attn.num_heads, L.attn.head_dim, L.mlp.hidden) != (spec.num_heads, spec.head_dim, spec.mlp_hidden)
           for L in spec.layers):
        raise SurgeryError(f"{spec.name}: layers differ in heads/head_dim/hidden; plans assume uniform layers")
    for i, (L, lp) in enumerate(zip(spec.layers, plan.layers)):
        a = lp.attn
        if L.attn.qk_norm and not a.removed and _full(a.qk, L.attn.head_dim) is not None:
            raise SurgeryError(f"{spec.name} normalises q/k per head (qk_norm): pruning q/k channels in layer {i} "
                               "would change the norm statistics, so it cannot be done exactly; keep qk whole "
                               "(prune heads, v, in/out instead)")


def slim(model: nn.Module, plan: Plan, round_to: int = 1, residual_io: str | Sequence[str] = "index",
         verify: bool = True, structure_only: bool = False) -> nn.Module:
    """Physically smaller copy of `model` (untouched) that computes what `plan` masks.

    residual_io: "index" (gather kept input dims, index_add kept output dims; no index op where a
    branch reads/writes all dims; exact plan size), "scatter" (scatter_add writes), "pad_in" /
    "pad_out" / "dense" (zero-padded full-D first / last / both weights: no read / write op, more
    parameters and MACs) or "auto" (per branch by `auto_io`; realised choice and params recorded);
    one value or one per block (attn0, mlp0, ...). `verify` compares against the hook-masked
    dense model on random input and raises SurgeryError if they differ. `structure_only` builds
    the slim modules at their kept shapes without cutting weights (no Torch-Pruning, nothing to
    verify): `load_slim` then loads the saved weights into them."""
    if structure_only and verify:
        raise SurgeryError("a structure-only slim model has no weights to verify")
    spec = describe(model)
    plan = round_plan(plan, round_to) if round_to != 1 else plan
    _check_plan(plan, spec)
    ios = _resolve_io(residual_io, spec.num_blocks)
    other = nonblock_params(model)
    plan = plan.with_counts(spec, other)
    D = spec.embed_dim
    new = copy.deepcopy(model)
    realised = []
    for i, (blk, lp) in enumerate(zip(new.blocks, plan.layers)):
        a_io, m_io = _auto_branch(ios[2 * i], plan, i, True, D), _auto_branch(ios[2 * i + 1], plan, i, False, D)
        attn = IdentityBranch() if lp.attn.removed else _slim_attn(blk, lp.attn, D, a_io, not structure_only)
        mlp = IdentityBranch() if lp.mlp.removed else _slim_mlp(blk, lp.mlp, D, m_io, not structure_only)
        new.blocks[i] = SlimBlock(attn, mlp)
        realised += ["removed" if lp.attn.removed else a_io, "removed" if lp.mlp.removed else m_io]
    dense = count(spec, other)
    kept = plan.counts(spec, other)
    new.p3b_slim_config = SlimConfig(
        model=spec.name, model_kwargs=model_kwargs_of(model, spec), plan=plan.to_dict(), residual_io=realised,
        scales=[L.attn.scale for L in spec.layers], round_to=int(plan.meta.get("round_to", 1)),
        params={"dense": dense.params, "slim": sum(p.numel() for p in new.parameters())},
        macs={"dense": dense.macs, "slim": kept.macs},
        block_keep=[k / d if d else 1.0 for k, d in zip(kept.params_blocks, dense.params_blocks)])
    if verify:
        new.p3b_slim_config.verified_max_abs_diff = verify_slim(model, new, plan)
    return new


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def verify_slim(dense: nn.Module, slim_model: nn.Module, plan: Plan, batch: int = 2, seed: int = 0,
                rtol: float | None = None) -> float:
    """Max abs output difference slim vs the hook-masked dense model on seeded random input.

    Raises SurgeryError when it exceeds rtol x max(1, max |masked output|); rtol defaults to 1e-4
    for fp32 weights (rounding only) and 1e-2 for half precision."""
    from ..models.gates import mask_model
    spec = describe(dense)
    ref = copy.deepcopy(dense).eval()
    gates = mask_model(ref, plan)
    p = next(dense.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_chans, *spec.img_size, generator=g).to(device=p.device, dtype=p.dtype)
    was_training = slim_model.training
    try:
        want = ref(x).float()
        got = slim_model.eval()(x).float()
    finally:
        gates.remove()
        slim_model.train(was_training)
    if got.shape != want.shape:
        raise SurgeryError(f"slim output shape {tuple(got.shape)} != masked model's {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if rtol is None:
        rtol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 1e-2
    bound = rtol * max(1.0, float(want.abs().max()))
    if not diff <= bound:
        raise SurgeryError(f"slim model differs from the masked model: max abs diff {diff:.3g} > {bound:.3g}")
    return diff


# --------------------------------------------------------------------------------------------
# Run dir (from `prune`): dense weights + plan.json -> slim model
# --------------------------------------------------------------------------------------------
def slim_run_dir(run_dir: str | os.PathLike, round_to: int = 1,
                 residual_io: str | Sequence[str] = "index") -> nn.Module:
    """Slim the dense model of a `prune` run dir (model.safetensors + plan.json), verified."""
    from ..artifacts import run_dir as as_run_dir
    return as_run_dir(run_dir).slim(round_to=round_to, residual_io=residual_io)


# --------------------------------------------------------------------------------------------
# Per-block table (inspect)
# --------------------------------------------------------------------------------------------
def block_rows(plan: Plan, spec: ViTSpec | None = None, params_other: int = 0,
               ratios: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row per block: kept in/heads/qk/v/hidden/out counts, removed flag, param keep ratio.

    The ratio is `ratios` if given, else exact from `spec`, else the plan's own keep_ratio."""
    if ratios is not None:
        ratios = list(ratios)
    elif spec is not None:
        ratios = list(plan.realised_keep_ratio(spec, params_other))
    elif plan.keep_ratio is not None:
        ratios = [float(r) for r in plan.keep_ratio]
    else:
        ratios = [None] * (2 * len(plan.layers))
    rows = []
    for i in range(len(plan.layers)):
        a, m = plan.attn_dims(i), plan.mlp_dims(i)
        rows.append({"block": f"attn{i}", "removed": a is None, "in": a and a.n_in, "heads": a and a.heads,
                     "qk": a and a.qk, "v": a and a.v, "hidden": None, "out": a and a.n_out,
                     "keep": ratios[2 * i]})
        rows.append({"block": f"mlp{i}", "removed": m is None, "in": m and m.n_in, "heads": None, "qk": None,
                     "v": None, "hidden": m and m.hidden, "out": m and m.n_out, "keep": ratios[2 * i + 1]})
    return rows
