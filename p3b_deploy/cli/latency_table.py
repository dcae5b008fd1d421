"""`p3b-deploy latency-table PACK --out latency_table.json`: time a probe pack on this device.

Imports no torch: on a device with only onnxruntime and numpy (`pip install --no-deps p3b-deploy`)
`p3b-deploy latency-table ...` or `python -m p3b_deploy.cli.latency_table ...` works.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BenchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack", metavar="PACK", help="probe pack folder from `p3b-deploy latency-pack`")
    p.add_argument("--out", required=True, metavar="FILE", help="latency table to write (JSON)")
    p.add_argument("--batch", type=int, default=1, help="batch size the table is for (default 1)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    p.add_argument("--target", default=None, metavar="TARGET",
                   help="deployment target the table is for (p3b_deploy.targets: ort-fp32, ort-int8, ort-int8-static, "
                        "openvino-f32, openvino-bf16, openvino-int8, executorch, executorch-int8, litert-fp32, "
                        "litert-int8): the probes are timed as it runs them (int8 targets: quantized like the export; "
                        "ExecuTorch / LiteRT: lowered from torch once, cached in PACK/<variant>/) and the table records "
                        "it (default ort-fp32)")
    p.add_argument("--providers", "--runtime", dest="providers", default=None,
                   help="instead of --target: cpu, cuda or tensorrt (ONNX Runtime execution providers, fp32) or "
                        "openvino (= --target openvino-f32)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per probe (default 1)")
    p.add_argument("--min-iters", type=int, default=10, help="minimum timed runs per probe (default 10)")
    p.add_argument("--warmup-seconds", type=float, default=0.5, help="warm-up per probe (default 0.5)")


def main(args: argparse.Namespace) -> int:
    from ..bench.latency_table import measure_pack
    from ..targets import get_target
    if args.batch < 1:
        raise BenchError(f"batch must be >= 1, got {args.batch}")
    provider = None
    if args.providers is not None:
        providers = [v.strip() for v in args.providers.split(",") if v.strip()]
        if len(providers) != 1:
            raise BenchError(f"a latency table is for one execution provider; got {args.providers!r} "
                             "(run once per provider)")
        if args.target is not None:
            raise BenchError("give --target or --providers, not both")
        provider = providers[0]
    elif args.target is not None:
        get_target(args.target, threads=args.threads, batch=args.batch).check()  # one line, before any work
    table = measure_pack(args.pack, batch=args.batch, threads=args.threads, provider=provider, target=args.target,
                         min_seconds=args.min_seconds, min_iters=args.min_iters, warmup_seconds=args.warmup_seconds)
    table.save(args.out)
    print(table.summary())
    print(f"latency table written to {args.out}")
    return 0


if __name__ == "__main__":  # edge devices: python -m p3b_deploy.cli.latency_table PACK --out FILE ...
    from . import main as cli_main
    sys.exit(cli_main(["latency-table", *sys.argv[1:]]))
