"""``alpa-lite calibrate``: the alpha-beta fit on synthetic timings, the planner's byte factors,
per-axis links in ``ClusterSpec`` (JSON, mesh views, costs), the timed programs, and the
command (``--quick``, its JSON read back by ``plan --cluster FILE``, one-line errors)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alpa_lite.ir.cluster import ClusterSpec, Link
from alpa_lite.ir.errors import MeshError
from alpa_lite.measure.calibrate import (
    KINDS,
    CalibrationError,
    CalibrationOptions,
    Sample,
    buffer_elements,
    calibrated_cluster,
    collective_program,
    fit_alpha_beta,
    fit_axes,
    result_bytes,
    time_collective,
    wire_bytes,
)
from cost_model.collectives import all_reduce, collective_time
from tests.helpers import make_mesh

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "alpa_lite.cli"]
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "COLUMNS": "200"}
SIZES = [4096, 65536, 2**20, 4 * 2**20]


def synthetic(alpha: float, beta: float, n: int = 4, noise: float = 0.0, seed: int = 0) -> list[Sample]:
    """Timings of every kind at every size, as the model t = α + wire/β says (× 1 ± noise)."""
    rng = np.random.default_rng(seed)
    return [Sample(k, "x", n, b, (alpha + wire_bytes(k, n, b) / beta) * (1 + noise * rng.uniform(-1, 1)))
            for k in KINDS for b in SIZES]


# ---- the fit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, beta", [(20e-6, 2e9), (5e-6, 450e9), (1e-3, 1e8), (0.0, 10e9)])
def test_fit_recovers_alpha_beta_from_exact_timings(alpha, beta):
    s = synthetic(alpha, beta)
    fit = fit_alpha_beta([x.wire_bytes for x in s], [x.seconds for x in s])
    assert fit.alpha == pytest.approx(alpha, rel=1e-6, abs=1e-12)
    assert fit.beta == pytest.approx(beta, rel=1e-6)
    assert fit.rms_error < 1e-9 and fit.points == len(KINDS) * len(SIZES)


def test_fit_with_noise_is_close_and_reports_its_error():
    s = synthetic(30e-6, 3e9, noise=0.05, seed=1)
    fit = fit_alpha_beta([x.wire_bytes for x in s], [x.seconds for x in s])
    assert fit.alpha == pytest.approx(30e-6, rel=0.15)
    assert fit.beta == pytest.approx(3e9, rel=0.1)
    assert 0.005 < fit.rms_error < 0.05


def test_fit_never_returns_a_negative_alpha():
    # Bandwidth-only timings with the smallest sizes measured low: unconstrained α would be < 0.
    w = np.array([1e3, 1e4, 1e5, 1e6])
    t = w / 1e9 * np.array([0.5, 0.9, 1.0, 1.0])
    a = np.stack([1 / t, w / t], axis=1)
    assert np.linalg.lstsq(a, np.ones(4), rcond=None)[0][0] < 0  # the case this test is about
    fit = fit_alpha_beta(w, t)
    assert fit.alpha == 0.0
    assert fit.beta == pytest.approx(float(np.sum((w / t) ** 2) / np.sum(w / t)))


@pytest.mark.parametrize("wire, seconds, match", [
    ([1e6, 1e6], [1e-3, 2e-3], "two or more message sizes"),
    ([1e3, 1e6], [1e-3, 0.0], "must be positive"),
    ([1e3, 1e6], [2e-3, 1e-3], "do not grow with message size"),
])
def test_fit_refuses_data_it_cannot_fit(wire, seconds, match):
    with pytest.raises(CalibrationError, match=match):
        fit_alpha_beta(wire, seconds)


def test_fit_axes_fits_each_axis_and_each_kind_apart():
    samples = synthetic(10e-6, 4e9) + [Sample(k, "y", 2, b, 50e-6 + wire_bytes(k, 2, b) / 1e9)
                                       for k in KINDS for b in SIZES]
    per_axis, per_kind = fit_axes(samples)
    assert per_axis["x"].beta == pytest.approx(4e9) and per_axis["y"].beta == pytest.approx(1e9)
    assert per_axis["y"].alpha == pytest.approx(50e-6)
    assert set(per_kind) == {(a, k) for a in "xy" for k in KINDS}
    assert per_kind[("y", "all-gather")].alpha == pytest.approx(50e-6)


# ---- the planner's byte factors ----------------------------------------------------------------
@pytest.mark.parametrize("kind, n, b, wire", [
    ("all-reduce", 4, 1000, 2 * 3 / 4 * 1000),
    ("all-gather", 4, 1000, 3 / 4 * 1000),   # b: the gathered buffer
    ("all-to-all", 4, 1000, 3 / 4 * 1000),
    ("all-reduce", 2, 1000, 2 * 1 / 2 * 1000),
])
def test_wire_bytes_are_the_cost_models(kind, n, b, wire):
    assert wire_bytes(kind, n, b) == pytest.approx(wire)


def test_fitted_link_reproduces_the_timings_through_the_cost_model():
    """A spec fitted on all-reduce timings prices an all-reduce as it was timed."""
    spec = ClusterSpec.preset("cpu").with_mesh((2, 4), ("x", "y"))
    samples = [Sample("all-reduce", "y", 4, b, 40e-6 + 1.5 * b / 3e9) for b in SIZES]
    samples += [Sample("all-reduce", "x", 2, b, 15e-6 + 1.0 * b / 6e9) for b in SIZES]
    per_axis, _ = fit_axes(samples)
    cal = calibrated_cluster(spec, samples, per_axis, flops=30e9, hbm=2e9, memory=2**30)
    for s in samples:
        assert collective_time(all_reduce((s.axis,), s.nbytes, cal), cal) == pytest.approx(s.seconds)


@pytest.mark.parametrize("kind, n, nbytes, elements, result", [
    ("all-reduce", 4, 4096, 1024, 4096),
    ("all-gather", 4, 4096, 256, 4096),      # 4 inputs of 256 floats gathered
    ("all-to-all", 4, 4096, 1024, 4096),
    ("all-to-all", 3, 4096, 1023, 4092),     # a multiple of the group
    ("all-gather", 2, 2, 1, 8),              # at least one element
])
def test_buffers_for_a_result_size(kind, n, nbytes, elements, result):
    assert buffer_elements(kind, n, nbytes) == elements
    assert result_bytes(kind, n, elements) == result


# ---- the calibrated ClusterSpec ----------------------------------------------------------------
def test_calibrated_cluster_holds_the_measured_figures():
    base = ClusterSpec.preset("cpu").with_mesh((2, 4), ("x", "y"))
    samples = synthetic(10e-6, 4e9) + [Sample("all-reduce", "y", 4, b, 30e-6 + 1.5 * b / 2e9) for b in SIZES]
    per_axis, _ = fit_axes(samples)
    c = calibrated_cluster(base, samples, per_axis, flops=25e9, hbm=2e9, memory=3e9)
    assert c.name == "cpu-calibrated" and c.device.name == "cpu"  # "cpu": bf16 moves as f32
    assert (c.device.peak_flops, c.device.efficiency, c.device.hbm_bandwidth, c.device.memory) == (25e9, 1.0, 2e9, 3e9)
    assert c.link("x") == Link(pytest.approx(10e-6), pytest.approx(4e9))
    assert c.link("y") == Link(pytest.approx(30e-6), pytest.approx(2e9))
    assert c.intra_host == c.inter_host  # one host: every axis is in it
    assert not c.has_reduce_scatter and c.mesh_shape == (2, 4)


def _with_links() -> ClusterSpec:
    c = ClusterSpec.preset("cpu").with_mesh((2, 4), ("x", "y"))
    return ClusterSpec(**{**c.__dict__, "axis_links": (("x", Link(1e-6, 1e9)), ("y", Link(2e-6, 5e9)))})


def test_axis_links_override_the_host_links_and_round_trip():
    c = _with_links()
    assert (c.link("x"), c.link("y")) == (Link(1e-6, 1e9), Link(2e-6, 5e9))
    assert c.alpha(("x", "y")) == 2e-6 and c.beta(("x", "y")) == 1e9  # slowest axis
    d = json.loads(c.to_json())
    assert d["axis_links"] == {"x": {"alpha": 1e-6, "beta": 1e9}, "y": {"alpha": 2e-6, "beta": 5e9}}
    back = ClusterSpec.from_json(c.to_json())
    assert back == c and hash(back) == hash(c)


def test_specs_without_axis_links_read_and_write_as_before():
    c = ClusterSpec.preset("cpu")
    assert "axis_links" not in c.to_dict()  # plan files keep their shape
    d = c.to_dict()
    assert ClusterSpec.from_dict(d) == c and ClusterSpec.from_dict(d).axis_links == ()


def test_axis_links_follow_renamed_axes_and_drop_on_another_shape():
    c = _with_links()
    renamed = c.with_mesh((2, 4), ("dp", "tp"))
    assert renamed.link("dp") == Link(1e-6, 1e9) and renamed.link("tp") == Link(2e-6, 5e9)
    other = c.with_mesh((4, 2), ("x", "y"))
    assert other.axis_links == () and other.link("x") == c.intra_host


def test_axis_links_for_an_unknown_axis_are_an_error():
    d = _with_links().to_dict()
    d["axis_links"]["z"] = {"alpha": 1e-6, "beta": 1e9}
    with pytest.raises(MeshError, match=r"axis_links for \['z'\]"):
        ClusterSpec.from_dict(d)


def test_scaled_changes_measured_in_host_links_too():
    c = _with_links().scaled(intra_beta=7e9)
    assert c.link("x").beta == 7e9 and c.link("y").beta == 7e9 and c.link("x").alpha == 1e-6


# ---- the timed programs ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ["x", "y"])
def test_chained_collectives_all_stay_in_the_compiled_program(kind, axis):
    """XLA neither merges nor drops the chain: the difference of two chains is that many collectives."""
    mesh = make_mesh((2, 4))
    n = mesh.shape[axis]
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    x = jax.ShapeDtypeStruct((8 * buffer_elements(kind, n, 4096),), np.float32,
                             sharding=NamedSharding(mesh, PartitionSpec(("x", "y"))))
    text = collective_program(mesh, kind, axis, 3).lower(x).compile().as_text()
    assert len(re.findall(rf" {kind}\(", text)) == 3, text
    groups = re.findall(r"replica_groups=\{(\{[^=]*?\})\}", text)[0]
    assert groups.count("{") == 8 // n  # one group per row (x) or column (y) of the mesh


def test_time_collective_gives_a_sample_of_the_requested_size():
    mesh = make_mesh((2, 4))
    opts = CalibrationOptions(reps=1, repeats=1)
    s = time_collective(mesh, "all-gather", "y", 64 * 1024, opts)
    assert (s.kind, s.axis, s.group_size, s.nbytes) == ("all-gather", "y", 4, 64 * 1024)
    assert math.isfinite(s.seconds)


# ---- the command -------------------------------------------------------------------------------
def run(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV},
                          timeout=300)


# Python's warning output for fit_samples' warning: the message line, then the calling line.
BUSY_MACHINE_WARNING = re.compile(r"^.*UserWarning: \d+ of \d+ collective timings came out non-positive.*\n(?:  .*\n)?",
                                  re.M)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    r = run("calibrate", "--quick", "--out", str(d / "cluster.json"))
    assert r.returncode == 0, r.stderr
    return r, d / "cluster.json"


def test_quick_calibration_writes_a_spec_with_positive_figures(calibrated):
    r, path = calibrated
    c = ClusterSpec.from_json(path.read_text())
    assert c.mesh_shape == (2, 4) and c.axis_names == ("x", "y") and c.name == "cpu-calibrated"
    figures = [c.device.peak_flops, c.device.hbm_bandwidth, c.device.memory]
    figures += [lk.beta for _, lk in c.axis_links] + [c.intra_host.beta, c.inter_host.beta]
    assert all(math.isfinite(v) and v > 0 for v in figures), c
    assert all(math.isfinite(lk.alpha) and lk.alpha >= 0 for _, lk in c.axis_links)
    assert [a for a, _ in c.axis_links] == ["x", "y"]
    assert c.device.efficiency == 1.0
    for text in ("Links per mesh axis", "all (in the spec)", "all-reduce", "all-gather", "all-to-all",
                 "FLOP/s", "memory bandwidth", f"cluster written to {path}"):
        assert text in r.stdout, text
    # stderr is not a terminal: no progress drawn. On a busy machine calibrate may warn that
    # some timings came out non-positive; nothing else may be there.
    assert "\x1b[" not in r.stderr
    assert not re.search(r"over [xy] \(|matmul and memory bandwidth", r.stderr), r.stderr
    assert BUSY_MACHINE_WARNING.sub("", r.stderr) == "", r.stderr


def test_plan_accepts_the_calibrated_file(calibrated, tmp_path, capsys, monkeypatch):
    """``plan --cluster FILE`` through the console script's entry point, in this process (the
    output is what is checked; a process would cost a jax start-up)."""
    from alpa_lite import cli

    _, path = calibrated
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])
    with pytest.raises(SystemExit) as stop:
        cli.main(["plan", "examples.mlp:target", "--cluster", str(path), "--json", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()
    assert stop.value.code == 0, err
    assert "mesh x=2 × y=4 (8 devices)" in out and "cluster cpu-calibrated" in out
    saved = json.loads((tmp_path / "p.json").read_text())["cluster"]
    assert saved["axis_links"] == json.loads(path.read_text())["axis_links"]


def test_progress_shows_on_a_terminal(tmp_path):
    """With stderr on a pseudo-terminal the phases appear (drawn with escape codes, then erased)."""
    import os
    import pty
    import select

    leader, follower = pty.openpty()
    p = subprocess.Popen([*CLI, "calibrate", "--quick", "--mesh", "8", "--out", str(tmp_path / "c.json")], cwd=ROOT,
                         env={**os.environ, **ENV, "TERM": "xterm"}, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    seen = b""
    while select.select([leader], [], [], 120)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = p.communicate(timeout=120)
    os.close(leader)
    assert p.returncode == 0
    text = seen.decode(errors="replace")
    assert "\x1b[" in text and "all-reduce over x" in text and "matmul" in text
    assert "\x1b[" not in out and "cluster written to" in out  # stdout was a pipe: plain
    assert ClusterSpec.from_json((tmp_path / "c.json").read_text()).axis_names == ("x",)


BAD = {
    "bad mesh": (["--mesh", "2xq"], "bad mesh '2xq'"),
    "mesh larger than the devices": (["--mesh", "4x4"], "needs 16 devices, this machine has 8"),
    "no axis to measure": (["--mesh", "1x1"], "no axis of size ≥ 2"),
    "bad axes": (["--mesh", "2x4", "--axes", "x"], "must name each of the 2"),
    "one size": (["--sizes", "4KiB"], "two or more different sizes"),
    "bad size": (["--sizes", "4KiB,lots"], "bad memory size 'lots'"),
    "no such directory": (["--out", "/no/such/dir/c.json"], "no such directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_status_2(case, capsys, monkeypatch):
    """The console script's entry point, in this process (a process per case would cost a jax
    start-up each): one line on stderr, exit status 2, nothing timed."""
    from alpa_lite import cli

    monkeypatch.chdir(ROOT)
    args, expected = BAD[case]
    with pytest.raises(SystemExit) as stop:
        cli.main(["calibrate", "--quick", *args])
    out, err = capsys.readouterr()
    assert stop.value.code == 2, (case, err)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("alpa-lite: error: ") and expected in err, err


def test_fit_leaves_out_non_positive_timings_with_a_warning():
    """A busy machine can make a chained-timing difference come out ≤ 0: that sample is dropped."""
    from alpa_lite.measure.calibrate import Sample, fit_samples

    alpha, beta = 20e-6, 2e9
    good = [Sample("all-gather", "x", 2, n, 0.0) for n in (4096.0, 65536.0, 1048576.0)]
    good = [Sample(s.kind, s.axis, s.group_size, s.nbytes, alpha + s.wire_bytes / beta) for s in good]
    bad = Sample("all-gather", "x", 2, 16384.0, -1e-6)
    with pytest.warns(UserWarning, match="1 of 4 collective timings"):
        fit = fit_samples([*good, bad])
    assert fit.alpha == pytest.approx(alpha, rel=1e-6) and fit.beta == pytest.approx(beta, rel=1e-6)


def test_noisy_axis_is_timed_again_with_more_repeats(monkeypatch):
    """Times that shrink with the message size (a busy machine) are timed again with twice the
    repeats; the calibration then fits, and says so in its notes."""
    import alpa_lite.measure.calibrate as cal

    calls = []

    def fake(mesh, kind, axis, nbytes, opts):
        calls.append(opts.repeats)
        noisy = opts.repeats == CalibrationOptions.quick().repeats
        seconds = (1e-3 - nbytes * 1e-11) if noisy else (1e-5 + nbytes * 1e-9)
        return cal.Sample(kind, axis, mesh.shape[axis], float(nbytes), seconds)

    monkeypatch.setattr(cal, "time_collective", fake)
    result = cal.calibrate(make_mesh((2, 4)), CalibrationOptions.quick())
    quick = CalibrationOptions.quick().repeats
    assert set(calls) == {quick, 2 * quick}
    assert all(s.seconds == pytest.approx(1e-5 + s.nbytes * 1e-9) for s in result.samples)  # the retimed ones
    assert set(result.axis_fits) == {"x", "y"} and all(f.beta > 0 for f in result.axis_fits.values())
    assert any("timed again with" in n for n in result.notes)
