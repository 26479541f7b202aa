"""Indexing ops: gather, the scatter family, and slicing/padding/joining along some dims.

- gather (jnp indexing, ``jnp.take_along_axis``, embedding lookup ``emb[ids]``): one loop dim
  per operand dim taken whole (an offset dim with full slice size that is not indexed: split it
  in the operand and the output) and per batch dim of the indices (split it in the indices and
  the output, and in the operand when it is a paired operand batching dim). An indexed dim
  read one element wide (an embedding row, ``take_along_axis``) may be split as well: each
  device looks up its own range, XLA masks the other indices to zero, and the output is a
  partial sum (XLA all-reduces it: the vocab-parallel embedding). Other indexed dims stay
  whole. Then the einsum product over mesh axes.
- scatter-add (the gradient of those gathers): the same whole window dims and paired batching
  dims, plus the scatter dims of the updates that are not batching dims: split the updates and
  indices there and the output is a partial sum over that axis (each device adds its share of
  the updates; XLA keeps the operand on one device of the group and zeros elsewhere). And the
  operand's scattered dims written one element wide may be split with the updates and indices
  whole: each device adds the updates in its own range, no collective (the gradient of a
  vocab-split embedding). Only a sum combines that way: scatter (overwrite), mul, min and max
  get the window/batching splits, and so does scatter-sub, which XLA does not partition as a
  sum (it all-gathers the updates).
- slice, dynamic_slice, dynamic_update_slice, pad, concatenate, split, rev: a dim the op
  leaves at full extent (not sliced, padded, joined or reversed) may be split, in every array
  operand and output alike; index operands and pad values are scalars and stay replicated.

Touched bytes (the roofline's memory term) are what the kernel reads and writes, not every
operand whole: a gather, slice or dynamic_slice reads the window it returns and writes it
(2 × output bytes, plus the indices); a dynamic_update_slice reads the update and writes it into
the operand's buffer in place (2 × update bytes). XLA updates in place when the operand's buffer
is dead after the op: a donated buffer such as a decode step's KV cache, or a temporary. An
operand still needed later would be copied first (a pass over the whole buffer) and that copy is
not priced here.

Anything the dimension numbers do not fit (unexpected ranks) falls back to replicated.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

from jax import lax

from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from cost_model.context import RuleContext
from cost_model.einsum import LoopDim, einsum_strategies
from cost_model.registry import register_strategy
from cost_model.strategy import Strategy


def gather_loops(operand: TensorInfo, indices: TensorInfo, out: TensorInfo, dnums: Any,
                 slice_sizes: Sequence[int]) -> list[LoopDim] | None:
    """Splittable loop dims of a gather (operand, indices → out); None if dnums do not fit."""
    offset_dims = tuple(dnums.offset_dims)
    obatch, ibatch = tuple(dnums.operand_batching_dims), tuple(dnums.start_indices_batching_dims)
    # Output offset dims are the operand dims not collapsed and not batching, in order.
    window = [d for d in range(operand.rank)
              if d not in dnums.collapsed_slice_dims and d not in obatch]
    out_batch = [d for d in range(out.rank) if d not in offset_dims]
    if len(window) != len(offset_dims) or len(out_batch) != indices.rank - 1:
        return None
    loops = []
    for od, d in zip(offset_dims, window, strict=True):
        if d not in dnums.start_index_map and slice_sizes[d] == operand.shape[d]:
            loops.append(LoopDim(f"w{d}", operand.shape[d], (d, None), od))
    # Output batch dims are the indices dims but the last (the index vector), in order.
    for i, od in enumerate(out_batch):
        op_dim = obatch[ibatch.index(i)] if i in ibatch else None
        loops.append(LoopDim(f"b{i}", indices.shape[i], (op_dim, i), od))
    # An indexed dim read one element at a time (an embedding row, take_along_axis): each device
    # looks up its own range, zero elsewhere; out dim None makes the output a partial sum.
    for d in _single_element_dims(operand, dnums.start_index_map, dnums.collapsed_slice_dims, slice_sizes):
        loops.append(LoopDim(f"v{d}", operand.shape[d], (d, None), None))
    return loops


def _single_element_dims(operand: TensorInfo, index_map: Sequence[int], collapsed: Sequence[int],
                         window: Sequence[int]) -> list[int]:
    """Operand dims that are indexed, collapsed and taken one element wide."""
    return [d for d in index_map if d in collapsed and window[d] == 1 and operand.shape[d] > 1]


@register_strategy(lax.gather_p)
def _gather(ctx: RuleContext, operand: TensorInfo, indices: TensorInfo, *,
            dimension_numbers: Any, slice_sizes: Sequence[int], **_: Any) -> list[Strategy]:
    loops = gather_loops(operand, indices, ctx.out, dimension_numbers, slice_sizes)
    if loops is None:
        return [ctx.replicated([operand, indices])]
    return [window_priced(ctx, s, ctx.out, [indices])
            for s in einsum_strategies(ctx, loops, [operand, indices])]


def window_priced(ctx: RuleContext, s: Strategy, window: TensorInfo,
                  others: Sequence[TensorInfo] = ()) -> Strategy:
    """``s`` touching its ``window`` twice (read, written) and its last operands ``others``
    once, each in the spec ``s`` gives it: the window lies in the output's spec when it is the
    output, else in the spec of the operand it is (the update of a dynamic_update_slice)."""
    spec = s.out_spec if window is ctx.out else s.in_specs[1]
    rest = s.in_specs[len(s.in_specs) - len(others):]
    touched = 2 * ctx.local_bytes(window, spec) + sum(
        ctx.local_bytes(t, sp) for t, sp in zip(others, rest))
    return ctx.touching(s, touched)


def scatter_loops(operand: TensorInfo, indices: TensorInfo, updates: TensorInfo, dnums: Any,
                  partial_ok: bool) -> list[LoopDim] | None:
    """Splittable loop dims of a scatter (operand, indices, updates → operand-shaped out)."""
    uwd = tuple(dnums.update_window_dims)
    obatch, ibatch = tuple(dnums.operand_batching_dims), tuple(dnums.scatter_indices_batching_dims)
    window = [d for d in range(operand.rank)
              if d not in dnums.inserted_window_dims and d not in obatch]
    upd_scatter = [d for d in range(updates.rank) if d not in uwd]
    if len(window) != len(uwd) or len(upd_scatter) != indices.rank - 1:
        return None
    loops = []
    for ud, d in zip(uwd, window, strict=True):
        if d not in dnums.scatter_dims_to_operand_dims and updates.shape[ud] == operand.shape[d]:
            loops.append(LoopDim(f"w{d}", operand.shape[d], (d, None, ud), d))
    for i, ud in enumerate(upd_scatter):
        if i in ibatch:
            od = obatch[ibatch.index(i)]
            loops.append(LoopDim(f"b{i}", indices.shape[i], (od, i, ud), od))
        elif partial_ok:
            # Out dim None: the einsum generator makes the output a partial sum over the axis.
            loops.append(LoopDim(f"s{i}", indices.shape[i], (None, i, ud), None))
    if partial_ok:
        # Scattered one element wide into a split dim: each device adds the updates that fall in
        # its range (updates and indices whole), no communication (the embedding gradient).
        windows = [1 if d in dnums.inserted_window_dims else operand.shape[d] for d in range(operand.rank)]
        for d in _single_element_dims(operand, dnums.scatter_dims_to_operand_dims,
                                      dnums.inserted_window_dims, windows):
            loops.append(LoopDim(f"v{d}", operand.shape[d], (d, None, None), d))
    return loops


def _scatter_strategies(ctx: RuleContext, operands: Sequence[TensorInfo], dnums: Any,
                        partial_ok: bool) -> list[Strategy]:
    if len(operands) != 3:  # variadic scatter: keep it whole
        return [ctx.replicated(operands)]
    loops = scatter_loops(*operands, dnums, partial_ok)
    if loops is None:
        return [ctx.replicated(operands)]
    return einsum_strategies(ctx, loops, operands)


@register_strategy(lax.scatter_add_p)
def _scatter_add(ctx: RuleContext, *operands: TensorInfo, dimension_numbers: Any,
                 **_: Any) -> list[Strategy]:
    return _scatter_strategies(ctx, operands, dimension_numbers, partial_ok=True)


# scatter-sub would sum the same way, but XLA (jax 0.10.2) all-gathers its updates instead.
_NOT_ADDITIVE = [lax.scatter_p, lax.scatter_mul_p, lax.scatter_min_p, lax.scatter_max_p] + [
    p for p in [getattr(lax, "scatter_sub_p", None)] if p is not None]


@register_strategy(*_NOT_ADDITIVE)
def _scatter(ctx: RuleContext, *operands: TensorInfo, dimension_numbers: Any,
             **_: Any) -> list[Strategy]:
    return _scatter_strategies(ctx, operands, dimension_numbers, partial_ok=False)


# ---- ops that keep some dims at full extent -----------------------------------------------

def specs_keeping_whole(ctx: RuleContext, shape: Sequence[int],
                        whole: Container[int]) -> list[ShardingSpec]:
    """Specs of ``shape`` that split none of the dims in ``whole``."""
    return [s for s in ctx.specs(shape)
            if not any(axes for d, axes in enumerate(s.dims) if d in whole)]


def whole_dim_strategies(ctx: RuleContext, x: TensorInfo, whole: Container[int],
                         arrays: Sequence[TensorInfo], scalars: Sequence[TensorInfo] = (),
                         ) -> list[Strategy]:
    """Every output and every ``arrays`` operand takes the same spec; ``scalars`` replicated."""
    rest = [ShardingSpec.replicated(t.rank) for t in scalars]
    return [ctx.strategy(str(s), [s] * len(ctx.outs), [s] * len(arrays) + rest,
                         [*arrays, *scalars])
            for s in specs_keeping_whole(ctx, x.shape, whole)]


@register_strategy(lax.slice_p)
def _slice(ctx: RuleContext, x: TensorInfo, *, start_indices: Sequence[int],
           limit_indices: Sequence[int], strides: Sequence[int] | None = None,
           **_: Any) -> list[Strategy]:
    strides = strides or (1,) * x.rank
    cut = {d for d in range(x.rank)
           if start_indices[d] != 0 or limit_indices[d] != x.shape[d] or strides[d] != 1}
    return [window_priced(ctx, s, ctx.out) for s in whole_dim_strategies(ctx, x, cut, [x])]


@register_strategy(lax.dynamic_slice_p)
def _dynamic_slice(ctx: RuleContext, x: TensorInfo, *idx: TensorInfo,
                   slice_sizes: Sequence[int], **_: Any) -> list[Strategy]:
    cut = {d for d in range(x.rank) if slice_sizes[d] != x.shape[d]}
    return [window_priced(ctx, s, ctx.out) for s in whole_dim_strategies(ctx, x, cut, [x], idx)]


@register_strategy(lax.dynamic_update_slice_p)
def _dynamic_update_slice(ctx: RuleContext, x: TensorInfo, update: TensorInfo,
                          *idx: TensorInfo, **_: Any) -> list[Strategy]:
    cut = {d for d in range(x.rank) if update.shape[d] != x.shape[d]}
    return [window_priced(ctx, s, update)
            for s in whole_dim_strategies(ctx, x, cut, [x, update], idx)]


@register_strategy(lax.pad_p)
def _pad(ctx: RuleContext, x: TensorInfo, pad_value: TensorInfo, *,
         padding_config: Sequence[tuple[int, int, int]], **_: Any) -> list[Strategy]:
    padded = {d for d, cfg in enumerate(padding_config) if tuple(int(c) for c in cfg) != (0, 0, 0)}
    return whole_dim_strategies(ctx, x, padded, [x], [pad_value])


@register_strategy(lax.concatenate_p)
def _concatenate(ctx: RuleContext, *xs: TensorInfo, dimension: int, **_: Any) -> list[Strategy]:
    return whole_dim_strategies(ctx, ctx.out, {dimension}, xs)


@register_strategy(lax.split_p)
def _split(ctx: RuleContext, x: TensorInfo, *, axis: int, **_: Any) -> list[Strategy]:
    return whole_dim_strategies(ctx, x, {axis}, [x])


@register_strategy(lax.rev_p)
def _rev(ctx: RuleContext, x: TensorInfo, *, dimensions: Sequence[int],
         **_: Any) -> list[Strategy]:
    # Reversing a split dim would also swap the pieces between devices (a permute).
    return whole_dim_strategies(ctx, x, set(dimensions), [x])
