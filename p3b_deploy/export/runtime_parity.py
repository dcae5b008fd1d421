"""Parity of a non-ONNX deployed file (OpenVINO IR, ExecuTorch .pte) against the torch model.

One rule for every runtime the exporter writes for: on each (label, images, torch logits) case the
file's logits are within `tol` (max abs difference) and its top-1 is identical; any miss refuses
the file in one line naming every failing case.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ExportError


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
