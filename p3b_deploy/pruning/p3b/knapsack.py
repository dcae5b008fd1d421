"""Multiple-choice knapsack: one option per group, maximum total value within a cost budget.

The latency allocation (`latency.knapsack_widths`) uses it with one group per branch, one option
per width of the latency table's grid (0 = removed), value from block benefit and cost in table
milliseconds. Pure numpy, no model.

Exact dynamic programme on a discretised cost axis: the budget is cut into `resolution` steps of
delta = budget / resolution, every option's cost is rounded *up* to whole steps, and
best[g][j] = max value of groups 0..g within j steps is filled group by group. Rounding up makes
every returned choice feasible in real costs (sum cost <= budget). What it can lose against the
real-valued optimum is bounded: any choice with real cost <= budget - n_groups * delta also fits
the rounded problem, so

    value(returned) >= OPT(budget - n_groups * delta)            (`KnapsackResult.slack`)

which the tests check against brute force. With integer costs and delta = 1 the result is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...errors import P3BError


@dataclass(frozen=True)
class KnapsackResult:
    """The chosen option per group and what it adds up to."""
    choice: list[int]  # index of the chosen option in each group
    value: float  # total value of the choice
    cost: float  # total real cost of the choice (<= budget)
    slack: float  # n_groups * delta: the choice is at least as good as the optimum at budget - slack


def solve(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
          resolution: int = 4000) -> KnapsackResult:
    """Maximise sum value[g][choice[g]] s.t. sum cost[g][choice[g]] <= budget, one option per group.

    Costs must be finite and >= 0. Raises P3BError when even the cheapest option of every group
    does not fit (no feasible choice)."""
    if len(values) != len(costs) or not values:
        raise P3BError("knapsack needs one value and one cost list per group (and at least one group)")
    vals = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    cost = [np.asarray(c, dtype=np.float64).reshape(-1) for c in costs]
    for g, (v, c) in enumerate(zip(vals, cost)):
        if v.size == 0 or v.size != c.size:
            raise P3BError(f"knapsack group {g}: {v.size} values but {c.size} costs")
        if not (np.isfinite(c).all() and (c >= 0).all() and np.isfinite(v).all()):
            raise P3BError(f"knapsack group {g}: costs must be finite and >= 0, values finite")
    budget = float(budget)
    cheapest = float(sum(c.min() for c in cost))
    if not math.isfinite(budget) or cheapest > budget:
        raise P3BError(f"knapsack: budget {budget:.6g} is below the cheapest choice's cost {cheapest:.6g}")
    if budget <= 0:  # only zero-cost options fit: take the most valuable of them per group
        choice = [int(np.flatnonzero(c == 0)[np.argmax(v[c == 0])]) for v, c in zip(vals, cost)]
        return _result(choice, vals, cost, 0.0)
    delta = budget / int(resolution)
    steps = [np.ceil(c / delta - 1e-9).astype(np.int64) for c in cost]
    J = int(resolution)
    neg = -np.inf
    best = np.zeros(J + 1)  # value of zero groups within j steps
    picks = []  # per group: option chosen at each j
    for v, s in zip(vals, steps):
        new = np.full(J + 1, neg)
        arg = np.full(J + 1, -1, dtype=np.int64)
        for k in range(v.size):
            if s[k] > J:
                continue
            cand = np.full(J + 1, neg)
            cand[s[k]:] = best[:J + 1 - s[k]] + v[k]
            better = cand > new
            new[better], arg[better] = cand[better], k
        best = new
        picks.append(arg)
    j = int(np.argmax(best))  # best is non-decreasing in j, argmax takes the cheapest optimum
    choice = [0] * len(vals)
    for g in range(len(vals) - 1, -1, -1):
        k = int(picks[g][j])
        choice[g] = k
        j -= int(steps[g][k])
    return _result(choice, vals, cost, len(vals) * delta)


def _result(choice: list[int], vals: list[np.ndarray], cost: list[np.ndarray], slack: float) -> KnapsackResult:
    return KnapsackResult(choice=choice, value=float(sum(v[k] for v, k in zip(vals, choice))),
                          cost=float(sum(c[k] for c, k in zip(cost, choice))), slack=float(slack))
