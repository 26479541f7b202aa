"""Hand strategies as restrictions of the same ILP ("the same model with strategies fixed").

Each baseline fixes the specs of the function's inputs (state: params and optimizer state;
batch: the data) and, for ZeRO-3, forbids using a parameter in a matmul other than gathered.
The ILP then places everything in between at least cost, as XLA's propagation would. Because a
baseline only removes choices, auto's modelled cost can never exceed a baseline's.

- data_parallel: state replicated; batch dim 0 split over every mesh axis.
- zero3: state split on its largest dividing dim over every axis; batch as data_parallel;
  matmuls take parameters whole (all-gathered), as ZeRO stage 3 / FSDP does.
- megatron: batch replicated; 2-D+ weights alternate column (last dim) / row (dim 0) splits,
  used in place by the matmuls (never gathered)
  over every axis, in the order the forward pass first uses them; other state replicated.
- dp_tp (2-D meshes): batch split over the first axis, Megatron over the last.
- expert_parallel (models with stacked experts), as DeepSpeed-MoE runs it: expert weights
  split along their expert dim over the mesh axes whose product is the largest that divides it
  (every axis when the expert count allows; the rest of the mesh then holds expert replicas,
  DeepSpeed's expert-data parallelism), batch as data_parallel, every other weight replicated
  (gradients all-reduced); matmuls use weights as stored, so tokens meet their experts in
  all-to-alls. An expert dim is a dim of a weight that a matmul reads as a batch dim
  (``einsum('egcm,emh->egch')``: e); a model without one raises a PlanningError.

A KV cache (state written by a ``dynamic_update_slice``, laid out [batch, ctx, heads, head_dim])
follows serving practice: split by heads over the tensor-parallel axes (Megatron-LM and vLLM
inference give each device the heads of its attention shard) and by batch over the
data-parallel axes; ZeRO-3 treats it as data-parallel does (a cache is per sequence).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.graph import OpGraph, TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from cost_model.builder import StrategyGraph

BASELINES = ("data_parallel", "zero3", "megatron", "dp_tp")  # apply to every model
EXPERT_BASELINES = ("expert_parallel",)  # models with stacked experts only
HAND_PLANS = (*BASELINES, *EXPERT_BASELINES)
_LAYOUT_OPS = {"transpose", "convert", "reshape", "copy", "broadcast"}


def _split_dim(t: TensorInfo, dim: int, axes: Sequence[str], sizes: Mapping[str, int]) -> ShardingSpec:
    """Split ``dim`` over the longest prefix of ``axes`` that divides it (replicated if none)."""
    use: list[str] = []
    n = 1
    for a in axes:
        if t.rank and t.shape[dim] % (n * sizes[a]) == 0:
            use.append(a)
            n *= sizes[a]
    dims = [()] * t.rank
    if use:
        dims[dim] = tuple(use)
    return ShardingSpec(tuple(dims))


def _largest_dim_split(t: TensorInfo, axes: Sequence[str], sizes: Mapping[str, int]) -> ShardingSpec:
    best = ShardingSpec.replicated(t.rank)
    for d in sorted(range(t.rank), key=lambda d: -t.shape[d]):
        s = _split_dim(t, d, axes, sizes)
        if s.shard_factor(sizes) > best.shard_factor(sizes):
            best = s
    return best


def _weight_order(graph: OpGraph, state_inputs: Sequence[int]) -> list[int]:
    """State tensors of rank ≥ 2 in the order a dot/convolution first reads them."""
    sources = {graph.inputs[i]: graph.inputs[i] for i in state_inputs}
    order: list[int] = []
    for op in graph.ops:
        if op.kind in _LAYOUT_OPS and op.operands and op.operands[0] in sources:
            for t in op.outputs:
                sources[t] = sources[op.operands[0]]
        if op.kind in ("dot", "convolution"):
            for t in op.operands:
                w = sources.get(t)
                if w is not None and w not in order and graph.tensors[w].rank >= 2:
                    order.append(w)
    return order


def baseline_input_specs(method: str, graph: OpGraph, sizes: Mapping[str, int],
                         axis_names: Sequence[str], state_inputs: Sequence[int],
                         batch_inputs: Sequence[int],
                         state_groups: Mapping[int, int],
                         unsplit: list[str] | None = None) -> dict[int, ShardingSpec]:
    """Flat input position → spec. ``state_groups`` maps an optimizer-state input to the
    parameter input it mirrors (same tree path and shape), which shares its layout. Inputs the
    strategy would split but no dimension of which divides by the mesh axes stay replicated;
    ``unsplit``, when given, receives one message for each."""
    if method not in HAND_PLANS:
        raise PlanningError(f"unknown method {method!r}; choose 'auto' or one of {HAND_PLANS}")
    axes = [a for a in axis_names if sizes[a] > 1]
    if method == "expert_parallel":
        return _expert_parallel_specs(graph, sizes, axes, state_inputs, batch_inputs, state_groups, unsplit)
    if method == "dp_tp" and len(axes) < 2:
        raise PlanningError("method 'dp_tp' needs a 2-D mesh (data axis × model axis); "
                            f"this mesh has axes {dict(sizes)}")
    dp_axes = {"data_parallel": axes, "zero3": axes, "megatron": [], "dp_tp": axes[:1]}[method]
    tp_axes = {"megatron": axes, "dp_tp": axes[-1:]}.get(method, [])
    tensors = graph.tensors
    specs: dict[int, ShardingSpec] = {}
    for i in batch_inputs:
        t = tensors[graph.inputs[i]]
        specs[i] = _split_dim(t, 0, dp_axes, sizes) if t.rank else ShardingSpec(())
    wanted = [i for i in batch_inputs if dp_axes]  # the inputs the method splits
    order = _weight_order(graph, [state_groups.get(i, i) for i in state_inputs])
    caches = cache_inputs(graph, state_inputs)
    for i in state_inputs:
        t = tensors[graph.inputs[i]]
        if i in caches:
            specs[i] = _cache_split(t, dp_axes, tp_axes, sizes)
            if dp_axes or tp_axes:  # on one device nothing is split, nothing to report
                wanted.append(i)
        elif method == "zero3":
            specs[i] = _largest_dim_split(t, axes, sizes)
            wanted.append(i)
        elif tp_axes and graph.inputs[state_groups.get(i, i)] in order:
            k = order.index(graph.inputs[state_groups.get(i, i)])
            specs[i] = _split_dim(t, t.rank - 1 if k % 2 == 0 else 0, tp_axes, sizes)
            wanted.append(i)
        else:
            specs[i] = ShardingSpec.replicated(t.rank)
    if unsplit is not None:
        unsplit.extend(
            f"{method}: input {i} {tensors[graph.inputs[i]].dtype}{list(tensors[graph.inputs[i]].shape)} "
            f"does not divide where {method} splits it (mesh axes {dict(sizes)}): left replicated"
            for i in wanted if tensors[graph.inputs[i]].rank and not specs[i].axes_used())
    return specs


def expert_dims(graph: OpGraph, state_inputs: Sequence[int]) -> dict[int, int]:
    """Flat state position → its expert dim: the dim of the stored weight that a ``dot`` reads as
    a batch dim (``einsum('egcm,emh->egch')`` reads wi (E, M, H) with e batched: dim 0). Weights
    are followed through element-wise layout ops (convert, copy) and transposes (dim k of a
    transpose's output is dim ``permutation[k]`` of its operand)."""
    derived = {graph.inputs[i]: (i, tuple(range(graph.tensors[graph.inputs[i]].rank))) for i in state_inputs}
    found: dict[int, int] = {}
    for op in graph.ops:
        src = derived.get(op.operands[0]) if op.operands else None
        if src is not None and op.kind in ("convert", "copy", "transpose"):
            perm = op.params["permutation"] if op.kind == "transpose" else range(len(src[1]))
            derived[op.outputs[0]] = (src[0], tuple(src[1][p] for p in perm))
        if op.kind == "dot":
            batch_dims = op.params["dimension_numbers"][1]
            for k, t in enumerate(op.operands[:2]):
                if t in derived and batch_dims[k]:
                    i, dims = derived[t]
                    found.setdefault(i, dims[batch_dims[k][0]])
    return found


def _divisor_axes(n: int, axes: Sequence[str], sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The axes (in mesh order) whose product is the largest dividing ``n``; on a tie the later
    (faster, intra-host) axes."""
    best: tuple[str, ...] = ()
    for r in range(1, len(axes) + 1):
        for sub in combinations(axes, r):
            prod = math.prod(sizes[a] for a in sub)
            if n % prod == 0 and prod >= math.prod(sizes[a] for a in best):
                best = sub
    return best


def _expert_parallel_specs(graph: OpGraph, sizes: Mapping[str, int], axes: Sequence[str],
                           state_inputs: Sequence[int], batch_inputs: Sequence[int],
                           state_groups: Mapping[int, int], unsplit: list[str] | None) -> dict[int, ShardingSpec]:
    """DeepSpeed-MoE's layout: batch dim 0 over every axis; each expert weight (and the optimizer
    state mirroring it) split along its expert dim over ``_divisor_axes``; all else replicated."""
    experts = expert_dims(graph, [state_groups.get(i, i) for i in state_inputs])
    if not experts:
        raise PlanningError("method 'expert_parallel' needs stacked expert weights (a weight dim that a "
                            "matmul reads as a batch dim, e.g. wi (E, M, H) in einsum('egcm,emh->egch')); "
                            "this model has none")
    tensors = graph.tensors
    specs = {i: _split_dim(tensors[graph.inputs[i]], 0, axes, sizes) if tensors[graph.inputs[i]].rank
             else ShardingSpec(()) for i in batch_inputs}
    for i in state_inputs:
        t = tensors[graph.inputs[i]]
        dim = experts.get(state_groups.get(i, i))
        specs[i] = (ShardingSpec.replicated(t.rank) if dim is None
                    else _split_dim(t, dim, _divisor_axes(t.shape[dim], axes, sizes), sizes))
    if unsplit is not None:
        unsplit.extend(f"expert_parallel: input {i} {tensors[graph.inputs[i]].dtype}"
                       f"{list(tensors[graph.inputs[i]].shape)} does not divide by any mesh axis "
                       f"{dict(sizes)}: left replicated"
                       for i in [*batch_inputs, *experts] if axes and tensors[graph.inputs[i]].rank
                       and not specs[i].axes_used())
    return specs


def cache_inputs(graph: OpGraph, state_inputs: Sequence[int]) -> set[int]:
    """Flat state positions written in place by a ``dynamic_update_slice``: KV caches."""
    updated = {op.operands[0] for op in graph.ops if op.kind == "dynamic-update-slice"}
    return {i for i in state_inputs if graph.inputs[i] in updated}


def _cache_split(t: TensorInfo, dp_axes: Sequence[str], tp_axes: Sequence[str],
                 sizes: Mapping[str, int]) -> ShardingSpec:
    """Batch (dim 0) over ``dp_axes``, heads (dim −2 of [batch, ctx, heads, head_dim]) over
    ``tp_axes``, each over the longest prefix of its axes that divides it."""
    if t.rank < 3:
        return _split_dim(t, 0, dp_axes, sizes)
    dims = list(_split_dim(t, 0, dp_axes, sizes).dims)
    dims[t.rank - 2] = _split_dim(t, t.rank - 2, tp_axes, sizes).dims[t.rank - 2]
    return ShardingSpec(tuple(dims))


def baseline_masks(method: str, sgraph: StrategyGraph,
                   input_specs: Mapping[int, ShardingSpec],
                   state_inputs: Sequence[int]) -> dict[int, list[bool]]:
    """Allowed strategies per op: inputs fixed; for zero3, matmuls read parameters whole."""
    g = sgraph.graph
    masks: dict[int, list[bool]] = {}
    for i, spec in input_specs.items():
        op = g.producer[g.inputs[i]]
        masks[op] = [s.out_specs[0] == spec for s in sgraph.strategies[op]]
        if not any(masks[op]):
            raise PlanningError(f"baseline {method!r} wants input {i} as {spec}, which the mesh "
                                "cannot hold")
    if method in ("zero3", "megatron", "dp_tp", "expert_parallel"):
        # Matmuls read parameters as stored: ZeRO-3 gathers them whole first; Megatron and
        # expert parallelism use their shards in place (no weight moves). Track the stored spec through transposes.
        derived = {g.inputs[i]: (ShardingSpec.replicated(g.tensors[g.inputs[i]].rank)
                                 if method == "zero3" else input_specs[i]) for i in state_inputs}
        for op in g.ops:
            src = op.operands[0] if op.operands else None
            if src in derived and op.kind in ("transpose", "convert", "copy"):
                spec = derived[src]
                if op.kind == "transpose":
                    spec = ShardingSpec(tuple(spec.dims[p] for p in op.params["permutation"]))
                derived[op.outputs[0]] = spec
            if op.kind in ("dot", "convolution"):
                pos = [(k, derived[t]) for k, t in enumerate(op.operands) if t in derived]
                if pos:
                    masks[op.index] = [all(s.in_specs[k] == want for k, want in pos)
                                       for s in sgraph.strategies[op.index]]
    return masks
