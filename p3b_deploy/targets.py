"""Deployment targets: the one name for "this file variant on this runtime at this precision".

A target is the unit that a latency table is measured on, that a plan is priced for, that an export
produces a file for and that the deployment matrix times. The names are declared once here
(`TARGETS`) and every command that takes one (`latency-table --target`, `prune --target`,
`run --target` / `--targets`, `export --target`, `bench --target`) looks it up with `get_target`.
`Target.check()` refuses, in one line and before any work, a target whose runtime is not installed
here. This module imports no torch (and nothing of the package but errors): it runs on a device with
only onnxruntime and numpy.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Iterable

from .errors import P3BError


class TargetError(P3BError):
    """An unknown deployment target, or one that cannot run here."""


# runtime -> (python modules it needs, how to get them)
RUNTIMES: dict[str, tuple[tuple[str, ...], str]] = {
    "ort": (("onnxruntime",), "pip install onnxruntime"),
    "openvino": (("openvino",), "pip install openvino (or the extra .[openvino])"),
    "executorch": (("executorch", "torch"), "run bash scripts/setup_edge.sh and use .venv-edge/bin/python"),
    "litert": (("ai_edge_litert",), "run bash scripts/setup_edge.sh and use .venv-edge/bin/python"),
}
# file variants of the ONNX family (what `export` writes next to model.onnx), by quantization
ONNX_VARIANTS = {"fp32": None, "int8-dynamic": "dynamic", "int8-static": "static"}


@dataclass(frozen=True)
class Target:
    """One deployment target: which file variant runs on which runtime at which precision, with
    how many threads at which batch size (threads/batch: the defaults a command uses unless told)."""
    name: str  # registry key, e.g. "ort-int8"
    runtime: str  # "ort", "openvino", "executorch" or "litert" (RUNTIMES)
    variant: str  # file variant: fp32 / int8-dynamic / int8-static (ONNX files), pte / pte-int8 (ExecuTorch)
    #               or tflite / tflite-int8 (LiteRT)
    backend: str  # bench backend registry name (p3b_deploy.bench.backends)
    precision: str  # precision requested from the backend ("fp32", "bf16": what the runtime computes in)
    label: str  # table label
    threads: int | None = 1  # runtime threads (None = the runtime's default)
    batch: int = 1  # batch size a latency table / promise is priced at

    @property
    def int8(self) -> str | None:
        """'dynamic' / 'static' for an int8 file variant (ONNX, .pte or .tflite), else None."""
        if self.variant in ONNX_VARIANTS:
            return ONNX_VARIANTS[self.variant]
        return "static" if self.variant.endswith("-int8") else None

    @property
    def export_format(self) -> str:
        """The `export --format` that writes this target's file (int8 ONNX files run on OpenVINO too)."""
        if self.runtime == "ort" or (self.runtime == "openvino" and self.int8):
            return "onnx"
        return self.runtime

    @property
    def runs_onnx(self) -> bool:
        """Whether the target runs an ONNX file (so latency probes can be timed on it as they are)."""
        return self.variant in ONNX_VARIANTS

    def with_settings(self, threads: int | None = None, batch: int | None = None) -> "Target":
        """The same target at other threads / batch (None keeps the current value)."""
        return replace(self, threads=self.threads if threads is None else int(threads),
                       batch=self.batch if batch is None else int(batch))

    def unavailable(self) -> str | None:
        """Why this target cannot run here (its runtime is not installed), or None."""
        mods, how = RUNTIMES[self.runtime]
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        if missing:
            return f"target {self.name}: {missing[0]} is not installed here ({how})"
        return None

    def check(self) -> "Target":
        """Refuse (TargetError, one line) a target that cannot run here; returns self."""
        reason = self.unavailable()
        if reason:
            raise TargetError(reason)
        return self

    def describe(self) -> str:
        return (f"{self.name} ({self.label}; batch {self.batch}, "
                f"{'default' if self.threads is None else self.threads} thread(s))")

    def to_dict(self) -> dict:
        return {"name": self.name, "runtime": self.runtime, "variant": self.variant, "backend": self.backend,
                "precision": self.precision, "threads": self.threads, "batch": self.batch}


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort-fp32", "ort", "fp32", "ort-cpu", "fp32", "ORT fp32"),
    Target("ort-int8", "ort", "int8-dynamic", "ort-cpu", "fp32", "ORT int8 dynamic"),
    Target("ort-int8-static", "ort", "int8-static", "ort-cpu", "fp32", "ORT int8 static (QDQ)"),
    Target("openvino-f32", "openvino", "fp32", "openvino", "fp32", "OpenVINO f32"),
    Target("openvino-bf16", "openvino", "fp32", "openvino", "bf16", "OpenVINO bf16 (opt-in)"),
    Target("openvino-int8", "openvino", "int8-static", "openvino", "fp32", "OpenVINO int8 static (QDQ)"),
    Target("executorch", "executorch", "pte", "executorch", "fp32", "ExecuTorch XNNPACK fp32"),
    Target("executorch-int8", "executorch", "pte-int8", "executorch", "fp32", "ExecuTorch XNNPACK int8 static (PT2E)"),
    Target("litert-fp32", "litert", "tflite", "litert", "fp32", "LiteRT XNNPACK fp32"),
    Target("litert-int8", "litert", "tflite-int8", "litert", "fp32", "LiteRT XNNPACK int8 static"),
)}
ALIASES = {"executorch-fp32": "executorch"}
REFERENCE = "ort-fp32"  # every ratio and every agreement is taken against this target


def names() -> list[str]:
    return list(TARGETS)


def get_target(name: str | Target, threads: int | None = None, batch: int | None = None) -> Target:
    """The target called `name` (TargetError naming the valid ones), at `threads` / `batch` if given."""
    if isinstance(name, Target):
        t = name
    else:
        key = ALIASES.get(str(name).strip(), str(name).strip())
        if key not in TARGETS:
            raise TargetError(f"unknown deployment target {name!r}; choose from {', '.join(TARGETS)}")
        t = TARGETS[key]
    if threads is not None and threads < 1:
        raise TargetError(f"threads must be >= 1, got {threads}")
    if batch is not None and batch < 1:
        raise TargetError(f"batch must be >= 1, got {batch}")
    return t.with_settings(threads, batch)


def targets_of(names: str | Iterable[str]) -> list[Target]:
    """Targets by name (a list, or one comma-separated string), without duplicates."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", "").split(",") if n]
    out: list[Target] = []
    for n in names:
        t = get_target(n)
        if t not in out:
            out.append(t)
    return out


def needs_calibration(names: str | Iterable[str]) -> bool:
    """Whether any target runs a static int8 file (whose export needs calibration images)."""
    return any(t.variant in ("int8-static", "pte-int8", "tflite-int8") for t in targets_of(names))
