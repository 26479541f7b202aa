"""Layout ops: broadcast, transpose and reductions.

- broadcast_in_dim: the output takes any spec; the operand keeps the splits of the dims it maps
  to (``broadcast_dimensions``), replicated where it has size 1 and the output does not.
- transpose: the output spec is the operand spec permuted.
- reduce (sum): splitting a reduced dim makes the output a partial sum over that axis, reduced
  on the out-edge; reduce (max/min/prod, argmax): a split reduced dim is combined by the
  strategy's own all-reduce (no partial-max spec exists downstream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax import lax

from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from cost_model.collectives import all_reduce
from cost_model.context import RuleContext
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy


@register_strategy(lax.broadcast_in_dim_p)
def _broadcast(ctx: RuleContext, x: TensorInfo, *dyn: TensorInfo, shape: Sequence[int],
               broadcast_dimensions: Sequence[int], **_: Any) -> list[Strategy]:
    out = ctx.out
    result = []
    for s in ctx.specs(out.shape):
        dims = tuple(s.dims[od] if x.shape[i] == out.shape[od] else ()
                     for i, od in enumerate(broadcast_dimensions))
        ins = [ShardingSpec(dims)] + [ShardingSpec.replicated(t.rank) for t in dyn]
        result.append(ctx.strategy(str(s), [s], ins, [x, *dyn], fused=True))
    return result


@register_strategy(lax.transpose_p)
def _transpose(ctx: RuleContext, x: TensorInfo, *, permutation: Sequence[int],
               **_: Any) -> list[Strategy]:
    result = []
    for s in ctx.specs(x.shape):
        out = ShardingSpec(tuple(s.dims[p] for p in permutation))
        result.append(ctx.strategy(str(out), [out], [s], [x]))
    return result


def _reduce_strategies(ctx: RuleContext, x: TensorInfo, axes: Sequence[int],
                       partial_ok: bool, extra_ins: Sequence[TensorInfo] = ()) -> list[Strategy]:
    result = []
    kept = [d for d in range(x.rank) if d not in axes]
    for s in ctx.specs(x.shape):
        red_axes = tuple(a for d in axes for a in s.dims[d])
        out_dims = tuple(s.dims[d] for d in kept)
        ins = [s] + [ShardingSpec.replicated(t.rank) for t in extra_ins]
        if partial_ok:
            outs = [ShardingSpec(out_dims, tuple(a for a in ctx.mesh_axes if a in red_axes))]
            result.append(ctx.strategy(str(outs[0]), outs * len(ctx.outs), ins, [x, *extra_ins]))
            continue
        colls = []
        if red_axes:
            out_local = ctx.wire_bytes(ctx.out, ShardingSpec(out_dims))
            c = all_reduce(red_axes, out_local, ctx.cluster)
            colls = [c] if c is not None else []
        outs = [ShardingSpec(out_dims)] * len(ctx.outs)
        # A split reduced dim still divides the work: count those axes as splitting it.
        split_flops = ctx.flops / max(1, ctx.cluster.group_size(red_axes))
        result.append(ctx.strategy(str(s) + "→" + str(outs[0]), outs, ins, [x, *extra_ins],
                                   colls, flops=split_flops))
    return result


@register_strategy(lax.reduce_sum_p)
def _reduce_sum(ctx: RuleContext, x: TensorInfo, *, axes: Sequence[int], **_: Any) -> list[Strategy]:
    return _reduce_strategies(ctx, x, axes, partial_ok=True)


@register_strategy(lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p, lax.reduce_and_p,
                   lax.reduce_or_p)
def _reduce_other(ctx: RuleContext, x: TensorInfo, *, axes: Sequence[int], **_: Any) -> list[Strategy]:
    return _reduce_strategies(ctx, x, axes, partial_ok=False)


@register_strategy(lax.argmax_p, lax.argmin_p)
def _argminmax(ctx: RuleContext, x: TensorInfo, *, axes: Sequence[int], **_: Any) -> list[Strategy]:
    # The index of the max cannot be combined by a sum: keep the reduced dim whole.
    return [s for s in _reduce_strategies(ctx, x, axes, partial_ok=False)
            if not any(s.in_specs[0].dims[d] for d in axes)]
