"""Windowed ops: pooling (``reduce_window`` sum/max/min, generic ``reduce_window``) and the
gradient of max pooling (``select_and_scatter_add``, forward-mode ``select_and_gather_add``).

A dim whose window is trivial (size 1, stride 1, no padding, no dilation) is an independent
loop: split it in every array operand and in the output alike (batch and channels of a NHWC
pool). A dim the window slides along (the spatial dims) stays whole: a split would need halo
exchanges at the piece boundaries. Init values are scalars and stay replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax import lax
from jax.extend.core import primitives as P

from alpa_lite.ir.graph import TensorInfo
from cost_model.context import RuleContext
from cost_model.registry import register_strategy
from cost_model.rules.indexing import whole_dim_strategies
from cost_model.strategy import Strategy


def windowed_dims(rank: int, window_dimensions: Sequence[int], window_strides: Sequence[int],
                  padding: Sequence[Sequence[int]] = (), base_dilation: Sequence[int] = (),
                  window_dilation: Sequence[int] = ()) -> set[int]:
    """The dims a window slides along: any with a window, stride, padding or dilation ≠ trivial."""
    def trivial(d: int) -> bool:
        return (window_dimensions[d] == 1 and window_strides[d] == 1
                and tuple(padding[d] if padding else (0, 0)) == (0, 0)
                and (base_dilation[d] if base_dilation else 1) == 1
                and (window_dilation[d] if window_dilation else 1) == 1)

    return {d for d in range(rank) if not trivial(d)}


@register_strategy(lax.reduce_window_sum_p, lax.reduce_window_max_p, lax.reduce_window_min_p)
def _reduce_window(ctx: RuleContext, x: TensorInfo, *, window_dimensions: Sequence[int],
                   window_strides: Sequence[int], padding: Sequence[Sequence[int]],
                   base_dilation: Sequence[int] = (), window_dilation: Sequence[int] = (),
                   **_: Any) -> list[Strategy]:
    slid = windowed_dims(x.rank, window_dimensions, window_strides, padding, base_dilation,
                         window_dilation)
    return whole_dim_strategies(ctx, x, slid, [x])


@register_strategy(lax.reduce_window_p)
def _reduce_window_generic(ctx: RuleContext, *operands: TensorInfo, window_dimensions: Sequence[int],
                           window_strides: Sequence[int], padding: Sequence[Sequence[int]],
                           base_dilation: Sequence[int] = (), window_dilation: Sequence[int] = (),
                           **_: Any) -> list[Strategy]:
    # Operands: the arrays, then one scalar init value per array.
    arrays, inits = operands[: len(operands) // 2], operands[len(operands) // 2:]
    slid = windowed_dims(arrays[0].rank, window_dimensions, window_strides, padding, base_dilation,
                         window_dilation)
    return whole_dim_strategies(ctx, arrays[0], slid, arrays, inits)


def _select_and_scatter(ctx: RuleContext, source: TensorInfo, operand: TensorInfo, *,
                        window_dimensions: Sequence[int], window_strides: Sequence[int],
                        padding: Sequence[Sequence[int]], **_: Any) -> list[Strategy]:
    slid = windowed_dims(operand.rank, window_dimensions, window_strides, padding)
    return whole_dim_strategies(ctx, operand, slid, [source, operand])


register_strategy(lax.select_and_scatter_add_p)(_select_and_scatter)


@register_strategy(*[p for p in [getattr(P, "select_and_gather_add_p", None)] if p is not None])
def _select_and_gather_add(ctx: RuleContext, tangents: TensorInfo, operand: TensorInfo, *,
                           window_dimensions: Sequence[int], window_strides: Sequence[int],
                           padding: Sequence[Sequence[int]], base_dilation: Sequence[int] = (),
                           window_dilation: Sequence[int] = (), **_: Any) -> list[Strategy]:
    slid = windowed_dims(operand.rank, window_dimensions, window_strides, padding, base_dilation,
                         window_dilation)
    return whole_dim_strategies(ctx, operand, slid, [tangents, operand])
