"""Flax layers beyond the LM, and NNX / Equinox steps: each planned on the 2x4 Explicit mesh,
run for 2 steps (the second fed the first's outputs) against the unsharded step, with no
primitive left without a sharding rule.

- linen Conv + BatchNorm: the batch statistics are mutable state carried in the TrainState;
- linen ``nn.scan(nn.remat(...))`` of RMSNorm + Dense layers: one scan op (planned from its
  body, not replicated) whose body holds the checkpointed layer;
- NNX: the functional split/merge step, the ``@nnx.jit`` step on modules, an ``nnx.scan`` stack;
- Equinox: ``eqx.partition``/``combine`` with ``eqx.filter_value_and_grad``;
- the three examples as CLI targets.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import alpa_lite as al
from alpa_lite import cli
from examples import equinox_mlp, nnx_mlp
from tests.helpers import assert_steps_equal, make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4), "explicit", names=("data", "model"))


def _no_missing_rules(plan: Any) -> None:
    assert not [w for w in plan.warnings if "no sharding rule" in w], plan.warnings


def _plan_and_check(fn: Any, args: tuple, mesh: Any, n_state: int, atol: float = 1e-4) -> Any:
    plan = al.plan(fn, *args, mesh=mesh)
    _no_missing_rules(plan)
    assert_steps_equal(plan.compile(fn), fn, args, n_state=n_state, atol=atol)
    return plan


# ---- linen: Conv + BatchNorm ------------------------------------------------------------

class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class BNState(TrainState):
    batch_stats: Any


def test_conv_batchnorm_carries_batch_stats(mesh):
    model = CNN()
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    labels = jnp.arange(16) % 10
    variables = model.init(jax.random.key(1), x, train=False)
    state = BNState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1),
                           batch_stats=variables["batch_stats"])

    def step(state, x, labels):
        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                             train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])
        return state, loss

    plan = _plan_and_check(step, (state, x, labels), mesh, n_state=1, atol=1e-5)
    assert "convolution" in plan.op_kinds


# ---- linen: nn.scan over nn.remat layers, RMSNorm ---------------------------------------

class Layer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return x + nn.gelu(nn.Dense(self.width)(nn.RMSNorm()(x))), None


class Stack(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth)
        x, _ = layers(self.width, name="layers")(x, None)
        return nn.Dense(1)(x)


def test_scanned_rematerialised_stack_is_planned_from_its_body(mesh):
    model = Stack(width=32, depth=4)
    x = jax.random.normal(jax.random.key(0), (16, 32))
    y = jax.random.normal(jax.random.key(1), (16, 1))
    state = TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(2), x)["params"],
                              tx=optax.adam(1e-3))

    def step(state, x, y):
        loss, grads = jax.value_and_grad(lambda p: ((state.apply_fn({"params": p}, x) - y) ** 2).mean())(state.params)
        return state.apply_gradients(grads=grads), loss

    plan = _plan_and_check(step, (state, x, y), mesh, n_state=1)
    # forward and backward scans stay loops (one repeated layer each), with the checkpointed
    # layer's ops inside the bodies, not unrolled into the outer program
    assert plan.op_kinds.count("while") == 2
    assert plan.op_kinds.count("dot") < 4 * 3


# ---- NNX ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [nnx_mlp.target, nnx_mlp.module_target], ids=["split-merge", "nnx.jit"])
def test_nnx_steps_run_and_rerun_with_one_plan(mesh, make):
    fn, args = make()
    step = al.parallelize(fn, mesh=mesh)
    n_state = len(args) - 2
    assert_steps_equal(step, fn, args, n_state=n_state, steps=3, atol=1e-4)  # adam
    assert step.num_plans == 1
    _no_missing_rules(step.get_plan(*args))


class ScanMLP(nnx.Module):
    """Identical layers created with nnx.vmap and applied with nnx.scan (NNX's scan-over-layers)."""

    def __init__(self, width: int, depth: int, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(width, width, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, layer: nnx.Linear) -> jax.Array:
            return x + nnx.gelu(layer(x))

        return body(x, self.layers)


def test_nnx_scan_stack(mesh):
    model = ScanMLP(32, 3, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    x, y = nnx_mlp.make_batch(16, 32)

    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(nnx_mlp.loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    plan = _plan_and_check(step, (state, x, y), mesh, n_state=1, atol=1e-5)
    assert plan.op_kinds.count("while") == 2


# ---- Equinox ------------------------------------------------------------------------------

def test_equinox_step_runs_and_reruns_with_one_plan(mesh):
    fn, args = equinox_mlp.make_example(width=64)
    step = al.parallelize(fn, mesh=mesh)
    assert_steps_equal(step, fn, args, n_state=2, steps=3, atol=1e-4)  # adam
    assert step.num_plans == 1
    _no_missing_rules(step.get_plan(*args))


def test_an_equinox_model_passed_whole_is_refused_with_what_to_do(mesh):
    model = eqx.nn.MLP(4, 4, 8, 1, key=jax.random.key(0))
    with pytest.raises(al.PlanningError, match=r"eqx\.partition\(model, eqx\.is_array\)"):
        al.plan(lambda m, x: jax.vmap(m)(x), model, jnp.ones((8, 4)), mesh=mesh)


# ---- the examples as CLI targets ----------------------------------------------------------

@pytest.mark.parametrize("target", ["examples.flax_lm:target", "examples.nnx_mlp:module_target",
                                    "examples.equinox_mlp:target"])
def test_examples_plan_from_the_cli(target, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["plan", target, "--mesh", "2x4"])
    out = capsys.readouterr().out
    assert stop.value.code == 0, out
    assert "method auto" in out and "no sharding rule" not in out
    assert np.isfinite(float(out.split("objective")[1].split()[0]))
