"""Strategies and costs as plain frozen data.

A ``Strategy`` is one way to run an op: the spec of its output (possibly a partial sum, reduced
on the out-edge), the spec each operand must arrive in (never partial), and its costs: compute
seconds (roofline), seconds of the collectives the strategy itself needs, the per-device
bytes of the output it keeps alive, and the bytes it needs only while it runs (``scratch_bytes``:
a loop's body temporaries). ``hbm_s`` is the part of ``compute_s`` set by bytes, not FLOPs: all
of it when the op's roofline is its memory term, else 0 (what a plan reports as bounding it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alpa_lite.ir.specs import ShardingSpec

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass(frozen=True)
class Collective:
    """One collective: ``nbytes`` is the per-device *result* buffer, as compiled HLO shows it.

    Wire bytes a device sends, with n devices in the group (design.md): all-reduce
    2(n−1)/n·b, all-gather (n−1)/n·b, reduce-scatter (n−1)·b, all-to-all (n−1)/n·b,
    collective-permute b.
    """

    kind: str
    axes: tuple[str, ...]
    nbytes: float
    group_size: int

    def wire_bytes(self) -> float:
        n, b = self.group_size, self.nbytes
        if n <= 1:
            return 0.0
        return {
            "all-reduce": 2 * (n - 1) / n * b,
            "all-gather": (n - 1) / n * b,
            "reduce-scatter": (n - 1) * b,
            "all-to-all": (n - 1) / n * b,
            "collective-permute": b,
        }[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}[{','.join(self.axes)}] {self.nbytes:,.0f} B"


@dataclass(frozen=True)
class Cost:
    """Seconds split by cause, plus per-device bytes; ``a + b`` adds every field."""

    compute_s: float = 0.0
    communication_s: float = 0.0
    resharding_s: float = 0.0
    memory_bytes: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.compute_s + other.compute_s,
                    self.communication_s + other.communication_s,
                    self.resharding_s + other.resharding_s,
                    self.memory_bytes + other.memory_bytes)


@dataclass(frozen=True)
class Strategy:
    name: str
    out_specs: tuple[ShardingSpec, ...]
    in_specs: tuple[ShardingSpec, ...]
    compute_s: float = 0.0
    comm_s: float = 0.0
    memory_bytes: float = 0.0
    collectives: tuple[Collective, ...] = field(default=())
    scratch_bytes: float = 0.0
    hbm_s: float = 0.0

    @property
    def out_spec(self) -> ShardingSpec:
        return self.out_specs[0]

    def __str__(self) -> str:
        ins = ", ".join(str(s) for s in self.in_specs)
        outs = ", ".join(str(s) for s in self.out_specs)
        return f"{self.name}: ({ins}) -> {outs}"
