"""Generators, scans along an axis, sorts, and random numbers.

- iota: any spec of the output; each device generates its own slice (an iota plus an offset).
- cumsum, cumprod, cummax, cummin, cumlogsumexp: split any dim but the cumulative axis (a
  split scan axis would need a carry passed from device to device).
- sort (several operands, as many outputs; ``argsort`` is a sort of (keys, iota)): split any
  dim but the sorted one; every operand and output takes the same spec.
- top_k: replicated. The algebra allows splitting the other dims, but XLA (jax 0.10.2, CPU)
  lowers it to a ``TopK`` custom call that it all-gathers whatever the split, so a split
  strategy would promise a saving that never happens.
- bitcast_convert_type: element-wise between equal widths, replicated between others.
- random number primitives: replicated. Generating a slice of the stream per device would give
  different numbers than the unsharded program unless the generator is partitionable, so the
  bits are made whole and consumers slice them (free).
"""

from __future__ import annotations

from typing import Any

from jax import lax
from jax.extend.core import primitives as P

from alpa_lite.ir.graph import TensorInfo
from cost_model.context import RuleContext
from cost_model.registry import register_strategy
from cost_model.rules.indexing import whole_dim_strategies
from cost_model.strategy import Strategy


@register_strategy(lax.iota_p)
def _iota(ctx: RuleContext, *dyn: TensorInfo, **_: Any) -> list[Strategy]:
    if dyn:  # dynamic shapes: keep it whole
        return [ctx.replicated(dyn)]
    return [ctx.strategy(str(s), [s], [], []) for s in ctx.specs(ctx.out.shape)]


@register_strategy(lax.cumsum_p, lax.cumprod_p, lax.cummax_p, lax.cummin_p, lax.cumlogsumexp_p)
def _cumulative(ctx: RuleContext, x: TensorInfo, *, axis: int, **_: Any) -> list[Strategy]:
    return whole_dim_strategies(ctx, x, {axis}, [x])


@register_strategy(lax.sort_p)
def _sort(ctx: RuleContext, *xs: TensorInfo, dimension: int, **_: Any) -> list[Strategy]:
    return whole_dim_strategies(ctx, xs[0], {dimension}, xs)


@register_strategy(lax.bitcast_convert_type_p)
def _bitcast(ctx: RuleContext, x: TensorInfo, **_: Any) -> list[Strategy]:
    """Reinterpreting bits (dropout turns random uint32 into floats with it): element-wise when
    the widths match; between widths the last dim appears or vanishes, and the op is kept whole."""
    if x.shape != ctx.out.shape:
        return [ctx.replicated([x])]
    return [ctx.strategy(str(s), [s], [s], [x], fused=True) for s in ctx.specs(x.shape)]


_RANDOM_NAMES = ("random_seed_p", "random_bits_p", "random_split_p", "random_fold_in_p",
                 "random_wrap_p", "random_unwrap_p", "rng_bit_generator_p", "rng_uniform_p")
_REPLICATED = [lax.top_k_p] + [getattr(P, n) for n in _RANDOM_NAMES if hasattr(P, n)]


@register_strategy(*_REPLICATED)
def _replicated(ctx: RuleContext, *operands: TensorInfo, **_: Any) -> list[Strategy]:
    return [ctx.replicated(operands)]
