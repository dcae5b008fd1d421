"""Parity of an exported file against the torch model, shared by every format.

The parity inputs (`make_inputs`: random batches, plus real images when given) and the torch
reference (`torch_logits`) are the same for every format. One rule for every non-ONNX runtime the
exporter writes for (`check_against_torch`): on each (label, images, torch logits) case the file's
logits are within `tol` (max abs difference) and its top-1 is identical; any miss refuses the file
in one line naming every failing case. An fp16 / int8 file is held to `top1_gate` instead: its val
top-1 (or, without labels, its top-1 agreement) against fp32's, on `gate_images`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import ExportConfig
    from .formats import Job


@dataclass
class ParityCase:
    """One comparison of an exported file against its reference (torch, or the fp32 file)."""
    data: str  # 'random' or 'real'
    batch: int  # images in the batch (for agreement checks: images compared)
    max_abs_diff: float  # max |logit_onnx - logit_torch|
    bound: float | None  # the bound max_abs_diff had to meet (None = not checked)
    top1_agreement: float  # percent of images with the same top-1 class
    top1_required: float | None  # percent required (None = not checked)
    ok: bool  # both checks passed
    top1: float | None = None  # val top-1 accuracy (percent) of this file, when labels were given
    top1_fp32: float | None = None  # val top-1 of the fp32 file on the same images
    max_drop: float | None = None  # points top1 may be below top1_fp32 (None = not checked)


def make_inputs(cfg: ExportConfig, input_size: tuple[int, int, int],
                real: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    """(label, batch) pairs for the parity checks: random and, when given, real images."""
    import torch
    g = torch.Generator().manual_seed(cfg.seed)
    out = [("random", torch.randn(b, *input_size, generator=g)) for b in cfg.batches()]
    if real is not None:
        for b in cfg.batches():
            if len(real) >= b:
                out.append(("real", real[:b].float().contiguous()))
    return out


def torch_logits(model: Any, x: torch.Tensor) -> np.ndarray:
    """The model's fp64 logits (the first output when it returns several)."""
    import torch
    with torch.no_grad():
        out = model.eval()(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.double().numpy()


def agreement(ref: np.ndarray, got: np.ndarray, tie: float = 0.0) -> float:
    """Percent of rows with the same argmax; rows whose reference top-2 margin is <= `tie` count
    as agreeing (a difference within the tolerance may legitimately flip an exact tie)."""
    same = ref.argmax(1) == got.argmax(1)
    if tie > 0 and ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        same |= (top2[:, 1] - top2[:, 0]) <= tie
    return 100.0 * float(same.mean())


def compare_to_torch(forward: Callable[[np.ndarray], np.ndarray],
                     reference: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """The cases {data, batch, max_abs_diff, top1_agreement} of `forward` on every (label, images,
    torch logits) case, checked against no bound (an int8 file is gated on accuracy instead)."""
    cases = []
    for label, x, ref in reference:
        got = np.asarray(forward(x), dtype=np.float64)
        cases.append({"data": label, "batch": len(x), "max_abs_diff": float(np.abs(got - ref).max()),
                      "top1_agreement": 100.0 * float((got.argmax(1) == ref.argmax(1)).mean())})
    return cases


def check_against_torch(forward: Callable[[np.ndarray], np.ndarray],
                        reference: Sequence[tuple[str, np.ndarray, np.ndarray]], tol: float,
                        what: str) -> list[dict[str, Any]]:
    """The cases of `compare_to_torch`; ExportError ("<what> failed: ...", e.g. what = "OpenVINO
    IR verification of model.xml") if any case misses `tol` or identical top-1, or there is none."""
    cases = compare_to_torch(forward, reference)
    failures = [f"{c['data']} batch {c['batch']}: max |diff| {c['max_abs_diff']:.3e} (bound {tol:g}), top-1 agreement "
                f"{c['top1_agreement']:.1f}%" for c in cases if c["max_abs_diff"] > tol or c["top1_agreement"] < 100.0]
    if not cases:
        failures.append("no parity case to run")
    if failures:
        raise ExportError(f"{what} failed: " + "; ".join(failures))
    return cases


def gate_images(job: Job) -> tuple[torch.Tensor, str]:
    """The images an fp16 / int8 file is gated on, and their kind: the real val images, else
    `agreement_images` seeded random ones (noted in the report as a weak gate)."""
    import torch
    if job.real is not None:
        return job.real, "real"
    cfg = job.cfg
    note = (f"no --data: the fp16/int8 files were gated on top-1 agreement with fp32 on {cfg.agreement_images} "
            "random images only, a weak check of accuracy; pass --data for a val top-1 gate")
    if note not in job.notes:
        job.notes.append(note)
    return torch.randn(cfg.agreement_images, *job.input_size, generator=torch.Generator().manual_seed(cfg.seed + 1)), \
        "random"


def top1_gate(got: np.ndarray, ref32: np.ndarray, labels: Any, data: str, reference: str, precision: str,
              cfg: ExportConfig) -> tuple[ParityCase, list[str]]:
    """The accuracy gate of an fp16 / int8 file, from its logits `got` and the fp32 logits `ref32`
    on the same images: with labels, val top-1 at most `int8_max_drop` (int8) / 100 -
    fp16_min_agreement (fp16) points below fp32's; without labels, top-1 agreement with fp32
    (enforced for int8, and for fp16 on real data). Returns the case and its failures."""
    agr = agreement(ref32, got)
    diff = float(np.abs(got - ref32).max())
    case = ParityCase(f"{data} (agreement vs {reference})", len(got), diff, None, agr, None, ok=True)
    failures: list[str] = []
    hint = " (raise --int8-max-drop to accept)" if precision == "int8" else ""
    if labels is not None:
        y = np.asarray(labels)
        case.top1_fp32 = 100.0 * float((ref32.argmax(1) == y).mean())
        case.top1 = 100.0 * float((got.argmax(1) == y).mean())
        case.max_drop = cfg.int8_max_drop if precision == "int8" else 100.0 - cfg.fp16_min_agreement
        case.ok = case.top1_fp32 - case.top1 <= case.max_drop
        if not case.ok:
            failures.append(f"val top-1 {case.top1:.2f}% is {case.top1_fp32 - case.top1:.2f} points below fp32's "
                            f"{case.top1_fp32:.2f}% on {len(y)} images (at most {case.max_drop:g} allowed){hint}")
    elif precision == "int8" or data == "real":
        case.top1_required = cfg.fp16_min_agreement if precision == "fp16" else 100.0 - cfg.int8_max_drop
        case.ok = agr >= case.top1_required
        if not case.ok:
            failures.append(f"top-1 agreement with fp32 is {agr:.1f}% on {len(got)} {data} images, "
                            f"below the required {case.top1_required:.1f}%{hint}")
    return case, failures
