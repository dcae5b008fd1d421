"""`p3b-deploy bench MODEL [MODEL ...] --report DIR`: time models, write report.{json,md,csv} + plot.
`p3b-deploy bench --server HOST:PORT --models dense,slim --report DIR`: the same, through a running
Triton server's gRPC endpoint (loopback only) at several concurrency levels.

This module imports no torch: on an edge device with only onnxruntime and numpy,
`python -m p3b_deploy.cli.bench model.onnx --report out/` works too.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BenchError
from .options import add_config_args, config_overrides, int_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.runner import BenchConfig
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="an .onnx file, ExecuTorch .pte, LiteRT .tflite, slim dir, run dir or timm name; the first one "
                        "is the baseline")
    p.add_argument("--report", required=True, metavar="DIR", help="folder for report.{json,md,csv} and latency.png")
    p.add_argument("--providers", default=None,
                   help="runtimes that time the ONNX file, comma-separated: cpu, cuda, tensorrt (ONNX Runtime "
                        "execution providers), openvino (OpenVINO CPU; --precision fp32 computes f32, bf16 is "
                        "opt-in), executorch (XNNPACK fp32: a .pte, or lowered here from a torch MODEL in about a "
                        "minute; needs .venv-edge), litert (LiteRT XNNPACK: a .tflite, or the one export --format "
                        "litert wrote next to the .onnx; torch-free; one signature per batch) ('none' for torch only; "
                        "default: cpu). A runtime named here that cannot run on this machine is refused before any timing")
    p.add_argument("--target", default=None, metavar="TARGET",
                   help="time the models as this deployment target runs them (p3b_deploy.targets: its runtime, "
                        "precision and threads; int8 targets time the <stem>.int8.onnx that `export --target` wrote "
                        "next to an .onnx MODEL); instead of --providers/--precision")
    p.add_argument("--torch", action="store_true", help="also time torch eager, CPU and CUDA where available "
                                                           "(skipped with the reason where not)")
    add_config_args(p, BenchConfig)
    p.add_argument("--no-plot", action="store_true", help="skip latency.png (e.g. no matplotlib on the device)")
    g = p.add_argument_group("served models (a running Triton server, e.g. from p3b-deploy serve)")
    g.add_argument("--server", metavar="HOST:PORT", default=None,
                   help="gRPC address of a Triton server on this machine (loopback only), e.g. 127.0.0.1:8001")
    g.add_argument("--models", dest="server_models", metavar="NAMES", default=None,
                   help="served model names, comma-separated; the first one is the baseline")
    g.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="requests in flight (default 1,4,16)")
    g.add_argument("--max-requests", type=int, default=2000, metavar="N",
                   help="timed requests per model and concurrency level, at most (default 2000)")
    g.add_argument("--max-seconds", type=float, default=5.0, metavar="S",
                   help="timed seconds per model and concurrency level, at most (default 5)")
    g.add_argument("--sweep", nargs="+", metavar="KEY=V,V", default=None,
                   help="time every serving config of the grid, e.g. --sweep instances=1,2 threads=1,2 (the "
                        "server must run with --model-control explicit); the best stays loaded")
    g.add_argument("--p99-ms", type=float, default=None, metavar="MS",
                   help="with --sweep: best = most throughput among configs with p99 <= MS at the top concurrency")
    g.add_argument("--write-back", metavar="REPO", default=None,
                   help="with --sweep: write each model's best config into REPO/<model>/config.pbtxt")


def _backends(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(every backend to time, those the user named: refused when they cannot run here)."""
    given = args.providers if args.providers is not None else "cpu"
    names = [] if given.strip() in ("", "none") else [v.strip() for v in given.split(",")]
    named = list(names) if args.providers is not None else []
    if args.torch:  # "when available": a torch backend that cannot run here is a skipped row
        names += ["torch-cpu", "torch-cuda"]
    if not names:
        raise BenchError("nothing to time: give --providers and/or --torch")
    return names, named


def _serve_bench(args: argparse.Namespace):
    from ..serve import bench_server
    if args.models:
        raise BenchError("with --server, name the served models with --models NAMES, not as positional arguments")
    if not args.server_models:
        raise BenchError("--server needs --models NAME[,NAME...] (the model names in the server's repository)")
    batches = args.batches or [1]
    if len(batches) != 1:
        raise BenchError("with --server, give one --batch (images per request)")
    return bench_server(args.server, args.server_models.split(","), concurrency=tuple(args.concurrency),
                        batch=batches[0], max_requests=args.max_requests, max_seconds=args.max_seconds)


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io import write_json, write_text
    from ..serve.tune import parse_sweep, sweep, write_back
    if args.server is None or not args.server_models:
        raise BenchError("--sweep needs --server HOST:PORT --models NAMES")
    if args.p99_ms is not None and args.p99_ms <= 0:
        raise BenchError(f"--p99-ms must be > 0, got {args.p99_ms}")
    if args.write_back is not None and not Path(args.write_back).is_dir():
        raise BenchError(f"--write-back: no repository folder {args.write_back}")
    grid = parse_sweep(args.sweep)
    batches = args.batches or [1]
    if len(batches) != 1:
        raise BenchError("with --server, give one --batch (images per request)")
    result = sweep(args.server, args.server_models.split(","), grid, p99_bound_ms=args.p99_ms,
                   progress=lambda m: print(m, flush=True), concurrency=tuple(args.concurrency), batch=batches[0],
                   max_requests=args.max_requests, max_seconds=args.max_seconds)
    out = Path(args.report)
    write_json(out / "sweep.json", result.to_dict())
    write_text(out / "sweep.md", result.to_markdown())
    print(result.to_markdown())
    for model, best in result.best.items():
        if best is None:
            print(f"{model}: no config within p99 <= {args.p99_ms:g} ms; left as it was")
            continue
        print(f"{model}: best instances {best['instances']}, threads {best['threads']} "
              f"({best['throughput']:.1f} img/s, p99 {best['p99_ms']:.1f} ms at concurrency {best['concurrency']})")
        if args.write_back:
            print(f"  written to {write_back(args.write_back, model, best['instances'], best['threads'])}")
    print(f"sweep written to {out}/ (sweep.json, sweep.md)")
    return 0 if any(result.best.values()) else 1


def _local_bench(args: argparse.Namespace):
    from ..deploy import benchmark
    from ..bench.backends import require_available
    from ..bench.runner import BenchConfig
    opts = config_overrides(args, BenchConfig)
    if args.target is None:
        backends, named = _backends(args)
        require_available(named, opts.get("precision", BenchConfig().precision))
        return benchmark(args.models, backends=backends, **opts)
    from ..deploy.files import target_file
    from ..targets import get_target
    if args.providers is not None or "precision" in opts:
        raise BenchError("--target sets the runtime and precision: leave out --providers and --precision")
    t = get_target(args.target, threads=opts.get("threads")).check()
    opts.update(threads=t.threads, precision=t.precision)
    models = [target_file(m, t) for m in args.models]
    return benchmark(models, backends=[t.backend] + (["torch-cpu", "torch-cuda"] if args.torch else []), **opts)


def main(args: argparse.Namespace) -> int:
    if args.sweep is not None:
        return _sweep(args)
    if args.p99_ms is not None or args.write_back is not None:
        raise BenchError("--p99-ms and --write-back go with --sweep")
    if args.server is not None:
        report = _serve_bench(args)
    elif not args.models:
        raise BenchError("give at least one MODEL, or --server HOST:PORT --models NAMES")
    elif args.server_models:
        raise BenchError("--models names served models: it needs --server HOST:PORT")
    else:
        report = _local_bench(args)
    out = report.save(args.report, plot=not args.no_plot)
    print(report.to_markdown())
    files = [f for f in ("report.json", "report.md", "report.csv", "latency.png") if (out / f).is_file()]
    print(f"report written to {out}/ ({', '.join(files)})")  # Path drops a trailing /
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
