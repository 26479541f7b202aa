"""Follower merging: fold an op that only follows one operand into that operand (as Alpa does).

A node u is a follower of v when u has at least one in-edge, every in-edge of u comes from v,
u has no more strategies than v, every strategy of v can be followed at zero resharding cost,
no edge goes u -> v (it would become a self-loop) and no in-edge v -> u points backwards
(v > u: a tie such as a step output feeding the next step's input, not a follower). Merging u
into v fixes u's strategy as a function of v's: with R = Σ_(in-edges v->u) R_vu,

    j(i) = argmin_{j : R[i, j] = 0} c_u[j]      (follow v for free; ties: smallest j)
    c_v[i]      += c_u[j(i)]                  (+ R[i, j(i)], which is 0)
    R'_vw[i, k]  = R_uw[j(i), k]            for every out-edge u -> w
    m_v,t[i]    += m_u[j(i)]                for every live set t that holds u
                                            (``Reduced.memory_rows``, once merging is done)

Nodes are visited from the highest index down (reverse program order), to a fixed point, so
chains of followers collapse into their first node. j(i) ignores u's other neighbours, its other
strategies and memory: merging is exact when following is optimal (e.g. a chain of followers
whose costs do not depend on their strategy, each with one out-edge, when resharding costs obey
the triangle inequality, as cheapest-path resharding does), a heuristic otherwise;
``IlpOptions(merge_followers=False)`` keeps the model exact.
"""

from __future__ import annotations

import numpy as np

from ilp.reduced import Reduced


class _Index:
    """In-edges and out-edges per leader, kept current while merging."""

    def __init__(self, red: Reduced) -> None:
        self.ins: dict[int, set[int]] = {v: set() for v in red.costs}
        self.outs: dict[int, set[int]] = {v: set() for v in red.costs}
        for k, (src, dst, _) in red.edges.items():
            self.outs[src].add(k)
            self.ins[dst].add(k)


def _leader_of(red: Reduced, index: _Index, u: int) -> int | None:
    """The node u follows, or None when u is not a follower."""
    sources = {red.edges[k][0] for k in index.ins[u]}
    if len(sources) != 1:
        return None
    (v,) = sources
    if v > u or any(red.edges[k][1] == v for k in index.outs[u]):
        return None
    # Alpa merges only true followers: u has no more strategies than v and, whatever v picks,
    # u can follow it at zero resharding cost. Merging a node that must pay on the edge (e.g. the
    # reduction of a partial sum) or that has more choices than its leader (a broadcast of a
    # scalar) would fix its choice by a local best response and lose plans.
    if red.costs[u].size > red.costs[v].size:
        return None
    reshard = sum(red.edges[k][2] for k in index.ins[u])
    if not np.all(np.any(reshard == 0, axis=1)):
        return None
    return v


def _merge(red: Reduced, index: _Index, u: int, v: int) -> None:
    """Fold follower u into v (formulas in the module docstring)."""
    reshard = sum(red.edges[k][2] for k in index.ins[u])
    # Follow at zero resharding cost; among those columns take the cheapest (ties: smallest j).
    total = np.where(reshard == 0, red.costs[u][None, :], np.inf) + reshard
    j = np.argmin(total, axis=1)
    total = red.costs[u][None, :] + reshard
    red.costs[v] = red.costs[v] + total[np.arange(j.size), j]
    for k in index.ins[u]:
        del red.edges[k]
        index.outs[v].discard(k)
    for k in index.outs[u]:
        _, w, matrix = red.edges[k]
        red.edges[k] = (v, w, matrix[j])
        index.outs[v].add(k)
    red.merged.append((u, v, j))
    del red.costs[u], index.ins[u], index.outs[u]


def merge_followers(red: Reduced) -> int:
    """Merge followers into their leaders in place until none is left; return how many merged."""
    index = _Index(red)
    merged = 0
    changed = True
    while changed:
        changed = False
        for u in sorted(red.costs, reverse=True):
            v = _leader_of(red, index, u) if u in red.costs else None
            if v is not None:
                _merge(red, index, u, v)
                merged += 1
                changed = True
    return merged
