"""Turning a ``Plan`` into something that runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from alpa_lite.cluster import ClusterSpec
from alpa_lite.emit import make_jit
from alpa_lite.errors import MeshError, PlanFileError
from alpa_lite.tracer import trace


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
    return make_jit(graph, plan.layouts, mesh, ClusterSpec.from_dict(plan.cluster), plan.input_specs, plan.output_specs,
                    plan.num_args, plan.static_argnums, plan.donate_argnums)
