"""`p3b-deploy slim RUN_DIR --out SLIM_DIR`: surgery on a `prune` run dir, verified, saved."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run dir from `prune`: model.safetensors + plan.json")
    p.add_argument("--out", required=True, metavar="SLIM_DIR", help="folder for model.safetensors + config.json")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="round every kept channel count up to a multiple of N (re-adding the next most "
                        "important channels) for SIMD/tensor-core friendly shapes (default 1 = exact plan)")
    from ..spec import RESIDUAL_IO_CHOICES
    p.add_argument("--residual-io", choices=RESIDUAL_IO_CHOICES,
                   default="index",
                   help="how branches read/write their kept residual dims: index (gather + index_add, exact "
                        "size), dense (zero-padded full-width weights, no index ops), pad_in / pad_out (pad "
                        "one side), scatter (scatter_add writes), auto (per branch by a measured cost rule; "
                        "fastest on ORT CPU, more parameters) (default: index)")


def main(args: argparse.Namespace) -> int:
    from ..surgery.store import save_slim
    from ..surgery.core import block_rows, slim_run_dir
    from .inspect import format_rows
    model = slim_run_dir(args.run_dir, round_to=args.round_to, residual_io=args.residual_io)
    out = save_slim(model, args.out)
    cfg = model.p3b_slim_config
    p, m = cfg.params, cfg.macs
    print(format_rows(block_rows(cfg.get_plan(), ratios=cfg.block_keep)))
    print(f"params: dense {p['dense']:,} -> slim {p['slim']:,} ({p['slim'] / p['dense']:.1%})")
    print(f"MACs/image: dense {m['dense']:,} -> slim {m['slim']:,} ({m['slim'] / m['dense']:.1%}, "
          f"{m['dense'] / max(1, m['slim']):.2f}x fewer)")
    print(f"verified against the masked model: max abs diff {cfg.verified_max_abs_diff:.2e}; "
          f"round_to {cfg.round_to}; residual io {args.residual_io}")
    print(f"wrote {out}")
    return 0
