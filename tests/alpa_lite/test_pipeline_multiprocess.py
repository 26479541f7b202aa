"""Plans across processes: 2 local processes × 4 CPU devices, ``jax.distributed.initialize`` on
localhost with gloo CPU collectives (the multi-controller runtime a GPU cluster uses)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    while True:  # the port and the two after it (cross-host transfer sockets) must be free
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        try:
            for p in (port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("localhost", p))
            return port
        except OSError:
            continue


def run_processes(module: str, case: str, timeout: float = 600) -> list[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", module, str(i), str(port), case], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.slow
def test_one_stage_plan_across_two_processes_equals_unsharded():
    outs = run_processes("tests.alpa_lite.pipeline_mp_worker", "one-stage")
    assert all("equals the unsharded step" in o for o in outs)


@pytest.mark.slow
def test_two_stage_pipeline_with_one_stage_per_process_equals_unsharded():
    outs = run_processes("tests.alpa_lite.pipeline_mp_worker", "pipeline")
    assert all("pipeline across processes equals the unsharded step" in o for o in outs)
