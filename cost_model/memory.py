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

An operand a reader takes in another spec than its producer gave is a *copy*: the collective's
result is a buffer of its own (``copy_bytes``), alive until the reader has run. Gathering a
dimension that is not the major-most one of the result may need one more buffer of that size
for a moment: collectives move contiguous pieces, so XLA gathers into a layout with that
dimension major. A computed value can be produced in that layout to begin with, and a
transpose reading the gathered value absorbs it; but a function input has the row-major
layout of its argument, and a reader other than a transpose gets the gathered value copied
back to row-major (seen on jax 0.10.2, 8 host devices: ZeRO-3's all-gather of a ``[64, 1024/8]``
weight along dim 1 for a dot is ``f32[64,1024]{0,1} all-gather`` then a ``{1,0}`` copy, both
full size; a data-parallel gradient gathered along dim 1 for a transpose is gathered along
dim 0 of the dot's transposed result, no copy).

This is a model, not XLA's buffer assignment: fusions XLA forms across these rules
(multi-output fusion, dots with fused epilogues on GPU) and buffers it shares are not seen.
"""

from __future__ import annotations

import functools
import math

from jax import lax
from jax.extend.core import primitives as P

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import OpGraph, TensorInfo
from alpa_lite.ir.hlo_names import ELEMENTWISE
from alpa_lite.ir.specs import ShardingSpec
from cost_model.context import wire_itemsize
from cost_model.resharding import reshard_path

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
    # materialised (XLA CPU, jax 0.10.2: reductions are YNNPACK fusions of depth one), except a
    # splat (a scalar broadcast, an iota): XLA folds it into the kernel (seen: the zeros of a ReLU
    # gradient's select, read by a batch-norm gradient's sum, take no buffer).
    for op in graph.ops:
        if op.primitive not in _REDUCTIONS:
            continue
        for t in op.operands:
            src = graph.producer[t]
            if src not in keep:
                keep.update(v for v in (graph.producer[u] for u in graph.ops[src].operands)
                            if not _is_splat(graph, v))
    return frozenset(keep)


def _is_splat(graph: OpGraph, v: int) -> bool:
    """An op computed from scalars alone (a broadcast of a scalar, an iota): free to recompute."""
    op = graph.ops[v]
    return (op.primitive in _SHAPE_LOOP and op.kind != "parameter"
            and all(graph.tensors[t].size <= 1 for t in op.operands))


def live_until(graph: OpGraph, kept: frozenset[int], written: frozenset[int] = frozenset()) -> tuple[int, ...]:
    """Per op: the program point after which its outputs are dead (-1: no outputs).

    An output is alive until its last reader has run: a materialised reader runs at its own
    point; an unmaterialised one is recomputed by each of its readers' fusions, so it runs
    (reads its operands) until its own last reader (swept in reverse program order, so chains
    of fused ops pass it on). A function output lives to the end.

    An op in ``written`` makes only outputs written straight into donated input buffers (carried
    state, e.g. an optimizer's update of one parameter): its readers read that buffer, and XLA's
    memory-minimising scheduler runs its fusion as soon as its inputs are ready (seen: a
    data-parallel step updates each weight right after its gradient is made, not after all
    gradients as the program lists them), so it runs at the point its last materialised input
    is made, not at the end of the program where its outputs are returned.
    """
    ready: list[int] = []  # the point after which an op could run (-1: inputs, constants)
    for op in graph.ops:
        srcs = [graph.producer[t] for t in op.operands]
        ready.append(-1 if not srcs else op.index if op.index in kept else max(ready[v] for v in srcs))
    end, outputs = len(graph.ops), set(graph.outputs)
    until = [-1] * end
    for op in reversed(graph.ops):
        if not op.outputs:
            continue
        if op.index in written:
            until[op.index] = ready[op.index]
            continue
        ends = [end for t in op.outputs if t in outputs] + [op.index if op.index in kept else ready[op.index]]
        ends += [r if r in kept else until[r] for t in op.outputs for r in graph.consumers[t]]
        until[op.index] = max(ends)
    return tuple(until)


def loop_fusible(primitive: object) -> bool:
    """Element-wise arithmetic and layout ops (``_LOOP_FUSIBLE``): what XLA fuses into loops."""
    return primitive in _LOOP_FUSIBLE


def fuses_operands(primitive: object) -> bool:
    """Whether a reader takes a fused producer (a local slice) into its kernel (``_FUSING``)."""
    return primitive in _FUSING


def absorbs_layout(primitive: object) -> bool:
    """Whether a reader takes its operand in any layout (a transpose: XLA makes it a bitcast)."""
    return primitive is P.transpose_p


@functools.lru_cache(maxsize=1 << 16)
def copy_bytes(src: ShardingSpec, dst: ShardingSpec, tensor: TensorInfo, cluster: ClusterSpec,
               fused_reader: bool, fixed_layout: bool) -> tuple[float, float]:
    """Per-device bytes of the copy a reader wanting ``dst`` reads when the producer gives
    ``src``, and of the transient layout copy made on the way when the value's layout is fixed
    (``fixed_layout``: a function input read by other than a transpose; module docstring).

    Nothing when the specs are equal; a free local slice is fused into a reader that takes
    fused producers (``fused_reader``) and is a buffer of its own otherwise; a collective's result
    is a new buffer, an all-reduce's too (seen on jax 0.10.2, 8 host devices: a 4 MB partial
    product all-reduced for a dot or a sum takes 8 MB of temporaries; where an element-wise
    reader makes an output of the same size, XLA writes it into the all-reduce's buffer).

    The steps of a path before the last leave buffers that live until the next step has run
    (``transient``): a reduce-scatter on a backend without one is an all-reduce of the whole
    buffer, then a slice (seen: MoE's row-split expert weights reduce a 4 MB partial into a new
    4 MB buffer before slicing it).

    A backend without 16-bit float arithmetic (``wire_itemsize``: XLA's CPU backend) computes
    and communicates a bf16/f16 value in f32: a reader that takes buffers (a dot, a loop) reads
    an f32 copy even in the producer's own spec, and a collective's result is f32 (seen on jax
    0.10.2, 8 host devices: a scan-over-layers step in bf16 converts each stacked bf16 input of
    its backward loop to an f32 stack before the loop)."""
    itemsize = wire_itemsize(tensor, cluster)
    upcast = itemsize != tensor.itemsize and not fused_reader
    sizes = cluster.axis_sizes
    if src == dst:
        return (local_bytes(tensor, dst, sizes, itemsize) if upcast else 0.0), 0.0
    steps = reshard_path(src, dst, tensor, cluster)
    colls = [s.collective for s in steps if s.collective is not None]
    if not colls and fused_reader:
        return 0.0, 0.0
    if not colls and not upcast:
        itemsize = tensor.itemsize  # a local slice keeps the dtype
    out = local_bytes(tensor, dst, sizes, itemsize)
    transient, before = 0.0, src
    for k, step in enumerate(steps):
        c = step.collective
        made = local_bytes(tensor, step.spec, sizes, itemsize)
        if c is not None and c.nbytes > made:  # a reduce-scatter run as an all-reduce, then sliced
            transient = max(transient, c.nbytes)
        if k < len(steps) - 1:  # a step's result is alive until the next step has made its own
            transient = max(transient, c.nbytes if c is not None else made)
        if fixed_layout and c is not None and c.kind == "all-gather":
            local = step.spec.local_shape(tensor.shape, sizes)
            gathered = [d for d in range(tensor.rank) if len(step.spec.dims[d]) < len(before.dims[d])]
            if any(n > 1 for n in local[:min(gathered, default=0)]):
                transient = max(transient, local_bytes(tensor, step.spec, sizes, itemsize))
        before = step.spec
    return out, transient


def local_bytes(t: TensorInfo, spec: ShardingSpec, sizes: dict[str, int], itemsize: int | None = None) -> float:
    """Bytes of one device's slice of ``t`` laid out as ``spec`` (``itemsize``: t's own by default)."""
    return float(math.prod(spec.local_shape(t.shape, sizes)) * (t.itemsize if itemsize is None else itemsize))
