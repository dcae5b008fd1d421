"""`p3b-deploy` command line: parses, calls one library function per stage, prints.

Each stage lives in its own module `p3b_deploy/cli/<stage>.py` exposing
`add_arguments(parser)` and `main(args) -> int`. Flags come from the typed configs
(`cli/options.py`); building the parser imports no torch (stage modules import their heavy
modules inside `main`), so `p3b-deploy bench model.onnx` works where torch is absent or broken.
User errors (`P3BError`) are printed as one line and exit non-zero, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .._version import __version__
from ..errors import P3BError

STAGES = {
    "prune": "fine-tune a timm ViT while pruning it (P3B or a baseline) -> run dir with plan.json",
    "slim": "surgery: plan + dense weights -> physically smaller model (slim dir)",
    "finetune": "recovery fine-tuning of a slim model (optional distillation)",
    "export": "export a slim dir / run dir / timm model to verified ONNX (+ fp16/int8, Triton repo)",
    "bench": "latency, throughput, MACs and memory on ONNX Runtime / torch backends (or a Triton server)",
    "serve": "run a local Triton Inference Server on a model repository (export --triton-repo)",
    "run": "the whole pipeline in one command (prune -> slim -> export -> bench) with one report",
    "inspect": "per-block table of kept dims and ratios of a plan, run dir or slim dir",
    "latency-pack": "ONNX probes of a model's branches at a grid of widths, to time on the target device",
    "latency-table": "time a probe pack on this device -> latency_table.json (torch-free)",
}


def _third_party(e: ModuleNotFoundError) -> bool:
    """A missing dependency (torch, yaml, ... on an ONNX-only edge install), not a missing p3b module."""
    return bool(e.name) and not e.name.startswith("p3b_deploy")


def _load_stage(name: str):
    try:
        return importlib.import_module(f"p3b_deploy.cli.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name == f"p3b_deploy.cli.{name.replace('-', '_')}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p3b-deploy",
        description="Prune a timm Vision Transformer with P3B, slim it, export it to ONNX and benchmark it.",
    )
    p.add_argument("--version", action="version", version=f"p3b-deploy {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, help_ in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = _load_stage(name)
        except ModuleNotFoundError as e:  # torch-free edge install: `bench` on .onnx must still work
            if not _third_party(e):
                raise
            mod = None
        if mod is not None:
            mod.add_arguments(sp)
        else:
            sp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("matplotlib", "PIL", "onnxscript", "torch.onnx"):  # third-party debug chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    if args.stage is None:
        parser.print_help()
        return 2
    try:
        mod = _load_stage(args.stage)
    except ModuleNotFoundError as e:
        if not _third_party(e):
            raise
        print(f"error: stage '{args.stage}' needs {e.name}, which is not installed here", file=sys.stderr)
        return 2
    if mod is None:
        print(f"error: stage '{args.stage}' is not built yet in p3b-deploy {__version__}", file=sys.stderr)
        return 2
    try:
        return int(mod.main(args) or 0)
    except ImportError as e:  # a dependency that is missing or broken (e.g. torch without its CUDA libs)
        if args.verbose or (isinstance(e, ModuleNotFoundError) and not _third_party(e)):
            raise
        print(f"error: stage '{args.stage}' needs {e.name or 'a module'} that cannot be imported here: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except P3BError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1
    except OSError as e:
        if args.verbose:
            raise
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
