"""The bridge from a strategy graph to the ILP, and back.

Nodes are the ops (parameters and constants included) plus one *sink* per function output
that is not carried state: a sink takes any non-partial spec, so a partial-sum output is
charged its reduction. A carried output (a training step's new params / optimizer state) gets
an edge to its input's parameter node instead, so it leaves in the spec it came in with.
Edges: producer strategy i → consumer strategy j costs ``reshard(out_spec_i, in_spec_j)``.
Memory at each program point: the output bytes of every op alive there, counted as XLA's
``memory_analysis`` does (arguments + outputs − aliased + temporaries; ``alpa_lite.intra.liveness``):
inputs for the whole program, carried state in its donated input's buffer, fused element-wise
outputs not at all; plus the resharded copies of operands alive there (``OperandCopy``).
Beyond ``LAZY_ROWS`` the ILP gets rows at a few points and ``alpa_lite.intra.fit`` adds the rest where
a plan passes the budget.

A copy's bytes depend on the strategies at *both* ends of its edge (none when the producer
already gives the reader's spec), which a node's memory cannot say. When no plan could pass the
memory budget (every node at its largest strategy, every copy at its largest, at every program
point: ``_bound_profile``) the solver drops the memory rows anyway, and copies get no nodes: nothing
is added to the ILP. Otherwise each copy gets a node alive over the copy's own points
(``_copy_nodes``). By default that node is a follower of its reader (one strategy per reader
strategy, tied by a zero-cost diagonal edge and listed in ``follow``, so merging folds it in: no
new CP-SAT variables) charged the copy's *least* bytes over the producer's strategies (except
copies of function inputs, exact as below: a weight gathered for its backward reader is held
from its forward read, and least bytes, zero where the weight could be replicated, missed 30 GB
of 116 on a 96-layer GPT on 64 GPUs; exact nodes for them cost 146 → 186 tied classes): exact
when the bytes do not depend on the producer (a baseline's fixed inputs: ZeRO-3's gathered
weights), a lower bound otherwise, so the ILP's memory rows are a relaxation and the plan's
exact peak (``peak_memory``) is checked after the solve (``alpa_lite.intra.fit``: rows added, or the
ILP's budget lowered by what the relaxation missed, and the plan solved again). With
``exact_copies=True`` a copy whose bytes depend on the producer gets a node whose states are the
(reader class, bytes) pairs the copy can take, tied to both ends (``_exact_copy_nodes``): exact,
at the price of variables of its own and of breaking the ties between identical layers (on the
2x4 GPT example, 55,783 → 150,397 CP-SAT variables and 13 s → 317 s, not optimal; a 4-layer
hidden-8192 GPT on 64 GPUs, 166 → 487 tied classes, from OPTIMAL in 25 s to no optimum in
120 s): the last resort of ``alpa_lite.intra.fit``. Transients of copies made at one point are made
one after another; the ILP charges the one that can be largest, the plan's report the largest
its choice makes (``peak_memory`` scores a full choice exactly; the plan reports that). With
``exact_copies`` every copy's transient has a node and a point where several are made has one
row per transient (the largest passes the budget iff one of those rows does): exact.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from alpa_lite.intra.follow import follow_maps
from alpa_lite.intra.liveness import Liveness
from alpa_lite.ir.graph import OpGraph
from alpa_lite.ir.specs import ShardingSpec
from cost_model.builder import StrategyGraph
from cost_model.memory import (
    absorbs_layout,
    copy_bytes,
    fuses_operands,
    live_until,
    local_bytes,
    loop_fusible,
    materialised,
)
from cost_model.resharding import reshard, resharding_matrix
from ilp import Edge, IlpProblem

# Memory rows listed for every program point up to this many entries (Σ_points nodes alive):
# beyond it they are listed lazily (``alpa_lite.intra.fit``). The rows' preprocessing in ``ilp`` costs
# ~5 µs per entry (measured on GPT training steps: 22M entries at 48 layers, ~100 s); a 2-layer
# GPT on 8 devices has ~50k entries, a 12-layer hidden-8192 one on 64 GPUs 1.7M.
LAZY_ROWS = 250_000
# Rows listed at first when they are listed lazily. Measured on a 96-layer hidden-8192 GPT on 64
# GPUs: from 2 rows (the two peaks), 4 rounds of added rows before a plan fitted.
SEED_ROWS = 32


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
    the first of ``points`` only (several copies made at one point are made one after the
    other: the largest transient counts). ``points``: program points (op indices) where it is
    alive, up to this reader, or to the last reader of this reader's output when XLA fuses this
    reader into them; from the point before this reader for a computed value (XLA's
    memory-minimising scheduler moves the collective next to its reader), from just after the
    previous reader (or the producer) for a function input (XLA runs an input's collectives
    first thing, and readers of one gathered weight share one copy: successive readers' points
    tile, so it is counted once). A copy made for a computed value's last reader takes its
    source's place (the source dies once copied): both are alive while it is made (the
    transient), then only what the copy adds to the source's bytes counts.
    ``node``: the ILP's copy node for it, -1 when its least bytes are 0 (module docstring)."""

    src: int
    dst: int
    nbytes: np.ndarray
    transient: np.ndarray
    points: range
    node: int = -1
    transient_node: int = -1


@dataclass(frozen=True, eq=False)
class Held:
    """Bytes an op needs beside its output, by its strategy, at some program points: a loop
    body's temporaries while the loop runs, a gradient held for XLA's combined all-reduce."""

    op: int
    nbytes: np.ndarray
    points: range
    what: str
    node: int = -1  # its node in the ILP (a follower of ``op``), -1 when it has none


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
    held: tuple[Held, ...] = ()
    liveness: Liveness | None = None  # when each buffer is alive (``alpa_lite.intra.liveness``)
    rows: tuple[int, ...] = ()  # the points whose live sets are the problem's memory rows

    def with_rows(self, points: Iterable[int], budget: float | None) -> IntraOpProblem:
        """The same problem with memory rows at ``points`` (point numbers) and ``budget``."""
        points = tuple(sorted(set(points)))
        problem = replace(self.problem, live_sets=_distinct(self.liveness.rows(points)), memory_budget=budget)
        return replace(self, problem=problem, rows=points)


def build_problem(sgraph: StrategyGraph, ties: Mapping[int, int],
                  memory_budget: float | None,
                  allowed: Mapping[int, Sequence[bool]] | None = None, *,
                  exact_copies: bool = False, all_rows: bool = False) -> IntraOpProblem:
    """``sgraph``: from ``scan.strategy_graph`` (a backward scan offered the candidates matching its
    forward scan's). ``allowed[op]`` masks strategies (baselines, hard constraints): False → forbidden.
    ``exact_copies``: copies whose bytes depend on the producer get exact nodes (module
    docstring); by default they are charged their least bytes. ``all_rows``: a memory row at
    every point even when there are more than ``LAZY_ROWS`` entries (module docstring)."""
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
    nodes = _Nodes(node_costs, memory, edges, names, follow_maps(sgraph))
    kept, until = _kept(g, ties)
    held = [Held(op.index, need, range(op.index, op.index + 1), f"scratch of {op}")
            for op in g.ops if (need := np.array([s.scratch_bytes for s in strats[op.index]])).any()]
    held += _combined_reductions(sgraph, until, tail)
    copies = list(_operand_copies(sgraph, kept, until, tail))
    liveness = Liveness.of(g, kept, until, copies, held)
    top = _bound_profile(liveness, nodes, copies, held)
    if memory_budget is not None and top.max(initial=0.0) > memory_budget:  # the budget can bind
        held = [replace(h, node=nodes.follower(h.op, h.nbytes, h.what)) for h in held]
        copies = _copy_nodes(g, nodes, copies, exact_copies)
        liveness = liveness.with_nodes(copies, held)
    points = range(liveness.num_points)
    if not all_rows and liveness.size() > LAZY_ROWS:
        # Too many to list: rows where the plan of largest and of least bytes peak; the rest are
        # added where a plan passes the budget (``alpa_lite.intra.fit``).
        points = _seed_rows(top, _bound_profile(liveness, nodes, copies, held, least=True))
    follow = nodes.follow
    live = _distinct(liveness.rows(points))
    problem = IlpProblem(tuple(node_costs), tuple(edges), tuple(memory), live, memory_budget,
                         names=tuple(names), follow=follow)
    return IntraOpProblem(sgraph, problem, tuple(refs), tuple(sink_tensors), tuple(sink_outputs),
                          tuple(sink_specs), dict(ties), tuple(copies), tuple(held), liveness, tuple(points))


def _seed_rows(top: np.ndarray, low: np.ndarray) -> list[int]:
    """The points where the plan of every buffer at its largest and the one at its least peak,
    and ``SEED_ROWS`` more evenly spread (where a plan between the two may peak)."""
    spread = np.linspace(0, len(top) - 1, SEED_ROWS).round().astype(int).tolist()
    return sorted({int(np.argmax(top)), int(np.argmax(low)), *spread})


def _distinct(rows: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """Consecutive equal rows once."""
    return tuple(r for k, r in enumerate(rows) if k == 0 or r != rows[k - 1])


class _Nodes:
    """The ILP's node lists while they grow: ``follower`` appends a memory-only node that takes
    the strategy of an op (a zero-cost diagonal edge, and a follow map so merging folds it in)."""

    def __init__(self, costs: list, memory: list, edges: list, names: list, follow: dict) -> None:
        self.costs, self.memory, self.edges, self.names, self.follow = costs, memory, edges, names, follow

    def follower(self, op: int, memory: np.ndarray, name: str) -> int:
        node = len(self.costs)
        self.costs.append(np.zeros(memory.size))
        self.memory.append(np.asarray(memory, dtype=float))
        self.names.append(name)
        self.follow[node] = (op, np.arange(memory.size))
        self.edges.append(Edge(op, node, np.where(np.eye(memory.size) > 0, 0.0, np.inf)))
        return node


def _bound_profile(liveness: Liveness, nodes: _Nodes, copies: Sequence[OperandCopy], held: Sequence[Held],
                   least: bool = False) -> np.ndarray:
    """Bytes at every point with every op output, copy and held buffer at its largest (``least``:
    its least) over allowed strategies. Where no point's largest passes the budget it cannot
    bind: the solver drops the memory rows (``ilp.model.binding_rows``), and copies and held
    buffers need no nodes (``peak_memory`` counts them for the report)."""
    pick = np.min if least else np.max

    def bound(m: np.ndarray, allowed: np.ndarray | None = None) -> float:
        m = m if allowed is None else m[allowed]
        return float(pick(m)) if m.size else 0.0

    node_bytes = np.zeros(len(liveness.node_ids))  # copy and held nodes: their buffers below
    node_bytes[liveness.op_items] = [bound(nodes.memory[v], np.isfinite(nodes.costs[v]))
                                     for v in liveness.node_ids[liveness.op_items]]
    return liveness.profile(node_bytes, [bound(c.nbytes) for c in copies],
                            [bound(c.transient) for c in copies], [bound(h.nbytes) for h in held])


def _copy_nodes(g: OpGraph, nodes: _Nodes, found: Sequence[OperandCopy], exact_copies: bool) -> list[OperandCopy]:
    """The copies, each with its node (module docstring): a follower of its reader charged the
    least bytes over the producer's strategies, or with ``exact_copies``, when its bytes depend
    on the producer's strategy, an exact node (``_exact_copy_nodes``)."""
    lows, exact = [], []
    for c in found:
        allowed = np.isfinite(nodes.costs[c.src])
        low = [m[allowed].min(axis=0) if allowed.any() else np.zeros(m.shape[1]) for m in (c.nbytes, c.transient)]
        top = [m[allowed].max(axis=0) if allowed.any() else np.zeros(m.shape[1]) for m in (c.nbytes, c.transient)]
        # A function input's copies are exact always: a gathered weight read again in the backward
        # pass is held from its forward read (module docstring), the bulk of what least bytes miss.
        exact.append((exact_copies or g.ops[c.src].kind == "parameter")
                     and any((t != lo).any() for t, lo in zip(top, low, strict=True)))
        lows.append(top if exact[-1] else low)
    # Copies made at one point are made one after another. Relaxed: the ILP charges the transient
    # that can be largest there. Exact: every transient gets a node, and the rows take one at a
    # time (``Liveness.rows``).
    biggest: dict[int, int] = {}
    if not exact_copies:
        for k, c in enumerate(found):
            first = _first_point(g, c.points)
            if lows[k][1].any() and (first not in biggest or lows[k][1].max() > lows[biggest[first]][1].max()):
                biggest[first] = k
    charged = set(biggest.values())
    copies = []
    for k, c in enumerate(found):
        with_transient = exact_copies or k in charged
        name = f"of {g.ops[c.src]} for {g.ops[c.dst]}"
        if exact[k]:
            made = _exact_copy_nodes(nodes, c, with_transient, name)
        else:
            made = [nodes.follower(c.dst, low, f"{what} {name}") if low.any() and (what == "copy" or with_transient)
                    else -1 for what, low in (("copy", lows[k][0]), ("transient of copy", lows[k][1]))]
        copies.append(replace(c, node=made[0], transient_node=made[1]))
    return copies


def _exact_copy_nodes(nodes: _Nodes, c: OperandCopy, with_transient: bool, name: str) -> list[int]:
    """A node whose states are the (reader class, bytes) pairs a copy can take, tied by edges to
    the reader's strategy (its class) and to the producer's (which bytes): its memory is the
    copy's exactly. Reader strategies with the same bytes for every producer strategy form one
    class. Such a node has two sources, so it costs the ILP variables of its own (one per state,
    and the allowed pairs of its two edges)."""
    allowed = np.flatnonzero(np.isfinite(nodes.costs[c.src]))
    pairs = np.stack([c.nbytes, c.transient], axis=-1)  # [i, j, 2]
    cls: dict[bytes, int] = {}
    col_class = [cls.setdefault(pairs[allowed, j].tobytes(), len(cls)) for j in range(pairs.shape[1])]
    index: dict[tuple[int, float, float], int] = {}  # state → its number, in order of first sight
    hits = []  # (producer strategy, state) pairs that occur
    for j, d in enumerate(col_class):
        for i in allowed:
            hits.append((i, index.setdefault((d, float(pairs[i, j, 0]), float(pairs[i, j, 1])), len(index))))
    states = list(index)
    n = len(states)
    node = len(nodes.costs)
    nodes.costs.append(np.zeros(n))
    nodes.memory.append(np.array([b for _, b, _ in states]))
    nodes.names.append(f"copy {name}")
    to_dst = np.array([[0.0 if col_class[j] == d else np.inf for d, _, _ in states] for j in range(len(col_class))])
    to_src = np.full((pairs.shape[0], n), np.inf)
    for i, k in hits:
        to_src[i, k] = 0.0
    nodes.edges.append(Edge(c.dst, node, to_dst))
    nodes.edges.append(Edge(c.src, node, to_src))
    transient = np.array([t for _, _, t in states])
    if not (with_transient and transient.any()):
        return [node, -1]
    return [node, nodes.follower(node, transient, f"transient of copy {name}")]


def _combined_reductions(sgraph: StrategyGraph, until: Sequence[int], tail: frozenset[int]) -> list[Held]:
    """XLA combines the reductions read by the update tail into one all-reduce (``update_tail``),
    which runs once the last of them is made: every partial gradient is alive until then, and all
    the reduced ones at once there. Per producer that can give a partial sum to the tail: its
    partial outputs' bytes from its own death to that point P, and the reduced buffers at P (P:
    the last such producer; the same for every plan)."""
    g, strats, sizes = sgraph.graph, sgraph.strategies, sgraph.cluster.axis_sizes
    outs: dict[int, set[int]] = {}
    for u in tail:
        for t in g.ops[u].operands:
            src = g.producer[t]
            k = g.ops[src].outputs.index(t)
            if src not in tail and any(s.out_specs[k].is_partial for s in strats[src]):
                outs.setdefault(src, set()).add(k)
    if not outs:
        return []
    last, held = max(outs), []
    for src, ks in outs.items():
        ts = {k: g.tensors[g.ops[src].outputs[k]] for k in ks}
        partial = np.array([sum(local_bytes(t, s.out_specs[k], sizes)
                                for k, t in ts.items() if s.out_specs[k].is_partial) for s in strats[src]], dtype=float)
        if not partial.any():
            continue
        op = g.ops[src]
        if until[src] < last:
            held.append(Held(src, partial, range(until[src] + 1, last + 1),
                             f"partial {op} held for the combined all-reduce"))
        held.append(Held(src, partial, range(last, last + 1), f"combined all-reduce of {op}"))
    return held


def _first_point(g: OpGraph, points: range) -> int:
    """The first op in ``points`` that computes something (where a live set is taken)."""
    return next((p for p in points if g.ops[p].kind not in ("parameter", "constant")), -1)


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


@functools.lru_cache(maxsize=1 << 12)
def _combined_alpha(srcs: tuple[ShardingSpec, ...], dsts: tuple[ShardingSpec, ...], tensor,
                    cluster) -> np.ndarray:
    """``α[i, j]``: the latency of the reductions (all-reduce, reduce-scatter) on the path from
    ``srcs[i]`` to ``dsts[j]``, which XLA combines when the reader is in the update tail;
    memoised like ``resharding_matrix`` (identical layers ask the same), so read-only."""
    out = np.zeros((len(srcs), len(dsts)))
    for i, src in enumerate(srcs):
        if not src.is_partial:
            continue
        for j, dst in enumerate(dsts):
            for c in reshard(src, dst, tensor, cluster)[1]:
                if c.kind in ("all-reduce", "reduce-scatter"):
                    out[i, j] += cluster.alpha(c.axes)
    out.setflags(write=False)  # every caller of the cache shares it
    return out


def edge_charges(iop: IntraOpProblem, choice: Sequence[int]) -> dict[tuple[int, int], float]:
    """What the objective charges on each edge under ``choice``, keyed (tensor, reader node); edges
    of one tensor into one node at several operand positions add up."""
    out: dict[tuple[int, int], float] = {}
    for e, ref in zip(iop.problem.edges, iop.edge_refs):
        key = (ref.tensor, ref.dst_node)
        out[key] = out.get(key, 0.0) + float(e.cost[choice[e.src], choice[e.dst]])
    return out


def output_node(iop: IntraOpProblem, pos: int) -> int:
    """The node flat output ``pos`` flows into: its sink, or for carried state (tied) the parameter
    op of its input."""
    g = iop.sgraph.graph
    if pos in iop.ties:
        return g.producer[g.inputs[iop.ties[pos]]]
    return len(g.ops) + iop.sink_outputs.index(pos)


def peak_memory(iop: IntraOpProblem, choice: Sequence[int], ops: range | None = None,
                inputs: bool = True) -> float:
    """Peak bytes per device of a full choice (one strategy per node), every copy charged
    exactly: the copy nodes' lower bounds replaced by ``nbytes[i_src, j_dst]``. ``ops``: only
    at these program points; ``inputs=False``: without the function's inputs (a loop body's
    temporaries: its inputs are the loop's state, counted outside)."""
    prof = memory_profile(iop, choice, inputs)
    if ops is not None:
        prof = prof[iop.liveness.covering(ops)]
    return float(prof.max(initial=0.0))


def memory_profile(iop: IntraOpProblem, choice: Sequence[int], inputs: bool = True,
                   exact: bool = True) -> np.ndarray:
    """Bytes per device at every program point (``alpa_lite.intra.liveness``) of a full choice, every
    copy and held buffer charged exactly; ``exact=False``: as the ILP's rows count it (copy and
    held nodes at their memory in the problem: copies at their least bytes)."""
    pb, g, lv = iop.problem, iop.sgraph.graph, iop.liveness
    skip = set() if inputs else {g.producer[t] for t in g.inputs}
    counted = lv.op_items if exact else np.ones(len(lv.node_ids), bool)
    node_bytes = np.zeros(len(lv.node_ids))
    node_bytes[counted] = [0.0 if v in skip else float(pb.memory[v][choice[v]]) for v in lv.node_ids[counted].tolist()]
    if not exact:
        return lv.profile(node_bytes, np.zeros(len(lv.copy_a)), np.zeros(len(lv.copy_a)), np.zeros(len(lv.held_a)))
    copies = [(float(c.nbytes[choice[c.src], choice[c.dst]]), float(c.transient[choice[c.src], choice[c.dst]]))
              for c in iop.copies]
    return lv.profile(node_bytes, [c[0] for c in copies], [c[1] for c in copies],
                      [float(h.nbytes[choice[h.op]]) for h in iop.held])


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


def _operand_copies(sgraph: StrategyGraph, kept: frozenset[int], until: Sequence[int],
                    tail: frozenset[int]) -> Iterator[OperandCopy]:
    """Every (tensor, reader) whose reader may take a copy (``OperandCopy``); readers of the
    same tensor in program order. A partial sum the update tail reads is reduced by the combined
    all-reduce (``_combined_reductions``), not counted here."""
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
            if u in tail:
                combined = np.array([spec.is_partial for spec in src_specs])
                nbytes[combined], transient[combined] = 0.0, 0.0
            start = before + 1 if g.ops[src].kind == "parameter" else max(src + 1, u - 1)
            end = max(u if u in kept else until[u], start)
            if src in kept and g.ops[src].kind != "parameter" and u == readers[-1] and until[src] == end:
                # The copy takes the place of its source, which dies once copied: both are alive
                # while it is made (the transient), then only what the copy adds counts.
                have = [local_bytes(g.tensors[t], spec, cluster.axis_sizes) for spec in src_specs]
                grown = np.maximum(nbytes - np.array(have)[:, None], 0.0)
                transient, nbytes = transient + nbytes - grown, grown
            if nbytes.any() or transient.any():
                yield OperandCopy(src, u, nbytes, transient, range(start, end + 1))
            before = u


def _copy_matrices(src_specs: Sequence[ShardingSpec], dst_strats: Sequence, positions: Sequence[int],
                   tensor, cluster, flags: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """``bytes[i, j]`` and ``transient[i, j]`` of the copies reader strategy j needs (one per
    distinct spec its operand positions take) from producer strategy i (fresh arrays: callers
    change them)."""
    wants = tuple(tuple(dict.fromkeys(s.in_specs[p] for p in positions)) for s in dst_strats)
    nbytes, transient = _copy_table(tuple(src_specs), wants, tensor, cluster, flags)
    return nbytes.copy(), transient.copy()


@functools.lru_cache(maxsize=1 << 14)
def _copy_table(src_specs: tuple[ShardingSpec, ...], wants: tuple[tuple[ShardingSpec, ...], ...],
                tensor, cluster, flags: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """``_copy_matrices`` memoised (identical layers ask the same: 51k calls, 15 s, for a
    96-layer GPT), computed once per distinct pair of specs."""
    srcs = list(dict.fromkeys(src_specs))
    dsts = list(dict.fromkeys(wants))
    small = np.zeros((2, len(srcs), len(dsts)))
    for a, src in enumerate(srcs):
        for b, specs in enumerate(dsts):
            for spec in specs:
                small[:, a, b] += copy_bytes(src, spec, tensor, cluster, *flags)
    row = {s: a for a, s in enumerate(srcs)}
    col = {w: b for b, w in enumerate(dsts)}
    full = small[:, [row[s] for s in src_specs]][:, :, [col[w] for w in wants]]
    full.setflags(write=False)  # every caller of the cache shares it
    return full[0], full[1]
