"""Exhaustive search over stage plans, to cross-check ``stage_dp`` on small tables.

Enumerates every split of the L layers into consecutive stages and every sub-mesh for each
stage (2^(L-1)·S^stages plans), keeping those that use exactly N·M devices, whose every
stage is finite, and whose stages each have at most max_n_succ_stages stages after them.
"""

from __future__ import annotations

import itertools
import math

from dp_stages.dp import StageDPInput, StagePlan


def brute_force_stages(inp: StageDPInput) -> tuple[float, StagePlan | None]:
    """Least-cost plan by enumeration: ``(cost, plan)`` or ``(inf, None)``."""
    L = inp.num_layers
    total = inp.num_hosts * inp.devices_per_host
    sizes = [h * m for h, m in inp.submeshes]
    best_cost, best = math.inf, None
    for cuts in itertools.product((False, True), repeat=L - 1):
        ranges = _ranges(L, cuts)
        for subs in itertools.product(range(len(sizes)), repeat=len(ranges)):
            if sum(sizes[s] for s in subs) != total:
                continue
            stages = tuple((i, j, s) for (i, j), s in zip(ranges, subs, strict=True))
            cost = _cost(inp, stages)
            if cost < best_cost:
                best_cost, best = cost, stages
    if best is None:
        return math.inf, None
    t_max = max(float(inp.compute_cost[i, j, s]) for i, j, s in best)
    return best_cost, StagePlan(best_cost, best, t_max)


def _ranges(L: int, cuts) -> list[tuple[int, int]]:
    """Consecutive (first, last) layer ranges; cuts[c] splits after layer c."""
    out, first = [], 0
    for c, cut in enumerate(cuts):
        if cut:
            out.append((first, c))
            first = c + 1
    out.append((first, L - 1))
    return out


def _cost(inp: StageDPInput, stages) -> float:
    """The formula, or inf when a stage is infeasible or breaks its successor limit."""
    n = len(stages)
    ts, us = [], []
    for pos, (i, j, s) in enumerate(stages):
        if inp.max_n_succ_stages is not None and n - 1 - pos > inp.max_n_succ_stages[i, j, s]:
            return math.inf
        ts.append(float(inp.compute_cost[i, j, s]))
        us.append(0.0 if inp.once_cost is None else float(inp.once_cost[i, j, s]))
    cost = sum(ts) + (inp.num_microbatches - 1) * max(ts) + max(us)
    return cost if math.isfinite(cost) else math.inf
