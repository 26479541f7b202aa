"""Recomputation per layer in one-stage plans (``num_stages=1``), run for real on CPU devices.

The model: 8 MLP layers (batch 512, width 32 → 128 → 32, gelu and tanh between) whose
activations outweigh their weights about 30 to 1. Unbounded, the one-stage plan keeps every
activation; at half that plan's peak ``remat=False`` has no plan, the default recomputes layers
(chosen with the sharding, ``pipeline.one_stage``), runs equal to the unsharded step, and XLA's
compiled memory stays within the budget. ``remat=True`` recomputes every layer in full, and XLA
runs the recomputation (more FLOPs than keeping: not merged away). ``plan.check`` sets predicted
beside compiled memory and FLOPs.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_lite as al
from alpa_lite.ir.errors import InfeasibleError, PlanFileError
from alpa_lite.pipeline.checkpointing import checkpointed_step, loss_program
from alpa_lite.pipeline.one_stage import recomputed_ops
from alpa_lite.tracing.tracer import trace
from tests.helpers import assert_steps_equal, fresh, make_mesh

LAYERS, WIDTH, BATCH = 8, 32, 512


def loss_fn(ws, x):
    for k, (w1, w2) in enumerate(ws):
        if k:
            x = al.mark_layer(x)
        a = jax.nn.gelu(x @ w1)
        x = x + (jnp.tanh(a) * a) @ w2
    return jnp.mean(x ** 2)


def step(ws, x):
    loss, g = al.value_and_grad(loss_fn)(ws, x)
    return jax.tree.map(lambda w, gw: w - 0.1 * gw, ws, g), loss


def example():
    key = jax.random.PRNGKey(0)
    ws = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (WIDTH, 4 * WIDTH)) * 0.1,
           jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (4 * WIDTH, WIDTH)) * 0.1) for i in range(LAYERS)]
    return [ws, jax.random.normal(key, (BATCH, WIDTH))]


@functools.cache
def planned(devices: int, remat=None, half: bool = False):
    args = example()
    mesh = make_mesh((devices,))
    budget = planned(devices)[1].cost.peak_memory_bytes / 2 if half else None
    return args, al.plan(step, *args, mesh=mesh, num_stages=1, remat=remat, memory_budget=budget), budget


def test_ample_memory_recomputes_no_layer():
    _, plan, _ = planned(1)
    assert plan.remat == (False,) * LAYERS and plan.layer_remat.policies == ("keep",) * LAYERS
    assert plan.graph.barriers == () and "memory does not bind" in plan.layer_remat.tried[0]


def test_at_half_the_peak_never_recomputing_has_no_plan():
    args = example()
    budget = planned(1)[1].cost.peak_memory_bytes / 2
    with pytest.raises(InfeasibleError, match="memory budget"):
        al.plan(step, *args, mesh=make_mesh((1,)), num_stages=1, remat=False, memory_budget=budget)


@pytest.mark.parametrize("devices", [1, 8])
def test_at_half_the_peak_the_default_recomputes_runs_equal_and_fits(devices):
    args, plan, budget = planned(devices, None, True)
    assert any(plan.remat) and plan.cost.peak_memory_bytes <= budget
    keep_peak = planned(devices)[1].cost.peak_memory_bytes
    assert plan.layer_remat.unbounded_peak_bytes == keep_peak
    assert plan.layer_remat.recomputed_flops > 0
    # every candidate the search weighed is listed, the one without recomputation first
    assert plan.layer_remat.tried[0].startswith("keeping every activation: does not fit")
    assert_steps_equal(plan.compile(step), step, args, n_state=1, steps=2, atol=1e-5)
    report = plan.check(step, *fresh(args))
    assert report.compiled.memory_bytes <= 1.15 * budget
    # predicted FLOPs per device (the recomputed ops included) beside XLA's: within 2.2 % measured
    assert report.predicted_flops == pytest.approx(report.compiled.flops, rel=0.05)
    assert report.compiled.memory_bytes < 0.75 * planned(devices)[1].check(step, *fresh(args)).compiled.memory_bytes
    if devices > 1:  # predicted collectives, the recomputed forward's included, are what XLA runs
        assert report.wire_error <= report.tolerance


def test_remat_true_recomputes_every_layer_and_xla_runs_it():
    args, plan, _ = planned(1, True)
    assert plan.layer_remat.policies == ("full",) * LAYERS
    assert_steps_equal(plan.compile(step), step, args, n_state=1, steps=1, atol=1e-5)
    keep = planned(1)[1].check(step, *fresh(args)).compiled
    report = plan.check(step, *fresh(args))
    full = report.compiled
    assert report.predicted_flops == pytest.approx(full.flops, rel=0.05) and "FLOPs per device" in str(report)
    # one matmul per layer runs again (x @ w1: what gelu and tanh are recomputed from)
    assert full.flops - keep.flops >= LAYERS * 2 * BATCH * WIDTH * 4 * WIDTH * 0.99
    assert full.memory_bytes < keep.memory_bytes


@pytest.mark.parametrize("policy, dots", [("full", LAYERS), ("dots", 0), ("keep", 0)])
def test_recomputed_ops_are_the_forward_ops_run_again(policy, dots):
    """In full, each layer's first matmul runs again; with dots_saveable no matmul does."""
    args = example()
    _, _, loss = loss_program(step, args, ())
    starts = [0, *loss.marks]
    assert len(starts) == LAYERS
    g = trace(checkpointed_step(step, args, (), starts, [policy] * LAYERS), *args)
    ops = recomputed_ops(g)
    assert sum(g.ops[v].kind == "dot" for v in ops) == dots
    assert (len(ops) > 0) == (policy != "keep") and (len(g.barriers) == LAYERS) == (policy != "keep")
    lowered = jax.jit(checkpointed_step(step, args, (), starts, [policy] * LAYERS)).lower(*args).as_text()
    assert lowered.count("optimization_barrier") == (LAYERS if policy != "keep" else 0)


def test_json_round_trip_and_a_loaded_plan_runs():
    args, plan, _ = planned(1, None, True)
    loaded = al.Plan.from_json(plan.to_json())
    assert loaded.layer_remat == plan.layer_remat and loaded.remat == plan.remat
    run = loaded.compile(step, mesh=make_mesh((1,)), example_args=args)
    assert_steps_equal(run, step, args, n_state=1, steps=1, atol=1e-5)
    text = loaded.summary()
    assert "recomputation: layers 0.." in text and "keeping every activation with no memory budget" in text
    assert "recomputation:" in loaded._repr_html_()
    d = json.loads(plan.to_json())
    del d["layer_remat"]  # a file written before recomputation: nothing recomputes
    assert al.Plan.from_json(json.dumps(d)).remat == ()
    d["layer_remat"] = {**plan.layer_remat.to_dict(), "policies": ["keep", "sometimes"] + ["keep"] * (LAYERS - 2)}
    with pytest.raises(PlanFileError, match="policy 'sometimes'"):
        al.Plan.from_json(json.dumps(d))


def test_numpy_reference_of_the_model():
    """The model's loss, written again in NumPy: the step the tests compare with is the model."""
    ws, x = example()
    x_np = np.asarray(x, np.float64)
    for w1, w2 in ws:
        h = x_np @ np.asarray(w1, np.float64)
        a = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x_np = x_np + (np.tanh(a) * a) @ np.asarray(w2, np.float64)
    np.testing.assert_allclose(float(loss_fn(ws, x)), np.mean(x_np ** 2), rtol=1e-4)


def test_the_default_path_on_one_device_recomputes_and_fits():
    """``num_stages`` left open: the pipeline planner's one-stage pipeline recomputes (per stage),
    runs equal to the unsharded step, and its compiled programs hold at most the budget + 15 %
    (XLA's CPU pipeline keeps each recomputation behind its barrier: ``emit.program.keep_barriers``)."""
    args = example()
    budget = planned(1)[1].cost.peak_memory_bytes / 2
    with pytest.raises(InfeasibleError, match="allow recomputation"):
        al.plan(step, *args, mesh=make_mesh((1,)), memory_budget=budget, remat=False)
    plan = al.plan(step, *args, mesh=make_mesh((1,)), memory_budget=budget)
    assert plan.pipeline is not None and all(plan.remat) and plan.stages[0].memory_bytes <= budget
    assert_steps_equal(plan.compile(step), step, args, n_state=1, steps=2, atol=1e-5)
    report = plan.check(step, *fresh(args))
    assert report.stages[0].compiled_memory_bytes <= 1.15 * budget, str(report)
