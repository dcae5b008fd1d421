"""`p3b-deploy finetune`: recovery fine-tuning of a slim model, optionally distilled from the
dense model of the prune run (`--teacher RUN_DIR`). Same loop as `prune` without pruning."""
from __future__ import annotations

import argparse

from .common import add_data_args, data_kwargs
from .options import add_config_args, config_overrides

def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig
    p.add_argument("slim_dir", metavar="SLIM_DIR", help="slim model folder (from `p3b-deploy slim`)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="folder for the fine-tuned slim model (SLIM_DIR2)")
    p.add_argument("--teacher", metavar="RUN_DIR", help="distil from the dense model of this prune run")
    t = p.add_argument_group("training (TrainConfig)")
    add_config_args(t, TrainConfig)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--resume", action="store_true", help="continue a killed run from --out's checkpoint")
    t.add_argument("--config", metavar="FILE", help="YAML/JSON with TrainConfig fields (CLI overrides it)")


def main(args: argparse.Namespace) -> int:
    from ..data import build_loaders
    from ..artifacts import slim_dir, run_dir
    from ..train import TrainConfig, finetune
    from ..surgery.store import save_slim
    from ..configs import read_config_file
    base = read_config_file(args.config) if args.config else {}
    over = config_overrides(args, TrainConfig)
    over.update(resume=args.out if args.resume else None)
    if args.no_progress:
        over["progress"] = False
    cfg = TrainConfig.from_dict(base).replace(**over)
    import torch
    torch.manual_seed(cfg.seed)
    model = slim_dir(args.slim_dir).load()
    teacher = run_dir(args.teacher, "--teacher").load_dense() if args.teacher else None
    data = build_loaders(model=model, batch_size=cfg.batch_size, seed=cfg.seed, **data_kwargs(args))
    res = finetune(model, data, cfg, args.out, teacher=teacher, save=save_slim)
    ev = [r for r in res.metrics if r["event"] == "eval"]
    print(f"fine-tuned slim model: {res.out_dir}")
    if ev:
        print(f"val top-1 {ev[-1]['top1']:.2f}% top-5 {ev[-1]['top5']:.2f}% after {ev[-1]['epoch']:.2f} epochs")
    return 0
