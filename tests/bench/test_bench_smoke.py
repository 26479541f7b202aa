"""Each benchmark script runs on its smallest config and prints its table (so they cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, header", [
    ("plan_quality", "| model | mesh | auto wire B |"),
    # slow: a calibration, then four plans compiled and timed (~12 s); the model tests check
    # predicted against compiled wire bytes in the default suite
    pytest.param("fidelity", "| model | mesh | method | predicted wire B |", marks=pytest.mark.slow),
    ("planning_time", "| layers | devices | hidden | plan s |"),
    # slow: four CPU compiles (~10 s); tests/models/test_generate.py covers decode in the default suite
    pytest.param("inference", "| shape | GPUs | batch | decode ms |", marks=pytest.mark.slow),
])
def test_bench_script_smallest(script, header, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--smallest", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert header in proc.stdout
    data = json.loads(out.read_text())
    assert data["rows"], data
    if script == "fidelity":
        assert all(r["wire_err"] <= 0.10 for r in data["rows"]), data["rows"]
    if script == "inference":
        assert all(r["predicted_wire"] == pytest.approx(r["compiled_wire"], rel=0.1, abs=256)
                   for r in data["cpu"]), data["cpu"]
    if script == "plan_quality":
        assert all(r["ratio"] <= 1.0 + 1e-9 for r in data["rows"]), data["rows"]


def test_megatron_sc21_smallest(tmp_path):
    """1.7B and 3.6B rows: finite positive predictions, the published figures as in the paper's
    Table 1, FLOPs as its formula counts them, and more GPU-seconds per step for the larger model."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "bench.megatron_sc21", "--smallest", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | TP/PP/DP | mbs×micro |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    published = {"1.7B": (137.0, 44, 1, 1, 32, 512), "3.6B": (138.0, 44, 2, 1, 64, 512)}
    assert [r["name"] for r in rows] == list(published)
    for r in rows:
        assert (r["tflops"], r["peak_pct"], r["tp"], r["pp"], r["gpus"], r["batch"]) == published[r["name"]]
        h, n, b = r["hidden"], r["layers"], r["batch"]
        want = 96 * b * 2048 * n * h * h * (1 + 2048 / (6 * h) + 51200 / (16 * n * h))  # the paper's eq. 3
        assert r["paper_flops"] == pytest.approx(want)
        assert 0 < r["pred_tflops"] < 312 and r["step_s"] > 0
        assert r["pred_tflops"] == pytest.approx(r["paper_flops"] / (r["step_s"] * r["gpus"]) / 1e12)
        assert r["error"] == pytest.approx(r["pred_tflops"] / r["tflops"] - 1)
        # recomputation: a block costs its forward+backward plus one more forward
        assert r["block_s"] == pytest.approx(r["pieces"]["fwd_bwd"]["total_s"] + r["pieces"]["fwd"]["total_s"])
        assert r["pieces"]["fwd_bwd"]["total_s"] > 2 * r["pieces"]["fwd"]["total_s"]
    small, large = rows
    assert large["step_s"] * large["gpus"] > small["step_s"] * small["gpus"]
    assert small["tp_comm_per_micro_s"] == 0 < large["tp_comm_per_micro_s"]  # TP 1 vs TP 2


def test_alpa_cases_smallest(tmp_path):
    """Tiny MoE (16 experts on 2 hosts × 8) and Wide-ResNet (8 GPUs): both plans found and
    within 80 GiB, auto never predicted slower than the hand plan (it only removes choices),
    TFLOP/s as the model's FLOPs over step time and GPUs; the expert-parallel plan splits
    every expert weight (and its Adam moments) along E over both mesh axes, nothing else."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "bench.alpa_cases", "--smallest", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | params | GPUs | hand plan | auto ms |" in proc.stdout
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["MoE-tiny", "WResNet-tiny"]
    assert (rows["MoE-tiny"]["hand"], rows["WResNet-tiny"]["hand"]) == ("expert_parallel", "data_parallel")
    for r in rows.values():
        auto, hand = r["auto"], r["hand_plan"]
        assert auto["fits"] and hand["fits"], r
        assert auto["step_ms"] <= hand["step_ms"] * (1 + 1e-6), r
        assert r["speedup"] == pytest.approx(hand["step_ms"] / auto["step_ms"])
        assert auto["tflops"] == pytest.approx(r["flops"] / (auto["step_ms"] / 1e3 * r["gpus"]) / 1e12)
    specs = rows["MoE-tiny"]["hand_plan"]["in_specs"]
    assert specs.count("[(host,device),R,R]") == 3 * 2, specs  # wi, wo of the MoE block; Adam's mu, nu of each
    assert specs.count("[(host,device),R]") == 2, specs  # tokens and targets: data parallel
    split = ("[(host,device),R,R]", "[(host,device),R]")
    assert all("host" not in s and "device" not in s for s in specs if s not in split), specs  # all else replicated


@pytest.mark.parametrize("family", ["moe", "wresnet"])
def test_alpa_cases_flop_count_matches_the_traced_step(family):
    """The analytic model FLOPs of bench/alpa_cases (TFLOP/s numerator) are within 12% of the
    traced step's dot and convolution FLOPs on the tiny shapes (the convolutions' strided
    input gradients count their dilated zeros in the trace)."""
    from alpa_lite.tracing.tracer import trace
    from bench.alpa_cases import SMALLEST

    case = next(c for c in SMALLEST if c.family == family)
    fn, args = case.make()
    graph = trace(fn, *args)
    traced = sum(op.flops for op in graph.ops if op.kind in ("dot", "convolution"))
    assert traced == pytest.approx(case.flops, rel=0.12)


def test_sc21_auto_tiny_row():
    """bench.sc21_auto on its made-up tiny GPT (8 dgx-a100 GPUs): TFLOP/s by the paper's eq. 3
    from the predicted step, and stages that cover every layer and every GPU exactly once."""
    from bench import sc21_auto

    rec = sc21_auto.one_row("tiny")
    a = rec["auto"]
    assert a["status"] in ("OPTIMAL", "FEASIBLE"), a
    h, n, b, s, v, gpus = 64, 2, 4, 32, 512, 8  # TINY, written out
    flops = 96 * b * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    assert rec["eq3_flops"] == pytest.approx(flops)
    assert a["step_s"] > 0 and a["tflops"] == pytest.approx(flops / (a["step_s"] * gpus) / 1e12)
    spans = [tuple(st["layers"]) for st in a["stages"]]
    assert spans[0][0] == 0 and spans[-1][1] == n - 1
    assert all(lo <= hi and hi + 1 == nxt for (lo, hi), (nxt, _) in zip(spans, spans[1:], strict=False))
    assert sum(st["devices"] for st in a["stages"]) == gpus
    assert all(st["view"][0] * st["view"][-1] == st["devices"] for st in a["stages"])
    assert 1 <= a["num_microbatches"] <= b and rec["megatron"] is None  # no published configuration


def test_sc21_auto_megatron_interleaved_step():
    """76.1B's interleaved schedule (3 chunks): a third of 1F1B's bubble, 3 boundary transfers per
    microbatch per stage; rows without chunks keep predict's step."""
    from bench import sc21_auto

    r76, r39 = sc21_auto.ROWS["76.1B"], sc21_auto.ROWS["39.1B"]
    assert (r76.tp, r76.pp, r76.dp, r76.num_microbatches) == (8, 4, 32, 28)  # 1792 / (32 · 2)
    pred = {"step_s": 10.0, "bubble_s": 1.5, "p2p_s": 0.001}
    assert sc21_auto.megatron_step(r76, pred) == pytest.approx(10.0 - 1.0 + 2 * 0.001 * 28)
    assert sc21_auto.megatron_step(r39, pred) == pytest.approx(10.0)


def test_sc21_auto_stage_summary():
    st = lambda lo, hi, view: {"layers": [lo, hi], "view": view}  # noqa: E731
    stages = [st(0, 0, [8, 1]), *(st(1 + 3 * i, 3 + 3 * i, [4, 8]) for i in range(3)), st(10, 10, [2, 8])]
    from bench import sc21_auto

    assert sc21_auto.stages_text(stages) == "1×1L(8,1) + 3×3L(4,8) + 1×1L(2,8)"
