"""What every view of a plan shows, computed once: formatted numbers, the tensor rows
(``tensor_rows``), the cost split (``cost_rows``), collective totals, the pipeline's step formula
and the solver and timing lines. The terminal report (``terminal``) and the HTML view (``html``)
both read these, so they never disagree; the cost keeps its split (compute / communication /
resharding / memory) all the way to the reader, as style.md asks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alpa_lite.ir.specs import ShardingSpec

COST_PARTS = ("compute", "communication", "resharding")

def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def _itemsize(dtype: str) -> int | None:
    import numpy as np

    try:
        import ml_dtypes  # bfloat16, float8_*: numpy knows them only through ml_dtypes

        return int(np.dtype(getattr(ml_dtypes, dtype, dtype)).itemsize)
    except (TypeError, ValueError, ImportError):
        return None


def mesh_text(plan: Any) -> str:
    """``x=2 × y=4``."""
    return " × ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape)) or "(no axes)"


def mesh_kind(plan: Any) -> str:
    """Whether the plan holds real devices, an abstract mesh, or came from a file."""
    if plan.mesh is None:
        return "no devices attached (loaded plan)"
    try:
        devices = plan.mesh.devices
    except (AttributeError, ValueError):  # an AbstractMesh has none (its getter raises)
        devices = None
    if devices is None or not hasattr(devices, "flat"):
        return "abstract mesh: planned without devices, nothing runs"
    return f"{devices.size} {devices.flat[0].platform} devices"


@dataclass(frozen=True)
class TensorRow:
    name: str
    dtype: str | None  # None: unknown (outputs of a loaded plan)
    shape: tuple[int, ...] | None
    spec: ShardingSpec
    local_shape: tuple[int, ...] | None
    local_bytes: int | None

    @property
    def type_text(self) -> str:
        return "?" if self.dtype is None or self.shape is None else f"{self.dtype}{list(self.shape)}"

    @property
    def local_text(self) -> str:
        return "" if self.local_shape is None else str(list(self.local_shape))

    @property
    def pspec_text(self) -> str:
        return str(self.spec.to_partition_spec()).replace("PartitionSpec", "P")


def _paths(plan: Any, which: str, n: int, arg_names: Sequence[str] | None) -> list[str]:
    """Tree paths of the flat inputs or outputs: ``params['layer0']['w']`` given ``arg_names``,
    else ``args[0]['layer0']['w']``; outputs ``out[0]['layer0']['w']``."""
    import jax

    if plan.graph is None:
        return [f"{'input' if which == 'in' else 'output'}[{i}]" for i in range(n)]
    tree = jax.tree.unflatten(plan.graph.in_tree if which == "in" else plan.graph.out_tree, list(range(n)))
    out = []
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        text = jax.tree_util.keystr(path)
        if which == "in" and arg_names and path and hasattr(path[0], "idx"):
            i = _dynamic_to_positional(plan, path[0].idx)
            if i < len(arg_names):
                out.append(arg_names[i] + jax.tree_util.keystr(path[1:]))
                continue
        out.append(("out" if which == "out" else "args") + text)
    return out


def _dynamic_to_positional(plan: Any, k: int) -> int:
    """The k-th dynamic argument's position among all arguments (static ones skipped)."""
    dyn = [i for i in range(max(plan.num_args, k + 1 + len(plan.static_argnums)))
           if i not in plan.static_argnums]
    return dyn[k] if k < len(dyn) else k


def tensor_rows(plan: Any, which: str = "in", arg_names: Sequence[str] | None = None) -> list[TensorRow]:
    """One row per flat input (``"in"``) or output (``"out"``): name, type, spec, per-device piece."""
    specs = plan.input_specs if which == "in" else plan.output_specs
    if which == "in":
        types: list[tuple[Any, Any]] = [(tuple(s), d) for s, d in plan.signature]
    elif plan.graph is not None:
        types = [(plan.graph.tensors[t].shape, plan.graph.tensors[t].dtype) for t in plan.graph.outputs]
    else:
        types = [(None, None)] * len(specs)
    sizes = dict(zip(plan.axis_names, plan.mesh_shape))
    rows = []
    for name, (shape, dtype), spec in zip(_paths(plan, which, len(specs), arg_names), types, specs):
        local = nbytes = None
        if shape is not None and spec.rank == len(shape) and all(a in sizes for a in spec.axes_used()):
            local = spec.local_shape(shape, sizes)
            item = _itemsize(str(dtype))
            nbytes = None if item is None else math.prod(local) * item
        rows.append(TensorRow(name, None if dtype is None else str(dtype), shape, spec, local, nbytes))
    return rows


def cost_rows(plan: Any) -> list[tuple[str, float]]:
    c = plan.cost
    return [("compute", c.compute_s), ("communication", c.communication_s), ("resharding", c.resharding_s)]


def memory_capacity(plan: Any) -> float | None:
    """Bytes per device of the cluster the plan was made for (the default memory budget)."""
    try:
        return float(plan.cluster["device"]["memory"])
    except (KeyError, TypeError, ValueError):
        return None


def collective_totals(plan: Any) -> dict[str, tuple[int, float]]:
    """``{kind: (count, wire bytes per device)}`` of the predicted collectives."""
    out: dict[str, tuple[int, float]] = {}
    for c in plan.collectives:
        n, wb = out.get(c.kind, (0, 0.0))
        out[c.kind] = (n + getattr(c, "runs", 1), wb + c.wire_bytes())  # a pipeline's: runs per step
    return out


def cluster_text(plan: Any) -> str:
    cl = plan.cluster or {}
    dev = cl.get("device", {}) or {}
    parts = [str(cl.get("name", "?"))]
    if dev.get("name"):
        parts.append(f"({dev['name']}, {cl.get('devices_per_host', '?')} per host)")
    return " ".join(parts)


def pipeline_of(plan: Any) -> Any:
    """The plan's ``PipelineInfo`` when it has several stages, else None."""
    return getattr(plan, "pipeline", None)


def step_time(plan: Any) -> float:
    """Predicted seconds per training step: the pipeline's T when pipelined."""
    p = pipeline_of(plan)
    return float(p.step_s) if p is not None else plan.cost.total_s


def pipeline_text(plan: Any) -> str:
    """``T = Σ t_i + (B − 1)·max t_i + max u_i`` with the plan's numbers (design.md, stage DP)."""
    p = pipeline_of(plan)
    t = [getattr(s, "t_s", 0.0) for s in plan.stages]
    u = max((getattr(s, "u_s", 0.0) for s in plan.stages), default=0.0)
    text = (f"pipeline: {len(plan.stages)} stages, B = {p.num_microbatches} microbatches, {p.schedule} schedule, "
            f"bubble {p.bubble_fraction:.1%}\n  T = Σ t_i + (B − 1)·max t_i + max u_i = {fmt_s(sum(t))} + "
            f"{p.num_microbatches - 1}·{fmt_s(max(t, default=0.0))} + {fmt_s(u)} = {fmt_s(p.step_s)}")
    if getattr(p, "one_stage_s", None):
        text += f"; the best one-stage plan: {fmt_s(p.one_stage_s)} ({p.one_stage_s / p.step_s:.2f}×)"
    elif getattr(p, "one_stage_bound_s", None):
        text += (f"; one stage: at least {fmt_s(p.one_stage_bound_s)} ({p.one_stage_bound_s / p.step_s:.2f}×, "
                 "its ILP's LP bound, not searched)")
    return text + "\n  " + remat_summary(plan)


def remat_text(stage: Any) -> str:
    """A pipeline stage's recomputation choice: what it costs (forward time run again per
    microbatch) and saves (bytes per device held per microbatch in flight), or "keeps"."""
    if not getattr(stage, "remat", False):
        return "keeps"
    how = " all but matmul outputs (dots)" if getattr(stage, "remat_policy", "full") == "dots" else ""
    return (f"recomputes{how}: +{fmt_s(stage.remat_extra_s)}/microbatch, "
            f"holds {fmt_bytes(stage.remat_saved_bytes)}/microbatch less")


def remat_summary(plan: Any) -> str:
    """One line on which stages recompute their activations, for a pipeline plan ("" if none)."""
    rows = [f"stage {i} (layers {s.layers[0]}..{s.layers[1]}) {remat_text(s)}"
            for i, s in enumerate(plan.stages) if getattr(s, "remat", False)]
    if pipeline_of(plan) is None:
        return ""
    return "recomputation: " + ("\n    ".join(["", *rows]) if rows else "none (every stage keeps its activations)")


def solver_text(plan: Any) -> str:
    s = plan.solver
    text = (f"{s.status} · objective {fmt_s(s.objective)} · bound {fmt_s(s.bound)} · gap {s.gap:.2%} · "
            f"{s.variables} variables, {s.constraints} constraints · {s.wall_s:.2f} s")
    if s.nodes:  # the model's size on the way (older plan files and pipelines do not say)
        tied = f" → {s.tied_classes:,} tied classes" if s.tied_classes else ""
        solves = f" · {s.solves} solves (memory budget)" if s.solves > 1 else ""
        text += f" · {s.nodes:,} nodes → {s.leaders:,} after merging{tied}{solves}"
    return text + (f" ({s.note})" if s.note else "")


def timings_text(plan: Any) -> str:
    t = dict(plan.timings)
    total = t.pop("total_s", None)
    parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in t.items())
    return (f"{total:.2f} s ({parts})" if total is not None else parts) or "not recorded"


_POLICY_WORDS = {"keep": "keep (activations held)", "dots": "dots (all but matmul outputs recomputed)",
                 "full": "full (forward recomputed)"}


def layer_remat_text(plan: Any) -> str:
    """A one-stage plan's recomputation per layer, what the recomputed ops cost (FLOPs run again)
    and what the memory budget took (the plan keeping everything with no budget); "" if none."""
    info = getattr(plan, "layer_remat", None)
    if info is None:
        return ""
    runs: list[tuple[int, int, str]] = []
    for k, p in enumerate(info.policies):
        if runs and runs[-1][2] == p:
            runs[-1] = (runs[-1][0], k, p)
        else:
            runs.append((k, k, p))
    parts = [f"layer{'s' if a != b else ''} {a}{f'..{b}' if a != b else ''}: {_POLICY_WORDS[p]}" for a, b, p in runs]
    text = "recomputation: " + "; ".join(parts)
    if info.recomputes:
        text += f"\n  the backward pass runs {info.recomputed_flops:.4g} FLOPs of the forward again"
    if info.unbounded_s is not None and info.recomputes:
        text += (f"\n  keeping every activation with no memory budget: {fmt_s(info.unbounded_s)} and "
                 f"{fmt_bytes(info.unbounded_peak_bytes or 0.0)} per device; this plan: {fmt_s(plan.cost.total_s)} "
                 f"and {fmt_bytes(plan.cost.peak_memory_bytes)}")
    return text
