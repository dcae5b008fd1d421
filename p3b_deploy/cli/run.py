"""`p3b-deploy run`: the whole pipeline (prune -> slim -> export -> bench) into one folder.

With no arguments it runs the built-in offline default: the shipped MNIST-5k ViT-Nano source
model adapted and pruned on UCI digits. `--config FILE.yaml` first, then flags, then `--set`.
Flags come from RunConfig's declarations, plus the prune stage's main P3BConfig fields.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import P3BError
from .options import add_config_args, config_overrides

# P3BConfig fields that `run` exposes as flags (any other: --set prune.FIELD=VALUE)
PRUNE_FLAGS = ("prune_ratio", "epochs", "method", "probe", "prune_residual", "seed", "batch_size", "lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pipeline.config import RunConfig, _prune_defaults
    from ..pruning.config import P3BConfig
    p.add_argument("--config", metavar="FILE.yaml", help="run config (keys of RunConfig; see examples/configs/)")
    p.add_argument("--force", action="store_true", help="redo every stage even if the folder has it")
    add_config_args(p, RunConfig)
    g = p.add_argument_group("prune stage (P3BConfig; any other field: --set prune.FIELD=VALUE)")
    add_config_args(g, P3BConfig, only=PRUNE_FLAGS, dest_prefix="prune.", shown_defaults=_prune_defaults())
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set export.int8=true --set bench.batches=[1,8]")


def resolve(args: argparse.Namespace):
    import yaml

    from ..configs import read_config_file
    from ..pipeline.config import RunConfig, deep_update
    from ..pruning.config import P3BConfig
    d: dict = read_config_file(args.config) if args.config else {}
    for key, v in config_overrides(args, RunConfig).items():
        d = deep_update(d, key, v)
    for key, v in config_overrides(args, P3BConfig, only=PRUNE_FLAGS, dest_prefix="prune.").items():
        d = deep_update(d, f"prune.{key}", v)
    if args.pretrained:
        d.setdefault("checkpoint", None)
    for item in args.set:
        if "=" not in item:
            raise P3BError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        d = deep_update(d, k.strip(), yaml.safe_load(v))
    return RunConfig.from_dict(d)


def main(args: argparse.Namespace) -> int:
    from ..pipeline import run_pipeline, summary_table
    cfg = resolve(args)
    print(f"p3b-deploy run -> {cfg.out}  (model {cfg.model}, data {cfg.data}, "
          f"prune ratio {cfg.prune.get('prune_ratio')}, method {cfg.prune.get('method', 'p3b')})", flush=True)
    res = run_pipeline(cfg, force=args.force,
                       on_stage=lambda name, what: print(f"[{name}] {what}", file=sys.stderr, flush=True))
    print()
    print(summary_table(res.summary))
    print(f"\nreport: {res.out / 'summary.md'}")
    return 0
