"""Human-readable views of a plan: a terminal report (rich), its plain-text form, and a comparison
of methods and a check report for the CLI. The HTML view (Jupyter) is in ``report_html``.

Every view reads the same rows (``tensor_rows``, ``cost_rows``), so the terminal, the text
summary and the notebook never disagree. The cost keeps its split (compute / communication /
resharding / memory) all the way to the reader, as style.md asks.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from alpa_lite.ir.specs import ShardingSpec

COST_PARTS = ("compute", "communication", "resharding")


# ---- formatting -------------------------------------------------------------------------
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


# ---- rows shared by every view ----------------------------------------------------------
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


# ---- terminal (rich) ---------------------------------------------------------------------
def _table(title: str, *columns: str, right: Sequence[str] = ()) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
              pad_edge=False, show_edge=False)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left",
                     overflow="ellipsis", no_wrap=c in ("where", "tensor", "type", "sharding", "per device"))
    return t


def _bar(frac: float, width: int = 30) -> str:
    full = max(0, min(width, round(frac * width)))
    return "█" * full + ("▏" if full == 0 and frac > 0 else "")


def _header(plan: Any) -> Text:
    t = Text()
    t.append("alpa-lite plan", style="bold")
    t.append(f" · method {plan.method} · mesh {mesh_text(plan)} ({math.prod(plan.mesh_shape)} devices)\n")
    t.append(f"cluster {cluster_text(plan)} · {mesh_kind(plan)}\n")
    t.append(f"predicted step {fmt_s(step_time(plan))} · peak memory {fmt_bytes(plan.cost.peak_memory_bytes)} "
             "per device", style="bold")
    if pipeline_of(plan) is not None:
        t.append("\n" + pipeline_text(plan))
    return t


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
    return text


def _cost_table(plan: Any) -> Table:
    t = _table("Predicted cost per step", "part", "time", "share", "", right=("time", "share"))
    total = plan.cost.total_s
    for name, v in cost_rows(plan):
        frac = v / total if total > 0 else 0.0
        t.add_row(name, fmt_s(v), f"{frac:.1%}", Text(_bar(frac), style="cyan"))
    t.add_row(Text("total", style="bold"), Text(fmt_s(total), style="bold"), "", "")
    cap = memory_capacity(plan)
    mem = fmt_bytes(plan.cost.peak_memory_bytes)
    if cap:
        frac = plan.cost.peak_memory_bytes / cap
        t.add_row("memory/device", mem, f"{frac:.1%}", Text(_bar(frac), style="magenta") + f" of {fmt_bytes(cap)}")
    else:
        t.add_row("memory/device", mem, "", "")
    return t


def _tensor_table(title: str, rows: Sequence[TensorRow]) -> Table:
    t = _table(title, "#", "tensor", "type", "sharding", "per device", "bytes/device",
               right=("#", "bytes/device"))
    for i, r in enumerate(rows):
        t.add_row(str(i), r.name, r.type_text, r.pspec_text, r.local_text,
                  "" if r.local_bytes is None else fmt_bytes(r.local_bytes))
    return t


def _outputs(plan: Any) -> list[RenderableType]:
    """Outputs, leaving out those typed and sharded as the input at the same tree path (a
    training step's new state): listing them again would say nothing new."""
    outs = tensor_rows(plan, "out")
    if plan.graph is None:
        other = outs
    else:
        same = {(r.name.removeprefix("args"), r.type_text, r.pspec_text) for r in tensor_rows(plan, "in")}
        other = [r for r in outs if (r.name.removeprefix("out"), r.type_text, r.pspec_text) not in same]
    n_same = len(outs) - len(other)
    title = f"Outputs ({len(outs)}"
    title += f"; {n_same} as the input at the same path, not repeated)" if n_same else ")"
    if not other:
        return [Text(title, style="bold")]
    return [_tensor_table(title, other)]


def _stages_table(plan: Any) -> Table:
    if pipeline_of(plan) is None:
        t = _table(f"Stages ({len(plan.stages)})", "stage", "layers", "sub-mesh", "devices", "time", "memory",
                   right=("time", "memory"))
        for i, st in enumerate(plan.stages):
            t.add_row(str(i), layer_text(st), "×".join(map(str, st.submesh)), _device_range(st.devices),
                      fmt_s(st.cost_s), fmt_bytes(st.memory_bytes))
        return t
    t = _table(f"Stages ({len(plan.stages)})", "stage", "layers", "sub-mesh", "view dp×tp", "devices",
               "t_i/microbatch", "u_i/step", "memory", "in flight",
               right=("t_i/microbatch", "u_i/step", "memory", "in flight"))
    for i, st in enumerate(plan.stages):
        t.add_row(str(i), layer_text(st), "×".join(map(str, st.submesh)), "×".join(map(str, st.view)),
                  _device_range(st.devices), fmt_s(st.t_s), fmt_s(st.u_s), fmt_bytes(st.memory_bytes),
                  str(st.inflight))
    return t


def layer_text(stage: Any) -> str:
    a, b = stage.layers
    return f"{a}" if a == b else f"{a}..{b}"


def _device_range(devices: Sequence[int]) -> str:
    d = list(devices)
    if d and d == list(range(d[0], d[-1] + 1)) and len(d) > 2:
        return f"{d[0]}–{d[-1]}"
    return ",".join(map(str, d))


def _collectives_table(plan: Any, max_rows: int) -> RenderableType:
    totals = collective_totals(plan)
    title = (f"Predicted collectives ({len(plan.collectives)}; "
             f"{fmt_bytes(plan.predicted_wire_bytes)} sent per device)")
    if not plan.collectives:
        return Text(title + ": none", style="bold")
    t = _table(title, "kind", "axes", "group", "buffer", "wire bytes", "where",
               right=("group", "buffer", "wire bytes"))
    for c in plan.collectives[:max_rows]:
        t.add_row(c.kind, ",".join(c.axes), str(c.group_size), fmt_bytes(c.nbytes), fmt_bytes(c.wire_bytes()),
                  c.where)
    if len(plan.collectives) > max_rows:
        t.add_row("…", f"{len(plan.collectives) - max_rows} more", "", "", "", "(--all shows every one)")
    by_kind = ", ".join(f"{k} ×{n} ({fmt_bytes(wb)})" for k, (n, wb) in totals.items())
    return Group(t, Text(f"  by kind: {by_kind}"))


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


def plan_renderable(plan: Any, *, arg_names: Sequence[str] | None = None, max_rows: int = 20) -> Group:
    """The terminal report: header, cost, inputs, outputs, stages, collectives, solver, time."""
    inputs = tensor_rows(plan, "in", arg_names)
    parts: list[RenderableType] = [_header(plan), Text(""), _cost_table(plan), Text(""),
                                   _tensor_table(f"Inputs ({len(inputs)})", inputs), Text(""),
                                   *_outputs(plan), Text(""), _stages_table(plan), Text(""),
                                   _collectives_table(plan, max_rows), Text("")]
    parts.append(Text.assemble(("Solver: ", "bold"), solver_text(plan)))
    parts.append(Text.assemble(("Planning time: ", "bold"), timings_text(plan)))
    parts += [Text(f"warning: {w}", style="yellow") for w in plan.warnings]
    return Group(*parts)


def to_text(renderable: RenderableType, width: int = 110) -> str:
    """Plain text of a rich renderable (no colour, no escape codes)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, force_jupyter=False,
            highlight=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def plan_summary(plan: Any, arg_names: Sequence[str] | None = None) -> str:
    """``plan.summary()``: the terminal report as plain text."""
    return to_text(plan_renderable(plan, arg_names=arg_names, max_rows=20))


def plan_html(plan: Any) -> str:
    """``plan._repr_html_()``: see ``alpa_lite.report.html``."""
    from alpa_lite.report.html import plan_html as _plan_html

    return _plan_html(plan)


# ---- methods side by side -----------------------------------------------------------------
class Comparison:
    """Plans of one program by several methods, side by side (``alpa-lite compare``, notebooks).

    ``plans`` maps a method to its ``Plan``, or to an error message when that method failed.
    """

    def __init__(self, plans: Mapping[str, Any]):
        self.plans = dict(plans)

    @property
    def best(self) -> str | None:
        ok = {m: p for m, p in self.plans.items() if not isinstance(p, str)}
        return min(ok, key=lambda m: ok[m].cost.total_s) if ok else None

    def rows(self) -> list[dict[str, Any]]:
        """Per method: predicted time and its parts, memory, wire bytes, collectives, solver."""
        ref = self.plans.get("auto")
        ref_t = None if ref is None or isinstance(ref, str) else ref.cost.total_s
        out = []
        for m, p in self.plans.items():
            if isinstance(p, str):
                out.append({"method": m, "error": p})
                continue
            c = p.cost
            out.append({"method": m, "total_s": c.total_s, "compute_s": c.compute_s,
                        "communication_s": c.communication_s, "resharding_s": c.resharding_s,
                        "memory_bytes": c.peak_memory_bytes, "wire_bytes": p.predicted_wire_bytes,
                        "collectives": len(p.collectives), "status": p.solver.status,
                        "vs_auto": c.total_s / ref_t if ref_t else None})
        return out

    def __rich__(self) -> Table:
        any_plan = next((p for p in self.plans.values() if not isinstance(p, str)), None)
        title = "Methods compared" + (f" on mesh {mesh_text(any_plan)}, cluster {cluster_text(any_plan)}"
                                      if any_plan is not None else "")
        t = _table(title, "method", "step", "compute", "comm.", "resharding", "memory/dev",
                   "wire/dev", "colls", "vs auto", "solver",
                   right=("step", "compute", "comm.", "resharding", "memory/dev", "wire/dev", "colls", "vs auto"))
        t.columns[0].no_wrap, t.columns[0].overflow = True, "fold"
        best = self.best
        for r in self.rows():
            if "error" in r:
                t.add_row(r["method"], Text(f"failed: {r['error']}", style="red"), *[""] * 8)
                continue
            style = "bold green" if r["method"] == best else None
            t.add_row(Text(r["method"] + (" ★" if r["method"] == best else ""), style=style or ""),
                      fmt_s(r["total_s"]), fmt_s(r["compute_s"]), fmt_s(r["communication_s"]),
                      fmt_s(r["resharding_s"]), fmt_bytes(r["memory_bytes"]), fmt_bytes(r["wire_bytes"]),
                      str(r["collectives"]), "" if r["vs_auto"] is None else f"{r['vs_auto']:.2f}×", r["status"])
        return t

    def __str__(self) -> str:
        return to_text(self, width=140)

    __repr__ = __str__  # the table, also as a notebook's plain-text output

    def _repr_html_(self) -> str:
        from alpa_lite.report.html import comparison_html

        return comparison_html(self)


# ---- predicted vs compiled ------------------------------------------------------------------
def check_renderable(report: Any, plan: Any) -> Group:
    """``alpa-lite check``: predicted beside compiled collectives, memory and FLOPs per device."""
    flagged_kinds = {r.kind for r in report.rows if r.relative_error > report.tolerance}
    t = _table(f"Predicted vs compiled on mesh {mesh_text(plan)} (per device)", "", "predicted", "compiled",
               "difference", right=("predicted", "compiled", "difference"))
    for r in report.rows:
        mark = Text(f"{_rel(r.predicted_wire_bytes, r.compiled_wire_bytes)} !", style="bold red") \
            if r.kind in flagged_kinds else Text(_rel(r.predicted_wire_bytes, r.compiled_wire_bytes), style="green")
        t.add_row(r.kind, f"{r.predicted_count}× {fmt_bytes(r.predicted_wire_bytes)}",
                  f"{r.compiled_count}× {fmt_bytes(r.compiled_wire_bytes)}", mark)
    t.add_row(Text("wire bytes, total", style="bold"), fmt_bytes(report.predicted_wire_bytes),
              fmt_bytes(report.compiled_wire_bytes), _rel(report.predicted_wire_bytes, report.compiled_wire_bytes))
    # Memory and FLOPs are shown, not flagged: XLA's buffer reuse and its FLOP counting of
    # element-wise ops differ from the model's by design; a large difference is coloured.
    t.add_row("memory", fmt_bytes(report.predicted_memory_bytes), fmt_bytes(report.compiled.memory_bytes),
              _rel_text(report.predicted_memory_bytes, report.compiled.memory_bytes, report.tolerance))
    flops = _predicted_flops(plan)
    t.add_row("FLOPs" + (" (total ÷ devices)" if flops is not None else ""),
              "" if flops is None else f"{flops:,.0f}", f"{report.compiled.flops:,.0f}",
              "" if flops is None else _rel_text(flops, report.compiled.flops, report.tolerance))
    parts: list[RenderableType] = [t]
    if getattr(report, "stages", None):  # a pipeline: each stage's programs against its prediction
        parts.append(_stage_check_table(report))
    if report.flagged:
        parts += [Text(f"! {f}", style="bold red") for f in report.flagged]
    else:
        parts.append(Text(f"✓ compiled collectives match the prediction (within {report.tolerance:.0%}); "
                          "no XLA warnings", style="green"))
    return Group(*parts)


def _stage_check_table(report: Any) -> Table:
    t = _table("Per stage, per device per step (forward and backward × microbatches, sync and update once)",
               "stage", "devices", "predicted", "compiled", "difference", "transfers", "memory",
               right=("predicted", "compiled", "difference", "transfers", "memory"))
    for s in report.stages:
        t.add_row(str(s.stage), _device_range(s.devices), fmt_bytes(s.predicted_wire_bytes),
                  fmt_bytes(s.compiled_wire_bytes),
                  _rel_text(s.predicted_wire_bytes, s.compiled_wire_bytes, report.tolerance),
                  f"{fmt_bytes(s.predicted_send_bytes)} / {fmt_bytes(s.moved_send_bytes)}",
                  f"{fmt_bytes(s.predicted_memory_bytes)} / {fmt_bytes(s.compiled_memory_bytes)}")
    return t


def _rel(pred: float, got: float) -> str:
    if got == 0 and pred == 0:
        return "="
    return f"{(pred - got) / max(abs(got), 1.0):+.1%}"


def _rel_text(pred: float, got: float, tolerance: float) -> Text:
    off = abs(pred - got) / max(abs(got), 1.0)
    return Text(_rel(pred, got), style="yellow" if off > tolerance else "green")


def _predicted_flops(plan: Any) -> float | None:
    if plan.graph is None:
        return None
    return float(plan.graph.total_flops) / max(math.prod(plan.mesh_shape), 1)
