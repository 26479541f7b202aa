"""What a strategy rule sees: the cluster, the op's results, and helpers that cost a strategy.

Compute time is the roofline: max(FLOPs per device / (peak · efficiency), bytes touched per
device / HBM bandwidth). FLOPs per device are the op's FLOPs divided by how many ways the work is
split: the product of the sizes of the mesh axes that split the output or make it a partial sum
(every other axis computes the same thing again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from alpa_lite.cluster import ClusterSpec
from alpa_lite.graph import TensorInfo
from alpa_lite.specs import ShardingSpec, enumerate_specs
from cost_model.strategy import Collective, Strategy


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

    def compute_time(self, flops: float, touched_bytes: float) -> float:
        dev = self.cluster.device
        return max(flops / (dev.peak_flops * dev.efficiency), touched_bytes / dev.hbm_bandwidth)

    def strategy(self, name: str, out_specs: Sequence[ShardingSpec],
                 in_specs: Sequence[ShardingSpec], ins: Sequence[TensorInfo],
                 collectives: Sequence[Collective] = (), flops: float | None = None,
                 fused: bool = False) -> Strategy:
        """A strategy with its roofline compute time, own-collective time and output memory.

        ``fused``: XLA fuses element-wise ops (and broadcasts) into their neighbours' kernels, so
        they cost their FLOPs only, not a pass over memory of their own."""
        from cost_model.collectives import collective_time

        out_specs, in_specs = tuple(out_specs), tuple(in_specs)
        split_axes = set(out_specs[0].axes_used()) | set(out_specs[0].partial)
        split = math.prod(self.sizes[a] for a in split_axes)
        total = self.flops if flops is None else flops
        out_mem = sum(self.local_bytes(t, s) for t, s in zip(self.outs, out_specs))
        in_mem = sum(self.local_bytes(t, s) for t, s in zip(ins, in_specs))
        touched = 0.0 if fused else out_mem + in_mem
        compute = self.compute_time(total / split, touched) if (total or touched) else 0.0
        comm = sum(collective_time(c, self.cluster) for c in collectives)
        return Strategy(name, out_specs, in_specs, compute, comm, out_mem, tuple(collectives))

    def replicated(self, ins: Sequence[TensorInfo], name: str = "replicated") -> Strategy:
        return self.strategy(name, [ShardingSpec.replicated(t.rank) for t in self.outs],
                             [ShardingSpec.replicated(t.rank) for t in ins], ins)
