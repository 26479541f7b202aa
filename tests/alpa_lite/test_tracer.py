"""``alpa_lite.tracing.tracer.trace``: a flat, HLO-named op graph with FLOPs, fixed specs and liveness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.tracing.tracer import trace
from examples.mlp import make_example
from tests.helpers import make_mesh

# Names of the call-like primitives that must never survive as ops (they are inlined).
CALL_KINDS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
              "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}


def kinds(graph) -> list[str]:
    return [op.kind for op in graph.ops]


def ops_of(graph, kind: str) -> list:
    return [op for op in graph.ops if op.kind == kind]


def f32(*shape):
    return jnp.ones(shape, jnp.float32)


# ---- HLO names ---------------------------------------------------------------------------

KIND_TABLE = [
    # fn, args, the HLO op it must contain
    (lambda a, b: a @ b, (f32(4, 8), f32(8, 2)), "dot"),
    (lambda a, b: a + b, (f32(4, 8), f32(4, 8)), "add"),
    (lambda a, b: a - b, (f32(4, 8), f32(4, 8)), "subtract"),
    (lambda a, b: a * b, (f32(4, 8), f32(4, 8)), "multiply"),
    (lambda a: jnp.sum(a, axis=0), (f32(4, 8),), "reduce"),
    (lambda a: jnp.max(a), (f32(4, 8),), "reduce"),
    (lambda a: jnp.broadcast_to(a, (3, 4, 8)), (f32(4, 8),), "broadcast"),
    (lambda a: a.T, (f32(4, 8),), "transpose"),
    (lambda a: a.reshape(32), (f32(4, 8),), "reshape"),
    (lambda a: jnp.exp(a), (f32(4, 8),), "exponential"),
    (lambda a: jnp.tanh(a), (f32(4, 8),), "tanh"),
    (lambda a: a.astype(jnp.bfloat16), (f32(4, 8),), "convert"),
    (lambda a: jnp.where(a > 0, a, 0.0), (f32(4, 8),), "select"),
    (lambda a: jnp.where(a > 0, a, 0.0), (f32(4, 8),), "compare"),
    (lambda a: jnp.concatenate([a, a]), (f32(4, 8),), "concatenate"),
    (lambda a: a[1:3], (f32(4, 8),), "slice"),
    (lambda a: jnp.pad(a, 1), (f32(4, 8),), "pad"),
]


@pytest.mark.parametrize("fn,args,kind", KIND_TABLE)
def test_op_kinds_are_hlo_names(fn, args, kind):
    g = trace(fn, *args)
    assert kind in kinds(g), g.summary()
    assert kinds(g)[: len(args)] == ["parameter"] * len(args)


def test_every_tensor_has_one_producer_in_program_order():
    g = trace(lambda a, b: jnp.sum(jnp.tanh(a @ b) * 2.0), f32(4, 8), f32(8, 2))
    assert all(p >= 0 for p in g.producer)
    for op in g.ops:
        assert all(g.producer[t] < op.index for t in op.operands)
        assert all(g.producer[t] == op.index for t in op.outputs)
    assert [op.index for op in g.ops] == list(range(len(g.ops)))


# ---- inlining ----------------------------------------------------------------------------

@jax.jit
def _inner(a, b):
    return jnp.tanh(a @ b)


@jax.jit
def _outer(a, b):
    return _inner(a, b) + 1.0


@jax.custom_vjp
def _scaled_sin(x):
    return jnp.sin(x) * 2.0


def _scaled_sin_fwd(x):
    return _scaled_sin(x), jnp.cos(x)


def _scaled_sin_bwd(cos_x, g):
    return (g * cos_x * 2.0,)


_scaled_sin.defvjp(_scaled_sin_fwd, _scaled_sin_bwd)


INLINE_TABLE = [
    # name, fn, args, kinds that must appear, count of dots
    # (jax.nn.gelu is plain jnp code, not a custom_jvp: it is here as a control.)
    ("nested jit", lambda a, b: _outer(a, b) * 3.0, (f32(4, 8), f32(8, 2)),
     {"dot", "tanh", "add", "multiply"}, 1),
    ("custom_jvp relu", lambda a, b: jnp.sum(jax.nn.relu(a @ b)), (f32(4, 8), f32(8, 2)),
     {"dot", "maximum", "reduce"}, 1),
    ("custom_jvp relu grad", jax.grad(lambda a, b: jnp.sum(jax.nn.relu(a @ b))),
     (f32(4, 8), f32(8, 2)), {"dot", "select"}, 2),
    ("gelu", lambda a: jax.nn.gelu(a), (f32(4, 8),), {"tanh", "multiply"}, 0),
    ("custom_vjp", lambda a: jnp.sum(_scaled_sin(a)), (f32(4, 8),), {"multiply", "reduce"}, 0),
    ("custom_vjp grad", jax.grad(lambda a: jnp.sum(_scaled_sin(a))), (f32(4, 8),),
     {"multiply"}, 0),
    # the recomputation inside the remat and the input-gradient dot; the forward dot is dead
    # code (grad needs no primal value; jax's lowering drops it, so the tracer does too)
    ("remat grad", jax.grad(lambda a, b: jnp.sum(jax.checkpoint(lambda u: jnp.tanh(u @ b))(a))),
     (f32(4, 8), f32(8, 2)), {"dot", "tanh"}, 1 + 1),
]


@pytest.mark.parametrize("name,fn,args,must,dots", INLINE_TABLE, ids=[r[0] for r in INLINE_TABLE])
def test_calls_are_inlined(name, fn, args, must, dots):
    g = trace(fn, *args)
    ks = set(kinds(g))
    assert not ks & CALL_KINDS, (name, ks & CALL_KINDS)
    assert must <= ks, (name, must - ks)
    assert len(ops_of(g, "dot")) == dots
    jaxpr_prims = {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}
    assert bool(jaxpr_prims & CALL_KINDS) == (name != "gelu"), (name, jaxpr_prims)


def test_custom_vjp_grad_runs_the_user_backward():
    """Under grad the custom rule's cotangent (g · cos x · 2) is traced, not sin's own."""
    g = trace(jax.grad(lambda a: jnp.sum(_scaled_sin(a))), f32(4, 8))
    ks = kinds(g)
    assert "cos" in ks or "cosine" in ks, g.summary()


def test_remat_recomputes_the_forward():
    """checkpoint's body is inlined twice under value_and_grad: the forward and its
    recomputation (under grad alone the forward is dead code, and dropped)."""
    fn = jax.value_and_grad(lambda a, b: jnp.sum(jax.checkpoint(lambda u: jnp.tanh(u @ b))(a)))
    g = trace(fn, f32(4, 8), f32(8, 2))
    assert len(ops_of(g, "tanh")) == 2


# ---- FLOPs -------------------------------------------------------------------------------

FLOPS_TABLE = [
    # fn, args, kind, FLOPs of that op
    (lambda a, b: a @ b, (f32(16, 32), f32(32, 8)), "dot", 2 * 16 * 8 * 32),
    (lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (f32(3, 4, 5), f32(3, 5, 6)), "dot",
     2 * 3 * 4 * 6 * 5),
    (lambda a, b: a + b, (f32(16, 32), f32(16, 32)), "add", 16 * 32),
    (lambda a: jnp.tanh(a), (f32(7, 3),), "tanh", 7 * 3),
    (lambda a: jnp.sum(a, axis=1), (f32(16, 32),), "reduce", 16 * 32),
    (lambda a: a.T, (f32(16, 32),), "transpose", 0),
]


@pytest.mark.parametrize("fn,args,kind,flops", FLOPS_TABLE)
def test_flops(fn, args, kind, flops):
    (op,) = ops_of(trace(fn, *args), kind)
    assert op.flops == flops


def test_tensor_infos():
    g = trace(lambda a, b: (a @ b).astype(jnp.bfloat16), f32(4, 8), f32(8, 2))
    (dot,) = ops_of(g, "dot")
    out = g.tensors[dot.outputs[0]]
    assert out.shape == (4, 2) and out.dtype == "float32" and out.nbytes == 4 * 2 * 4
    (cvt,) = ops_of(g, "convert")
    assert g.tensors[cvt.outputs[0]].dtype == "bfloat16"
    assert g.tensors[cvt.outputs[0]].nbytes == 4 * 2 * 2


# ---- a training step ---------------------------------------------------------------------

def test_adam_training_step_over_a_pytree():
    fn, args = make_example(batch=8, hidden=16, layers=2, dim=4, optimizer="adam")
    g = trace(fn, *args)
    out = jax.eval_shape(fn, *args)
    assert len(g.inputs) == len(jax.tree.leaves(args))
    assert len(g.outputs) == len(jax.tree.leaves(out))
    assert jax.tree.structure(out) == g.out_tree
    for t, leaf in zip(g.inputs, jax.tree.leaves(args), strict=True):
        assert g.tensors[t].shape == np.shape(leaf)
    for t, leaf in zip(g.outputs, jax.tree.leaves(out), strict=True):
        assert g.tensors[t].shape == leaf.shape
    # 2 layers: 2 forward dots + 2 weight-gradient dots + 1 input-gradient dot.
    assert len(ops_of(g, "dot")) == 2 + 2 + 1
    assert not set(kinds(g)) & CALL_KINDS


def test_cross_entropy_gives_gather_and_scatter_under_grad():
    def loss(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    logits, labels = f32(8, 10), jnp.zeros((8,), jnp.int32)
    assert "gather" in kinds(trace(loss, logits, labels))
    assert "scatter" not in kinds(trace(loss, logits, labels))
    assert {"gather", "scatter"} <= set(kinds(trace(jax.grad(loss), logits, labels)))


# ---- fixed specs -------------------------------------------------------------------------

def _constrained_body(a):
    return lax.with_sharding_constraint(a * 2.0, P("y", "x")) + 1.0


def _constrained_value(g) -> int:
    """The tensor the with_sharding_constraint produced."""
    (op,) = [op for op in g.ops if op.kind == "custom-call"]
    return op.outputs[0]


# Inputs are made outside ``jax.set_mesh``: arrays created under it are committed (replicated)
# to the mesh, which the tracer then records as fixed.
def test_sharding_constraint_under_auto_axes_is_fixed():
    mesh, x = make_mesh((2, 4), "explicit"), f32(8, 16)

    def fn(a):
        return jax.sharding.auto_axes(_constrained_body, out_sharding=P())(a)

    with jax.set_mesh(mesh):
        g = trace(fn, x)
    t = _constrained_value(g)
    # auto_axes reshards its input onto Auto axes (no layout stated: not fixed) and its result
    # onto the Explicit out_sharding P() (replicated: fixed, as the user asked)
    (out_reshard,) = [op.outputs[0] for op in g.ops if op.kind == "reshard" and op.outputs[0] in g.fixed]
    assert g.fixed == {t: ShardingSpec.parse("[y,x]"), out_reshard: ShardingSpec.parse("[R,R]")}


def test_sharding_constraint_on_auto_mesh_is_fixed():
    x = f32(8, 16)
    with jax.set_mesh(make_mesh((2, 4), "auto")):
        g = trace(_constrained_body, x)
    assert g.fixed == {_constrained_value(g): ShardingSpec.parse("[y,x]")}


def test_sharding_constraint_with_named_sharding_is_fixed():
    mesh = make_mesh((8,), "auto")
    g = trace(lambda a: lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, "x"))),
              f32(8, 16))
    assert list(g.fixed.values()) == [ShardingSpec.parse("[R,x]")]


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_committed_input_is_fixed(axis_type):
    mesh = make_mesh((8,), axis_type)
    x = jax.device_put(f32(8, 16), NamedSharding(mesh, P("x")))
    y = f32(8, 16)  # uncommitted: free
    g = trace(lambda a, b: a * b, x, y)
    assert g.fixed == {g.inputs[0]: ShardingSpec.parse("[x,R]")}


def test_unconstrained_program_has_nothing_fixed():
    assert trace(lambda a: a * 2.0, f32(8, 16)).fixed == {}


# ---- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(), (3,), ("text",)])
def test_no_array_inputs_is_planning_error(args):
    with pytest.raises(PlanningError):
        trace(lambda *a: jnp.ones(3), *args, static_argnums=tuple(range(len(args))))


def test_no_array_inputs_message_says_what_to_do():
    with pytest.raises(PlanningError, match="no array inputs"):
        trace(lambda: jnp.ones(3))


def test_non_array_leaf_is_planning_error():
    with pytest.raises(PlanningError, match="static_argnums"):
        trace(lambda a, s: a, f32(2), "text")


@pytest.mark.parametrize("static", [(1,), (-1,)])
def test_static_argnums(static):
    g = trace(lambda a, n: a * n, f32(4, 8), 3, static_argnums=static)
    assert len(g.inputs) == 1
    assert g.tensors[g.inputs[0]].shape == (4, 8)
    (mul,) = ops_of(g, "multiply")
    consts = [g.ops[g.producer[t]] for t in mul.operands if g.ops[g.producer[t]].kind == "constant"]
    assert [float(np.asarray(c.params["value"])) for c in consts] == [3.0]


def test_static_arg_changes_the_program():
    def fn(a, n):
        for _ in range(n):
            a = jnp.tanh(a)
        return a

    assert len(ops_of(trace(fn, f32(4), 3, static_argnums=(1,)), "tanh")) == 3
    assert len(ops_of(trace(fn, f32(4), 5, static_argnums=(1,)), "tanh")) == 5


# ---- liveness ----------------------------------------------------------------------------

def test_liveness_on_a_chain():
    """a → b = a·w → c = tanh(b) → d = c + a: a lives until d, b dies at c."""
    g = trace(lambda a, w: jnp.tanh(a * w) + a, f32(4), f32(4))
    assert kinds(g) == ["parameter", "parameter", "multiply", "tanh", "add"]
    a, w = g.inputs
    (mul,), (tanh,), (add,) = ops_of(g, "multiply"), ops_of(g, "tanh"), ops_of(g, "add")
    b, c, d = mul.outputs[0], tanh.outputs[0], add.outputs[0]
    end = len(g.ops)
    assert g.last_use[a] == add.index
    assert g.last_use[w] == mul.index
    assert g.last_use[b] == tanh.index
    assert g.last_use[c] == add.index
    assert g.last_use[d] == end  # an output lives to the end
    assert g.outputs == (d,)
    assert list(g.live_at(mul.index)) == [a, w, b]
    assert list(g.live_at(tanh.index)) == [a, b, c]
    assert list(g.live_at(add.index)) == [a, c, d]
    assert g.consumers[a] == (mul.index, add.index)


def test_unused_input_dies_at_its_parameter():
    g = trace(lambda a, unused: a * 2.0, f32(4), f32(4))
    u = g.inputs[1]
    assert g.last_use[u] == g.producer[u]
    assert u not in set(g.live_at(len(g.ops) - 1))
