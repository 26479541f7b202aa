"""When each buffer is alive, as intervals of program points, and the memory profile of a plan.

A program point is an op that computes something (not a parameter or a constant), numbered
0..P-1 in program order. Every item alive over a run of points is an interval [a, b) of them:

- an ILP node (an op's output XLA materialises, a copy's or held buffer's node): alive from its
  op to the last op that needs it (``intra_op._kept``);
- a resharded copy (``intra_op.OperandCopy``) over its ``points``, its transient at the first;
- a held buffer (``intra_op.Held``) over its ``points``.

The memory at point p of a choice is Σ over the items alive at p, with the largest transient
made there; the profile of all points is two prefix sums (O(items + P)), where listing the live
set of every point costs O(P × live): for a 96-layer GPT, 42k points with thousands of buffers
alive at each (every weight and optimizer state, the activations saved for the backward pass).
So the ILP's memory rows are listed for a few points only (``rows``; which ones:
``alpa_lite.fit``), and the profile checks the plan at every point.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from alpa_lite.graph import OpGraph

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

    @staticmethod
    def of(g: OpGraph, kept: frozenset[int], until: Sequence[int], copies: Sequence, held: Sequence) -> Liveness:
        """From the ops XLA keeps (``kept``), when each dies (``until``), the copies and held
        buffers (with their nodes, -1 for none)."""
        points = [op.index for op in g.ops if op.kind not in ("parameter", "constant")]

        def span(start: int, stop: int) -> tuple[int, int]:  # op indices [start, stop) → points
            return bisect.bisect_left(points, start), bisect.bisect_left(points, stop)

        items = [(op.index, *span(op.index, until[op.index] + 1), True)  # (node, a, b, an op output?)
                 for op in g.ops if op.outputs and op.index in kept]

        def spans(buffers: Sequence) -> list[tuple[int, int]]:  # copies or held buffers, and their nodes
            out = [span(x.points.start, x.points.stop) for x in buffers]
            items.extend((x.node, lo, hi, False) for x, (lo, hi) in zip(buffers, out, strict=True) if x.node >= 0)
            return out

        cs, hs = spans(copies), spans(held)
        items.extend((c.transient_node, lo, lo + 1, False) for c, (lo, hi) in zip(copies, cs, strict=True)
                     if c.transient_node >= 0 and lo < hi)
        ids, a, b, is_op = (list(x) for x in zip(*items, strict=True)) if items else ([], [], [], [])
        arr = (lambda x: np.asarray(x, dtype=np.int64).reshape(-1))
        return Liveness(arr(points), arr(ids), arr(a), arr(b), np.asarray(is_op, bool),
                        arr([lo for lo, _ in cs]), arr([hi for _, hi in cs]),
                        arr([lo for lo, _ in hs]), arr([hi for _, hi in hs]))

    @property
    def num_points(self) -> int:
        return len(self.points)

    def size(self) -> int:
        """Σ over points of the nodes alive there: the length of all memory rows listed."""
        return int(np.maximum(self.node_b - self.node_a, 0).sum())

    def rows(self, points: Iterable[int]) -> tuple[tuple[int, ...], ...]:
        """The ILP nodes alive at each of ``points`` (point numbers), sorted."""
        return tuple(tuple(int(v) for v in np.unique(self.node_ids[(self.node_a <= p) & (p < self.node_b)]))
                     for p in points)

    def profile(self, node_bytes: np.ndarray, copy_bytes: np.ndarray, transient: np.ndarray,
                held_bytes: np.ndarray) -> np.ndarray:
        """Bytes at every point: ``node_bytes`` per node item (0 where not counted), copies and held
        buffers over their intervals, the largest transient made at each point."""
        n = self.num_points
        diff = np.zeros(n + 1)
        for a, b, v in ((self.node_a, self.node_b, node_bytes), (self.copy_a, self.copy_b, copy_bytes),
                        (self.held_a, self.held_b, held_bytes)):
            some = a < b
            np.add.at(diff, a[some], np.asarray(v, float)[some])
            np.add.at(diff, b[some], -np.asarray(v, float)[some])
        total = np.cumsum(diff)[:n]
        made = np.zeros(n)
        some = self.copy_a < self.copy_b
        np.maximum.at(made, self.copy_a[some], np.asarray(transient, float)[some])
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
        for s, e in runs:
            out += [int(p) for p in np.linspace(s, e - 1, SPREAD + 2)[1:-1].round() if int(p) not in out]
        return out[:limit]
