"""Block-benefit probes (method page, section 3): how much does block i help a linear read-out?

For each of the 2*depth blocks (attn0, mlp0, attn1, ...) a class-token probe and a patch probe
read the *detached* residual stream before (x_{i-1}) and after (x_i) the block; the benefit is
ΔΨ_i = CE(Ψ_i(x_{i-1}), y) − CE(Ψ_i(x_i), y). All 2*depth probes of one kind are evaluated in a
single batched call (bmm / grouped convolution), so the cost is a handful of kernels, not 96.

- `ResidualTap`: forward hooks that record x_0 .. x_{2*depth} without editing timm.
- `BenefitProbes`: the probes; kind "reference" (cls Linear + 2x[Conv3x3, BN, ReLU] -> GAP ->
  Linear on the patch map) or "light" (cls Linear + LayerNorm -> Linear on mean-pooled patches).
- `BenefitMeter`: sums and counts of ΔΨc / ΔΨp per block, all-reduced across ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...spec import ViTSpec
from ..config import PROBE_LR


class ResidualTap:
    """Records the residual stream at every block boundary of a timm ViT, detached.

    feats[0] is the input of attn0 (norm1's input), feats[2l+1] the output of attn_l (= norm2's
    input), feats[2l+2] the output of layer l. Only records while `active` is True."""

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self.feats: dict[int, torch.Tensor] = {}
        self._handles = []
        depth = len(model.blocks)
        for l, blk in enumerate(model.blocks):
            self._handles.append(blk.norm1.register_forward_pre_hook(self._pre(2 * l)))
            self._handles.append(blk.norm2.register_forward_pre_hook(self._pre(2 * l + 1)))
        self._handles.append(model.blocks[depth - 1].register_forward_hook(
            lambda _m, _i, out: self._store(2 * depth, out)))
        self.n = 2 * depth + 1

    def _pre(self, idx: int):
        return lambda _m, inp: self._store(idx, inp[0])

    def _store(self, idx: int, x: torch.Tensor) -> None:
        if self.active:
            self.feats[idx] = x.detach()

    def take(self) -> list[torch.Tensor]:
        """The recorded features x_0..x_{2*depth} of the last forward; clears the buffer."""
        if len(self.feats) != self.n:
            raise RuntimeError(f"residual tap recorded {len(self.feats)} of {self.n} features "
                               "(is the model a plain timm ViT running its blocks in order?)")
        feats = [self.feats[i] for i in range(self.n)]
        self.feats = {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """nn.Linear/Conv2d-style init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class BenefitProbes(nn.Module):
    """The 2*depth class-token and patch probes of one model, evaluated batched over blocks."""

    def __init__(self, spec: ViTSpec, num_classes: int, kind: str = "reference", lr: float | None = None) -> None:
        super().__init__()
        self.lr = float(lr) if lr is not None else PROBE_LR.get(kind, 0.0)  # the probes' own param group
        if kind not in ("reference", "light"):
            raise ValueError(f"probe kind must be 'reference' or 'light', got {kind!r}")
        nb, D, C = spec.num_blocks, spec.embed_dim, num_classes
        self.kind, self.nb, self.D, self.C = kind, nb, D, C
        self.prefix = spec.num_prefix_tokens
        self.has_cls = spec.has_cls_token
        self.grid = (spec.img_size[0] // spec.patch_size[0], spec.img_size[1] // spec.patch_size[1])
        # class-token probe: Linear(D -> C) per block
        self.cls_w, self.cls_b = _uniform((nb, D, C), D), _uniform((nb, 1, C), D)
        if kind == "reference":
            # 2 x [Conv3x3(D->D, no bias), BN, ReLU] per block as grouped convs over nb*D channels
            self.conv1, self.conv2 = _uniform((nb * D, D, 3, 3), 9 * D), _uniform((nb * D, D, 3, 3), 9 * D)
            self.bn1, self.bn2 = nn.BatchNorm2d(nb * D), nn.BatchNorm2d(nb * D)
        else:
            self.ln_w, self.ln_b = nn.Parameter(torch.ones(nb, 1, D)), nn.Parameter(torch.zeros(nb, 1, D))
        self.patch_w, self.patch_b = _uniform((nb, D, C), D), _uniform((nb, 1, C), D)

    def _cls_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [nb, B, N, D] -> [nb, B, C] from the class token (mean patch token if there is none)."""
        tok = x[:, :, 0] if self.has_cls else x[:, :, self.prefix:].mean(2)
        return torch.baddbmm(self.cls_b, tok, self.cls_w)

    def _patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [nb, B, N, D] -> [nb, B, C] from the patch tokens (prefix tokens dropped)."""
        patches = x[:, :, self.prefix:]  # [nb, B, Np, D]
        if self.kind == "light":
            pooled = F.layer_norm(patches.mean(2), (self.D,)) * self.ln_w + self.ln_b
            return torch.baddbmm(self.patch_b, pooled, self.patch_w)
        nb, B, Np, D = patches.shape
        gh, gw = self.grid
        if gh * gw != Np:
            raise RuntimeError(f"patch probe expects a {gh}x{gw} grid, got {Np} patch tokens")
        fmap = patches.permute(1, 0, 3, 2).reshape(B, nb * D, gh, gw)
        h = F.relu(self.bn1(F.conv2d(fmap, self.conv1.to(fmap.dtype), padding=1, groups=nb)))
        h = F.relu(self.bn2(F.conv2d(h, self.conv2.to(h.dtype), padding=1, groups=nb)))
        pooled = h.mean((2, 3)).view(B, nb, D).transpose(0, 1)  # [nb, B, D]
        return torch.baddbmm(self.patch_b, pooled, self.patch_w)

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nb, B, C = logits.shape
        return F.cross_entropy(logits.reshape(nb * B, C).float(), y.repeat(nb), reduction="none").view(nb, B)

    def tap(self, model: nn.Module) -> "ResidualTap":
        """The hooks that collect the residual stream these probes read (the trainer's side)."""
        return ResidualTap(model)

    def loss(self, ce: dict[str, torch.Tensor]) -> torch.Tensor:
        """The probes' training loss, added to the task loss."""
        return probe_loss(ce)

    def forward(self, feats: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample CE [nb, B] of every probe on its block's input and output features."""
        x = torch.stack(feats)  # [nb + 1, B, N, D]: one copy, block i reads x[i] (in) and x[i + 1] (out)
        x_in, x_out = x[:-1], x[1:]
        return {
            "cls_in": self._ce(self._cls_logits(x_in), y), "cls_out": self._ce(self._cls_logits(x_out), y),
            "patch_in": self._ce(self._patch_logits(x_in), y), "patch_out": self._ce(self._patch_logits(x_out), y),
        }


def probe_loss(ce: dict[str, torch.Tensor]) -> torch.Tensor:
    """Training loss of all probes: the sum over probes of their batch-mean CE (in and out)."""
    return sum(v.mean(1).sum() for v in ce.values())


class BenefitMeter:
    """Sums of ΔΨ per block for cls and patch probes plus the sample count since the last reset."""

    def __init__(self, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(2, num_blocks, dtype=torch.float64, device=device)  # [cls, patch] x blocks
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # samples accumulated

    @torch.no_grad()
    def update(self, ce: dict[str, torch.Tensor]) -> None:
        self.sums[0] += (ce["cls_in"] - ce["cls_out"]).sum(1).double()
        self.sums[1] += (ce["patch_in"] - ce["patch_out"]).sum(1).double()
        self.count += ce["cls_in"].shape[1]

    def all_reduce(self) -> None:
        """Sum over ranks, so every rank computes the same keep ratios."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)
            torch.distributed.all_reduce(self.count)

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean ΔΨc, mean ΔΨp) per block, float32 on CPU; zeros when nothing was accumulated."""
        m = (self.sums / self.count.clamp_min(1)).float().cpu()
        return m[0], m[1]

    def reset(self) -> None:
        self.sums.zero_()
        self.count.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums.copy_(state["sums"])
        self.count.copy_(state["count"])
