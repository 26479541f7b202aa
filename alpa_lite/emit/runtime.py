"""Turning a ``Plan`` into something that runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from alpa_lite.emit.program import make_jit
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import MeshError, PlanFileError
from alpa_lite.tracing.tracer import trace


def _signature_args(plan: Any) -> list[Any]:
    return [jax.ShapeDtypeStruct(s, d) for s, d in plan.signature]


def compile_plan(plan: Any, fn: Callable[..., Any], mesh: Any = None,
                 example_args: Sequence[Any] | None = None) -> Any:
    """One-stage plan → ``jax.jit`` function equal to ``fn``."""
    mesh = mesh if mesh is not None else plan.mesh
    if mesh is None:
        raise MeshError("this plan has no mesh: pass compile(fn, mesh=jax.make_mesh(...))")
    if tuple(mesh.axis_sizes) != tuple(plan.mesh_shape):
        raise MeshError(f"the plan is for a mesh of shape {plan.mesh_shape} "
                        f"{plan.axis_names}, got {tuple(mesh.axis_sizes)}")
    graph = plan.graph
    if graph is None:
        if example_args is None:
            raise PlanFileError("a loaded plan needs example arguments to rebuild the program: "
                                "compile(fn, example_args=(...)) with arrays or ShapeDtypeStructs")
        plan.check_signature(example_args)
        graph = trace(fn, *example_args, static_argnums=plan.static_argnums)
        if tuple(op.kind for op in graph.ops) != plan.op_kinds:
            raise PlanFileError("this function does not trace to the program the plan was made "
                                "for (its ops differ): plan it again")
    jitted = make_jit(graph, plan.layouts, mesh, ClusterSpec.from_dict(plan.cluster), plan.input_specs,
                      plan.output_specs, plan.num_args, plan.static_argnums, plan.donate_argnums)
    return CompiledPlan(plan, jitted, mesh)


class CompiledPlan:
    """The jitted program of a one-stage plan. Before running it checks the arguments against the
    plan's signature (a clear ``SignatureError``, not a shape error deep inside) and moves any
    array committed to another sharding onto the plan's (jit refuses those on Auto meshes).
    Everything else (``lower``, ``trace``, ``eval_shape``) is the ``jax.jit`` function's."""

    def __init__(self, plan: Any, jitted: Any, mesh: Any) -> None:
        self._plan = plan
        self.jitted = jitted
        self._mesh = mesh
        self._shardings = [NamedSharding(mesh, s.to_partition_spec()) for s in plan.input_specs]

    def _place(self, args: Sequence[Any]) -> list[Any]:
        if isinstance(self._mesh, jax.sharding.AbstractMesh):
            shape = "x".join(str(n) for n in self._plan.mesh_shape)
            raise MeshError(f"this plan was made on an abstract {shape} mesh ({self._plan.num_devices} devices, "
                            "none attached): it can be lowered, not run; compile(fn, mesh=jax.make_mesh(...)) "
                            "with that many real devices to run it")
        static = set(self._plan.static_argnums)
        dyn_idx = [i for i in range(len(args)) if i not in static]
        leaves, tree = jax.tree.flatten([args[i] for i in dyn_idx])
        moved = False
        for k, (x, sh) in enumerate(zip(leaves, self._shardings)):
            cur = getattr(x, "sharding", None)
            if isinstance(x, jax.Array) and cur is not None and not cur.is_equivalent_to(sh, x.ndim):
                leaves[k], moved = jax.device_put(x, sh), True
        if not moved:
            return list(args)
        out, dyn = list(args), jax.tree.unflatten(tree, leaves)
        for i, a in zip(dyn_idx, dyn):
            out[i] = a
        return out

    def __call__(self, *args: Any) -> Any:
        self._plan.check_signature(args)
        return self.jitted(*self._place(args))

    def lower(self, *args: Any) -> Any:
        self._plan.check_signature(args)
        return self.jitted.lower(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jitted, name)
