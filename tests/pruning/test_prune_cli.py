"""`prune` CLI: one-line errors, config file + overrides, and a tiny end-to-end run."""
from __future__ import annotations

import json

import pytest
import torch

from p3b_deploy.cli import build_parser
from p3b_deploy.cli import main as cli
from p3b_deploy.cli.prune import resolve
from p3b_deploy.plan import Plan

torch.set_num_threads(1)
BASE = ["prune", "--model", "vit_pico_patch4_32", "--img-size", "16", "--data", "digits", "--epochs", "0.05"]


@pytest.mark.parametrize("extra, msg", [
    (["--prune-ratio", "1.5", "--out", "X"], "prune ratio must be in (0, 1)"),
    (["--prune-ratio", "0", "--out", "X"], "prune ratio must be in (0, 1)"),
    (["--prune-ratio", "0.5"], "needs --out"),
    (["--prune-ratio", "0.5", "--out", "X", "--method", "nope"], "unknown pruning method 'nope'"),
    (["--prune-ratio", "0.5", "--out", "X", "--keep-ratio", "0.5,0.5"], "fixed keep ratio has 2 values, expected 24"),
])
def test_bad_values_are_one_line_errors(extra, msg, capsys, tmp_path):
    argv = [a.replace("X", str(tmp_path / "run")) for a in BASE + extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "run" / "plan.json").exists()


@pytest.mark.parametrize("argv, msg", [
    (["prune", "--model", "no_such_vit", "--data", "digits", "--prune-ratio", "0.5", "--out", "X"], "unknown model"),
    (["prune", "--model", "resnet18", "--data", "digits", "--prune-ratio", "0.5", "--out", "X"], "not a timm VisionTransformer"),
    (["prune", "--model", "vit_pico_patch4_32", "--data", "/no/such/dir", "--prune-ratio", "0.5", "--out", "X"], "data not found"),
    (["prune", "--resume", "/no/such/run/"], "cannot resume: /no/such/run/config.json is missing"),
    (["prune", "--prune-ratio", "0.5", "--out", "X"], "needs --model"),
])
def test_user_errors(argv, msg, capsys, tmp_path):
    argv = [a.replace("X", str(tmp_path / "run")) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_config_file_then_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prune_ratio: 0.3\nlr: 0.002\nprobe: reference\nstart_frac: 0.1\n")
    args = build_parser().parse_args(BASE + ["--config", str(f), "--prune-ratio", "0.6", "--out", "o"])
    cfg, mkw, dkw = resolve(args)
    assert (cfg.prune_ratio, cfg.lr, cfg.probe, cfg.start_frac, cfg.epochs) == (0.6, 0.002, "reference", 0.1, 0.05)
    assert cfg.schedule() == pytest.approx((0.005, 0.025, 0.0375))
    assert mkw["img_size"] == 16 and dkw["spec"] == "digits"
    f.write_text("prune_ratio: 0.3\nlearning_rate: 1\n")
    with pytest.raises(Exception, match="unknown config key"):
        resolve(build_parser().parse_args(BASE + ["--config", str(f), "--out", "o"]))
    args = build_parser().parse_args(BASE + ["--prune-ratio", "0.5", "--keep-ratio", "0.4", "--out", "o"])
    cfg, _, _ = resolve(args)
    assert cfg.method == "uniform" and cfg.fixed_keep_ratio == 0.4
    assert cfg.prune_residual is False  # the deployment default: embed dims kept whole
    f.write_text("prune_residual: true\n")
    cfg, _, _ = resolve(build_parser().parse_args(BASE + ["--config", str(f), "--out", "o"]))
    assert cfg.prune_residual is True
    cfg, _, _ = resolve(build_parser().parse_args(BASE + ["--config", str(f), "--no-prune-residual", "--out", "o"]))
    assert cfg.prune_residual is False


def test_cli_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = BASE + ["--prune-ratio", "0.4", "--prune-start", "0.01", "--prune-sparse", "0.02", "--prune-final",
                   "0.03", "--update-every", "1", "--batch-size", "16", "--probe", "light", "--no-progress",
                   "--out", str(out)]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "params" in text and "val top-1" in text
    plan = Plan.load(out / "plan.json")
    assert abs(plan.params["kept"] - 0.6 * plan.params["dense"]) <= 0.01 * 0.6 * plan.params["dense"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["prune_ratio"] == 0.4 and saved["config"]["sparse_epoch"] == 0.02
    assert saved["model_kwargs"]["img_size"] == 16
    assert cli(argv) == 2  # the run dir exists: no silent overwrite
    assert "already holds a run" in capsys.readouterr().err
