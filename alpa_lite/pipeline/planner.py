"""``plan_pipeline``: Alpa's inter-op pass, a training step cut into stages on sub-meshes.

1. Split the step around its ``al.value_and_grad`` (``program``) for B microbatches and
   cut the loss into L layers (``al.mark_layer`` boundaries, else FLOPs-balanced clustering).
2. Solve every distinct layer's forward+backward with the intra-op ILP once per logical view
   (dp, tp) of every candidate sub-mesh shape (``layers``).
3. Compose stage costs (t_i per microbatch, u_i per step, memory with in-flight activations;
   per stage, keeping the activations or recomputing them, as ``remat`` allows) in
   ``dp_stages.stage_costs`` and run the stage DP (``stage_dp``; ``stage_dp_count`` when
   ``num_stages`` is given): T = Σ t_i + (B − 1)·max t_i + max u_i.
4. B (``num_microbatches``) is chosen among powers of two dividing the batch when not given;
   with ``num_stages=None`` the one-stage plan (``al.plan(..., num_stages=1)``) is a candidate
   too and wins ties, so the chosen plan is never predicted slower than it.

What the runtime does shapes what is charged: a weight gradient the layer plan makes as a
partial sum (data-parallel weights) is accumulated unreduced and reduced once per step
(``accum``), so that all-reduce is in u_i, not t_i; any other gradient reduction stays
in t_i. u_i is that gradient sync plus the optimizer update on the stage's weights (and their
state). The layer ILP itself still charges every reduction per microbatch (it knows no B), so it
may under-use data parallelism a little. The plan lists its predicted collectives per stage and
program (``collectives``), which ``plan.check`` compares with the compiled stages.
Activations crossing a stage boundary are charged to t_i at the cross-host link when the
cluster has several hosts (the DP does not know whether neighbours share a host).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from alpa_lite.intra.planner import plan_one_stage
from alpa_lite.intra.roles import find_ties, out_example_of, resolve_mesh, state_and_batch
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import CutOffError, InfeasibleError, PlanningError
from alpa_lite.ir.graph import OpGraph
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.pipeline.collectives import StageSpan, stage_collectives
from alpa_lite.pipeline.layers import LayerGraph, LayerSolution, layer_graph, solve_layer, view_cluster
from alpa_lite.pipeline.program import (
    Layer,
    StepProgram,
    TracedStep,
    cut_layers,
    layer_starts,
    split_step,
    tensor_info,
    trace_step,
)
from alpa_lite.result.plan import LayerPlan, PipelineInfo, Plan, PlanCost, SolverInfo, StageInfo
from alpa_lite.tracing.tracer import trace
from cost_model.resharding import reshard
from dp_stages import logical_views as views_of
from dp_stages import stage_dp, submesh_shapes
from dp_stages.stage_costs import (
    SCHEDULES,
    LayerCosts,
    Link,
    StageTables,
    bubble_fraction,
    remat_figures,
    stage_tables,
)
from dp_stages.stage_count import stage_dp_count
from ilp.solver import format_bytes

log = logging.getLogger("alpa_lite.pipeline")

# Per-layer ILP limit (CP-SAT deterministic time, about seconds; the wall clock gets 5x): a layer is one block's
# forward+backward; on a 1-D view CP-SAT proves most optimal in well under a second, on a 2-D
# view it may stop at a feasible plan (a worse one than another view's is simply not used).
LAYER_TIME_LIMIT_S = 2.0
# Layer ILPs solved at once (threads; at most the machine's cores).
LAYER_WORKERS = 4
MAX_MICROBATCHES = 64


@dataclass(frozen=True)
class _Settings:
    cluster: ClusterSpec
    hosts: int
    per_host: int
    budget: float
    num_stages: int | None
    schedule: str
    remat: str  # dp_stages.stage_costs.REMAT_MODES: "auto", "never" or "always"
    num_layers: int | None
    layer_time_limit_s: float
    views: str
    static: tuple[int, ...]
    state: tuple[int, ...]
    batch: tuple[int, ...]
    out_example: Any  # the step's result, shapes and dtypes

    @property
    def capacity(self) -> float:
        """Bytes the whole cluster holds within the budget."""
        return self.budget * self.hosts * self.per_host


@dataclass(eq=False)
class Candidate:
    """A pipeline for one microbatch count: the program, its layers, their plans, the DP result."""

    prog: StepProgram
    layers: list[Layer]
    sigs: list[str]
    graphs: dict[str, LayerGraph]
    sols: dict[tuple[str, tuple[int, int]], LayerSolution]
    views: list[tuple[int, int]]
    submeshes: tuple[tuple[int, int], ...]
    tables: StageTables | None  # None: the memory floor alone rules every pipeline out
    stages: tuple[tuple[int, int, int], ...]
    cost: float
    ilp_s: float
    floor_bytes: float = 0.0  # ``memory_floor``: bytes every pipeline of this B needs in all
    # B = 1 only (the microbatch is the batch): bytes one stage needs in all (``one_stage_floor``)
    one_stage_floor: float | None = None
    costs: LayerCosts | None = None  # the per-layer figures the tables were composed from


@dataclass
class _Search:
    """What the microbatch search saw beside its best candidate: the counts tried, and the
    one-stage floor when B = 1 was tried."""

    tried: list[int]
    one_stage_floor: float | None = None


def plan_pipeline(fn: Callable[..., Any], *args: Any, mesh: Any = None, cluster: ClusterSpec | None = None,
                  method: str = "auto", memory_budget: float | None = None, num_stages: int | None = None,
                  num_microbatches: int | None = None, batch_argnums: Sequence[int] | None = None,
                  static_argnums: Sequence[int] = (), time_limit_s: float = 60.0, schedule: str = "gpipe",
                  num_layers: int | None = None, layer_time_limit_s: float = LAYER_TIME_LIMIT_S,
                  logical_views: str = "auto", compare_one_stage: bool = True,
                  progress: Callable[[str], None] | None = None, remat: bool | None = None,
                  traced: TracedStep | None = None) -> Plan:
    """Plan ``fn(*args)`` as a pipeline (or one stage when that is predicted no slower).

    Beyond ``al.plan``'s arguments: ``schedule`` ("gpipe" or "1f1b"), ``num_layers`` (cluster the
    loss into this many layers even when it has markers), ``layer_time_limit_s`` (per layer ILP,
    CP-SAT deterministic units) and ``logical_views``: "auto" (in one host the 1-D view, where
    every op may split any one dimension over all devices; across k hosts also (k, M), hosts × a
    host's devices, where the two links differ), "all" (every dp×tp with tp within a host: hybrids
    inside a host too, at a much larger ILP: ~90k against ~5k variables for a GPT block on 2×2
    against 4×1) or "1d". ``compare_one_stage=False`` skips planning the one-stage candidate (with
    ``num_stages=None`` the DP still weighs one stage composed from the layers' plans): for big
    models on a 2-D mesh that ILP dominates planning time. ``progress`` is called with each
    phase as it starts ("pipeline B=4: layer 2/3 on view (8, 1)", "one-stage candidate", ...).

    ``remat``: None lets the stage DP choose per stage whether its layers recompute their forward
    in the backward pass (only where that fits when keeping does not, or is faster: keeping wins a
    tie, then "dots"); False never recomputes; True makes every stage recompute in full, and rules
    the one-stage candidate out (beside pipelines it keeps every activation; ``num_stages=1`` plans
    one stage with per-layer recomputation, ``one_stage.plan_one_stage_remat``).

    ``traced``: the step's full-batch trace (``program.pipelined_step``) when the caller already
    made it with these arguments (``al.plan`` does, to choose this path); else it is traced here.
    """
    progress = progress or (lambda phase: None)
    mode = remat_mode(remat)
    _check_options(method, schedule, logical_views, num_stages)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    progress("tracing")
    static = tuple(sorted(i % len(args) for i in static_argnums)) if args else ()
    graph = trace(fn, *args, static_argnums=static)  # once: ties, the plan's signature, one stage
    timings["trace_s"] = time.perf_counter() - t0
    st, mesh = _settings(fn, args, graph, mesh, cluster, memory_budget, num_stages, schedule, num_layers,
                         min(layer_time_limit_s, time_limit_s), logical_views, batch_argnums, static, mode)

    def one_stage(cutoff_s: float | None = None) -> Plan:
        if mode == "always" and best is None:
            raise PlanningError(_NO_ONE_STAGE_REMAT + ": this step has no al.value_and_grad to pipeline")
        if mode == "always":
            raise InfeasibleError(f"no pipeline with every stage recomputing fits {format_bytes(st.budget)} per "
                                  f"device (microbatch counts tried: {', '.join(map(str, search.tried))}), and "
                                  + _CANDIDATE_KEEPS)
        progress("one-stage candidate")
        t1 = time.perf_counter()
        try:
            return plan_one_stage(fn, *args, mesh=mesh, cluster=cluster, memory_budget=memory_budget,
                                  batch_argnums=batch_argnums, static_argnums=static_argnums,
                                  time_limit_s=time_limit_s, graph=graph, cutoff_s=cutoff_s)
        finally:
            timings["one_stage_s"] = time.perf_counter() - t1

    search = _Search([])
    best = _search_microbatches(fn, args, st, num_microbatches, timings, progress, search, traced)
    tried = search.tried
    one_fits = search.one_stage_floor is None or search.one_stage_floor <= st.capacity
    if best is None or not np.isfinite(best.cost):
        if num_stages is None:
            if not one_fits:
                raise InfeasibleError(_nothing_fits(st, search.one_stage_floor, best))
            one = one_stage()
            return replace(one, timings={**timings, "total_s": time.perf_counter() - t0})
        if best is None:
            raise PlanningError(f"num_stages={num_stages} needs a step that computes its gradients with "
                                "al.value_and_grad (the loss it pipelines)")
        if best.tables is None:
            raise InfeasibleError(
                f"no pipeline fits: its weights, optimizer state and in-flight activations need at least "
                f"{format_bytes(best.floor_bytes)} over all devices, and {st.hosts * st.per_host} devices × "
                f"{format_bytes(st.budget)} hold {format_bytes(st.capacity)}: use more devices, a smaller "
                f"batch{_remat_hint(st)} or schedule='1f1b' (fewer microbatches in flight)")
        raise InfeasibleError(f"no {num_stages}-stage pipeline fits {st.budget:.4g} bytes per device: "
                              f"raise memory_budget{_remat_hint(st)}, use more microbatches or another num_stages")
    one, cut = None, None
    if num_stages is None and compare_one_stage and one_fits and mode != "always":
        one, cut = _one_stage_or_none(lambda: one_stage(best.cost))
        if one is not None and one.cost.total_s <= best.cost:
            note = (f"one stage chosen: the best pipeline ({len(best.stages)} stage(s), "
                    f"B={best.prog.num_microbatches}) is predicted at {best.cost * 1e3:.4g} ms; "
                    f"{_search_note(tried, num_microbatches)}")
            note = f"{one.solver.note}; {note}" if one.solver.note else note
            timings["total_s"] = time.perf_counter() - t0  # the search's phases, then the candidate's
            return replace(one, solver=replace(one.solver, note=note), timings=timings)
    timings["total_s"] = time.perf_counter() - t0
    note = _search_note(tried, num_microbatches)
    if cut is not None:
        note += (f"; one stage not searched: its ILP's LP relaxation bounds it at {cut.bound * 1e3:.4g} ms, above "
                 f"the best pipeline's {cut.cutoff * 1e3:.4g} ms (a heuristic: the ILP charges a tensor moved for "
                 "several readers once per reader, the plan once)")
    if num_stages is None and not one_fits:
        note += (f"; one stage not planned: it needs at least {format_bytes(search.one_stage_floor)} over all "
                 f"devices, more than the {format_bytes(st.capacity)} they hold")
    return _assemble(args, graph, mesh, st, best, one, timings, note, None if cut is None else cut.bound)


def _nothing_fits(st: _Settings, one_floor: float, best: Candidate | None) -> str:
    """Why neither one stage nor any pipeline can fit, from the memory floors alone."""
    piped = ""
    if best is not None and best.tables is None:
        piped = (f", a pipeline of B={best.prog.num_microbatches} microbatches {format_bytes(best.floor_bytes)} "
                 f"({st.schedule} schedule{', remat ' + st.remat if st.remat != 'auto' else ''})")
    return (f"no plan fits: one stage needs at least {format_bytes(one_floor)} over all devices (the weights "
            f"and optimizer state, and every activation the backward pass reads, for the whole batch){piped}; "
            f"{st.hosts * st.per_host} devices × {format_bytes(st.budget)} hold {format_bytes(st.capacity)}: "
            f"use more devices, a smaller batch{_remat_hint(st)} or a smaller model")


_NO_ONE_STAGE_REMAT = ("remat=True: recomputation needs the layers of a loss differentiated with "
                       "al.value_and_grad, and this step has none; pass remat=None or False")
_CANDIDATE_KEEPS = ("the one-stage candidate beside pipelines keeps every activation: plan num_stages=1 "
                    "for one stage that recomputes")


def remat_mode(remat: Any) -> str:
    """``al.plan``'s ``remat`` as a ``REMAT_MODES`` entry: None → "auto", False → "never",
    True → "always"; anything else is a PlanningError."""
    if remat is None:
        return "auto"
    if isinstance(remat, (bool, np.bool_)):
        return "always" if remat else "never"
    raise PlanningError(f"remat must be None (the planner decides), False (never recompute) or True (every "
                        f"stage recomputes), got {remat!r}")


def check_one_stage_remat(remat: Any) -> None:
    """A step with no ``al.value_and_grad`` has no layers to recompute: ``remat=True`` there is an
    error, not ignored."""
    if remat_mode(remat) == "always":
        raise PlanningError(_NO_ONE_STAGE_REMAT)


def _remat_hint(st: _Settings) -> str:
    return ", allow recomputation (remat=None)" if st.remat == "never" else ""


def _check_options(method: str, schedule: str, logical_views: str, num_stages: int | None) -> None:
    if method != "auto":
        raise PlanningError(f"pipeline stages are planned with method='auto' (got {method!r}); use "
                            "num_stages=1 for a baseline")
    if schedule not in SCHEDULES:
        raise PlanningError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if logical_views not in ("auto", "all", "1d"):
        raise PlanningError(f"logical_views must be 'auto', 'all' or '1d', got {logical_views!r}")
    if num_stages is not None and num_stages < 1:
        raise PlanningError(f"num_stages must be >= 1, got {num_stages}")


def _settings(fn: Callable[..., Any], args: Sequence[Any], graph: OpGraph, mesh: Any, cluster: ClusterSpec | None,
              memory_budget: float | None, num_stages: int | None, schedule: str, num_layers: int | None,
              layer_limit: float, views: str, batch_argnums: Sequence[int] | None,
              static: tuple[int, ...], remat: str) -> tuple[_Settings, Any]:
    mesh, cluster = resolve_mesh(mesh, cluster)
    out = out_example_of(graph, fn, args, static)
    _, tied = find_ties(None, args, static, out)  # the carried state: arguments an output matches
    state, batch = state_and_batch(args, static, tied, batch_argnums)
    hosts, per_host = _hosts(cluster)
    budget = cluster.device.memory if memory_budget is None else float(memory_budget)
    return _Settings(cluster, hosts, per_host, budget, num_stages, schedule, remat, num_layers, layer_limit,
                     views, static, tuple(state), tuple(batch), out), mesh


def _one_stage_or_none(one_stage: Callable[[], Plan]) -> tuple[Plan | None, CutOffError | None]:
    """The one-stage candidate; or None, and the ``CutOffError`` when its ILP's LP relaxation
    showed it slower than the best pipeline (not searched)."""
    try:
        return one_stage(), None
    except CutOffError as e:  # the search would end above the best pipeline
        log.info("one-stage candidate not searched: %s", e)
        return None, e
    except PlanningError as e:  # no plan fits the budget, or none was found in time
        log.warning("no one-stage plan to compare with: %s", e)
        return None, None


def _hosts(cluster: ClusterSpec) -> tuple[int, int]:
    per_host = min(cluster.devices_per_host, cluster.num_devices)
    if cluster.num_devices % per_host:
        raise PlanningError(f"{cluster.num_devices} devices do not split into hosts of {per_host}")
    return cluster.num_devices // per_host, per_host


def _microbatch_counts(batch_size: int, given: int | None) -> list[int]:
    if given is not None:
        return [int(given)]
    return [b for b in (2 ** k for k in range(7)) if b <= min(batch_size, MAX_MICROBATCHES)
            and batch_size % b == 0]


def _search_note(tried: Sequence[int], given: int | None) -> str:
    if given is not None:
        return f"B={given} as given"
    return (f"microbatch counts tried: {', '.join(map(str, tried))} (B = 1 and the largest count first, "
            "then inward from the cheaper of the two until a count does not improve: a heuristic)")


def _search_microbatches(fn: Callable[..., Any], args: Sequence[Any], st: _Settings, given: int | None,
                         timings: dict[str, float], progress: Callable[[str], None],
                         search: _Search, traced: TracedStep | None = None) -> Candidate | None:
    """The best candidate over B = 1, 2, 4, ... (each B solves the layers again: their shapes
    change), tried from both ends: B = 1 and the largest count, then inward from the cheaper of
    the two (B = 1 on ties) until a count does not improve. A deep pipeline's best B is large
    (its bubble shrinks with B), a shallow model's is 1: from B = 1 up, GPT-3 175B was solved
    at all 7 counts. ``search`` gets each B tried and the one-stage floor."""
    leaves = jax.tree.leaves([a for i, a in enumerate(args) if i not in st.static])
    sizes = {int(np.shape(leaves[k])[0]) for k in st.batch if np.ndim(leaves[k])}
    batch_size = min(sizes) if sizes else 1
    tick = time.perf_counter()
    if traced is None:
        traced = trace_step(fn, args, st.static)  # the full batch: the same for every B
    _add_time(timings, "trace_s", tick)

    def attempt(B: int) -> Candidate | None:
        search.tried.append(B)
        cand = _plan_for(fn, args, st, B, timings, traced, progress)
        if cand is not None:
            if cand.one_stage_floor is not None:
                search.one_stage_floor = cand.one_stage_floor
            log.info("B=%d: %s stages, predicted %.4g s", B, len(cand.stages), cand.cost)
        return cand

    def floor_binds(cand: Candidate) -> bool:  # GPipe holds B microbatches: the same floor at every B
        return cand.tables is None and st.schedule == "gpipe"

    best = search_counts(_microbatch_counts(batch_size, given), attempt, floor_binds)
    if best is not None and 1 not in search.tried and st.num_stages is None and st.remat != "always":
        # B = 1 not tried (B given): its trace alone gives the one-stage floor, so that a
        # one-stage candidate that cannot fit is not planned (its ILP takes minutes to prove it;
        # with every stage recomputing, one stage is never a candidate)
        tick = time.perf_counter()
        progress("pipeline B=1: tracing for the one-stage memory floor")
        traced_one = _trace_layers(fn, args, st, 1, traced)
        if traced_one is not None:
            prog, layers, sigs, graphs = traced_one
            search.one_stage_floor = one_stage_floor(layers, [graphs[s] for s in sigs],
                                                     _weight_factor(prog, args, st))
        _add_time(timings, "trace_s", tick)
    return best


def search_counts(counts: Sequence[int], attempt: Callable[[int], Any],
                  floor_binds: Callable[[Any], bool]) -> Any:
    """The cheapest of ``attempt(B)`` (anything with a ``cost``; None stops the search with
    None) over ``counts`` (ascending), tried from both ends: the first and the last, then inward
    from the cheaper of the two (the first on ties) while each count improves on the best (or
    nothing fits yet); ``floor_binds(candidate)``: no other count can fit either, stop."""
    best = attempt(counts[0])
    if best is None or len(counts) == 1 or floor_binds(best):
        return best
    last = attempt(counts[-1])
    if last is None:
        return None
    inward = list(counts[1:-1])
    if last.cost < best.cost:
        best, inward = last, inward[::-1]
    for B in inward:
        cand = attempt(B)
        if cand is None:
            return None
        if cand.cost < best.cost:
            best = cand
        elif np.isfinite(best.cost):
            break
        if floor_binds(cand):
            break
    return best


def _add_time(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _trace_layers(fn: Callable[..., Any], args: Sequence[Any], st: _Settings, B: int, traced: TracedStep
                  ) -> tuple[StepProgram, list[Layer], list[str], dict[str, LayerGraph]] | None:
    """The step split for B microbatches, its loss cut into layers, each layer's signature and
    each distinct layer's graph; None when the step has no ``al.value_and_grad`` to split."""
    prog = split_step(fn, args, st.static, st.state, st.batch, B, traced)
    if prog is None:
        return None
    layers = cut_layers(prog.loss, layer_starts(prog.loss, st.num_layers, _auto_layers(st)))
    if st.num_stages is not None and len(layers) < st.num_stages:
        raise PlanningError(f"the loss has {len(layers)} layers, fewer than num_stages={st.num_stages}: "
                            "mark more boundaries with al.mark_layer")
    weights = frozenset(v for v, m in zip(prog.loss.invars, prog.micro) if not m)
    sigs = [layer.signature() for layer in layers]
    graphs: dict[str, LayerGraph] = {}
    for layer, sig in zip(layers, sigs):
        if sig not in graphs:
            graphs[sig] = layer_graph(layer, weights)
    return prog, layers, sigs, graphs


def _plan_for(fn: Callable[..., Any], args: Sequence[Any], st: _Settings, B: int, timings: dict[str, float],
              traced: TracedStep, progress: Callable[[str], None]) -> Candidate | None:
    tick = time.perf_counter()
    progress(f"pipeline B={B}: tracing a microbatch")
    found = _trace_layers(fn, args, st, B, traced)
    if found is None:
        return None
    prog, layers, sigs, graphs = found
    tick = _add_time(timings, "trace_s", tick)
    submeshes, sub_views, views = _candidate_views(st)
    factor = _weight_factor(prog, args, st)
    layer_graphs = [graphs[sig] for sig in sigs]
    floor = memory_floor(layers, layer_graphs, factor, B if st.schedule == "gpipe" else 1, st.remat)
    one_floor = one_stage_floor(layers, layer_graphs, factor) if B == 1 else None
    if floor > st.capacity:
        log.info("B=%d: no pipeline fits: weights, state and in-flight activations need %.4g B in all, the "
                 "cluster holds %.4g B", B, floor, st.capacity)
        return Candidate(prog, layers, sigs, graphs, {}, views, submeshes, None, (), math.inf, 0.0, floor,
                         one_floor)
    sols = _solve_layers(layers, sigs, graphs, views, st, B, progress)
    ilp_s = sum(x.wall_s for x in sols.values())
    tick = _add_time(timings, "layer_ilp_s", tick)
    progress(f"pipeline B={B}: stage DP")
    costs = _layer_costs(prog, layers, sigs, graphs, sols, views, st, factor)
    links = (_send_link(st),) * len(submeshes)
    tables = stage_tables(costs, submeshes, sub_views, st.hosts, st.per_host, B, st.budget, links,
                          factor, st.schedule, st.remat)
    if st.num_stages is None:
        cost, sp = stage_dp(tables.dp_input)
    else:
        cost, sp = stage_dp_count(tables.dp_input, st.num_stages)
    _add_time(timings, "dp_s", tick)
    stages = sp.stages if sp is not None else ()
    return Candidate(prog, layers, sigs, graphs, sols, views, submeshes, tables, stages, float(cost), ilp_s,
                     floor, one_floor, costs)


def _solve_layers(layers: list[Layer], sigs: list[str], graphs: dict[str, LayerGraph],
                  views: list[tuple[int, int]], st: _Settings, B: int,
                  progress: Callable[[str], None]) -> dict[tuple[str, tuple[int, int]], LayerSolution]:
    """Every distinct layer's ILP on every view, ``LAYER_WORKERS`` at a time: CP-SAT runs outside
    the GIL, so one problem is built while another is solved. Each search is bounded by
    deterministic units, so the solutions do not depend on the order or the overlap."""
    first = {sig: layer for layer, sig in zip(layers, sigs)}
    distinct = list(first)
    jobs = [(sig, v) for sig in distinct for v in views]

    def run(job: tuple[str, tuple[int, int]]) -> LayerSolution:
        sig, v = job
        progress(f"pipeline B={B}: layer {distinct.index(sig) + 1}/{len(distinct)} on view {v}")
        return solve_layer(first[sig], graphs[sig], sig, st.cluster, v, st.layer_time_limit_s)

    workers = max(1, min(LAYER_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


def _auto_layers(st: _Settings) -> int:
    """Layers to cluster into when none are marked: a few per possible stage."""
    return max(8, 2 * (st.num_stages or 1))


def _candidate_views(st: _Settings):
    """Sub-mesh shapes (those usable in an exact cover by num_stages stages), each with its
    logical views (see ``plan_pipeline``'s ``logical_views``; tp within a host; in one host
    (a, b) and (b, a) are one problem, both axes having the same link)."""
    shapes = submesh_shapes(st.hosts, st.per_host, _host_counts(st))
    if st.num_stages is not None:
        shapes = _coverable(shapes, st.hosts * st.per_host, st.num_stages)
    views: list[tuple[int, int]] = []
    per_shape = []
    for shape in shapes:
        vs = [v for v in views_of(shape) if v[1] <= st.per_host and (shape[0] > 1 or v[0] >= v[1])]
        if st.views == "1d" or (st.views == "auto" and shape[0] == 1):
            vs = [v for v in vs if v[1] == 1]
        elif st.views == "auto":  # across hosts: 1-D, or data parallel over hosts × a host's devices
            vs = [v for v in vs if v[1] in (1, st.per_host)]
        per_shape.append(tuple(_index(views, v) for v in vs))
    return tuple(shapes), tuple(per_shape), views


# Sub-meshes spanning k hosts: every k up to this many hosts, beyond it k a power of two (and all
# of them), as Alpa's "power_of_two" space: each spanning shape costs every distinct layer two
# ILPs per microbatch count (on 64 GPUs: 7 → 4 shapes; on 1024: 127 → 8). A restriction of the
# search, said in the plan's solver note.
ALL_HOST_COUNTS_UP_TO = 4


def _host_counts(st: _Settings) -> str:
    return "all" if st.hosts <= ALL_HOST_COUNTS_UP_TO else "pow2"


def _index(items: list[Any], x: Any) -> int:
    if x not in items:
        items.append(x)
    return items.index(x)


def _coverable(shapes: list[tuple[int, int]], total: int, k: int) -> list[tuple[int, int]]:
    """Shapes that appear in some choice of k shapes with device counts summing to ``total``."""
    sizes = sorted({h * m for h, m in shapes})
    reach = [{0}]  # reach[c]: device sums of c shapes
    for _ in range(k):
        reach.append({r + s for r in reach[-1] for s in sizes if r + s <= total})
    return [sh for sh in shapes if total - sh[0] * sh[1] in reach[k - 1]]


def _send_link(st: _Settings) -> Link:
    """The link activations cross between stages: the DP does not know whether neighbours share
    a host, so with several hosts the cross-host link (a bound), else the in-host one."""
    link = st.cluster.inter_host if st.hosts > 1 else st.cluster.intra_host
    return Link(link.alpha, link.beta)


def _weight_factor(prog: StepProgram, args: Sequence[Any], st: _Settings) -> float:
    """Bytes held per weight byte: the carried state (weights + optimizer state) per weight
    byte, plus the gradient accumulator."""
    leaves = jax.tree.leaves([a for i, a in enumerate(args) if i not in st.static])
    state = sum(tensor_info(_aval(leaves[k])).nbytes for k in st.state)
    loss = prog.loss
    weights = sum(tensor_info(v.aval).nbytes for v, d in zip(loss.invars, loss.diff_invars) if d)
    return 1.0 + max(state / weights, 1.0) if weights else 2.0


def memory_floor(layers: Sequence[Layer], graphs: Sequence[LayerGraph], factor: float, inflight: int,
                 remat: str = "never") -> float:
    """Bytes every pipeline needs summed over its devices, whatever its layer plans:
    ``factor`` × each weight (counted once) + ``inflight`` × what each layer holds per microbatch:
    its residuals when it keeps them, its non-weight inputs when its stage recomputes
    (``remat="always"``, plus the largest layer's residuals, live in its recomputed backward), the
    smaller of the two per layer when the planner chooses (``"auto"``: a bound on any mix). A stage
    on n devices holds at least 1/n of every tensor it keeps (a split divides bytes, replication
    multiplies them), so Σ_stages n·memory ≥ this floor; above N·M (devices × budget) no stage
    plan fits: the stage tables would be infinite everywhere, and the layer ILPs are skipped."""
    weights: dict[Any, int] = {}
    keep, inputs, largest = [], [], 0
    for layer, lg in zip(layers, graphs):
        g = lg.graph
        held = {g.inputs[k] for k in lg.weight_inputs}
        for k in lg.weight_inputs:
            weights[layer.inputs[k]] = g.tensors[g.inputs[k]].nbytes
        keep.append(sum(g.tensors[t].nbytes for t in lg.residuals if t not in held))
        inputs.append(sum(g.tensors[t].nbytes for k, t in enumerate(g.inputs[:lg.num_inputs])
                          if k not in lg.weight_inputs))
        largest = max(largest, keep[-1])
    per_mb = {"never": sum(keep), "always": sum(inputs),
              "auto": sum(min(a, b) for a, b in zip(keep, inputs))}[remat]
    return factor * sum(weights.values()) + inflight * per_mb + (largest if remat == "always" else 0)


def _aval(x: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))


def _layer_costs(prog: StepProgram, layers: list[Layer], sigs: list[str], graphs: dict[str, LayerGraph],
                 sols: dict[Any, LayerSolution], views: list[tuple[int, int]], st: _Settings,
                 factor: float) -> LayerCosts:
    """Per layer and view: t (the ILP's forward+backward plus gradient accumulation), u (the
    update: reading and writing ``factor`` bytes per weight byte), memory figures."""
    L, V = len(layers), len(views)
    hbm = st.cluster.device.hbm_bandwidth
    arr = {k: np.zeros((L, V)) for k in ("t", "u", "w", "r", "p", "f", "i", "df", "db")}
    for li, sig in enumerate(sigs):
        diff_w = _diff_weight_fraction(layers[li], graphs[sig])
        for v, view in enumerate(views):
            s = sols[(sig, view)]
            # accumulating a microbatch's gradients reads two buffers and writes one; the
            # reductions of deferred gradients run once per step (accum), in u
            arr["t"][li, v] = s.microbatch_s + 3 * s.weight_bytes * diff_w / hbm
            arr["u"][li, v] = 2 * factor * s.weight_bytes * diff_w / hbm + s.collectives.sync_s
            arr["w"][li, v], arr["r"][li, v], arr["p"][li, v] = s.weight_bytes, s.residual_bytes, s.peak_bytes
            arr["f"][li, v], arr["i"][li, v] = s.forward_s, s.input_bytes
            arr["df"][li, v], arr["db"][li, v] = s.dots_forward_s, s.dots_bytes
    pair = _pair_costs(layers, sigs, graphs, sols, views, st.cluster)
    fwd, bwd = _send_bytes(layers, prog)
    return LayerCosts(tuple(views), arr["t"], arr["u"], arr["w"], arr["r"], arr["p"], pair, fwd, bwd,
                      forward_s=arr["f"], input_bytes=arr["i"], dots_forward_s=arr["df"], dots_bytes=arr["db"])


def _diff_weight_fraction(layer: Layer, lg: LayerGraph) -> float:
    w = [k for k in lg.weight_inputs]
    total = sum(tensor_info(layer.inputs[k].aval).nbytes for k in w)
    diff = sum(tensor_info(layer.inputs[k].aval).nbytes for k in w if layer.diff_in[k])
    return diff / total if total else 0.0


def _producers(layers: list[Layer]) -> dict[Any, tuple[int, int]]:
    return {v: (i, k) for i, layer in enumerate(layers) for k, v in enumerate(layer.outputs)}


def _pair_costs(layers: list[Layer], sigs: list[str], graphs: dict[str, LayerGraph],
                sols: dict[Any, LayerSolution], views: list[tuple[int, int]], cluster: ClusterSpec) -> np.ndarray:
    """pair[a, b, v]: moving layer a's outputs into layer b's specs (and their gradients back),
    plus the reductions a weight shared by a and b costs when the two share a stage."""
    pair = _shared_weight_costs(layers, sigs, graphs, sols, views)
    made = _producers(layers)
    for b, layer in enumerate(layers):
        for kb, var in enumerate(layer.inputs):
            if var not in made:
                continue
            a, ka = made[var]
            t = tensor_info(var.aval)
            for v, view in enumerate(views):
                vc = view_cluster(cluster, view)
                sa, sb = sols[(sigs[a], view)], sols[(sigs[b], view)]
                if not (np.isfinite(sa.time_s) and np.isfinite(sb.time_s)):
                    continue  # a view some layer has no plan on is never used
                cost = reshard(sa.out_specs[ka], sb.in_specs[kb], t, vc)[0]
                if layer.diff_in[kb] and layers[a].diff_out[ka]:
                    cost += reshard(sb.out_specs[_grad_pos(layer, kb)],
                                    sa.in_specs[_ct_pos(layers[a], ka)], t, vc)[0]
                pair[a, b, v] += cost
    return pair


def _shared_weight_costs(layers: list[Layer], sigs: list[str], graphs: dict[str, LayerGraph],
                         sols: dict[Any, LayerSolution], views: list[tuple[int, int]]) -> np.ndarray:
    """[L, L, V]: per microbatch, the deferred reductions that stop being deferred when layers a
    and b, both reading one weight (a tied embedding), run in one stage.

    A stage keeps a weight's gradient accumulator unreduced only when every contribution in it
    is deferred over the same axes (``accum.stacked_accumulators``); otherwise each
    deferred contribution is reduced per microbatch, at the price its layer's ILP charged for it,
    which the layer's ``microbatch_s`` left out. Charged per pair: exact for a weight read by two
    layers, an upper bound for one read by more (a contribution counts once per other reader)."""
    L, V = len(layers), len(views)
    out = np.zeros((L, L, V))
    readers: dict[Any, list[int]] = {}  # weight → the layers differentiating it
    for li, layer in enumerate(layers):
        lg = graphs[sigs[li]]
        for k in lg.weight_inputs:
            if layer.diff_in[k]:
                readers.setdefault(layer.inputs[k], []).append(li)
    shared = {var: ls for var, ls in readers.items() if len(ls) > 1}
    if not shared:
        return out
    for v, view in enumerate(views):
        contrib = {li: _weight_contributions(layers[li], graphs[sigs[li]], sols[(sigs[li], view)])
                   for li in sorted({li for ls in shared.values() for li in ls})}
        for var, ls in shared.items():
            for i, a in enumerate(ls):
                for b in ls[i + 1:]:
                    (axes_a, s_a), (axes_b, s_b) = contrib[a][var], contrib[b][var]
                    if axes_a is None or axes_a != axes_b:
                        out[a, b, v] += s_a + s_b
    return out


def _weight_contributions(layer: Layer, lg: LayerGraph,
                          sol: LayerSolution) -> dict[Any, tuple[tuple[str, ...] | None, float]]:
    """Per weight the layer differentiates: (axes its gradient is deferred over, or None; the
    ILP's charge for that reduction per microbatch)."""
    lc = sol.collectives
    deferred = {pos: (axes, s) for (pos, axes), s in zip(lc.deferred, lc.deferred_each_s)}
    din = [k for k, d in enumerate(layer.diff_in) if d]
    return {layer.inputs[k]: deferred.get(lg.num_outputs + j, (None, 0.0))
            for j, k in enumerate(din) if k in lg.weight_inputs}


def _grad_pos(layer: Layer, k: int) -> int:
    """Position among G's outputs of the gradient of input k."""
    return len(layer.outputs) + sum(layer.diff_in[:k])


def _ct_pos(layer: Layer, k: int) -> int:
    """Position among G's inputs of the cotangent of output k."""
    return len(layer.inputs) + sum(layer.diff_out[:k])


def _send_bytes(layers: list[Layer], prog: StepProgram) -> tuple[np.ndarray, np.ndarray]:
    """Bytes crossing each cut c (between layer c-1 and c): activations, and their gradients."""
    L = len(layers)
    fwd, bwd = np.zeros(L + 1), np.zeros(L + 1)
    made = _producers(layers)
    last: dict[Any, int] = {}
    for b, layer in enumerate(layers):
        for var in layer.inputs:
            if var in made:
                last[var] = b
    for var, b in last.items():
        a, k = made[var]
        n = tensor_info(var.aval).nbytes
        fwd[a + 1:b + 1] += n
        if layers[a].diff_out[k]:
            bwd[a + 1:b + 1] += n
    return fwd, bwd


# ---- the plan ---------------------------------------------------------------------------

def place_stages(shapes: Sequence[tuple[int, int]], hosts: int, per_host: int) -> list[tuple[int, ...]]:
    """Devices (host-major indices) of each stage: whole hosts for (k, M) sub-meshes, best fit
    in one host for (1, m) ones, largest first so that the packing always succeeds."""
    free = [list(range(h * per_host, (h + 1) * per_host)) for h in range(hosts)]
    out: list[tuple[int, ...]] = [()] * len(shapes)
    for s in sorted(range(len(shapes)), key=lambda s: -shapes[s][0] * shapes[s][1]):
        k, m = shapes[s]
        if k > 1 or m == per_host:
            hs = [h for h in range(hosts) if len(free[h]) == per_host][:k]
            if len(hs) < k:
                raise PlanningError(f"cannot place sub-mesh {shapes[s]}: not enough free hosts")
            out[s] = tuple(d for h in hs for d in free[h])
            for h in hs:
                free[h] = []
            continue
        fits = [h for h in range(hosts) if len(free[h]) >= m]
        if not fits:
            raise PlanningError(f"cannot place sub-mesh {shapes[s]}: no host has {m} free devices")
        h = min(fits, key=lambda h: (len(free[h]), h))
        out[s], free[h] = tuple(free[h][:m]), free[h][m:]
    return out


def _assemble(args: Sequence[Any], graph: OpGraph, mesh: Any, st: _Settings, c: Candidate,
              one: Plan | None, timings: dict[str, float], search_note: str,
              one_bound_s: float | None = None) -> Plan:
    B = c.prog.num_microbatches
    tab, dpi = c.tables, c.tables.dp_input
    shapes = [c.submeshes[s] for _, _, s in c.stages]
    devices = place_stages(shapes, st.hosts, st.per_host)
    stages, layer_plans, parts, spans = [], [None] * len(c.layers), [], []
    layer_sols = [None] * len(c.layers)
    t_list = [float(dpi.compute_cost[i, j, s]) for i, j, s in c.stages]
    for p, ((i, j, s), devs) in enumerate(zip(c.stages, devices)):
        v = int(tab.view[i, j, s])
        view = c.views[v]
        t, u = float(dpi.compute_cost[i, j, s]), float(dpi.once_cost[i, j, s])
        held = B if st.schedule == "gpipe" else min(B, len(c.stages) - p)
        remat, policy = tab.recomputes(i, j, s), tab.policy(i, j, s)
        extra, keep_b, remat_b = remat_figures(c.costs, i, j, v, policy) if remat else (0.0, 0.0, 0.0)
        stages.append(StageInfo((i, j), c.submeshes[s], devs, t + u, tab.memory_bytes(i, j, s, held),
                                view, t, u, held, remat, extra, keep_b - remat_b, policy))
        for li in range(i, j + 1):
            sol = layer_sols[li] = c.sols[(c.sigs[li], view)]
            layer_plans[li] = LayerPlan(view, sol.layouts, sol.in_specs, sol.out_specs)
        parts.append(_stage_parts(c, i, j, view, t, extra))
        spans.append(StageSpan((i, j), view, len(devs), remat, policy))
    info = PipelineInfo(B, st.schedule, c.cost, bubble_fraction(t_list, B),
                        None if one is None else one.cost.total_s,
                        tuple(layer.first_eqn for layer in c.layers), c.prog.batch_leaves,
                        c.prog.state_leaves, tuple(layer_plans), one_bound_s)
    in_specs = _input_specs(c, graph, layer_plans)
    sols = {id(x): x for x in c.sols.values()}.values()
    worst = "OPTIMAL" if all(x.status == "OPTIMAL" for x in sols) else "FEASIBLE"
    # The DP is exact on its tables: bound = objective; the layer ILPs' own gaps are not summed.
    note = (f"pipeline: {len(c.graphs)} distinct layers × {len(c.views)} views solved by the "
            f"intra-op ILP; stages by the stage DP; {search_note}")
    if _host_counts(st) == "pow2":
        note += f"; sub-meshes across hosts span a power of two of hosts or all {st.hosts} (a restriction)"
    solver = SolverInfo(worst, c.cost, c.cost, 0.0, c.ilp_s, 0, 0, note=note)
    return Plan(method="auto", mesh_shape=tuple(st.cluster.mesh_shape), axis_names=tuple(st.cluster.axis_names),
                signature=tuple((t.shape, t.dtype) for t in (graph.tensors[i] for i in graph.inputs)),
                input_specs=in_specs, output_specs=_output_specs(graph, in_specs, args, st),
                layouts=(), op_kinds=(), cost=_plan_cost(parts, t_list, stages, B),
                collectives=stage_collectives(c.layers, [c.graphs[sig] for sig in c.sigs], layer_sols, spans,
                                              B, lambda v: view_cluster(st.cluster, v)),
                solver=solver, stages=tuple(stages), static_argnums=st.static,
                donate_argnums=(), num_args=len(args), cluster=st.cluster.to_dict(), timings=timings,
                pipeline=info, graph=graph, mesh=mesh)


def _stage_parts(c: Candidate, i: int, j: int, view: tuple[int, int], t: float,
                 remat_s: float = 0.0) -> tuple[float, float, float]:
    """(compute, communication, resharding) of one microbatch on a stage; the forward that
    recomputation runs again (``remat_s``, its collectives included) counts as compute; the rest
    of t (sends, resharding between its layers, gradient accumulation) is split off as
    communication."""
    sols = [c.sols[(c.sigs[li], view)] for li in range(i, j + 1)]
    comp = sum(s.compute_s for s in sols) + remat_s
    comm = sum(s.communication_s - s.collectives.deferred_s for s in sols)
    resh = sum(s.resharding_s for s in sols)
    return comp, comm + max(t - comp - comm - resh, 0.0), resh


def _plan_cost(parts: list[tuple[float, float, float]], t_list: list[float], stages: list[StageInfo],
               B: int) -> PlanCost:
    """T split into compute / communication / resharding: each stage weighted by how often it
    counts in T (the slowest one B times), plus the largest u as compute."""
    slow = int(np.argmax(t_list))
    w = [1 + (B - 1) * (p == slow) for p in range(len(parts))]
    comp = sum(wi * p[0] for wi, p in zip(w, parts)) + max(s.u_s for s in stages)
    comm = sum(wi * p[1] for wi, p in zip(w, parts))
    resh = sum(wi * p[2] for wi, p in zip(w, parts))
    return PlanCost(comp, comm, resh, max(s.memory_bytes for s in stages))


def weight_owner(c_layers: Sequence[Layer], var: Any) -> int | None:
    """The first layer that reads loss input ``var``."""
    for layer in c_layers:
        if var in layer.inputs:
            return layer.index
    return None


def _input_specs(c: Candidate, graph: Any, layer_plans: Sequence[LayerPlan]) -> tuple[ShardingSpec, ...]:
    """Each flat input's spec on its stage's view: a weight as its first layer reads it, the
    rest replicated (the batch is split per microbatch at run time)."""
    vag = c.prog.vag
    outer_in = {v: p for p, v in enumerate(c.prog.jaxpr.invars)}
    specs = [ShardingSpec.replicated(graph.tensors[t].rank) for t in graph.inputs]
    for k, (operand, var) in enumerate(zip(vag.invars, c.prog.loss.invars)):
        p = outer_in.get(operand)
        li = weight_owner(c.layers, var)
        if p is None or li is None or c.prog.micro[k]:
            continue
        spec = layer_plans[li].in_specs[c.layers[li].inputs.index(var)]
        if spec.rank == specs[p].rank:
            specs[p] = spec
    return tuple(specs)


def _output_specs(graph: Any, in_specs: Sequence[ShardingSpec], args: Sequence[Any],
                  st: _Settings) -> tuple[ShardingSpec, ...]:
    ties, _ = find_ties(graph, args, st.static, st.out_example)
    return tuple(in_specs[ties[p]] if p in ties else ShardingSpec.replicated(graph.tensors[t].rank)
                 for p, t in enumerate(graph.outputs))


__all__ = ["Candidate", "place_stages", "plan_pipeline"]


def one_stage_floor(layers: Sequence[Layer], graphs: Sequence[LayerGraph], factor: float) -> float:
    """Bytes the one-stage plan needs summed over its devices, from the layers of the one
    microbatch that is the whole batch (B = 1): at the end of the forward pass the carried state
    (``factor − 1`` per weight byte: weights and optimizer state, which the step updates only after
    its backward pass; no gradient accumulator) and every residual the backward pass reads are all
    live, and on N devices each is held at least once in all (``memory_floor``'s argument)."""
    return memory_floor(layers, graphs, factor - 1.0, 1)
