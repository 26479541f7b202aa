"""When each buffer is alive, as intervals of program points, and the memory profile of a plan.

A program point is an op that computes something (not a parameter or a constant), numbered
0..P-1 in program order. Every item alive over a run of points is an interval [a, b) of them:

- an ILP node (an op's output XLA materialises, a copy's or held buffer's node): alive from its
  op to the last op that needs it (``problem._kept``);
- a resharded copy (``problem.OperandCopy``) over its ``points``, its transient at the first;
- a held buffer (``problem.Held``) over its ``points``.

The memory at point p of a choice is Σ over the items alive at p, with the largest transient
made there; the profile of all points is two prefix sums (O(items + P)), where listing the live
set of every point costs O(P × live): for a 96-layer GPT, 42k points with thousands of buffers
alive at each (every weight and optimizer state, the activations saved for the backward pass).
So the ILP's memory rows are listed for a few points only (``rows``; which ones:
``alpa_lite.intra.fit``), and the profile checks the plan at every point.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from alpa_lite.ir.graph import OpGraph

# Points taken across each run of points over a budget besides its highest (``peaks``): a plan
# over the budget at one point is usually over it at many (the activations saved for the backward
# pass, the weights gathered for it), and rows at a few of them cut more plans in one round.
SPREAD = 15


@dataclass(frozen=True, eq=False)
class Liveness:
    """Intervals ``[a, b)`` in point numbers. ``points[p]``: the op index of point p.
    ``node_ids/node_a/node_b``: ILP nodes and when they are alive; ``op_items``: which of them are
    op outputs (not copy or held nodes, whose bytes ``profile`` takes exactly instead).
    ``copy_a/copy_b``, ``held_a/held_b``: per copy and held buffer, in the order given."""

    points: np.ndarray
    node_ids: np.ndarray
    node_a: np.ndarray
    node_b: np.ndarray
    op_items: np.ndarray  # bool per node item
    copy_a: np.ndarray
    copy_b: np.ndarray
    held_a: np.ndarray
    held_b: np.ndarray
    # Per node item: a copy's transient node. Copies made at one point are made one after another,
    # so a row takes one transient at a time (``rows``).
    transient_items: np.ndarray

    @staticmethod
    def of(g: OpGraph, kept: frozenset[int], until: Sequence[int], copies: Sequence, held: Sequence) -> Liveness:
        """From the ops XLA keeps (``kept``), when each dies (``until``), and the copies and held
        buffers; their nodes, once they have them, come with ``with_nodes``."""
        points = [op.index for op in g.ops if op.kind not in ("parameter", "constant")]

        def span(start: int, stop: int) -> tuple[int, int]:  # op indices [start, stop) → points
            return bisect.bisect_left(points, start), bisect.bisect_left(points, stop)

        ops = [op.index for op in g.ops if op.outputs and op.index in kept]
        ab = np.array([span(v, until[v] + 1) for v in ops], dtype=np.int64).reshape(-1, 2)
        cs = np.array([span(c.points.start, c.points.stop) for c in copies], dtype=np.int64).reshape(-1, 2)
        hs = np.array([span(h.points.start, h.points.stop) for h in held], dtype=np.int64).reshape(-1, 2)
        return Liveness(np.asarray(points, dtype=np.int64), np.asarray(ops, dtype=np.int64), ab[:, 0], ab[:, 1],
                        np.ones(len(ops), bool), cs[:, 0], cs[:, 1], hs[:, 0], hs[:, 1], np.zeros(len(ops), bool))

    def with_nodes(self, copies: Sequence, held: Sequence) -> Liveness:
        """With the ILP nodes of copies (alive over the copy; its transient's at its first
        point) and held buffers (-1: none), for the same copies and held buffers as ``of``."""
        ids, a, b = [self.node_ids], [self.node_a], [self.node_b]
        for nodes, lo, hi in (([c.node for c in copies], self.copy_a, self.copy_b),
                              ([c.transient_node for c in copies], self.copy_a,
                               np.where(self.copy_a < self.copy_b, self.copy_a + 1, self.copy_a)),
                              ([h.node for h in held], self.held_a, self.held_b)):
            nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
            some = (nodes >= 0) & (lo < hi)
            ids.append(nodes[some]), a.append(lo[some]), b.append(hi[some])
        ops = np.zeros(sum(len(x) for x in ids), bool)
        ops[:len(self.node_ids)] = self.op_items
        transients = np.zeros(len(ops), bool)
        start = len(ids[0]) + len(ids[1])
        transients[start:start + len(ids[2])] = True
        return replace(self, node_ids=np.concatenate(ids), node_a=np.concatenate(a), node_b=np.concatenate(b),
                       op_items=ops, transient_items=transients)

    @property
    def num_points(self) -> int:
        return len(self.points)

    def size(self) -> int:
        """Σ over points of the nodes alive there: the length of all memory rows listed."""
        return int(np.maximum(self.node_b - self.node_a, 0).sum())

    def rows(self, points: Iterable[int]) -> tuple[tuple[int, ...], ...]:
        """The ILP nodes alive at each of ``points`` (point numbers), sorted; a point where
        several transient nodes are alive gives one row per transient, each with the rest of its
        live set (``max_k t_k + rest ≤ M`` ⟺ ``t_k + rest ≤ M`` for every k)."""
        out = []
        for p in points:
            alive = (self.node_a <= p) & (p < self.node_b)
            if (alive & self.transient_items).sum() <= 1:
                out.append(tuple(int(v) for v in np.unique(self.node_ids[alive])))
                continue
            rest = self.node_ids[alive & ~self.transient_items]
            for t in np.unique(self.node_ids[alive & self.transient_items]):
                out.append(tuple(int(v) for v in np.unique(np.append(rest, t))))
        return tuple(out)

    def profile(self, node_bytes: np.ndarray, copy_bytes: np.ndarray, transient: np.ndarray,
                held_bytes: np.ndarray) -> np.ndarray:
        """Bytes at every point: ``node_bytes`` per node item (0 where not counted), copies and held
        buffers over their intervals, the largest transient made at each point (of the copies'
        ``transient`` and of the transient nodes' bytes, as the rows count them: ``rows``)."""
        n = self.num_points
        diff = np.zeros(n + 1)
        node_bytes = np.asarray(node_bytes, float)
        one_of = self.transient_items
        for a, b, v in ((self.node_a[~one_of], self.node_b[~one_of], node_bytes[~one_of]),
                        (self.copy_a, self.copy_b, copy_bytes), (self.held_a, self.held_b, held_bytes)):
            some = a < b
            np.add.at(diff, a[some], np.asarray(v, float)[some])
            np.add.at(diff, b[some], -np.asarray(v, float)[some])
        total = np.cumsum(diff)[:n]
        made = np.zeros(n)
        some = self.copy_a < self.copy_b
        np.maximum.at(made, self.copy_a[some], np.asarray(transient, float)[some])
        some = one_of & (self.node_a < self.node_b)  # transient nodes: one point each, the largest
        np.maximum.at(made, self.node_a[some], node_bytes[some])
        return total + made

    def covering(self, ops: range) -> np.ndarray:
        """Points whose span [op, next point's op) meets the op indices ``ops``."""
        nxt = np.append(self.points[1:], np.iinfo(np.int64).max)
        return (nxt > ops.start) & (self.points < ops.stop)

    def peaks(self, profile: np.ndarray, over: float, limit: int) -> list[int]:
        """Up to ``limit`` points above ``over``: the highest of each run of such points (the runs
        with the highest peaks first), then ``SPREAD`` more across each run."""
        above = profile > over
        if not above.any():
            return []
        edges = np.flatnonzero(np.diff(np.concatenate(([0], above.astype(np.int8), [0]))))
        runs = sorted(zip(edges[::2], edges[1::2], strict=True), key=lambda r: (-profile[r[0]:r[1]].max(), r[0]))
        out: list[int] = []
        for s, e in runs:  # the highest point of each run first, then a few more across the runs
            out.append(int(s + np.argmax(profile[s:e])))
        for s, e in runs:  # a run shorter than SPREAD + 2 points repeats points: each once
            out += [p for p in dict.fromkeys(np.linspace(s, e - 1, SPREAD + 2)[1:-1].round().astype(int).tolist())
                    if p not in out]
        return out[:limit]
