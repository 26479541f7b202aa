"""Plan reports: the text summary, the HTML view (Jupyter), the comparison table, progress."""

from __future__ import annotations

import io
import math
import re
from dataclasses import replace
from html import escape

import jax
import pytest
from rich.console import Console

import alpa_lite as al
from alpa_lite.report.html import COST_COLOURS, STAGE_COLOURS, mesh_svg
from alpa_lite.report.progress import PlanProgress
from alpa_lite.report.rows import tensor_rows
from alpa_lite.report.terminal import Comparison, check_renderable, plan_summary, to_text
from alpa_lite.result.plan import StageInfo
from examples.mlp import make_example
from tests.helpers import make_mesh

ESC = "\x1b["


@pytest.fixture(scope="module")
def case():
    fn, args = make_example(batch=16, hidden=128, layers=2, dim=32, optimizer="sgd")
    mesh = make_mesh((2, 4))
    return fn, args, al.plan(fn, *args, mesh=mesh)


@pytest.fixture(scope="module")
def plan(case):
    return case[2]


def two_stages(plan):
    """The plan drawn as a 2-stage pipeline: the mesh's first row, then its second."""
    s = plan.stages[0]
    return replace(plan, stages=(StageInfo((0, 0), (1, 4), (0, 1, 2, 3), s.cost_s / 2, s.memory_bytes),
                                 StageInfo((1, 1), (1, 4), (4, 5, 6, 7), s.cost_s / 2, s.memory_bytes)))


def test_tensor_rows_give_the_per_device_piece(plan):
    rows = tensor_rows(plan, "in")
    assert len(rows) == len(plan.input_specs) == 2 * 2 + 2  # w, b per layer; x, y
    sizes = {"x": 2, "y": 4}
    for r, spec, (shape, _) in zip(rows, plan.input_specs, plan.signature):
        assert r.spec == spec and r.shape == shape
        assert r.local_shape == tuple(-(-n // spec.dim_factor(d, sizes)) for d, n in enumerate(shape))
        assert r.local_bytes == 4 * math.prod(r.local_shape)  # float32
    names = [r.name for r in rows]
    assert names[:4] == ["args[0]['layer0']['b']", "args[0]['layer0']['w']",
                         "args[0]['layer1']['b']", "args[0]['layer1']['w']"]
    assert names[4:] == ["args[2]", "args[3]"]  # args[1], sgd's state, has no arrays
    named = tensor_rows(plan, "in", arg_names=["params", "opt_state", "x", "y"])
    assert [r.name for r in named][-3:] == ["params['layer1']['w']", "x", "y"]


def test_summary_lists_every_input_with_its_sharding(plan):
    text = plan.summary()
    assert ESC not in text
    for r in tensor_rows(plan, "in"):
        line = next(ln for ln in text.splitlines() if f" {r.name} " in ln)
        assert r.pspec_text in line and r.type_text in line
    total = plan.cost.total_s
    assert f"predicted step {total * 1e6:.1f} µs" in text or f"predicted step {total * 1e3:.3f} ms" in text
    assert f"Solver: {plan.solver.status}" in text
    assert f"Predicted collectives ({len(plan.collectives)};" in text



def test_loaded_plan_reports_without_the_program(plan):
    loaded = al.Plan.from_json(plan.to_json())
    text = plan_summary(loaded)
    assert "no devices attached (loaded plan)" in text
    assert f"input[{len(plan.input_specs) - 1}]" in text
    html = loaded._repr_html_()
    assert html.count("class='alpa-lite-in-row'") == len(plan.input_specs)
    assert html.count("class='alpa-lite-out-row'") == len(plan.output_specs)


def test_html_has_a_row_per_input_and_output(plan):
    html = plan._repr_html_()
    inputs = tensor_rows(plan, "in")
    assert html.count("class='alpa-lite-in-row'") == len(inputs)
    assert html.count("class='alpa-lite-out-row'") == len(plan.output_specs)
    for r in inputs:
        assert f"<code>{escape(r.name)}</code>" in html  # names hold quotes: escaped
        assert f"<code>{escape(r.pspec_text)}</code>" in html
    assert html.count("<tr>", html.index("alpa-lite-collectives")) == len(plan.collectives) + 1


def test_html_is_self_contained(plan):
    html = plan._repr_html_()
    assert "<script" not in html.lower()
    assert not re.search(r"\b(src|href)=", html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)  # only the SVG namespace


def test_mesh_drawing_one_stage_colours_every_device(plan):
    svg = mesh_svg(plan)
    assert svg.startswith("<svg class='alpa-lite-mesh'")
    cells = re.findall(r"<rect class='alpa-lite-device' data-stage='(\d*)'[^>]*fill='(#\w+)'", svg)
    assert cells == [("0", STAGE_COLOURS[0])] * 8
    assert "device 6 (x=1, y=2): stage 0" in svg


def test_mesh_drawing_shows_stage_to_submesh_assignment(plan):
    html = two_stages(plan)._repr_html_()
    cells = re.findall(r"<rect class='alpa-lite-device' data-stage='(\d*)'[^>]*fill='(#\w+)'", html)
    assert cells == [("0", STAGE_COLOURS[0])] * 4 + [("1", STAGE_COLOURS[1])] * 4
    assert "stage 0: layer 0 on sub-mesh 1×4 (4 devices)" in html
    assert "stage 1: layer 1 on sub-mesh 1×4 (4 devices)" in html


def test_cost_bars_are_proportional(plan):
    html = plan._repr_html_()
    widths = {p: float(w) for p, w in re.findall(r"class='alpa-lite-bar' data-part='([\w/]+)'[^>]*width='([\d.]+)'",
                                                 html)}
    assert set(widths) == {*COST_COLOURS, "memory/device"}
    c = plan.cost
    full = 470 - 110 - 150  # bar length of the whole step
    for part, v in (("compute", c.compute_s), ("communication", c.communication_s), ("resharding", c.resharding_s)):
        want = 0.0 if v == 0 else max(1.0, v / c.total_s * full)
        assert widths[part] == pytest.approx(want, abs=0.06), part


def test_comparison_table(case):
    fn, args, plan = case
    baseline = al.plan(fn, *args, mesh=plan.mesh, method="data_parallel")
    comp = Comparison({"auto": plan, "data_parallel": baseline, "megatron": "no plan fits"})
    assert comp.best == ("auto" if plan.cost.total_s <= baseline.cost.total_s else "data_parallel")
    rows = {r["method"]: r for r in comp.rows()}
    assert rows["auto"]["vs_auto"] == 1.0
    assert rows["data_parallel"]["vs_auto"] == pytest.approx(baseline.cost.total_s / plan.cost.total_s)
    assert rows["megatron"] == {"method": "megatron", "error": "no plan fits"}
    text = str(comp)
    assert re.search(r"^auto ★\s", text, re.M) and re.search(r"^data_parallel\s", text, re.M)
    assert "failed: no plan fits" in text
    html = comp._repr_html_()
    assert html.count("<tr>") == 4 and "failed: no plan fits" in html


def test_progress_draws_phases_on_a_terminal(case):
    fn, args, plan = case
    buf = io.StringIO()
    with PlanProgress(Console(file=buf, force_terminal=True, force_jupyter=False, width=80)) as progress:
        al.plan(fn, *args, mesh=plan.mesh, progress=progress)
    assert progress.phases == ["tracing", "strategies", "ILP"]
    assert ESC in buf.getvalue() and "ILP" in buf.getvalue()


def test_progress_is_silent_off_a_terminal(case):
    fn, args, plan = case
    buf = io.StringIO()
    with PlanProgress(Console(file=buf, force_terminal=False, force_jupyter=False)) as progress:
        al.plan(fn, *args, mesh=plan.mesh, method="megatron", progress=progress)
    assert progress.phases == ["tracing", "strategies", "ILP"]
    assert buf.getvalue() == ""


def test_check_report_flags_what_check_flags(case):
    fn, args, plan = case
    report = plan.check(fn, *args)
    text = to_text(check_renderable(report, plan), width=120)
    for row in report.rows:
        assert re.search(rf"^{row.kind}\s+{row.predicted_count}×", text, re.M), row.kind
    assert ("✓ compiled collectives match" in text) == (not report.flagged)
    for flag in report.flagged:
        assert f"! {flag}" in text
    flops_line = next(ln for ln in text.splitlines() if ln.startswith("FLOPs"))
    assert f"{report.compiled.flops:,.0f}" in flops_line


def test_abstract_mesh_plans_say_nothing_runs():
    fn, args = make_example(batch=16, hidden=128, layers=2, dim=32, optimizer="sgd")
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    p = al.plan(fn, *shapes, cluster=al.ClusterSpec.preset("dgx-h100", num_hosts=2))
    assert "abstract mesh: planned without devices, nothing runs" in p.summary()
    assert p._repr_html_().count("class='alpa-lite-device'") == 16
