"""`p3b-deploy export SOURCE --out model.onnx`: verified ONNX (+ fp16/int8 variants, Triton repo)."""
from __future__ import annotations

import argparse

from .common import add_model_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="slim dir (config.json), run dir (plan.json + model.safetensors) or a timm model name")
    p.add_argument("--out", required=True, help="output .onnx file (report: <stem>.export.json next to it)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--static-batch", type=int, default=None, metavar="B", help="fixed batch size instead of a dynamic one")
    p.add_argument("--simplify", action="store_true", help="simplify with onnxslim (verified like the raw export)")
    p.add_argument("--fp16", action="store_true", help="also write <stem>.fp16.onnx (fp32 inputs/outputs)")
    p.add_argument("--fp16-io", action="store_true", help="the fp16 variant takes and returns float16")
    p.add_argument("--int8", action="store_true", help="also write <stem>.int8.onnx (dynamic quantization of MatMul weights)")
    p.add_argument("--int8-max-drop", type=float, default=1.0, metavar="P",
                   help="refuse int8 if its top-1 agreement with fp32 is below 100-P percent (default 1.0)")
    p.add_argument("--residual-io", choices=("index", "scatter", "pad_in", "pad_out", "dense", "auto"),
                   default="index",
                   help="for a run dir: how slim branches read/write kept residual dims (default index)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for verification/profiling")
    p.add_argument("--verify-images", type=int, default=256, help="real images used for verification with --data")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository DIR/<name>/")
    p.add_argument("--triton-name", help="Triton model name (default: the output file's stem)")
    p.add_argument("--triton-max-batch", type=int, default=32, metavar="N", help="Triton max_batch_size (default 32)")
    p.add_argument("--triton-backend", choices=("onnxruntime", "python"), default="onnxruntime",
                   help="onnxruntime (production containers) or python (ONNX Runtime inside Triton's python "
                        "backend, for a tritonserver without the onnxruntime backend; default onnxruntime)")
    add_model_args(p, required=False)
    g = p.add_argument_group("verification data (optional)")
    g.add_argument("--data", default=None, help="dataset spec (as for prune) whose val images verify the export")
    g.add_argument("--data-root", default=None, help="where torchvision datasets live on disk")
    g.add_argument("--workers", type=int, default=None, help="data loader workers")


def main(args: argparse.Namespace) -> int:
    from ..errors import ExportError
    from ..export import ExportConfig, export_source
    if args.model is not None and args.model != args.source:
        raise ExportError("SOURCE names the model; --model is not used by export")
    cfg = ExportConfig(opset=args.opset, static_batch=args.static_batch, simplify=args.simplify,
                       fp16=args.fp16, fp16_io=args.fp16_io, int8=args.int8, int8_max_drop=args.int8_max_drop,
                       threads=args.threads, triton_repo=args.triton_repo, triton_name=args.triton_name,
                       triton_max_batch=args.triton_max_batch, triton_backend=args.triton_backend)
    model_options = dict(residual_io=args.residual_io, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         num_classes=args.num_classes, img_size=args.img_size, patch_size=args.patch_size)
    data_options = dict(root=args.data_root, workers=args.workers)
    result = export_source(args.source, args.out, config=cfg, model_options=model_options, data=args.data,
                           data_options=data_options, verify_images=args.verify_images)
    print(result.summary())
    return 0
