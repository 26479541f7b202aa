"""The ``alpa-lite`` command.

As a user runs it, in subprocesses (``python -m alpa_lite.cli``, the installed console script):
planning ``examples.mlp:target`` on a 2x4 mesh once (module fixture) whose report, JSON and HTML
several tests check, progress on a terminal, targets imported from the current directory, a
clear error with exit status 2. Where a test checks a command's output rather than the process
(``show``, ``compare``, ``check``, the bad-input table), the console script's entry point
``cli.main`` runs in this process: its exit status and its stdout and stderr are the same, and a
process per case would cost a jax start-up each.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import alpa_lite as al
from alpa_lite import cli

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "alpa_lite.cli"]
# 8 CPU devices, as every test has (conftest); wide output so no name is cut short.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "COLUMNS": "200"}
ESC = "\x1b["


def run(*args: str, cwd: Path = ROOT, command: list[str] = CLI) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


@pytest.fixture
def run_here(capsys, monkeypatch):
    """``run`` in this process: the console script's entry point (``cli.main``) with its exit
    status, stdout and stderr, where what a test checks is the command's output, not the process
    (which would cost a jax start-up)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])

    def run_in_process(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            cli.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["alpa-lite", *args], stop.value.code, out, err)

    return run_in_process


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    r = run("plan", "examples.mlp:target", "--mesh", "2x4", "--json", str(d / "p.json"), "--html", str(d / "p.html"))
    assert r.returncode == 0, r.stderr
    return r, d


def _row(stdout: str, name: str) -> str:
    lines = [ln for ln in stdout.splitlines() if re.search(rf"^\s*\d+\s+{re.escape(name)}\s", ln)]
    assert len(lines) == 1, (name, lines)
    return lines[0]


def test_plan_prints_every_part_of_the_report(planned):
    r, _ = planned
    out = r.stdout
    assert "method auto · mesh x=2 × y=4 (8 devices)" in out
    for section in ("Predicted cost per step", "Inputs (27)", "Outputs (26;", "Stages (1)", "Predicted collectives",
                    "Solver: OPTIMAL", "Planning time:"):
        assert section in out, section
    for part in ("compute", "communication", "resharding", "total", "memory/device"):
        assert re.search(rf"^{part}\s+\d", out, re.M), part
    # Inputs are named after the step's parameters: params, opt_state, x, y.
    for name in ("params['layer0']['w']", "params['layer3']['b']", "opt_state[0].mu['layer1']['w']", "x", "y"):
        _row(out, name)


def test_plan_json_loads_back_equal_and_matches_the_report(planned):
    r, d = planned
    text = (d / "p.json").read_text()
    plan = al.Plan.from_json(text)
    assert plan.to_dict() == json.loads(text)
    assert al.Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert (plan.method, plan.mesh_shape, plan.axis_names) == ("auto", (2, 4), ("x", "y"))
    # The sharding printed for each input is the one saved.
    names = ["params['layer0']['b']", "params['layer0']['w']"]
    for i, name in enumerate(names):
        spec = str(plan.input_specs[i].to_partition_spec()).replace("PartitionSpec", "P")
        assert spec in _row(r.stdout, name)
    assert f"predicted step {plan.cost.total_s * 1e3:.3f} ms" in r.stdout
    assert f"Predicted collectives ({len(plan.collectives)};" in r.stdout


PHASE_LINE = re.compile(r"(tracing|strategies|ILP|DP) …")  # how PlanProgress draws a phase


def test_plan_is_quiet_when_piped(planned):
    """No escape codes and no progress lines when stdout and stderr are pipes (a warning the
    planner logs, e.g. a solver stopped by the wall clock on a busy machine, may still appear)."""
    r, _ = planned
    assert ESC not in r.stdout and ESC not in r.stderr
    assert not PHASE_LINE.search(r.stderr), r.stderr
    assert not PHASE_LINE.search(r.stdout), r.stdout


def test_plan_writes_html_view(planned):
    _, d = planned
    html = (d / "p.html").read_text()
    assert html.startswith("<!doctype html>")
    assert html.count("class='alpa-lite-device'") == 8
    assert html.count("class='alpa-lite-in-row'") == 27


def test_show_prints_the_saved_plan(planned, run_here):
    r, d = planned
    s = run_here("show", str(d / "p.json"))
    assert s.returncode == 0, s.stderr
    assert "loaded plan" in s.stdout
    # Same header figures and cost table as when it was planned.
    for line in r.stdout.splitlines():
        if line.startswith(("predicted step", "compute ", "communication ", "resharding ")):
            assert line in s.stdout, line
    assert "Inputs (27)" in s.stdout and "input[26]" in s.stdout


def test_check_of_a_saved_plan_with_other_shapes_is_a_clear_error(planned):
    _, d = planned
    # make_example() has another size than target(): the saved plan does not fit it.
    r = run("check", "examples.mlp:make_example", "--plan", str(d / "p.json"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "plan again" in r.stderr and "the plan was made for 27 array inputs" in r.stderr


def test_compare_lists_every_method(run_here):
    r = run_here("compare", "examples.mlp:target", "--mesh", "8")
    assert r.returncode == 0, r.stderr
    rows = {m: ln for ln in r.stdout.splitlines() for m in cli.METHODS if re.match(rf"{m}( ★)?\s+\d", ln)}
    assert set(rows) == {"auto", "data_parallel", "zero3", "megatron"}  # dp_tp needs a 2-D mesh
    assert "dp_tp (data × tensor parallel) needs a 2-D mesh" in r.stdout
    assert "1.00×" in rows["auto"]
    ratios = {m: float(re.search(r"(\d+\.\d+)×", ln).group(1)) for m, ln in rows.items()}
    assert all(v >= 1.0 for v in ratios.values()), ratios  # auto never costs more than a baseline


def test_check_prints_predicted_beside_compiled(run_here):
    r = run_here("check", "examples.mlp:target", "--mesh", "8")
    assert r.returncode == 0, r.stderr
    assert "Predicted vs compiled on mesh x=8" in r.stdout
    for row in ("all-reduce", "wire bytes, total", "memory", "FLOPs"):
        assert re.search(rf"^{row}\s", r.stdout, re.M), row
    assert "✓ compiled collectives match" in r.stdout or "! " in r.stdout


# ---- bad input: one line on stderr, exit status 2 ----------------------------------------------
SAVED = {
    "version99.json": '{"version": 99}',
    "notjson.json": "this is not json",
    "other.json": '{"mesh_shape": [8]}',
    "corrupt.json": '{"version": 1, "method": "auto"}',
}
BAD = {
    "unknown module": (["plan", "no_such_module:target", "--mesh", "8"], "cannot import module 'no_such_module'"),
    "unknown target": (["plan", "examples.mlp:no_such", "--mesh", "8"], "has no 'no_such'"),
    "target not MODULE:FN": (["plan", "examples.mlp", "--mesh", "8"], "write MODULE:FUNCTION"),
    "target needs arguments": (["plan", "examples.mlp:forward", "--mesh", "8"],
                               "calling examples.mlp:forward() failed"),
    "bad mesh": (["plan", "examples.mlp:target", "--mesh", "2xq"], "bad mesh '2xq'"),
    "zero mesh": (["plan", "examples.mlp:target", "--mesh", "0x4"], "bad mesh '0x4'"),
    "no mesh": (["plan", "examples.mlp:target"], "give --mesh"),
    "bad axes": (["plan", "examples.mlp:target", "--mesh", "2x4", "--axes", "x"], "must name each of the 2"),
    "unknown preset": (["plan", "examples.mlp:target", "--cluster", "tpu-v9"], "unknown cluster preset 'tpu-v9'"),
    "missing cluster file": (["plan", "examples.mlp:target", "--cluster", "nope.json"], "cannot read cluster file"),
    "hosts without cluster": (["plan", "examples.mlp:target", "--mesh", "8", "--hosts", "2"], "--hosts needs"),
    "bad memory": (["plan", "examples.mlp:target", "--mesh", "8", "--memory-budget", "40XB"], "bad memory size"),
    "budget too small": (["plan", "examples.mlp:target", "--mesh", "8", "--memory-budget", "1KB"],
                         "no plan fits the memory budget"),
    "unknown method": (["plan", "examples.mlp:target", "--mesh", "8", "--method", "fsdp"], "'fsdp' is not one of"),
    "missing plan file": (["show", "no_such_plan.json"], "cannot read plan file"),
    "plan of another version": (["show", "{d}/version99.json"], "version 99"),
    "plan not json": (["show", "{d}/notjson.json"], "not valid JSON"),
    "not a plan": (["show", "{d}/other.json"], "not an alpa-lite plan"),
    "corrupt plan": (["show", "{d}/corrupt.json"], "plan file is corrupt"),
    "check without devices": (["check", "examples.mlp:target", "--mesh", "4x4"],
                              "needs 16 devices, this machine has 8"),
    "unknown command": (["frobnicate"], "No such command"),
}


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for name, text in SAVED.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_status_2(saved_files, case, capsys, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    args, expected = BAD[case]
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as stop:
        warnings.simplefilter("always")
        cli.main([a.format(d=saved_files) for a in args])
    out, err = capsys.readouterr()
    assert stop.value.code == 2, (case, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("alpa-lite: error: ") and "Traceback" not in err
    assert expected in err, err
    # nothing else a user would see on stderr: no logged warning, no Python warning
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [str(w.message) for w in caught]


# ---- terminals, the console script, the current directory -------------------------------------
def test_progress_shows_on_a_terminal():
    """With stderr on a pseudo-terminal the phases appear (drawn with escape codes, then erased)."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([*CLI, "plan", "examples.mlp:target", "--mesh", "8"], cwd=ROOT, env={**ENV, "TERM": "xterm"},
                         stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    seen = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    out, _ = p.communicate(timeout=60)
    os.close(leader)
    assert p.returncode == 0
    text = seen.decode(errors="replace")
    assert ESC in text
    assert "tracing" in text and "ILP" in text
    assert "Solver: OPTIMAL" in out and ESC not in out  # stdout was a pipe: plain


TINY_TARGET = '''
import jax.numpy as jnp

def target():
    def fn(w, x):
        return jnp.tanh(x @ w).sum()
    return fn, (jnp.ones((64, 32)), jnp.ones((16, 64)))
'''


def test_console_script_imports_targets_from_the_current_directory(tmp_path):
    script = Path(sys.executable).with_name("alpa-lite")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e .)")
    (tmp_path / "mytarget.py").write_text(textwrap.dedent(TINY_TARGET))
    r = run("plan", "mytarget:target", "--mesh", "4", cwd=tmp_path, command=[str(script)])
    assert r.returncode == 0, r.stderr
    assert "mesh x=4 (4 devices)" in r.stdout
    _row(r.stdout, "w")
    _row(r.stdout, "x")
    v = run("--version", command=[str(script)])
    assert v.returncode == 0 and al.__version__ in v.stdout


def test_file_target_and_abstract_mesh_for_a_gpu_cluster(tmp_path, run_here):
    (tmp_path / "tiny_gpu_target.py").write_text(textwrap.dedent(TINY_TARGET))
    r = run_here("plan", f"{tmp_path / 'tiny_gpu_target.py'}:target", "--cluster", "dgx-h100", "--hosts", "2")
    assert r.returncode == 0, r.stderr
    assert "mesh host=2 × device=8 (16 devices)" in r.stdout
    assert "cluster dgx-h100 (H100-SXM5-80GB, 8 per host) · abstract mesh" in r.stdout


# ---- in-process: option parsing ----------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("40GB", 40e9), ("40 gb", 40e9), ("16GiB", 16 * 2**30), ("512MB", 512e6), ("1.5TB", 1.5e12),
    ("1e9", 1e9), ("2048", 2048.0), ("64KiB", 64 * 1024),
])
def test_parse_memory(text, expected):
    assert cli.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "40XB", "-1GB", "0", "4 0GB"])
def test_parse_memory_rejects(text):
    with pytest.raises(cli.CliError, match="bad memory size"):
        cli.parse_memory(text)


def test_cli_methods_are_the_planners():
    from alpa_lite.intra.planner import METHODS

    assert cli.METHODS == METHODS


def test_choose_mesh_names_axes():
    assert cli.choose_mesh("2x4", None, None).names == ("x", "y")
    assert cli.choose_mesh("8", "data", None).names == ("data",)
    preset = al.ClusterSpec.preset("dgx-a100", num_hosts=2)
    assert cli.choose_mesh(None, None, preset) == cli.MeshChoice((2, 8), ("host", "device"), preset)
    assert cli.choose_mesh(None, None, preset).for_gpus
