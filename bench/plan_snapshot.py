"""Plan JSON of the bench models, without timing fields, one file per case: run before and after a
change that must not change plans, then compare the two folders.

    python bench/plan_snapshot.py OUT_DIR [--only mlp-dp,gpt]
    diff -r BEFORE_DIR AFTER_DIR

Cases: every bench model on the 2x4 mesh with ``auto`` and ``megatron``, the scanned GPT
(``examples/scan_gpt.py``, a scan planned as one repeated layer) and a 2-stage pipeline of the
GPT. Uses the public API only, so the script runs unchanged on both sides of a restructuring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

# Wall-clock figures differ from run to run; everything else in a plan must not.
TIMING_KEYS = frozenset({"timings", "wall_s"})


def without_timings(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: without_timings(v) for k, v in d.items() if k not in TIMING_KEYS}
    if isinstance(d, list):
        return [without_timings(v) for v in d]
    return d


def cases(only: set[str]) -> Iterator[tuple[str, Callable[[], Any]]]:
    import jax

    import alpa_lite as al
    import bench.common as common

    mesh = jax.make_mesh((2, 4), ("x", "y"))
    for name, make in common.model_configs(only=sorted(only) if only else None).items():
        fn, args = make()
        for method in ("auto", "megatron"):
            yield f"{name}_{method}", lambda fn=fn, args=args, method=method: al.plan(
                fn, *args, mesh=mesh, method=method, num_stages=1)
    if not only or "scan_gpt" in only:
        from examples.scan_gpt import target as scan_target

        fn, args = scan_target()
        yield "scan_gpt_auto", lambda: al.plan(fn, *args, mesh=mesh, num_stages=1)
    if not only or "gpt_pipeline" in only:
        from examples.gpt import make_example

        fn, args = make_example()
        yield "gpt_pipeline", lambda: al.plan(fn, *args, mesh=mesh, num_stages=2, num_microbatches=2)


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--only", default="", help="comma-separated case prefixes (model names)")
    a = parser.parse_args()
    only = {s for s in a.only.split(",") if s}
    os.makedirs(a.out_dir, exist_ok=True)
    for name, make in cases(only):
        d = without_timings(json.loads(make().to_json()))
        with open(os.path.join(a.out_dir, f"{name}.json"), "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)
        print(name, flush=True)


if __name__ == "__main__":
    main()
