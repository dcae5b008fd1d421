"""ExportConfig: every export option, declared once (the CLI's flags come from here). No torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..configs import ConfigBase, opt
from .formats import FORMATS as _FORMAT_MODULES

INT8_MODES = ("dynamic", "static")  # export --int8 [MODE]
FORMATS = tuple(_FORMAT_MODULES)  # export --format (the registry in export/formats.py)
DEFAULT_OPSET = 18  # torchlib's native opset: no version conversion after the dynamo export
TRITON_BACKENDS = ("onnxruntime", "python")  # Triton model repository flavours (export/triton.py)


@dataclass
class ExportConfig(ConfigBase):
    """Export options; the resolved config is saved in `<stem>.export.json`."""
    opset: Optional[int] = opt(None, f"ONNX opset (default {DEFAULT_OPSET})")
    dynamic_batch: bool = opt(True, "batch axis symbolic ('batch'); off needs --static-batch", cli=False)
    static_batch: Optional[int] = opt(None, "fixed batch size instead of a dynamic one", metavar="B")
    simplify: bool = opt(False, "simplify with onnxslim (verified like the raw export)")
    fp16: bool = opt(False, "also write <stem>.fp16.onnx (fp16 weights/compute, fp32 inputs/outputs)")
    fp16_io: bool = opt(False, "the fp16 variant takes and returns float16")
    int8: Optional[str] = opt(None, "also write <stem>.int8.onnx: dynamic (int8 MatMul weights; a bare --int8) or "
                              "static (QDQ weights and activations, calibrated on --data's training images; runs "
                              "on ONNX Runtime and OpenVINO; with --format executorch also <stem>.int8.pte, XNNPACK "
                              "PT2E int8 on the same images)", choices=INT8_MODES, const="dynamic")
    int8_max_drop: float = opt(1.0, "refuse an int8 file whose val top-1 is more than P points below fp32's (--data "
                               "with labels), else whose top-1 agreement with fp32 is below 100-P percent",
                               metavar="P")
    calibration_images: int = opt(256, "training images that calibrate --int8 static", metavar="N")
    format: str = opt("onnx", "onnx; openvino: also <stem>.xml/.bin (OpenVINO IR, fp32 weights, the same metadata in "
                      "rt_info); executorch: also <stem>.pte (XNNPACK fp32, the metadata in its p3b_metadata "
                      "method; needs .venv-edge); litert: also <stem>.tflite (LiteRT, one signature per "
                      "--litert-batches batch, the metadata in its p3b_metadata entry; with --int8 static also <stem>.int8.tflite; "
                      "needs .venv-edge). Each verified against torch", choices=FORMATS)
    executorch_max_batch: int = opt(32, "--format executorch: largest batch of the .pte's dynamic batch dimension "
                                    "(ExecuTorch plans memory for it)", metavar="N")
    litert_batches: Optional[tuple[int, ...]] = opt(None, "--format litert: batch sizes of the .tflite's signatures "
                                                    "b<N>, e.g. 1,8,32 (default: 1 and the parity batches; a "
                                                    "LiteRT file cannot change its batch)", metavar="B,...")
    target: Optional[str] = opt(None, "write the file this deployment target runs (p3b_deploy.targets): ort-int8 = "
                                      "--int8 dynamic, ort-int8-static / openvino-int8 = --int8 static (needs --data), "
                                      "openvino-f32 / openvino-bf16 = --format openvino, executorch / litert-fp32 = "
                                      "--format executorch / litert, executorch-int8 / litert-int8 = the same with "
                                      "--int8 static; ort-fp32 = the ONNX file alone")
    tol: float = opt(1e-4, "fp32: max abs logit difference ONNX Runtime vs torch")
    fp16_rtol: float = opt(2e-2, "fp16: max abs difference relative to max(1, max |logit|)")
    fp16_min_agreement: float = opt(99.0, "fp16: top-1 agreement (percent) required on real data; with labels, "
                                    "its val top-1 may be at most 100-P points below fp32's")
    verify_batches: tuple[int, ...] = opt((1, 7), "batch sizes run for parity (static: --static-batch only)")
    agreement_images: int = opt(512, "random images for the fp16/int8 agreement when no real data is given (a "
                                     "weak gate: one flip must not refuse a good file)")
    profile_batch: int = opt(8, "batch size of the profiled runs (graph hygiene report)")
    profile_runs: int = opt(5, "profiled runs after one warm-up")
    threads: Optional[int] = opt(None, "ONNX Runtime threads for verification/profiling (default: ORT's)")
    strip_node_metadata: bool = opt(True, "drop per-node exporter debug strings (they dominate file size)",
                                    cli=False)
    seed: int = opt(0, "seed of the random verification inputs")
    triton_repo: Optional[str] = opt(None, "also write a Triton model repository DIR/<name>/", metavar="DIR")
    triton_name: Optional[str] = opt(None, "Triton model name (default: the output file's stem)")
    triton_max_batch: int = opt(32, "Triton max_batch_size (dynamic-batch exports)", metavar="N")
    triton_backend: str = opt("onnxruntime", "onnxruntime (production containers) or python (ONNX Runtime inside "
                              "Triton's python backend, for a tritonserver without the onnxruntime backend)",
                              choices=TRITON_BACKENDS)
    triton_instances: int = opt(1, "Triton model instances (instance_group count; bench --server --sweep finds "
                                "the best)", metavar="N")
    triton_threads: int = opt(0, "ONNX Runtime intra-op threads per Triton model instance (0 = ORT's default: "
                              "all cores)", metavar="N")

    def for_target(self) -> "ExportConfig":
        """The config with `target` turned into the format / int8 options it needs (one-line
        ExportError where an explicit option contradicts it, or its runtime is not installed)."""
        if self.target is None:
            return self
        from ..errors import ExportError
        from ..targets import get_target
        t = get_target(self.target).check()
        want: dict = {}
        if t.int8 is not None:
            want["int8"] = t.int8
        if t.export_format != "onnx":
            want["format"] = t.export_format
        for k, v in want.items():
            have = getattr(self, k)
            if have not in (None, "onnx", v):
                raise ExportError(f"--target {t.name} writes {k} {v}; it contradicts --{k.replace('_', '-')} {have}")
        return self.replace(**want)

    def resolved_opset(self) -> int:
        return DEFAULT_OPSET if self.opset is None else int(self.opset)

    def batches(self) -> tuple[int, ...]:
        return (self.static_batch,) if self.static_batch else tuple(self.verify_batches)
