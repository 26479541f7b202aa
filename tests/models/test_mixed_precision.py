"""Mixed precision: bf16 compute with f32 master weights, costed with the right byte sizes.

A bf16 matmul whose contracting dim is split reduces a bf16 partial sum: on a GPU cluster the
model charges half the bytes of the f32 matmul's reduction. XLA's CPU backend computes
16-bit floats in f32 and its collectives move f32 (``cost_model.context.wire_itemsize``), so on
the CPU devices at hand the prediction is the f32 size, and the compiled program agrees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from alpa_lite.measure.hlo_stats import stats_of
from examples.scan_gpt import GptConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

M, K, N = 64, 8192, 64


def _matmul(dtype):
    def f(x, w):
        return (x.astype(dtype) @ w.astype(dtype)).astype(jnp.float32)

    return f


def _k_split_inputs(mesh):
    """f32 master inputs committed to a split of the contracting dim: the dot is a partial sum.
    (An Auto mesh: on Explicit axes jax refuses to trace a dot over sharded contracting dims.)"""
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((M, K)), jnp.float32), NamedSharding(mesh, P(None, "x")))
    w = jax.device_put(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), NamedSharding(mesh, P("x")))
    return x, w


def _all_reduce_bytes(plan):
    return [c.nbytes for c in plan.collectives if c.kind == "all-reduce"]


def test_bf16_matmul_all_reduce_is_half_on_gpu():
    mesh = make_mesh((8,), "auto")
    gpu = al.ClusterSpec.preset("dgx-h100")
    args = _k_split_inputs(mesh)
    f32 = al.plan(_matmul(jnp.float32), *args, mesh=mesh, cluster=gpu)
    bf16 = al.plan(_matmul(jnp.bfloat16), *args, mesh=mesh, cluster=gpu)
    # One reduction of the partial product (a reduce-scatter: GPUs have it and the output may
    # leave split), the same in both, on half the bytes in bf16.
    f, b = ([(c.kind, c.nbytes) for c in p.collectives] for p in (f32, bf16))
    assert [k for k, _ in f] == [k for k, _ in b] and len(f) == 1, (f, b)
    assert f[0][0] in ("all-reduce", "reduce-scatter")
    assert b[0][1] * 2 == f[0][1]
    assert bf16.predicted_wire_bytes == pytest.approx(f32.predicted_wire_bytes / 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_prediction_matches_compiled(dtype):
    mesh = make_mesh((8,), "auto")
    args = _k_split_inputs(mesh)
    fn = _matmul(dtype)
    plan = al.plan(fn, *args, mesh=mesh)
    assert _all_reduce_bytes(plan) == [M * N * 4]  # the CPU backend reduces bf16 in f32
    compiled = stats_of(plan.compile(fn), *args)
    assert [c.nbytes for c in compiled.collectives] == [M * N * 4]
    assert plan.predicted_wire_bytes == pytest.approx(compiled.wire_bytes)
    np.testing.assert_allclose(np.asarray(plan.compile(fn)(*args)), np.asarray(fn(*args)), rtol=2e-2, atol=0.5)


def test_bf16_gpt_plans_and_runs():
    """A GPT training step with bf16 compute and f32 master weights (adam)."""
    fn, args = make_example(GptConfig(batch=16, seq=32, vocab=512, hidden=128, heads=4, mlp=512, layers=2,
                                      scan=False, dtype=jnp.bfloat16))
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    assert not plan.warnings, plan.warnings
    auto = measure("auto (bf16)", plan, fn, args)
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    # bf16 rounds at different points in the sharded program (another summation order), and
    # adam's first steps move a weight by ±lr whatever its gradient's size: a gradient near 0
    # may flip sign, so weights may differ by up to 2·lr per step (lr = 1e-3).
    assert_steps_equal(auto.step, fn, args, n_state=2, rtol=1e-2, atol=5e-3)
