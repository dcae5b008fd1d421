"""p3b-deploy: prune timm Vision Transformers with P3B, slim them, export to ONNX, benchmark.

The function `p3b_deploy.slim` (surgery) and the package `p3b_deploy.surgery` have different names
on purpose, so importing a subpackage never shadows a public function.

Public names are imported lazily so that `import p3b_deploy` stays cheap and the ONNX benchmark
path (`p3b_deploy.bench.onnx_*`) never imports torch.
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .errors import P3BError

_LAZY = {
    # geometry, plan contract, artifacts (torch-free)
    "ViTSpec": "spec", "Plan": "plan", "RunDir": "artifacts", "SlimDir": "artifacts",
    "OnnxFile": "artifacts",
    # model layer
    "load_model": "models", "describe": "models", "count_model": "models", "Gates": "models.gates",
    "mask_model": "models.gates",
    # data
    "build_loaders": "data", "DataBundle": "data",
    # training, pruning methods
    "TrainConfig": "train", "finetune": "train", "FinetuneResult": "train",
    "prune": "pruning", "P3BConfig": "pruning", "PruneResult": "pruning",
    # surgery + safe save/load
    "slim": "surgery", "save_slim": "surgery", "load_slim": "surgery", "verify_slim": "surgery",
    "preview_slim": "surgery", "preview_plan": "surgery",
    # export
    "export_onnx": "export", "ExportResult": "export", "ExportConfig": "export",
    # benchmarks
    "benchmark": "deploy", "BenchReport": "bench", "LatencyTable": "bench", "measure_pack": "bench",
    "deployment_matrix": "deploy", "MatrixReport": "deploy",
    # deployment targets (torch-free)
    "Target": "targets", "TARGETS": "targets", "get_target": "targets",
    "make_pack": "export",
    # whole pipeline
    "run_pipeline": "pipeline", "RunConfig": "pipeline",
    # serving (local Triton server)
    "TritonServer": "serve", "serve_check": "serve", "ServeCheck": "serve", "bench_server": "serve",
}

__all__ = ["__version__", "P3BError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'p3b_deploy' has no attribute {name!r}")
