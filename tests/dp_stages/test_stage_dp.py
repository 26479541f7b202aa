"""Stage DP: cross-checked against brute force on random tables, plus hand-worked cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from alpa_lite.ir.errors import InfeasibleError, PlanningError
from dp_stages import (
    StageDPInput,
    best_stage_plan,
    brute_force_stages,
    plan_cost,
    stage_dp,
    submesh_shapes,
)
from dp_stages.brute import _cost as brute_cost
from dp_stages.brute import _ranges as brute_ranges
from dp_stages.dp import _dp, prepare


def make_input(t, *, N=1, M=2, B=1, u=None, succ=None, submeshes=None):
    t = np.asarray(t, dtype=float)
    shapes = tuple(submeshes or submesh_shapes(N, M))
    return StageDPInput(t.shape[0], shapes, N, M, B, t, u, succ)


def table(L, S, entries, fill=np.inf):
    """[L, L, S] table filled with ``fill`` except {(i, j, s): value}."""
    a = np.full((L, L, S), fill)
    for key, value in entries.items():
        a[key] = value
    return a


def assert_valid(inp, plan):
    """Checks the plan against the constraints, independently of the DP's code."""
    stages = plan.stages
    assert stages[0][0] == 0 and stages[-1][1] == inp.num_layers - 1
    for (_, j, _), (i2, _, _) in itertools.pairwise(stages):
        assert i2 == j + 1, "stages must cover consecutive layers"
    used = sum(inp.submeshes[s][0] * inp.submeshes[s][1] for _, _, s in stages)
    assert used == inp.num_hosts * inp.devices_per_host, "must cover the cluster exactly"
    for pos, (i, j, s) in enumerate(stages):
        assert i <= j and math.isfinite(inp.compute_cost[i, j, s])
        if inp.max_n_succ_stages is not None:
            assert len(stages) - 1 - pos <= inp.max_n_succ_stages[i, j, s]
    ts = [inp.compute_cost[i, j, s] for i, j, s in stages]
    us = [0.0 if inp.once_cost is None else inp.once_cost[i, j, s] for i, j, s in stages]
    by_hand = sum(ts) + (inp.num_microbatches - 1) * max(ts) + max(us)
    assert plan.total_cost == pytest.approx(by_hand, rel=1e-12)
    assert plan.t_max == max(ts)


def random_input(rng, L, N, M, B, *, with_u, with_succ, integer):
    shapes = submesh_shapes(N, M)
    S = len(shapes)
    if integer:  # many ties: stresses the >= pruning
        t = rng.integers(1, 4, (L, L, S)).astype(float)
    else:
        t = rng.uniform(0.1, 10.0, (L, L, S))
    t[rng.random(t.shape) < 0.2] = np.inf  # e.g. over memory
    u = rng.uniform(0.0, 8.0, (L, L, S)) if with_u else None
    succ = rng.integers(0, 4, (L, L, S)) if with_succ else None
    return make_input(t, N=N, M=M, B=B, u=u, succ=succ)


VARIANTS = [
    dict(with_u=False, with_succ=False, integer=False),
    dict(with_u=True, with_succ=False, integer=False),
    dict(with_u=True, with_succ=True, integer=False),
    dict(with_u=False, with_succ=True, integer=True),
    dict(with_u=True, with_succ=False, integer=True),
]


@pytest.mark.parametrize("B", [1, 2, 4, 8])
@pytest.mark.parametrize("N,M", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)])
def test_dp_equals_brute_force(N, M, B):
    feasible = multi_stage = 0
    for L, seed, variant in itertools.product(range(1, 6), range(3), range(len(VARIANTS))):
        rng = np.random.default_rng([N, M, B, L, seed, variant])
        inp = random_input(rng, L, N, M, B, **VARIANTS[variant])
        cost, plan = stage_dp(inp)
        want, want_plan = brute_force_stages(inp)
        if want_plan is None:
            assert cost == math.inf and plan is None
            continue
        assert cost == pytest.approx(want, rel=1e-9)
        assert plan_cost(inp, plan.stages) == pytest.approx(cost, rel=1e-12)
        assert_valid(inp, plan)
        feasible += 1
        multi_stage += len(plan.stages) > 1
    # the tables must exercise the DP: mostly feasible, and pipelines chosen where possible
    assert feasible >= 40
    if N * M > 1:
        assert multi_stage >= 5


@pytest.mark.parametrize("seed", range(4))
def test_dp_equals_brute_force_deeper(seed):
    rng = np.random.default_rng(100 + seed)
    inp = random_input(rng, 7, 1, 4, 4, with_u=True, with_succ=seed % 2 == 1, integer=False)
    cost, plan = stage_dp(inp)
    want, _ = brute_force_stages(inp)
    assert cost == pytest.approx(want, rel=1e-9)
    assert_valid(inp, plan)


def test_u_heavy_tables_need_the_u_front():
    """u dominates t: the plan with least Σ t under a t cap is often not the best."""
    differs = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        L, N, M = 4, 2, 2
        S = len(submesh_shapes(N, M))
        t = rng.uniform(1.0, 2.0, (L, L, S))
        u = rng.uniform(0.0, 20.0, (L, L, S))
        inp = make_input(t, N=N, M=M, B=4, u=u)
        cost, plan = stage_dp(inp)
        want, _ = brute_force_stages(inp)
        assert cost == pytest.approx(want, rel=1e-9)
        assert_valid(inp, plan)
        no_u_plan = stage_dp(make_input(t, N=N, M=M, B=4))[1]
        differs += plan_cost(inp, no_u_plan.stages) > cost + 1e-9
    assert differs >= 5  # ignoring u would have been wrong on these tables


# 2 layers on 1 host x 2 devices, sub-meshes (1,1) and (1,2). Each layer takes 1.0 on one
# device; both layers on two devices take 1.2 (imperfect scaling). One stage costs B·1.2;
# the pipeline costs 1 + 1 + (B − 1)·1 = B + 1, so it wins iff B + 1 < 1.2·B iff B > 5.
def two_layer_table():
    return table(2, 2, {(0, 0, 0): 1.0, (1, 1, 0): 1.0, (0, 1, 1): 1.2})


@pytest.mark.parametrize(
    "B,expected,stages",
    [
        (1, 1 * 1.2, ((0, 1, 1),)),
        (4, 4 * 1.2, ((0, 1, 1),)),
        (6, 6 + 1, ((0, 0, 0), (1, 1, 0))),
        (8, 8 + 1, ((0, 0, 0), (1, 1, 0))),
    ],
)
def test_pipeline_beats_one_stage_iff_many_microbatches(B, expected, stages):
    cost, plan = stage_dp(make_input(two_layer_table(), B=B))
    assert cost == pytest.approx(expected)
    assert plan.stages == stages


def test_successor_limit_forbids_the_pipeline():
    # at B = 8 the pipeline (9.0) beats one stage (9.6), but layer 0 on one device has memory
    # for no stage after it
    succ = np.full((2, 2, 2), 10)
    succ[0, 0, 0] = 0
    cost, plan = stage_dp(make_input(two_layer_table(), B=8, succ=succ))
    assert cost == pytest.approx(8 * 1.2)
    assert plan.stages == ((0, 1, 1),)
    # the limit binds on the first stage only: a last stage may have limit 0
    succ = np.full((2, 2, 2), 10)
    succ[1, 1, 0] = 0
    assert stage_dp(make_input(two_layer_table(), B=8, succ=succ))[0] == pytest.approx(9.0)


# 3 layers on 3 hosts x 1 device. One layer on (1,1): 1.0; two layers on (2,1): 1.5; all three
# on (3,1): 2.5. At B = 4: three stages 3 + 3·1 = 6; two stages 2.5 + 3·1.5 = 7; one 4·2.5 = 10.
@pytest.mark.parametrize(
    "first_limit,other_limit,expected,num_stages",
    [(2, 2, 6.0, 3), (9, 9, 6.0, 3), (1, 2, 7.0, 2), (1, 1, 7.0, 2), (0, 0, 10.0, 1)],
)
def test_successor_limits_cap_the_pipeline_depth(first_limit, other_limit, expected, num_stages):
    t = table(3, 3, {(i, i, 0): 1.0 for i in range(3)})
    t[0, 1, 1] = t[1, 2, 1] = 1.5
    t[0, 2, 2] = 2.5
    succ = np.full((3, 3, 3), other_limit)
    succ[0, :, :] = first_limit  # stages that start at layer 0
    inp = make_input(t, N=3, M=1, B=4, succ=succ)
    cost, plan = stage_dp(inp)
    assert cost == pytest.approx(expected)
    assert len(plan.stages) == num_stages
    assert brute_force_stages(inp)[0] == pytest.approx(expected)


def test_float_successor_limits_with_inf_mean_unlimited():
    succ = np.full((2, 2, 2), np.inf)
    assert stage_dp(make_input(two_layer_table(), B=8, succ=succ))[0] == pytest.approx(9.0)
    succ[0, 0, 0] = 0.0
    assert stage_dp(make_input(two_layer_table(), B=8, succ=succ))[0] == pytest.approx(9.6)


def test_once_cost_can_flip_the_choice():
    # B = 8: pipeline 9.0 + max(1.0, 1.0) = 10.0; one stage 9.6 + 0.2 = 9.8
    u = table(2, 2, {(0, 0, 0): 1.0, (1, 1, 0): 1.0, (0, 1, 1): 0.2}, fill=0.0)
    cost, plan = stage_dp(make_input(two_layer_table(), B=8, u=u))
    assert cost == pytest.approx(9.6 + 0.2)
    assert len(plan.stages) == 1
    # equal t everywhere, B = 2: one stage 2·1 + 3 = 5, pipeline (1 + 1) + 1·1 + 1 = 4
    t = table(2, 2, {(0, 0, 0): 1.0, (1, 1, 0): 1.0, (0, 1, 1): 1.0})
    u = table(2, 2, {(0, 0, 0): 1.0, (1, 1, 0): 1.0, (0, 1, 1): 3.0}, fill=0.0)
    cost, plan = stage_dp(make_input(t, B=2, u=u))
    assert cost == pytest.approx(4.0)
    assert len(plan.stages) == 2
    assert stage_dp(make_input(t, B=2))[0] == pytest.approx(2.0)  # without u: one stage


def test_u_none_equals_zeros():
    rng = np.random.default_rng(7)
    inp = random_input(rng, 4, 2, 2, 4, with_u=False, with_succ=False, integer=False)
    zeros = make_input(inp.compute_cost, N=2, M=2, B=4, u=np.zeros_like(inp.compute_cost))
    assert stage_dp(inp)[0] == stage_dp(zeros)[0]


def test_cluster_must_be_covered_exactly():
    # one layer on 1 x 4: (1,1) is faster per microbatch but leaves 3 devices idle
    t = table(1, 3, {(0, 0, 0): 1.0, (0, 0, 1): 2.0, (0, 0, 2): 3.0})
    cost, plan = stage_dp(make_input(t, M=4, B=4))
    assert cost == pytest.approx(4 * 3.0)
    assert plan.stages == ((0, 0, 2),)
    # 2 hosts x 2: layers (0), (1) on (1,2) each, or both on (2,2)
    t = table(2, 3, {(0, 0, 1): 1.0, (1, 1, 1): 1.0, (0, 1, 2): 2.5, (0, 0, 0): 0.1})
    cost, plan = stage_dp(make_input(t, N=2, M=2, B=2))
    assert cost == pytest.approx(min(1 + 1 + 1, 2.5 * 2))
    assert plan.stages == ((0, 0, 1), (1, 1, 1))


def test_nothing_feasible():
    # the only sub-mesh uses 1 of 2 devices: no plan covers the cluster
    t = table(1, 1, {(0, 0, 0): 1.0})
    inp = make_input(t, M=2, submeshes=[(1, 1)])
    assert stage_dp(inp) == (math.inf, None)
    assert brute_force_stages(inp) == (math.inf, None)
    with pytest.raises(InfeasibleError, match="cover"):
        best_stage_plan(inp)
    # every entry over memory
    inp = make_input(np.full((2, 2, 2), np.inf))
    assert stage_dp(inp) == (math.inf, None)
    with pytest.raises(PlanningError, match="infeasible"):
        best_stage_plan(inp)


def test_best_stage_plan_returns_the_dp_plan():
    plan = best_stage_plan(make_input(two_layer_table(), B=8))
    assert plan.total_cost == pytest.approx(9.0) and plan.t_max == 1.0


def test_entries_below_the_diagonal_are_ignored():
    t = two_layer_table()
    t[1, 0, :] = np.nan  # j < i: never read
    u = np.zeros_like(t)
    u[1, 0, :] = -5.0
    assert stage_dp(make_input(t, B=8, u=u))[0] == pytest.approx(9.0)


def test_one_stage_plan_is_always_a_candidate():
    rng = np.random.default_rng(3)
    L, N, M = 10, 2, 4
    shapes = submesh_shapes(N, M)
    t = rng.uniform(0.5, 3.0, (L, L, len(shapes)))
    inp = make_input(t, N=N, M=M, B=8)
    cost, plan = stage_dp(inp)
    assert_valid(inp, plan)
    whole = shapes.index((N, M))
    assert cost <= plan_cost(inp, [(0, L - 1, whole)]) + 1e-12


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        stage_dp(make_input(np.ones((2, 2, 3))))  # 2 sub-meshes for 1 x 2
    with pytest.raises(ValueError, match="NaN"):
        stage_dp(make_input(np.full((1, 1, 2), np.nan)))
    with pytest.raises(ValueError, match="does not fit"):
        stage_dp(make_input(np.ones((1, 1, 1)), N=2, M=4, submeshes=[(2, 2)]))
    with pytest.raises(ValueError, match="num_microbatches"):
        stage_dp(make_input(np.ones((1, 1, 2)), B=0))


@pytest.mark.parametrize("seed", range(6))
def test_caps_below_the_first_feasible_one_are_skipped_exactly(seed):
    """Many cheap entries that no plan can use together (each layer alone on one device of four,
    while covering the cluster needs a stage on more): the first cap with a plan lies far up the
    ascending list, and the DP's answer is still brute force's."""
    rng = np.random.default_rng(300 + seed)
    shapes = submesh_shapes(1, 4)  # (1, 1), (1, 2), (1, 4)
    L = 6
    t = rng.uniform(5.0, 50.0, (L, L, len(shapes)))
    # one device: a single layer only, cheap; but six one-layer stages need 6 > 4 devices
    t[:, :, 0] = np.where(np.eye(L, dtype=bool), rng.uniform(0.01, 1.0, (L, L)), np.inf)
    inp = make_input(t, N=1, M=4, B=1 + seed % 3 * 3)
    cost, plan = stage_dp(inp)
    want, _ = brute_force_stages(inp)
    assert cost == pytest.approx(want, rel=1e-9)
    assert_valid(inp, plan)
    assert plan.t_max > 1.0  # the plan needed a cap above every cheap entry


def _lexicographic_brute_force(inp):
    """Least Σ t (no caps, B ignored) by enumeration, ties broken as the DP's argmin breaks
    them: fewest stages when stage limits bind, then the lexicographically least sequence of
    (sub-mesh, last layer) from the first stage."""
    L, total = inp.num_layers, inp.num_hosts * inp.devices_per_host
    sizes = [h * m for h, m in inp.submeshes]
    found = []
    for cuts in itertools.product((False, True), repeat=L - 1):
        ranges = brute_ranges(L, cuts)
        for subs in itertools.product(range(len(sizes)), repeat=len(ranges)):
            stages = tuple((i, j, s) for (i, j), s in zip(ranges, subs, strict=True))
            if sum(sizes[s] for s in subs) != total or not math.isfinite(brute_cost(inp, stages)):
                continue
            sigma = 0.0
            for i, j, s in reversed(stages):  # summed from the last stage, as the DP does
                sigma = float(inp.compute_cost[i, j, s]) + sigma
            found.append((sigma, len(stages) if inp.max_n_succ_stages is not None else 0,
                          tuple((s, j) for _, j, s in stages), stages))
    return min(found)[::3] if found else (math.inf, None)


@pytest.mark.parametrize("with_succ", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_dp_ties_go_to_the_lowest_submesh_then_the_shortest_stage(seed, with_succ):
    """On integer tables (ties everywhere, as with a model's identical layers) the DP's plan
    is fixed by its tie rule; one mask alone or among others in a batch gives the same plan."""
    rng = np.random.default_rng(500 + seed)
    inp = random_input(rng, 5, 1, 4, 1, with_u=False, with_succ=with_succ, integer=True)
    tab = prepare(inp)
    valid = np.isfinite(tab.t)
    caps = np.unique(tab.t[valid])
    masks = valid[None] & (tab.t[None] <= caps[:, None, None, None])
    batched = _dp(tab, masks)
    for cap, mask, got in zip(caps, masks, batched, strict=True):
        capped = make_input(np.where(mask, tab.t, np.inf), N=1, M=4, succ=inp.max_n_succ_stages)
        assert got == _lexicographic_brute_force(capped), f"cap {cap}"
        assert _dp(tab, mask[None])[0] == got
