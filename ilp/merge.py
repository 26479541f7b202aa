"""Follower merging: fold an op that only follows one operand into that operand (as Alpa does).

A node u is a follower of v when the caller's follow map says so (``alpa_lite.intra.follow``: u lays
out v's value as v does, in every strategy of v; u may read other nodes too, whose edges are
then remapped to v: R'_wv[k, i] = R_wu[k, j(i)]), or, without a follow map, when u has at least
one in-edge, every in-edge of u comes from v,
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

from collections.abc import Mapping

import numpy as np

from ilp.reduced import Reduced

Follow = Mapping[int, tuple[int, np.ndarray]]


class _Index:
    """In-edges and out-edges per leader, kept current while merging."""

    def __init__(self, red: Reduced) -> None:
        self.ins: dict[int, set[int]] = {v: set() for v in red.costs}
        self.outs: dict[int, set[int]] = {v: set() for v in red.costs}
        for k, (src, dst, _) in red.edges.items():
            self.outs[src].add(k)
            self.ins[dst].add(k)


def _sources(red: Reduced, index: _Index, u: int) -> set[int]:
    """Nodes with an edge into u, leaving out single-strategy nodes (constants): their edges are
    a fixed cost row of u, folded into u's costs on merging."""
    return {red.edges[k][0] for k in index.ins[u] if red.costs[red.edges[k][0]].size > 1}


def _leader_of(red: Reduced, index: _Index, u: int, follow: Follow | None) -> int | None:
    """The node u follows, or None when u is not a follower."""
    sources = _sources(red, index, u)
    if follow is not None:
        # The caller says which strategy of u *is* each strategy of v (same layout): Alpa's
        # meaning of "follow". Merge only when every strategy of v has one; u's other sources
        # then reshard to v's layout along their (remapped) edges.
        f = follow.get(u)
        if f is None or f[0] not in sources or not bool(np.all(f[1] >= 0)):
            return None
        v = f[0]
        return None if v > u or any(red.edges[k][1] == v for k in index.outs[u]) else v
    if len(sources) != 1:
        return None
    (v,) = sources
    if v > u or any(red.edges[k][1] == v for k in index.outs[u]):
        return None
    # Without that knowledge: u has no more strategies than v and, whatever v picks, u can
    # follow it at zero resharding cost.
    if red.costs[u].size > red.costs[v].size:
        return None
    reshard = sum(red.edges[k][2] for k in index.ins[u] if red.edges[k][0] == v)
    if not np.all(np.any(reshard == 0, axis=1)):
        return None
    return v


def _merge(red: Reduced, index: _Index, u: int, v: int, follow: Follow | None) -> None:
    """Fold follower u into v (formulas in the module docstring)."""
    for k in [k for k in index.ins[u] if red.edges[k][0] != v]:
        src, _, matrix = red.edges[k]
        if red.costs[src].size > 1:
            continue  # another source: remapped below, once j is known
        del red.edges[k]  # constants: a fixed cost row
        red.costs[u] = red.costs[u] + matrix[0]
        index.outs[src].discard(k)
        index.ins[u].discard(k)
    own = [k for k in index.ins[u] if red.edges[k][0] == v]
    reshard = sum(red.edges[k][2] for k in own)
    if follow is not None:
        j = np.asarray(follow[u][1], dtype=np.int64)
    else:
        # Follow at zero resharding cost; among those columns the cheapest (ties: smallest j).
        j = np.argmin(np.where(reshard == 0, red.costs[u][None, :], np.inf) + reshard, axis=1)
    total = red.costs[u][None, :] + reshard
    red.costs[v] = red.costs[v] + total[np.arange(j.size), j]
    for k in own:
        del red.edges[k]
        index.outs[v].discard(k)
    for k in [k for k in index.ins[u] if k not in own]:  # w -> u becomes w -> v
        w, _, matrix = red.edges[k]
        red.edges[k] = (w, v, matrix[:, j])
        index.ins[v].add(k)
    for k in index.outs[u]:
        _, w, matrix = red.edges[k]
        red.edges[k] = (v, w, matrix[j])
        index.outs[v].add(k)
    red.merged.append((u, v, j))
    del red.costs[u], index.ins[u], index.outs[u]


def merge_followers(red: Reduced, follow: Follow | None = None) -> int:
    """Merge followers into their leaders in place until none is left; return how many merged.

    ``follow[u] = (v, j)``: strategy ``j[i]`` of u is the same layout as strategy i of v (-1:
    none). Given, it alone decides who follows whom and how."""
    index = _Index(red)
    merged = 0
    changed = True
    while changed:
        changed = False
        for u in sorted(red.costs, reverse=True):
            v = _leader_of(red, index, u, follow) if u in red.costs else None
            if v is not None:
                _merge(red, index, u, v, follow)
                merged += 1
                changed = True
    return merged
