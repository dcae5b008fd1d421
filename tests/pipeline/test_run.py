"""`run` pipeline: config resolution, example configs, and the offline default end to end (slow)."""
import json
from pathlib import Path

import pytest

from p3b_deploy.cli import build_parser
from p3b_deploy.cli.run import resolve
from p3b_deploy.errors import P3BError
from p3b_deploy.pruning import P3BConfig
from p3b_deploy.pipeline import RunConfig, deep_update

ROOT = Path(__file__).resolve().parents[2]


def _args(*argv):
    return build_parser().parse_args(["run", *argv])


def test_defaults_are_the_offline_demo():
    cfg = resolve(_args())
    assert (cfg.model, cfg.checkpoint, cfg.data) == ("vit_nano_patch4_16", "demo", "digits")
    assert cfg.prune["prune_ratio"] == 0.5 and cfg.prune["probe"] == "light"
    P3BConfig.from_dict(cfg.prune)  # valid as a prune config


def test_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out: a\nprune: {prune_ratio: 0.3, epochs: 4}\nbench: {batches: [1]}\n")
    cfg = resolve(_args("--config", str(f), "--prune-ratio", "0.6", "--set", "bench.batches=[2,4]",
                        "--set", "export.int8=true"))
    assert cfg.out == "a" and cfg.prune["prune_ratio"] == 0.6 and cfg.prune["epochs"] == 4
    assert cfg.prune["probe"] == "light"  # untouched defaults survive a partial section
    assert cfg.bench["batches"] == [2, 4] and cfg.export == {"int8": True}
    assert resolve(_args("--no-prune-residual")).prune["prune_residual"] is False


def test_unknown_keys_refused(tmp_path):
    with pytest.raises(P3BError, match="unknown run config key"):
        RunConfig.from_dict({"prunee": {}})
    with pytest.raises(P3BError, match="KEY=VALUE"):
        resolve(_args("--set", "nonsense"))
    with pytest.raises(P3BError, match="not a section"):
        deep_update({"out": "x"}, "out.y", 1)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_resolve(path):
    cfg = resolve(_args("--config", str(path)))
    P3BConfig.from_dict(cfg.prune)
    assert cfg.out.startswith("runs/")


def test_demo_config_is_the_default():
    """examples/configs/demo_digits.yaml says it is `p3b-deploy run` with no arguments: check it."""
    from dataclasses import asdict
    demo = resolve(_args("--config", str(ROOT / "examples/configs/demo_digits.yaml")))
    default = resolve(_args())
    assert P3BConfig.from_dict(demo.prune) == P3BConfig.from_dict(default.prune)
    assert {**asdict(demo), "prune": None} == {**asdict(default), "prune": None}
    assert default.prune["prune_residual"] is False


def test_bad_ratio_is_one_line(capsys, tmp_path):
    from p3b_deploy.cli import main
    rc = main(["run", "--out", str(tmp_path / "o"), "--prune-ratio", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "prune ratio" in err[0]
    assert not (tmp_path / "o" / "run").exists()


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path):
    """The README's first command, into a temp folder, its output piped as in a CI log; then a rerun
    skips every stage."""
    import subprocess
    import sys
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "p3b_deploy", "run", "--out", str(out)], capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (p.stdout + p.stderr).replace("\r", "\n")  # a bar refresh counts as a line, as log viewers show it
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) <= 60, f"{len(lines)} log lines off a terminal:\n" + "\n".join(lines[:80])
    s = json.loads((out / "summary.json").read_text())
    assert s["params"]["plan_kept"] <= 0.51 * s["params"]["dense"]  # the 50% budget, within 1%
    assert s["params"]["slim"] == s["params"]["plan_kept"]  # residual dims whole: nothing padded
    assert s["macs"]["slim"] < s["macs"]["dense"]
    assert s["accuracy"]["slim_top1"] > 80.0  # digits, 10 classes: far above chance
    assert s["accuracy"]["onnx_torch_top1_agreement"] >= 99.0
    assert s["surgery_max_abs_diff"] is not None and s["surgery_max_abs_diff"] < 1e-3
    b32 = {r["model"]: r for r in s["latency"] if r["backend"] == "ort-cpu" and r["batch"] == 32}
    assert b32["slim"]["median_ms"] < b32["dense"]["median_ms"]  # smaller and faster
    for f in ("summary.md", "model.onnx", "dense.onnx", "run/plan.json", "run/keep_ratio.png",
              "bench/report.json", "bench/latency.png", "slim/config.json"):
        assert (out / f).is_file(), f
    assert "![keep ratios](run/keep_ratio.png)" in (out / "summary.md").read_text()
    # resumable: a second run reuses every stage
    from p3b_deploy.pipeline import RunConfig, run_pipeline
    res = run_pipeline(RunConfig(out=str(out)))
    assert set(res.skipped) >= {"prune", "slim", "export", "evaluate", "bench"}
