"""The metadata_props every ONNX file of ours carries, whichever stage wrote it.

One function, `metadata_for(model, source)`, used by `export` and `run` alike: source model,
timm name, params/MACs dense vs this model, realised prune ratio, per-block keep ratios,
preprocessing (input size, mean, std, interpolation, crop), class count and names, residual io,
tool and version. All values are strings (ONNX metadata_props). The exporter adds `precision`,
`opset` and `exporter` (dynamo, or the fallback with its reason).
"""
from __future__ import annotations

import json
from typing import Sequence

import torch.nn as nn

from .._version import __version__
from ..models.vit import count_model, preprocessing_of

KEYS = ("source_model", "timm_model", "params_dense", "params", "macs_dense", "macs", "prune_ratio", "keep_ratios",
        "input_size", "mean", "std", "interpolation", "crop_pct", "num_classes", "tool", "tool_version",
        "class_names")  # + residual_io for slim models; precision and opset from the exporter


def _class_names(model: nn.Module) -> list[str] | None:
    """ImageNet-1k/22k descriptions when the model's head is timm's ImageNet head, else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
        subset = infer_imagenet_subset(model)
        names = ImageNetInfo(subset).label_descriptions() if subset else None
    except Exception:  # noqa: BLE001 — best effort: unknown label sets simply carry no names
        return None
    return list(names) if names is not None and len(names) == int(model.num_classes) else None


def metadata_for(model: nn.Module, source: str, class_names: Sequence[str] | None = None) -> dict[str, str]:
    """metadata_props for a dense or slim timm ViT: source, plan keep ratios, prune ratio,
    params/MACs dense vs this model, preprocessing, classes (all values are strings)."""
    pre = preprocessing_of(model)
    slim_cfg = getattr(model, "p3b_slim_config", None)
    params = sum(p.numel() for p in model.parameters())
    if slim_cfg is not None:
        plan = slim_cfg.plan
        timm_name, dense_p, dense_m, macs = slim_cfg.model, slim_cfg.params["dense"], \
            slim_cfg.macs["dense"], slim_cfg.macs["slim"]
        keep = plan.get("keep_ratio")
        io = slim_cfg.residual_io
    else:
        c = count_model(model)
        timm_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        dense_p, dense_m, macs, keep, io = c.params, c.macs, c.macs, None, None
    meta = {
        "source_model": str(source), "timm_model": str(timm_name),
        "params_dense": str(dense_p), "params": str(params), "macs_dense": str(dense_m), "macs": str(macs),
        "prune_ratio": f"{1 - params / dense_p:.6f}",
        "keep_ratios": json.dumps(keep) if keep is not None else "null",
        "input_size": json.dumps(pre["input_size"]),
        "mean": json.dumps(pre.get("mean")), "std": json.dumps(pre.get("std")),
        "interpolation": str(pre.get("interpolation")), "crop_pct": str(pre.get("crop_pct")),
        "num_classes": str(int(model.num_classes)),
        "tool": "p3b-deploy", "tool_version": __version__,
    }
    if io is not None:
        meta["residual_io"] = json.dumps(io)
    names = list(class_names) if class_names is not None else _class_names(model)
    meta["class_names"] = json.dumps(names)
    return meta
