"""The public entry points: ``al.plan`` (one stage or a pipeline), ``@al.parallelize`` and
``al.clear_caches``.

``plan`` dispatches: a pipeline (``pipeline.planner``) when ``num_stages`` asks for more than one
stage, or leaves it open for a step written with ``al.value_and_grad``; else the one-stage
planner (``intra.planner``).

``@al.parallelize`` plans on the first call per input signature, then reuses the compiled plan. It
works bare (``@al.parallelize``) and with arguments (``@al.parallelize(mesh=mesh)``), as Alpa's
``parallelize`` does. The cache key is the pytree structure, shapes and dtypes (as ``jax.jit`` types
them: ``alpa_lite.ir.signature``) of the dynamic arguments plus the values of static ones; the
shardings the arguments arrive with are not part of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

from alpa_lite.intra import scan
from alpa_lite.intra.planner import METHODS, plan_one_stage
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.signature import leaf_signature
from alpa_lite.pipeline import layers
from alpa_lite.pipeline.one_stage import plan_one_stage_remat
from alpa_lite.pipeline.planner import check_one_stage_remat, plan_pipeline, remat_mode
from alpa_lite.pipeline.program import TracedStep, pipelined_step
from alpa_lite.result.plan import Plan


def plan(fn: Callable[..., Any], *args: Any, mesh: Any = None, cluster: ClusterSpec | None = None,
         method: str = "auto", memory_budget: float | None = None, num_stages: int | None = None,
         num_microbatches: int | None = None, batch_argnums: Sequence[int] | None = None,
         donate_argnums: Sequence[int] | None = None, static_argnums: Sequence[int] = (),
         time_limit_s: float = 60.0, progress: Callable[[str], None] | None = None,
         remat: bool | None = None) -> Plan:
    """Plan how to run ``fn(*args)`` on ``mesh`` (see design.md, "Public API").

    ``remat`` (activation recomputation): None lets the planner decide (per pipeline stage in the
    stage DP; with ``num_stages=1``, per layer of the loss: keep, "dots" or "full", chosen with the
    sharding, ``pipeline.one_stage``), False never recomputes, True recomputes every layer in full.
    It needs a loss differentiated with ``al.value_and_grad`` (its layers): ``remat=True`` on a
    step without one raises a PlanningError.

    ``progress``, when given, is called with each phase's name as it starts: "tracing",
    "strategies", "ILP", "DP" (the CLI shows them on a terminal).
    """
    if method not in METHODS:
        raise PlanningError(f"unknown method {method!r}; choose one of {METHODS}")
    if not time_limit_s > 0:
        raise PlanningError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    mode = remat_mode(remat)  # a bad value fails before any tracing
    # one stage may recompute layers of an al.value_and_grad loss (pipeline.one_stage)
    one_remat = mode != "never" and (method == "auto" or mode == "always")
    traced = None  # the step's trace when it has that loss, made once for the choice and the planner
    if num_stages is None and method == "auto" or num_stages in (None, 1) and one_remat:
        traced = _pipelined_step(fn, args, static_argnums)
    if num_stages not in (None, 1) or num_stages is None and method == "auto" and traced is not None:
        (progress or (lambda phase: None))("DP")
        return plan_pipeline(fn, *args, mesh=mesh, cluster=cluster, method=method,
                             memory_budget=memory_budget, num_stages=num_stages,
                             num_microbatches=num_microbatches, batch_argnums=batch_argnums,
                             static_argnums=static_argnums, time_limit_s=time_limit_s, progress=progress,
                             remat=remat, traced=traced)
    if one_remat and traced is not None:
        return plan_one_stage_remat(fn, *args, remat=mode if method == "auto" else "always", mesh=mesh,
                                    cluster=cluster, method=method, memory_budget=memory_budget,
                                    batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                                    static_argnums=static_argnums, time_limit_s=time_limit_s, progress=progress,
                                    traced=traced)
    check_one_stage_remat(remat)
    return plan_one_stage(fn, *args, mesh=mesh, cluster=cluster, method=method, memory_budget=memory_budget,
                          batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                          static_argnums=static_argnums, time_limit_s=time_limit_s, progress=progress)


def _pipelined_step(fn: Callable[..., Any], args: Sequence[Any], static_argnums: Sequence[int]) -> TracedStep | None:
    """The step's trace when ``fn`` computes its gradients with ``al.value_and_grad`` (one
    ``make_jaxpr``, reused by the pipeline planner): then ``num_stages=None`` weighs pipelines
    against one stage."""
    return pipelined_step(fn, args, tuple(sorted(i % len(args) for i in static_argnums)) if args else ())


def clear_caches() -> None:
    """Forget what planning memoises across calls: scan bodies traced and solved, and pipeline
    layers solved per view (each cache is bounded; this frees them, e.g. between models)."""
    scan.clear_caches()
    layers.clear_cache()


class Parallelized:
    def __init__(self, fun: Callable[..., Any], plan_kwargs: dict[str, Any]) -> None:
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._kwargs = plan_kwargs
        self._static = tuple(plan_kwargs.get("static_argnums", ()))
        self._cache: dict[Hashable, tuple[Any, Callable[..., Any]]] = {}

    def _key(self, args: Sequence[Any]) -> Hashable:
        n = len(args)
        static = {i % n for i in self._static} if n else set()
        dyn = [a for i, a in enumerate(args) if i not in static]
        leaves, tree = jax.tree.flatten(dyn)
        # The types jax.jit sees (a Python int step and the int32 array the first call returns
        # are one signature), never the shardings: a call fed this function's own sharded
        # outputs reuses its plan (the compiled plan moves arguments onto its input shardings).
        sig = tuple(leaf_signature(x) for x in leaves)
        try:
            statics = tuple(args[i] for i in sorted(static))
            hash(statics)
        except TypeError:
            raise PlanningError("static arguments must be hashable, as for jax.jit") from None
        return (tree, sig, statics)

    def _entry(self, args: Sequence[Any]) -> tuple[Any, Callable[..., Any]]:
        key = self._key(args)
        if key not in self._cache:
            p = plan(self._fun, *args, **self._kwargs)
            self._cache[key] = (p, p.compile(self._fun))
        return self._cache[key]

    def __call__(self, *args: Any) -> Any:
        return self._entry(args)[1](*args)

    def get_plan(self, *args: Any) -> Any:
        """The plan used for arguments like these (planning them if needed)."""
        return self._entry(args)[0]

    def lower(self, *args: Any) -> Any:
        return self._entry(args)[1].lower(*args)

    @property
    def num_plans(self) -> int:
        return len(self._cache)


def parallelize(fun: Callable[..., Any] | None = None, *, mesh: Any = None, cluster: ClusterSpec | None = None,
                method: str = "auto", memory_budget: float | None = None, num_stages: int | None = None,
                num_microbatches: int | None = None, batch_argnums: Sequence[int] | None = None,
                donate_argnums: Sequence[int] | None = None, static_argnums: Sequence[int] = (),
                time_limit_s: float = 60.0,
                remat: bool | None = None) -> Parallelized | Callable[[Callable[..., Any]], Parallelized]:
    """Decorate a function so it runs with an alpa-lite plan; the options are ``plan``'s."""
    options = dict(mesh=mesh, cluster=cluster, method=method, memory_budget=memory_budget, num_stages=num_stages,
                   num_microbatches=num_microbatches, batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                   static_argnums=static_argnums, time_limit_s=time_limit_s, remat=remat)
    if fun is None:
        return lambda f: Parallelized(f, options)
    return Parallelized(fun, options)
