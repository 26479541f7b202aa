"""The planner's own plans for Megatron-LM's SC'21 GPT rows, beside Megatron-LM's configurations.

    python -m bench.sc21_auto [--rows 1.7B 3.6B 7.5B 18.4B 39.1B 76.1B 175B] [--timeout 600] [--json out.json]
    python -m bench.sc21_auto --smallest          # a made-up tiny GPT on 8 GPUs (the smoke test)

For each row: ``al.plan(step, *abstract_args, cluster=ClusterSpec.preset("dgx-a100", num_hosts=GPUs/8))``
with every other argument left at its default (stages, microbatches and recomputation chosen by the
planner), on ``examples.gpt``'s bf16 GPT with the paper's sequence (2048) and vocabulary (51,200),
its heads, hidden size, layers and global batch. One process per row (``--one NAME`` is that
process), so each row's planning time is its own; a row still planning after ``--timeout`` seconds
is reported as too slow.

Throughput is counted as the paper counts it (Narayanan et al., SC'21, eq. 3):

    F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)),    TFLOP/s per GPU = F / (T · GPUs)

F includes a recomputed forward of every block whether or not a plan recomputes, so the auto and
Megatron-LM figures of a row share one numerator and their ratio is the inverse ratio of the
predicted step times T.

Megatron-LM's configuration is predicted by ``bench.megatron_sc21.predict`` (the same cost model,
composed from per-block plans with Megatron's layout fixed). Rows 1.7B-39.1B are its PUBLISHED
rows. Two rows are added here:

- 76.1B: the paper's Table 1 (80 heads, hidden 10240, 60 layers, TP 8, PP 4, 1024 GPUs, batch
  1792; 140 TFLOP/s, 45 % of peak), microbatch 2 and the interleaved schedule with 5 layers per
  virtual stage (3 chunks per device) from NVIDIA/Megatron-LM ``examples/sc21/run_table_1.sh``
  ("76B"). ``predict`` models the plain 1F1B schedule; here its bubble is divided by the 3 chunks
  and each microbatch pays the boundary transfer 3 times (Megatron's interleaving), see
  ``megatron_step``.
- 175B (GPT-3: 96 heads, hidden 12288, 96 layers, 1024 GPUs, batch 1536): the paper has no Table 1
  row for it. Its §5.1 estimates GPT-3's training time from a throughput of 140 TFLOP/s per GPU on
  1024 A100s at batch 1536, without giving the configuration; the configuration used here is that
  of NVIDIA/Megatron-LM ``examples/gpt3/train_gpt3_175b_distributed.sh`` (TP 8, PP 16,
  microbatch 1, batch 1536; no interleaving): an assumption, not the paper's.

Differences between the two sides that the figures carry (see bench/README.md, "SC'21 auto"):
the auto plan must fit 80 GB per GPU with the cost model's memory (un-fused activations, the
example's bf16 Adam state), Megatron's prediction is costed with an unbounded budget (it ran);
the auto plan uses bf16 and Megatron fp16 (same A100 peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import alpa_lite as al
import bench.common as common
from bench.megatron_sc21 import PUBLISHED, SEQ, VOCAB, Sc21Row
from examples.gpt import GPTConfig, abstract_example

ROOT = Path(__file__).resolve().parents[1]
GPUS_PER_HOST = 8  # DGX A100

EXTRA: tuple[Sc21Row, ...] = (
    # SC'21 Table 1; MBS 2 from run_table_1.sh ("76B")
    Sc21Row("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 2, 140.0, 45),
    # GPT-3 175B: SC'21 §5.1's 140 TFLOP/s; TP/PP/MBS from examples/gpt3/train_gpt3_175b_distributed.sh
    Sc21Row("175B", 96, 12288, 96, 8, 16, 1024, 1536, 1, 140.0, 45),
)
ROWS: dict[str, Sc21Row] = {r.name: r for r in (*PUBLISHED, *EXTRA)}
VIRTUAL_STAGES = {"76.1B": 3}  # --num-layers-per-virtual-pipeline-stage 5 of 15 layers per stage


@dataclass(frozen=True)
class Shape:
    """What the auto side plans: a GPT shape, its global batch and GPU count."""

    name: str
    heads: int
    hidden: int
    layers: int
    gpus: int
    batch: int
    seq: int = SEQ
    vocab: int = VOCAB


# Made up, for the smoke test: one DGX host, 2 layers, global batch 4 (microbatch counts 1, 2, 4),
# so the pipeline search solves few layer ILPs (~5 s of planning; 16 GPUs and 4 layers take ~18 s).
TINY = Shape("tiny", heads=4, hidden=64, layers=2, gpus=8, batch=4, seq=32, vocab=512)


def shape_of(r: Sc21Row) -> Shape:
    return Shape(r.name, r.heads, r.hidden, r.layers, r.gpus, r.batch)


def eq3_flops(s: Shape) -> float:
    """FLOPs per iteration as SC'21 eq. 3 counts them (4 forward passes per block, 3 of the head)."""
    h, n = s.hidden, s.layers
    return 96 * s.batch * s.seq * n * h * h * (1 + s.seq / (6 * h) + s.vocab / (16 * n * h))


def tflops_per_gpu(s: Shape, step_s: float) -> float:
    return eq3_flops(s) / (step_s * s.gpus) / 1e12


def _stage_record(st: Any) -> dict[str, Any]:
    # A pipeline stage's view is its logical (dp, tp); a one-stage plan has none and shows its
    # mesh shape (hosts, devices per host), on which the ILP may split over either axis.
    return dict(layers=list(st.layers), submesh=list(st.submesh), view=list(st.view or st.submesh),
                devices=len(st.devices), remat=st.remat, t_s=st.t_s, u_s=st.u_s,
                memory_bytes=st.memory_bytes, remat_extra_s=st.remat_extra_s, remat_policy=st.remat_policy)


def plan_auto(s: Shape, what_if: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan the shape with default arguments on the dgx-a100 preset; the plan found and its times.
    ``what_if``: options of ``plan_pipeline`` that ``al.plan`` does not expose (``schedule``,
    ``logical_views``, ``num_microbatches``), to measure what a restriction of the default costs."""
    cfg = GPTConfig(vocab=s.vocab, seq=s.seq, d_model=s.hidden, n_heads=s.heads, n_layers=s.layers,
                    d_ff=4 * s.hidden, dtype=jnp.bfloat16)
    fn, args = abstract_example(cfg, batch=s.batch)
    cluster = al.ClusterSpec.preset("dgx-a100", num_hosts=s.gpus // GPUS_PER_HOST)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        if what_if:
            from alpa_lite.pipeline.planner import plan_pipeline

            plan = plan_pipeline(fn, *args, cluster=cluster, **what_if)
        else:
            plan = al.plan(fn, *args, cluster=cluster)
    except al.PlanningError as e:
        return dict(status=type(e).__name__, note=str(e), plan_s=time.perf_counter() - t0, load_before=load)
    rec = dict(status=plan.solver.status, plan_s=time.perf_counter() - t0, load_before=load,
               load_after=os.getloadavg()[0], timings=dict(plan.timings), note=plan.solver.note,
               step_s=plan.cost.total_s, peak_memory_bytes=plan.cost.peak_memory_bytes,
               num_microbatches=plan.pipeline.num_microbatches if plan.pipeline else 1,
               bubble_fraction=plan.pipeline.bubble_fraction if plan.pipeline else 0.0,
               one_stage_s=plan.pipeline.one_stage_s if plan.pipeline else None,
               one_stage_bound_s=plan.pipeline.one_stage_bound_s if plan.pipeline else None,
               stages=[_stage_record(st) for st in plan.stages])
    rec["tflops"] = tflops_per_gpu(s, rec["step_s"])
    return rec


def megatron_step(r: Sc21Row, pred: dict[str, Any]) -> float:
    """Megatron-LM's predicted step; with v interleaved chunks the bubble is 1/v of 1F1B's and
    every microbatch crosses v× as many stage boundaries (Narayanan et al., §2.2.2)."""
    v = VIRTUAL_STAGES.get(r.name, 1)
    return pred["step_s"] - pred["bubble_s"] * (1 - 1 / v) + (v - 1) * pred["p2p_s"] * r.num_microbatches


def megatron_side(r: Sc21Row) -> dict[str, Any]:
    from bench.megatron_sc21 import predict

    pred = predict(r)
    step = megatron_step(r, pred)
    return dict(config=f"TP {r.tp}, PP {r.pp}, DP {r.dp}, {r.microbatch}×{r.num_microbatches}"
                       + (f", {VIRTUAL_STAGES[r.name]} chunks" if r.name in VIRTUAL_STAGES else ""),
                step_s=step, step_1f1b_s=pred["step_s"], bubble_s=pred["bubble_s"], p2p_s=pred["p2p_s"],
                tflops=tflops_per_gpu(shape_of(r), step), published_tflops=r.tflops,
                published_peak_pct=r.peak_pct, plan_s=pred["plan_s"])


def one_row(name: str, what_if: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything for one row, in this process: the auto plan first (its time is the row's)."""
    s = TINY if name == TINY.name else shape_of(ROWS[name])
    rec: dict[str, Any] = dict(**asdict(s), eq3_flops=eq3_flops(s), auto=plan_auto(s, what_if),
                               what_if=what_if or None)
    rec["megatron"] = megatron_side(ROWS[name]) if name in ROWS else None
    if rec["megatron"] and "tflops" in rec["auto"]:
        rec["ratio"] = rec["auto"]["tflops"] / rec["megatron"]["tflops"]
    return rec


def row_in_subprocess(name: str, timeout_s: float, what_if: dict[str, Any] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        t0 = time.perf_counter()
        extra = ["--what-if", json.dumps(what_if)] if what_if else []
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.sc21_auto", "--one", name, *extra, "--json", str(out)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return dict(name=name, auto=dict(status="TOO SLOW", note=f"still planning after {timeout_s:.0f} s",
                                             plan_s=time.perf_counter() - t0), megatron=None)
        if proc.returncode != 0:
            return dict(name=name, auto=dict(status="CRASHED", note=proc.stderr[-2000:],
                                             plan_s=time.perf_counter() - t0), megatron=None)
        return json.loads(out.read_text())


def stages_text(stages: list[dict[str, Any]]) -> str:
    """Runs of equal stages: "31×3L(4,8) + 2×1L(8,1)" (count × layers per stage, logical dp×tp view)."""
    groups: list[list[Any]] = []
    for st in stages:
        key = (st["layers"][1] - st["layers"][0] + 1, tuple(st["view"]))
        if groups and groups[-1][0] == key:
            groups[-1][1] += 1
        else:
            groups.append([key, 1])
    return " + ".join(f"{n}×{k[0]}L({k[1][0]},{k[1][1] if len(k[1]) > 1 else 1})" for k, n in groups)


def _f(x: Any, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(recs: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in recs:
        a, m = r["auto"], r.get("megatron") or {}
        stages = a.get("stages", [])
        t = a.get("timings", {})
        remat = sum(bool(st["remat"]) for st in stages)
        rows.append([r["name"], r.get("gpus", ""), r.get("batch", ""), a["status"], len(stages),
                     stages_text(stages) if stages else "", a.get("num_microbatches", ""),
                     f"{remat}/{len(stages)}" if stages else "", _f(a.get("step_s"), ".3g"),
                     _f(a.get("tflops"), ".1f"), m.get("config", ""), _f(m.get("step_s"), ".3g"),
                     _f(m.get("tflops"), ".1f"), _f(m.get("published_tflops"), ".0f"), _f(r.get("ratio"), ".3f"),
                     _f(a.get("plan_s"), ".1f"),
                     " / ".join(_f(t.get(k, 0.0), ".0f") for k in ("trace_s", "layer_ilp_s", "dp_s", "one_stage_s"))
                     if t else "", _f(a.get("load_before"), ".1f")])
    return rows


HEADER = ["model", "GPUs", "batch", "status", "stages", "auto: stages × layers (dp,tp)", "B", "remat stages",
          "auto step s", "auto TFLOP/s", "Megatron-LM config", "Megatron step s", "Megatron TFLOP/s",
          "published TFLOP/s", "auto/Megatron", "plan s", "trace / layer ILPs / DP / one stage s", "load"]


def run(names: list[str], timeout_s: float, what_if: dict[str, Any] | None = None) -> dict[str, Any]:
    recs = [row_in_subprocess(n, timeout_s, what_if) for n in names]
    common.print_table(f"SC'21 GPT rows: al.plan's default plan vs Megatron-LM's configuration, dgx-a100 preset "
                       f"({common.machine()})", HEADER, table_rows(recs))
    if what_if:
        print(f"What-if (not the default path): plan_pipeline(..., {what_if})")
    print("TFLOP/s per GPU by SC'21 eq. 3 for both sides (recomputation counted whether or not a plan "
          "recomputes), so auto/Megatron is the ratio of predicted step times. Megatron-LM's step: "
          "bench.megatron_sc21.predict (76.1B: its bubble / 3 for the interleaved schedule).\n")
    for r in recs:
        if r["auto"].get("note"):
            print(f"{r['name']}: {r['auto']['note']}")
    return dict(rows=recs, machine=common.machine())


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per row before it counts as too slow")
    ap.add_argument("--smallest", action="store_true", help="the made-up tiny row only, in this process")
    ap.add_argument("--what-if", type=json.loads, default=None,
                    help='JSON of plan_pipeline options al.plan does not expose, e.g. \'{"schedule": "1f1b"}\'')
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one row in this process (what --rows spawns)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.one:
        out: dict[str, Any] = one_row(a.one, a.what_if)
    elif a.smallest:
        rec = one_row(TINY.name)
        common.print_table("SC'21 auto, smallest", HEADER, table_rows([rec]))
        out = dict(rows=[rec], machine=common.machine())
    else:
        out = run(a.rows, a.timeout, a.what_if)
    common.write_json(a.json, out)
