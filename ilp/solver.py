"""Intra-op ILP: pick one sharding strategy per op at least cost within a memory budget.

Variables (``ilp.model``)
    s_v[i] ∈ {0,1}      node v takes strategy i                       ``add_strategy_vars``
    e_vu[i,j] ∈ {0,1}   edge v→u carries the pair (i, j); created only
                        for edges that need them (below) and only for
                        allowed pairs (R_vu[i,j], c_v[i], c_u[j] < inf) ``add_edge_vars``

Constraints
    Σ_i s_v[i] = 1 for every node v;  s_v[i] = 0 where c_v[i] = inf   ``add_strategy_vars``
    Σ_j e_vu[i,j] = s_v[i] ∀i,  Σ_i e_vu[i,j] = s_u[j] ∀j            ``add_edge_vars``
    Σ_{v live at t} Σ_i s_v[i]·m_v[i] ≤ M for every program point t
    (identical live sets once; sets that cannot exceed M dropped)     ``add_memory_limits``

Objective
    minimise Σ_v Σ_i s_v[i]·c_v[i] + Σ_(v,u) Σ_ij e_vu[i,j]·R_vu[i,j]  ``add_cost_objective``

Before CP-SAT, the linear relaxation is solved (``ilp.lp_first``): when its optimum is integral
it is the optimum, and CP-SAT does not run.

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
from dataclasses import replace
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

from alpa_lite.ir.errors import InfeasibleError, PlanningError
from ilp.eliminate import Eliminated, dead_ends, eliminate_leaves
from ilp.greedy import add_hint, greedy_choice
from ilp.lp_first import proven_by_lp
from ilp.merge import merge_followers
from ilp.model import Model, binding_rows, build_cost_model, build_peak_model, fold_rows
from ilp.problem import DETERMINISTIC_SHARE, IlpOptions, IlpProblem, IlpSolution, evaluate
from ilp.reduced import Reduced, Simplified, simplify
from ilp.symmetry import Tied, tie

logger = logging.getLogger("alpa_lite.ilp")

# Time for the peak-memory solve that explains an infeasible budget: the message needs a number,
# not a proof, so it is bounded separately from the planning solve.
_PEAK_SOLVE_LIMIT_S = 10.0
# What every message of an infeasible budget advises.
_ADVICE = "Raise the memory budget, use more devices, or use fewer microbatches / a smaller batch"
# Edge pairs (Σ of the edge matrices' sizes) up to which the peak-memory model is built on every
# node. Beyond it the model is built on the reduced nodes instead (``_peak_bracket``): on a
# 32-block MoE on 64 GPUs (20k nodes, ~2.3M pairs after elimination) the exact model took 167 s
# to build, and CP-SAT then did not finish its presolve within the 10 s (no number to report).
_EXACT_PEAK_MAX_PAIRS = 200_000


class NoSolutionError(PlanningError):
    """CP-SAT found no plan within its time limit; the caller may fall back to a baseline."""


def solve(problem: IlpProblem, options: IlpOptions = IlpOptions(),  # noqa: B008
          reductions: Reductions | None = None) -> IlpSolution:
    """The cheapest choice of one strategy per node within the memory budget.

    Raises InfeasibleError (naming the smallest memory any plan needs) when no plan fits, and
    NoSolutionError when none is found within the time limit. ``reductions``: kept across solves
    of one problem with other memory rows or budget (``Reductions``).
    """
    start = time.perf_counter()
    if _memory_lower_bound(problem) > _budget(problem):
        raise _infeasible(problem, options)
    merged = options.merge_followers
    reductions = Reductions() if reductions is None else reductions
    result = _plan(problem, options, merged, start, reductions)
    if result is None and merged:
        logger.info("merged model infeasible; retrying without follower merging")
        result = _plan(problem, options, False, start, reductions)
    if result is None:
        raise _infeasible(problem, options)
    choice, status, bound, model, sizes = result
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
        leaders=sizes[0],
        model_nodes=sizes[1],
        tied_classes=sizes[2],
        wall_clock_stop=model.wall_clock_stop,
    )


def _plan(problem: IlpProblem, options: IlpOptions, merged: bool, start: float, reductions: Reductions):
    """Solve once; ``(choice, status, bound, model, sizes)``, or None when the model is infeasible.

    The model CP-SAT sees: followers merged (``ilp.merge``), parallel edges added up
    (``ilp.reduced.simplify``), leaves that memory cannot constrain folded into their neighbour
    and dominated strategies forbidden (``ilp.eliminate``, both exact), and, with
    ``options.tie_rounds``, identical layers tied (``ilp.symmetry``) when that shrinks the model
    by a quarter or more; if no tied plan fits, the untied model is solved. ``sizes``: (leaders,
    nodes after elimination, tied classes or None)."""
    red, simple = reductions.of(problem, merged)
    budget = problem.memory_budget
    rows = red.memory_rows(budget) if budget is not None and math.isfinite(budget) else []
    rows = binding_rows(rows, simple.costs, budget)
    elim = eliminate_leaves(simple, rows) if options.eliminate else Eliminated(simple, ())
    rows = fold_rows(rows, elim.simple.costs, simple.costs)
    if rows is None or not math.isfinite(elim.simple.offset):
        return None  # a memory row of fixed bytes passes the budget, or a leaf has no allowed pair
    sizes = [len(simple.costs), len(elim.simple.costs), None]
    logger.info("eliminated %d leaves: %d nodes left", len(elim.steps), len(elim.simple.costs))
    tied = _tied(elim.simple, rows, options)
    if tied is not None:
        # dead ends pruned on the tied model: exact for it, and far smaller than the untied one
        pruned_tied = dead_ends(tied.simple, tied.rows) if options.eliminate else tied.simple
        found = _search(pruned_tied, tied.rows, budget, options, start, reductions)
        if found is not None:
            class_choice, status, bound, model = found
            sizes[2] = tied.num_classes
            return red.expand(elim.expand(tied.expand(class_choice))), status, bound, model, sizes
        logger.info("no plan with identical layers tied fits; solving the untied model")
    pruned = dead_ends(elim.simple, rows) if options.eliminate else elim.simple
    found = _search(pruned, rows, budget, options, start, reductions)
    if found is None:
        return None
    choice, status, bound, model = found
    return red.expand(elim.expand(choice)), status, bound, model, sizes


def _tied(simple: Simplified, rows: list, options: IlpOptions) -> Tied | None:
    """The tied problem when it is worth solving instead (a quarter fewer nodes or better)."""
    if not options.tie_rounds or len(simple.costs) < options.tie_min_nodes:
        return None
    tick = time.perf_counter()
    tied = tie(simple, rows, options.tie_rounds)
    logger.info("tied %d leaders into %d classes in %.3f s", len(simple.costs), tied.num_classes,
                time.perf_counter() - tick)
    return tied if tied.num_classes <= 0.75 * len(simple.costs) else None


def _search(simple: Simplified, rows: list, budget: float | None, options: IlpOptions, start: float,
            reductions: Reductions):
    """CP-SAT on one (possibly tied) model: ``(choice per node, status, bound, model)``, None when
    infeasible; NoSolutionError when the limits pass with no plan. The LP relaxation first, unless
    it did not decide an earlier solve of the same problem (``Reductions.lp_decides``)."""
    tick = time.perf_counter()
    proof = None
    if options.lp_first and reductions.lp_decides:
        proof = proven_by_lp(simple, rows, budget, lambda choice: _fits(simple, rows, budget, choice),
                             options.cutoff_s)
        reductions.lp_decides = proof is not None
    if proof is not None:  # the relaxation's optimum is a plan: optimal, no search needed
        logger.info("LP relaxation integral in %.3f s (%d variables): optimal without CP-SAT",
                    time.perf_counter() - tick, proof.num_variables)
        return proof.choice, "OPTIMAL", proof.bound, proof
    model = build_cost_model(simple, rows, budget)
    hint = greedy_choice(simple)
    add_hint(model, simple, hint)
    logger.info(
        "built model in %.3f s: %d nodes, %d edge blocks, %d variables, %d constraints",
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
    # Stopped short of the optimum before the deterministic limit: the wall clock stopped it,
    # and another run may stop elsewhere (reported in IlpSolution.wall_clock_stop).
    model.wall_clock_stop = (status != cp_model.OPTIMAL
                             and solver.deterministic_time < 0.99 * deterministic_limit(options))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE) and _fits(simple, rows, budget, hint):
        # Out of time before CP-SAT even took its hint (presolve of a large model on a busy
        # machine): the greedy plan is a plan, and better than none.
        logger.warning("CP-SAT found no plan within its limits; using the greedy starting plan")
        return hint, "FEASIBLE", -math.inf, model
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        limits = f"time_limit_s={options.time_limit_s:g}, deterministic_time={deterministic_limit(options):g}"
        raise NoSolutionError(
            f"CP-SAT found no plan within its limits ({limits}; status "
            f"{solver.status_name(status)}): raise them, or fall back to a baseline plan"
        )
    bound = solver.best_objective_bound / model.scale + model.offset
    if model.wall_clock_stop:
        logger.warning("CP-SAT stopped by the wall-clock limit (%.3g s) after %.3g deterministic units of %.3g: "
                       "the plan may differ between runs", options.time_limit_s, solver.deterministic_time,
                       deterministic_limit(options))
    return _leader_choice(solver, model), solver.status_name(status), bound, model


def _fits(simple: Simplified, rows: list, budget: float | None, choice: dict[int, int]) -> bool:
    """Whether a choice has finite cost and fits the budget in every (binding) memory row."""
    if not all(np.isfinite(c[choice[v]]) for v, c in simple.costs.items()):
        return False
    if not all(np.isfinite(m[choice[a], choice[b]]) for (a, b), m in simple.edges.items()):
        return False
    limit = math.inf if budget is None else budget
    return all(sum(float(m[choice[v]]) for v, m in row.items()) <= limit for row in rows)


def deterministic_limit(options: IlpOptions) -> float:
    """CP-SAT's ``max_deterministic_time`` for these options (``IlpOptions`` docstring)."""
    if options.deterministic_time is not None:
        return options.deterministic_time
    return DETERMINISTIC_SHARE * options.time_limit_s


class Reductions:
    """Follower merging and simplification of one problem's nodes and edges, kept for the
    problems that differ from it only in memory rows and budget: ``alpa_lite.intra.fit`` solves a
    problem again with rows added or the budget lowered, and neither merging (``ilp.merge``) nor
    ``simplify`` reads rows or budget (on a 96-layer GPT the two take 2-3 s of every solve). A
    problem with other nodes, edges or follow relations is reduced afresh.

    ``lp_decides`` turns False once the LP relaxation (``ilp.lp_first``) has not decided a solve:
    the rows fit adds only cut the relaxation further, and a fractional optimum seldom turns
    integral that way, while the relaxation costs as much as the search (a 96-layer GPT's tied
    model with memory rows: 4 s of HiGHS in every round, fractional in every one). It only saves
    work: CP-SAT proves the same optimum either way."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] = ()
        self._done: dict[bool, tuple[Reduced, Simplified]] = {}
        self.lp_decides = True

    def of(self, problem: IlpProblem, merged: bool) -> tuple[Reduced, Simplified]:
        """``(reduced, simplified)`` of ``problem``, with its own memory and live sets."""
        key = (problem.edges, problem.follow, *problem.node_costs)
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            self._key, self._done, self.lp_decides = key, {}, True
        if merged not in self._done:
            self._done[merged] = _reduce(problem, merged)
        red, simple = self._done[merged]
        return replace(red, memory=problem.memory, live_sets=problem.live_sets), simple


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
    # Presolve turns edge constraints into clauses, which the default level 1 leaves out of the
    # LP relaxation; level 2 keeps them, and the relaxation of a chain or tree is then integral.
    # Probing (presolve) costs more than it gives on these models. Measured with one worker
    # (ortools 9.15, on the earlier ``≤`` form of the edge constraints): a 2000-node, 4-strategy
    # chain, no optimum in 60 s at level 1, 6.1 s at level 2, 5.1 s without probing; the 184-node
    # MLP problem of the planner tests, 10.4 s, 1.8 s, 1.0 s; a dense random 200-node problem,
    # first plan found only without probing (5 s). With the equality form, level 1 still finds
    # no optimum of the 96-layer GPT's tied model in 60 s (level 2: 4.4 s).
    params.linearization_level = 2
    params.cp_model_probing_level = 0
    # The whole linear relaxation from the start (the default adds constraints as they are
    # violated): with the marginals as equalities (``ilp.model.add_edge_vars``) it is nearly
    # integral on these models, and its bound proves the optimum soon after a plan is found.
    # Measured with one worker on 135 models the plan-quality configs solve (8 CPU devices and
    # H100 costs, with and without a binding budget): the same optimum in every one, 313 s → 113 s
    # in all (2x4 GPT 8.0 s → 1.2 s); on a 96-layer hidden-8192 GPT on 64 GPUs 34 s → 4.4 s.
    params.add_lp_constraints_lazily = False
    # The greedy hint is CP-SAT's first plan (a plan at once, whatever follows), not a path to
    # search along: by default CP-SAT first spends up to 10 conflicts' worth of search fixing
    # variables to their hinted values, and on a Flax LM's step (2 layers, 2x4 mesh, 122k
    # booleans, greedy plan 2.3x the optimum) that phase took 18 of the solve's 4.4 → 17.9
    # deterministic units; with no conflicts spent on it the solve takes 4.4, as without a hint.
    params.hint_conflict_limit = 0
    params.max_deterministic_time = deterministic_limit(options)
    if options.log_progress:
        params.log_search_progress = True
        params.log_to_stdout = False
        solver.log_callback = logger.info
    tick = time.perf_counter()
    status = _solve_interruptibly(solver, model.cp)
    logger.info("CP-SAT %s in %.3f s (%.3g deterministic units)", solver.status_name(status),
                time.perf_counter() - tick, solver.deterministic_time)
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
    """An InfeasibleError saying the budget and the smallest memory any plan needs (exact when
    the model is small enough to minimise its peak, else bounds on it: ``_peak_bracket``); only
    the budget when ``options.explain_infeasible`` is off."""
    if not options.explain_infeasible:
        return InfeasibleError(f"no plan fits the memory budget of {format_bytes(_budget(problem))} per device")
    red, simple = _reduce(problem, False)
    if _pairs(simple) > _EXACT_PEAK_MAX_PAIRS:
        return _peak_bracket(problem, options)
    model = build_peak_model(simple, red.memory_rows())
    # Any plan is a point of this model: start from the greedy one, so that even when the limit
    # passes the message can name the memory of a plan that exists.
    add_hint(model, simple, greedy_choice(simple))
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
            f"memory needed was not found within {limit:g} s). {_ADVICE}"
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
        f"no plan fits the memory budget of {format_bytes(budget)} per device: {need}. {_ADVICE}"
    )


def _pairs(simple: Simplified) -> int:
    return sum(m.size for m in simple.edges.values())


def _peak_bracket(problem: IlpProblem, options: IlpOptions) -> InfeasibleError:
    """The InfeasibleError of a model too large for the exact peak solve. No plan fits the budget
    B (proven before this is called), so the least peak lies in (B, P], P the peak of the
    least-peak plan found on the model with followers merged and identical layers tied
    (``_plan``'s reductions: a restriction, so P is some plan's peak, perhaps not the least), or
    of the greedy plan when that model is too large as well."""
    red, simple = _reduce(problem, True)
    rows = red.memory_rows()
    plans = [greedy_choice(simple)]
    tied = tie(simple, rows, options.tie_rounds) if options.tie_rounds else None
    if tied is not None and _pairs(tied.simple) <= _EXACT_PEAK_MAX_PAIRS:
        model = build_peak_model(tied.simple, tied.rows)
        add_hint(model, tied.simple, greedy_choice(tied.simple))
        solver, status = _run(model, options, min(_PEAK_SOLVE_LIMIT_S, options.time_limit_s))
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            plans.append(tied.expand(_leader_choice(solver, model)))
    evaluated = [evaluate(problem, red.expand(choice)) for choice in plans]
    peak = min((p for cost, p in evaluated if math.isfinite(cost)), default=math.inf)
    found = ("no plan was found to name the memory it needs" if not math.isfinite(peak) else
             f"the plan of least peak found with followers merged (and identical layers tied when that "
             f"model is small enough) needs {format_bytes(peak)}")
    return InfeasibleError(
        f"no plan fits the memory budget of {format_bytes(_budget(problem))} per device: {found} (the "
        f"model is too large to find the least peak exactly). {_ADVICE}"
    )


def format_bytes(n: float) -> str:
    """``1.50 GiB (1610612736 bytes)``: GiB from 1 GiB up, MiB below, exact bytes in brackets."""
    exact = f"{int(n)}" if float(n).is_integer() else f"{n!r}"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB ({exact} bytes)"
    return f"{n / 2**20:.2f} MiB ({exact} bytes)"
