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
    ("fidelity", "| model | mesh | method | predicted wire B |"),
    ("planning_time", "| layers | devices | hidden | plan s |"),
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
    if script == "plan_quality":
        assert all(r["ratio"] <= 1.0 + 1e-9 for r in data["rows"]), data["rows"]
