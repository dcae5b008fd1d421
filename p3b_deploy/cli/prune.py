"""`p3b-deploy prune`: fine-tune a timm ViT while pruning it -> RUN_DIR with plan.json.

Config: `--config FILE.yaml` (keys = P3BConfig fields) first, CLI flags override it; the
resolved config is saved as RUN_DIR/config.json. `--resume RUN_DIR` alone continues a killed run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import P3BError
from ..io import read_json
from .common import add_data_args, add_model_args, data_kwargs, model_kwargs

# CLI dest -> P3BConfig field: the one place where flags become config.
FLAGS = {"prune_ratio": "prune_ratio", "epochs": "epochs", "prune_start": "start_epoch",
         "prune_sparse": "sparse_epoch", "prune_final": "final_epoch", "update_every": "update_every",
         "lr": "lr", "probe_lr": "probe_lr", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
         "label_smoothing": "label_smoothing", "batch_size": "batch_size", "grad_accum": "grad_accum",
         "seed": "seed", "probe": "probe", "method": "method", "budget": "budget",
         "latency_table": "latency_table", "latency_target": "latency_target",
         "keep_ratio": "fixed_keep_ratio", "prune_residual": "prune_residual", "amp": "amp", "device": "device",
         "eval_every": "eval_every", "ckpt_every": "ckpt_every", "max_steps": "max_steps", "resume": "resume"}


def _keep_ratio(text: str) -> float | list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, required=False)
    add_data_args(p, required=False)
    g = p.add_argument_group("pruning")
    g.add_argument("--prune-ratio", type=float, help="fraction of parameters (or MACs) to remove, in (0, 1)")
    g.add_argument("--method", help="p3b (default), uniform, dense, or a registered baseline")
    g.add_argument("--budget", choices=("params", "macs", "latency"),
                   help="what the prune ratio counts (default params); latency: --latency-target on the table's device")
    g.add_argument("--latency-table", metavar="FILE", help="latency_table.json measured on the target device "
                   "(p3b-deploy latency-table); needed by --budget latency, logged otherwise")
    g.add_argument("--latency-target", metavar="X", help="with --budget latency: a fraction of the dense model's "
                   "latency on that device (e.g. 0.5) or milliseconds (e.g. 12ms)")
    g.add_argument("--probe", choices=("reference", "light"), help="block-benefit probe (default: see P3BConfig)")
    g.add_argument("--keep-ratio", type=_keep_ratio, help="fixed keep ratio: one value or 2*depth comma-separated "
                   "values (implies --method uniform unless --method is given)")
    g.add_argument("--prune-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="also prune the embed dims each block reads/writes (default); --no-prune-residual "
                   "prunes only head_dim and MLP hidden channels: no gather/scatter in the slim model")
    g.add_argument("--prune-start", type=float, help="epoch of the first mask update (default 5)")
    g.add_argument("--prune-sparse", type=float, help="epoch the keep ratios reach their goal (default 25)")
    g.add_argument("--prune-final", type=float, help="epoch the masks are hard and frozen (default 50)")
    g.add_argument("--update-every", type=int, help="optimizer steps between mask updates (default ~3/epoch)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, help="training epochs (fractions allowed)")
    t.add_argument("--out", help="run folder to create (RUN_DIR)")
    t.add_argument("--lr", type=float, help="peak AdamW learning rate")
    t.add_argument("--probe-lr", type=float, help="learning rate of the benefit probes (default 5e-4 reference, 5e-3 light)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up")
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    t.add_argument("--seed", type=int)
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision (CUDA); fp32 on CPU")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--eval-every", type=float, help="epochs between evaluations (default 1)")
    t.add_argument("--ckpt-every", type=int, help="optimizer steps between checkpoints (default: every eval)")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke tests)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    t.add_argument("--config", metavar="FILE", help="YAML/JSON file with P3BConfig fields (CLI overrides it)")


def resolve(args: argparse.Namespace):
    """(P3BConfig, model kwargs, data kwargs): file, then saved run (resume), then CLI flags."""
    from ..configs import read_config_file
    from ..pruning import P3BConfig
    base: dict[str, Any] = {}
    mkw, dkw = model_kwargs(args), data_kwargs(args)
    if args.resume:
        if not (Path(args.resume) / "config.json").is_file():
            raise P3BError(f"cannot resume: {args.resume}/config.json is missing (not a prune run folder?)")
        saved = read_json(Path(args.resume) / "config.json", "run config")
        base = dict(saved["config"])
        if args.model is None:  # rebuild the same skeleton; the checkpoint restores every weight
            kw = saved["model_kwargs"]
            mkw = dict(name=saved["model"], num_classes=kw.get("num_classes"), img_size=kw.get("img_size"),
                       patch_size=kw.get("patch_size"), checkpoint=None, pretrained=False)
        if args.data is None:
            dkw["spec"] = saved["data"]
    if args.config:
        base.update(read_config_file(args.config))
    over = {field: getattr(args, dest) for dest, field in FLAGS.items()}
    if args.keep_ratio is not None and args.method is None:
        over["method"] = "uniform"
    if args.no_progress:
        over["progress"] = False
    cfg = P3BConfig.from_dict(base).replace(**over)
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
    from ..models.vit import load_model
    import torch
    cfg, mkw, dkw = resolve(args)
    torch.manual_seed(cfg.seed)  # a randomly initialised model (no checkpoint) is reproducible too
    model = load_model(**mkw)
    data = build_loaders(model=model, batch_size=cfg.batch_size, seed=cfg.seed, **dkw)
    res = prune(model, data, cfg, args.out or args.resume, model_kwargs=mkw)
    p, m = res.plan.params, res.plan.macs
    hard = [r for r in res.metrics if r["event"] in ("final_hard_masks", "eval")]
    print(f"run dir: {res.run_dir}")
    print(f"method {cfg.method}: params {p['dense']:,} -> {p['kept']:,} ({100 * p['kept'] / p['dense']:.1f}%), "
          f"MACs {m['dense']:,} -> {m['kept']:,} ({100 * m['kept'] / m['dense']:.1f}%)")
    if hard:
        print(f"val top-1 {hard[-1]['top1']:.2f}% top-5 {hard[-1]['top5']:.2f}% ({hard[-1]['event']})")
    return 0
