"""Triton Inference Server model repository for an exported ONNX file.

Layout: `REPO/<name>/config.pbtxt` + `REPO/<name>/1/model.onnx`, onnxruntime backend. The config
is written as protobuf text (Triton's ModelConfig schema; tests parse it with the schema shipped
in `tritonclient`), so writing needs no Triton package.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError
from ..io import atomic_dir

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TritonConfig:
    """What goes into config.pbtxt."""
    name: str  # model name (folder name in the repository)
    input_size: tuple[int, int, int]  # C, H, W of the `images` input
    num_classes: int  # length of the `logits` output
    max_batch_size: int = 32  # Triton batches requests up to this; 0 = model has a fixed batch dim
    static_batch: int | None = None  # fixed batch of the ONNX file (forces max_batch_size 0)
    max_queue_delay_us: int = 100  # dynamic batcher: how long a request may wait for company
    input_name: str = "images"  # ONNX input name
    output_name: str = "logits"  # ONNX output name
    instance_count: int = 1  # model instances Triton runs

    def to_pbtxt(self) -> str:
        """Protobuf text of Triton's ModelConfig for this model."""
        static = self.static_batch is not None
        lead = [self.static_batch] if static else []
        dims_in = ", ".join(str(d) for d in lead + list(self.input_size))
        dims_out = ", ".join(str(d) for d in lead + [self.num_classes])
        lines = [
            f'name: "{self.name}"',
            'backend: "onnxruntime"',
            f"max_batch_size: {0 if static else self.max_batch_size}",
            'default_model_filename: "model.onnx"',
            f'input [\n  {{\n    name: "{self.input_name}"\n    data_type: TYPE_FP32\n    dims: [ {dims_in} ]\n  }}\n]',
            f'output [\n  {{\n    name: "{self.output_name}"\n    data_type: TYPE_FP32\n    dims: [ {dims_out} ]\n  }}\n]',
            f"instance_group [\n  {{\n    count: {self.instance_count}\n    kind: KIND_AUTO\n  }}\n]",
        ]
        if not static and self.max_batch_size > 0:
            lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {self.max_queue_delay_us}\n}}")
        return "\n".join(lines) + "\n"


def write_triton_repo(onnx_path: str | os.PathLike, repo: str | os.PathLike, config: TritonConfig) -> Path:
    """Write REPO/<name>/{config.pbtxt, 1/model.onnx} atomically; returns the model folder."""
    if not _NAME.match(config.name):
        raise ExportError(f"Triton model name {config.name!r} may only use letters, digits, '_', '.', '-'")
    if config.static_batch is None and config.max_batch_size < 1:
        raise ExportError(f"Triton max batch size must be >= 1 for a dynamic-batch model, got {config.max_batch_size}")
    if config.static_batch is None and config.max_batch_size > 4096:
        raise ExportError("Triton max batch size above the exported batch range (4096)")
    src = Path(onnx_path)
    if not src.is_file():
        raise ExportError(f"ONNX file not found: {src}")
    target = Path(repo) / config.name
    try:
        with atomic_dir(target) as tmp:
            (tmp / "1").mkdir()
            shutil.copyfile(src, tmp / "1" / "model.onnx")
            (tmp / "config.pbtxt").write_text(config.to_pbtxt())
            for d in (tmp, tmp / "1"):
                d.chmod(0o755)  # mkdtemp makes 0700; the server often runs as another user
            for f in (tmp / "config.pbtxt", tmp / "1" / "model.onnx"):
                f.chmod(0o644)
    except OSError as e:
        raise ExportError(f"cannot write Triton repository {target}: {e.strerror or e}") from None
    return target
