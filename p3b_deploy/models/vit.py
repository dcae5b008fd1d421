"""The model layer: load a timm Vision Transformer and describe its prunable structure.

`load_model` is the one front door for dense models (timm name + optional local checkpoint);
`describe` turns a timm `VisionTransformer` into a `ViTSpec`, the structural view that plans,
gates, surgery and counting all work from; `count_params` / `count_macs` give exact analytic
counts per block for any kept dims, so a plan can be costed without building the model.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ModelError
from ..spec import AttnSpec, Counts, LayerSpec, MlpSpec, ViTSpec, count

_log = logging.getLogger(__name__)

# Families we support: timm VisionTransformer (and its DeiT-distilled subclass) whose blocks are
# standard pre-norm `Block`s with `Attention` and `Mlp`.
SUPPORTED_HINT = (
    "supported: timm VisionTransformer models with standard Attention/Mlp blocks, e.g. "
    "deit_tiny_patch16_224, deit_small_patch16_224, vit_small_patch16_224, "
    "deit_tiny_distilled_patch16_224, deit3_small_patch16_224, vit_nano_patch4_16"
)


# --------------------------------------------------------------------------------------------
# Built-in small model for the offline demo, registered in timm's registry the timm way.
# --------------------------------------------------------------------------------------------
def _register_builtin_models() -> None:
    from timm.models import generate_default_cfgs, register_model
    from timm.models._registry import is_model
    from timm.models.vision_transformer import _cfg, _create_vision_transformer

    if is_model("vit_pico_patch4_32"):
        return
    # timm's register_model reads `default_cfgs` from the defining module.
    globals()["default_cfgs"] = generate_default_cfgs({
        "vit_pico_patch4_32.p3b": _cfg(
            input_size=(3, 32, 32), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            interpolation="bilinear", crop_pct=1.0),
        "vit_nano_patch4_16.p3b": _cfg(
            input_size=(3, 16, 16), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            interpolation="bilinear", crop_pct=1.0),
    })

    @register_model
    def vit_nano_patch4_16(pretrained: bool = False, **kwargs):
        """ViT-Nano/4 at 16x16: depth 12, embed 64, 2 heads (head_dim 32), 17 tokens.

        The offline demo's model: a real depth-12 timm ViT small enough that fine-tuning and
        pruning it takes minutes on a 2-core CPU (~10 M MACs per image)."""
        args = dict(img_size=16, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=10)
        return _create_vision_transformer(
            "vit_nano_patch4_16", pretrained=pretrained, **dict(args, **kwargs))

    @register_model
    def vit_pico_patch4_32(pretrained: bool = False, **kwargs):
        """ViT-Pico/4 at 32x32: depth 12, embed 96, 3 heads (head_dim 32). p3b-deploy's demo model."""
        args = dict(img_size=32, patch_size=4, embed_dim=96, depth=12, num_heads=3, num_classes=10)
        return _create_vision_transformer(
            "vit_pico_patch4_32", pretrained=pretrained, **dict(args, **kwargs))


_register_builtin_models()


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def describe(model: nn.Module) -> ViTSpec:
    """Structural view of a timm VisionTransformer; raises ModelError for anything else."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    name = getattr(getattr(model, "pretrained_cfg", None) or {}, "get", lambda *_: None)("architecture")
    name = name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{name} is not a timm VisionTransformer ({type(model).__name__}); {SUPPORTED_HINT}")
    layers = []
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ModelError(f"{name}: layer {i} is a {type(blk).__name__}, not a pre-norm Block; {SUPPORTED_HINT}")
        at, mlp = blk.attn, blk.mlp
        if type(at) is not Attention or getattr(at, "gate", None) is not None or not isinstance(at.norm, nn.Identity):
            raise ModelError(f"{name}: layer {i} attention {type(at).__name__} is not a plain timm Attention; {SUPPORTED_HINT}")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            raise ModelError(f"{name}: layer {i} MLP {type(mlp).__name__} is not a plain timm Mlp; {SUPPORTED_HINT}")
        layers.append(LayerSpec(
            index=i,
            attn=AttnSpec(
                num_heads=at.num_heads, head_dim=at.head_dim,
                qkv_bias=at.qkv.bias is not None, proj_bias=at.proj.bias is not None,
                qk_norm=not isinstance(at.q_norm, nn.Identity), scale=float(at.scale)),
            mlp=MlpSpec(hidden=mlp.fc1.out_features, fc1_bias=mlp.fc1.bias is not None,
                        fc2_bias=mlp.fc2.bias is not None, act=type(mlp.act).__name__),
            layer_scale=not isinstance(blk.ls1, nn.Identity),
            norm=type(blk.norm1).__name__,
        ))
    if not layers:
        raise ModelError(f"{name} has no transformer layers")
    pe = model.patch_embed
    grid = tuple(pe.grid_size)
    dist = getattr(model, "dist_token", None) is not None
    return ViTSpec(
        name=name, embed_dim=model.embed_dim, depth=len(layers),
        num_heads=layers[0].attn.num_heads, head_dim=layers[0].attn.head_dim, mlp_hidden=layers[0].mlp.hidden,
        img_size=_pair(pe.img_size), patch_size=_pair(pe.patch_size),
        in_chans=pe.proj.in_channels, num_patches=grid[0] * grid[1],
        num_prefix_tokens=model.num_prefix_tokens, has_cls_token=bool(model.has_class_token),
        num_reg_tokens=int(getattr(model, "num_reg_tokens", 0)), has_dist_token=dist,
        num_classes=int(model.num_classes), global_pool=str(model.global_pool),
        layers=tuple(layers),
    )


def nonblock_params(model: nn.Module) -> int:
    """Parameters outside the 2*depth blocks: patch embed, tokens, pos embed, norms, head(s)."""
    block = sum(p.numel() for p in model.blocks.parameters())
    return sum(p.numel() for p in model.parameters()) - block


def count_model(model: nn.Module) -> Counts:
    """Dense counts of a timm ViT."""
    spec = describe(model)
    return count(spec, nonblock_params(model))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    for key in ("model_ema", "state_dict_ema", "model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and key != "module":
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict (expected tensors, optionally under 'model'/'state_dict')")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local .safetensors or .pth/.pt/.bin state dict safely (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return _unwrap_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors checkpoint {path}: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — pickle errors come in many types; report as one line
        msg = str(e).strip().splitlines()
        first = next((m for m in msg if m.strip()), type(e).__name__)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"refusing unsafe checkpoint {path}: it needs arbitrary code to unpickle "
                                  "(only plain tensors are accepted; convert it to .safetensors)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    return _unwrap_state_dict(obj)


def _check_name(name: str) -> None:
    import timm
    if not timm.is_model(name):
        raise ModelError(f"unknown model '{name}'; {SUPPORTED_HINT}")


def load_model(name: str, checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
               num_classes: int | None = None, img_size: int | None = None,
               patch_size: int | None = None) -> nn.Module:
    """Create a timm ViT by name, optionally with weights from a local checkpoint or timm's cache.

    A checkpoint whose classifier head has a different class count keeps its backbone and gets a
    freshly initialised head (with a warning)."""
    import timm
    _check_name(name)
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    if pretrained and checkpoint is not None:
        raise ModelError("use either --pretrained or --checkpoint, not both")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001
        if pretrained:
            raise ModelError(f"cannot get pretrained weights for '{name}' (offline and not in timm's cache?): "
                             f"{str(e).splitlines()[0][:160]}; pass local weights with --checkpoint PATH") from None
        raise ModelError(f"cannot create '{name}' with {kwargs}: {str(e).splitlines()[0][:200]}") from None
    describe(model)  # refuse non-ViT models early
    if checkpoint is not None:
        load_weights(model, read_checkpoint(checkpoint), source=str(checkpoint))
    model.eval()
    return model


def _head_keys(model: nn.Module) -> set[str]:
    keys = set()
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Linear):
            keys |= {f"{head}.weight", f"{head}.bias"}
    return keys


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a state dict into a timm ViT, adapting pos-embed size and re-initialising a mismatched head."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    own = model.state_dict()
    try:
        state = checkpoint_filter_fn(dict(state), model)  # resizes pos_embed / patch embed like timm does
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {str(e).splitlines()[0][:200]}") from None
    dropped = []
    for k in _head_keys(model):
        if k in state and state[k].shape != own[k].shape:
            dropped.append(k)
            del state[k]
    if dropped:
        warnings.warn(f"{source}: classifier head has a different class count than the model "
                      f"({model.num_classes}); head re-initialised", stacklevel=2)
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{source} does not fit the model: {k} has shape {tuple(state[k].shape)}, "
                              f"model expects {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(missing) + len(unexpected) > 6 else ''}")


# --------------------------------------------------------------------------------------------
# Rebuilding: create kwargs of a model's skeleton, its preprocessing
# --------------------------------------------------------------------------------------------
PREPROC_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


def preprocessing_of(model: nn.Module) -> dict[str, Any]:
    """Input size (C, H, W of the model itself), mean, std, interpolation, crop from pretrained_cfg."""
    pc = dict(getattr(model, "pretrained_cfg", None) or {})
    pe = model.patch_embed
    size = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    out: dict[str, Any] = {"input_size": [int(pe.proj.in_channels), int(size[0]), int(size[1])]}
    for k in PREPROC_KEYS:
        v = pc.get(k)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _skeleton_spec(name: str, kw: dict[str, Any]) -> tuple[ViTSpec, int] | None:
    import timm
    try:
        with torch.device("meta"):  # structure only: no memory, no init cost
            skel = timm.create_model(name, pretrained=False, **kw)
        return describe(skel), nonblock_params(skel)
    except Exception:  # noqa: BLE001 — any failure means "cannot rebuild from these kwargs"
        return None


def model_kwargs_of(model: nn.Module, spec: ViTSpec) -> dict[str, Any] | None:
    """timm.create_model kwargs that rebuild this model's skeleton, checked by rebuilding it on
    the meta device; None when no such kwargs are found (the model then cannot be saved)."""
    kw: dict[str, Any] = {"img_size": list(spec.img_size), "patch_size": list(spec.patch_size),
                          "num_classes": spec.num_classes, "in_chans": spec.in_chans}
    kw["img_size"] = spec.img_size[0] if spec.img_size[0] == spec.img_size[1] else kw["img_size"]
    kw["patch_size"] = spec.patch_size[0] if spec.patch_size[0] == spec.patch_size[1] else kw["patch_size"]
    want = (spec, nonblock_params(model))
    base = _skeleton_spec(spec.name, _tuples(kw))
    if base is not None and base != want:  # a non-default architecture: add what differs
        bs, L, bL = base[0], spec.layers[0], base[0].layers[0]
        for key, mine, theirs in (
                ("depth", spec.depth, bs.depth), ("embed_dim", spec.embed_dim, bs.embed_dim),
                ("num_heads", spec.num_heads, bs.num_heads), ("global_pool", spec.global_pool, bs.global_pool),
                ("mlp_ratio", spec.mlp_hidden / spec.embed_dim, bs.mlp_hidden / bs.embed_dim),
                ("qkv_bias", L.attn.qkv_bias, bL.attn.qkv_bias), ("qk_norm", L.attn.qk_norm, bL.attn.qk_norm),
                ("init_values", 1.0 if L.layer_scale else None, 1.0 if bL.layer_scale else None)):
            if mine != theirs:
                kw[key] = mine
        base = _skeleton_spec(spec.name, _tuples(kw))
    return kw if base == want else None


def _tuples(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
