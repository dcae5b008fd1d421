"""Inter-block budget in milliseconds of a target device (P3BConfig.budget "latency").

The method page's allocation is unchanged up to the budget equation: importance comes from block
benefit (steps 1-5, `budget.allocate`), kr_i = min(1, c * imp_i) (clamp-and-rescale has exactly
this fixed point), but c is chosen so that the *table* latency of the model at those keep ratios,
fixed part included, meets the target:

    fixed_ms + sum_i  lat_i(kr_i)  <=  target_ms      (the largest such c, by bisection)

lat_i(kr) is the latency of block i at the width its masks will keep for keep ratio kr: within a
block the channel selection is the method's (parameter cost, `masks.select_block`), which for a
block with one prunable gate (`--no-prune-residual`, the default) keeps the width k whose kept
parameters are closest to kr x dense; that width is looked up in the table (0 ms when k is 0: the
branch is removed). With residual pruning the same inner-width curve is used for allocation (the
split across a block's gates is only known once its scores are), and the realised plan is priced
with the table's residual-io model when it is logged.

Two allocations share the table (P3BConfig.allocation):

- proportional (the method page's rule): kr_i = min(1, c * imp_i), c solved by bisection. It
  never removes a branch on purpose, and on a device where every live branch pays a fixed cost
  (batch 1 on a CPU) it buys little: a branch kept at 5% still costs most of its full latency.
- knapsack: every branch picks one width from the table's grid, 0 (removed) included, so that
  the total block benefit is the largest the target allows:

      maximise  sum_i B_i * f(w_i / W_i)   s.t.  fixed_ms + sum_i lat_i(w_i) <= target_ms

  B_i is the block benefit the branch would show at full width (`budget.full_benefit`: the
  method's squashed, smoothed benefit, with the benefit measured at the current width divided by
  f of the current width fraction instead of by the kept parameters); f(x) = x ** width_exponent
  is concave (default 0.5), so halving a useful branch costs 29% of its value, not 0 and not 50%.
  Benefit per millisecond then decides: a branch whose fixed cost buys little benefit is removed,
  one that helps keeps the width where more ms stop paying. Solved exactly on a discretised ms
  axis (`knapsack.solve`: feasible in real ms, within n_blocks x target/resolution of the
  optimum). What stays P3B: the benefit probes and their smoothing; reactivation (a removed
  branch is still probed through its soft mask during sparsify, its benefit is re-estimated at
  every update and buys its width back when it beats what it would cost); the intra-block
  channel selection (the chosen width becomes the block's keep ratio and `masks.select_block`
  picks the channels).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...bench.latency_table import LatencyTable
from ...spec import ViTSpec
from . import knapsack
from .budget import width_value
from .masks import BlockDims, kept_block_cost

_F64 = torch.float64
_INNER = {"attn": "attn_qk", "mlp": "mlp_hidden"}
MARGIN = 1e-4  # relative step back from the solved scale (see latency_keep_ratios)


class LatencyCost:
    """Per-block latency as a function of the block's keep ratio, for one table and model."""

    def __init__(self, table: LatencyTable, spec: ViTSpec) -> None:
        table.check_spec(spec)
        self.table, self.spec = table, spec
        self.kept: list[np.ndarray] = []  # per block: kept params at inner width k = 0..n
        self.lat: list[np.ndarray] = []  # per block: table latency at k (0 at k = 0)
        for b in range(spec.num_blocks):
            dims = BlockDims(spec, b)
            sizes = dims.sizes()
            gate = _INNER[dims.kind]
            k = torch.arange(sizes[gate] + 1)
            self.kept.append(kept_block_cost(dims, {**sizes, gate: k}, "params").numpy().astype(np.float64))
            self.lat.append(np.asarray(table.width_ms(dims.kind, k.numpy()), dtype=np.float64))

    def widths(self, kr: Any) -> list[int]:
        """Inner width each block keeps at keep ratio kr (closest kept params; ties keep more)."""
        kr = np.asarray(torch.as_tensor(kr, dtype=_F64).reshape(-1))
        out = []
        for b, kept in enumerate(self.kept):
            err = np.abs(kept - float(kr[b]) * kept[-1])
            out.append(int(len(err) - 1 - np.argmin(err[::-1])))
        return out

    def block_ms(self, kr: Any) -> np.ndarray:
        return np.array([lat[k] for lat, k in zip(self.lat, self.widths(kr))])

    def total_ms(self, kr: Any) -> float:
        """Predicted latency of the model whose blocks keep ratios `kr` (fixed part included)."""
        return float(self.table.fixed_ms + self.block_ms(kr).sum())

    @property
    def dense_ms(self) -> float:
        return self.total_ms(torch.ones(self.spec.num_blocks, dtype=_F64))


def latency_keep_ratios(imp: Any, cost: LatencyCost, target_ms: float, iters: int = 60) -> torch.Tensor:
    """kr_i = min(1, c * imp_i) with the largest c whose predicted latency is <= target_ms.

    Latency is a non-decreasing step function of c, so bisection on c converges to the step at
    the target. Importance that is all zero (or absent) ranks nothing: the keep ratio is then the
    same for every block (the uniform baseline solved for the same target)."""
    imp = torch.nan_to_num(torch.as_tensor(imp, dtype=_F64).reshape(-1), nan=0.0).clamp_min(0.0)
    if not bool((imp > 0).any()):
        imp = torch.ones_like(imp)
    ones = torch.ones_like(imp)
    if cost.total_ms(ones) <= target_ms:
        return ones
    lo, hi = 0.0, 1.0 / float(imp[imp > 0].min())  # at hi every block keeps everything
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if cost.total_ms((mid * imp).clamp(max=1.0)) <= target_ms:
            lo = mid
        else:
            hi = mid
    # lo sits on a width step: back off a little and floor to the 6 decimals the metrics log, so
    # that neither float rounding in the mask search nor a goal re-read from the log crosses it.
    kr = (lo * (1.0 - MARGIN) * imp).clamp(0.0, 1.0)
    return torch.where(kr >= 1.0, kr, torch.floor(kr * 1e6) / 1e6)


def uniform_latency_keep_ratio(cost: LatencyCost, target_ms: float) -> torch.Tensor:
    """One keep ratio for every block, the largest that meets target_ms (uniform baseline)."""
    return latency_keep_ratios(torch.ones(cost.spec.num_blocks, dtype=_F64), cost, target_ms)


def knapsack_widths(benefit: Any, cost: LatencyCost, target_ms: float, exponent: float = 0.5,
                    resolution: int = 4000) -> tuple[list[int], knapsack.KnapsackResult]:
    """Width per block (from the table's grid, or 0 = removed) maximising sum B_i f(w_i / W_i)
    within target_ms of predicted latency (fixed part included); see the module doc.

    Zero or negative benefit counts as a tiny positive one (1e-3 of the mean), so that budget
    nobody else can use still keeps a branch rather than being left idle."""
    b = torch.nan_to_num(torch.as_tensor(benefit, dtype=_F64).reshape(-1), nan=0.0).clamp_min(0.0)
    floor = 1e-3 * max(float(b.mean()), 1e-12) if bool((b > 0).any()) else 1.0
    b = b.clamp_min(floor).numpy()
    values, costs, options = [], [], []
    for i, (kept, lat) in enumerate(zip(cost.kept, cost.lat)):
        full = len(kept) - 1
        grid = [0] + [int(w) for w in cost.table.curves[BlockDims(cost.spec, i).kind].widths if w <= full]
        options.append(grid)
        values.append([float(b[i]) * float(width_value(w / full, exponent)) for w in grid])
        costs.append([float(lat[w]) for w in grid])
    res = knapsack.solve(values, costs, float(target_ms) - cost.table.fixed_ms, resolution)
    return [opts[k] for opts, k in zip(options, res.choice)], res


def keep_ratios_of_widths(cost: LatencyCost, widths: list[int]) -> torch.Tensor:
    """The keep ratio per block whose channel selection keeps exactly these inner widths."""
    return torch.tensor([float(kept[w]) / float(kept[-1]) for kept, w in zip(cost.kept, widths)], dtype=_F64)
