"""reshape / squeeze rules: exact strategy tables on the 2×4 mesh, and runs on 8 CPU devices."""

from __future__ import annotations

import numpy as np
import pytest
from jax import lax
from test_rules_common import CLUSTER, check_strategy, op_strategies, rng_array

from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from cost_model.context import RuleContext
from cost_model.registry import rule_for
from cost_model.rules.reshape import dim_groups


@pytest.mark.parametrize("a, b, groups", [
    ((8, 16, 32), (8, 512), [((0,), (0,)), ((1, 2), (1,))]),
    ((8, 16, 32), (2, 4, 512), [((0,), (0, 1)), ((1, 2), (2,))]),
    ((8, 1, 32), (8, 32, 1), [((0,), (0,)), ((2,), (1,))]),  # size-1 dims join no group
    ((6, 4), (4, 6), [((0, 1), (0, 1))]),  # 6 ≠ 4: one group of both dims
    ((8, 0), (0, 8), None),
    ((8, 4), (30,), None),
])
def test_dim_groups(a, b, groups):
    assert dim_groups(a, b) == groups


# (input shape, output shape, {(input spec, output spec)}): a split survives on the major-most
# dim of its group when the other side's major dim is divisible by it.
CASES = [
    # {0}→{0}, {1,2}→{1}: dim 2 (minor in its group) never splits; 3 choices per axis = 9.
    ((8, 16, 32), (8, 512), {
        ("[R,R,R]", "[R,R]"), ("[x,R,R]", "[x,R]"), ("[y,R,R]", "[y,R]"),
        ("[(x,y),R,R]", "[(x,y),R]"), ("[R,x,R]", "[R,x]"), ("[R,y,R]", "[R,y]"),
        ("[R,(x,y),R]", "[R,(x,y)]"), ("[x,y,R]", "[x,y]"), ("[y,x,R]", "[y,x]"),
    }),
    # {1}→{1,2} (16 → 4·4): the major out dim 4 takes x (2) or y (4) but not x·y = 8.
    # 4 choices per axis = 16, less (x,y) on dim 1 = 15.
    ((8, 16, 32), (8, 4, 4, 32), {
        ("[R,R,R]", "[R,R,R,R]"), ("[x,R,R]", "[x,R,R,R]"), ("[y,R,R]", "[y,R,R,R]"),
        ("[(x,y),R,R]", "[(x,y),R,R,R]"), ("[R,x,R]", "[R,x,R,R]"), ("[R,y,R]", "[R,y,R,R]"),
        ("[R,R,x]", "[R,R,R,x]"), ("[R,R,y]", "[R,R,R,y]"), ("[R,R,(x,y)]", "[R,R,R,(x,y)]"),
        ("[x,y,R]", "[x,y,R,R]"), ("[y,x,R]", "[y,x,R,R]"), ("[x,R,y]", "[x,R,R,y]"),
        ("[y,R,x]", "[y,R,R,x]"), ("[R,x,y]", "[R,x,R,y]"), ("[R,y,x]", "[R,y,R,x]"),
    }),
    # {0}→{0,1} (8 → 2·4): dim 0 takes x only (2 | 2); {1,2}→{2}: dim 1 any. 3·2 = 6.
    ((8, 16, 32), (2, 4, 512), {
        ("[R,R,R]", "[R,R,R]"), ("[x,R,R]", "[x,R,R]"), ("[R,x,R]", "[R,R,x]"),
        ("[R,y,R]", "[R,R,y]"), ("[R,(x,y),R]", "[R,R,(x,y)]"), ("[x,y,R]", "[x,R,y]"),
    }),
    # {1}→{1,2} (512 → 4·128): dim 1 takes x or y but not x·y. 9 − 1 = 8.
    ((8, 512), (8, 4, 128), {
        ("[R,R]", "[R,R,R]"), ("[x,R]", "[x,R,R]"), ("[y,R]", "[y,R,R]"),
        ("[(x,y),R]", "[(x,y),R,R]"), ("[R,x]", "[R,x,R]"), ("[R,y]", "[R,y,R]"),
        ("[x,y]", "[x,y,R]"), ("[y,x]", "[y,x,R]"),
    }),
    # 24 → (4, 6): one group; the major out dim 4 takes x or y but not x·y = 8.
    ((24,), (4, 6), {("[R]", "[R,R]"), ("[x]", "[x,R]"), ("[y]", "[y,R]")}),
]


def pairs(strats):
    return {(str(s.in_specs[0]), str(s.out_spec)) for s in strats.values()}


@pytest.mark.parametrize("a, b, expected", CASES)
def test_reshape_strategies(a, b, expected):
    op, strats = op_strategies(lambda x: x.reshape(b), (np.zeros(a, np.float32),), "reshape")
    assert op.primitive is lax.reshape_p
    assert len(strats) == len(expected)
    assert pairs(strats) == expected


@pytest.mark.parametrize("a, b", [(c[0], c[1]) for c in CASES])
def test_reshape_back_is_the_mirror(a, b):
    # Splitting dims back undoes merging them: B→A offers exactly the pairs of A→B, swapped.
    _, fwd = op_strategies(lambda x: x.reshape(b), (np.zeros(a, np.float32),), "reshape")
    _, bwd = op_strategies(lambda x: x.reshape(a), (np.zeros(b, np.float32),), "reshape")
    assert {(o, i) for i, o in pairs(bwd)} == pairs(fwd)


def test_squeeze():
    op, strats = op_strategies(lambda z: z.squeeze(1), (np.zeros((8, 1, 32), np.float32),),
                               "reshape")
    assert op.primitive is lax.squeeze_p
    # The size-1 dim is dropped; dims 0 and 2 take any axes: 3 choices per axis = 9.
    assert pairs(strats) == {
        ("[R,R,R]", "[R,R]"), ("[x,R,R]", "[x,R]"), ("[y,R,R]", "[y,R]"),
        ("[(x,y),R,R]", "[(x,y),R]"), ("[R,R,x]", "[R,x]"), ("[R,R,y]", "[R,y]"),
        ("[R,R,(x,y)]", "[R,(x,y)]"), ("[x,R,y]", "[x,y]"), ("[y,R,x]", "[y,x]"),
    }


def test_reshape_with_transposed_dimensions_is_replicated():
    x = TensorInfo((4, 8), "float32")
    ctx = RuleContext(CLUSTER, (TensorInfo((8, 4), "float32"),))
    strats = rule_for(lax.reshape_p)(ctx, x, new_sizes=(8, 4), dimensions=(1, 0))
    assert [(s.in_specs, s.out_spec) for s in strats] == [
        ((ShardingSpec.replicated(2),), ShardingSpec.replicated(2))]


@pytest.mark.parametrize("a, b", [(c[0], c[1]) for c in CASES] + [((8, 1, 32), (8, 32))])
def test_every_reshape_strategy_runs_without_communication(a, b):
    x = rng_array(a)
    op, strats = op_strategies(lambda x: x.reshape(b), (x,), "reshape")
    for s in strats.values():
        check_strategy(op, s, [x])


def test_every_squeeze_strategy_runs_without_communication():
    z = rng_array((8, 1, 32))
    op, strats = op_strategies(lambda z: z.squeeze(1), (z,), "reshape")
    for s in strats.values():
        check_strategy(op, s, [z])
