"""``lax.scan`` over layers (``examples/scan_gpt.py``, stacked params ``(L, ...)``): planned as
one repeated layer with its trip count. The outer problem does not grow with the layer count;
the modelled cost is within 2% of the plan of the same model unrolled; the layer's shardings are
applied to the stacked params (layer dim replicated) and inside the loop; 2 steps equal to the
unsharded step. Collectives inside the compiled loop are counted once per iteration. With bf16
compute, predicted memory is within 20% of the compiled program's too.
"""

from __future__ import annotations

import jax
import numpy as np
from models_common import measure

import alpa_lite as al
from alpa_lite.intra.problem import build_problem
from examples.scan_gpt import GptConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

CONFIG = GptConfig(batch=16, seq=32, vocab=512, hidden=128, heads=4, mlp=512, layers=4)


def _ilp_variables(fn, args, mesh) -> int:
    """Variables of the intra-op ILP as design.md states it: one s_v[i] per strategy, one
    e_vu[i, j] per allowed strategy pair of an edge (before the solver's presolve, which prunes
    by cost values and so keeps a different number for different trip counts)."""
    from alpa_lite.intra.roles import find_ties, resolve_mesh
    from alpa_lite.intra.scan import strategy_graph
    from alpa_lite.tracing.tracer import trace

    _, cluster = resolve_mesh(mesh, None)
    graph = trace(fn, *args)
    ties, _ = find_ties(graph, args, (), jax.eval_shape(fn, *args))
    pb = build_problem(strategy_graph(graph, cluster), ties, None).problem
    return sum(c.size for c in pb.node_costs) + sum(int(np.isfinite(e.cost).sum()) for e in pb.edges)


def _abstract_example(config):
    """``make_example(config)`` with its arguments as shapes: nothing is initialised."""
    made = {}

    def args():
        made["fn"], example = make_example(config)
        return example

    shapes = jax.eval_shape(args)
    return made["fn"], shapes


def test_problem_size_does_not_grow_with_layers():
    mesh = make_mesh((8,))
    plans, variables = {}, {}
    for layers in (8, 32):
        fn, args = _abstract_example(GptConfig(batch=8, seq=16, vocab=128, hidden=64, heads=2, mlp=128,
                                               layers=layers))
        plans[layers] = al.plan(fn, *args, mesh=mesh)
        assert not plans[layers].warnings
        variables[layers] = _ilp_variables(fn, args, mesh)
    print(f"ILP variables {variables}; after the solver's presolve "
          f"{ {n: p.solver.variables for n, p in plans.items()} }")
    assert len(plans[8].graph.ops) == len(plans[32].graph.ops)
    assert variables[8] == variables[32]
    # Four times the layers: four times the work inside the loop (the embedding, the final norm
    # and the loss outside it are about 2% of the step at 8 layers).
    ratio = plans[32].cost.compute_s / plans[8].cost.compute_s
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
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)


def test_scan_with_bf16_compute_predicts_memory():
    """Scan over layers with bf16 compute and f32 master weights: the plan gathers the stacked
    weights for the loops and the CPU backend reads every bf16 stack the backward loop takes as
    an f32 copy; predicted memory was off by half (7.9 MB vs 15.8 MB) before those copies and
    the loop bodies' temporaries were counted."""
    import jax.numpy as jnp

    fn, args = make_example(GptConfig(**{**CONFIG.__dict__, "dtype": jnp.bfloat16}))
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    assert not plan.warnings, plan.warnings
    assert sum(k == "while" for k in plan.op_kinds) == 2
    auto = measure("auto (scan, bf16)", plan, fn, args)
    auto.assert_predictions()  # memory within 20%, wire bytes within 10%
    assert auto.extra_kinds == ()
    # bf16 rounding differs with the summation order (see test_mixed_precision.py)
    assert_steps_equal(auto.step, fn, args, n_state=2, rtol=1e-2, atol=5e-3)
