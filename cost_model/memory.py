"""Which op outputs the compiled program keeps in memory, and until when.

XLA fuses chains of cheap loop ops (element-wise arithmetic, broadcasts, reshapes, transposes,
slices) into the kernels that read them, so their outputs are never written to memory: a
fusion recomputes them from its own inputs, duplicating a cheap producer into every consumer
fusion if need be. The memory model therefore counts the output of an op only when XLA
*materialises* it, and keeps the inputs of an unmaterialised op alive until that op's last
reader (the fusion that recomputes it reads them then).

An op's output is materialised unless all of these hold (after XLA's ``InstructionFusion``
and the CPU backend's ``CpuInstructionFusion::ShouldFuse``, xla/service):

- the op is loop-fusible (``_LOOP_FUSIBLE``);
- every reader can take a fused producer (``_FUSING``: loop ops and reductions; never a dot,
  convolution, scatter, sort, custom call or collective, whose operands are buffers);
- it is not a program output;
- an *expensive* op (``exp``, ``log``, ``tanh``, float ``divide``, ``rsqrt``, ``pow``, ...:
  XLA's ``IsExpensive``) has exactly one reader, an element-wise op or a reduction: XLA does not
  duplicate expensive producers, nor fuse them into readers that reuse each element (broadcast).

This is a model, not XLA's buffer assignment: fusions XLA forms across these rules
(multi-output fusion, dots with fused epilogues on GPU) and buffers it shares are not seen.
"""

from __future__ import annotations

from jax import lax
from jax.extend.core import primitives as P

from alpa_lite.graph import OpGraph
from alpa_lite.hlo_names import ELEMENTWISE

_SHAPE_LOOP = frozenset({P.broadcast_in_dim_p, P.reshape_p, P.squeeze_p, P.transpose_p, P.iota_p,
                         P.slice_p, P.pad_p, P.concatenate_p, P.rev_p, P.dynamic_slice_p})
_LOOP_FUSIBLE = frozenset(ELEMENTWISE | _SHAPE_LOOP)
_REDUCTIONS = frozenset({lax.reduce_sum_p, lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p,
                         lax.reduce_and_p, lax.reduce_or_p, lax.argmax_p, lax.argmin_p})
_FUSING = _LOOP_FUSIBLE | _REDUCTIONS | {lax.gather_p, lax.dynamic_update_slice_p}
# XLA's InstructionFusion::IsExpensive, for the element-wise ops (on floating-point data).
_EXPENSIVE = frozenset({P.exp_p, P.exp2_p, P.expm1_p, P.log_p, P.log1p_p, P.logistic_p, P.tanh_p,
                        P.div_p, P.rem_p, P.sqrt_p, P.rsqrt_p, P.cbrt_p, P.pow_p, P.erf_p, P.erfc_p,
                        P.erf_inv_p, P.atan2_p, P.lgamma_p, P.digamma_p, P.asin_p, P.acos_p, P.atan_p,
                        P.sinh_p, P.cosh_p, P.asinh_p, P.acosh_p, P.atanh_p})


def materialised(graph: OpGraph) -> frozenset[int]:
    """Indices of the ops whose outputs XLA writes to memory (module docstring)."""
    outputs = set(graph.outputs)
    keep = set()
    for op in graph.ops:
        if op.primitive not in _LOOP_FUSIBLE or any(t in outputs for t in op.outputs):
            keep.add(op.index)
            continue
        readers = {c for t in op.outputs for c in graph.consumers[t]}
        prims = [graph.ops[c].primitive for c in readers]
        if not readers or any(p not in _FUSING for p in prims):
            keep.add(op.index)
        elif op.primitive in _EXPENSIVE and (len(readers) > 1 or prims[0] in _SHAPE_LOOP):
            keep.add(op.index)
    # A reduction takes one element-wise producer into its kernel; what that producer reads is
    # materialised (XLA CPU, jax 0.10.2: reductions are YNNPACK fusions of depth one).
    for op in graph.ops:
        if op.primitive not in _REDUCTIONS:
            continue
        for t in op.operands:
            src = graph.producer[t]
            if src not in keep:
                keep.update(graph.producer[u] for u in graph.ops[src].operands)
    return frozenset(keep)


def live_until(graph: OpGraph, kept: frozenset[int]) -> tuple[int, ...]:
    """Per op: the program point after which its outputs are dead (-1: no outputs).

    An unmaterialised op is recomputed by each reader's fusion, so its operands stay alive
    until its own last reader (swept in reverse program order, so chains of fused ops pass it on).
    """
    until = [max((graph.last_use[t] for t in op.outputs), default=-1) for op in graph.ops]
    for op in reversed(graph.ops):
        if op.index in kept:
            continue
        for t in op.operands:
            src = graph.producer[t]
            until[src] = max(until[src], until[op.index])
    return tuple(until)
