"""`run` with `targets:`: refused up front when a name is unknown; the deploy stage on the smallest
model writes OUT/deploy/matrix.* and puts the compact matrix and the best-slim line in the summary."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from p3b_deploy.cli import build_parser
from p3b_deploy.cli.run import resolve
from p3b_deploy.pipeline.summary import deploy_markdown


def _args(*argv):
    return build_parser().parse_args(["run", *argv])


def test_targets_from_flag_file_and_set(tmp_path):
    assert resolve(_args()).targets == []
    assert resolve(_args("--targets", "ort-fp32, ort-int8")).targets == ["ort-fp32", "ort-int8"]
    f = tmp_path / "c.yaml"
    f.write_text("targets: [ort-fp32, openvino-f32, executorch]\n")
    assert resolve(_args("--config", str(f))).targets == ["ort-fp32", "openvino-f32", "executorch"]
    assert resolve(_args("--config", str(f), "--set", "targets=[ort-int8]")).targets == ["ort-int8"]


def test_unknown_target_refused_before_any_work(capsys, tmp_path):
    from p3b_deploy.cli import main
    rc = main(["run", "--out", str(tmp_path / "o"), "--targets", "ort-fp32,tflite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unknown deployment target 'tflite'" in err[0] and "executorch" in err[0]
    assert not (tmp_path / "o").exists()


def test_deploy_markdown_rows_and_best_line():
    d = {"rows": [{"model": "dense", "target": "ort-fp32", "batch": 1, "median_ms": 1.0, "speedup": 1.0,
                   "top1": 90.0, "size_bytes": 2_000_000, "skipped": None},
                  {"model": "slim", "target": "executorch", "batch": 1, "median_ms": None, "speedup": None,
                   "top1": None, "size_bytes": None, "skipped": "executorch is not installed"}],
         "best": ["- slim, batch 1: best slim deployable = ORT fp32, 1.50x faster than dense ORT fp32"]}
    text = "\n".join(deploy_markdown(d))
    assert "| dense | ort-fp32 | 1 | 1.000 | 1.00x | 90.00 | 2.00 |" in text
    assert "| slim | executorch | 1 | skipped: executorch is not installed ||||" in text
    assert text.endswith("1.50x faster than dense ORT fp32")


@pytest.mark.slow
def test_run_with_targets(tmp_path):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'p3b-deploy[openvino]')")
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_stages import tiny_cfg
    from p3b_deploy.pipeline.run import run_pipeline
    out = tmp_path / "demo"
    said = []
    extra = ["executorch"] if importlib.util.find_spec("executorch") is None else []  # then: skipped rows
    res = run_pipeline(tiny_cfg(out, targets=["ort-int8", "openvino-f32", *extra]),
                       on_stage=lambda name, what: said.append((name, what.split(" ")[0])))
    assert [n for n, w in said if w == "running"][-2:] == ["bench", "deploy"]
    d = res.summary["deploy"]
    rows = {(r["model"], r["target"], r["batch"]): r for r in d["rows"]}
    targets = ["ort-fp32", "ort-int8", "openvino-f32", *extra]  # the reference comes first
    assert list(rows) == [(m, t, b) for b in (1, 2) for m in ("dense", "slim") for t in targets]
    assert rows[("dense", "ort-fp32", 1)]["speedup"] == 1.0
    assert all(r["skipped"] for k, r in rows.items() if k[1] == "executorch")
    assert not any(r["skipped"] for k, r in rows.items() if k[1] != "executorch")
    full = json.loads((out / "deploy" / "matrix.json").read_text())
    assert full["config"]["batches"] == [1, 2] and full["config"]["val_images"] == 359 and full["config"]["labels"]
    # the accuracy columns are the evaluate stage's val top-1 on the same split
    slim_ort = next(r for r in full["rows"] if (r["model"], r["target"]) == ("slim", "ort-fp32"))
    assert slim_ort["top1"] == pytest.approx(res.summary["accuracy"]["slim_onnx_top1"], abs=0.01)
    assert slim_ort["size_bytes"] == (out / "deploy" / "slim-dynamic.onnx").stat().st_size
    assert d["best"] and d["best"][0].startswith("- slim, batch 1: best slim deployable = ")
    for f in ("matrix.json", "matrix.md", "matrix.png"):
        assert (out / "deploy" / f).is_file(), f
    assert "## Deployment matrix" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["deploy"] == d
