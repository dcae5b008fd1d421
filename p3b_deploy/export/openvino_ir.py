"""OpenVINO IR (`<stem>.xml` + `<stem>.bin`) next to an exported ONNX file (`export --format openvino`).

The IR is converted from the verified ONNX file with fp32 weights (OpenVINO's `save_model`
compresses weights to fp16 unless told not to), carries the ONNX metadata_props in
rt_info[p3b_deploy] and is verified against torch with OpenVINO's CPU plugin at f32 precision:
max abs logit difference <= the export tolerance and identical top-1, at every parity batch.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, P3BError
from ..openvino_io import RT_INFO_KEY, compile_model, inference_precision, run
from .formats import Format, Job
from .runtime_parity import check_against_torch


@dataclass
class IRResult:
    """An OpenVINO IR written and verified by the exporter."""
    xml: Path  # final location of the .xml (the .bin sits next to it)
    size_bytes: int  # .xml + .bin
    precision: str  # inference precision of the verification ('f32')
    max_abs_diff: float  # max |logit_ir - logit_torch| over every parity case
    bound: float  # the bound it had to meet
    cases: list[dict[str, Any]] = field(default_factory=list)  # {data, batch, max_abs_diff, top1_agreement}


def write_ir(onnx_path: Path, xml: Path, metadata: dict[str, str]) -> None:
    """Convert `onnx_path` to IR at `xml` (+ .bin), fp32 weights, metadata in rt_info."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("--format openvino needs openvino: pip install 'p3b-deploy[openvino]'") from None
    try:
        model = ov.Core().read_model(str(onnx_path))
        for k, v in metadata.items():
            model.set_rt_info(str(v), [RT_INFO_KEY, str(k)])
        ov.save_model(model, str(xml), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"OpenVINO conversion failed: {(str(e).strip().splitlines() or ['?'])[0][:200]}") from None


def verify_ir(xml: Path, reference: Sequence[tuple[str, np.ndarray, np.ndarray]], tol: float,
              threads: int | None = None) -> IRResult:
    """Run the IR (f32) on every (label, images, torch logits) case; ExportError on a miss."""
    try:
        compiled = compile_model(xml, "fp32", threads)
    except P3BError as e:
        raise ExportError(str(e)) from None
    cases = check_against_torch(lambda x: run(compiled, x), reference, tol, f"OpenVINO IR verification of {xml.name}")
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    return IRResult(xml=xml, size_bytes=size, precision=inference_precision(compiled),
                    max_abs_diff=max(c["max_abs_diff"] for c in cases), bound=tol, cases=cases)


class OpenVinoFormat(Format):
    """`--format openvino`: the IR converted from the verified ONNX file."""
    name, suffix = "openvino", ".xml"

    def unavailable(self, cfg: Any) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "--format openvino needs openvino: pip install 'p3b-deploy[openvino]'"
        return None

    def write(self, job: Job) -> Path:
        xml = job.tmpdir / (job.out.stem + ".xml")
        write_ir(job.onnx, xml, job.metadata)
        return xml

    def verify(self, job: Job, result: Path) -> IRResult:
        """Verified against torch at the parity batches (f32 inference)."""
        ir = verify_ir(result, job.reference(), job.cfg.tol, job.cfg.threads)
        ir.xml = job.out.with_suffix(".xml")
        return ir

    def files(self, out: Path, result: IRResult) -> list[Path]:
        return [out.with_suffix(".xml"), out.with_suffix(".bin")]

    def describe(self, result: IRResult) -> list[str]:
        return [f"  openvino: {result.xml} + .bin [{result.size_bytes / 1e6:.2f} MB], max |diff| vs "
                f"torch {result.max_abs_diff:.2e} ({result.precision} inference)"]


FORMAT = OpenVinoFormat()
