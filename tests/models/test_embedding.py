"""A small decoder LM (``examples/scan_gpt.py`` unrolled): embedding lookup (gather) and its
gradient (scatter-add), the embedding tied to the output projection, cross-entropy over the
vocabulary. With a large vocabulary the plan splits the vocab dim of the embedding (the
logits' softmax then reduces over a split dim: max and sum all-reduced); with a small one and
a large batch it does not. Modelled cost no more than the data-parallel and megatron baselines',
and (slow: a compile each) compiled wire bytes no more than theirs. Runs equal to the unsharded
step over 2 steps.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P
from models_common import measure

import alpa_lite as al
from examples.scan_gpt import GptConfig, make_example
from tests.helpers import assert_steps_equal, make_mesh

LARGE_VOCAB = GptConfig(batch=8, seq=32, vocab=8192, hidden=128, heads=4, mlp=512, layers=1, scan=False)
BASELINES = ("data_parallel", "megatron")
SMALL_VOCAB = GptConfig(batch=64, seq=32, vocab=64, hidden=64, heads=4, mlp=128, layers=1, scan=False)


def _ops(plan, kind):
    return [i for i, k in enumerate(plan.op_kinds) if k == kind]


@pytest.fixture(scope="module")
def large_vocab():
    """The large-vocabulary LM planned on 8 devices and its compiled plan measured (shared by
    the default test and the slow comparison with the baselines' compiled programs)."""
    fn, args = make_example(LARGE_VOCAB)
    mesh = make_mesh((8,))
    plan = al.plan(fn, *args, mesh=mesh)
    return fn, args, mesh, plan, measure("auto", plan, fn, args)


def test_large_vocab_splits_the_embedding_vocab_dim(large_vocab):
    fn, args, mesh, plan, auto = large_vocab
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
    auto.assert_predictions()
    assert auto.extra_kinds == ()
    for method in BASELINES:
        base = al.plan(fn, *args, mesh=mesh, method=method)
        assert plan.cost.total_s <= base.cost.total_s * (1 + 1e-6), method
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)


@pytest.mark.slow
def test_large_vocab_sends_no_more_than_the_baselines_compiled(large_vocab):
    """The baselines compiled too (a compile each): their predictions hold, and the auto plan's
    compiled program sends no more wire bytes than theirs."""
    fn, args, mesh, _, auto = large_vocab
    for method in BASELINES:
        measured = measure(method, al.plan(fn, *args, mesh=mesh, method=method), fn, args)
        measured.assert_predictions()
        assert auto.wire <= measured.wire, method


@pytest.mark.slow
def test_small_vocab_large_batch_keeps_the_embedding_whole():
    fn, args = make_example(SMALL_VOCAB)
    plan = al.plan(fn, *args, mesh=make_mesh((8,)))
    assert not plan.warnings, plan.warnings
    assert plan.in_specs[0]["embed"] == P(), plan.in_specs[0]["embed"]
    assert plan.in_specs[2] == P("x")
    auto = measure("auto", plan, fn, args)
    auto.assert_predictions()
    assert_steps_equal(auto.step, fn, args, n_state=2, atol=1e-4)
