"""Count multiply-accumulates (MACs) and parameters from an ONNX graph, without torch.

MatMul, Gemm, Conv (and the ONNX `Attention` op) are counted from tensor shapes found by
`onnx.shape_inference` with the batch dimension fixed to 1, so the result is MACs *per image*
and matches `p3b_deploy.spec`'s analytic count (qkv, q·kᵀ, attn·v, proj, MLP, patch embed, head).
Elementwise ops (Add, Mul, Softmax, LayerNormalization, Gelu, ...) are not MACs; their output
element counts are reported separately per op type so nothing is hidden. Where shape inference
leaves a shape unknown (data-dependent reshapes), the graph is run once in ONNX Runtime on zeros
to read the real shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import BenchError

MAC_OPS = ("MatMul", "Gemm", "Conv", "Attention", "MatMulInteger", "QLinearMatMul", "ConvInteger")
# Ops that only move data (no arithmetic); everything else that is not a MAC op is "elementwise".
_MOVE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Concat", "Gather", "GatherElements",
             "GatherND", "Scatter", "ScatterND", "ScatterElements", "Shape", "Expand", "Identity", "Constant",
             "ConstantOfShape", "Split", "Flatten", "Cast", "Range", "Tile", "Pad", "Size", "Where"}
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass
class OnnxCounts:
    """What `count_onnx` found in one ONNX graph (all per image)."""
    macs: int  # MatMul/Gemm/Conv/Attention multiply-accumulates per image
    params: int  # elements of floating-point initializers (weights; index tensors excluded)
    macs_by_op: dict[str, int] = field(default_factory=dict)  # MACs per op type
    elementwise: dict[str, int] = field(default_factory=dict)  # output elements per non-MAC op type
    op_counts: dict[str, int] = field(default_factory=dict)  # number of nodes per op type
    shapes_from: str = "shape_inference"  # or "onnxruntime" when inference left shapes unknown
    metadata: dict[str, str] = field(default_factory=dict)  # the file's metadata_props

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params, "macs_by_op": self.macs_by_op,
                "elementwise": self.elementwise, "op_counts": self.op_counts, "shapes_from": self.shapes_from}


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise BenchError("counting MACs from an ONNX graph needs the 'onnx' package "
                         "(pip install onnx); latency benchmarks work without it") from None
    return onnx


def _fix_batch(model, batch: int = 1) -> None:
    """Replace symbolic leading dims of the graph inputs by `batch` (in place)."""
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch


def _shape_table(model) -> dict[str, list[int | None]]:
    vis = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    table = {}
    for v in vis:
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        table[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    return table


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _node_macs(node, shapes: dict) -> int | None:
    """MACs of one MAC op from its input/output shapes; None if a needed shape is unknown."""
    ins = [shapes.get(n) for n in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = ins[0]
        if not (_known(a) and _known(out)):
            return None
        return _prod(out) * (a[-1] if len(a) > 1 else a[0])
    if op == "Gemm":
        a = ins[0]
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        if not (_known(a) and _known(out)):
            return None
        return _prod(out) * (a[0] if trans_a else a[1])
    if op in ("Conv", "ConvInteger"):
        w = ins[1]
        if not (_known(w) and _known(out)):
            return None
        return _prod(out) * _prod(w[1:])  # each output element: Cin/groups * kh * kw MACs
    if op == "Attention":  # ONNX opset 23: Q (B,H,N,dqk) or (B,N,H*dqk); K, V alike
        q, k, v = ins[0], ins[1], ins[2]
        if not (_known(q) and _known(k) and _known(v) and _known(out)):
            return None
        if len(q) == 4:
            b, h, n, dqk = q
            nk, dv = k[2], v[3]
            return b * h * n * nk * (dqk + dv)
        hq = next((at.i for at in node.attribute if at.name == "q_num_heads"), 1)
        hkv = next((at.i for at in node.attribute if at.name == "kv_num_heads"), hq)
        b, n, _ = q
        nk = k[1]
        # q·kᵀ: every q head over its d_qk channels = q width; attn·v: each q head reads v width/hkv
        return b * n * nk * (q[2] + v[2] * hq // hkv)
    return None


def _ort_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """Run the (batch-1) graph once on zeros in ONNX Runtime and read the shapes of `names`."""
    import numpy as np
    import onnxruntime as ort
    onnx = _import_onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = np.float16 if "float16" in i.type else np.int64 if "int64" in i.type else np.float32
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    outs = sess.run(names, feeds)
    return {n: list(o.shape) for n, o in zip(names, outs)}


def count_onnx(path_or_model: str | os.PathLike | Any) -> OnnxCounts:
    """MACs (per image) and parameters of an ONNX model file or ModelProto, from its graph."""
    onnx = _import_onnx()
    if isinstance(path_or_model, (str, os.PathLike)):
        try:
            model = onnx.load(str(path_or_model))
        except Exception as e:  # noqa: BLE001 — protobuf errors come in many types
            raise BenchError(f"cannot read ONNX file {path_or_model}: {str(e).splitlines()[0][:160]}") from None
    else:
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
    _fix_batch(model, 1)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 — fall back to ORT shapes below
        inferred = model
    shapes = _shape_table(inferred)
    nodes = list(inferred.graph.node)
    macs_by_op: dict[str, int] = {}
    elementwise: dict[str, int] = {}
    op_counts: dict[str, int] = {}
    pending = [n for n in nodes if n.op_type in MAC_OPS and _node_macs(n, shapes) is None]
    shapes_from = "shape_inference"
    if pending:
        need = sorted({t for n in pending for t in list(n.input[:3]) + [n.output[0]] if t and not _known(shapes.get(t))})
        shapes.update(_ort_shapes(inferred, need))
        shapes_from = "onnxruntime"
    for n in nodes:
        op_counts[n.op_type] = op_counts.get(n.op_type, 0) + 1
        if n.op_type in MAC_OPS:
            macs_by_op[n.op_type] = macs_by_op.get(n.op_type, 0) + int(_node_macs(n, shapes) or 0)
        elif n.op_type not in _MOVE_OPS and n.output and _known(shapes.get(n.output[0])):
            elementwise[n.op_type] = elementwise.get(n.op_type, 0) + _prod(shapes[n.output[0]])
    params = sum(_prod(i.dims) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)
    return OnnxCounts(macs=sum(macs_by_op.values()), params=params, macs_by_op=macs_by_op,
                      elementwise=elementwise, op_counts=op_counts, shapes_from=shapes_from,
                      metadata={p.key: p.value for p in model.metadata_props})
