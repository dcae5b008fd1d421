"""Parity of an exported file against the torch model, shared by every format.

The parity inputs (`make_inputs`: random batches, plus real images when given) and the torch
reference (`torch_logits`) are the same for every format. One rule for every non-ONNX runtime the
exporter writes for (`check_against_torch`): on each (label, images, torch logits) case the file's
logits are within `tol` (max abs difference) and its top-1 is identical; any miss refuses the file
in one line naming every failing case.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import ExportConfig


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


def check_against_torch(forward: Callable[[np.ndarray], np.ndarray],
                        reference: Sequence[tuple[str, np.ndarray, np.ndarray]], tol: float,
                        what: str) -> list[dict[str, Any]]:
    """The cases {data, batch, max_abs_diff, top1_agreement}; ExportError ("<what> failed: ...",
    e.g. what = "OpenVINO IR verification of model.xml") if any case misses or there is none."""
    cases, failures = [], []
    for label, x, ref in reference:
        got = np.asarray(forward(x), dtype=np.float64)
        diff = float(np.abs(got - ref).max())
        agr = 100.0 * float((got.argmax(1) == ref.argmax(1)).mean())
        cases.append({"data": label, "batch": len(x), "max_abs_diff": diff, "top1_agreement": agr})
        if diff > tol or agr < 100.0:
            failures.append(f"{label} batch {len(x)}: max |diff| {diff:.3e} (bound {tol:g}), top-1 agreement {agr:.1f}%")
    if not cases:
        failures.append("no parity case to run")
    if failures:
        raise ExportError(f"{what} failed: " + "; ".join(failures))
    return cases
