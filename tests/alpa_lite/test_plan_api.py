"""The ``al.plan`` API on a 2-layer MLP training step (optax adam): JSON round trip, compiling a
loaded plan, plan-file and signature errors, bad methods, planning without devices, memory
budgets, determinism and the text summary."""

from __future__ import annotations

import copy
import json
import re

import jax
import pytest

import alpa_lite as al
from alpa_lite.ir.errors import InfeasibleError, PlanFileError, PlanningError, SignatureError
from examples.mlp import make_example
from tests.helpers import assert_steps_equal, make_mesh

SIZES = dict(batch=16, hidden=64, layers=2, dim=16)


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.fixture(scope="module")
def mlp():
    return make_example(**SIZES)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4))


@pytest.fixture(scope="module")
def planned(mlp, mesh):
    fn, args = mlp
    return al.plan(fn, *args, mesh=mesh)


# ---- JSON --------------------------------------------------------------------------------

def test_json_round_trip(planned):
    text = planned.to_json()
    loaded = al.Plan.from_json(text)
    assert loaded.to_dict() == planned.to_dict()
    assert loaded.to_json() == text
    assert loaded.input_specs == planned.input_specs
    assert loaded.output_specs == planned.output_specs
    assert loaded.cost == planned.cost and loaded.solver == planned.solver
    assert loaded.graph is None and loaded.mesh is None  # not saved


def test_solver_info_gives_the_model_size_on_the_way(planned):
    """Nodes (ops, sinks, copies) ≥ leaders after merging followers > 0; one solve without a
    budget; the saved plan keeps them."""
    s = planned.solver
    assert s.nodes >= len(planned.op_kinds) and 0 < s.leaders < s.nodes
    assert s.solves == 1 and s.variables > 0
    assert al.Plan.from_json(planned.to_json()).solver == s


def test_to_dict_is_plain_json(planned):
    d = planned.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_loaded_plan_compiles_and_equals_unsharded(planned, mlp, mesh):
    fn, args = mlp
    loaded = al.Plan.from_json(planned.to_json())
    run = loaded.compile(fn, mesh=mesh, example_args=args)
    assert_steps_equal(run, fn, args, n_state=2, steps=2)


def test_loaded_plan_compiles_from_shape_dtype_structs_on_auto_mesh(planned, mlp):
    fn, args = mlp
    loaded = al.Plan.from_json(planned.to_json())
    run = loaded.compile(fn, mesh=make_mesh((2, 4), "auto"), example_args=abstract(args))
    assert_steps_equal(run, fn, args, n_state=2, steps=2)


def test_loaded_plan_without_example_args(planned, mlp, mesh):
    fn, _ = mlp
    with pytest.raises(PlanFileError, match="example_args"):
        al.Plan.from_json(planned.to_json()).compile(fn, mesh=mesh)


def test_loaded_plan_on_another_program(planned, mlp, mesh):
    _, args = mlp

    def other(params, opt_state, x, y):  # same signature, other ops
        return params, opt_state, (x * y).sum()

    loaded = al.Plan.from_json(planned.to_json())
    with pytest.raises(PlanFileError, match="ops differ"):
        loaded.compile(other, mesh=mesh, example_args=args)


def test_loaded_plan_on_a_mesh_of_other_shape(planned, mlp):
    fn, args = mlp
    with pytest.raises(PlanningError, match=r"\(2, 4\)"):
        al.Plan.from_json(planned.to_json()).compile(fn, mesh=make_mesh((8,)), example_args=args)


def _edit(d: dict, how: str) -> str:
    d = copy.deepcopy(d)
    if how == "version":
        d["version"] = 99
    elif how == "no version":
        del d["version"]
    elif how == "no layouts":
        del d["layouts"]
    elif how == "no solver":
        del d["solver"]
    elif how == "bad spec":
        d["input_specs"][0] = "[x,R"
    elif how == "bad cost":
        d["cost"]["compute_s"] = "fast"
    return json.dumps(d)


BAD_FILES = [
    # how, message fragment
    ("version", "version 99"),
    ("no version", "'version'"),
    ("no layouts", "'layouts'"),
    ("no solver", "'solver'"),
    ("bad spec", "'[x,R'"),
    ("bad cost", "'fast'"),
]


@pytest.mark.parametrize("how,fragment", BAD_FILES)
def test_bad_plan_file(planned, how, fragment):
    with pytest.raises(PlanFileError) as e:
        al.Plan.from_json(_edit(planned.to_dict(), how))
    assert fragment in str(e.value), str(e.value)
    assert isinstance(e.value, PlanningError)


@pytest.mark.parametrize("text,fragment", [
    ('{"version": 1, "method": ', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "'version'"),
    ("null", "'version'"),
])
def test_corrupt_plan_file(text, fragment):
    with pytest.raises(PlanFileError, match=re.escape(fragment)):
        al.Plan.from_json(text)


# ---- signature ---------------------------------------------------------------------------

def test_signature_of_other_shapes(planned, mlp):
    _, args = mlp
    planned.check_signature(args)  # its own arguments pass
    params, opt_state, x, y = args
    with pytest.raises(SignatureError) as e:
        planned.check_signature((params, opt_state, x[: SIZES["batch"] // 2], y))
    n_state = len(jax.tree.leaves((params, opt_state)))
    assert f"input leaf {n_state}" in str(e.value)
    assert "[8, 16]" in str(e.value) and "[16, 16]" in str(e.value)


def test_signature_of_other_dtype_and_count(planned, mlp):
    _, args = mlp
    params, opt_state, x, y = args
    with pytest.raises(SignatureError, match="bfloat16"):
        planned.check_signature((params, opt_state, x.astype("bfloat16"), y))
    with pytest.raises(SignatureError, match="array inputs"):
        planned.check_signature((params, opt_state, x))


def test_loaded_plan_refuses_other_example_args(planned, mlp, mesh):
    fn, _ = mlp
    _, other = make_example(**{**SIZES, "batch": 32})
    with pytest.raises(SignatureError):
        al.Plan.from_json(planned.to_json()).compile(fn, mesh=mesh, example_args=other)


# ---- bad requests ------------------------------------------------------------------------

def test_unknown_method_names_the_choices(mlp, mesh):
    fn, args = mlp
    with pytest.raises(PlanningError) as e:
        al.plan(fn, *args, mesh=mesh, method="pipeshard")
    for choice in ("'pipeshard'", "auto", "data_parallel", "zero3", "megatron", "dp_tp"):
        assert choice in str(e.value)


def test_dp_tp_needs_a_2d_mesh(mlp):
    fn, args = mlp
    with pytest.raises(PlanningError, match="2-D"):
        al.plan(fn, *args, mesh=make_mesh((8,)), method="dp_tp")


def test_infeasible_memory_budget_names_memory(mlp, mesh):
    fn, args = mlp
    with pytest.raises(InfeasibleError) as e:
        al.plan(fn, *args, mesh=mesh, memory_budget=1000)
    msg = str(e.value)
    assert "1000 bytes" in msg
    need = [int(n) for n in re.findall(r"\((\d+) bytes\)", msg) if int(n) != 1000]
    assert need and all(n > 1000 for n in need), msg


# ---- without devices ---------------------------------------------------------------------

def test_plan_on_abstract_mesh(mlp, planned):
    fn, args = mlp
    p = al.plan(fn, *abstract(args), mesh=jax.sharding.AbstractMesh((2, 4), ("x", "y")))
    assert p.solver.status == "OPTIMAL"
    assert (p.mesh_shape, p.axis_names) == ((2, 4), ("x", "y"))
    assert p.signature == planned.signature
    # Same figures (the cpu preset) and the same program: the same plan as on real devices.
    assert p.input_specs == planned.input_specs
    assert jax.tree.structure(p.in_specs) == jax.tree.structure(
        planned.in_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def test_plan_with_cluster_preset_alone(mlp):
    fn, args = mlp
    p = al.plan(fn, *abstract(args), cluster=al.ClusterSpec.preset("dgx-h100", num_hosts=2))
    assert p.solver.status == "OPTIMAL"
    assert (p.mesh_shape, p.axis_names) == ((2, 8), ("host", "device"))
    assert p.cluster["name"] == "dgx-h100" and p.cluster["has_reduce_scatter"]
    assert len(p.input_specs) == len(jax.tree.leaves(args))


# ---- determinism and reports -------------------------------------------------------------

def _without_times(d: dict) -> dict:
    d = copy.deepcopy(d)
    d.pop("timings")
    d["solver"].pop("wall_s")
    return d


def test_planning_is_deterministic(mlp, mesh, planned):
    fn, args = mlp
    again = al.plan(fn, *args, mesh=mesh)
    assert _without_times(again.to_dict()) == _without_times(planned.to_dict())


def test_summary_lists_every_input_and_solver_status(planned, mlp):
    _, args = mlp
    text = planned.summary()
    assert "OPTIMAL" in text
    assert f"{planned.solver.nodes:,} nodes → {planned.solver.leaders:,} after merging" in " ".join(text.split())
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(list(args))]
    assert len(paths) == len(planned.input_specs)
    for path in paths:
        assert path in text, path
    assert str(planned) == text
    assert "<table" in planned._repr_html_()
