"""``dot_general``: batch, free and contracting splits via the einsum generator."""

from __future__ import annotations

from typing import Any

from jax import lax

from alpa_lite.ir.graph import TensorInfo
from cost_model.context import RuleContext
from cost_model.einsum import LoopDim, einsum_strategies
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy


def dot_loops(lhs: TensorInfo, rhs: TensorInfo, dimension_numbers: Any) -> list[LoopDim]:
    """Loop dims of a dot_general; the output is (batch..., lhs free..., rhs free...)."""
    (lc, rc), (lb, rb) = dimension_numbers
    loops = []
    out = 0
    for i, (dl, dr) in enumerate(zip(lb, rb)):
        loops.append(LoopDim(f"b{i}", lhs.shape[dl], (dl, dr), out))
        out += 1
    lfree = [d for d in range(lhs.rank) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.rank) if d not in rc and d not in rb]
    for i, d in enumerate(lfree):
        loops.append(LoopDim(f"m{i}" if len(lfree) > 1 else "m", lhs.shape[d], (d, None), out))
        out += 1
    for i, d in enumerate(rfree):
        loops.append(LoopDim(f"n{i}" if len(rfree) > 1 else "n", rhs.shape[d], (None, d), out))
        out += 1
    for i, (dl, dr) in enumerate(zip(lc, rc)):
        loops.append(LoopDim(f"k{i}" if len(lc) > 1 else "k", lhs.shape[dl], (dl, dr), None))
    return loops


@register_strategy(lax.dot_general_p)
def _dot_general(ctx: RuleContext, lhs: TensorInfo, rhs: TensorInfo, *,
                 dimension_numbers: Any, **_: Any) -> list[Strategy]:
    return einsum_strategies(ctx, dot_loops(lhs, rhs, dimension_numbers), [lhs, rhs])
