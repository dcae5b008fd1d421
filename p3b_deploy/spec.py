"""Model geometry and exact counting, with no torch import.

`ViTSpec` is the structural view of a timm VisionTransformer that plans, gates, surgery and
counting all work from (built from a model by `p3b_deploy.models.describe`). `count` gives exact
parameters and multiply-accumulates per block for any kept dims, so a plan can be costed without
building a model; `p3b_deploy.plan` and the torch-free tools rely on that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# How a slim branch reads / writes a subset of the residual dims (built by p3b_deploy.surgery; listed
# here so torch-free configs and the CLI can name the choices): index = gather + index_add (exact
# plan size), scatter = scatter_add writes, pad_in / pad_out / dense = zero-padded full-width first /
# last / both weights (no index op, more MACs). "auto" picks per branch by a measured cost rule.
RESIDUAL_IO = ("index", "scatter", "pad_in", "pad_out", "dense")
RESIDUAL_IO_CHOICES = RESIDUAL_IO + ("auto",)


# --------------------------------------------------------------------------------------------
# Structural view
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnSpec:
    num_heads: int  # attention heads
    head_dim: int  # channels per head (q, k and v alike in the dense model)
    qkv_bias: bool  # qkv Linear has a bias
    proj_bias: bool  # proj Linear has a bias
    qk_norm: bool  # q/k normalised per head (head-dim pruning is then inexact)
    scale: float  # softmax scale of the dense model, 1/sqrt(head_dim)


@dataclass(frozen=True)
class MlpSpec:
    hidden: int  # fc1 output channels
    fc1_bias: bool  # fc1 has a bias
    fc2_bias: bool  # fc2 has a bias
    act: str  # activation class name (GELU, ...)


@dataclass(frozen=True)
class LayerSpec:
    index: int  # layer number, 0-based
    attn: AttnSpec  # attention branch
    mlp: MlpSpec  # MLP branch
    layer_scale: bool  # ls1/ls2 LayerScale present (DeiT-3, ...)
    norm: str  # norm1/norm2 class name


@dataclass(frozen=True)
class ViTSpec:
    name: str  # timm model name
    embed_dim: int  # residual width D
    depth: int  # number of layers (2*depth blocks)
    num_heads: int  # heads of layer 0 (all layers equal in supported models)
    head_dim: int  # head_dim of layer 0
    mlp_hidden: int  # MLP hidden of layer 0
    img_size: tuple[int, int]  # input H, W
    patch_size: tuple[int, int]  # patch H, W
    in_chans: int  # input channels
    num_patches: int  # patch tokens
    num_prefix_tokens: int  # cls + registers (+ dist token for distilled models)
    has_cls_token: bool  # a class token is present
    num_reg_tokens: int  # register tokens
    has_dist_token: bool  # DeiT distillation token (+ head_dist)
    num_classes: int  # classifier outputs (0 = no head)
    global_pool: str  # 'token', 'avg', ...
    layers: tuple[LayerSpec, ...] = field(repr=False)  # per-layer structure

    @property
    def num_tokens(self) -> int:
        """Sequence length N seen by attention."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def num_blocks(self) -> int:
        return 2 * self.depth

    def block_names(self) -> list[str]:
        """attn0, mlp0, attn1, ... — the 2*depth blocks in forward order."""
        return [f"{kind}{i}" for i in range(self.depth) for kind in ("attn", "mlp")]


# --------------------------------------------------------------------------------------------
# Counting: exact parameters and multiply-accumulates for any kept dims
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnDims:
    """Kept sizes of one attention branch (dense: in=out=D, heads=H, qk=v=head_dim)."""
    n_in: int
    heads: int
    qk: int
    v: int
    n_out: int


@dataclass(frozen=True)
class MlpDims:
    """Kept sizes of one MLP branch (dense: in=out=D, hidden=mlp hidden)."""
    n_in: int
    hidden: int
    n_out: int


def dense_attn_dims(spec: ViTSpec, i: int) -> AttnDims:
    a = spec.layers[i].attn
    return AttnDims(spec.embed_dim, a.num_heads, a.head_dim, a.head_dim, spec.embed_dim)


def dense_mlp_dims(spec: ViTSpec, i: int) -> MlpDims:
    return MlpDims(spec.embed_dim, spec.layers[i].mlp.hidden, spec.embed_dim)


def attn_params(spec: ViTSpec, i: int, d: AttnDims | None) -> int:
    """Parameters of attention branch i with kept dims `d` (None = branch removed -> 0).

    Includes norm1 (always over the full D), qkv, q/k norms, proj and layer scale."""
    if d is None:
        return 0
    L = spec.layers[i]
    D = spec.embed_dim
    width = d.heads * (2 * d.qk + d.v)
    p = 2 * D  # norm1 weight + bias (over the full residual width)
    p += d.n_in * width + (width if L.attn.qkv_bias else 0)
    p += 2 * 2 * d.qk if L.attn.qk_norm else 0
    p += d.heads * d.v * d.n_out + (d.n_out if L.attn.proj_bias else 0)
    p += d.n_out if L.layer_scale else 0
    return p


def mlp_params(spec: ViTSpec, i: int, d: MlpDims | None) -> int:
    """Parameters of MLP branch i with kept dims `d` (None = removed): norm2, fc1, fc2, ls2."""
    if d is None:
        return 0
    L = spec.layers[i]
    D = spec.embed_dim
    p = 2 * D
    p += d.n_in * d.hidden + (d.hidden if L.mlp.fc1_bias else 0)
    p += d.hidden * d.n_out + (d.n_out if L.mlp.fc2_bias else 0)
    p += d.n_out if L.layer_scale else 0
    return p


def attn_macs(spec: ViTSpec, i: int, d: AttnDims | None) -> int:
    """MACs per image: qkv + q·kᵀ + attn·v + proj (softmax/norms are not MACs)."""
    if d is None:
        return 0
    N = spec.num_tokens
    return (N * d.n_in * d.heads * (2 * d.qk + d.v)
            + d.heads * N * N * d.qk + d.heads * N * N * d.v
            + N * d.heads * d.v * d.n_out)


def mlp_macs(spec: ViTSpec, i: int, d: MlpDims | None) -> int:
    if d is None:
        return 0
    N = spec.num_tokens
    return N * d.n_in * d.hidden + N * d.hidden * d.n_out


def nonblock_macs(spec: ViTSpec) -> int:
    """Patch embedding conv + classifier head(s) per image."""
    ph, pw = spec.patch_size
    macs = spec.num_patches * spec.embed_dim * spec.in_chans * ph * pw
    heads = 2 if spec.has_dist_token else 1
    macs += heads * spec.embed_dim * spec.num_classes
    return macs


@dataclass(frozen=True)
class Counts:
    """Exact parameter and MAC counts, per block and in total."""
    params_blocks: tuple[int, ...]  # 2*depth entries: attn0, mlp0, attn1, ...
    macs_blocks: tuple[int, ...]  # same order, MACs per image
    params_other: int  # non-block parameters (never pruned)
    macs_other: int  # patch embed + head MACs per image

    @property
    def params(self) -> int:
        return sum(self.params_blocks) + self.params_other

    @property
    def macs(self) -> int:
        return sum(self.macs_blocks) + self.macs_other


def count(spec: ViTSpec, params_other: int,
          dims: Sequence[tuple[AttnDims | None, MlpDims | None]] | None = None) -> Counts:
    """Count params/MACs for kept dims per layer (None = dense model)."""
    pb, mb = [], []
    for i in range(spec.depth):
        a, m = dims[i] if dims is not None else (dense_attn_dims(spec, i), dense_mlp_dims(spec, i))
        pb += [attn_params(spec, i, a), mlp_params(spec, i, m)]
        mb += [attn_macs(spec, i, a), mlp_macs(spec, i, m)]
    return Counts(tuple(pb), tuple(mb), params_other, nonblock_macs(spec))
