"""The op graph: an HLO-like, flat view of a traced JAX function.

Plain data. Tensors are numbered; every op reads operand tensors and writes result tensors and
is named after its HLO counterpart (``dot``, ``add``, ``reduce``, ...). Program inputs are
``parameter`` ops and constants ``constant`` ops, so every tensor has exactly one producer.
Op order is program order, which is what liveness is computed over.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from alpa_lite.ir.hashing import cached_hash
from alpa_lite.ir.specs import ShardingSpec


@cached_hash
@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "bfloat16", "int32", ...

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        if self.dtype == "bool":
            return 1
        if self.dtype.startswith("key<"):
            return 8  # a threefry PRNG key is two uint32 words
        import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy)

        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True, eq=False)
class Op:
    """One equation. ``primitive`` is the JAX primitive object (None for parameter/constant);
    ``params`` are its equation params, which the cost rules read by keyword."""

    index: int
    kind: str
    operands: tuple[int, ...]
    outputs: tuple[int, ...]
    primitive: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)
    flops: float = 0.0
    source: str = ""  # where the user wrote it (name stack / source line), for reports
    layer: int = 0

    def __str__(self) -> str:
        return f"%{self.index} {self.kind}({', '.join(f't{t}' for t in self.operands)})"


@dataclass(frozen=True, eq=False)
class OpGraph:
    tensors: tuple[TensorInfo, ...]
    ops: tuple[Op, ...]
    inputs: tuple[int, ...]  # tensor id of each flat function input
    outputs: tuple[int, ...]  # tensor id of each flat function output (may repeat or be an input)
    in_tree: Any = None  # PyTreeDef of the arguments
    out_tree: Any = None  # PyTreeDef of the result
    fixed: Mapping[int, ShardingSpec] = field(default_factory=dict)  # tensor → spec the user fixed
    num_layers: int = 1
    # (op index, tensors): before that op runs, these values pass through an optimization
    # barrier (a recomputation under ``jax.checkpoint(prevent_cse=True)`` starts from them), so
    # XLA cannot merge the recomputed ops with the forward ops they repeat. No op of its own:
    # a barrier's results alias its operands (no bytes, no time); the emitted program applies it.
    barriers: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @cached_property
    def producer(self) -> tuple[int, ...]:
        prod = [-1] * len(self.tensors)
        for op in self.ops:
            for t in op.outputs:
                prod[t] = op.index
        return tuple(prod)

    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        cons: list[list[int]] = [[] for _ in self.tensors]
        for op in self.ops:
            for t in dict.fromkeys(op.operands):
                cons[t].append(op.index)
        return tuple(tuple(c) for c in cons)

    @cached_property
    def last_use(self) -> tuple[int, ...]:
        """Program point after which each tensor is dead; outputs live to the end."""
        end = len(self.ops)
        last = [self.producer[t] for t in range(len(self.tensors))]
        for op in self.ops:
            for t in op.operands:
                last[t] = max(last[t], op.index)
        for t in self.outputs:
            last[t] = end
        return tuple(last)

    def live_at(self, point: int) -> Iterator[int]:
        """Tensors alive while op ``point`` runs (its operands and its results)."""
        for t in range(len(self.tensors)):
            if self.producer[t] <= point <= self.last_use[t]:
                yield t

    @property
    def total_flops(self) -> float:
        return float(sum(op.flops for op in self.ops))

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for op in self.ops:
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
        top = ", ".join(f"{k}×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:8])
        return f"OpGraph({len(self.ops)} ops, {len(self.tensors)} tensors, {self.total_flops:.3g} FLOPs: {top})"
