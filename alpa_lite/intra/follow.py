"""Which operand an op follows: the follow maps ``ilp.merge`` folds followers with (as Alpa does).

An op u *follows* a producer v when, for every strategy i of v, u has a strategy ``j[i]`` that
takes v's output exactly as v lays it out (same spec, not a partial sum) and lays out its own
result that way too. Merging then fixes u's strategy as ``j[i]`` and u's other operands are
resharded to it along their edges.

Which producer: an op reading one multi-strategy producer follows it. An op reading several
(a residual add, ``x * gate``) follows one of them, chosen as Alpa's auto-sharding pass does
(``ChooseOperandToFollow`` in alpa's auto_sharding_strategy.cc): the operand produced last
(deepest, so the chain it continues is the one kept free of resharding), ties going to the
larger tensor; only producers u can follow in every strategy qualify. This is a restriction
(u could also adopt the other operand's layout), the heuristic Alpa uses to keep its ILP small;
``IlpOptions(merge_followers=False)`` solves without it.
"""

from __future__ import annotations

import numpy as np

from alpa_lite.ir.specs import ShardingSpec
from cost_model.builder import StrategyGraph


def follow_maps(sgraph: StrategyGraph) -> dict[int, tuple[int, np.ndarray]]:
    """``{u: (v, j)}``: strategy ``j[i]`` of op u lays out its operand from v, and its output, as
    strategy i of v does (module docstring)."""
    g, strats = sgraph.graph, sgraph.strategies
    follow = {}
    for op in g.ops:
        if op.index in sgraph.unconstrained or len(strats[op.index]) <= 1:
            continue
        positions: dict[int, list[int]] = {}
        for pos, t in enumerate(op.operands):
            v = g.producer[t]
            if len(strats[v]) > 1:
                positions.setdefault(v, []).append(pos)
        candidates = []
        for v, pos in positions.items():
            if len(strats[op.index]) > len(strats[v]) or v > op.index:
                continue
            j = _follow_index(sgraph, op.index, v, pos, several=len(positions) > 1)
            if len(positions) == 1 or bool(np.all(j >= 0)):
                size = g.tensors[op.operands[pos[0]]].nbytes
                candidates.append(((v, size), v, j))
        if candidates:
            _, v, j = max(candidates, key=lambda c: c[0])
            follow[op.index] = (v, j)
    return follow


def _follow_index(sgraph: StrategyGraph, u: int, v: int, positions: list[int], several: bool) -> np.ndarray:
    """Per strategy of v, the first strategy of u that reads v's output (at every position it
    does) in v's spec and gives its own output that spec; -1 when none (or v's is partial)."""
    g, strats = sgraph.graph, sgraph.strategies
    k = g.ops[v].outputs.index(g.ops[u].operands[positions[0]])
    same_shape = bool(g.ops[u].outputs) and \
        g.tensors[g.ops[u].outputs[0]].shape == g.tensors[g.ops[v].outputs[k]].shape
    index: dict[ShardingSpec, int] = {}
    for j, s in enumerate(strats[u]):
        key = s.in_specs[positions[0]]
        if not all(s.in_specs[p] == key for p in positions):
            continue
        if several and not (same_shape and s.out_specs[0] == key):
            continue  # several producers: follow only where the result keeps the layout
        index.setdefault(key, j)
    return np.array([index.get(s.out_specs[k], -1) if not s.out_specs[k].is_partial else -1
                     for s in strats[v]], dtype=np.int64)
