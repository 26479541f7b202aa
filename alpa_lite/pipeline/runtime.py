"""Running a multi-stage plan: microbatches through stages on their own sub-meshes.

``plan.compile(fn)`` returns a ``PipelineRunner``, a callable equal to ``fn``. On each call:

1. the step's equations before ``al.value_and_grad`` (if any) run as one program on the
   whole mesh;
2. the loss operands that are split (the batch) are cut into B microbatches along dimension 0;
   every stage gets its weights once (``jax.device_put`` onto its sub-mesh, in the spec its
   first layer's plan wants);
3. the schedule (GPipe: every forward, then every backward; or 1F1B) dispatches each stage's
   forward and backward per microbatch, moving activations forward and their gradients back
   with ``jax.device_put`` between sub-meshes; JAX dispatches asynchronously, so stages on
   disjoint devices overlap as their dependencies allow;
4. the loss is the mean of the microbatch losses (each microbatch's backward is seeded with
   1/B, so the accumulated gradients are those of that mean); an aux output with the
   microbatch as its leading dimension is concatenated, any other is averaged;
   a gradient the plan makes as a partial sum is accumulated unreduced on each device and
   reduced once per step before the update (``accum``);
5. the rest of the step (the optimizer update) runs once with the accumulated gradients, on
   each stage's own weights and optimizer state on its sub-mesh (``update``); an
   update that mixes stages (gradient-norm clipping) runs as one program on the whole mesh.

Microbatching equals the full-batch step when the loss is a mean over examples. It differs for
batch statistics (batch norm over a microbatch), normalisation by a count that depends on the
batch content (tokens that are not padding: each microbatch divides by its own count), and
random keys passed into the loss (every microbatch sees the same key, so dropout masks repeat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import MeshError, SignatureError
from alpa_lite.pipeline.layers import LayerGraph, layer_graph, view_cluster
from alpa_lite.pipeline.program import StepProgram, cut_layers, is_literal, read, split_step
from alpa_lite.pipeline.stage import StageProgram, build_stage, move, split_layer, stage_mesh
from alpa_lite.pipeline.update import Segment, StageUpdates

SCHEDULES = ("gpipe", "1f1b")


def compile_pipeline(plan: Any, fn: Callable[..., Any], mesh: Any = None,
                     example_args: Sequence[Any] | None = None,
                     defer_gradients: bool = True) -> PipelineRunner:
    """``defer_gradients=False`` reduces every gradient per microbatch, as XLA does at the op
    that makes it (the plan's costs and collectives assume the once-per-step sync)."""
    mesh = mesh if mesh is not None else plan.mesh
    devices = _devices(plan, mesh)
    runner = PipelineRunner(plan, fn, devices, defer_gradients)
    if example_args is not None:
        runner.build(example_args)
    return runner


def _devices(plan: Any, mesh: Any) -> list[Any]:
    n = int(np.prod(plan.mesh_shape))
    if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):
        if len(jax.devices()) < n:
            raise MeshError(f"the plan needs {n} devices, {len(jax.devices())} are here: pass "
                            "compile(fn, mesh=...) with a mesh of the plan's devices")
        return list(jax.devices()[:n])
    devs = list(mesh.devices.flat)
    if len(devs) != n:
        raise MeshError(f"the plan is for {n} devices, the mesh has {len(devs)}")
    return devs


def schedule_order(num_stages: int, B: int, schedule: str) -> list[list[tuple[str, int]]]:
    """Per stage, its ("F" | "B", microbatch) operations in the order it runs them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    out = []
    for p in range(num_stages):
        if schedule == "gpipe":
            out.append([("F", m) for m in range(B)] + [("B", m) for m in range(B)])
            continue
        warm = min(num_stages - p - 1, B)
        ops = [("F", m) for m in range(warm)]
        for k in range(B - warm):
            ops += [("F", warm + k), ("B", k)]
        ops += [("B", m) for m in range(B - warm, B)]
        out.append(ops)
    return out


class PipelineRunner:
    """A callable equal to the planned step; builds its stage programs on the first call."""

    def __init__(self, plan: Any, fn: Callable[..., Any], devices: list[Any], defer_gradients: bool = True) -> None:
        self.plan, self.fn, self.devices = plan, fn, devices
        self.defer_gradients = defer_gradients
        self.schedule = plan.pipeline.schedule
        self.full_mesh = jax.sharding.Mesh(np.array(devices, dtype=object), ("all",),
                                           axis_types=(jax.sharding.AxisType.Auto,))
        self.prog: StepProgram | None = None
        self.stages: list[StageProgram] = []
        self._pre: Segment | None = None
        self.update: StageUpdates | None = None
        self.examples: dict[int, Any] = {}

    # ---- building -------------------------------------------------------------------
    def build(self, args: Sequence[Any]) -> None:
        if self.prog is not None:
            return
        plan, info = self.plan, self.plan.pipeline
        self.plan.check_signature(args)
        self.prog = split_step(self.fn, args, plan.static_argnums, info.state_leaves, info.batch_leaves,
                               info.num_microbatches)
        if self.prog is None:
            raise SignatureError("the function has no al.value_and_grad: it is not the step this "
                                 "pipeline plan was made for")
        layers = cut_layers(self.prog.loss, info.layer_starts)
        loss = self.prog.loss
        micro = {v for v, m in zip(loss.invars, self.prog.micro) if m}
        weights = set(loss.invars) - micro
        graphs: dict[str, LayerGraph] = {}
        cluster = ClusterSpec.from_dict(plan.cluster)
        for p, st in enumerate(plan.stages):
            mesh = stage_mesh([self.devices[d] for d in st.devices], st.view)
            halves = []
            for layer in layers[st.layers[0]: st.layers[1] + 1]:
                sig = layer.signature()
                if sig not in graphs:
                    graphs[sig] = layer_graph(layer, frozenset(weights))
                lp = info.layer_plans[layer.index]
                halves.append(split_layer(layer, graphs[sig], lp, view_cluster(cluster, lp.view), mesh,
                                          self.defer_gradients, st.remat_policy))
            later = {v for lay in layers[st.layers[1] + 1:] for v in lay.inputs}
            self.stages.append(build_stage(p, halves, mesh, weights, micro, later, loss.outvars,
                                           1.0 / info.num_microbatches, st.remat, st.remat_policy == "dots"))
        self.update = StageUpdates(self.prog, self.stages, self.full_mesh, _state_pairs(self.prog, args, plan))

    # ---- running --------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        self.build(args)
        prog = self.prog
        leaves = jax.tree.leaves([a for i, a in enumerate(args) if i not in self.plan.static_argnums])
        env: dict[Any, Any] = dict(zip(prog.jaxpr.constvars, prog.consts))
        env.update(zip(prog.jaxpr.invars, leaves))
        if prog.pre_eqns:
            self._run_pre(env)
        operands = [read(env, x) for x in prog.vag.invars]
        loss_inputs = dict(zip(prog.loss.invars, operands))
        micro = {v: _split(loss_inputs[v], prog.num_microbatches)
                 for v, m in zip(prog.loss.invars, prog.micro) if m}
        outs = self._run_pipeline(loss_inputs, micro)
        env.update(zip(prog.vag.outvars, outs))
        self.update.run(env)
        return jax.tree.unflatten(prog.out_tree, [read(env, v) for v in prog.jaxpr.outvars])

    def _run_pipeline(self, loss_inputs: dict[Any, Any], micro: dict[Any, list[Any]]) -> list[Any]:
        B = self.prog.num_microbatches
        weights = [[move(loss_inputs[v], sp.sharding(v)) for v in sp.weights] for sp in self.stages]
        accums = [[sp.new_accum(v) for v in sp.accums] for sp in self.stages]
        acts: dict[tuple[Any, int], Any] = {}
        cts: dict[tuple[Any, int], list[Any]] = {}
        residuals: dict[tuple[int, int], Any] = {}
        order = schedule_order(len(self.stages), B, self.schedule)
        done: set[tuple[str, int, int]] = set()
        pos = [0] * len(self.stages)
        while any(pos[p] < len(order[p]) for p in range(len(self.stages))):
            progressed = False
            for p, sp in enumerate(self.stages):
                if pos[p] >= len(order[p]):
                    continue
                kind, m = order[p][pos[p]]
                if not self._ready(kind, p, m, done):
                    continue
                if kind == "F":
                    self._forward(sp, m, weights[p], micro, acts, residuals)
                else:
                    accums[p] = self._backward(sp, m, weights[p], accums[p], acts, cts, residuals)
                done.add((kind, p, m))
                pos[p] += 1
                progressed = True
            if not progressed:
                raise RuntimeError("pipeline schedule deadlocked (a bug in the schedule)")
        return self._vag_outputs(acts, accums, loss_inputs)

    def _ready(self, kind: str, p: int, m: int, done: set[tuple[str, int, int]]) -> bool:
        """A forward waits for the stages whose activations it reads; a backward for the stages
        that read its activations (their gradients) and for its own forward."""
        sp = self.stages[p]
        if kind == "F":
            return all(("F", q, m) in done for q in range(p) if set(self.stages[q].acts_out) & set(sp.acts_in))
        return ("F", p, m) in done and all(
            ("B", q, m) in done for q in range(p + 1, len(self.stages))
            if set(self.stages[q].ct_out) & set(sp.ct_in))

    def _forward(self, sp: StageProgram, m: int, weights: list[Any], micro: dict[Any, list[Any]],
                 acts: dict[Any, Any], residuals: dict[Any, Any]) -> None:
        data = [move(micro[v][m], sp.sharding(v)) for v in sp.data]
        ins = [move(acts[(v, m)], sp.sharding(v)) for v in sp.acts_in]
        if sp.index not in self.examples:
            self.examples[sp.index] = {"fwd": _structs((weights, data, ins))}
        outs, res = sp.fwd(weights, data, ins)
        acts.update(((v, m), x) for v, x in zip(sp.acts_out, outs))
        residuals[(sp.index, m)] = res

    def _backward(self, sp: StageProgram, m: int, weights: list[Any], accums: list[Any],
                  acts: dict[Any, Any], cts: dict[Any, list[Any]], residuals: dict[Any, Any]) -> list[Any]:
        ct_in = []
        for v in sp.ct_in:
            parts = [move(c, acts[(v, m)].sharding) for c in cts.pop((v, m), [])]
            ct_in.append(sum(parts[1:], parts[0]) if parts else jnp.zeros_like(acts[(v, m)]))
        res = residuals.pop((sp.index, m))
        ex = self.examples[sp.index]
        if "bwd" not in ex:
            ex["bwd"] = _structs((weights, res, ct_in, accums))
        accums, ct_out = sp.bwd(weights, res, ct_in, accums)
        for v, c in zip(sp.ct_out, ct_out):
            cts.setdefault((v, m), []).append(c)
        return accums

    def _vag_outputs(self, acts: dict[Any, Any], accums: list[list[Any]],
                     loss_inputs: dict[Any, Any]) -> list[Any]:
        """[loss, *aux, *gradients] as ``value_and_grad_p`` returns them, for the full batch."""
        loss_prog, B = self.prog.loss, self.prog.num_microbatches
        outs = []
        for k, v in enumerate(loss_prog.outvars):
            if is_literal(v):
                outs.append(v.val)
                continue
            if v in loss_inputs:
                outs.append(loss_inputs[v])
                continue
            parts = [acts[(v, m)] for m in range(B)]
            full = self.prog.vag.outvars[k].aval
            if k and parts[0].ndim and full.shape[0] == parts[0].shape[0] * B:
                outs.append(jnp.concatenate(parts))
            else:
                outs.append(sum(parts[1:], parts[0]) / B)
        grads: dict[Any, Any] = {}
        for sp, acc in zip(self.stages, accums):
            for v, a in zip(sp.accums, self._reduce(sp, acc)):
                grads[v] = a if v not in grads else grads[v] + move(a, grads[v].sharding)
        for v, d in zip(loss_prog.invars, loss_prog.diff_invars):
            if d:
                outs.append(grads[v] if v in grads else jnp.zeros(v.aval.shape, v.aval.dtype))
        return outs

    def _reduce(self, sp: StageProgram, accums: list[Any]) -> list[Any]:
        """The stage's gradients: stacked accumulators summed (the once-per-step sync)."""
        if not sp.stacked:
            return accums
        pos = {v: k for k, v in enumerate(sp.accums)}
        stacked = [accums[pos[v]] for v in sp.stacked]
        out = list(accums)
        for v, g in zip(sp.stacked, sp.reduce(stacked)):
            out[pos[v]] = g
        return out

    def _run_pre(self, env: dict[Any, Any]) -> None:
        """The step's equations before the loss, as one jitted program on the whole mesh."""
        prog = self.prog
        if self._pre is None:
            later = set(prog.jaxpr.outvars) | set(prog.vag.invars)
            later |= {x for e in prog.post_eqns for x in e.invars}
            self._pre = Segment(prog.pre_eqns, [v for e in prog.pre_eqns for v in e.outvars if v in later])
        rep = NamedSharding(self.full_mesh, PartitionSpec())
        self._pre.run(env, [rep] * len(self._pre.inputs))

    # ---- inspection -----------------------------------------------------------------
    def compiled_memory(self) -> list[dict[str, Any]]:
        """Per stage, after a call: the compiled forward and backward ``memory_analysis()`` and the
        bytes of one microbatch's residuals (held per microbatch in flight)."""
        out = []
        for sp in self.stages:
            ex = self.examples[sp.index]
            fwd = sp.fwd.lower(*ex["fwd"]).compile()
            bwd = sp.bwd.lower(*ex["bwd"]).compile()
            res = ex["bwd"][1]
            per_dev = sum(_local_bytes(r) for r in jax.tree.leaves(res))
            out.append({"fwd": fwd.memory_analysis(), "bwd": bwd.memory_analysis(),
                        "residual_bytes": per_dev, "inflight": self.plan.stages[sp.index].inflight})
        return out


def _state_pairs(prog: StepProgram, args: Sequence[Any], plan: Any) -> dict[int, int]:
    """Optimizer-state leaf → the weight leaf it belongs to (flat input positions): same shape,
    and the weight's tree path ends the state leaf's (``mu['layer0']['w']`` ↔ ``['layer0']['w']``)."""
    dyn = [a for i, a in enumerate(args) if i not in plan.static_argnums]
    paths = [(p[1:], tuple(jax.numpy.shape(x))) for p, x in jax.tree_util.tree_leaves_with_path(dyn)]
    pos = {v: k for k, v in enumerate(prog.jaxpr.invars)}
    weights = [pos[x] for x, m in zip(prog.vag.invars, prog.micro) if x in pos and not m]
    pairs = {}
    for s in prog.state_leaves:
        if s in weights:
            continue
        for w in weights:
            (wp, ws), (sp, ss) = paths[w], paths[s]
            if ws == ss and len(wp) <= len(sp) and sp[len(sp) - len(wp):] == wp:
                pairs[s] = w
                break
    return pairs


def _local_bytes(x: Any) -> float:
    shard = x.sharding.shard_shape(x.shape)
    return float(np.prod(shard, dtype=np.int64) * np.dtype(x.dtype).itemsize)


def _structs(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _split(x: Any, B: int) -> list[Any]:
    n = x.shape[0] // B
    return [x[m * n:(m + 1) * n] for m in range(B)]
