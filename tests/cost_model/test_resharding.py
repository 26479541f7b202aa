"""Resharding: expected seconds as arithmetic, and predicted wire bytes against compiled XLA.

The XLA checks compile on the 8 CPU devices conftest sets up and read the collectives out of
the compiled text with ``alpa_lite.measure.hlo_stats.parse_collectives``.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import ShardingError
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec, enumerate_specs
from alpa_lite.measure.hlo_stats import parse_collectives
from cost_model.resharding import reshard, reshard_path, resharding_matrix

S = ShardingSpec.parse
MiB = 2**20
T = TensorInfo((1024, 1024), "float32")  # 4 MiB
# dgx-h100, 2 hosts: "device" NVLink (α 5 µs, β 450 GB/s), "host" InfiniBand (10 µs, 50 GB/s).
H100 = ClusterSpec.preset("dgx-h100", num_hosts=2)
# cpu as a 2×4 mesh: every axis α 20 µs, β 2 GB/s; no reduce-scatter.
CPU = ClusterSpec.preset("cpu").with_mesh((2, 4), ("x", "y"))


def _summary(colls):
    return [(c.kind, c.axes, c.nbytes) for c in colls]


# ---- expected seconds, written out ------------------------------------------------------
CASES = [
    # (src, dst, cluster, collectives (kind, axes, result bytes), seconds)
    ("[R,R]|sum(device)", "[R,R]", H100, [("all-reduce", ("device",), 4 * MiB)],
     5e-6 + 2 * 7 / 8 * 4 * MiB / 450e9),
    ("[R,R]|sum(device)", "[device,R]", H100, [("reduce-scatter", ("device",), MiB / 2)],
     5e-6 + 7 * MiB / 2 / 450e9),
    # CPU: the reduce-scatter is an all-reduce of the whole buffer, then a free slice
    ("[R,R]|sum(x)", "[x,R]", CPU, [("all-reduce", ("x",), 4 * MiB)],
     20e-6 + 2 * 1 / 2 * 4 * MiB / 2e9),
    # partial over two axes into a split on the slow one: reduce-scatter across hosts first,
    # then all-reduce the half left over NVLink
    ("[R,R]|sum(host,device)", "[host,R]", H100,
     [("reduce-scatter", ("host",), 2 * MiB), ("all-reduce", ("device",), 2 * MiB)],
     10e-6 + 1 * 2 * MiB / 50e9 + 5e-6 + 2 * 7 / 8 * 2 * MiB / 450e9),
    # on CPU one all-reduce over both axes (same bytes as two, one α)
    ("[R,R]|sum(x,y)", "[x,R]", CPU, [("all-reduce", ("x", "y"), 4 * MiB)],
     20e-6 + 2 * 7 / 8 * 4 * MiB / 2e9),
    # slicing a split the partial tensor lacks comes first: the all-reduce moves a quarter
    ("[R,R]|sum(x)", "[R,y]", CPU, [("all-reduce", ("x",), MiB)],
     20e-6 + 2 * 1 / 2 * MiB / 2e9),
    ("[host,R]", "[R,R]", H100, [("all-gather", ("host",), 4 * MiB)],
     10e-6 + 1 / 2 * 4 * MiB / 50e9),
    # one all-gather over both axes would take 10e-6 + 15/16·4 MiB/50e9 = 89 µs; in turn,
    # NVLink first, is cheaper (61 µs). On CPU, all links alike, one all-gather wins (one α).
    ("[(host,device),R]", "[R,R]", H100,
     [("all-gather", ("device",), 2 * MiB), ("all-gather", ("host",), 4 * MiB)],
     5e-6 + 7 / 8 * 2 * MiB / 450e9 + 10e-6 + 1 / 2 * 4 * MiB / 50e9),
    ("[(x,y),R]", "[R,R]", CPU, [("all-gather", ("x", "y"), 4 * MiB)],
     20e-6 + 7 / 8 * 4 * MiB / 2e9),
    ("[(host,device),R]", "[host,R]", H100, [("all-gather", ("device",), 2 * MiB)],
     5e-6 + 7 / 8 * 2 * MiB / 450e9),
    # two dimensions: the slow host axis gathers the small buffer first
    ("[host,device]", "[R,R]", H100,
     [("all-gather", ("host",), MiB / 2), ("all-gather", ("device",), 4 * MiB)],
     10e-6 + 1 / 2 * MiB / 2 / 50e9 + 5e-6 + 7 / 8 * 4 * MiB / 450e9),
    ("[device,R]", "[R,device]", H100, [("all-to-all", ("device",), MiB / 2)],
     5e-6 + 7 / 8 * MiB / 2 / 450e9),
    ("[(x,y),R]", "[R,(x,y)]", CPU, [("all-to-all", ("x", "y"), MiB / 2)],
     20e-6 + 7 / 8 * MiB / 2 / 2e9),
    ("[x,R]", "[y,R]", CPU, [("collective-permute", ("x", "y"), MiB)], 20e-6 + MiB / 2e9),
    # slice y first, then gather x over a quarter of the tensor
    ("[x,R]", "[R,y]", CPU, [("all-gather", ("x",), MiB)], 20e-6 + 1 / 2 * MiB / 2e9),
    ("[R,R]", "[x,y]", CPU, [], 0.0),
    ("[x,R]", "[(x,y),R]", CPU, [], 0.0),
    ("[(x,y),R]", "[(x,y),R]", CPU, [], 0.0),
]


@pytest.mark.parametrize("src,dst,cluster,colls,seconds", CASES)
def test_expected_seconds(src, dst, cluster, colls, seconds):
    secs, got = reshard(S(src), S(dst), T, cluster)
    assert _summary(got) == colls
    assert secs == pytest.approx(seconds, rel=1e-12, abs=0.0)


def test_cpu_never_reports_reduce_scatter():
    specs = enumerate_specs(T.shape, CPU.axis_sizes)
    for src in ("[R,R]|sum(x)", "[R,R]|sum(y)", "[R,R]|sum(x,y)", "[y,R]|sum(x)"):
        kinds = {c.kind for d in specs for c in reshard(S(src), d, T, CPU)[1]}
        assert "all-reduce" in kinds and "reduce-scatter" not in kinds, src
    # the same tensor on a GPU preset does reduce-scatter
    h100 = ClusterSpec.preset("dgx-h100").with_mesh((2, 4), ("x", "y"))
    kinds = {c.kind for d in specs for c in reshard(S("[R,R]|sum(x,y)"), d, T, h100)[1]}
    assert "reduce-scatter" in kinds


def test_path_names_the_intermediate_specs():
    path = reshard_path(S("[x,R]"), S("[R,y]"), T, CPU)
    assert [str(s.spec) for s in path] == ["[x,y]", "[R,y]"]
    assert path[0].collective is None and path[1].collective.kind == "all-gather"


def test_free_exactly_when_dst_extends_src():
    """Zero cost iff every dimension of dst starts with src's axes (a local slice)."""
    specs = enumerate_specs(T.shape, CPU.axis_sizes)
    for s in specs:
        for d in specs:
            free = all(dd[: len(sd)] == sd for sd, dd in zip(s.dims, d.dims, strict=True))
            secs, colls = reshard(s, d, T, CPU)
            assert (secs == 0.0) == free == (colls == ()), (s, d)


def test_bad_targets_raise():
    with pytest.raises(ShardingError, match="partial"):
        reshard(S("[R,R]|sum(x)"), S("[R,R]|sum(x)"), T, CPU)
    with pytest.raises(ShardingError, match="ranks"):
        reshard(S("[x]"), S("[R]"), T, CPU)


def test_matrix_matches_reshard_and_is_memoised():
    mesh3 = ClusterSpec.preset("dgx-h100", num_hosts=2).with_mesh((2, 2, 4), ("a", "b", "c"))
    t = TensorInfo((8, 128, 1024), "bfloat16")
    specs = enumerate_specs(t.shape, mesh3.axis_sizes)
    # Each of 3 axes splits one of 3 dims or none (4**3), less all three on dim 0 (8 % 16 != 0).
    n = 4**3 - 1
    assert len(specs) == n
    m = resharding_matrix(specs, specs, t, mesh3)
    assert m.shape == (n, n) and not m.flags.writeable
    assert np.all(np.diag(m) == 0) and np.all(m >= 0) and np.count_nonzero(m) > n * 30
    for i, j in [(1, 0), (5, 17), (60, 3), (12, 40)]:
        assert m[i, j] == reshard(specs[i], specs[j], t, mesh3)[0]
    assert resharding_matrix(list(specs), list(specs), t, mesh3) is m


# ---- against what XLA compiles ----------------------------------------------------------
MESHES = {(8,): ("x",), (2, 4): ("x", "y")}


def _mesh(shape):
    return jax.make_mesh(shape, MESHES[shape])


def _compiled(fn, mesh, dst, in_specs, shapes):
    out = NamedSharding(mesh, dst.to_partition_spec())
    jitted = jax.jit(jax.sharding.auto_axes(fn, out_sharding=out),
                     in_shardings=tuple(NamedSharding(mesh, s.to_partition_spec())
                                        for s in in_specs))
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return parse_collectives(jitted.lower(*args).compile().as_text())


def _constrain(*specs):
    def body(x):
        x = x * 2
        for s in specs:
            x = jax.lax.with_sharding_constraint(x, s.to_partition_spec())
        return x
    return body


def _check(pred, compiled, same_kinds=True):
    """Equal wire bytes; with ``same_kinds`` also the same kinds and group sizes (any order:
    gathers of equal cost may come in either order)."""
    assert sum(c.wire_bytes() for c in pred) == sum(c.wire_bytes() for c in compiled)
    if same_kinds:
        assert (collections.Counter((c.kind, c.group_size) for c in pred)
                == collections.Counter((c.kind, c.group_size) for c in compiled))


DIRECT = [
    # (mesh, src, dst, what XLA compiles)
    ((8,), "[x,R]", "[R,R]", "all-gather"),
    ((8,), "[x,R]", "[R,x]", "all-to-all"),
    ((8,), "[R,R]", "[x,R]", "free slice"),
    ((2, 4), "[x,R]", "[R,R]", "all-gather, 1 axis"),
    ((2, 4), "[R,y]", "[R,R]", "all-gather, 1 axis"),
    ((2, 4), "[x,y]", "[R,R]", "all-gather of 2 axes: one per dimension"),
    ((2, 4), "[(x,y),R]", "[R,R]", "all-gather of 2 axes: one over both"),
    ((2, 4), "[(x,y),R]", "[x,R]", "all-gather of the minor axis"),
    ((2, 4), "[y,R]", "[R,y]", "all-to-all"),
    ((2, 4), "[(x,y),R]", "[x,y]", "all-to-all of the minor axis"),
    ((2, 4), "[x,y]", "[(x,y),R]", "all-to-all into a 2-axis dimension"),
    ((2, 4), "[(x,y),R]", "[R,(x,y)]", "all-to-all over both axes"),
    ((2, 4), "[x,R]", "[(x,y),R]", "free slice"),
    ((2, 4), "[R,R]", "[x,y]", "free slice"),
    ((2, 4), "[x,R]", "[y,R]", "collective-permute"),
    ((2, 4), "[x,R]", "[y,x]", "collective-permute"),
    ((2, 4), "[(x,y),R]", "[y,R]", "collective-permute, then all-gather"),
]


@pytest.mark.parametrize("mesh_shape,src,dst,what", DIRECT)
def test_matches_xla(mesh_shape, src, dst, what):
    mesh = _mesh(mesh_shape)
    cluster = ClusterSpec.from_mesh(mesh)
    src, dst = S(src), S(dst)
    t = TensorInfo((1024, 1024), "float32")  # large enough that bytes, not α, pick the path
    _, pred = reshard(src, dst, t, cluster)
    compiled = _compiled(_constrain(dst), mesh, dst, [src], [t.shape])
    _check(pred, compiled)
    assert (pred == ()) == (what == "free slice")


PARTIAL = [
    # (mesh, lhs spec, rhs spec, dst): the dot's result is [lhs row, rhs col]|sum(contracted)
    ((8,), "[R,x]", "[x,R]", "[R,R]"),  # all-reduce
    ((8,), "[R,x]", "[x,R]", "[x,R]"),  # reduce-scatter: all-reduce + slice on CPU
    ((8,), "[R,x]", "[x,R]", "[R,x]"),
    ((2, 4), "[R,(x,y)]", "[(x,y),R]", "[R,R]"),
    ((2, 4), "[R,(x,y)]", "[(x,y),R]", "[x,R]"),  # XLA: 2 all-reduces, same bytes as our 1
    ((2, 4), "[R,(x,y)]", "[(x,y),R]", "[(x,y),R]"),
    ((2, 4), "[y,x]", "[x,R]", "[y,R]"),
    ((2, 4), "[y,x]", "[x,R]", "[(y,x),R]"),
    ((2, 4), "[y,x]", "[x,R]", "[y,x]"),
    ((2, 4), "[R,x]", "[x,R]", "[R,y]"),  # slice first, then all-reduce a quarter
    ((2, 4), "[R,x]", "[x,R]", "[y,R]"),
]


@pytest.mark.parametrize("mesh_shape,lhs,rhs,dst", PARTIAL)
def test_partial_matches_xla(mesh_shape, lhs, rhs, dst):
    mesh = _mesh(mesh_shape)
    cluster = ClusterSpec.from_mesh(mesh)
    lhs, rhs, dst = S(lhs), S(rhs), S(dst)
    src = ShardingSpec((lhs.dims[0], rhs.dims[1]), lhs.dims[1])
    t = TensorInfo((1024, 512), "float32")
    _, pred = reshard(src, dst, t, cluster)
    assert pred and all(c.kind == "all-reduce" for c in pred)  # no reduce-scatter on CPU

    def body(a, b):
        return jax.lax.with_sharding_constraint(a @ b, dst.to_partition_spec())

    compiled = _compiled(body, mesh, dst, [lhs, rhs], [(1024, 256), (256, 512)])
    assert {c.kind for c in compiled} == {"all-reduce"}
    _check(pred, compiled, same_kinds=len(src.partial) == 1)


@pytest.mark.parametrize("shape", [(64, 64), (1024, 1024)])  # α-bound, then bytes-bound
def test_every_path_compiles_as_predicted(shape):
    """On a 2×4 mesh, constraining to each step's spec compiles exactly the predicted bytes."""
    mesh = _mesh((2, 4))
    cluster = ClusterSpec.from_mesh(mesh)
    t = TensorInfo(shape, "float32")
    specs = enumerate_specs(t.shape, cluster.axis_sizes)
    assert len(specs) == 9
    for src in specs:
        for dst in specs:
            path = reshard_path(src, dst, t, cluster)
            if not any(s.collective for s in path):
                continue
            pred = [s.collective for s in path if s.collective]
            compiled = _compiled(_constrain(*(s.spec for s in path)), mesh, dst, [src], [t.shape])
            _check(pred, compiled)
