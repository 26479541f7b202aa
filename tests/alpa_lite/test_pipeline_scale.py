"""The default pipeline search: deterministic across processes, and saying what it is doing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from math import inf
from pathlib import Path
from types import SimpleNamespace

import pytest

import alpa_lite as al
from alpa_lite.ir.errors import InfeasibleError
from alpa_lite.pipeline import planner as pipeline_planner
from alpa_lite.pipeline.planner import plan_pipeline, search_counts
from tests.alpa_lite.test_pipeline_numerics import CLUSTER, mlp_example
from tests.helpers import make_mesh

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    import alpa_lite as al
    from tests.alpa_lite.test_determinism import without_times
    from tests.alpa_lite.test_pipeline_numerics import CLUSTER, mlp_example
    fn, args = mlp_example(4, batch=64)
    plan = al.plan(fn, *args, cluster=CLUSTER, num_stages=2)
    print("PLAN" + json.dumps(without_times(plan.to_dict()), sort_keys=True))
""")


def _plan_in_subprocess(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=str(ROOT))], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLAN")]
    return line[len("PLAN"):]


def test_pipeline_plan_json_is_the_same_in_two_processes():
    """Every layer ILP stops by its deterministic limit or at the optimum, never by the wall
    clock, so two fresh interpreters (other hash seeds: other set and dict orders) agree on the
    whole plan: stages, views, microbatches, every layer's specs."""
    a, b = _plan_in_subprocess("1"), _plan_in_subprocess("2")
    plan = json.loads(a)
    assert plan["pipeline"] is not None and len(plan["stages"]) == 2
    assert a == b


def test_progress_names_every_phase_of_the_search():
    fn, args = mlp_example(3)
    phases: list[str] = []
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_microbatches=2,
                   progress=phases.append)
    assert phases[0] == "DP" and phases[1] == "tracing"
    assert "pipeline B=2: tracing a microbatch" in phases
    layer_steps = [p for p in phases if p.startswith("pipeline B=2: layer ")]
    assert layer_steps and all(" on view (" in p for p in layer_steps)
    assert "pipeline B=2: stage DP" in phases and phases[-1] == "one-stage candidate"
    assert plan.timings.keys() >= {"trace_s", "layer_ilp_s", "dp_s", "one_stage_s", "total_s"}


def test_solver_note_says_when_spanning_sub_meshes_are_restricted():
    """On more than 4 hosts the sub-meshes across hosts span a power of two of them (or all):
    a restriction of the search, which the plan says."""
    fn, args = mlp_example(3)
    cluster = al.ClusterSpec.preset("dgx-h100", num_hosts=6, devices_per_host=8)
    plan = plan_pipeline(fn, *args, cluster=cluster, num_stages=2, num_microbatches=2)
    assert "power of two of hosts or all 6" in plan.solver.note
    few = plan_pipeline(fn, *args, cluster=cluster.with_mesh((4, 8), ("x", "y")), num_stages=2,
                        num_microbatches=2)
    assert "power of two" not in few.solver.note


def test_memory_floor_rules_out_every_pipeline_before_any_layer_ilp(monkeypatch):
    """Weights × state factor + in-flight activations over N·M: no stage plan can fit, so the
    layer ILPs are not solved and the error says how much is needed against what the cluster holds."""
    fn, args = mlp_example(4, batch=64)
    solved = []
    monkeypatch.setattr(pipeline_planner, "solve_layer", lambda *a, **k: solved.append(a))
    with pytest.raises(InfeasibleError, match=r"no pipeline fits: .* need at least .* over all devices"):
        plan_pipeline(fn, *args, cluster=CLUSTER, num_stages=2, memory_budget=4096)
    assert solved == []


def test_memory_floor_is_below_what_every_planned_stage_holds():
    """The floor is a lower bound: Σ over stages of devices × memory of the plan found is above it."""
    fn, args = mlp_example(4, batch=64)
    captured = {}
    real = pipeline_planner.memory_floor

    def spy(*a, **k):
        captured["floor"] = real(*a, **k)
        return captured["floor"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_planner, "memory_floor", spy)
        plan = plan_pipeline(fn, *args, cluster=CLUSTER, num_stages=2, num_microbatches=4)
    held = sum(len(s.devices) * s.memory_bytes for s in plan.stages)
    assert 0 < captured["floor"] <= held


def test_one_stage_floor_proves_nothing_fits_before_any_ilp(monkeypatch):
    """With stages left to the planner, B = 1's layers (the whole batch) give the one-stage floor
    too: over N·M, neither the layer ILPs nor the one-stage candidate run, and the error names
    both floors against what the cluster holds."""
    fn, args = mlp_example(4, batch=64)
    calls = []
    monkeypatch.setattr(pipeline_planner, "solve_layer", lambda *a, **k: calls.append("layer"))
    monkeypatch.setattr(pipeline_planner, "plan_one_stage", lambda *a, **k: calls.append("one stage"))
    with pytest.raises(InfeasibleError, match=r"no plan fits: one stage needs at least .* over all devices .*"
                                              r"a pipeline of B=1 microbatches .* hold"):
        plan_pipeline(fn, *args, cluster=CLUSTER, memory_budget=4096)
    assert calls == []


def test_one_stage_floor_is_below_what_the_one_stage_plan_holds():
    """The one-stage floor is a lower bound: devices × the one-stage plan's peak is above it, and
    above the pipelines' floor it is not (no gradient accumulator)."""
    fn, args = mlp_example(4, batch=64)
    floors = {}
    real = pipeline_planner.one_stage_floor
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_planner, "one_stage_floor", lambda *a: floors.setdefault("one", real(*a)))
        piped = plan_pipeline(fn, *args, cluster=CLUSTER, num_stages=2, num_microbatches=1)
    one = al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=1)
    assert 0 < floors["one"] < sum(len(s.devices) * s.memory_bytes for s in piped.stages)
    assert floors["one"] <= 8 * one.cost.peak_memory_bytes


def test_solver_note_names_the_microbatch_counts_tried():
    """The microbatch search stops at the first count that does not improve: a heuristic, which
    the plan's note says, with the counts it tried."""
    fn, args = mlp_example(3)
    plan = plan_pipeline(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=2)
    assert "microbatch counts tried: 1, " in plan.solver.note and "a heuristic" in plan.solver.note
    given = plan_pipeline(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=2, num_microbatches=4)
    assert "B=4 as given" in given.solver.note


def _scripted(costs):
    """``attempt`` for ``search_counts`` with a cost per count, recording the order tried."""
    tried = []

    def attempt(B):
        tried.append(B)
        return SimpleNamespace(cost=costs[B], B=B)

    return attempt, tried


COUNTS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("costs, best, tried", [
    # a deep pipeline: the bubble shrinks with B, the largest count wins after one more
    ({1: 9.0, 2: 6.0, 4: 4.0, 8: 3.0, 16: 2.5, 32: 2.2, 64: 2.1}, 64, [1, 64, 32]),
    # best in the middle, reached from the top
    ({1: 9.0, 2: 6.0, 4: 4.0, 8: 3.0, 16: 2.5, 32: 2.6, 64: 2.8}, 16, [1, 64, 32, 16, 8]),
    # one stage wins at B = 1: the largest count, then B = 2
    ({1: 1.0, 2: 1.2, 4: 1.5, 8: 2.0, 16: 2.5, 32: 3.0, 64: 4.0}, 1, [1, 64, 2]),
    # a tie between the ends goes to B = 1 and the search walks up
    ({1: 3.0, 2: 2.0, 4: 2.5, 8: 5.0, 16: 5.0, 32: 5.0, 64: 3.0}, 2, [1, 64, 2, 4]),
    # nothing fits at the ends (1F1B: more microbatches in flight at B = 1): every count is tried
    ({1: inf, 2: inf, 4: 5.0, 8: 4.0, 16: 4.5, 32: inf, 64: inf}, 8, [1, 64, 2, 4, 8, 16]),
])
def test_microbatch_counts_are_searched_from_both_ends(costs, best, tried):
    attempt, seen = _scripted(costs)
    found = search_counts(COUNTS, attempt, lambda cand: False)
    assert found.B == best and seen == tried


def test_a_binding_memory_floor_stops_the_count_search_at_once():
    attempt, seen = _scripted(dict.fromkeys(COUNTS, inf))
    assert search_counts(COUNTS, attempt, lambda cand: True).B == 1 and seen == [1]
    attempt, seen = _scripted({1: 2.0})
    assert search_counts([1], attempt, lambda cand: False).B == 1 and seen == [1]


def test_one_stage_floor_is_computed_when_microbatches_are_given(monkeypatch):
    """With ``num_microbatches`` given, B = 1 is not searched; its trace alone still gives the
    one-stage floor, so a one-stage candidate that cannot fit is not planned (on a 39B GPT its ILP
    took 380 s to prove as much). Here the floor is made to pass what the cluster holds."""
    fn, args = mlp_example(3)
    seen = []
    monkeypatch.setattr(pipeline_planner, "one_stage_floor", lambda *a: seen.append(a) or 1e30)
    monkeypatch.setattr(pipeline_planner, "plan_one_stage", lambda *a, **k: pytest.fail("planned one stage"))
    plan = plan_pipeline(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_microbatches=2)
    assert len(seen) == 1 and plan.pipeline is not None
    assert "one stage not planned: it needs at least" in plan.solver.note
