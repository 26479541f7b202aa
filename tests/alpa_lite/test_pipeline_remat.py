"""Recomputation as the pipeline planner's decision, run for real on 8 CPU devices (2 hosts × 4).

An MLP whose activations outweigh its weights (batch 256, hidden 256, 4 layers): planned as 2
stages of 4 microbatches with every stage recomputing (``remat=True``), it equals the unsharded
step, and each stage's compiled memory (its larger program plus the microbatches it holds) is
below the same stages' when they keep their activations. With a budget that the keep plans miss
and the recompute plan meets, the default plans with recomputation and ``remat=False`` raises.
"""

from __future__ import annotations

import functools
import json

import pytest

import alpa_lite as al
from alpa_lite.ir.errors import InfeasibleError, PlanFileError, PlanningError
from tests.alpa_lite.test_pipeline_numerics import CLUSTER, mlp_example
from tests.helpers import assert_steps_equal, make_mesh

STAGES = dict(num_stages=2, num_microbatches=4)


def example():
    return mlp_example(4, batch=256, hidden=256)


@functools.cache
def planned(remat, budget=None):
    fn, args = example()
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, memory_budget=budget, remat=remat, **STAGES)
    return fn, args, plan


@functools.cache
def checked(remat):
    fn, args, plan = planned(remat)
    return plan.check(fn, *args)


def test_remat_true_equals_unsharded_and_holds_less():
    fn, args, plan = planned(True)
    assert [s.remat for s in plan.stages] == [True, True] and plan.remat == (True,) * 4
    keep = planned(False)[2]
    assert [s.layers for s in keep.stages] == [s.layers for s in plan.stages]
    assert not any(keep.remat)
    for k, r in zip(keep.stages, plan.stages):
        assert r.t_s == pytest.approx(k.t_s + r.remat_extra_s) and r.remat_extra_s > 0
        assert r.memory_bytes < k.memory_bytes and r.remat_saved_bytes > 0
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=2, atol=1e-4)


def test_compiled_memory_of_recomputing_stages_is_below_keeping():
    """Per stage, compiled (``plan.check``: the larger of forward and backward + the other
    microbatches' saved tensors): the recompute plan's below the keep plan's; its backward runs
    the forward again (more FLOPs: XLA did not drop the recomputation), and its predicted
    collectives, the recomputed forward's included, match the compiled ones."""
    keep, remat = checked(False), checked(True)
    for k, r in zip(keep.stages, remat.stages):
        print(f"stage {k.stage}: keep predicted {k.predicted_memory_bytes:,.0f} B compiled "
              f"{k.compiled_memory_bytes:,.0f} B; remat predicted {r.predicted_memory_bytes:,.0f} B compiled "
              f"{r.compiled_memory_bytes:,.0f} B")
        assert r.compiled_memory_bytes < k.compiled_memory_bytes
        flops = [{p.name: p.stats.flops for p in c.programs} for c in (k, r)]
        print(f"  FLOPs per device: keep fwd {flops[0]['fwd']:,.0f} bwd {flops[0]['bwd']:,.0f}; "
              f"remat bwd {flops[1]['bwd']:,.0f}")
        assert flops[1]["bwd"] >= flops[0]["bwd"] + 0.9 * flops[0]["fwd"]
    assert remat.ok, remat.flagged


def test_default_recomputes_where_keeping_misses_the_budget():
    """A budget between the two plans' largest stage: remat=False has no 2-stage plan, the
    default recomputes on some stage, and its compiled stages stay within the budget."""
    keep, remat = planned(False)[2], planned(True)[2]
    budget = max(s.memory_bytes for s in remat.stages) * 1.02
    assert budget < max(s.memory_bytes for s in keep.stages)
    with pytest.raises(InfeasibleError, match=r"no (2-stage )?pipeline fits.* allow recomputation \(remat=None\)"):
        planned(False, budget)
    fn, args, plan = planned(None, budget)
    assert any(s.remat for s in plan.stages)
    assert all(s.memory_bytes <= budget for s in plan.stages)
    report = plan.check(fn, *args)
    assert all(s.compiled_memory_bytes <= budget for s in report.stages), str(report)
    text = plan.summary()
    assert "recomputes: +" in text and "/microbatch less" in text
    assert "recomputes: +" in plan._repr_html_()


def test_ample_memory_keeps_every_stage():
    plan = planned(None)[2]
    assert not any(plan.remat) and "recomputation: none" in plan.summary()


def test_bad_remat_values_and_steps_without_layers():
    fn, args = example()
    for bad in ("yes", 1, "auto"):
        with pytest.raises(PlanningError, match="remat must be None"):
            al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, remat=bad, **STAGES)

    def no_vag(x):
        return x * 2

    with pytest.raises(PlanningError, match="recomputation needs the layers of a loss"):
        al.plan(no_vag, args[2], mesh=make_mesh((2, 4)), remat=True)
    # stages left open: where no recomputing pipeline fits, the one-stage candidate (which keeps
    # every activation beside pipelines) is not offered instead, and the error says where it is
    with pytest.raises(InfeasibleError, match="no pipeline with every stage recomputing fits.* num_stages=1"):
        al.plan(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, memory_budget=400e3, remat=True,
                num_microbatches=4)


def test_json_round_trip_and_older_files():
    plan = planned(True)[2]
    loaded = al.Plan.from_json(plan.to_json())
    assert loaded.to_dict() == plan.to_dict() and loaded.remat == plan.remat
    assert [s.remat_extra_s for s in loaded.stages] == [s.remat_extra_s for s in plan.stages]
    d = json.loads(plan.to_json())
    for s in d["stages"]:
        for k in ("remat", "remat_extra_s", "remat_saved_bytes"):
            del s[k]
    old = al.Plan.from_json(json.dumps(d))
    assert old.remat == (False,) * 4 and all(s.remat_saved_bytes == 0 for s in old.stages)
    d["stages"][0]["remat"] = "yes"
    with pytest.raises(PlanFileError, match="remat='yes'"):
        al.Plan.from_json(json.dumps(d))


def mlp_target():
    """For ``alpa-lite plan``: the MLP with its stage count and microbatches."""
    fn, args = example()
    return fn, args, dict(STAGES)


@pytest.mark.parametrize("flag, want", [("always", True), ("never", False)])
def test_cli_remat_flag(tmp_path, flag, want):
    from click.testing import CliRunner

    from alpa_lite.cli import cli

    path = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["plan", "tests.alpa_lite.test_pipeline_remat:mlp_target", "--mesh", "2x4",
                                   "--cluster", "cpu", "--remat", flag, "--json", str(path)])
    assert res.exit_code == 0, res.output
    stages = json.loads(path.read_text())["stages"]
    assert [s["remat"] for s in stages] == [want] * len(stages)
    assert ("recomputes: +" in res.output) == want
    shown = CliRunner().invoke(cli, ["show", str(path)])
    assert shown.exit_code == 0 and ("recomputes: +" in shown.output) == want


def test_1f1b_with_remat_equals_unsharded():
    from alpa_lite.pipeline.planner import plan_pipeline

    fn, args = mlp_example(4)
    plan = plan_pipeline(fn, *args, mesh=make_mesh((2, 4)), cluster=CLUSTER, num_stages=4, num_microbatches=4,
                         schedule="1f1b", remat=True)
    assert [s.inflight for s in plan.stages] == [4, 3, 2, 1] and all(plan.remat)
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=2, atol=1e-4)


@pytest.mark.slow
def test_gpt_pipeline_with_remat_equals_unsharded():
    """The 4-block GPT (attention, layer norms, a tied embedding) with every stage recomputing."""
    from examples import gpt

    fn, args = gpt.make_example(gpt.GPTConfig(), batch=16)
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4), "auto"), cluster=CLUSTER, remat=True, **STAGES)
    assert all(plan.remat)
    report = plan.check(fn, *args)
    print(report)
    assert report.ok, report.flagged
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=2, atol=1e-4)


def test_dots_between_keeping_and_recomputing_in_full():
    """A budget between the full-recompute plan's largest stage and what holding the matmul
    outputs too needs: the default takes "dots" (``dots_saveable``: matmul outputs held, the rest
    recomputed, less forward run again than in full) on both stages. It runs equal to the
    unsharded step; compiled, each stage holds less than keeping and more than recomputing in
    full, its backward runs part of the forward again, and the collectives are as predicted."""
    keep, full = planned(False)[2], planned(True)[2]
    budget = max(s.memory_bytes for s in full.stages) * 1.14  # above "dots" on both stages (+12 %)
    fn, args, plan = planned(None, budget)
    assert [s.remat_policy for s in plan.stages] == ["dots", "dots"] and plan.remat_policies == ("dots",) * 4
    for d, f, k in zip(plan.stages, full.stages, keep.stages):
        assert 0 < d.remat_extra_s < f.remat_extra_s and 0 < d.remat_saved_bytes < f.remat_saved_bytes
        assert f.memory_bytes < d.memory_bytes <= budget < k.memory_bytes
    assert_steps_equal(plan.compile(fn), fn, args, n_state=2, steps=2, atol=1e-4)
    report = plan.check(fn, *args)
    keep_c, full_c = checked(False), checked(True)
    for d, f, k in zip(report.stages, full_c.stages, keep_c.stages):
        assert f.compiled_memory_bytes < d.compiled_memory_bytes < k.compiled_memory_bytes
        flops = [{p.name: p.stats.flops for p in c.programs}["bwd"] for c in (k, d, f)]
        assert flops[0] < flops[1] < flops[2]
    assert report.ok, report.flagged
    loaded = al.Plan.from_json(plan.to_json())
    assert [s.remat_policy for s in loaded.stages] == ["dots", "dots"]
    assert "all but matmul outputs (dots)" in plan.summary()
