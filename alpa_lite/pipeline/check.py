"""``plan.check`` of a pipeline: each stage's compiled programs against its predicted collectives.

A stage compiles to a forward and a backward program (each run once per microbatch, B times a
step), a gradient sync (the stacked accumulators reduced, once per step) and its optimizer update
(once per step); the step's equations before the loss and an update that mixes stages run on the
whole mesh. Every program is lowered from abstract arguments (shapes and the shardings the runner
gives them: the forward's outputs lowered first, so the backward sees the residuals' real
shardings) and compiled, nothing runs. Per stage the report sets the predicted collectives of the
stage (``plan.collectives`` with that ``stage``; per-microbatch ones × B) beside the compiled
ones (each program's × its runs per step), by kind, in wire bytes per device per step; and the
transfers the plan predicts (``send``) beside the bytes the runner moves between the stages'
sub-meshes (its activations to later stages and gradients back, per its data flow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from alpa_lite.measure.check import KindRow, WireTotals, relative_error
from alpa_lite.measure.hlo_stats import CompiledStats, stats_of
from alpa_lite.pipeline.update import Segment


@dataclass(frozen=True)
class ProgramCheck:
    """One compiled program of a stage, run ``runs`` times per step."""

    name: str
    runs: int
    stats: CompiledStats

    @property
    def wire_bytes(self) -> float:
        return self.runs * self.stats.wire_bytes


@dataclass(frozen=True)
class StageCheck:
    stage: int
    devices: tuple[int, ...]
    programs: tuple[ProgramCheck, ...]
    rows: tuple[KindRow, ...]  # per step
    predicted_wire_bytes: float  # per device per step
    predicted_send_bytes: float  # per device per step (the stage's share of its transfers)
    moved_send_bytes: float  # what the runner moves from this stage per step, per device
    predicted_memory_bytes: float
    compiled_memory_bytes: float  # max over forward/backward + the other in-flight residuals
    tolerance: float = 0.10
    slack_bytes: float = 1024.0  # absolute allowance: scalars XLA reduces that no plan names

    @property
    def compiled_wire_bytes(self) -> float:
        return float(sum(p.wire_bytes for p in self.programs))

    @property
    def wire_error(self) -> float:
        return relative_error(self.predicted_wire_bytes, self.compiled_wire_bytes)

    @property
    def wire_ok(self) -> bool:
        return abs(self.predicted_wire_bytes - self.compiled_wire_bytes) <= (
            self.tolerance * self.compiled_wire_bytes + self.slack_bytes)

    @property
    def flagged(self) -> list[str]:
        out = []
        if not self.wire_ok:
            out.append(f"stage {self.stage}: predicted {self.predicted_wire_bytes:,.0f} B per device per "
                       f"step, compiled {self.compiled_wire_bytes:,.0f} B ({self.wire_error:.1%} off)")
        if abs(self.predicted_send_bytes - self.moved_send_bytes) > 1e-6 * max(self.moved_send_bytes, 1.0):
            out.append(f"stage {self.stage}: transfers predicted {self.predicted_send_bytes:,.0f} B, the "
                       f"runner moves {self.moved_send_bytes:,.0f} B per device per step")
        out += [f"stage {self.stage} {p.name}: XLA: {w}" for p in self.programs for w in p.stats.warnings]
        return out

    def __str__(self) -> str:
        lines = [f"stage {self.stage} (devices {','.join(map(str, self.devices))}): per device per step"]
        lines += [f"  {p.name:<8}{p.runs:>3}× {p.stats.wire_bytes:>12,.0f} B  {p.stats.summary()}"
                  for p in self.programs]
        lines += [f"  {r.kind:<20}predicted {r.predicted_count:>4}× {r.predicted_wire_bytes:>12,.0f} B   "
                  f"compiled {r.compiled_count:>4}× {r.compiled_wire_bytes:>12,.0f} B" for r in self.rows]
        lines.append(f"  {'wire bytes':<20}predicted {self.predicted_wire_bytes:>18,.0f} B   compiled "
                     f"{self.compiled_wire_bytes:>18,.0f} B  ({self.wire_error:.1%} off)")
        lines.append(f"  {'transfers (send)':<20}predicted {self.predicted_send_bytes:>18,.0f} B   moved "
                     f"{self.moved_send_bytes:>21,.0f} B")
        lines.append(f"  {'memory':<20}predicted {self.predicted_memory_bytes:>18,.0f} B   compiled "
                     f"{self.compiled_memory_bytes:>18,.0f} B")
        return "\n".join(lines)


@dataclass(frozen=True)
class PipelineCheckReport(WireTotals):
    """Per stage, and the plan's totals in the shape of ``check.CheckReport`` (its ``rows``,
    ``compiled``, ``flagged``) so that reports print it alike."""

    stages: tuple[StageCheck, ...]
    whole_mesh: tuple[ProgramCheck, ...]  # before the loss; an update mixing stages
    rows: tuple[KindRow, ...]
    predicted_wire_bytes: float
    compiled: CompiledStats  # every stage's programs × runs; memory: the largest stage's
    predicted_memory_bytes: float
    tolerance: float = 0.10

    @property
    def flagged(self) -> list[str]:
        out = [f for s in self.stages for f in s.flagged]
        out += [f"whole mesh {p.name}: compiled {p.wire_bytes:,.0f} B, predicted none"
                for p in self.whole_mesh if p.wire_bytes > 0]
        out += [f"whole mesh {p.name}: XLA: {w}" for p in self.whole_mesh for w in p.stats.warnings]
        return out

    @property
    def ok(self) -> bool:
        return not self.flagged

    def __str__(self) -> str:
        lines = [str(s) for s in self.stages]
        lines += [f"whole mesh {p.name}: {p.runs}× {p.stats.summary()}" for p in self.whole_mesh]
        lines.append(f"total: predicted {self.predicted_wire_bytes:,.0f} B, compiled "
                     f"{self.compiled_wire_bytes:,.0f} B per device per step (summed over stages)")
        lines += [f"  ! {f}" for f in self.flagged]
        return "\n".join(lines)


def check_pipeline(plan: Any, fn: Callable[..., Any], *args: Any) -> PipelineCheckReport:
    runner = plan.compile(fn)
    runner.build(args)
    B = plan.pipeline.num_microbatches
    stages = tuple(_check_stage(plan, runner, p, B) for p in range(len(runner.stages)))
    whole = _whole_mesh(runner)
    rows = _merge_rows([s.rows for s in stages])
    stats = [st for s in stages for p in s.programs for st in [p.stats] * p.runs]
    stats += [p.stats for p in whole]
    compiled = _aggregate(stats, stages, plan)
    pred = sum(s.predicted_wire_bytes for s in stages)
    return PipelineCheckReport(stages, whole, rows, pred, compiled,
                               max(s.predicted_memory_bytes for s in stages))


def _struct(shape: Sequence[int], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _var(v: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return _struct(v.aval.shape, v.aval.dtype, sharding)


def stage_examples(runner: Any, p: int) -> dict[str, tuple[Any, ...]]:
    """Abstract arguments of stage p's programs: {"fwd": ..., "bwd": ..., "reduce": ...}."""
    sp = runner.stages[p]
    w = [_var(v, sp.sharding(v)) for v in sp.weights]
    data = [_var(v, sp.sharding(v)) for v in sp.data]
    acts = [_var(v, sp.sharding(v)) for v in sp.acts_in]
    fwd = sp.fwd.lower(w, data, acts)
    shapes = jax.eval_shape(sp.fwd, w, data, acts)
    shard = fwd.compile().output_shardings
    outs = jax.tree.map(lambda s, h: _struct(s.shape, s.dtype, h), shapes, shard)
    act_out = dict(zip(sp.acts_out, outs[0]))
    cts = [act_out[v] for v in sp.ct_in]
    accums = [sp.accum_struct(v) for v in sp.accums]
    ex = {"fwd": (w, data, acts), "bwd": (w, outs[1], cts, accums)}
    if sp.stacked:
        pos = {v: k for k, v in enumerate(sp.accums)}
        ex["reduce"] = ([accums[pos[v]] for v in sp.stacked],)
    return ex


def _check_stage(plan: Any, runner: Any, p: int, B: int) -> StageCheck:
    sp, info = runner.stages[p], plan.stages[p]
    ex = stage_examples(runner, p)
    progs = [ProgramCheck("fwd", B, stats_of(sp.fwd, *ex["fwd"])),
             ProgramCheck("bwd", B, stats_of(sp.bwd, *ex["bwd"]))]
    if "reduce" in ex:
        progs.append(ProgramCheck("sync", 1, stats_of(sp.reduce, *ex["reduce"])))
    if runner.update.per_stage is not None:
        seg, shard = runner.update.per_stage[p]
        if seg.outputs:
            progs.append(ProgramCheck("update", 1, _segment_stats(seg, shard)))
    mine = [c for c in plan.collectives if c.stage == p]
    colls = [c for c in mine if c.kind != "send"]
    rows = _rows(colls, progs)
    mem = _compiled_memory(progs, ex, info.inflight)
    return StageCheck(p, tuple(info.devices), tuple(progs), rows, float(sum(c.wire_bytes() for c in colls)),
                      float(sum(c.wire_bytes() for c in mine if c.kind == "send")),
                      _moved(runner, p, B), float(info.memory_bytes), mem)


def _segment_stats(seg: Segment, shardings: Sequence[Any]) -> CompiledStats:
    return stats_of(seg.fn, *[_var(v, s) for v, s in zip(seg.inputs, shardings)])


def _rows(colls: Sequence[Any], progs: Sequence[ProgramCheck]) -> tuple[KindRow, ...]:
    pred: dict[str, tuple[int, float]] = {}
    for c in colls:
        n, wb = pred.get(c.kind, (0, 0.0))
        pred[c.kind] = (n + c.runs, wb + c.wire_bytes())
    comp: dict[str, tuple[int, float]] = {}
    for prog in progs:
        for k, (n, wb) in prog.stats.by_kind().items():
            m, wb0 = comp.get(k, (0, 0.0))
            comp[k] = (m + n * prog.runs, wb0 + wb * prog.runs)
    return tuple(KindRow(k, *pred.get(k, (0, 0.0)), *comp.get(k, (0, 0.0))) for k in sorted(set(pred) | set(comp)))


def _merge_rows(per_stage: Sequence[Sequence[KindRow]]) -> tuple[KindRow, ...]:
    tot: dict[str, list[float]] = {}
    for rows in per_stage:
        for r in rows:
            acc = tot.setdefault(r.kind, [0, 0.0, 0, 0.0])
            acc[0] += r.predicted_count
            acc[1] += r.predicted_wire_bytes
            acc[2] += r.compiled_count
            acc[3] += r.compiled_wire_bytes
    return tuple(KindRow(k, int(a[0]), a[1], int(a[2]), a[3]) for k, a in sorted(tot.items()))


def _compiled_memory(progs: Sequence[ProgramCheck], ex: dict[str, Any], inflight: int) -> float:
    """The larger of forward and backward, plus the residuals of the other microbatches a stage
    holds meanwhile (as ``PipelineRunner.compiled_memory`` and the memory test count it). For a
    recomputing stage those are what its forward saves, its layers' inputs, and its backward's
    temporaries hold the recomputed residuals: the same terms as the stage DP's remat memory."""
    res = ex["bwd"][1]
    per_mb = sum(_local_bytes(r) for r in jax.tree.leaves(res))
    peak = max(p.stats.memory_bytes for p in progs if p.name in ("fwd", "bwd"))
    return float(peak + (inflight - 1) * per_mb)


def _local_bytes(x: Any) -> float:
    return float(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize)


def _moved(runner: Any, p: int, B: int) -> float:
    """Bytes per device per step the runner sends from stage p to other sub-meshes: each
    activation once per later stage reading it, each activation gradient back once."""
    sp = runner.stages[p]
    later = [q for q in runner.stages if q.index != p]
    sent = sum(_nbytes(v) for v in sp.acts_out for q in later if v in q.acts_in)
    sent += sum(_nbytes(v) for v in sp.ct_out)
    return B * sent / len(sp.mesh.devices.flat)


def _nbytes(v: Any) -> float:
    return float(np.prod(v.aval.shape, dtype=np.int64) * np.dtype(v.aval.dtype).itemsize)


def _whole_mesh(runner: Any) -> tuple[ProgramCheck, ...]:
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(runner.full_mesh, PartitionSpec())
    out = []
    prog = runner.prog
    if prog.pre_eqns:
        later = set(prog.jaxpr.outvars) | set(prog.vag.invars) | {x for e in prog.post_eqns for x in e.invars}
        pre = Segment(prog.pre_eqns, [v for e in prog.pre_eqns for v in e.outvars if v in later])
        if pre.outputs:
            out.append(ProgramCheck("pre", 1, _segment_stats(pre, [rep] * len(pre.inputs))))
    seg = runner.update.global_segment
    if seg is not None and seg.outputs:
        out.append(ProgramCheck("update", 1, _segment_stats(seg, [rep] * len(seg.inputs))))
    return tuple(out)


def _aggregate(stats: Sequence[CompiledStats], stages: Sequence[StageCheck], plan: Any) -> CompiledStats:
    """Every collective run per step; FLOPs per device averaged over the cluster (a stage's
    devices run its programs); memory the largest stage's."""
    n = max(plan.num_devices, 1)
    flops = sum(len(s.devices) * sum(p.runs * p.stats.flops for p in s.programs) for s in stages) / n
    warns = tuple(w for st in stats for w in st.warnings)
    mem = max(s.compiled_memory_bytes for s in stages)
    return CompiledStats(tuple(c for st in stats for c in st.collectives), float(flops), int(mem),
                         0, 0, 0, 0, warns)


__all__ = ["PipelineCheckReport", "ProgramCheck", "StageCheck", "check_pipeline", "stage_examples"]
