"""Export formats: one module per format, one small interface, a registry looked up by name.

`export` always writes the verified ONNX file (format `onnx`); `--format NAME` adds the file of
one more runtime next to it. Every format module defines `FORMAT`, an instance of a `Format`
subclass that

- `unavailable(cfg)`: says why it cannot be written here (a missing package), asked before any work;
- `write(job)`: writes its file(s) into `job.tmpdir` and returns its result object;
- `verify(job, result)`: checks the file against the torch model (ExportError on a miss, nothing
  published) and returns the result with its parity filled in;
- `describe(result)`: the summary lines the CLI prints;
- `files(out, result)`: the final paths it publishes next to `out` (the .onnx path).

Adding a format is one module (`FORMAT = MyFormat()`) and one line in `FORMATS`. This module
imports no torch (export.config reads the names from here for the CLI's choices).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .config import ExportConfig

# format name -> module of p3b_deploy.export defining FORMAT
FORMATS: dict[str, str] = {
    "onnx": "onnx_file",
    "openvino": "openvino_ir",
    "executorch": "executorch_pte",
    "litert": "litert_tflite",
}


@dataclass
class Job:
    """What a format gets to write and verify its file: the model, the verified fp32 ONNX file
    (in the temp folder) and its metadata, the parity inputs and the options."""
    model: Any  # eval-mode torch module
    out: Path  # the user's final .onnx path (a format's file is named after its stem)
    tmpdir: Path  # where files are written until everything is verified
    input_size: tuple[int, int, int]  # C, H, W
    cfg: ExportConfig  # resolved options
    metadata: dict[str, str]  # metadata_props (of the ONNX file once it is written)
    inputs: list[tuple[str, torch.Tensor]]  # (label, images) parity cases: random and real
    onnx: Path | None = None  # the verified fp32 ONNX file in tmpdir (None until written)
    real: torch.Tensor | None = None  # real preprocessed val images (--data)
    labels: torch.Tensor | None = None  # their labels, when the data's classes are the model's
    calibration: torch.Tensor | None = None  # preprocessed training images (--int8 static)
    notes: list[str] = field(default_factory=list)  # what the reader should know, for the report
    _reference: list[tuple[str, np.ndarray, np.ndarray]] | None = None

    def reference(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(label, images, torch fp32 logits) for every parity case, computed once."""
        if self._reference is None:
            from .runtime_parity import torch_logits
            self._reference = [(label, x.numpy(), torch_logits(self.model, x)) for label, x in self.inputs]
        return self._reference


class Format:
    """One export format; subclasses set `name` and `suffix` and implement write/verify/describe."""
    name: str = ""
    suffix: str = ""  # the main file's suffix, e.g. '.pte'

    def unavailable(self, cfg: ExportConfig) -> str | None:
        """Why this format cannot be written here (one line), or None."""
        return None

    def write(self, job: Job) -> Any:
        raise NotImplementedError

    def verify(self, job: Job, result: Any) -> Any:
        raise NotImplementedError

    def describe(self, result: Any) -> list[str]:
        raise NotImplementedError

    def files(self, out: Path, result: Any) -> list[Path]:
        """Final paths of the files written (named like the tmpdir copies)."""
        return [out.with_suffix(self.suffix)]


def get_format(name: str) -> Format:
    """The registered format `name` (its module is imported on first use)."""
    if name not in FORMATS:
        from ..errors import ExportError
        raise ExportError(f"format must be one of {tuple(FORMATS)}, got {name!r}")
    return importlib.import_module(f".{FORMATS[name]}", __package__).FORMAT
