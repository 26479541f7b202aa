"""The stage DP with the number of stages fixed (``num_stages=k``): pure numpy.

Same cost as ``dp_stages.dp`` (T = Σ t + (B − 1)·max t + max u, sub-meshes covering the cluster
exactly, ``max_n_succ_stages`` limits), over plans of exactly k stages. F[r, i, d] is the least
Σ t of layers i..L-1 cut into exactly r stages on exactly d devices, every stage's t at most
t_cap; t_cap runs over the distinct t values in ascending order, pruned once
F_min + (B − 1)·t_cap + min u reaches the best plan (F_min: the least Σ t with no cap). For each
t_cap the u cap walks down as in ``dp_stages.dp`` (the (Σ t, max u) Pareto front).
"""

from __future__ import annotations

import numpy as np

from dp_stages.dp import StageDPInput, StagePlan, plan_cost, prepare


def stage_dp_count(inp: StageDPInput, num_stages: int) -> tuple[float, StagePlan | None]:
    """Least-cost plan with exactly ``num_stages`` stages: ``(cost, plan)`` or ``(inf, None)``."""
    tab = prepare(inp)
    k = int(num_stages)
    if k < 1 or k > min(inp.num_layers, tab.total_devices):
        return float("inf"), None
    valid = np.isfinite(tab.t)
    sigma_lb, stages = _dp(tab, valid, k)
    if stages is None:
        return float("inf"), None
    best = [plan_cost(inp, stages), stages]
    b1 = inp.num_microbatches - 1
    u_lb = float(tab.u[valid].min())
    caps = np.unique(tab.t[valid])
    for t_cap in (caps if b1 else caps[-1:]):
        if sigma_lb + b1 * t_cap + u_lb >= best[0]:
            break
        mask = valid & (tab.t <= t_cap)
        u_vals = np.unique(tab.u[mask])
        sigma, stages = _dp(tab, mask, k)
        while stages is not None:
            cost = plan_cost(inp, stages)
            if cost < best[0]:
                best = [cost, stages]
            if sigma + b1 * t_cap + u_lb >= best[0]:
                break
            lower = u_vals[u_vals < max(float(tab.u[i, j, s]) for i, j, s in stages)]
            if not lower.size:
                break
            sigma, stages = _dp(tab, mask & (tab.u <= lower[-1]), k)
    cost, stages = best
    t_max = max(float(tab.t[i, j, s]) for i, j, s in stages)
    return float(cost), StagePlan(float(cost), tuple(stages), t_max)


def _dp(tab, mask: np.ndarray, k: int):
    """(least Σ t, stages) over plans of exactly k stages using only entries in ``mask``."""
    L, _, S = tab.t.shape
    D = tab.total_devices
    cost = np.where(mask, tab.t, np.inf)
    F = np.full((k + 1, L + 1, D + 1), np.inf)
    F[0, L, 0] = 0.0
    arg = np.full((k + 1, L, D + 1, 2), -1, dtype=np.int64)  # (last layer, sub-mesh)
    for i in range(L - 1, -1, -1):
        for r in range(1, k + 1):
            best = np.full(D + 1, np.inf)
            for s in range(S):
                n = int(tab.n_dev[s])
                ok = cost[i, i:, s] if tab.succ is None else np.where(
                    tab.succ[i, i:, s] >= r - 1, cost[i, i:, s], np.inf)
                tot = np.full((L - i, D + 1), np.inf)
                tot[:, n:] = ok[:, None] + F[r - 1, i + 1:, : D + 1 - n]
                j = tot.argmin(axis=0)
                val = tot[j, np.arange(D + 1)]
                better = val < best
                best = np.where(better, val, best)
                arg[r, i, better] = np.stack([i + j[better], np.full(better.sum(), s)], axis=1)
            F[r, i] = best
    sigma = float(F[k, 0, D])
    if not np.isfinite(sigma):
        return float("inf"), None
    stages, i, d = [], 0, D
    for r in range(k, 0, -1):
        j, s = (int(x) for x in arg[r, i, d])
        stages.append((i, j, s))
        d -= int(tab.n_dev[s])
        i = j + 1
    return sigma, tuple(stages)
