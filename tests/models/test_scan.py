"""``lax.scan`` over layers (``examples/scan_gpt.py``, stacked params ``(L, ...)``): planned as
one repeated layer with its trip count. The outer problem does not grow with the layer count;
the modelled cost is within 2% of the plan of the same model unrolled; the layer's shardings are
applied to the stacked params (layer dim replicated) and inside the loop; 2 steps equal to the
unsharded step. Collectives inside the compiled loop are counted once per iteration.
"""

from __future__ import annotations

import jax
from models_common import measure

import alpa_lite as al
from examples.scan_gpt import GptConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

CONFIG = GptConfig(batch=16, seq=32, vocab=512, hidden=128, heads=4, mlp=512, layers=4)


def _abstract(args):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


def test_problem_size_does_not_grow_with_layers():
    mesh = make_mesh((8,))
    plans = {}
    for layers in (24, 96):
        fn, args = make_example(GptConfig(batch=8, seq=16, vocab=128, hidden=64, heads=2, mlp=128,
                                          layers=layers))
        plans[layers] = al.plan(fn, *_abstract(args), mesh=mesh)
        assert not plans[layers].warnings
    assert len(plans[24].graph.ops) == len(plans[96].graph.ops)
    assert plans[24].solver.variables == plans[96].solver.variables, (plans[24].solver, plans[96].solver)
    # Four times the layers: four times the work inside the loop.
    ratio = plans[96].cost.compute_s / plans[24].cost.compute_s
    assert 3.5 < ratio < 4.0, ratio


def test_scan_plan_matches_unrolled_and_runs():
    mesh = make_mesh((8,))
    fn, args = make_example(CONFIG)
    plan = al.plan(fn, *args, mesh=mesh)
    assert not plan.warnings, plan.warnings
    assert sum(k == "while" for k in plan.op_kinds) == 2  # forward and backward loops, not unrolled
    unrolled_fn, unrolled_args = make_example(GptConfig(**{**CONFIG.__dict__, "scan": False}))
    unrolled = al.plan(unrolled_fn, *unrolled_args, mesh=mesh)
    print(f"modelled cost: scan {plan.cost.total_s * 1e3:.3f} ms, unrolled {unrolled.cost.total_s * 1e3:.3f} ms; "
          f"ILP variables {plan.solver.variables} vs {unrolled.solver.variables}")
    assert abs(plan.cost.total_s - unrolled.cost.total_s) <= 0.02 * unrolled.cost.total_s
    # The stacked params take the layer's shardings, the layer dim replicated.
    stacked = plan.in_specs[0]["layers"]
    assert all(len(spec) == 0 or spec[0] is None for spec in stacked.values()), stacked
    assert any(len(spec) > 1 and "x" in spec[1:] for spec in stacked.values()), stacked
    auto = measure("auto (scan)", plan, fn, args)
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)
