"""`p3b-deploy prune`: fine-tune a timm ViT while pruning it -> RUN_DIR with plan.json.

Config: `--config FILE.yaml` (keys = P3BConfig fields) first, CLI flags override it; the
resolved config is saved as RUN_DIR/config.json. `--resume RUN_DIR` alone continues a killed run.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import P3BError
from .common import add_data_args, add_model_args, data_kwargs, model_kwargs
from .options import add_config_args, config_overrides

_TRAIN_ONLY = ("progress", "resume")  # set by --no-progress / --resume below


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pruning.config import PRESETS, P3BConfig
    from ..train.config import TrainConfig
    add_model_args(p, required=False)
    add_data_args(p, required=False)
    g = p.add_argument_group("pruning (P3BConfig)")
    add_config_args(g, P3BConfig, skip=[f.name for f in dataclasses.fields(TrainConfig)])
    g.add_argument("--preset", choices=tuple(PRESETS), help="start from a named setting: paper = the method "
                   "page's (reference probe, residual dims pruned, epochs 5/25/50 of 50, lr 1e-4)")
    t = p.add_argument_group("training (TrainConfig)")
    add_config_args(t, TrainConfig)
    t.add_argument("--out", help="run folder to create (RUN_DIR)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    t.add_argument("--config", metavar="FILE", help="YAML/JSON file with P3BConfig fields (CLI overrides it)")


def resolve(args: argparse.Namespace):
    """(P3BConfig, model kwargs, data kwargs): file, then saved run (resume), then CLI flags."""
    from ..configs import read_config_file
    from ..pruning.config import PRESETS, P3BConfig
    base: dict[str, Any] = {}
    mkw, dkw = model_kwargs(args), data_kwargs(args)
    if args.resume:
        from ..artifacts import CONFIG, RunDir
        if not (Path(args.resume) / CONFIG).is_file():
            raise P3BError(f"cannot resume: {Path(args.resume) / CONFIG} is missing (not a prune run folder?)")
        saved = RunDir(Path(args.resume)).run_config()
        base = dict(saved["config"])
        if args.model is None:  # rebuild the same skeleton; the checkpoint restores every weight
            kw = saved["model_kwargs"]
            mkw = dict(name=saved["model"], num_classes=kw.get("num_classes"), img_size=kw.get("img_size"),
                       patch_size=kw.get("patch_size"), checkpoint=None, pretrained=False)
        if args.data is None:
            dkw["spec"] = saved["data"]
    if args.config:
        base.update(read_config_file(args.config))
    if args.preset:
        base = {**PRESETS[args.preset], **base}
    over = config_overrides(args, P3BConfig)
    over["resume"] = args.resume
    if args.fixed_keep_ratio is not None and args.method is None:
        over["method"] = "uniform"
    if args.no_progress:
        over["progress"] = False
    merged = {**base, **{k: v for k, v in over.items() if v is not None}}
    if merged.get("target") and merged.get("latency_target") is not None and not merged.get("latency_table") \
            and args.out:  # price on the target: time a probe pack on it first (main), budget its milliseconds
        from ..deploy.latency import TABLE_FILE
        over.update(budget="latency", latency_table=str(Path(args.out) / TABLE_FILE))
        args.time_table = True
    cfg = P3BConfig.from_dict(base).replace(**over)
    if cfg.target is not None:  # a target whose runtime is missing is refused before any work
        from ..targets import get_target
        get_target(cfg.target).check()
    if mkw["name"] is None:
        raise P3BError("prune needs --model NAME (or --resume RUN_DIR)")
    if dkw["spec"] is None:
        raise P3BError("prune needs --data SPEC (or --resume RUN_DIR)")
    if args.out is None and not args.resume:
        raise P3BError("prune needs --out RUN_DIR (or --resume RUN_DIR)")
    return cfg, mkw, dkw


def main(args: argparse.Namespace) -> int:
    from ..data import build_loaders
    from ..pruning import prune
    from ..pruning.report import latency_text, removed_branches
    from ..models.vit import load_model
    import torch
    cfg, mkw, dkw = resolve(args)
    if getattr(args, "time_table", False):
        from ..deploy.latency import target_table
        table, path = target_table(mkw["name"], args.out, cfg.target, img_size=mkw.get("img_size"),
                                   patch_size=mkw.get("patch_size"), num_classes=mkw.get("num_classes"), progress=print)
        print(table.summary())
        print(f"latency table written to {path}")
    torch.manual_seed(cfg.seed)  # a randomly initialised model (no checkpoint) is reproducible too
    model = load_model(**mkw)
    data = build_loaders(model=model, batch_size=cfg.batch_size, seed=cfg.seed, **dkw)
    res = prune(model, data, cfg, args.out or args.resume, model_kwargs=mkw)
    p, m = res.plan.params, res.plan.macs
    hard = [r for r in res.metrics if r["event"] in ("final_hard_masks", "eval")]
    print(f"run dir: {res.run_dir}")
    print(f"method {cfg.method}, budget {cfg.budget}: params {p['dense']:,} -> {p['kept']:,} "
          f"({100 * p['kept'] / p['dense']:.1f}%), MACs {m['dense']:,} -> {m['kept']:,} ({100 * m['kept'] / m['dense']:.1f}%)")
    if res.plan.meta.get("latency"):
        print(f"predicted latency: {latency_text(res.plan.meta['latency'])}")
    gone = removed_branches(res.plan)
    if gone or cfg.budget == "latency":
        print(f"removed branches: {len(gone)} of {2 * len(res.plan.layers)}" + (f" ({', '.join(gone)})" if gone else ""))
    if hard:
        print(f"val top-1 {hard[-1]['top1']:.2f}% top-5 {hard[-1]['top5']:.2f}% ({hard[-1]['event']})")
    return 0
