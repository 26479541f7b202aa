"""Exhaustive search over every combination of strategies: the reference the tests check CP-SAT
against. Vectorised over all combinations at once; refuses problems of more than 200k."""

from __future__ import annotations

import math

import numpy as np

from alpa_lite.ir.errors import InfeasibleError
from ilp.problem import IlpProblem, evaluate

MAX_COMBINATIONS = 200_000


def _all_choices(problem: IlpProblem) -> np.ndarray:
    """Every choice as a row, in lexicographic order (so ties resolve to the first)."""
    sizes = [c.size for c in problem.node_costs]
    total = math.prod(sizes)
    if total > MAX_COMBINATIONS:
        raise ValueError(f"{total} combinations: brute force handles at most {MAX_COMBINATIONS}")
    if not sizes:
        return np.zeros((1, 0), dtype=np.int64)
    return np.indices(sizes).reshape(len(sizes), -1).T


def _costs_and_peaks(problem: IlpProblem, choices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cost and peak memory of every row of ``choices`` (same formulas as ``evaluate``)."""
    cost = np.zeros(len(choices))
    for v, c in enumerate(problem.node_costs):
        cost += c[choices[:, v]]
    for e in problem.edges:
        cost += e.cost[choices[:, e.src], choices[:, e.dst]]
    peak = np.zeros(len(choices))
    for live in problem.live_sets:
        used = sum((problem.memory[v][choices[:, v]] for v in set(live)), np.zeros(len(choices)))
        peak = np.maximum(peak, used)
    return cost, peak


def brute_force(problem: IlpProblem) -> tuple[tuple[int, ...], float]:
    """``(choice, cost)`` of the cheapest choice with finite cost whose peak memory is within the
    budget (the first in lexicographic order among equals). Raises InfeasibleError if none."""
    choices = _all_choices(problem)
    cost, peak = _costs_and_peaks(problem, choices)
    budget = math.inf if problem.memory_budget is None else problem.memory_budget
    cost = np.where(np.isfinite(cost) & (peak <= budget), cost, np.inf)
    best = int(np.argmin(cost))
    if not np.isfinite(cost[best]):
        raise InfeasibleError("brute force: no choice has finite cost within the memory budget")
    choice = tuple(int(i) for i in choices[best])
    return choice, evaluate(problem, choice)[0]


def brute_force_min_peak(problem: IlpProblem) -> tuple[tuple[int, ...], float]:
    """``(choice, peak)``: the smallest peak memory of any choice with finite cost."""
    choices = _all_choices(problem)
    cost, peak = _costs_and_peaks(problem, choices)
    peak = np.where(np.isfinite(cost), peak, np.inf)
    best = int(np.argmin(peak))
    if not np.isfinite(peak[best]):
        raise InfeasibleError("brute force: every choice has infinite cost")
    choice = tuple(int(i) for i in choices[best])
    return choice, evaluate(problem, choice)[1]
