"""Identical layers solved once: tie the leaders that play the same part in repeated structure.

A transformer of L identical blocks gives L copies of every node of a block, with equal cost
vectors and equal edge matrices to the corresponding copies of their neighbours. Restricting
the copies to one shared strategy turns the model into one block's worth of variables (plus
the blocks at the ends, whose neighbourhoods differ):

    classes     colour refinement (1-dimensional Weisfeiler-Leman): a leader's first colour is
                its cost vector; each round a leader's colour becomes (its colour, the multiset
                of (edge matrix, side, neighbour colour) over its edges). After ``rounds`` rounds
                two leaders share a colour when their neighbourhoods of that radius match.
                Refinement is stopped early on purpose: run to its fixed point it would tell
                the k-th block from the (k+1)-th by the distance to the program's ends.
    quotient    one node per class C with c_C = Σ_{v in C} c_v; an edge (a, b) with classes
                A ≠ B adds its matrix to the (A, B) edge; an edge inside one class adds its
                diagonal to c_A (both ends take the same strategy); a memory row adds the
                rows of a class's members: m_{C,t} = Σ_{v in C, v live at t} m_{v,t}.

Every choice of the quotient is a choice of the original problem with the same cost and
memory (each term above is that choice's term, summed), so a tied plan is always a valid plan;
it is optimal among plans that shard the copies alike, which is what a hand strategy does and
what Alpa's layer clustering assumes. ``ilp.solver`` falls back to the untied model when the
tied one has no plan (a memory budget only an uneven plan meets).

Colours are numbered in order of first appearance (dict interning, never ``hash`` of bytes,
which Python salts per process), so the classes, and the plan, are the same in every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ilp.reduced import Simplified


@dataclass(frozen=True)
class Tied:
    """The quotient problem: ``simple`` over class representatives, ``rows`` the memory rows over
    them, and ``classes[v]`` the representative (smallest leader) of leader v's class."""

    simple: Simplified
    rows: list[dict[int, np.ndarray]]
    classes: dict[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.simple.costs)

    def expand(self, class_choice: dict[int, int]) -> dict[int, int]:
        """Each leader takes its class's strategy."""
        return {v: class_choice[c] for v, c in self.classes.items()}


def _intern(table: dict, key) -> int:
    return table.setdefault(key, len(table))


def classes(simple: Simplified, rounds: int) -> dict[int, int]:
    """Leader → smallest leader with the same colour after ``rounds`` rounds (module docstring)."""
    leaders = sorted(simple.costs)
    table: dict = {}
    colour = {v: _intern(table, (simple.costs[v].shape, simple.costs[v].tobytes())) for v in leaders}
    matrices: dict = {}
    incident: dict[int, list[tuple[int, int, int]]] = {v: [] for v in leaders}
    for (a, b), m in simple.edges.items():
        k = _intern(matrices, (m.shape, m.tobytes()))
        incident[a].append((k, 0, b))  # a is the row end of the matrix, b the column end
        incident[b].append((k, 1, a))
    count = len(set(colour.values()))
    for _ in range(rounds):
        table = {}
        colour = {v: _intern(table, (colour[v], tuple(sorted((k, side, colour[w])
                                                             for k, side, w in incident[v]))))
                  for v in leaders}
        new_count = len(table)
        if new_count == count:  # stable: further rounds split nothing
            break
        count = new_count
    first: dict[int, int] = {}
    return {v: first.setdefault(colour[v], v) for v in leaders}


def quotient(simple: Simplified, rows: list[dict[int, np.ndarray]], cls: dict[int, int]) -> Tied:
    """The tied problem (module docstring); members of a class have equal cost vectors."""
    costs: dict[int, np.ndarray] = {}
    for v, c in simple.costs.items():
        r = cls[v]
        costs[r] = costs[r] + c if r in costs else c.copy()
    edges: dict[tuple[int, int], np.ndarray] = {}
    for (a, b), m in simple.edges.items():
        ra, rb = cls[a], cls[b]
        if ra == rb:
            costs[ra] = costs[ra] + np.diagonal(m)
            continue
        key, m = ((ra, rb), m) if ra < rb else ((rb, ra), m.T)
        edges[key] = edges[key] + m if key in edges else m.copy()
    tied_rows = []
    for row in rows:
        out: dict[int, np.ndarray] = {}
        for v, m in row.items():
            r = cls.get(v, v)
            out[r] = out[r] + m if r in out else m
        tied_rows.append(out)
    return Tied(Simplified(costs, edges, simple.offset), tied_rows, dict(cls))


def tie(simple: Simplified, rows: list[dict[int, np.ndarray]], rounds: int) -> Tied:
    """``quotient`` over ``classes``."""
    return quotient(simple, rows, classes(simple, rounds))
