"""A GShard-style MoE layer training step (top-2 gating, one-hot dispatch/combine einsums, experts
stacked as (E, M, H)) on a 1-D mesh of 8: expert parallel. Expert weights split along the
expert dim, tokens split by group, the two layouts meeting in all-to-alls; modelled cost no more
than the data-parallel and megatron baselines', and (slow: a compile each) compiled wire bytes no
more than theirs; 2 steps equal to the unsharded step.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from examples.moe import MoeConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

CONFIG = MoeConfig(groups=8, group_size=64, model=256, hidden=1024, experts=8, top_k=2)


BASELINES = ("data_parallel", "megatron")


@pytest.fixture(scope="module")
def moe():
    """The MoE step planned on 8 devices and its compiled plan measured (shared by the default
    test and the slow comparison with the baselines' compiled programs)."""
    fn, args = make_example(CONFIG)
    mesh = make_mesh((8,))
    plan = al.plan(fn, *args, mesh=mesh)
    return fn, args, mesh, plan, measure("auto", plan, fn, args)


def test_moe_is_expert_parallel_with_all_to_all(moe):
    fn, args, mesh, plan, auto = moe
    assert not plan.warnings, plan.warnings
    params = plan.in_specs[0]
    assert params["wi"] == P("x") and params["wo"] == P("x"), params  # split along experts
    assert plan.in_specs[2] == P("x")  # tokens split by group
    assert [c.kind for c in plan.collectives].count("all-to-all") >= 2, plan.collectives
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    assert auto.compiled.by_kind()["all-to-all"][0] >= 2
    for method in BASELINES:
        base = al.plan(fn, *args, mesh=mesh, method=method)
        assert plan.cost.total_s <= base.cost.total_s * (1 + 1e-6), method
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)


@pytest.mark.slow
def test_moe_sends_no_more_than_the_baselines_compiled(moe):
    """The baselines compiled too (a compile each): their predictions hold, and the expert-parallel
    plan's compiled program sends no more wire bytes than theirs."""
    fn, args, mesh, _, auto = moe
    for method in BASELINES:
        measured = measure(method, al.plan(fn, *args, mesh=mesh, method=method), fn, args)
        measured.assert_predictions()
        assert auto.wire <= measured.wire, method
