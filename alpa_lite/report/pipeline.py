"""The text a pipeline plan adds to ``plan.summary()``: each stage and the predicted step."""

from __future__ import annotations

from typing import Any


def _s(x: float) -> str:
    return f"{x * 1e3:.3f} ms" if x >= 1e-3 else f"{x * 1e6:.1f} µs"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def pipeline_summary(plan: Any) -> str:
    p = plan.pipeline
    t = [s.t_s for s in plan.stages]
    lines = [f"Pipeline: {len(plan.stages)} stages, {len(p.layer_starts)} layers, "
             f"B = {p.num_microbatches} microbatches, {p.schedule} schedule",
             f"  predicted step T = Σ t_i + (B − 1)·max t_i + max u_i = {_s(sum(t))} + "
             f"{p.num_microbatches - 1}·{_s(max(t))} + {_s(max(s.u_s for s in plan.stages))} = "
             f"{_s(p.step_s)}; bubble {p.bubble_fraction:.1%}"]
    if p.one_stage_s is not None:
        lines.append(f"  best one-stage plan: {_s(p.one_stage_s)} "
                     f"({p.one_stage_s / p.step_s:.2f}× the pipeline)")
    elif p.one_stage_bound_s is not None:
        lines.append(f"  one-stage plan: at least {_s(p.one_stage_bound_s)} "
                     f"({p.one_stage_bound_s / p.step_s:.2f}× the pipeline; its ILP's LP bound, not searched)")
    lines.append(f"  {'stage':<6}{'layers':<10}{'sub-mesh':<10}{'view dp×tp':<12}{'devices':<22}"
                 f"{'t_i':>12}{'u_i':>12}{'memory':>12}{'in flight':>11}{'wire/step':>12}{'sync':>12}")
    for i, s in enumerate(plan.stages):
        layers = f"{s.layers[0]}..{s.layers[1]}"
        devs = ",".join(map(str, s.devices))
        wire = sum(c.wire_bytes() for c in plan.collectives if c.stage == i and c.kind != "send")
        sync = sum(c.wire_bytes() for c in plan.collectives if c.stage == i and c.phase == "sync")
        lines.append(f"  {i:<6}{layers:<10}{'×'.join(map(str, s.submesh)):<10}"
                     f"{'×'.join(map(str, s.view)):<12}{devs:<22}{_s(s.t_s):>12}{_s(s.u_s):>12}"
                     f"{_bytes(s.memory_bytes):>12}{s.inflight:>11}{_bytes(wire):>12}{_bytes(sync):>12}")
    lines.append("  (wire/step: a device's predicted collective bytes per step, forward and backward × B; "
                 "sync: the once-per-step gradient all-reduces among them)")
    return "\n".join(lines)
