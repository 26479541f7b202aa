"""The problem CP-SAT actually sees: leader nodes, their edges and memory rows.

Follower merging (``ilp.merge``) folds nodes into a leader and records, per merged node, its
strategy as a function of its leader's; ``Reduced.expand`` reads every original node's strategy
back. Without merging every node is its own leader, so one code path serves both. ``simplify``
then adds up parallel edges and folds edges that need no variables (constant matrices, an end
with a single strategy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ilp.problem import IlpProblem


@dataclass
class Reduced:
    """costs: leader -> seconds per leader strategy.
    edges: edge id -> (src leader, dst leader, seconds matrix over their strategies).
    merged: (u, v, j) in merge order: node u takes strategy ``j[i]`` when node v takes i.
    memory, live_sets: the original problem's, per original node and program point.
    """

    costs: dict[int, np.ndarray]
    edges: dict[int, tuple[int, int, np.ndarray]]
    merged: list[tuple[int, int, np.ndarray]]
    memory: tuple[np.ndarray, ...]
    live_sets: tuple[tuple[int, ...], ...]

    @classmethod
    def from_problem(cls, problem: IlpProblem) -> Reduced:
        """Every node its own leader, nothing merged."""
        return cls(
            costs=dict(enumerate(problem.node_costs)),
            edges={k: (e.src, e.dst, e.cost) for k, e in enumerate(problem.edges)},
            merged=[],
            memory=problem.memory,
            live_sets=problem.live_sets,
        )

    def leader_maps(self) -> tuple[list[int], list[np.ndarray]]:
        """Per original node o: its leader L and the map with strategy_o = map[strategy_L].
        A node merged into v is resolved after v, which was merged (if at all) later: so the
        merges are walked backwards, O(nodes × strategies) in all."""
        leader = list(range(len(self.memory)))
        maps: list[np.ndarray | None] = [None] * len(self.memory)
        for v, c in self.costs.items():
            maps[v] = np.arange(c.size)
        for u, v, j in reversed(self.merged):
            leader[u] = leader[v]
            maps[u] = j[maps[v]]
        return leader, maps

    def expand(self, leader_choice: dict[int, int]) -> tuple[int, ...]:
        """Strategy of every original node given one strategy per leader."""
        leader, maps = self.leader_maps()
        return tuple(int(m[leader_choice[v]]) for v, m in zip(leader, maps, strict=True))

    def memory_rows(self, budget: float | None = None) -> list[dict[int, np.ndarray]]:
        """Per live set t, leader L -> bytes per strategy of L: Σ_{o in t, led by L} m_o[map_o].
        With a ``budget``, only the live sets that could pass it (Σ_o max m_o > budget)."""
        leader, maps = self.leader_maps()
        rows = []
        top = [float(m.max(initial=0.0)) for m in self.memory]
        moved: list[np.ndarray | None] = [None] * len(self.memory)
        for live in self.live_sets:
            if budget is not None and sum(top[o] for o in set(live)) <= budget:
                continue
            row: dict[int, np.ndarray] = {}
            for o in sorted(set(live)):
                if moved[o] is None:  # o's bytes per strategy of its leader, computed once
                    moved[o] = self.memory[o][maps[o]]
                row[leader[o]] = row[leader[o]] + moved[o] if leader[o] in row else moved[o]
            rows.append(row)
        return rows


@dataclass
class Simplified:
    """Leader costs, the edges that need variables (one per leader pair), and the constant part.

    cost(choice) = offset + Σ_v costs[v][i_v] + Σ_(a,b) edges[(a, b)][i_a, i_b]
    """

    costs: dict[int, np.ndarray]
    edges: dict[tuple[int, int], np.ndarray]
    offset: float


def _shift(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract the smallest finite value (kept as a constant): smaller terms scale better."""
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    return values - low, low


def simplify(red: Reduced) -> Simplified:
    """Add up edges per unordered leader pair; forbid (inf) the pairs with a forbidden end; fold
    an edge whose end has one allowed strategy into the other end's costs and a matrix constant
    over the allowed pairs into the offset; shift every term so its smallest finite value is 0.
    What is left needs edge variables."""
    costs = {v: c.copy() for v, c in red.costs.items()}
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for src, dst, matrix in red.edges.values():
        key, m = ((src, dst), matrix) if src < dst else ((dst, src), matrix.T)
        pairs[key] = pairs[key] + m if key in pairs else m.copy()
    allowed = {v: np.isfinite(c) for v, c in costs.items()}
    edges: dict[tuple[int, int], np.ndarray] = {}
    offset = 0.0
    for (a, b), m in pairs.items():
        grid = allowed[a][:, None] & allowed[b][None, :]
        m = np.where(grid, m, np.inf)
        if allowed[a].sum() <= 1:
            costs[b] = costs[b] + m[np.argmax(allowed[a])]
        elif allowed[b].sum() <= 1:
            costs[a] = costs[a] + m[:, np.argmax(allowed[b])]
        elif np.isfinite(m[grid]).all() and (m[grid] == m[grid][0]).all():
            offset += float(m[grid][0])
        else:
            edges[(a, b)], low = _shift(m)
            offset += low
    for v in costs:
        costs[v], low = _shift(costs[v])
        offset += low
    return Simplified(costs, edges, offset)
