"""The one-stage planner: trace → strategies → ILP → a ``Plan`` (``plan(..., num_stages=1)``).

Phases: the step is traced and its arguments given their roles (``roles``: carried state tied
in/out, the batch); every op gets its strategies (``scan.strategy_graph``); a baseline method fixes
them (``baselines``); the ILP is built (``problem``) and solved within the memory budget (``fit``),
with "auto" never returning a plan costlier than a baseline the same model can evaluate; the
solution is assembled into a ``Plan`` (``assemble``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from alpa_lite.intra.assemble import assemble_plan
from alpa_lite.intra.baselines import HAND_PLANS, baseline_input_specs, baseline_masks
from alpa_lite.intra.fit import solve_within_budget
from alpa_lite.intra.problem import IntraOpProblem, build_problem
from alpa_lite.intra.roles import find_ties, out_example_of, resolve_mesh, state_and_batch, state_groups
from alpa_lite.intra.scan import strategy_graph
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.graph import OpGraph
from alpa_lite.result.plan import Plan
from alpa_lite.tracing.tracer import trace
from cost_model.builder import StrategyGraph
from ilp import IlpOptions, IlpSolution, NoSolutionError
from ilp.problem import DETERMINISTIC_SHARE

log = logging.getLogger("alpa_lite.intra.planner")
METHODS = ("auto", *HAND_PLANS)


@dataclass(frozen=True)
class TracedStep:
    """A step traced on its example arguments, with their roles (``roles``)."""

    graph: OpGraph
    args: Sequence[Any]
    static: tuple[int, ...]
    ties: dict[int, int]  # flat output position → flat input position (carried state)
    tied_args: list[int]  # arguments carried whole
    batch_argnums: Sequence[int] | None

    def state_and_batch(self) -> tuple[list[int], list[int]]:
        return state_and_batch(self.args, self.static, self.tied_args, self.batch_argnums)

    def state_groups(self) -> dict[int, int]:
        return state_groups(self.args, self.static, self.tied_args or [0])


def trace_step(fn: Callable[..., Any], args: Sequence[Any], static_argnums: Sequence[int],
               batch_argnums: Sequence[int] | None, graph: OpGraph | None = None) -> TracedStep:
    """``fn`` traced on ``args`` (unless ``graph`` is that already) and its carried state found."""
    static = tuple(sorted(i % len(args) for i in static_argnums)) if args else ()
    graph = trace(fn, *args, static_argnums=static) if graph is None else graph
    ties, tied_args = find_ties(graph, args, static, out_example_of(graph, fn, args, static))
    return TracedStep(graph, args, static, ties, tied_args, batch_argnums)


def plan_one_stage(fn: Callable[..., Any], *args: Any, mesh: Any = None, cluster: ClusterSpec | None = None,
                   method: str = "auto", memory_budget: float | None = None,
                   batch_argnums: Sequence[int] | None = None, donate_argnums: Sequence[int] | None = None,
                   static_argnums: Sequence[int] = (), time_limit_s: float = 60.0,
                   progress: Callable[[str], None] | None = None, graph: OpGraph | None = None,
                   cutoff_s: float | None = None, explain_infeasible: bool = True) -> Plan:
    """``plan(..., num_stages=1)``; ``graph``: ``fn`` already traced on ``args`` (the pipeline
    planner traces the step once for its own plan and this candidate); ``cutoff_s``: raise
    ``CutOffError`` instead of searching when the ILP's LP relaxation shows that no plan costs
    less (the pipeline planner's best pipeline: a one-stage plan slower than it cannot win);
    ``explain_infeasible=False``: when no plan fits, say so without searching for the least
    memory a plan needs (a candidate search needs the verdict only)."""
    progress = progress or (lambda phase: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    progress("tracing")
    mesh, cluster = resolve_mesh(mesh, cluster)
    step = trace_step(fn, args, static_argnums, batch_argnums, graph)
    timings["trace_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    progress("strategies")
    state, _ = step.state_and_batch()
    sgraph = strategy_graph(step.graph, cluster, frozenset(step.graph.inputs[i] for i in state))
    timings["strategies_s"] = time.perf_counter() - t1
    budget = cluster.device.memory if memory_budget is None else float(memory_budget)
    masks, unsplit = method_masks(method, sgraph, step)
    t2 = time.perf_counter()
    progress("ILP")
    iop = build_problem(sgraph, step.ties, budget, masks)
    timings["ilp_build_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    iop, sol, note = solve(iop, step, budget, masks, method, time_limit_s, cutoff_s, explain_infeasible)
    timings["ilp_solve_s"] = time.perf_counter() - t3  # every solve: rows added, fallbacks
    donate = tuple(step.tied_args) if donate_argnums is None else tuple(donate_argnums)
    result = assemble_plan(iop, sol, method=method, mesh=mesh, static=step.static, donate=donate,
                           num_args=len(args), timings=timings, note=note)
    timings["total_s"] = time.perf_counter() - t0
    return replace(result, static_values=tuple(repr(args[i]) for i in step.static),
                   warnings=result.warnings + tuple(unsplit))


def method_masks(method: str, sgraph: StrategyGraph, step: TracedStep) -> tuple[dict[int, list[bool]] | None,
                                                                               list[str]]:
    """The strategies a baseline ``method`` allows (None for "auto"), and its warnings about
    inputs it leaves replicated because no mesh axis divides them."""
    if method == "auto":
        return None, []
    unsplit: list[str] = []
    state, batch = step.state_and_batch()
    specs = baseline_input_specs(method, step.graph, sgraph.cluster.axis_sizes, sgraph.cluster.axis_names,
                                 state, batch, step.state_groups(), unsplit)
    for message in unsplit:
        log.warning("%s", message)
    return baseline_masks(method, sgraph, specs, state), unsplit


def solve(iop: IntraOpProblem, step: TracedStep, budget: float, masks: dict[int, list[bool]] | None,
          method: str, time_limit_s: float, cutoff_s: float | None = None, explain_infeasible: bool = True
          ) -> tuple[IntraOpProblem, IlpSolution, str]:
    """``iop`` solved within ``budget`` (``fit``), and a note for the plan. "auto" falls back to
    the cheapest baseline when CP-SAT finds nothing in time, and never returns a plan costlier
    than a baseline's when it is stopped before proving its optimum."""
    sgraph, note = iop.sgraph, ""
    try:
        iop, sol = solve_within_budget(
            lambda exact: iop if not exact else build_problem(sgraph, step.ties, budget, masks, exact_copies=True,
                                                              all_rows=True),
            replace(_ilp_options(time_limit_s), cutoff_s=cutoff_s, explain_infeasible=explain_infeasible))
    except NoSolutionError:
        if method != "auto":
            raise
        iop, sol, name = _fallback_to_baseline(sgraph, step, budget, time_limit_s)
        note = f"ILP timed out: fell back to the {name} baseline"
        log.warning("CP-SAT found no plan within %.3g s; falling back to the %s baseline", time_limit_s, name)
    else:
        if method == "auto" and sol.status != "OPTIMAL":
            iop, sol, note = _no_worse_than_baselines(iop, sol, step, budget, time_limit_s)
    if sol.wall_clock_stop:
        note += ("; " if note else "") + ("the solver was stopped by the wall clock, not its deterministic "
                                          "limit: another run may give another plan (raise time_limit_s)")
    return iop, sol, note


def _no_worse_than_baselines(iop: IntraOpProblem, sol: IlpSolution, step: TracedStep, budget: float,
                             time_limit_s: float) -> tuple[IntraOpProblem, IlpSolution, str]:
    """Not proven optimal in time: a hand strategy may still be cheaper. Auto never returns a
    plan costlier than a baseline the same model can evaluate."""
    b_iop, b_sol, name = _fallback_to_baseline(iop.sgraph, step, budget, time_limit_s)
    if b_sol.objective < sol.objective:
        return b_iop, b_sol, (f"ILP not optimal within {time_limit_s:g} s (its best: {sol.objective * 1e3:.4g} ms); "
                              f"the {name} layout is cheaper and is used")
    return iop, sol, (f"ILP not proven optimal within {time_limit_s:g} s (gap {sol.gap:.1%}); "
                      f"its plan is cheaper than every baseline layout")


def _ilp_options(time_limit_s: float) -> IlpOptions:
    """``time_limit_s`` as a search budget: ``DETERMINISTIC_SHARE`` of it in CP-SAT's deterministic
    units (the same plan in every run and process), the wall clock a safety net beyond it."""
    return IlpOptions.deterministic(DETERMINISTIC_SHARE * time_limit_s, min_wall_s=time_limit_s)


def _fallback_to_baseline(sgraph: StrategyGraph, step: TracedStep, budget: float,
                          time_limit_s: float) -> tuple[IntraOpProblem, IlpSolution, str]:
    """The cheapest hand strategy that solves: (problem, solution, baseline name). A hand plan
    that does not apply (dp_tp on a 1-D mesh, expert_parallel without experts) is skipped."""
    state, batch = step.state_and_batch()
    groups = step.state_groups()
    best = None
    for m in HAND_PLANS:
        try:
            specs = baseline_input_specs(m, step.graph, sgraph.cluster.axis_sizes, sgraph.cluster.axis_names,
                                         state, batch, groups)
            mask = baseline_masks(m, sgraph, specs, state)
            # Inputs fixed, a baseline's model is far smaller: give it time enough to be a fallback.
            iop, sol = solve_within_budget(
                lambda exact, mask=mask: build_problem(sgraph, step.ties, budget, mask, exact_copies=exact,
                                                       all_rows=exact),
                _ilp_options(max(time_limit_s, 30.0)))
        except PlanningError:
            continue
        if best is None or sol.objective < best[1].objective:
            best = (iop, sol, m)
    if best is None:
        raise NoSolutionError(f"no plan found within time_limit_s={time_limit_s:g}, and no baseline "
                              "plan either: raise time_limit_s") from None
    return best
