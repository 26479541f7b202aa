"""Recomputation in the stage tables: per (layers, sub-mesh) entry, keep the residuals or
recompute every layer's forward in the backward pass (``dp_stages.stage_costs``'s docstring has
the formulas the expected values below are written in)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_stages import brute_force_stages, stage_dp, submesh_shapes
from dp_stages.stage_costs import LayerCosts, Link, stage_tables

FREE = Link(0.0, math.inf)


def costs(L=2, V=1, *, t=1.0, w=10.0, r=5.0, p=20.0, f=0.4, x=1.0, rng=None):
    """L layers on V views, every layer alike unless ``rng`` draws them."""
    def arr(v, lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, (L, V)) * v if rng is not None else np.full((L, V), float(v))

    tt, ww, rr = arr(t, 0.5, 1.5), arr(w), arr(r)
    return LayerCosts(tuple((v + 1, 1) for v in range(V)), tt, np.zeros((L, V)), ww, rr,
                      ww + rr + arr(p - w - r), np.zeros((L, L, V)), np.zeros(L + 1), np.zeros(L + 1),
                      forward_s=tt * f, input_bytes=arr(x))


# Two layers: weights 10 B (×4: weights, accumulators, optimizer state), residuals 5 B per
# microbatch, peak 20 B (transient 20 − 10 − 5 = 5), inputs 1 B, forward 0.4 of t = 1 s; B = 4.
KEEP_NEED = 4 * 20 + 5 + 4 * (5 + 5)  # weights, max transient, 4 microbatches of Σ residuals: 125
REMAT_NEED = 4 * 20 + (5 + 5) + 4 * (1 + 1)  # weights, max (residual + transient), 4 × Σ inputs: 98


def tables(budget, remat, schedule="gpipe", **kw):
    return stage_tables(costs(**kw), ((1, 1),), ((0,),), 1, 1, 4, budget, (FREE,), weight_factor=4.0,
                        schedule=schedule, remat=remat)


def test_remat_is_chosen_where_keeping_does_not_fit():
    tab = tables(100.0, "auto")
    assert KEEP_NEED > 100 >= REMAT_NEED
    assert tab.recomputes(0, 1, 0)
    assert tab.dp_input.compute_cost[0, 1, 0] == pytest.approx(2 * 1.0 + 2 * 0.4)  # + Σ forward
    assert tab.static_bytes[0, 1, 0] == pytest.approx(4 * 20 + 10)
    assert tab.per_microbatch_bytes[0, 1, 0] == pytest.approx(2.0)
    assert tab.memory_bytes(0, 1, 0, 4) == pytest.approx(REMAT_NEED)
    # one layer alone keeps: 40 + 5 + 4·5 = 65 fits
    assert not tab.recomputes(0, 0, 0) and tab.dp_input.compute_cost[0, 0, 0] == 1.0


def test_remat_never_leaves_the_entry_infeasible():
    tab = tables(100.0, "never")
    assert math.isinf(tab.dp_input.compute_cost[0, 1, 0]) and tab.view[0, 1, 0] == -1
    assert not tab.recomputes(0, 1, 0)
    assert math.isinf(tables(REMAT_NEED - 1, "auto").dp_input.compute_cost[0, 1, 0])


def test_keep_is_chosen_with_ample_memory_and_wins_a_tie():
    tab = tables(KEEP_NEED, "auto")
    assert not tab.recomputes(0, 1, 0) and tab.dp_input.compute_cost[0, 1, 0] == 2.0
    assert tab.memory_bytes(0, 1, 0, 4) == KEEP_NEED
    free = tables(KEEP_NEED, "auto", f=0.0)  # recomputing costs nothing: still keep
    assert not free.recomputes(0, 1, 0)


def test_remat_always_recomputes_even_when_keeping_fits():
    tab = tables(math.inf, "always")
    assert tab.recomputes(0, 1, 0) and tab.recomputes(1, 1, 0)
    assert tab.dp_input.compute_cost[0, 1, 0] == pytest.approx(2.8)


def test_1f1b_bounds_stages_after_with_the_remat_figures():
    # under 1F1B the tables fit one microbatch in flight: keep needs 85 + 10 = 95, fits 98
    assert not tables(98.0, "auto", schedule="1f1b").recomputes(0, 1, 0)
    # remat: static 90, 2 B per microbatch; 94 holds 2 microbatches: 1 stage after this one
    tab = tables(94.0, "always", schedule="1f1b")
    assert tab.dp_input.max_n_succ_stages[0, 1, 0] == math.floor((94 - 90) / 2) - 1


def test_bad_modes():
    with pytest.raises(ValueError, match="unknown remat mode"):
        tables(100.0, "sometimes")
    c = costs()
    bare = LayerCosts(*(getattr(c, k) for k in ("views", "time_s", "update_s", "weight_bytes", "residual_bytes",
                                                 "peak_bytes", "pair_s", "send_fwd_bytes", "send_bwd_bytes")))
    with pytest.raises(ValueError, match="forward_s and input_bytes"):
        stage_tables(bare, ((1, 1),), ((0,),), 1, 1, 4, 100.0, (FREE,), remat="auto")


def _by_hand(c: LayerCosts, i, j, vs, B, budget, factor=4.0):
    """The fastest (time, remat) over every (option, view) that fits, enumerated."""
    trans = np.maximum(c.peak_bytes - c.weight_bytes - c.residual_bytes, 0)
    best = (math.inf, None)
    for remat in (False, True):  # keep first: it wins ties
        for v in vs:
            sl = slice(i, j + 1)
            t = c.time_s[sl, v].sum() + (c.forward_s[sl, v].sum() if remat else 0.0)
            if remat:
                need = (factor * c.weight_bytes[sl, v].sum() + (c.residual_bytes[sl, v] + trans[sl, v]).max()
                        + B * c.input_bytes[sl, v].sum())
            else:
                need = factor * c.weight_bytes[sl, v].sum() + trans[sl, v].max() + B * c.residual_bytes[sl, v].sum()
            if need <= budget and t < best[0]:
                best = (t, remat)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_tables_match_enumeration_and_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, (N, M) = int(rng.integers(2, 6)), [(1, 4), (2, 2)][seed % 2]
    shapes = tuple(submesh_shapes(N, M))
    c = costs(L=L, V=3, w=rng.uniform(1, 5), r=rng.uniform(2, 8), p=20.0, f=rng.uniform(0.2, 0.5),
              x=rng.uniform(0.2, 1.0), rng=rng)
    B = int(rng.integers(1, 5))
    budget = float(rng.uniform(10, 60))
    tab = stage_tables(c, shapes, tuple((0, 1, 2) for _ in shapes), N, M, B, budget,
                       (FREE,) * len(shapes), remat="auto")
    chose_remat = False  # printed: most seeds have entries of both kinds
    for i in range(L):
        for j in range(i, L):
            for s in range(len(shapes)):
                want_t, want_remat = _by_hand(c, i, j, (0, 1, 2), B, budget)
                got = tab.dp_input.compute_cost[i, j, s]
                assert got == pytest.approx(want_t) or got == want_t == math.inf
                if math.isfinite(want_t):
                    assert tab.recomputes(i, j, s) == want_remat
                    chose_remat |= want_remat
    print(f"seed {seed}: some entry recomputes: {chose_remat}")
    cost, plan = stage_dp(tab.dp_input)
    want_cost, _ = brute_force_stages(tab.dp_input)
    assert cost == pytest.approx(want_cost) or cost == want_cost == math.inf
    never = stage_tables(c, shapes, tuple((0, 1, 2) for _ in shapes), N, M, B, budget, (FREE,) * len(shapes))
    assert np.all(never.dp_input.compute_cost >= tab.dp_input.compute_cost)  # remat only adds options


def dots_tables(budget, remat="auto"):
    """The two layers above with "dots" offered: 0.1 s of forward run again per layer, 3 B held
    per microbatch (inputs and saved matmul outputs)."""
    c = costs()
    c = LayerCosts(c.views, c.time_s, c.update_s, c.weight_bytes, c.residual_bytes, c.peak_bytes, c.pair_s,
                   c.send_fwd_bytes, c.send_bwd_bytes, forward_s=c.forward_s, input_bytes=c.input_bytes,
                   dots_forward_s=np.full((2, 1), 0.1), dots_bytes=np.full((2, 1), 3.0))
    return stage_tables(c, ((1, 1),), ((0,),), 1, 1, 4, budget, (FREE,), weight_factor=4.0, remat=remat)


DOTS_NEED = 4 * 20 + (5 + 5) + 4 * (3 + 3)  # as REMAT_NEED, with 3 B per layer per microbatch: 114


@pytest.mark.parametrize("budget, policy, t", [(KEEP_NEED, "keep", 2.0), (DOTS_NEED, "dots", 2.2),
                                               (DOTS_NEED - 1, "full", 2.8)])
def test_dots_is_chosen_between_keeping_and_recomputing_in_full(budget, policy, t):
    tab = dots_tables(float(budget))
    assert tab.policy(0, 1, 0) == policy and tab.recomputes(0, 1, 0) == (policy != "keep")
    assert tab.dp_input.compute_cost[0, 1, 0] == pytest.approx(t)
    if policy == "dots":
        assert tab.memory_bytes(0, 1, 0, 4) == pytest.approx(DOTS_NEED)


def test_remat_always_is_full_even_with_dots_offered():
    assert dots_tables(math.inf, "always").policy(0, 1, 0) == "full"
    assert dots_tables(math.inf, "never").policy(0, 1, 0) == "keep"
