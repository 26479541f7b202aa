"""alpa_lite.measure.hlo_stats: collectives, FLOPs and memory read from compiled XLA programs.

Part (a) feeds literal HLO lines in every replica-group form and of every collective kind;
part (b) compiles real programs on the 8 CPU devices set up by conftest.py.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from alpa_lite.measure.hlo_stats import (
    CompiledCollective,
    CompiledStats,
    compiled_stats,
    extract_warnings,
    parse_collectives,
    shape_nbytes,
    stats_of,
    wire_bytes,
)


def one(line: str, num_devices: int | None = None) -> CompiledCollective:
    (c,) = parse_collectives(line, num_devices=num_devices)
    return c


# --------------------------------------------------------------------------------------------
# (a) literal HLO lines

MESH_DEV_IDS = (
    "  %all-reduce = f32[16,64]{1,0} all-reduce(%ynn_fusion), channel_id=1, "
    "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, "
    'use_global_device_ids=true, to_apply=%add.clone, metadata={op_name="jit(f)/dot_general" '
    "stack_frame_id=3}"
)


def test_mesh_form_with_device_ids():
    c = one(MESH_DEV_IDS)
    assert c.kind == "all-reduce"
    assert c.group_size == 4
    assert c.nbytes == 16 * 64 * 4
    assert c.shape == "f32[16,64]"
    assert c.op_name == "jit(f)/dot_general"
    assert c.wire_bytes() == pytest.approx(2 * 3 / 4 * 16 * 64 * 4)


def test_mesh_form_product_of_listed_axes():
    line = MESH_DEV_IDS.replace("{'axis_0'}", "{'axis_0','axis_2'}")
    assert one(line).group_size == 4 * 2
    line = MESH_DEV_IDS.replace("{'axis_0'}", "{'axis_2'}")
    assert one(line).group_size == 2


def test_mesh_form_real_3axis_line():
    line = (
        "ROOT %all-reduce = f32[16,64]{1,0} all-reduce(%ynn_fusion), channel_id=1, "
        "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) "
        "{'axis_1'}, use_global_device_ids=true, to_apply=%add.clone"
    )
    c = one(line)
    assert (c.group_size, c.nbytes, c.op_name) == (4, 16 * 64 * 4, "")


def test_mesh_form_without_device_ids():
    line = (
        "  ROOT %all-reduce = f32[16,32]{1,0} all-reduce(%ynn_fusion), channel_id=1, "
        "replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, use_global_device_ids=true, "
        'to_apply=%add.clone, metadata={op_name="jit(body)/dot_general" stack_frame_id=5}'
    )
    c = one(line)
    assert (c.group_size, c.nbytes) == (8, 16 * 32 * 4)
    line2 = line.replace("{'axis_1'}", "{'axis_0'}")
    assert one(line2).group_size == 1
    assert one(line2).wire_bytes() == 0.0


def test_mesh_form_sub_axis():
    # Seen on CPU for a (2,4)->(4,2) transpose: a size-2 sub-axis of a size-4 axis.
    line = (
        "  %all-to-all.1 = (f32[1,16,8]{2,1,0}, f32[1,16,8]{2,1,0}) all-to-all(%a, %b), "
        "channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) "
        "{'axis_0':(2)2}, metadata={op_name=\"jit(<lambda>)/mul\" stack_frame_id=3}"
    )
    c = one(line)
    assert c.kind == "all-to-all"
    assert c.group_size == 2
    assert c.nbytes == 2 * (1 * 16 * 8 * 4)
    assert c.op_name == "jit(<lambda>)/mul"


@pytest.mark.parametrize(
    "groups, size",
    [
        ("[2,4]<=[8]", 4),
        ("[4,2]<=[8]", 2),
        ("[2,4]<=[4,2]T(1,0)", 4),
        ("[4,2]<=[2,4]T(1,0)", 2),
        ("[1,8]<=[8]", 8),
    ],
)
def test_iota_form(groups, size):
    line = (
        f"  %all-gather = f32[64,16]{{1,0}} all-gather(%x), channel_id=1, "
        f"replica_groups={groups}, dimensions={{0}}, use_global_device_ids=true"
    )
    c = one(line)
    assert (c.kind, c.group_size, c.nbytes) == ("all-gather", size, 64 * 16 * 4)
    assert c.wire_bytes() == pytest.approx((size - 1) / size * 64 * 16 * 4)


@pytest.mark.parametrize(
    "groups, size",
    [
        ("{{0,1,2,3},{4,5,6,7}}", 4),
        ("{{0,4},{1,5},{2,6},{3,7}}", 2),
        ("{{0,1},{4,5},{2,3},{6,7}}", 2),
        ("{{0,1,2,3,4,5,6,7}}", 8),
        ("{{0},{1},{2},{3},{4},{5},{6},{7}}", 1),
    ],
)
def test_explicit_form(groups, size):
    line = (
        f"  %ar = bf16[8,32]{{1,0}} all-reduce(%x), channel_id=1, replica_groups={groups}, "
        "use_global_device_ids=true, to_apply=%add.clone"
    )
    c = one(line)
    assert (c.group_size, c.nbytes) == (size, 8 * 32 * 2)


def test_empty_groups_mean_all_devices():
    line = "  %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add"
    assert one(line, num_devices=4).group_size == 4
    assert one(line).group_size == 1  # no header, no default given
    module = "HloModule m, is_scheduled=true, num_partitions=8\n\n" + line
    assert one(module, num_devices=4).group_size == 8  # the header wins


def test_reduce_scatter_line():
    line = (
        "  ROOT %reduce_scatter.7 = f32[8,8]{1,0} reduce-scatter(%param.1), channel_id=1, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, dimensions={0}, "
        'to_apply=%region_0.0, metadata={op_name="jit(rsf)/shard_map/reduce_scatter"}'
    )
    c = one(line)
    assert (c.kind, c.group_size, c.nbytes) == ("reduce-scatter", 8, 8 * 8 * 4)
    assert c.wire_bytes() == pytest.approx(7 * 8 * 8 * 4)


def test_all_to_all_tuple_line_with_index_comments():
    shapes = ", ".join(("/*index=5*/" if i == 5 else "") + "f32[8,1,8]{2,1,0}" for i in range(8))
    line = (
        f"  %all-to-all.1 = ({shapes}) all-to-all(%s7, %s6, %s5, %s4, %s3, /*index=5*/%s2, "
        "%s1, %s0), channel_id=1, replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}"
    )
    c = one(line)
    assert c.kind == "all-to-all"
    assert c.nbytes == 8 * (8 * 1 * 8 * 4)
    assert c.group_size == 8
    assert "index" not in c.shape and c.shape.count("f32[8,1,8]") == 8
    assert c.wire_bytes() == pytest.approx(7 / 8 * 8 * 8 * 8 * 4)


def test_collective_permute_line():
    line = (
        "  %collective-permute = f32[1,16]{1,0} collective-permute(%wrapped_slice), "
        "channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}, "
        'metadata={op_name="jit(<lambda>)/jit(_roll_static)/concatenate"}'
    )
    c = one(line)
    assert (c.kind, c.nbytes, c.group_size) == ("collective-permute", 1 * 16 * 4, 4)
    assert c.wire_bytes() == 1 * 16 * 4
    assert c.op_name == "jit(<lambda>)/jit(_roll_static)/concatenate"


def test_tuple_all_reduce_is_one_collective_of_summed_bytes():
    line = (
        "  %all-reduce = (f32[8,16]{1,0}, bf16[8,16]{1,0}, s32[8,16]{1,0}, pred[3]{0}) "
        "all-reduce(%a, %b, %c, %d), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, "
        "use_global_device_ids=true, to_apply=%region_0.0"
    )
    c = one(line)
    assert c.nbytes == 8 * 16 * 4 + 8 * 16 * 2 + 8 * 16 * 4 + 3 * 1
    assert c.shape == "(f32[8,16], bf16[8,16], s32[8,16], pred[3])"


@pytest.mark.parametrize(
    "shape, nbytes",
    [
        ("f32[32,64]{1,0}", 32 * 64 * 4),
        ("bf16[7]", 7 * 2),
        ("f16[2,3]", 2 * 3 * 2),
        ("s32[5]{0}", 5 * 4),
        ("pred[10]", 10),
        ("f64[3]", 3 * 8),
        ("u8[9]", 9),
        ("c64[2]", 2 * 8),
        ("s64[2]", 2 * 8),
        ("f32[]", 4),
        ("s4[3]", 2),  # 12 bits round up to 2 bytes
        ("f32[<=8,4]", 8 * 4 * 4),
        ("(f32[2]{0}, (bf16[4], u32[]))", 2 * 4 + 4 * 2 + 4),
    ],
)
def test_shape_nbytes(shape, nbytes):
    assert shape_nbytes(shape) == nbytes


def test_shape_nbytes_unknown_type_raises():
    with pytest.raises(ValueError, match="zz9"):
        shape_nbytes("zz9[3]")


def test_async_all_reduce_pair_counts_once():
    text = (
        "  %ars = f32[64,32]{1,0} all-reduce-start(%x), channel_id=1, "
        "replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add\n"
        "  %foo = f32[8]{0} add(%a, %b)\n"
        "  %ard = f32[64,32]{1,0} all-reduce-done(%ars)\n"
    )
    (c,) = parse_collectives(text)
    assert (c.kind, c.nbytes, c.group_size) == ("all-reduce", 64 * 32 * 4, 4)


def test_async_all_gather_takes_output_of_start_tuple():
    start = (
        "  %ags = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%p), channel_id=2, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true"
    )
    done = "  %agd = f32[64,32]{1,0} all-gather-done(%ags)"
    (c,) = parse_collectives(start + "\n" + done)
    assert (c.kind, c.nbytes, c.group_size) == ("all-gather", 64 * 32 * 4, 8)
    # without the -done line, the start's tuple still yields the output, not operand+output
    (c2,) = parse_collectives(start)
    assert c2.nbytes == 64 * 32 * 4
    assert c2.shape == "f32[64,32]"


def test_async_collective_permute_ignores_context_scalars():
    start = (
        "  %cps = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%p), "
        "channel_id=3, source_target_pairs={{0,1},{1,0}}"
    )
    done = "  %cpd = f32[16,8]{1,0} collective-permute-done(%cps)"
    for text in (start + "\n" + done, start):
        (c,) = parse_collectives(text)
        assert (c.kind, c.nbytes, c.group_size) == ("collective-permute", 16 * 8 * 4, 2)


def test_non_collective_lines_are_ignored():
    text = "\n".join(
        [
            "  %p = f32[8,32]{1,0} parameter(0), sharding={replicated}",
            "  %all-reduce.3 = f32[8]{0} add(%a, %b)",
            "  ROOT %f = f32[16,32]{1,0} fusion(%all-reduce), kind=kLoop, calls=%fused",
            "  %gte = f32[8,1,8]{2,1,0} get-tuple-element(%all-to-all.1), index=0",
            '  %x = f32[2]{0} copy(%y), metadata={op_name="all-gather(x)"}',
            "",
        ]
    )
    assert parse_collectives(text) == ()


MODULE = """HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[16,32]{1,0})->f32[16,32]{1,0}}, num_partitions=8

%add.clone (x.3: f32[], y.1: f32[]) -> f32[] {
  %x.3 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x.3, %y.1)
}

%weird_reducer (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  %s = f32[] add(%x, %y)
  ROOT %bogus = f32[] all-reduce(%s), replica_groups={}, to_apply=%add.clone
}

%unused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[4]{0} all-gather(%p), replica_groups={}, dimensions={0}
}

%body (t: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %t = (s32[], f32[16,4]{1,0}) parameter(0)
  %ar.2 = f32[16,32]{1,0} all-reduce(%v), channel_id=1, replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, use_global_device_ids=true, to_apply=%weird_reducer
  ROOT %r = (s32[], f32[16,4]{1,0}) tuple(%i, %h)
}

%cond (t: (s32[], f32[16,4])) -> pred[] {
  %t = (s32[], f32[16,4]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (param.2: f32[16,32]) -> f32[16,32] {
  %param.2 = f32[16,32]{1,0} parameter(0), sharding={replicated}
  %while.11 = (s32[], f32[16,4]{1,0}) while(%tuple.14), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %all-gather = f32[16,32]{0,1} all-gather(%c), channel_id=2, replica_groups={}, dimensions={1}, use_global_device_ids=true
  ROOT %out = f32[16,32]{1,0} fusion(%all-gather), kind=kLoop, calls=%fused
}
"""  # noqa: E501


def test_module_walks_entry_and_loop_body_but_not_reducers_or_dead_code():
    cs = parse_collectives(MODULE)
    assert [(c.kind, c.group_size, c.nbytes) for c in cs] == [
        ("all-gather", 8, 16 * 32 * 4),  # entry first; {} -> num_partitions=8
        ("all-reduce", 8, 16 * 32 * 4),  # the while body, reached via body=
    ]


def test_wire_bytes_formulas():
    b, n = 1000, 4
    assert wire_bytes("all-reduce", b, n) == pytest.approx(2 * (n - 1) / n * b)
    assert wire_bytes("all-gather", b, n) == pytest.approx((n - 1) / n * b)
    assert wire_bytes("reduce-scatter", b, n) == pytest.approx((n - 1) * b)
    assert wire_bytes("all-to-all", b, n) == pytest.approx((n - 1) / n * b)
    assert wire_bytes("collective-permute", b, n) == b
    assert wire_bytes("all-reduce", b, 1) == 0.0
    with pytest.raises(ValueError):
        wire_bytes("broadcast", b, n)


def test_compiled_stats_sums_and_by_kind():
    cs = (
        CompiledCollective("all-reduce", 800, 8, "f32[200]"),
        CompiledCollective("all-gather", 400, 4, "f32[100]"),
        CompiledCollective("all-reduce", 80, 2, "f32[20]"),
    )
    st = CompiledStats(cs, 10.0, 100, 60, 40, 0, 0)
    ar = 2 * 7 / 8 * 800 + 2 * 1 / 2 * 80
    ag = 3 / 4 * 400
    assert st.wire_bytes == pytest.approx(ar + ag)
    assert st.by_kind() == {"all-reduce": (2, pytest.approx(ar)), "all-gather": (1, ag)}
    assert "all-reduce x2" in st.summary()


def test_extract_warnings():
    log = (
        "some info line\n"
        "W1125 12:59:12.392572    6959 spmd_partitioner.cc:656] [SPMD] Involuntary full "
        "rematerialization. The compiler cannot go from sharding A to B\n"
        "I1125 12:59:12.4 1 foo.cc:1] just info\n"
        "E1125 12:59:12.5 1 bar.cc:2] an error\n"
    )
    w = extract_warnings(log)
    assert len(w) == 2
    assert "Involuntary full rematerialization" in w[0]
    assert w[1].startswith("E1125")


# --------------------------------------------------------------------------------------------
# (b) real programs on 8 CPU devices


def sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_eight_devices():
    assert jax.device_count() == 8


def test_megatron_mlp_one_all_reduce():
    mesh = jax.make_mesh((8,), ("x",))
    B, D, H, F = 16, 32, 64, 24

    def body(x, w1, w2):
        h = x @ w1
        h = jax.lax.with_sharding_constraint(h, P(None, "x"))
        return jnp.tanh(h) @ w2

    ns = lambda *s: NamedSharding(mesh, P(*s))
    f = jax.jit(
        jax.sharding.auto_axes(body, out_sharding=ns()),
        in_shardings=(ns(), ns(None, "x"), ns("x", None)),
    )
    with jax.set_mesh(mesh):
        compiled = f.lower(sds((B, D)), sds((D, H)), sds((H, F))).compile()
    st = compiled_stats(compiled)
    assert len(st.collectives) == 1
    (c,) = st.collectives
    assert (c.kind, c.group_size, c.nbytes) == ("all-reduce", 8, B * F * 4)
    assert c.shape == f"f32[{B},{F}]"
    assert "dot_general" in c.op_name
    assert st.wire_bytes == pytest.approx(2 * 7 / 8 * B * F * 4)
    assert st.by_kind() == {"all-reduce": (1, pytest.approx(2 * 7 / 8 * B * F * 4))}
    # per device: its slice of both matmuls + the tanh (cost analysis may count extra)
    assert st.flops == compiled.cost_analysis()["flops"]
    assert st.flops >= 2 * B * D * H / 8 + 2 * B * H * F / 8


def test_compiled_stats_memory_and_flops_match_analyses():
    mesh = jax.make_mesh((8,), ("x",))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    f = jax.jit(
        lambda a, b: (jnp.tanh(a @ b), a * 2),
        in_shardings=(ns("x", None), ns()),
        donate_argnums=(0,),
    )
    compiled = f.lower(sds((64, 32)), sds((32, 16))).compile()
    st = compiled_stats(compiled, warnings=("given",))
    ma = compiled.memory_analysis()
    assert st.argument_bytes == ma.argument_size_in_bytes == (64 // 8) * 32 * 4 + 32 * 16 * 4
    assert st.output_bytes == ma.output_size_in_bytes
    assert st.alias_bytes == ma.alias_size_in_bytes
    assert st.temp_bytes == ma.temp_size_in_bytes
    assert st.memory_bytes == (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
    )
    assert st.alias_bytes > 0  # the donated `a` is reused for `a * 2`
    assert st.flops == pytest.approx(compiled.cost_analysis()["flops"])
    assert st.flops >= 2 * 8 * 32 * 16  # one device's rows of the matmul
    assert st.warnings[0] == "given"
    assert st.collectives == ()


def test_data_parallel_gradient_all_reduces_weight_gradient():
    mesh = jax.make_mesh((8,), ("x",))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    D, H, B = 32, 48, 64

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    g = jax.jit(jax.grad(loss), in_shardings=(ns(), ns("x", None)), out_shardings=ns())
    st = stats_of(g, sds((D, H)), sds((B, D)))
    ars = [c for c in st.collectives if c.kind == "all-reduce"]
    assert ars and all(c.group_size == 8 for c in ars)
    assert sum(c.nbytes for c in ars) == D * H * 4
    assert st.wire_bytes == pytest.approx(2 * 7 / 8 * D * H * 4)


def test_all_gather_to_replicated():
    mesh = jax.make_mesh((8,), ("x",))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    f = jax.jit(lambda a: jax.lax.with_sharding_constraint(a * 2, ns()), in_shardings=ns("x"))
    st = stats_of(f, sds((64, 32)))
    (c,) = st.collectives
    assert (c.kind, c.group_size, c.nbytes) == ("all-gather", 8, 64 * 32 * 4)
    assert st.wire_bytes == pytest.approx(7 / 8 * 64 * 32 * 4)


def test_reshard_rows_to_columns_is_one_all_to_all():
    # On CPU XLA emits an all-to-all whose result is a tuple of 8 pieces (one per peer) that
    # together are this device's output block f32[64,8].
    mesh = jax.make_mesh((8,), ("x",))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    f = jax.jit(lambda a: a * 2, in_shardings=ns("x", None), out_shardings=ns(None, "x"))
    st = stats_of(f, sds((64, 64)))
    (c,) = st.collectives
    assert (c.kind, c.group_size, c.nbytes) == ("all-to-all", 8, 64 * (64 // 8) * 4)
    assert c.shape.startswith("(")  # the tuple form
    assert st.wire_bytes == pytest.approx(7 / 8 * 64 * 8 * 4)


def test_sharded_contraction_to_sharded_output_uses_all_reduce_on_cpu():
    # What could be a reduce-scatter becomes all-reduce + dynamic-slice on the CPU backend.
    mesh = jax.make_mesh((8,), ("x",))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    f = jax.jit(
        lambda x, w: x @ w, in_shardings=(ns(None, "x"), ns("x", None)), out_shardings=ns("x")
    )
    st = stats_of(f, sds((64, 64)), sds((64, 32)))
    assert [(c.kind, c.group_size, c.nbytes) for c in st.collectives] == [
        ("all-reduce", 8, 64 * 32 * 4)
    ]


def test_shard_map_psum_scatter_is_reduce_scatter():
    mesh = jax.make_mesh((8,), ("x",))

    def rs(a):
        return jax.lax.psum_scatter(a, "x", scatter_dimension=0, tiled=True)

    f = jax.jit(jax.shard_map(rs, mesh=mesh, in_specs=P(None, "x"), out_specs=P("x")))
    arg = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P(None, "x")))
    st = stats_of(f, arg)
    (c,) = st.collectives
    assert (c.kind, c.group_size, c.nbytes) == ("reduce-scatter", 8, (64 // 8) * (64 // 8) * 4)
    assert st.wire_bytes == pytest.approx(7 * 8 * 8 * 4)


def test_shard_map_ppermute_is_collective_permute():
    mesh = jax.make_mesh((8,), ("x",))

    def shift(a):
        return jax.lax.ppermute(a, "x", [(i, (i + 1) % 8) for i in range(8)])

    f = jax.jit(jax.shard_map(shift, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    arg = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("x")))
    st = stats_of(f, arg)
    (c,) = st.collectives
    assert (c.kind, c.group_size, c.nbytes) == ("collective-permute", 8, 8 * 16 * 4)
    assert st.wire_bytes == 8 * 16 * 4


def test_2d_mesh_all_gathers_use_mesh_form_group_sizes():
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    over_y = jax.jit(
        lambda a: jax.sharding.reshard(a * 2, ns("x", None)), in_shardings=ns("x", "y")
    )
    over_x = jax.jit(
        lambda a: jax.sharding.reshard(a * 2, ns(None, "y")), in_shardings=ns("x", "y")
    )
    cy = over_y.lower(sds((64, 32))).compile()
    cx = over_x.lower(sds((64, 32))).compile()
    assert "replica_groups=mesh[" in cy.as_text()
    (gy,) = compiled_stats(cy).collectives
    (gx,) = compiled_stats(cx).collectives
    # gather the y (size-4) split of the columns: this device's 32 rows x all 32 columns
    assert (gy.kind, gy.group_size, gy.nbytes) == ("all-gather", 4, (64 // 2) * 32 * 4)
    # gather the x (size-2) split of the rows: all 64 rows x this device's 8 columns
    assert (gx.kind, gx.group_size, gx.nbytes) == ("all-gather", 2, 64 * (32 // 4) * 4)


def test_2d_mesh_iota_form_group_size():
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    # rows split over (y, x): gathering y leaves the x split of columns; CPU prints [2,4]<=[8]
    f = jax.jit(lambda a: a * 2, in_shardings=ns("y", "x"), out_shardings=ns(None, "x"))
    compiled = f.lower(sds((64, 32))).compile()
    assert "<=[" in compiled.as_text()
    (c,) = compiled_stats(compiled).collectives
    assert (c.kind, c.group_size, c.nbytes) == ("all-gather", 4, 64 * (32 // 2) * 4)


def test_2d_megatron_and_dp_grad_group_sizes():
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    ns = lambda *s: NamedSharding(mesh, P(*s))
    B, D, H, F = 16, 32, 64, 32

    def body(x, w1, w2):
        h = jax.lax.with_sharding_constraint(x @ w1, P("x", "y"))
        return jnp.tanh(h) @ w2

    f = jax.jit(
        jax.sharding.auto_axes(body, out_sharding=ns("x", None)),
        in_shardings=(ns("x", None), ns(None, "y"), ns("y", None)),
    )
    with jax.set_mesh(mesh):
        st = stats_of(f, sds((B, D)), sds((D, H)), sds((H, F)))
    (c,) = st.collectives  # model-parallel reduction over y (4 devices) of the x-split batch
    assert (c.kind, c.group_size, c.nbytes) == ("all-reduce", 4, (B // 2) * F * 4)

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    g = jax.jit(
        jax.grad(loss), in_shardings=(ns(None, "y"), ns("x", None)), out_shardings=ns(None, "y")
    )
    st = stats_of(g, sds((D, H)), sds((B, D)))
    (c,) = st.collectives  # data-parallel reduction over x (2 devices) of the y-split gradient
    assert (c.kind, c.group_size, c.nbytes) == ("all-reduce", 2, D * (H // 4) * 4)


def test_scan_collective_in_loop_body_is_counted_once_and_flagged():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    ns = lambda *s: NamedSharding(mesh, P(*s))

    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    jf = jax.jit(f, in_shardings=(ns(), ns(None, "x", None)), out_shardings=ns())
    st = stats_of(jf, sds((16, 32)), sds((4, 32, 32)))
    ars = [c for c in st.collectives if c.kind == "all-reduce"]
    assert len(ars) == 1 and ars[0].nbytes == 16 * 32 * 4
    assert any("inside while" in w and "trip count 4" in w for w in st.warnings)


def test_stats_of_captures_involuntary_rematerialization_warning():
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
    ns = lambda *s: NamedSharding(mesh, P(*s))

    def f(t):  # (7, 5) does not split evenly: XLA replicates, then re-partitions
        t = jax.lax.with_sharding_constraint(jnp.sin(t), ns("x"))
        t = jax.lax.with_sharding_constraint(jnp.cos(t), ns(None, "y"))
        return t.sum()

    st = stats_of(jax.jit(f), sds((7, 5)))
    assert any("Involuntary full rematerialization" in w for w in st.warnings)
    assert st.collectives  # and the extra collectives are there to see
