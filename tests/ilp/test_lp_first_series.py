"""The exact reductions before CP-SAT: series elimination of two-edge nodes, pair variables over
classes of equal rows/columns, and the LP relaxation that ends a solve when it is integral."""

from __future__ import annotations

import numpy as np
import pytest

from ilp import Edge, IlpOptions, IlpProblem, solve
from ilp.brute import brute_force
from ilp.eliminate import eliminate_leaves
from ilp.lp_first import proven_by_lp
from ilp.reduced import Reduced, simplify

CP_SAT_ONLY = IlpOptions(merge_followers=False, lp_first=False)
DIFFER = [[5.0, 0.0], [0.0, 5.0]]  # an edge whose ends want different strategies


def problem(costs, edges) -> IlpProblem:
    costs = [np.asarray(c, dtype=float) for c in costs]
    return IlpProblem(tuple(costs), tuple(Edge(a, b, np.asarray(m, float)) for a, b, m in edges),
                      tuple(np.zeros(c.size) for c in costs), (), None)


def random_cycle(n: int, k: int, seed: int) -> IlpProblem:
    """A ring: every node has two edges, so series elimination folds it down to one edge."""
    rng = np.random.default_rng(seed)
    return problem([rng.uniform(0, 1, k) for _ in range(n)],
                   [(v, (v + 1) % n, rng.uniform(0, 1, (k, k))) for v in range(n)])


@pytest.mark.parametrize("seed", range(4))
def test_series_elimination_folds_a_ring_and_keeps_its_optimum(seed):
    prob = random_cycle(6, 3, seed)
    simple = simplify(Reduced.from_problem(prob))
    elim = eliminate_leaves(simple, [])
    assert len(elim.simple.costs) < 6
    assert any(len(ends) == 2 for _, ends, _ in elim.steps)  # a series step was taken
    _, best = brute_force(prob)
    assert solve(prob, CP_SAT_ONLY).objective == pytest.approx(best, rel=1e-9)
    assert solve(prob, IlpOptions(merge_followers=False)).objective == pytest.approx(best, rel=1e-9)


def test_lp_proves_a_tree_and_leaves_a_frustrated_triangle_to_cp_sat():
    # On a tree the relaxation is integral: the LP's rounded plan is the optimum.
    rng = np.random.default_rng(3)
    tree = problem([rng.uniform(0, 1, 3) for _ in range(5)],
                   [(0, 1, rng.uniform(0, 1, (3, 3))), (0, 2, rng.uniform(0, 1, (3, 3))),
                    (2, 3, rng.uniform(0, 1, (3, 3))), (2, 4, rng.uniform(0, 1, (3, 3)))])
    simple = simplify(Reduced.from_problem(tree))
    proof = proven_by_lp(simple, [], None, lambda choice: True)
    choice, best = brute_force(tree)
    assert proof is not None and proof.bound == pytest.approx(best, rel=1e-9)
    assert tuple(proof.choice[v] for v in range(5)) == choice
    # Three nodes that each want to differ from both neighbours, with two strategies: half of
    # each strategy everywhere, every edge on its differing pairs, costs 0 in the LP; any plan
    # has two equal neighbours and costs 5. Not decided by the LP.
    triangle = problem([[0, 0]] * 3, [(0, 1, DIFFER), (1, 2, DIFFER), (0, 2, DIFFER)])
    assert proven_by_lp(simplify(Reduced.from_problem(triangle)), [], None, lambda choice: True) is None
    assert solve(triangle, IlpOptions(merge_followers=False, eliminate=False)).objective == brute_force(triangle)[1]


def test_pair_variables_over_equal_rows_are_exact_and_fewer():
    # Node 0's strategies 0-2 give node 1 the same spec (equal rows): one row class, not three.
    shared = [0.0, 3.0, 1.0]
    matrix = [shared, shared, shared, [2.0, 0.0, 4.0]]
    extra = [[1.0, 0.0, 2.0], [0.0, 2.0, 1.0], [2.0, 1.0, 0.0]]
    prob = problem([[0.5, 0.2, 0.9, 0.0], [1.0, 0.0, 0.3], [0.0, 0.1, 0.2]],
                   [(0, 1, matrix), (1, 2, extra), (0, 2, np.ones((4, 3)) - np.eye(4, 3))])
    solution = solve(prob, IlpOptions(merge_followers=False, eliminate=False, lp_first=False))
    assert solution.objective == pytest.approx(brute_force(prob)[1], rel=1e-9)
    full_pairs = 4 * 3 + 3 * 3 + 4 * 3
    assert solution.num_variables < 4 + 3 + 3 + full_pairs  # (0, 1) has 2 x 3 pair variables, not 4 x 3


def test_a_relaxation_that_did_not_decide_is_not_solved_again_for_the_same_problem(monkeypatch):
    """``alpa_lite.intra.fit`` solves one problem again with rows added or the budget lowered: once
    the LP has left a solve to CP-SAT, the later solves of that problem go to CP-SAT directly, with
    the same optimum; a problem with other costs tries the LP again."""
    from dataclasses import replace

    from ilp import solver

    calls = []
    real = solver.proven_by_lp
    monkeypatch.setattr(solver, "proven_by_lp", lambda *a: calls.append(1) or real(*a))
    triangle = problem([[0, 0]] * 3, [(0, 1, DIFFER), (1, 2, DIFFER), (0, 2, DIFFER)])
    options = IlpOptions(merge_followers=False, eliminate=False)
    kept = solver.Reductions()
    best = brute_force(triangle)[1]
    assert solve(triangle, options, kept).objective == best
    assert solve(replace(triangle, memory_budget=1.0), options, kept).objective == best
    assert calls == [1]
    tree = problem([[0.0, 1.0], [1.0, 0.0]], [(0, 1, [[0.0, 2.0], [2.0, 0.5]])])
    assert solve(tree, options, kept).objective == brute_force(tree)[1]
    assert calls == [1, 1]


@pytest.mark.parametrize("seed", range(3))
def test_a_cutoff_below_the_lp_bound_abandons_the_solve_and_one_above_changes_nothing(seed):
    """``IlpOptions.cutoff_s``: the caller has a plan this fast. The LP relaxation's bound is a
    lower bound on every plan, so once it passes the cutoff no plan can win: ``CutOffError``
    (carrying the bound); a cutoff above the optimum leaves the solve as it was."""
    from dataclasses import replace

    from alpa_lite.ir.errors import CutOffError

    prob = random_cycle(6, 3, seed)
    options = IlpOptions(merge_followers=False, eliminate=False)
    plain = solve(prob, options)
    _, best = brute_force(prob)
    with pytest.raises(CutOffError) as cut:
        solve(prob, replace(options, cutoff_s=0.5 * best))
    assert 0.5 * best < cut.value.bound <= best + 1e-9 and cut.value.cutoff == 0.5 * best
    above = solve(prob, replace(options, cutoff_s=1.01 * best))
    assert above.choice == plain.choice and above.objective == pytest.approx(best, rel=1e-9)
