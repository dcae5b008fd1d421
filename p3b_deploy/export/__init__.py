"""Export: verified ONNX (parity vs torch, metadata, fp16/int8 variants) and the Triton model
repository. `export_onnx(model, out, input_size=...) -> ExportResult` is the front door.
ExportConfig (`export.config`) imports no torch; the rest is imported on first use."""
from __future__ import annotations

import importlib

from .config import DEFAULT_OPSET, ExportConfig

_LAZY = {"INPUT_NAME": "exporter", "OUTPUT_NAME": "exporter", "ExportResult": "exporter", "export_onnx": "exporter",
         "export_source": "exporter", "load_source": "exporter", "verify_onnx": "exporter",
         "metadata_for": "metadata", "TritonConfig": "triton", "write_triton_repo": "triton",
         "make_pack": "latency_pack", "PackResult": "latency_pack"}

__all__ = ["DEFAULT_OPSET", "ExportConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
