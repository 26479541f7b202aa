"""Resharding cost: the cheapest collective sequence from one ``ShardingSpec`` to another.

A layout is the mesh axes splitting each dimension (major to minor) plus the axes over which
the tensor is still a partial sum. Toward a target ``dst`` (never partial) a dimension is *on
track* when its axes are a prefix of the target's; the axes after the longest common prefix
are its *tail*, which must leave. The moves, each one collective or none:

==================  =========================================================================
slice               append the next target axis to an on-track dimension: free, local
reduce-scatter      append target axes that are partial: reduce them into the new split
all-reduce          reduce some partial axes, the buffer unchanged
all-gather          drop a minor run of a tail
all-to-all          move a minor run of a tail onto an on-track dimension that wants it next
collective-permute  go to a layout that refines this one dimension by dimension
==================  =========================================================================

Partial sums are reduced before anything but slices moves data (slicing first shrinks the
reduced buffer, as XLA does at a dot). Every move brings the layout strictly closer to the
target (more axes in place, else a shorter tail, else fewer partial axes), so the layouts form
a DAG and a memoised search finds the cheapest path: the least sum of alpha-beta times of its
collectives (``cost_model.collectives``), then the fewest collectives.

What XLA's CPU backend compiles for one ``with_sharding_constraint`` (jax 0.10.2, 8 host
devices): a partial sum becomes an all-reduce, plus a local slice where the target splits (CPU
has no reduce-scatter: ``ClusterSpec.has_reduce_scatter``); removing axes one all-gather per
dimension; an axis moving between dimensions one all-to-all (CPU has all-to-all);
``[x,R]→[y,R]`` and ``[x,R]→[y,x]`` one collective-permute. Where the cheapest path slices
*before* a collective (``[x,R]→[R,y]``: slice ``y``, then all-gather ``x``) XLA, given only the
end spec, replicates first ("Involuntary full rematerialization"); emitting the spec after
each step of :func:`reshard_path` as a constraint gets exactly this path compiled. XLA alone
beats the path where it splits one mesh axis into sub-axes (``[x,y]→[y,x]`` on a 2×4 mesh: a
2-way all-to-all and a permute), which specs here cannot name.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import ShardingError
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from cost_model.collectives import collective, collective_time
from cost_model.context import wire_itemsize
from cost_model.strategy import Collective

__all__ = ["ReshardStep", "reshard", "reshard_path", "resharding_matrix"]

Axes = tuple[str, ...]
Dims = tuple[Axes, ...]
_State = tuple[Dims, Axes]  # (axes of each dimension, partial axes still to reduce)
_Move = tuple[tuple[Collective | None, float], _State]  # (collective, its seconds), next


@dataclass(frozen=True)
class ReshardStep:
    """One move: its collective (None for a free local slice) and the layout after it."""

    collective: Collective | None
    spec: ShardingSpec

    def __str__(self) -> str:
        return f"{self.collective or 'slice'} → {self.spec}"


@functools.lru_cache(maxsize=1 << 16)
def reshard(src: ShardingSpec, dst: ShardingSpec, tensor: TensorInfo,
            cluster: ClusterSpec) -> tuple[float, tuple[Collective, ...]]:
    """Seconds and collectives of the cheapest way from ``src`` to ``dst`` (0, () when equal);
    memoised as the path is: a matrix reads the same pair again for every edge whose candidate
    lists differ elsewhere."""
    steps = reshard_path(src, dst, tensor, cluster)
    colls = tuple(s.collective for s in steps if s.collective is not None)
    return sum(collective_time(c, cluster) for c in colls), colls


@functools.lru_cache(maxsize=1 << 16)
def reshard_path(src: ShardingSpec, dst: ShardingSpec, tensor: TensorInfo,
                 cluster: ClusterSpec) -> tuple[ReshardStep, ...]:
    """The moves of the cheapest path from ``src`` to ``dst``, each with the spec it leaves."""
    if src.rank != tensor.rank or dst.rank != tensor.rank:
        raise ShardingError(f"cannot reshard {tensor} from {src} to {dst}: ranks differ")
    if dst.partial:
        raise ShardingError(f"resharding target {dst} is a partial sum; a consumer needs a "
                            "reduced value, so give the target without '|sum(...)'")
    if src == dst:
        return ()
    return _search(dst, tensor, cluster).path(src)


def resharding_matrix(srcs: Sequence[ShardingSpec], dsts: Sequence[ShardingSpec],
                      tensor: TensorInfo, cluster: ClusterSpec) -> np.ndarray:
    """``R[i, j]``: seconds to turn ``srcs[i]`` into ``dsts[j]``; memoised, so read-only."""
    return _matrix(tuple(srcs), tuple(dsts), tensor, cluster)


@functools.lru_cache(maxsize=1 << 14)
def _matrix(srcs: tuple[ShardingSpec, ...], dsts: tuple[ShardingSpec, ...],
            tensor: TensorInfo, cluster: ClusterSpec) -> np.ndarray:
    out = np.zeros((len(srcs), len(dsts)))
    for j, d in enumerate(dsts):
        for i, s in enumerate(srcs):
            out[i, j] = reshard(s, d, tensor, cluster)[0]
    out.setflags(write=False)  # every caller of the cache shares it
    return out


@functools.lru_cache(maxsize=1 << 12)
def _search(dst: ShardingSpec, tensor: TensorInfo, cluster: ClusterSpec) -> _Search:
    """One search per target: its memo serves every source (a column of the matrix)."""
    return _Search(dst, tensor, cluster)


class _Search:
    """Cheapest paths to one target layout, memoised over the layouts visited."""

    def __init__(self, dst: ShardingSpec, tensor: TensorInfo, cluster: ClusterSpec):
        self.target = dst.dims
        self.shape = tensor.shape
        self.itemsize = wire_itemsize(tensor, cluster)  # what a collective moves per element
        self.cluster = cluster
        self.sizes = cluster.axis_sizes
        self.order = {a: i for i, a in enumerate(cluster.axis_names)}
        self.memo: dict[_State, tuple[float, int, tuple[ReshardStep, ...]]] = {}
        self.bytes_memo: dict[Dims, float] = {}
        self.refine_memo: dict[tuple[int, Axes], tuple[Axes, ...]] = {}
        self.coll_memo: dict[tuple[str, Axes, float], tuple[Collective | None, float]] = {}

    def path(self, src: ShardingSpec) -> tuple[ReshardStep, ...]:
        return self._best((src.dims, self._mesh_order(src.partial)))[2]

    def _best(self, state: _State) -> tuple[float, int, tuple[ReshardStep, ...]]:
        """(seconds, collectives, steps) of the cheapest path from ``state`` to the target."""
        if state[0] == self.target and not state[1]:
            return 0.0, 0, ()
        if state not in self.memo:
            best: tuple[float, int, tuple[ReshardStep, ...]] | None = None
            for (c, secs), nxt in self._moves(*state):
                t, n, rest = self._best(nxt)
                cand = (secs + t, n + (c is not None), (ReshardStep(c, ShardingSpec(*nxt)), *rest))
                if best is None or cand[:2] < best[:2]:
                    best = cand
            assert best is not None, f"no move from {state} toward {self.target}"
            self.memo[state] = best
        return self.memo[state]

    # ---- layouts ------------------------------------------------------------------------
    def _bytes(self, dims: Dims) -> float:
        """Per-device bytes of a layout (uneven splits padded up, as XLA does)."""
        if dims not in self.bytes_memo:
            pieces = (-(-n // self._group(axes)) for n, axes in zip(self.shape, dims, strict=True))
            self.bytes_memo[dims] = float(math.prod(pieces)) * self.itemsize
        return self.bytes_memo[dims]

    def _kept(self, d: int, axes: Axes) -> int:
        """Length of the common prefix of ``axes`` and the target's axes of dimension ``d``."""
        k, want = 0, self.target[d]
        while k < len(axes) and k < len(want) and axes[k] == want[k]:
            k += 1
        return k

    def _group(self, axes: Sequence[str]) -> int:
        return math.prod(self.sizes[a] for a in axes)

    def _mesh_order(self, axes: set[str] | Sequence[str]) -> Axes:
        return tuple(sorted(axes, key=self.order.__getitem__))

    def _coll(self, kind: str, axes: Axes, dims: Dims) -> tuple[Collective | None, float]:
        """``kind`` over ``axes`` with the result buffer of layout ``dims``, and its seconds."""
        key = (kind, axes, self._bytes(dims))
        if key not in self.coll_memo:
            c = collective(kind, axes, key[2], self.cluster)
            self.coll_memo[key] = c, collective_time(c, self.cluster)
        return self.coll_memo[key]

    # ---- moves --------------------------------------------------------------------------
    def _moves(self, dims: Dims, pending: Axes) -> Iterator[_Move]:
        yield from self._appends(dims, pending)
        if pending:  # reduce partial sums before moving data around
            for r in range(1, len(pending) + 1):
                for sub in itertools.combinations(pending, r):
                    rest = tuple(a for a in pending if a not in sub)
                    yield self._coll("all-reduce", sub, dims), (dims, rest)
            return
        for d, axes in enumerate(dims):
            for j in range(self._kept(d, axes), len(axes)):
                yield from self._drops(dims, d, j)
        yield from self._permutes(dims)

    def _appends(self, dims: Dims, pending: Axes) -> Iterator[_Move]:
        """Free slices and reduce-scatters onto on-track dimensions."""
        used = {a for axes in dims for a in axes}
        for d, axes in enumerate(dims):
            want = self.target[d]
            if want[: len(axes)] != axes or len(want) == len(axes):
                continue
            if want[len(axes)] not in used and want[len(axes)] not in pending:
                yield (None, 0.0), (_with(dims, d, want[: len(axes) + 1]), pending)
            run: Axes = ()
            for a in want[len(axes):]:
                if a not in pending:
                    break
                run += (a,)
                new = _with(dims, d, axes + run)
                rest = tuple(p for p in pending if p not in run)
                yield self._coll("reduce-scatter", run, new), (new, rest)

    def _drops(self, dims: Dims, d: int, j: int) -> Iterator[_Move]:
        """Remove the run ``dims[d][j:]``: all-gather it, or all-to-all it where it is wanted."""
        run = dims[d][j:]
        gathered = _with(dims, d, dims[d][:j])
        yield self._coll("all-gather", run, gathered), (gathered, ())
        for t, axes in enumerate(gathered):
            if t != d and self.target[t][: len(axes) + len(run)] == axes + run:
                moved = _with(gathered, t, axes + run)
                yield self._coll("all-to-all", run, moved), (moved, ())

    def _permutes(self, dims: Dims) -> Iterator[_Move]:
        """One collective-permute to a layout that refines this one dimension by dimension.

        Each dimension stays or takes more of its target axes (then maybe tail axes, to gather
        later), its split a multiple of the old that divides the dimension (an uneven target
        compiles to several permutes). Every new piece then lies in one old piece,
        which as many devices hold as want pieces of it, so each device receives one buffer
        from one other: ``[x,R]→[y,R]`` and ``[x,R]→[y,x]`` are one permute each.
        """
        options = [(axes, *self._refinements(d, axes)) for d, axes in enumerate(dims)]
        for new in itertools.product(*options):
            flat = [a for axes in new for a in axes]
            if len(set(flat)) != len(flat):
                continue
            changed = [(n, o) for n, o in zip(new, dims, strict=True) if n != o]
            if all(n[: len(o)] == o for n, o in changed):
                continue  # nothing moved (no change, or slices only: free)
            group = self._mesh_order({a for n, o in changed for a in n + o})
            yield self._coll("collective-permute", group, new), (new, ())

    def _refinements(self, d: int, axes: Axes) -> tuple[Axes, ...]:
        """Longer target prefixes, then maybe tail axes, splitting dimension ``d`` finer."""
        if (d, axes) not in self.refine_memo:
            k, want = self._kept(d, axes), self.target[d]
            out = []
            for m in range(k + 1, len(want) + 1):
                spare = [a for a in axes[k:] if a not in want[:m]]
                for r in range(len(spare) + 1):
                    for filler in itertools.permutations(spare, r):
                        group = self._group(want[:m] + filler)
                        # Even pieces only: XLA splits a permute to an uneven layout into several
                        # (seen: [x,R]→[(y,x),R] of a [12,1] tensor on 4×2, three permutes).
                        if group % self._group(axes) == 0 and self.shape[d] % group == 0:
                            out.append(want[:m] + filler)
            self.refine_memo[d, axes] = tuple(out)
        return self.refine_memo[d, axes]


def _with(dims: Dims, d: int, axes: Axes) -> Dims:
    return dims[:d] + (axes,) + dims[d + 1:]
