"""`p3b-deploy bench MODEL [MODEL ...] --report DIR`: time models, write report.{json,md,csv} + plot.

This module imports no torch (nor cli.common, which does): on an edge device with only onnxruntime
and numpy, `python -m p3b_deploy.cli.bench model.onnx --report out/` works too.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BenchError
from .options import add_config_args, config_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.runner import BenchConfig
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="an .onnx file, slim dir, run dir or timm name; the first one is the baseline")
    p.add_argument("--report", required=True, metavar="DIR", help="folder for report.{json,md,csv} and latency.png")
    p.add_argument("--providers", default="cpu",
                   help="ONNX Runtime execution providers to time, comma-separated: cpu, cuda, tensorrt "
                        "('none' for torch only; default: cpu)")
    p.add_argument("--torch", action="store_true", help="also time torch eager (CPU, and CUDA when available)")
    add_config_args(p, BenchConfig)
    p.add_argument("--no-plot", action="store_true", help="skip latency.png (e.g. no matplotlib on the device)")


def _backends(args: argparse.Namespace) -> list[str]:
    names = [] if args.providers.strip() in ("", "none") else [v.strip() for v in args.providers.split(",")]
    if args.torch:
        names += ["torch-cpu", "torch-cuda"]
    if not names:
        raise BenchError("nothing to time: give --providers and/or --torch")
    return names


def main(args: argparse.Namespace) -> int:
    from ..bench import benchmark
    from ..bench.runner import BenchConfig
    report = benchmark(args.models, backends=_backends(args), **config_overrides(args, BenchConfig))
    out = report.save(args.report, plot=not args.no_plot)
    print(report.to_markdown())
    files = [f for f in ("report.json", "report.md", "report.csv", "latency.png") if (out / f).is_file()]
    print(f"report written to {args.report}/ ({', '.join(files)})")
    for note in report.config.get("notes", []):
        print(f"note: {note}")
    return 0 if report.results else 1


if __name__ == "__main__":  # edge devices: python -m p3b_deploy.cli.bench ...
    from ..errors import P3BError
    parser = argparse.ArgumentParser(prog="p3b_deploy.cli.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except P3BError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
