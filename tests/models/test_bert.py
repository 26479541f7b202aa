"""A 2-layer BERT-style encoder training step (adam) planned on 8 CPU devices.

Small batch, large hidden on a 1-D mesh: Megatron (QKV and MLP-in kernels split by column,
attention-out and MLP-out kernels by row). Large batch, small hidden: data parallel. Modelled
cost no more than the baseline's, and (slow: a compile each) compiled wire bytes no more than
its. Every plan runs equal to the unsharded step over 2 steps; prediction beside the compiled
program is printed and asserted.
"""

from __future__ import annotations

import functools

import pytest
from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from examples.bert import BertConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

TP = BertConfig(batch=8, seq=32, hidden=512, heads=8, mlp=2048, layers=2)
DP = BertConfig(batch=256, seq=16, hidden=64, heads=4, mlp=256, layers=2)
COLUMN, ROW = P(None, "x"), P("x")


def _kernels(plan):
    return [{k: layer[k] for k in ("qkv", "out", "mlp_in", "mlp_out")} for layer in plan.in_specs[0].values()]


@functools.cache
def planned(config: BertConfig, axis_type: str = "explicit"):
    """``config`` planned on 8 devices and its compiled plan measured, once per module (shared by
    a default test and the slow comparison with a baseline's compiled program)."""
    fn, args = make_example(config)
    mesh = make_mesh((8,), axis_type)
    plan = al.plan(fn, *args, mesh=mesh)
    return fn, args, mesh, plan, measure("auto", plan, fn, args)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_small_batch_large_hidden_is_megatron(axis_type):
    fn, args, mesh, plan, auto = planned(TP, axis_type)
    assert plan.solver.status == "OPTIMAL"
    assert not plan.warnings, plan.warnings
    for layer in _kernels(plan):
        assert layer == {"qkv": COLUMN, "out": ROW, "mlp_in": COLUMN, "mlp_out": ROW}, layer
    assert plan.in_specs[2] == P() and plan.in_specs[3] == P()  # activations replicated
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    megatron = al.plan(fn, *args, mesh=mesh, method="megatron")
    assert plan.cost.total_s <= megatron.cost.total_s * (1 + 1e-6)
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)


def test_large_batch_small_hidden_is_data_parallel():
    fn, args, mesh, plan, auto = planned(DP)
    assert not plan.warnings, plan.warnings
    for layer in plan.in_specs[0].values():
        assert all(spec == P() for spec in layer.values()), layer
    assert plan.in_specs[2] == P("x") and plan.in_specs[3] == P("x")
    dp = al.plan(fn, *args, mesh=mesh, method="data_parallel")
    assert plan.cost.total_s <= dp.cost.total_s * (1 + 1e-6)
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("config, method", [(TP, "megatron"), (DP, "data_parallel")], ids=["tp", "dp"])
def test_sends_no_more_than_the_baseline_compiled(config, method):
    """The baseline compiled too (a compile): its predictions hold, and the auto plan's compiled
    program sends no more wire bytes than the hand strategy it rediscovers."""
    fn, args, mesh, _, auto = planned(config)
    base = measure(method, al.plan(fn, *args, mesh=mesh, method=method), fn, args)
    base.assert_predictions()
    assert auto.wire <= base.wire


def test_attention_norm_and_activation_ops_all_have_rules():
    """Softmax (reduce-max, exp, reduce-sum), causal masks (iota, compare, select), layer and
    RMS norm, GELU (tanh and erf), SiLU, residuals, forward and backward: no op is left to XLA."""
    import jax
    import jax.numpy as jnp

    from alpa_lite.tracing.tracer import trace
    from cost_model.builder import build_strategies
    from examples.bert import layer_norm
    from examples.scan_gpt import causal_attention, rms_norm

    def f(w, x):
        q = k = v = (x @ w).reshape(4, 8, 2, 8)
        a = causal_attention(q, k, v).reshape(4, 8, 16)
        h = layer_norm(x + a, jnp.ones(16)) + rms_norm(x, jnp.ones(16))
        h = jax.nn.gelu(h, approximate=False) + jax.nn.gelu(h) + jax.nn.silu(h) + jax.nn.relu(h)
        return jnp.mean(jax.nn.log_softmax(h, axis=-1))

    graph = trace(jax.value_and_grad(f), jnp.ones((16, 16)), jnp.ones((4, 8, 16)))
    sg = build_strategies(graph, al.ClusterSpec.preset("cpu").with_mesh((8,), ("x",)))
    assert sg.missing_rules == () and not sg.unconstrained
