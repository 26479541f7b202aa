"""``alpa_lite.fit``: the ILP charges copies their least bytes (a relaxation); the plan returned
always fits the budget with every copy counted exactly, or the exact model proves none does.

The MLP below peaks at 268,568 B per device unbounded on 8 devices; budgets just under that are
where relaxed plans overshoot (found by scanning budgets from 230 kB to 268 kB)."""

from __future__ import annotations

import logging

import jax
import pytest

import alpa_lite as al
from alpa_lite.cluster import ClusterSpec
from alpa_lite.errors import InfeasibleError
from alpa_lite.fit import solve_within_budget
from alpa_lite.intra_op import build_problem, peak_memory
from alpa_lite.planner import find_ties
from alpa_lite.tracer import trace
from cost_model.builder import build_strategies
from examples.mlp import make_example
from ilp import IlpOptions, solve
from tests.helpers import make_mesh


@pytest.fixture(scope="module")
def mlp():
    fn, args = make_example(batch=16, hidden=1024, dim=64, layers=2)
    graph = trace(fn, *args)
    sgraph = build_strategies(graph, ClusterSpec.preset("cpu").with_mesh((8,), ("x",)))
    ties = find_ties(graph, args, (), jax.eval_shape(fn, *args))[0]
    return fn, args, sgraph, ties


def _exact(sgraph, ties, budget):
    iop = build_problem(sgraph, ties, budget, exact_copies=True)
    return iop, solve(iop.problem)


@pytest.mark.parametrize("budget", [259_555.0, 263_777.0, 268_000.0, 3.0e5])
def test_plan_fits_with_its_copies_or_none_exists(budget, mlp):
    """Whatever the rounds do, the answer is the exact model's: a plan that fits exactly (and
    costs what the exact model's optimum costs), or InfeasibleError from both."""
    _, _, sgraph, ties = mlp
    try:
        exact_iop, exact_sol = _exact(sgraph, ties, budget)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve_within_budget(lambda e: build_problem(sgraph, ties, budget, exact_copies=e), IlpOptions())
        return
    iop, sol = solve_within_budget(lambda e: build_problem(sgraph, ties, budget, exact_copies=e), IlpOptions())
    assert peak_memory(iop, sol.choice) <= budget
    assert sol.objective == pytest.approx(exact_sol.objective, rel=1e-6)


def test_relaxed_plan_over_budget_is_solved_again(mlp, caplog):
    """At 263,777 B the relaxed ILP's first plan needs 264,824 B with its copies: the budget it
    sees is lowered, and the exact model has the last word (no plan fits)."""
    _, _, sgraph, ties = mlp
    budget = 263_777.0
    relaxed = build_problem(sgraph, ties, budget)
    first = solve(relaxed.problem)
    assert first.peak_memory <= budget < peak_memory(relaxed, first.choice)  # the relaxation misses copies
    with caplog.at_level(logging.INFO, logger="alpa_lite.fit"), pytest.raises(InfeasibleError):
        solve_within_budget(lambda e: build_problem(sgraph, ties, budget, exact_copies=e), IlpOptions())
    assert "solving again with the ILP's budget" in caplog.text
    assert "solving the exact model" in caplog.text


@pytest.mark.parametrize("budget", [259_555.0, 263_777.0, 268_000.0])
def test_planner_never_returns_a_plan_over_budget(budget, mlp):
    fn, args, _, _ = mlp
    try:
        plan = al.plan(fn, *args, mesh=make_mesh((8,)), memory_budget=budget)
    except InfeasibleError as e:
        assert "no plan fits the memory budget" in str(e)
        return
    assert plan.cost.peak_memory_bytes <= budget
