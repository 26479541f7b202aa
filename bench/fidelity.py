"""Cost-model fidelity: predicted vs compiled collective bytes and per-device memory for every
plan of bench/plan_quality.py's models, with the error per row and the maximum.

    python bench/fidelity.py [--smallest] [--json out.json]
"""

from __future__ import annotations

# ruff: noqa: I001  (bench.common sets XLA_FLAGS before jax is imported)
import argparse

import bench.common as common

import alpa_lite as al
from alpa_lite.hlo_stats import stats_of

def _err(pred: float, got: float) -> float:
    return abs(pred - got) / max(got, 1.0)


def run(smallest: bool = False, only: list[str] | None = None) -> dict:
    rows, records = [], []
    for name, fn, args, mesh_name, mesh in common.cases(smallest, only):
        for m in common.methods_for(mesh):
            plan = al.plan(fn, *args, mesh=mesh, method=m)
            st = stats_of(plan.compile(fn), *common.fresh(args))
            rec = dict(model=name, mesh=mesh_name, method=m,
                       pred_wire=plan.predicted_wire_bytes, wire=st.wire_bytes,
                       pred_mem=plan.cost.peak_memory_bytes, mem=st.memory_bytes,
                       xla_warnings=len(st.warnings))
            rec["wire_err"] = _err(rec["pred_wire"], rec["wire"])
            rec["mem_err"] = _err(rec["pred_mem"], rec["mem"])
            records.append(rec)
            rows.append([name, mesh_name, m, f"{rec['pred_wire']:,.0f}", f"{rec['wire']:,.0f}",
                         f"{rec['wire_err']:.1%}", f"{rec['pred_mem']:,.0f}", f"{rec['mem']:,}",
                         f"{rec['mem_err']:.1%}", rec["xla_warnings"]])
    max_wire = max(r["wire_err"] for r in records)
    max_mem = max(r["mem_err"] for r in records)
    common.print_table(f"Fidelity ({common.machine()}): max wire-byte error {max_wire:.1%}, "
                       f"max memory error {max_mem:.1%}",
                       ["model", "mesh", "method", "predicted wire B", "compiled wire B", "error",
                        "predicted mem B", "compiled mem B", "error", "XLA warnings"], rows)
    return dict(rows=records, max_wire_error=max_wire, max_memory_error=max_mem, machine=common.machine())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smallest", action="store_true", help="one small config (the smoke test)")
    ap.add_argument("--models", nargs="+", help="only these (mlp-dp mlp-tp bert gpt moe wide_resnet)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(a.smallest, a.models))
