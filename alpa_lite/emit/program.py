"""Emission: a solved plan → a ``jax.jit`` function with ``jax.sharding`` annotations.

The body replays the traced program op by op (``primitive.bind``), with
``with_sharding_constraint`` on every op output the plan decided (the reduced spec of a
partial sum: the consumers' common spec, so XLA can reduce-scatter) and on every operand that a
consumer wants in another spec than it was produced in. Ops with no rule are left to XLA.
It is wrapped in ``auto_axes`` (design.md: works on Explicit and Auto meshes alike) and jitted
with the plan's input/output shardings and donation of carried state.

A ``lax.scan`` op is re-bound as ``jax.lax.scan`` of a function that replays its body with the
chosen body solution's constraints (``emit_scan``; the solution from ``intra.scan``), so
constraints apply inside the loop, to the stacked parameters as sliced per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from alpa_lite.intra.scan import body_plan_for
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import Op, OpGraph
from alpa_lite.ir.hlo_names import RESHARD_P
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.result.plan import OpLayout
from cost_model.resharding import reshard_path

log = logging.getLogger("alpa_lite.emit")


def constrain_to(x: Any, spec: ShardingSpec, mesh: Any = None) -> Any:
    """``with_sharding_constraint(x, spec)`` (partial axes dropped); scalars pass through."""
    if not getattr(x, "ndim", 0):
        return x
    pspec = spec.to_partition_spec()
    # Inside auto_axes on an Explicit mesh the context mesh is set: a bare PartitionSpec
    # refers to it. On an Auto mesh there is no context mesh: name the mesh.
    if jax.sharding.get_abstract_mesh().empty and mesh is not None:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))
    return jax.lax.with_sharding_constraint(x, pspec)


def make_body(graph: OpGraph, layouts: Sequence[OpLayout], output_specs: Sequence[ShardingSpec],
              cluster: ClusterSpec, mesh: Any = None) -> Callable[..., list[Any]]:
    """A function of the flat inputs that runs the program with the plan's constraints.

    A non-partial op output is constrained to its spec. Where a consumer wants another spec,
    every intermediate spec of the modelled resharding path (``reshard_path``) is constrained in
    turn, so XLA performs the collectives the cost model charged (given only the end spec it may
    replicate first). A partial-sum output is left unconstrained: its consumers' first
    constraint is where XLA reduces it, as the model charges on the out-edge.
    """
    produced: dict[int, ShardingSpec] = {}
    for op, lay in zip(graph.ops, layouts):
        if not lay.free:
            produced.update(zip(op.outputs, lay.outs))

    def constrain(x: Any, spec: ShardingSpec) -> Any:
        return constrain_to(x, spec, mesh)

    barriers = {p: ts for p, ts in graph.barriers}
    constants = {t for op in graph.ops if op.kind == "constant" for t in op.outputs} if barriers else set()

    def body(*flat: Any) -> list[Any]:
        env: dict[int, Any] = {}
        moved: dict[tuple[int, ShardingSpec], Any] = {}

        def fetch(t: int, want: ShardingSpec | None) -> Any:
            src = produced.get(t)
            if want is None or src is None or want == src:
                return env[t]
            if (t, want) not in moved:
                x = env[t]
                for step in reshard_path(src, want, graph.tensors[t], cluster):
                    key = (t, step.spec)
                    x = moved[key] if key in moved else constrain(x, step.spec)
                    moved[key] = x
                moved[(t, want)] = x
            return moved[(t, want)]

        for op, lay in zip(graph.ops, layouts):
            if op.index in barriers:  # a recomputation starts here (``OpGraph.barriers``)
                group = [t for t in barriers[op.index] if t in env and t not in constants]
                outs = lax.optimization_barrier([env[t] for t in group])
                # XLA's partitioner does not carry shardings through the barrier: each result is
                # constrained to its operand's spec again (else it is gathered to replicated)
                env.update({t: x if t not in produced or produced[t].is_partial else constrain(x, produced[t])
                            for t, x in zip(group, outs)})
                for key in [key for key in moved if key[0] in group]:  # resharded before it: stale
                    del moved[key]
            if op.kind == "parameter":
                env[op.outputs[0]] = flat[op.params["index"]]
                continue
            if op.kind == "constant":
                env[op.outputs[0]] = op.params["value"]
                continue
            wants = [None] * len(op.operands) if lay.free else list(lay.ins)
            ins = [fetch(t, w) for t, w in zip(op.operands, wants)]
            if op.primitive is lax.scan_p and not lay.free:  # constraints inside the loop body
                outs = emit_scan(op, ins, lay.outs, lay.ins, cluster, mesh)
            elif op.primitive is RESHARD_P:
                # Its spec is fixed in the plan (a hard constraint) and constrained just below;
                # bound as is it would name the traced (Explicit) mesh inside auto_axes.
                outs = ins
            else:
                params = op.primitive.get_bind_params(_without_explicit_shardings(op.params))
                outs = op.primitive.bind(*ins, **params)
                outs = outs if op.primitive.multiple_results else [outs]
            for t, x, spec in zip(op.outputs, outs, lay.outs):
                env[t] = x if lay.free or spec.is_partial else constrain(x, spec)
        return [fetch(t, s) for t, s in zip(graph.outputs, output_specs)]

    return body


# Params through which an op states its result's sharding in the types (explicit sharding).
_SHARDING_PARAMS = ("sharding", "out_sharding")


def _without_explicit_shardings(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with result shardings on Explicit mesh axes dropped. Ops traced after a
    ``reshard`` onto Explicit axes carry that layout in their params (``broadcast_in_dim``'s
    ``sharding``, ``dot_general``'s ``out_sharding``); the body is replayed inside ``auto_axes``,
    where jax refuses them, and the plan's own constraints (the reshard's among them) place the
    results."""
    out = dict(params)
    for key in _SHARDING_PARAMS:
        mesh = getattr(out.get(key), "mesh", None)
        if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
            out[key] = None
    return out


def make_jit(graph: OpGraph, layouts: Sequence[OpLayout], mesh: Any, cluster: ClusterSpec,
             input_specs: Sequence[ShardingSpec], output_specs: Sequence[ShardingSpec],
             num_args: int, static_argnums: Sequence[int], donate_argnums: Sequence[int]) -> Any:
    """``jax.jit(auto_axes(body), in_shardings=..., out_shardings via auto_axes, donate...)``
    taking the user's (pytree) arguments, static ones included."""
    body = make_body(graph, layouts, output_specs, cluster, mesh)
    static = tuple(sorted(static_argnums))
    in_leaf_sh = [NamedSharding(mesh, s.to_partition_spec()) for s in input_specs]
    out_leaf_sh = [NamedSharding(mesh, s.to_partition_spec()) for s in output_specs]
    out_sh = jax.tree.unflatten(graph.out_tree, out_leaf_sh)
    dyn_sh = jax.tree.unflatten(graph.in_tree, in_leaf_sh)

    def tree_body(*dyn: Any) -> Any:
        return jax.tree.unflatten(graph.out_tree, body(*jax.tree.leaves(dyn)))

    def fn(*args: Any) -> Any:
        # Static arguments stay out of auto_axes: it takes JAX types only (a str is not one),
        # and the traced program already holds their values.
        dyn = [a for i, a in enumerate(args) if i not in static]
        return jax.sharding.auto_axes(tree_body, out_sharding=out_sh)(*dyn)

    in_shardings = tuple(dyn_sh)
    return jax.jit(fn, in_shardings=in_shardings, static_argnums=static,
                   donate_argnums=tuple(donate_argnums), compiler_options=compiler_options(graph, mesh))


# XLA's CPU pipeline expands optimization barriers early (its "cse_barrier_expander" pass), before
# CSE and scheduling: a recomputation is then merged with the forward ops it repeats or scheduled
# beside them, and holds what it was to free. Measured on an 8-layer MLP (batch 512, width 32→128)
# with plain ``jax.checkpoint``: compiled temporaries 11.3 MB keeping, recomputing in full and
# "dots" alike; with the pass disabled 11.3, 1.9 and 3.7 MB. XLA's GPU pipeline keeps the barriers.
_KEEP_BARRIERS_ON_CPU = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(graph: OpGraph, mesh: Any) -> dict[str, str] | None:
    """XLA options for a program that recomputes (``OpGraph.barriers``) on CPU devices."""
    return keep_barriers(mesh) if graph.barriers else None


def keep_barriers(mesh: Any) -> dict[str, str] | None:
    """XLA options that keep a recomputation behind its optimization barrier on ``mesh``: on CPU
    devices, ``_KEEP_BARRIERS_ON_CPU``; None elsewhere (an AbstractMesh has no devices)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        return None
    return dict(_KEEP_BARRIERS_ON_CPU) if np.ravel(mesh.devices)[0].platform == "cpu" else None


def partition_specs(specs: Sequence[ShardingSpec]) -> list[PartitionSpec]:
    return [s.to_partition_spec() for s in specs]


def emit_scan(op: Op, ins: Sequence[Any], outs: Sequence[ShardingSpec], in_specs: Sequence[ShardingSpec],
              cluster: ClusterSpec, mesh: Any) -> list[Any]:
    """Run the scan op with its body's sharding constraints applied in every iteration."""
    p = op.params
    bp = body_plan_for(op, outs, in_specs, cluster)
    if bp is None:
        log.warning("no body solution matches the scan's layout; its body is left to XLA")
        return list(op.primitive.bind(*ins, **op.primitive.get_bind_params(dict(p))))
    body = make_body(bp.graph, bp.layouts, bp.output_specs, cluster, mesh)
    n_c, n_carry = int(p["num_consts"]), int(p["num_carry"])
    consts, init, xs = list(ins[:n_c]), list(ins[n_c:n_c + n_carry]), list(ins[n_c + n_carry:])

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        # Pin the loop state and the slices to the solution's specs, so XLA keeps the carry in
        # the spec the body was solved for (left free, it may pick another and reshard twice).
        flat = [constrain_to(a, spec, mesh) for a, spec in zip([*consts, *carry, *x], bp.input_specs)]
        res = body(*flat)
        return list(res[:n_carry]), list(res[n_carry:])

    carry, ys = jax.lax.scan(step, init, xs if xs else None, length=int(p["length"]),
                             reverse=bool(p["reverse"]), unroll=p.get("unroll", 1))
    return [*carry, *ys]
