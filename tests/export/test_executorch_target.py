"""ExecuTorch as an export target (`export --format executorch`) and a bench backend (`executorch`).

Fast: without executorch the target is refused in one line before any work and the backend is
skipped with the reason. Slow (needs .venv-edge, scripts/setup_edge.sh): a real slim model is
exported to a verified .pte that carries the ONNX file's metadata, and bench times it next to ORT
with parity on the same inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onnx_models import tiny_onnx
from p3b_deploy.artifacts import ArtifactError, PteFile, detect

ROOT = Path(__file__).resolve().parents[2]
EDGE_PY = ROOT / ".venv-edge" / "bin" / "python"
_NO_ET = "import sys\nsys.modules['executorch'] = None\n"


def _py(code: str, cwd: Path, python: str = sys.executable, timeout: int = 300,
        prefix: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    return subprocess.run([python, "-c", prefix + textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_pte_paths_are_detected(tmp_path):
    with pytest.raises(ArtifactError, match="ExecuTorch program not found"):
        detect(tmp_path / "missing.pte")
    (tmp_path / "m.pte").write_bytes(b"x")
    (tmp_path / "m.onnx").write_bytes(b"x")
    art = detect(tmp_path / "m.pte")
    assert isinstance(art, PteFile) and art.onnx_sibling == tmp_path / "m.onnx"


def test_format_executorch_without_executorch_is_refused_in_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    p = _py(f"""
        from p3b_deploy.cli import main
        sys.exit(main(["export", "vit_pico_patch4_32", "--out", {str(tmp_path / 'out' / 'm.onnx')!r},
                       "--format", "executorch"]))
    """, tmp_path, prefix=_NO_ET)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == ["error: --format executorch: executorch is not installed here: run `bash scripts/setup_edge.sh` "
                     "and use `.venv-edge/bin/python -m p3b_deploy` (elsewhere: pip install executorch)"]
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_executorch_is_skipped_with_the_reason(tmp_path):
    a = tiny_onnx(tmp_path / "a.onnx")
    p = _py(f"""
        from p3b_deploy.deploy import benchmark
        rep = benchmark([{str(a)!r}], backends=["ort-cpu", "et"], threads=1, warmup_seconds=0, min_iters=2,
                        min_seconds=0)
        print("ROWS", [r["backend"] for r in rep.results])
        print("SKIP", [(k["backend"], k["reason"]) for k in rep.skipped])
    """, tmp_path, prefix=_NO_ET)
    assert p.returncode == 0, p.stderr
    assert "ROWS ['ort-cpu']" in p.stdout
    assert "SKIP [('executorch', 'executorch is not installed here: run `bash scripts/setup_edge.sh`" in p.stdout


_SLIM_DIR = """
    import json, sys, torch, timm
    import numpy as np
    from plans import random_plan, randomize_
    from p3b_deploy import describe, slim
    from p3b_deploy.surgery.store import save_slim
    from p3b_deploy.cli import main
    torch.manual_seed(0)
    dense = randomize_(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                                         num_classes=10), seed=0).eval()
    save_slim(slim(dense, random_plan(describe(dense), seed=3, keep=0.5, remove_prob=0.25), residual_io="index"),
              "slim")
"""
_EDGE = _SLIM_DIR + """
    rc = main(["export", "slim", "--out", "out/m.onnx", "--format", "executorch", "--executorch-max-batch", "8",
               "--data", "digits"])
    print("EXPORT_RC", rc)
    rc = main(["bench", "out/m.onnx", "out/m.pte", "--providers", "cpu,executorch", "--report", "rep",
               "--batch", "1,8,9", "--threads", "1", "--warmup-seconds", "0", "--min-iters", "3",
               "--min-seconds", "0"])
    print("BENCH_RC", rc)
    from p3b_deploy.executorch_io import load_pte
    from p3b_deploy.onnx_io import load_onnx_session
    print("META", json.dumps([load_pte("out/m.pte").metadata, load_onnx_session("out/m.onnx")[1]]))
    open("out/bad.pte", "wb").write(b"PTE?" * 64)
    print("BAD_RC", main(["bench", "out/bad.pte", "--providers", "executorch", "--report", "rep2"]))
"""


@pytest.mark.slow
def test_slim_model_exports_to_a_verified_pte_and_benches_next_to_ort(tmp_path):
    if not EDGE_PY.is_file():
        pytest.skip("ExecuTorch is not installed: run `bash scripts/setup_edge.sh` (.venv-edge)")
    p = _py(_EDGE, tmp_path, python=str(EDGE_PY), timeout=1200)
    out = p.stdout
    assert "EXPORT_RC 0" in out and "BENCH_RC 0" in out, p.stderr[-3000:]
    # the export report: the .pte verified against torch at both parity batches, random and real images
    rep = json.loads((tmp_path / "out" / "m.export.json").read_text())
    et = rep["executorch"]
    assert et["max_batch"] == 8 and et["dynamic_batch"] is True and et["delegated_subgraphs"] >= 1
    assert {(c["data"], c["batch"]) for c in et["cases"]} == {("random", 1), ("random", 7), ("real", 1), ("real", 7)}
    assert et["max_abs_diff"] <= 1e-4 and all(c["top1_agreement"] == 100.0 for c in et["cases"])
    assert (tmp_path / "out" / "m.pte").stat().st_size == et["size_bytes"]
    # the .pte carries the ONNX file's metadata: preprocessing and the data's class names
    pte_meta, onnx_meta = json.loads(next(ln for ln in out.splitlines() if ln.startswith("META "))[5:])
    assert pte_meta == onnx_meta
    assert json.loads(pte_meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(pte_meta["class_names"]) == [str(i) for i in range(10)]
    # bench: the .onnx on ORT and ExecuTorch (its sibling .pte), the .pte itself on ExecuTorch
    bench = json.loads((tmp_path / "rep" / "report.json").read_text())
    et_rows = {(r["model"], r["batch"]): r for r in bench["results"] if r["backend"] == "executorch"}
    assert set(et_rows) == {("m", 1), ("m", 8), ("m.pte", 1), ("m.pte", 8)}
    for r in et_rows.values():
        assert r["median_ms"] > 0 and r["parity_max_abs_diff"] <= 1e-4 and r["parity_top1_agreement"] == 100.0
    skipped = {(k["model"], k["batch"]): k["reason"] for k in bench["skipped"]}
    assert skipped[("m.pte", 9)] == ("m.pte runs batches up to 8, not 9 "
                                     "(export --format executorch --executorch-max-batch N)")
    # a file that is not a .pte: refused in one line before any timing (exit 2), no report
    assert "BAD_RC 2" in out and not (tmp_path / "rep2").exists()
    assert "error: out/bad.pte is not an ExecuTorch program (no ExecuTorch file identifier at bytes 4-8: " \
           "found b'PTE?')" in p.stderr.splitlines()


def test_latency_table_refuses_a_runtime_that_runs_no_onnx(tmp_path, capsys):
    from p3b_deploy.cli import main
    assert main(["latency-table", str(tmp_path), "--out", str(tmp_path / "t.json"), "--runtime", "executorch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: latency tables time the pack's ONNX probes; runtime 'executorch' does not run ONNX files "
                   "(name the deploy target instead: --target executorch, whose table lowers the probes)"]
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------------------------------- int8 .pte
def test_int8_pte_without_executorch_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "out").mkdir()
    p = _py(f"""
        from p3b_deploy.cli import main
        sys.exit(main(["export", "vit_pico_patch4_32", "--out", {str(tmp_path / 'out' / 'm.onnx')!r},
                       "--format", "executorch", "--int8", "static", "--data", {str(tmp_path / 'no-such-data')!r}]))
    """, tmp_path, prefix=_NO_ET)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: --format executorch: executorch is not installed here: run `bash scripts/setup_edge.sh` and use "
        "`.venv-edge/bin/python -m p3b_deploy` (elsewhere: pip install executorch)"]
    assert list((tmp_path / "out").iterdir()) == []


def test_int8_pte_needs_torchao(monkeypatch):
    import importlib.util
    from p3b_deploy import executorch_io
    from p3b_deploy.export.config import ExportConfig
    from p3b_deploy.export.formats import get_format
    fmt = get_format("executorch")
    monkeypatch.setattr(executorch_io, "unavailable", lambda precision="fp32": None)  # as if executorch were here
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find(name, *a))
    assert fmt.unavailable(ExportConfig(format="executorch")) is None  # fp32 needs no torchao
    assert fmt.unavailable(ExportConfig(format="executorch", int8="static")) == (
        "--format executorch --int8 static needs torchao (XNNPACK's PT2E quantizer): run `bash scripts/setup_edge.sh` "
        "(elsewhere: pip install torchao)")


class _FakeProgram:
    """Stands in for a loaded int8 .pte: torch's logits + 0.01, negated (another top-1) for the images in `flip`."""

    def __init__(self, model, max_batch, flip=()):
        self.model, self.max_batch, self.flip = model, max_batch, {float(x[0, 0, 0]) for x in flip}

    def forward(self, x):
        import torch
        from p3b_deploy.export.runtime_parity import torch_logits
        assert len(x) <= self.max_batch
        out = torch_logits(self.model, torch.from_numpy(x)) + 0.01
        for i in range(len(x)):
            if float(x[i, 0, 0, 0]) in self.flip:
                out[i] = -out[i]
        return out


def _int8_job(tmp_path, labels, **cfg):
    import timm
    import torch
    import p3b_deploy.models  # noqa: F401
    from p3b_deploy.export.config import ExportConfig
    from p3b_deploy.export.formats import Job
    model = timm.create_model("vit_pico_patch4_32", depth=1, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    real = torch.randn(20, 3, 32, 32, generator=g)
    c = ExportConfig(format="executorch", int8="static", **cfg)
    job = Job(model=model, out=tmp_path / "m.onnx", tmpdir=tmp_path, input_size=(3, 32, 32), cfg=c, metadata={},
              inputs=[("random", torch.randn(1, 3, 32, 32, generator=g))], real=real, labels=labels)
    return job


@pytest.mark.parametrize("flips, ok", [((), True), ((0, 1, 2), False)])
def test_int8_pte_gate_is_the_onnx_int8_gate(tmp_path, monkeypatch, flips, ok):
    """val top-1 of the int8 program vs torch fp32's on the real images, at most int8_max_drop points
    below; parity vs torch reported, not bounded. The program is a stand-in (no executorch here)."""
    import numpy as np
    from p3b_deploy.errors import ExportError
    from p3b_deploy.export import executorch_pte
    from p3b_deploy.export.runtime_parity import torch_logits
    job = _int8_job(tmp_path, labels=None)
    ref = torch_logits(job.model, job.real)
    job.labels = __import__("torch").from_numpy(ref.argmax(1))  # labels = fp32's predictions: fp32 top-1 is 100%
    fake = _FakeProgram(job.model, 8, [job.real[i].numpy() for i in flips])
    monkeypatch.setattr(executorch_pte, "set_threads", lambda threads: 1)
    monkeypatch.setattr(executorch_pte, "load_pte", lambda path: fake)
    res = executorch_pte.PteResult(path=tmp_path / "m.int8.pte", size_bytes=1, max_batch=8, dynamic_batch=True,
                                   lower_seconds=1.0, max_abs_diff=float("nan"), bound=float("nan"), precision="int8")
    if ok:
        executorch_pte.verify_pte_int8(res, job)
        assert res.bound is None and res.cases[0]["max_abs_diff"] == pytest.approx(0.01, abs=1e-5)
        g = res.gate
        assert (g.data, g.batch, g.top1, g.top1_fp32, g.max_drop, g.ok) == ("real (agreement vs torch fp32)", 20,
                                                                             100.0, 100.0, 1.0, True)
        assert g.max_abs_diff == pytest.approx(0.01, abs=1e-5)
        return
    with pytest.raises(ExportError) as e:
        executorch_pte.verify_pte_int8(res, job)
    assert str(e.value) == ("int8 verification of m.int8.pte failed: val top-1 85.00% is 15.00 points below fp32's "
                            "100.00% on 20 images (at most 1 allowed) (raise --int8-max-drop to accept)")
    assert np.isfinite(res.max_abs_diff)


def test_int8_pte_is_a_target_and_finds_its_fp32_onnx(tmp_path):
    from p3b_deploy.targets import TARGETS, needs_calibration
    t = TARGETS["executorch-int8"]
    assert (t.runtime, t.variant, t.backend, t.precision) == ("executorch", "pte-int8", "executorch", "fp32")
    assert needs_calibration(["executorch-int8"]) and not needs_calibration(["executorch"])
    for name in ("m.onnx", "m.int8.onnx", "m.int8.pte"):
        (tmp_path / name).write_bytes(b"x")
    art = detect(tmp_path / "m.int8.pte")
    assert isinstance(art, PteFile) and art.onnx_sibling == tmp_path / "m.onnx"  # parity vs fp32, not the QDQ file
    (tmp_path / "m.onnx").unlink()
    assert detect(tmp_path / "m.int8.pte").onnx_sibling is None


_EDGE_INT8 = _SLIM_DIR + """
    # random weights: the val top-1 gate is measured, not enforced (the demo's numbers are in the docs)
    rc = main(["export", "slim", "--out", "out/m.onnx", "--format", "executorch", "--executorch-max-batch", "8",
               "--int8", "static", "--data", "digits", "--calibration-images", "64", "--int8-max-drop", "100"])
    print("EXPORT_RC", rc)
    rc = main(["bench", "out/m.int8.pte", "--providers", "executorch", "--report", "rep", "--batch", "1",
               "--threads", "1", "--warmup-seconds", "0", "--min-iters", "3", "--min-seconds", "0"])
    print("BENCH_RC", rc)
    from p3b_deploy.executorch_io import load_pte
    print("META", json.dumps([load_pte("out/m.int8.pte").metadata, load_pte("out/m.pte").metadata]))
"""


@pytest.mark.slow
def test_slim_model_exports_a_gated_int8_pte_that_bench_runs(tmp_path):
    if not EDGE_PY.is_file():
        pytest.skip("ExecuTorch is not installed: run `bash scripts/setup_edge.sh` (.venv-edge)")
    p = _py(_EDGE_INT8, tmp_path, python=str(EDGE_PY), timeout=1800)
    out = p.stdout
    assert "EXPORT_RC 0" in out and "BENCH_RC 0" in out, p.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "m.export.json").read_text())
    fp32, q = rep["executorch"], rep["executorch"]["int8"]
    assert fp32["precision"] == "fp32" and fp32["max_abs_diff"] <= 1e-4 and fp32["bound"] == 1e-4
    assert q["precision"] == "int8" and q["bound"] is None and q["lower_seconds"] > 0 and q["int8"] is None
    assert q["path"].endswith("out/m.int8.pte") and (tmp_path / "out" / "m.int8.pte").stat().st_size == q["size_bytes"]
    assert q["size_bytes"] < 0.5 * fp32["size_bytes"]  # int8 weights
    # parity vs torch fp32 reported at every parity batch (not bounded: int8), then the ONNX int8 files' gate
    assert {(c["data"], c["batch"]) for c in q["cases"]} == {("random", 1), ("random", 7), ("real", 1), ("real", 7)}
    assert 0 < q["max_abs_diff"] < 10
    gate = q["gate"]
    assert gate["data"] == "real (agreement vs torch fp32)" and gate["batch"] == 256 and gate["max_drop"] == 100.0
    onnx_gate = rep["variants"][0]["parity"]["cases"][-1]  # the static int8 .onnx, gated on the same val images
    assert rep["variants"][0]["quantization"] == "static" and onnx_gate["batch"] == 256
    assert gate["top1_fp32"] == pytest.approx(onnx_gate["top1_fp32"], abs=0.4)  # torch fp32 vs ORT fp32
    assert 0 <= gate["top1"] <= 100 and gate["top1_agreement"] > 50
    # the int8 program says what it is; everything else is the ONNX file's metadata
    q_meta, f_meta = json.loads(next(ln for ln in out.splitlines() if ln.startswith("META "))[5:])
    assert (q_meta.pop("precision"), q_meta.pop("quantization"), f_meta.pop("precision")) == ("int8", "static", "fp32")
    assert q_meta == f_meta
    # bench runs the int8 program with parity against ORT fp32 on the fp32 m.onnx
    bench = json.loads((tmp_path / "rep" / "report.json").read_text())
    (row,) = [r for r in bench["results"] if r["backend"] == "executorch"]
    assert row["model"] == "m.int8.pte" and row["batch"] == 1 and row["median_ms"] > 0
    assert 0 < row["parity_max_abs_diff"] < 10 and row["parity_top1_agreement"] > 50
