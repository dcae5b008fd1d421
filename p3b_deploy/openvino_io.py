"""OpenVINO runtime access shared by `bench` (backend `openvino`) and `export --format openvino`.

OpenVINO reads an .onnx file or an IR (.xml + .bin) directly. Its CPU plugin computes in bf16
by default where the CPU has bf16 units, so the precision is always set explicitly here: `fp32`
-> INFERENCE_PRECISION_HINT f32 (the default), `bf16` -> bf16 (opt-in). The precision the
compiled model reports is what callers record. Imports no torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import P3BError

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}  # our precision name -> OpenVINO's hint
RT_INFO_KEY = "p3b_deploy"  # IR rt_info section holding the ONNX file's metadata_props


def unavailable(precision: str) -> str | None:
    """Why OpenVINO cannot run `precision` here, or None."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install 'p3b-deploy[openvino]')"
    if precision not in PRECISION_HINT:
        return f"{precision} is not an OpenVINO CPU precision here (use fp32, or bf16 opt-in)"
    if precision == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "this CPU has no bf16 support in OpenVINO (OPTIMIZATION_CAPABILITIES lacks BF16)"
    return None


def compile_model(path: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                  input_shape: Sequence[int] | None = None) -> Any:
    """A CPU CompiledModel of an .onnx or .xml file with an explicit precision hint; the input is
    fixed to `input_shape` (N, C, H, W) when given (static shapes compile to faster kernels)."""
    import openvino as ov
    reason = unavailable(precision)
    if reason:
        raise P3BError(reason)
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        if input_shape is not None:
            model.reshape({0: list(int(d) for d in input_shape)})
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        return core.compile_model(model, "CPU", props)
    except Exception as e:  # noqa: BLE001 — OpenVINO raises RuntimeError subclasses with long texts
        raise P3BError(f"OpenVINO could not compile {Path(path).name}: "
                       f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None


def inference_precision(compiled: Any) -> str:
    """The precision the compiled model really computes in ('f32', 'bf16', ...)."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def run(compiled: Any, x: np.ndarray, request: Any = None) -> np.ndarray:
    """Logits of one batch (the first output)."""
    req = request if request is not None else compiled.create_infer_request()
    req.infer({0: x})
    return np.array(req.get_output_tensor(0).data)


def read_metadata(xml: str | os.PathLike) -> dict[str, str]:
    """The metadata an IR carries in rt_info[p3b_deploy] (what the ONNX file had in metadata_props)."""
    import openvino as ov
    model = ov.Core().read_model(str(xml))
    if not model.has_rt_info([RT_INFO_KEY]):
        return {}
    return {str(k): model.get_rt_info([RT_INFO_KEY, str(k)]).astype(str) for k in model.get_rt_info()[RT_INFO_KEY]}
