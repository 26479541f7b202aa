"""Shared checks of the model tests: prediction beside the compiled program, printed.

``measure`` compiles a plan on the 8 CPU devices, prints the predicted and compiled wire bytes
and per-device memory, and lists by kind the collectives XLA compiled beyond what the plan
predicted (kinds whose compiled wire bytes exceed the prediction by more than 10%, or that the
plan never asked for): the tests assert that list, so such additions are named, not hidden.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from alpa_lite.measure.hlo_stats import CompiledCollective, CompiledStats, parse_collectives
from tests.helpers import compiled_with_stats, placed_args

WIRE_TOLERANCE = 0.10
MEMORY_TOLERANCE = 0.20


@dataclass(frozen=True)
class Measured:
    name: str
    predicted_wire: float
    compiled: CompiledStats
    predicted_memory: float
    extra_kinds: tuple[str, ...]  # collective kinds XLA added beyond the plan's prediction
    step: Any = field(default=None, compare=False, repr=False)  # plan.compile(fn), already compiled

    @property
    def wire(self) -> float:
        return self.compiled.wire_bytes

    @property
    def memory(self) -> float:
        return float(self.compiled.memory_bytes)

    def wire_error(self) -> float:
        return abs(self.predicted_wire - self.wire) / max(self.wire, 1.0)

    def memory_error(self) -> float:
        return abs(self.predicted_memory - self.memory) / max(self.memory, 1.0)

    def assert_predictions(self) -> None:
        """Wire bytes within 10% (64 B slack for tiny programs), memory within 20%."""
        assert abs(self.predicted_wire - self.wire) <= WIRE_TOLERANCE * self.wire + 64, str(self)
        assert self.memory_error() <= MEMORY_TOLERANCE, str(self)

    def __str__(self) -> str:
        return (f"{self.name}: wire bytes predicted {self.predicted_wire:,.0f} compiled {self.wire:,.0f} "
                f"({self.wire_error():.1%}); memory/device predicted {self.predicted_memory:,.0f} "
                f"compiled {self.memory:,.0f} ({self.memory_error():.1%}); FLOPs/device "
                f"{self.compiled.flops:,.0f}; XLA added: {list(self.extra_kinds) or 'nothing'}")


def extra_kinds(plan: Any, stats: CompiledStats) -> tuple[str, ...]:
    pred: dict[str, float] = {}
    for c in plan.collectives:
        pred[c.kind] = pred.get(c.kind, 0.0) + c.wire_bytes()
    return tuple(sorted(k for k, (_, wire) in stats.by_kind().items()
                        if wire > pred.get(k, 0.0) * (1 + WIRE_TOLERANCE) + 64))


_IN_LOOP = re.compile(r"(\S+) %(\S+) runs inside while \S+ \(trip count (\d+)\); counted once")


def per_iteration(stats: CompiledStats, hlo_text: str) -> CompiledStats:
    """``stats`` with each collective inside a loop counted once per iteration: hlo_stats counts
    an instruction once and notes its loop's trip count in ``warnings``."""
    extra: list[CompiledCollective] = []
    notes = []
    for w in stats.warnings:
        m = _IN_LOOP.fullmatch(w)
        if not m:
            notes.append(w)
            continue
        line = next(ln for ln in hlo_text.splitlines() if re.search(rf"%{re.escape(m.group(2))} = ", ln))
        extra.extend(parse_collectives(line, num_devices=8) * (int(m.group(3)) - 1))
    return replace(stats, collectives=stats.collectives + tuple(extra), warnings=tuple(notes))


def measure(name: str, plan: Any, fn: Callable[..., Any], args: Sequence[Any]) -> Measured:
    jitted, stats = compiled_with_stats(plan, fn, args)  # the test's steps reuse this executable
    if any(_IN_LOOP.fullmatch(w) for w in stats.warnings):
        stats = per_iteration(stats, jitted.lower(*placed_args(plan, args)).compile().as_text())
    m = Measured(name, plan.predicted_wire_bytes, stats, plan.cost.peak_memory_bytes,
                 extra_kinds(plan, stats), jitted)
    print(m)
    return m
