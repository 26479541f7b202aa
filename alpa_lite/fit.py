"""Solve an intra-op problem so that the plan's *exact* peak memory fits the budget.

The ILP charges each resharded copy its least bytes over the producer's strategies
(``alpa_lite.intra_op``: exact copy nodes break the ties between identical layers and make large
models unsolvable in time), so its memory rows are a relaxation: a plan it accepts may need more
than it said. After each solve the plan's exact peak P_k (``peak_memory``) is compared with the
budget M; while P_k > M the ILP is asked for a plan whose relaxed peak Q (the ILP's own measure)
is below this one's by at least the overshoot,

    M_{k+1} = Q_k − (P_k − M)      (Q_k ≤ M_k: the relaxed peak of plan k),

and solved again, at most ``ROUNDS`` times: every round excludes the plans tried before. If no
round fits (or a lowered budget leaves the relaxed ILP without a plan) the exact model is solved
at M: its plan fits, or it proves that none does (``InfeasibleError``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

from alpa_lite.errors import InfeasibleError
from alpa_lite.intra_op import IntraOpProblem, peak_memory
from ilp import IlpOptions, IlpSolution
from ilp.solver import solve

log = logging.getLogger("alpa_lite.fit")

# Relaxed solves before the exact model. Measured on GPT training steps whose budget binds
# (hidden 8192, 4-24 layers, 64 GPUs; MLPs on 8 CPU devices): the first plan fitted in every
# case tried, so the rounds are a net, and the exact model (minutes at scale) a last resort.
ROUNDS = 3


def solve_within_budget(build: Callable[[bool], IntraOpProblem], options: IlpOptions,
                        ) -> tuple[IntraOpProblem, IlpSolution]:
    """``(problem, solution)`` whose exact peak fits the problem's budget. ``build(exact)``
    builds the intra-op problem with relaxed (False) or exact (True) copies."""
    iop = build(False)
    budget = iop.problem.memory_budget
    if budget is None or not math.isfinite(budget):
        return iop, solve(iop.problem, options)
    target = budget
    for k in range(ROUNDS):
        try:
            sol = solve(iop.problem if k == 0 else replace(iop.problem, memory_budget=target), options)
        except InfeasibleError:
            if k == 0:
                raise  # the relaxation has no plan: neither has the exact model
            break
        peak = peak_memory(iop, sol.choice)
        if peak <= budget:
            return iop, sol
        target = sol.peak_memory - (peak - budget)
        log.info("plan needs %.4g B with its copies, over the budget of %.4g B: solving again with "
                 "the ILP's budget at %.4g B", peak, budget, target)
    log.info("no relaxed plan fits the budget with its copies; solving the exact model")
    return (exact := build(True)), solve(exact.problem, options)
