"""Surgery: plan + dense model -> a physically smaller model, verified against the masked model.

Slim modules and residual reads/writes (`core`), safe save/load of the slim dir (`store`), a
P3B-shaped slim model without training for sizing (`preview`). The
function is `p3b_deploy.slim` (this package is named `surgery` so that neither hides the other).
"""
from .core import (RESIDUAL_IO, IdentityBranch, SlimAttention, SlimBlock, SlimConfig, SlimMlp, auto_io, block_rows,
                   round_plan, slim, slim_run_dir, verify_slim)
from .preview import preview_plan, preview_slim
from .store import inspect_source, load_slim, read_plan_source, read_slim_config, save_slim

__all__ = ["RESIDUAL_IO", "IdentityBranch", "SlimAttention", "SlimBlock", "SlimConfig", "SlimMlp", "auto_io",
           "block_rows", "round_plan", "slim", "slim_run_dir", "verify_slim", "inspect_source", "load_slim",
           "read_plan_source", "read_slim_config", "save_slim", "preview_plan", "preview_slim"]
