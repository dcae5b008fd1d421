"""Latency table: format validation (one-line errors, exit 2, nothing written), monotone
interpolation, prediction by hand, and measuring a probe pack with torch made unimportable."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from p3b_deploy.bench.latency_table import (Curve, Geometry, LatencyTable, LatencyTableError, isotonic,
                                            read_manifest)
from p3b_deploy.cli import main as cli
from p3b_deploy.plan import AttnPlan, LayerPlan, MlpPlan, Plan

GEO = dict(model="toy", img_size=16, embed_dim=8, depth=2, num_heads=2, head_dim=4, mlp_hidden=16, num_tokens=5,
           num_classes=3)


def toy_dict(**over) -> dict:
    """attn: 1 ms at width 1 .. 4 ms at 4; mlp: 2 ms at 1 .. 6 ms at 16; fixed 1 ms; io 0.5 / 0.25 ms."""
    d = {"format": "p3b-latency-table", "version": 1, "geometry": dict(GEO), "provider": "CPUExecutionProvider",
         "batch": 1, "threads": 1,
         "branches": {"attn": {"widths": [1, 2, 4], "ms": [1.0, 2.0, 4.0]},
                      "mlp": {"widths": [1, 8, 16], "ms": [2.0, 4.0, 6.0]}},
         "fixed_ms": 1.0, "io_ms": {"attn": 0.5, "mlp": 0.25}, "dense_check": {}}
    d.update(over)
    return d


def toy_plan(attn_qk: list, hidden: list, residual: bool = False) -> Plan:
    dims = {"embed_dim": 8, "depth": 2, "num_heads": 2, "head_dim": 4, "mlp_hidden": 16}
    layers = []
    for q, h in zip(attn_qk, hidden):
        res = list(range(4)) if residual else None
        a = AttnPlan(removed=True) if q == 0 else AttnPlan(qk=None if q == 4 else list(range(q)),
                                                          v=None if q == 4 else list(range(q)), in_=res, out=res)
        m = MlpPlan(removed=True) if h == 0 else MlpPlan(hidden=None if h == 16 else list(range(h)))
        layers.append(LayerPlan(attn=a, mlp=m))
    return Plan(model="toy", img_size=16, num_classes=3, dims=dims, layers=layers)


def test_isotonic_and_interpolation_are_monotone():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
    c = Curve(widths=[1, 8, 16], ms=[2.0, 4.0, 6.0])
    w = np.arange(0, 17)
    y = c(w)
    assert y[0] == 0.0  # removed branch
    assert c(1) == 2.0 and c(4.5) == pytest.approx(3.0) and c(12) == pytest.approx(5.0) and c(16) == 6.0
    assert np.all(np.diff(y[1:]) >= 0)


def test_predict_by_hand():
    t = LatencyTable.from_dict(toy_dict())
    assert t.dense_ms == pytest.approx(1 + 2 * (4 + 6))  # fixed + 2 layers x (attn 4 + mlp 6)
    # layer 0: attn qk 2 (2 ms), mlp hidden 8 (4 ms); layer 1: attn removed (0), mlp 16 (6 ms)
    assert t.predict(toy_plan([2, 0], [8, 16])) == pytest.approx(1 + 2 + 4 + 0 + 6)
    # between grid points: attn width 3 -> 3 ms
    assert t.predict(toy_plan([3, 4], [0, 0])) == pytest.approx(1 + 3 + 4)
    # residual pruning (in = out = 4 of 8): MAC-equivalent width of the attention branch + io cost
    # macs = H (n_in (2qk + v) + v n_out + N (qk + v)) = 2 (4*12 + 4*4 + 5*8) = 208; dense-io width 1 has
    # H (4D + 2N) = 2 * 42 = 84 per channel -> width 208 / 84 = 2.476 -> 2.476 ms, + 0.5 ms io
    assert t.predict(toy_plan([4, 0], [0, 0], residual=True)) == pytest.approx(1 + 208 / 84 + 0.5)
    assert t.target_ms("0.5") == pytest.approx(0.5 * 21) and t.target_ms("12ms") == 12.0


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.pop("fixed_ms"), "missing key(s) fixed_ms"),
    (lambda d: d["geometry"].pop("num_tokens"), "geometry lacks num_tokens"),
    (lambda d: d["branches"]["mlp"].update(ms=[2.0, 5.0, 4.0]), "latencies decrease with width"),
    (lambda d: d["branches"]["attn"].update(ms=[-1.0, 2.0, 4.0]), "must be a non-negative number"),
    (lambda d: d["branches"]["attn"].update(widths=[], ms=[]), "empty grid"),
    (lambda d: d["branches"]["attn"].update(widths=[1, 2, 3]), "not the dense width 4"),
    (lambda d: d.update(format="something"), "not a latency table"),
    (lambda d: d["geometry"].update(embed_dim="8"), "geometry embed_dim must be a positive integer"),
])
def test_bad_tables_are_one_line_errors(edit, msg):
    d = toy_dict()
    edit(d)
    with pytest.raises(LatencyTableError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        LatencyTable.from_dict(d)
    assert "\n" not in str(e.value)


def test_bad_table_is_not_saved(tmp_path):
    t = LatencyTable.from_dict(toy_dict())
    t.curves["attn"].ms = [3.0, 2.0, 4.0]  # made non-monotone after loading
    with pytest.raises(LatencyTableError):
        t.save(tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_geometry_mismatch_is_refused():
    t = LatencyTable.from_dict(toy_dict())
    other = toy_plan([4, 4], [16, 16])
    other.img_size = 32
    with pytest.raises(LatencyTableError, match="latency table is for toy .* input 16.*input 32"):
        t.predict(other)
    assert Geometry.from_dict(GEO).mismatch(Geometry.from_dict({**GEO, "num_tokens": 17})) == "num_tokens 5 vs 17"


# --------------------------------------------------------------------------------------------
# A fake probe pack of tiny ONNX graphs (real packs need torch and minutes; see the slow test)
# --------------------------------------------------------------------------------------------
def _graph(path: Path, in_shape: list, widths: list[int], d_in: int, d_out: int) -> None:
    """x -> MatMul(d_in x w) -> Relu -> MatMul(w x d_out) per width in a chain (batch axis dynamic)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    if len(in_shape) == 3:  # image: flatten to (batch, C*H*W)
        nodes.append(helper.make_node("Flatten", ["x"], ["flat"], axis=1))
        cur = "flat"
    for j, w in enumerate(widths):
        inits += [numpy_helper.from_array(rng.standard_normal((d_in if j == 0 else d_out, w)).astype(np.float32), f"a{j}"),
                  numpy_helper.from_array(rng.standard_normal((w, d_out)).astype(np.float32), f"b{j}")]
        nodes += [helper.make_node("MatMul", [cur, f"a{j}"], [f"h{j}"]), helper.make_node("Relu", [f"h{j}"], [f"r{j}"]),
                  helper.make_node("MatMul", [f"r{j}", f"b{j}"], [f"y{j}"])]
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
            _graph(root / f"{kind}_{w}.onnx", [N, D], [w * 8] * 2, D, D)
            files[kind][str(w)] = f"{kind}_{w}.onnx"
        _graph(root / f"{kind}_io.onnx", [N, D], [grid[-1] * 8] * 2, D, D)
        files[f"{kind}_io"] = f"{kind}_io.onnx"
    _graph(root / "null.onnx", [N, D], [], D, D)
    _graph(root / "fixed.onnx", [3, 16, 16], [4], 768, 3)
    _graph(root / "dense.onnx", [3, 16, 16], [64, 64], 768, 3)
    files.update(null="null.onnx", fixed="fixed.onnx", dense="dense.onnx")
    (root / "manifest.json").write_text(json.dumps({
        "format": "p3b-latency-pack", "version": 1, "tool_version": "test", "geometry": GEO, "repeats": 2,
        "grid": {"attn": [1, 2, 4], "mlp": [1, 8, 16]}, "io_dims": {"n_in": 4, "n_out": 4}, "files": files}))
    return root


_NO_TORCH = "import sys\nfor m in ('torch', 'torchvision', 'timm', 'torch_pruning'):\n    sys.modules[m] = None\n"
FAST = ["--threads", "1", "--min-seconds", "0", "--min-iters", "3", "--warmup-seconds", "0"]


def test_latency_table_cli_without_torch(tmp_path):
    pack = fake_pack(tmp_path / "pack")
    p = subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(f"""
        from p3b_deploy.cli import main
        rc = main(["latency-table", {str(pack)!r}, "--out", "t.json", *{FAST!r}])
        assert all(v is None for k, v in sys.modules.items() if k.split(".")[0] == "torch"), "torch got imported"
        sys.exit(rc)
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "latency table written to t.json" in p.stdout
    t = LatencyTable.load(tmp_path / "t.json")
    assert t.geometry == Geometry.from_dict(GEO) and t.batch == 1 and t.threads == 1
    assert t.provider == "CPUExecutionProvider" and t.versions.get("onnxruntime")
    for c in t.curves.values():
        assert len(c.ms) == 3 and len(c.raw_ms) == 3 and np.all(np.diff(c.ms) >= 0) and c.ms[-1] > 0
    assert t.dense_check["measured_ms"] > 0 and t.fixed_ms > 0


def test_latency_table_on_openvino_without_torch(tmp_path):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'p3b-deploy[openvino]')")
    pack = fake_pack(tmp_path / "pack")
    p = subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(f"""
        from p3b_deploy.cli import main
        rc = main(["latency-table", {str(pack)!r}, "--out", "t.json", "--runtime", "openvino", *{FAST!r}])
        assert all(v is None for k, v in sys.modules.items() if k.split(".")[0] == "torch"), "torch got imported"
        sys.exit(rc)
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    t = LatencyTable.load(tmp_path / "t.json")
    assert t.provider == "OpenVINO CPU" and t.versions.get("openvino") and t.threads == 1
    for c in t.curves.values():  # (these toy probes may cost no more than the null graph on OpenVINO: >= 0)
        assert len(c.ms) == 3 and np.all(np.diff(c.ms) >= 0) and c.ms[0] >= 0
    assert t.dense_check["measured_ms"] > 0


def test_latency_table_cli_bad_pack_exit_2_nothing_written(tmp_path, capsys):
    pack = fake_pack(tmp_path / "pack")
    m = json.loads((pack / "manifest.json").read_text())
    m["files"]["mlp"] = {}
    (pack / "manifest.json").write_text(json.dumps(m))
    assert cli(["latency-table", str(pack), "--out", str(tmp_path / "t.json"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty grid for mlp" in err[0]
    assert not (tmp_path / "t.json").exists()
    assert cli(["latency-table", str(tmp_path / "nope"), "--out", str(tmp_path / "t.json")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(LatencyTableError, match="missing file"):
        (pack / "null.onnx").unlink()
        m["files"]["mlp"] = {"1": "mlp_1.onnx"}
        (pack / "manifest.json").write_text(json.dumps(m))
        read_manifest(pack)


def test_latency_pack_next_hint_lists_every_runtime_latency_table_takes(tmp_path, capsys, monkeypatch):
    """The hint printed after a pack names exactly the runtimes `latency-table --runtime` accepts:
    the bench backends that time ONNX files (openvino included)."""
    import p3b_deploy.export.latency_pack as lp
    from p3b_deploy.bench.backends import ALIASES, BACKENDS
    from p3b_deploy.cli.latency_table import RUNTIMES
    monkeypatch.setattr(lp, "make_pack", lambda model, out, **kw: lp.PackResult(
        path=Path(out), geometry=Geometry.from_dict(GEO), files={"attn": {"1": "a"}, "null": "n"}, seconds=1.0))
    assert cli(["latency-pack", "toy", "--out", f"{tmp_path}/pack/"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (f"next, on the target device: p3b-deploy latency-table {tmp_path}/pack --out latency_table.json "
                      "[--batch B] [--threads T] [--runtime cpu|cuda|tensorrt|openvino]")
    assert {ALIASES.get(r, r) for r in RUNTIMES} == {k for k, f in BACKENDS.items() if f().needs == "onnx"}


def test_prune_refuses_bad_table_file(tmp_path, capsys):
    bad = copy.deepcopy(toy_dict())
    bad["branches"]["attn"]["ms"] = [1.0, 0.5, 4.0]
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(LatencyTableError, match="decrease with width"):
        LatencyTable.load(tmp_path / "t.json")


@pytest.mark.slow
def test_real_pack_round_trip(tmp_path):
    """make_pack (torch side) -> measure_pack (torch-free harness) on the nano demo model."""
    import torch
    from p3b_deploy.export.latency_pack import make_pack
    from p3b_deploy.bench.latency_table import measure_pack
    torch.set_num_threads(1)
    res = make_pack("vit_nano_patch4_16", tmp_path / "pack", repeats=1, steps=2, threads=1)
    assert res.geometry.num_tokens == 17 and sorted(res.files["mlp"], key=int) == ["1", "128", "256"]
    t = measure_pack(tmp_path / "pack", batch=2, threads=1, min_seconds=0.1, min_iters=3, warmup_seconds=0)
    assert t.curves["attn"].widths == [1, 16, 32] and t.batch == 2
    assert t.dense_check["measured_ms"] > 0 and abs(t.dense_check["error"]) < 1.0
