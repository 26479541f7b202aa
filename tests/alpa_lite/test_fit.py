"""``alpa_lite.intra.fit``: the ILP charges copies their least bytes (a relaxation); the plan returned
always fits the budget with every copy counted exactly, or the exact model proves none does.

The MLP below peaks at 268,568 B per device unbounded on 8 devices; budgets just under that are
where relaxed plans overshoot (found by scanning budgets from 230 kB to 268 kB)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

import alpa_lite as al
from alpa_lite.intra import problem as intra_op
from alpa_lite.intra.fit import solve_within_budget
from alpa_lite.intra.problem import build_problem, memory_profile, peak_memory
from alpa_lite.intra.roles import find_ties
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import InfeasibleError
from alpa_lite.tracing.tracer import trace
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


def _fit(sgraph, ties, budget, options=IlpOptions()):  # noqa: B008
    return solve_within_budget(lambda e: build_problem(sgraph, ties, budget, exact_copies=e, all_rows=e), options)


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
            _fit(sgraph, ties, budget)
        return
    iop, sol = _fit(sgraph, ties, budget)
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
    with caplog.at_level(logging.INFO, logger="alpa_lite.intra.fit"), pytest.raises(InfeasibleError):
        _fit(sgraph, ties, budget)
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


def test_profile_is_the_sum_over_each_points_live_set(mlp):
    """``memory_profile`` (prefix sums over intervals) against the ILP's own rows, listed at every
    point: with no copies or held buffers binding, the two agree at every point."""
    _, _, sgraph, ties = mlp
    iop = build_problem(sgraph, ties, None, all_rows=True)
    sol = solve(iop.problem)
    profile = memory_profile(iop, sol.choice)
    rows = iop.liveness.rows(range(iop.liveness.num_points))
    by_rows = np.array([sum(float(iop.problem.memory[v][sol.choice[v]]) for v in r) for r in rows])
    extra = profile - by_rows  # copies and held buffers: never negative
    assert (extra >= -1e-6).all()
    assert peak_memory(iop, sol.choice) == pytest.approx(profile.max())
    assert sol.peak_memory == pytest.approx(by_rows.max())


@pytest.mark.parametrize("seed", ["peaks", "first point"])
@pytest.mark.parametrize("budget", [268_000.0, 3.0e5])
def test_lazy_rows_give_the_optimum_of_all_rows(budget, seed, mlp, monkeypatch, caplog):
    """Rows listed lazily (forced here by ``LAZY_ROWS = 0``), from the two peak points or from a
    useless first row (then rows must be added), end at a plan that fits and costs what the plan
    with every row listed costs."""
    _, _, sgraph, ties = mlp
    full_iop, full = _fit(sgraph, ties, budget)
    monkeypatch.setattr(intra_op, "LAZY_ROWS", 0)
    if seed == "first point":
        monkeypatch.setattr(intra_op, "_seed_rows", lambda top, low: [0])
    with caplog.at_level(logging.INFO, logger="alpa_lite.intra.fit"):
        iop, sol = _fit(sgraph, ties, budget)
    assert len(iop.rows) < iop.liveness.num_points  # not every row listed
    assert ("rows added" in caplog.text) == (seed == "first point" and budget < 268_568)
    assert peak_memory(iop, sol.choice) <= budget
    assert sol.objective == pytest.approx(full.objective, rel=1e-6)
    assert sol.solves == 1 + caplog.text.count("rows added") + caplog.text.count("solving again")


def test_rows_added_for_short_runs_over_the_budget_are_distinct_points():
    """Runs of 1-3 points over the budget: each run's highest point, then points spread across
    the runs, every point once (a run shorter than the spread repeated its points before)."""
    from alpa_lite.intra.liveness import Liveness

    empty = np.zeros(0, dtype=np.int64)
    live = Liveness(*[empty] * 10)
    profile = np.zeros(40)
    profile[[3, 10, 11, 20, 21, 22]] = [5, 6, 7, 9, 8, 6]
    got = live.peaks(profile, over=1.0, limit=64)
    assert got[:3] == [20, 11, 3]  # the runs by height, each at its highest point
    assert sorted(got) == [3, 10, 11, 20, 21, 22]
    assert live.peaks(profile, over=1.0, limit=2) == [20, 11]
    assert live.peaks(profile, over=10.0, limit=64) == []
