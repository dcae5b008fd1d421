"""`run`: the whole flow in one call (dense baseline, prune, slim, fine-tune, export, evaluate,
bench) into one folder, resumable stage by stage."""
from .run import STAGES, RunConfig, RunResult, StageError, run_pipeline, summary_markdown, summary_table

__all__ = ["STAGES", "RunConfig", "RunResult", "StageError", "run_pipeline", "summary_markdown", "summary_table"]
