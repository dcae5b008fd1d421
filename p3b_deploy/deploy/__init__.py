"""What both exports and measures: deployment files per target, the deployment matrix, and the
benchmark front door for torch models (it plugs the package's verified ONNX exporter into the
torch-free harness of `p3b_deploy.bench`, which only times files).

`bench` and `export` never import this package; it imports both.
"""
from ..bench import models as _models
from ..bench.runner import benchmark
from .convert import to_onnx
from .matrix import MatrixReport, deployment_files, deployment_matrix, plot_reports

_models.register_converter("onnx", to_onnx)

__all__ = ["benchmark", "deployment_files", "deployment_matrix", "MatrixReport", "plot_reports", "to_onnx"]
