"""``@al.parallelize``: plan on the first call per input signature, then reuse the compiled plan.

Works bare (``@al.parallelize``) and with arguments (``@al.parallelize(mesh=mesh)``), as Alpa's
``parallelize`` does. The cache key is the pytree structure, shapes and dtypes of the dynamic
arguments plus the values of static ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

from alpa_lite.ir.errors import PlanningError


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
        sig = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)))
                    for x in leaves)
        try:
            statics = tuple(args[i] for i in sorted(static))
            hash(statics)
        except TypeError:
            raise PlanningError("static arguments must be hashable, as for jax.jit") from None
        return (tree, sig, statics)

    def _entry(self, args: Sequence[Any]) -> tuple[Any, Callable[..., Any]]:
        key = self._key(args)
        if key not in self._cache:
            from alpa_lite.intra.planner import plan

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


def parallelize(fun: Callable[..., Any] | None = None, **plan_kwargs: Any) -> Any:
    """Decorate a function so it runs with an alpa-lite plan (``plan_kwargs`` go to ``al.plan``)."""
    if fun is None:
        return lambda f: Parallelized(f, plan_kwargs)
    return Parallelized(fun, plan_kwargs)
