"""The deployment matrix on a tiny dense + slim pair (vit_pico, depth 2, random weights, a random
plan): every row present, exact reference ratios, parity bounds, file sizes, skipped targets."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import p3b_deploy.models  # noqa: F401  (registers vit_pico_patch4_32)
from p3b_deploy.bench.backends import BACKENDS, Backend, register_backend
from p3b_deploy.deploy.matrix import MatrixReport, deployment_files, deployment_matrix
from p3b_deploy.targets import TARGETS, Target, TargetError, targets_of
from p3b_deploy.errors import BenchError
from p3b_deploy.models.vit import describe
from p3b_deploy.surgery.core import slim

from plans import random_plan, randomize_

TARGET_NAMES = ["ort-fp32", "ort-int8", "openvino-f32"]
NO_EXECUTORCH = importlib.util.find_spec("executorch") is None  # .venv: the ExecuTorch target cannot be exported


def _pair():
    dense = randomize_(timm.create_model("vit_pico_patch4_32", depth=2, num_classes=10).eval(), seed=0)
    small = slim(dense, random_plan(describe(dense), seed=3, remove_prob=0.0))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    return {"dense": dense, "slim": small}, x, y


@pytest.fixture(scope="module")
def pair():
    return _pair()


# The timed matrix runs in its own process: OpenVINO's and ONNX Runtime's thread pools, and the
# torch thread count it sets, stay out of the test process (a fork later in the same session
# crashed the pytest process once they were there).
_MATRIX = """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    torch.set_num_threads(1)
    from test_matrix import TARGET_NAMES, _pair
    from p3b_deploy.deploy.matrix import deployment_matrix
    models, x, y = _pair()
    rep = deployment_matrix(models, TARGET_NAMES, [1], val=(x, y), work_dir=sys.argv[1], threads=1, min_seconds=0.0,
                            warmup_seconds=0.0, min_iters=3, export_options={"threads": 1, "int8_max_drop": 100.0})
    rep.save(sys.argv[1] + "/report")
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'p3b-deploy[openvino]')")
    work = tmp_path_factory.mktemp("matrix")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), str(here.parent)]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_MATRIX), str(work), str(here)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return MatrixReport.from_dict(json.loads((work / "report" / "matrix.json").read_text())), work


def test_every_row_with_exact_reference_numbers(report):
    rep, _ = report
    assert [(r["model"], r["target"], r["batch"]) for r in rep.rows] == [
        (m, t, 1) for m in ("dense", "slim") for t in TARGET_NAMES]
    assert all(r["skipped"] is None and r["median_ms"] > 0 and r["iters"] >= 3 for r in rep.rows)
    assert rep.row("dense", "ort-fp32", 1)["speedup"] == 1.0
    for m in ("dense", "slim"):
        ref = rep.row(m, "ort-fp32", 1)
        assert ref["agreement"] == 100.0 and ref["max_abs_diff"] == 0.0 and ref["images"] == 40
        assert rep.row(m, "openvino-f32", 1)["max_abs_diff"] <= 1e-4
        assert rep.row(m, "openvino-f32", 1)["computes"] == "f32"
        q = rep.row(m, "ort-int8", 1)
        assert 0.0 < q["max_abs_diff"] < 1.0 and 0.0 <= q["agreement"] <= 100.0
        assert ref["top1"] == pytest.approx(rep.row(m, "openvino-f32", 1)["top1"])
    # the speedups are the measured medians' ratios against dense ORT fp32
    base = rep.row("dense", "ort-fp32", 1)["median_ms"]
    for r in rep.rows:
        assert r["speedup"] == pytest.approx(base / r["median_ms"], rel=1e-12)


def test_files_sizes_and_top1(report, pair):
    rep, work = report
    models, x, y = pair
    for r in rep.rows:
        assert Path(r["file"]).parent == work and r["size_bytes"] == Path(r["file"]).stat().st_size
    assert rep.row("slim", "ort-int8", 1)["file"].endswith("slim-dynamic.int8.onnx")
    assert rep.row("slim", "ort-fp32", 1)["file"] == rep.row("slim", "openvino-f32", 1)["file"]
    want = 100.0 * float((models["slim"](x).argmax(1) == y).float().mean())  # torch logits = ORT fp32 to 1e-4
    assert rep.row("slim", "ort-fp32", 1)["top1"] == pytest.approx(want)
    assert rep.row("dense", "ort-fp32", 1)["size_bytes"] > rep.row("slim", "ort-fp32", 1)["size_bytes"]


def test_markdown_json_png_round_trip(report, tmp_path):
    rep, _ = report
    md = rep.to_markdown()
    for t in TARGET_NAMES:
        assert f"| {TARGETS[t].label} |" in md
    assert "best slim deployable = " in md and len(rep.best_lines()) == 1
    best = rep.best("slim", 1)
    assert best["speedup"] == max(r["speedup"] for r in rep.rows if r["model"] == "slim"
                                  and r["top1"] >= rep.row("slim", "ort-fp32", 1)["top1"] - 1.0)
    rep.save(tmp_path)
    d = json.loads((tmp_path / "matrix.json").read_text())
    assert d["format"] == "p3b-deploy-matrix" and d["config"]["targets"] == TARGET_NAMES
    assert MatrixReport.from_dict(d).to_markdown() == (tmp_path / "matrix.md").read_text()
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.json", "matrix.md", "matrix.png"]


def test_unknown_target_is_one_line():
    with pytest.raises(TargetError) as e:
        targets_of(["ort-fp32", "tflite"])
    msg = str(e.value)
    assert "\n" not in msg and "'tflite'" in msg and all(n in msg for n in TARGETS)
    assert [t.name for t in targets_of("ort-int8, executorch")] == ["ort-int8", "executorch"]


@pytest.fixture
def absent_backend():
    """A real backend that says it cannot run here, under a target of its own."""
    register_backend("absent", lambda: Backend("absent", "onnx", lambda precision: "no absent device here",
                                               lambda *a: None))
    TARGETS["absent-fp32"] = Target("absent-fp32", "ort", "fp32", "absent", "fp32", "Absent fp32")
    yield
    del BACKENDS["absent"], TARGETS["absent-fp32"]


def test_unavailable_backend_and_failed_export_are_skipped_rows(pair, tmp_path, absent_backend):
    models, x, y = pair
    extra = ["executorch", "executorch-int8"] if NO_EXECUTORCH else []
    rep = deployment_matrix({"slim": models["slim"]}, ["absent-fp32", *extra, "ort-int8-static"], [2],
                            val=(x[:8], None), work_dir=tmp_path, threads=1, min_seconds=0.0, warmup_seconds=0.0,
                            min_iters=2, export_options={"threads": 1})
    rows = {r["target"]: r for r in rep.rows}
    assert list(rows) == ["ort-fp32", "absent-fp32", *extra, "ort-int8-static"]  # reference added first
    assert rows["ort-fp32"]["skipped"] is None and rows["ort-fp32"]["speedup"] == 1.0
    assert rows["ort-fp32"]["top1"] is None and rows["ort-fp32"]["agreement"] == 100.0  # no labels
    assert rows["absent-fp32"]["skipped"] == "no absent device here" and rows["absent-fp32"]["median_ms"] is None
    # static int8 without calibration images: the export's own one-line refusal
    assert rows["ort-int8-static"]["skipped"].startswith("export failed: --int8 static needs calibration images")
    if NO_EXECUTORCH:  # the export refuses: every cell of the target is a skipped row with its one-line reason
        for t in extra:
            ex = rows[t]["skipped"]
            assert ex.startswith("export failed:") and "\n" not in ex and rows[t]["size_bytes"] is None
    md = rep.to_markdown()
    assert "| slim | Absent fp32 | — | 2 | skipped: no absent device here |" in md
    assert rep.best_lines() == []  # one model: no non-baseline model to rank
    assert not deployment_files(models, ["ort-fp32"], tmp_path / "f", (3, 32, 32)).failed
