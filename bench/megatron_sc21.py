"""Predicted per-GPU TFLOP/s of Megatron-LM's GPT runs on DGX-A100s vs the SC'21 paper's Table 1.

    python -m bench.megatron_sc21 [--smallest] [--json out.json]

Published figures: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC'21 (arXiv 2104.04473), Table 1, rows 1.7B to 39.1B: sequence
2048, vocabulary 51,200, fp16 mixed precision, DGX A100 80GB nodes (8 GPUs on NVLink, 8×200 Gb/s
HDR InfiniBand per node), full activation recomputation. Heads, hidden size, layers, TP, PP,
GPU count and global batch were checked against the launch script the authors published for
that table, NVIDIA/Megatron-LM ``examples/sc21/run_table_1.sh``, which also gives the microbatch
sizes used here (MBS 16, 16, 16, 8, 4) and ``--recompute-method uniform`` for every row. The
throughputs (TFLOP/s per GPU, % of the 312 TFLOP/s peak) are the paper's Table 1 as transcribed
for issue #7; no text copy of the table was found to re-check them against (the lowest, 137, and
the paper's 1T figure, 163, agree with the "137 to 163 TFLOP/s per A100" others quote).

The paper counts, per iteration of global batch B (sequence s, layers l, hidden h, vocab V),

    F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))                                  (its eq. 3)

i.e. 4 forward passes of each block (forward, recomputed forward, backward = 2 forwards) and
3 of the LM head; its throughput is F / (iteration time · GPUs). We predict the iteration time
T from our cost model and report F / (T · GPUs), so the two figures count the same FLOPs.

How T is composed (one DP/TP/PP replica; everything per GPU, from ``al.plan`` on the
``dgx-a100`` preset unless said):

- ``t_fwd``, ``t_fb``: one transformer block's forward, and its forward + backward (the vjp of
  the block w.r.t. weights and input, returning the output too), for one microbatch
  (mbs, s, h) in fp16, each planned with ``method="megatron"`` on a 1-D mesh of TP devices
  inside one host (NVLink). The baseline fixes Megatron's weight layout (QKV and FC1 split by
  columns, attention-out and FC2 by rows; QKV columns ordered head-major, as Megatron stores
  them, so heads stay whole on a device); the ILP places activations at least cost, so where it
  is cheaper it keeps them sequence-split between the TP collectives (reduce-scatter + all-gather
  in place of an all-reduce, as Megatron's later sequence parallelism does: same wire bytes, less
  element-wise work). Each plan's cost = compute (roofline per op) + TP collectives + resharding.
- block time per microbatch ``t_block = t_fb + t_fwd``: the extra forward is the recomputation.
- ``t_embed`` (token + position lookup, forward + backward) and ``t_head`` (final layer norm,
  vocab-parallel LM head, fp32 cross entropy, forward + backward), planned the same way. The head
  is not recomputed, as in the paper's count.
- stage i's time per microbatch ``t_i = (l/PP)·t_block + [t_embed on the first stage]
  + [t_head on the last] + p2p``; with PP > 1, ``p2p`` is Megatron's scatter/gather transfer of
  the boundary activation (mbs·s·h fp16), forward and backward: a collective-permute of 1/TP of
  it across hosts plus an all-gather over TP, priced by ``cost_model.collectives``.
- once per step, ``u_i``: the data-parallel all-reduce of stage i's fp16 gradients per GPU over
  the DP group (the cluster's α/β: the group spans hosts in every row, so InfiniBand), the tied
  embedding's gradient all-reduce between first and last stage when PP > 1, and the Adam update
  of the stage's per-GPU parameter shard (fp32 master weights, moments, fp16 copy), planned on
  one device for one block's shard and scaled by parameter count (element-wise: linear).
- with M = B / (DP·mbs) microbatches, dp_stages' formula
  ``T = Σ_i t_i + (M − 1)·max_i t_i + max_i u_i`` (GPipe / 1F1B: the bubble is Σ t_i − max t_i).

What this leaves out, on purpose (the table shows the prediction as the model makes it; no
constant is tuned to the paper): the preset's flat matmul efficiency (0.6 of peak for every dot,
whatever its shape); element-wise ops costed one HBM pass each (no kernel fusion: Megatron's
fused scale-mask-softmax, bias-GeLU and fused Adam are several passes here); no overlap of the
gradient all-reduce with the backward pass (PyTorch DDP overlaps it in the 1.7B-18.4B runs);
no dropout, no linear-layer biases; data loading and logging, which the paper's end-to-end
figure includes.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import alpa_lite as al
import bench.common as common
from cost_model.collectives import all_gather, all_reduce, collective_permute, collective_time

SEQ, VOCAB = 2048, 51200  # the paper's sequence length and vocabulary (Table 1 caption)
DTYPE = jnp.float16  # fp16 mixed precision; A100 dense fp16 = bf16 = 312 TFLOP/s
PEAK_TFLOPS = 312.0  # A100 dense fp16 tensor-core peak, what the paper's "% of peak" divides by
GPUS_PER_HOST = 8  # DGX A100
_HUGE = 1e15  # bytes: memory budget for time-only plans (Megatron ran these; un-fused
# activations here would overstate memory, and feasibility is not what this table measures)


@dataclass(frozen=True)
class Sc21Row:
    """One row of the paper's Table 1 (published figures) plus its microbatch size."""

    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    microbatch: int  # run_table_1.sh's MBS
    tflops: float  # published achieved TFLOP/s per GPU
    peak_pct: int  # published % of theoretical peak

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.batch // (self.dp * self.microbatch)


PUBLISHED: tuple[Sc21Row, ...] = (
    Sc21Row("1.7B", 24, 2304, 24, 1, 1, 32, 512, 16, 137.0, 44),
    Sc21Row("3.6B", 32, 3072, 30, 2, 1, 64, 512, 16, 138.0, 44),
    Sc21Row("7.5B", 32, 4096, 36, 4, 1, 128, 512, 16, 142.0, 46),
    Sc21Row("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 8, 135.0, 43),
    Sc21Row("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 4, 138.0, 44),
)


def paper_flops(r: Sc21Row) -> float:
    """FLOPs per iteration as the paper counts them (with recomputation)."""
    h, n = r.hidden, r.layers
    return 96 * r.batch * SEQ * n * h * h * (1 + SEQ / (6 * h) + VOCAB / (16 * n * h))


# ---- the planned pieces (one microbatch, one TP group) ------------------------------------
def _layer_norm(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _block(p: dict[str, Any], x: jax.Array, heads: int) -> jax.Array:
    """GPT block as Megatron lays it out: QKV columns head-major ([head][q|k|v][head_dim])."""
    b, s, h = x.shape
    hd = h // heads
    qkv = (_layer_norm(p["ln1"], x) @ p["qkv"]).reshape(b, s, heads, 3 * hd)
    q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(1 / math.sqrt(hd), x.dtype)
    causal = jnp.tril(jnp.ones((s, s), bool))
    att = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(x.dtype).min), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, h) @ p["out"]
    return x + jax.nn.gelu(_layer_norm(p["ln2"], x) @ p["fc1"]) @ p["fc2"]


def _sds(*shape: int, dtype: Any = DTYPE) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _norm(h: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"g": _sds(h), "b": _sds(h)}


def _block_params(h: int) -> dict[str, Any]:
    return {"ln1": _norm(h), "qkv": _sds(h, 3 * h), "out": _sds(h, h), "ln2": _norm(h),
            "fc1": _sds(h, 4 * h), "fc2": _sds(4 * h, h)}


def _with_vjp(f: Any) -> Any:
    """(params, x, dy) → (f(params, x), vjp w.r.t. params and x): forward + backward."""
    def step(p: Any, x: Any, dy: Any) -> Any:
        y, vjp = jax.vjp(f, p, x)
        return y, vjp(dy)

    return step


def _head_step(p: dict[str, Any], x: jax.Array, targets: jax.Array) -> Any:
    """Final layer norm, vocab-parallel LM head, fp32 cross entropy; forward + backward."""
    def loss(p: dict[str, Any], x: jax.Array) -> jax.Array:
        logits = (_layer_norm(p["ln_f"], x) @ p["w"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1))

    return jax.value_and_grad(loss, argnums=(0, 1))(p, x)


def _embed_step(p: dict[str, Any], tokens: jax.Array, dx: jax.Array) -> Any:
    """Token + position embedding, forward + backward (scatter-add into the tables)."""
    f = lambda p: jnp.take(p["wte"], tokens, axis=0) + p["wpe"][None]
    x, vjp = jax.vjp(f, p)
    return x, vjp(dx)


def _adam(master: jax.Array, grad: jax.Array, m: jax.Array, v: jax.Array) -> Any:
    """Mixed-precision Adam on a flat shard: fp32 master and moments, fp16 grad in and copy out."""
    g = grad.astype(jnp.float32)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    master = master - 1e-4 * m / (jnp.sqrt(v) + 1e-8)
    return master, m, v, master.astype(DTYPE)


@dataclass(frozen=True)
class Piece:
    """Predicted seconds of one planned piece (per GPU): compute and communication."""

    compute_s: float
    comm_s: float
    plan_s: float  # wall time spent planning it

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def _plan(fn: Any, *args: Any, cluster: al.ClusterSpec, method: str = "megatron") -> Piece:
    t0 = time.perf_counter()
    plan = al.plan(fn, *args, cluster=cluster, method=method, num_stages=1, memory_budget=_HUGE)
    c = plan.cost
    return Piece(c.compute_s, c.communication_s + c.resharding_s, time.perf_counter() - t0)


def _tp_cluster(tp: int) -> al.ClusterSpec:
    """TP devices of one DGX A100 host, as a 1-D mesh (NVLink)."""
    return al.ClusterSpec.preset("dgx-a100", num_hosts=1).with_mesh((tp,), ("tp",))


def _row_cluster(r: Sc21Row) -> al.ClusterSpec:
    """The whole run as a (pp, dp, tp) mesh in Megatron's rank order (TP fastest, then DP)."""
    return (al.ClusterSpec.preset("dgx-a100", num_hosts=r.gpus // GPUS_PER_HOST)
            .with_mesh((r.pp, r.dp, r.tp), ("pp", "dp", "tp")))


def plan_pieces(r: Sc21Row) -> dict[str, Piece]:
    """Block forward, block forward+backward, embedding, head (per microbatch) and Adam on one
    block's per-GPU shard, each from ``al.plan``."""
    h, mbs, cl = r.hidden, r.microbatch, _tp_cluster(r.tp)
    x = _sds(mbs, SEQ, h)
    tok = _sds(mbs, SEQ, dtype=jnp.int32)
    block = lambda p, x: _block(p, x, r.heads)
    shard = _block_shard_params(r)
    f32 = _sds(shard, dtype=jnp.float32)
    return {
        "fwd": _plan(block, _block_params(h), x, cluster=cl),
        "fwd_bwd": _plan(_with_vjp(block), _block_params(h), x, x, cluster=cl),
        "embed": _plan(_embed_step, {"wte": _sds(VOCAB, h), "wpe": _sds(SEQ, h)}, tok, x, cluster=cl),
        "head": _plan(_head_step, {"ln_f": _norm(h), "w": _sds(h, VOCAB)}, x, tok, cluster=cl),
        "adam_block": _plan(_adam, f32, _sds(shard), f32, f32, cluster=_tp_cluster(1),
                            method="data_parallel"),
    }


def _block_shard_params(r: Sc21Row) -> int:
    """Per-GPU parameters of one block: the 12h² matmul weights split over TP, 4h norms whole."""
    return 12 * r.hidden * r.hidden // r.tp + 4 * r.hidden


def _stage_params(r: Sc21Row, stage: int) -> int:
    """Per-GPU parameters of a pipeline stage (the embedding table vocab-split over TP; with
    PP > 1 the last stage holds its own copy of the tied table for the head)."""
    n = r.layers // r.pp * _block_shard_params(r) + (2 * r.hidden if stage == r.pp - 1 else 0)
    if stage == 0:
        n += VOCAB * r.hidden // r.tp + SEQ * r.hidden
    if stage == r.pp - 1 and r.pp > 1:
        n += VOCAB * r.hidden // r.tp
    return n


def compose(r: Sc21Row, pieces: dict[str, Piece]) -> dict[str, float]:
    """Iteration time T from the pieces (see the module docstring for the formula)."""
    cl = _row_cluster(r)
    act = r.microbatch * SEQ * r.hidden * 2  # fp16 boundary activation, bytes
    p2p = 0.0
    if r.pp > 1:  # forward activation and backward gradient, scatter/gather optimisation
        p2p = 2 * (collective_time(collective_permute(("pp",), act / r.tp, cl), cl)
                   + collective_time(all_gather(("tp",), act, cl), cl))
    block = pieces["fwd_bwd"].total_s + pieces["fwd"].total_s
    t, u, grad_ar, opt = [], [], [], []
    for i in range(r.pp):
        ti = r.layers // r.pp * block + p2p
        ti += pieces["embed"].total_s if i == 0 else 0.0
        ti += pieces["head"].total_s if i == r.pp - 1 else 0.0
        n = _stage_params(r, i)
        ar = collective_time(all_reduce(("dp",), 2.0 * n, cl), cl)
        if r.pp > 1 and i in (0, r.pp - 1):  # tied embedding: first and last stage agree
            ar += collective_time(all_reduce(("pp",), 2.0 * VOCAB * r.hidden / r.tp, cl), cl)
        op = pieces["adam_block"].total_s * n / _block_shard_params(r)
        t.append(ti)
        u.append(ar + op)
        grad_ar.append(ar)
        opt.append(op)
    m = r.num_microbatches
    k = int(np.argmax(u))
    step = sum(t) + (m - 1) * max(t) + u[k]
    tp_comm = (pieces["fwd_bwd"].comm_s + pieces["fwd"].comm_s) * (r.layers // r.pp)
    return dict(step_s=step, stage_s=max(t), bubble_s=sum(t) - max(t), grad_allreduce_s=grad_ar[k],
                optimizer_s=opt[k], p2p_s=p2p, block_s=block, tp_comm_per_micro_s=tp_comm)


def predict(r: Sc21Row) -> dict[str, Any]:
    pieces = plan_pieces(r)
    times = compose(r, pieces)
    flops = paper_flops(r)
    pred = flops / (times["step_s"] * r.gpus) / 1e12
    dev = al.ClusterSpec.preset("dgx-a100").device
    ideal = flops / r.gpus / (dev.peak_flops * dev.efficiency)  # every counted FLOP a matmul
    return dict(**asdict(r), dp=r.dp, num_microbatches=r.num_microbatches, paper_flops=flops, matmul_only_s=ideal,
                **times, pred_tflops=pred, pred_peak_pct=100 * pred / PEAK_TFLOPS,
                error=pred / r.tflops - 1, plan_s=sum(p.plan_s for p in pieces.values()),
                pieces={k: {**asdict(p), "total_s": p.total_s} for k, p in pieces.items()})


def _ms(s: float) -> str:
    return f"{s * 1e3:,.0f}" if s >= 0.1 else f"{s * 1e3:.3g}"


def run(smallest: bool = False) -> dict:
    """Predict every row (``smallest``: the first two, 1.7B and 3.6B) and print the table."""
    wall = time.perf_counter()
    records = [predict(r) for r in (PUBLISHED[:2] if smallest else PUBLISHED)]
    rows = [[d["name"], f"{d['tp']}/{d['pp']}/{d['dp']}", f"{d['microbatch']}×{d['num_microbatches']}",
             _ms(d["pieces"]["fwd"]["total_s"]), _ms(d["pieces"]["fwd_bwd"]["total_s"]),
             _ms(d["stage_s"]), f"{d['tp_comm_per_micro_s'] / d['stage_s']:.1%}",
             f"{d['step_s']:.3g}", f"{d['matmul_only_s']:.3g}", f"{d['bubble_s']:.3g}", f"{d['grad_allreduce_s']:.3g}",
             f"{d['optimizer_s']:.3g}", f"{d['pred_tflops']:.1f}", f"{d['tflops']:.0f}",
             f"{d['error']:+.1%}", f"{d['plan_s']:.1f}"] for d in records]
    worst = max(abs(d["error"]) for d in records)
    common.print_table(
        f"Megatron-LM SC'21 Table 1 vs predicted, dgx-a100 preset ({common.machine()}): "
        f"max |error| {worst:.1%}",
        ["model", "TP/PP/DP", "mbs×micro", "block fwd ms", "block fwd+bwd ms", "stage ms/micro",
         "TP comm share", "step s", "matmul-only s", "bubble s", "grad all-reduce s", "Adam s", "pred TFLOP/s",
         "published TFLOP/s", "error", "plan s"], rows)
    ceiling = PEAK_TFLOPS * al.ClusterSpec.preset("dgx-a100").device.efficiency
    print(f"Ceiling of this cost model: every counted FLOP in a matmul at the preset's efficiency (0.6) = "
          f"{ceiling:.1f} TFLOP/s per GPU ('matmul-only s'). The rest of 'step s' is element-wise ops "
          "costed un-fused (one HBM pass each; Megatron-LM fuses softmax, bias-GeLU and Adam), TP "
          "collectives, the pipeline bubble and a gradient all-reduce not overlapped with the backward "
          "pass (PyTorch DDP overlaps it for PP = 1). Agreement with the paper rests on the flat 0.6 "
          "matmul efficiency, a preset guess not measured on A100 GEMMs of these shapes: these "
          "overheads and that guess offset each other, they are not each right.\n")
    return dict(rows=records, max_abs_error=worst, ceiling_tflops=ceiling, machine=common.machine(),
                wall_s=time.perf_counter() - wall,
                source="Narayanan et al., SC'21 (arXiv 2104.04473) Table 1; configs and microbatch sizes "
                       "from NVIDIA/Megatron-LM examples/sc21/run_table_1.sh")


if __name__ == "__main__":
    common.use_cpu_devices()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smallest", action="store_true", help="the 1.7B and 3.6B rows only (the smoke test)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    common.write_json(a.json, run(a.smallest))
