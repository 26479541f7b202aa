"""Strategies of the matmul family from an einsum description, one mesh axis at a time.

Each loop dimension of an einsum is *batch* (in both operands and the output), *free* (in one
operand and the output) or *contracting* (in both operands, not the output). Per mesh axis the
choices are (DTensor's ``gen_single_dim_einsum_strategies``):

- replicate: the axis splits nothing, every device on it computes the same thing;
- split a batch or free dim: split it in the operands that have it and in the output;
- split a contracting dim: split it in both operands; the output is a partial sum over the axis.

A strategy is one choice per mesh axis (the product over axes); several axes on one dim keep
mesh order, and a split must divide the dim.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from alpa_lite.ir.specs import ShardingSpec
from cost_model.context import RuleContext
from cost_model.strategy import Strategy


@dataclass(frozen=True)
class LoopDim:
    """One einsum loop dimension: where it sits in each operand and in the output (None: absent)."""

    name: str
    size: int
    operand_dims: tuple[int | None, ...]
    out_dim: int | None

    @property
    def contracting(self) -> bool:
        return self.out_dim is None


def einsum_strategies(ctx: RuleContext, loops: Sequence[LoopDim], operands: Sequence,
                      prefix: str = "") -> list[Strategy]:
    """All per-axis choices over ``loops``; ``operands`` are the operand TensorInfos."""
    axes = ctx.mesh_axes
    out = ctx.out
    result = []
    for choice in itertools.product([None, *range(len(loops))], repeat=len(axes)):
        per_loop: dict[int, list[str]] = {}
        for a, li in zip(axes, choice):
            if li is not None:
                per_loop.setdefault(li, []).append(a)
        if any(len(v) > 3 for v in per_loop.values()):
            continue
        if any(loops[li].size % ctx.cluster.group_size(v) for li, v in per_loop.items()):
            continue
        in_dims = [[()] * t.rank for t in operands]
        out_dims = [()] * out.rank
        partial: list[str] = []
        for li, ax in per_loop.items():
            lp = loops[li]
            for k, d in enumerate(lp.operand_dims):
                if d is not None:
                    in_dims[k][d] = tuple(ax)
            if lp.contracting:
                partial.extend(ax)
            else:
                out_dims[lp.out_dim] = tuple(ax)
        ins = [ShardingSpec(tuple(d)) for d in in_dims]
        if not all(s.divides(t.shape, ctx.sizes) for s, t in zip(ins, operands)):
            continue
        out_spec = ShardingSpec(tuple(out_dims), tuple(a for a in axes if a in partial))
        name = prefix + (",".join(f"{a}={loops[li].name}" for a, li in zip(axes, choice)
                                  if li is not None) or "R")
        result.append(ctx.strategy(name, [out_spec], ins, operands))
    return result

