"""The long fuzz run: random JAX programs on random 8-device meshes, planned, compiled, run twice
against the unsharded function, predicted vs compiled collective wire bytes (tests/fuzz).

    python bench/fuzz_long.py --examples 500 [--seed 0] [--max-ops 10] [--baselines]
    python -m bench.fuzz_long --examples 500              # the same

Unlike the test (which stops at the first failure and shrinks it), this runs every example and
counts: programs tried, planned, refused (a PlanningError where jax refuses the program too),
with collectives, wire-byte mismatches (beyond 10% + 256 B; "explained" when XLA announced an
involuntary full rematerialization, a documented modelling limit) and failures (wrong numbers,
crashes). Each mismatch and failure is printed with its program. Exit status 1 when anything
is unexplained. About 0.4 s a program on 2 CPU cores.
"""

from __future__ import annotations

# ruff: noqa: I001, E402  (the repository root goes on sys.path before the project is imported)
import argparse
import logging
import pathlib
import sys
import time
import traceback
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also as a plain script
import bench.common
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.fuzz.harness import run_case
from tests.fuzz.programs import cases

BASELINES = ("data_parallel", "zero3", "megatron")


def fuzz(examples: int, seed_: int, max_ops: int, baselines: bool) -> Counter:
    counts: Counter = Counter()

    def one(case, method: str) -> None:
        key = "" if method == "auto" else f"{method} "
        try:
            out = run_case(case, method=method)
        except Exception as e:  # noqa: BLE001 - count and show every failure, keep going
            counts[key + "failures"] += 1
            print(f"=== FAILURE ({method}): {type(e).__name__}\n{str(e)[:4000]}\n{case}")
            traceback.print_exc(limit=3)
            return
        counts[key + "planned" if not out.rejected else key + "refused"] += 1
        counts[key + "with collectives"] += out.compiled_wire_bytes > 0
        if out.mismatch:
            kind = "explained mismatches" if out.explained else "mismatches"
            counts[key + kind] += 1
            print(f"=== {kind.upper()} ({method})\n{out.report()}")
        sys.stdout.flush()

    @seed(seed_)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases(max_ops=max_ops))
    def run(case) -> None:
        counts["programs tried"] += 1
        one(case, "auto")
        if baselines:
            one(case, BASELINES[counts["programs tried"] % len(BASELINES)])

    run()
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=500, help="programs to try (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--max-ops", type=int, default=10, help="ops per program at most (default 10)")
    ap.add_argument("--baselines", action="store_true",
                    help="also plan each program with a baseline (data_parallel, zero3, megatron in turn)")
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # missing-rule warnings etc.: the counts say what matters
    t0 = time.perf_counter()
    counts = fuzz(a.examples, a.seed, a.max_ops, a.baselines)
    print(f"\nfuzz: seed {a.seed}, max {a.max_ops} ops, {time.perf_counter() - t0:.0f} s")
    for k in ("programs tried", "planned", "refused", "with collectives", "mismatches",
              "explained mismatches", "failures"):
        print(f"  {k:<22}{counts[k]:>6}")
    for k in sorted(k for k in counts if k.split()[0] in BASELINES):
        print(f"  {k:<34}{counts[k]:>6}")
    bad = sum(v for k, v in counts.items() if k.split()[-1] in ("failures", "mismatches") and "explained" not in k)
    return 1 if bad else 0


if __name__ == "__main__":
    bench.common.use_cpu_devices()
    sys.exit(main())
