"""alpa-lite: an auto-parallelism planning compiler for JAX.

The IR (``alpa_lite.ir``: specs, cluster, errors) imports eagerly; the front end (``plan``,
``parallelize``, ...) loads on first attribute access (PEP 562), so ``cost_model``, ``ilp`` and
``dp_stages`` can import the IR without pulling in the front end. The README's "Layout" section
lists the subpackages and the order in which they import each other.
"""

from __future__ import annotations

import importlib
from typing import Any

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.specs import ShardingSpec

__version__ = "0.1.0"

_LAZY = {
    "plan": "alpa_lite.api",
    "clear_caches": "alpa_lite.api",
    "Plan": "alpa_lite.result.plan",
    "parallelize": "alpa_lite.api",
    "value_and_grad": "alpa_lite.tracing.markers",
    "grad": "alpa_lite.tracing.markers",
    "mark_layer": "alpa_lite.tracing.markers",
    "trace": "alpa_lite.tracing.tracer",
    "plan_serving": "alpa_lite.serving",
    "ServingPlan": "alpa_lite.serving",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in {"errors"}:
        return importlib.import_module(f"alpa_lite.ir.{name}")
    raise AttributeError(f"module 'alpa_lite' has no attribute {name!r}")


__all__ = ["ClusterSpec", "PlanningError", "ShardingSpec", "__version__", *_LAZY]
