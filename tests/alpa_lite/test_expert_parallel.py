"""The expert_parallel hand plan (DeepSpeed-MoE's layout) on the small GShard MoE step, 8 devices:
expert weights and their Adam moments split along the expert dim, tokens along groups, the
router replicated; the compiled step holds all-to-alls and equals the unsharded step. A model
without stacked experts is refused with a PlanningError that says why.
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

import alpa_lite as al
from alpa_lite.intra.baselines import expert_dims
from alpa_lite.ir.errors import PlanningError
from alpa_lite.measure.hlo_stats import stats_of
from alpa_lite.tracing.tracer import trace
from examples.mlp import make_example as mlp_example
from examples.moe import MoeConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh, placed_args

CONFIG = MoeConfig(groups=8, group_size=16, model=32, hidden=64, experts=8, top_k=2)


def test_expert_dims_are_the_matmul_batch_dims():
    """wi (E, M, H) and wo (E, H, M) are read with e as a dot batch dim; the router is not."""
    fn, args = make_example(CONFIG)
    graph = trace(fn, *args)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]]
    found = {names[i]: d for i, d in expert_dims(graph, range(len(names))).items()}
    assert found == {"['wi']": 0, "['wo']": 0}


def test_expert_parallel_plan_runs_equal_with_all_to_all():
    fn, args = make_example(CONFIG)
    mesh = make_mesh((8,))
    plan = al.plan(fn, *args, mesh=mesh, method="expert_parallel")
    params, opt_state = plan.in_specs[0], plan.in_specs[1]
    assert params["wi"] == P("x") and params["wo"] == P("x"), params
    assert params["router"] == P(), params
    assert opt_state[0].mu["wi"] == P("x") and opt_state[0].nu["wo"] == P("x"), opt_state
    assert plan.in_specs[2] == P("x") and plan.in_specs[3] == P("x")  # tokens split by group
    step = plan.compile(fn)
    compiled = stats_of(step, *placed_args(plan, args)).by_kind()
    assert compiled["all-to-all"][0] >= 2, compiled
    assert_steps_equal(step, fn, args, n_state=2, atol=1e-4)
    auto = al.plan(fn, *args, mesh=mesh)
    assert auto.cost.total_s <= plan.cost.total_s * (1 + 1e-6)  # the hand plan only removes choices


def test_expert_parallel_on_a_dense_model_says_why():
    fn, args = mlp_example(batch=16, hidden=32, dim=16, layers=2)
    with pytest.raises(PlanningError, match="needs stacked expert weights"):
        al.plan(fn, *args, mesh=make_mesh((8,)), method="expert_parallel")


def test_experts_split_over_the_largest_axes_that_divide_them():
    """4 experts on a 2×4 mesh: all 8 devices do not divide 4, so the experts split over y (4, the
    larger of x and y that does) and x holds replicas (DeepSpeed's expert-data parallelism);
    tokens still split over both axes."""
    fn, args = make_example(MoeConfig(groups=8, group_size=16, model=32, hidden=64, experts=4, top_k=2))
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)), method="expert_parallel")
    assert plan.in_specs[0]["wi"] == P("y") and plan.in_specs[0]["wo"] == P("y"), plan.in_specs[0]
    assert plan.in_specs[2] == P(("x", "y"))
    assert not plan.warnings, plan.warnings
