"""``Plan._repr_html_()``: the plan as one self-contained HTML fragment (no script, no CDN).

It shows the mesh drawn as an SVG grid of devices coloured by pipeline stage (one stage colours
every device), the predicted cost as bars (compute / communication / resharding, and memory
against the device's capacity), every input and output with its sharding and per-device piece,
the predicted collectives, and the solver's status. Rows come from ``alpa_lite.report.rows`` (imported as ``shared``).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from alpa_lite.report import rows as shared  # the rows every view reads

# Tableau 10: ten colours told apart easily, also in print. Stage i takes colour i mod 10.
STAGE_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
                 "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac")
NO_STAGE_COLOUR = "#e6e6e6"  # a device no stage uses
# ColorBrewer Dark2, so cost bars never read as stage colours.
COST_COLOURS = {"compute": "#1b9e77", "communication": "#d95f02", "resharding": "#7570b3"}
MEMORY_COLOUR = "#666666"
_MAX_DRAWN_DEVICES = 4096  # beyond this the mesh is described, not drawn

_CSS = """
.alpa-lite-plan{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;color:#222;
 max-width:1150px}
.alpa-lite-plan h3{margin:4px 0;font-size:16px}
.alpa-lite-plan h4{margin:14px 0 4px;font-size:14px}
.alpa-lite-plan .sub{color:#555;margin:2px 0}
.alpa-lite-plan .row{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}
.alpa-lite-plan table{border-collapse:collapse;margin:2px 0;font-size:inherit}
.alpa-lite-plan th{text-align:left;border-bottom:1px solid #999;padding:2px 10px 2px 0;font-weight:600}
.alpa-lite-plan td{padding:1px 10px 1px 0;border-bottom:1px solid #eee;vertical-align:top}
.alpa-lite-plan td.num{text-align:right;font-variant-numeric:tabular-nums}
.alpa-lite-plan code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.alpa-lite-plan .legend span.sw{display:inline-block;width:11px;height:11px;margin-right:4px;
 vertical-align:-1px;border-radius:2px}
.alpa-lite-plan .warn{color:#a15c00}
.alpa-lite-plan .best{font-weight:700;color:#1b7e37}
"""


def plan_html(plan: Any) -> str:
    c = plan.cost
    head = (f"<h3>alpa-lite plan · {escape(plan.method)} · mesh {escape(shared.mesh_text(plan))}</h3>"
            f"<p class='sub'>{math.prod(plan.mesh_shape)} devices · cluster {escape(shared.cluster_text(plan))} · "
            f"{escape(shared.mesh_kind(plan))}</p>"
            f"<p class='sub'><b>predicted step {shared.fmt_s(shared.step_time(plan))}</b> · peak memory "
            f"{shared.fmt_bytes(c.peak_memory_bytes)} per device · solver {escape(plan.solver.status)}, "
            f"gap {plan.solver.gap:.2%}</p>")
    if shared.pipeline_of(plan) is not None:
        head += f"<p class='sub'>{escape(shared.pipeline_text(plan)).replace(chr(10), '<br>')}</p>"
    remat = shared.layer_remat_text(plan)
    if remat:
        head += f"<p class='sub'>{escape(remat).replace(chr(10), '<br>')}</p>"
    top = (f"<div class='row'><div style='max-width:560px'><h4>Mesh and stages</h4>{mesh_svg(plan)}"
           f"{_stage_legend(plan)}</div>"
           f"<div><h4>Predicted cost per step</h4>{cost_svg(plan)}</div></div>")
    inputs, outputs = shared.tensor_rows(plan, "in"), shared.tensor_rows(plan, "out")
    body = (f"<h4>Inputs ({len(inputs)})</h4>{_tensor_table(inputs, 'alpa-lite-inputs', 'in')}"
            f"<details><summary><b>Outputs ({len(outputs)})</b></summary>"
            f"{_tensor_table(outputs, 'alpa-lite-outputs', 'out')}</details>"
            f"{_collectives_table(plan)}"
            f"<p class='sub'><b>Solver</b> {escape(shared.solver_text(plan))}<br>"
            f"<b>Planning time</b> {escape(shared.timings_text(plan))}</p>")
    warnings = "".join(f"<p class='warn'>warning: {escape(w)}</p>" for w in plan.warnings)
    return f"<div class='alpa-lite-plan'><style>{_CSS}</style>{head}{top}{body}{warnings}</div>"


# ---- mesh -------------------------------------------------------------------------------------
def stage_of_device(plan: Any) -> dict[int, int]:
    return {d: i for i, st in enumerate(plan.stages) for d in st.devices}


def mesh_svg(plan: Any) -> str:
    """The mesh as a grid: rows are all axes but the last (major to minor), columns the last axis.

    Device ``d`` (its index in the mesh, row-major) sits at row ``d // cols``, column ``d % cols``,
    filled with its stage's colour; hovering shows its mesh coordinates.
    """
    shape = tuple(plan.mesh_shape) or (1,)
    cols, rows = shape[-1], math.prod(shape[:-1])
    if rows * cols > _MAX_DRAWN_DEVICES:
        return f"<p class='sub'>{rows * cols} devices: too many to draw</p>"
    cell = max(6, min(52, 416 // cols, 416 // max(rows, 1)))
    gap = 4 if cell >= 20 else 1
    left, top = 30, 24
    width, height = left + cols * (cell + gap), top + rows * (cell + gap)
    stage = stage_of_device(plan)
    names = plan.axis_names or ("d",)
    parts = [f"<svg class='alpa-lite-mesh' xmlns='http://www.w3.org/2000/svg' width='{width}' "
             f"height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='mesh {escape(shared.mesh_text(plan))}'>",
             f"<text x='{left}' y='14' font-size='12' fill='#444'>{escape(names[-1])} ({cols}) →</text>",
             f"<text x='14' y='{top}' font-size='12' fill='#444' transform='rotate(90 14 {top})'>"
             f"{escape('×'.join(names[:-1]) or '')}{f' ({rows}) →' if len(shape) > 1 else ''}</text>"]
    for d in range(rows * cols):
        r, c = divmod(d, cols)
        x, y = left + c * (cell + gap), top + r * (cell + gap)
        s = stage.get(d)
        fill = NO_STAGE_COLOUR if s is None else STAGE_COLOURS[s % len(STAGE_COLOURS)]
        coords = ", ".join(f"{n}={i}" for n, i in zip(names, _unravel(d, shape)))
        label = f"device {d} ({coords}): " + ("no stage" if s is None else f"stage {s}")
        parts.append(f"<rect class='alpa-lite-device' data-stage='{'' if s is None else s}' x='{x}' y='{y}' "
                     f"width='{cell}' height='{cell}' rx='3' fill='{fill}'><title>{escape(label)}</title></rect>")
        if cell >= 28:
            parts.append(f"<text x='{x + cell / 2}' y='{y + cell / 2 + 4}' font-size='11' fill='#fff' "
                         f"text-anchor='middle'>{d}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _unravel(d: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for s in reversed(shape):
        d, i = divmod(d, s)
        out.append(i)
    return out[::-1]


def _stage_legend(plan: Any) -> str:
    items = []
    for i, st in enumerate(plan.stages):
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        layers = f"layer {st.layers[0]}" if st.layers[0] == st.layers[1] else f"layers {st.layers[0]}–{st.layers[1]}"
        times = (f"t_i {shared.fmt_s(st.t_s)}/microbatch, u_i {shared.fmt_s(st.u_s)}, {shared.remat_text(st)}"
                 if shared.pipeline_of(plan) is not None
                 else shared.fmt_s(st.cost_s))
        items.append(f"<div><span class='sw' style='background:{colour}'></span>stage {i}: {layers} on sub-mesh "
                     f"{'×'.join(map(str, st.submesh))} "
                     f"({len(st.devices)} devices) · {times} · {shared.fmt_bytes(st.memory_bytes)}</div>")
    return f"<div class='legend'>{''.join(items)}</div>"


# ---- cost bars -----------------------------------------------------------------------------
def cost_svg(plan: Any, width: int = 470) -> str:
    """One bar per part of the step time, scaled to the total, and memory against capacity."""
    total = plan.cost.total_s
    label_w, bar_w, h = 110, width - 110 - 150, 20
    rows = [(name, v, v / total if total > 0 else 0.0, COST_COLOURS[name], shared.fmt_s(v))
            for name, v in shared.cost_rows(plan)]
    cap = shared.memory_capacity(plan)
    mem = plan.cost.peak_memory_bytes
    rows.append(("memory/device", mem, mem / cap if cap else 0.0, MEMORY_COLOUR,
                 shared.fmt_bytes(mem) + (f" / {shared.fmt_bytes(cap)}" if cap else "")))
    height = (len(rows) + 1) * (h + 8) + 8
    parts = [f"<svg class='alpa-lite-cost' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' aria-label='predicted cost'>"]
    for k, (name, _, frac, colour, text) in enumerate(rows):
        y = 8 + k * (h + 8)
        w = max(1.0, frac * bar_w) if frac > 0 else 0.0
        parts.append(f"<text x='0' y='{y + 14}' font-size='12' fill='#333'>{escape(name)}</text>"
                     f"<rect x='{label_w}' y='{y}' width='{bar_w}' height='{h}' fill='#f1f1f1'/>"
                     f"<rect class='alpa-lite-bar' data-part='{escape(name)}' x='{label_w}' y='{y}' "
                     f"width='{w:.1f}' height='{h}' fill='{colour}'><title>{escape(name)}: {escape(text)} "
                     f"({frac:.1%})</title></rect>"
                     f"<text x='{label_w + bar_w + 6}' y='{y + 14}' font-size='11' fill='#333'>{escape(text)}</text>")
    y = 8 + len(rows) * (h + 8)
    parts.append(f"<text x='0' y='{y + 14}' font-size='12' font-weight='bold' fill='#222'>total "
                 f"{escape(shared.fmt_s(total))}</text></svg>")
    return "".join(parts)


# ---- tables ---------------------------------------------------------------------------------
def _tensor_table(rows: list[Any], css_class: str, kind: str) -> str:
    body = "".join(
        f"<tr class='alpa-lite-{kind}-row'><td class='num'>{i}</td><td><code>{escape(r.name)}</code></td>"
        f"<td>{escape(r.type_text)}</td><td><code>{escape(r.pspec_text)}</code></td>"
        f"<td>{escape(r.local_text)}</td>"
        f"<td class='num'>{'' if r.local_bytes is None else shared.fmt_bytes(r.local_bytes)}</td></tr>"
        for i, r in enumerate(rows))
    return (f"<table class='{css_class}'><tr><th>#</th><th>tensor</th><th>type</th><th>sharding</th>"
            f"<th>per device</th><th>bytes/device</th></tr>{body}</table>")


def _collectives_table(plan: Any) -> str:
    title = (f"<h4>Predicted collectives ({len(plan.collectives)}; "
             f"{shared.fmt_bytes(plan.predicted_wire_bytes)} sent per device)</h4>")
    if not plan.collectives:
        return title + "<p class='sub'>none: no device talks to another</p>"
    body = "".join(
        f"<tr><td>{escape(c.kind)}</td><td>{escape(','.join(c.axes))}</td><td class='num'>{c.group_size}</td>"
        f"<td class='num'>{shared.fmt_bytes(c.nbytes)}</td><td class='num'>{shared.fmt_bytes(c.wire_bytes())}</td>"
        f"<td><code>{escape(c.where)}</code></td></tr>" for c in plan.collectives)
    kinds = " · ".join(f"{escape(k)} ×{n} ({shared.fmt_bytes(wb)})"
                       for k, (n, wb) in shared.collective_totals(plan).items())
    return (f"{title}<table class='alpa-lite-collectives'><tr><th>kind</th><th>axes</th><th>group</th>"
            f"<th>buffer</th><th>wire bytes</th><th>where</th></tr>{body}</table><p class='sub'>by kind: {kinds}</p>")


def comparison_html(comparison: Any) -> str:
    """Methods side by side, with a bar per method's predicted step time."""
    rows = comparison.rows()
    longest = max((r["total_s"] for r in rows if "error" not in r), default=0.0)
    best = comparison.best
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"<tr><td>{escape(r['method'])}</td><td colspan='9' class='warn'>failed: "
                        f"{escape(r['error'])}</td></tr>")
            continue
        w = 160 * r["total_s"] / longest if longest > 0 else 0
        bar = (f"<svg width='164' height='12'><rect x='0' y='1' width='{w:.1f}' height='10' "
               f"fill='{COST_COLOURS['compute']}'/></svg>")
        cls = " class='best'" if r["method"] == best else ""
        vs = "" if r["vs_auto"] is None else f"{r['vs_auto']:.2f}×"
        cells = [shared.fmt_s(r["compute_s"]), shared.fmt_s(r["communication_s"]), shared.fmt_s(r["resharding_s"]),
                 shared.fmt_bytes(r["memory_bytes"]), shared.fmt_bytes(r["wire_bytes"]), vs]
        body.append(f"<tr><td{cls}>{escape(r['method'])}</td>"
                    f"<td class='num'>{shared.fmt_s(r['total_s'])}</td><td>{bar}</td>"
                    + "".join(f"<td class='num'>{c}</td>" for c in cells) + f"<td>{escape(r['status'])}</td></tr>")
    return (f"<div class='alpa-lite-plan'><style>{_CSS}</style><table class='alpa-lite-comparison'><tr>"
            "<th>method</th><th>step</th><th></th><th>compute</th><th>communication</th><th>resharding</th><th>memory/device</th>"
            f"<th>wire bytes/device</th><th>vs auto</th><th>solver</th></tr>{''.join(body)}</table></div>")
