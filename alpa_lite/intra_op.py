"""The bridge from a strategy graph to the ILP, and back.

Nodes are the ops (parameters and constants included) plus one *sink* per function output
that is not carried state: a sink takes any non-partial spec, so a partial-sum output is
charged its reduction. A carried output (a training step's new params / optimizer state) gets
an edge to its input's parameter node instead, so it leaves in the spec it came in with.
Edges: producer strategy i → consumer strategy j costs ``reshard(out_spec_i, in_spec_j)``.
Memory at each program point: the output bytes of every op alive there, counted as XLA's
``memory_analysis`` does (``_live_sets``: inputs for the whole program, carried state in its
donated input's buffer, fused element-wise outputs not at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alpa_lite.specs import ShardingSpec
from cost_model.builder import StrategyGraph
from cost_model.memory import live_until, materialised
from cost_model.resharding import resharding_matrix
from ilp import Edge, IlpProblem


@dataclass(frozen=True, eq=False)
class EdgeRef:
    """Which tensor an ILP edge carries: producer op/output → consumer node/operand."""

    src_op: int
    out_index: int
    dst_node: int
    operand: int  # operand position at dst; -1 for a sink or a tie
    tensor: int


@dataclass(frozen=True, eq=False)
class IntraOpProblem:
    sgraph: StrategyGraph
    problem: IlpProblem
    edge_refs: tuple[EdgeRef, ...]
    sink_tensors: tuple[int, ...]  # node len(ops)+k is the sink of output position sink_outputs[k]
    sink_outputs: tuple[int, ...]
    sink_specs: tuple[tuple[ShardingSpec, ...], ...]
    ties: Mapping[int, int]  # flat output position → flat input position


def build_problem(sgraph: StrategyGraph, ties: Mapping[int, int],
                  memory_budget: float | None,
                  allowed: Mapping[int, Sequence[bool]] | None = None) -> IntraOpProblem:
    """``allowed[op]`` masks strategies (baselines, hard constraints): False → forbidden."""
    from alpa_lite.scan import pair_scans

    sgraph = pair_scans(sgraph)  # a backward scan gets candidates matching its forward scan's
    g, cluster = sgraph.graph, sgraph.cluster
    strats = sgraph.strategies
    node_costs = [np.array([s.compute_s + s.comm_s for s in ss]) for ss in strats]
    memory = [np.array([s.memory_bytes for s in ss]) for ss in strats]
    for op, mask in (allowed or {}).items():
        node_costs[op] = np.where(np.asarray(mask, bool), node_costs[op], np.inf)
    edges, refs = [], []

    def add_edge(t: int, dst: int, dst_specs: Sequence[ShardingSpec], operand: int) -> None:
        src = g.producer[t]
        k = g.ops[src].outputs.index(t)
        src_specs = [s.out_specs[k] for s in strats[src]]
        cost = resharding_matrix(tuple(src_specs), tuple(dst_specs), g.tensors[t], cluster)
        edges.append(Edge(src, dst, cost))
        refs.append(EdgeRef(src, k, dst, operand, t))

    for op in g.ops:
        for pos, t in enumerate(op.operands):
            add_edge(t, op.index, [s.in_specs[pos] for s in strats[op.index]], pos)
    sink_tensors, sink_outputs, sink_specs = [], [], []
    for pos, t in enumerate(g.outputs):
        if pos in ties:
            pnode = g.producer[g.inputs[ties[pos]]]
            add_edge(t, pnode, [s.out_specs[0] for s in strats[pnode]], -1)
            continue
        node = len(g.ops) + len(sink_tensors)
        specs = tuple(_sink_specs(sgraph, t))
        sink_tensors.append(t)
        sink_outputs.append(pos)
        sink_specs.append(specs)
        node_costs.append(np.zeros(len(specs)))
        memory.append(np.zeros(len(specs)))
        add_edge(t, node, specs, -1)
    problem = IlpProblem(tuple(node_costs), tuple(edges), tuple(memory), _live_sets(sgraph, ties),
                         memory_budget, names=tuple(str(op) for op in g.ops)
                         + tuple(f"output{p}" for p in sink_outputs), follow=_follow_maps(sgraph))
    return IntraOpProblem(sgraph, problem, tuple(refs), tuple(sink_tensors), tuple(sink_outputs),
                          tuple(sink_specs), dict(ties))


def _follow_maps(sgraph: StrategyGraph) -> dict[int, tuple[int, np.ndarray]]:
    """For an op reading one multi-strategy producer (constants aside): which of its strategies
    takes that producer's output exactly as produced (-1: none, e.g. a partial sum). These are
    the followers Alpa merges into their operand."""
    g, strats = sgraph.graph, sgraph.strategies
    follow = {}
    for op in g.ops:
        srcs = {(g.producer[t], pos) for pos, t in enumerate(op.operands)
                if len(strats[g.producer[t]]) > 1}
        if len({v for v, _ in srcs}) != 1 or op.index in sgraph.unconstrained:
            continue
        v = next(iter(srcs))[0]
        if len(strats[op.index]) > len(strats[v]):
            continue
        positions = [pos for src, pos in srcs]
        k = g.ops[v].outputs.index(op.operands[positions[0]])
        index: dict[ShardingSpec, int] = {}
        for j, s in enumerate(strats[op.index]):
            key = s.in_specs[positions[0]]
            if all(s.in_specs[p] == key for p in positions):
                index.setdefault(key, j)
        follow[op.index] = (v, np.array([index.get(s.out_specs[k], -1) if not s.out_specs[k].is_partial
                                          else -1 for s in strats[v]], dtype=np.int64))
    return follow


def _sink_specs(sgraph: StrategyGraph, t: int) -> list[ShardingSpec]:
    """An output may leave in any spec its producer can give, reduced (no partial sums)."""
    g = sgraph.graph
    src = g.producer[t]
    k = g.ops[src].outputs.index(t)
    return list(dict.fromkeys(s.out_specs[k].without_partial() for s in sgraph.strategies[src]))


def _live_sets(sgraph: StrategyGraph, ties: Mapping[int, int]) -> tuple[tuple[int, ...], ...]:
    """At each op that computes something: the ops whose outputs are alive there (a sweep).

    Counted as XLA's ``memory_analysis`` does (arguments + outputs − aliased + temporaries):
    inputs are alive for the whole program (the caller owns their buffers); carried state is
    written into its donated input's buffer, so an op making a tied output adds nothing; and
    only outputs XLA materialises count: an output fused into its readers keeps its own inputs
    alive instead, until its last reader (``cost_model.memory``)."""
    g = sgraph.graph
    tied = {g.outputs[p] for p in ties}
    kept = frozenset(v for v in materialised(g) if not set(g.ops[v].outputs) <= tied)
    until = list(live_until(g, kept))
    for t in g.inputs:
        until[g.producer[t]] = len(g.ops)
    dies: dict[int, list[int]] = {}
    for op in g.ops:
        if op.outputs and op.index in kept:
            dies.setdefault(until[op.index], []).append(op.index)
    sets, active, last = [], set(), None
    for op in g.ops:
        if op.outputs and op.index in kept:
            active.add(op.index)
        if op.kind not in ("parameter", "constant"):
            live = tuple(sorted(active))
            if live != last:
                sets.append(live)
                last = live
        active.difference_update(dies.get(op.index, ()))
    return tuple(sets)
