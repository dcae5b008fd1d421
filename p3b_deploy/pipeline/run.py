"""`run`: the whole flow in one call — prune -> slim -> (recovery fine-tune) -> export -> bench.

One output folder, one sub-folder or file per stage:

    OUT/dense_run/  the dense baseline: the same fine-tuning without pruning (accuracy ceiling)
    OUT/run/        prune stage (dense weights + plan.json + metrics, keep_ratio.png)
    OUT/slim/       surgery (safetensors + config.json), verified against the masked model
    OUT/slim_ft/    optional recovery fine-tune of the slim model
    OUT/dense.onnx  the dense baseline model, for the latency ratios
    OUT/model.onnx  the slim model, verified against torch
    OUT/bench/      latency report (json/md/csv + latency.png)
    OUT/deploy/     with `targets`: dense + slim files per target and matrix.{json,md,png}
    OUT/summary.{json,md}

Every finished stage leaves `OUT/.stages/<stage>.json` (its result record); a rerun on the same
folder skips those stages unless `force=True`. A failing stage raises `StageError` naming it;
earlier outputs stay in place.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import P3BError
from ..io import read_json, write_json, write_text
from .config import RunConfig
from .summary import summarise, summary_markdown

_log = logging.getLogger(__name__)

STAGES = ("dense", "latency", "prune", "slim", "finetune", "export", "evaluate", "bench", "deploy", "serve")


class StageError(P3BError):
    """A pipeline stage failed; the message names the stage."""


@dataclass
class RunResult:
    out: Path  # the output folder
    summary: dict[str, Any]  # what summary.json holds
    skipped: list[str]  # stages reused from an earlier run


class _Stages:
    """Runs stages once; remembers each stage's record in OUT/.stages/<name>.json."""

    def __init__(self, out: Path, force: bool, on_stage: Callable[[str, str], None] | None) -> None:
        self.out, self.force, self.on_stage = out, force, on_stage
        self.dir = out / ".stages"
        self.skipped: list[str] = []

    def __call__(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.dir / f"{name}.json"
        if _rank() != 0:
            return fn() if not marker.is_file() or self.force else read_json(marker, f"{name} stage record")
        if marker.is_file() and not self.force:
            self.skipped.append(name)
            self._say(name, "done earlier, skipped")
            return read_json(marker, f"{name} stage record")
        self._say(name, "running")
        t0 = time.time()
        try:
            rec = fn()
        except P3BError as e:
            raise StageError(f"stage '{name}' failed: {e}") from None
        except Exception as e:  # noqa: BLE001 — any failure must name the stage
            raise StageError(f"stage '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from e
        rec["seconds"] = round(time.time() - t0, 1)
        write_json(marker, rec)
        self._say(name, f"done in {rec['seconds']:.0f} s")
        return rec

    def _say(self, name: str, what: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, what)


def run_pipeline(cfg: RunConfig, force: bool = False,
                 on_stage: Callable[[str, str], None] | None = None) -> RunResult:
    """Run (or resume) the pipeline into cfg.out and return its summary."""
    from ..pruning import P3BConfig
    out = Path(cfg.out)
    pcfg = P3BConfig.from_dict(dict(cfg.prune))  # validate before any work
    if cfg.targets:
        from ..targets import targets_of
        targets_of(cfg.targets)
    if cfg.target is not None:  # refused in one line before any training when its runtime is missing
        from .latency import run_target
        run_target(cfg).check()
    if force and (out / "run").exists():
        _clear(out)
    write_json(out / "run_config.json", cfg.to_dict())
    stages = _Stages(out, force, on_stage)
    rec: dict[str, dict[str, Any]] = {}
    if cfg.dense_baseline:
        rec["dense"] = stages("dense", lambda: _stage_prune(cfg, pcfg.replace(method="dense"), out, "dense_run"))
    if cfg.latency_target is not None:
        from .latency import stage_latency_table, with_latency_budget
        rec["latency"] = stages("latency", lambda: stage_latency_table(cfg, out))
        pcfg = with_latency_budget(pcfg, rec["latency"], cfg.latency_target)
    rec["prune"] = stages("prune", lambda: _stage_prune(cfg, pcfg, out))
    if _rank() != 0:  # under torchrun every rank trains; rank 0 alone does the rest
        return RunResult(out=out, summary={}, skipped=stages.skipped)
    rec["slim"] = stages("slim", lambda: _stage_slim(cfg, out))
    if cfg.finetune_epochs > 0:
        rec["finetune"] = stages("finetune", lambda: _stage_finetune(cfg, pcfg, out))
    rec["export"] = stages("export", lambda: _stage_export(cfg, out, _final_slim_dir(cfg, out)))
    rec["evaluate"] = stages("evaluate", lambda: _stage_evaluate(cfg, pcfg, out))
    rec["bench"] = stages("bench", lambda: _stage_bench(cfg, out))
    if cfg.targets or cfg.target:  # opt-in: the deployment matrix (OUT/deploy/)
        rec["deploy"] = stages("deploy", lambda: _stage_deploy(cfg, out))
    if cfg.serve:  # opt-in: needs the runtime of `bash scripts/setup.sh --serve`
        from ..serve import serve_check
        rec["serve"] = stages("serve", lambda: serve_check(
            {"dense": out / "dense.onnx", "slim": out / "model.onnx"}, out / "serve").to_dict())
    summary = summarise(cfg, out, rec, _final_slim_dir(cfg, out).name)
    if "latency" in rec:
        from .latency import latency_summary
        summary["latency_budget"] = latency_summary(rec["latency"], {"latency": rec["prune"].get("plan_meta_latency")},
                                                    rec["bench"]["results"], (rec.get("deploy") or {}).get("rows"))
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return RunResult(out=out, summary=summary, skipped=stages.skipped)


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))


def _clear(out: Path) -> None:
    import shutil
    for name in ("dense_run", "run", "slim", "slim_ft", "bench", "deploy", "serve", ".stages", "latency_pack"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    (out / "latency_table.json").unlink(missing_ok=True)
    for name in ("dense.onnx", "model.onnx", "summary.json", "summary.md"):
        for f in out.glob(name.replace(".onnx", "*.onnx")) if name.endswith(".onnx") else [out / name]:
            f.unlink(missing_ok=True)
        (out / name.replace(".onnx", ".export.json")).unlink(missing_ok=True)


def _final_slim_dir(cfg: RunConfig, out: Path) -> Path:
    return out / ("slim_ft" if cfg.finetune_epochs > 0 else "slim")


# ------------------------------------------------------------------------------------- stages
def _stage_prune(cfg: RunConfig, pcfg, out: Path, name: str = "run") -> dict[str, Any]:
    import shutil
    from ..data import build_loaders
    from ..pruning import prune
    from ..models.vit import load_model
    run_dir = out / name
    mkw = cfg.model_kwargs()
    if run_dir.exists() and (run_dir / "checkpoint.pt").exists() and not (run_dir / "plan.json").exists():
        pcfg = pcfg.replace(resume=str(run_dir))  # an interrupted prune: continue it
        _log.info("resuming the interrupted prune in %s", run_dir)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    import torch
    torch.manual_seed(pcfg.seed)  # a random-init model starts the same whichever stages ran before
    model = load_model(**mkw)
    data = build_loaders(cfg.data, model=model, batch_size=pcfg.batch_size, root=cfg.data_root,
                         download=cfg.download, seed=pcfg.seed)
    res = prune(model, data, pcfg, run_dir, model_kwargs=mkw)
    evals = [r for r in res.metrics if r.get("event") in ("eval", "final_hard_masks") and "top1" in r]
    return {"run_dir": str(run_dir), "params": res.plan.params, "macs": res.plan.macs,
            "keep_ratio": res.plan.keep_ratio, "masked_top1": evals[-1]["top1"] if evals else None,
            "method": pcfg.method, "prune_ratio": pcfg.prune_ratio, "budget": pcfg.budget,
            "plan_meta_latency": res.plan.meta.get("latency")}


def _stage_slim(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from ..surgery.store import save_slim
    from ..surgery.core import slim_run_dir
    model = slim_run_dir(out / "run", round_to=cfg.round_to, residual_io=cfg.residual_io)
    save_slim(model, out / "slim")
    sc = model.p3b_slim_config
    return {"slim_dir": str(out / "slim"), "params": sum(p.numel() for p in model.parameters()),
            "macs": dict(sc.macs), "max_abs_diff_vs_masked": getattr(sc, "verified_max_abs_diff", None)}


def _stage_finetune(cfg: RunConfig, pcfg, out: Path) -> dict[str, Any]:
    from ..data import build_loaders
    from ..train import TrainConfig, finetune
    from ..artifacts import slim_dir
    from ..surgery.store import save_slim
    model = slim_dir(out / "slim").load()
    teacher = None
    if cfg.distill:
        teacher = _dense_finetuned(cfg, out)
    data = build_loaders(cfg.data, model=model, batch_size=pcfg.batch_size, root=cfg.data_root,
                         download=cfg.download, seed=pcfg.seed)
    train_fields = {k: v for k, v in pcfg.to_dict().items() if k in TrainConfig.__dataclass_fields__}
    ft_cfg = TrainConfig.from_dict(dict(train_fields, epochs=cfg.finetune_epochs, warmup_epochs=0.0, resume=None))
    res = finetune(model, data, ft_cfg, out / "slim_ft", teacher=teacher, save=save_slim)
    evals = [r for r in res.metrics if r.get("event") == "eval" and "top1" in r]
    return {"slim_dir": str(out / "slim_ft"), "top1": evals[-1]["top1"] if evals else None}


def _dense_finetuned(cfg: RunConfig, out: Path):
    """The dense baseline: the dense fine-tune (dense_run/) or, without it, the prune run's
    fine-tuned weights with no masks."""
    from ..artifacts import run_dir
    return run_dir(out / ("dense_run" if cfg.dense_baseline else "run")).load_dense()


def _stage_export(cfg: RunConfig, out: Path, slim_dir: Path) -> dict[str, Any]:
    from ..artifacts import slim_dir as as_slim_dir
    from ..data import build_loaders
    from ..export import export_onnx, metadata_for
    slim_model = as_slim_dir(slim_dir).load()
    dense = _dense_finetuned(cfg, out)
    size = _input_size(slim_model)
    names = list(build_loaders(cfg.data, model=slim_model, batch_size=64, root=cfg.data_root,
                               download=cfg.download, augment=False).class_names)
    names = names if len(names) == int(slim_model.num_classes) else None
    verify: dict[str, Any] = {}
    if cfg.export.get("fp16") or cfg.export.get("int8"):  # every variant gated on val top-1 (static: calibrated)
        from ..export.exporter import real_images
        n_cal = int(cfg.export.get("calibration_images", 256)) if cfg.export.get("int8") == "static" else 0
        x, y, _, calib = real_images(cfg.data, slim_model, 256, root=cfg.data_root, download=cfg.download,
                                     calibration=n_cal)
        verify = dict(verify_data=x, verify_labels=y if names is not None else None, calibration_data=calib)
    slim_res = export_onnx(slim_model, out / "model.onnx", input_size=size,
                           metadata=metadata_for(slim_model, cfg.model, class_names=names), **cfg.export, **verify)
    dense_res = export_onnx(dense, out / "dense.onnx", input_size=size,
                            metadata=metadata_for(dense, cfg.model, class_names=names), opset=cfg.export.get("opset"))
    return {"model_onnx": str(out / "model.onnx"), "dense_onnx": str(out / "dense.onnx"),
            "parity": slim_res.to_dict().get("parity"), "dense_parity": dense_res.to_dict().get("parity"),
            "size_bytes": (out / "model.onnx").stat().st_size, "dense_size_bytes": (out / "dense.onnx").stat().st_size,
            "variants": slim_res.to_dict().get("variants")}


def _input_size(model) -> tuple[int, int, int]:
    pe = model.patch_embed
    return (pe.proj.in_channels, *[int(v) for v in pe.img_size])


def _stage_evaluate(cfg: RunConfig, pcfg, out: Path) -> dict[str, Any]:
    """Top-1 on the validation split: dense baseline (torch), slim (torch) and slim (ONNX Runtime)."""
    import numpy as np
    from ..data import build_loaders
    from ..onnx_io import load_onnx_session
    from ..artifacts import slim_dir
    slim_model = slim_dir(_final_slim_dir(cfg, out)).load().eval()
    dense = _dense_finetuned(cfg, out).eval()
    data = build_loaders(cfg.data, model=slim_model, batch_size=64, root=cfg.data_root, download=cfg.download,
                         seed=pcfg.seed, augment=False)
    sess, _ = load_onnx_session(str(out / "model.onnx"))
    import torch
    hits = {"dense_torch": 0, "slim_torch": 0, "slim_onnx": 0}
    agree, n = 0, 0
    with torch.no_grad():
        for x, y in data.val:
            ps = slim_model(x).argmax(-1)
            hits["slim_torch"] += int((ps == y).sum())
            hits["dense_torch"] += int((dense(x).argmax(-1) == y).sum())
            po = sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0].argmax(-1)
            hits["slim_onnx"] += int((torch.from_numpy(po) == y).sum())
            agree += int((torch.from_numpy(po) == ps).sum())
            n += len(y)
    res = {k: round(100.0 * v / n, 2) for k, v in hits.items()}
    note = ("dense = the same fine-tuning without pruning" if cfg.dense_baseline else
            "dense = the prune run's fine-tuned weights without masks (no separate dense fine-tune)")
    res.update(val_images=n, onnx_torch_top1_agreement=round(100.0 * agree / n, 2), note=note)
    return res


def _stage_bench(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from ..deploy import benchmark
    from ..artifacts import slim_dir
    kw = dict(cfg.bench)
    dense = _dense_finetuned(cfg, out).eval()
    slim_model = slim_dir(_final_slim_dir(cfg, out)).load().eval()
    report = benchmark({"dense": (dense, str(out / "dense.onnx")), "slim": (slim_model, str(out / "model.onnx"))},
                       **kw)
    bdir = out / "bench"
    report.save(bdir)
    rows = [{k: r.get(k) for k in ("model", "backend", "batch", "median_ms", "p90_ms", "throughput", "macs",
                                   "params", "speedup", "speedup_efficiency")} for r in report.results]
    return {"report_dir": str(bdir), "results": rows, "skipped": list(getattr(report, "skipped", []))}


DEPLOY_VAL_IMAGES = 1000  # val images of the deploy stage's accuracy columns (at most; digits has 359)


def deploy_targets(cfg: RunConfig) -> list[str]:
    """The deploy stage's targets: cfg.targets, and the run's --target."""
    return [*cfg.targets, *([cfg.target] if cfg.target and cfg.target not in cfg.targets else [])]


def _stage_deploy(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """The deployment matrix of the dense fine-tuned and the slim model on cfg.targets, at the bench
    batches and threads; accuracy on the val split, static int8 calibrated on training images."""
    from ..artifacts import slim_dir
    from ..deploy import deployment_matrix
    from ..targets import needs_calibration
    from ..export.exporter import real_images
    dense = _dense_finetuned(cfg, out).eval()
    slim_model = slim_dir(_final_slim_dir(cfg, out)).load().eval()
    targets = deploy_targets(cfg)
    n_cal = int(cfg.export.get("calibration_images", 256)) if needs_calibration(targets) else 0
    x, y, names, calib = real_images(cfg.data, slim_model, DEPLOY_VAL_IMAGES, root=cfg.data_root,
                                     download=cfg.download, calibration=n_cal)
    labels = y if len(names) == int(slim_model.num_classes) else None
    b = cfg.bench
    report = deployment_matrix({"dense": dense, "slim": slim_model}, targets, b.get("batches") or [1],
                               val=(x, labels), calibration=calib, threads=b.get("threads"),
                               input_size=_input_size(slim_model), work_dir=out / "deploy",
                               min_seconds=b.get("min_seconds", 2.0), warmup_seconds=b.get("warmup_seconds", 1.0),
                               min_iters=b.get("min_iters", 10),
                               export_options={k: v for k, v in cfg.export.items()
                                               if k in ("opset", "threads", "simplify", "int8_max_drop")})
    report.save(out / "deploy")
    rows = [{"model": r["model"], "target": r["target"], "batch": r["batch"], "median_ms": r["median_ms"],
             "speedup": r["speedup"], "top1": r["top1"], "size_bytes": r["size_bytes"], "skipped": r["skipped"]}
            for r in report.rows]
    return {"report": str(out / "deploy" / "matrix.md"), "rows": rows, "best": report.best_lines()}
