"""Typed, user-facing errors.

Every error a user can cause by bad input (unknown model, corrupt file, out-of-range ratio ...)
is a `P3BError`; the CLI prints its message as one line and exits non-zero, no traceback.
"""


class P3BError(Exception):
    """Base class for errors caused by user input or environment, shown as one line."""

    exit_code = 2


class ModelError(P3BError):
    """Unknown / unsupported model, or a checkpoint that does not fit it."""


class CheckpointError(P3BError):
    """A checkpoint file that is missing, corrupt or unsafe."""


class DataError(P3BError):
    """A dataset that is missing, empty or malformed."""


class PlanError(P3BError):
    """A plan.json that is malformed or does not fit the model."""


class SurgeryError(P3BError):
    """A plan that cannot be applied exactly to a model."""


class ExportError(P3BError):
    """ONNX export or its verification failed."""


class BenchError(P3BError):
    """A benchmark input or backend problem."""


class ServeError(P3BError):
    """A serving runtime, port, repository or server-side problem (one line, with the server's reason)."""
