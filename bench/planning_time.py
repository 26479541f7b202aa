"""Planning time: wall seconds of planning (tracing, strategies, ILP build, ILP solve, DP) and of
XLA compilation of the emitted program, for GPT training steps of growing depth, on 8 CPU
devices and on simulated clusters of H100s (AbstractMesh: lowered, never compiled).

    python bench/planning_time.py [--layers 12 24 48 96] [--devices 8 64 256] [--hidden 8192]
                                  [--num-stages 1] [--time-limit 600] [--batch B] [--json out.json]
    python bench/planning_time.py --smallest      # the smoke test
    python bench/planning_time.py --targets gpt96 gpt3-175b gpt-1.3b   # stages and microbatches left
                                                  # to the planner (one process per row: --targets X)

Columns on the ILP's size: "ILP nodes" (ops, output sinks, resharded copies), "after merging"
(leaders once followers are folded into them, ``ilp.merge``), "after tying" (classes once
identical layers share one strategy, ``ilp.symmetry``; 0: not tied), "CP-SAT variables" (of the
last solve), "solves" (the memory budget can take more than one, ``alpa_lite.intra.fit``).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

import alpa_lite as al
import bench.common as common
from alpa_lite.ir.errors import InfeasibleError
from examples.gpt import GPTConfig, abstract_example, real_target


def gpt_config(layers: int, hidden: int) -> GPTConfig:
    heads = max(hidden // 128, 1)
    return GPTConfig(vocab=51200 if hidden >= 1024 else 512, seq=2048 if hidden >= 1024 else 32,
                     d_model=hidden, n_heads=heads, n_layers=layers, d_ff=4 * hidden)


def one(layers: int, devices: int, hidden: int, num_stages: int | None, time_limit: float,
        flat: bool = False, batch: int | None = None, compile_: bool = True) -> dict:
    cfg = gpt_config(layers, hidden)
    batch = batch or max(8, devices)
    fn, args = abstract_example(cfg, batch=batch)
    if devices <= len(jax.devices()):
        two_d = devices >= 8 and not flat
        mesh = jax.make_mesh((devices // 4, 4) if two_d else (devices,), ("data", "model") if two_d else ("x",))
        cluster = None
    else:
        cluster = al.ClusterSpec.preset("dgx-h100", num_hosts=devices // 8)
        mesh = None
    rec: dict = dict(layers=layers, devices=devices, hidden=hidden, batch=batch)
    t0 = time.perf_counter()
    try:
        plan = al.plan(fn, *args, mesh=mesh, cluster=cluster, num_stages=num_stages, time_limit_s=time_limit)
    except InfeasibleError as e:  # a row of its own: how long planning took to say so, and why
        return dict(rec, plan_s=time.perf_counter() - t0, status="INFEASIBLE", error=str(e))
    rec.update(plan_s=time.perf_counter() - t0, **plan.timings,
               status=plan.solver.status, variables=plan.solver.variables, stages=len(plan.stages),
               ops=len(plan.op_kinds), ilp_nodes=plan.solver.nodes, leaders=plan.solver.leaders,
               tied_classes=plan.solver.tied_classes, solves=plan.solver.solves,
               predicted_step_s=plan.cost.total_s)
    t1 = time.perf_counter()
    if plan.pipeline is None and mesh is not None and compile_:
        step = plan.compile(fn)
        lowered = step.jitted.lower(*args)
        rec["lower_s"] = time.perf_counter() - t1
        lowered.compile()
        rec["xla_compile_s"] = time.perf_counter() - t1 - rec["lower_s"]
    return rec


def run(layers: list[int], devices: list[int], hidden: int, num_stages: int | None, time_limit: float,
        flat: bool = False, batch: int | None = None, compile_: bool = True) -> dict:
    rows, recs = [], []
    for d in devices:
        for n in layers:
            r = one(n, d, hidden, num_stages, time_limit, flat, batch, compile_)
            recs.append(r)
            rows.append([n, d, hidden, f"{r['plan_s']:.2f}", f"{r.get('trace_s', 0):.2f}",
                         f"{r.get('strategies_s', 0):.2f}", f"{r.get('ilp_build_s', 0):.2f}",
                         f"{r.get('ilp_solve_s', 0):.2f}", f"{r.get('dp_s', 0):.2f}", r.get("solves", 0),
                         *(f"{r.get(k, 0):,}" for k in ("ilp_nodes", "leaders", "tied_classes", "variables")),
                         r["status"], r.get("stages", 0), f"{r.get('xla_compile_s', float('nan')):.2f}"])
    common.print_table(f"Planning time ({common.machine()})",
                       ["layers", "devices", "hidden", "plan s", "trace s", "strategies s", "ILP build s",
                        "ILP solve s", "DP s", "solves", "ILP nodes", "after merging", "after tying",
                        "CP-SAT variables", "status", "stages", "XLA compile s"], rows)
    for r in recs:
        if "error" in r:
            print(f"{r['layers']} layers on {r['devices']} devices, batch {r['batch']}: {r['error']}")
    return dict(rows=recs, machine=common.machine())


# The default path at scale: ``al.plan`` with num_stages and num_microbatches left to the planner.
TARGETS = {
    # 96 layers, hidden 8192, 64 heads, sequence 1024, batch 16, vocab 51,200 (f32) on 64 H100s
    "gpt96": (lambda: abstract_example(GPTConfig(vocab=51200, seq=1024, d_model=8192, n_heads=64, n_layers=96,
                                                 d_ff=4 * 8192), batch=16),
              lambda: al.ClusterSpec.preset("dgx-h100", num_hosts=8)),
    # GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, hidden 12288, 96 heads, sequence 2048,
    # batch 1536, bf16, on 1024 A100s (128 DGX-A100 hosts)
    "gpt3-175b": (lambda: abstract_example(GPTConfig(vocab=51200, seq=2048, d_model=12288, n_heads=96,
                                                     n_layers=96, d_ff=4 * 12288, dtype=jnp.bfloat16),
                                           batch=1536),
                  lambda: al.ClusterSpec.preset("dgx-a100", num_hosts=128)),
    # GPT-3 1.3B's shape, batch 64 (examples.gpt:real_target) on 2 DGX-H100 hosts
    "gpt-1.3b": (real_target, lambda: al.ClusterSpec.preset("dgx-h100", num_hosts=2)),
}


def target_row(name: str) -> dict:
    """Plan one target with default arguments; its phases and the plan found."""
    make, make_cluster = TARGETS[name]
    fn, args = make()
    cluster = make_cluster()
    t0 = time.perf_counter()
    try:
        plan = al.plan(fn, *args, cluster=cluster)
    except al.PlanningError as e:  # a verdict too: how long it took to say no plan fits, and why
        return dict(target=name, devices=cluster.num_devices, plan_s=time.perf_counter() - t0,
                    status=f"{type(e).__name__}", predicted_step_s=math.nan, note=str(e), microbatches="",
                    stages=[])
    rec = dict(target=name, devices=cluster.num_devices, plan_s=time.perf_counter() - t0, **plan.timings,
               status=plan.solver.status, predicted_step_s=plan.cost.total_s, note=plan.solver.note,
               microbatches=plan.pipeline.num_microbatches if plan.pipeline else 1,
               stages=[dict(layers=list(s.layers), submesh=list(s.submesh), view=list(s.view or s.submesh),
                            remat=s.remat, memory_bytes=s.memory_bytes, t_s=s.t_s,
                            remat_extra_s=s.remat_extra_s, remat_saved_bytes=s.remat_saved_bytes,
                            remat_policy=s.remat_policy)
                       for s in plan.stages])
    return rec


def run_targets(names: list[str]) -> dict:
    recs = [target_row(n) for n in names]
    rows = [[r["target"], r["devices"], f"{r['plan_s']:.1f}", f"{r.get('trace_s', 0):.1f}",
             f"{r.get('layer_ilp_s', 0):.1f}", f"{r.get('dp_s', 0):.1f}", f"{r.get('one_stage_s', 0):.1f}",
             r["status"], f"{r['predicted_step_s'] * 1e3:.1f}", r["microbatches"], _stages_text(r["stages"])]
            for r in recs]
    common.print_table(f"Planning time, stages and microbatches left to the planner ({common.machine()})",
                       ["target", "devices", "plan s", "trace s", "layer ILPs s", "stage DP s",
                        "one-stage candidate s", "status", "predicted step ms", "B", "stages (layers: view)"],
                       rows)
    for r in recs:  # the solver's note: microbatch counts tried, candidates not searched, or why none fits
        if r["note"]:
            print(f"{r['target']}: {r['note']}")
    return dict(rows=recs, machine=common.machine())


def _stages_text(stages: list[dict]) -> str:
    if not stages:
        return "none"
    if len(stages) == 1:
        return f"1 stage: {tuple(stages[0]['view'])}"
    parts = [f"{s['layers'][0]}-{s['layers'][1]}: {tuple(s['view'])}" for s in stages[:4]]
    more = f" … ({len(stages)} stages)" if len(stages) > 4 else ""
    policies = [s.get("remat_policy", "full") for s in stages if s.get("remat")]
    counts = ", ".join(f"{policies.count(p)} {p}" for p in ("full", "dots") if p in policies)
    recompute = f"; {len(policies)} of {len(stages)} stages recompute ({counts})" if policies else ""
    return "; ".join(parts) + more + recompute


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48, 96])
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: max(8, devices))")
    ap.add_argument("--smallest", action="store_true", help="1 layer, hidden 64, a 1-D mesh of 8 (smoke test)")
    ap.add_argument("--no-compile", action="store_true",
                    help="plan only on real devices (XLA's compile of a 96-layer step needs more than 24 GB)")
    ap.add_argument("--targets", nargs="+", choices=sorted(TARGETS),
                    help="plan these with stages and microbatches left to the planner (instead of the series)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.targets:
        out = run_targets(a.targets)
    elif a.smallest:
        out = run([1], [8], 64, 1, 60.0, flat=True)
    else:
        out = run(a.layers, a.devices, a.hidden, a.num_stages, a.time_limit, batch=a.batch,
                  compile_=not a.no_compile)
    common.write_json(a.json, out)
