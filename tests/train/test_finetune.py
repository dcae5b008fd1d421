"""`finetune` stage: recovery fine-tuning of a slim model, with and without distillation."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from p3b_deploy.cli import main as cli
from p3b_deploy.data import build_loaders
from p3b_deploy.pruning import P3BConfig
from p3b_deploy.train.trainer import Trainer
from p3b_deploy.surgery.store import load_slim, save_slim
from p3b_deploy.surgery.core import slim_run_dir
from p3b_deploy.models.vit import describe, load_model

from plans import random_plan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A hand-made prune run dir (dense weights + random plan) and its slim dir."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    dense = load_model("vit_pico_patch4_32", img_size=16)
    spec = describe(dense)
    from p3b_deploy.models.vit import nonblock_params
    plan = random_plan(spec, seed=3).with_counts(spec, nonblock_params(dense))
    plan.meta = {"model_kwargs": {"img_size": 16, "patch_size": 4, "num_classes": 10}}
    run = root / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(run / "model.safetensors"))
    plan.save(run / "plan.json")
    slim_dir = root / "slim"
    save_slim(slim_run_dir(run), slim_dir)
    return root, run, slim_dir


def test_finetune_cli_with_teacher(dirs, capsys):
    root, run, slim_dir = dirs
    out = root / "ft"
    rc = cli(["finetune", str(slim_dir), "--data", "digits", "--epochs", "0.05", "--out", str(out),
              "--teacher", str(run), "--batch-size", "16", "--lr", "1e-3", "--no-progress", "--eval-every", "1"])
    assert rc == 0
    assert "val top-1" in capsys.readouterr().out
    for f in ("model.safetensors", "config.json", "metrics.jsonl", "checkpoint.pt", "train_config.json"):
        assert (out / f).is_file(), f
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs] == ["eval"] and recs[0]["step"] == 4  # 89.875 steps/epoch * 0.05
    assert json.loads((out / "train_config.json").read_text())["teacher"] is True
    before, after = load_file(str(slim_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    again = load_slim(out)  # loads as a slim model again
    sd = again.state_dict()
    assert all(torch.equal(sd[k], after[k]) for k in after)


def test_kd_loss_mixes_kl_and_ce(dirs):
    _, run, slim_dir = dirs
    model = load_slim(slim_dir)
    data = build_loaders("digits", model, batch_size=16, seed=0)
    cfg = P3BConfig(method="dense", epochs=0.05, batch_size=16, kd_alpha=0.25, kd_temperature=2.0,
                    label_smoothing=0.0, progress=False)
    tr = Trainer(model, data, cfg, dirs[0] / "kd", teacher=model)
    x, y = next(iter(data.val))
    with torch.no_grad():
        logits = model(x)
        got = tr.task_loss(logits, x, y)
    # teacher == student: KL is 0, so the loss is (1 - alpha) * CE
    assert got.item() == pytest.approx(0.75 * F.cross_entropy(logits, y).item(), rel=1e-5)
    t_logits = torch.zeros_like(logits)
    tr.teacher = lambda _x: t_logits
    with torch.no_grad():
        got = tr.task_loss(logits, x, y)
    kl = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(t_logits / 2, -1), reduction="batchmean") * 4
    assert got.item() == pytest.approx(0.25 * kl.item() + 0.75 * F.cross_entropy(logits, y).item(), rel=1e-5)


def test_finetune_cli_errors(dirs, capsys):
    root, run, slim_dir = dirs
    assert cli(["finetune", str(root / "nope"), "--data", "digits", "--out", str(root / "x")]) != 0
    assert cli(["finetune", str(slim_dir), "--data", "digits", "--out", str(root / "x"),
                "--teacher", str(slim_dir)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert "expected a run dir" in err[1]
