"""What a strategy rule sees: the cluster, the op's results, and helpers that cost a strategy.

Compute time is the roofline: max(FLOPs per device / (peak · efficiency), bytes touched per
device / HBM bandwidth). FLOPs per device are the op's FLOPs divided by how many ways the work is
split: the product of the sizes of the mesh axes that split the output or make it a partial sum
(every other axis computes the same thing again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec, enumerate_specs
from cost_model.collectives import all_reduce, collective_time
from cost_model.strategy import Collective, Strategy

# 16-bit floats a backend may compute (and communicate) in float32 instead.
_HALF_FLOATS = ("bfloat16", "float16")


def wire_itemsize(t: TensorInfo, cluster: ClusterSpec) -> int:
    """Bytes per element a collective moves for ``t`` on ``cluster``'s backend.

    XLA's CPU backend has no 16-bit float arithmetic: its float-normalization pass computes
    bf16/f16 in f32, and the collectives of such values run in f32 too (seen on jax 0.10.2 with
    8 host devices: a bf16 dot's all-reduce, a bf16 reduction's all-reduce and a bf16
    all-gather all move f32). GPUs move the dtype's own size (bf16: 2 bytes)."""
    if t.dtype in _HALF_FLOATS and cluster.device.name.lower().startswith("cpu"):
        return 4
    return t.itemsize


@dataclass(frozen=True)
class RuleContext:
    cluster: ClusterSpec
    outs: tuple[TensorInfo, ...]
    flops: float = 0.0

    @cached_property
    def sizes(self) -> dict[str, int]:
        return self.cluster.axis_sizes

    @property
    def out(self) -> TensorInfo:
        return self.outs[0]

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        """Mesh axes of size > 1, the ones a strategy can split over."""
        return tuple(a for a in self.cluster.axis_names if self.sizes[a] > 1)

    def specs(self, shape: Sequence[int]) -> list[ShardingSpec]:
        return enumerate_specs(shape, self.sizes)

    def local_bytes(self, t: TensorInfo, spec: ShardingSpec) -> float:
        return float(math.prod(spec.local_shape(t.shape, self.sizes)) * t.itemsize)

    def wire_bytes(self, t: TensorInfo, spec: ShardingSpec) -> float:
        """The per-device buffer a collective of ``t`` in ``spec`` moves (``wire_itemsize``)."""
        return float(math.prod(spec.local_shape(t.shape, self.sizes)) * wire_itemsize(t, self.cluster))

    def compute_time(self, flops: float, touched_bytes: float) -> float:
        return max(self.roofline(flops, touched_bytes))

    def roofline(self, flops: float, touched_bytes: float) -> tuple[float, float]:
        """(FLOP seconds, HBM seconds): FLOPs / (peak · efficiency), bytes / HBM bandwidth."""
        dev = self.cluster.device
        return flops / (dev.peak_flops * dev.efficiency), touched_bytes / dev.hbm_bandwidth

    def hbm_part(self, flops: float, touched_bytes: float) -> float:
        """The roofline's time when its memory term is the larger, else 0."""
        flop_s, hbm_s = self.roofline(flops, touched_bytes)
        return hbm_s if hbm_s > flop_s else 0.0

    def split_ways(self, out_spec: ShardingSpec) -> int:
        """How many ways the work is split: the mesh axes that split the output or make it a
        partial sum (every other axis computes the same thing again)."""
        return math.prod(self.sizes[a] for a in set(out_spec.axes_used()) | set(out_spec.partial))

    def strategy(self, name: str, out_specs: Sequence[ShardingSpec],
                 in_specs: Sequence[ShardingSpec], ins: Sequence[TensorInfo],
                 collectives: Sequence[Collective] = (), flops: float | None = None,
                 fused: bool = False) -> Strategy:
        """A strategy with its roofline compute time, own-collective time and output memory.

        ``fused``: XLA fuses element-wise ops (and broadcasts) into their neighbours' kernels, so
        they cost their FLOPs only, not a pass over memory of their own."""
        out_specs, in_specs = tuple(out_specs), tuple(in_specs)
        total = self.flops if flops is None else flops
        out_mem = sum(self.local_bytes(t, s) for t, s in zip(self.outs, out_specs))
        in_mem = sum(self.local_bytes(t, s) for t, s in zip(ins, in_specs))
        touched = 0.0 if fused else out_mem + in_mem
        split = self.split_ways(out_specs[0])
        compute = self.compute_time(total / split, touched) if (total or touched) else 0.0
        comm = sum(collective_time(c, self.cluster) for c in collectives)
        return Strategy(name, out_specs, in_specs, compute, comm, out_mem, tuple(collectives),
                        hbm_s=self.hbm_part(total / split, touched))

    def touching(self, s: Strategy, touched_bytes: float) -> Strategy:
        """``s`` with its compute time priced for ``touched_bytes`` per device instead of every
        operand and output whole: for ops that read or write only a window of a buffer."""
        flops = self.flops / self.split_ways(s.out_spec)
        return replace(s, compute_s=self.compute_time(flops, touched_bytes),
                       hbm_s=self.hbm_part(flops, touched_bytes))

    def with_reduced(self, strats: Sequence[Strategy]) -> list[Strategy]:
        """``strats`` plus, for each whose output is a partial sum, the same strategy reduced at
        the op: its own all-reduce over the partial axes, the output leaving reduced.

        A partial output is otherwise reduced on each out-edge, so a partial sum read by two
        consumers in different specs would be charged two reductions, where the program reduces
        once and reshards the reduced value (the emitter constrains a non-partial output right at
        the op). Offering both lets the ILP share one reduction between consumers."""
        out = list(strats)
        for s in strats:
            spec = s.out_specs[0]
            if not spec.partial or len(s.out_specs) != 1:
                continue
            reduced = spec.without_partial()
            c = all_reduce(spec.partial, self.wire_bytes(self.out, reduced), self.cluster)
            if c is None:
                continue
            # The all-reduce writes a new buffer: the partial product is alive beside it while
            # it runs (``Strategy.scratch_bytes``).
            out.append(replace(s, name=f"{s.name}→reduced", out_specs=(reduced,),
                               comm_s=s.comm_s + collective_time(c, self.cluster),
                               collectives=(*s.collectives, c),
                               scratch_bytes=s.scratch_bytes + self.local_bytes(self.out, reduced)))
        return out

    def replicated(self, ins: Sequence[TensorInfo], name: str = "replicated") -> Strategy:
        return self.strategy(name, [ShardingSpec.replicated(t.rank) for t in self.outs],
                             [ShardingSpec.replicated(t.rank) for t in ins], ins)
