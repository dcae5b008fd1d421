"""`p3b-deploy export SOURCE --out model.onnx`: verified ONNX (+ fp16/int8 variants, Triton repo)."""
from __future__ import annotations

import argparse

from .common import add_model_args
from .options import add_config_args, config_overrides


# ExportConfig fields that `export` exposes as flags
EXPORT_FLAGS = ("format", "opset", "static_batch", "simplify", "fp16", "fp16_io", "int8", "int8_max_drop",
                "calibration_images", "executorch_max_batch", "litert_batches", "threads", "target", "triton_repo",
                "triton_name", "triton_max_batch", "triton_backend",
                "triton_instances", "triton_threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.config import ExportConfig
    from ..spec import RESIDUAL_IO_CHOICES
    p.add_argument("source", metavar="SOURCE",
                   help="slim dir (config.json), run dir (plan.json + model.safetensors) or a timm model name")
    p.add_argument("--out", required=True, help="output .onnx file (report: <stem>.export.json next to it)")
    add_config_args(p, ExportConfig, only=EXPORT_FLAGS)
    p.add_argument("--residual-io", choices=RESIDUAL_IO_CHOICES, default="index",
                   help="for a run dir: how slim branches read/write kept residual dims (default index)")
    p.add_argument("--verify-images", type=int, default=256, help="real images used for verification with --data")
    add_model_args(p, required=False)
    g = p.add_argument_group("verification data (optional)")
    g.add_argument("--data", default=None, help="dataset spec (as for prune): its val images verify the export and "
                                                "give every fp16/int8 file a top-1 gate; its training images "
                                                "calibrate --int8 static")
    g.add_argument("--data-root", default=None, help="where torchvision datasets live on disk")
    g.add_argument("--workers", type=int, default=None, help="data loader workers")


def main(args: argparse.Namespace) -> int:
    from ..errors import ExportError
    from ..export import ExportConfig, export_source
    if args.model is not None and args.model != args.source:
        raise ExportError("SOURCE names the model; --model is not used by export")
    cfg = ExportConfig().replace(**config_overrides(args, ExportConfig, only=EXPORT_FLAGS)).for_target()
    model_options = dict(residual_io=args.residual_io, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         num_classes=args.num_classes, img_size=args.img_size, patch_size=args.patch_size)
    data_options = dict(root=args.data_root, workers=args.workers)
    result = export_source(args.source, args.out, config=cfg, model_options=model_options, data=args.data,
                           data_options=data_options, verify_images=args.verify_images)
    print(result.summary())
    return 0
