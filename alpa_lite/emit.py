"""Emission: a solved plan → a ``jax.jit`` function with ``jax.sharding`` annotations.

The body replays the traced program op by op (``primitive.bind``), with
``with_sharding_constraint`` on every op output the plan decided (the reduced spec of a
partial sum: the consumers' common spec, so XLA can reduce-scatter) and on every operand that a
consumer wants in another spec than it was produced in. Ops with no rule are left to XLA.
It is wrapped in ``auto_axes`` (design.md: works on Explicit and Auto meshes alike) and jitted
with the plan's input/output shardings and donation of carried state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from alpa_lite.graph import OpGraph
from alpa_lite.specs import ShardingSpec


@dataclass(frozen=True)
class OpLayout:
    """What the plan decided for one op: its outputs' specs, the specs its operands arrive in,
    and whether it is left to XLA (no rule)."""

    outs: tuple[ShardingSpec, ...]
    ins: tuple[ShardingSpec, ...]
    free: bool = False


def value_specs(graph: OpGraph, layouts: Sequence[OpLayout],
                output_specs: Sequence[ShardingSpec]) -> dict[int, ShardingSpec]:
    """The (reduced) spec each tensor takes right after its producer."""
    wants: dict[int, list[ShardingSpec]] = {}
    for op, lay in zip(graph.ops, layouts):
        for t, s in zip(op.operands, lay.ins):
            wants.setdefault(t, []).append(s)
    for t, s in zip(graph.outputs, output_specs):
        wants.setdefault(t, []).append(s)
    result = {}
    for op, lay in zip(graph.ops, layouts):
        for t, s in zip(op.outputs, lay.outs):
            if s.is_partial:
                w = set(wants.get(t, ()))
                s = w.pop() if len(w) == 1 else s.without_partial()
            result[t] = s
    return result


def make_body(graph: OpGraph, layouts: Sequence[OpLayout],
              output_specs: Sequence[ShardingSpec], mesh: Any = None) -> Callable[..., list[Any]]:
    """A function of the flat inputs that runs the program with the plan's constraints."""
    specs = value_specs(graph, layouts, output_specs)

    def constrain(x: Any, spec: ShardingSpec) -> Any:
        if not getattr(x, "ndim", 0):
            return x
        pspec = spec.to_partition_spec()
        # Inside auto_axes on an Explicit mesh the context mesh is set: a bare PartitionSpec
        # refers to it. On an Auto mesh there is no context mesh: name the mesh.
        if jax.sharding.get_abstract_mesh().empty and mesh is not None:
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))
        return jax.lax.with_sharding_constraint(x, pspec)

    def body(*flat: Any) -> list[Any]:
        env: dict[int, Any] = {}
        resharded: dict[tuple[int, ShardingSpec], Any] = {}
        for op, lay in zip(graph.ops, layouts):
            if op.kind == "parameter":
                env[op.outputs[0]] = flat[op.params["index"]]
                continue
            if op.kind == "constant":
                env[op.outputs[0]] = op.params["value"]
                continue
            ins = []
            for t, s in zip(op.operands, lay.ins if not lay.free else ()):
                if s != specs.get(t):
                    key = (t, s)
                    if key not in resharded:
                        resharded[key] = constrain(env[t], s)
                    ins.append(resharded[key])
                else:
                    ins.append(env[t])
            if lay.free:
                ins = [env[t] for t in op.operands]
            params = op.primitive.get_bind_params(dict(op.params))
            outs = op.primitive.bind(*ins, **params)
            outs = outs if op.primitive.multiple_results else [outs]
            for t, x in zip(op.outputs, outs):
                env[t] = x if lay.free else constrain(x, specs[t])
        return [env[t] for t in graph.outputs]

    return body


def make_jit(graph: OpGraph, layouts: Sequence[OpLayout], mesh: Any,
             input_specs: Sequence[ShardingSpec], output_specs: Sequence[ShardingSpec],
             num_args: int, static_argnums: Sequence[int], donate_argnums: Sequence[int]) -> Any:
    """``jax.jit(auto_axes(body), in_shardings=..., out_shardings via auto_axes, donate...)``
    taking the user's (pytree) arguments, static ones included."""
    body = make_body(graph, layouts, output_specs, mesh)
    static = tuple(sorted(static_argnums))
    in_leaf_sh = [NamedSharding(mesh, s.to_partition_spec()) for s in input_specs]
    out_leaf_sh = [NamedSharding(mesh, s.to_partition_spec()) for s in output_specs]
    out_sh = jax.tree.unflatten(graph.out_tree, out_leaf_sh)
    dyn_sh = jax.tree.unflatten(graph.in_tree, in_leaf_sh)

    def tree_body(*args: Any) -> Any:
        dyn = [a for i, a in enumerate(args) if i not in static]
        return jax.tree.unflatten(graph.out_tree, body(*jax.tree.leaves(dyn)))

    def fn(*args: Any) -> Any:
        return jax.sharding.auto_axes(tree_body, out_sharding=out_sh)(*args)

    in_shardings = tuple(dyn_sh)
    return jax.jit(fn, in_shardings=in_shardings, static_argnums=static,
                   donate_argnums=tuple(donate_argnums))


def partition_specs(specs: Sequence[ShardingSpec]) -> list[PartitionSpec]:
    return [s.to_partition_spec() for s in specs]
