"""Which file a deployment target runs, given what the user points at."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BenchError
from ..targets import Target

_KIND_OPS = {"dynamic": ("MatMulInteger", "DynamicQuantizeLinear"), "static": ("QuantizeLinear",)}


def int8_kind(path: str | os.PathLike) -> str | None:
    """'dynamic' / 'static' for an int8 ONNX file, None for a float one (by its ops; by its name
    where the `onnx` package is missing, e.g. on an edge device: then kind 'unknown')."""
    try:
        from ..onnx_quant import int8_op_counts
        ops = int8_op_counts(path)
    except ImportError:
        return "unknown" if str(path).endswith(".int8.onnx") else None
    for kind, names in _KIND_OPS.items():
        if any(ops.get(n) for n in names):
            return kind
    return None


def target_file(model: Any, target: Target) -> Any:
    """The MODEL to time on `target`: as given for fp32 and ExecuTorch targets; for int8 targets an
    int8 ONNX file of the target's kind: the file itself, or the `<stem>.int8.onnx` that
    `export --target` wrote next to it. BenchError (one line) otherwise."""
    if target.int8 is None or not target.runs_onnx:  # .pte / .tflite: the backend finds the file next to the .onnx
        return model
    p = Path(str(model))
    if p.suffix != ".onnx" or not p.is_file():
        raise BenchError(f"target {target.name} runs an int8 ONNX file; {model} is not one: export it with "
                         f"`p3b-deploy export SOURCE --target {target.name} --out model.onnx` and bench model.int8.onnx")
    for cand in (p, p.with_name(p.name[:-len('.onnx')] + ".int8.onnx")):
        if cand.is_file():
            kind = int8_kind(cand)
            if kind in (target.int8, "unknown"):
                return str(cand)
            if kind is not None and cand != p:
                raise BenchError(f"target {target.name} runs {target.int8} int8, but {cand.name} is {kind} int8: "
                                 f"export again with --target {target.name}")
    raise BenchError(f"target {target.name} runs a {target.int8} int8 file; {p.name} is float and has no "
                     f"{p.stem}.int8.onnx next to it (p3b-deploy export SOURCE --target {target.name} --out {p.name})")
