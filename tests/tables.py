"""Hand-made latency tables for tests (a known cost per width, no timing)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from p3b_deploy.bench.latency_table import LatencyTable

GEO = dict(model="toy", img_size=16, embed_dim=8, depth=2, num_heads=2, head_dim=4, mlp_hidden=16, num_tokens=5,
           num_classes=3)


def toy_table(spec, **over) -> LatencyTable:
    """A table for `spec`: attn 0.05 + 0.01 w ms, mlp 0.02 + 0.002 w ms, fixed 0.2 ms (grid of 3 widths)."""
    hd, hid = spec.head_dim, spec.mlp_hidden
    d = {"format": "p3b-latency-table", "version": 1, "provider": "CPUExecutionProvider", "batch": 1, "threads": 1,
         "geometry": {"model": spec.name, "img_size": spec.img_size[0], "embed_dim": spec.embed_dim,
                      "depth": spec.depth, "num_heads": spec.num_heads, "head_dim": hd, "mlp_hidden": hid,
                      "num_tokens": spec.num_tokens, "num_classes": spec.num_classes},
         "branches": {"attn": {"widths": [1, hd // 2, hd], "ms": [0.05 + 0.01 * w for w in (1, hd // 2, hd)]},
                      "mlp": {"widths": [1, hid // 2, hid], "ms": [0.02 + 0.002 * w for w in (1, hid // 2, hid)]}},
         "fixed_ms": 0.2, "io_ms": {"attn": 0.01, "mlp": 0.01}, "dense_check": {}}
    d.update(over)
    return LatencyTable.from_dict(d)


# --------------------------------------------------------------------------------------------
# A fake probe pack of tiny ONNX graphs (real packs need torch and minutes; see the slow test)
# --------------------------------------------------------------------------------------------
def graph(path: Path, in_shape: list, widths: list[int], d_in: int, d_out: int) -> None:
    """x -> MatMul(d_in x w) -> Relu -> MatMul(w x d_out) per width in a chain (batch axis dynamic)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    if len(in_shape) == 3:  # image: flatten to (batch, C*H*W)
        nodes.append(helper.make_node("Flatten", ["x"], ["flat"], axis=1))
        cur = "flat"
    for j, w in enumerate(widths):
        inits += [numpy_helper.from_array(rng.standard_normal((d_in if j == 0 else d_out, w)).astype(np.float32), f"a{j}"),
                  numpy_helper.from_array(rng.standard_normal((w, d_out)).astype(np.float32), f"b{j}")]
        nodes += [helper.make_node("MatMul", [cur, f"a{j}"], [f"h{j}"], name=f"mm_a{j}"),
                  helper.make_node("Relu", [f"h{j}"], [f"r{j}"], name=f"relu{j}"),
                  helper.make_node("MatMul", [f"r{j}", f"b{j}"], [f"y{j}"], name=f"mm_b{j}")]
        cur = f"y{j}"
    if not widths:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
        cur = "y"
    out_shape = ["batch", d_out] if len(in_shape) == 3 else ["batch", *in_shape[1:]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, out_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def fake_pack(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    N, D = GEO["num_tokens"], GEO["embed_dim"]
    files: dict = {"attn": {}, "mlp": {}}
    for kind, grid in (("attn", [1, 2, 4]), ("mlp", [1, 8, 16])):
        for w in grid:
            graph(root / f"{kind}_{w}.onnx", [N, D], [w * 8] * 2, D, D)
            files[kind][str(w)] = f"{kind}_{w}.onnx"
        graph(root / f"{kind}_io.onnx", [N, D], [grid[-1] * 8] * 2, D, D)
        files[f"{kind}_io"] = f"{kind}_io.onnx"
    graph(root / "null.onnx", [N, D], [], D, D)
    graph(root / "fixed.onnx", [3, 16, 16], [4], 768, 3)
    graph(root / "dense.onnx", [3, 16, 16], [64, 64], 768, 3)
    files.update(null="null.onnx", fixed="fixed.onnx", dense="dense.onnx")
    (root / "manifest.json").write_text(json.dumps({
        "format": "p3b-latency-pack", "version": 1, "tool_version": "test", "geometry": GEO, "repeats": 2,
        "grid": {"attn": [1, 2, 4], "mlp": [1, 8, 16]}, "io_dims": {"n_in": 4, "n_out": 4}, "files": files}))
    return root


