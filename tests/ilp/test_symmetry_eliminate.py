"""Tying identical layers (ilp.symmetry) and exact eliminations (ilp.eliminate)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ilp import Edge, IlpOptions, IlpProblem, evaluate, solve
from ilp.brute import brute_force
from ilp.eliminate import dead_ends, eliminate_leaves
from ilp.reduced import Reduced, Simplified, simplify
from ilp.symmetry import classes, quotient

# Elimination off: the layered chain is series-parallel, and elimination alone (ilp.eliminate)
# solves it in closed form, leaving nothing to tie.
EXACT = IlpOptions(time_limit_s=20, merge_followers=False, tie_rounds=0, eliminate=False)
TIED = IlpOptions(time_limit_s=20, merge_followers=False, tie_rounds=2, tie_min_nodes=0, eliminate=False)


def layered(num_layers: int, seed: int = 0, budget: float | None = None) -> IlpProblem:
    """A chain of identical 3-node layers (a → b, a → c, b → c, c → next a) between a distinct
    head and tail, with the same random costs in every layer; memory: each layer's nodes live
    together."""
    rng = np.random.default_rng(seed)
    k = 3
    layer_costs = [np.round(rng.uniform(0, 10, k), 3) for _ in range(3)]
    layer_edges = [np.round(rng.uniform(0, 5, (k, k)), 3) for _ in range(4)]
    for m in layer_edges:
        np.fill_diagonal(m, 0.0)
    costs = [np.round(rng.uniform(0, 10, k), 3)]  # head
    edges, live = [], []
    for _ in range(num_layers):
        a = len(costs)
        costs += [c.copy() for c in layer_costs]
        prev = a - 1
        edges += [Edge(prev, a, layer_edges[3]), Edge(a, a + 1, layer_edges[0]),
                  Edge(a, a + 2, layer_edges[1]), Edge(a + 1, a + 2, layer_edges[2])]
        live.append((a, a + 1, a + 2))
    costs.append(np.round(rng.uniform(0, 10, k), 3))  # tail
    edges.append(Edge(len(costs) - 2, len(costs) - 1, layer_edges[3]))
    memory = [np.array([3.0, 2.0, 1.0])] * len(costs)
    return IlpProblem(tuple(costs), tuple(edges), tuple(memory), tuple(live), budget)


def _simple(problem: IlpProblem) -> Simplified:
    return simplify(Reduced.from_problem(problem))


def test_classes_tie_the_copies_of_a_layer_and_keep_the_ends_apart():
    problem = layered(8)
    cls = classes(_simple(problem), rounds=2)
    middle = [cls[1 + 3 * layer] for layer in range(3, 5)]  # node a of two middle layers
    assert middle[0] == middle[1]
    assert cls[0] != cls[1 + 3 * 4] and cls[len(problem.node_costs) - 1] != cls[1 + 3 * 4]
    # positions inside a layer stay apart: a, b and c have different costs
    assert len({cls[1 + 3 * 4], cls[2 + 3 * 4], cls[3 + 3 * 4]}) == 3
    assert len(set(cls.values())) < len(cls) / 2


def test_classes_are_the_same_in_every_run():
    simple = _simple(layered(6, seed=3))
    assert classes(simple, rounds=2) == classes(_simple(layered(6, seed=3)), rounds=2)


@pytest.mark.parametrize("seed", range(5))
def test_a_tied_choice_costs_what_the_original_problem_says(seed):
    problem = layered(6, seed)
    simple = _simple(problem)
    tied = quotient(simple, [], classes(simple, rounds=2))
    rng = np.random.default_rng(seed)
    for _ in range(5):
        class_choice = {c: int(rng.integers(tied.simple.costs[c].size)) for c in tied.simple.costs}
        full = tied.expand(class_choice)
        choice = tuple(full[v] for v in range(problem.num_nodes))
        quotient_cost = tied.simple.offset + sum(float(tied.simple.costs[c][i]) for c, i in class_choice.items())
        quotient_cost += sum(float(m[class_choice[a], class_choice[b]]) for (a, b), m in tied.simple.edges.items())
        assert quotient_cost == pytest.approx(evaluate(problem, choice)[0], rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_tied_solve_matches_the_exact_optimum_on_repeated_layers(seed):
    problem = layered(10, seed)
    exact = solve(problem, EXACT)
    tied = solve(problem, TIED)
    assert tied.tied_classes is not None and tied.tied_classes < tied.model_nodes
    assert tied.num_variables < exact.num_variables
    # a tied plan is a plan: its cost is the original problem's; here also the optimum
    assert tied.objective == pytest.approx(evaluate(problem, tied.choice)[0])
    assert tied.objective == pytest.approx(exact.objective, rel=1e-9)


def test_untied_model_is_solved_when_no_tied_plan_exists():
    """A ring of identical nodes whose neighbours must differ (an edge forbids equal
    strategies): all nodes are alike, the tied model (one strategy for all) has no plan, and
    the untied one alternates."""
    n = 400
    alternate = np.array([[np.inf, 1.0], [0.0, np.inf]])
    costs = tuple(np.array([1.0, 2.0]) for _ in range(n))
    edges = tuple(Edge(v, (v + 1) % n, alternate) for v in range(n))
    problem = IlpProblem(costs, edges, tuple(np.ones(2) for _ in range(n)), ())
    solution = solve(problem, replace(TIED, tie_min_nodes=300))
    assert solution.tied_classes is None  # fell back to the untied model
    assert all(solution.choice[v] != solution.choice[(v + 1) % n] for v in range(n))
    # half the nodes at 1, half at 2; of the edges, those 0 → 1 cost 1 and 1 → 0 cost 0
    assert solution.objective == pytest.approx(n / 2 * (1.0 + 2.0) + n / 2 * 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_leaf_elimination_and_dead_ends_keep_the_optimum(seed):
    rng = np.random.default_rng(seed)
    n = 7
    costs = [np.round(rng.uniform(0, 10, int(rng.integers(1, 4))), 3) for _ in range(n)]
    edges = []
    for dst in range(1, n):  # a random tree plus one extra edge: leaves and a cycle
        src = int(rng.integers(dst))
        edges.append(Edge(src, dst, np.round(rng.uniform(0, 5, (costs[src].size, costs[dst].size)), 3)))
    edges.append(Edge(0, n - 1, np.round(rng.uniform(0, 5, (costs[0].size, costs[n - 1].size)), 3)))
    problem = IlpProblem(tuple(costs), tuple(edges), tuple(np.ones(c.size) for c in costs), ())
    _, expected = brute_force(problem)
    simple = _simple(problem)
    elim = eliminate_leaves(simple, [])
    assert len(elim.simple.costs) < len(simple.costs)
    pruned = dead_ends(elim.simple, [])
    assert sum(np.isfinite(c).sum() for c in pruned.costs.values()) <= sum(c.size for c in elim.simple.costs.values())
    solution = solve(problem, EXACT)
    assert solution.objective == pytest.approx(expected, rel=1e-9)
    without = solve(problem, replace(EXACT, eliminate=False))
    assert without.objective == pytest.approx(expected, rel=1e-9)


def test_dead_end_prunes_a_strategy_beaten_whatever_the_neighbour_takes():
    # node 0: strategy 1 costs 10 more and saves at most 2 on the edge: never optimal
    simple = Simplified({0: np.array([0.0, 10.0]), 1: np.array([0.0, 0.0])},
                        {(0, 1): np.array([[0.0, 2.0], [0.0, 0.0]])}, 0.0)
    pruned = dead_ends(simple, [])
    assert np.isinf(pruned.costs[0][1]) and np.isfinite(pruned.costs[0][0])
    assert np.isinf(pruned.edges[(0, 1)][1]).all()
    # ... unless it is the one that uses less memory where memory can bind
    kept = dead_ends(simple, [{0: np.array([5.0, 1.0]), 1: np.array([0.0, 0.0])}])
    assert np.isfinite(kept.costs[0]).all()


def test_leaf_elimination_keeps_nodes_memory_can_constrain():
    simple = Simplified({0: np.array([0.0, 1.0]), 1: np.array([0.0, 0.0])},
                        {(0, 1): np.array([[0.0, 2.0], [1.0, 0.0]])}, 0.0)
    assert len(eliminate_leaves(simple, []).simple.costs) == 0
    rows = [{0: np.array([5.0, 1.0])}]
    assert 0 in eliminate_leaves(simple, rows).simple.costs
