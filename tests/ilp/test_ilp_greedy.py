"""The greedy starting plan: a valid choice, never better than the optimum, often equal on chains."""

from __future__ import annotations

import numpy as np
import pytest

from ilp import Edge, IlpProblem
from ilp.brute import brute_force
from ilp.greedy import greedy_choice
from ilp.reduced import Reduced, simplify


def _chain(seed: int, n: int = 5, k: int = 3) -> IlpProblem:
    rng = np.random.default_rng(seed)
    costs = [rng.uniform(0, 1, k) for _ in range(n)]
    edges = [Edge(v, v + 1, rng.uniform(0, 1, (k, k))) for v in range(n - 1)]
    edges.append(Edge(0, n - 1, rng.uniform(0, 1, (k, k))))  # one long edge: not a pure chain
    return IlpProblem(tuple(costs), tuple(edges), tuple(np.zeros(k) for _ in range(n)), ((0,),))


def _cost(simple, choice) -> float:
    return simple.offset + sum(simple.costs[v][choice[v]] for v in simple.costs) + sum(
        m[choice[a], choice[b]] for (a, b), m in simple.edges.items())


@pytest.mark.parametrize("seed", range(10))
def test_greedy_is_valid_and_not_below_optimum(seed):
    problem = _chain(seed)
    simple = simplify(Reduced.from_problem(problem))
    choice = greedy_choice(simple)
    assert set(choice) == set(simple.costs)
    assert all(0 <= choice[v] < simple.costs[v].size for v in choice)
    _, best = brute_force(problem)
    assert _cost(simple, choice) >= best - 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_descent_passes_never_raise_cost(seed):
    simple = simplify(Reduced.from_problem(_chain(seed, n=8)))
    costs = [_cost(simple, greedy_choice(simple, passes=p)) for p in range(4)]
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
