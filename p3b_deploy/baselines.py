"""Pruning methods behind one registry: name -> Method, reached by `create_method(name)`.

Every method turns (model, data, cfg, out_dir) into a run dir with a plan.json in the same
format, so surgery never knows who wrote the plan. The trainer-native methods live here:
- `p3b`: keep ratios from block benefit (the method),
- `uniform`: the same loop and intra-block selection, with one fixed keep ratio for every block
  (cfg.fixed_keep_ratio: None = the uniform value that hits the budget, a float, or a hand-set
  list of 2*depth values),
- `dense`: plain fine-tuning, no pruning (the dense ceiling; also the source-model trainer).
Other methods (e.g. Torch-Pruning criteria) register themselves with `register_method`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import P3BError

RunFn = Callable[..., Any]  # (model, data, cfg, out_dir, model_kwargs) -> PruneResult


@dataclass(frozen=True)
class Method:
    name: str  # registry key, the --method value
    description: str  # one line for --help
    run: RunFn  # (model, data, cfg, out_dir, model_kwargs) -> PruneResult


METHODS: dict[str, Method] = {}


def register_method(name: str, description: str) -> Callable[[RunFn], RunFn]:
    """Decorator: make `fn(model, data, cfg, out_dir, model_kwargs) -> PruneResult` a method."""
    def deco(fn: RunFn) -> RunFn:
        METHODS[name] = Method(name, description, fn)
        return fn
    return deco


def create_method(name: str) -> Method:
    if name not in METHODS:
        raise P3BError(f"unknown pruning method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _trainer_method(model, data, cfg, out_dir: str | os.PathLike | None, model_kwargs=None):
    from .p3b.api import train_prune
    return train_prune(model, data, cfg, out_dir, model_kwargs)


register_method("p3b", "P3B: keep ratios from block benefit, reallocated at every mask update")(_trainer_method)
register_method("uniform", "same loop with a fixed keep ratio per block (uniform or --keep-ratio list)")(_trainer_method)
register_method("dense", "plain fine-tuning, no pruning (dense ceiling)")(_trainer_method)
