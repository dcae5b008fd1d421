"""`p3b-deploy latency-table PACK --out latency_table.json`: time a probe pack on this device.

Imports no torch: on a device with only onnxruntime and numpy (`pip install --no-deps p3b-deploy`)
`p3b-deploy latency-table ...` or `python -m p3b_deploy.cli.latency_table ...` works.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BenchError

# The runtimes `--runtime` takes (short names of the bench backends that run ONNX files).
RUNTIMES = ("cpu", "cuda", "tensorrt", "openvino")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack", metavar="PACK", help="probe pack folder from `p3b-deploy latency-pack`")
    p.add_argument("--out", required=True, metavar="FILE", help="latency table to write (JSON)")
    p.add_argument("--batch", type=int, default=1, help="batch size the table is for (default 1)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    p.add_argument("--providers", "--runtime", dest="providers", default="cpu",
                   help="runtime that times the probes: cpu, cuda or tensorrt (ONNX Runtime execution providers) or "
                        "openvino (OpenVINO CPU, f32) (one per table; default cpu)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per probe (default 1)")
    p.add_argument("--min-iters", type=int, default=10, help="minimum timed runs per probe (default 10)")
    p.add_argument("--warmup-seconds", type=float, default=0.5, help="warm-up per probe (default 0.5)")


def main(args: argparse.Namespace) -> int:
    from ..bench.latency_table import measure_pack
    providers = [v.strip() for v in args.providers.split(",") if v.strip()]
    if len(providers) != 1:
        raise BenchError(f"a latency table is for one execution provider; got {args.providers!r} "
                         "(run once per provider)")
    if args.batch < 1:
        raise BenchError(f"batch must be >= 1, got {args.batch}")
    table = measure_pack(args.pack, batch=args.batch, threads=args.threads, provider=providers[0],
                         min_seconds=args.min_seconds, min_iters=args.min_iters, warmup_seconds=args.warmup_seconds)
    table.save(args.out)
    print(table.summary())
    print(f"latency table written to {args.out}")
    return 0


if __name__ == "__main__":  # edge devices: python -m p3b_deploy.cli.latency_table PACK --out FILE ...
    from . import main as cli_main
    sys.exit(cli_main(["latency-table", *sys.argv[1:]]))
