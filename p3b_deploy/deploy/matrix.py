"""The deployment matrix: models (dense, slim, ...) x deployment targets x batch sizes.

A *target* is one runtime x precision on one deployable file variant (`p3b_deploy.targets`).
`deployment_files` exports only the file variants the targets need (through `export_onnx`, each
verified); `deployment_matrix` times every (model, target) cell of one batch size interleaved in
one loop (`runner.measure_cells`) and adds, per (model, target), top-1 / agreement / max abs logit
difference vs the same model's ORT fp32 output on the val images. Ratios are taken against the
first model on ORT fp32 (timed in every matrix, the reference of every ratio). A target that
cannot run here (backend missing, export refused) is a skipped row with its reason, never a crash.
It sits above both export/ and bench/ (it exports and it measures). No torch import at module
level (the export step imports it).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..bench.backends import create_backend
from ..bench.models import resolve
from ..bench.runner import BenchConfig, measure_cells
from ..bench.sysinfo import apply_threads, system_info
from ..errors import BenchError, P3BError
from ..io import write_json, write_text
from ..targets import REFERENCE, TARGETS, Target, needs_calibration, targets_of  # noqa: F401 (re-exported)

_log = logging.getLogger(__name__)


ACCURACY_BATCH = 32  # val images run through each runtime this many at a time (last batch padded)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
class DeployFiles(dict):
    """{(model, variant): Path} of the exported files; `.failed` maps (model, variant) to the
    one-line reason its export was refused."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[tuple[str, str], str] = {}


def deployment_files(models: Mapping[str, Any], targets: str | Iterable[str], work_dir: str | os.PathLike,
                     input_size: Sequence[int], val: tuple[Any, Any] | None = None, calibration: Any = None,
                     export_options: Mapping[str, Any] | None = None, reuse: bool = False) -> DeployFiles:
    """Export the file variants `targets` need for every model into `work_dir`, all verified.

    `val` = (images, labels or None) verifies and gates the int8 files (top-1 within 1 point of
    fp32 with labels; without labels the int8 gate is off, the matrix reports the agreement);
    `calibration` (training images) calibrates static int8. An export that fails with a P3BError
    lands in `.failed`, not raised. `reuse` keeps files already in `work_dir` (same names)."""
    from ..export import export_onnx
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    need = {t.variant for t in [*targets_of(targets), TARGETS[REFERENCE]]}
    x, y = val if val is not None else (None, None)
    opts = {"verify_batches": (1, 2), "profile_runs": 1, "profile_batch": 1,
            "int8_max_drop": 1.0 if y is not None else 100.0, **dict(export_options or {})}
    verify = {} if x is None else {"verify_data": x[:256], "verify_labels": None if y is None else y[:256]}
    files = DeployFiles()

    def export(name: str, model: Any, stem: str, variant: str, made: Path, **kw: Any) -> bool:
        out = work / f"{stem}.onnx"
        if not (reuse and made.is_file()):
            try:
                export_onnx(model, out, input_size=input_size, **verify, **opts, **kw)
            except P3BError as e:
                files.failed[(name, variant)] = str(e)
                return False
        files[(name, variant)] = made
        files.setdefault((name, "fp32"), out)  # every export also wrote (and verified) the fp32 file
        return True

    for name, model in models.items():
        for mode in ("static", "dynamic"):
            if f"int8-{mode}" in need:
                stem = f"{name}-{mode}"
                export(name, model, stem, f"int8-{mode}", work / f"{stem}.int8.onnx", int8=mode,
                       calibration_data=calibration if mode == "static" else None)
        if "fp32" in need and (name, "fp32") not in files:
            export(name, model, name, "fp32", work / f"{name}.onnx")
        if "pte-int8" in need:  # also writes (and verifies) the fp32 .pte of the same stem
            if export(name, model, f"{name}-pte", "pte-int8", work / f"{name}-pte.int8.pte", format="executorch",
                      int8="static", calibration_data=calibration) and (work / f"{name}-pte.pte").is_file():
                files[(name, "pte")] = work / f"{name}-pte.pte"
        if "pte" in need and (name, "pte") not in files:
            export(name, model, f"{name}-pte", "pte", work / f"{name}-pte.pte", format="executorch")
        if "tflite-int8" in need:  # one export writes both .tflite files (fp32 verified, int8 gated)
            if export(name, model, f"{name}-litert", "tflite-int8", work / f"{name}-litert.int8.tflite",
                      format="litert", int8="static", calibration_data=calibration):
                files[(name, "tflite")] = work / f"{name}-litert.tflite"
        if "tflite" in need and (name, "tflite") not in files:
            export(name, model, f"{name}-litert", "tflite", work / f"{name}-litert.tflite", format="litert")
    return files


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
FORMAT = "p3b-deploy-matrix"
VERSION = 1


@dataclass
class MatrixReport:
    """One deployment matrix: a row per model x target x batch (skipped rows carry `skipped`)."""
    rows: list[dict[str, Any]]  # see _row(); median_ms etc. None where skipped
    system: dict[str, Any]  # CPU, versions, threads, date (sysinfo.system_info)
    config: dict[str, Any]  # models, targets, batches, timing settings, val images, labels
    notes: list[str] = field(default_factory=list)  # what the reader should know

    @property
    def baseline(self) -> str:
        return self.config["models"][0]

    def row(self, model: str, target: str, batch: int) -> dict[str, Any]:
        """The row of one cell (KeyError if the matrix has none)."""
        for r in self.rows:
            if (r["model"], r["target"], r["batch"]) == (model, target, batch):
                return r
        raise KeyError((model, target, batch))

    def best(self, model: str, batch: int, max_drop: float = 1.0) -> dict[str, Any] | None:
        """The fastest measured row of `model` at `batch` whose val top-1 is at most `max_drop`
        points below the model's ORT fp32 top-1 (any measured row when there are no labels)."""
        rs = [r for r in self.rows if r["model"] == model and r["batch"] == batch and r["speedup"] is not None]
        ref = next((r for r in rs if r["target"] == REFERENCE), None)
        if ref is not None and ref["top1"] is not None:
            rs = [r for r in rs if r["top1"] is not None and r["top1"] >= ref["top1"] - max_drop]
        return max(rs, key=lambda r: r["speedup"], default=None)

    def best_lines(self, max_drop: float = 1.0) -> list[str]:
        """'best deployable' per non-baseline model and batch: fastest target within max_drop points."""
        out = []
        for model in self.config["models"][1:]:
            for batch in self.config["batches"]:
                b = self.best(model, batch, max_drop)
                if b is None:
                    out.append(f"- {model}, batch {batch}: no target measured")
                    continue
                ref = next((r for r in self.rows if (r["model"], r["target"], r["batch"]) == (model, REFERENCE, batch)),
                           None)
                acc = ("" if b["top1"] is None or ref is None or ref["top1"] is None else
                       f"; top-1 {b['top1']:.2f}% vs {model} ORT fp32 {ref['top1']:.2f}% (targets more than "
                       f"{max_drop:g} point below are excluded)")
                out.append(f"- {model}, batch {batch}: best {model} deployable = {b['label']}, {b['speedup']:.2f}x "
                           f"faster than {self.baseline} ORT fp32 (agreement with {model} ORT fp32 "
                           f"{_f(b['agreement'], '.1f')}%{acc})")
        return out

    # ---------------------------------------------------------------- renderings
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "system": self.system, "config": self.config,
                "rows": self.rows, "best": self.best_lines(), "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MatrixReport":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BenchError("not a p3b-deploy deployment matrix (matrix.json)")
        return cls(rows=d["rows"], system=d["system"], config=d["config"], notes=d.get("notes", []))

    def to_markdown(self, title: str | None = "Deployment matrix") -> str:
        s, c = self.system, self.config
        lines = [f"# {title}", ""] if title else []
        lines += [f"Date {s.get('date')}; CPU {s.get('cpu')}; threads {c.get('threads') or 'default'}; "
                  + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()), "",
                  f"Every cell of one batch size timed interleaved in one loop; speedup vs {self.baseline} on ORT "
                  f"fp32 (same batch); top-1 / agreement / max abs logit diff vs the same model's ORT fp32 output on "
                  f"{c.get('val_images')} val images{'' if c.get('labels') else ' (no labels: top-1 not measured)'}.",
                  "", "| model | target | computes | batch | median ms | CV | speedup | top-1 % | agreement % "
                  "| max abs diff | file MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            if r["skipped"]:
                lines.append(f"| {r['model']} | {r['label']} | — | {r['batch']} | skipped: {r['skipped']} |||||||")
                continue
            lines.append(f"| {r['model']} | {r['label']} | {_computes(r)} | {r['batch']} | {r['median_ms']:.3f} "
                         f"| {100 * (r['cv'] or 0):.0f}% | {_f(r['speedup'], '.2f')}x | {_f(r['top1'], '.2f')} "
                         f"| {_f(r['agreement'], '.1f')} | {_f(r['max_abs_diff'], '.1e')} "
                         f"| {_f(r['size_bytes'] and r['size_bytes'] / 1e6, '.2f')} |")
        lines += ["", *self.best_lines(), *[f"\nNote: {n}" for n in self.notes], ""]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Speedup bars per target, one panel per batch size, one bar per model."""
        return plot_reports({"": self}, path)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """matrix.json, matrix.md, matrix.png in out_dir (each written to a temp file, then renamed)."""
        d = Path(out_dir)
        write_json(d / "matrix.json", self.to_dict())
        write_text(d / "matrix.md", self.to_markdown())
        self.plot(d / "matrix.png")
        return d


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _computes(r: dict[str, Any]) -> str:
    if r["variant"].startswith("int8"):
        return f"int8 {r['variant'][5:]}" + (f", {r['computes']} hint" if r["computes"] else "")
    if r["variant"] in ("pte-int8", "tflite-int8"):  # XNNPACK PT2E static int8 (ExecuTorch, LiteRT)
        return "int8 static"
    return r["computes"] or r["precision"]


def plot_reports(reports: Mapping[str, MatrixReport], path: str | os.PathLike) -> Path:
    """One row of panels per report (title prefix = its key), one panel per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_path
    batches = sorted({b for rep in reports.values() for b in rep.config["batches"]})
    fig, axes = plt.subplots(len(reports), len(batches), figsize=(6 * len(batches), 0.5 + 3.3 * len(reports)),
                             squeeze=False)
    for i, (name, rep) in enumerate(reports.items()):
        labels = [TARGETS[t].label if t in TARGETS else t for t in rep.config["targets"]]
        models = rep.config["models"]
        h = 0.8 / max(1, len(models))
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for k, m in enumerate(models):
                v = [next((r["speedup"] or 0 for r in rep.rows if (r["model"], r["target"], r["batch"]) == (m, t, b)),
                          0) for t in rep.config["targets"]]
                ax.barh(np.arange(len(labels)) + h * k, v, height=h, label=m)
            measured = {r["target"] for r in rep.rows if r["batch"] == b and r["speedup"] is not None}
            ticks = [lab if t in measured else f"{lab} (skipped)" for t, lab in zip(rep.config["targets"], labels)]
            ax.set_yticks(np.arange(len(labels)) + 0.4 - h / 2, ticks, fontsize=7)
            ax.axvline(1.0, color="k", lw=0.5)
            ax.set_xlabel(f"speedup vs {rep.baseline} ORT fp32")
            ax.set_title(f"{name + ', ' if name else ''}batch {b}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------
def deployment_matrix(models: Mapping[str, Any], targets: str | Iterable[str], batches: Sequence[int], *,
                      val: tuple[Any, Any], work_dir: str | os.PathLike, calibration: Any = None,
                      threads: int | None = None, input_size: Sequence[int] | None = None,
                      min_seconds: float = 2.0, warmup_seconds: float = 1.0, min_iters: int = 10,
                      export_options: Mapping[str, Any] | None = None, reuse: bool = False,
                      progress: Callable[[str], None] | None = None) -> MatrixReport:
    """Export, time and check every model on every target at every batch size.

    `models`: {name: nn.Module}, the first is the baseline (e.g. {"dense": ..., "slim": ...});
    `val` = (images, labels or None), preprocessed; files go to `work_dir`. ORT fp32 is always
    in the matrix: it is the reference of every ratio and every agreement."""
    say = progress or _log.info
    names = [t.name for t in targets_of(targets)]
    names = names if REFERENCE in names else [REFERENCE, *names]
    tgts = [TARGETS[n] for n in names]
    batches = [int(b) for b in batches]
    if not models:
        raise BenchError("no model given")
    if not batches or min(batches) < 1:
        raise BenchError(f"batch sizes must be >= 1, got {batches}")
    cfg = BenchConfig(threads=threads, warmup_seconds=warmup_seconds, min_iters=min_iters, min_seconds=min_seconds)
    cfg.validate()
    apply_threads(threads)
    x, y = val
    size = tuple(input_size) if input_size is not None else tuple(int(d) for d in x.shape[1:])
    say(f"exporting the file variants of {len(tgts)} targets for {len(models)} models")
    litert = {"litert_batches": tuple(batches)}  # a .tflite has one signature per batch it is timed at
    files = deployment_files(models, names, work_dir, size, val=val, calibration=calibration,
                             export_options={**litert, **dict(export_options or {})}, reuse=reuse)
    rows = []
    for b in batches:
        say(f"batch {b}: timing {len(models) * len(tgts)} cells interleaved")
        rows += _time_batch(list(models), tgts, files, b, cfg, Path(work_dir))
    _add_speedups(rows, next(iter(models)))
    say("top-1 / agreement of every measured file on its runtime")
    _add_accuracy(rows, files, x, y, threads, Path(work_dir))
    config = {"models": list(models), "targets": names, "batches": batches, "threads": threads,
              "min_seconds": min_seconds, "warmup_seconds": warmup_seconds, "min_iters": min_iters,
              "input_size": list(size), "val_images": int(len(x)), "labels": y is not None,
              "work_dir": str(work_dir), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    notes = [] if y is not None else ["no labels: the int8 files were not gated on accuracy; agreement with the "
                                      "same model's ORT fp32 output is the only accuracy signal"]
    return MatrixReport(rows=rows, system=system_info(threads), config=config, notes=notes)


def _row(model: str, t: Target, batch: int, path: Path | None, skipped: str | None) -> dict[str, Any]:
    return {"model": model, "target": t.name, "label": t.label, "variant": t.variant, "backend": t.backend,
            "precision": t.precision, "batch": batch, "file": None if path is None else str(path),
            "size_bytes": path.stat().st_size if path is not None and path.is_file() else None,
            "median_ms": None, "p90_ms": None, "cv": None, "iters": None, "computes": None, "speedup": None,
            "top1": None, "agreement": None, "max_abs_diff": None, "images": None, "skipped": skipped}


def _time_batch(models: list[str], tgts: list[Target], files: DeployFiles, batch: int, cfg: BenchConfig,
                work: Path) -> list[dict[str, Any]]:
    """Rows of every (model, target) at `batch`; the runnable cells timed in one interleaved loop."""
    rows, cells = [], []
    for m in models:
        for t in tgts:
            path = files.get((m, t.variant))
            reason = files.failed.get((m, t.variant)) if path is None else None
            row = _row(m, t, batch, path, None)
            try:
                if reason is not None:
                    raise BenchError(f"export failed: {reason}")
                cells.append(((resolve(str(path), f"{m}/{t.name}"), create_backend(t.backend), t.precision), row))
            except P3BError as e:
                row["skipped"] = str(e)
            rows.append(row)
    recs, skipped = measure_cells([c for c, _ in cells], batch, cfg, work)
    by_label = {r["model"]: r for r in recs}
    reasons = {k["model"]: k["reason"] for k in skipped}
    for (src, _, _), row in cells:
        r = by_label.get(src.label)
        if r is None:
            row["skipped"] = reasons.get(src.label, "not measured")
            continue
        row.update(median_ms=r["median_ms"], p90_ms=r["p90_ms"], cv=r["cv"], iters=r["iters"],
                   computes=r.get("inference_precision"))
    return rows


def _add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    base = {r["batch"]: r["median_ms"] for r in rows if r["model"] == baseline and r["target"] == REFERENCE}
    for r in rows:
        b = base.get(r["batch"])
        r["speedup"] = b / r["median_ms"] if b and r["median_ms"] else None


def logits_on(backend: str, precision: str, path: str | os.PathLike, x: Any, work: Path, threads: int | None,
              batch: int = ACCURACY_BATCH) -> np.ndarray:
    """Logits of every image of `x` from the file `path` on (backend, precision), `batch` images at
    a time (the last batch zero-padded: one compiled shape serves every call)."""
    be = create_backend(backend)
    reason = be.unavailable(precision)
    if reason:
        raise BenchError(reason)
    src = resolve(str(path))
    if be.needs == "onnx":
        src.ensure_onnx(work)
    if be.needs == "tflite":  # a .tflite runs only the batches it has signatures for: its largest
        from ..litert_io import load_tflite
        batch = max(load_tflite(src.ensure_tflite()).batches)
    runner = be.prepare(src, batch, precision, threads, work)
    if runner.infer is None:
        raise BenchError(f"the {backend} backend cannot return logits")
    xs = np.asarray(x, dtype=np.float32)
    out = []
    try:
        for i in range(0, len(xs), batch):
            chunk = xs[i:i + batch]
            pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)
            out.append(np.asarray(runner.infer(np.concatenate([chunk, pad])))[:len(chunk)])
    finally:
        runner.close()
    return np.concatenate(out).astype(np.float64)


def _add_accuracy(rows: list[dict[str, Any]], files: DeployFiles, x: Any, y: Any, threads: int | None,
                  work: Path) -> None:
    """top1 / agreement / max_abs_diff per (model, target), computed once, vs the model's ORT fp32 logits."""
    labels = None if y is None else np.asarray(y)
    ref = TARGETS[REFERENCE]
    refs: dict[str, np.ndarray] = {}  # model -> its ORT fp32 logits
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["target"])
        if r["skipped"] or key in cache:
            continue
        try:
            if r["model"] not in refs:
                refs[r["model"]] = logits_on(ref.backend, ref.precision, files[(r["model"], "fp32")], x, work, threads)
            base = refs[r["model"]]
            got = base if r["target"] == REFERENCE else logits_on(r["backend"], r["precision"], r["file"], x, work,
                                                                  threads)
            cache[key] = {"images": len(got),
                          "top1": None if labels is None else 100.0 * float((got.argmax(1) == labels).mean()),
                          "agreement": 100.0 * float((got.argmax(1) == base.argmax(1)).mean()),
                          "max_abs_diff": float(np.abs(got - base).max())}
        except Exception as e:  # noqa: BLE001 — an accuracy failure is reported on the row, not fatal
            cache[key] = {"accuracy_error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"}
    for r in rows:
        acc = cache.get((r["model"], r["target"]), {})
        r.update({k: acc.get(k) for k in ("top1", "agreement", "max_abs_diff", "images")})
        if acc.get("accuracy_error"):
            r["accuracy_error"] = acc["accuracy_error"]
