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
    jitted = make_jit(graph, plan.layouts, mesh, ClusterSpec.from_dict(plan.cluster), plan.input_specs,
                      plan.output_specs, plan.num_args, plan.static_argnums, plan.donate_argnums)
    return CompiledPlan(plan, jitted)


class CompiledPlan:
    """The jitted program of a one-stage plan, checking arguments against the plan's signature
    first (a clear ``SignatureError`` instead of a shape error deep inside the program).
    Everything else (``lower``, ``trace``, ``eval_shape``) is the ``jax.jit`` function's."""

    def __init__(self, plan: Any, jitted: Any) -> None:
        self._plan = plan
        self.jitted = jitted

    def __call__(self, *args: Any) -> Any:
        self._plan.check_signature(args)
        return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        self._plan.check_signature(args)
        return self.jitted.lower(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jitted, name)
