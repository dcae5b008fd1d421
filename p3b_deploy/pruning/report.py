"""Run-dir artifacts besides weights and plan: keep_ratio.png and report.md (written atomically)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_text
from ..plan import Plan


def plot_keep_ratio(path: Path, updates: list[dict[str, Any]], block_names: list[str]) -> Path | None:
    """keep_ratio.png from `keep_ratio_figure` (None if no update)."""
    if not updates:
        return None
    import matplotlib.pyplot as plt
    fig = keep_ratio_figure(updates, block_names)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    plt.close(fig)
    return path


def keep_ratio_figure(updates: list[dict[str, Any]], block_names: list[str]) -> Any:
    """Heat map blocks x mask updates of the goal and applied keep ratios (a matplotlib Figure).

    A branch that the update removed (hard masks all zero: no op left in the slim model) is marked
    with a red x on the applied map, a removed goal (keep ratio 0) on the goal map. The x ticks
    (epoch, and the predicted ms with a latency table) are thinned until no two labels touch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    goal = np.array([u["kr_goal"] for u in updates]).T  # [blocks, updates]
    applied = np.array([u["kr_applied"] for u in updates]).T
    fig, axes = plt.subplots(1, 2, figsize=(min(4 + 0.5 * len(updates), 14), 0.22 * len(block_names) + 1.6),
                             sharey=True, constrained_layout=True, dpi=110)
    for ax, data, title in ((axes[0], goal, "goal keep ratio"), (axes[1], applied, "applied keep ratio")):
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        gone = [(u, b) for u, rec in enumerate(updates) for b in (
            rec.get("removed") or [] if data is applied else [i for i, v in enumerate(rec["kr_goal"]) if v <= 0])]
        if gone:
            ax.scatter([u for u, _ in gone], [b for _, b in gone], marker="x", s=14, c="red", linewidths=0.9,
                       label="removed")
            ax.legend(loc="upper right", fontsize=6, framealpha=0.6)
        lat = all("pred_latency_ms" in u for u in updates)
        ax.set_xlabel("mask update: epoch" + (" / predicted ms" if lat else ""), fontsize=8)
        labels = [f"{u['epoch']:.2f}" + (f"\n{u['pred_latency_ms']:.3g}" if lat else "") for u in updates]
        ax.set_xticks(range(len(updates)), labels, fontsize=7)
    if "pred_latency_ms" in updates[-1]:
        u = updates[-1]
        target = f", target {u['latency_target_ms']:.3g} ms" if u.get("latency_target_ms") else ""
        fig.suptitle(f"predicted latency (table) at each update; last {u['pred_latency_ms']:.3g} ms of dense "
                     f"{u['dense_latency_ms']:.3g} ms{target}", fontsize=8)
    axes[0].set_yticks(range(len(block_names)), block_names, fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8)
    for ax in axes:
        _thin_ticks(fig, ax, labels)
    return fig


def _thin_ticks(fig: Any, ax: Any, labels: list[str], gap_px: float = 4.0) -> None:
    """Label every k-th x tick, k the smallest step at which the drawn labels do not touch."""
    step = max(1, math.ceil(len(labels) / 30))  # more than 30 labels never fit: skip drawing them all
    for _ in range(len(labels)):
        idx = list(range(0, len(labels), step))
        ax.set_xticks(idx, [labels[i] for i in idx], fontsize=7)
        fig.canvas.draw()  # the (constrained) layout and the labels' extents
        boxes = [t.get_window_extent() for t in ax.get_xticklabels()]
        if len(boxes) < 2 or all(a.x1 + gap_px <= b.x0 for a, b in zip(boxes, boxes[1:])):
            return
        pitch = (boxes[-1].x0 - boxes[0].x0) / (len(boxes) - 1) / step  # pixels per update
        widest = max(b.width for b in boxes)
        step = max(step + 1, math.ceil((widest + gap_px) / max(pitch, 1e-9)))


def write_report(path: Path, plan: Plan, metrics: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Human-readable summary of a prune run: setup, accuracy, counts, per-block keep ratios."""
    evals = [m for m in metrics if m["event"] == "eval"]
    hard = [m for m in metrics if m["event"] == "final_hard_masks"]
    lines = [f"# p3b-deploy prune run: {plan.model}", ""]
    lines += [f"- {k}: {v}" for k, v in summary.items()]
    if plan.params:
        p = plan.params
        lines.append(f"- params: {p['kept']:,} kept of {p['dense']:,} ({100 * p['kept'] / p['dense']:.1f}%)")
    if plan.macs:
        m = plan.macs
        lines.append(f"- MACs/image: {m['kept']:,} kept of {m['dense']:,} ({100 * m['kept'] / m['dense']:.1f}%)")
    if plan.meta.get("latency"):
        lines.append(f"- predicted latency: {latency_text(plan.meta['latency'])}")
    removed = removed_branches(plan)
    if removed:
        lines.append(f"- removed branches: {len(removed)} of {2 * len(plan.layers)} ({', '.join(removed)})")
    if evals:
        e = evals[-1]
        lines.append(f"- last eval (soft masks as trained): top-1 {e['top1']:.2f}%, top-5 {e['top5']:.2f}%")
    if hard:
        h = hard[-1]
        lines.append(f"- final hard masks (= the model surgery builds): top-1 {h['top1']:.2f}%, top-5 {h['top5']:.2f}%")
    lines += ["", "## Accuracy per evaluation", "", "| epoch | train loss | val loss | top-1 | top-5 |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {e['epoch']:.2f} | {e['train_loss'] if e['train_loss'] is not None else '-'} | "
              f"{e['val_loss']:.4f} | {e['top1']:.2f} | {e['top5']:.2f} |" for e in evals]
    lines += ["", "## Blocks", "", "| layer | attn kr | attn | mlp kr | mlp |", "|---:|---:|---|---:|---|"]
    kr = plan.keep_ratio or [1.0] * (2 * len(plan.layers))
    for i, L in enumerate(plan.layers):
        a = "removed" if L.attn.removed else _attn_desc(plan, i)
        m = "removed" if L.mlp.removed else _mlp_desc(plan, i)
        lines.append(f"| {i} | {kr[2 * i]:.3f} | {a} | {kr[2 * i + 1]:.3f} | {m} |")
    ups = [m for m in metrics if m.get("event") == "mask_update" and "pred_latency_ms" in m]
    if ups:
        lines += ["", "## Predicted latency per mask update (latency table)", "", "| step | phase | predicted ms |",
                  "|---:|---|---:|"]
        lines += [f"| {u['step']} | {u['phase']} | {u['pred_latency_ms']:.4g} |" for u in ups]
    lines += ["", "Artifacts: model.safetensors (dense fine-tuned weights, masks not folded in), plan.json, "
              "metrics.jsonl, keep_ratio.png, config.json, checkpoint.pt.", ""]
    return write_text(path, "\n".join(lines))


def latency_text(lat: dict[str, Any]) -> str:
    """One line from a plan's `meta.latency` record: prediction, target, allocation and the table."""
    t = lat["latency_table"]
    target = f"; target {lat['latency_target_ms']:.4g} ms" if lat.get("latency_target_ms") else ""
    alloc = f", {lat['allocation']} allocation" if lat.get("allocation") else ""
    return (f"{lat['pred_latency_ms']:.4g} ms of dense {lat['dense_latency_ms']:.4g} ms "
            f"({lat['pred_speedup']:.2f}x){target}{alloc}; table {t['path']} (target {t.get('target') or '-'}, "
            f"{t['provider']}, batch {t['batch']}, "
            f"threads {t['threads']}, {t['device']})")


def removed_branches(plan: Plan) -> list[str]:
    """Names of the branches the plan removes (attn3, mlp7, ...): identity in the slim model."""
    return [f"{kind}{i}" for i, L in enumerate(plan.layers) for kind, br in (("attn", L.attn), ("mlp", L.mlp))
            if br.removed]


def _attn_desc(plan: Plan, i: int) -> str:
    d = plan.attn_dims(i)
    return f"in {d.n_in}, qk/v {d.qk}/{d.v}, out {d.n_out}"


def _mlp_desc(plan: Plan, i: int) -> str:
    d = plan.mlp_dims(i)
    return f"in {d.n_in}, hidden {d.hidden}, out {d.n_out}"
