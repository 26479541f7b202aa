"""Planning time of the Flax linen LM (examples/flax_lm.py, TrainState + adamw) in issue #16's two
cases, on the 2x4 mesh of 8 CPU devices: wall seconds per phase, the ILP's size and which solver
decided (the LP relaxation, ``ilp.lp_first``, or CP-SAT).

    python -m bench.flax_planning [--repeat 3] [--json out.json]

Case a: vocab 128, width 64, batch 32 x 16 tokens; case b: vocab 256, width 256, batch 8 x 16;
both 2 blocks, 4 heads, no dropout (as the issue wrote them). Wall times depend on what else runs
on the machine: the load average is printed beside each row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import bench.common as common

CASES = {"a": dict(vocab=128, width=64, batch=32, seq=16), "b": dict(vocab=256, width=256, batch=8, seq=16)}


class _SolverLog(logging.Handler):
    """Whether the LP decided, and CP-SAT's deterministic units when it ran."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lp, self.units = False, 0.0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("LP relaxation integral"):
            self.lp = True
        if text.startswith("CP-SAT ") and "deterministic units" in text:
            self.units += float(text.split("(")[-1].split()[0])


def one(case: str) -> dict:
    import jax

    import alpa_lite as al
    from examples.flax_lm import make_example

    fn, args = make_example(**CASES[case], layers=2, heads=4, dropout=0.0)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    handler = _SolverLog()
    logger = logging.getLogger("alpa_lite.ilp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        plan = al.plan(fn, *args, mesh=mesh)
        wall = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
    s = plan.solver
    return {"case": case, **CASES[case], "plan_s": round(wall, 2),
            **{k: round(v, 2) for k, v in plan.timings.items()},
            "status": s.status, "objective_ms": round(s.objective * 1e3, 4), "nodes": s.nodes,
            "leaders": s.leaders, "variables": s.variables,
            "decided_by": "LP" if handler.lp and not handler.units else "CP-SAT",
            "cp_sat_units": round(handler.units, 2), "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    opts = parser.parse_args()
    rows = [one(case) for _ in range(opts.repeat) for case in CASES]
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items()))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    common.use_cpu_devices()
    main()
