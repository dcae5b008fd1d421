"""An independent masked reference for surgery tests: `from reference import zero_pruned`.

The package's own reference (`gates.mask_model`, used by `verify_slim`) multiplies activations
by 0/1 gates through forward hooks. This one never touches the gates: it zeroes the weights a
plan prunes, directly in a copy of the dense model —

- attention `in`: the qkv columns of dropped residual dims (what norm1 feeds them is unused);
- heads, qk, v: the qkv rows (weights and bias) of dropped q/k/v channels of every head;
- attention `out`: the proj rows (and bias) of residual dims the branch does not write;
- MLP `in` / hidden / `out`: fc1 columns, fc2 columns, fc2 rows (and bias);
- a removed branch: its output projection zeroed entirely (the branch adds nothing).

A dropped q/k channel contributes 0 to q.k; a dropped v channel or head writes 0 into proj; a
dropped hidden channel contributes 0 to fc2. So the copy computes exactly what the masked model
computes, by a different mechanism, and a bug shared by surgery and the gates cannot hide.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def _drop(keep, n: int) -> torch.Tensor:
    """Bool mask of the dropped positions out of n (`keep` None = nothing dropped)."""
    m = torch.zeros(n, dtype=torch.bool)
    if keep is not None:
        m[:] = True
        m[torch.as_tensor(keep, dtype=torch.long)] = False
    return m


def _zero_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(lin.weight.device)
    lin.weight[rows] = 0
    if lin.bias is not None:
        lin.bias[rows] = 0


def _zero_cols(lin: nn.Linear, cols: torch.Tensor) -> None:
    lin.weight[:, cols.to(lin.weight.device)] = 0


@torch.no_grad()
def zero_pruned(model: nn.Module, plan) -> nn.Module:
    """A deep copy of `model` (eval mode) with every weight the plan prunes set to zero."""
    ref = copy.deepcopy(model).eval()
    for blk, L in zip(ref.blocks, plan.layers):
        a, m = L.attn, L.mlp
        D = blk.norm1.weight.shape[0] if getattr(blk.norm1, "weight", None) is not None else blk.attn.qkv.in_features
        H, hd = blk.attn.num_heads, blk.attn.qkv.out_features // (3 * blk.attn.num_heads)
        if a.removed:
            _zero_rows(blk.attn.proj, torch.ones(blk.attn.proj.out_features, dtype=torch.bool))
        else:
            _zero_cols(blk.attn.qkv, _drop(a.in_, D))
            head = _drop(a.heads, H)[:, None]
            qk = (head | _drop(a.qk, hd)[None, :]).reshape(-1)
            v = (head | _drop(a.v, hd)[None, :]).reshape(-1)
            _zero_rows(blk.attn.qkv, torch.cat([qk, qk, v]))  # qkv rows are laid out (3, H, hd)
            _zero_rows(blk.attn.proj, _drop(a.out, D))
        if m.removed:
            _zero_rows(blk.mlp.fc2, torch.ones(blk.mlp.fc2.out_features, dtype=torch.bool))
        else:
            _zero_cols(blk.mlp.fc1, _drop(m.in_, D))
            _zero_cols(blk.mlp.fc2, _drop(m.hidden, blk.mlp.fc2.in_features))
            _zero_rows(blk.mlp.fc2, _drop(m.out, D))
    return ref
