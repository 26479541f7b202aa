"""Alpa's inter-op stage DP (``training_dp`` in ``alpa/pipeline_parallel/stage_construction.py``).

A pure function over numpy cost tables, free of mesh and device code. The L layers are cut
into consecutive stages, each placed on a sub-mesh, so that the sub-meshes' device counts sum
to exactly N·M. For B microbatches a plan costs

    T = Σ_i t_i + (B − 1)·max_i t_i + max_i u_i

with t_i a stage's per-microbatch time and u_i its once-per-step work.

How the two maxima are handled exactly: for caps (t_cap, u_cap), the DP finds the least Σ t
over plans whose every stage has t <= t_cap and u <= u_cap. As in Alpa, t_cap runs over the
distinct finite t values in ascending order, pruned once F_min + (B − 1)·t_cap + min u reaches
the best cost found (F_min: the least Σ t with no caps). For each t_cap, u_cap walks down the
(Σ t, max u) Pareto front: start at u_cap = inf; if the plan found has max u = u', every cap in
[u', previous cap] gives the same least Σ t, so the next cap is the largest u value below u'.
The optimal plan P* is reached at t_cap = its max t: each cap stays >= its max u until a plan
with Σ t <= Σ t(P*), max t <= max t(P*) and max u <= max u(P*) turns up. With u ≡ 0 (the
default) this is Alpa's loop over t_max alone, one DP per t_cap. Every reported cost is the
formula evaluated on the returned stages, not the DP's bound.

Device packing follows Alpa's simplification: the DP counts devices only (a (k, M) sub-mesh
uses k·M, a (1, m) one uses m) and takes any multiset summing to N·M as packable, which holds
when M is a power of two (sizes that divide M pack first-fit into hosts).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from alpa_lite.ir.errors import InfeasibleError
from dp_stages.submeshes import num_devices


@dataclass(frozen=True, eq=False)
class StageDPInput:
    """Cost tables for the stage DP. Arrays are indexed [first_layer, last_layer, submesh]."""

    num_layers: int  # L
    submeshes: tuple[tuple[int, int], ...]  # candidate (hosts, devices) sub-mesh shapes
    num_hosts: int  # N
    devices_per_host: int  # M
    num_microbatches: int  # B
    # t for layers i..j (i <= j) on sub-mesh s; np.inf = infeasible (e.g. over memory);
    # entries with j < i are ignored.
    compute_cost: np.ndarray
    # u: once-per-step work of the stage (gradient sync + optimizer update); None = zeros.
    once_cost: np.ndarray | None = None
    # The most stages that may follow this stage, given its memory for in-flight microbatches
    # (Alpa's max_n_succ_stages); None = unlimited.
    max_n_succ_stages: np.ndarray | None = None


@dataclass(frozen=True)
class StagePlan:
    total_cost: float  # T of the formula above
    stages: tuple[tuple[int, int, int], ...]  # (first_layer, last_layer, submesh index), in order
    t_max: float  # the largest per-microbatch stage time of the plan


@dataclass(frozen=True, eq=False)
class _Tables:
    """Validated tables: t is inf wherever an entry can never be used."""

    t: np.ndarray  # [L, L, S] float
    u: np.ndarray  # [L, L, S] float
    succ: np.ndarray | None  # [L, L, S] int, None when the limits can never bind
    n_dev: np.ndarray  # [S] devices per sub-mesh
    total_devices: int
    max_stages: int  # most stages in a plan: min(L, N·M), or 1 + the largest stage limit

    @cached_property
    def entries(self) -> _Entries:
        """The usable entries in the order a DP step scans them (made once per tables)."""
        return _entries(self)


def stage_dp(inp: StageDPInput) -> tuple[float, StagePlan | None]:
    """Least-cost stage plan: ``(cost, plan)``, or ``(inf, None)`` when nothing is feasible."""
    tab = prepare(inp)
    valid = np.isfinite(tab.t)
    if not valid.any():
        return float("inf"), None
    # Σ t with no caps: a lower bound on Σ t of every plan, and a first incumbent.
    sigma_lb, stages = _dp(tab, valid[None])[0]
    if stages is None:
        return float("inf"), None
    best = _Best(inp, stages)
    b1 = inp.num_microbatches - 1
    u_lb = float(tab.u[valid].min())
    t_caps = np.unique(tab.t[valid])
    if b1 == 0:
        t_caps = t_caps[-1:]  # with B = 1 a tighter t cap only removes plans
    # Caps in ascending batches of 1, 2, 4, ... solved together (one DP per batch), from the
    # least cap under which some plan exists: below it every DP is infeasible.
    start, size, most = _first_feasible(tab, valid, t_caps), 1, _batch_size(tab)
    while start < len(t_caps):
        caps = t_caps[start : start + size]
        masks = valid[None] & (tab.t[None] <= caps[:, None, None, None])
        for t_cap, mask_t, first in zip(caps, masks, _dp(tab, masks), strict=True):
            if sigma_lb + b1 * t_cap + u_lb >= best.cost:
                return best.cost, best.plan()  # the bound only grows with t_cap
            _u_front(tab, mask_t, b1 * t_cap, best, first)
        start, size = start + size, min(2 * size, most)
    return best.cost, best.plan()


def _first_feasible(tab: _Tables, valid: np.ndarray, t_caps: np.ndarray) -> int:
    """Index of the least cap in ``t_caps`` (ascending) under which some plan exists, by
    bisection: a plan within a cap is within every larger one (its mask only grows), so
    feasibility is monotone in the cap. The last cap admits every entry, and the uncapped DP
    found a plan. On a 96-layer GPT on 64 devices, 900 of the 1,310 caps the ascending scan
    solved had no plan (8.4 s of its 8.5 s went to DPs; 12 single-cap DPs find the first
    feasible cap)."""
    lo, hi = 0, len(t_caps) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _dp(tab, (valid & (tab.t <= t_caps[mid]))[None])[0][1] is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _u_front(tab: _Tables, mask_t: np.ndarray, t_term: float, best: _Best, first) -> None:
    """Offer the plans on the (Σ t, max u) Pareto front among those with every t <= t_cap.

    From u_cap = inf down: the DP's plan has some max u = u'; every u_cap in [u', previous cap]
    gives the same least Σ t, so the next cap worth a DP is the largest u value below u'. When
    the optimum P* has max t = t_cap, each cap stays >= max u of P* until a plan with max u <=
    that of P* (and Σ t <= Σ t of P*) is found, so the front holds a plan as good as P*.
    """
    u_vals = np.unique(tab.u[mask_t])
    u_lb = float(u_vals[0]) if u_vals.size else np.inf
    sigma, stages = first  # the DP's answer for u_cap = inf
    while True:
        if stages is None:
            return
        best.offer(stages)
        # P* with max t = t_cap not yet matched has Σ t >= sigma and max u >= u_lb
        if sigma + t_term + u_lb >= best.cost:
            return
        u_plan = max(float(tab.u[i, j, s]) for i, j, s in stages)
        lower = u_vals[u_vals < u_plan]
        if not lower.size:
            return
        sigma, stages = _dp(tab, (mask_t & (tab.u <= lower[-1]))[None])[0]


def best_stage_plan(inp: StageDPInput) -> StagePlan:
    """As ``stage_dp`` but raises ``InfeasibleError`` (a ``PlanningError``) when nothing fits."""
    cost, plan = stage_dp(inp)
    if plan is not None:
        return plan
    tab = prepare(inp)
    if not np.isfinite(tab.t).any():
        why = "every (layer range, sub-mesh) entry is infeasible (inf), e.g. over memory"
    else:
        why = (
            "no split into consecutive stages covers all "
            f"{tab.total_devices} devices exactly within the max_n_succ_stages limits"
        )
    raise InfeasibleError(
        f"no pipeline plan for {inp.num_layers} layers on {inp.num_hosts}x"
        f"{inp.devices_per_host} devices: {why}; raise the memory budget, use fewer "
        "microbatches in flight, or allow more sub-mesh shapes"
    )


def plan_cost(inp: StageDPInput, stages) -> float:
    """T = Σ t + (B − 1)·max t + max u of the given (first, last, submesh) stages."""
    t = np.asarray(inp.compute_cost, dtype=np.float64)
    ts = [float(t[i, j, s]) for i, j, s in stages]
    u_max = 0.0
    if inp.once_cost is not None:
        u = np.asarray(inp.once_cost, dtype=np.float64)
        u_max = max(float(u[i, j, s]) for i, j, s in stages)
    return sum(ts) + (inp.num_microbatches - 1) * max(ts) + u_max


class _Best:
    """The incumbent plan; offers are costed by the formula, so the reported cost is exact."""

    def __init__(self, inp: StageDPInput, stages):
        self.inp = inp
        self.stages = stages
        self.cost = plan_cost(inp, stages)

    def offer(self, stages) -> None:
        cost = plan_cost(self.inp, stages)
        if cost < self.cost:
            self.cost, self.stages = cost, stages

    def plan(self) -> StagePlan | None:
        if not np.isfinite(self.cost):
            return None
        t = np.asarray(self.inp.compute_cost, dtype=np.float64)
        t_max = max(float(t[i, j, s]) for i, j, s in self.stages)
        return StagePlan(float(self.cost), tuple(self.stages), t_max)


def _dp(tab: _Tables, masks: np.ndarray) -> list[tuple[float, tuple | None]]:
    """Least Σ t over plans using only the entries in each mask of ``masks`` [C, L, L, S].

    Returns ``(sigma, stages)`` per mask, ``(inf, None)`` where no plan fits. F[c, r, i, d]: least
    Σ t of layers i..L-1 on exactly d devices under mask c. With stage limits, r = the number of
    stages from i on (Alpa's s); without, r collapses to one row. Each layer i is one vectorised
    step over (mask, r, usable entry (k, m) of first layer i, devices d).
    """
    C, L, _, S = masks.shape
    D = tab.total_devices
    track = tab.succ is not None
    rows = tab.max_stages + 1 if track else 1
    pad = int(tab.n_dev.max())  # inf columns left of d = 0, so d - n_dev < 0 reads inf
    width = pad + D + 1
    F = np.full((C, rows, L + 1, width), np.inf)
    F[:, 0, L, pad] = 0.0
    arg = np.zeros((C, rows, L, D + 1), dtype=np.int64)
    ent = tab.entries
    cost = np.where(masks[:, ent.first, ent.last, ent.mesh], ent.t, np.inf)  # [C, E]
    used = np.flatnonzero(np.isfinite(cost).any(axis=0))  # entries some mask allows
    bounds = np.searchsorted(ent.first[used], np.arange(L + 1))
    flat = F.reshape(C, rows, (L + 1) * width)  # a view: F's layer-major columns
    src, dst = (slice(0, rows - 1), slice(1, rows)) if track else (slice(0, 1), slice(0, 1))
    for i in range(L - 1, -1, -1):
        e = used[bounds[i]:bounds[i + 1]]
        if e.size:
            arg[:, dst, i, :], F[:, dst, i, pad:] = _layer_step(tab, flat[:, src], cost[:, e], e, i)
    out = []
    for c in range(C):
        r0 = int(np.argmin(F[c, :, 0, pad + D]))
        sigma = float(F[c, r0, 0, pad + D])
        ok = np.isfinite(sigma)
        out.append((sigma, _walk(tab, arg[c], r0, track)) if ok else (float("inf"), None))
    return out


def _layer_step(tab: _Tables, rest: np.ndarray, cost: np.ndarray, e: np.ndarray, i: int):
    """Best first stage from layer i: (argmin (k − i)·S + m, least Σ t), each [C, R, D+1].

    ``rest`` [C, R, (L+1)·(pad+D+1)]: F flattened per row, R = stages after this one; ``cost``
    [C, E']: t of the entries ``e`` (first layer i) under each mask. The entries are ordered by
    (sub-mesh, last layer) and the argmin takes the first least one, so ties go to the lowest
    sub-mesh index, then the shortest stage.
    """
    ent = tab.entries
    gathered = rest[:, :, ent.columns[e]]  # [C, R, E', D+1]: F of layers k+1.. on d − n_dev[m]
    tot = gathered + cost[:, None, :, None]
    if tab.succ is not None:  # r stages after this one, within this stage's limit
        allowed = np.arange(rest.shape[1])[:, None] <= ent.succ[e][None]
        tot = np.where(allowed[None, :, :, None], tot, np.inf)
    pick = tot.argmin(axis=2)
    best = np.take_along_axis(tot, pick[:, :, None, :], axis=2)[:, :, 0, :]
    return ent.code[e][pick] - i * tab.t.shape[-1], best


@dataclass(frozen=True, eq=False)
class _Entries:
    """The usable entries (finite t) of the tables, ordered by (first layer, sub-mesh, last
    layer), with what a DP step reads of each."""

    first: np.ndarray  # [E] first layer i
    last: np.ndarray  # [E] last layer k
    mesh: np.ndarray  # [E] sub-mesh m
    t: np.ndarray  # [E] t[i, k, m]
    code: np.ndarray  # [E] k·S + m (the step subtracts i·S: the argmin a walk decodes)
    columns: np.ndarray  # [E, D+1] columns of F's flat row holding F[k+1, d − n_dev[m]], d = 0..D
    succ: np.ndarray | None  # [E] the stage limit, when limits bind


def _entries(tab: _Tables) -> _Entries:
    L, _, S = tab.t.shape
    D = tab.total_devices
    pad = int(tab.n_dev.max())
    first, last, mesh = np.nonzero(np.isfinite(tab.t))
    order = np.lexsort((last, mesh, first))
    first, last, mesh = first[order], last[order], mesh[order]
    start = (last + 1) * (pad + D + 1) + pad - tab.n_dev[mesh]
    columns = start[:, None] + np.arange(D + 1)[None, :]
    succ = None if tab.succ is None else tab.succ[first, last, mesh]
    return _Entries(first, last, mesh, tab.t[first, last, mesh], last * S + mesh, columns, succ)


def _batch_size(tab: _Tables) -> int:
    """Caps solved per vectorised DP: at most about 2^20 floats in one step's array (caps past
    the one where the bound stops the scan are wasted work; on a 96-layer GPT on 64 devices
    2^20 (24 caps) took 2.9 s for B = 16 and 8 together, 2^21 3.4 s, 2^19 3.0 s)."""
    L, _, S = tab.t.shape
    rows = tab.max_stages if tab.succ is not None else 1
    return int(np.clip((1 << 20) // (rows * L * S * (tab.total_devices + 1)), 1, 64))


def _walk(tab: _Tables, arg: np.ndarray, r: int, track: bool) -> tuple[tuple[int, int, int], ...]:
    """Follow the argmins from (r, layer 0, all devices) to the plan's stages."""
    L, _, S = tab.t.shape
    i, d, stages = 0, tab.total_devices, []
    while i < L:
        kk, m = divmod(int(arg[r, i, d]), S)
        stages.append((i, i + kk, m))
        d -= int(tab.n_dev[m])
        i += kk + 1
        r = r - 1 if track else r
    assert d == 0, "DP walk did not use the cluster exactly"
    return tuple(stages)


def prepare(inp: StageDPInput) -> _Tables:
    """The DP's tables for ``inp`` (also read by ``stage_count``); checks the input."""
    L, S = inp.num_layers, len(inp.submeshes)
    if L < 1:
        raise ValueError(f"num_layers must be >= 1, got {L}")
    if inp.num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {inp.num_microbatches}")
    for shape in inp.submeshes:
        _check_submesh(shape, inp.num_hosts, inp.devices_per_host)
    t = _table(inp.compute_cost, (L, L, S), "compute_cost", 0.0)
    u = _table(inp.once_cost, (L, L, S), "once_cost", 0.0)
    upper = np.triu(np.ones((L, L), dtype=bool))[:, :, None]  # i <= j
    t = np.where(upper & np.isfinite(u), t, np.inf)  # an inf u makes the stage unusable
    D = inp.num_hosts * inp.devices_per_host
    max_stages = min(L, D)
    succ = None
    if inp.max_n_succ_stages is not None:
        succ = np.asarray(inp.max_n_succ_stages, dtype=np.float64)
        if succ.shape != (L, L, S):
            raise ValueError(f"max_n_succ_stages has shape {succ.shape}, expected {(L, L, S)}")
        if np.isnan(succ[np.isfinite(t)]).any():
            raise ValueError("max_n_succ_stages has NaN on a usable entry")
        # inf (or anything >= L) means unlimited; below 0 means the stage can never be used
        succ = np.floor(np.clip(np.nan_to_num(succ), -1, L)).astype(np.int64)
        usable = succ[np.isfinite(t)]
        if not (usable < max_stages - 1).any():
            succ = None  # the limits never bind: drop the stage-count dimension
        else:  # a plan's first stage caps its number of stages
            max_stages = max(1, min(max_stages, int(usable.max()) + 1))
    n_dev = np.array([num_devices(s) for s in inp.submeshes], dtype=np.int64)
    return _Tables(t, u, succ, n_dev, D, max_stages)


def _table(a: np.ndarray | None, shape: tuple[int, ...], name: str, default: float) -> np.ndarray:
    if a is None:
        return np.full(shape, default)
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (layer, layer, submesh)")
    upper = np.triu(np.ones(shape[:2], dtype=bool))[:, :, None] & np.ones(shape, dtype=bool)
    if np.isnan(a[upper]).any() or (a[upper] < 0).any():
        raise ValueError(f"{name} must be >= 0 or inf (no NaN) on entries with first <= last")
    return a


def _check_submesh(shape: tuple[int, int], num_hosts: int, devices_per_host: int) -> None:
    hosts, devices = shape
    ok = 1 <= hosts <= num_hosts and 1 <= devices <= devices_per_host
    if not ok or (hosts > 1 and devices != devices_per_host):
        raise ValueError(
            f"sub-mesh {shape} does not fit a {num_hosts}x{devices_per_host} cluster: use "
            "(1, m) with m <= devices_per_host or (k, devices_per_host) with k <= num_hosts"
        )
