"""The pipelined part of a training step: the step around ``al.value_and_grad``, cut into layers.

The step is traced twice with ``jax.make_jaxpr`` (nested jits inlined by ``jax.disable_jit``):
once with the full batch, once with one microbatch. In the full trace the one
``value_and_grad_p`` equation splits the step into a *pre* part (equations before it), the
loss and its gradients, and a *post* part (the optimizer update). The loss is taken from the
microbatch trace, so every shape and constant in it (``jnp.mean``'s divisor, reshapes) is the
microbatch's: a microbatch loss is the mean over its examples and the step's loss is the mean
of the microbatch losses. A loss operand is split into microbatches exactly when its shape
differs between the two traces (its leading dimension).

The loss equations (``al.mark_layer`` markers removed, their outputs renamed to their inputs)
are cut into layers at the markers, else by ``dp_stages.cluster_layers`` on FLOPs with the
bytes crossing each cut. A layer is a function of the variables it reads from outside (loss
inputs or earlier layers' results) to the variables later layers or the loss outputs read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.hlo_names import op_flops
from alpa_lite.tracing.markers import mark_layer_p, value_and_grad_p
from dp_stages import cluster_layers

Var = Any  # jax.extend.core.Var


def is_literal(x: Any) -> bool:
    return isinstance(x, jcore.Literal)


def tensor_info(aval: Any) -> TensorInfo:
    return TensorInfo(tuple(int(d) for d in aval.shape), str(np.dtype(aval.dtype)))


def eval_eqns(eqns: Sequence[Any], env: dict[Var, Any]) -> None:
    """Run equations (``primitive.bind``, as ``jax.core.eval_jaxpr`` does), reading and
    writing ``env``."""
    for eqn in eqns:
        ins = [x.val if is_literal(x) else env[x] for x in eqn.invars]
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x


def read(env: dict[Var, Any], x: Any) -> Any:
    return x.val if is_literal(x) else env[x]


# ---- the step ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class StepProgram:
    """A training step split around its ``al.value_and_grad`` equation."""

    jaxpr: Any  # the full-batch outer Jaxpr, flat in the dynamic argument leaves
    consts: tuple[Any, ...]
    vag_index: int  # position of the value_and_grad equation in jaxpr.eqns
    loss: LossProgram  # from the microbatch trace
    micro: tuple[bool, ...]  # per vag operand: split into microbatches (along dimension 0)
    num_microbatches: int
    batch_size: int
    batch_leaves: tuple[int, ...]  # flat argument leaves split into microbatches
    state_leaves: tuple[int, ...]  # flat argument leaves of the carried state
    in_tree: Any
    out_tree: Any

    @property
    def vag(self) -> Any:
        return self.jaxpr.eqns[self.vag_index]

    @property
    def pre_eqns(self) -> tuple[Any, ...]:
        return tuple(self.jaxpr.eqns[: self.vag_index])

    @property
    def post_eqns(self) -> tuple[Any, ...]:
        return tuple(self.jaxpr.eqns[self.vag_index + 1:])


def flat_function(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int],
                  out_tree: list[Any] | None = None) -> tuple[Callable[..., Any], list[Any], Any]:
    """``fn`` as a function of the flat leaves of its dynamic arguments (flat results; their
    tree is appended to ``out_tree`` when given)."""
    dyn = [a for i, a in enumerate(args) if i not in static]
    leaves, in_tree = jax.tree.flatten(dyn)

    def flat_fn(*flat: Any) -> Any:
        full, it = list(args), iter(jax.tree.unflatten(in_tree, flat))
        for i in range(len(full)):
            if i not in static:
                full[i] = next(it)
        out, tree = jax.tree.flatten(fn(*full))
        if out_tree is not None:
            out_tree.append(tree)
        return out

    return flat_fn, leaves, in_tree


def _trace(flat_fn: Callable[..., Any], avals: Sequence[Any]) -> Any:
    with jax.disable_jit():
        return jax.make_jaxpr(flat_fn)(*avals)


def vag_positions(jaxpr: Any) -> list[int]:
    return [k for k, e in enumerate(jaxpr.eqns) if e.primitive is value_and_grad_p]


def _aval(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))


def pipelined_step(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> TracedStep | None:
    """The step's full-batch trace (``trace_step``) when it calls ``al.value_and_grad``, else
    None (also when it cannot be traced as given). ``al.plan`` asks this to choose the pipeline
    path and hands the trace on, so that the step is traced once for both."""
    leaves = jax.tree.leaves([a for i, a in enumerate(args) if i not in static])
    if not all(hasattr(x, "dtype") or isinstance(x, (bool, int, float, complex)) for x in leaves):
        return None
    try:
        traced = trace_step(fn, args, static)
    except Exception:  # noqa: BLE001 - bad arguments get the one-stage path's clear error
        return None
    return traced if vag_positions(traced.full.jaxpr) else None


@dataclass(frozen=True, eq=False)
class TracedStep:
    """The step traced once with the full batch; ``split_step`` reuses it for every microbatch
    count (only the microbatch trace depends on the count)."""

    flat_fn: Callable[..., Any]
    avals: tuple[jax.ShapeDtypeStruct, ...]
    full: Any  # ClosedJaxpr of the full-batch step
    in_tree: Any
    out_tree: Any


def trace_step(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> TracedStep:
    out_tree: list[Any] = []
    flat_fn, leaves, in_tree = flat_function(fn, args, static, out_tree)
    avals = tuple(_aval(x) for x in leaves)
    with jax.disable_jit():
        full = jax.make_jaxpr(flat_fn)(*avals)
    return TracedStep(flat_fn, avals, full, in_tree, out_tree[0])


def split_step(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int],
               state_leaves: Sequence[int], batch_leaves: Sequence[int],
               num_microbatches: int, traced: TracedStep | None = None) -> StepProgram | None:
    """The step split around its ``al.value_and_grad``; None when it has none. ``traced``: the
    step's full-batch trace when already made (``trace_step``)."""
    traced = traced if traced is not None else trace_step(fn, args, static)
    avals, full = list(traced.avals), traced.full
    found = vag_positions(full.jaxpr)
    if not found:
        return None
    if len(found) > 1:
        raise PlanningError(f"the step calls al.value_and_grad {len(found)} times; a pipeline "
                            "pipelines one loss: call it once, or plan with num_stages=1")
    batch_size = _batch_size(avals, batch_leaves)
    B = int(num_microbatches)
    if batch_size % B:
        raise PlanningError(f"the batch of {batch_size} does not split into {B} microbatches: "
                            "choose num_microbatches dividing the batch size")
    mb_avals = list(avals)
    for k in batch_leaves:
        shape = avals[k].shape
        mb_avals[k] = jax.ShapeDtypeStruct((shape[0] // B, *shape[1:]), avals[k].dtype)
    micro_trace = full if B == 1 else _trace(traced.flat_fn, mb_avals)  # one microbatch = the batch
    mb_found = vag_positions(micro_trace.jaxpr)
    if len(mb_found) != 1:
        raise PlanningError("the step traces differently for one microbatch (no single "
                            "al.value_and_grad): plan with num_stages=1")
    vag_full, vag_mb = full.jaxpr.eqns[found[0]], micro_trace.jaxpr.eqns[mb_found[0]]
    micro = _micro_operands(vag_full, vag_mb, B)
    loss = LossProgram.from_eqn(vag_mb)
    for k, m in enumerate(micro):
        if m and loss.diff_invars[k]:
            raise PlanningError("al.value_and_grad differentiates an argument that is split into "
                                "microbatches (the batch): a pipeline accumulates gradients of "
                                "weights only; plan with num_stages=1")
    return StepProgram(full.jaxpr, tuple(full.consts), found[0], loss, micro, B, batch_size,
                       tuple(batch_leaves), tuple(state_leaves), traced.in_tree, traced.out_tree)


def _batch_size(avals: Sequence[Any], batch_leaves: Sequence[int]) -> int:
    if not batch_leaves:
        raise PlanningError("a pipeline needs a batch to split into microbatches: pass "
                            "batch_argnums= naming the batch arguments")
    sizes = {int(avals[k].shape[0]) if avals[k].shape else None for k in batch_leaves}
    if len(sizes) != 1 or None in sizes:
        raise PlanningError(f"the batch arguments' leading dimensions differ or are missing "
                            f"({sorted(map(str, sizes))}): every batch leaf must have the batch "
                            "as its first dimension (or set batch_argnums)")
    return sizes.pop()


def _micro_operands(full: Any, mb: Any, B: int) -> tuple[bool, ...]:
    out = []
    for a, b in zip(full.invars, mb.invars):
        sa, sb = tuple(a.aval.shape), tuple(b.aval.shape)
        if sa == sb:
            out.append(False)
        elif sa[1:] == sb[1:] and sa and sa[0] == sb[0] * B:
            out.append(True)
        else:
            raise PlanningError(f"a loss operand has shape {sa} for the batch and {sb} for a "
                                "microbatch: only the leading (batch) dimension may change")
    return tuple(out)


# ---- the loss ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LossProgram:
    """The loss jaxpr's equations with ``mark_layer`` removed (inputs renamed through them)."""

    invars: tuple[Var, ...]
    outvars: tuple[Any, ...]  # loss, then aux (canonical atoms)
    eqns: tuple[Any, ...]
    marks: tuple[int, ...]  # equation positions where a marked layer starts (excluding 0)
    diff_invars: tuple[bool, ...]
    num_consts: int
    num_aux: int

    @classmethod
    def from_eqn(cls, eqn: Any) -> LossProgram:
        jaxpr = eqn.params["jaxpr"].jaxpr
        alias: dict[Var, Any] = {}

        def canon(x: Any) -> Any:
            return x if is_literal(x) else alias.get(x, x)

        eqns, marks = [], []
        for e in jaxpr.eqns:
            if e.primitive is mark_layer_p:
                for o, i in zip(e.outvars, e.invars):
                    alias[o] = canon(i)
                if not e.params["backward"] and eqns and (not marks or marks[-1] != len(eqns)):
                    marks.append(len(eqns))
                continue
            eqns.append(e.replace(invars=[canon(x) for x in e.invars]))
        nc = eqn.params["num_consts"]
        diff = (False,) * nc + tuple(eqn.params["diff"])
        return cls(tuple(jaxpr.invars), tuple(canon(x) for x in jaxpr.outvars), tuple(eqns),
                   tuple(m for m in marks if m < len(eqns)), diff, nc, eqn.params["num_aux"])

    @property
    def loss_var(self) -> Any:
        return self.outvars[0]

    def eqn_flops(self) -> np.ndarray:
        out = []
        for e in self.eqns:
            try:
                out.append(op_flops(e.primitive, [tensor_info(v.aval) for v in e.outvars],
                                    [tensor_info(x.aval) for x in e.invars], dict(e.params)))
            except Exception:  # noqa: BLE001 - a FLOPs estimate only steers clustering
                out.append(0.0)
        return np.asarray(out, dtype=np.float64)

    def cut_bytes(self) -> np.ndarray:
        """Bytes of the variables alive across each cut 0..n (between equation c-1 and c)."""
        n = len(self.eqns)
        born = {v: k + 1 for k, e in enumerate(self.eqns) for v in e.outvars}
        last: dict[Var, int] = {}
        for k, e in enumerate(self.eqns):
            for x in e.invars:
                if not is_literal(x) and x in born:
                    last[x] = k
        for x in self.outvars:
            if not is_literal(x) and x in born:
                last[x] = n
        diff = np.zeros(n + 2)
        for v, q in last.items():
            diff[born[v]] += tensor_info(v.aval).nbytes
            diff[q + 1] -= tensor_info(v.aval).nbytes
        return np.cumsum(diff)[: n + 1]

    def differentiable(self) -> set[Var]:
        """Inexact variables that depend on a differentiated input and reach the loss."""
        dep = {v for v, d in zip(self.invars, self.diff_invars) if d}
        for e in self.eqns:
            if any(not is_literal(x) and x in dep for x in e.invars):
                dep.update(e.outvars)
        reach = {self.loss_var} if not is_literal(self.loss_var) else set()
        for e in reversed(self.eqns):
            if any(o in reach for o in e.outvars):
                reach.update(x for x in e.invars if not is_literal(x))
        return {v for v in dep & reach if jax.numpy.issubdtype(v.aval.dtype, jax.numpy.inexact)}


@dataclass(frozen=True, eq=False)
class Layer:
    """Equations ``eqns`` of the loss; ``inputs`` read from outside, ``outputs`` read later."""

    index: int
    first_eqn: int
    eqns: tuple[Any, ...]
    inputs: tuple[Var, ...]
    outputs: tuple[Var, ...]
    diff_in: tuple[bool, ...]
    diff_out: tuple[bool, ...]

    def function(self) -> Callable[..., list[Any]]:
        def f(*xs: Any) -> list[Any]:
            env = dict(zip(self.inputs, xs))
            eval_eqns(self.eqns, env)
            return [env[v] for v in self.outputs]

        return f

    def in_avals(self) -> list[jax.ShapeDtypeStruct]:
        return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.inputs]

    def signature(self) -> str:
        """Equal for layers computing the same function of inputs of the same types."""
        body = str(jax.make_jaxpr(self.function())(*self.in_avals()))
        return f"{body}|{self.diff_in}|{self.diff_out}"

    def fwd_bwd(self) -> Callable[..., list[Any]]:
        """(inputs..., cotangents of the differentiable outputs...) →
        (outputs..., gradients of the differentiable inputs...), by ``jax.vjp``."""
        f = self.function()
        n = len(self.inputs)
        din = [k for k, d in enumerate(self.diff_in) if d]
        dout = [k for k, d in enumerate(self.diff_out) if d]
        rest = [k for k, d in enumerate(self.diff_out) if not d]

        def fb(*args: Any) -> list[Any]:
            ins, cts = list(args[:n]), list(args[n:])

            def g(*d: Any) -> tuple[list[Any], list[Any]]:
                full = list(ins)
                for k, v in zip(din, d):
                    full[k] = v
                outs = f(*full)
                return [outs[k] for k in dout], [outs[k] for k in rest]

            if not din or not dout:
                douts, aux = g(*[ins[k] for k in din])
                grads = [jax.numpy.zeros_like(ins[k]) for k in din]
            else:
                douts, vjp, aux = jax.vjp(g, *[ins[k] for k in din], has_aux=True)
                grads = list(vjp(cts))
            outs: list[Any] = [None] * len(self.outputs)
            for k, v in zip(dout, douts):
                outs[k] = v
            for k, v in zip(rest, aux):
                outs[k] = v
            return [*outs, *grads]

        return fb

    def fwd_bwd_avals(self) -> list[jax.ShapeDtypeStruct]:
        cts = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
               for v, d in zip(self.outputs, self.diff_out) if d]
        return [*self.in_avals(), *cts]


def layer_starts(loss: LossProgram, num_layers: int | None, default: int = 8) -> list[int]:
    """Start equation of each layer: the markers when there are any and ``num_layers`` is
    None, else ``num_layers`` (or ``default``) layers clustered by FLOPs and cut bytes."""
    n = len(loss.eqns)
    if n == 0:
        raise PlanningError("the loss has no equations to pipeline")
    if loss.marks and num_layers is None:
        return [0, *loss.marks]
    want = min(n, num_layers or default)
    return list(cluster_layers(loss.eqn_flops(), loss.cut_bytes(), want))


def cut_layers(loss: LossProgram, starts: Sequence[int]) -> list[Layer]:
    """Layers from their start equations, with inputs, outputs and differentiability."""
    diff = loss.differentiable()
    bounds = [*starts, len(loss.eqns)]
    later_reads: list[set[Var]] = []
    reads: set[Var] = {x for x in loss.outvars if not is_literal(x)}
    for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):
        later_reads.append(set(reads))
        for e in loss.eqns[a:b]:
            reads.update(x for x in e.invars if not is_literal(x))
    later_reads.reverse()
    layers = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        eqns = loss.eqns[a:b]
        defined = {v for e in eqns for v in e.outvars}
        inputs = list(dict.fromkeys(x for e in eqns for x in e.invars
                                    if not is_literal(x) and x not in defined))
        outputs = [v for e in eqns for v in e.outvars if v in later_reads[i]]
        layers.append(Layer(i, a, eqns, tuple(inputs), tuple(outputs),
                            tuple(v in diff for v in inputs), tuple(v in diff for v in outputs)))
    return layers
