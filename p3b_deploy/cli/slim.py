"""`p3b-deploy slim RUN_DIR --out SLIM_DIR`: surgery on a `prune` run dir, verified, saved.
`p3b-deploy slim --preview MODEL --prune-ratio 0.5 --out SLIM_DIR`: a P3B-shaped slim dir of that
geometry without training (random weights), for sizing on the target device."""
from __future__ import annotations

import argparse

from ..errors import SurgeryError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="run dir from `prune`: model.safetensors + plan.json (or use --preview MODEL)")
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
    g = p.add_argument_group("preview (no training: a P3B-shaped geometry with random weights, for sizing)")
    g.add_argument("--preview", metavar="MODEL", default=None,
                   help="timm model name: slim it with a deterministic P3B-like keep-ratio profile instead of a "
                        "run dir's plan (accuracy is meaningless; latency and size are the point)")
    g.add_argument("--prune-ratio", type=float, default=0.5, metavar="R",
                   help="fraction of the dense parameters removed (default 0.5)")
    g.add_argument("--keep-residual", action="store_true",
                   help="keep the embed dims whole (cut head_dim / MLP hidden only), like prune's default")
    g.add_argument("--seed", type=int, default=0, help="seed of the profile and of the kept channels (default 0)")
    g.add_argument("--checkpoint", default=None, help="dense weights for the preview (default: random init)")
    g.add_argument("--img-size", type=int, default=None, help="input side of the preview model")
    g.add_argument("--num-classes", type=int, default=None, help="classifier outputs of the preview model")


def _build(args: argparse.Namespace):
    from ..surgery.core import slim_run_dir
    if (args.run_dir is None) == (args.preview is None):
        raise SurgeryError("give either RUN_DIR or --preview MODEL")
    if args.run_dir is not None:
        given = [f for f, v in (("--checkpoint", args.checkpoint), ("--img-size", args.img_size),
                                ("--num-classes", args.num_classes), ("--keep-residual", args.keep_residual)) if v]
        if given:
            raise SurgeryError(f"{', '.join(given)} only apply to --preview")
        return slim_run_dir(args.run_dir, round_to=args.round_to, residual_io=args.residual_io)
    from ..surgery.preview import preview_slim
    return preview_slim(args.preview, args.prune_ratio, seed=args.seed, residual=not args.keep_residual,
                        residual_io=args.residual_io, round_to=args.round_to, checkpoint=args.checkpoint,
                        img_size=args.img_size, num_classes=args.num_classes)


def main(args: argparse.Namespace) -> int:
    from ..surgery.store import save_slim
    from ..surgery.core import block_rows
    from .inspect import format_rows
    model = _build(args)
    out = save_slim(model, args.out)
    cfg = model.p3b_slim_config
    p, m = cfg.params, cfg.macs
    print(format_rows(block_rows(cfg.get_plan(), ratios=cfg.block_keep)))
    print(f"params: dense {p['dense']:,} -> slim {p['slim']:,} ({p['slim'] / p['dense']:.1%})")
    print(f"MACs/image: dense {m['dense']:,} -> slim {m['slim']:,} ({m['slim'] / m['dense']:.1%}, "
          f"{m['dense'] / max(1, m['slim']):.2f}x fewer)")
    print(f"verified against the masked model: max abs diff {cfg.verified_max_abs_diff:.2e}; "
          f"round_to {cfg.round_to}; residual io {args.residual_io}")
    if args.preview:
        print(f"preview: {args.preview} with a P3B-shaped plan (seed {args.seed}) and "
              f"{'random' if args.checkpoint is None else 'the given dense'} weights, not trained: for sizing only")
    print(f"wrote {out}")
    return 0
