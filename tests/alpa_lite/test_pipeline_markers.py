"""``al.value_and_grad`` / ``al.grad`` / ``al.mark_layer``: drop-ins that compute what jax's
compute (eagerly, under jit, vmap and jvp), and what the planner reads from them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_lite as al
from alpa_lite.pipeline.program import cut_layers, layer_starts, split_step
from alpa_lite.tracing.markers import mark_layer_p, value_and_grad_p
from tests.alpa_lite.test_pipeline_numerics import mlp_example
from tests.helpers import assert_steps_equal, make_mesh


def loss(p, x, y):
    h = al.mark_layer(jnp.tanh(x @ p["w1"]))
    h = al.mark_layer({"h": jnp.sin(h), "n": 3})["h"]  # pytrees; non-array leaves pass through
    return jnp.mean((h @ p["w2"] - y) ** 2)


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 4)
    p = {"w1": jax.random.normal(k[0], (8, 16)), "w2": jax.random.normal(k[1], (16, 4))}
    return p, jax.random.normal(k[2], (32, 8)), jax.random.normal(k[3], (32, 4))


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_value_and_grad_equals_jax(data, wrap):
    close(wrap(al.value_and_grad(loss))(*data), jax.value_and_grad(loss)(*data))
    close(wrap(al.grad(loss, argnums=(0, 1)))(*data), jax.grad(loss, argnums=(0, 1))(*data))


def test_has_aux_static_args_and_closures(data):
    p, x, y = data

    def with_aux(p, x, y, scale):  # a Python number stays static, as with jax.value_and_grad
        return loss(p, x * scale, y), {"s": jnp.sum(x) * scale}

    got = jax.jit(lambda p, x, y: al.value_and_grad(with_aux, has_aux=True)(p, x, y, 2))(p, x, y)
    close(got, jax.value_and_grad(with_aux, has_aux=True)(p, x, y, 2))

    @jax.jit
    def closes_over_a_tracer(p, s):
        return al.value_and_grad(lambda q: loss(q, x * s, y))(p)

    close(closes_over_a_tracer(p, 2.0), jax.value_and_grad(lambda q: loss(q, x * 2.0, y))(p))


def test_composes_with_jvp_and_vmap(data):
    p, x, y = data
    got = jax.jvp(lambda q: al.grad(loss)(q, x, y), (p,), (p,))
    close(got, jax.jvp(lambda q: jax.grad(loss)(q, x, y), (p,), (p,)), 1e-4)
    xs = jnp.stack([x, 2 * x])
    close(jax.vmap(lambda xx: al.value_and_grad(loss)(p, xx, y))(xs),
          jax.vmap(lambda xx: jax.value_and_grad(loss)(p, xx, y))(xs))


def test_mark_layer_is_identity_under_grad_jit_vmap(data):
    p, x, y = data
    f = lambda q: jnp.sum(al.mark_layer(jnp.sin(q["w1"])) ** 2)  # noqa: E731
    g = lambda q: jnp.sum(jnp.sin(q["w1"]) ** 2)  # noqa: E731
    close(jax.jit(jax.grad(f))(p), jax.grad(g)(p))
    close(jax.vmap(al.mark_layer)(x), x)
    text = str(jax.make_jaxpr(jax.grad(f))(p))
    assert "backward=True" in text and "backward=False" in text  # the boundary survives grad
    assert "alpa_mark_layer" not in jax.jit(f).lower(p).as_text()  # lowers to nothing


def test_the_equation_carries_the_loss_jaxpr(data):
    jaxpr = jax.make_jaxpr(al.value_and_grad(loss))(*data).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is value_and_grad_p]
    assert eqn.params["diff"] == (True, True, False, False) and eqn.params["num_aux"] == 0
    body = eqn.params["jaxpr"].jaxpr
    assert sum(e.primitive is mark_layer_p for e in body.eqns) == 2
    assert len(body.outvars) == 1  # the loss


def test_tracer_numbers_layers_and_inlines_the_gradient(data):
    g = al.trace(al.value_and_grad(loss), *data)
    assert g.num_layers == 3  # two forward markers; the backward copies do not count
    assert {op.layer for op in g.ops} == {0, 1, 2}
    assert not any(op.primitive in (mark_layer_p, value_and_grad_p) for op in g.ops)


def test_layers_from_markers_and_from_clustering():
    fn, args = mlp_example(4)
    n = len(jax.tree.leaves(args[:2]))  # the state: weights and adam's state
    prog = split_step(fn, args, (), tuple(range(n)), (n, n + 1), 4)
    assert prog is not None and prog.micro.count(True) == 2  # x and y are split, nothing else
    layers = cut_layers(prog.loss, layer_starts(prog.loss, None))
    assert len(layers) == 4
    assert layers[-1].outputs == (prog.loss.loss_var,)
    auto = cut_layers(prog.loss, layer_starts(prog.loss, 3))
    assert len(auto) == 3 and sum(len(lay.eqns) for lay in auto) == len(prog.loss.eqns)


def test_one_stage_plan_of_a_marked_step_equals_unsharded():
    fn, args = mlp_example(2, batch=32, hidden=64)
    plan = al.plan(fn, *args, mesh=make_mesh((8,)), num_stages=1)
    assert plan.pipeline is None and plan.graph.num_layers == 2
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=2, atol=1e-4)
