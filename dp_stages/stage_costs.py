"""Stage cost tables from per-layer costs: what the stage DP reads (pure numpy).

A stage of layers i..j on a sub-mesh runs under one logical view v of that sub-mesh (dp × tp).
Its costs are composed from its layers' intra-op solutions on v (each distinct layer solved
once per view) plus what joins them:

    t[i,j,s] = min over feasible views v of s of
               Σ_{l=i..j} time[l,v]                      forward+backward of one microbatch
             + Σ_{i<=a<b<=j} pair[a,b,v]                 resharding between layers a and b
             + (send_fwd[j+1] + send_bwd[i]) / (n_s·β_s) + α_s·(transfers)   to the neighbours
    u[i,j,s] = Σ_{l=i..j} update[l,v]                    once per step (the optimizer update)
    mem      = weight_factor·Σ weight[l,v] + inflight·Σ residual[l,v] + max_l transient[l,v]

with transient = peak − weight − residual (what one forward+backward needs beyond what is held),
``weight_factor`` counting the weights, their gradient accumulators and the optimizer state, and
``inflight`` the microbatches whose activations a stage holds: B under GPipe (every forward
before any backward); under 1F1B one more than the stages after it, which the DP bounds through
``max_n_succ_stages`` (Alpa's). A view that does not fit the per-device budget is not used; no
view fitting makes the entry infinite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dp_stages.dp import StageDPInput
from dp_stages.submeshes import num_devices

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True, eq=False)
class LayerCosts:
    """Per-layer figures on each logical view, per device; arrays [L, V] unless noted."""

    views: tuple[tuple[int, int], ...]  # V
    time_s: np.ndarray  # forward+backward of one microbatch
    update_s: np.ndarray  # once per step
    weight_bytes: np.ndarray
    residual_bytes: np.ndarray  # held from forward to backward, per microbatch
    peak_bytes: np.ndarray  # one forward+backward
    pair_s: np.ndarray  # [L, L, V]: resharding from layer a's outputs to layer b's inputs, a < b
    send_fwd_bytes: np.ndarray  # [L+1]: activation bytes crossing cut c forward
    send_bwd_bytes: np.ndarray  # [L+1]: gradient bytes crossing cut c backward

    @property
    def num_layers(self) -> int:
        return int(self.time_s.shape[0])


@dataclass(frozen=True)
class Link:
    alpha: float
    beta: float


@dataclass(frozen=True, eq=False)
class StageTables:
    dp_input: StageDPInput
    view: np.ndarray  # [L, L, S] index into LayerCosts.views of the chosen view, -1: none fits
    static_bytes: np.ndarray  # [L, L, S] per device at that view: weights, state, transient
    per_microbatch_bytes: np.ndarray  # [L, L, S] per device: residuals of one microbatch

    def memory_bytes(self, i: int, j: int, s: int, inflight: int) -> float:
        return float(self.static_bytes[i, j, s] + inflight * self.per_microbatch_bytes[i, j, s])


def stage_tables(costs: LayerCosts, submeshes: tuple[tuple[int, int], ...],
                 submesh_views: tuple[tuple[int, ...], ...], num_hosts: int, devices_per_host: int,
                 num_microbatches: int, memory_budget: float, send_link: tuple[Link, ...],
                 weight_factor: float = 4.0, schedule: str = "gpipe") -> StageTables:
    """Compose the DP's tables; ``submesh_views[s]`` lists the view indices sub-mesh s may use."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    L, S, B = costs.num_layers, len(submeshes), int(num_microbatches)
    cum = _prefix(costs.time_s)
    cum_u = _prefix(costs.update_s)
    cum_w = _prefix(costs.weight_bytes)
    cum_r = _prefix(costs.residual_bytes)
    transient = np.maximum(costs.peak_bytes - costs.weight_bytes - costs.residual_bytes, 0.0)
    inner = _inner_pairs(costs.pair_s)
    t = np.full((L, L, S), np.inf)
    u = np.zeros((L, L, S))
    view = np.full((L, L, S), -1, dtype=np.int64)
    mem = np.full((2, L, L, S), np.inf)  # static, per microbatch
    succ = np.full((L, L, S), np.inf) if schedule == "1f1b" else None
    for i in range(L):
        for j in range(i, L):
            tv = _span(cum, i, j) + inner[i, j]
            static = weight_factor * _span(cum_w, i, j) + transient[i:j + 1].max(axis=0)
            resid = _span(cum_r, i, j)
            for s, (shape, vs) in enumerate(zip(submeshes, submesh_views)):
                _fill(t, u, view, mem, succ, (i, j, s), tv, _span(cum_u, i, j), static, resid,
                      list(vs), B, memory_budget, schedule)
                if view[i, j, s] >= 0:
                    t[i, j, s] += _send_s(costs, i, j, L, num_devices(shape), send_link[s])
    inp = StageDPInput(L, tuple(submeshes), num_hosts, devices_per_host, B, t, u, succ)
    return StageTables(inp, view, mem[0], mem[1])


def _fill(t, u, view, mem, succ, ijs, tv, uv, static, resid, vs, B, budget, schedule) -> None:
    """Pick the fastest view of one (i, j, s) entry that fits the budget."""
    inflight = B if schedule == "gpipe" else 1
    need = static[vs] + inflight * resid[vs]
    ok = need <= budget
    if not ok.any():
        return
    cand = np.where(ok, tv[vs], np.inf)
    k = int(np.argmin(cand))
    if not np.isfinite(cand[k]):
        return
    v = vs[k]
    t[ijs], u[ijs], view[ijs] = tv[v], uv[v], v
    mem[(0, *ijs)], mem[(1, *ijs)] = static[v], resid[v]
    if schedule == "1f1b":  # a stage with n stages after it holds min(n + 1, B) microbatches
        fits_all = static[v] + B * resid[v] <= budget
        succ[ijs] = np.inf if fits_all else np.floor((budget - static[v]) / resid[v]) - 1


def _send_s(costs: LayerCosts, i: int, j: int, L: int, n: int, link: Link) -> float:
    """Per microbatch: activations to the next stage and gradients to the previous one."""
    nbytes, transfers = 0.0, 0
    if j + 1 < L and costs.send_fwd_bytes[j + 1] > 0:
        nbytes += float(costs.send_fwd_bytes[j + 1])
        transfers += 1
    if i > 0 and costs.send_bwd_bytes[i] > 0:
        nbytes += float(costs.send_bwd_bytes[i])
        transfers += 1
    return transfers * link.alpha + nbytes / (n * link.beta)


def _span(cum: tuple[np.ndarray, np.ndarray], i: int, j: int) -> np.ndarray:
    """Σ_{l=i..j} from ``_prefix``: inf where a layer in the range is inf."""
    finite, infs = cum
    return np.where(infs[j + 1] > infs[i], np.inf, finite[j + 1] - finite[i])


def _prefix(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums along axis 0 (shape [L+1, ...]) of the finite values, and of the count of
    infinite ones (so that a range's sum is exact: inf − inf never arises)."""
    a = np.asarray(a, dtype=np.float64)
    zero = np.zeros((1, *a.shape[1:]))
    inf = np.isinf(a)
    return (np.concatenate([zero, np.cumsum(np.where(inf, 0.0, a), axis=0)]),
            np.concatenate([zero, np.cumsum(inf, axis=0)]))


def _inner_pairs(pair: np.ndarray) -> np.ndarray:
    """inner[i, j, v] = Σ_{i<=a<b<=j} pair[a, b, v]."""
    pair = np.asarray(pair, dtype=np.float64)
    L = pair.shape[0]
    upper = np.triu(np.ones((L, L), dtype=bool), k=1)[:, :, None]
    p = np.where(upper, pair, 0.0)
    # suffix over a, prefix over b: inner[i, j] = Σ_{a>=i} Σ_{b<=j} p[a, b]
    suf = np.cumsum(p[::-1], axis=0)[::-1]
    return np.cumsum(suf, axis=1)


def bubble_fraction(stage_times: list[float], num_microbatches: int) -> float:
    """Idle share of the pipeline: 1 − B·t_max / (Σ t + (B − 1)·t_max); (S−1)/(S+B−1) when
    the S stages are equal."""
    total = sum(stage_times) + (num_microbatches - 1) * max(stage_times)
    return 0.0 if total <= 0 else 1.0 - num_microbatches * max(stage_times) / total
