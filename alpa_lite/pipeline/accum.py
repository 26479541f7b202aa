"""Gradient accumulation with one reduction per step, not one per microbatch (as Alpa and
Megatron-LM accumulate).

A data-parallel weight's gradient is a sum over the examples of a microbatch: the layer plan
computes it with a strategy whose output is a partial sum over the mesh axes A that split the
batch (``[R,R]|sum(dp)``), and XLA reduces it right there (an all-reduce over A per microbatch,
design.md "Emission policy"). Over B microbatches that is B all-reduces where one suffices:
Σ_m Σ_a g[m, a] = Σ_a (Σ_m g[m, a]).

A *deferred* gradient keeps each device's summand. Its producing op (``dot_general`` or
``reduce_sum``) runs in a ``shard_map`` manual over the stage's mesh, on the operand shards the
plan gives it, and returns its local partial with a new leading dimension split over A: the
stacked partial, shape (|A|, ...), one slice per device group, no communication. Linear
one-operand ops between it and the gradient output (transpose, reshape, convert, copy) run on
the stacked value (vmapped). The stage's accumulator has the stacked shape and the same bytes per
device as the reduced gradient (A does not split the weight); the backward adds to it locally,
and once per step ``reduce_stacked`` sums the leading dimension into the weight's spec: one
all-reduce over A per gradient per step (XLA combines them into few).

``find_deferrals`` says which gradient outputs of a layer's forward+backward graph G are
deferred; the planner (costs, predicted collectives) and the runtime (emission) both call it on
the same plan, so they agree. A gradient is deferred when
- it is the gradient of a weight (a loss input held once per step, not split into microbatches);
- walking back from it through ops in ``_LINEAR`` (each read by the next one only), the first
  op whose planned output is a partial sum (over axes A) is a ``dot_general`` or ``reduce_sum``;
- no spec on the way (nor the gradient's) splits a dimension over an axis of A, and the
  producer's operand specs divide their shapes (``shard_map`` needs even blocks).
Anything else (a gradient summed from several partial products, a weight shared by two layers
whose gradients differ in A) is reduced per microbatch as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax import lax
from jax.sharding import NamedSharding

from alpa_lite.ir.specs import ShardingSpec

_PRODUCERS = (lax.dot_general_p, lax.reduce_sum_p)
# One-operand ops that commute with a sum over devices (f(Σ x) = Σ f(x)): jax's transposes emit
# them between a weight gradient's dot or sum and the gradient (a bias: sum, reshape, sum).
_LINEAR = (lax.transpose_p, lax.reshape_p, lax.squeeze_p, lax.convert_element_type_p, lax.copy_p,
           lax.reduce_sum_p, lax.broadcast_in_dim_p, lax.neg_p)


@dataclass(frozen=True)
class Deferral:
    """How gradient output ``grad_pos`` of G is computed as a stacked partial over ``axes``."""

    grad_pos: int  # position among G's outputs
    producer: int  # op index: the partial-sum dot_general / reduce_sum
    chain: tuple[int, ...]  # op indices of the linear ops after it, in order
    axes: tuple[str, ...]  # A: the partial-sum axes, split by the stacked leading dimension


def stacked_spec(axes: Sequence[str], spec: ShardingSpec) -> ShardingSpec:
    """The spec of a stacked partial: a leading dimension split over ``axes``, then ``spec``."""
    return ShardingSpec((tuple(axes), *spec.without_partial().dims))


def find_deferrals(diff_in: Sequence[bool], lg: Any, layouts: Sequence[Any],
                   out_specs: Sequence[ShardingSpec], sizes: Mapping[str, int]) -> dict[int, Deferral]:
    """Deferred weight gradients of one layer's G (``layers.LayerGraph``; ``diff_in``:
    the layer's differentiable inputs) under its plan (``layouts`` per op of G, ``out_specs``
    per G output), by G output position."""
    g = lg.graph
    if len(layouts) != len(g.ops):
        return {}
    uses = _uses(g)
    out: dict[int, Deferral] = {}
    for pos in weight_grad_positions(diff_in, lg):
        d = _deferral(g, layouts, pos, uses, sizes, lg.bwd_ops)
        if d is not None and not _uses_axes(out_specs[pos], d.axes):
            out[pos] = d
    return out


def weight_grad_positions(diff_in: Sequence[bool], lg: Any) -> list[int]:
    """G output positions of the gradients of weight inputs (G's outputs: the layer's outputs,
    then the gradients of its differentiable inputs in order)."""
    din = [k for k, d in enumerate(diff_in) if d]
    return [lg.num_outputs + j for j, k in enumerate(din) if k in lg.weight_inputs]


def _uses(g: Any) -> dict[int, int]:
    n: dict[int, int] = {}
    for op in g.ops:
        for t in op.operands:
            n[t] = n.get(t, 0) + 1
    for t in g.outputs:
        n[t] = n.get(t, 0) + 1
    return n


def _deferral(g: Any, layouts: Sequence[Any], pos: int, uses: dict[int, int],
              sizes: Mapping[str, int], bwd_ops: Sequence[int]) -> Deferral | None:
    found = _walk_back(g, layouts, g.outputs[pos], uses)
    if found is None:
        return None
    op, chain = found
    lay = layouts[op.index]
    axes = tuple(lay.outs[0].partial)
    if op.primitive not in _PRODUCERS or not {op.index, *chain} <= set(bwd_ops):
        return None
    if any(s.is_partial for s in lay.ins):
        return None
    for v in chain:
        cl = layouts[v]
        if cl.free or any(_uses_axes(s, axes) for s in (*cl.ins, *cl.outs)):
            return None
    if not all(s.divides(g.tensors[x].shape, sizes) for x, s in zip(op.operands, lay.ins)):
        return None
    return Deferral(pos, op.index, tuple(chain), axes)


def _walk_back(g: Any, layouts: Sequence[Any], t: int, uses: dict[int, int]) -> tuple[Any, list[int]] | None:
    """From gradient tensor ``t`` back through single-reader linear ops to the first op whose
    planned output is a partial sum: (that op, the linear ops after it in order)."""
    chain: list[int] = []
    while uses.get(t, 0) == 1:
        op, lay = g.ops[g.producer[t]], layouts[g.producer[t]]
        if lay.free or len(op.outputs) != 1:
            return None
        if lay.outs[0].is_partial:
            return op, chain
        if op.primitive not in _LINEAR or len(op.operands) != 1:
            return None
        chain.insert(0, op.index)
        t = op.operands[0]
    return None


def _uses_axes(spec: ShardingSpec, axes: Sequence[str]) -> bool:
    return bool(set(spec.axes_used()) & set(axes))


def stacked_accumulators(contributions: Iterable[tuple[Any, tuple[str, ...] | None]]) -> dict[Any, tuple[str, ...]]:
    """The weights of a stage whose accumulator stays a stacked partial, with its axes: those
    whose every gradient contribution ``(weight, axes or None)`` in the stage is deferred over
    the same axes. A weight with any other contribution has a reduced accumulator, and its
    deferred contributions are reduced as they come (per microbatch)."""
    axes: dict[Any, set[tuple[str, ...] | None]] = {}
    for v, a in contributions:
        axes.setdefault(v, set()).add(a)
    return {v: next(iter(a)) for v, a in axes.items() if len(a) == 1 and None not in a}


def stacked_grad(d: Deferral, g: Any, layouts: Sequence[Any], operands: Sequence[Any], mesh: Any) -> Any:
    """The stacked partial of deferred gradient ``d``, from its producer's operands (already in
    the producer's planned operand specs), inside a jitted program on ``mesh``."""
    op, lay = g.ops[d.producer], layouts[d.producer]
    params = op.primitive.get_bind_params(dict(op.params))

    def local(*xs: Any) -> Any:  # one device's blocks: its summand of the partial sum
        return op.primitive.bind(*xs, **params)[None]

    x = jax.shard_map(local, mesh=mesh, in_specs=tuple(s.to_partition_spec() for s in lay.ins),
                      out_specs=stacked_spec(d.axes, lay.outs[0]).to_partition_spec(),
                      check_vma=False)(*operands)
    for v in d.chain:
        cop = g.ops[v]
        cparams = cop.primitive.get_bind_params(dict(cop.params))
        x = jax.vmap(lambda y, p=cop.primitive, kw=cparams: p.bind(y, **kw))(x)
        x = _constrain(x, stacked_spec(d.axes, layouts[v].outs[0]), mesh)
    return x


def reduce_stacked(x: Any, spec: ShardingSpec, mesh: Any) -> Any:
    """Σ over the stacked leading dimension, in ``spec``: the once-per-step all-reduce."""
    return _constrain(x.sum(axis=0), spec, mesh)


def _constrain(x: Any, spec: ShardingSpec, mesh: Any) -> Any:
    if not getattr(x, "ndim", 0):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec.to_partition_spec()))


__all__ = ["Deferral", "find_deferrals", "reduce_stacked", "stacked_accumulators", "stacked_grad", "stacked_spec"]
