"""``reshape`` and ``squeeze``: the splits that survive a change of shape.

Input and output dims (size-1 dims left out) fall into contiguous groups with equal products:
``(8, 16, 32) → (8, 512)`` groups ``{0}→{0}`` and ``{1, 2}→{1}``. A split survives the reshape
when it is on the major-most dim of its group and the group's major dim on the other side is
divisible by the split factor: each device's block is then a contiguous run of elements on both
sides, so the reshape is local. A split on a minor dim of a group (or one the other side's major
dim cannot take) would interleave elements across devices and is not offered.

Both directions are enumerated (input spec → output spec and output spec → input spec) and the
pairs deduplicated; the replicated pair always survives. ``expand_dims`` is a
``broadcast_in_dim`` in jaxprs and has its rule there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax import lax

from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import AxisSizes, ShardingSpec
from cost_model.context import RuleContext
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy

Group = tuple[tuple[int, ...], tuple[int, ...]]


def dim_groups(a: Sequence[int], b: Sequence[int]) -> list[Group] | None:
    """Contiguous groups of non-1 dims of shapes ``a`` and ``b`` with equal products.

    ``(8, 16, 32), (8, 512)`` → ``[((0,), (0,)), ((1, 2), (1,))]``; None when the shapes
    have a zero-size dim or do not group (different element counts).
    """
    if 0 in a or 0 in b:
        return None
    da = [d for d, n in enumerate(a) if n != 1]
    db = [d for d, n in enumerate(b) if n != 1]
    groups: list[Group] = []
    i = j = 0
    while i < len(da) and j < len(db):
        ga, gb = [da[i]], [db[j]]
        pa, pb = a[da[i]], b[db[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(da):
                ga.append(da[i])
                pa, i = pa * a[da[i]], i + 1
            elif pb < pa and j < len(db):
                gb.append(db[j])
                pb, j = pb * b[db[j]], j + 1
            else:
                return None
        groups.append((tuple(ga), tuple(gb)))
    return groups if i == len(da) and j == len(db) else None


def carry_spec(spec: ShardingSpec, groups: Sequence[Group], dst: Sequence[int],
               sizes: AxisSizes) -> ShardingSpec | None:
    """The spec on the other side of the reshape, or None when a split does not survive."""
    dims: list[tuple[str, ...]] = [()] * len(dst)
    grouped = set()
    for src_dims, dst_dims in groups:
        grouped.update(src_dims)
        for k, d in enumerate(src_dims):
            if not spec.dims[d]:
                continue
            if k != 0 or dst[dst_dims[0]] % spec.dim_factor(d, sizes):
                return None
            dims[dst_dims[0]] = spec.dims[d]
    if any(axes for d, axes in enumerate(spec.dims) if d not in grouped):
        return None  # a split size-1 dim: nothing to carry it to
    return ShardingSpec(tuple(dims))


def reshape_strategies(ctx: RuleContext, x: TensorInfo,
                       extra: Sequence[TensorInfo] = ()) -> list[Strategy]:
    out = ctx.out
    groups = dim_groups(x.shape, out.shape)
    if groups is None:
        return [ctx.replicated([x, *extra])]
    back = [(g_out, g_in) for g_in, g_out in groups]
    pairs: dict[tuple[ShardingSpec, ShardingSpec], None] = {}
    for s in ctx.specs(x.shape):
        o = carry_spec(s, groups, out.shape, ctx.sizes)
        if o is not None:
            pairs[(s, o)] = None
    for o in ctx.specs(out.shape):
        s = carry_spec(o, back, x.shape, ctx.sizes)
        if s is not None:
            pairs[(s, o)] = None
    rest = [ShardingSpec.replicated(t.rank) for t in extra]
    # Named by the output spec: with the groups fixed, it determines the input spec.
    return [ctx.strategy(str(o), [o], [s, *rest], [x, *extra]) for s, o in pairs]


@register_strategy(lax.reshape_p)
def _reshape(ctx: RuleContext, x: TensorInfo, *dyn: TensorInfo,
             dimensions: Sequence[int] | None = None, **_: Any) -> list[Strategy]:
    if dimensions is not None and tuple(dimensions) != tuple(range(x.rank)):
        # A reshape with a transpose folded in (old-style ``dimensions``): keep it whole.
        return [ctx.replicated([x, *dyn])]
    return reshape_strategies(ctx, x, dyn)


@register_strategy(lax.squeeze_p)
def _squeeze(ctx: RuleContext, x: TensorInfo, **_: Any) -> list[Strategy]:
    return reshape_strategies(ctx, x)
