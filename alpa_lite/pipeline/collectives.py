"""The collectives a pipeline plan predicts, stage by stage, in the programs that run them.

A stage runs a forward and a backward program per microbatch (B times a step), a gradient sync
once per step (``accum``: the deferred gradients' all-reduces) and its optimizer update
once per step; activations and their gradients move between stages with ``jax.device_put``.

Per layer (``layer_collectives``), the intra-op plan's collectives (each op's own, and each
resharding edge's, as the one-stage planner lists them) are split by the half of G that runs
them: an op's in the half it belongs to; an edge's in its source's half, except a weight read
again by the backward (resharded there) and the reduction out of a deferred gradient's producer,
which becomes the once-per-step sync of the finished gradient (or, when the stage's
accumulator of that weight cannot stay unreduced, a per-microbatch reduction in the backward).
Per stage (``stage_collectives``) come the resharding between its layers (``reshard`` of the
producer's spec into the reader's, forward, and of the reader's gradient into the producer's
cotangent spec, backward), a value from outside the stage read in several specs (it arrives in
its first reader's), a cotangent arriving from a later stage in its activation's spec and
constrained to the cotangent spec, and the transfers to the neighbours (kind ``send``: the
logical bytes of each tensor, a share of 1/n per device of the sending stage, as the stage DP
charges them). A recomputing stage (``StageSpan.remat``) runs again, in its backward program, each
layer's forward collectives that the residuals depend on (``recomputed``; the resharding between
layers is not repeated: each layer's inputs are saved in the spec it reads them in). Every rule
follows what ``stage`` emits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.pipeline.accum import Deferral, find_deferrals, stacked_accumulators
from alpa_lite.pipeline.program import Layer, tensor_info
from alpa_lite.result.plan import PredictedCollective
from cost_model.resharding import reshard

_OP_RE = re.compile(r"%(\d+) ")


@dataclass(frozen=True)
class LayerCollectives:
    """One layer's predicted collectives by program, and the time deferral moves."""

    fwd: tuple[PredictedCollective, ...] = ()  # per microbatch, forward program
    bwd: tuple[PredictedCollective, ...] = ()  # per microbatch, backward program
    sync: tuple[PredictedCollective, ...] = ()  # once per step: deferred gradients' reductions
    sync_pos: tuple[int, ...] = ()  # G output position (the gradient) of each ``sync`` entry
    deferred: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (G output position, axes A)
    deferred_each_s: tuple[float, ...] = ()  # per ``deferred`` entry: what the ILP charged for its reduction
    sync_s: float = 0.0  # once per step: ``sync``'s time

    @property
    def deferred_s(self) -> float:
        """Per microbatch: the reductions deferral removes from the ILP's time, each exactly as the
        ILP charged it (so the layer's time without them is never negative)."""
        return float(sum(self.deferred_each_s))


def layer_collectives(layer: Layer, lg: Any, layouts: Sequence[Any], out_specs: Sequence[ShardingSpec],
                      collectives: Sequence[PredictedCollective], cluster: Any, sizes: Mapping[str, int],
                      charged_s: Callable[[Deferral], float]) -> LayerCollectives:
    """Split a layer plan's collectives (``assemble_plan``'s, ``where`` naming the ops) into
    forward, backward and once-per-step sync; ``cluster`` is the view's. ``charged_s(d)``: what
    the layer's ILP charged on the edge out of deferral d's producer (its objective prices a
    reduction read by the update without its α, ``intra.problem.update_tail``: the credit for
    deferring it must be that charge, not the collective's full price)."""
    g = lg.graph
    deferred = find_deferrals(layer.diff_in, lg, layouts, out_specs, sizes)
    producers = {d.producer for d in deferred.values()}
    bwd_ops = set(lg.bwd_ops)
    weights = {g.inputs[k] for k in lg.weight_inputs}
    fwd, bwd = [], []
    for c in collectives:
        ids = [int(x) for x in _OP_RE.findall(c.where)]
        edge = "→" in c.where
        src = ids[0] if ids else -1
        if edge and src in producers:
            continue  # the per-microbatch reduction of a deferred gradient
        dst = ids[1] if edge and len(ids) > 1 else None
        weight_src = src >= 0 and g.ops[src].kind == "parameter" and g.ops[src].outputs[0] in weights
        in_bwd = src in bwd_ops or (weight_src and dst in bwd_ops)
        (bwd if in_bwd else fwd).append(c)
    saved = tuple(float(charged_s(d)) for d in deferred.values())
    sync, pos, sync_s = _sync(g, out_specs, deferred, cluster)
    return LayerCollectives(tuple(fwd), tuple(bwd), sync, pos, tuple((p, d.axes) for p, d in deferred.items()),
                            saved, sync_s)


def _sync(g: Any, out_specs: Sequence[ShardingSpec], deferred: dict[int, Deferral],
          cluster: Any) -> tuple[tuple[PredictedCollective, ...], tuple[int, ...], float]:
    """The reduction of each deferred gradient, from its stacked partial into its spec."""
    out, where, total = [], [], 0.0
    for pos, d in deferred.items():
        spec = out_specs[pos]
        t, cs = reshard(ShardingSpec(spec.dims, tuple(d.axes)), spec, g.tensors[g.outputs[pos]], cluster)
        total += t
        out += [PredictedCollective(c.kind, c.axes, c.nbytes, c.group_size,
                                    f"gradient sync: {g.ops[d.producer]} (deferred)") for c in cs]
        where += [pos] * len(cs)
    return tuple(out), tuple(where), total


# ---- a whole plan -------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpan:
    """What ``stage_collectives`` needs of one stage."""

    layers: tuple[int, int]
    view: tuple[int, int]
    num_devices: int
    remat: bool = False
    policy: str = "full"  # when ``remat``: "full" or "dots" (what runs again, ``LayerGraph.reruns``)


def stage_collectives(layers: Sequence[Layer], graphs: Sequence[Any], sols: Sequence[Any],
                      spans: Sequence[StageSpan], num_microbatches: int,
                      view_cluster: Any) -> tuple[PredictedCollective, ...]:
    """Every predicted collective of the plan, tagged with its stage, program and runs per step.

    ``graphs[l]``, ``sols[l]``: layer l's ``LayerGraph`` and ``LayerSolution`` on its stage's
    view; ``view_cluster(view)`` the cluster of a view."""
    B = num_microbatches
    stage_of = [p for p, s in enumerate(spans) for _ in range(s.layers[0], s.layers[1] + 1)]
    made = {v: (li, k) for li, layer in enumerate(layers) for k, v in enumerate(layer.outputs)}
    out: list[PredictedCollective] = []
    for p, span in enumerate(spans):
        vc = view_cluster(span.view)
        mine = range(span.layers[0], span.layers[1] + 1)
        stacked = _stacked(layers, graphs, sols, mine)
        for li in mine:
            lc, tag = sols[li].collectives, f"stage {p} layer {li}"
            out += [_tag(c, p, "fwd", B, tag) for c in lc.fwd]
            out += [_tag(c, p, "bwd", B, tag) for c in lc.bwd]
            if span.remat:
                out += [_tag(c, p, "bwd", B, f"{tag} recomputed")
                        for c in recomputed(graphs[li], lc.fwd, span.policy)]
            for c, pos in zip(lc.sync, lc.sync_pos):  # reduced as they come unless stacked
                kept = _grad_weight(layers[li], graphs[li], pos) in stacked
                out.append(_tag(c, p, "sync", 1, tag) if kept else _tag(c, p, "bwd", B, tag))
        out += _readers(p, layers, graphs, sols, mine, made, vc, B)
        out += _joins(p, layers, sols, stage_of, made, vc, B)
        out += _sends(p, layers, stage_of, made, span.num_devices, B)
    return tuple(out)


def recomputed(lg: Any, fwd: Sequence[PredictedCollective], policy: str = "full") -> list[PredictedCollective]:
    """The forward collectives a recomputation runs again: an op's own when the residuals depend
    on the op, an edge's when it leads from such an op into another or into a backward op
    (``LayerGraph.reruns``, the rule ``layers.forward_time`` prices)."""
    out = []
    for c in fwd:
        ids = [int(x) for x in _OP_RE.findall(c.where)]
        edge = "→" in c.where
        if len(ids) > edge and lg.reruns(ids[0], ids[1] if edge else None, policy):
            out.append(c)
    return out


def _grad_weight(layer: Layer, lg: Any, pos: int) -> Any:
    """The input whose gradient is G output ``pos``."""
    din = [k for k, d in enumerate(layer.diff_in) if d]
    return layer.inputs[din[pos - lg.num_outputs]]


def _stacked(layers: Sequence[Layer], graphs: Sequence[Any], sols: Sequence[Any], mine: range) -> set[Any]:
    """The stage's weights whose accumulator stays unreduced (as ``stage`` decides)."""
    contributions = []
    for li in mine:
        layer, lg = layers[li], graphs[li]
        axes = dict(sols[li].collectives.deferred)
        din = [k for k, d in enumerate(layer.diff_in) if d]
        contributions += [(layer.inputs[k], axes.get(lg.num_outputs + j))
                          for j, k in enumerate(din) if k in lg.weight_inputs]
    return set(stacked_accumulators(contributions))


def _readers(p: int, layers: Sequence[Layer], graphs: Sequence[Any], sols: Sequence[Any], mine: range,
             made: dict[Any, tuple[int, int]], vc: Any, B: int) -> list[PredictedCollective]:
    """A value from outside the stage (weight, microbatch, earlier stage's activation) arrives
    in its first reader's spec; every other reader wanting another spec reshards it, in the
    forward, and a weight again in the backward when that reader's backward reads it."""
    first: dict[Any, ShardingSpec] = {}
    out = []
    for li in mine:
        layer, lg = layers[li], graphs[li]
        for k, var in enumerate(layer.inputs):
            if var in made and made[var][0] in mine:
                continue
            spec = sols[li].in_specs[k]
            src = first.setdefault(var, spec)
            if src == spec:
                continue
            t = tensor_info(var.aval)
            where = f"stage {p} layer {li} input {src} → {spec}"
            out += _reshard(src, spec, t, vc, p, "fwd", B, f"{where} (forward)")
            if k in lg.weight_residuals:
                out += _reshard(src, spec, t, vc, p, "bwd", B, f"{where} (backward)")
    return out


def _tag(c: PredictedCollective, stage: int, phase: str, runs: int, where: str) -> PredictedCollective:
    return replace(c, stage=stage, phase=phase, runs=runs, where=f"{where} {phase}: {c.where}")


def _joins(p: int, layers: Sequence[Layer], sols: Sequence[Any], stage_of: Sequence[int],
           made: dict[Any, tuple[int, int]], vc: Any, B: int) -> list[PredictedCollective]:
    """Resharding where stage p's layers meet: producer → reader inside the stage (and the
    reader's gradient back), and a cotangent from later stages into its cotangent spec."""
    out = []
    for var, readers in _reads(layers).items():
        if var not in made or stage_of[made[var][0]] != p:
            continue
        a, ka = made[var]
        sa, t, diff_a = sols[a], tensor_info(var.aval), layers[a].diff_out[ka]
        ct_spec = sa.in_specs[_ct_pos(layers[a], ka)] if diff_a else None
        for b, kb in readers:
            if stage_of[b] != p:
                continue
            where = f"stage {p} layer {a} → layer {b}"
            src, dst = sa.out_specs[ka], sols[b].in_specs[kb]
            out += _reshard(src, dst, t, vc, p, "fwd", B, f"{where} fwd: activation {src} → {dst}")
            if diff_a and layers[b].diff_in[kb]:
                src = sols[b].out_specs[_grad_pos(layers[b], kb)]
                out += _reshard(src, ct_spec, t, vc, p, "bwd", B, f"{where} bwd: gradient {src} → {ct_spec}")
        if diff_a and any(stage_of[b] != p and layers[b].diff_in[kb] for b, kb in readers):
            src = sa.out_specs[ka]
            out += _reshard(src, ct_spec, t, vc, p, "bwd", B, f"stage {p} layer {a} bwd: cotangent from "
                            f"later stages {src} → {ct_spec}")
    return out


def _reads(layers: Sequence[Layer]) -> dict[Any, list[tuple[int, int]]]:
    """Each variable's readers (layer, input position), in layer order."""
    out: dict[Any, list[tuple[int, int]]] = {}
    for b, layer in enumerate(layers):
        for kb, var in enumerate(layer.inputs):
            out.setdefault(var, []).append((b, kb))
    return out


def _reshard(src: ShardingSpec, dst: ShardingSpec, t: Any, vc: Any, p: int, phase: str, B: int,
             where: str) -> list[PredictedCollective]:
    _, cs = reshard(src, dst, t, vc)
    return [PredictedCollective(c.kind, c.axes, c.nbytes, c.group_size, where, p, phase, B) for c in cs]


def _sends(p: int, layers: Sequence[Layer], stage_of: Sequence[int], made: dict[Any, tuple[int, int]],
           n: int, B: int) -> list[PredictedCollective]:
    """Stage p's transfers per microbatch: its activations to each later stage reading them
    (once per stage), and the gradients of the activations it reads from earlier stages back."""
    out = []
    for var, readers in _reads(layers).items():
        if var not in made:
            continue
        a, ka = made[var]
        nbytes = tensor_info(var.aval).nbytes
        for q in dict.fromkeys(stage_of[b] for b, _ in readers if stage_of[b] != stage_of[a]):
            if stage_of[a] == p:
                out.append(PredictedCollective("send", (), nbytes, n, f"stage {p} → stage {q}: activation "
                                               f"of layer {a}", p, "send", B))
            diff = any(layers[b].diff_in[kb] for b, kb in readers if stage_of[b] == q)
            if q == p and diff and layers[a].diff_out[ka]:
                out.append(PredictedCollective("send", (), nbytes, n, f"stage {p} → stage {stage_of[a]}: "
                                               f"gradient of layer {a}'s activation", p, "send", B))
    return out


def _grad_pos(layer: Layer, k: int) -> int:
    """Position among G's outputs of the gradient of input k."""
    return len(layer.outputs) + sum(layer.diff_in[:k])


def _ct_pos(layer: Layer, k: int) -> int:
    """Position among G's inputs of the cotangent of output k."""
    return len(layer.inputs) + sum(layer.diff_out[:k])


__all__ = ["LayerCollectives", "StageSpan", "layer_collectives", "stage_collectives"]
