"""Core strategy rules through the builder: dot_general (``rules/dot.py``), element-wise
(``rules/pointwise.py``), broadcast_in_dim, transpose and reductions (``rules/shape.py``), the
fallback for a primitive with no rule, and user-fixed specs that cannot be met.

Strategy counts are counted by hand: for a matmul, each mesh axis replicates or splits one of
m, n, k (the split must divide the loop's size, and two axes on one loop need their product).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import ShardingError
from alpa_lite.ir.specs import ShardingSpec, enumerate_specs
from alpa_lite.tracing.tracer import trace
from cost_model import registry
from cost_model.builder import build_strategies
from tests.helpers import make_mesh

MESHES = {"8": ((8,), ("x",)), "2x4": ((2, 4), ("x", "y"))}
S = ShardingSpec.parse


def cluster(mesh: str) -> ClusterSpec:
    return ClusterSpec.preset("cpu").with_mesh(*MESHES[mesh])


def strategies(fn, *args, kind: str, mesh: str = "8", index: int = 0):
    """The strategies of the ``index``-th op of ``kind`` in ``trace(fn, *args)``."""
    graph = trace(fn, *args)
    sg = build_strategies(graph, cluster(mesh))
    ops = [op.index for op in graph.ops if op.kind == kind]
    assert ops, f"no {kind!r} op in {graph.summary()}"
    return sg.strategies[ops[index]]


def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def by_io(strats) -> dict[tuple[str, ...], str]:
    """(operand specs..., output spec) → strategy name, as strings."""
    return {(*map(str, s.in_specs), str(s.out_spec)): s.name for s in strats}


# ---- dot_general -------------------------------------------------------------------------

MATMUL_COUNTS = [
    # (M, K, N), mesh, strategy count
    # {'x': 8}: R plus each of m, n, k that 8 divides.
    ((64, 64, 64), "8", 1 + 3),
    ((8, 16, 4), "8", 1 + 2),  # n = 4 is too small
    ((4, 6, 2), "8", 1),
    # {'x': 2, 'y': 4}: (1 + x's loops) · (1 + y's loops), less the pairs on one loop that
    # 2 · 4 = 8 does not divide.
    ((64, 64, 64), "2x4", (1 + 3) * (1 + 3)),
    ((8, 16, 4), "2x4", (1 + 3) * (1 + 3) - 1),  # x and y both on n: 4 % 8
    ((4, 6, 2), "2x4", (1 + 3) * (1 + 1) - 1),  # y only on m (4); x and y both on m: 4 % 8
    ((2, 2, 2), "2x4", (1 + 3) * 1),  # y (4) splits nothing
    ((3, 5, 7), "2x4", 1),
]


@pytest.mark.parametrize("mkn,mesh,count", MATMUL_COUNTS)
def test_matmul_strategy_count(mkn, mesh, count):
    m, k, n = mkn
    strats = strategies(jnp.matmul, f32(m, k), f32(k, n), kind="dot", mesh=mesh)
    assert len(strats) == count
    assert len({(s.in_specs, s.out_spec) for s in strats}) == count  # all distinct


def test_matmul_strategies_on_one_axis():
    strats = strategies(jnp.matmul, f32(64, 32), f32(32, 16), kind="dot")
    assert by_io(strats) == {
        ("[R,R]", "[R,R]", "[R,R]"): "R",
        ("[x,R]", "[R,R]", "[x,R]"): "x=m",
        ("[R,R]", "[R,x]", "[R,x]"): "x=n",
        ("[R,x]", "[x,R]", "[R,R]|sum(x)"): "x=k",
    }


@pytest.mark.parametrize("mesh", ["8", "2x4"])
def test_k_split_output_is_partial_over_its_axes(mesh):
    strats = strategies(jnp.matmul, f32(64, 64), f32(64, 64), kind="dot", mesh=mesh)
    for s in strats:
        lhs, rhs = s.in_specs
        k_axes = lhs.dims[1]
        assert rhs.dims[0] == k_axes  # both operands split k alike
        assert s.out_spec.partial == k_axes, str(s)
        assert s.out_spec.dims == (lhs.dims[0], rhs.dims[1]), str(s)
        assert not lhs.is_partial and not rhs.is_partial
    assert sum(s.out_spec.is_partial for s in strats) == (
        1 if mesh == "8" else 16 - 3 * 3)  # 2x4: some axis on k: all − (neither on k)


def test_k_split_on_both_axes():
    strats = strategies(jnp.matmul, f32(64, 64), f32(64, 64), kind="dot", mesh="2x4")
    io = by_io(strats)
    assert io[("[R,(x,y)]", "[(x,y),R]", "[R,R]|sum(x,y)")] == "x=k,y=k"
    assert io[("[x,y]", "[y,R]", "[x,R]|sum(y)")] == "x=m,y=k"


def test_batch_matmul_has_batch_splits():
    strats = strategies(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), f32(8, 8, 8),
                        f32(8, 8, 8), kind="dot")
    io = by_io(strats)
    assert len(strats) == 1 + 4  # R, b, m (i), n (k), k (j)
    assert ("[x,R,R]", "[x,R,R]", "[x,R,R]") in io
    assert ("[R,R,x]", "[R,x,R]", "[R,R,R]|sum(x)") in io


def test_batch_matmul_count_on_2x4():
    strats = strategies(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), f32(8, 8, 8),
                        f32(8, 8, 8), kind="dot", mesh="2x4")
    assert len(strats) == (1 + 4) * (1 + 4)  # every loop is 8: any pair divides
    io = by_io(strats)
    assert ("[(x,y),R,R]", "[(x,y),R,R]", "[(x,y),R,R]") in io
    assert ("[x,y,R]", "[x,R,R]", "[x,y,R]") in io


@pytest.mark.parametrize("mesh", ["8", "2x4"])
def test_roofline_fully_split_matmul_is_eight_times_faster(mesh):
    """4096³ in f32 is compute-bound on the cpu preset: 2·4096³ FLOPs / 20 GFLOP/s ≈ 6.9 s
    against 3 · 64 MiB / 10 GB/s ≈ 0.02 s of memory traffic."""
    n = 4096
    strats = strategies(jnp.matmul, f32(n, n), f32(n, n), kind="dot", mesh=mesh)
    dev = cluster(mesh).device
    (rep,) = [s for s in strats if s.name == "R"]
    assert rep.compute_s == pytest.approx(2 * n**3 / (dev.peak_flops * dev.efficiency))
    assert rep.comm_s == 0
    full = [s for s in strats
            if s.out_spec.shard_factor(cluster(mesh).axis_sizes)
            * cluster(mesh).group_size(s.out_spec.partial) == 8]
    assert len(full) == (3 if mesh == "8" else 3 * 3)
    for s in full:
        assert s.compute_s == pytest.approx(rep.compute_s / 8), s.name


def test_matmul_memory_is_the_local_output():
    strats = strategies(jnp.matmul, f32(64, 32), f32(32, 16), kind="dot")
    mem = {s.name: s.memory_bytes for s in strats}
    assert mem == {"R": 64 * 16 * 4, "x=m": 64 // 8 * 16 * 4, "x=n": 64 * 16 // 8 * 4,
                   "x=k": 64 * 16 * 4}  # a partial sum is full size on every device


# ---- element-wise ------------------------------------------------------------------------

@pytest.mark.parametrize("mesh", ["8", "2x4"])
def test_elementwise_operands_follow_the_output(mesh):
    strats = strategies(lambda a, b: a + b, f32(8, 16), f32(8, 16), kind="add", mesh=mesh)
    outs = [s.out_spec for s in strats]
    assert outs == enumerate_specs((8, 16), cluster(mesh).axis_sizes)
    for s in strats:
        assert s.in_specs == (s.out_spec, s.out_spec)
        assert not s.out_spec.is_partial and s.comm_s == 0 and not s.collectives


def test_elementwise_scalar_operand_stays_replicated():
    strats = strategies(lambda a, c: a * c, f32(8, 16), f32(), kind="multiply")
    assert len(strats) == 3  # [R,R], [x,R], [R,x]
    for s in strats:
        assert s.in_specs == (s.out_spec, ShardingSpec.replicated(0))


def test_elementwise_compute_is_split():
    strats = strategies(jnp.tanh, f32(1024, 1024), kind="tanh")
    t = {str(s.out_spec): s for s in strats}
    dev = cluster("8").device
    # Fused into its neighbours' kernels (no HBM pass of its own): 1 FLOP per element.
    peak = dev.peak_flops * dev.efficiency
    assert t["[R,R]"].compute_s == pytest.approx(1024 * 1024 / peak)
    assert t["[x,R]"].compute_s == pytest.approx(t["[R,R]"].compute_s / 8)


# ---- broadcast / transpose ---------------------------------------------------------------

def test_broadcast_operand_follows_broadcast_dimensions():
    strats = strategies(lambda a: lax.broadcast_in_dim(a, (8, 4, 16), (0, 2)), f32(8, 16),
                        kind="broadcast", mesh="2x4")
    io = {str(s.out_spec): str(s.in_specs[0]) for s in strats}
    assert len(io) == len(enumerate_specs((8, 4, 16), {"x": 2, "y": 4}))
    assert io["[x,R,y]"] == "[x,y]"  # out dims 0, 2 are operand dims 0, 1
    assert io["[y,x,R]"] == "[y,R]"  # out dim 1 is new: the operand is not split there
    assert io["[R,y,R]"] == "[R,R]"
    assert io["[R,R,(x,y)]"] == "[R,(x,y)]"
    for s in strats:
        want = ShardingSpec((s.out_spec.dims[0], s.out_spec.dims[2]))
        assert s.in_specs[0] == want


def test_broadcast_of_size_one_dim_is_replicated_there():
    strats = strategies(lambda a: jnp.broadcast_to(a, (8, 16)), f32(8, 1), kind="broadcast")
    io = {str(s.out_spec): str(s.in_specs[0]) for s in strats}
    assert io == {"[R,R]": "[R,R]", "[x,R]": "[x,R]", "[R,x]": "[R,R]"}


TRANSPOSE_TABLE = [
    # operand shape, permutation, operand spec → output spec
    ((8, 16), (1, 0), "[x,y]", "[y,x]"),
    ((8, 16), (1, 0), "[(x,y),R]", "[R,(x,y)]"),
    ((8, 4, 16), (2, 0, 1), "[x,y,R]", "[R,x,y]"),
    ((8, 4, 16), (1, 2, 0), "[x,y,R]", "[y,R,x]"),
]


@pytest.mark.parametrize("shape,perm,src,dst", TRANSPOSE_TABLE)
def test_transpose_permutes_specs(shape, perm, src, dst):
    strats = strategies(lambda a: jnp.transpose(a, perm), f32(*shape), kind="transpose",
                        mesh="2x4")
    io = {str(s.in_specs[0]): str(s.out_spec) for s in strats}
    assert len(io) == len(enumerate_specs(shape, {"x": 2, "y": 4}))
    assert io[src] == dst
    for s in strats:
        assert s.out_spec.dims == tuple(s.in_specs[0].dims[p] for p in perm)


# ---- reductions --------------------------------------------------------------------------

def test_reduce_sum_split_reduced_dim_is_partial():
    strats = strategies(lambda a: jnp.sum(a, axis=1), f32(8, 16), kind="reduce")
    io = {str(s.in_specs[0]): s for s in strats}
    assert str(io["[R,R]"].out_spec) == "[R]"
    assert str(io["[x,R]"].out_spec) == "[x]"  # a kept dim stays split
    assert str(io["[R,x]"].out_spec) == "[R]|sum(x)"  # the reduced dim: a partial sum
    assert all(not s.collectives and s.comm_s == 0 for s in strats)


def test_reduce_sum_to_scalar_on_2x4():
    strats = strategies(jnp.sum, f32(8, 16), kind="reduce", mesh="2x4")
    io = {str(s.in_specs[0]): str(s.out_spec) for s in strats}
    assert io["[x,y]"] == "[]|sum(x,y)"
    assert io["[y,x]"] == "[]|sum(x,y)"  # partial axes listed in mesh order
    assert io["[R,y]"] == "[]|sum(y)"
    assert io["[R,R]"] == "[]"


@pytest.mark.parametrize("reducer", [jnp.max, jnp.min])
def test_reduce_max_split_reduced_dim_carries_an_all_reduce(reducer):
    strats = strategies(lambda a: reducer(a, axis=1), f32(8, 16), kind="reduce")
    io = {str(s.in_specs[0]): s for s in strats}
    for s in strats:
        assert not s.out_spec.is_partial  # no partial-max spec exists downstream
    assert str(io["[R,x]"].out_spec) == "[R]"
    (c,) = io["[R,x]"].collectives
    assert (c.kind, c.axes, c.group_size, c.nbytes) == ("all-reduce", ("x",), 8, 8 * 4)
    assert io["[R,x]"].comm_s > 0
    for spec in ("[R,R]", "[x,R]"):
        assert io[spec].collectives == () and io[spec].comm_s == 0
    assert str(io["[x,R]"].out_spec) == "[x]"
    # A split reduced dim still divides the work.
    assert io["[R,x]"].compute_s < io["[R,R]"].compute_s


# ---- no rule -----------------------------------------------------------------------------

NO_RULE = [
    ("cholesky", lambda a: jnp.linalg.cholesky(a), jax.ShapeDtypeStruct((8, 8), jnp.float32)),
    ("fft", lambda a: jnp.fft.fft(jnp.fft.fft(a)), jax.ShapeDtypeStruct((8, 16), jnp.complex64)),
]


@pytest.mark.parametrize("name,fn,arg", NO_RULE, ids=[r[0] for r in NO_RULE])
def test_primitive_without_rule_is_unconstrained_and_warned_once(name, fn, arg, caplog,
                                                                   monkeypatch):
    monkeypatch.setattr(registry, "_WARNED", set())  # the warning is once per process
    graph = trace(fn, arg)
    with caplog.at_level(logging.WARNING, logger="alpa_lite.cost_model"):
        sg = build_strategies(graph, cluster("2x4"))
    ops = [op.index for op in graph.ops if op.kind == name]
    assert ops
    for v in ops:
        (s,) = sg.strategies[v]
        assert s.name == "unconstrained"
        assert s.out_spec == ShardingSpec.replicated(graph.tensors[graph.ops[v].outputs[0]].rank)
        assert all(not spec.axes_used() for spec in s.in_specs)
    assert sg.unconstrained == frozenset(ops)
    assert sg.missing_rules == (name,)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]


def test_neighbours_of_a_missing_rule_keep_their_choices():
    graph = trace(lambda a, b: jnp.linalg.cholesky(a @ b), f32(8, 8), f32(8, 8))
    sg = build_strategies(graph, cluster("8"))
    (dot,) = [op.index for op in graph.ops if op.kind == "dot"]
    # R, m, n, k; the product has several readers, so the k split is also offered reduced.
    assert len(sg.strategies[dot]) == 1 + 3 + 1


def test_partial_sum_read_twice_is_offered_reduced_at_the_op():
    """A k-split product read by two ops: one all-reduce at the dot serves both readers."""
    def f(a, b):
        y = a @ b
        return jnp.sin(y) + jnp.cos(y).T

    graph = trace(f, f32(64, 64), f32(64, 64))
    sg = build_strategies(graph, cluster("8"))
    (dot,) = [op.index for op in graph.ops if op.kind == "dot"]
    strats = sg.strategies[dot]
    reduced = [s for s in strats if s.name.endswith("→reduced")]
    assert [str(s.out_spec) for s in reduced] == ["[R,R]"]
    (c,) = reduced[0].collectives
    assert (c.kind, c.nbytes) == ("all-reduce", 64 * 64 * 4)


# ---- fixed specs -------------------------------------------------------------------------

def test_fixed_spec_filters_strategies():
    mesh = make_mesh((8,), "auto")
    graph = trace(lambda a, b: lax.with_sharding_constraint(a @ b, NamedSharding(mesh, P("x"))),
                  f32(64, 64), f32(64, 64))
    (cc,) = [op for op in graph.ops if op.kind == "custom-call"]
    sg = build_strategies(graph, cluster("8"))
    assert [str(s.out_spec) for s in sg.strategies[cc.index]] == ["[x,R]"]


def test_fixed_spec_not_dividing_raises():
    mesh = make_mesh((8,), "auto")
    graph = trace(lambda a: lax.with_sharding_constraint(a * 2.0, NamedSharding(mesh, P("x"))),
                  f32(6, 16))
    with pytest.raises(ShardingError, match="dimension 0 of size 6"):
        build_strategies(graph, cluster("8"))


def test_fixed_spec_no_strategy_yields_raises():
    """A dot output fixed to (y, x) on one dim: strategies keep mesh order, none gives it."""
    graph = trace(jnp.matmul, f32(64, 64), f32(64, 64))
    (dot,) = [op for op in graph.ops if op.kind == "dot"]
    fixed = dataclasses.replace(graph, fixed={dot.outputs[0]: S("[(y,x),R]")})
    with pytest.raises(ShardingError, match=r"\[\(y,x\),R\]"):
        build_strategies(fixed, cluster("2x4"))


def test_fixed_spec_naming_unknown_axis_raises():
    graph = trace(jnp.matmul, f32(64, 64), f32(64, 64))
    fixed = dataclasses.replace(graph, fixed={graph.inputs[0]: S("[z,R]")})
    with pytest.raises(ShardingError, match="'z'"):
        build_strategies(fixed, cluster("2x4"))
