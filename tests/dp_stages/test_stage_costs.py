"""Stage cost tables composed from per-layer costs, and the stage DP with a fixed stage count."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dp_stages import StageDPInput, plan_cost, stage_dp, submesh_shapes
from dp_stages.brute import _ranges
from dp_stages.stage_costs import LayerCosts, Link, bubble_fraction, stage_tables
from dp_stages.stage_count import stage_dp_count


def costs(L=3, V=2, *, t=None, u=None, w=None, r=None, p=None, pair=None, fwd=None, bwd=None):
    z = np.zeros((L, V))
    return LayerCosts(tuple((v + 1, 1) for v in range(V)),
                      np.asarray(t if t is not None else np.ones((L, V)), float),
                      np.asarray(u if u is not None else z, float), np.asarray(w if w is not None else z, float),
                      np.asarray(r if r is not None else z, float), np.asarray(p if p is not None else z, float),
                      np.asarray(pair if pair is not None else np.zeros((L, L, V)), float),
                      np.asarray(fwd if fwd is not None else np.zeros(L + 1), float),
                      np.asarray(bwd if bwd is not None else np.zeros(L + 1), float))


FREE = Link(0.0, math.inf)


def test_stage_time_sums_layers_pairs_and_sends():
    t = [[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]]
    pair = np.zeros((3, 3, 2))
    pair[0, 1] = [0.5, 0.0]  # layer 0 → layer 1
    pair[0, 2] = [0.25, 0.0]  # layer 0 → layer 2 (a skip connection)
    pair[1, 2] = [0.125, 0.0]
    c = costs(t=t, pair=pair, fwd=[0, 8, 16, 0], bwd=[0, 4, 4, 0])
    link = Link(alpha=1.0, beta=2.0)
    tab = stage_tables(c, ((1, 1),), ((0, 1),), 1, 1, num_microbatches=2, memory_budget=math.inf,
                       send_link=(link,))
    T = tab.dp_input.compute_cost
    # layers 0..2 on view 0: 1 + 10 + 100 + every pair inside; no neighbours, nothing sent
    assert T[0, 2, 0] == pytest.approx(111 + 0.5 + 0.25 + 0.125)
    # layers 0..1: 11 + 0.5, send 16 bytes forward over one device at 2 B/s, one transfer
    assert T[0, 1, 0] == pytest.approx(11 + 0.5 + 1 + 16 / 2)
    # layer 1 alone: 10, sends 16 forward and 4 back (gradients): two transfers
    assert T[1, 1, 0] == pytest.approx(10 + 2 + 20 / 2)
    assert tab.view[1, 1, 0] == 0  # view 0 is the faster here


def test_a_layer_without_a_plan_on_a_view_rules_the_view_out():
    c = costs(L=3, t=[[1.0, np.inf], [1.0, 0.5], [1.0, 0.5]])
    tab = stage_tables(c, ((1, 2),), ((0, 1),), 1, 2, 4, math.inf, (FREE,))
    assert tab.view[0, 2, 0] == 0 and tab.dp_input.compute_cost[0, 2, 0] == 3.0
    assert tab.view[1, 2, 0] == 1 and tab.dp_input.compute_cost[1, 2, 0] == 1.0


def test_view_choice_and_once_cost():
    c = costs(L=2, t=[[3.0, 1.0], [3.0, 1.0]], u=[[0.0, 5.0], [0.0, 5.0]])
    tab = stage_tables(c, ((1, 2),), ((0, 1),), 1, 2, 4, math.inf, (FREE,))
    assert tab.view[0, 1, 0] == 1  # the fastest t; u does not steer the view
    assert tab.dp_input.compute_cost[0, 1, 0] == 2.0
    assert tab.dp_input.once_cost[0, 1, 0] == 10.0


def test_memory_gpipe_holds_every_microbatch():
    # weights 10 B per layer, ×4 (weights, accumulators, optimizer state); residuals 3 B per
    # microbatch; peak 20 B per layer of which 10 + 3 are held: transient 7
    c = costs(L=2, V=1, w=[[10.0], [10.0]], r=[[3.0], [3.0]], p=[[20.0], [20.0]])
    need = 4 * 20 + 4 * 6 + 7  # B = 4 microbatches in flight
    tab = stage_tables(c, ((1, 1),), ((0,),), 1, 1, 4, need, (FREE,), weight_factor=4.0)
    assert tab.memory_bytes(0, 1, 0, 4) == need
    assert np.isfinite(tab.dp_input.compute_cost[0, 1, 0])
    tight = stage_tables(c, ((1, 1),), ((0,),), 1, 1, 4, need - 1, (FREE,), weight_factor=4.0)
    assert not np.isfinite(tight.dp_input.compute_cost[0, 1, 0])
    assert np.isfinite(tight.dp_input.compute_cost[0, 0, 0])  # one layer alone still fits


def test_memory_1f1b_bounds_stages_after():
    c = costs(L=1, V=1, w=[[10.0]], r=[[3.0]], p=[[13.0]])
    # static 40; room for 2 microbatches: at most 1 stage after this one
    tab = stage_tables(c, ((1, 1),), ((0,),), 1, 1, 8, 40 + 2 * 3, (FREE,), schedule="1f1b")
    assert tab.dp_input.max_n_succ_stages[0, 0, 0] == 1
    roomy = stage_tables(c, ((1, 1),), ((0,),), 1, 1, 8, 40 + 8 * 3, (FREE,), schedule="1f1b")
    assert roomy.dp_input.max_n_succ_stages[0, 0, 0] == math.inf


def test_bubble_fraction():
    assert bubble_fraction([1.0, 1.0], 4) == pytest.approx(1 / 5)  # (S-1)/(S+B-1)
    assert bubble_fraction([2.0], 8) == 0.0


# ---- the DP with a fixed number of stages ------------------------------------------------

def brute_count(inp: StageDPInput, k: int) -> float:
    best = math.inf
    sizes = [h * m for h, m in inp.submeshes]
    for cuts in itertools.product((False, True), repeat=inp.num_layers - 1):
        ranges = _ranges(inp.num_layers, cuts)
        if len(ranges) != k:
            continue
        for subs in itertools.product(range(len(sizes)), repeat=k):
            if sum(sizes[s] for s in subs) != inp.num_hosts * inp.devices_per_host:
                continue
            stages = tuple((i, j, s) for (i, j), s in zip(ranges, subs))
            if inp.max_n_succ_stages is not None and any(
                    k - 1 - pos > inp.max_n_succ_stages[i, j, s] for pos, (i, j, s) in enumerate(stages)):
                continue
            best = min(best, plan_cost(inp, stages))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_fixed_count_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 6))
    N, M = [(1, 4), (2, 2), (2, 4), (1, 8)][seed % 4]
    shapes = tuple(submesh_shapes(N, M))
    S = len(shapes)
    t = rng.uniform(1, 10, (L, L, S)) if seed % 2 else rng.integers(1, 4, (L, L, S)).astype(float)
    t[rng.uniform(size=t.shape) < 0.1] = np.inf
    u = rng.uniform(0, 5, (L, L, S))
    succ = rng.integers(0, 4, (L, L, S)).astype(float) if seed % 3 == 0 else None
    inp = StageDPInput(L, shapes, N, M, int(rng.integers(1, 6)), t, u, succ)
    for k in range(1, L + 1):
        cost, plan = stage_dp_count(inp, k)
        assert cost == pytest.approx(brute_count(inp, k), rel=1e-12) or cost == brute_count(inp, k)
        if plan is not None:
            assert len(plan.stages) == k
            assert plan_cost(inp, plan.stages) == pytest.approx(cost)


def test_fixed_count_agrees_with_free_dp_at_its_best_count():
    rng = np.random.default_rng(7)
    shapes = tuple(submesh_shapes(2, 4))
    t = rng.uniform(1, 10, (5, 5, len(shapes)))
    inp = StageDPInput(5, shapes, 2, 4, 4, t, rng.uniform(0, 2, t.shape))
    cost, plan = stage_dp(inp)
    assert stage_dp_count(inp, len(plan.stages))[0] == pytest.approx(cost)
    assert min(stage_dp_count(inp, k)[0] for k in range(1, 6)) == pytest.approx(cost)
