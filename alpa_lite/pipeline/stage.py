"""One pipeline stage as jitted programs on its own sub-mesh: forward, backward, gradient sync.

A stage runs layers i..j. Its forward replays, layer after layer, the forward half of each
layer's planned forward+backward graph (``emit.program.make_body`` with the layer's layouts) and returns
the activations later stages read plus the residuals its backward needs; its backward replays
the backward halves in reverse, adds the weights' gradients to the accumulators (donated) and
returns the gradients of the activations it was given. Between layers of one stage a value is
constrained to the spec the next layer's plan wants (the resharding the stage cost composes).

Inputs of the forward: the stage's weights (loss inputs that are not split, held once per step),
its microbatch data (loss inputs that are split) and activations from earlier stages. The
backward reads the weights again rather than holding them per microbatch.

A recomputing stage (``remat``, the plan's choice for the stage) returns from its forward, in
place of the residuals, each layer's non-weight inputs (as that layer's plan reads them); its
backward runs, layer by layer in reverse, the layer's forward half again from those inputs and
then its backward half. The recomputation sits behind an ``optimization_barrier`` with the
layer's incoming cotangents, so XLA cannot hoist every layer's recomputation to the start of the
program (which would hold all of the stage's residuals at once); since the first forward is
another program, there is nothing for XLA to CSE the recomputation with.

A weight gradient the layer plan makes as a partial sum comes out of the backward as a stacked
partial (``accum``) and its accumulator stays unreduced; ``reduce`` sums the stacked
accumulators once per step (the gradient sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from alpa_lite.emit.program import keep_barriers, make_body
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import OpGraph
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.pipeline.accum import (
    Deferral,
    find_deferrals,
    reduce_stacked,
    stacked_accumulators,
    stacked_grad,
    stacked_spec,
)
from alpa_lite.pipeline.layers import LayerGraph, parameter_op
from alpa_lite.pipeline.program import Layer
from alpa_lite.result.plan import VIEW_AXES, LayerPlan, OpLayout

Var = Any


@dataclass(eq=False)
class LayerHalves:
    """A layer's planned graph split into a forward and a backward body."""

    layer: Layer
    plan: LayerPlan
    fwd: Any  # fn(*layer inputs) -> [outputs..., residuals...]
    bwd: Any  # fn(*weight residuals, *other residuals, *cotangents) -> [gradients...]
    weight_res: list[int]  # layer input positions of the weights the backward reads
    num_res: int  # residuals the forward returns
    deferred: dict[int, Deferral] = field(default_factory=dict)  # by backward output: stacked partials
    # "dots" (``dots_layer``): fn(*layer inputs) -> [outputs..., saved matmul outputs...], and
    # fn(*layer inputs, *saved matmul outputs) -> [residuals...]
    fwd_dots: Any = None
    rerun_dots: Any = None


def split_layer(layer: Layer, lg: LayerGraph, plan: LayerPlan, cluster: ClusterSpec, mesh: Any,
                defer: bool = True, policy: str = "keep") -> LayerHalves:
    """The halves of ``layer``'s planned graph; with ``policy="dots"`` also its "dots" bodies."""
    h = _split_layer(layer, lg, plan, cluster, mesh, defer)
    if policy == "dots":
        h.fwd_dots, h.rerun_dots = _dots_bodies(lg, plan, cluster, mesh)
    return h


def _dots_bodies(lg: LayerGraph, plan: LayerPlan, cluster: ClusterSpec, mesh: Any) -> tuple[Any, Any]:
    """A "dots" layer's forward, returning its outputs and the matmul outputs it saves
    (``LayerGraph.dots_saved``), and its recomputation: the residuals from the layer inputs and
    those saved matmuls, running only ``LayerGraph.dots_recomputed_ops``."""
    g = lg.graph
    saved = list(lg.dots_saved)
    saved_specs = [_reader_spec(lg, plan, t, lg.dots_recomputed_ops) for t in saved]
    fwd_ops = [g.ops[v] for v in lg.fwd_ops]
    fwd_lay = [plan.layouts[v] for v in lg.fwd_ops]
    fwd = make_body(OpGraph(g.tensors, tuple(fwd_ops), g.inputs[:lg.num_inputs],
                            tuple(g.outputs[:lg.num_outputs]) + tuple(saved)),
                    fwd_lay, [*plan.out_specs[:lg.num_outputs], *saved_specs], cluster, mesh)
    weights = {g.inputs[k] for k in lg.weight_residuals}
    other = [t for t in lg.residuals if t not in weights]
    ops, lays = [], []
    for v in lg.fwd_ops:  # the layer inputs and constants first, then the saved matmuls, then the rest
        if g.ops[v].kind in ("parameter", "constant"):
            ops.append(g.ops[v])
            lays.append(plan.layouts[v])
    for k, (t, spec) in enumerate(zip(saved, saved_specs)):
        ops.append(parameter_op(lg.num_inputs + k, t, len(g.ops) + k))
        lays.append(OpLayout((spec or ShardingSpec.replicated(g.tensors[t].rank),), (), spec is None))
    for v in lg.fwd_ops:
        if v in lg.dots_recomputed_ops:
            ops.append(g.ops[v])
            lays.append(plan.layouts[v])
    rerun = make_body(OpGraph(g.tensors, tuple(ops), (), tuple(other)), lays,
                      [_residual_spec(lg, plan, t) for t in other], cluster, mesh)
    return fwd, rerun


def _split_layer(layer: Layer, lg: LayerGraph, plan: LayerPlan, cluster: ClusterSpec, mesh: Any,
                 defer: bool) -> LayerHalves:
    g = lg.graph
    if len(plan.layouts) != len(g.ops):
        raise ValueError(f"layer {layer.index}: the plan has {len(plan.layouts)} ops, the traced layer "
                         f"{len(g.ops)}: the function changed since planning")
    weight_res = lg.weight_residuals
    wt = {g.inputs[k] for k in weight_res}
    other = [t for t in lg.residuals if t not in wt]
    fwd_ops = [g.ops[v] for v in lg.fwd_ops]
    fwd_lay = [plan.layouts[v] for v in lg.fwd_ops]
    res_specs = [_residual_spec(lg, plan, t) for t in other]
    outs = tuple(g.outputs[:lg.num_outputs]) + tuple(other)
    fwd_graph = OpGraph(g.tensors, tuple(fwd_ops), g.inputs[:lg.num_inputs], outs)
    fwd = make_body(fwd_graph, fwd_lay, [*plan.out_specs[:lg.num_outputs], *res_specs], cluster, mesh)
    deferred = find_deferrals(layer.diff_in, lg, plan.layouts, plan.out_specs, dict(mesh.shape)) if defer else {}
    bwd = _bwd_body(lg, plan, [g.inputs[k] for k in weight_res] + other,
                    [plan.in_specs[k] for k in weight_res] + res_specs, cluster, mesh, deferred)
    return LayerHalves(layer, plan, fwd, bwd, weight_res, len(other),
                       {pos - lg.num_outputs: d for pos, d in deferred.items()})


def _reader_spec(lg: LayerGraph, plan: LayerPlan, t: int, ops: frozenset[int]) -> ShardingSpec | None:
    """The spec the first of ``ops`` (else of the backward half) reading ``t`` wants it in: how a
    saved matmul output is held, so that the recomputation reads it without resharding."""
    g = lg.graph
    for v in lg.fwd_ops:
        op = g.ops[v]
        if v in ops and t in op.operands and not plan.layouts[v].free:
            return plan.layouts[v].ins[op.operands.index(t)]
    return _residual_spec(lg, plan, t)


def _residual_spec(lg: LayerGraph, plan: LayerPlan, t: int) -> ShardingSpec | None:
    g = lg.graph
    for v in lg.bwd_ops:
        op = g.ops[v]
        if t in op.operands and op.kind != "parameter" and not plan.layouts[v].free:
            return plan.layouts[v].ins[op.operands.index(t)]
    pos = [k for k, o in enumerate(g.outputs) if o == t]
    return plan.out_specs[pos[0]] if pos else None


def _bwd_body(lg: LayerGraph, plan: LayerPlan, res: list[int], res_specs: list[ShardingSpec | None],
              cluster: ClusterSpec, mesh: Any, deferred: dict[int, Deferral]) -> Any:
    """The backward half, reading residuals then cotangents as its flat inputs, returning the
    gradients (a deferred one as its stacked partial, ``accum``)."""
    g = lg.graph
    skip = {v for d in deferred.values() for v in (d.producer, *d.chain)}
    ops, lays = [], []
    n_ops = len(g.ops)
    for k, (t, spec) in enumerate(zip(res, res_specs)):
        ops.append(parameter_op(k, t, n_ops + k))
        rank = g.tensors[t].rank
        lays.append(OpLayout((spec or ShardingSpec.replicated(rank),), (), spec is None))
    ct_param = {g.ops[g.producer[t]].index: j for j, t in enumerate(lg.ct_tensors)}
    used = {t for v in lg.bwd_ops for t in g.ops[v].operands}
    for op in g.ops:
        if op.kind == "constant" and op.outputs[0] in used:
            ops.append(op)
            lays.append(plan.layouts[op.index])
    for v in lg.bwd_ops:
        op = g.ops[v]
        if v in skip:
            continue
        if v in ct_param:
            op = parameter_op(len(res) + ct_param[v], op.outputs[0], v)
        ops.append(op)
        lays.append(plan.layouts[v])
    n_out = len(g.outputs)
    kept = [p for p in range(lg.num_outputs, n_out) if p not in deferred]
    extra = [(t, s) for d in deferred.values()
             for t, s in zip(g.ops[d.producer].operands, plan.layouts[d.producer].ins)]
    outs = tuple(g.outputs[p] for p in kept) + tuple(t for t, _ in extra)
    graph = OpGraph(g.tensors, tuple(ops), (), outs)
    body = make_body(graph, lays, [plan.out_specs[p] for p in kept] + [s for _, s in extra], cluster, mesh)
    if not deferred:
        return body

    def bwd(*flat: Any) -> list[Any]:
        vals = body(*flat)
        got = dict(zip(kept, vals))
        rest = iter(vals[len(kept):])
        for p, d in deferred.items():
            operands = [next(rest) for _ in g.ops[d.producer].operands]
            got[p] = stacked_grad(d, g, plan.layouts, operands, mesh)
        return [got[p] for p in range(lg.num_outputs, n_out)]

    return bwd


@dataclass(eq=False)
class StageProgram:
    """Stage p: layers ``layers``; vars it reads and writes; its jitted forward and backward."""

    index: int
    mesh: Any
    halves: list[LayerHalves]
    weights: list[Var]  # loss inputs held once (weights, hoisted constants)
    data: list[Var]  # loss inputs split into microbatches
    acts_in: list[Var]  # activations from earlier stages
    acts_out: list[Var]  # activations later stages (or the loss outputs) read
    ct_in: list[Var]  # differentiable acts_out read by later stages: their gradients come back
    ct_out: list[Var]  # differentiable acts_in: their gradients go back
    accums: list[Var]  # differentiated weights: gradient accumulators
    specs: dict[Var, ShardingSpec] = field(default_factory=dict)  # where inputs arrive
    stacked: dict[Var, tuple[str, ...]] = field(default_factory=dict)  # accumulators kept unreduced
    seed: float = 0.0  # cotangent of the loss, when this stage computes it (1/B)
    remat: bool = False  # the backward recomputes each layer's forward from its saved inputs
    dots: bool = False  # ... and its saved matmul outputs (``remat_policy`` "dots")
    loss_var: Any = None
    fwd: Any = None
    bwd: Any = None
    reduce: Any = None  # stacked accumulators → gradients, once per step

    def sharding(self, var: Var) -> NamedSharding:
        return NamedSharding(self.mesh, self.specs[var].to_partition_spec())

    def accum_spec(self, var: Var) -> ShardingSpec:
        axes = self.stacked.get(var)
        return self.specs[var] if axes is None else stacked_spec(axes, self.specs[var])

    def accum_struct(self, var: Var) -> jax.ShapeDtypeStruct:
        """An accumulator: the gradient's shape, or (|A|, *shape) when kept unreduced."""
        axes = self.stacked.get(var, ())
        sizes = dict(self.mesh.shape)
        lead = (int(np.prod([sizes[a] for a in axes])),) if axes else ()
        sharding = NamedSharding(self.mesh, self.accum_spec(var).to_partition_spec())
        return jax.ShapeDtypeStruct((*lead, *var.aval.shape), var.aval.dtype, sharding=sharding)

    def new_accum(self, var: Var) -> Any:
        a = self.accum_struct(var)
        return jnp.zeros(a.shape, a.dtype, device=a.sharding)


def move(x: Any, target: NamedSharding) -> Any:
    """``jax.device_put`` onto another sub-mesh. Across processes JAX's cross-host transfer wants
    the same sharding on both sides: reshard on the sender's sub-mesh first (same axes)."""
    src = getattr(x, "sharding", None)
    if (jax.process_count() > 1 and isinstance(src, NamedSharding) and src.mesh != target.mesh
            and src.mesh.axis_names == target.mesh.axis_names):
        x = jax.device_put(x, NamedSharding(src.mesh, target.spec))
    return jax.device_put(x, target)


def stage_mesh(devices: Sequence[Any], view: Sequence[int]) -> jax.sharding.Mesh:
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(np.array(devices, dtype=object).reshape(tuple(view)), VIEW_AXES,
                             axis_types=(auto, auto))


def build_stage(index: int, halves: list[LayerHalves], mesh: Any, weights: set[Var], micro: set[Var],
                later_reads: set[Var], loss_outvars: Sequence[Any], seed: float,
                remat: bool = False, dots: bool = False) -> StageProgram:
    made = {v for h in halves for v in h.layer.outputs}
    reads = list(dict.fromkeys(v for h in halves for v in h.layer.inputs if v not in made))
    diff = {v for h in halves for v, d in zip(h.layer.inputs, h.layer.diff_in) if d}
    diff |= {v for h in halves for v, d in zip(h.layer.outputs, h.layer.diff_out) if d}
    outs = [v for h in halves for v in h.layer.outputs if v in later_reads or v in loss_outvars]
    sp = StageProgram(index, mesh, halves, [v for v in reads if v in weights],
                      [v for v in reads if v in micro], [v for v in reads if v not in weights | micro],
                      outs, [v for v in outs if v in diff and v in later_reads], [], [])
    sp.ct_out = [v for v in sp.acts_in if v in diff]
    sp.remat, sp.dots = remat, remat and dots
    sp.accums = [v for v in sp.weights if v in diff]
    for h in halves:
        for k, v in enumerate(h.layer.inputs):
            sp.specs.setdefault(v, h.plan.in_specs[k])
    sp.stacked = _stacked_accums(halves, sp.accums)
    if loss_outvars and loss_outvars[0] in made:
        sp.loss_var, sp.seed = loss_outvars[0], seed
    sp.fwd = jax.jit(_forward(sp))
    # a recomputing backward keeps each layer's recomputation behind its barrier (emit.program)
    sp.bwd = jax.jit(_backward(sp), donate_argnums=(3,), compiler_options=keep_barriers(mesh) if remat else None)
    sp.reduce = jax.jit(_reduce(sp))
    return sp


def _stacked_accums(halves: list[LayerHalves], accums: list[Var]) -> dict[Var, tuple[str, ...]]:
    """Accumulators kept as stacked partials (``accum.stacked_accumulators``)."""
    contributions = []
    for h in halves:
        din = [k for k, d in enumerate(h.layer.diff_in) if d]
        contributions += [(h.layer.inputs[k], h.deferred[j].axes if j in h.deferred else None)
                          for j, k in enumerate(din) if h.layer.inputs[k] in accums]
    return stacked_accumulators(contributions)


def _reduce(sp: StageProgram) -> Any:
    """The once-per-step gradient sync: each stacked accumulator summed into its weight's spec."""
    def reduce(stacked: list[Any]) -> list[Any]:
        return [reduce_stacked(a, sp.specs[v], sp.mesh) for v, a in zip(sp.stacked, stacked)]

    return reduce


def _constrain(mesh: Any, x: Any, spec: ShardingSpec | None) -> Any:
    if spec is None or not getattr(x, "ndim", 0):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec.to_partition_spec()))


def _forward(sp: StageProgram) -> Any:
    def fwd(weights: list[Any], data: list[Any], acts: list[Any]) -> tuple[list[Any], list[Any]]:
        env = dict(zip(sp.weights, weights)) | dict(zip(sp.data, data)) | dict(zip(sp.acts_in, acts))
        residuals = []
        for h in sp.halves:
            xs = [_constrain(sp.mesh, env[v], s) for v, s in zip(h.layer.inputs, h.plan.in_specs)]
            outs = (h.fwd_dots if sp.dots else h.fwd)(*xs)
            n = len(h.layer.outputs)
            env.update(zip(h.layer.outputs, outs[:n]))
            if sp.dots:  # the inputs, then the matmul outputs the recomputation reads
                residuals.append([*_saved_inputs(sp, h, xs), *outs[n:]])
            else:
                residuals.append(_saved_inputs(sp, h, xs) if sp.remat else outs[n:])
        return [env[v] for v in sp.acts_out], residuals

    return fwd


def _backward(sp: StageProgram) -> Any:
    def bwd(weights: list[Any], residuals: list[Any], cts: list[Any],
            accums: list[Any]) -> tuple[list[Any], list[Any]]:
        w = dict(zip(sp.weights, weights))
        ct = dict(zip(sp.ct_in, cts))
        grads: dict[Var, Any] = {}
        for h, res in zip(reversed(sp.halves), reversed(residuals)):
            lay = h.layer
            if sp.loss_var is not None and sp.loss_var in lay.outputs:
                ct[sp.loss_var] = _add(ct.get(sp.loss_var), jnp.asarray(sp.seed, sp.loss_var.aval.dtype))
            n_in = len(lay.inputs)
            douts = [k for k, d in enumerate(lay.diff_out) if d]
            cts_l = [_constrain(sp.mesh, _or_zeros(ct.get(lay.outputs[k]), lay.outputs[k]),
                                h.plan.in_specs[n_in + j]) for j, k in enumerate(douts)]
            if sp.remat:
                res, cts_l = _recompute(sp, h, w, res, cts_l)
            wres = [_constrain(sp.mesh, w[lay.inputs[k]], h.plan.in_specs[k]) for k in h.weight_res]
            gs = h.bwd(*wres, *res, *cts_l)
            for j, (k, g) in enumerate(zip((k for k, d in enumerate(lay.diff_in) if d), gs)):
                v = lay.inputs[k]
                if j in h.deferred and v not in sp.stacked:  # a reduced accumulator: reduce it now
                    g = reduce_stacked(g, h.plan.out_specs[len(lay.outputs) + j], sp.mesh)
                if v in w:
                    grads[v] = _add(grads.get(v), g)
                else:
                    ct[v] = _add(ct.get(v), g)
        new = [_constrain(sp.mesh, a + grads[v] if v in grads else a, sp.accum_spec(v))
               for v, a in zip(sp.accums, accums)]
        return new, [_or_zeros(ct.get(v), v) for v in sp.ct_out]

    return bwd


def _saved_inputs(sp: StageProgram, h: LayerHalves, xs: list[Any]) -> list[Any]:
    """What a recomputing stage keeps of layer h per microbatch: its inputs that are not weights
    (the weights are passed to the backward anyway)."""
    held = set(sp.weights)
    return [x for v, x in zip(h.layer.inputs, xs) if v not in held]


def _recompute(sp: StageProgram, h: LayerHalves, w: dict[Var, Any], saved: list[Any],
               cts: list[Any]) -> tuple[list[Any], list[Any]]:
    """Layer h's residuals, from its forward half run again on its saved inputs, once its
    cotangents exist (the barrier orders it after the later layers' backward)."""
    saved, cts = jax.lax.optimization_barrier((list(saved), list(cts)))
    it = iter(saved)
    xs = [_constrain(sp.mesh, w[v], s) if v in w else next(it) for v, s in zip(h.layer.inputs, h.plan.in_specs)]
    if sp.dots:
        return list(h.rerun_dots(*xs, *it)), cts
    return h.fwd(*xs)[len(h.layer.outputs):], cts


def _add(a: Any, b: Any) -> Any:
    return b if a is None else a + b


def _or_zeros(x: Any, var: Var) -> Any:
    return jnp.zeros(var.aval.shape, var.aval.dtype) if x is None else x
