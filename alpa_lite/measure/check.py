"""``plan.check``: compile the plan on the devices at hand and set prediction beside reality.

Collectives are compared by kind (count and wire bytes), plus FLOPs and memory per device.
Differences are flagged, not hidden, and XLA's warnings (involuntary full rematerialization)
are reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alpa_lite.measure.hlo_stats import CompiledStats, stats_of


def relative_error(predicted: float, compiled: float) -> float:
    """|predicted − compiled| / compiled, compiled counted as at least 1 byte."""
    return abs(predicted - compiled) / max(compiled, 1.0)


@dataclass(frozen=True)
class KindRow:
    kind: str
    predicted_count: int
    predicted_wire_bytes: float
    compiled_count: int
    compiled_wire_bytes: float

    @property
    def relative_error(self) -> float:
        return relative_error(self.predicted_wire_bytes, self.compiled_wire_bytes)


class WireTotals:
    """Predicted against compiled wire bytes, for a report with ``predicted_wire_bytes`` and
    ``compiled`` (one-stage and pipeline checks alike)."""

    predicted_wire_bytes: float
    compiled: CompiledStats

    @property
    def compiled_wire_bytes(self) -> float:
        return self.compiled.wire_bytes

    @property
    def wire_error(self) -> float:
        """|predicted − compiled| / compiled (compiled at least 1 byte)."""
        return relative_error(self.predicted_wire_bytes, self.compiled_wire_bytes)


@dataclass(frozen=True)
class CheckReport(WireTotals):
    rows: tuple[KindRow, ...]
    predicted_wire_bytes: float
    compiled: CompiledStats
    predicted_memory_bytes: float
    tolerance: float = 0.10
    predicted_flops: float = 0.0  # per device (``predicted_flops``)

    @property
    def flagged(self) -> list[str]:
        out = [f"{r.kind}: predicted {r.predicted_count}× {r.predicted_wire_bytes:,.0f} B, "
               f"compiled {r.compiled_count}× {r.compiled_wire_bytes:,.0f} B"
               for r in self.rows if r.relative_error > self.tolerance]
        out += [f"XLA: {w}" for w in self.compiled.warnings]
        return out

    @property
    def ok(self) -> bool:
        return self.wire_error <= self.tolerance and not self.compiled.warnings

    def __str__(self) -> str:
        lines = [f"{'collective':<20}{'predicted':>24}{'compiled':>24}"]
        for r in self.rows:
            lines.append(f"{r.kind:<20}{r.predicted_count:>6}× {r.predicted_wire_bytes:>14,.0f} B"
                         f"{r.compiled_count:>6}× {r.compiled_wire_bytes:>14,.0f} B")
        lines.append(f"{'wire bytes total':<20}{self.predicted_wire_bytes:>23,.0f}B"
                     f"{self.compiled_wire_bytes:>23,.0f}B  ({self.wire_error:.1%} off)")
        lines.append(f"{'memory per device':<20}{self.predicted_memory_bytes:>23,.0f}B"
                     f"{self.compiled.memory_bytes:>23,.0f}B")
        lines.append(f"{'FLOPs per device':<20}{self.predicted_flops:>24,.0f}{self.compiled.flops:>24,.0f}")
        lines += [f"  ! {f}" for f in self.flagged]
        return "\n".join(lines)


def check_plan(plan: Any, fn: Callable[..., Any], *args: Any) -> CheckReport:
    compiled_fn = plan.compile(fn, example_args=args if plan.graph is None else None)
    stats = stats_of(compiled_fn, *args)
    pred: dict[str, list[float]] = {}
    for c in plan.collectives:
        pred.setdefault(c.kind, []).append(c.wire_bytes())
    comp = stats.by_kind()
    rows = tuple(KindRow(k, len(pred.get(k, [])), sum(pred.get(k, [])),
                         comp.get(k, (0, 0.0))[0], comp.get(k, (0, 0.0))[1])
                 for k in sorted(set(pred) | set(comp)))
    return CheckReport(rows, plan.predicted_wire_bytes, stats, plan.cost.peak_memory_bytes,
                       predicted_flops=predicted_flops(plan))


def predicted_flops(plan: Any) -> float:
    """FLOPs per device of a one-stage plan's program: each op's FLOPs (``Op.flops``, as XLA's cost
    analysis counts them) over the devices its work is split across, the product of the mesh
    axes its output's spec uses, partial-sum axes included (a contraction split over an axis is a
    partial sum there). Recomputed ops count once more: they are ops of the program."""
    if plan.graph is None:
        return 0.0
    size = dict(zip(plan.axis_names, plan.mesh_shape))
    total = 0.0
    for op, lay in zip(plan.graph.ops, plan.layouts):
        split = 1
        if not lay.free and lay.outs:
            spec = lay.outs[0]
            split = math.prod(size.get(a, 1) for a in {*spec.axes_used(), *spec.partial})
        total += op.flops / split
    return total
