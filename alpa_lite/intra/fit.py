"""Solve an intra-op problem so that the plan's *exact* peak memory fits the budget M.

The ILP's memory rows are a relaxation in two ways (``alpa_lite.intra.problem``):

- each resharded copy is charged its least bytes over the producer's strategies (exact copy
  nodes break the ties between identical layers and make large models unsolvable in time);
- on large programs the rows are listed at a few program points only (``LAZY_ROWS``: listing
  all of them costs O(points × live buffers), minutes for a 96-layer GPT).

So a plan the ILP accepts may need more than M. After each solve the plan's memory at every
point is computed exactly (``memory_profile``, two prefix sums). Where it passes M:

1. at points without a row where the row would not hold either (the plan's bytes as the ILP
   counts them pass the ILP's budget): those rows are added (the highest point of each run of
   such points and ``liveness.SPREAD`` more across it, at most ``ROWS_PER_ROUND``), and the problem solved
   again: a cutting plane;
2. otherwise (the relaxed copy bytes are what it missed):
   the ILP is asked for a plan whose relaxed peak Q (the ILP's own measure) is below this
   one's by at least the overshoot P − M,

       M_{k+1} = Q_k − (P_k − M)      (Q_k ≤ M_k: the relaxed peak of plan k),

   at most ``ROUNDS`` times: every such round excludes the plans tried before.

If that does not end with a plan that fits (or a lowered budget leaves the relaxed ILP without a
plan) the exact model is solved at M, every copy and every row exact: its plan fits, or it
proves that none does (``InfeasibleError``). A relaxation with no plan at M proves it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from alpa_lite.intra.problem import IntraOpProblem, memory_profile
from alpa_lite.ir.errors import InfeasibleError
from ilp import IlpOptions, IlpSolution
from ilp.solver import Reductions, solve

log = logging.getLogger("alpa_lite.intra.fit")

# Rounds that lower the ILP's budget for the copies it under-charges, before the exact model.
# Measured on MLPs on 8 CPU devices with budgets just under the unconstrained peak: when the
# first plan overshoots, lowering rarely finds one that fits (the relaxed peak of the plans it
# finds stays far from the exact one) and the exact model (small there) decides.
ROUNDS = 3
# Rows added per round, and rounds of added rows at most (a training step peaks in a few places:
# the end of the forward pass, the optimizer; each round costs a solve).
ROWS_PER_ROUND = 64
ROW_ROUNDS = 12


def solve_within_budget(build: Callable[[bool], IntraOpProblem], options: IlpOptions,
                        ) -> tuple[IntraOpProblem, IlpSolution]:
    """``(problem, solution)`` whose exact peak fits the problem's budget. ``build(exact)``
    builds the intra-op problem: relaxed (False), or exact copies and every row (True)."""
    iop = build(False)
    budget = iop.problem.memory_budget
    if budget is None or not math.isfinite(budget):
        return iop, solve(iop.problem, options)
    target, lowered, added, solves = budget, 0, 0, 0
    reductions = Reductions()  # every round solves the same nodes and edges with other rows
    while True:
        try:
            solves += 1
            sol = solve(iop.problem, options, reductions)
        except InfeasibleError:
            if target == budget:
                raise  # the relaxation has no plan: neither has the exact model
            break
        profile = memory_profile(iop, sol.choice)
        peak = float(profile.max(initial=0.0))
        if peak <= budget:
            return iop, replace(sol, solves=solves)
        # Rows cut this plan off only where its relaxed bytes (what a row would charge) pass the
        # ILP's budget; elsewhere only the copies' exact bytes do (step 2).
        unlisted = memory_profile(iop, sol.choice, exact=False)
        unlisted[list(iop.rows)] = -np.inf
        new = iop.liveness.peaks(unlisted, target, ROWS_PER_ROUND)
        if new and added < ROW_ROUNDS:
            added += 1
            log.info("plan needs %.4g B at a point without a memory row (budget %.4g B): %d rows added to %d",
                     peak, budget, len(new), len(iop.rows))
            iop = iop.with_rows((*iop.rows, *new), target)
            continue
        if new or lowered >= ROUNDS:
            break
        lowered += 1
        target = sol.peak_memory - (peak - budget)
        log.info("plan needs %.4g B with its copies, over the budget of %.4g B: solving again with "
                 "the ILP's budget at %.4g B", peak, budget, target)
        iop = iop.with_rows(iop.rows, target)
    log.info("no relaxed plan fits the budget with its copies; solving the exact model")
    return (exact := build(True)), replace(solve(exact.problem, options), solves=solves + 1)
