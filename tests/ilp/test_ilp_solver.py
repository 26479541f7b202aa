"""ilp.solve on hand-made cases (expected values as arithmetic), errors, limits and scale."""

from __future__ import annotations

import _thread
import logging
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from alpa_lite.ir.errors import InfeasibleError, PlanningError
from ilp import Edge, IlpOptions, IlpProblem, NoSolutionError, evaluate, solve, solver
from ilp.brute import brute_force
from ilp.solver import format_bytes

INF = np.inf
EXACT = IlpOptions(merge_followers=False)
GiB = 2**30


def problem(costs, edges=(), memory=None, live_sets=(), budget=None) -> IlpProblem:
    costs = [np.asarray(c, dtype=float) for c in costs]
    memory = memory if memory is not None else [np.zeros(c.size) for c in costs]
    edges = [Edge(src, dst, np.asarray(m, dtype=float)) for src, dst, m in edges]
    return IlpProblem(tuple(costs), tuple(edges), tuple(memory), tuple(live_sets), budget)


SAME = [[0, 5], [5, 0]]  # resharding between two strategies

# (name, problem, expected choice, expected objective)
SMALL = [
    ("one node", problem([[3, 1, 2]]), (1,), 1),
    ("edge prefers agreement", problem([[1, 2], [2.5, 1]], [(0, 1, SAME)]), (1, 1), 2 + 1),
    (
        "resharding pays off",
        problem([[1, 4], [9, 1]], [(0, 1, [[0, 2], [2, 0]])]),
        (0, 1),
        1 + 1 + 2,
    ),
    (
        "parallel edges add",
        problem([[0, 0.5], [0, 0]], [(0, 1, [[1, 0], [0, 1]]), (0, 1, [[0, 2], [2, 0]])]),
        (0, 0),
        0 + 0 + 1 + 0,
    ),
    (
        "backward edge ties two nodes",
        problem([[1, 3], [5, 2]], [(1, 0, [[0, INF], [INF, 0]])]),
        (1, 1),
        3 + 2,
    ),
    (
        "constant edge adds its constant",
        problem([[2, 1], [1, 3]], [(0, 1, [[7, 7], [7, 7]])]),
        (1, 0),
        1 + 1 + 7,
    ),
    ("forbidden strategy", problem([[INF, 2], [1, 1]], [(0, 1, [[0, 3], [3, 0]])]), (1, 1), 2 + 1),
    (
        "forbidden pair",
        problem([[0, 1], [0, 1]], [(0, 1, [[INF, 5], [5, 0]])]),
        (1, 1),
        1 + 1 + 0,
    ),
    ("edge to a one-strategy node", problem([[4], [1, 2]], [(0, 1, [[3, 0]])]), (0, 1), 4 + 2 + 0),
    (
        "edge pointing backwards",
        problem([[0, 0], [1, 3]], [(1, 0, [[0, 4], [4, 0]])]),
        (0, 0),
        0 + 1 + 0,
    ),
]


@pytest.mark.parametrize(("name", "prob", "choice", "objective"), SMALL, ids=[c[0] for c in SMALL])
def test_small_cases(name, prob, choice, objective):
    solution = solve(prob, EXACT)
    assert solution.choice == choice
    assert solution.objective == pytest.approx(objective, abs=1e-12)
    assert solution.status == "OPTIMAL"
    assert solution.gap == 0.0
    assert solution.bound == pytest.approx(objective, abs=1e-6)
    assert brute_force(prob) == (choice, pytest.approx(objective))


@pytest.mark.parametrize(("name", "prob", "choice", "objective"), SMALL, ids=[c[0] for c in SMALL])
def test_small_cases_merged_never_beat_exact(name, prob, choice, objective):
    solution = solve(prob, IlpOptions(merge_followers=True))
    assert len(solution.choice) == prob.num_nodes
    assert solution.objective >= objective - 1e-12
    assert evaluate(prob, solution.choice)[0] == solution.objective


def two_nodes(budget, live_sets=((0, 1),)):
    """Strategy 0 is cheap and big, strategy 1 dear and small, on both nodes."""
    return problem([[1, 2], [1, 2]], memory=[[10, 4], [10, 4]], live_sets=live_sets, budget=budget)


@pytest.mark.parametrize(
    ("budget", "objective", "peak"),
    [
        (None, 1 + 1, 10 + 10),
        (20, 1 + 1, 10 + 10),
        (15, 1 + 2, 10 + 4),  # one node must shrink
        (10, 2 + 2, 4 + 4),  # both must
        (8, 2 + 2, 4 + 4),  # exactly at the budget
    ],
)
def test_memory_budget_binds(budget, objective, peak):
    solution = solve(two_nodes(budget), EXACT)
    assert solution.objective == objective
    assert solution.peak_memory == peak
    assert evaluate(two_nodes(budget), solution.choice) == (objective, peak)


def test_memory_budget_changes_the_choice():
    assert solve(two_nodes(None)).choice == (0, 0)
    assert solve(two_nodes(10)).choice == (1, 1)


def test_memory_is_bounded_per_program_point_not_summed():
    # Nodes 0 and 1 are never alive together: each point holds 10 bytes, within a budget of 10.
    solution = solve(two_nodes(10, live_sets=((0,), (1,))), EXACT)
    assert solution.choice == (0, 0)
    assert solution.peak_memory == 10


def test_node_listed_twice_in_a_live_set_counts_once():
    solution = solve(two_nodes(10, live_sets=((0, 0),)), EXACT)
    assert solution.choice == (0, 0)  # 10 bytes, not 20
    assert solution.objective == 1 + 1


def test_infeasible_budget_names_budget_and_minimum_in_gib():
    prob = problem(
        [[1, 2], [1, 2]],
        memory=[[3 * GiB, 1.5 * GiB], [3 * GiB, 1.5 * GiB]],
        live_sets=[(0, 1)],
        budget=2 * GiB,
    )
    with pytest.raises(InfeasibleError) as info:
        solve(prob)
    message = str(info.value)
    assert "2.00 GiB (2147483648 bytes)" in message  # the budget
    assert "3.00 GiB (3221225472 bytes)" in message  # 1.5 GiB + 1.5 GiB
    for advice in ("raise the memory budget", "more devices", "fewer microbatches"):
        assert advice in message.lower()


def tied_pair():
    """Each node alone could take 1 MiB, but the tie forces equal strategies: 1 + 10 MiB either
    way, over a 5 MiB budget."""
    mib = 2**20
    return problem([[0, 0], [0, 0]], [(0, 1, [[0, INF], [INF, 0]])], memory=[[mib, 10 * mib], [10 * mib, mib]],
                   live_sets=[(0, 1)], budget=5 * mib)


def test_infeasible_without_explaining_names_only_the_budget():
    """A caller weighing candidates (``explain_infeasible=False``) gets the verdict without the
    search for the least memory a plan needs."""
    prob = tied_pair()
    with pytest.raises(InfeasibleError) as info:
        solve(prob, IlpOptions(explain_infeasible=False))
    assert "5.00 MiB" in str(info.value) and "needs" not in str(info.value)


def test_infeasible_model_too_large_for_the_exact_peak_names_a_plans_peak(monkeypatch):
    # Past the size limit the peak is minimised on the reduced model: its plan's bytes are named.
    monkeypatch.setattr(solver, "_EXACT_PEAK_MAX_PAIRS", -1)
    prob = tied_pair()
    with pytest.raises(InfeasibleError) as info:
        solve(prob, EXACT)
    message = str(info.value)
    assert "5.00 MiB (5242880 bytes)" in message  # the budget
    assert "needs 11.00 MiB (11534336 bytes)" in message  # a plan's peak (here the least)
    assert "too large to find the least peak exactly" in message


@pytest.mark.parametrize("merge", [False, True])
def test_infeasible_found_by_cp_sat_not_by_the_quick_bound(merge):
    prob = tied_pair()
    with pytest.raises(InfeasibleError, match=r"needs is 11\.00 MiB \(11534336 bytes\)"):
        solve(prob, IlpOptions(merge_followers=merge))


@pytest.mark.parametrize(
    "prob",
    [
        problem([[INF, INF], [0, 1]]),
        problem([[0, 1], [0, 1]], [(0, 1, [[INF, INF], [INF, INF]])]),
        problem(
            [[0, 1], [0, 1], [0, 1]],
            [
                (0, 1, [[0, INF], [INF, 0]]),
                (1, 2, [[INF, 0], [0, INF]]),
                (0, 2, [[0, INF], [INF, 0]]),
            ],
        ),
    ],
    ids=["all strategies forbidden", "all pairs forbidden", "contradictory ties"],
)
def test_no_plan_at_any_budget(prob):
    with pytest.raises(InfeasibleError, match="no plan exists at any memory budget"):
        solve(prob)
    with pytest.raises(InfeasibleError):
        brute_force(prob)


# The hard problems below are about CP-SAT's own limits: their relaxation is far from integral
# and takes the LP its whole iteration allowance (ilp.lp_first), so those tests skip it.
def hard_problem(n=200, k=6, seed=0) -> IlpProblem:
    """Random dense costs on a graph of three operands per op: hard for CP-SAT."""
    rng = np.random.default_rng(seed)
    costs = [rng.uniform(0, 1, k) for _ in range(n)]
    edges = [
        (int(v), u, rng.uniform(0, 1, (k, k)))
        for u in range(1, n)
        for v in rng.choice(u, min(u, 3), replace=False)
    ]
    memory = [rng.integers(1, 100, k).astype(float) for _ in range(n)]
    live = [tuple(range(max(0, t - 20), t + 1)) for t in range(n)]
    return problem(costs, edges, memory, live, budget=40 * 21)


def test_no_solution_within_limits_raises_no_solution_error():
    assert issubclass(NoSolutionError, PlanningError)
    with pytest.raises(NoSolutionError, match="deterministic_time=0.001"):
        solve(hard_problem(), IlpOptions(deterministic_time=1e-3, lp_first=False))


def test_same_problem_twice_gives_same_choice():
    # Costs in {0, 1, 2}: many optimal plans, so a non-deterministic search could differ.
    rng = np.random.default_rng(11)
    n, k = 40, 4
    costs = [rng.integers(0, 3, k).astype(float) for _ in range(n)]
    edges = [
        (int(rng.integers(u)), u, rng.integers(0, 3, (k, k)).astype(float)) for u in range(1, n)
    ]
    edges += [(int(rng.integers(u)), u, rng.integers(0, 3, (k, k))) for u in range(2, n, 3)]
    memory = [rng.integers(1, 10, k).astype(float) for _ in range(n)]
    live = [tuple(range(max(0, t - 5), t + 1)) for t in range(n)]
    prob = problem(costs, edges, memory, live, budget=30)
    options = IlpOptions(deterministic_time=2.0, time_limit_s=60)
    first, second = solve(prob, options), solve(prob, options)
    assert first.choice == second.choice
    assert first.objective == second.objective


def test_reductions_kept_for_other_rows_and_redone_for_other_costs(monkeypatch):
    """A problem solved again with other memory rows and budget (``alpa_lite.intra.fit``'s rounds)
    reuses its merged, simplified form, and gets the plan a fresh solve gets under the new rows;
    a problem with other costs is reduced afresh."""
    rng = np.random.default_rng(5)
    n, k = 30, 3
    costs = [rng.uniform(0, 1, k) for _ in range(n)]
    edges = [(u - 1, u, rng.uniform(0, 1, (k, k))) for u in range(1, n)]
    memory = [rng.integers(1, 10, k).astype(float) for _ in range(n)]
    live = [tuple(range(max(0, t - 4), t + 1)) for t in range(n)]
    prob = problem(costs, edges, memory, live)
    calls = []
    real = solver._reduce
    monkeypatch.setattr(solver, "_reduce", lambda p, merged: calls.append(merged) or real(p, merged))
    options = IlpOptions(deterministic_time=2.0, time_limit_s=60)
    kept = solver.Reductions()
    free = solve(prob, options, kept)
    tight = replace(prob, memory_budget=free.peak_memory - 3)
    again = solve(tight, options, kept)
    assert calls == [True]
    fresh = solve(tight, options)
    assert again.choice == fresh.choice and again.peak_memory <= tight.memory_budget < free.peak_memory
    solve(replace(prob, node_costs=tuple(c + 1.0 for c in prob.node_costs)), options, kept)
    assert calls == [True, True, True]


def _waiting_for_the_solver(main: int) -> bool:
    """Whether the main thread waits in ``_solve_interruptibly``'s loop (the solver running)."""
    frame = sys._current_frames().get(main)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_back is not None \
                and frame.f_back.f_code.co_name == "_solve_interruptibly":
            return True
        frame = frame.f_back
    return False


def _interrupt_when_the_solver_runs(main: int, cancel: threading.Event) -> None:
    """Ctrl-C (``interrupt_main``) once the search runs and the main thread waits for it: the
    test asks for the stop itself, at the same point whatever the machine's speed (no timer)."""
    while not cancel.is_set():
        if _waiting_for_the_solver(main):
            _thread.interrupt_main()
            return
        time.sleep(0.001)


def test_ctrl_c_stops_the_solver_and_propagates(caplog):
    """A hard problem (no plan within 1e-3 deterministic units, see above) and limits it cannot
    reach before the interrupt: the search is stopped, waited for, and KeyboardInterrupt raised."""
    prob = hard_problem()
    cancel = threading.Event()
    watcher = threading.Thread(target=_interrupt_when_the_solver_runs, args=(threading.get_ident(), cancel),
                               daemon=True)
    watcher.start()
    try:
        with caplog.at_level(logging.INFO, logger="alpa_lite.ilp"), pytest.raises(KeyboardInterrupt):
            solve(prob, IlpOptions(time_limit_s=600, merge_followers=False, lp_first=False))
    finally:
        cancel.set()
        watcher.join()
    assert any(r.getMessage().startswith("CP-SAT interrupted after") for r in caplog.records)
    assert not [t for t in threading.enumerate() if t.name == "cp-sat" and t.is_alive()]


def random_chain(n: int, k: int, seed: int) -> IlpProblem:
    rng = np.random.default_rng(seed)
    costs = [rng.uniform(0, 1, k) for _ in range(n)]
    edges = [(v, v + 1, rng.uniform(0, 1, (k, k))) for v in range(n - 1)]
    memory = [rng.integers(1, 100, k).astype(float) for _ in range(n)]
    return problem(costs, edges, memory, [(t, t + 1) for t in range(n - 1)])


def chain_optimum(prob: IlpProblem) -> float:
    """Viterbi: best[j] = cheapest prefix ending in strategy j."""
    best = prob.node_costs[0]
    for e in prob.edges:
        best = (best[:, None] + e.cost).min(axis=0) + prob.node_costs[e.dst]
    return float(best.min())


def test_2000_node_chain_solves_to_its_optimum():
    """Proven optimal within the deterministic limit (CP-SAT's work units, the same on every
    machine); the wall clock, far above it, only guards against a hang."""
    prob = random_chain(2000, 4, seed=0)
    solution = solve(prob, IlpOptions(time_limit_s=600, deterministic_time=10))
    assert solution.status == "OPTIMAL"
    assert not solution.wall_clock_stop
    assert solution.objective == pytest.approx(chain_optimum(prob), rel=1e-9)


def test_2000_node_chain_of_followers_collapses():
    # Every 10th node is a leader (its own costs; a residual edge from the previous leader and
    # the edge from the previous follower); the 9 nodes after it follow it at a flat 0.5 s each.
    rng = np.random.default_rng(3)
    dist = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)  # a metric: following is best
    leaders = [rng.uniform(0, 1, 3) for _ in range(200)]
    costs = [leaders[v // 10] if v % 10 == 0 else np.full(3, 0.5) for v in range(2000)]
    edges = [(v, v + 1, dist) for v in range(1999)]
    edges += [(v - 10, v, dist) for v in range(10, 2000, 10)]
    solution = solve(problem(costs, edges))
    assert solution.status == "OPTIMAL"
    assert solution.num_variables < 200 * 3 + 199 * 9 + 1  # leaders and their edges only
    # Followers copy their leader, so leader s pays 9 * 0.5 more, and each leader-to-leader step
    # pays the residual and the last follower's edge, 2 * dist.
    leader_chain = problem(
        [c + 9 * 0.5 for c in leaders], [(s, s + 1, 2 * dist) for s in range(199)]
    )
    assert solution.objective == pytest.approx(chain_optimum(leader_chain), rel=1e-9)


@pytest.mark.parametrize("factor", [1e-9, 1.0, 1e6])
def test_costs_of_any_magnitude(factor):
    rng = np.random.default_rng(7)
    costs = [rng.uniform(0, 10, 3) * factor for _ in range(5)]
    edges = [(v, v + 1, rng.uniform(0, 3, (3, 3)) * factor) for v in range(4)]
    edges += [(0, 3, rng.uniform(0, 3, (3, 3)) * factor)]
    prob = problem(costs, edges)
    _, expected = brute_force(prob)
    assert solve(prob, EXACT).objective == pytest.approx(expected, rel=1e-6)


def test_huge_memory_is_scaled_conservatively():
    rng = np.random.default_rng(5)
    memory = [rng.integers(1, 1000, 3).astype(float) * 1e15 for _ in range(5)]
    costs = [rng.uniform(0, 10, 3) for _ in range(5)]
    live = [(0, 1, 2), (2, 3, 4)]
    budget = 1500e15
    prob = problem(
        costs, [(v, v + 1, rng.uniform(0, 3, (3, 3))) for v in range(4)], memory, live, budget
    )
    solution = solve(prob, EXACT)
    assert solution.peak_memory <= budget
    assert solution.objective == pytest.approx(brute_force(prob)[1], rel=1e-6)


def test_solution_reports_model_size_and_logs_phases(caplog):
    with caplog.at_level(logging.INFO, logger="alpa_lite.ilp"):
        solution = solve(problem([[1, 2], [2, 1]], [(0, 1, SAME)]), replace(EXACT, eliminate=False, lp_first=False))
    assert solution.num_variables == 2 + 2 + 4  # s_0, s_1 and the four e_01 pairs
    assert solution.num_constraints > 0
    assert solution.wall_s > 0
    text = caplog.text
    assert "variables" in text and "constraints" in text and "CP-SAT OPTIMAL" in text


def test_empty_problem():
    solution = solve(problem([]))
    assert solution.choice == ()
    assert solution.objective == 0.0


@pytest.mark.parametrize(
    "build",
    [
        lambda: problem([[1, 2]], memory=[[1, 2, 3]]),
        lambda: problem([[1, 2], [1]], [(0, 1, [[0, 1]])]),
        lambda: problem([[1, 2]], [(0, 0, SAME)]),
        lambda: problem([[1, 2]], [(0, 3, SAME)]),
        lambda: problem([[1, np.nan]]),
        lambda: problem([[1, -INF]]),
        lambda: problem([[]]),
        lambda: problem([[1]], memory=[[-1]]),
        lambda: problem([[1]], live_sets=[(1,)]),
    ],
    ids=[
        "memory shape",
        "edge shape",
        "self-loop",
        "edge out of range",
        "nan cost",
        "-inf cost",
        "no strategy",
        "negative memory",
        "live set out of range",
    ],
)
def test_malformed_problems_are_refused(build):
    with pytest.raises(ValueError):
        build()


def test_problem_arrays_are_read_only_copies():
    costs = np.array([1.0, 2.0])
    prob = problem([costs])
    costs[0] = 99.0
    assert prob.node_costs[0][0] == 1.0
    with pytest.raises(ValueError):
        prob.node_costs[0][0] = 5.0


def test_options_are_checked():
    with pytest.raises(ValueError):
        IlpOptions(time_limit_s=0)
    with pytest.raises(ValueError):
        IlpOptions(num_workers=0)


def test_brute_force_refuses_large_problems():
    with pytest.raises(ValueError, match="200000"):
        brute_force(problem([[0, 1]] * 18))  # 2**18 = 262144 combinations


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1.5 * GiB, "1.50 GiB (1610612736 bytes)"),
        (3 * 2**20, "3.00 MiB (3145728 bytes)"),
        (GiB, "1.00 GiB (1073741824 bytes)"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_search_stopped_by_the_deterministic_limit_gives_the_same_plan_every_time():
    """#8: a search cut short by CP-SAT's deterministic limit (not the wall clock) is repeatable."""
    options = IlpOptions(time_limit_s=120, deterministic_time=0.3, lp_first=False)
    hard = replace(hard_problem(n=300), memory_budget=None)
    first = solve(hard, options)
    assert first.status == "FEASIBLE" and not first.wall_clock_stop  # stopped short, by the limit
    again = solve(hard, options)
    assert again.choice == first.choice and again.objective == first.objective


def test_default_deterministic_limit_is_a_share_of_the_wall_clock_limit():
    from ilp.problem import DETERMINISTIC_SHARE
    from ilp.solver import deterministic_limit

    assert deterministic_limit(IlpOptions(time_limit_s=10)) == pytest.approx(10 * DETERMINISTIC_SHARE)
    assert deterministic_limit(IlpOptions(time_limit_s=10, deterministic_time=2)) == 2
    with pytest.raises(ValueError, match="deterministic_time"):
        IlpOptions(deterministic_time=0)
