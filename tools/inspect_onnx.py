"""Print what an exported ONNX file carries: IO, opset, metadata_props, op counts (index ops marked).

    python tools/inspect_onnx.py model.onnx [--profile-batch 8 --threads 2]

Needs only onnx + onnxruntime (no torch). A corrupt file is refused with one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

INDEX_OPS = ("Gather", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Slice", "Transpose")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--profile-batch", type=int, default=0, help="also profile ORT op-time shares at this batch")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from p3b_deploy.errors import P3BError
    from p3b_deploy.onnx_io import load_onnx_session
    try:
        sess, meta = load_onnx_session(args.path, threads=args.threads)
    except P3BError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import onnx
    mp = onnx.load(args.path, load_external_data=False)
    print(f"{args.path}: {Path(args.path).stat().st_size / 1e6:.2f} MB, ir {mp.ir_version}, opsets "
          f"{ {o.domain or 'ai.onnx': o.version for o in mp.opset_import} }, producer {mp.producer_name} {mp.producer_version}")
    for kind, vals in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
        for v in vals:
            print(f"  {kind} {v.name}: {v.type} {v.shape}")
    print("metadata_props:")
    for k, v in meta.items():
        if k == "class_names" and v != "null":
            v = f"({len(json.loads(v))} names) {v[:60]}..."
        print(f"  {k} = {v}")
    counts = Counter(n.op_type for n in mp.graph.node)
    print("ops: " + ", ".join(f"{'*' if k in INDEX_OPS else ''}{k} {c}" for k, c in counts.most_common()))
    if args.profile_batch:
        import onnxruntime  # noqa: F401
        from p3b_deploy.export.exporter import profile_op_share  # imports torch; only for this option
        c, h, w = (int(d) for d in sess.get_inputs()[0].shape[1:])
        share = profile_op_share(Path(args.path), args.profile_batch, (c, h, w), 5, args.threads)
        print("ORT op-time share: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
