"""The trainer-native methods' run (`train_prune`: p3b, uniform, dense, and the one-shot
Torch-Pruning baselines through a pruner factory) and the run dir it writes."""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .._version import __version__
from ..data import DataBundle
from ..errors import P3BError
from ..io import atomic_path, write_json
from ..plan import Plan
from ..models.vit import describe, model_kwargs_of, nonblock_params
from .config import P3BConfig
from ..train.api import fit_head
from ..train.trainer import CKPT, Trainer, write_metrics

_log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    plan: Plan  # the hard plan: what surgery builds from model.safetensors
    metrics: list[dict[str, Any]]  # every metrics.jsonl record (evals and mask updates)
    run_dir: Path  # folder holding model.safetensors, plan.json, metrics.jsonl, report.md, ...


def _run_dir(out_dir: str | os.PathLike | None, cfg: P3BConfig) -> Path:
    if out_dir is None and cfg.resume is None:
        raise P3BError("prune needs an output folder (--out RUN_DIR) or --resume RUN_DIR")
    run_dir = Path(out_dir if out_dir is not None else cfg.resume)
    if cfg.resume is None and ((run_dir / CKPT).exists() or (run_dir / "plan.json").exists()):
        raise P3BError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or choose another --out")
    return run_dir


def train_prune(model: nn.Module, data: DataBundle, cfg: P3BConfig, out_dir: str | os.PathLike | None,
                model_kwargs: dict[str, Any] | None = None,
                pruner_factory: Callable[[nn.Module, float], Any] | None = None) -> PruneResult:
    """The trainer-native methods (p3b, uniform, dense): one loop, different keep-ratio source.

    `pruner_factory(model, steps_per_epoch)` replaces the P3B Pruner (e.g. the one-shot
    Torch-Pruning baselines in baselines.py); it runs after the head is fitted to the data."""
    from .p3b.pruner import Pruner
    run_dir = _run_dir(out_dir, cfg)
    fit_head(model, data)
    spec = describe(model)
    factory = None if cfg.method == "dense" else (lambda m, spe: Pruner(m, spec, cfg, spe, data.num_classes))
    factory = pruner_factory or factory
    trainer = Trainer(model, data, cfg, run_dir, factory)
    master = trainer.dist.master
    kwargs = dict(model_kwargs_of(model, spec) or {})
    meta = {"method": cfg.method, "prune_ratio": cfg.prune_ratio if cfg.method != "dense" else 0.0,
            "budget": cfg.budget, "probe": cfg.probe if cfg.method == "p3b" else None,
            "model_kwargs": kwargs, "source_checkpoint": (model_kwargs or {}).get("checkpoint"),
            "seed": cfg.seed, "world_size": trainer.dist.world, "tool_version": __version__}
    meta["source_checkpoint"] = str(meta["source_checkpoint"]) if meta["source_checkpoint"] else None
    if master:
        write_json(run_dir / "config.json", {"config": cfg.to_dict(), "model": spec.name, "model_kwargs": kwargs,
                                             "source": _jsonable(model_kwargs or {}), "data": data.name})
    try:
        metrics = trainer.fit()
        plan = _final_plan(trainer, spec, model, meta)
        if master:
            _write_run(run_dir, model, plan, trainer, cfg, data)
    finally:
        trainer.close()
        if trainer.pruner is not None:
            trainer.pruner.gates.remove()  # hand the caller back a plain dense model
        if trainer.net.tap is not None:
            trainer.net.tap.remove()
    return PruneResult(plan=plan, metrics=metrics, run_dir=run_dir)


def _final_plan(trainer: Trainer, spec, model: nn.Module, meta: dict[str, Any]) -> Plan:
    """Hard plan from the gates; the hard-masked model (what surgery builds) is evaluated once."""
    if trainer.pruner is None:
        plan = Plan.dense(spec).with_counts(spec, nonblock_params(model))
        plan.meta = meta
        return plan
    plan = trainer.pruner.plan(meta)
    trainer.pruner.gates.set_plan(plan)
    trainer.log(trainer.evaluate("final_hard_masks"))
    return plan


def _write_run(run_dir: Path, model: nn.Module, plan: Plan, trainer: Trainer, cfg: P3BConfig,
               data: DataBundle) -> None:
    from safetensors.torch import save_file
    from .report import plot_keep_ratio, write_report
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "p3b": "dense-finetuned"})
    plan.save(run_dir / "plan.json")
    write_metrics(run_dir / "metrics.jsonl", trainer.metrics)
    updates = [m for m in trainer.metrics if m["event"] == "mask_update"]
    plot_keep_ratio(run_dir / "keep_ratio.png", updates, describe(model).block_names())
    epochs_done = trainer.step / trainer.steps_per_epoch
    summary = {"method": cfg.method, **_goal(cfg, plan), "budget": cfg.budget,
               "probe": cfg.probe if cfg.method == "p3b" else "-", "data": data.name,
               "epochs": f"{epochs_done:.2f} ({trainer.step} optimizer steps, {trainer.steps_per_epoch:.1f} per epoch)",
               "schedule (epochs)": "start {:g}, sparse {:g}, final {:g}".format(*cfg.schedule()),
               "mask updates": len(updates), "processes": trainer.dist.world, "device": str(trainer.dist.device),
               "train time": f"{trainer.train_time:.1f} s ({trainer.train_time / max(epochs_done, 1e-9):.1f} s/epoch)",
               "host": f"{platform.node()} torch {torch.__version__} p3b-deploy {__version__}"}
    write_report(run_dir / "report.md", plan, trainer.metrics, summary)


def _goal(cfg: P3BConfig, plan: Plan) -> dict[str, Any]:
    """What the run aimed at, for report.md: the prune ratio, or the latency target / keep ratios that
    replace it (a latency-budget run never reads --prune-ratio)."""
    if cfg.method == "dense":
        return {"prune ratio": 0.0}
    if cfg.fixed_keep_ratio is not None:
        return {"keep ratio": cfg.fixed_keep_ratio}
    lat = plan.meta.get("latency") or {}
    if cfg.budget == "latency" and lat.get("latency_target_ms"):
        return {"latency target": f"{cfg.latency_target} = {lat['latency_target_ms']:.4g} ms on the table "
                                  f"(dense {lat['dense_latency_ms']:.4g} ms)"}
    return {"prune ratio": cfg.prune_ratio}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in d.items()}
