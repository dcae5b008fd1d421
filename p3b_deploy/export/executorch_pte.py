"""ExecuTorch program (`<stem>.pte`, XNNPACK, fp32) next to an exported ONNX file (`export --format executorch`),
and with `--int8 static --data SPEC` also `<stem>.int8.pte` (XNNPACK int8).

The program is lowered from the same torch model the ONNX file came from (ExecuTorch reads no
ONNX), with the batch dynamic up to `executorch_max_batch` (ExecuTorch plans memory for the upper
bound, so it is not the ONNX file's 4096) or fixed at `--static-batch`, and carries the ONNX
file's metadata_props in its `p3b_metadata` method. It is verified against torch like the ONNX
file: max abs logit difference <= the export tolerance and identical top-1, at every parity
batch, random and real images. Lowering takes about a minute for the demo model on 2 cores.

The int8 program is quantized with XNNPACK's PT2E quantizer (symmetric int8 weights per output
channel, int8 activations calibrated on the same training images as the ONNX static int8 file)
and lowered the same way; it takes and returns float32. Its parity against torch fp32 is reported
(int8 does not meet the fp32 tolerance) and it passes the ONNX int8 files' gate: val top-1 at most
`int8_max_drop` points below fp32's (top-1 agreement without labels), else it is refused.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, P3BError
from ..executorch_io import load_pte, lower, set_threads
from .formats import Format, Job
from .runtime_parity import ParityCase, check_against_torch, compare_to_torch, gate_images, top1_gate, torch_logits

_log = logging.getLogger(__name__)


@dataclass
class PteResult:
    """An ExecuTorch program written and verified by the exporter."""
    path: Path  # final location of the .pte
    size_bytes: int
    max_batch: int  # largest batch the program runs (its fixed batch when static)
    dynamic_batch: bool
    lower_seconds: float  # wall time of torch.export + lowering
    max_abs_diff: float  # max |logit_pte - logit_torch| over every parity case
    bound: float | None  # the bound it had to meet (None: int8, gated on accuracy instead)
    delegated_subgraphs: int = 0  # XNNPACK partitions
    portable_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes outside XNNPACK
    cases: list[dict[str, Any]] = field(default_factory=list)  # {data, batch, max_abs_diff, top1_agreement}
    precision: str = "fp32"  # 'fp32' or 'int8' (PT2E static, XNNPACK)
    gate: ParityCase | None = None  # int8: the accuracy gate vs torch fp32 (val top-1 with labels)
    int8: PteResult | None = None  # the <stem>.int8.pte written next to this one (--int8 static)


def write_pte(model: Any, path: Path, input_size: tuple[int, int, int], max_batch: int, dynamic: bool,
              metadata: dict[str, str], calibration: Any = None) -> PteResult:
    """Lower `model` to `path` (not yet verified: see `verify_pte`), int8 when `calibration`
    images are given. ExportError on failure."""
    t0 = time.perf_counter()
    try:
        low = lower(model, input_size, max_batch, dynamic=dynamic, metadata=metadata, calibration=calibration)
    except P3BError as e:
        raise ExportError(f"--format executorch: {e}") from None
    path.write_bytes(low.buffer)
    return PteResult(path=path, size_bytes=len(low.buffer), max_batch=max_batch, dynamic_batch=dynamic,
                     lower_seconds=round(time.perf_counter() - t0, 1), max_abs_diff=float("nan"), bound=float("nan"),
                     delegated_subgraphs=low.delegated_subgraphs, portable_ops=low.portable_ops,
                     precision="fp32" if calibration is None else "int8")


def verify_pte(res: PteResult, reference: Sequence[tuple[str, np.ndarray, np.ndarray]], tol: float,
               threads: int | None = None) -> PteResult:
    """Run the program on every (label, images, torch logits) case; ExportError on a miss.
    Fills `res`'s parity fields and returns it."""
    path = res.path
    try:
        set_threads(threads)
        prog = load_pte(path)
    except P3BError as e:
        raise ExportError(str(e)) from None
    # a parity batch above the program's batch (static, or a small max) is not its contract
    fits = [case for case in reference if len(case[1]) <= prog.max_batch]
    cases = check_against_torch(prog.forward, fits, tol, f"ExecuTorch verification of {path.name} (batches up to "
                                f"{prog.max_batch})")
    res.max_abs_diff, res.bound, res.cases = max(c["max_abs_diff"] for c in cases), tol, cases
    return res


def verify_pte_int8(res: PteResult, job: Job) -> PteResult:
    """The int8 program: its parity vs torch fp32 at the parity batches (reported, not bounded),
    then the int8 gate on `gate_images` (val top-1 vs torch fp32's); ExportError on a miss."""
    try:
        set_threads(job.cfg.threads)
        prog = load_pte(res.path)
    except P3BError as e:
        raise ExportError(str(e)) from None
    res.cases = compare_to_torch(prog.forward, [c for c in job.reference() if len(c[1]) <= prog.max_batch])
    res.max_abs_diff = max((c["max_abs_diff"] for c in res.cases), default=float("nan"))
    res.bound = None
    images, data = gate_images(job)
    ref32 = np.concatenate([torch_logits(job.model, images[i:i + 32]) for i in range(0, len(images), 32)])
    got = _run_all(prog, images.numpy(), res.dynamic_batch)
    res.gate, failures = top1_gate(got, ref32, job.labels, data, "torch fp32", "int8", job.cfg)
    if failures:
        raise ExportError(f"int8 verification of {res.path.name} failed: " + "; ".join(failures))
    return res


def _run_all(prog: Any, x: np.ndarray, dynamic: bool) -> np.ndarray:
    """Logits of every image, `prog.max_batch` at a time (a fixed-batch program's last batch padded)."""
    b, out = prog.max_batch, []
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        pad = 0 if dynamic else b - len(chunk)
        got = prog.forward(np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk)
        out.append(np.asarray(got, dtype=np.float64)[:len(chunk)])
    return np.concatenate(out)


class ExecuTorchFormat(Format):
    """`--format executorch`: the program lowered from the torch model (ExecuTorch reads no ONNX);
    with `--int8 static` also `<stem>.int8.pte`."""
    name, suffix = "executorch", ".pte"

    def unavailable(self, cfg: Any) -> str | None:
        from ..executorch_io import unavailable
        reason = unavailable()
        if reason:
            return f"--format executorch: {reason}"
        if cfg.int8 == "static" and importlib.util.find_spec("torchao") is None:
            return ("--format executorch --int8 static needs torchao (XNNPACK's PT2E quantizer): run "
                    "`bash scripts/setup_edge.sh` (elsewhere: pip install torchao)")
        return None

    def write(self, job: Job) -> PteResult:
        _log.info("lowering to ExecuTorch (XNNPACK); this takes about a minute for a small model")
        cfg = job.cfg
        batch = cfg.static_batch or int(cfg.executorch_max_batch)
        res = write_pte(job.model, job.tmpdir / (job.out.stem + ".pte"), job.input_size, batch, cfg.dynamic_batch,
                        job.metadata)
        if cfg.int8 == "static":
            _log.info("lowering the int8 program (PT2E static, %d calibration images)", len(job.calibration))
            meta = {**job.metadata, "precision": "int8", "quantization": "static"}
            res.int8 = write_pte(job.model, job.tmpdir / (job.out.stem + ".int8.pte"), job.input_size, batch,
                                 cfg.dynamic_batch, meta, calibration=job.calibration)
        elif cfg.int8:
            job.notes.append(f"--int8 {cfg.int8}: the .pte stays fp32 (an int8 .pte is static: --int8 static --data "
                             "SPEC)")
        return res

    def verify(self, job: Job, result: PteResult) -> PteResult:
        """Verified against torch at the parity batches; the int8 program gated like the ONNX int8 files."""
        verify_pte(result, job.reference(), job.cfg.tol, job.cfg.threads)
        result.path = job.out.with_suffix(".pte")
        if result.int8 is not None:
            verify_pte_int8(result.int8, job)
            result.int8.path = job.out.with_name(job.out.stem + ".int8.pte")
        return result

    def files(self, out: Path, result: PteResult) -> list[Path]:
        return [result.path] + ([] if result.int8 is None else [result.int8.path])

    def describe(self, result: PteResult) -> list[str]:
        batch = f"batch 1..{result.max_batch}" if result.dynamic_batch else f"batch {result.max_batch}"
        off = ", ".join(f"{k} {v}" for k, v in result.portable_ops.items()) or "none"
        lines = [f"  executorch: {result.path} [{result.size_bytes / 1e6:.2f} MB, XNNPACK fp32, {batch}, lowered in "
                 f"{result.lower_seconds:.0f} s], max |diff| vs torch {result.max_abs_diff:.2e}; "
                 f"{result.delegated_subgraphs} XNNPACK partitions, outside XNNPACK: {off}"]
        q = result.int8
        if q is not None:
            g = q.gate
            acc = f", val top-1 {g.top1:.2f}% (torch fp32 {g.top1_fp32:.2f}%)" if g.top1 is not None else ""
            lines.append(f"  executorch int8 static: {q.path} [{q.size_bytes / 1e6:.2f} MB, XNNPACK int8 (PT2E), "
                         f"lowered in {q.lower_seconds:.0f} s], max |diff| vs torch fp32 {q.max_abs_diff:.2e}, top-1 "
                         f"agreement {g.top1_agreement:.1f}% on {g.batch} {g.data.split(' ')[0]} images{acc}; "
                         f"{q.delegated_subgraphs} XNNPACK partitions")
        return lines


FORMAT = ExecuTorchFormat()
