"""ExecuTorch runtime access shared by `bench` (backend `executorch`) and `export --format executorch`.

A `.pte` file here is a program lowered to the XNNPACK delegate (fp32, or int8 after PT2E static
quantization: `<stem>.int8.pte`; both take and return float32) with two methods:
`forward` (images -> logits, batch dimension dynamic up to the batch it was lowered for) and
`p3b_metadata` (a constant method returning the JSON of the ONNX file's metadata_props, so the
file carries its own preprocessing and class names). ExecuTorch's Python runtime needs torch
(its pybindings take and return torch tensors); lowering needs torch.export as well.

ExecuTorch is installed next to this project's torch in `.venv-edge` (bash scripts/setup_edge.sh),
which reads `.venv`'s packages: run `.venv-edge/bin/python -m p3b_deploy ...` to use it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import P3BError

METADATA_METHOD = "p3b_metadata"
MISSING = ("executorch is not installed here: run `bash scripts/setup_edge.sh` and use "
           "`.venv-edge/bin/python -m p3b_deploy` (elsewhere: pip install executorch)")


def unavailable(precision: str = "fp32") -> str | None:
    """Why an ExecuTorch .pte cannot run at `precision` here, or None."""
    try:
        found = importlib.util.find_spec("executorch") is not None
    except ValueError:  # sys.modules["executorch"] is None: made unimportable on purpose
        found = False
    if not found:
        return MISSING
    if precision != "fp32":
        return f"{precision}: the ExecuTorch backend runs fp32 XNNPACK programs only"
    return None


def set_threads(threads: int | None) -> int:
    """Size XNNPACK's thread pool (process-wide) when `threads` is given; returns the pool size."""
    from executorch.extension.pybindings import portable_lib
    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    return int(portable_lib._threadpool_get_thread_count())


@dataclass
class PteProgram:
    """A loaded .pte: `forward` runs one float32 batch, `metadata` is what the file carries."""
    path: Path
    method: Any  # executorch.runtime.Method of `forward`
    max_batch: int  # the batch it was lowered for (an upper bound when the batch is dynamic)
    input_shape: tuple[int, ...]  # (C, H, W); (T, D) for a latency probe branch
    metadata: dict[str, str] = field(default_factory=dict)

    def forward(self, x: np.ndarray) -> np.ndarray:
        import torch
        if len(x) > self.max_batch:
            raise P3BError(f"{self.path.name} was lowered for batches up to {self.max_batch}, got {len(x)} "
                           "(export again with a larger --executorch-max-batch)")
        out = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy()


def check_pte_file(path: str | os.PathLike) -> None:
    """Refuse (P3BError, one line) a file that is not an ExecuTorch program, without the runtime:
    a .pte is a flatbuffer whose file identifier (bytes 4-8) is "ET" and two digits ("ET12")."""
    path = Path(path)
    if not path.is_file():
        raise P3BError(f"ExecuTorch program not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if re.fullmatch(rb"ET[0-9]{2}", head[4:8]) is None:
        raise P3BError(f"{path} is not an ExecuTorch program (no ExecuTorch file identifier at bytes 4-8: "
                       f"found {head[4:8]!r})")


def load_pte(path: str | os.PathLike) -> PteProgram:
    """Load a .pte written by `export --format executorch`; P3BError (one line) if it is not one."""
    reason = unavailable()
    if reason:
        raise P3BError(reason)
    from executorch.runtime import Runtime, Verification
    path = Path(path)
    if not path.is_file():
        raise P3BError(f"ExecuTorch program not found: {path}")
    try:
        program = Runtime.get().load_program(path, verification=Verification.InternalConsistency)
        method = program.load_method("forward")
        sizes = list(method.metadata.input_tensor_meta(0).sizes())
        meta: dict[str, str] = {}
        if METADATA_METHOD in program.method_names:
            meta = json.loads(program.load_method(METADATA_METHOD).execute([])[0])
    except Exception as e:  # noqa: BLE001 — the runtime raises RuntimeError/ValueError with long texts
        raise P3BError(f"{path.name} is not a loadable ExecuTorch program: "
                       f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
    if len(sizes) < 2:  # images (N, C, H, W); a latency probe's branch takes tokens (N, T, D)
        raise P3BError(f"{path.name}: expected a batched input (N, C, H, W), found sizes {sizes}")
    return PteProgram(path=path, method=method, max_batch=int(sizes[0]),
                      input_shape=tuple(int(s) for s in sizes[1:]), metadata=meta)  # type: ignore[arg-type]


@dataclass
class Lowered:
    """A program lowered to XNNPACK, with what stayed outside the delegate."""
    buffer: bytes  # the .pte file's bytes
    delegated_subgraphs: int  # XNNPACK partitions
    delegated_nodes: int
    portable_ops: dict[str, int]  # op type -> nodes left on ExecuTorch's portable kernels


def lower(model: Any, input_size: tuple[int, int, int], max_batch: int, *, dynamic: bool = True,
          metadata: dict[str, str] | None = None, fused_attention: bool = False,
          calibration: Any = None) -> Lowered:
    """`model` (eval) lowered to XNNPACK: batch dynamic in 1..max_batch (or fixed at max_batch),
    `metadata` stored in the `p3b_metadata` constant method. With `calibration` (a float tensor of
    preprocessed training images) the program is int8: `quantize_int8` before lowering.

    Attention is lowered unfused (timm's and the slim modules' `fused_attn` off while exporting):
    torch.export decomposes scaled_dot_product_attention into a NaN-safe softmax whose masking ops
    (any / eq / where / logical_not) XNNPACK cannot take, which split every block into more
    partitions; the plain q @ k^T -> softmax -> @ v path stays inside XNNPACK
    (benchmarks/executorch_attention.py). `fused_attention=True` keeps SDPA, for that comparison."""
    reason = unavailable()
    if reason:
        raise P3BError(reason)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    model = model.eval()
    example = torch.randn(min(2, max_batch) if dynamic else max_batch, *input_size,
                          generator=torch.Generator().manual_seed(0))
    shapes = ({0: torch.export.Dim("batch", min=1, max=int(max_batch))},) if dynamic and max_batch > 1 else None
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in fused:
            m.fused_attn = fused_attention
        with torch.no_grad():
            ep = torch.export.export(model, (example,), dynamic_shapes=shapes)
            if calibration is not None:
                ep = quantize_int8(ep, calibration, example, min(32, max_batch) if shapes else len(example), shapes)
        const = {METADATA_METHOD: json.dumps(dict(metadata or {}), sort_keys=True)}
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=const)
        info = get_delegation_info(edge.exported_program().graph_module)
        buffer = bytes(edge.to_executorch().buffer)
    except Exception as e:  # noqa: BLE001 — torch.export / exir raise many types
        raise P3BError(f"ExecuTorch lowering failed: {type(e).__name__}: "
                       f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
    finally:
        for m, was in fused:
            m.fused_attn = was
    portable = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
                if b.non_delegated and op not in ("getitem", "executorch_call_delegate")}
    return Lowered(buffer=buffer, delegated_subgraphs=int(info.num_delegated_subgraphs),
                   delegated_nodes=int(info.num_delegated_nodes), portable_ops=dict(sorted(portable.items())))


def quantize_int8(ep: Any, calibration: Any, example: Any, batch: int, dynamic_shapes: Any = None) -> Any:
    """XNNPACK PT2E static int8 of an exported program: symmetric int8 weights per output channel,
    int8 activations observed on `calibration` (run `batch` images at a time; a fixed-batch
    program gets its last batch filled up from the first images); re-exported on `example` with
    the same dynamic shapes, ready for `to_edge_transform_and_lower`. Needs torchao (in .venv-edge)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    if calibration is None or len(calibration) == 0:
        raise P3BError("int8 lowering needs calibration images")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(ep.module(), quantizer)
    images = calibration.float()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            if dynamic_shapes is None and len(x) < batch:  # a fixed-batch graph takes full batches only
                x = torch.cat([x, images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch - len(x)]])
            observed(x.contiguous())
        quantized = convert_pt2e(observed)
        return torch.export.export(quantized, (example,), dynamic_shapes=dynamic_shapes)
