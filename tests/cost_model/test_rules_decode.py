"""What a decode step's ops cost on the roofline: windows, in-place updates, one-token matmuls.

On one 8-GPU ``dgx-h100`` host (mesh ``x`` = 8), each case's expected compute time is written
as arithmetic: bytes touched per device / 3.35 TB/s (H100 SXM HBM3), and ``hbm_s`` (the part set
by bytes) equals it, since none of these ops does enough FLOPs per byte to be compute-bound.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.result.plan import PlanCost
from alpa_lite.tracing.tracer import trace
from cost_model.builder import build_strategies
from cost_model.strategy import Strategy

CLUSTER = ClusterSpec.preset("dgx-h100").with_mesh((8,), ("x",))
HBM = 3.35e12  # bytes/s, the dgx-h100 preset's H100 SXM5
BF16 = 2

CACHE = np.zeros((8, 256, 16, 64), jnp.bfloat16)  # [batch, ctx, kv heads, head dim]
UPDATE = np.zeros((8, 1, 16, 64), jnp.bfloat16)
TABLE = np.zeros((1024, 512), jnp.bfloat16)


def strategies_of(fn, args, kind: str, resident: bool = False) -> dict[str, Strategy]:
    graph = trace(fn, *args)
    op = next(op for op in graph.ops if op.kind == kind)
    stays = frozenset(graph.inputs) if resident else frozenset()
    return {s.name: s for s in build_strategies(graph, CLUSTER, stays).strategies[op.index]}


CASES = {
    # In place: the update read and written, 2 × 8·1·16·64 bf16; split by heads, an eighth each.
    "dynamic_update_slice": (lambda c, u: lax.dynamic_update_slice(c, u, (0, 5, 0, 0)),
                             (CACHE, UPDATE), "dynamic-update-slice",
                             {"[R,R,R,R]": 2 * 8 * 16 * 64 * BF16 / HBM,
                              "[R,R,x,R]": 2 * 8 * 16 * 64 * BF16 / 8 / HBM}),
    # The 4-row window read and written, not the whole table.
    "dynamic_slice": (lambda t: lax.dynamic_slice_in_dim(t, 7, 4, axis=0), (TABLE,),
                      "dynamic-slice", {"[R,R]": 2 * 4 * 512 * BF16 / HBM,
                                        "[R,x]": 2 * 4 * 512 * BF16 / 8 / HBM}),
    # An embedding lookup of 8 rows: the rows read and written, plus the 8 int32 indices.
    "gather": (lambda t, i: t[i], (TABLE, np.arange(8, dtype=np.int32)), "gather",
               {"R": (2 * 8 * 512 * BF16 + 8 * 4) / HBM}),
    # One token per sequence: the weight dominates the bytes (2·8·4096·4096 FLOPs take 0.5 µs
    # at 989 TFLOP/s × efficiency; reading 32 MiB takes 10 µs).
    "one-token matmul": (lambda x, w: x @ w, (np.zeros((8, 4096), jnp.bfloat16),
                                              np.zeros((4096, 4096), jnp.bfloat16)), "dot",
                         {"R": (8 * 4096 + 4096 * 4096 + 8 * 4096) * BF16 / HBM,
                          "x=n": (8 * 4096 + 4096 * 4096 / 8 + 8 * 4096 / 8) * BF16 / HBM}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_decode_ops_priced_by_bytes_touched(case):
    fn, args, kind, want = CASES[case]
    strats = strategies_of(fn, args, kind)
    for name, seconds in want.items():
        assert strats[name].compute_s == pytest.approx(seconds), name
        assert strats[name].hbm_s == pytest.approx(seconds), name


def test_resident_inputs_cost_no_time_fed_inputs_their_bytes():
    """An input that stays on the devices is no kernel: the ops reading it price its bytes. An
    input fed each call is charged one pass over its per-device bytes (1024·512 bf16)."""
    stays = strategies_of(lambda t: t * 2, (TABLE,), "parameter", resident=True)
    assert stays and all(s.compute_s == 0 and s.hbm_s == 0 for s in stays.values())
    fed = strategies_of(lambda t: t * 2, (TABLE,), "parameter")
    assert fed["[R,R]"].compute_s == pytest.approx(1024 * 512 * BF16 / HBM)
    assert fed["[x,R]"].compute_s == pytest.approx(1024 * 512 * BF16 / 8 / HBM)


def test_large_matmul_is_compute_bound():
    strats = strategies_of(lambda x, w: x @ w, (np.zeros((4096, 4096), jnp.bfloat16),) * 2, "dot")
    assert strats["R"].hbm_s == 0 and strats["R"].compute_s > 0


@pytest.mark.parametrize("cost, bound", [
    (PlanCost(3.0, 1.0, 0.5, 0.0, hbm_s=2.5), "HBM bandwidth"),
    (PlanCost(3.0, 1.0, 0.5, 0.0, hbm_s=0.5), "compute"),
    (PlanCost(1.0, 1.0, 0.5, 0.0, hbm_s=0.5), "collectives"),
])
def test_plan_cost_names_its_bound(cost, bound):
    assert cost.bound == bound
