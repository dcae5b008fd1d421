"""BenchReport: the result of `benchmark()` and its JSON / Markdown / CSV / plot renderings."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BenchError
from ..io import atomic_path, write_json, write_text

# Columns of report.csv, in order (also the keys every results record carries).
CSV_COLUMNS = ("model", "backend", "precision", "batch", "median_ms", "p90_ms", "throughput", "macs", "params",
               "speedup", "mac_reduction", "speedup_efficiency", "min_ms", "mean_ms", "p95_ms", "p99_ms",
               "std_ms", "cv", "noisy", "iters", "timed_s", "create_s", "first_run_ms", "h2d_ms", "d2h_ms",
               "peak_rss_mb", "rss_delta_mb", "gpu_mem_mb", "providers", "inference_precision",
               "parity_max_abs_diff", "parity_top1_agreement", "parity_images",
               "concurrency", "requests", "server_batch")  # the last three: served models (serve.bench_server)
FORMAT = "p3b-bench-report"
VERSION = 1


@dataclass
class BenchReport:
    """Everything one benchmark run measured, plus where and how it ran."""
    system: dict[str, Any]  # CPU/GPU, versions, threads, date (see sysinfo.system_info)
    config: dict[str, Any]  # the resolved benchmark settings
    models: list[dict[str, Any]]  # per model: label, source, kind, macs, params, counters used
    results: list[dict[str, Any]] = field(default_factory=list)  # one record per model x backend x batch
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {model, backend, batch, reason}

    # ---------------------------------------------------------------- access
    def result(self, model: str, backend: str, batch: int) -> dict[str, Any]:
        """The record of one model x backend x batch (KeyError if it was not measured)."""
        for r in self.results:
            if r["model"] == model and r["backend"] == backend and r["batch"] == batch:
                return r
        raise KeyError((model, backend, batch))

    # ---------------------------------------------------------------- renderings
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "system": self.system, "config": self.config,
                "models": self.models, "results": self.results, "skipped": self.skipped}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BenchError("not a p3b-deploy benchmark report")
        return cls(system=d["system"], config=d["config"], models=d["models"], results=d["results"],
                   skipped=d.get("skipped", []))

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.results:
            w.writerow({k: (",".join(v) if isinstance(v, list) else v) for k, v in r.items()})
        return buf.getvalue()

    def to_markdown(self) -> str:
        """Tables per backend x precision: latency, throughput, MACs and ratios vs the first model."""
        s = self.system
        lines = [f"Benchmark {s.get('date', '')} on {s.get('cpu', '?')}"
                 + (f", GPU {', '.join(s['gpus'])}" if s.get("gpus") else "")
                 + f"; threads {s.get('threads_requested') or 'default'}; "
                 + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()
                             if k in ("onnxruntime", "onnxruntime-gpu", "torch")), ""]
        groups: dict[tuple, list] = {}
        for r in self.results:
            groups.setdefault((r["backend"], r["precision"]), []).append(r)
        for (backend, prec), rows in groups.items():
            if "concurrency" in rows[0]:
                lines += _server_table(backend, prec, rows)
                continue
            computes = sorted({r["inference_precision"] for r in rows if r.get("inference_precision")})
            parity = any(r.get("parity_max_abs_diff") is not None for r in rows)
            lines += [f"### {backend} ({prec}{', computes ' + '/'.join(computes) if computes else ''})", "",
                      "| model | batch | median ms | p90 ms | CV | img/s | GMACs | params (M) | speedup "
                      "| MAC red. | efficiency |" + (" max abs diff vs ORT fp32 | top-1 agreement |" if parity else ""),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if parity else "")]
            for r in sorted(rows, key=lambda r: r["batch"]):
                lines.append(
                    f"| {r['model']} | {r['batch']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                    f"{100 * r['cv']:.1f}%{' (!)' if r['noisy'] else ''} | {r['throughput']:.1f} | "
                    f"{_fmt(r['macs'], 1e9, 3)} | {_fmt(r['params'], 1e6, 2)} | {_fmt(r['speedup'], 1, 2)} | "
                    f"{_fmt(r['mac_reduction'], 1, 2)} | {_fmt(r['speedup_efficiency'], 1, 2)} |"
                    + (f" {_sci(r.get('parity_max_abs_diff'))} | {_fmt(r.get('parity_top1_agreement'), 1, 1)}% |"
                       if parity else ""))
            lines.append("")
        if any(r["noisy"] for r in self.results):
            lines += ["(!) CV > 5%: the machine was noisy; compare ratios, not absolute times.", ""]
        if self.skipped:
            lines += ["### skipped", "", "| model | backend | batch | reason |", "|---|---|---|---|"]
            lines += [f"| {k['model']} | {k['backend']} | {k['batch'] if k['batch'] is not None else 'all'} "
                      f"| {k['reason']} |" for k in self.skipped]
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """latency.png: median latency vs MACs, one panel per backend, one line per batch size."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise BenchError("plotting needs matplotlib (pip install matplotlib)") from None
        groups = sorted({(r["backend"], r["precision"]) for r in self.results})
        fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.2), squeeze=False)
        for ax, (backend, prec) in zip(axes[0], groups):
            rows = [r for r in self.results if r["backend"] == backend and r["precision"] == prec]
            if "concurrency" in rows[0]:
                _plot_server(ax, backend, prec, rows)
                continue
            for batch in sorted({r["batch"] for r in rows}):
                pts = sorted((r["macs"] / 1e9, r["median_ms"] / batch, r["model"])
                             for r in rows if r["batch"] == batch and r["macs"])
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"batch {batch}")
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("GMACs per image")
            ax.set_ylabel("median latency per image (ms)")
            ax.set_title(f"{backend} ({prec})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike, plot: bool = True) -> Path:
        """Write report.json, report.md, report.csv (and latency.png) into `out_dir`, each atomically."""
        out = Path(out_dir)
        write_json(out / "report.json", self.to_dict())
        write_text(out / "report.md", self.to_markdown())
        write_text(out / "report.csv", self.to_csv())
        if plot and self.results:
            try:
                self.plot(out / "latency.png")
            except BenchError as e:  # edge devices may lack matplotlib: say so, keep the tables
                self.config.setdefault("notes", []).append(str(e))
                write_json(out / "report.json", self.to_dict())
        return out


def _server_table(backend: str, prec: str, rows: list[dict[str, Any]]) -> list[str]:
    """Served models: latency percentiles and throughput per concurrency level, ratios vs the baseline."""
    lines = [f"### {backend} ({prec}), requests of batch {rows[0]['batch']}", "",
             "| model | concurrency | p50 ms | p90 ms | p99 ms | img/s | requests | server batch | speedup "
             "| MAC red. |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["model"])):
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} "
                     f"| {r['p99_ms']:.2f} | {r['throughput']:.1f} | {r['requests']} "
                     f"| {_fmt(r.get('server_batch'), 1, 2)} | {_fmt(r['speedup'], 1, 2)} "
                     f"| {_fmt(r['mac_reduction'], 1, 2)} |")
    return lines + [""]


def _plot_server(ax, backend: str, prec: str, rows: list[dict[str, Any]]) -> None:
    """Throughput vs concurrency, one line per served model."""
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["concurrency"], r["throughput"]) for r in rows if r["model"] == model)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=model)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight (concurrency)")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(f"{backend} ({prec})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _sci(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def _fmt(v, scale: float, digits: int) -> str:
    return "—" if v is None else f"{v / scale:.{digits}f}"
