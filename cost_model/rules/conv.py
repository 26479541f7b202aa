"""``conv_general_dilated`` via the einsum generator; spatial dims stay whole.

Loop dims, as for a dot (``dimension_numbers`` say where each sits in lhs, rhs and output):

- ``b`` batch: lhs batch dim and output batch dim (data parallel);
- ``o`` output feature: rhs output-feature dim and output feature dim;
- ``i`` input feature, contracted: lhs feature dim and rhs input-feature dim; the output is a
  partial sum over the axis.

Spatial dims are replicated: splitting them needs halo exchanges (the window overlaps pieces).

Grouped convolutions (``feature_group_count`` G > 1): the lhs features, rhs output features
and output features are G contiguous groups, so a split of whole groups (``g``, G divisible by
the split) keeps each device's groups local; input and output features *within* a group
interleave with the groups and are not split. ``batch_group_count`` B > 1 (the kernel gradient
of a grouped conv): lhs batch and output features are B contiguous groups (``g``), and input
features contract as usual.

Where XLA does not do what the algebra allows (seen with jax/jaxlib 0.10.2 on 8 CPU devices,
tests/cost_model/test_rules_conv.py checks each):

- a grouped conv that is not depthwise (rhs input features per group > 1) is all-gathered and
  computed whole on every device whatever the split (openxla/xla#47945), so it is offered
  replicated only, which is what runs;
- a batch-grouped conv with its input features split over some mesh axes while another axis is
  idle computes a wrong result (the partial sums are all-reduced over the idle axis too:
  2× or 4× on a 2×4 mesh), so such strategies are dropped; with every axis used they are right.
"""

from __future__ import annotations

from typing import Any

from jax import lax

from alpa_lite.ir.graph import TensorInfo
from cost_model.context import RuleContext
from cost_model.einsum import LoopDim, einsum_strategies
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy


def conv_loops(lhs: TensorInfo, rhs: TensorInfo, dimension_numbers: Any,
               feature_group_count: int = 1, batch_group_count: int = 1) -> list[LoopDim]:
    """Splittable loop dims of a convolution (lhs, rhs → out)."""
    # Each spec lists (batch or out-feature, feature or in-feature, spatial...).
    lb, lf = dimension_numbers.lhs_spec[:2]
    ro, ri = dimension_numbers.rhs_spec[:2]
    ob, of = dimension_numbers.out_spec[:2]
    contract = LoopDim("i", lhs.shape[lf], (lf, ri), None)
    if batch_group_count > 1:
        return [LoopDim("g", batch_group_count, (lb, ro), of), contract]
    batch = LoopDim("b", lhs.shape[lb], (lb, None), ob)
    if feature_group_count > 1:
        return [batch, LoopDim("g", feature_group_count, (lf, ro), of)]
    return [batch, LoopDim("o", rhs.shape[ro], (None, ro), of), contract]


@register_strategy(lax.conv_general_dilated_p)
def _conv(ctx: RuleContext, lhs: TensorInfo, rhs: TensorInfo, *, dimension_numbers: Any,
          feature_group_count: int = 1, batch_group_count: int = 1,
          **_: Any) -> list[Strategy]:
    grouped_dense = feature_group_count > 1 and rhs.shape[dimension_numbers.rhs_spec[1]] > 1
    if grouped_dense or (feature_group_count > 1 and batch_group_count > 1):
        return [ctx.replicated([lhs, rhs])]
    loops = conv_loops(lhs, rhs, dimension_numbers, feature_group_count, batch_group_count)
    strats = einsum_strategies(ctx, loops, [lhs, rhs])
    if batch_group_count > 1:
        strats = [s for s in strats if not s.out_spec.partial or _uses_every_axis(ctx, s)]
    return strats


def _uses_every_axis(ctx: RuleContext, s: Strategy) -> bool:
    return set(s.out_spec.axes_used()) | set(s.out_spec.partial) == set(ctx.mesh_axes)
