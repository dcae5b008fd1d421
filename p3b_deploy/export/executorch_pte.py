"""ExecuTorch program (`<stem>.pte`, XNNPACK, fp32) next to an exported ONNX file (`export --format executorch`).

The program is lowered from the same torch model the ONNX file came from (ExecuTorch reads no
ONNX), with the batch dynamic up to `executorch_max_batch` (ExecuTorch plans memory for the upper
bound, so it is not the ONNX file's 4096) or fixed at `--static-batch`, and carries the ONNX
file's metadata_props in its `p3b_metadata` method. It is verified against torch like the ONNX
file: max abs logit difference <= the export tolerance and identical top-1, at every parity
batch, random and real images. Lowering takes about a minute for the demo model on 2 cores.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, P3BError
from ..executorch_io import load_pte, lower, set_threads
from .formats import Format, Job
from .runtime_parity import check_against_torch

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
    bound: float  # the bound it had to meet
    delegated_subgraphs: int = 0  # XNNPACK partitions
    portable_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes outside XNNPACK
    cases: list[dict[str, Any]] = field(default_factory=list)  # {data, batch, max_abs_diff, top1_agreement}


def write_pte(model: Any, path: Path, input_size: tuple[int, int, int], max_batch: int, dynamic: bool,
              metadata: dict[str, str]) -> PteResult:
    """Lower `model` to `path` (not yet verified: see `verify_pte`). ExportError on failure."""
    t0 = time.perf_counter()
    try:
        low = lower(model, input_size, max_batch, dynamic=dynamic, metadata=metadata)
    except P3BError as e:
        raise ExportError(f"--format executorch: {e}") from None
    path.write_bytes(low.buffer)
    return PteResult(path=path, size_bytes=len(low.buffer), max_batch=max_batch, dynamic_batch=dynamic,
                     lower_seconds=round(time.perf_counter() - t0, 1), max_abs_diff=float("nan"), bound=float("nan"),
                     delegated_subgraphs=low.delegated_subgraphs, portable_ops=low.portable_ops)


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


class ExecuTorchFormat(Format):
    """`--format executorch`: the program lowered from the torch model (ExecuTorch reads no ONNX)."""
    name, suffix = "executorch", ".pte"

    def unavailable(self, cfg: Any) -> str | None:
        from ..executorch_io import unavailable
        reason = unavailable()
        return f"--format executorch: {reason}" if reason else None

    def write(self, job: Job) -> PteResult:
        _log.info("lowering to ExecuTorch (XNNPACK); this takes about a minute for a small model")
        cfg = job.cfg
        return write_pte(job.model, job.tmpdir / (job.out.stem + ".pte"), job.input_size,
                         cfg.static_batch or int(cfg.executorch_max_batch), cfg.dynamic_batch, job.metadata)

    def verify(self, job: Job, result: PteResult) -> PteResult:
        """Verified against torch at the parity batches."""
        verify_pte(result, job.reference(), job.cfg.tol, job.cfg.threads)
        result.path = job.out.with_suffix(".pte")
        return result

    def describe(self, result: PteResult) -> list[str]:
        batch = f"batch 1..{result.max_batch}" if result.dynamic_batch else f"batch {result.max_batch}"
        off = ", ".join(f"{k} {v}" for k, v in result.portable_ops.items()) or "none"
        return [f"  executorch: {result.path} [{result.size_bytes / 1e6:.2f} MB, XNNPACK fp32, {batch}, lowered in "
                f"{result.lower_seconds:.0f} s], max |diff| vs torch {result.max_abs_diff:.2e}; "
                f"{result.delegated_subgraphs} XNNPACK partitions, outside XNNPACK: {off}"]


FORMAT = ExecuTorchFormat()
