"""One stage for a step with ``al.value_and_grad``, each layer's recomputation chosen with the sharding.

Recomputing a layer changes the program (``checkpointing``), so each choice of policies is its own
intra-op problem: the ILP shards that program within the memory budget and prices its
recomputation like any other op (extra forward compute in the backward pass, activations no
longer held from the forward to the backward). The search with ``remat=None``:

1. The step as written, planned with no memory budget. When that plan fits the budget, memory
   does not bind and it is the plan: recomputing only adds ops that run again (a heuristic where a
   recomputed value would spare a resharding of the kept one).
2. Otherwise each candidate is planned within the budget: keeping every activation; every layer
   "dots"; every layer "full"; and, for each policy whose every-layer candidate fits, the fewest
   leading layers under it that fit (bisection on the count, ``BISECT_STEPS`` solves at most:
   the earliest layers' activations are alive longest). The cheapest that fits wins; which layers
   and the count search are a heuristic, and the plan's ``RematInfo.tried`` lists every candidate.

``remat=False`` plans the step as written; ``remat=True`` recomputes every layer in full (Alpa's
behaviour).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from alpa_lite.intra.planner import plan_one_stage
from alpa_lite.ir.errors import CutOffError, InfeasibleError, PlanningError
from alpa_lite.ir.graph import OpGraph
from alpa_lite.pipeline.checkpointing import checkpointed_step, loss_program
from alpa_lite.pipeline.program import TracedStep, layer_starts
from alpa_lite.result.plan import Plan, RematInfo

log = logging.getLogger("alpa_lite.pipeline.one_stage")

# Solves of the bisection for the fewest leading layers that fit, per policy: a count within
# L/2**BISECT_STEPS of the least (on a 96-layer model, within 6 layers).
BISECT_STEPS = 4


def plan_one_stage_remat(fn: Callable[..., Any], *args: Any, remat: str = "auto", num_layers: int | None = None,
                         static_argnums: Sequence[int] = (), memory_budget: float | None = None,
                         progress: Callable[[str], None] | None = None, traced: TracedStep | None = None,
                         **options: Any) -> Plan:
    """``plan(..., num_stages=1)`` for a step with ``al.value_and_grad``; ``remat`` is "auto",
    "never" or "always" (``al.plan``'s None, False, True); ``num_layers``: cluster the loss into
    this many layers even when it has markers; ``traced``: the step's full-batch trace when the
    caller made it (``program.pipelined_step``). ``options``: ``plan_one_stage``'s."""
    progress = progress or (lambda phase: None)
    t0 = time.perf_counter()
    static = tuple(sorted(i % len(args) for i in static_argnums)) if args else ()

    starts: list[int] = []
    program = None  # the step's trace and loss, made once for every candidate

    def plan_with(policies: Sequence[str] | None, budget: float | None = memory_budget,
                  cutoff_s: float | None = None) -> Plan:
        step = fn if policies is None or all(p == "keep" for p in policies) else \
            checkpointed_step(fn, args, static, starts, policies, program)
        return plan_one_stage(step, *args, static_argnums=static_argnums, memory_budget=budget,
                              progress=progress, cutoff_s=cutoff_s, explain_infeasible=remat != "auto", **options)

    if remat == "never":
        return plan_with(None)
    program = loss_program(fn, args, static, traced)
    starts += layer_starts(program[2], num_layers)
    plan = _search(plan_with, starts, remat, memory_budget, progress)
    total = time.perf_counter() - t0
    return replace(plan, timings={**plan.timings, "remat_search_s": total, "total_s": total})


def _search(plan_with: Callable[..., Plan], starts: Sequence[int], remat: str, memory_budget: float | None,
            progress: Callable[[str], None]) -> Plan:
    """The search of the module docstring (``remat`` "auto" or "always") over layers cut at
    ``starts``; ``plan_with(policies, budget, cutoff_s)`` plans one choice."""
    L = len(starts)
    if remat == "always":
        plan = plan_with(["full"] * L)
        return _with_info(plan, starts, ("full",) * L, None, (f"every layer full: {_ms(plan)}",))

    free = plan_with(None, math.inf)
    budget = _budget(free, memory_budget)
    if free.cost.peak_memory_bytes <= budget:
        log.info("one stage: memory does not bind (%.4g B of %.4g B): nothing recomputes",
                 free.cost.peak_memory_bytes, budget)
        return _with_info(free, starts, ("keep",) * L, free,
                          (f"keeping every activation, no memory budget: {_ms(free)}: fits, memory does not bind",))
    progress("recomputation search")
    tried: list[str] = []
    found: list[tuple[float, int, tuple[str, ...], Plan]] = []  # (cost, order, policies, plan)

    def attempt(policies: tuple[str, ...], what: str) -> bool:
        """Whether ``policies`` fit; planned, unless its LP relaxation shows it costlier than the
        best so far (it fits, then, as far as the search is concerned: fewer layers are tried)."""
        best = min((c[0] for c in found), default=None)
        tick = time.perf_counter()

        def took() -> str:
            return f" [{time.perf_counter() - tick:.1f} s]"

        try:
            plan = plan_with(policies, cutoff_s=best)
        except CutOffError as e:
            tried.append(f"{what}: not searched, its LP relaxation bounds it at {e.bound * 1e3:.4g} ms{took()}")
            return True
        except InfeasibleError as e:
            tried.append(f"{what}: does not fit ({str(e)[:160]}){took()}")
            return False
        except PlanningError as e:  # no plan found in time: treated as not fitting
            tried.append(f"{what}: no plan found ({str(e)[:160]}){took()}")
            return False
        tried.append(f"{what}: {_ms(plan)}{took()}")
        found.append((plan.cost.total_s, len(found), policies, plan))
        return True

    attempt(("keep",) * L, "keeping every activation")
    for policy in ("dots", "full"):
        if not attempt((policy,) * L, f"every layer {policy}"):
            continue
        lo, hi = 0, L  # fewest leading layers under ``policy`` that fit: in (lo, hi]
        for _ in range(BISECT_STEPS):
            if hi - lo <= 1:
                break
            k = (lo + hi) // 2
            if attempt((policy,) * k + ("keep",) * (L - k), f"layers 0..{k - 1} {policy}"):
                hi = k
            else:
                lo = k
    if not found:
        raise InfeasibleError(f"no one-stage plan fits {budget:.4g} bytes per device, even with every layer "
                              f"recomputed: {'; '.join(tried)}. Raise memory_budget, use more devices or a "
                              "pipeline (num_stages=None)")
    _, _, policies, plan = min(found, key=lambda c: (c[0], c[1]))
    return _with_info(plan, starts, policies, free, tuple(tried))


def _budget(plan: Plan, memory_budget: float | None) -> float:
    return float(plan.cluster.get("device", {}).get("memory", math.inf)) if memory_budget is None \
        else float(memory_budget)


def _ms(plan: Plan) -> str:
    return f"{plan.cost.total_s * 1e3:.4g} ms, {plan.cost.peak_memory_bytes / 2**20:.4g} MiB per device"


def _with_info(plan: Plan, starts: Sequence[int], policies: Sequence[str], unbounded: Plan | None,
               tried: tuple[str, ...]) -> Plan:
    """``plan`` with its ``RematInfo``."""
    flops = sum(plan.graph.ops[v].flops for v in recomputed_ops(plan.graph)) if plan.graph is not None else 0.0
    info = RematInfo(tuple(policies), tuple(int(s) for s in starts), float(flops),
                     None if unbounded is None else unbounded.cost.total_s,
                     None if unbounded is None else unbounded.cost.peak_memory_bytes, tried)
    return replace(plan, layer_remat=info)


def recomputed_ops(graph: OpGraph) -> list[int]:
    """Ops that run a forward op again: what XLA's common-subexpression elimination would merge
    with an earlier op (same primitive and params, the same operands once each barrier's results
    are read as its operands) were it not for the barriers (``OpGraph.barriers``)."""
    if not graph.barriers:
        return []
    canon = np.arange(len(graph.tensors))
    seen: dict[Any, int] = {}
    out = []
    first = min(p for p, _ in graph.barriers)
    for op in graph.ops:
        if op.kind in ("parameter", "constant") or not op.outputs:
            continue
        try:
            key = (op.primitive, tuple(int(canon[t]) for t in op.operands), repr(sorted(op.params.items())))
        except Exception:  # noqa: BLE001 - params that do not print are never merged
            continue
        if key in seen and op.index >= first:
            twin = graph.ops[seen[key]]
            canon[list(op.outputs)] = [canon[t] for t in twin.outputs]
            out.append(op.index)
        else:
            seen.setdefault(key, op.index)
    return out
