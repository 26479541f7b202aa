"""Human-readable views of a plan: a text summary (terminal) and HTML (Jupyter)."""

from __future__ import annotations

import html
from typing import Any


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def _inputs(plan: Any) -> list[tuple[str, str, str]]:
    import jax

    rows = []
    if plan.graph is not None:
        dyn = jax.tree.unflatten(plan.graph.in_tree, list(range(len(plan.input_specs))))
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(dyn)]
    else:
        paths = [f"input[{i}]" for i in range(len(plan.input_specs))]
    for path, (shape, dtype), spec in zip(paths, plan.signature, plan.input_specs):
        rows.append((path, f"{dtype}{list(shape)}", str(spec.to_partition_spec())))
    return rows


def plan_summary(plan: Any) -> str:
    mesh = " × ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
    c = plan.cost
    lines = [f"alpa-lite plan ({plan.method}) on mesh {mesh}",
             f"  predicted step: {_fmt_s(c.total_s)} = compute {_fmt_s(c.compute_s)} + "
             f"communication {_fmt_s(c.communication_s)} + resharding {_fmt_s(c.resharding_s)}",
             f"  peak memory per device: {_fmt_bytes(c.peak_memory_bytes)}",
             "  inputs:"]
    rows = _inputs(plan)
    w = max((len(r[0]) for r in rows), default=0)
    w2 = max((len(r[1]) for r in rows), default=0)
    lines += [f"    {p:<{w}}  {t:<{w2}}  {s}" for p, t, s in rows]
    if len(plan.stages) > 1:
        lines.append("  stages:")
        for i, st in enumerate(plan.stages):
            lines.append(f"    stage {i}: layers {st.layers[0]}..{st.layers[1]} on sub-mesh "
                         f"{st.submesh} devices {list(st.devices)}: {_fmt_s(st.cost_s)}, "
                         f"{_fmt_bytes(st.memory_bytes)}")
    lines.append(f"  predicted collectives ({len(plan.collectives)}, "
                 f"{_fmt_bytes(plan.predicted_wire_bytes)} on the wire per device):")
    for col in plan.collectives[:20]:
        lines.append(f"    {col.kind:<14} over {','.join(col.axes):<8} {_fmt_bytes(col.nbytes):>10}"
                     f"  at {col.where}")
    if len(plan.collectives) > 20:
        lines.append(f"    ... {len(plan.collectives) - 20} more")
    s = plan.solver
    lines.append(f"  solver: {s.status}, objective {_fmt_s(s.objective)}, gap {s.gap:.2%}, "
                 f"{s.variables} variables, {s.wall_s:.2f} s" + (f" ({s.note})" if s.note else ""))
    if plan.timings:
        lines.append("  planning: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s"
                                                for k, v in plan.timings.items()))
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def plan_html(plan: Any) -> str:
    rows = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(t)}</td>"
                   f"<td><code>{html.escape(s)}</code></td></tr>" for p, t, s in _inputs(plan))
    c = plan.cost
    return (f"<div class='alpa-lite-plan'><h4>alpa-lite plan ({html.escape(plan.method)}), mesh "
            f"{html.escape(str(dict(zip(plan.axis_names, plan.mesh_shape))))}</h4>"
            f"<p>predicted step {_fmt_s(c.total_s)}; peak memory "
            f"{_fmt_bytes(c.peak_memory_bytes)}</p>"
            f"<table><tr><th>tensor</th><th>type</th><th>sharding</th></tr>{rows}</table></div>")
