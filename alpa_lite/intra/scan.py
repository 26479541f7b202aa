"""``lax.scan`` over layers, planned as one repeated layer with its trip count, never unrolled.

The tracer keeps a scan as one op. Its strategies come from its body: the body jaxpr is traced
into its own ``OpGraph`` (inputs: consts, carry, one slice of each scanned input; outputs: the
new carry, one slice of each stacked output), given strategies like any graph (a scan nested in
the body recurses here) and solved with the intra-op ILP, the carry tied to come out in the spec
it went in with (the next iteration reads it). Each solution is one strategy of the scan op,
seen from outside:

- operand and result specs: the body's input and output specs, a stacked (scanned) value
  taking its slice's spec with the leading layer dim replicated;
- compute and communication: the body's (its ops, its collectives, its resharding) times the
  trip count; its collectives are listed once per iteration;
- memory: the scan's results (stacked outputs live in full) in their specs; and while the loop
  runs, the body's temporaries (``Strategy.scratch_bytes``): the peak of one iteration's
  solution without the body's inputs (the loop state, counted outside as the scan's operands
  and results), resharded copies inside the body included (``problem.peak_memory``).

Candidates (``body_plans``): the body solved with its largest carry fixed to each spec it can
take (the layout that flows from layer to layer), plus the unconstrained optimum.

A training step has two scans: the forward one, whose stacked outputs include the activations
saved for the backward, and the backward one (``reverse=True``), which reads them and the
stacked parameters. Solved apart, the two bodies pick those layouts each for itself and the
outer plan pays to reshard whole stacks between them. ``pair_scans`` therefore solves the two
bodies as *one* problem (``joint_plans``: both graphs side by side, each saved activation and
each shared parameter linked from the forward body to the backward body by a tie edge), once
per candidate, and offers each scan its half of each joint solution. A linked activation leaves
the forward body in the spec the backward body reads it in, so the halves meet without
resharding. Solving once per candidate, whatever the trip count, keeps the outer problem the
same size for 24 or 96 layers.

The body is traced by ``tracing.tracer.trace_body``; emission (``emit.program.emit_scan``) re-binds
the scan as ``jax.lax.scan`` of the body replayed with the solution ``body_plan_for`` finds.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jax import lax

from alpa_lite.intra.assemble import dst_spec
from alpa_lite.intra.problem import IntraOpProblem, build_problem, peak_memory
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import Op, OpGraph, TensorInfo
from alpa_lite.ir.specs import ShardingSpec, enumerate_specs
from alpa_lite.result.plan import OpLayout
from alpa_lite.tracing.tracer import trace_body
from cost_model.builder import StrategyGraph, build_strategies
from cost_model.memory import local_bytes
from cost_model.registry import register_strategy
from cost_model.resharding import reshard
from cost_model.strategy import Collective, Strategy
from ilp import IlpOptions, IlpSolution, solve

log = logging.getLogger("alpa_lite.intra.scan")

# A body is small (one layer): solve it to optimality, deterministically.
_BODY_OPTIONS = IlpOptions(time_limit_s=30.0, num_workers=1)


@dataclass(frozen=True)
class ScanKey:
    """What identifies a scan's body problem: its jaxpr and how its operands split up."""

    jaxpr: Any
    length: int
    num_consts: int
    num_carry: int

    @classmethod
    def of(cls, op: Op) -> ScanKey:
        p = op.params
        return cls(p["jaxpr"], int(p["length"]), int(p["num_consts"]), int(p["num_carry"]))

    @property
    def whole_inputs(self) -> int:
        """Inputs taken whole each iteration (consts, carry); the rest are sliced."""
        return self.num_consts + self.num_carry


@dataclass(frozen=True, eq=False)
class BodyPlan:
    """One solution of a scan body: how to run it, and the scan op's strategy it makes."""

    graph: OpGraph
    layouts: tuple[Any, ...]  # emit.OpLayout per body op
    input_specs: tuple[ShardingSpec, ...]  # consts, carry, scanned slices
    output_specs: tuple[ShardingSpec, ...]  # new carry, stacked slices
    strategy: Strategy  # the scan op's (memory filled in by ``_as_strategy``)


# Every body solution made, per (jaxpr, cluster), one per (input specs, output specs): emission
# finds the one a layout came from. Bounded: the ``_PLANS_SIZE`` bodies used last (the solvers'
# caches below hold at most 64 + 2 × 64); a plan emitted after its body was dropped here solves
# the body alone again (``body_plan_for``). ``clear_caches`` empties it and those caches.
_PLANS: OrderedDict[tuple[Any, ClusterSpec], list[BodyPlan]] = OrderedDict()
_PLANS_SIZE = 256


def _remember(key: tuple[Any, ClusterSpec], plans: Iterable[BodyPlan]) -> None:
    found = _PLANS.setdefault(key, [])
    have = {(p.strategy.in_specs, p.strategy.out_specs) for p in found}
    for p in plans:
        if (p.strategy.in_specs, p.strategy.out_specs) not in have:  # the first one is the one emitted
            have.add((p.strategy.in_specs, p.strategy.out_specs))
            found.append(p)
    _PLANS.move_to_end(key)
    while len(_PLANS) > _PLANS_SIZE:
        _PLANS.popitem(last=False)


def clear_caches() -> None:
    """Forget every scan body traced and solved (the memory they hold, e.g. between models)."""
    _PLANS.clear()
    for cached in (trace_body, body_plans, joint_plans):
        cached.cache_clear()


def strategy_graph(graph: OpGraph, cluster: ClusterSpec,
                   resident: frozenset[int] = frozenset()) -> StrategyGraph:
    """Every op's strategies (``cost_model.build_strategies``; ``resident``: the tensor ids of
    inputs that stay on the devices between calls), each forward/backward pair of scans also
    offered the halves of their joint solutions (``pair_scans``): what ``problem.build_problem``
    takes."""
    return pair_scans(build_strategies(graph, cluster, resident))


# ---- one scan ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def body_plans(key: ScanKey, cluster: ClusterSpec) -> tuple[BodyPlan, ...]:
    """The scan's candidate solutions, solved apart from any other scan."""
    graph = trace_body(key.jaxpr)
    part = _Part(key, graph, 0, 0, 0)
    ties = {i: key.num_consts + i for i in range(key.num_carry)}
    plans = {}
    for iop, sol in _solve_candidates(graph, cluster, ties, key):
        bp = _part_plan(iop, sol, part, {}, lambda ref: True)
        plans.setdefault((bp.strategy.in_specs, bp.strategy.out_specs), bp)
    return _register(key, cluster, plans.values())


def _solve_candidates(graph: OpGraph, cluster: ClusterSpec, ties: dict[int, int],
                      key: ScanKey) -> list[tuple[IntraOpProblem, IlpSolution]]:
    """Solve ``graph`` unconstrained and with the largest carry of scan ``key`` (its inputs come
    first in ``graph``) fixed to each spec it can take."""
    sgraph = strategy_graph(graph, cluster)  # a scan nested in the body is paired too
    masks: list[dict[int, list[bool]] | None] = [None]
    carries = [graph.inputs[key.num_consts + i] for i in range(key.num_carry)]
    if carries:
        main = max(carries, key=lambda t: graph.tensors[t].nbytes)
        node = graph.producer[main]
        for spec in enumerate_specs(graph.tensors[main].shape, cluster.axis_sizes):
            masks.append({node: [s.out_specs[0] == spec for s in sgraph.strategies[node]]})
    out = []
    for mask in masks:
        iop = build_problem(sgraph, ties, None, mask)
        try:
            out.append((iop, solve(iop.problem, _BODY_OPTIONS)))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be solved is skipped
            log.info("scan body candidate skipped: %s", e)
    return out


def _register(key: ScanKey, cluster: ClusterSpec, plans: Any) -> tuple[BodyPlan, ...]:
    result = tuple(sorted(plans, key=lambda p: p.strategy.compute_s + p.strategy.comm_s))
    _remember((key.jaxpr, cluster), result)
    return result


# ---- a solution, split into the scans it covers -------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """One scan's body inside a (possibly joint) problem graph: its ops, inputs and outputs are
    the contiguous runs starting at these offsets."""

    key: ScanKey
    graph: OpGraph  # the scan's own body graph
    op_offset: int
    input_offset: int
    output_offset: int

    def has_op(self, v: int) -> bool:
        return self.op_offset <= v < self.op_offset + len(self.graph.ops)


def _part_plan(iop: IntraOpProblem, sol: IlpSolution, part: _Part, out_override: dict[int, ShardingSpec],
               charged: Callable[[Any], bool]) -> BodyPlan:
    """The part's ``BodyPlan``: its ops' strategies, its outputs' specs (``out_override``: output
    position → spec, else its sink's or its tie's), and as costs its ops' plus the resharding of
    the edges ``charged`` accepts among those into its ops and outputs."""
    sg = iop.sgraph
    g, n_ops = sg.graph, len(sg.graph.ops)
    chosen = [sg.strategies[v][sol.choice[v]] for v in range(n_ops)]
    mine = range(part.op_offset, part.op_offset + len(part.graph.ops))
    layouts = tuple(OpLayout(chosen[v].out_specs, chosen[v].in_specs, v in sg.unconstrained) for v in mine)
    all_ins = [chosen[g.producer[t]].out_specs[0] for t in g.inputs]
    ins = tuple(all_ins[part.input_offset:part.input_offset + len(part.graph.inputs)])
    sinks = {pos: iop.sink_specs[k][sol.choice[n_ops + k]] for k, pos in enumerate(iop.sink_outputs)}
    outs = []
    for j in range(len(part.graph.outputs)):
        pos = part.output_offset + j
        spec = out_override.get(j) or sinks.get(pos)
        outs.append(spec if spec is not None else all_ins[iop.ties[pos]])
    compute = sum(chosen[v].compute_s for v in mine)
    comm = sum(chosen[v].comm_s for v in mine)
    colls = [c for v in mine for c in chosen[v].collectives]
    moved = set()
    for e, ref in zip(iop.problem.edges, iop.edge_refs):
        cost = float(e.cost[sol.choice[e.src], sol.choice[e.dst]])
        if cost <= 0 or not charged(ref):
            continue
        dst = dst_spec(iop, chosen, ref, sol)
        comm += cost
        if (ref.tensor, dst) not in moved:
            moved.add((ref.tensor, dst))
            colls.extend(reshard(chosen[ref.src_op].out_specs[ref.out_index], dst, g.tensors[ref.tensor],
                                 sg.cluster)[1])
    scratch = peak_memory(iop, sol.choice, ops=mine, inputs=False)
    return _body_plan(part, layouts, ins, tuple(outs), compute, comm, colls, scratch)


def _body_plan(part: _Part, layouts: tuple[Any, ...], ins: tuple[ShardingSpec, ...],
               outs: tuple[ShardingSpec, ...], compute: float, comm: float,
               colls: Sequence[Collective], scratch: float) -> BodyPlan:
    key, L = part.key, part.key.length
    strategy = Strategy(
        name=f"scan×{L}({', '.join(str(s) for s in ins[key.num_consts:key.whole_inputs])})",
        out_specs=tuple(s if j < key.num_carry else _stacked(s) for j, s in enumerate(outs)),
        in_specs=tuple(s if k < key.whole_inputs else _stacked(s) for k, s in enumerate(ins)),
        compute_s=L * compute, comm_s=L * comm, memory_bytes=0.0, collectives=tuple(colls) * L,
        scratch_bytes=scratch)
    return BodyPlan(part.graph, layouts, ins, outs, strategy)


def _stacked(spec: ShardingSpec) -> ShardingSpec:
    """A slice's spec as the spec of the stacked value: the leading layer dim replicated."""
    return ShardingSpec(((), *spec.dims))


# ---- a forward scan and its backward scan, solved together --------------------------------------

Link = tuple[int, str, int]  # (backward body input, "out" or "in", forward body output or input)


@functools.lru_cache(maxsize=64)
def joint_plans(fwd: ScanKey, bwd: ScanKey, links: tuple[Link, ...], grads: tuple[tuple[int, int], ...],
                cluster: ClusterSpec) -> tuple[tuple[BodyPlan, BodyPlan], ...]:
    """Candidate solutions of the two bodies as one problem (module docstring). ``grads``:
    (backward body output, forward body input) pairs of a parameter slice and its gradient."""
    gf, gb = trace_body(fwd.jaxpr), trace_body(bwd.jaxpr)
    graph, ties, link_pos = _joint_graph(gf, gb, fwd, bwd, links, grads)
    pf = _Part(fwd, gf, 0, 0, 0)
    pb = _Part(bwd, gb, len(gf.ops), len(gf.inputs), len(gf.outputs))
    bwd_nodes = {graph.producer[graph.inputs[len(gf.inputs) + k]]: kind for k, kind, _ in links}
    result = {}
    for iop, sol in _solve_candidates(graph, cluster, ties, fwd):
        chosen_in = [iop.sgraph.strategies[v][sol.choice[v]].out_specs[0] for v in
                     (graph.producer[t] for t in graph.inputs)]
        # A saved activation leaves the forward body in the spec the backward body reads.
        override = {j: chosen_in[len(gf.inputs) + k] for k, kind, j in links if kind == "out"}

        def charged_f(ref: Any, iop: IntraOpProblem = iop) -> bool:
            return _edge_part(iop, ref, pf, link_pos, bwd_nodes) == "fwd"

        def charged_b(ref: Any, iop: IntraOpProblem = iop) -> bool:
            return _edge_part(iop, ref, pf, link_pos, bwd_nodes) == "bwd"

        f = _part_plan(iop, sol, pf, override, charged_f)
        b = _part_plan(iop, sol, pb, {}, charged_b)
        result.setdefault((f.strategy.in_specs, f.strategy.out_specs, b.strategy.in_specs,
                           b.strategy.out_specs), (f, b))
    pairs = tuple(result.values())
    _remember((fwd.jaxpr, cluster), (f for f, _ in pairs))
    _remember((bwd.jaxpr, cluster), (b for _, b in pairs))
    return pairs


def _joint_graph(gf: OpGraph, gb: OpGraph, fwd: ScanKey, bwd: ScanKey, links: Sequence[Link],
                 grads: Sequence[tuple[int, int]]) -> tuple[OpGraph, dict[int, int], set[int]]:
    """Both bodies in one graph (forward first); ties: each carry to itself, each link from
    its forward tensor (an extra output) to the backward input it feeds, and each parameter's
    gradient to the parameter (the optimizer outside the loop combines them and writes the
    parameter back in its spec). Also returns the output positions of the links."""
    nt, nops, nin = len(gf.tensors), len(gf.ops), len(gf.inputs)
    ops = list(gf.ops)
    for op in gb.ops:
        params = {"index": nin + op.params["index"]} if op.kind == "parameter" else op.params
        ops.append(replace(op, index=nops + op.index, operands=tuple(t + nt for t in op.operands),
                           outputs=tuple(t + nt for t in op.outputs), params=params))
    outputs = list(gf.outputs) + [t + nt for t in gb.outputs]
    ties = {j: fwd.num_consts + j for j in range(fwd.num_carry)}
    ties.update({len(gf.outputs) + j: nin + bwd.num_consts + j for j in range(bwd.num_carry)})
    ties.update({len(gf.outputs) + j: i for j, i in grads})
    link_pos = set()
    for k, kind, j in links:
        link_pos.add(len(outputs))
        ties[len(outputs)] = nin + k
        outputs.append(gf.outputs[j] if kind == "out" else gf.inputs[j])
    fixed = {**gf.fixed, **{t + nt: s for t, s in gb.fixed.items()}}
    graph = OpGraph(gf.tensors + gb.tensors, tuple(ops), gf.inputs + tuple(t + nt for t in gb.inputs),
                    tuple(outputs), fixed=fixed)
    return graph, ties, link_pos


def _edge_part(iop: IntraOpProblem, ref: Any, pf: _Part, link_pos: set[int], bwd_nodes: dict[int, str]) -> str:
    """Which scan pays for an edge: its consumer's. A tie is paid by the scan that emits the
    tied value in that spec (its producer's): the carry, a gradient written in its parameter's
    spec; but a link into a backward input from the forward body is paid by the forward scan
    for a saved activation (it emits it in that spec) and by neither for a shared parameter
    (the outer plan charges each scan's read of it)."""
    dst = ref.dst_node
    n_ops = len(iop.sgraph.graph.ops)
    if dst >= n_ops:  # a sink: the part whose output it is
        pos = iop.sink_outputs[dst - n_ops]
        return "fwd" if pos < len(pf.graph.outputs) else "bwd"
    if ref.operand < 0:
        if dst in bwd_nodes:
            return "fwd" if bwd_nodes[dst] == "out" else "none"
        return "fwd" if pf.has_op(ref.src_op) else "bwd"
    return "fwd" if pf.has_op(dst) else "bwd"


def pair_scans(sgraph: StrategyGraph) -> StrategyGraph:
    """Offer each forward/backward pair of scans the halves of their joint solutions (module
    docstring), beside the candidates each has alone."""
    g = sgraph.graph
    strategies = list(sgraph.strategies)
    scans = _scan_ops(sgraph)
    for v in scans:
        for u in sorted({g.producer[t] for t in g.ops[v].operands} & set(scans) - {v}):
            links = _links(g.ops[u], g.ops[v])
            if not links:
                continue
            grads = _grad_pairs(g, g.ops[u], g.ops[v])
            for f, b in joint_plans(ScanKey.of(g.ops[u]), ScanKey.of(g.ops[v]), links, grads, sgraph.cluster):
                for w, bp in ((u, f), (v, b)):
                    have = {(s.in_specs, s.out_specs) for s in strategies[w]}
                    if (bp.strategy.in_specs, bp.strategy.out_specs) not in have:
                        outs = [g.tensors[t] for t in g.ops[w].outputs]
                        strategies[w] = (*strategies[w], _as_strategy(bp, outs, sgraph.cluster.axis_sizes))
    if strategies == list(sgraph.strategies):
        return sgraph
    return replace(sgraph, strategies=tuple(strategies))


def _scan_ops(sgraph: StrategyGraph) -> list[int]:
    return [op.index for op in sgraph.graph.ops
            if op.primitive is lax.scan_p and op.index not in sgraph.unconstrained]


def _links(fwd: Op, bwd: Op) -> tuple[Link, ...]:
    """Backward body inputs the forward scan provides: its results (saved activations) and the
    operands both read (stacked parameters), where both sides are sliced or both whole."""
    kf, kb = ScanKey.of(fwd), ScanKey.of(bwd)
    links = []
    for k, t in enumerate(bwd.operands):
        if t in fwd.outputs:
            j = fwd.outputs.index(t)
            kind, sliced = "out", j >= kf.num_carry
        elif t in fwd.operands:
            j = fwd.operands.index(t)
            kind, sliced = "in", j >= kf.whole_inputs
        else:
            continue
        if sliced == (k >= kb.whole_inputs):
            links.append((k, kind, j))
    return tuple(links)


def _grad_pairs(g: OpGraph, fwd: Op, bwd: Op) -> tuple[tuple[int, int], ...]:
    """(backward body output, forward body input) of each stacked parameter both scans read and
    its stacked gradient: jax's scan transpose returns the cotangents of the scanned inputs in
    their order, so the gradients are matched to the shared scanned inputs in order by shape."""
    kf, kb = ScanKey.of(fwd), ScanKey.of(bwd)
    params = [i for i in range(kf.whole_inputs, len(fwd.operands)) if fwd.operands[i] in bwd.operands]
    pairs, j = [], kb.num_carry
    for i in params:
        shape = g.tensors[fwd.operands[i]].shape
        while j < len(bwd.outputs) and g.tensors[bwd.outputs[j]].shape != shape:
            j += 1
        if j == len(bwd.outputs):
            break
        pairs.append((j, i))
        j += 1
    return tuple(pairs)


# ---- the rule and emission ---------------------------------------------------------------------

def _as_strategy(bp: BodyPlan, outs: Sequence[TensorInfo], sizes: Any) -> Strategy:
    """The scan op's strategy of a body solution, its memory the results in their specs."""
    s = bp.strategy
    memory = sum(local_bytes(t, spec, sizes) for t, spec in zip(outs, s.out_specs))
    return replace(s, memory_bytes=float(memory))


@register_strategy(lax.scan_p)
def _scan(ctx: Any, *operands: TensorInfo, jaxpr: Any, length: int, num_consts: int, num_carry: int,
          **_: Any) -> list[Strategy]:
    key = ScanKey(jaxpr, int(length), int(num_consts), int(num_carry))
    return [_as_strategy(bp, ctx.outs, ctx.sizes) for bp in body_plans(key, ctx.cluster)]


def body_plan_for(op: Op, outs: Sequence[ShardingSpec], ins: Sequence[ShardingSpec],
                  cluster: ClusterSpec) -> BodyPlan | None:
    """The body solution a scan op's chosen layout came from (None: not found)."""
    key = ScanKey.of(op)
    plans = body_plans(key, cluster)  # solved here when the plan was made elsewhere
    for bp in _PLANS.get((key.jaxpr, cluster), plans):
        if bp.strategy.in_specs == tuple(ins) and bp.strategy.out_specs == tuple(outs):
            return bp
    return None
