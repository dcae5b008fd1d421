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
                                            pack_models, read_manifest, table_from_report)
from p3b_deploy.cli import main as cli
from p3b_deploy.plan import AttnPlan, LayerPlan, MlpPlan, Plan
from tables import GEO, fake_pack



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
    # the fake probes cost microseconds, below this machine's timing noise under load: their
    # differences to the null probe may round to 0 (the arithmetic is checked exactly below)
    for c in t.curves.values():
        assert len(c.ms) == 3 and len(c.raw_ms) == 3 and np.all(np.diff(c.ms) >= 0) and min(c.raw_ms) >= 0
    assert t.dense_check["measured_ms"] > 0 and t.fixed_ms > 0 and t.overhead_ms > 0


def test_table_from_report_by_hand(tmp_path):
    """Probe medians -> per-branch curves: (probe - null) / repeats, made monotone; fixed and dense as timed."""
    from types import SimpleNamespace
    pack = fake_pack(tmp_path / "pack")  # repeats 2
    med = {"null": 0.5, "fixed": 1.25, "dense": 30.0, "attn_1": 2.5, "attn_2": 4.5, "attn_4": 8.5,
           "mlp_1": 4.5, "mlp_8": 8.5, "mlp_16": 8.0, "attn_io": 12.5, "mlp_io": 20.5}
    assert set(med) == set(pack_models(pack))
    rep = SimpleNamespace(
        results=[{"model": k, "batch": 1, "median_ms": v, "backend": "ort", "providers": ["CPUExecutionProvider"]}
                 for k, v in med.items()] + [{"model": "slim", "batch": 1, "median_ms": 99.0, "backend": "ort"}],
        skipped=[], config={"precision": "fp32", "min_iters": 3}, system={"cpu": "test", "versions": {"onnxruntime": "x"}})
    t = table_from_report(pack, rep, batch=1, threads=1)
    assert t.curves["attn"].raw_ms == [1.0, 2.0, 4.0] and t.curves["attn"].ms == [1.0, 2.0, 4.0]
    assert t.curves["mlp"].raw_ms == [2.0, 4.0, 3.75] and t.curves["mlp"].ms == [2.0, 3.875, 3.875]
    assert t.fixed_ms == 1.25 and t.overhead_ms == 0.5 and t.repeats == 2 and t.correction == {}
    assert t.dense_ms == pytest.approx(1.25 + 2 * (4.0 + 3.875))
    assert t.dense_check["measured_ms"] == 30.0 and t.dense_check["error"] == pytest.approx(t.dense_ms / 30.0 - 1)
    assert all(v >= 0 for v in t.io_ms.values()) and t.provider == "CPUExecutionProvider"
    rep.results = [r for r in rep.results if r["model"] != "mlp_8"]
    rep.skipped = [{"reason": "out of memory"}]
    with pytest.raises(LatencyTableError, match="could not time mlp_8: out of memory"):
        table_from_report(pack, rep, batch=1, threads=1)


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


def test_latency_pack_next_hint_lists_every_target_latency_table_takes(tmp_path, capsys, monkeypatch):
    """The hint printed after a pack names every target latency-table can time (ONNX ones as
    they are, ExecuTorch / LiteRT lowered), and the pack folder without a doubled /."""
    import re
    import p3b_deploy.export.latency_pack as lp
    from p3b_deploy.targets import TARGETS
    monkeypatch.setattr(lp, "make_pack", lambda model, out, **kw: lp.PackResult(
        path=Path(out), geometry=Geometry.from_dict(GEO), files={"attn": {"1": "a"}, "null": "n"}, seconds=1.0))
    assert cli(["latency-pack", "toy", "--out", f"{tmp_path}/pack/"]) == 0
    hint = capsys.readouterr().out.splitlines()[1]
    assert hint.startswith(f"next, on the target device: p3b-deploy latency-table {tmp_path}/pack --out ")
    listed = re.search(r"--target ([\w|.-]+)\]", hint).group(1).split("|")
    assert listed == list(TARGETS) and "openvino-f32" in listed and "litert-int8" in listed


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


# --------------------------------------------------------------------------------------------
# Tables per deployment target
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, ops", [("ort-int8", ("MatMulInteger", "DynamicQuantizeLinear")),
                                         ("ort-int8-static", ("QuantizeLinear", "DequantizeLinear"))])
def test_int8_probes_really_are_int8(tmp_path, target, ops):
    from p3b_deploy.bench.latency_table import pack_models, target_probes
    from p3b_deploy.onnx_quant import int8_op_counts
    from p3b_deploy.targets import get_target
    pack = fake_pack(tmp_path / "pack")
    probes = target_probes(pack, get_target(target))
    assert set(probes) == set(pack_models(pack))
    for label, path in probes.items():
        counts = int8_op_counts(path)
        if label == "null":  # no linear layer: the per-run cost, timed as it is
            assert path == str(pack / "null.onnx") and not any(counts.values())
            continue
        assert Path(path).parent == pack / get_target(target).variant
        n_matmul = sum(n.op_type == "MatMul" for n in onnx.load(str(pack / Path(path).name)).graph.node)
        assert all(counts[o] >= n_matmul for o in ops), (label, counts)  # every linear layer quantized
    assert target_probes(pack, get_target("ort-fp32")) == pack_models(pack)  # fp32: the files as they are


def test_table_records_its_target_and_is_refused_for_another(tmp_path):
    pack = fake_pack(tmp_path / "pack")
    assert cli(["latency-table", str(pack), "--out", str(tmp_path / "t.json"), "--target", "ort-int8", *FAST]) == 0
    t = LatencyTable.load(tmp_path / "t.json")
    assert t.target == "ort-int8" and t.settings["precision"] == "fp32"
    t.check_target("ort-int8")
    with pytest.raises(LatencyTableError) as e:
        t.check_target("ort-fp32")
    assert "\n" not in str(e.value) and "'ort-int8'" in str(e.value) and "--target ort-fp32" in str(e.value)
    # tables from before targets existed: their provider names the target
    assert LatencyTable.from_dict(toy_dict()).target == "ort-fp32"
    assert LatencyTable.from_dict(toy_dict(provider="openvino")).target == "openvino-f32"
    with pytest.raises(LatencyTableError, match="unknown target 'tpu-int4'"):
        LatencyTable.from_dict(toy_dict(target="tpu-int4"))


def test_correction_recovers_a_known_scale_and_branch_cost():
    """Plans measured as fixed + 1.25 x (sum of branch costs) + 0.3 ms per live branch: the fit
    finds (1.25, 0.3) and predicts every plan exactly; without plans there is no correction."""
    from p3b_deploy.bench.latency_table import fit_correction
    t = LatencyTable.from_dict(toy_dict())
    plans = [[(4, 16), (4, 16)], [(1, 8), (0, 16)], [(2, 0), (0, 1)], [(4, 0), (1, 1)]]
    def truth(w):
        s = sum(float(t.curves["attn"](a)) + float(t.curves["mlp"](m)) for a, m in w)
        return t.fixed_ms + 1.25 * s + 0.3 * sum((a > 0) + (m > 0) for a, m in w)
    c = fit_correction(t, plans, [truth(w) for w in plans], truth([(4, 16)] * 2))
    assert c["scale"] == pytest.approx(1.25) and c["per_branch_ms"] == pytest.approx(0.3)
    assert c["model"] == "scale+branch" and c["loo_mean_abs_error"]["scale+branch"] == pytest.approx(0.0, abs=1e-9)
    assert c["median_abs_error"] == pytest.approx(0.0, abs=1e-9) and c["raw_median_abs_error"] > 0.05
    t.correction = c
    plan = toy_plan([2, 0], [8, 16])  # attn 2.0 + mlp 4.0 + mlp 6.0 ms, 3 live branches
    assert t.predict(plan) == pytest.approx(1.0 + 1.25 * 12.0 + 0.9)
    assert float(t.width_ms("mlp", 0)) == 0.0 and t.width_ms("attn", 4) == pytest.approx(1.25 * 4 + 0.3)
    assert t.dense_ms == pytest.approx(truth([(4, 16)] * 2))
    assert LatencyTable.from_dict(t.to_dict()).correction == c  # saved and read back
    assert fit_correction(t, [], [], 5.0) == {}


def test_correction_model_is_chosen_by_held_out_error():
    """The simplest model that predicts a held-out plan best: a pure scale is fitted as a scale
    (not with a branch cost), and plans that follow the plain sum except one odd plan keep the sum,
    where a fit would bend to the odd plan and miss the others."""
    from p3b_deploy.bench.latency_table import fit_correction
    t = LatencyTable.from_dict(toy_dict())
    plans = [[(4, 16), (4, 16)], [(1, 8), (0, 16)], [(2, 0), (0, 1)], [(4, 0), (1, 1)], [(1, 1), (2, 8)],
             [(0, 16), (4, 1)]]
    total = lambda w: sum(float(t.curves["attn"](a)) + float(t.curves["mlp"](m)) for a, m in w)  # noqa: E731
    dense = [(4, 16)] * 2
    c = fit_correction(t, plans, [t.fixed_ms + 1.3 * total(w) for w in plans], t.fixed_ms + 1.3 * total(dense))
    assert c["model"] == "scale" and c["scale"] == pytest.approx(1.3) and c["per_branch_ms"] == 0.0
    odd = [t.fixed_ms + total(w) * (1.4 if i == 2 else 1.0) for i, w in enumerate(plans)]
    c = fit_correction(t, plans, odd, t.fixed_ms + total(dense))
    assert c["model"] == "sum" and (c["scale"], c["per_branch_ms"]) == (1.0, 0.0)
    # plan 2 (attn 2 ms + mlp 2 ms, fixed 1 ms) measured 1 + 1.4 x 4 = 6.6 ms, priced 5 ms; 6 of 7 exact
    assert c["loo_mean_abs_error"]["sum"] == pytest.approx(round((5 / 6.6 - 1) / -7, 5))
    assert c["loo_mean_abs_error"]["scale"] > c["loo_mean_abs_error"]["sum"]
    assert [p["error"] for p in c["points"]].count(0.0) == 6


def test_negative_fit_is_clamped_to_zero():
    """Costs that fall with more live branches cannot make a branch cost negative ms."""
    from p3b_deploy.bench.latency_table import fit_correction
    t = LatencyTable.from_dict(toy_dict())
    plans = [[(4, 16), (4, 16)], [(1, 1), (1, 1)], [(4, 0), (0, 0)]]
    c = fit_correction(t, plans, [20.0, 40.0, 4.0], 20.0)
    assert c["scale"] >= 0 and c["per_branch_ms"] >= 0
