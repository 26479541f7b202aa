"""CP-SAT against brute force on random tiny problems, and follower merging against both."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from alpa_lite.ir.errors import InfeasibleError
from ilp import Edge, IlpOptions, IlpProblem, evaluate, solve
from ilp.brute import brute_force, brute_force_min_peak

EXACT = IlpOptions(merge_followers=False)
MERGED = IlpOptions(merge_followers=True)


def random_problem(seed: int, budget_kind: str) -> IlpProblem:
    """A random DAG (edges i -> j, i < j; one or two sources per node) plus a few back edges,
    random costs with some forbidden strategies and pairs, integer memory and program-point live
    sets."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 8))
    sizes = [int(rng.integers(1, 5)) for _ in range(n)]
    while np.prod(sizes) > 3000:
        sizes[int(np.argmax(sizes))] -= 1
    costs = []
    for k in sizes:
        c = np.round(rng.uniform(0.0, 10.0, k), 3)
        if k > 1 and rng.random() < 0.3:
            c[rng.integers(k)] = np.inf
        costs.append(c)
    edges = []
    last_use = list(range(n))
    for dst in range(1, n):  # one or two operands, as ops have
        for src in {int(rng.integers(dst)), int(rng.integers(dst)) if rng.random() < 0.4 else -1}:
            if src >= 0:
                edges.append(Edge(src, dst, _matrix(rng, sizes[src], sizes[dst])))
                last_use[src] = dst
    for _ in range(int(rng.integers(0, 3))):
        src, dst = sorted(rng.choice(n, 2, replace=False))[::-1]
        edges.append(Edge(src, dst, _matrix(rng, sizes[src], sizes[dst])))
    memory = [rng.integers(1, 100, k).astype(float) for k in sizes]
    live_sets = [tuple(v for v in range(t + 1) if last_use[v] >= t) for t in range(n)]
    problem = IlpProblem(tuple(costs), tuple(edges), tuple(memory), tuple(live_sets))
    return _with_budget(problem, rng, budget_kind)


def _matrix(rng, rows: int, cols: int) -> np.ndarray:
    m = np.round(rng.uniform(0.0, 5.0, (rows, cols)), 3)
    if rng.random() < 0.6:
        m[np.arange(rows), np.arange(rows) % cols] = 0.0  # dst can follow src for free
    if rng.random() < 0.3:
        m[rng.integers(rows), rng.integers(cols)] = np.inf
    if rng.random() < 0.15:
        m[:] = 1.25  # a constant matrix: no edge variables
    return m


def _with_budget(problem: IlpProblem, rng, kind: str) -> IlpProblem:
    if kind == "none":
        return problem
    try:
        _, low = brute_force_min_peak(problem)
        _, high = evaluate(problem, brute_force(problem)[0])
    except InfeasibleError:
        return problem
    budget = {"binding": (low + high) / 2, "tight": low, "infeasible": low - 1}[kind]
    return IlpProblem(problem.node_costs, problem.edges, problem.memory, problem.live_sets, budget)


CASES = [(seed, kind) for seed in range(16) for kind in ("none", "binding", "tight")]
CASES += [(seed, "infeasible") for seed in range(100, 106)]


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_exact_model_matches_brute_force(seed, kind):
    problem = random_problem(seed, kind)
    try:
        _, expected = brute_force(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve(problem, EXACT)
        return
    solution = solve(problem, EXACT)
    assert solution.status == "OPTIMAL"
    assert solution.objective == pytest.approx(expected, rel=1e-6, abs=1e-9)
    cost, peak = evaluate(problem, solution.choice)
    assert cost == solution.objective
    assert peak == solution.peak_memory
    assert peak <= (problem.memory_budget if problem.memory_budget is not None else np.inf)


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_merged_model_is_never_better_than_optimum(seed, kind):
    problem = random_problem(seed, kind)
    try:
        _, expected = brute_force(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve(problem, MERGED)
        return
    solution = solve(problem, MERGED)
    assert len(solution.choice) == problem.num_nodes
    assert solution.objective >= expected - 1e-9 * max(1.0, expected)
    assert evaluate(problem, solution.choice)[0] == solution.objective


# Seeds whose problem has plans, just none within the budget (others forbid every plan).
INFEASIBLE_SEEDS = [s for s in range(100, 130) if random_problem(s, "infeasible").memory_budget][:6]


@pytest.mark.parametrize("seed", INFEASIBLE_SEEDS)
def test_infeasible_message_names_brute_force_minimum(seed):
    problem = random_problem(seed, "infeasible")
    assert problem.memory_budget is not None
    _, low = brute_force_min_peak(problem)
    with pytest.raises(InfeasibleError) as info:
        solve(problem, EXACT)
    numbers = re.findall(r"\((\d+) bytes\)", str(info.value))
    assert numbers[0] == str(int(problem.memory_budget))
    assert numbers[1] == str(int(low))


def _metric(rng, k: int) -> np.ndarray:
    """Shortest-path distances of a random complete graph: zero diagonal, positive elsewhere,
    triangle inequality (as the cost model's cheapest-path resharding)."""
    d = np.round(rng.uniform(0.5, 5.0, (k, k)), 3)
    np.fill_diagonal(d, 0.0)
    for via in range(k):
        d = np.minimum(d, d[:, [via]] + d[[via], :])
    return d


def follower_chains(seed: int) -> tuple[IlpProblem, int]:
    """Segments of: an input (no in-edge), a leader (in-edges from that input and from the
    previous segment's tail: two sources, so never a follower, even after merging; the first
    segment has a leader without in-edges and no input), then a chain
    of followers whose cost does not depend on their strategy. One metric on every edge makes
    following optimal, so merging is exact. Returns the problem and its number of followers."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 4))
    dist = _metric(rng, k)
    costs: list[np.ndarray] = []
    edges: list[Edge] = []
    followers = 0
    for segment in range(3):
        if segment:
            costs.append(np.round(rng.uniform(0, 10, k), 3))  # the input
            tail, source = len(costs) - 2, len(costs) - 1
        costs.append(np.round(rng.uniform(0, 10, k), 3))  # the leader
        if segment:
            edges += [Edge(source, len(costs) - 1, dist), Edge(tail, len(costs) - 1, dist)]
        for _ in range(int(rng.integers(1, 3))):
            costs.append(np.full(k, round(float(rng.uniform(0, 3)), 3)))
            edges.append(Edge(len(costs) - 2, len(costs) - 1, dist))
            followers += 1
    memory = tuple(np.ones(k) for _ in costs)
    return IlpProblem(tuple(costs), tuple(edges), memory, ()), followers


@pytest.mark.parametrize("seed", range(10))
def test_merging_is_exact_on_chains_of_followers(seed):
    problem, followers = follower_chains(seed)
    _, expected = brute_force(problem)
    # model sizes compared without leaf elimination, which would fold these chains away entirely
    exact = solve(problem, replace(EXACT, eliminate=False))
    merged = solve(problem, replace(MERGED, eliminate=False))
    assert merged.objective == pytest.approx(expected, rel=1e-9)
    # every follower folded away: k strategies fewer per follower, and no edge to it
    assert merged.leaders < exact.leaders
    k = problem.node_costs[0].size
    assert exact.num_variables - merged.num_variables >= followers * (k + k * k)


def test_random_cases_do_merge():
    """The random tiny problems exercise merging (so the bound test above is not vacuous)."""
    merging = 0
    for seed, kind in CASES:
        problem = random_problem(seed, kind)
        try:
            merged = solve(problem, MERGED)
        except InfeasibleError:
            continue
        merging += merged.leaders < solve(problem, EXACT).leaders
    assert merging >= 10
