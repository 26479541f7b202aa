"""The bridge from a strategy graph to the ILP, and back.

Nodes are the ops (parameters and constants included) plus one *sink* per function output
that is not carried state: a sink takes any non-partial spec, so a partial-sum output is
charged its reduction. A carried output (a training step's new params / optimizer state) gets
an edge to its input's parameter node instead, so it leaves in the spec it came in with.
Edges: producer strategy i → consumer strategy j costs ``reshard(out_spec_i, in_spec_j)``.
Memory at each program point: the output bytes of every op alive there, counted as XLA's
``memory_analysis`` does (``_live_sets``: inputs for the whole program, carried state in its
donated input's buffer, fused element-wise outputs not at all), plus the resharded copies of
operands alive there (``OperandCopy``).

A copy's bytes depend on the strategies at *both* ends of its edge (none when the producer
already gives the reader's spec), which a node's memory cannot say. The ILP therefore charges
each copy to a *copy node* that follows its reader (one strategy per reader strategy, tied by
a zero-cost diagonal edge and listed in ``follow``, so merging folds it into the reader and
CP-SAT gets no new variables), alive over the copy's own program points, with the least bytes
over the producer's allowed strategies: ``lb[j] = min_i bytes[i, j]``. That is exact when no
allowed producer strategy gives the reader's spec j (a baseline's fixed inputs: ZeRO-3's
gathered weights) or when every one does, and a lower bound otherwise: the budget constraint
never rejects a plan that fits, and may pass one whose copies do not. ``peak_memory`` scores a
full choice exactly (both ends known); the plan reports that. The exact ILP would put
``bytes[i, j]`` on the edge variable ``e_vu[i, j]`` in the memory rows of the copy's points
(``Σ_t``: ``Σ_v s_v·m_v + Σ_copies Σ_ij e_vu[i,j]·bytes[i,j] ≤ M``): no new variables, since
every edge with a copy also has a resharding cost and so its pair variables already.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from alpa_lite.follow import follow_maps
from alpa_lite.graph import OpGraph
from alpa_lite.specs import ShardingSpec
from cost_model.builder import StrategyGraph
from cost_model.memory import absorbs_layout, copy_bytes, fuses_operands, live_until, loop_fusible, materialised
from cost_model.resharding import reshard, resharding_matrix
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
class OperandCopy:
    """The resharded copy of one tensor one reader takes (all its operand positions together).

    ``nbytes[i, j]``: bytes per device when the producer takes strategy i and the reader j;
    ``transient``: the same for the layout copy made with it (``cost_model.memory``), alive at
    the first of ``points`` only. ``points``: program points (op indices) where it is alive, up
    to this reader, or to the last reader of this reader's output when XLA fuses this reader
    into them; from this reader for a computed value (XLA's memory-minimising scheduler moves
    the collective next to its reader), from just after the previous reader (or the producer)
    for a function input (XLA runs an input's collectives first thing, and readers of one
    gathered weight share one copy: successive readers' points tile, so it is counted once).
    A copy made for a computed value's last reader takes its source's place (the source dies
    once copied): then only what it adds to the source's bytes counts.
    ``node``: the ILP's copy node for it, -1 when its lower bound is 0 (module docstring)."""

    src: int
    dst: int
    nbytes: np.ndarray
    transient: np.ndarray
    points: range
    node: int = -1
    transient_node: int = -1


@dataclass(frozen=True, eq=False)
class IntraOpProblem:
    sgraph: StrategyGraph
    problem: IlpProblem
    edge_refs: tuple[EdgeRef, ...]
    sink_tensors: tuple[int, ...]  # node len(ops)+k is the sink of output position sink_outputs[k]
    sink_outputs: tuple[int, ...]
    sink_specs: tuple[tuple[ShardingSpec, ...], ...]
    ties: Mapping[int, int]  # flat output position → flat input position
    copies: tuple[OperandCopy, ...] = ()
    live_copies: tuple[tuple[int, ...], ...] = ()  # per live set: the copies alive there
    first_copies: tuple[tuple[int, ...], ...] = ()  # per live set: the copies whose transient is there
    live_starts: tuple[int, ...] = ()  # per live set: the first op (program point) it holds at


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

    tail = update_tail(g, ties)

    def add_edge(t: int, dst: int, dst_specs: Sequence[ShardingSpec], operand: int) -> None:
        src = g.producer[t]
        k = g.ops[src].outputs.index(t)
        src_specs = [s.out_specs[k] for s in strats[src]]
        cost = resharding_matrix(tuple(src_specs), tuple(dst_specs), g.tensors[t], cluster)
        if dst in tail:
            cost = cost - _combined_alpha(tuple(src_specs), tuple(dst_specs), g.tensors[t], cluster)
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
    names = [str(op) for op in g.ops] + [f"output{p}" for p in sink_outputs]
    kept, until = _kept(g, ties)
    copies = []
    follow = follow_maps(sgraph)
    for c in _operand_copies(sgraph, kept, until):
        allowed = np.isfinite(node_costs[c.src])
        nodes = []
        for what, matrix in (("copy", c.nbytes), ("layout copy", c.transient)):
            low = matrix[allowed].min(axis=0) if allowed.any() else np.zeros(matrix.shape[1])
            if not low.any():
                nodes.append(-1)
                continue
            nodes.append(len(node_costs))
            names.append(f"{what} of {g.ops[c.src]} for {g.ops[c.dst]}")
            node_costs.append(np.zeros(low.size))
            memory.append(low)
            follow[nodes[-1]] = (c.dst, np.arange(low.size))
            edges.append(Edge(c.dst, nodes[-1], np.where(np.eye(low.size) > 0, 0.0, np.inf)))
        copies.append(replace(c, node=nodes[0], transient_node=nodes[1]))
    scratch = {}  # op → its scratch node: what the op needs only while it runs (a loop body's temporaries)
    for op in g.ops:
        need = np.array([s.scratch_bytes for s in strats[op.index]])
        if need.any():
            scratch[op.index] = len(node_costs)
            names.append(f"scratch of {op}")
            node_costs.append(np.zeros(need.size))
            memory.append(need)
            follow[scratch[op.index]] = (op.index, np.arange(need.size))
            edges.append(Edge(op.index, scratch[op.index], np.where(np.eye(need.size) > 0, 0.0, np.inf)))
    live, live_copies, first_copies, starts = _live_sets(g, kept, until, copies, scratch)
    problem = IlpProblem(tuple(node_costs), tuple(edges), tuple(memory), live, memory_budget,
                         names=tuple(names), follow=follow)
    return IntraOpProblem(sgraph, problem, tuple(refs), tuple(sink_tensors), tuple(sink_outputs),
                          tuple(sink_specs), dict(ties), tuple(copies), live_copies, first_copies, starts)


def update_tail(g: OpGraph, ties: Mapping[int, int]) -> frozenset[int]:
    """The ops whose results reach only carried-state outputs (tied: a training step's new
    parameters and optimizer state), through element-wise and layout ops alone: the optimizer's
    update of each gradient.

    A reduction read by such an op (a weight's gradient) feeds no other collective and none
    feeds it, so XLA's all-reduce combiner merges all of them into one collective: one α for all
    (seen on jax 0.10.2, CPU: a data-parallel conv net's 17 gradient all-reduces compile to
    one). ``build_problem`` charges such a reduction without its α: the one α the merged
    collective pays is left out, the same for every plan that reduces any gradient."""
    tied, tail = {g.outputs[p] for p in ties}, set()
    for op in reversed(g.ops):
        if not op.outputs or not loop_fusible(op.primitive):
            continue
        readers = {r for t in op.outputs for r in g.consumers[t]}
        outs = {t for t in op.outputs if t in g.outputs}
        if readers <= tail and outs <= tied and (readers or outs):
            tail.add(op.index)
    return frozenset(tail)


def _combined_alpha(srcs: tuple[ShardingSpec, ...], dsts: tuple[ShardingSpec, ...], tensor,
                    cluster) -> np.ndarray:
    """``α[i, j]``: the latency of the reductions (all-reduce, reduce-scatter) on the path from
    ``srcs[i]`` to ``dsts[j]``, which XLA combines when the reader is in the update tail."""
    out = np.zeros((len(srcs), len(dsts)))
    for i, src in enumerate(srcs):
        if not src.is_partial:
            continue
        for j, dst in enumerate(dsts):
            for c in reshard(src, dst, tensor, cluster)[1]:
                if c.kind in ("all-reduce", "reduce-scatter"):
                    out[i, j] += cluster.alpha(c.axes)
    return out


def peak_memory(iop: IntraOpProblem, choice: Sequence[int], ops: range | None = None,
                inputs: bool = True) -> float:
    """Peak bytes per device of a full choice (one strategy per node), every copy charged
    exactly: the copy nodes' lower bounds replaced by ``nbytes[i_src, j_dst]``. ``ops``: only
    at these program points; ``inputs=False``: without the function's inputs (a loop body's
    temporaries: its inputs are the loop's state, counted outside)."""
    pb, g = iop.problem, iop.sgraph.graph
    skip = {n for c in iop.copies for n in (c.node, c.transient_node) if n >= 0}
    if not inputs:
        skip |= {g.producer[t] for t in g.inputs}
    ends = (*iop.live_starts[1:], len(g.ops))
    peak = 0.0
    for t, (live, alive, first) in enumerate(zip(pb.live_sets, iop.live_copies, iop.first_copies, strict=True)):
        if ops is not None and (ends[t] <= ops.start or iop.live_starts[t] >= ops.stop):
            continue
        total = sum(float(pb.memory[v][choice[v]]) for v in set(live) if v not in skip)
        total += sum(float(iop.copies[k].nbytes[choice[iop.copies[k].src], choice[iop.copies[k].dst]])
                     for k in alive)
        total += sum(float(iop.copies[k].transient[choice[iop.copies[k].src], choice[iop.copies[k].dst]])
                     for k in first)
        peak = max(peak, total)
    return peak


def _sink_specs(sgraph: StrategyGraph, t: int) -> list[ShardingSpec]:
    """An output may leave in any spec its producer can give, reduced (no partial sums)."""
    g = sgraph.graph
    src = g.producer[t]
    k = g.ops[src].outputs.index(t)
    return list(dict.fromkeys(s.out_specs[k].without_partial() for s in sgraph.strategies[src]))


def _kept(g: OpGraph, ties: Mapping[int, int]) -> tuple[frozenset[int], list[int]]:
    """The ops whose outputs count (materialised, not written into a donated input's buffer) and
    per op the point after which it is dead (inputs: never)."""
    tied = {g.outputs[p] for p in ties}
    written = frozenset(op.index for op in g.ops if op.outputs and set(op.outputs) <= tied)
    kept = frozenset(materialised(g) - written)
    until = list(live_until(g, kept, written))
    for t in g.inputs:
        until[g.producer[t]] = len(g.ops)
    return kept, until


def _operand_copies(sgraph: StrategyGraph, kept: frozenset[int], until: Sequence[int]) -> Iterator[OperandCopy]:
    """Every (tensor, reader) whose reader may take a copy (``OperandCopy``); readers of the
    same tensor in program order."""
    g, strats, cluster = sgraph.graph, sgraph.strategies, sgraph.cluster
    for t, readers in enumerate(g.consumers):
        src = g.producer[t]
        if src < 0 or not readers:
            continue
        k = g.ops[src].outputs.index(t)
        src_specs = tuple(s.out_specs[k] for s in strats[src])
        before = src
        for u in readers:
            positions = [p for p, x in enumerate(g.ops[u].operands) if x == t]
            prim = g.ops[u].primitive
            fixed = g.ops[src].kind == "parameter" and not absorbs_layout(prim)
            nbytes, transient = _copy_matrices(src_specs, strats[u], positions, g.tensors[t], cluster,
                                               (fuses_operands(prim), fixed))
            start = before + 1 if g.ops[src].kind == "parameter" else u
            end = max(u if u in kept else until[u], start)
            if src in kept and g.ops[src].kind != "parameter" and u == readers[-1] and until[src] == end:
                # The copy takes the place of the source, which dies once copied: only growth counts.
                have = [float(math.prod(spec.local_shape(g.tensors[t].shape, cluster.axis_sizes)))
                        * g.tensors[t].itemsize for spec in src_specs]
                nbytes = np.maximum(nbytes - np.array(have)[:, None], 0.0)
            if nbytes.any() or transient.any():
                yield OperandCopy(src, u, nbytes, transient, range(start, end + 1))
            before = u


def _copy_matrices(src_specs: Sequence[ShardingSpec], dst_strats: Sequence, positions: Sequence[int],
                   tensor, cluster, flags: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """``bytes[i, j]`` and ``transient[i, j]`` of the copies reader strategy j needs (one per
    distinct spec its operand positions take) from producer strategy i, computed once per
    distinct pair of specs."""
    srcs = list(dict.fromkeys(src_specs))
    wants = [tuple(dict.fromkeys(s.in_specs[p] for p in positions)) for s in dst_strats]
    dsts = list(dict.fromkeys(wants))
    small = np.zeros((2, len(srcs), len(dsts)))
    for a, src in enumerate(srcs):
        for b, specs in enumerate(dsts):
            for spec in specs:
                small[:, a, b] += copy_bytes(src, spec, tensor, cluster, *flags)
    rows = [srcs.index(s) for s in src_specs]
    cols = [dsts.index(w) for w in wants]
    full = small[:, rows][:, :, cols]
    return full[0], full[1]


def _live_sets(g: OpGraph, kept: frozenset[int], until: Sequence[int], copies: Sequence[OperandCopy],
               scratch: Mapping[int, int]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """At each op that computes something: the nodes alive there (a sweep), the copies alive
    there and whose transient is there (by index in ``copies``); equal consecutive sets once,
    with the op each starts at.

    Counted as XLA's ``memory_analysis`` does (arguments + outputs − aliased + temporaries):
    inputs are alive for the whole program (the caller owns their buffers); carried state is
    written into its donated input's buffer, so an op making a tied output adds nothing; and
    only outputs XLA materialises count: an output fused into its readers keeps its own inputs
    alive instead, until its last reader (``cost_model.memory``). Copies count over their
    ``points``: the copy node (when it has one) in the live set, the copy itself in the lists.
    An op's scratch node (``scratch``) is alive at that op only."""
    dies: dict[int, list[int]] = {}
    for op in g.ops:
        if op.outputs and op.index in kept:
            dies.setdefault(until[op.index], []).append(op.index)
    compute = [op.index for op in g.ops if op.kind not in ("parameter", "constant")]
    at: dict[int, list[int]] = {}
    first: dict[int, list[int]] = {}
    for k, c in enumerate(copies):
        points = compute[bisect.bisect_left(compute, c.points.start):bisect.bisect_left(compute, c.points.stop)]
        for p in points:
            at.setdefault(p, []).append(k)
        if points:
            first.setdefault(points[0], []).append(k)
    sets, alive_copies, first_copies, starts, active, last = [], [], [], [], set(), None
    for op in g.ops:
        if op.outputs and op.index in kept:
            active.add(op.index)
        if op.kind not in ("parameter", "constant"):
            here, new = tuple(at.get(op.index, ())), tuple(first.get(op.index, ()))
            nodes = {copies[k].node for k in here} | {copies[k].transient_node for k in new}
            nodes.add(scratch.get(op.index, -1))
            live = tuple(sorted(active | nodes - {-1}))
            if (live, here, new) != last:
                sets.append(live)
                alive_copies.append(here)
                first_copies.append(new)
                starts.append(op.index)
                last = (live, here, new)
        active.difference_update(dies.get(op.index, ()))
    return tuple(sets), tuple(alive_copies), tuple(first_copies), tuple(starts)
