"""`p3b-deploy finetune`: recovery fine-tuning of a slim model, optionally distilled from the
dense model of the prune run (`--teacher RUN_DIR`). Same loop as `prune` without pruning."""
from __future__ import annotations

import argparse

from .common import add_data_args, data_kwargs

FLAGS = {"epochs": "epochs", "lr": "lr", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
         "label_smoothing": "label_smoothing", "batch_size": "batch_size", "grad_accum": "grad_accum",
         "seed": "seed", "amp": "amp", "device": "device", "eval_every": "eval_every",
         "ckpt_every": "ckpt_every", "max_steps": "max_steps", "kd_alpha": "kd_alpha",
         "kd_temperature": "kd_temperature"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slim_dir", metavar="SLIM_DIR", help="slim model folder (from `p3b-deploy slim`)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="folder for the fine-tuned slim model (SLIM_DIR2)")
    p.add_argument("--epochs", type=float, help="training epochs (fractions allowed)")
    p.add_argument("--teacher", metavar="RUN_DIR", help="distil from the dense model of this prune run")
    p.add_argument("--kd-alpha", type=float, help="weight of the distillation KL term (default 0.5)")
    p.add_argument("--kd-temperature", type=float, help="distillation temperature (default 2)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--eval-every", type=float, help="epochs between evaluations")
    p.add_argument("--ckpt-every", type=int, help="optimizer steps between checkpoints")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue a killed run from --out's checkpoint")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON with P3BConfig fields (CLI overrides it)")


def main(args: argparse.Namespace) -> int:
    from ..data import build_loaders
    from ..artifacts import slim_dir, run_dir
    from ..train import TrainConfig, finetune
    from ..surgery.store import save_slim
    from ..configs import read_config_file
    base = read_config_file(args.config) if args.config else {}
    over = {f: getattr(args, d) for d, f in FLAGS.items()}
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
