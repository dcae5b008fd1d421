"""`p3b-deploy latency-pack MODEL --out PACK`: ONNX probes of one model's branches, to be timed on the target."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm model name (e.g. deit_small_patch16_224)")
    p.add_argument("--out", required=True, metavar="PACK", help="folder to write (replaced atomically)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's); sets the token count")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs of the head (default: the model's)")
    p.add_argument("--repeats", type=int, default=4, help="branches chained in each probe file (default 4)")
    p.add_argument("--threads", type=int, default=None, help="ORT threads for the parity checks of the export")
    p.add_argument("--plans", type=int, default=6, help="whole slim models of seeded plans that fit the table's "
                                                         "correction (default 6; 0 = none)")


def main(args: argparse.Namespace) -> int:
    from ..export.latency_pack import make_pack
    from ..targets import TARGETS
    res = make_pack(args.model, args.out, img_size=args.img_size, repeats=args.repeats,
                    num_classes=args.num_classes, threads=args.threads, plans=args.plans)
    g = res.geometry
    n = sum(len(v) if isinstance(v, (dict, list)) else 1 for v in res.files.values())
    print(f"probe pack for {g.model} ({g.num_tokens} tokens, D {g.embed_dim}, {g.num_heads} heads x {g.head_dim}, "
          f"hidden {g.mlp_hidden}): {n} ONNX files in {res.path}/ ({res.seconds:.0f} s)")
    print(f"next, on the target device: p3b-deploy latency-table {res.path} --out latency_table.json "
          f"[--batch B] [--threads T] [--target {'|'.join(TARGETS)}]")
    return 0
