"""`p3b-deploy run`: the whole pipeline (prune -> slim -> export -> bench) into one folder.

With no arguments it runs the built-in offline default: the shipped MNIST-5k ViT-Nano source
model adapted and pruned on UCI digits. `--config FILE.yaml` first, then flags, then `--set`.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from ..errors import P3BError

# flag dest -> RunConfig field (top level) or "prune.<P3BConfig field>"
FLAGS = {"out": "out", "model": "model", "checkpoint": "checkpoint", "data": "data", "data_root": "data_root",
         "num_classes": "num_classes", "img_size": "img_size", "patch_size": "patch_size",
         "round_to": "round_to", "finetune_epochs": "finetune_epochs",
         "prune_ratio": "prune.prune_ratio", "epochs": "prune.epochs", "method": "prune.method",
         "probe": "prune.probe", "seed": "prune.seed", "batch_size": "prune.batch_size",
         "prune_residual": "prune.prune_residual", "latency_target": "latency_target"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="run config (keys of RunConfig; see examples/configs/)")
    p.add_argument("--out", help="output folder (default runs/demo); rerunning resumes it")
    p.add_argument("--force", action="store_true", help="redo every stage even if the folder has it")
    p.add_argument("--model", help="timm model name (default vit_nano_patch4_16)")
    p.add_argument("--checkpoint", help="source weights file, or 'demo' (shipped MNIST-5k ViT-Nano)")
    p.add_argument("--pretrained", action="store_true", default=None, help="timm pretrained weights (timm cache)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--data", help="data spec (default digits, the offline target domain)")
    p.add_argument("--data-root")
    p.add_argument("--prune-ratio", type=float)
    p.add_argument("--epochs", type=float, help="prune-stage epochs")
    p.add_argument("--method", help="p3b, uniform, dense, tp-taylor, ...")
    p.add_argument("--probe", choices=("reference", "light"))
    p.add_argument("--prune-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="let P3B prune the embed dims each block reads/writes; --no-prune-residual: only "
                   "head_dim and MLP hidden (no gather/scatter in the slim model)")
    p.add_argument("--latency-target", metavar="X", help="prune for this latency on this machine: a fraction of "
                   "the dense latency (e.g. 0.5) or ms (e.g. 12ms); a probe pack is timed here first")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--round-to", type=int)
    p.add_argument("--finetune-epochs", type=float, help="recovery fine-tuning of the slim model (0 = skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set export.int8=true --set bench.batches=[1,8]")


def resolve(args: argparse.Namespace):
    from ..pipeline.run import RunConfig, deep_update
    d: dict = {}
    if args.config:
        from ..configs import read_config_file
        d = read_config_file(args.config)
    for dest, key in FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            d = deep_update(d, key, v)
    if args.pretrained:
        d = deep_update(d, "pretrained", True)
        d.setdefault("checkpoint", None)
    for item in args.set:
        if "=" not in item:
            raise P3BError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        d = deep_update(d, k.strip(), yaml.safe_load(v))
    return RunConfig.from_dict(d)


def main(args: argparse.Namespace) -> int:
    from ..pipeline.run import run_pipeline, summary_table
    cfg = resolve(args)
    print(f"p3b-deploy run -> {cfg.out}  (model {cfg.model}, data {cfg.data}, "
          f"prune ratio {cfg.prune.get('prune_ratio')}, method {cfg.prune.get('method', 'p3b')})", flush=True)
    res = run_pipeline(cfg, force=args.force,
                       on_stage=lambda name, what: print(f"[{name}] {what}", file=sys.stderr, flush=True))
    print()
    print(summary_table(res.summary))
    print(f"\nreport: {res.out / 'summary.md'}")
    return 0
