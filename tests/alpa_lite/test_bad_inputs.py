"""Bad input → one clear error: a ``PlanningError`` subclass whose message names the problem
(issue 8). One test per bad input; where the input is fine after all (an uneven dimension the
user did not force, a static argument), the plan runs and equals the unsharded function."""

from __future__ import annotations

import copy
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import alpa_lite as al
from alpa_lite.ir.cluster import parse_mesh
from alpa_lite.ir.errors import InfeasibleError, MeshError, PlanFileError, PlanningError, ShardingError, SignatureError
from tests.helpers import fresh, make_mesh


def _x(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2


def _assert_runs(fn, args, mesh, **kw):
    """Plan, compile and run twice; each run equals the unsharded function."""
    plan = al.plan(fn, *args, mesh=mesh, **kw)
    run, want = plan.compile(fn), fn(*args)
    for _ in range(2):
        for g, w in zip(jax.tree.leaves(run(*fresh(args))), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
    return plan


# ---- a dimension not divisible by the mesh axes -------------------------------------------

def test_forced_uneven_split_by_constraint_names_the_dimension():
    mesh = make_mesh((2, 4), "auto")

    def f(x, w):
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("y")))
        return jnp.tanh(x @ w)

    with pytest.raises(ShardingError) as e:
        al.plan(f, _x(6, 16), _x(16, 8), mesh=mesh)
    msg = str(e.value)
    assert "dimension 0 of size 6" in msg and "('y',)" in msg and "4" in msg, msg


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_forced_uneven_split_by_committed_input_names_the_dimension(axis_type):
    """jax refuses to ``device_put`` an uneven split, so a committed input can only say so
    through a ``ShapeDtypeStruct`` with a sharding: the same error as a constraint."""
    mesh = make_mesh((2, 4), axis_type)
    x = jax.ShapeDtypeStruct((6, 16), jnp.float32, sharding=NamedSharding(mesh, P("y")))
    with pytest.raises(ShardingError) as e:
        al.plan(_mlp, x, jax.ShapeDtypeStruct((16, 32), jnp.float32),
                jax.ShapeDtypeStruct((32, 8), jnp.float32), mesh=mesh)
    msg = str(e.value)
    assert "dimension 0 of size 6" in msg and "'y'" in msg, msg


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_uneven_dimensions_not_forced_are_planned_around(axis_type):
    """Sizes 6, 12 and 3 divide no 8-device mesh evenly everywhere: the planner splits what
    divides and keeps the rest whole, and the plan computes what the function computes."""
    mesh = make_mesh((2, 4), axis_type)
    args = (_x(6, 12), _x(12, 24, seed=1), _x(24, 3, seed=2))
    plan = _assert_runs(_mlp, args, mesh)
    sizes = dict(zip(plan.axis_names, plan.mesh_shape))
    for spec, (shape, _) in zip(plan.input_specs, plan.signature):
        spec.validate(shape, sizes)  # every chosen split divides its dimension


def test_forced_even_split_is_honoured():
    mesh = make_mesh((2, 4), "auto")

    def f(x, w):
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("y")))
        return jnp.tanh(x @ w)

    args = (_x(8, 16), _x(16, 8, seed=1))
    plan = _assert_runs(f, args, mesh)
    assert any(str(lay.outs[0]) == "[y,R]" for k, lay in zip(plan.op_kinds, plan.layouts)
               if k == "custom-call"), plan.layouts


# ---- meshes --------------------------------------------------------------------------------

def _abstract_plan():
    mesh16 = jax.sharding.AbstractMesh((16,), ("x",))
    args = (jax.ShapeDtypeStruct((32, 64), jnp.float32), jax.ShapeDtypeStruct((64, 64), jnp.float32),
            jax.ShapeDtypeStruct((64, 16), jnp.float32))
    return al.plan(_mlp, *args, mesh=mesh16)


def test_running_on_fewer_devices_than_the_plan_mesh():
    plan = _abstract_plan()
    with pytest.raises(MeshError) as e:
        plan.compile(_mlp, mesh=make_mesh((8,)))
    assert "(16,)" in str(e.value) and "(8,)" in str(e.value), str(e.value)


def test_running_an_abstract_plan_compiled_without_a_mesh():
    concrete = [jnp.zeros(s, d) for s, d in _abstract_plan().signature]
    with pytest.raises(MeshError, match="16"):
        _abstract_plan().compile(_mlp)(*concrete)


def test_planning_on_more_devices_than_exist_needs_an_abstract_mesh():
    with pytest.raises(MeshError) as e:
        al.plan(_mlp, _x(32, 64), _x(64, 64), _x(64, 16), mesh="16")
    assert "Mesh" in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ["2x", "x4", "2x4x", "two", "", "2x0", "-8", "2.5x4", "2 x 4 x"])
def test_mesh_string_that_does_not_parse(text):
    with pytest.raises(MeshError) as e:
        parse_mesh(text)
    assert repr(text) in str(e.value), str(e.value)
    assert "'2x4'" in str(e.value) or "positive integer" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["dgx-z100", "", "h100"])
def test_unknown_cluster_preset(name):
    with pytest.raises(MeshError) as e:
        al.ClusterSpec.preset(name)
    msg = str(e.value)
    assert repr(name) in msg and "dgx-a100" in msg and "dgx-h100" in msg, msg


@pytest.mark.parametrize("kw,fragment", [({"num_hosts": 0}, "num_hosts"),
                                         ({"devices_per_host": -1}, "devices_per_host")])
def test_preset_with_bad_host_counts(kw, fragment):
    with pytest.raises(MeshError, match=fragment):
        al.ClusterSpec.preset("dgx-h100", **kw)


def test_cluster_file_that_does_not_parse():
    with pytest.raises(MeshError, match="not valid JSON"):
        al.ClusterSpec.from_json("{mesh_shape: [2, 4]")
    with pytest.raises(MeshError, match="mesh_shape"):
        al.ClusterSpec.from_json('{"axis_names": ["x"]}')


# ---- memory budget -------------------------------------------------------------------------

def test_memory_budget_no_plan_fits_says_the_minimum():
    args = (_x(32, 64), _x(64, 64, seed=1), _x(64, 16, seed=2))
    with pytest.raises(InfeasibleError) as e:
        al.plan(_mlp, *args, mesh=make_mesh((2, 4)), memory_budget=512)
    msg = str(e.value)
    assert "512 bytes" in msg, msg
    need = [int(n) for n in re.findall(r"\((\d+) bytes\)", msg) if int(n) != 512]
    assert need and min(need) > 512, msg
    # The minimum it names is enough: planning with that budget succeeds.
    plan = al.plan(_mlp, *args, mesh=make_mesh((2, 4)), memory_budget=max(need))
    assert plan.cost.peak_memory_bytes <= max(need)


# ---- arguments -----------------------------------------------------------------------------

def test_function_with_no_array_inputs():
    with pytest.raises(PlanningError, match="no array inputs"):
        al.plan(lambda: jnp.ones((8, 8)) * 2, mesh=make_mesh((8,)))


def test_function_whose_only_argument_is_static():
    with pytest.raises(PlanningError, match="no array inputs"):
        al.plan(lambda n: jnp.ones((8, 8)) * n, 3, mesh=make_mesh((8,)), static_argnums=(0,))


@pytest.mark.parametrize("bad", [{"k": "a"}, "text", object()])
def test_non_array_argument_names_static_argnums(bad):
    with pytest.raises(PlanningError) as e:
        al.plan(lambda x, c: x * 2, _x(8, 8), bad, mesh=make_mesh((8,)))
    assert "static_argnums" in str(e.value), str(e.value)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_static_arguments_as_jit_does(axis_type):
    def f(x, w, act, scale):
        return getattr(jnp, act)(x @ w) * scale

    mesh = make_mesh((2, 4), axis_type)
    x, w = _x(16, 32), _x(32, 8, seed=1)
    plan = al.plan(f, x, w, "tanh", 3, mesh=mesh, static_argnums=(2, 3))
    run = plan.compile(f)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(run(x, w, "tanh", 3)), np.asarray(f(x, w, "tanh", 3)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,scale", [("tanh", 4), ("sin", 3)])
def test_other_static_values_are_another_program(act, scale):
    def f(x, w, act, scale):
        return getattr(jnp, act)(x @ w) * scale

    """A plan is made for its static values (jit would trace another program for others): the
    compiled plan refuses other values with a SignatureError that says to plan again."""
    x, w = _x(16, 32), _x(32, 8, seed=1)
    run = al.plan(f, x, w, "tanh", 3, mesh=make_mesh((2, 4)), static_argnums=(2, 3)).compile(f)
    with pytest.raises(SignatureError, match="another program, plan it again") as e:
        run(x, w, act, scale)
    assert f"{act!r}, {scale!r}" in str(e.value) and "'tanh', 3" in str(e.value), str(e.value)


def test_python_scalar_argument_as_jit_does():
    def f(x, scale):
        return jnp.tanh(x) * scale

    x = _x(16, 32)
    run = al.plan(f, x, 0.5, mesh=make_mesh((8,))).compile(f)
    np.testing.assert_allclose(np.asarray(run(x, 0.5)), np.asarray(f(x, 0.5)), rtol=1e-6)


def test_static_argnums_out_of_range():
    with pytest.raises(PlanningError) as e:
        al.plan(lambda x: x * 2, _x(8, 8), mesh=make_mesh((8,)), static_argnums=(3,))
    assert "static_argnums" in str(e.value), str(e.value)


# ---- a primitive with no rule --------------------------------------------------------------

def _spd(n, seed=0):
    a = np.asarray(_x(n, n, seed=seed))
    return jnp.asarray(a @ a.T / n + np.eye(n, dtype=np.float32))


def _with_cholesky(a, w):
    c = jax.lax.linalg.cholesky(a @ a.T / a.shape[1] + jnp.eye(a.shape[0]) * 4.0)
    return jnp.tanh(c @ w), jnp.tanh(jax.lax.linalg.cholesky(jnp.eye(a.shape[0]) * 2.0 + c @ c.T * 0.01))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_primitive_without_rule_warns_once_and_runs(axis_type, caplog, monkeypatch):
    from cost_model import registry

    monkeypatch.setattr(registry, "_WARNED", set())  # the log says it once per process
    assert not registry.has_rule(jax.lax.linalg.cholesky_p)
    mesh = make_mesh((2, 4), axis_type)
    args = (_x(16, 16), _x(16, 32, seed=1))
    with caplog.at_level(logging.WARNING, logger="alpa_lite"):
        plan = _assert_runs(_with_cholesky, args, mesh)
    # Two cholesky ops, one warning in the plan and one in the log, naming the primitive.
    assert len(plan.warnings) == 1 and "cholesky" in plan.warnings[0], plan.warnings
    logged = [r.getMessage() for r in caplog.records if "cholesky" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "replicated" in plan.warnings[0]
    assert sum(k == "cholesky" for k in plan.op_kinds) == 2, plan.op_kinds
    # A missing rule never forces its neighbours replicated: the dots around it still split.
    dots = [lay for k, lay in zip(plan.op_kinds, plan.layouts) if k == "dot"]
    assert any(lay.outs[0].axes_used() or lay.outs[0].partial for lay in dots), dots


def test_fft_has_no_rule_and_runs_replicated():
    from cost_model import registry

    assert not registry.has_rule(jax.lax.fft_p)

    def f(x, w):
        return jnp.real(jnp.fft.fft(x @ w)) * 0.1

    plan = _assert_runs(f, (_x(16, 32), _x(32, 8, seed=1)), make_mesh((8,)))
    assert any("fft" in w for w in plan.warnings), plan.warnings


# ---- other shapes, plan files --------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_plan():
    args = (_x(16, 32), _x(32, 32, seed=1), _x(32, 8, seed=2))
    return al.plan(_mlp, *args, mesh=make_mesh((2, 4))), args


def test_plan_applied_to_other_shapes(mlp_plan):
    plan, (x, w1, w2) = mlp_plan
    run = plan.compile(_mlp)
    with pytest.raises(SignatureError) as e:
        run(x[:8], w1, w2)
    msg = str(e.value)
    assert "input leaf 0" in msg and "[8, 32]" in msg and "[16, 32]" in msg, msg
    with pytest.raises(SignatureError, match="bfloat16"):
        run(x.astype(jnp.bfloat16), w1, w2)
    with pytest.raises(SignatureError, match="3 array inputs"):
        run(x, w1)
    np.testing.assert_allclose(np.asarray(run(*fresh((x, w1, w2)))), np.asarray(_mlp(x, w1, w2)),
                               rtol=1e-5, atol=1e-5)  # its own shapes still run


def test_plan_file_that_is_not_json(mlp_plan):
    text = mlp_plan[0].to_json()
    with pytest.raises(PlanFileError, match="not valid JSON"):
        al.Plan.from_json(text[: len(text) // 2])


def test_plan_file_from_another_version(mlp_plan):
    d = mlp_plan[0].to_dict()
    d["version"] = d["version"] + 1
    with pytest.raises(PlanFileError) as e:
        al.Plan.from_json(json.dumps(d))
    assert f"version {d['version']}" in str(e.value) and "plan again" in str(e.value), str(e.value)


def test_plan_file_with_the_version_as_a_string(mlp_plan):
    d = mlp_plan[0].to_dict()
    d["version"] = str(d["version"])
    with pytest.raises(PlanFileError, match=r"'version' is '\d+' \(str\), not an integer"):
        al.Plan.from_json(json.dumps(d))


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d.pop("signature"), "'signature'"),
    (lambda d: d["layouts"].__setitem__(0, "oops"), "corrupt"),
    (lambda d: d["mesh_shape"].__setitem__(0, "two"), "'two'"),
    (lambda d: d.__setitem__("solver", {"status": "OPTIMAL"}), "corrupt"),
    (lambda d: d.__setitem__("cost", None), "corrupt"),
])
def test_plan_file_with_a_corrupt_field(mlp_plan, edit, fragment):
    d = copy.deepcopy(mlp_plan[0].to_dict())
    edit(d)
    with pytest.raises(PlanFileError) as e:
        al.Plan.from_json(json.dumps(d))
    assert fragment in str(e.value), str(e.value)


def test_plan_file_for_another_signature(mlp_plan):
    plan, args = mlp_plan
    loaded = al.Plan.from_json(plan.to_json())
    other = (_x(32, 32), *args[1:])
    with pytest.raises(SignatureError) as e:
        loaded.compile(_mlp, mesh=make_mesh((2, 4)), example_args=other)
    assert "[32, 32]" in str(e.value) and "[16, 32]" in str(e.value), str(e.value)


def test_plan_file_for_another_program(mlp_plan):
    plan, args = mlp_plan
    loaded = al.Plan.from_json(plan.to_json())
    with pytest.raises(PlanFileError, match="ops differ"):
        loaded.compile(lambda x, w1, w2: jax.nn.relu(x @ w1) @ w2, mesh=make_mesh((2, 4)), example_args=args)


def test_loaded_plan_runs(mlp_plan):
    plan, args = mlp_plan
    loaded = al.Plan.from_json(plan.to_json())
    run = loaded.compile(_mlp, mesh=make_mesh((2, 4), "auto"), example_args=args)
    want = _mlp(*args)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(run(*fresh(args))), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_argument_committed_to_another_sharding(mlp_plan):
    plan, (x, w1, w2) = mlp_plan
    mesh = make_mesh((2, 4))
    other = P(None, "x") if plan.input_specs[0].to_partition_spec() != P(None, "x") else P("x")
    x_other = jax.device_put(x, NamedSharding(mesh, other))
    out = plan.compile(_mlp)(x_other, *fresh((w1, w2)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(_mlp(x, w1, w2)), rtol=1e-5, atol=1e-5)


def test_baseline_on_dimensions_no_mesh_axis_divides_says_what_stays_replicated(caplog):
    def f(w, x):
        return jnp.tanh(x @ w).sum()

    w, x = jnp.ones((3, 5)), jnp.ones((4, 3))
    with caplog.at_level("WARNING", logger="alpa_lite.intra.planner"):
        plan = al.plan(f, w, x, mesh=make_mesh((8,)), method="megatron")
    assert plan.input_specs[0].axes_used() == ()
    (message,) = [m for m in plan.warnings if m.startswith("megatron:")]
    assert "float32[3, 5]" in message and "'x': 8" in message and "left replicated" in message
    assert message in caplog.text
