"""Torch model -> the file a runtime times, for the benchmark harness (registered into
`p3b_deploy.bench.models` by `p3b_deploy.deploy`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def to_onnx(module: Any, out: str | Path, input_shape: Sequence[int]) -> None:
    """The verified export `export` writes (dynamic batch, metadata), with light verification to
    keep benchmarking quick."""
    from ..export import export_onnx
    export_onnx(module, out, input_size=tuple(input_shape), verify_batches=(1,), profile_batch=1, profile_runs=1)
