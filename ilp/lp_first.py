"""The LP relaxation first: when its optimum is integral, it is the ILP's optimum, proven.

The relaxation of ``ilp.solver``'s model (s_v[i], e_vu[i,j] ∈ [0, 1]; the same equalities,
memory rows and objective) is a lower bound on every plan. Its optimal vertex is often integral
on planning models (chains and trees are integral outright; ``ilp.model.add_edge_vars`` notes
how close the equality form comes on transformers). Then the rounded plan (argmax_i s_v[i]) is a
plan whose cost equals the bound: optimal, and CP-SAT need not run. Otherwise nothing is decided
here and CP-SAT solves the model as before.

Solved with HiGHS's dual simplex (``scipy.optimize.linprog``, one thread: the same vertex every
run), the constraint matrix built with numpy. Measured on a Flax LM's training step (2 layers,
2x4 mesh, 141 nodes after elimination, 117k columns): integral, HiGHS 0.9 s, where CP-SAT took
3.9-4.7 deterministic units (7-14 s on this 2-core machine, shared). Costs are divided by the
largest finite term (HiGHS's tolerances are absolute, ~1e-7; planning costs are microseconds)
and memory by the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from alpa_lite.ir.errors import CutOffError
from ilp.reduced import Simplified

# A rounded plan is taken as optimal when its cost is within this fraction of the LP bound (the
# LP's own tolerances are ~1e-7 of the largest term; CP-SAT rounds terms to 1e-9 of it).
REL_GAP = 1e-6
# Simplex iterations allowed per constraint row (see ``relaxation``).
ITERATIONS_PER_ROW = 1.5
# Integral: every node's largest s_v[i] at least 1 - this.
INTEGRAL_TOL = 1e-6


@dataclass(frozen=True)
class LpProof:
    """An optimal choice proven by the relaxation; sizes of the LP (reported as the model's)."""

    choice: dict[int, int]
    bound: float
    num_variables: int
    num_constraints: int
    wall_clock_stop: bool = False


def _columns(simple: Simplified) -> tuple[dict[int, int], list[tuple[tuple[int, int], np.ndarray, int]], int]:
    """Column offsets: strategy columns per node, then one column per allowed pair per edge."""
    offset, n = {}, 0
    for v, c in simple.costs.items():
        offset[v], n = n, n + c.size
    pairs = []
    for key, m in simple.edges.items():
        ij = np.argwhere(np.isfinite(m))
        pairs.append((key, ij, n))
        n += len(ij)
    return offset, pairs, n


def relaxation(simple: Simplified, rows: list[dict[int, np.ndarray]], budget: float | None
               ) -> tuple[np.ndarray, float, dict[int, int], tuple[int, int]] | None:
    """``(x, bound, column offset per node, (columns, rows))`` of the LP optimum, or None when
    HiGHS finds none within its iteration limit."""
    offset, pairs, n = _columns(simple)
    finite = [t[np.isfinite(t)] for t in [*simple.costs.values(), *simple.edges.values()]]
    scale = max((float(np.abs(t).max()) for t in finite if t.size), default=1.0) or 1.0
    cost, upper = np.zeros(n), np.zeros(n)
    r_idx, c_idx, vals = [], [], []
    num_eq = 0
    for v, c in simple.costs.items():  # Σ_i s_v[i] = 1
        cols = offset[v] + np.arange(c.size)
        ok = np.isfinite(c)
        cost[cols[ok]], upper[cols[ok]] = c[ok] / scale, 1.0
        r_idx.append(np.full(c.size, num_eq))
        c_idx.append(cols)
        vals.append(np.ones(c.size))
        num_eq += 1
    for (a, b), ij, start in pairs:  # Σ_j e[i,j] = s_a[i],  Σ_i e[i,j] = s_b[j]
        m = simple.edges[(a, b)]
        cols = start + np.arange(len(ij))
        cost[cols], upper[cols] = m[ij[:, 0], ij[:, 1]] / scale, 1.0
        for end, side in ((a, 0), (b, 1)):
            k = m.shape[side]
            r_idx += [num_eq + ij[:, side], num_eq + np.arange(k)]
            c_idx += [cols, offset[end] + np.arange(k)]
            vals += [np.ones(len(ij)), -np.ones(k)]
            num_eq += k
    a_eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=(num_eq, n))
    b_eq = np.zeros(num_eq)
    b_eq[: len(simple.costs)] = 1.0
    a_ub = b_ub = None
    if rows and budget is not None and math.isfinite(budget):  # Σ m_v[i] s_v[i] / M ≤ 1
        ur, uc, uv = [], [], []
        for k, row in enumerate(rows):
            for v, m in row.items():
                ur.append(np.full(m.size, k))
                uc.append(offset[v] + np.arange(m.size))
                uv.append(np.asarray(m, float) / budget)
        a_ub = sp.csr_matrix((np.concatenate(uv), (np.concatenate(ur), np.concatenate(uc))), shape=(len(rows), n))
        b_ub = np.ones(len(rows))
    # An iteration limit, not a time limit: whether the LP decides is the same in every run.
    # Planning models take 0.4-0.9 simplex iterations per row (Flax and dict transformers); the
    # adversarial models of tests/ilp ~2-3 (40k-96k iterations, 20-50 s): those go to CP-SAT.
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=np.stack([np.zeros(n), upper], 1),
                  method="highs-ds", options={"maxiter": int(ITERATIONS_PER_ROW * (num_eq + len(rows)))})
    if res.status != 0:
        return None
    return res.x, float(res.fun) * scale + simple.offset, offset, (n, num_eq + len(rows))


def plan_cost(simple: Simplified, choice: dict[int, int]) -> float:
    """Σ_v c_v[choice_v] + Σ_(a,b) R_ab[choice_a, choice_b] + offset."""
    return (simple.offset + sum(float(c[choice[v]]) for v, c in simple.costs.items())
            + sum(float(m[choice[a], choice[b]]) for (a, b), m in simple.edges.items()))


def proven_by_lp(simple: Simplified, rows: list[dict[int, np.ndarray]], budget: float | None,
                 fits: Callable[[dict[int, int]], bool], cutoff: float | None = None) -> LpProof | None:
    """The optimum when the relaxation's is integral and ``fits(choice)`` (finite, within the
    memory rows); None otherwise (CP-SAT decides). Raises ``CutOffError`` when the relaxation's
    bound passes ``cutoff``: no plan costs less (the bound is below every plan's cost)."""
    if not simple.costs:
        return None
    found = relaxation(simple, rows, budget)
    if found is None:
        return None
    x, bound, offset, (num_vars, num_cons) = found
    if cutoff is not None and bound > cutoff:
        raise CutOffError(f"no plan costs less than {bound:.6g} s (the LP relaxation's bound), above the "
                          f"cutoff of {cutoff:.6g} s", bound, cutoff)
    choice = {}
    for v, c in simple.costs.items():
        s = x[offset[v]: offset[v] + c.size]
        if s.max() < 1.0 - INTEGRAL_TOL:
            return None
        choice[v] = int(np.argmax(s))
    if not fits(choice):
        return None
    cost = plan_cost(simple, choice)
    if not cost <= bound + REL_GAP * max(abs(bound), abs(cost)):
        return None
    return LpProof(choice, min(bound, cost), num_vars, num_cons)
