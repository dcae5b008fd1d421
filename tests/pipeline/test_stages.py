"""`run` end to end on the smallest model (timm's test_vit: depth 6, width 64, at 32 px), seconds
per run: the default path, a rerun that skips every stage, resume after an interrupted prune,
recovery fine-tuning with distillation, no dense baseline, and `force`."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from p3b_deploy.models.vit import load_model
from p3b_deploy.pipeline.config import RunConfig
from p3b_deploy.pipeline.run import run_pipeline
from p3b_deploy.plan import Plan
from p3b_deploy.surgery.store import load_slim

torch.set_num_threads(1)
STAGES = ["dense", "prune", "slim", "export", "evaluate", "bench"]


def tiny_cfg(out, **kw) -> RunConfig:
    """~4 optimizer steps of 32 images per fine-tune; one timed run per cell."""
    prune = {"epochs": 0.1, "batch_size": 32, "update_every": 1, "eval_every": 1.0, "ckpt_every": 1,
             "progress": False}
    prune.update(kw.pop("prune", {}))
    base = dict(out=str(out), model="test_vit", checkpoint=None, img_size=32, num_classes=10, prune=prune,
                export={"profile_runs": 1, "threads": 1},
                bench={"backends": ["ort-cpu"], "batches": [1, 2], "threads": 1, "warmup_seconds": 0,
                       "min_iters": 3, "min_seconds": 0})
    return RunConfig.from_dict(dict(base, **kw))


def _stage_log():
    said = []
    return said, lambda name, what: said.append((name, what.split(" ")[0]))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    said, hook = _stage_log()
    res = run_pipeline(tiny_cfg(out), on_stage=hook)
    return out, res, said


def test_default_path_numbers(default_run):
    out, res, said = default_run
    assert [n for n, w in said if w == "running"] == STAGES and res.skipped == []
    s = json.loads((out / "summary.json").read_text())
    assert s == res.summary
    plan = Plan.load(out / "run" / "plan.json")
    dense = load_model("test_vit", img_size=32, num_classes=10)
    assert s["params"]["dense"] == plan.params["dense"] == sum(p.numel() for p in dense.parameters())
    # residual dims whole (prune_residual False) and residual_io dense: nothing padded, counts exact
    assert s["params"]["slim"] == s["params"]["plan_kept"] == plan.params["kept"]
    md = (out / "summary.md").read_text()
    assert "Method **p3b**, prune ratio 0.5." in md
    assert ("Residual reads/writes: `dense`: built parameters equal the plan's (no branch reads or writes a "
            "subset of the residual dims: nothing is zero-padded).") in md
    assert abs(plan.params["kept"] / (0.5 * plan.params["dense"]) - 1) <= 5e-3
    assert s["macs"] == {"dense": plan.macs["dense"], "slim": plan.macs["kept"]}
    slim_model = load_slim(out / "slim")
    assert sum(p.numel() for p in slim_model.parameters()) == plan.params["kept"]
    acc = s["accuracy"]
    assert acc["val_images"] == 359 and acc["onnx_torch_top1_agreement"] == 100.0
    assert acc["slim_top1"] == acc["slim_onnx_top1"] == pytest.approx(acc["masked_top1"], abs=0.01)
    assert acc["note"] == "dense = the same fine-tuning without pruning"
    lat = {(r["model"], r["batch"]): r for r in s["latency"]}
    assert set(lat) == {("dense", 1), ("dense", 2), ("slim", 1), ("slim", 2)}
    assert lat[("slim", 1)]["macs"] == plan.macs["kept"] and lat[("dense", 1)]["macs"] == plan.macs["dense"]
    assert lat[("slim", 2)]["params"] == plan.params["kept"]
    assert s["surgery_max_abs_diff"] < 1e-4
    assert s["onnx"]["parity"]["failures"] == [] and s["onnx"]["parity"]["checker"] == "ok"
    for f in ("summary.md", "model.onnx", "dense.onnx", "run/plan.json", "dense_run/plan.json",
              "bench/report.json", "slim/config.json", "run_config.json"):
        assert (out / f).is_file(), f
    assert not (out / "slim_ft").exists()  # finetune_epochs 0: no recovery stage


def test_rerun_skips_every_stage(default_run):
    out, res, _ = default_run
    said, hook = _stage_log()
    again = run_pipeline(tiny_cfg(out), on_stage=hook)
    assert again.skipped == STAGES and [w for _, w in said] == ["done"] * len(STAGES)
    assert again.summary == res.summary


def test_resume_after_an_interrupted_prune(default_run, tmp_path, caplog, monkeypatch):
    """A prune killed after 2 of its 4 steps (checkpoint, no plan.json) is continued, not
    restarted, and gives the plan of the uninterrupted run."""
    from p3b_deploy.train.trainer import Trainer
    ref_out, _, _ = default_run
    out = tmp_path / "demo"
    step, armed = Trainer.train_step, []

    def killed_at_step_2(self):  # only in the prune stage (the dense stage runs first, untouched)
        if armed and self.step == 2:
            raise KeyboardInterrupt("killed")
        return step(self)
    monkeypatch.setattr(Trainer, "train_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_cfg(out), on_stage=lambda name, what: armed.append(1) if name == "prune" else None)
    monkeypatch.undo()
    assert (out / "run" / "checkpoint.pt").is_file() and not (out / "run" / "plan.json").exists()
    assert not (out / ".stages" / "prune.json").exists()
    with caplog.at_level(logging.INFO):
        res = run_pipeline(tiny_cfg(out))
    assert "resuming the interrupted prune" in caplog.text
    assert res.skipped == ["dense"]
    recs = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(l) for l in (ref_out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in recs] == [(r["event"], r["step"]) for r in ref_recs]
    want, got = Plan.load(ref_out / "run" / "plan.json"), Plan.load(out / "run" / "plan.json")
    assert got.layers == want.layers and got.params == want.params


def test_distillation_without_dense_baseline(tmp_path):
    out = tmp_path / "demo"
    said, hook = _stage_log()
    res = run_pipeline(tiny_cfg(out, dense_baseline=False, finetune_epochs=0.1, distill=True), on_stage=hook)
    assert [n for n, w in said if w == "running"] == ["prune", "slim", "finetune", "export", "evaluate", "bench"]
    assert not (out / "dense_run").exists()
    ft = json.loads((out / ".stages" / "finetune.json").read_text())
    assert ft["slim_dir"] == str(out / "slim_ft") and ft["top1"] is not None
    tc = json.loads((out / "slim_ft" / "train_config.json").read_text())
    assert tc["teacher"] is True and tc["config"]["epochs"] == 0.1 and tc["config"]["kd_alpha"] > 0
    plan = Plan.load(out / "run" / "plan.json")
    tuned = load_slim(out / "slim_ft")
    assert sum(p.numel() for p in tuned.parameters()) == plan.params["kept"]
    s = res.summary
    assert s["files"]["slim_dir"] == "slim_ft"
    assert s["accuracy"]["slim_top1"] == pytest.approx(ft["top1"], abs=0.01)  # evaluate reads the tuned model
    assert s["accuracy"]["note"].startswith("dense = the prune run's fine-tuned weights")


@pytest.mark.slow
def test_force_reruns_every_stage(default_run, tmp_path):
    ref_out, ref, _ = default_run
    out = tmp_path / "demo"
    shutil.copytree(ref_out, out)
    said, hook = _stage_log()
    res = run_pipeline(tiny_cfg(out), force=True, on_stage=hook)
    assert res.skipped == [] and [n for n, w in said if w == "running"] == STAGES
    # seeded: the same plan and counts again
    assert Plan.load(out / "run" / "plan.json").layers == Plan.load(ref_out / "run" / "plan.json").layers
    assert res.summary["params"] == ref.summary["params"]
