"""Pipelines run for real on 8 CPU devices viewed as 2 hosts × 4: forced to 2 and 4 stages with
4 microbatches, they equal the unsharded training step (optax adam) over 3 steps, each fed the
previous step's outputs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alpa_lite as al
from alpa_lite.pipeline.planner import plan_pipeline
from examples import gpt
from examples.mlp import init_params
from tests.helpers import assert_steps_equal, fresh, make_mesh

CLUSTER = al.ClusterSpec.preset("cpu", num_hosts=2, devices_per_host=4)


def mlp_example(layers: int, batch: int = 32, hidden: int = 128, dim: int = 32):
    """An MLP training step with al.value_and_grad, a layer boundary after every hidden layer."""
    opt = optax.adam(1e-3)

    def loss_fn(params, x, y):
        for i in range(layers):
            p = params[f"layer{i}"]
            x = x @ p["w"] + p["b"]
            if i < layers - 1:
                x = al.mark_layer(jax.nn.gelu(x))
        return jnp.mean((x - y) ** 2)

    def step(params, opt_state, x, y):
        loss, grads = al.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    params = init_params(k1, [dim] + [hidden] * (layers - 1) + [dim])
    x = jax.random.normal(k2, (batch, dim), jnp.float32)
    y = jax.random.normal(k3, (batch, dim), jnp.float32)
    return step, (params, opt.init(params), x, y)


def check_stages(plan, num_stages):
    assert len(plan.stages) == num_stages and plan.pipeline.num_microbatches == 4
    devices = [d for s in plan.stages for d in s.devices]
    assert sorted(devices) == list(range(8)), "stages cover the cluster exactly, disjoint"
    assert plan.stages[0].layers[0] == 0
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert b.layers[0] == a.layers[1] + 1
    for s in plan.stages:
        assert np.prod(s.view) == np.prod(s.submesh) == len(s.devices)
        assert s.cost_s == pytest.approx(s.t_s + s.u_s)
    t = [s.t_s for s in plan.stages]
    T = sum(t) + 3 * max(t) + max(s.u_s for s in plan.stages)
    assert plan.pipeline.step_s == pytest.approx(T) and plan.cost.total_s == pytest.approx(T)


@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("layers", [4, 8])
def test_mlp_pipeline_equals_unsharded(layers, num_stages):
    fn, args = mlp_example(layers)
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=num_stages,
                   num_microbatches=4)
    check_stages(plan, num_stages)
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=3, atol=1e-4)


@functools.cache
def gpt_pipeline(num_stages: int):
    """The 4-block GPT (batch 16) planned as ``num_stages`` stages of 4 microbatches on the 2 × 4
    cluster, once per session (``test_pipeline_check`` checks the 2-stage plan's programs)."""
    fn, args = gpt.make_example(gpt.GPTConfig(), batch=16)
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4), "auto"), cluster=CLUSTER, num_stages=num_stages,
                   num_microbatches=4)
    return fn, args, plan


# 4 stages of the GPT: slow (4 stages run in the default suite on the MLP above).
@pytest.mark.parametrize("num_stages", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gpt_pipeline_equals_unsharded(num_stages):
    fn, args, plan = gpt_pipeline(num_stages)
    check_stages(plan, num_stages)
    print(plan.summary())
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=3, atol=1e-4)


def test_1f1b_equals_unsharded_and_holds_fewer_microbatches():
    fn, args = mlp_example(4)
    plan = plan_pipeline(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=4,
                         num_microbatches=4, schedule="1f1b")
    assert [s.inflight for s in plan.stages] == [4, 3, 2, 1]
    run = plan.compile(fn)
    assert run.schedule == "1f1b"
    assert_steps_equal(run, fn, args, n_state=2, steps=3, atol=1e-4)


def test_saved_plan_compiles_and_runs():
    fn, args = mlp_example(4)
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=2, num_microbatches=4)
    loaded = al.Plan.from_json(plan.to_json())
    assert loaded.to_dict() == plan.to_dict()
    assert [dataclasses.astuple(s) for s in loaded.stages] == [dataclasses.astuple(s) for s in plan.stages]
    run = loaded.compile(fn, mesh=make_mesh((2, 4)), example_args=args)
    assert_steps_equal(run, fn, args, n_state=2, steps=2, atol=1e-4)


def test_aux_outputs_and_grad():
    """has_aux: a per-example aux is concatenated over microbatches, a scalar one averaged."""
    opt = optax.sgd(0.1)

    def loss_fn(w, x):
        h = al.mark_layer(jnp.tanh(x @ w["a"]))
        out = h @ w["b"]
        return jnp.mean(out ** 2), {"per_example": jnp.sum(out, axis=1), "mean": jnp.mean(h)}

    def step(w, s, x):
        g, aux = al.grad(loss_fn, has_aux=True)(w, x)
        u, s = opt.update(g, s, w)
        return optax.apply_updates(w, u), s, aux

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = {"a": jax.random.normal(k1, (8, 16)), "b": jax.random.normal(k2, (16, 4))}
    x = jax.random.normal(k3, (32, 8))
    args = (w, opt.init(w), x)
    plan = al.plan(step, *args, mesh=make_mesh((8,)), cluster=CLUSTER, num_stages=2, num_microbatches=4)
    assert_steps_equal(plan.compile(step), step, args, n_state=2, steps=2, atol=1e-5)


def test_memory_budget_fits_compiled_stages():
    """Each stage's compiled forward/backward memory plus the activations it holds for the
    microbatches in flight fits the per-device budget it was planned for."""
    fn, args = mlp_example(4, batch=64, hidden=512)
    mesh = make_mesh((2, 4))
    free = al.plan(fn, *args, mesh=mesh, cluster=CLUSTER, num_stages=2, num_microbatches=4)
    budget = max(s.memory_bytes for s in free.stages)  # the tightest budget this plan fits
    plan = al.plan(fn, *args, mesh=mesh, cluster=CLUSTER, num_stages=2, num_microbatches=4,
                   memory_budget=budget)
    assert all(s.memory_bytes <= budget for s in plan.stages)
    run = plan.compile(fn)
    run(*fresh(args))
    for s, m in zip(plan.stages, run.compiled_memory()):
        held = (m["inflight"] - 1) * m["residual_bytes"]
        for ma in (m["fwd"], m["bwd"]):
            used = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes \
                + ma.temp_size_in_bytes
            print(f"stage {s.layers}: compiled {used} B + held {held} B, budget {budget:.0f} B "
                  f"(predicted {s.memory_bytes:.0f} B)")
            assert used + held <= budget


def test_update_runs_per_stage_or_whole_when_it_mixes_stages():
    """adam updates each stage's weights on its sub-mesh; gradient-norm clipping reads every
    stage's gradients, so that update runs as one program on the whole mesh. Both equal."""
    fn, args = mlp_example(4)
    mesh = make_mesh((2, 4))
    plan = al.plan(fn, *args, mesh=mesh, cluster=CLUSTER, num_stages=2, num_microbatches=4)
    run = plan.compile(fn)
    out = run(*fresh(args))
    assert run.update.split
    for leaf in jax.tree.leaves(out[0]):
        assert len(leaf.sharding.device_set) == 4  # on its stage's sub-mesh

    opt = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-3))

    def clipped(params, opt_state, x, y):
        loss, grads = al.value_and_grad(lambda p: jnp.mean((_forward(p, x) - y) ** 2))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    cargs = (args[0], opt.init(args[0]), *args[2:])
    plan = al.plan(clipped, *cargs, mesh=mesh, cluster=CLUSTER, num_stages=2, num_microbatches=4)
    run = plan.compile(clipped)
    assert_steps_equal(run, clipped, cargs, n_state=2, steps=3, atol=1e-4)
    assert not run.update.split


def _forward(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < n - 1:
            x = al.mark_layer(jax.nn.gelu(x))
    return x


def test_parallelize_runs_a_pipeline():
    fn, args = mlp_example(4)
    step = al.parallelize(fn, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=2, num_microbatches=4)
    assert step.get_plan(*args).pipeline is not None
    assert_steps_equal(step, fn, args, n_state=2, steps=2, atol=1e-4)
