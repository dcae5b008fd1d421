"""`benchmark()`: time models on backends the way trtexec / onnxruntime_perf_test do.

Per backend and batch size: every model's session is created and run once (both timed on their
own), then warmed up for at least `warmup_iters` runs and `warmup_seconds`. The timed loop then
goes round by round — model A for ~`round_seconds`, then B, then A again ... — until every model
has at least `min_iters` runs *and* `min_seconds` of timed work, so machine drift (other jobs,
thermal state) hits all models alike. Ratios are taken against the first model (the baseline).
`measure_cells` interleaves any (model, backend, precision) cells the same way (e.g. every runtime
and precision of a deployment matrix in one loop). Every row not timed on ORT CPU carries its
parity against ORT CPU fp32 on the same ONNX file (max abs logit difference, top-1 agreement).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..configs import opt
from ..errors import BenchError, P3BError
from .backends import PRECISIONS, Backend, Runner, create_backend
from .report import BenchReport
from .models import ModelSource, resolve
from .stats import latency_stats
from .sysinfo import apply_threads, system_info


@dataclass
class BenchConfig:
    """Settings of one benchmark run (saved in the report)."""
    backends: tuple[str, ...] = opt(("ort-cpu",), "registry names or --providers aliases", cli=False)
    batches: tuple[int, ...] = opt((1,), "batch sizes, e.g. 1,8,32", flag="--batch")
    precision: str = opt("fp32", "fp32; fp16/bf16 = AMP on torch, fp16 ONNX file or TensorRT fp16 on ORT",
                         choices=PRECISIONS)
    threads: Optional[int] = opt(None, "CPU threads for torch, OMP/MKL and ORT intra-op (default: library defaults)")
    warmup_seconds: float = opt(1.0, "minimum warm-up time per model")
    warmup_iters: int = opt(3, "minimum warm-up runs per model")
    min_iters: int = opt(10, "minimum timed runs per model")
    min_seconds: float = opt(2.0, "minimum timed seconds per model")
    round_seconds: float = opt(0.2, "how long one model runs before the next one's turn")
    transfer_iters: int = opt(10, "host<->device copy timings on GPU backends", cli=False)
    work_dir: Optional[str] = opt(None, "keep the ONNX files exported for non-ONNX models here (default: temp, "
                                        "deleted)", flag="--keep-onnx", metavar="DIR")

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise BenchError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.backends:
            raise BenchError("no backend selected")
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise BenchError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")
        for k in ("warmup_seconds", "min_seconds", "round_seconds"):
            if getattr(self, k) < 0:
                raise BenchError(f"{k} must be >= 0")
        if self.min_iters < 1 or self.warmup_iters < 0:
            raise BenchError("min_iters must be >= 1 and warmup_iters >= 0")


def benchmark(models: Sequence[Any] | Mapping[str, Any], backends: Sequence[str] = ("ort-cpu",),
              batches: Sequence[int] = (1,), threads: int | None = None, warmup_seconds: float = 1.0,
              min_iters: int = 10, min_seconds: float = 2.0, precision: str = "fp32", warmup_iters: int = 3,
              round_seconds: float = 0.2, work_dir: str | os.PathLike | None = None) -> BenchReport:
    """Time every model on every backend and batch size; the first model is the baseline.

    `models`: .onnx paths, slim dirs, run dirs, timm names or nn.Modules (a mapping gives labels).
    Backends that cannot run here are listed in `report.skipped` with the reason."""
    cfg = BenchConfig(backends=tuple(backends), batches=tuple(int(b) for b in batches), precision=precision,
                      threads=threads, warmup_seconds=warmup_seconds, warmup_iters=warmup_iters,
                      min_iters=min_iters, min_seconds=min_seconds, round_seconds=round_seconds,
                      work_dir=None if work_dir is None else str(work_dir))
    cfg.validate()
    apply_threads(cfg.threads)
    sources = _resolve_all(models)
    backend_objs = [create_backend(b) for b in cfg.backends]
    with tempfile.TemporaryDirectory(prefix="p3b-bench-") as tmp:
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, skipped = [], []
        for backend in backend_objs:
            reason = backend.unavailable(cfg.precision)
            if reason:
                skipped += [_skip(s.label, backend.name, None, reason) for s in sources]
                continue
            for batch in cfg.batches:
                r, k = _measure(backend, sources, batch, cfg, work)
                results += r
                skipped += k
    _add_ratios(results, sources[0].label)
    return BenchReport(system=system_info(cfg.threads), config=asdict(cfg), models=[s.info() for s in sources],
                       results=results, skipped=skipped)


def _resolve_all(models) -> list[ModelSource]:
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if not items:
        raise BenchError("no MODEL given")
    sources, seen = [], {}
    for label, m in items:
        s = resolve(m, label)
        n = seen.get(s.label, 0)
        seen[s.label] = n + 1
        if n:
            s.label = f"{s.label}#{n + 1}"
        sources.append(s)
    return sources


def _skip(model: str, backend: str, batch: int | None, reason: str) -> dict[str, Any]:
    return {"model": model, "backend": backend, "batch": batch, "reason": reason}


# --------------------------------------------------------------------------------------------
# Memory (Linux /proc; peak RSS is resettable per model via clear_refs)
# --------------------------------------------------------------------------------------------
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux KiB; process lifetime peak
    return None


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# One backend x batch: prepare every model, then interleave
# --------------------------------------------------------------------------------------------
@dataclass
class _Live:
    src: ModelSource  # the model
    runner: Runner  # its prepared session
    record: dict[str, Any]  # setup measurements
    backend: str = ""  # registry name
    precision: str = "fp32"  # requested precision
    times: list[float] = field(default_factory=list)  # timed iterations, ms
    per_iter_ms: float = 1.0  # warm-up estimate of one run


PARITY_IMAGES = 32  # random images compared against ORT CPU fp32 per row


def _prepare(backend: Backend, src: ModelSource, batch: int, cfg: BenchConfig, work: Path,
             precision: str | None = None) -> _Live:
    precision = precision or cfg.precision
    if backend.needs == "onnx":
        src.ensure_onnx(work)
    elif backend.needs == "torch":
        src.module()
    elif backend.needs in ("pte", "tflite") and src.onnx_path is not None:
        src.ensure_onnx(work)  # MACs and input size from the ONNX file exported with the .pte
    rss0 = _status_mb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    runner = backend.prepare(src, batch, precision, cfg.threads, work)
    create_s = time.perf_counter() - t0
    first_ms = runner.step()
    warm, t_start = [], time.perf_counter()
    while len(warm) < cfg.warmup_iters or time.perf_counter() - t_start < cfg.warmup_seconds:
        warm.append(runner.step())
    peak = _status_mb("VmHWM")
    rec = {"create_s": create_s, "first_run_ms": first_ms, "warmup_iters": len(warm),
           "peak_rss_mb": peak, "rss_delta_mb": None if peak is None or rss0 is None else peak - rss0,
           "gpu_mem_mb": runner.device_memory() if runner.device_memory else None,
           "providers": runner.info.get("providers") or [runner.info.get("device", backend.name)],
           "backend_info": runner.info}
    est = float(np.median(warm)) if warm else first_ms
    return _Live(src=src, runner=runner, record=rec, backend=backend.name, precision=precision,
                 per_iter_ms=max(est, 1e-3))


def _measure(backend: Backend, sources: list[ModelSource], batch: int, cfg: BenchConfig,
             work: Path) -> tuple[list[dict], list[dict]]:
    return measure_cells([(s, backend, cfg.precision) for s in sources], batch, cfg, work)


def measure_cells(cells: Sequence[tuple[ModelSource, Backend, str]], batch: int, cfg: BenchConfig,
                  work: Path) -> tuple[list[dict], list[dict]]:
    """Prepare every (model, backend, precision) cell at `batch`, then time them all interleaved.
    Returns (records, skipped); a cell whose backend cannot run it is skipped with the reason."""
    live, skipped = [], []
    for src, backend, precision in cells:
        reason = backend.unavailable(precision)
        if reason:
            skipped.append(_skip(src.label, backend.name, batch, reason))
            continue
        try:
            live.append(_prepare(backend, src, batch, cfg, work, precision))
        except P3BError as e:
            skipped.append(_skip(src.label, backend.name, batch, str(e)))
        except Exception as e:  # noqa: BLE001 — a backend failure must be reported, not crash the run
            skipped.append(_skip(src.label, backend.name, batch,
                                 f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"))
    try:
        _interleave(live, cfg)
        return [_record(l, l.backend, batch, cfg) for l in live], skipped
    finally:
        for l in live:
            l.runner.close()


def _interleave(live: list[_Live], cfg: BenchConfig) -> None:
    """A B A B ...: each model runs ~round_seconds per turn until all meet min iters and seconds.
    A turn's run count comes from the model's latest timed runs (its warm-up estimate only for the
    first turn), so one slow warm-up run cannot shrink its turns to a single run for good."""
    def done(l: _Live) -> bool:
        return len(l.times) >= cfg.min_iters and sum(l.times) / 1e3 >= cfg.min_seconds
    while live and not all(done(l) for l in live):
        for l in live:
            k = max(1, int(cfg.round_seconds * 1e3 / l.per_iter_ms))
            for _ in range(k):
                l.times.append(l.runner.step())
            l.per_iter_ms = max(float(np.median(l.times[-k:])), 1e-3)


def _parity(l: _Live, batch: int) -> dict[str, Any]:
    """Max abs logit difference and top-1 agreement vs ORT CPU fp32 on the same ONNX file, on
    PARITY_IMAGES seeded random images (empty for ORT CPU fp32 itself and where no file exists)."""
    none = {"parity_max_abs_diff": None, "parity_top1_agreement": None, "parity_images": None}
    if (l.backend == "ort-cpu" and l.precision == "fp32") or l.runner.infer is None or l.src.onnx_path is None:
        return none
    from ..onnx_io import load_onnx_session
    try:
        sess, _ = load_onnx_session(l.src.onnx_path, threads=1)
        inp = sess.get_inputs()[0]
        if "float16" in inp.type:
            return none
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((batch, *l.src.input_shape)).astype(np.float32)
              for _ in range(max(1, -(-PARITY_IMAGES // batch)))]
        ref = np.concatenate([sess.run(None, {inp.name: x})[0] for x in xs]).astype(np.float64)
        got = np.concatenate([l.runner.infer(x) for x in xs]).astype(np.float64)
    except Exception as e:  # noqa: BLE001 — parity is reported, never fatal to the timing
        return {**none, "parity_error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
    return {"parity_max_abs_diff": float(np.abs(got - ref).max()),
            "parity_top1_agreement": 100.0 * float((got.argmax(1) == ref.argmax(1)).mean()), "parity_images": len(ref)}


def _record(l: _Live, backend: str, batch: int, cfg: BenchConfig) -> dict[str, Any]:
    rec = {"model": l.src.label, "backend": backend, "precision": l.precision, "batch": batch,
           "inference_precision": l.runner.info.get("inference_precision"), **_parity(l, batch),
           **latency_stats(l.times, batch), "macs": l.src.macs, "params": l.src.params,
           "onnx_macs": (l.src.onnx_counts or {}).get("macs"), **l.record}
    if l.runner.transfer is not None:
        tr = [l.runner.transfer() for _ in range(cfg.transfer_iters)]
        rec["h2d_ms"] = float(np.median([t["h2d_ms"] for t in tr]))
        rec["d2h_ms"] = float(np.median([t["d2h_ms"] for t in tr]))
    else:
        rec["h2d_ms"] = rec["d2h_ms"] = None
    return rec


def _add_ratios(results: list[dict], baseline: str) -> None:
    """speedup = base median / median; mac_reduction = base MACs / MACs; efficiency = their quotient."""
    base = {(r["backend"], r["precision"], r["batch"]): r for r in results if r["model"] == baseline}
    for r in results:
        b = base.get((r["backend"], r["precision"], r["batch"]))
        r["speedup"] = b["median_ms"] / r["median_ms"] if b else None
        r["mac_reduction"] = b["macs"] / r["macs"] if b and b["macs"] and r["macs"] else None
        r["speedup_efficiency"] = (r["speedup"] / r["mac_reduction"]
                                   if r["speedup"] is not None and r["mac_reduction"] else None)
