"""p3b-deploy: prune timm Vision Transformers with P3B, slim them, export to ONNX, benchmark.

Public names are imported lazily so that `import p3b_deploy` stays cheap and the ONNX benchmark
path (`p3b_deploy.bench.onnx_*`) never imports torch.
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .errors import P3BError

_LAZY = {
    # model layer
    "load_model": "vit", "describe": "vit", "ViTSpec": "vit", "count_model": "vit",
    # plan contract + gates
    "Plan": "plan", "Gates": "gates", "mask_model": "gates",
    # data
    "build_loaders": "data", "DataBundle": "data",
    # P3B method + baselines
    "prune": "p3b", "P3BConfig": "p3b", "PruneResult": "p3b",
    # surgery + safe save/load
    "slim": "surgery", "save_slim": "slim", "load_slim": "slim",
    # export
    "export_onnx": "export", "ExportResult": "export",
    # benchmarks
    "benchmark": "bench", "BenchReport": "bench",
    # serving (local Triton server)
    "TritonServer": "serve", "serve_check": "serve", "ServeCheck": "serve", "bench_server": "serve",
}

__all__ = ["__version__", "P3BError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'p3b_deploy' has no attribute {name!r}")


class _Package(__import__("types").ModuleType):
    """`p3b_deploy.slim` is the surgery function; importing the save/load module p3b_deploy/slim.py
    (which Python would bind to the same package attribute) must not shadow it."""

    def __setattr__(self, name: str, value) -> None:
        if name == "slim" and isinstance(value, __import__("types").ModuleType):
            return
        super().__setattr__(name, value)


__import__("sys").modules[__name__].__class__ = _Package
