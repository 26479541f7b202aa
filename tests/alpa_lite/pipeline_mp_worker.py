"""One process of a 2-process × 4-CPU-device job (tests/alpa_lite/test_pipeline_multiprocess.py).

    python -m tests.alpa_lite.pipeline_mp_worker PROCESS_ID PORT one-stage|pipeline

Every process plans the same step (the ILPs here are solved to optimality well within their time
limits by one CP-SAT worker with a fixed seed, so the plans agree; the test checks they do),
compiles it for the 8 global devices, runs it, and checks its addressable shards against the
unsharded step computed on one local device.

one-stage: an MLP adam step planned on the 2×4 mesh, fed global arrays, 2 steps.
pipeline:  a 4-layer MLP adam step in 2 stages, one per process, 4 microbatches, fed host
           (numpy) arrays on the first step and its own outputs after, 3 steps; activations and
           their gradients cross processes with JAX's cross-host transfers.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{port + 1 + process_id}")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import hashlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import alpa_lite as al  # noqa: E402
from examples.mlp import make_example  # noqa: E402


def global_array(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def same_plan_everywhere(plan: al.Plan) -> None:
    d = plan.to_dict()
    decided = {k: d[k] for k in ("input_specs", "output_specs", "layouts", "stages", "pipeline")}
    digest = hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).digest()[:8]
    multihost_utils.assert_equal(np.frombuffer(digest, np.uint32), "processes planned differently")


def check(out, want, k: int) -> None:
    for got, exp in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
        exp = np.asarray(exp)
        for shard in got.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), exp[shard.index], rtol=1e-4, atol=1e-4,
                                       err_msg=f"step {k}")


def pipeline() -> None:
    from tests.alpa_lite.test_pipeline_numerics import mlp_example

    fn, args = mlp_example(4)
    args = jax.tree.map(np.asarray, args)
    mesh = jax.make_mesh((2, 4), ("host", "device"), devices=jax.devices())
    plan = al.plan(fn, *args, mesh=mesh, num_stages=2, num_microbatches=4)
    same_plan_everywhere(plan)
    assert [s.devices for s in plan.stages] == [(0, 1, 2, 3), (4, 5, 6, 7)], plan.stages
    step = plan.compile(fn)
    local = jax.local_devices()[0]
    ref = jax.tree.map(lambda a: jax.device_put(a, local), list(args))
    cur = list(args)
    for k in range(3):
        out = step(*cur)
        want = fn(*ref)
        check(out, want, k)
        cur, ref = [*out[:2], *cur[2:]], [*want[:2], *ref[2:]]
    print(f"process {process_id}: 2-stage pipeline across processes equals the unsharded step", flush=True)


def main() -> None:
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    if case == "pipeline":
        return pipeline()
    fn, args = make_example(batch=64, hidden=128, layers=2, dim=32, optimizer="adam")
    args = jax.tree.map(np.asarray, args)
    mesh = jax.make_mesh((2, 4), ("host", "device"), devices=jax.devices())
    plan = al.plan(fn, *args, mesh=mesh, num_stages=1)
    same_plan_everywhere(plan)
    assert plan.cluster["devices_per_host"] == 4, plan.cluster  # 2 processes: 2 hosts
    step = plan.compile(fn)
    sharded = [jax.tree.map(global_array, a, s) for a, s in zip(args, plan.in_shardings)]
    local = jax.local_devices()[0]
    ref = jax.tree.map(lambda a: jax.device_put(a, local), list(args))
    for k in range(2):
        out = step(*sharded)
        want = fn(*ref)
        check(out, want, k)
        sharded = [*out[:2], *sharded[2:]]
        ref = [*want[:2], *ref[2:]]
    print(f"process {process_id}: one-stage plan across processes equals the unsharded step", flush=True)


if __name__ == "__main__":
    main()
    jax.distributed.shutdown()
