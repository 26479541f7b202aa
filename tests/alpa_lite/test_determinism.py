"""Determinism and safety (issue 8): the same inputs give the same plan JSON, apart from timing
fields, within a process and across processes (other hash seeds); loading a plan file never
executes anything from it."""

from __future__ import annotations

import ast
import copy
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import alpa_lite as al
from alpa_lite.ir.errors import PlanFileError
from examples.mlp import make_example
from tests.helpers import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMING_FIELDS = "timings, solver.wall_s"


def without_times(d: dict) -> dict:
    """A plan's dict without what measures time (``timings``, the solver's ``wall_s``)."""
    d = copy.deepcopy(d)
    d.pop("timings")
    d["solver"].pop("wall_s")
    return d


def _dag(x, w1, w2, b):
    h = jnp.tanh(jnp.einsum("bi,ij->bj", x, w1) + b)
    g = jnp.concatenate([h, jnp.sin(h)], axis=1).reshape(x.shape[0], 2, -1).sum(axis=1)
    return h @ w2, jnp.max(g, axis=0), x - 0.1 * (g @ w1.T)


def _dag_args():
    k = jax.random.split(jax.random.key(1), 4)
    return (jax.random.normal(k[0], (24, 32)), jax.random.normal(k[1], (32, 48)),
            jax.random.normal(k[2], (48, 12)), jax.random.normal(k[3], (48,)))


CASES = [
    # name, () -> (fn, args) (made when the test runs, not when the module is imported), mesh
    # shape, axis type, method
    ("mlp adam 2x4", lambda: make_example(batch=16, hidden=64, layers=2, dim=16), (2, 4), "explicit", "auto"),
    ("dag 2x2x2", lambda: (_dag, _dag_args()), (2, 2, 2), "auto", "auto"),
    ("dag 8 zero3", lambda: (_dag, _dag_args()), (8,), "explicit", "zero3"),
]


@pytest.mark.parametrize("name,example,shape,axis_type,method", CASES, ids=[c[0] for c in CASES])
def test_same_inputs_same_plan_json(name, example, shape, axis_type, method):
    fn, args = example()
    mesh = make_mesh(shape, axis_type)
    first = al.plan(fn, *args, mesh=mesh, method=method)
    second = al.plan(fn, *args, mesh=mesh, method=method)
    assert first.solver.status == "OPTIMAL", first.solver
    assert json.dumps(without_times(first.to_dict()), sort_keys=True) == json.dumps(
        without_times(second.to_dict()), sort_keys=True)
    # Only the timing fields may differ: everything else is identical text.
    d1, d2 = first.to_dict(), second.to_dict()
    assert set(d1) == set(d2) and set(d1["solver"]) == set(d2["solver"])


def test_plan_json_round_trip_is_stable():
    fn, args = make_example(batch=16, hidden=64, layers=2, dim=16)
    text = al.plan(fn, *args, mesh=make_mesh((2, 4))).to_json()
    assert al.Plan.from_json(text).to_json() == text


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    import jax
    import alpa_lite as al
    from examples.mlp import make_example
    from tests.alpa_lite.test_determinism import _dag, _dag_args, without_times
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    fn, args = make_example(batch=16, hidden=64, layers=2, dim=16)
    out = [without_times(al.plan(fn, *args, mesh=mesh).to_dict()),
           without_times(al.plan(_dag, *_dag_args(), mesh=mesh).to_dict())]
    print("PLANS" + json.dumps(out, sort_keys=True))
""")


def _plans_in_subprocesses(*hash_seeds: str) -> list[str]:
    """The script's output in a fresh interpreter per hash seed, the interpreters run side by side."""
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT.format(root=str(ROOT))], cwd=ROOT, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in hash_seeds]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        (line,) = [ln for ln in stdout.splitlines() if ln.startswith("PLANS")]
        outs.append(line[len("PLANS"):])
    return outs


def test_same_plan_json_across_processes():
    """Two fresh interpreters with other hash seeds (set and dict orders of str keys differ)."""
    a, b = _plans_in_subprocesses("1", "2")
    assert a == b
    plans = json.loads(a)
    assert len(plans) == 2 and all(p["solver"]["status"] == "OPTIMAL" for p in plans)


# ---- loading never executes code ------------------------------------------------------------

def test_plan_result_uses_json_only():
    """``Plan.from_json`` parses with ``json``; nothing in result/plan.py can run code from a
    file: no eval/exec/compile, pickle, marshal, shelve, yaml, dynamic import or getattr by name."""
    path = ROOT / "alpa_lite" / "result" / "plan.py"
    tree = ast.parse(path.read_text())
    banned_calls = {"eval", "exec", "compile", "__import__", "getattr", "import_module", "load", "loads"}

    def reads_own_field(call: ast.Call) -> bool:  # getattr(self, k): a dataclass's own fields
        return isinstance(call.func, ast.Name) and call.func.id == "getattr" and \
            isinstance(call.args[0], ast.Name) and call.args[0].id == "self"

    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "yaml", "cloudpickle", "importlib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & banned_modules, ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned_modules, ast.dump(node)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in banned_calls and not reads_own_field(node):
                # json.loads is the one loader allowed
                assert isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    f.value.id == "json" and name == "loads", f"line {node.lineno}: {ast.unparse(node)}"


@pytest.fixture(scope="module")
def plan_dict():
    fn, args = make_example(batch=16, hidden=64, layers=2, dim=16)
    return al.plan(fn, *args, mesh=make_mesh((2, 4))).to_dict()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/alpa_lite_pwned",))


def test_a_pickle_is_not_a_plan(tmp_path):
    marker = pathlib.Path("/tmp/alpa_lite_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(PlanFileError):
        al.Plan.from_json(pickle.dumps(_Boom()).decode("latin-1"))
    assert not marker.exists()


CODE = "__import__('os').system('touch /tmp/alpa_lite_pwned')"


@pytest.mark.parametrize("field", ["method", "where", "op_kind", "warning", "cluster_name", "note", "spec axis"])
def test_strings_that_look_like_code_stay_data(plan_dict, field):
    marker = pathlib.Path("/tmp/alpa_lite_pwned")
    marker.unlink(missing_ok=True)
    d = copy.deepcopy(plan_dict)
    if field == "method":
        d["method"] = CODE
    elif field == "where":
        d["collectives"].append({"kind": "all-reduce", "axes": ["x"], "nbytes": 4.0, "group_size": 2,
                                 "where": CODE})
    elif field == "spec axis":  # parses as a spec naming an unknown mesh axis: rejected, never run
        d["layouts"][1][0][0] = "[" + CODE + "]|sum(" + CODE + ")"
        with pytest.raises(PlanFileError, match="mesh axis"):
            al.Plan.from_json(json.dumps(d))
        assert not marker.exists()
        return
    elif field == "op_kind":
        d["op_kinds"][0] = CODE
    elif field == "warning":
        d["warnings"] = [CODE]
    elif field == "cluster_name":
        d["cluster"]["name"] = CODE
    else:
        d["solver"]["note"] = CODE
    loaded = al.Plan.from_json(json.dumps(d))
    loaded.summary()  # printing it runs nothing either
    assert CODE in json.dumps(loaded.to_dict())
    assert not marker.exists()


@pytest.mark.parametrize("edit", [
    lambda d: d["input_specs"].__setitem__(0, CODE),
    lambda d: d.__setitem__("solver", {"__class__": "os.system", "status": CODE}),
    lambda d: d.__setitem__("cost", {"compute_s": CODE}),
    lambda d: d["signature"].__setitem__(0, {"__reduce__": [CODE]}),
])
def test_crafted_fields_raise_plan_file_error(plan_dict, edit):
    marker = pathlib.Path("/tmp/alpa_lite_pwned")
    marker.unlink(missing_ok=True)
    d = copy.deepcopy(plan_dict)
    edit(d)
    with pytest.raises(PlanFileError):
        al.Plan.from_json(json.dumps(d))
    assert not marker.exists()


@pytest.mark.parametrize("text", ["[" * 100_000, b"\xff\xfe{", pickle.dumps(_Boom())],
                         ids=["deep nesting", "bad bytes", "pickle bytes"])
def test_hostile_json_raises_plan_file_error(text):
    marker = pathlib.Path("/tmp/alpa_lite_pwned")
    marker.unlink(missing_ok=True)
    try:
        with pytest.raises(PlanFileError):
            al.Plan.from_json(text)
    finally:
        assert not marker.exists()  # whatever it raises, it ran nothing


def test_plan_file_with_specs_on_unknown_axes(plan_dict):
    d = copy.deepcopy(plan_dict)
    d["input_specs"][0] = "[q]"
    with pytest.raises(PlanFileError, match="'q'"):
        loaded = al.Plan.from_json(json.dumps(d))
        fn, args = make_example(batch=16, hidden=64, layers=2, dim=16)
        loaded.compile(fn, mesh=make_mesh((2, 4)), example_args=args)
