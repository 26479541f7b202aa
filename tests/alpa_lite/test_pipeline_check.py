"""Pipeline plans list their predicted collectives per stage and program, ``plan.check`` compares
them with each stage's compiled programs, and data-parallel gradients are reduced once per step
(accumulated unreduced over microbatches), not once per microbatch. 8 CPU devices as 2 hosts × 4,
2 stages, 4 microbatches."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import optax
import pytest
from rich.console import Console

import alpa_lite as al
from alpa_lite.measure.hlo_stats import stats_of
from alpa_lite.pipeline.check import stage_examples
from alpa_lite.pipeline.layers import view_cluster
from alpa_lite.pipeline.runtime import compile_pipeline
from alpa_lite.report.terminal import check_renderable
from cost_model.collectives import collective_time
from cost_model.strategy import Collective
from examples import gpt
from examples.mlp import init_params
from tests.alpa_lite.test_pipeline_numerics import CLUSTER, gpt_pipeline, mlp_example
from tests.helpers import assert_steps_equal, fresh, make_mesh

B = 4


def plan_of(fn, args, mesh_type="explicit"):
    return al.plan(fn, *args, mesh=make_mesh((2, 4), mesh_type), cluster=CLUSTER, num_stages=2,
                   num_microbatches=B)


def data_parallel_mlp():
    """Batch ≫ hidden: the layer plans split the batch, so weight gradients are partial sums."""
    return mlp_example(4, batch=2048, hidden=64, dim=64)


CASES = {
    "mlp_data_parallel": (data_parallel_mlp, "explicit"),
    "gpt_b16": (None, "auto"),  # Megatron-style ops too: the plan test_pipeline_numerics runs
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_compares_each_stage_with_its_compiled_programs(case):
    make, mesh_type = CASES[case]
    if make is None:
        fn, args, plan = gpt_pipeline(2)  # planned as plan_of would, once per session
        args = fresh(args)
    else:
        fn, args = make()
        plan = plan_of(fn, args, mesh_type)
    assert {c.stage for c in plan.collectives} == {0, 1}
    assert {"fwd", "bwd", "sync", "send"} <= {c.phase for c in plan.collectives}
    assert all(c.runs == (1 if c.phase == "sync" else B) for c in plan.collectives)
    loaded = al.Plan.from_json(plan.to_json())
    assert loaded.collectives == plan.collectives

    report = plan.check(fn, *args)
    print(report)
    assert [s.stage for s in report.stages] == [0, 1]
    for s in report.stages:
        print(f"{case} stage {s.stage}: predicted {s.predicted_wire_bytes:,.0f} B, compiled "
              f"{s.compiled_wire_bytes:,.0f} B per device per step; transfers predicted "
              f"{s.predicted_send_bytes:,.0f} B, moved {s.moved_send_bytes:,.0f} B")
        assert s.compiled_wire_bytes > 0
        assert abs(s.predicted_wire_bytes - s.compiled_wire_bytes) <= 0.10 * s.compiled_wire_bytes + 1024
        assert s.predicted_send_bytes == pytest.approx(s.moved_send_bytes) and s.moved_send_bytes > 0
        names = [p.name for p in s.programs]
        assert names[:2] == ["fwd", "bwd"] and "sync" in names
        assert [p.runs for p in s.programs if p.name in ("fwd", "bwd")] == [B, B]
        assert f"stage {s.stage} (devices" in str(report)
    assert report.ok, report.flagged
    sends = sum(c.wire_bytes() for c in plan.collectives if c.kind == "send")
    assert plan.predicted_wire_bytes == pytest.approx(report.predicted_wire_bytes + sends)

    out = io.StringIO()
    Console(file=out, width=200).print(check_renderable(report, plan))  # what `alpa-lite check` prints
    assert "Per stage" in out.getvalue() and "✓" in out.getvalue()


def grad_all_reduce_bytes(runner, args):
    """Per stage, ``(backward, sync)``: all-reduce wire bytes per device of one microbatch's
    backward program and of the gradient sync program (0 without one), as compiled."""
    runner.build(args)
    out = []
    for p, sp in enumerate(runner.stages):
        ex = stage_examples(runner, p)
        bwd = stats_of(sp.bwd, *ex["bwd"]).by_kind().get("all-reduce", (0, 0.0))[1]
        sync = stats_of(sp.reduce, *ex["reduce"]).by_kind().get("all-reduce", (0, 0.0))[1] if "reduce" in ex else 0.0
        print(f"stage {p}: backward all-reduce {bwd:,.0f} B × {B}, sync {sync:,.0f} B")
        out.append((bwd, sync))
    return out


DATA_PARALLEL = {
    "mlp": (data_parallel_mlp, "explicit"),
    # the GPT's embedding (a scatter-add gradient), norms and attention too: slow (~10 s, eight
    # stage programs compiled and the GPT step run)
    "gpt": (lambda: gpt.make_example(gpt.GPTConfig(), batch=64), "auto"),
}


@pytest.mark.parametrize("case", ["mlp", pytest.param("gpt", marks=pytest.mark.slow)])
def test_gradients_are_reduced_once_per_step(case):
    """A data-parallel step (an MLP at batch 2048, a GPT at batch 64): every weight gradient is a
    partial sum over the batch axis. Accumulated unreduced, the step all-reduces them once, not
    once per microbatch: what a stage's backward all-reduces per microbatch without deferring is
    what it all-reduces with (activations' all-reduces, if its plan has any) plus its sync, so
    the gradients' bytes fall B = 4 times. The stage cost charges that sync in u_i; the step
    still equals the unsharded adam step over 3 steps."""
    make, mesh_type = DATA_PARALLEL[case]
    fn, args = make()
    plan = plan_of(fn, args, mesh_type)
    deferred = compile_pipeline(plan, fn)
    per_microbatch = compile_pipeline(plan, fn, defer_gradients=False)
    after = grad_all_reduce_bytes(deferred, args)
    before = grad_all_reduce_bytes(per_microbatch, args)
    for (bwd_after, sync), (bwd_before, no_sync) in zip(after, before, strict=True):
        assert no_sync == 0
        assert bwd_before == pytest.approx(bwd_after + sync, rel=1e-6)
    grads = sum(sync for _, sync in after)
    activations = sum(bwd for bwd, _ in after)
    print(f"gradient all-reduce bytes per device per step: {B * grads:,.0f} per microbatch, {grads:,.0f} "
          f"deferred; other backward all-reduces {B * activations:,.0f}")
    assert grads > B * activations  # the step's all-reduces are mostly its gradients'
    for sp in deferred.stages:
        assert sp.stacked and not per_microbatch.stages[sp.index].stacked
    for p, st in enumerate(plan.stages):
        sync = [c for c in plan.collectives if c.stage == p and c.phase == "sync"]
        vc = view_cluster(CLUSTER, st.view)
        sync_s = sum(collective_time(Collective(c.kind, c.axes, c.nbytes, c.group_size), vc) for c in sync)
        assert 0 < sync_s <= st.u_s
    assert_steps_equal(deferred, fn, args, n_state=2, steps=3, atol=1e-4)


def test_gradient_that_is_not_a_partial_sum_is_reduced_per_microbatch():
    """An L2 term inside the loss adds 2λw to the data gradient of w in w's layer: that
    gradient is not a pure partial sum, so it is reduced as it comes; the biases' still wait for
    the sync."""
    fn0, (params, _, x, y) = data_parallel_mlp()
    opt = optax.adam(1e-3)

    def loss_fn(p, x, y):
        h, penalty = x, 0.0
        for i in range(4):  # the penalty of w in w's layer: its gradient adds there
            w = p[f"layer{i}"]["w"]
            h, penalty = h @ w + p[f"layer{i}"]["b"], penalty + 1e-3 * jnp.sum(w ** 2)
            if i < 3:
                h, penalty = al.mark_layer((jax.nn.gelu(h), penalty))
        return jnp.mean((h - y) ** 2) + penalty

    def step(p, s, x, y):
        loss, g = al.value_and_grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    args = (params, opt.init(params), x, y)
    plan = plan_of(step, args)
    run = plan.compile(step)
    assert_steps_equal(run, step, args, n_state=2, steps=3, atol=1e-4)
    kept = [(v.aval.shape, v in sp.stacked) for sp in run.stages for v in sp.accums]
    assert any(s for _, s in kept) and not any(s for shape, s in kept if len(shape) == 2)
    report = plan.check(step, *args)
    print(report)
    assert report.ok, report.flagged


def test_weight_shared_by_layers_and_stages():
    """One weight read by layers 0, 1 and 3, in both stages: each stage accumulates its own
    contributions (unreduced when every one in the stage is a partial sum over the same axes,
    else each reduced as it comes: here layer 0 is planned column-split), syncs them, and the
    two stages' gradients add before the update."""
    opt = optax.adam(1e-3)
    d = 64

    def loss_fn(p, x, y):
        h = x
        for i in range(4):
            w = p["shared"] if i in (0, 1, 3) else p["w2"]
            h = h @ w + p[f"b{i}"]
            if i < 3:
                h = al.mark_layer(jax.nn.gelu(h))
        return jnp.mean((h - y) ** 2)

    def step(p, s, x, y):
        loss, g = al.value_and_grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    layers = init_params(k1, [d] * 3)
    params = {"shared": layers["layer0"]["w"], "w2": layers["layer1"]["w"],
              **{f"b{i}": jnp.zeros((d,)) for i in range(4)}}
    x = jax.random.normal(k2, (2048, d))
    y = jax.random.normal(k3, (2048, d))
    args = (params, opt.init(params), x, y)
    plan = plan_of(step, args)
    run = plan.compile(step)
    assert_steps_equal(run, step, args, n_state=2, steps=3, atol=1e-4)
    assert all(any(v.aval.shape == (d, d) for v in sp.accums) for sp in run.stages)
    assert any(sp.stacked for sp in run.stages)
    assert plan.check(step, *args).ok


def test_cli_check_of_a_saved_pipeline_plan(tmp_path):
    """`alpa-lite check TARGET --plan FILE --strict` on a saved 2-stage plan: a row per stage,
    nothing flagged (exit status 0)."""
    from click.testing import CliRunner

    from alpa_lite.cli import cli

    fn, args = data_parallel_mlp()
    path = tmp_path / "plan.json"
    path.write_text(plan_of(fn, args).to_json())
    res = CliRunner().invoke(cli, ["check", "tests.alpa_lite.test_pipeline_check:data_parallel_mlp",
                                   "--plan", str(path), "--strict"])
    print(res.output)
    assert res.exit_code == 0, res.output
    assert "Per stage" in res.output and "✓" in res.output
    rows = [line for line in res.output.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) >= 2


def test_stacked_accumulators_need_every_contribution_deferred_alike():
    from alpa_lite.pipeline.accum import stacked_accumulators

    got = stacked_accumulators([("w", ("dp",)), ("w", ("dp",)), ("b", ("dp",)), ("b", None),
                                ("u", ("dp",)), ("u", ("dp", "tp")), ("v", None)])
    assert got == {"w": ("dp",)}
