"""Front door of the pruning methods: `prune(model, data, cfg, out_dir) -> PruneResult`.

The CLI `prune` stage and the pipeline call exactly this; the method comes from the registry in
`pruning/methods.py`."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..data import DataBundle
from .config import P3BConfig
from .engine import PruneResult

__all__ = ["prune", "PruneResult"]


def prune(model: nn.Module, data: DataBundle, cfg: P3BConfig | None = None,
          out_dir: str | os.PathLike | None = None, model_kwargs: dict[str, Any] | None = None) -> PruneResult:
    """Fine-tune `model` on `data` while pruning it with `cfg.method` (registry in pruning/methods.py).

    `model_kwargs` (load_model kwargs incl. the source checkpoint path) is recorded in
    plan.meta for provenance; the dense skeleton kwargs are derived from the model itself."""
    from .methods import create_method
    cfg = cfg or P3BConfig()
    return create_method(cfg.method).run(model, data, cfg, out_dir, model_kwargs)
