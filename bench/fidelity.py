"""Cost-model fidelity: predicted vs compiled collective bytes and per-device memory for every
plan of bench/plan_quality.py's models, with the error per row and the maximum; and predicted
vs measured step time on this machine's CPU devices, with the ``cpu`` preset and with a spec
``alpa-lite calibrate`` measured here.

    python bench/fidelity.py [--smallest] [--json out.json] [--cluster calibrated.json]

Without ``--cluster`` the script calibrates once on a 2x4 mesh (the quick mode with
``--smallest``). Wire bytes and memory do not depend on α, β or FLOP/s; predicted time does. A
plan made with the calibrated spec can differ from the preset's plan: its own program is then
timed too ("calibrated plan differs"). Measured time is the median of a few steps after a
warm-up step, each step on its own copy of the arguments (steps donate their state).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import alpa_lite as al
import bench.common as common
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.measure.calibrate import CalibrationOptions, calibrate
from alpa_lite.measure.hlo_stats import stats_of


def _err(pred: float, got: float) -> float:
    return abs(pred - got) / max(got, 1.0)


def _time_err(pred: float, got: float) -> float:
    """Signed: (predicted − measured) / measured; −0.9 is a prediction 10× too small."""
    return (pred - got) / got


def calibrated_spec(path: str | None, smallest: bool) -> tuple[ClusterSpec, float | None]:
    """The spec read from ``path``, or calibrated here on a 2x4 mesh (and its launch time T₀)."""
    if path:
        return ClusterSpec.from_json(Path(path).read_text()), None
    opts = CalibrationOptions.quick() if smallest else CalibrationOptions()
    cal = calibrate(jax.make_mesh((2, 4), ("x", "y")), opts)
    return cal.cluster, cal.launch_s


def step_time(run: Any, args: Any, shardings: Any, repeats: int) -> float:
    """Median seconds of one step after a warm-up step; each step gets its own placed copy."""
    leaves, tree = jax.tree.flatten(tuple(args))
    placements = jax.tree.leaves(shardings)  # NamedShardings, in the order of the flat arguments
    copies = [tree.unflatten(jax.device_put(jax.tree.leaves(common.fresh(leaves)), placements))
              for _ in range(repeats + 1)]
    jax.block_until_ready(copies)
    times = []
    for c in copies:
        t0 = time.perf_counter()
        jax.block_until_ready(run(*c))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _same_plan(a: Any, b: Any) -> bool:
    return (a.input_specs, a.output_specs, a.layouts) == (b.input_specs, b.output_specs, b.layouts)


def measure(name: str, fn: Any, args: Any, mesh_name: str, mesh: Any, method: str,
            cluster: ClusterSpec, repeats: int) -> dict[str, Any]:
    """One plan: predicted vs compiled bytes and memory; predicted (preset and calibrated) vs
    measured step time."""
    plan = al.plan(fn, *args, mesh=mesh, method=method)
    run = plan.compile(fn)
    st = stats_of(run, *common.fresh(args))
    rec = dict(model=name, mesh=mesh_name, method=method,
               pred_wire=plan.predicted_wire_bytes, wire=st.wire_bytes,
               pred_mem=plan.cost.peak_memory_bytes, mem=st.memory_bytes, xla_warnings=len(st.warnings))
    rec["wire_err"] = _err(rec["pred_wire"], rec["wire"])
    rec["mem_err"] = _err(rec["pred_mem"], rec["mem"])
    rec["time"] = step_time(run, args, plan.in_shardings, repeats)
    rec["pred_time_preset"] = plan.cost.total_s
    rec["time_err_preset"] = _time_err(plan.cost.total_s, rec["time"])
    cplan = al.plan(fn, *args, mesh=mesh, cluster=cluster, method=method)
    rec["calibrated_plan_differs"] = not _same_plan(plan, cplan)
    rec["time_cal"] = (step_time(cplan.compile(fn), args, cplan.in_shardings, repeats)
                       if rec["calibrated_plan_differs"] else rec["time"])
    rec["pred_time_cal"] = cplan.cost.total_s
    rec["time_err_cal"] = _time_err(cplan.cost.total_s, rec["time_cal"])
    return rec


def _bytes_table(records: list[dict[str, Any]]) -> tuple[float, float]:
    max_wire = max(r["wire_err"] for r in records)
    max_mem = max(r["mem_err"] for r in records)
    rows = [[r["model"], r["mesh"], r["method"], f"{r['pred_wire']:,.0f}", f"{r['wire']:,.0f}",
             f"{r['wire_err']:.1%}", f"{r['pred_mem']:,.0f}", f"{r['mem']:,}", f"{r['mem_err']:.1%}",
             r["xla_warnings"]] for r in records]
    common.print_table(f"Fidelity ({common.machine()}): max wire-byte error {max_wire:.1%}, "
                       f"max memory error {max_mem:.1%}",
                       ["model", "mesh", "method", "predicted wire B", "compiled wire B", "error",
                        "predicted mem B", "compiled mem B", "error", "XLA warnings"], rows)
    return max_wire, max_mem


def _time_table(records: list[dict[str, Any]], cluster: ClusterSpec, launch_s: float | None) -> dict[str, float]:
    worst = {k: max(abs(r[f"time_err_{k}"]) for r in records) for k in ("preset", "cal")}
    links = ", ".join(f"{a} α {lk.alpha * 1e6:.3g} µs β {lk.beta / 1e9:.3g} GB/s" for a, lk in cluster.axis_links)
    floor = f"; an empty program takes {launch_s * 1e3:.3g} ms" if launch_s else ""
    rows = [[r["model"], r["mesh"], r["method"], f"{r['time'] * 1e3:.3g}", f"{r['pred_time_preset'] * 1e3:.3g}",
             f"{r['time_err_preset']:+.0%}", f"{r['pred_time_cal'] * 1e3:.3g}",
             f"{r['time_cal'] * 1e3:.3g}" + (" (its own plan)" if r["calibrated_plan_differs"] else ""),
             f"{r['time_err_cal']:+.0%}"] for r in records]
    common.print_table(f"Step time on {jax.device_count()} CPU devices: max |error| with the cpu preset "
                       f"{worst['preset']:.0%}, calibrated {worst['cal']:.0%} (calibrated: {links or 'host links'}; "
                       f"{cluster.device.peak_flops / 1e9:.3g} GFLOP/s, {cluster.device.hbm_bandwidth / 1e9:.3g} GB/s "
                       f"per device{floor})",
                       ["model", "mesh", "method", "measured ms", "predicted ms (cpu preset)", "error",
                        "predicted ms (calibrated)", "measured ms (calibrated plan)", "error"], rows)
    return worst


def run(smallest: bool = False, only: list[str] | None = None, cluster_file: str | None = None,
        repeats: int | None = None) -> dict:
    cluster, launch_s = calibrated_spec(cluster_file, smallest)
    repeats = repeats or (3 if smallest else 5)
    records = []
    for name, fn, args, mesh_name, mesh in common.cases(smallest, only):
        for m in common.methods_for(mesh):
            t0 = time.perf_counter()
            records.append(measure(name, fn, args, mesh_name, mesh, m, cluster, repeats))
            print(f"[fidelity] {name} {mesh_name} {m}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    max_wire, max_mem = _bytes_table(records)
    worst = _time_table(records, cluster, launch_s)
    return dict(rows=records, max_wire_error=max_wire, max_memory_error=max_mem,
                max_time_error_preset=worst["preset"], max_time_error_calibrated=worst["cal"],
                calibrated_cluster=cluster.to_dict(), launch_s=launch_s, machine=common.machine())


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smallest", action="store_true", help="one small config (the smoke test)")
    ap.add_argument("--models", nargs="+", help="only these (mlp-dp mlp-tp bert gpt moe wide_resnet)")
    ap.add_argument("--cluster", help="a ClusterSpec JSON from 'alpa-lite calibrate' (default: calibrate now)")
    ap.add_argument("--repeats", type=int, help="timed steps per plan (default 5; 3 with --smallest)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(a.smallest, a.models, a.cluster, a.repeats))
