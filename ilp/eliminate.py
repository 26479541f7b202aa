"""Leaf elimination: nodes with one neighbour are solved in closed form before CP-SAT runs.

A node v whose only edge block goes to w (a weight read by one merged op, an output's sink, a
broadcast of a constant) affects the cost only through c_v and R_vw. Whatever w takes, v's best
answer is known, so v is folded into w exactly (variable elimination, as in tree dynamic
programming):

    total[i, j] = c_v[i] + R_vw[i, j]
    best[j]     = argmin_i total[i, j]           (ties: the smallest i)
    c_w[j]     += total[best[j], j]              and later  choice_v = best[choice_w]

A node with no edge left takes argmin_i c_v[i] into the constant offset. Eliminating a leaf can
make its neighbour a leaf, so whole trees hanging off the graph collapse. Memory is what the
cost-only argmin ignores: a node that appears in a memory row that can bind (its members' largest
bytes could pass the budget) is kept, unless its bytes there are equal for all its allowed
strategies. So the optimum of the reduced model is the optimum of the original one.

A node v with exactly two neighbours a and b (a parameter between its reader and the tie from
its update, a reshape between two ops) is folded into one edge between them, as series
reduction in min-plus algebra, under the same memory condition:

    R'_ab[i, k] = min_j R_av[i, j] + c_v[j] + R_vb[j, k],   choice_v = argmin_j (…)[choice_a, choice_b]

added to the (a, b) edge if there is one. Exact for the same reason: given a and b, v's best
answer is known. Done only when the new edge has no more pairs than the two it replaces (or
joins an existing one), so the CP-SAT model never grows. On a Flax LM's training step (2
layers, 2x4 mesh) 296 nodes after leaf elimination become ~190 (parameters, their optimizer
moments and single-reader reshapes), 102k CP-SAT variables ~60k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ilp.reduced import Simplified


@dataclass(frozen=True)
class Eliminated:
    """The reduced problem, and ``steps`` (v, ends, best) in elimination order: choice_v =
    best[choice of each node in ends] (ends empty: ``best`` has one entry, v's fixed strategy;
    one end: a leaf folded into it; two: a series node)."""

    simple: Simplified
    steps: tuple[tuple[int, tuple[int, ...], np.ndarray], ...]

    def expand(self, choice: dict[int, int]) -> dict[int, int]:
        """Strategies of the remaining nodes → strategies of all nodes."""
        full = dict(choice)
        for v, ends, best in reversed(self.steps):
            full[v] = int(best[tuple(full[w] for w in ends)] if ends else best[0])
        return full


def _memory_neutral(simple: Simplified, rows: list[dict[int, np.ndarray]]) -> set[int]:
    """Nodes whose bytes are the same for every allowed strategy in every row they appear in."""
    neutral = set(simple.costs)
    for row in rows:
        for v, m in row.items():
            if v in neutral:
                allowed = m[np.isfinite(simple.costs[v])]
                if allowed.size and not np.all(allowed == allowed[0]):
                    neutral.discard(v)
    return neutral


def eliminate_leaves(simple: Simplified, rows: list[dict[int, np.ndarray]]) -> Eliminated:
    """Fold every leaf that memory cannot constrain into its neighbour, to a fixed point.

    ``rows`` are the memory rows that can bind (``ilp.model.binding_rows``); pass [] when no
    budget applies."""
    costs = {v: c.copy() for v, c in simple.costs.items()}
    edges = dict(simple.edges)
    offset = simple.offset
    free = _memory_neutral(simple, rows)
    incident: dict[int, set[tuple[int, int]]] = {v: set() for v in costs}
    for key in edges:
        incident[key[0]].add(key)
        incident[key[1]].add(key)
    steps: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    queue = sorted(v for v in costs if v in free and len(incident[v]) <= 2)
    while queue:
        v = queue.pop(0)
        if v not in costs or len(incident[v]) > 2:
            continue
        if not incident[v]:
            i = int(np.argmin(costs[v]))
            offset += float(costs[v][i]) if np.isfinite(costs[v][i]) else np.inf
            steps.append((v, (), np.array([i])))
            del costs[v], incident[v]
            continue
        if len(incident[v]) == 2:
            ends = _fold_series(v, costs, edges, incident, steps)
        else:
            (key,) = incident[v]
            matrix = edges.pop(key)
            w, oriented = (key[1], matrix) if key[0] == v else (key[0], matrix.T)
            total = costs[v][:, None] + oriented
            best = np.argmin(total, axis=0)
            costs[w] = costs[w] + total[best, np.arange(best.size)]
            steps.append((v, (w,), best))
            incident[w].discard(key)
            del costs[v], incident[v]
            ends = (w,)
        queue.extend(w for w in ends if w in free and len(incident[w]) <= 2)
    return Eliminated(Simplified(costs, edges, offset), tuple(steps))


def _oriented(edges: dict[tuple[int, int], np.ndarray], key: tuple[int, int], row_node: int) -> np.ndarray:
    """Edge ``key``'s matrix with ``row_node``'s strategies as rows."""
    return edges[key] if key[0] == row_node else edges[key].T


def _fold_series(v: int, costs: dict[int, np.ndarray], edges: dict[tuple[int, int], np.ndarray],
                 incident: dict[int, set[tuple[int, int]]],
                 steps: list[tuple[int, tuple[int, ...], np.ndarray]]) -> tuple[int, ...]:
    """Fold a node with two edges into one edge between its neighbours (module docstring), when
    that does not add pairs; the neighbours whose degree changed (none if v is kept)."""
    k1, k2 = sorted(incident[v])
    a = k1[0] if k1[1] == v else k1[1]
    b = k2[0] if k2[1] == v else k2[1]
    if a == b:
        return ()
    a, b, k1, k2 = (a, b, k1, k2) if a < b else (b, a, k2, k1)
    joined = (a, b) in edges
    if not joined and costs[a].size * costs[b].size > (costs[a].size + costs[b].size) * costs[v].size:
        return ()
    r_av, r_vb = _oriented(edges, k1, a), _oriented(edges, k2, v)
    with np.errstate(invalid="ignore"):
        total = r_av[:, :, None] + costs[v][None, :, None] + r_vb[None, :, :]  # [i, j, k]
    total = np.where(np.isnan(total), np.inf, total)
    best = np.argmin(total, axis=1)
    folded = np.take_along_axis(total, best[:, None, :], axis=1)[:, 0, :]
    del edges[k1], edges[k2]
    incident[a].discard(k1)
    incident[b].discard(k2)
    edges[(a, b)] = edges[(a, b)] + folded if joined else folded
    incident[a].add((a, b))
    incident[b].add((a, b))
    steps.append((v, (a, b), best))
    del costs[v], incident[v]
    return (a, b) if joined else ()


def _memory_order(rows: list[dict[int, np.ndarray]], nodes) -> dict[int, np.ndarray]:
    """Per node in a binding row: ``no_less[i, j]`` = strategy i uses at least j's bytes in every
    row (so pruning i for j never raises memory). Nodes in no row are absent (no constraint).
    A node's distinct byte vectors are compared once (rows repeat them)."""
    vectors: dict[int, dict[bytes, np.ndarray]] = {}
    for row in rows:
        for v, m in row.items():
            if v in nodes:
                vectors.setdefault(v, {}).setdefault(m.tobytes(), m)
    order: dict[int, np.ndarray] = {}
    for v, distinct in vectors.items():
        stacked = np.stack(list(distinct.values()))  # [vectors, strategies]
        order[v] = np.all(stacked[:, :, None] >= stacked[:, None, :], axis=0)
    return order


def dead_ends(simple: Simplified, rows: list[dict[int, np.ndarray]], rounds: int = 4) -> Simplified:
    """Forbid (cost inf) every strategy i of a node v that some strategy j beats whatever the
    neighbours take: Goldstein's dead-end criterion (Goldstein 1994, from protein design),

        c_v[i] − c_v[j] + Σ_{edges (v,w)} min_{k allowed at w} (R_vw[i, k] − R_vw[j, k]) > 0,

    with j using no more memory than i in every binding row (``rows``). Swapping i for j in
    any plan then lowers the cost, so no optimum uses i and the optimum is unchanged. Repeated
    (``rounds``) since a forbidden strategy at w can make v's minima larger."""
    costs = {v: c.copy() for v, c in simple.costs.items()}
    edges = dict(simple.edges)
    incident: dict[int, list[tuple[tuple[int, int], bool]]] = {v: [] for v in costs}
    for key in edges:
        incident[key[0]].append((key, True))
        incident[key[1]].append((key, False))
    mem = _memory_order(rows, costs)
    for _ in range(rounds):
        changed = False
        for v in sorted(costs):
            c = costs[v]
            ok = np.isfinite(c)
            if ok.sum() <= 1:
                continue
            idx = np.flatnonzero(ok)
            gain = c[idx][:, None] - c[idx][None, :]
            for key, row_end in incident[v]:
                m = edges[key] if row_end else edges[key].T
                m = m[idx][:, np.isfinite(costs[key[1] if row_end else key[0]])]
                if m.shape[1] == 0:
                    continue
                with np.errstate(invalid="ignore"):
                    diff = m[:, None, :] - m[None, :, :]  # [i, j, k]
                diff = np.where(np.isnan(diff), 0.0, diff)  # inf - inf: both forbidden at k
                gain = gain + diff.min(axis=2)
            if v in mem:
                gain = np.where(mem[v][np.ix_(idx, idx)], gain, -np.inf)
            np.fill_diagonal(gain, -np.inf)
            # i dead when some j beats it; among mutually-beating ties (gain 0) nothing is pruned
            dead = idx[(gain > 1e-15 * np.abs(c[idx]).max(initial=1.0)).any(axis=1)]
            if dead.size:
                costs[v] = c.copy()
                costs[v][dead] = np.inf
                changed = True
        if not changed:
            break
    for key, m in edges.items():
        a, b = key
        edges[key] = np.where(np.isfinite(costs[a])[:, None] & np.isfinite(costs[b])[None, :], m, np.inf)
    return Simplified(costs, edges, simple.offset)
