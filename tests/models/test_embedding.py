"""A small decoder LM (``examples/scan_gpt.py`` unrolled): embedding lookup (gather) and its
gradient (scatter-add), the embedding tied to the output projection, cross-entropy over the
vocabulary. With a large vocabulary the plan splits the vocab dim of the embedding (the
logits' softmax then reduces over a split dim: max and sum all-reduced); with a small one and
a large batch it does not. Runs equal to the unsharded step over 2 steps.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from examples.scan_gpt import GptConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

LARGE_VOCAB = GptConfig(batch=8, seq=32, vocab=8192, hidden=128, heads=4, mlp=512, layers=1, scan=False)
SMALL_VOCAB = GptConfig(batch=64, seq=32, vocab=64, hidden=64, heads=4, mlp=128, layers=1, scan=False)


def _ops(plan, kind):
    return [i for i, k in enumerate(plan.op_kinds) if k == kind]


def test_large_vocab_splits_the_embedding_vocab_dim():
    fn, args = make_example(LARGE_VOCAB)
    mesh = make_mesh((8,))
    plan = al.plan(fn, *args, mesh=mesh)
    assert not plan.warnings, plan.warnings
    assert plan.in_specs[0]["embed"] == P("x"), plan.in_specs[0]["embed"]
    # The lookup reads its vocab-split table in place (each device its own rows, then one
    # all-reduce of the looked-up rows, never a gather of the table), its gradient is a
    # scatter-add into the split table, and the cross-entropy picks the target logit from
    # vocab-split logits (a partial sum again).
    vocab_split = al.ShardingSpec((("x",), ()))
    (lookup, pick) = [plan.layouts[i] for i in _ops(plan, "gather")]
    assert lookup.ins[0] == vocab_split, lookup
    assert pick.ins[0].dims[-1] == ("x",) and pick.outs[0].partial == ("x",), pick
    grads = [plan.layouts[i] for i in _ops(plan, "scatter")]
    assert any(g.outs[0] == vocab_split for g in grads), grads
    auto = measure("auto", plan, fn, args)
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    for method in ("data_parallel", "megatron"):
        base = al.plan(fn, *args, mesh=mesh, method=method)
        assert plan.cost.total_s <= base.cost.total_s * (1 + 1e-6)
        measured = measure(method, base, fn, args)
        measured.assert_predictions()  # a baseline's predictions hold too
        assert auto.wire <= measured.wire
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)


@pytest.mark.slow
def test_small_vocab_large_batch_keeps_the_embedding_whole():
    fn, args = make_example(SMALL_VOCAB)
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    assert not plan.warnings, plan.warnings
    assert plan.in_specs[0]["embed"] == P(), plan.in_specs[0]["embed"]
    assert plan.in_specs[2] == P("x")
    measure("auto", plan, fn, args).assert_predictions()
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, atol=1e-4)
