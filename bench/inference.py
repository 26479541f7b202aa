"""Inference planning: predicted decode and prefill time of ``examples/generate.py``'s GPT on H100
presets beside the HBM floor and the Megatron baseline; and, on 8 CPU devices, the example's
predicted vs compiled collective bytes and memory.

    python -m bench.inference [--shapes 70b 7b] [--batches 1 8 64] [--json FILE]
    python -m bench.inference --smallest       # the smoke test

GPU rows (abstract meshes: planned, nothing runs): decode is one token per sequence with the
cache at context 4096; its HBM floor reads every weight and cached byte once, split over the
GPUs: (weight bytes + cache bytes) / GPUs / 3.35 TB/s. tokens/s = batch / decode step. Prefill
runs a PROMPT-token prompt per sequence (tokens/s = batch · PROMPT / prefill step). A row whose
plan does not fit 80 GiB per GPU says so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax

import alpa_lite as al
import bench.common as common
from alpa_lite.ir.errors import PlanningError
from alpa_lite.measure.hlo_stats import stats_of
from examples import generate as gen

PROMPT = 1024  # prefill prompt tokens per sequence
SHAPES: dict[str, tuple[Callable[..., gen.GenConfig], tuple[int, ...]]] = {
    "70b": (gen.llama70b_shape, (8,)),
    "70b-gqa8": (lambda **kw: gen.llama70b_shape(n_kv_heads=8, **kw), (8,)),  # Llama-2-70B's 8 KV heads
    "7b": (gen.llama7b_shape, (1, 2, 4, 8)),
}


def hbm_floor_s(decode_args: Any, cluster: al.ClusterSpec) -> float:
    """(weights + cache bytes) / devices / HBM bandwidth: each read once per decode step."""
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(decode_args[:2]))
    return nbytes / cluster.num_devices / cluster.device.hbm_bandwidth


def timed_plan(fn: Callable[..., Any], args: Any, cluster: al.ClusterSpec,
               method: str) -> tuple[Any, float]:
    """(plan or the reason there is none, planning seconds)."""
    t0 = time.perf_counter()
    try:
        plan = al.plan(fn, *args, cluster=cluster, method=method, num_stages=1)
    except PlanningError as e:
        return f"no plan: {str(e).splitlines()[0][:80]}", time.perf_counter() - t0
    return plan, time.perf_counter() - t0


def _ms(p: Any) -> Any:
    return p.cost.total_s * 1e3 if not isinstance(p, str) else "—"


def gpu_row(name: str, cfg: gen.GenConfig, gpus: int, batch: int) -> dict:
    cluster = al.ClusterSpec.preset("dgx-h100", num_hosts=1, devices_per_host=gpus)
    prefill, decode = gen.make_steps(cfg)
    pre_args, dec_args = gen.abstract_args(cfg, batch, min(PROMPT, cfg.ctx))
    auto, plan_s = timed_plan(decode, dec_args, cluster, "auto")
    meg, _ = timed_plan(decode, dec_args, cluster, "megatron")
    pre, pre_s = timed_plan(prefill, pre_args, cluster, "auto")
    floor = hbm_floor_s(dec_args, cluster)
    ok = not isinstance(auto, str)
    return dict(shape=name, gpus=gpus, batch=batch, decode_ms=_ms(auto), floor_ms=floor * 1e3,
                over_floor=auto.cost.total_s / floor if ok else None,
                bound=auto.cost.bound if ok else str(auto),
                megatron_ms=_ms(meg), decode_tok_s=batch / auto.cost.total_s if ok else None,
                prefill_ms=_ms(pre),
                prefill_tok_s=batch * PROMPT / pre.cost.total_s if not isinstance(pre, str) else None,
                decode_plan_s=plan_s, prefill_plan_s=pre_s)


def cpu_rows() -> list[dict]:
    """The example's prefill and decode on 8 CPU devices: predicted vs compiled, per method."""
    cfg = gen.GenConfig(n_kv_heads=4)
    params, prompt = gen.example(cfg)
    prefill, decode = gen.make_steps(cfg)
    concrete = {"prefill": (prefill, (params, prompt)),
                "decode": (decode, (params, gen.empty_cache(cfg, 8), prompt[:, 0], jax.numpy.int32(8)))}
    mesh = jax.make_mesh((8,), ("x",))
    rows = []
    for phase, (fn, args) in concrete.items():
        for method in ("auto", "megatron"):
            plan = al.plan(fn, *args, mesh=mesh, method=method)
            st = stats_of(plan.compile(fn), *common.fresh(args))
            rows.append(dict(phase=phase, method=method, predicted_wire=plan.predicted_wire_bytes,
                             compiled_wire=st.wire_bytes, predicted_mem=plan.cost.peak_memory_bytes,
                             compiled_mem=st.memory_bytes))
    return rows


def run(shapes: list[str], batches: list[int], smallest: bool = False) -> dict:
    plans = [("7b", gen.llama7b_shape(n_layers=2), 2, 1)] if smallest else [
        (s, SHAPES[s][0](), g, b) for s in shapes for g in SHAPES[s][1] for b in batches]
    rows = [gpu_row(*p) for p in plans]
    common.print_table(f"Inference on dgx-h100 ({common.machine()}), bf16, context 4096, prompt {PROMPT}",
                       ["shape", "GPUs", "batch", "decode ms", "HBM floor ms", "÷ floor", "bound by",
                        "megatron ms", "decode tok/s", "prefill ms", "prefill tok/s", "plan s"],
                       [[r["shape"], r["gpus"], r["batch"], r["decode_ms"], r["floor_ms"],
                         r["over_floor"] or "—", r["bound"], r["megatron_ms"], r["decode_tok_s"] or "—",
                         r["prefill_ms"], r["prefill_tok_s"] or "—", r["decode_plan_s"]] for r in rows])
    cpu = cpu_rows()
    common.print_table("examples/generate.py on 8 CPU devices: predicted vs compiled",
                       ["phase", "method", "predicted wire B", "compiled wire B", "predicted mem B",
                        "compiled mem B"],
                       [[r["phase"], r["method"], f"{r['predicted_wire']:,.0f}", f"{r['compiled_wire']:,.0f}",
                         f"{r['predicted_mem']:,.0f}", f"{r['compiled_mem']:,}"] for r in cpu])
    return dict(rows=rows, cpu=cpu, machine=common.machine())


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["70b", "7b"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--smallest", action="store_true", help="a 2-layer 7B-class shape on 2 GPUs (smoke test)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(a.shapes, a.batches, a.smallest))
