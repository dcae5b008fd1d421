"""Channel gates on a dense timm ViT, attached by forward hooks (timm's source is not edited).

Gates per the method page: attention `in` (D), `heads` (H), `qk` and `v` (head_dim, shared by all
heads; P3B ties qk and v into one `qkv` gate), `out` (D); MLP `in` (D), `hid` (hidden), `out` (D).
They multiply activations, so with 0/1 values the gated model *is* the masked model that surgery
must reproduce exactly, and with soft values their gradients give P3B's Taylor scores.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from ..plan import Plan
from .vit import ViTSpec, describe

ATTN_GATES = ("in", "heads", "qk", "v", "out")
MLP_GATES = ("in", "hidden", "out")


class BlockGates(nn.Module):
    """Gate vectors of one layer (both branches). Values are Parameters (for gradients)."""

    def __init__(self, D: int, H: int, hd: int, hidden: int, tie_qkv: bool) -> None:
        super().__init__()
        ones = lambda n: nn.Parameter(torch.ones(n))  # noqa: E731
        self.attn_in, self.attn_heads, self.attn_qk, self.attn_out = ones(D), ones(H), ones(hd), ones(D)
        self.attn_v = None if tie_qkv else ones(hd)
        self.mlp_in, self.mlp_hidden, self.mlp_out = ones(D), ones(hidden), ones(D)

    @property
    def v(self) -> torch.Tensor:
        return self.attn_qk if self.attn_v is None else self.attn_v


class Gates(nn.Module):
    """All gates of a model plus the hooks that apply them. `remove()` detaches the hooks."""

    def __init__(self, model: nn.Module, spec: ViTSpec | None = None, tie_qkv: bool = False) -> None:
        super().__init__()
        self.spec = spec or describe(model)
        s = self.spec
        self.tie_qkv = tie_qkv
        self.layers = nn.ModuleList(
            BlockGates(s.embed_dim, L.attn.num_heads, L.attn.head_dim, L.mlp.hidden, tie_qkv) for L in s.layers)
        self._handles: list = []
        p = next(model.parameters())
        self.to(device=p.device)
        for blk, g in zip(model.blocks, self.layers):
            self._hook(blk, g)

    def _hook(self, blk: nn.Module, g: BlockGates) -> None:
        H, hd = blk.attn.num_heads, blk.attn.head_dim
        h = self._handles

        def qkv_hook(_m, _inp, out):
            # out: [B, N, 3*H*hd] laid out as (3, H, hd); q,k use heads x qk, v uses heads x v
            qk = g.attn_heads[:, None] * g.attn_qk[None, :]
            v = g.attn_heads[:, None] * g.v[None, :]
            mask = torch.stack([qk, qk, v]).reshape(-1).to(out.dtype)
            return out * mask

        h.append(blk.norm1.register_forward_hook(lambda _m, _i, o: o * g.attn_in.to(o.dtype)))
        h.append(blk.attn.qkv.register_forward_hook(qkv_hook))
        h.append(blk.attn.register_forward_hook(lambda _m, _i, o: o * g.attn_out.to(o.dtype)))
        h.append(blk.norm2.register_forward_hook(lambda _m, _i, o: o * g.mlp_in.to(o.dtype)))
        h.append(blk.mlp.fc2.register_forward_pre_hook(lambda _m, i: (i[0] * g.mlp_hidden.to(i[0].dtype),)))
        h.append(blk.mlp.register_forward_hook(lambda _m, _i, o: o * g.mlp_out.to(o.dtype)))
        assert H * hd == blk.attn.qkv.out_features // 3

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def named_gates(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every distinct gate: 'L{i}.attn_in', ... ('attn_v' absent when tied)."""
        for i, g in enumerate(self.layers):
            for name, p in g.named_parameters(recurse=False):
                yield f"L{i}.{name}", p

    @torch.no_grad()
    def set_plan(self, plan: Plan) -> "Gates":
        """Set hard 0/1 gates from a plan (removed branches: every gate of the branch 0)."""
        plan.validate(self.spec)
        for L, g in zip(plan.layers, self.layers):
            a, m = L.attn, L.mlp
            _fill(g.attn_in, None if a.removed else a.in_, a.removed)
            _fill(g.attn_heads, None if a.removed else a.heads, a.removed)
            _fill(g.attn_qk, None if a.removed else a.qk, a.removed)
            if g.attn_v is not None:
                _fill(g.attn_v, None if a.removed else a.v, a.removed)
            _fill(g.attn_out, None if a.removed else a.out, a.removed)
            _fill(g.mlp_in, None if m.removed else m.in_, m.removed)
            _fill(g.mlp_hidden, None if m.removed else m.hidden, m.removed)
            _fill(g.mlp_out, None if m.removed else m.out, m.removed)
        return self


def _fill(p: torch.Tensor, keep: list[int] | None, removed: bool) -> None:
    if removed:
        p.zero_()
    elif keep is None:
        p.fill_(1.0)
    else:
        p.zero_()
        p[torch.as_tensor(keep, dtype=torch.long, device=p.device)] = 1.0


def mask_model(model: nn.Module, plan: Plan) -> Gates:
    """Attach hard gates from `plan` to `model` in place (the masked reference); returns the Gates."""
    gates = Gates(model, tie_qkv=False)
    gates.requires_grad_(False)
    return gates.set_plan(plan)
