"""The terminal views of a plan (rich): the plan report and its plain-text form
(``plan.summary()``), a comparison of methods (``Comparison``, also as HTML in a notebook) and the
check report, for the CLI. They read their rows from ``rows``, as the HTML view (``html``) does.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from alpa_lite.report.html import comparison_html
from alpa_lite.report.rows import (
    TensorRow,
    cluster_text,
    collective_totals,
    cost_rows,
    fmt_bytes,
    fmt_s,
    layer_remat_text,
    memory_capacity,
    mesh_kind,
    mesh_text,
    pipeline_of,
    pipeline_text,
    solver_text,
    step_time,
    tensor_rows,
    timings_text,
)


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
    if pipeline_of(plan) is None:  # a pipeline's stage costs do not keep the HBM part apart
        t.append(f" · bound by {plan.cost.bound}")
    if pipeline_of(plan) is not None:
        t.append("\n" + pipeline_text(plan))
    return t


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
               "t_i/microbatch", "u_i/step", "memory", "in flight", "remat",
               right=("t_i/microbatch", "u_i/step", "memory", "in flight"))
    for i, st in enumerate(plan.stages):
        t.add_row(str(i), layer_text(st), "×".join(map(str, st.submesh)), "×".join(map(str, st.view)),
                  _device_range(st.devices), fmt_s(st.t_s), fmt_s(st.u_s), fmt_bytes(st.memory_bytes),
                  str(st.inflight), (getattr(st, "remat_policy", "full") if st.remat else "no"))
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


def plan_renderable(plan: Any, *, arg_names: Sequence[str] | None = None, max_rows: int = 20) -> Group:
    """The terminal report: header, cost, inputs, outputs, stages, collectives, solver, time."""
    inputs = tensor_rows(plan, "in", arg_names)
    parts: list[RenderableType] = [_header(plan), Text(""), _cost_table(plan), Text(""),
                                   _tensor_table(f"Inputs ({len(inputs)})", inputs), Text(""),
                                   *_outputs(plan), Text(""), _stages_table(plan), Text(""),
                                   _collectives_table(plan, max_rows), Text("")]
    remat = layer_remat_text(plan)
    if remat:
        parts += [Text(remat), Text("")]
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
