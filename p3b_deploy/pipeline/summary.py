"""The run's summary: summary.json from the stage records, summary.md, and the terminal table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import RunConfig

PADDED_IO = ("dense", "pad_in", "pad_out", "auto")  # residual_io values that may zero-pad a branch


def summarise(cfg: RunConfig, out: Path, rec: dict[str, dict[str, Any]], slim_dir_name: str) -> dict[str, Any]:
    """summary.json of a finished run, from the stage records."""
    p, e = rec["prune"], rec["evaluate"]
    return {
        "out": str(out), "model": cfg.model, "data": cfg.data, "method": p.get("method"),
        "prune_ratio": p.get("prune_ratio"), "budget": p.get("budget"), "round_to": cfg.round_to,
        "params": {"dense": p["params"]["dense"], "slim": rec["slim"]["params"], "plan_kept": p["params"]["kept"]},
        "residual_io": cfg.residual_io,
        "macs": {"dense": p["macs"]["dense"], "slim": p["macs"]["kept"]},
        "accuracy": {"dense_top1": e["dense_torch"], "masked_top1": p.get("masked_top1"),
                     "slim_top1": e["slim_torch"], "slim_onnx_top1": e["slim_onnx"],
                     "onnx_torch_top1_agreement": e["onnx_torch_top1_agreement"], "val_images": e["val_images"],
                     "note": e["note"]},
        "surgery_max_abs_diff": rec["slim"].get("max_abs_diff_vs_masked"),
        "onnx": {"parity": rec["export"].get("parity"), "size_bytes": rec["export"]["size_bytes"],
                 "dense_size_bytes": rec["export"]["dense_size_bytes"]},
        "latency": rec["bench"]["results"], "bench_skipped": rec["bench"]["skipped"],
        "keep_ratio": p.get("keep_ratio"),
        "files": {"keep_ratio_png": "run/keep_ratio.png", "latency_png": "bench/latency.png",
                  "plan": "run/plan.json", "slim_dir": slim_dir_name,
                  "onnx": "model.onnx", "bench_report": "bench/report.md"},
        "stage_seconds": {k: v.get("seconds") for k, v in rec.items()},
        "serving": rec.get("serve"),
        "deploy": None if "deploy" not in rec else {k: rec["deploy"][k] for k in ("rows", "best")},
    }


def summary_markdown(s: dict[str, Any]) -> str:
    a = s["accuracy"]
    pct = lambda k, d: f"{100 * k / d:.1f}%"  # noqa: E731
    lines = [
        f"# p3b-deploy run: {s['model']} on {s['data']}", "",
        f"Method **{s['method']}**, {_goal(s)}.", "",
        "| | dense | slim | slim / dense |", "|---|---:|---:|---:|",
        f"| parameters (built) | {s['params']['dense']:,} | {s['params']['slim']:,} | {pct(s['params']['slim'], s['params']['dense'])} |",
        f"| parameters (plan) | {s['params']['dense']:,} | {s['params']['plan_kept']:,} | {pct(s['params']['plan_kept'], s['params']['dense'])} |",
        f"| MACs / image | {s['macs']['dense']:,} | {s['macs']['slim']:,} | {pct(s['macs']['slim'], s['macs']['dense'])} |",
        f"| val top-1 (torch) | {a['dense_top1']:.2f}% | {a['slim_top1']:.2f}% | |",
        f"| ONNX size | {s['onnx']['dense_size_bytes'] / 1e6:.2f} MB | {s['onnx']['size_bytes'] / 1e6:.2f} MB | |",
        *([_serving_row(s["serving"])] if s.get("serving") else []), "",
        f"Slim ONNX top-1 {a['slim_onnx_top1']:.2f}% (agrees with torch on {a['onnx_torch_top1_agreement']:.1f}% "
        f"of {a['val_images']} val images). {a['note']}.", "",
        f"Surgery exactness (slim vs masked model, max abs logit diff): {s['surgery_max_abs_diff']}. "
        f"{residual_io_sentence(s)}", "",
        "## Latency (dense vs slim, interleaved in one run)", "",
        "| backend | batch | dense ms (median) | slim ms (median) | speedup | MAC reduction | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {}
    for r in s["latency"]:
        by.setdefault((r["backend"], r["batch"]), {})[r["model"]] = r
    for (backend, batch), d in by.items():
        if "dense" in d and "slim" in d:
            sl = d["slim"]
            mr = (d["dense"]["macs"] / sl["macs"]) if sl.get("macs") else float("nan")
            lines.append(f"| {backend} | {batch} | {d['dense']['median_ms']:.2f} | {sl['median_ms']:.2f} | "
                         f"{sl['speedup']:.2f}x | {mr:.2f}x | {sl['speedup_efficiency']:.2f} |")
    for sk in s["bench_skipped"]:
        lines.append(f"\nSkipped: {sk.get('backend')} ({sk.get('reason')})")
    if s.get("deploy"):
        lines += [""] + deploy_markdown(s["deploy"])
    if s.get("latency_budget"):
        from .latency import latency_markdown
        lines += [""] + latency_markdown(s["latency_budget"])
    lines += ["", "## Keep ratio per block over the mask updates", "", f"![keep ratios]({s['files']['keep_ratio_png']})",
              "", "## Latency vs MACs", "", f"![latency]({s['files']['latency_png']})", "",
              f"Stage times (s): {json.dumps(s['stage_seconds'])}", ""]
    return "\n".join(lines)


def _goal(s: dict[str, Any]) -> str:
    """What the prune aimed at: its latency target (a latency budget never reads the prune ratio)."""
    lat = s.get("latency_budget")
    if s.get("budget") == "latency" and lat:
        return f"latency budget: target {lat['target_ms']:.3f} ms on the table (see Latency budget below)"
    return f"prune ratio {s['prune_ratio']}"


def residual_io_sentence(s: dict[str, Any]) -> str:
    """How the built slim model's size compares with the plan's, and why (computed, not assumed)."""
    built, plan, io = s["params"]["slim"], s["params"]["plan_kept"], s["residual_io"]
    head = f"Residual reads/writes: `{io}`"
    if built == plan:
        pads = " (no branch reads or writes a subset of the residual dims: nothing is zero-padded)" \
            if io in PADDED_IO else ""
        return f"{head}: built parameters equal the plan's{pads}."
    why = []
    if io in PADDED_IO and built > plan:
        why.append("branches that read or write fewer residual dims are zero-padded to all of them")
    if (s.get("round_to") or 1) != 1:
        why.append(f"kept counts are rounded up to multiples of {s['round_to']}")
    rel = "exceed" if built > plan else "fall short of"
    return (f"{head}: built parameters {rel} the plan's by {abs(built - plan):,} ({100 * abs(built - plan) / plan:.1f}%)"
            + (f": {'; '.join(why)}" if why else "") + "; the MACs above are the plan's.")


def deploy_markdown(d: dict[str, Any]) -> list[str]:
    """The compact deployment matrix (full table: deploy/matrix.md)."""
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = ["## Deployment matrix (speedup vs dense ORT fp32; full table: [deploy/matrix.md](deploy/matrix.md))",
             "", "| model | target | batch | median ms | speedup | top-1 % | file MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if r["skipped"]:
            lines.append(f"| {r['model']} | {r['target']} | {r['batch']} | skipped: {r['skipped']} ||||")
            continue
        lines.append(f"| {r['model']} | {r['target']} | {r['batch']} | {r['median_ms']:.3f} | {f(r['speedup'], '.2f')}x "
                     f"| {f(r['top1'], '.2f')} | {f(r['size_bytes'] and r['size_bytes'] / 1e6, '.2f')} |")
    return lines + ["", *d["best"]]


def _serving_row(check: dict[str, Any]) -> str:
    from ..serve.check import serving_row
    return serving_row(check)


def summary_table(s: dict[str, Any]) -> str:
    """The final table printed on the terminal."""
    a = s["accuracy"]
    rows = [("params", f"{s['params']['dense']:,}", f"{s['params']['slim']:,}"),
            ("MACs/image", f"{s['macs']['dense']:,}", f"{s['macs']['slim']:,}"),
            ("val top-1", f"{a['dense_top1']:.2f}%", f"{a['slim_top1']:.2f}% (onnx {a['slim_onnx_top1']:.2f}%)")]
    by = {}
    for r in s["latency"]:
        by.setdefault((r["backend"], r["batch"]), {})[r["model"]] = r
    for (backend, batch), d in by.items():
        if "dense" in d and "slim" in d:
            rows.append((f"{backend} b{batch} ms", f"{d['dense']['median_ms']:.2f}",
                         f"{d['slim']['median_ms']:.2f} ({d['slim']['speedup']:.2f}x)"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "dense", "")])
    out = [f"{'':{w0}}  {'dense':>{w1}}  slim"]
    out += [f"{a:{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lb = s.get("latency_budget")
    if lb and lb.get("promise_kept") is not None:
        out.append(f"\npromise on {lb['target']} (batch {lb['batch']}): target {lb['target_ms']:.3f} ms, predicted "
                   f"{lb['pred_ms'] or 0:.3f} ms, measured {lb['measured_ms']:.3f} ms -> "
                   f"{'kept' if lb['promise_kept'] else 'MISSED'}")
    return "\n".join(out)
