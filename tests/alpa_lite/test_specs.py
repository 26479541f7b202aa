"""``alpa_lite.ir.specs``: printing and parsing, PartitionSpec conversion, per-device shapes,
validation errors and the exact list ``enumerate_specs`` gives."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from alpa_lite.ir.errors import PlanningError, ShardingError
from alpa_lite.ir.specs import ShardingSpec, enumerate_specs

S = ShardingSpec
MESH_8 = {"x": 8}
MESH_2x4 = {"x": 2, "y": 4}

# ---- printed form ------------------------------------------------------------------------

TEXT_TABLE = [
    ("[x,R]", S((("x",), ()))),
    ("[R,(x,y)]", S(((), ("x", "y")))),
    ("[R,R]|sum(x)", S(((), ()), ("x",))),
    ("[y,x]|sum(z)", S((("y",), ("x",)), ("z",))),
    ("[R]|sum(x,y)", S(((),), ("x", "y"))),
    ("[(y,x),R,R]", S((("y", "x"), (), ()))),
    ("[]", S(())),
]


@pytest.mark.parametrize("text,spec", TEXT_TABLE)
def test_str_and_parse_are_inverse(text, spec):
    assert str(spec) == text
    assert ShardingSpec.parse(text) == spec
    assert ShardingSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text,spec", [
    (" [ x , R ] ", S((("x",), ()))),
    ("[R,R] | sum( x )", S(((), ()), ("x",))),
    ("[R,( x , y )]", S(((), ("x", "y")))),
])
def test_parse_tolerates_spaces(text, spec):
    assert ShardingSpec.parse(text) == spec


@pytest.mark.parametrize("text", ["x,R", "[x,R", "[x,R]|max(x)", "[x,R] junk", ""])
def test_parse_rejects_malformed_text_naming_it(text):
    with pytest.raises(ShardingError) as e:
        ShardingSpec.parse(text)
    assert repr(text) in str(e.value)


def test_partial_flags_and_queries():
    spec = S(((), ("x", "y"), ("z",)), ("w",))
    assert spec.rank == 3
    assert spec.is_partial and not spec.without_partial().is_partial
    assert spec.without_partial() == S(((), ("x", "y"), ("z",)))
    assert spec.axes_used() == ("x", "y", "z")
    assert [spec.dim_of(a) for a in ("x", "y", "z", "w")] == [1, 1, 2, None]
    assert S.replicated(3) == S(((), (), ()))
    assert not S.replicated(2).is_partial


# ---- PartitionSpec ------------------------------------------------------------------------

PSPEC_TABLE = [
    # (PartitionSpec, rank, spec, PartitionSpec it prints back to: trailing Nones dropped)
    (P("x", None), 2, S((("x",), ())), P("x")),
    (P(None, ("x", "y")), 2, S(((), ("x", "y"))), P(None, ("x", "y"))),
    (P(), 3, S.replicated(3), P()),
    (P("y"), 3, S((("y",), (), ())), P("y")),
    (P(None, "x", None), 3, S(((), ("x",), ())), P(None, "x")),
    (P(("y", "x")), 1, S((("y", "x"),)), P(("y", "x"))),
    (None, 2, S.replicated(2), P()),
]


@pytest.mark.parametrize("pspec,rank,spec,back", PSPEC_TABLE)
def test_partition_spec_round_trip(pspec, rank, spec, back):
    got = ShardingSpec.from_partition_spec(pspec, rank)
    assert got == spec
    assert got.to_partition_spec() == back
    assert ShardingSpec.from_partition_spec(got.to_partition_spec(), rank) == spec


def test_unconstrained_entry_reads_as_replicated():
    assert ShardingSpec.from_partition_spec(P(P.UNCONSTRAINED, "x"), 2) == S(((), ("x",)))


def test_partial_axes_are_dropped_in_partition_spec():
    assert S((("x",), ()), ("y",)).to_partition_spec() == P("x")


def test_partition_spec_longer_than_rank_is_an_error():
    with pytest.raises(ShardingError, match="3 entries for a rank-2"):
        ShardingSpec.from_partition_spec(P("x", None, None), 2)


# ---- sizes -------------------------------------------------------------------------------

SIZE_TABLE = [
    # spec, shape, sizes, shard_factor, local_shape, divides
    ("[R,R]", (8, 6), MESH_2x4, 1, (8, 6), True),
    ("[x,R]", (8, 6), MESH_2x4, 2, (8 // 2, 6), True),
    ("[y,x]", (8, 6), MESH_2x4, 4 * 2, (8 // 4, 6 // 2), True),
    ("[(x,y),R]", (16, 3), MESH_2x4, 2 * 4, (16 // 8, 3), True),
    ("[R,y]", (8, 6), MESH_2x4, 4, (8, -(-6 // 4)), False),  # 6/4 padded up to 2
    ("[x]", (12,), MESH_8, 8, (-(-12 // 8),), False),
    ("[R,R]|sum(x)", (8, 6), MESH_2x4, 1, (8, 6), True),  # partial axes split nothing
    ("[x,R]|sum(y)", (8, 6), MESH_2x4, 2, (8 // 2, 6), True),
]


@pytest.mark.parametrize("text,shape,sizes,factor,local,divides", SIZE_TABLE)
def test_shard_factor_local_shape_divides(text, shape, sizes, factor, local, divides):
    spec = ShardingSpec.parse(text)
    assert spec.shard_factor(sizes) == factor
    assert spec.local_shape(shape, sizes) == local
    assert spec.divides(shape, sizes) is divides


@pytest.mark.parametrize("text,shape,sizes", [
    ("[x,R]", (8, 6), MESH_2x4),
    ("[y,x]", (8, 6), MESH_2x4),
    ("[R,R]|sum(x)", (8, 6), MESH_2x4),
    ("[(x,y)]", (16,), MESH_2x4),
    ("[x]", (8,), MESH_8),
])
def test_validate_accepts_fitting_specs(text, shape, sizes):
    ShardingSpec.parse(text).validate(shape, sizes)


VALIDATE_ERRORS = [
    # spec, shape, sizes, fragments the message must contain
    ("[R,y]", (8, 6), MESH_2x4, ["dimension 1", "size 6", "('y',)", "total size 4"]),
    ("[(x,y),R]", (4, 8), MESH_2x4, ["dimension 0", "size 4", "('x', 'y')", "total size 8"]),
    ("[x]", (12,), MESH_8, ["dimension 0", "size 12", "total size 8"]),
    ("[x,R]", (8,), MESH_2x4, ["rank 2", "(8,)"]),
    ("[z,R]", (8, 8), MESH_2x4, ["'z'", "['x', 'y']"]),
    ("[R,R]|sum(z)", (8, 8), MESH_2x4, ["'z'"]),
    ("[x,x]", (8, 8), MESH_2x4, ["twice"]),
    ("[x,R]|sum(x)", (8, 8), MESH_2x4, ["twice"]),
]


@pytest.mark.parametrize("text,shape,sizes,fragments", VALIDATE_ERRORS)
def test_validate_errors_name_the_dim_and_sizes(text, shape, sizes, fragments):
    with pytest.raises(ShardingError) as e:
        ShardingSpec.parse(text).validate(shape, sizes)
    assert isinstance(e.value, PlanningError)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


# ---- enumeration -------------------------------------------------------------------------

ENUM_TABLE = [
    # On {'x': 8}: the axis splits dim 0, dim 1 or nothing, where 8 divides the dim.
    ((4, 6), MESH_8, ["[R,R]"]),
    ((8, 8), MESH_8, ["[R,R]", "[x,R]", "[R,x]"]),
    ((3,), MESH_8, ["[R]"]),
    # On {'x': 2, 'y': 4}: x outer, y inner, each over (none, dim 0, dim 1): 3 · 3 = 9 choices.
    # (4, 6): y on dim 1 fails (6 % 4) whatever x does (3 choices), x and y both on dim 0
    # fail (4 % 8): 9 − 3 − 1 = 5.
    ((4, 6), MESH_2x4, ["[R,R]", "[y,R]", "[x,R]", "[R,x]", "[y,x]"]),
    ((8, 8), MESH_2x4, ["[R,R]", "[y,R]", "[R,y]",
                        "[x,R]", "[(x,y),R]", "[x,y]",
                        "[R,x]", "[y,x]", "[R,(x,y)]"]),
    ((3,), MESH_2x4, ["[R]"]),
]


@pytest.mark.parametrize("shape,sizes,expected", ENUM_TABLE)
def test_enumerate_specs_exact_list_and_order(shape, sizes, expected):
    got = enumerate_specs(shape, sizes)
    assert [str(s) for s in got] == expected
    assert len(set(got)) == len(got)
    for s in got:
        assert s.divides(shape, sizes) and not s.is_partial


@pytest.mark.parametrize("shape,sizes,count", [
    # Without the divisibility filter every assignment of axes to (none, dims) counts.
    ((4, 6), MESH_8, 2 + 1),
    ((3,), MESH_8, 1 + 1),
    ((4, 6), MESH_2x4, (2 + 1) ** 2),
    ((3,), MESH_2x4, (1 + 1) ** 2),
])
def test_enumerate_specs_uneven(shape, sizes, count):
    assert len(enumerate_specs(shape, sizes, even_only=False)) == count


def test_enumerate_specs_counts_by_formula():
    """(dims + 1) ** axes assignments; with at most one axis per dim on two axes, minus the
    `dims` assignments that put both axes on one dim."""
    shape, sizes = (16, 16, 16), MESH_2x4
    assert len(enumerate_specs(shape, sizes)) == (3 + 1) ** 2
    assert len(enumerate_specs(shape, sizes, max_axes_per_dim=1)) == (3 + 1) ** 2 - 3


def test_enumerate_specs_ignores_size_one_axes():
    assert [str(s) for s in enumerate_specs((8,), {"a": 1, "x": 8})] == ["[R]", "[x]"]
