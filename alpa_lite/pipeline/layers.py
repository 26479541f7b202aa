"""One layer's forward and backward as an op graph, its intra-op plan on a logical view, and the
split of that plan into a forward half and a backward half that run as separate programs.

A layer's graph G is the traced ``Layer.fwd_bwd``: inputs are the layer's inputs then the
cotangents of its differentiable outputs; outputs are its outputs then the gradients of its
differentiable inputs. The intra-op ILP solves G once per distinct layer and logical view
(``solve_layer``, memoised): a weight's gradient is tied to the weight's spec (the accumulator
and the update see one layout) and an activation's gradient to that activation's spec.

G's ops that depend on a cotangent form the backward half, the rest the forward half; the
tensors the backward half reads from the forward half are the residuals a stage holds per
microbatch in flight (weights, read again by the backward, are not counted: they are held
once).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from alpa_lite.intra.assemble import assemble_plan  # the one-stage plan assembly, reused
from alpa_lite.intra.problem import IntraOpProblem, build_problem, edge_charges, output_node
from alpa_lite.intra.scan import strategy_graph
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import Op, OpGraph
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.pipeline.collectives import LayerCollectives, layer_collectives
from alpa_lite.pipeline.program import Layer
from alpa_lite.result.plan import VIEW_AXES, OpLayout
from alpa_lite.tracing.tracer import trace
from ilp import IlpOptions, IlpSolution, NoSolutionError, solve

log = logging.getLogger("alpa_lite.pipeline")


@dataclass(frozen=True, eq=False)
class LayerGraph:
    """G of one layer with its forward/backward split (tensor and op ids of ``graph``)."""

    graph: OpGraph
    num_inputs: int  # layer inputs; the cotangents follow
    num_outputs: int  # layer outputs; the gradients follow
    weight_inputs: frozenset[int]  # input positions that are weights (held once, not per microbatch)
    fwd_ops: tuple[int, ...]
    bwd_ops: tuple[int, ...]
    residuals: tuple[int, ...]  # tensors made by the forward half that the backward half reads

    @property
    def ct_tensors(self) -> tuple[int, ...]:
        return self.graph.inputs[self.num_inputs:]

    @property
    def grad_tensors(self) -> tuple[int, ...]:
        return self.graph.outputs[self.num_outputs:]

    @cached_property
    def recomputed_ops(self) -> frozenset[int]:
        """The forward ops a recomputing stage runs again: those the residuals depend on (what
        only makes the layer's outputs is dead code in the recomputation, and XLA drops it)."""
        return self._upstream(lambda v: False)

    @cached_property
    def dots_recomputed_ops(self) -> frozenset[int]:
        """The forward ops a "dots" stage (``jax.checkpoint_policies.dots_saveable``) runs again:
        as ``recomputed_ops``, but a matmul's output is saved, so neither the matmul nor what only
        feeds it runs again."""
        return self._upstream(lambda v: self.graph.ops[v].kind == "dot")

    @cached_property
    def dots_saved(self) -> tuple[int, ...]:
        """The matmul outputs a "dots" stage holds per microbatch: residuals, or read by its
        recomputation."""
        g, ops = self.graph, self.dots_recomputed_ops
        reads = {t for v in ops for t in g.ops[v].operands} | set(self.residuals)
        return tuple(t for v in self.fwd_ops if g.ops[v].kind == "dot" for t in g.ops[v].outputs if t in reads)

    def rerun_ops(self, policy: str = "full") -> frozenset[int]:
        """The forward ops a recomputation runs again: ``recomputed_ops`` ("full") or
        ``dots_recomputed_ops`` ("dots")."""
        return self.recomputed_ops if policy == "full" else self.dots_recomputed_ops

    def _upstream(self, saved: Any) -> frozenset[int]:
        """Forward ops the residuals depend on, not through an op ``saved(v)`` (its output held)."""
        g, fwd = self.graph, set(self.fwd_ops)
        out: set[int] = set()
        todo = [g.producer[t] for t in self.residuals if t in g.producer]
        while todo:
            v = todo.pop()
            if v in out or v not in fwd or saved(v):
                continue
            out.add(v)
            todo += [g.producer[t] for t in g.ops[v].operands if t in g.producer]
        return frozenset(out)

    def reruns(self, src: int, dst: int | None = None, policy: str = "full") -> bool:
        """Whether a recomputation (``policy`` "full" or "dots") runs op ``src`` again (``dst``
        None), or the resharding on the edge from ``src`` to ``dst``: out of a recomputed op into
        another, or into a backward op (a residual resharded for its reader); not one into an
        output. A saved matmul output is held as its first reader wants it (``stage``), so
        reading it again reshards nothing."""
        ops = self.rerun_ops(policy)
        if src not in ops:
            return False
        return dst is None or dst in ops or dst in self._bwd_set

    @cached_property
    def _bwd_set(self) -> frozenset[int]:
        return frozenset(self.bwd_ops)

    @property
    def weight_residuals(self) -> list[int]:
        """Input positions of the weights the backward half reads (passed to it again)."""
        in_pos = {t: k for k, t in enumerate(self.graph.inputs[:self.num_inputs])}
        return [in_pos[t] for t in self.residuals if t in in_pos and in_pos[t] in self.weight_inputs]


def layer_graph(layer: Layer, weights: frozenset[Any]) -> LayerGraph:
    """Trace ``layer.fwd_bwd`` and split it (``weights``: the loss inputs that are weights)."""
    g = trace(layer.fwd_bwd(), *layer.fwd_bwd_avals())
    g = OpGraph(g.tensors, g.ops, g.inputs, g.outputs, g.in_tree, g.out_tree, {}, g.num_layers)
    n_in = len(layer.inputs)
    bwd_t = set(g.inputs[n_in:])
    bwd_ops = []
    for op in g.ops:
        if op.kind == "parameter" and op.outputs[0] in bwd_t:
            bwd_ops.append(op.index)
        elif op.kind not in ("parameter", "constant") and any(t in bwd_t for t in op.operands):
            bwd_ops.append(op.index)
            bwd_t.update(op.outputs)
    bwd_set = set(bwd_ops)
    fwd_ops = tuple(op.index for op in g.ops if op.index not in bwd_set)
    made_fwd = {t for v in fwd_ops for t in g.ops[v].outputs if g.ops[v].kind != "constant"}
    need = [t for v in bwd_ops for t in g.ops[v].operands if t in made_fwd]
    need += [t for t in g.outputs[len(layer.outputs):] if t in made_fwd]
    weights_pos = frozenset(k for k, v in enumerate(layer.inputs) if v in weights)
    return LayerGraph(g, n_in, len(layer.outputs), weights_pos, fwd_ops, tuple(bwd_ops),
                      tuple(dict.fromkeys(need)))


@dataclass(frozen=True, eq=False)
class LayerSolution:
    """G's intra-op plan on one logical view, per microbatch."""

    view: tuple[int, int]
    layouts: tuple[OpLayout, ...]  # per op of G
    in_specs: tuple[ShardingSpec, ...]  # per G input (layer inputs, then cotangents)
    out_specs: tuple[ShardingSpec, ...]  # per G output (layer outputs, then gradients)
    compute_s: float
    communication_s: float
    resharding_s: float
    weight_bytes: float  # per device, the layer's weights
    residual_bytes: float  # per device, held from forward to backward per microbatch
    peak_bytes: float  # per device, the ILP's peak for one forward+backward
    status: str
    wall_s: float
    collectives: LayerCollectives = LayerCollectives()  # by program; deferred gradient reductions
    forward_s: float = 0.0  # the forward half's share of time_s (``forward_time``): what remat runs again
    input_bytes: float = 0.0  # per device, the non-weight layer inputs: what remat holds per microbatch
    dots_forward_s: float = 0.0  # what a "dots" recomputation runs again (``forward_time``)
    dots_bytes: float = 0.0  # per device, held per microbatch by "dots": the inputs and the saved matmuls

    @property
    def time_s(self) -> float:
        """Forward+backward of one microbatch as the ILP costs it (every reduction in it)."""
        return self.compute_s + self.communication_s + self.resharding_s

    @property
    def microbatch_s(self) -> float:
        """Forward+backward of one microbatch as it runs: deferred reductions left out. Each is
        taken out as the ILP charged it, a term of ``time_s``, so this is >= 0 (the max only
        absorbs rounding)."""
        return max(self.time_s - self.collectives.deferred_s, 0.0)


def view_cluster(cluster: ClusterSpec, view: tuple[int, int]) -> ClusterSpec:
    return cluster.with_mesh(view, VIEW_AXES)


def _ties(layer: Layer, lg: LayerGraph) -> dict[int, int]:
    """Gradient of input k (a differentiable one) → input k: it leaves in the input's spec."""
    din = [k for k, d in enumerate(layer.diff_in) if d]
    return {lg.num_outputs + j: k for j, k in enumerate(din)}


def solve_layer(layer: Layer, lg: LayerGraph, signature: str, cluster: ClusterSpec,
                view: tuple[int, int], time_limit_s: float) -> LayerSolution:
    """The ILP of G on ``view``; memoised on (signature, view, cluster figures)."""
    key = (signature, tuple(view), _cluster_key(cluster), round(time_limit_s, 3))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    sol = _solve(layer, lg, view_cluster(cluster, view), view, time_limit_s)
    _CACHE[key] = sol
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return sol


_CACHE: dict[Any, LayerSolution] = {}
_CACHE_SIZE = 4096


def _cluster_key(cluster: ClusterSpec) -> str:
    """The hardware figures (not the mesh view): what a layer's costs depend on besides it."""
    d = cluster.to_dict()
    d.pop("mesh_shape", None)
    d.pop("axis_names", None)
    return repr(sorted(d.items()))


def layer_problem(layer: Layer, lg: LayerGraph, cluster: ClusterSpec) -> IntraOpProblem:
    """The intra-op problem of G on ``cluster`` (a view's): no memory budget (the stage DP
    applies it to whole stages), each input's gradient tied to the input's spec."""
    return build_problem(strategy_graph(lg.graph, cluster), _ties(layer, lg), None)


def _solve(layer: Layer, lg: LayerGraph, cluster: ClusterSpec, view: tuple[int, int],
           time_limit_s: float) -> LayerSolution:
    iop = layer_problem(layer, lg, cluster)
    # The limit is CP-SAT's deterministic time, so that the same layer gets the same plan in
    # every run and every process of a multi-host job; the wall clock is only a safety net, and
    # the solver warns when it is the one that stops.
    try:
        sol = solve(iop.problem, IlpOptions.deterministic(time_limit_s))
    except NoSolutionError:
        log.warning("layer %d on view %s: no ILP solution within %.3g s; view not used",
                    layer.index, view, time_limit_s)
        return LayerSolution(tuple(view), (), (), (), math.inf, 0.0, 0.0, 0.0, 0.0, 0.0, "UNKNOWN",
                             time_limit_s)
    return layer_solution(layer, lg, iop, sol, view)


def layer_solution(layer: Layer, lg: LayerGraph, iop: IntraOpProblem, sol: IlpSolution,
                   view: tuple[int, int]) -> LayerSolution:
    """What the stage DP and the runtime need of a solved layer problem (any choice that has a
    finite cost: optimal, stopped early, a greedy start)."""
    cluster = iop.sgraph.cluster
    p = assemble_plan(iop, sol, method="auto", mesh=None, static=(), donate=(),
                      num_args=len(lg.graph.inputs), timings={})
    g, sizes = lg.graph, cluster.axis_sizes
    local = {}
    for op, lay in zip(g.ops, p.layouts):
        for t, s in zip(op.outputs, lay.outs):
            local[t] = g.tensors[t].nbytes / max(_split(s, sizes), 1)
    weights = [g.inputs[k] for k in lg.weight_inputs]
    resid = sum(local.get(t, g.tensors[t].nbytes) for t in lg.residuals if t not in weights)
    charges = edge_charges(iop, sol.choice)

    def charged_s(d: Any) -> float:  # the ILP's charge on the edge out of a deferral's producer
        node = d.chain[0] if d.chain else output_node(iop, d.grad_pos)
        return charges.get((g.ops[d.producer].outputs[0], node), 0.0)

    lc = layer_collectives(layer, lg, p.layouts, p.output_specs, p.collectives, cluster, sizes, charged_s)
    inputs = sum(g.tensors[t].nbytes / max(_split(s, sizes), 1)
                 for k, (t, s) in enumerate(zip(g.inputs[:lg.num_inputs], p.input_specs))
                 if k not in lg.weight_inputs)
    return LayerSolution(tuple(view), p.layouts, p.input_specs, p.output_specs, p.cost.compute_s,
                         p.cost.communication_s, p.cost.resharding_s,
                         float(sum(local[t] for t in weights)), float(resid),
                         float(p.cost.peak_memory_bytes), sol.status, sol.wall_s, lc,
                         forward_time(lg, iop, sol.choice), float(inputs),
                         forward_time(lg, iop, sol.choice, "dots"),
                         float(inputs + sum(local.get(t, g.tensors[t].nbytes) for t in lg.dots_saved)))


def forward_time(lg: LayerGraph, iop: IntraOpProblem, choice: Sequence[int], policy: str = "full") -> float:
    """Seconds a recomputation (``policy`` "full" or "dots") of G's forward half takes under
    ``choice``, from the ILP's own terms: Σ over the forward ops it runs again
    (``LayerGraph.recomputed_ops`` or ``dots_recomputed_ops``) of the chosen strategy's node cost
    (compute + its collectives) + Σ over the edges it reshards again (``LayerGraph.reruns``). What
    only makes the layer's outputs is not run again. Every term is one of the objective's, so this
    is <= G's time."""
    nodes = sum(float(iop.problem.node_costs[v][choice[v]]) for v in lg.rerun_ops(policy))
    edges = sum(float(e.cost[choice[e.src], choice[e.dst]]) for e in iop.problem.edges
                if lg.reruns(e.src, e.dst, policy))
    return max(nodes + edges, 0.0)


def _split(spec: ShardingSpec, sizes: dict[str, int]) -> int:
    n = 1
    for axes in spec.dims:
        for a in axes:
            n *= sizes[a]
    return n


def clear_cache() -> None:
    _CACHE.clear()


def parameter_op(index: int, tensor: int, op_index: int) -> Op:
    """A parameter op (flat input ``index``) producing ``tensor``, for a half's sub-graph."""
    return Op(op_index, "parameter", (), (tensor,), None, {"index": index})
