"""Argument groups shared by several stages (model and data options), mapped to kwargs once."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="timm model name, e.g. deit_small_patch16_224")
    g.add_argument("--checkpoint", help="local weights (.safetensors, or .pth/.pt/.bin read with weights_only)")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs timm's cache offline)")
    g.add_argument("--num-classes", type=int, help="classifier outputs (head re-initialised if it differs)")
    g.add_argument("--img-size", type=int, help="input side (pos-embed resized)")
    g.add_argument("--patch-size", type=int, help="patch side")


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(name=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                num_classes=args.num_classes, img_size=args.img_size, patch_size=args.patch_size)


def model_from_args(args: argparse.Namespace) -> "nn.Module":
    from ..models.vit import load_model
    return load_model(**model_kwargs(args))


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="ImageFolder root (train/ + val/), a torchvision name (cifar10, cifar100) "
                        "under --data-root, or a built-in offline set: digits (target), mnist5k (source)")
    g.add_argument("--data-root", default=None, help="where torchvision datasets live on disk")
    g.add_argument("--download", action="store_true", help="allow torchvision to download --data")
    g.add_argument("--workers", type=int, default=None, help="data loader workers (default: auto)")


def data_kwargs(args: argparse.Namespace) -> dict:
    return dict(spec=args.data, root=args.data_root, download=args.download, workers=args.workers)
