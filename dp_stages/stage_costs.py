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

Recomputation (remat) is a second option per entry: every layer of the stage recomputes its
forward half in the backward pass, so the stage holds per microbatch only its layers' inputs
(the non-weight ones, at the view's specs), and pays each layer's forward once more:

    t_remat    = t + Σ_{l=i..j} forward[l,v]
    mem_remat  = weight_factor·Σ weight[l,v] + inflight·Σ_{l=i..j} input[l,v]
               + max_l (residual[l,v] + transient[l,v])

The last term: during layer l's recomputed backward its residuals of the one microbatch being
worked on are live again, beside what its forward+backward needs beyond them (its transient).
An input read by several layers of the stage is counted once per reader (an upper bound: the
runtime saves each layer's inputs). "dots" (``jax.checkpoint_policies.dots_saveable``) is a third
option when ``LayerCosts.dots_forward_s``/``dots_bytes`` are given: the stage also holds its
matmul outputs the recomputation reads, and runs again only what lies between them:

    t_dots    = t + Σ_{l=i..j} dots_forward[l,v]
    mem_dots  = weight_factor·Σ weight[l,v] + inflight·Σ_{l=i..j} dots_bytes[l,v]
              + max_l (residual[l,v] + transient[l,v])
 ``remat`` says which options an entry may take: "never"
(keep only), "always" (recompute only) or "auto" (the fastest option that fits; keeping wins a
tie). The choice per entry is ``StageTables.remat``, as the view is ``StageTables.view``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dp_stages.dp import StageDPInput
from dp_stages.submeshes import num_devices

SCHEDULES = ("gpipe", "1f1b")
REMAT_MODES = ("never", "auto", "always")  # which options a stage entry may take (module docstring)
POLICIES = ("keep", "full", "dots")  # StageTables.remat's codes


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
    # Needed when recomputation is allowed (None: unknown, remat="never" only):
    forward_s: np.ndarray | None = None  # the forward half of one microbatch, run again under remat
    input_bytes: np.ndarray | None = None  # non-weight inputs of one microbatch: held under remat
    # "dots" (matmul outputs saved, the rest recomputed) as a third option when both are given:
    dots_forward_s: np.ndarray | None = None  # what it runs again of one microbatch's forward
    dots_bytes: np.ndarray | None = None  # non-weight inputs and saved matmul outputs of one microbatch

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
    per_microbatch_bytes: np.ndarray  # [L, L, S] per device: residuals (or, remat, inputs) of one microbatch
    remat: np.ndarray | None = None  # [L, L, S] index into POLICIES of the entry's choice (None: keep)

    def recomputes(self, i: int, j: int, s: int) -> bool:
        return self.remat is not None and bool(self.remat[i, j, s])

    def policy(self, i: int, j: int, s: int) -> str:
        """The entry's choice: "keep", "full" (its forward recomputed) or "dots"."""
        return "keep" if self.remat is None else POLICIES[int(self.remat[i, j, s])]

    def memory_bytes(self, i: int, j: int, s: int, inflight: int) -> float:
        return float(self.static_bytes[i, j, s] + inflight * self.per_microbatch_bytes[i, j, s])


def stage_tables(costs: LayerCosts, submeshes: tuple[tuple[int, int], ...],
                 submesh_views: tuple[tuple[int, ...], ...], num_hosts: int, devices_per_host: int,
                 num_microbatches: int, memory_budget: float, send_link: tuple[Link, ...],
                 weight_factor: float = 4.0, schedule: str = "gpipe", remat: str = "never") -> StageTables:
    """Compose the DP's tables; ``submesh_views[s]`` lists the view indices sub-mesh s may use;
    ``remat`` one of ``REMAT_MODES`` (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    _check_remat(costs, remat)
    L, S, B = costs.num_layers, len(submeshes), int(num_microbatches)
    sums = _LayerSums.of(costs, remat != "never")
    inner = _inner_pairs(costs.pair_s)
    out = _Out.empty(L, S, schedule == "1f1b", remat != "never")
    for i in range(L):  # every stage from layer i at once: the rows j = i..L-1
        opts = sums.options(i, inner[i, i:], weight_factor, remat)
        uv = _span(sums.u, i)
        for s, (shape, vs) in enumerate(zip(submeshes, submesh_views)):
            _fill(out, i, s, opts, uv, list(vs), B, memory_budget, schedule)
            placed = out.view[i, i:, s] >= 0
            out.t[i, i:, s] += np.where(placed, _send_s(costs, i, L, num_devices(shape), send_link[s]), 0.0)
    inp = StageDPInput(L, tuple(submeshes), num_hosts, devices_per_host, B, out.t, out.u, out.succ)
    return StageTables(inp, out.view, out.mem[0], out.mem[1], out.remat)


def _check_remat(costs: LayerCosts, remat: str) -> None:
    if remat not in REMAT_MODES:
        raise ValueError(f"unknown remat mode {remat!r}; choose one of {REMAT_MODES}")
    if remat != "never" and (costs.forward_s is None or costs.input_bytes is None):
        raise ValueError(f"remat={remat!r} needs LayerCosts.forward_s and input_bytes")


@dataclass(frozen=True)
class _Option:
    """One way to run a stage, per view [V]: time per microbatch, bytes held once, bytes held
    per microbatch in flight."""

    time: np.ndarray
    static: np.ndarray
    per_mb: np.ndarray
    remat: int  # index into POLICIES


@dataclass(frozen=True, eq=False)
class _LayerSums:
    """Prefix sums (``_prefix``) of the per-layer figures, and the per-layer terms the options'
    maxima run over."""

    time: tuple[np.ndarray, np.ndarray]
    u: tuple[np.ndarray, np.ndarray]
    weight: tuple[np.ndarray, np.ndarray]
    resid: tuple[np.ndarray, np.ndarray]
    transient: np.ndarray  # [L, V] peak − weight − residual, at least 0
    fwd: tuple[np.ndarray, np.ndarray] | None  # remat only
    inputs: tuple[np.ndarray, np.ndarray] | None
    live: np.ndarray | None  # [L, V] residual + transient: a layer's recomputed backward, remat only
    dots_fwd: tuple[np.ndarray, np.ndarray] | None = None  # "dots" only
    dots_held: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, c: LayerCosts, remat: bool) -> _LayerSums:
        transient = np.maximum(c.peak_bytes - c.weight_bytes - c.residual_bytes, 0.0)
        dots = remat and c.dots_forward_s is not None and c.dots_bytes is not None
        return cls(_prefix(c.time_s), _prefix(c.update_s), _prefix(c.weight_bytes), _prefix(c.residual_bytes),
                   transient, _prefix(c.forward_s) if remat else None,
                   _prefix(c.input_bytes) if remat else None,
                   np.asarray(c.residual_bytes, np.float64) + transient if remat else None,
                   _prefix(c.dots_forward_s) if dots else None, _prefix(c.dots_bytes) if dots else None)

    def options(self, i: int, pairs: np.ndarray, weight_factor: float, remat: str) -> list[_Option]:
        """Keep, then "dots", then recompute in full (so that the one recomputing less wins a
        tie), as ``remat`` allows ("always": in full only, Alpa's): for the stages of layers
        i..j, every j >= i at once (rows [L − i, V])."""
        tv = _span(self.time, i) + pairs
        weights = weight_factor * _span(self.weight, i)
        out = []
        if remat != "always":
            out.append(_Option(tv, weights + np.maximum.accumulate(self.transient[i:], axis=0),
                               _span(self.resid, i), 0))
        live = np.maximum.accumulate(self.live[i:], axis=0) if remat != "never" else None
        if remat == "auto" and self.dots_fwd is not None:
            out.append(_Option(tv + _span(self.dots_fwd, i), weights + live, _span(self.dots_held, i), 2))
        if remat != "never":
            out.append(_Option(tv + _span(self.fwd, i), weights + live, _span(self.inputs, i), 1))
        return out


@dataclass(frozen=True, eq=False)
class _Out:
    """The tables ``_fill`` writes into, [L, L, S] each (``mem``: static, per microbatch)."""

    t: np.ndarray
    u: np.ndarray
    view: np.ndarray
    mem: np.ndarray
    succ: np.ndarray | None
    remat: np.ndarray | None

    @classmethod
    def empty(cls, L: int, S: int, one_f_one_b: bool, remat: bool) -> _Out:
        return cls(np.full((L, L, S), np.inf), np.zeros((L, L, S)), np.full((L, L, S), -1, dtype=np.int64),
                   np.full((2, L, L, S), np.inf), np.full((L, L, S), np.inf) if one_f_one_b else None,
                   np.zeros((L, L, S), dtype=np.int8) if remat else None)


def _fill(out: _Out, i: int, s: int, options: list[_Option], uv: np.ndarray, vs: list[int],
          B: int, budget: float, schedule: str) -> None:
    """Pick, for every entry (i, j, s) with j >= i, the fastest (option, view) that fits the
    budget; among equal times the earlier option (keep) and the earlier view."""
    inflight = B if schedule == "gpipe" else 1
    rows = np.arange(uv.shape[0])
    best_t, best_o, best_v = np.full(rows.size, np.inf), np.full(rows.size, -1), np.zeros(rows.size, np.int64)
    for n, o in enumerate(options):
        need = o.static[:, vs] + inflight * o.per_mb[:, vs]
        cand = np.where(need <= budget, o.time[:, vs], np.inf)
        k = np.argmin(cand, axis=1)
        t = cand[rows, k]
        better = np.isfinite(t) & (t < best_t)
        best_t, best_o = np.where(better, t, best_t), np.where(better, n, best_o)
        best_v = np.where(better, np.asarray(vs)[k], best_v)
    for n, o in enumerate(options):
        js = np.flatnonzero(best_o == n)
        v = best_v[js]
        out.t[i, i + js, s], out.u[i, i + js, s], out.view[i, i + js, s] = o.time[js, v], uv[js, v], v
        out.mem[0, i, i + js, s], out.mem[1, i, i + js, s] = o.static[js, v], o.per_mb[js, v]
        if out.remat is not None:
            out.remat[i, i + js, s] = o.remat
        if schedule == "1f1b":  # a stage with n stages after it holds min(n + 1, B) microbatches
            static, per_mb = o.static[js, v], o.per_mb[js, v]
            with np.errstate(divide="ignore", invalid="ignore"):
                limit = np.floor((budget - static) / per_mb) - 1
            out.succ[i, i + js, s] = np.where(static + B * per_mb <= budget, np.inf, limit)


def remat_figures(costs: LayerCosts, i: int, j: int, v: int, policy: str = "full") -> tuple[float, float, float]:
    """For layers i..j at view v, per microbatch and device: (the forward time recomputation
    (``policy`` "full" or "dots") adds, the bytes kept without it (residuals), the bytes kept
    with it (inputs; "dots": and the saved matmul outputs))."""
    fwd_s, held = (costs.forward_s, costs.input_bytes) if policy == "full" else (costs.dots_forward_s, costs.dots_bytes)
    fwd = 0.0 if fwd_s is None else float(fwd_s[i:j + 1, v].sum())
    kept = 0.0 if held is None else float(held[i:j + 1, v].sum())
    return fwd, float(costs.residual_bytes[i:j + 1, v].sum()), kept


def _send_s(costs: LayerCosts, i: int, L: int, n: int, link: Link) -> np.ndarray:
    """Per microbatch, for the stages of layers i..j, every j >= i: activations to the next
    stage and gradients to the previous one."""
    nxt = np.asarray(costs.send_fwd_bytes[i + 1:], dtype=np.float64)  # cut after layer j, [L − i]
    fwd = (np.arange(i, L) + 1 < L) & (nxt > 0)
    back = i > 0 and costs.send_bwd_bytes[i] > 0
    nbytes = np.where(fwd, nxt, 0.0) + (float(costs.send_bwd_bytes[i]) if back else 0.0)
    transfers = fwd.astype(np.int64) + int(back)
    return transfers * link.alpha + nbytes / (n * link.beta)


def _span(cum: tuple[np.ndarray, np.ndarray], i: int) -> np.ndarray:
    """Σ_{l=i..j} from ``_prefix`` for every j >= i (rows [L − i, ...]): inf where a layer in
    the range is inf."""
    finite, infs = cum
    return np.where(infs[i + 1:] > infs[i], np.inf, finite[i + 1:] - finite[i])


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
