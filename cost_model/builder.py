"""The interpreter: every op of an ``OpGraph`` → its list of strategies.

Parameters and non-scalar constants may take any spec (slicing a replicated constant is free);
scalars stay replicated. An input fed anew each call (a batch) is charged one pass over its
per-device bytes, the feed, so splitting it pays; a ``resident`` input, which stays on the
devices between calls (weights, carried state such as a KV cache), costs no time of its own: the
ops that read it price those bytes (charging both would count a decode step's weights twice).
Other ops ask the rule table; an op with no rule, or whose rule fails,
gets the replicated strategy and is left unconstrained in emission (one warning per primitive).
Specs the user fixed (``with_sharding_constraint``, committed inputs) filter the list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import ShardingError
from alpa_lite.ir.graph import Op, OpGraph
from alpa_lite.ir.specs import ShardingSpec
from cost_model import rules  # noqa: F401  (fills the rule table)
from cost_model.context import RuleContext
from cost_model.registry import rule_for, warn_missing
from cost_model.strategy import Strategy

log = logging.getLogger("alpa_lite.cost_model")


@dataclass(frozen=True, eq=False)
class StrategyGraph:
    graph: OpGraph
    cluster: ClusterSpec
    strategies: tuple[tuple[Strategy, ...], ...]  # per op, in op order
    unconstrained: frozenset[int]  # ops with no rule: left to XLA in emission
    missing_rules: tuple[str, ...]  # primitives that had no rule


def build_strategies(graph: OpGraph, cluster: ClusterSpec,
                     resident: frozenset[int] = frozenset()) -> StrategyGraph:
    """Every op's strategies. Ops alike (same primitive, parameters, operand and result types,
    FLOPs and number of readers: the same op in every copy of a repeated layer) share one list,
    generated once, so a 96-layer model costs about what one layer does. ``resident``: tensor
    ids of the graph inputs that stay on the devices between calls (module docstring)."""
    strategies, unconstrained, missing = [], set(), []
    memo: dict[Any, tuple[list[Strategy], bool]] = {}
    for op in graph.ops:
        stays = bool(op.outputs) and op.outputs[0] in resident
        key = _signature(graph, op)
        if key is None:
            strats, ok = _op_strategies(graph, op, cluster, stays)
        else:
            key = (key, stays)
            if key not in memo:
                memo[key] = _op_strategies(graph, op, cluster, stays)
            strats, ok = memo[key]
        if not ok:
            unconstrained.add(op.index)
            if op.primitive is not None and str(op.primitive) not in missing:
                missing.append(str(op.primitive))
        strategies.append(tuple(_apply_fixed(graph, op, strats, cluster)))
    return StrategyGraph(graph, cluster, tuple(strategies), frozenset(unconstrained),
                         tuple(missing))


def _signature(graph: OpGraph, op: Op) -> Any:
    """What an op's strategies depend on, hashable; None when a parameter is not (sub-jaxprs)."""
    readers = len(graph.consumers[op.outputs[0]]) + (op.outputs[0] in graph.outputs) if op.outputs else 0
    key = (op.kind, op.primitive, tuple(graph.tensors[t] for t in op.operands),
           tuple(graph.tensors[t] for t in op.outputs), op.flops, readers > 1,
           tuple(sorted(op.params.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _op_strategies(graph: OpGraph, op: Op, cluster: ClusterSpec,
                   resident: bool = False) -> tuple[list[Strategy], bool]:
    outs = tuple(graph.tensors[t] for t in op.outputs)
    ins = [graph.tensors[t] for t in op.operands]
    ctx = RuleContext(cluster, outs, op.flops)
    if op.kind in ("parameter", "constant"):
        t = outs[0]
        specs = ctx.specs(t.shape) if t.rank and t.size > 1 else [ShardingSpec.replicated(t.rank)]
        return [ctx.strategy(str(s), [s], [], [], flops=0.0, fused=resident) for s in specs], True
    rule = rule_for(op.primitive)
    if rule is None:
        warn_missing(op.primitive)
        return [ctx.replicated(ins, "unconstrained")], False
    try:
        strats = rule(ctx, *ins, **op.params)
    except Exception as e:  # noqa: BLE001 - a broken rule must not crash planning
        log.warning("sharding rule for %s failed (%s: %s); costing it as replicated",
                    op.primitive, type(e).__name__, e)
        return [ctx.replicated(ins, "unconstrained")], False
    if not strats:
        return [ctx.replicated(ins)], True
    if len(graph.consumers[op.outputs[0]]) + (op.outputs[0] in graph.outputs) > 1:
        # A partial sum read more than once: offer it reduced at the op, so that one
        # reduction serves every reader (``RuleContext.with_reduced``).
        return ctx.with_reduced(strats), True
    return list(strats), True


def _apply_fixed(graph: OpGraph, op: Op, strats: list[Strategy],
                 cluster: ClusterSpec) -> list[Strategy]:
    fixed = {k: graph.fixed[t] for k, t in enumerate(op.outputs) if t in graph.fixed}
    if not fixed:
        return strats
    for k, spec in fixed.items():
        spec.validate(graph.tensors[op.outputs[k]].shape, cluster.axis_sizes)
    kept = [s for s in strats if all(s.out_specs[k] == spec for k, spec in fixed.items())]
    if kept:
        return kept
    if op.kind == "parameter" or len(op.operands) == 1:
        # A user-fixed spec the enumeration skipped (e.g. an uneven split): honour it as given.
        ctx = RuleContext(cluster, tuple(graph.tensors[t] for t in op.outputs), op.flops)
        spec = fixed[0]
        ins = [graph.tensors[t] for t in op.operands]
        return [ctx.strategy(str(spec), [spec], [spec] * len(ins), ins)]
    raise ShardingError(f"no strategy of op {op} yields the sharding fixed by the user "
                        f"({', '.join(map(str, fixed.values()))})")
