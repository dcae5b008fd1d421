"""Triton Inference Server model repository for an exported ONNX file.

Layout: `REPO/<name>/config.pbtxt` + `REPO/<name>/1/model.onnx`. Two flavours share the input and
output names, dims, `max_batch_size`, dynamic batching and preprocessing parameters:
- `onnxruntime` (production): Triton's onnxruntime backend runs the file (NVIDIA's containers).
- `python`: `1/model.py` opens the file with ONNX Runtime inside Triton's python backend, for a
  tritonserver that ships without the onnxruntime backend (the one in the `nvidia-pytriton` wheel).
The config is written as protobuf text (Triton's ModelConfig schema; tests parse it with the schema
shipped in `tritonclient`), so writing needs no Triton package. A repository may hold several
models (e.g. dense and slim side by side): each call writes one `REPO/<name>/` atomically.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import ExportError
from ..io import atomic_dir

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
BACKENDS = ("onnxruntime", "python")
# The config parameter that sets ONNX Runtime's intra-op threads per instance, per flavour.
THREADS_PARAMETER = {"python": "intra_op_threads", "onnxruntime": "intra_op_thread_count"}
# ONNX metadata_props copied into the config's `parameters` (what a client needs to preprocess
# images and to tell models apart); the long ones (class names, keep ratios) stay in the file.
PARAMETER_KEYS = ("source_model", "timm_model", "prune_ratio", "params", "macs", "input_size", "mean", "std",
                  "interpolation", "crop_pct", "num_classes", "tool_version")


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
    backend: str = "onnxruntime"  # onnxruntime (production) or python (ORT inside the python backend)
    parameters: dict[str, str] = field(default_factory=dict)  # preprocessing/identity metadata (strings)
    intra_op_threads: int = 0  # ORT intra-op threads per instance (0 = ORT default)

    def to_pbtxt(self) -> str:
        """Protobuf text of Triton's ModelConfig for this model."""
        static = self.static_batch is not None
        lead = [self.static_batch] if static else []
        dims_in = ", ".join(str(d) for d in lead + list(self.input_size))
        dims_out = ", ".join(str(d) for d in lead + [self.num_classes])
        # The python flavour runs ORT's CPU provider whatever the machine has; KIND_AUTO lets the
        # onnxruntime backend pick a GPU in production.
        kind = "KIND_CPU" if self.backend == "python" else "KIND_AUTO"
        lines = [
            f'name: "{self.name}"',
            f'backend: "{self.backend}"',
            f"max_batch_size: {0 if static else self.max_batch_size}",
        ]
        if self.backend == "onnxruntime":  # the python backend always loads model.py
            lines.append('default_model_filename: "model.onnx"')
        lines += [
            f'input [\n  {{\n    name: "{self.input_name}"\n    data_type: TYPE_FP32\n    dims: [ {dims_in} ]\n  }}\n]',
            f'output [\n  {{\n    name: "{self.output_name}"\n    data_type: TYPE_FP32\n    dims: [ {dims_out} ]\n  }}\n]',
            f"instance_group [\n  {{\n    count: {self.instance_count}\n    kind: {kind}\n  }}\n]",
        ]
        if not static and self.max_batch_size > 0:
            lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {self.max_queue_delay_us}\n}}")
        params = dict(self.parameters)
        if self.backend == "python":
            params[THREADS_PARAMETER["python"]] = str(self.intra_op_threads)
        elif self.intra_op_threads > 0:  # Triton's onnxruntime backend reads this one
            params[THREADS_PARAMETER["onnxruntime"]] = str(self.intra_op_threads)
        for key, value in params.items():
            # JSON string escapes (\" \\ \n) are valid protobuf text escapes; keep non-ASCII as is.
            lines.append(f"parameters {{\n  key: {json.dumps(key)}\n  value {{ string_value: "
                         f"{json.dumps(str(value), ensure_ascii=False)} }}\n}}")
        return "\n".join(lines) + "\n"

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ExportError(f"Triton model name {self.name!r} may only use letters, digits, '_', '.', '-'")
        if self.backend not in BACKENDS:
            raise ExportError(f"Triton backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.static_batch is None and self.max_batch_size < 1:
            raise ExportError(f"Triton max batch size must be >= 1 for a dynamic-batch model, got {self.max_batch_size}")
        if self.static_batch is None and self.max_batch_size > 4096:
            raise ExportError("Triton max batch size above the exported batch range (4096)")
        if self.instance_count < 1 or self.intra_op_threads < 0:
            raise ExportError("Triton instance count must be >= 1 and intra-op threads >= 0")


def triton_parameters(metadata: dict[str, str]) -> dict[str, str]:
    """The subset of ONNX metadata_props that goes into config.pbtxt `parameters`."""
    return {k: str(metadata[k]) for k in PARAMETER_KEYS if k in metadata}


def config_from_onnx(onnx_path: str | os.PathLike, name: str, **options) -> TritonConfig:
    """A TritonConfig read off an exported ONNX file: IO names, dims, static batch, metadata."""
    import onnx
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a corrupt file: say which one, in one line
        raise ExportError(f"not a readable ONNX file: {path} ({str(e).splitlines()[0]})") from None
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ExportError(f"{path}: expected one input and one output, got {len(g.input)} and {len(g.output)}")
    dims_in = [d.dim_value if d.HasField("dim_value") else None for d in g.input[0].type.tensor_type.shape.dim]
    dims_out = [d.dim_value if d.HasField("dim_value") else None for d in g.output[0].type.tensor_type.shape.dim]
    if len(dims_in) != 4 or None in dims_in[1:] or len(dims_out) != 2 or dims_out[1] is None:
        raise ExportError(f"{path}: expected images [B, C, H, W] -> logits [B, classes], got {dims_in} -> {dims_out}")
    meta = {p.key: p.value for p in model.metadata_props}
    options.setdefault("parameters", triton_parameters(meta))
    if dims_in[0] is not None:
        options["static_batch"] = dims_in[0]
    return TritonConfig(name=name, input_size=tuple(dims_in[1:]), num_classes=dims_out[1],
                        input_name=g.input[0].name, output_name=g.output[0].name, **options)


def write_triton_repo(onnx_path: str | os.PathLike, repo: str | os.PathLike, config: TritonConfig) -> Path:
    """Write REPO/<name>/{config.pbtxt, 1/model.onnx (+ 1/model.py)} atomically; returns the model folder."""
    config.validate()
    src = Path(onnx_path)
    if not src.is_file():
        raise ExportError(f"ONNX file not found: {src}")
    target = Path(repo) / config.name
    try:
        with atomic_dir(target) as tmp:
            (tmp / "1").mkdir()
            files = [tmp / "config.pbtxt", tmp / "1" / "model.onnx"]
            shutil.copyfile(src, files[1])
            files[0].write_text(config.to_pbtxt())
            if config.backend == "python":
                model_py = resources.files("p3b_deploy") / "assets" / "triton_python_model.py"
                files.append(tmp / "1" / "model.py")
                files[-1].write_text(model_py.read_text())
            for d in (tmp, tmp / "1"):
                d.chmod(0o755)  # mkdtemp makes 0700; the server often runs as another user
            for f in files:
                f.chmod(0o644)
    except OSError as e:
        raise ExportError(f"cannot write Triton repository {target}: {e.strerror or e}") from None
    return target
