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


def tiny_image_onnx(path, classes: int = 5, batch: int | str = "batch", seed: int = 0, **meta) -> str:
    """images [B, 3, 4, 4] -> Flatten -> MatMul -> logits [B, classes], with metadata_props."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((48, classes)).astype(np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    onnx.save(model, str(path))
    return str(path)
