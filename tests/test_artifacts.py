"""One set of detection rules for every stage, on real artifacts from `prune` and `slim`."""
from __future__ import annotations

import json

import onnx
import pytest

from p3b_deploy.artifacts import ArtifactError, OnnxFile, PlanFile, RunDir, SlimDir, TimmName, detect, resolve
from p3b_deploy.cli import main as cli

PRUNE = ["prune", "--model", "vit_pico_patch4_32", "--img-size", "16", "--data", "digits", "--epochs", "0.1",
         "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real run dir (prune writes config.json too) and the slim dir made from it."""
    d = tmp_path_factory.mktemp("art")
    assert cli(PRUNE + ["--out", str(d / "run")]) == 0
    assert cli(["slim", str(d / "run"), "--out", str(d / "slim")]) == 0
    return d


def test_detection_rules_on_real_artifacts(real, tmp_path):
    assert (real / "run" / "config.json").is_file()  # what used to make export take it for a slim dir
    assert isinstance(detect(real / "run"), RunDir)
    assert isinstance(detect(real / "slim"), SlimDir)
    assert isinstance(detect(real / "run" / "plan.json"), PlanFile)
    assert isinstance(detect("deit_tiny_patch16_224"), TimmName)
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert isinstance(detect(tmp_path / "m.onnx"), OnnxFile)
    assert isinstance(detect(tmp_path), OnnxFile)  # a folder with exactly one .onnx
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="unfinished prune run"):
        detect(unfinished)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "hf"}))
    with pytest.raises(ArtifactError, match="neither a prune run's nor a p3b slim config"):
        detect(other)
    with pytest.raises(ArtifactError, match="not found"):
        detect(tmp_path / "nothing" / "here")
    with pytest.raises(ArtifactError, match="is a slim dir .*expected a run dir"):
        resolve(real / "slim", ("run",), "RUN_DIR")


def test_run_dir_loads_its_dense_model_and_plan(real):
    run = RunDir(real / "run")
    plan = run.plan()
    dense = run.load_dense()
    assert sum(p.numel() for p in dense.parameters()) == plan.params["dense"]
    assert run.run_config()["config"]["epochs"] == 0.1
    slim = SlimDir(real / "slim").load()
    assert sum(p.numel() for p in slim.parameters()) == plan.params["kept"]


def test_export_bench_inspect_accept_a_real_run_dir(real, capsys):
    """`export RUN_DIR` failed with 'config.json is not a p3b slim config' before artifacts.py."""
    out = real / "from_run.onnx"
    assert cli(["export", str(real / "run"), "--out", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    plan = RunDir(real / "run").plan()
    assert int(meta["params"]) == plan.params["kept"] and int(meta["params_dense"]) == plan.params["dense"]
    assert cli(["inspect", str(real / "run")]) == 0
    assert f"kept {plan.params['kept']:,}" in capsys.readouterr().out
    assert cli(["bench", str(real / "run"), str(real / "slim"), "--report", str(real / "rep"),
                "--min-iters", "2", "--min-seconds", "0", "--warmup-seconds", "0", "--no-plot"]) == 0
    rep = json.loads((real / "rep" / "report.json").read_text())
    assert {m["kind"] for m in rep["models"]} == {"run", "slim"}
    assert {m["params"] for m in rep["models"]} == {plan.params["kept"]}  # run dir -> slimmed -> same model


def test_run_and_export_write_the_same_metadata_keys(real):
    """`run`'s model.onnx and `export`'s come from one metadata_for(): same keys."""
    from p3b_deploy.export.metadata import KEYS
    from p3b_deploy.pipeline.config import RunConfig
    from p3b_deploy.pipeline.run import _stage_export
    cfg = RunConfig(out=str(real), model="vit_pico_patch4_32", dense_baseline=False, data="digits",
                    export={"verify_batches": (1,), "profile_runs": 1, "profile_batch": 1})
    _stage_export(cfg, real, real / "slim")
    assert cli(["export", str(real / "slim"), "--out", str(real / "e.onnx")]) == 0
    keys = lambda f: {p.key for p in onnx.load(str(f)).metadata_props}  # noqa: E731
    assert keys(real / "model.onnx") == keys(real / "e.onnx")
    assert set(KEYS) | {"residual_io", "precision", "opset", "exporter"} == keys(real / "e.onnx")
    assert set(KEYS) | {"precision", "opset", "exporter"} == keys(real / "dense.onnx")
