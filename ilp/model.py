"""Build the CP-SAT model of ``ilp.solver``'s docstring from a reduced problem.

Costs become integers through ``cost_scale`` (units per second), memory through
``memory_unit`` (bytes per unit, rounded so a scaled-feasible plan is truly feasible). The
``add_*`` functions each add one family of variables or constraints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from ilp.reduced import Simplified

# Largest finite single cost term after scaling: well inside int64 and precise to 1e-9 of it.
_TERM_UNITS = 1e9
# At least one unit per nanosecond (when the total allows), so small terms are not rounded away.
_UNITS_PER_SECOND = 1e9
# The objective's largest possible value stays below this (2^50 ≈ 1.1e15: exact in a double,
# which CP-SAT's LP relaxation uses, and far from int64 overflow).
_MAX_TOTAL_UNITS = float(2**50)


@dataclass
class Model:
    """A CP-SAT model plus what is needed to read a solution back."""

    cp: cp_model.CpModel = field(default_factory=cp_model.CpModel)
    s: dict[int, list[cp_model.IntVar]] = field(default_factory=dict)
    e: dict[tuple[int, int], EdgeVars] = field(default_factory=dict)
    scale: float = 1.0
    offset: float = 0.0
    peak: cp_model.IntVar | None = None
    memory_unit: float = 1.0
    wall_clock_stop: bool = False  # set by the solver: the wall clock ended the search

    @property
    def num_variables(self) -> int:
        return len(self.cp.proto.variables)

    @property
    def num_constraints(self) -> int:
        return len(self.cp.proto.constraints)


def cost_scale(simple: Simplified) -> float:
    """Units per second: the largest finite term maps to ~1e9 units, with at least 1e9 units per
    second (1 per ns) unless the sum of all largest terms would pass 2^50 units."""
    terms = [c[np.isfinite(c)] for c in simple.costs.values()]
    terms += [m[np.isfinite(m)] for m in simple.edges.values()]
    largest = [float(t.max()) for t in terms if t.size]
    if not largest or max(largest) <= 0:
        return 1.0
    scale = max(_TERM_UNITS / max(largest), _UNITS_PER_SECOND)
    return min(scale, _MAX_TOTAL_UNITS / sum(largest))


def memory_unit(rows: list[dict[int, np.ndarray]]) -> float:
    """Bytes per memory unit: 1 (exact for whole bytes) unless a live set could pass 2^50."""
    largest = max((sum(float(m.max()) for m in row.values()) for row in rows), default=0.0)
    return 1.0 if largest <= _MAX_TOTAL_UNITS else largest / 2.0**40


def binding_rows(rows: list[dict[int, np.ndarray]], costs: dict[int, np.ndarray],
                 budget: float | None) -> list[dict[int, np.ndarray]]:
    """The rows that can pass ``budget`` (bytes) when every node keeps its largest allowed
    strategy; the others can never bind. No budget: none bind."""
    if budget is None or not math.isfinite(budget):
        return []
    allowed = {v: np.isfinite(c) for v, c in costs.items()}
    top: dict[tuple[int, int], float] = {}  # rows share their arrays: each maximum once

    def most(v: int, m: np.ndarray) -> float:
        key = (v, id(m))
        if key not in top:
            top[key] = float(m[allowed[v]].max(initial=0.0))
        return top[key]

    return [r for r in rows if sum(most(v, m) for v, m in r.items()) > budget]


def fold_rows(rows: list[dict[int, np.ndarray]], kept: dict[int, np.ndarray],
              costs: dict[int, np.ndarray]) -> list[dict[int, np.ndarray]] | None:
    """Rows over the ``kept`` nodes only: an eliminated node's bytes (equal for all its allowed
    strategies, ``ilp.eliminate``) are added to a kept node of its row. None when a row has no
    kept node: ``rows`` are binding rows, so its fixed bytes pass the budget (infeasible)."""
    out = []
    for row in rows:
        fixed = sum(float(m[np.isfinite(costs[v])][0]) for v, m in row.items()
                    if v not in kept and np.isfinite(costs[v]).any())
        new = {v: m for v, m in row.items() if v in kept}
        if not new:
            return None
        first = min(new)
        new[first] = new[first] + fixed
        out.append(new)
    return out


def integer_rows(
    rows: list[dict[int, np.ndarray]],
    allowed: dict[int, np.ndarray],
    unit: float,
    budget_units: int | None,
) -> list[dict[int, np.ndarray]]:
    """Live sets as integer rows (bytes / unit rounded up), without duplicates and without the
    rows that cannot exceed the budget even when each node keeps its largest allowed strategy."""
    seen: dict[tuple, dict[int, np.ndarray]] = {}
    for row in rows:
        scaled = {v: np.ceil(m / unit).astype(np.int64) for v, m in row.items()}
        key = tuple((v, m.tobytes()) for v, m in sorted(scaled.items()))
        seen.setdefault(key, scaled)
    rows = list(seen.values())
    if budget_units is not None:
        rows = [r for r in rows if _row_max(r, allowed) > budget_units]
    return rows


def _row_max(row: dict[int, np.ndarray], allowed: dict[int, np.ndarray]) -> int:
    return sum(int(m[allowed[v]].max(initial=0)) for v, m in row.items())


def add_strategy_vars(model: Model, costs: dict[int, np.ndarray]) -> None:
    """s_v[i] ∈ {0, 1},  Σ_i s_v[i] = 1 for every node v,  s_v[i] = 0 where c_v[i] = inf."""
    for v, c in costs.items():
        s = [model.cp.new_bool_var(f"s{v}_{i}") for i in range(c.size)]
        model.cp.add_exactly_one(s)
        for i in np.flatnonzero(~np.isfinite(c)):
            model.cp.add(s[i] == 0)
        model.s[v] = s


def _classes(rows: np.ndarray) -> np.ndarray:
    """Class of each row: rows equal entry for entry (inf included) share one, numbered in order
    of first appearance (deterministic)."""
    table: dict[bytes, int] = {}
    return np.array([table.setdefault(r.tobytes(), len(table)) for r in rows], dtype=np.int64)


@dataclass(frozen=True)
class EdgeVars:
    """The pair variables of one edge, over classes of equal rows and of equal columns of R:
    ``pairs[(I, J)]`` is e over row class I × column class J; ``row_class[i]``, ``col_class[j]``."""

    pairs: dict[tuple[int, int], cp_model.IntVar]
    row_class: np.ndarray
    col_class: np.ndarray
    rep_row: np.ndarray  # a strategy of each row class (for R's value)
    rep_col: np.ndarray

    def value(self, i: int, j: int) -> tuple[int, int]:
        return int(self.row_class[i]), int(self.col_class[j])


def add_edge_vars(model: Model, a: int, b: int, matrix: np.ndarray) -> None:
    """e_ab[I,J] ∈ {0, 1} for the allowed pairs of *classes* (R[I,J] < inf; ``simplify`` has set
    R to inf where an end is forbidden), with the marginals as equalities:
    Σ_J e_ab[I,J] = Σ_{i∈I} s_a[i] ∀I,  Σ_I e_ab[I,J] = Σ_{j∈J} s_b[j] ∀J  (so Σ e_ab = 1).

    Classes: strategies of ``a`` whose rows of R are equal (they give the consumer the same spec:
    many operand splits of a dot make one output spec), and of ``b`` whose columns are equal.
    Exact: with one-hot s the only e that is 1 is (class of a's pick, class of b's pick), whose
    R is that pair's; and the LP relaxation is the per-strategy one's projection (costs are
    equal within a class), so its bound is the same. On a Flax LM's training step (2 layers, 2x4
    mesh) 122k pair variables become ~35k (class counts: a 35-strategy attention dot gives its
    reader ~15 distinct specs).

    Equalities, not ``≤ s`` with an exactly-one over the pairs (equivalent for integer and for
    fractional points): CP-SAT's presolve turns the ``≤`` form into at-most-one clauses whose
    linear relaxation it builds up lazily, and its bound then starts far below the optimum.
    Measured with one worker (ortools 9.15) on the tied model of a 96-layer hidden-8192 GPT on
    64 GPUs (189 nodes, 55k variables, 22 memory rows): 34 s → 16 s, and 4.4 s with
    ``add_lp_constraints_lazily=False`` (``ilp.solver._run``); without memory rows 20 s → 2.2 s.
    Without memory rows, HiGHS's LP of this form (scipy, a one-off check) is within 1e-9 of
    that model's optimum, 18 of 189 nodes fractional."""
    row_class, col_class = _classes(matrix), _classes(matrix.T)
    rep_row = np.unique(row_class, return_index=True)[1]
    rep_col = np.unique(col_class, return_index=True)[1]
    small = matrix[np.ix_(rep_row, rep_col)]
    pairs = {
        (int(i), int(j)): model.cp.new_bool_var(f"e{a}_{b}_{i}_{j}")
        for i, j in np.argwhere(np.isfinite(small))
    }
    rows: list[list] = [[] for _ in range(small.shape[0])]
    cols: list[list] = [[] for _ in range(small.shape[1])]
    for (i, j), var in pairs.items():
        rows[i].append(var)
        cols[j].append(var)
    for k, vars_ in enumerate(rows):
        model.cp.add(sum(vars_) == sum(model.s[a][i] for i in np.flatnonzero(row_class == k)))
    for k, vars_ in enumerate(cols):
        model.cp.add(sum(vars_) == sum(model.s[b][j] for j in np.flatnonzero(col_class == k)))
    model.e[(a, b)] = EdgeVars(pairs, row_class, col_class, rep_row, rep_col)


def add_memory_limits(model: Model, rows: list[dict[int, np.ndarray]], budget_units: int) -> None:
    """Σ_{v live at t} Σ_i s_v[i]·m_v[i] ≤ M for every (kept) live set t."""
    for row in rows:
        model.cp.add(_row_expr(model, row) <= budget_units)


def add_peak_memory(model: Model, rows: list[dict[int, np.ndarray]]) -> None:
    """P ≥ Σ_{v live at t} Σ_i s_v[i]·m_v[i] for every live set t; P is ``model.peak``."""
    top = max((sum(int(m.max()) for m in row.values()) for row in rows), default=0)
    model.peak = model.cp.new_int_var(0, top, "peak_memory")
    for row in rows:
        model.cp.add(_row_expr(model, row) <= model.peak)


def _row_expr(model: Model, row: dict[int, np.ndarray]) -> cp_model.LinearExpr:
    variables = [x for v in row for x in model.s[v]]
    weights = [int(w) for m in row.values() for w in m]
    return cp_model.LinearExpr.weighted_sum(variables, weights)


def add_cost_objective(model: Model, simple: Simplified) -> None:
    """minimise Σ_v Σ_i s_v[i]·c_v[i] + Σ_(a,b) Σ_ij e_ab[i,j]·R_ab[i,j], each term rounded to
    integer units (``model.scale`` per second); the constant part is ``model.offset`` seconds."""
    variables: list = []
    weights: list[int] = []
    for v, c in simple.costs.items():
        for i in np.flatnonzero(np.isfinite(c)):
            variables.append(model.s[v][i])
            weights.append(int(round(c[i] * model.scale)))
    for key, ev in model.e.items():
        matrix = simple.edges[key]
        for (i, j), var in ev.pairs.items():
            variables.append(var)
            weights.append(int(round(matrix[ev.rep_row[i], ev.rep_col[j]] * model.scale)))
    model.cp.minimize(cp_model.LinearExpr.weighted_sum(variables, weights))


def build_cost_model(simple: Simplified, rows: list[dict[int, np.ndarray]], budget: float | None) -> Model:
    """The planning model: strategies, edges, memory limits (``rows``: per live set, node →
    bytes per strategy, as ``Reduced.memory_rows`` gives them), cost objective."""
    model = Model(scale=cost_scale(simple), offset=simple.offset)
    allowed = {v: np.isfinite(c) for v, c in simple.costs.items()}
    add_strategy_vars(model, simple.costs)
    for (a, b), matrix in simple.edges.items():
        add_edge_vars(model, a, b, matrix)
    if budget is not None and math.isfinite(budget):
        model.memory_unit = memory_unit(rows)
        budget_units = math.floor(budget / model.memory_unit)
        add_memory_limits(
            model, integer_rows(rows, allowed, model.memory_unit, budget_units), budget_units
        )
    add_cost_objective(model, simple)
    return model


def build_peak_model(simple: Simplified, rows: list[dict[int, np.ndarray]]) -> Model:
    """The same choices and forbidden pairs, minimising the peak memory P instead of cost."""
    model = Model(scale=0.0)
    allowed = {v: np.isfinite(c) for v, c in simple.costs.items()}
    add_strategy_vars(model, simple.costs)
    for (a, b), matrix in simple.edges.items():
        add_edge_vars(model, a, b, matrix)
    model.memory_unit = memory_unit(rows)
    add_peak_memory(model, integer_rows(rows, allowed, model.memory_unit, None))
    model.cp.minimize(model.peak)
    return model
