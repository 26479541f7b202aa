"""A GShard-style MoE layer training step (top-2 gating, one-hot dispatch/combine einsums, experts
stacked as (E, M, H)) on a 1-D mesh of 8: expert parallel. Expert weights split along the
expert dim, tokens split by group, the two layouts meeting in all-to-alls; compiled wire bytes
no more than the data-parallel and megatron baselines'; 2 steps equal to the unsharded step.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from examples.moe import MoeConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

CONFIG = MoeConfig(groups=8, group_size=64, model=256, hidden=1024, experts=8, top_k=2)


def test_moe_is_expert_parallel_with_all_to_all():
    fn, args = make_example(CONFIG)
    mesh = make_mesh((8,))
    plan = al.plan(fn, *args, mesh=mesh)
    assert not plan.warnings, plan.warnings
    params = plan.in_specs[0]
    assert params["wi"] == P("x") and params["wo"] == P("x"), params  # split along experts
    assert plan.in_specs[2] == P("x")  # tokens split by group
    assert [c.kind for c in plan.collectives].count("all-to-all") >= 2, plan.collectives
    auto = measure("auto", plan, fn, args)
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    assert auto.compiled.by_kind()["all-to-all"][0] >= 2
    for method in ("data_parallel", "megatron"):
        base = al.plan(fn, *args, mesh=mesh, method=method)
        assert plan.cost.total_s <= base.cost.total_s * (1 + 1e-6)
        measured = measure(method, base, fn, args)
        measured.assert_predictions()  # a baseline's predictions hold too
        assert auto.wire <= measured.wire
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)
