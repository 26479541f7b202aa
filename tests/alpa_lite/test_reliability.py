"""Solver limits and bad arguments: clear outcomes, never a wrong plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import alpa_lite as al
from alpa_lite.intra.baselines import BASELINES
from alpa_lite.ir.errors import SignatureError
from examples.mlp import make_example
from tests.helpers import assert_steps_equal, fresh, make_mesh


@pytest.fixture(scope="module")
def mlp4():
    """A 4-layer MLP step on 2x4 and the predicted step of each baseline's plan of it."""
    fn, args = make_example(batch=32, hidden=512, layers=4)
    mesh = make_mesh((2, 4))
    baselines = {m: al.plan(fn, *args, mesh=mesh, method=m).cost.total_s for m in BASELINES}
    return fn, args, mesh, baselines


def _cut_short(monkeypatch, cut):
    """The planner's first ILP search (the auto plan's; the baselines' come after it) goes
    through ``cut(real, build, options)``: a stop that is the same on every machine."""
    import alpa_lite.intra.planner as planner

    real = planner.solve_within_budget
    calls = []

    def first_cut(build, options):
        calls.append(options)
        return cut(real, build, options) if len(calls) == 1 else real(build, options)

    monkeypatch.setattr(planner, "solve_within_budget", first_cut)
    return calls


def test_ilp_stopped_before_its_optimum_gives_a_plan_no_worse_than_any_baseline_and_says_so(mlp4, monkeypatch):
    """CP-SAT stopped by a deterministic limit (1e-3 of its work units, the same on every
    machine; the wall clock far above it) long before it proves the optimum (~0.1 units here):
    its best plan is not proven optimal, the planner compares it with the baselines' and uses
    the cheaper layout (here the megatron baseline's), and the note says so."""
    from dataclasses import replace

    fn, args, mesh, baselines = mlp4
    # lp_first off: the MLP's relaxation is integral, and the LP would prove its optimum first
    calls = _cut_short(monkeypatch, lambda real, build, options: real(
        build, replace(options, deterministic_time=1e-3, time_limit_s=600, lp_first=False)))
    plan = al.plan(fn, *args, mesh=mesh)
    assert calls
    assert plan.solver.note.startswith("ILP not optimal within 60 s (its best: "), plan.solver.note
    assert plan.solver.note.endswith("the megatron layout is cheaper and is used"), plan.solver.note
    assert plan.cost.total_s == pytest.approx(baselines["megatron"], rel=1e-9)
    assert all(plan.cost.total_s <= cost * (1 + 1e-9) for cost in baselines.values()), baselines
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)


def test_ilp_without_a_plan_falls_back_to_the_cheapest_baseline_and_says_so(mlp4, monkeypatch):
    """The search ends with no plan at all (``NoSolutionError``, what CP-SAT's limits passing
    before a first plan gives): the plan is the cheapest baseline's, and the note names it."""
    from ilp import NoSolutionError

    fn, args, mesh, baselines = mlp4

    def no_plan(real, build, options):
        raise NoSolutionError("CP-SAT found no plan within its limits (the test's)")

    _cut_short(monkeypatch, no_plan)
    plan = al.plan(fn, *args, mesh=mesh)
    cheapest = min(baselines, key=baselines.get)
    assert plan.solver.note == f"ILP timed out: fell back to the {cheapest} baseline", plan.solver.note
    assert plan.cost.total_s == pytest.approx(baselines[cheapest], rel=1e-9)
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)


def test_compiled_plan_rejects_other_shapes_with_signature_error():
    fn, args = make_example(batch=32, hidden=128, layers=2)
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    step = plan.compile(fn)
    bad = list(fresh(args))
    bad[2] = jnp.ones((16, 64))
    with pytest.raises(SignatureError, match=r"float32\[16, 64\].*float32\[32, 64\]"):
        step(*bad)


def test_plan_lowers_through_compiled_wrapper():
    fn, args = make_example(batch=32, hidden=128, layers=2)
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    text = plan.compile(fn).lower(*args).as_text()
    assert "sharding" in text  # the lowered module carries the plan's annotations


def test_function_without_array_inputs_is_a_planning_error():
    with pytest.raises(al.PlanningError, match="no array inputs"):
        al.plan(lambda: jnp.ones(3), mesh=make_mesh((8,)))


def test_non_array_argument_needs_static_argnums():
    def f(x, scale):
        return x * scale["k"]

    with pytest.raises(al.PlanningError, match="static_argnums"):
        al.plan(f, jnp.ones((8, 8)), {"k": "a"}, mesh=make_mesh((8,)))


def test_static_argnums_supported_as_jit_does():
    def f(x, n):
        return jnp.tanh(x) * n

    x = jax.random.normal(jax.random.key(0), (64, 32))
    plan = al.plan(f, x, 3, mesh=make_mesh((8,)), static_argnums=(1,))
    out = plan.compile(f)(x, 3)
    import numpy as np

    np.testing.assert_allclose(np.asarray(out), np.asarray(f(x, 3)), rtol=1e-6)
