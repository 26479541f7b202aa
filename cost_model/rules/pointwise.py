"""Element-wise ops: the output takes any spec and every full-shape operand follows it.

Scalar operands (rank 0, or a size-1 broadcast) stay replicated. Partial sums are never taken
as inputs (design.md: in Auto mode XLA reduces a partial at its producer), so an add of two
partials is costed as two reductions on the in-edges.
"""

from __future__ import annotations

from typing import Any

from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.hlo_names import ELEMENTWISE, SHARDING_CONSTRAINTS
from alpa_lite.ir.specs import ShardingSpec
from cost_model.context import RuleContext
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy


def follow(spec: ShardingSpec, out: TensorInfo, operand: TensorInfo) -> ShardingSpec:
    """The spec ``operand`` needs so that an element-wise op yields ``spec`` on ``out``."""
    if operand.rank != out.rank:
        return ShardingSpec.replicated(operand.rank)
    dims = tuple(a if n == m else () for a, n, m in zip(spec.dims, operand.shape, out.shape))
    return ShardingSpec(dims)


# with_sharding_constraint and reshard are identities whose output spec the builder then fixes.
@register_strategy(*ELEMENTWISE, *SHARDING_CONSTRAINTS)
def _elementwise(ctx: RuleContext, *operands: TensorInfo, **_: Any) -> list[Strategy]:
    out = ctx.out
    return [ctx.strategy(str(s), [s] * len(ctx.outs), [follow(s, out, t) for t in operands], operands,
                         fused=True) for s in ctx.specs(out.shape)]
