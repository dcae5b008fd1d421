"""`run`: the whole flow in one call (dense baseline, prune, slim, fine-tune, export, evaluate,
bench) into one folder, resumable stage by stage."""
from .config import RunConfig, deep_update
from .run import STAGES, RunResult, StageError, run_pipeline
from .summary import summary_markdown, summary_table

__all__ = ["STAGES", "RunConfig", "RunResult", "StageError", "deep_update", "run_pipeline", "summary_markdown",
           "summary_table"]
