"""Intra-op ILP: pick one sharding strategy per op at least cost within a memory budget.

Variables (``ilp.model``)
    s_v[i] ∈ {0,1}      node v takes strategy i                       ``add_strategy_vars``
    e_vu[i,j] ∈ {0,1}   edge v→u carries the pair (i, j); created only
                        for edges that need them (below) and only for
                        allowed pairs (R_vu[i,j], c_v[i], c_u[j] < inf) ``add_edge_vars``

Constraints
    Σ_i s_v[i] = 1 for every node v;  s_v[i] = 0 where c_v[i] = inf   ``add_strategy_vars``
    Σ_j e_vu[i,j] ≤ s_v[i] ∀i,  Σ_i e_vu[i,j] ≤ s_u[j] ∀j,
    Σ_ij e_vu[i,j] = 1                                                ``add_edge_vars``
    Σ_{v live at t} Σ_i s_v[i]·m_v[i] ≤ M for every program point t
    (identical live sets once; sets that cannot exceed M dropped)     ``add_memory_limits``

Objective
    minimise Σ_v Σ_i s_v[i]·c_v[i] + Σ_(v,u) Σ_ij e_vu[i,j]·R_vu[i,j]  ``add_cost_objective``

c_v (seconds: compute + the op's own communication) and R_vu (seconds: resharding) are scaled to
integers (``ilp.model.cost_scale``); memory m_v (bytes per device) is rounded up and the budget
M down (``ilp.model.memory_unit``), so a plan CP-SAT accepts fits for real. Edges between the
same pair add up; an edge whose matrix is constant over the allowed pairs, or with an end that
has one allowed strategy, needs no e variables (``ilp.reduced.simplify``). Followers are merged
into their leader first when ``IlpOptions.merge_followers`` (``ilp.merge``, a heuristic); if that
makes the memory budget infeasible the exact model is tried.

When no plan fits the budget, a second model minimises the peak P ≥ Σ_{v live at t} Σ_i
s_v[i]·m_v[i] (``add_peak_memory``, budget ignored) so that ``InfeasibleError`` can say how much
memory the smallest plan needs.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from ortools.sat.python import cp_model

from alpa_lite.errors import InfeasibleError, PlanningError
from ilp.greedy import add_hint, greedy_choice
from ilp.merge import merge_followers
from ilp.model import Model, build_cost_model, build_peak_model
from ilp.problem import IlpOptions, IlpProblem, IlpSolution, evaluate
from ilp.reduced import Reduced, Simplified, simplify

logger = logging.getLogger("alpa_lite.ilp")

# Time for the peak-memory solve that explains an infeasible budget: the message needs a number,
# not a proof, so it is bounded separately from the planning solve.
_PEAK_SOLVE_LIMIT_S = 10.0


class NoSolutionError(PlanningError):
    """CP-SAT found no plan within its time limit; the caller may fall back to a baseline."""


def solve(problem: IlpProblem, options: IlpOptions = IlpOptions()) -> IlpSolution:  # noqa: B008
    """The cheapest choice of one strategy per node within the memory budget.

    Raises InfeasibleError (naming the smallest memory any plan needs) when no plan fits, and
    NoSolutionError when none is found within the time limit.
    """
    start = time.perf_counter()
    if _memory_lower_bound(problem) > _budget(problem):
        raise _infeasible(problem, options)
    merged = options.merge_followers
    result = _plan(problem, options, merged, start)
    if result is None and merged:
        logger.info("merged model infeasible; retrying without follower merging")
        result = _plan(problem, options, False, start)
    if result is None:
        raise _infeasible(problem, options)
    choice, status, bound, model = result
    objective, peak = evaluate(problem, choice)
    gap = 0.0 if status == "OPTIMAL" else _gap(objective, bound)
    wall = time.perf_counter() - start
    logger.info("ilp %s: objective %.6g s, bound %.6g s, %.2f s", status, objective, bound, wall)
    return IlpSolution(
        choice=choice,
        status=status,
        objective=objective,
        bound=bound,
        gap=gap,
        wall_s=wall,
        num_variables=model.num_variables,
        num_constraints=model.num_constraints,
        peak_memory=peak,
    )


def _plan(problem: IlpProblem, options: IlpOptions, merged: bool, start: float):
    """Solve once; ``(choice, status, bound, model)``, or None when the model is infeasible."""
    red, simple = _reduce(problem, merged)
    tick = time.perf_counter()
    model = build_cost_model(red, simple, problem.memory_budget)
    add_hint(model, simple, greedy_choice(simple))
    logger.info(
        "built model in %.3f s: %d leaders, %d edge blocks, %d variables, %d constraints",
        time.perf_counter() - tick,
        len(simple.costs),
        len(simple.edges),
        model.num_variables,
        model.num_constraints,
    )
    remaining = max(options.time_limit_s - (time.perf_counter() - start), 0.1)
    solver, status = _run(model, options, remaining)
    if status == cp_model.INFEASIBLE:
        return None
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        limits = f"time_limit_s={options.time_limit_s:g}"
        if options.deterministic_time is not None:
            limits += f", deterministic_time={options.deterministic_time:g}"
        raise NoSolutionError(
            f"CP-SAT found no plan within its limits ({limits}; status "
            f"{solver.status_name(status)}): raise them, or fall back to a baseline plan"
        )
    choice = red.expand(_leader_choice(solver, model))
    bound = solver.best_objective_bound / model.scale + model.offset
    return choice, solver.status_name(status), bound, model


def _reduce(problem: IlpProblem, merged: bool) -> tuple[Reduced, Simplified]:
    tick = time.perf_counter()
    red = Reduced.from_problem(problem)
    count = merge_followers(red, problem.follow) if merged else 0
    simple = simplify(red)
    logger.info(
        "reduced %d nodes to %d leaders (%d followers merged) in %.3f s",
        problem.num_nodes,
        len(red.costs),
        count,
        time.perf_counter() - tick,
    )
    return red, simple


def _run(model: Model, options: IlpOptions, time_limit_s: float):
    """Run CP-SAT in a thread so that Ctrl-C stops the search cleanly, then propagates."""
    solver = cp_model.CpSolver()
    params = solver.parameters
    params.max_time_in_seconds = time_limit_s
    params.num_workers = options.num_workers
    params.random_seed = options.random_seed
    # Presolve turns the edge constraints into at-most-one clauses, which the default level 1
    # leaves out of the LP relaxation; level 2 keeps them, and the relaxation of a chain or tree
    # is then integral. Probing (presolve) costs more than it gives on these models. Measured
    # with one worker (ortools 9.15): a 2000-node, 4-strategy chain, no optimum in 60 s at level
    # 1, 6.1 s at level 2, 5.1 s without probing; the 184-node MLP problem of the planner tests,
    # 10.4 s, 1.8 s, 1.0 s; a dense random 200-node problem, first plan found only without
    # probing (5 s).
    params.linearization_level = 2
    params.cp_model_probing_level = 0
    if options.deterministic_time is not None:
        params.max_deterministic_time = options.deterministic_time
    if options.log_progress:
        params.log_search_progress = True
        params.log_to_stdout = False
        solver.log_callback = logger.info
    tick = time.perf_counter()
    status = _solve_interruptibly(solver, model.cp)
    logger.info("CP-SAT %s in %.3f s", solver.status_name(status), time.perf_counter() - tick)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"invalid CP-SAT model (a bug in ilp): {model.cp.validate()}")
    return solver, status


def _solve_interruptibly(solver: cp_model.CpSolver, cp: cp_model.CpModel):
    """``solver.solve(cp)`` in a worker thread (CP-SAT releases the GIL), so that Ctrl-C reaches
    this thread: it stops the search, waits until the solver has returned, then propagates.

    Completion is signalled with an Event rather than observed with ``Thread.join``: a join
    interrupted by KeyboardInterrupt can later return while the thread still runs, and the
    interpreter then aborts at exit ("terminate called without an active exception").
    """
    result: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            result["status"] = solver.solve(cp)
        except BaseException as exc:  # re-raised in the calling thread
            result["error"] = exc
        finally:
            done.set()

    tick = time.perf_counter()
    threading.Thread(target=target, name="cp-sat", daemon=True).start()
    try:
        while not done.wait(0.05):
            pass
    except KeyboardInterrupt:
        solver.stop_search()
        while not done.wait(0.05):
            pass
        logger.info("CP-SAT interrupted after %.2f s", time.perf_counter() - tick)
        raise
    if "error" in result:
        raise result["error"]
    return result["status"]


def _leader_choice(solver: cp_model.CpSolver, model: Model) -> dict[int, int]:
    values = {}
    for v, s in model.s.items():
        values[v] = next(i for i, x in enumerate(s) if solver.boolean_value(x))
    return values


def _gap(objective: float, bound: float) -> float:
    return max(0.0, (objective - bound) / max(abs(objective), 1e-300))


def _budget(problem: IlpProblem) -> float:
    return math.inf if problem.memory_budget is None else problem.memory_budget


def _memory_lower_bound(problem: IlpProblem) -> float:
    """max over live sets of Σ_v min over allowed strategies of m_v: no plan needs less."""
    low = [
        float(m[np.isfinite(c)].min(initial=0.0))
        for c, m in zip(problem.node_costs, problem.memory, strict=True)
    ]
    return max((sum(low[v] for v in set(live)) for live in problem.live_sets), default=0.0)


def _infeasible(problem: IlpProblem, options: IlpOptions) -> InfeasibleError:
    """An InfeasibleError saying the budget and the smallest memory any plan needs."""
    red, simple = _reduce(problem, False)
    model = build_peak_model(red, simple)
    limit = min(_PEAK_SOLVE_LIMIT_S, options.time_limit_s)
    solver, status = _run(model, options, limit)
    budget = _budget(problem)
    if status == cp_model.INFEASIBLE:
        return InfeasibleError(
            "no plan exists at any memory budget: every combination uses a forbidden strategy "
            "or strategy pair (infinite cost); check the strategies the cost model allows"
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return InfeasibleError(
            f"no plan fits the memory budget of {format_bytes(budget)} per device (the smallest "
            f"memory needed was not found within {limit:g} s); raise the memory budget, use more "
            "devices, or use fewer microbatches / a smaller batch"
        )
    _, peak = evaluate(problem, red.expand(_leader_choice(solver, model)))
    if status == cp_model.OPTIMAL:
        need = f"the smallest per-device memory any plan needs is {format_bytes(peak)}"
    else:
        low = solver.best_objective_bound * model.memory_unit
        need = (
            "the smallest per-device memory any plan needs is between "
            f"{format_bytes(low)} and {format_bytes(peak)}"
        )
    return InfeasibleError(
        f"no plan fits the memory budget of {format_bytes(budget)} per device: {need}. "
        "Raise the memory budget, use more devices, or use fewer microbatches / a smaller batch"
    )


def format_bytes(n: float) -> str:
    """``1.50 GiB (1610612736 bytes)``: GiB from 1 GiB up, MiB below, exact bytes in brackets."""
    exact = f"{int(n)}" if float(n).is_integer() else f"{n!r}"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB ({exact} bytes)"
    return f"{n / 2**20:.2f} MiB ({exact} bytes)"
