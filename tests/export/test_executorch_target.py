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
        from p3b_deploy.bench import benchmark
        rep = benchmark([{str(a)!r}], backends=["ort-cpu", "et"], threads=1, warmup_seconds=0, min_iters=2,
                        min_seconds=0)
        print("ROWS", [r["backend"] for r in rep.results])
        print("SKIP", [(k["backend"], k["reason"]) for k in rep.skipped])
    """, tmp_path, prefix=_NO_ET)
    assert p.returncode == 0, p.stderr
    assert "ROWS ['ort-cpu']" in p.stdout
    assert "SKIP [('executorch', 'executorch is not installed here: run `bash scripts/setup_edge.sh`" in p.stdout


_EDGE = """
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
                   "(ExecuTorch lowers from torch, about a minute per probe here: bench the final .pte with "
                   "`bench --providers executorch` instead)"]
    assert not (tmp_path / "t.json").exists()
