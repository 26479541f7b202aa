"""``al.plan_serving``: both phases planned, the cache move between them priced, or one layout."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import alpa_lite as al
from alpa_lite.ir.graph import TensorInfo
from cost_model.resharding import reshard
from examples import generate as gen
from tests.helpers import make_mesh

GQA = gen.GenConfig(n_kv_heads=4)


@functools.cache
def big_pair(one_layout: bool):
    """The 70B-class shape cut to 2 layers, batch 8, a 128-token prompt, on 8 H100s."""
    cfg = gen.llama70b_shape(n_layers=2)
    prefill, decode = gen.make_steps(cfg)
    pre_args, dec_args = gen.abstract_args(cfg, batch=8, prompt=128)
    cluster = al.ClusterSpec.preset("dgx-h100", num_hosts=1)
    return al.plan_serving(prefill, decode, pre_args, dec_args, cluster=cluster,
                           one_layout=one_layout), dec_args, cluster


def test_one_layout_pair_generates_the_unsharded_tokens():
    params, prompt = gen.example(GQA)
    prefill, decode = gen.make_steps(GQA)
    pre_args, dec_args = gen.abstract_args(GQA, *prompt.shape)
    sp = al.plan_serving(prefill, decode, pre_args, dec_args, mesh=make_mesh((2, 4)), one_layout=True)
    assert sp.moves == () and sp.resharding_s == 0
    assert sp.prefill.out_specs[sp.cache_output] == sp.decode.in_specs[sp.cache_arg]
    pre_step, dec_step = sp.compile(decode)
    got = gen.generate(pre_step, dec_step, params, prompt, 6)
    np.testing.assert_array_equal(got, gen.generate(jax.jit(prefill), jax.jit(decode), params, prompt, 6))


def test_cache_move_is_priced_leaf_by_leaf():
    sp, dec_args, cluster = big_pair(False)
    assert sp.moves, "prefill (batch split) and decode (heads split) want different cache layouts"
    cache = jax.tree_util.tree_leaves_with_path(dec_args[1])
    leaves = {jax.tree_util.keystr(p): x for p, x in cache}
    for m in sp.moves:
        x = leaves[m.path]
        assert m.seconds == pytest.approx(reshard(m.src, m.dst, TensorInfo(x.shape, str(x.dtype)), cluster)[0])
    assert sp.resharding_s == pytest.approx(sum(m.seconds for m in sp.moves)) and sp.resharding_s > 0
    assert sp.request_s(32) == pytest.approx(sp.prefill.cost.total_s + sp.resharding_s
                                             + 32 * sp.decode.cost.total_s)


def test_forcing_one_layout_moves_nothing_and_keeps_decode():
    free, _, _ = big_pair(False)
    one, _, _ = big_pair(True)
    assert one.moves == ()
    assert one.decode.cost.total_s == pytest.approx(free.decode.cost.total_s)
    assert one.prefill.cost.total_s >= free.prefill.cost.total_s * (1 - 1e-9)  # only fewer choices


def test_decode_without_a_carried_cache_is_refused():
    prefill, _ = gen.make_steps(GQA)
    pre_args, dec_args = gen.abstract_args(GQA, 8, 8)

    def decode_logits_only(params, cache, token, pos):
        return gen.forward(params, cache, token[:, None], pos, GQA)[0]

    with pytest.raises(al.PlanningError, match="decode must return its cache"):
        al.plan_serving(prefill, decode_logits_only, pre_args, dec_args, mesh=make_mesh((8,)))
