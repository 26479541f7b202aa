"""Alpa's two other headline cases, predicted: a GShard MoE transformer against DeepSpeed-MoE's
expert-parallel hand plan, and Wide-ResNet against data parallel, on 8-64 GPUs of ``dgx-a100``.

    python -m bench.alpa_cases [--models moe wresnet] [--gpus 8 16 32 64] [--only MoE-10B ...] [--json FILE]
    python -m bench.alpa_cases --smallest       # the smoke test: tiny shapes on 8 and 16 GPUs

Shapes follow Alpa's Table 4 (Zheng et al., OSDI'22) and its benchmark suite, as recalled here
(no copy of the table was at hand to check against; parameter counts are computed and printed):

- GShard MoE (``examples/moe_gpt.py``): sequence 1024, vocabulary 32,000, GShard groups of
  2048 tokens, top-2 gating (capacity 2·2048/E), FFN width 8·hidden for dense and expert FFNs,
  every other block MoE. (hidden, layers, heads, experts, GPUs):
  2.4B (1024, 16, 16, 16, 8), 10B (1536, 16, 16, 32, 16), 27B (2048, 16, 32, 48, 32),
  70B (2048, 32, 32, 64, 64; no plan within 80 GiB, see bench/README.md).
- Wide-ResNet (``examples/wide_resnet_bottleneck.py``): 224×224 images, 1000 classes.
  (layers, base channels, width factor, GPUs): 2B (50, 448, 2, 8), 4B (50, 640, 2,
  16), 6.8B (50, 320, 8, 32), 13B (101, 384, 8, 64). The first two use the widths recalled; for the last
  two this block gives 21.8B and 25.6B with the widths recalled from the paper (320 channels,
  width 16), so the width factor is set to land on the paper's parameter counts.
- Batch: the paper's steps are 1024 sequences and 1536 images, with pipelining or gradient
  accumulation; one-stage plans have neither, so a step here is ``MOE_PER_GPU`` sequences or
  ``WRN_PER_GPU`` images per GPU.

Both models compute in bf16 with fp32 master weights and optimizer state (MoE: Adam, 16 B per
parameter; Wide-ResNet: SGD with momentum, 12 B). Every row is planned on an ``AbstractMesh``
(hosts × 8) of the preset, one stage (``num_stages=1``), nothing runs:

- ``auto``: ``al.plan(method="auto")`` within the A100's 80 GiB; when no plan fits, the unlimited
  auto plan is priced (as the hand plan's below) and shown with "no" under "fits 80G".
- the hand plan: ``expert_parallel`` for MoE (experts split along E over the mesh, tokens data
  parallel, all else replicated; ``alpa_lite/intra/baselines.py``), ``data_parallel`` for
  Wide-ResNet, planned without a memory limit (its fastest placement of everything between the
  fixed inputs). When that exceeds 80 GiB it is planned again within 80 GiB; a hand plan that
  fits neither way shows the unlimited plan's time and memory and "no" under "fits 80G".

TFLOP/s per GPU = the model's FLOPs per step / (predicted step time · GPUs). Model FLOPs are
3 × the forward pass's matmul and convolution FLOPs (``MoeGPTConfig.step_flops``,
``WideResNetConfig.step_flops``: 2 FLOPs per multiply-add; MoE counts each token's top-2
experts and GShard's dispatch/combine einsums), the same figure for both plans.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

import alpa_lite as al
import bench.common as common
from alpa_lite.ir.errors import PlanningError
from examples.moe_gpt import MoeGPTConfig
from examples.moe_gpt import abstract_example as moe_example
from examples.wide_resnet_bottleneck import DEPTHS, WideResNetConfig
from examples.wide_resnet_bottleneck import abstract_example as wrn_example

GiB = 1024**3
UNLIMITED = 1e18  # bytes: a memory budget nothing reaches, to price a plan that does not fit


@dataclass(frozen=True)
class Case:
    """One row: a model shape, its GPUs, and the hand plan it is compared with."""

    name: str
    family: str  # "moe" or "wresnet"
    gpus: int
    hand: str
    make: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    params: int
    flops: float


MOE_PER_GPU = 8  # sequences per GPU per step (the paper: 1024 sequences per step, accumulated)
WRN_PER_GPU = 16  # images per GPU per step (the paper: 1536 per step, accumulated)


def moe_case(name: str, gpus: int, hidden: int, layers: int, heads: int, experts: int,
             batch: int | None = None, seq: int = 1024, vocab: int = 32000, group: int = 2048) -> Case:
    batch = batch or MOE_PER_GPU * gpus
    cfg = MoeGPTConfig(vocab=vocab, seq=seq, d_model=hidden, n_heads=heads, n_layers=layers,
                       experts=experts, group_size=group)
    return Case(name, "moe", gpus, "expert_parallel", lambda: moe_example(cfg, batch), cfg.param_count(),
                cfg.step_flops(batch))


def wrn_case(name: str, gpus: int, stages: tuple[int, ...], channels: int, width: int,
             batch: int | None = None, image: int = 224, classes: int = 1000) -> Case:
    batch = batch or WRN_PER_GPU * gpus
    cfg = WideResNetConfig(batch=batch, image=image, stages=stages, channels=channels, width=width,
                           classes=classes)
    return Case(name, "wresnet", gpus, "data_parallel", lambda: wrn_example(cfg), cfg.param_count(),
                cfg.step_flops())


CASES = [
    moe_case("MoE-2.4B", 8, 1024, 16, 16, 16),
    moe_case("MoE-10B", 16, 1536, 16, 16, 32),
    moe_case("MoE-27B", 32, 2048, 16, 32, 48),
    moe_case("MoE-70B", 64, 2048, 32, 32, 64),
    wrn_case("WResNet-2B", 8, DEPTHS[50], 448, 2),
    wrn_case("WResNet-4B", 16, DEPTHS[50], 640, 2),
    wrn_case("WResNet-6.8B", 32, DEPTHS[50], 320, 8),
    wrn_case("WResNet-13B", 64, DEPTHS[101], 384, 8),
]
SMALLEST = [
    moe_case("MoE-tiny", 16, 64, 2, 4, 16, batch=16, seq=32, vocab=256, group=32),
    wrn_case("WResNet-tiny", 8, (1, 1), 8, 2, batch=16, image=32, classes=10),
]


def timed_plan(fn: Callable[..., Any], args: Any, cluster: al.ClusterSpec, method: str,
               budget: float | None = None) -> tuple[Any, float]:
    """(plan or the reason there is none, planning seconds) on the cluster's abstract mesh."""
    mesh = jax.sharding.AbstractMesh(cluster.mesh_shape, cluster.axis_names)
    t0 = time.perf_counter()
    try:
        plan = al.plan(fn, *args, mesh=mesh, cluster=cluster, method=method, num_stages=1,
                       memory_budget=budget)
    except PlanningError as e:
        return f"no plan: {str(e).splitlines()[0][:100]}", time.perf_counter() - t0
    return plan, time.perf_counter() - t0


def side(plan: Any, case: Case, limit: float) -> dict[str, Any]:
    """Predicted step, TFLOP/s per GPU, peak memory per GPU of one plan; or why there is none."""
    if isinstance(plan, str):
        return dict(step_ms=None, tflops=None, mem_gib=None, fits=False, reason=plan)
    t = plan.cost.total_s
    return dict(step_ms=t * 1e3, tflops=case.flops / (t * case.gpus) / 1e12, bound=plan.cost.bound,
                mem_gib=plan.cost.peak_memory_bytes / GiB, fits=plan.cost.peak_memory_bytes <= limit,
                status=plan.solver.status, in_specs=[str(s) for s in plan.input_specs])


def run_case(case: Case) -> dict[str, Any]:
    """Auto (within the device's memory; when no plan fits, the unlimited auto plan, shown with
    "no" under "fits 80G") and the hand plan of ``case``. The hand plan is priced
    first without a memory limit (its fastest placement); only when that does not fit is it
    planned again within the limit (``hand_budgeted``), unless its inputs alone, as the hand plan
    lays them out, already exceed the device."""
    cluster = al.ClusterSpec.preset("dgx-a100", num_hosts=max(1, case.gpus // 8),
                                    devices_per_host=min(8, case.gpus))
    fn, args = case.make()
    limit = cluster.device.memory
    auto, auto_s = timed_plan(fn, args, cluster, "auto")
    within = auto if isinstance(auto, str) else None  # why auto has no plan within the device
    if within:  # no plan within the device: price the unlimited one, as the hand plan's
        unlimited, more_s = timed_plan(fn, args, cluster, "auto", budget=UNLIMITED)
        auto, auto_s = (unlimited if not isinstance(unlimited, str) else auto), auto_s + more_s
    hand, hand_s = timed_plan(fn, args, cluster, case.hand, budget=UNLIMITED)
    if not isinstance(hand, str) and hand.cost.peak_memory_bytes > limit and resident_bytes(hand, args) <= limit:
        budgeted, more_s = timed_plan(fn, args, cluster, case.hand)
        hand, hand_s = (budgeted if not isinstance(budgeted, str) else hand), hand_s + more_s
    a, h = side(auto, case, limit), side(hand, case, limit)
    if within:
        a["within_limit"] = within
    speedup = h["step_ms"] / a["step_ms"] if a["step_ms"] and h["step_ms"] else None
    return dict(name=case.name, family=case.family, gpus=case.gpus, hand=case.hand, params=case.params,
                flops=case.flops, auto=a, hand_plan=h, speedup=speedup, auto_plan_s=auto_s, hand_plan_s=hand_s)


def resident_bytes(plan: Any, args: Any) -> float:
    """Bytes per device of the step's inputs (parameters, optimizer state, batch) in the plan's
    input specs: Σ bytes / (product of the mesh axes splitting it)."""
    sizes = dict(zip(plan.axis_names, plan.mesh_shape))
    return sum(leaf.size * leaf.dtype.itemsize / spec.shard_factor(sizes)
               for leaf, spec in zip(jax.tree.leaves(args), plan.input_specs))


def _cell(v: Any, fmt: str = "{:.3g}") -> str:
    return "—" if v is None else fmt.format(v)


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        a, h = r["auto"], r["hand_plan"]
        out.append([r["name"], f"{r['params'] / 1e9:.2f}B", r["gpus"], r["hand"],
                    _cell(a["step_ms"], "{:,.0f}"), _cell(a["tflops"], "{:.1f}"), _cell(a["mem_gib"], "{:.1f}"),
                    "yes" if a["fits"] else "no",
                    _cell(h["step_ms"], "{:,.0f}"), _cell(h["tflops"], "{:.1f}"), _cell(h["mem_gib"], "{:.1f}"),
                    "yes" if h["fits"] else "no", _cell(r["speedup"], "{:.2f}×"),
                    f"{r['auto_plan_s']:.0f} / {r['hand_plan_s']:.0f}"])
    return out


HEADER = ["model", "params", "GPUs", "hand plan", "auto ms", "auto TFLOP/s", "auto GiB", "fits 80G",
          "hand ms", "hand TFLOP/s", "hand GiB", "fits 80G", "auto speedup", "plan s auto / hand"]


def run(cases: list[Case]) -> dict[str, Any]:
    rows = []
    for case in cases:
        rows.append(run_case(case))
        print(f"[alpa_cases] {case.name}: done in {rows[-1]['auto_plan_s'] + rows[-1]['hand_plan_s']:.0f} s",
              flush=True)
    common.print_table(f"Alpa's MoE and Wide-ResNet cases on dgx-a100, predicted ({common.machine()})",
                       HEADER, table_rows(rows))
    return dict(rows=rows, machine=common.machine())


def select(models: list[str], gpus: list[int], smallest: bool, only: list[str] | None = None) -> list[Case]:
    if smallest:
        return SMALLEST
    return [c for c in CASES if c.family in models and c.gpus in gpus and (not only or c.name in only)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["moe", "wresnet"], choices=["moe", "wresnet"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--only", nargs="+", choices=[c.name for c in CASES], help="these rows only")
    ap.add_argument("--smallest", action="store_true", help="tiny shapes on 8 and 16 GPUs (smoke test)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(select(a.models, a.gpus, a.smallest, a.only)))
