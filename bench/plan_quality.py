"""Plan quality on 8 CPU devices: compiled wire bytes and per-device memory of auto vs each
baseline, the auto / best-baseline ratio per row and its geometric mean, and the predicted step
time of each plan on the DGX-H100 preset (the same program, costed for H100s).

    python bench/plan_quality.py [--smallest] [--json out.json]
"""

from __future__ import annotations

import argparse
import math

import alpa_lite as al
import bench.common as common
from alpa_lite.measure.hlo_stats import stats_of


def run(smallest: bool = False, only: list[str] | None = None) -> dict:
    rows, records = [], []
    for name, fn, args, mesh_name, mesh in common.cases(smallest, only):
        h100 = al.ClusterSpec.preset("dgx-h100").with_mesh(tuple(mesh.axis_sizes), mesh.axis_names)
        res = {}
        for m in common.methods_for(mesh):
            plan = al.plan(fn, *args, mesh=mesh, method=m)
            st = stats_of(plan.compile(fn), *common.fresh(args))
            gpu = al.plan(fn, *args, mesh=mesh, cluster=h100, method=m)
            res[m] = dict(wire=st.wire_bytes, mem=st.memory_bytes, flops=st.flops,
                          h100_ms=gpu.cost.total_s * 1e3)
        best = min((m for m in res if m != "auto"), key=lambda m: res[m]["wire"])
        ratio = (res["auto"]["wire"] + 1) / (res[best]["wire"] + 1)
        rows.append([name, mesh_name, f"{res['auto']['wire']:,.0f}", best, f"{res[best]['wire']:,.0f}",
                     ratio, f"{res['auto']['mem']:,}", f"{res[best]['mem']:,}",
                     res["auto"]["h100_ms"], res[best]["h100_ms"]])
        records.append(dict(model=name, mesh=mesh_name, results=res, best_baseline=best, ratio=ratio))
    geo = math.exp(sum(math.log(r["ratio"]) for r in records) / max(len(records), 1))
    common.print_table(f"Plan quality ({common.machine()}); geometric mean auto/best wire bytes = {geo:.3f}",
                       ["model", "mesh", "auto wire B", "best baseline", "its wire B", "auto/best",
                        "auto mem B", "best mem B", "auto H100 ms", "best H100 ms"], rows)
    return dict(rows=records, geomean=geo, machine=common.machine())


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smallest", action="store_true", help="one small config (the smoke test)")
    ap.add_argument("--models", nargs="+", help="only these (mlp-dp mlp-tp bert gpt moe wide_resnet)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(a.smallest, a.models))
