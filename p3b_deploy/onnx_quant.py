"""The int8 recipes of the ONNX files, in one place and without torch.

`export --int8 dynamic|static` quantizes the exported model with these, and `latency-table
--target ort-int8 / ort-int8-static / openvino-int8` quantizes every probe of a pack with the same
ones, so the probes timed are the graphs the shipped file contains:
- dynamic: int8 MatMul weights, activations quantized at run time (MatMulInteger on ORT);
- static: QDQ int8 of every linear layer (MatMul/Gemm with a weight initializer): per-channel
  int8 weights, uint8 activations calibrated (min/max) on the given batches; attention's
  activation x activation MatMuls and every non-linear op stay fp32.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import numpy as np

from .errors import ExportError
from .onnx_io import _first_line


class _QuietRoot:
    """onnxruntime.quantization logs through the root logger; keep its chatter out of the CLI."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self.level)


def quantize_dynamic_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Dynamic int8 (MatMul weights); ExportError in one line on failure."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    try:
        with _QuietRoot():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"int8 quantization failed: {_first_line(e)}") from None


def linear_nodes(path: str | os.PathLike) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is a weight initializer."""
    import onnx
    mp = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in mp.graph.initializer}
    return [n.name for n in mp.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


def quantize_static_int8(src: str | os.PathLike, dst: str | os.PathLike, batches: Iterable[dict[str, np.ndarray]]) -> None:
    """Static QDQ int8 of the linear layers, calibrated on `batches` ({input name: array} each)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    linear = linear_nodes(src)
    if not linear or any(not n for n in linear):
        raise ExportError("static int8: the graph's linear layers have no node names to quantize by")
    feed = iter(batches)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feed, None)

    try:
        with _QuietRoot():
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            nodes_to_quantize=linear, calibrate_method=CalibrationMethod.MinMax,
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options={"CalibTensorRangeSymmetric": False}, use_external_data_format=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"static int8 quantization failed: {_first_line(e)}") from None


def int8_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many int8 ops a file holds: QuantizeLinear / DequantizeLinear (static QDQ) and
    MatMulInteger / DynamicQuantizeLinear (dynamic)."""
    import onnx
    mp = onnx.load(str(path), load_external_data=False)
    kinds = ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear")
    return {k: sum(n.op_type == k for n in mp.graph.node) for k in kinds}
