"""`p3b-deploy inspect PLAN_OR_RUN_DIR_OR_SLIM_DIR`: per-block table of kept dims and keep ratios."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

_COLS = ("block", "in", "heads", "qk", "v", "hidden", "out", "keep")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="PLAN_OR_RUN_DIR_OR_SLIM_DIR",
                   help="a plan.json, a run dir from `prune` (plan.json inside) or a slim dir")


def _cell(row: dict[str, Any], col: str) -> str:
    v = row[col]
    if col != "block" and row["removed"]:
        return "removed" if col == "keep" else "-"
    if v is None:
        return ""
    return f"{v:.3f}" if col == "keep" else str(v)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of `surgery.block_rows` rows (keep = kept/dense parameters of the block)."""
    cells = [list(_COLS)] + [[_cell(r, c) for c in _COLS] for r in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(len(_COLS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def _counts(name: str, c: dict[str, int] | None, kept_key: str) -> str:
    if not c:
        return f"{name}: unknown"
    kept = c[kept_key]
    return f"{name}: dense {c['dense']:,}  kept {kept:,}  ({kept / c['dense']:.1%})"


def main(args: argparse.Namespace) -> int:
    from ..surgery.store import inspect_source
    info = inspect_source(args.source)
    plan = info["plan"]
    removed = sum(r["removed"] for r in info["rows"])
    print(f"{info['kind']} {args.source}: {plan.model} (img {plan.img_size}, {plan.num_classes} classes), "
          f"{len(info['rows'])} blocks, {removed} removed")
    print(_counts("params", info["params"], "kept"))
    print(_counts("MACs/image", info["macs"], "kept"))
    print(format_rows(info["rows"]))
    return 0
