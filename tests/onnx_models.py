"""Tiny hand-built ONNX graphs for bench tests: `from onnx_models import tiny_onnx`."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx(path, hidden: int = 64) -> str:
    """A two-layer MLP on a 3x8x8 image as ONNX: 192*hidden + hidden*10 MACs per image."""
    X = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    Y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((192, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    m = helper.make_model(helper.make_graph(nodes, "mlp", [X], [Y], inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)
