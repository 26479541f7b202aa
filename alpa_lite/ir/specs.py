"""Sharding specs: which mesh axes split each tensor dimension, and which make it a partial sum.

A ``ShardingSpec`` is plain data. ``dims[d]`` lists the mesh axes that split dimension ``d``,
major to minor (the order of ``PartitionSpec`` entries); ``partial`` lists mesh axes over which
the tensor is still a partial sum to be reduced (the ``partial = sum[axis]`` of the MLIR mesh
dialect). Printed: one entry per dimension, ``R`` when replicated, then ``|sum(axes)``:
``[x,R]``, ``[R,(x,y)]``, ``[R,R]|sum(x)``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jax.sharding import PartitionSpec

from alpa_lite.ir.errors import ShardingError
from alpa_lite.ir.hashing import cached_hash

AxisSizes = Mapping[str, int]


@cached_hash
@dataclass(frozen=True, order=True)
class ShardingSpec:
    dims: tuple[tuple[str, ...], ...]
    partial: tuple[str, ...] = ()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def replicated(cls, rank: int) -> ShardingSpec:
        return cls(((),) * rank)

    @classmethod
    def from_partition_spec(cls, pspec: PartitionSpec | None, rank: int) -> ShardingSpec:
        """``PartitionSpec('x', None)`` → ``[x,R]``; missing trailing entries are replicated."""
        entries = tuple(pspec) if pspec is not None else ()
        if len(entries) > rank:
            raise ShardingError(f"PartitionSpec {pspec} has {len(entries)} entries for a rank-{rank} "
                                "tensor; give at most one entry per dimension")
        dims = []
        for e in entries + (None,) * (rank - len(entries)):
            if e is None or e is PartitionSpec.UNCONSTRAINED:
                dims.append(())
            elif isinstance(e, str):
                dims.append((e,))
            else:
                dims.append(tuple(e))
        return cls(tuple(dims))

    @classmethod
    def parse(cls, text: str) -> ShardingSpec:
        """Inverse of ``str``: ``"[x,R]|sum(y)"`` → ``ShardingSpec((('x',), ()), ('y',))``."""
        m = re.fullmatch(r"\s*\[(.*?)\]\s*(?:\|\s*sum\((.*?)\))?\s*", text)
        if not m:
            raise ShardingError(f"cannot parse sharding spec {text!r}; expected e.g. '[x,R]|sum(y)'")
        body, part = m.group(1), m.group(2)
        dims: list[tuple[str, ...]] = []
        for tok in re.findall(r"\([^)]*\)|[^,()\s]+", body):
            tok = tok.strip()
            if tok == "R":
                dims.append(())
            elif tok.startswith("("):
                dims.append(tuple(a.strip() for a in tok[1:-1].split(",") if a.strip()))
            else:
                dims.append((tok,))
        partial = tuple(a.strip() for a in part.split(",") if a.strip()) if part else ()
        return cls(tuple(dims), partial)

    # ---- queries -------------------------------------------------------------------------
    def __str__(self) -> str:
        def one(axes: tuple[str, ...]) -> str:
            if not axes:
                return "R"
            return axes[0] if len(axes) == 1 else "(" + ",".join(axes) + ")"

        s = "[" + ",".join(one(a) for a in self.dims) + "]"
        return s + (f"|sum({','.join(self.partial)})" if self.partial else "")

    def __repr__(self) -> str:
        return f"ShardingSpec({self})"

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def is_partial(self) -> bool:
        return bool(self.partial)

    def axes_used(self) -> tuple[str, ...]:
        """Mesh axes that split a dimension (not the partial ones)."""
        return tuple(a for d in self.dims for a in d)

    def dim_of(self, axis: str) -> int | None:
        for d, axes in enumerate(self.dims):
            if axis in axes:
                return d
        return None

    def shard_factor(self, sizes: AxisSizes) -> int:
        """How many pieces the tensor is cut into (product of the sizes of splitting axes)."""
        return math.prod(sizes[a] for a in self.axes_used())

    def dim_factor(self, d: int, sizes: AxisSizes) -> int:
        return math.prod(sizes[a] for a in self.dims[d])

    def local_shape(self, shape: Sequence[int], sizes: AxisSizes) -> tuple[int, ...]:
        """Per-device shape; uneven splits are padded up, as XLA does."""
        return tuple(-(-n // self.dim_factor(d, sizes)) for d, n in enumerate(shape))

    def divides(self, shape: Sequence[int], sizes: AxisSizes) -> bool:
        return all(n % self.dim_factor(d, sizes) == 0 for d, n in enumerate(shape))

    def without_partial(self) -> ShardingSpec:
        return ShardingSpec(self.dims) if self.partial else self

    def to_partition_spec(self) -> PartitionSpec:
        """``[x,R]`` → ``PartitionSpec('x', None)`` (partial axes are dropped: reduce first)."""
        entries = [None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in self.dims]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def validate(self, shape: Sequence[int], sizes: AxisSizes) -> None:
        """Raise ``ShardingError`` when the spec does not fit ``shape`` on a mesh of ``sizes``."""
        if len(shape) != self.rank:
            raise ShardingError(f"spec {self} has rank {self.rank}, tensor has shape {tuple(shape)}")
        used = self.axes_used() + self.partial
        for a in used:
            if a not in sizes:
                raise ShardingError(f"spec {self} names mesh axis {a!r}; the mesh has {list(sizes)}")
        if len(set(used)) != len(used):
            raise ShardingError(f"spec {self} uses a mesh axis twice")
        for d, n in enumerate(shape):
            f = self.dim_factor(d, sizes)
            if n % f:
                raise ShardingError(f"dimension {d} of size {n} (shape {tuple(shape)}) is not divisible "
                                    f"by mesh axes {self.dims[d]} of total size {f}; pad it or shard "
                                    "another dimension")


def enumerate_specs(shape: Sequence[int], sizes: AxisSizes, *, even_only: bool = True,
                    max_axes_per_dim: int = 3) -> list[ShardingSpec]:
    """All non-partial specs of ``shape``: each mesh axis splits one dimension or none.

    Axes sharing a dimension are kept in mesh order (major first), so there is one spec per
    assignment of axes to dimensions; with ``even_only`` a split must divide the dimension.
    Order is deterministic: replicated first, then by axis assignment.
    """
    axes = [a for a in sizes if sizes[a] > 1]
    rank = len(shape)
    out: list[ShardingSpec] = []
    for choice in itertools.product(range(-1, rank), repeat=len(axes)):
        dims: list[list[str]] = [[] for _ in range(rank)]
        for a, d in zip(axes, choice):
            if d >= 0:
                dims[d].append(a)
        if any(len(d) > max_axes_per_dim for d in dims):
            continue
        spec = ShardingSpec(tuple(tuple(d) for d in dims))
        if even_only and not spec.divides(shape, sizes):
            continue
        out.append(spec)
    return out
