"""ONNX-graph MAC counter: exact on hand-built graphs, and within 1% of p3b_deploy.vit on dense and slim ViTs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from p3b_deploy.bench.onnx_macs import count_onnx


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def test_hand_built_graph_exact():
    """Conv 3->8 k4 s4 on 16x16, flatten tokens, MatMul 8->12, batched MatMul, Gemm 12->5: MACs by hand."""
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),  # (B,8,4,4)
        helper.make_node("Reshape", ["c", "s0"], ["t"]),  # (B,8,16)
        helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 2, 1]),  # (B,16,8)
        helper.make_node("MatMul", ["tt", "w1"], ["h"]),  # (B,16,12): 16*8*12
        helper.make_node("Transpose", ["h"], ["hT"], perm=[0, 2, 1]),  # (B,12,16)
        helper.make_node("MatMul", ["h", "hT"], ["a"]),  # (B,16,16): 16*16*12
        helper.make_node("Softmax", ["a"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "h"], ["o"]),  # (B,16,12): 16*12*16
        helper.make_node("ReduceMean", ["o"], ["m"], axes=[1], keepdims=0),  # (B,12)
        helper.make_node("Gemm", ["m", "w2", "b2"], ["y"], transB=1),  # (B,5): 12*5
    ]
    inits = [_init("w0", (8, 3, 4, 4)), numpy_helper.from_array(np.array([0, 8, 16], np.int64), "s0"),
             _init("w1", (8, 12)), _init("w2", (5, 12)), _init("b2", (5,))]
    g = helper.make_graph(nodes, "g", [X], [Y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    c = count_onnx(m)
    conv = 8 * 4 * 4 * 3 * 4 * 4
    assert c.macs_by_op == {"Conv": conv, "MatMul": 16 * 8 * 12 + 16 * 16 * 12 + 16 * 12 * 16, "Gemm": 12 * 5}
    assert c.macs == conv + 16 * 8 * 12 + 16 * 16 * 12 + 16 * 12 * 16 + 60
    assert c.params == 8 * 3 * 16 + 8 * 12 + 5 * 12 + 5  # int64 shape tensor excluded
    assert c.elementwise["Softmax"] == 16 * 16
    assert c.shapes_from == "shape_inference"


def test_data_dependent_shape_falls_back_to_onnxruntime():
    """A Reshape whose target comes from a runtime op: shape inference cannot see it, ORT can."""
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Abs", ["s"], ["sa"]),  # data-dependent: shape inference cannot fold it
             helper.make_node("Reshape", ["x", "sa"], ["r"]),  # (B,2,3)
             helper.make_node("MatMul", ["r", "w"], ["y"])]  # (B,2,4): 2*4*3
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "s"), _init("w", (3, 4))]
    m = helper.make_model(helper.make_graph(nodes, "g", [X], [Y], inits), opset_imports=[helper.make_opsetid("", 17)])
    c = count_onnx(m)
    assert c.macs == 2 * 4 * 3
    assert c.shapes_from == "onnxruntime"


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def pico():
    import timm
    import p3b_deploy.models.vit  # noqa: F401 — registers vit_pico_patch4_32
    torch.manual_seed(0)
    m = timm.create_model("vit_pico_patch4_32", depth=3).eval()
    _randomise(m)
    return m


def test_dense_agrees_with_vit_counter(pico, tmp_path):
    from p3b_deploy.models.vit import count_model
    path = tmp_path / "dense.onnx"
    torch.onnx.export(pico, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                      dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    want = count_model(pico)
    got = count_onnx(path)
    assert abs(got.macs - want.macs) / want.macs < 0.01
    assert got.macs == want.macs  # the counters count the same ops, so they agree exactly
    assert abs(got.params - want.params) / want.params < 0.01


def test_slim_agrees_with_plan_counts(pico, tmp_path):
    """A slim model with pruned residual reads/writes, head_dim and hidden, one removed branch (dynamo export)."""
    from p3b_deploy.plan import Plan
    from p3b_deploy.surgery.core import slim
    from p3b_deploy.models.vit import describe
    spec = describe(pico)
    plan = Plan.dense(spec)
    plan.layers[0].attn.in_ = list(range(0, 96, 2))
    plan.layers[0].attn.qk = list(range(0, 32, 2))
    plan.layers[0].attn.v = list(range(20))
    plan.layers[0].attn.out = list(range(10, 80))
    plan.layers[0].mlp.hidden = list(range(0, 384, 3))
    plan.layers[1].mlp.removed = True
    plan.layers[2].attn.heads = [0, 2]
    plan.layers[2].mlp.in_ = list(range(50))
    plan.layers[2].mlp.out = list(range(30, 96))
    sm = slim(pico, plan, residual_io="index")
    want = sm.p3b_slim_config.macs["slim"]
    path = tmp_path / "slim.onnx"
    torch.onnx.export(sm, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    got = count_onnx(path)
    assert want < 0.8 * sm.p3b_slim_config.macs["dense"]  # the plan really cut MACs
    assert abs(got.macs - want) / want < 0.01, (got.macs, want)
    # the torch-side generic counter (used for modules without a plan) agrees as well
    from p3b_deploy.bench.models import _flop_counter_macs
    assert abs(_flop_counter_macs(sm, (3, 32, 32)) - want) / want < 0.01
