"""Export: verified ONNX (parity vs torch, metadata, fp16/int8 variants) and the Triton model
repository. `export_onnx(model, out, input_size=...) -> ExportResult` is the front door."""
from .exporter import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ExportConfig, ExportResult, export_onnx,
                       export_source, load_source, verify_onnx)
from .metadata import metadata_for
from .triton import TritonConfig, write_triton_repo

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "ExportConfig", "ExportResult", "export_onnx",
           "export_source", "load_source", "metadata_for", "verify_onnx", "TritonConfig", "write_triton_repo"]
