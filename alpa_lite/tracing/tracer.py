"""Tracer: a JAX function and example arguments → a flat, HLO-like ``OpGraph``.

``jax.make_jaxpr`` gives the program; nested jit, closed calls, remat and custom_jvp/custom_vjp
calls are inlined (their bodies are what runs), so the op graph is flat. Primitives are matched
by object. Literals and closed-over constants become ``constant`` ops, function inputs become
``parameter`` ops. Dead code (equations no output needs, without effects) is dropped, as XLA
drops it before partitioning. ``with_sharding_constraint`` inside the function and committed input
shardings are recorded as fixed specs (hard constraints for the planner).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
from jax.extend import core as jcore
from jax.extend.core import primitives as P
from jax.sharding import NamedSharding

from alpa_lite.ir.errors import PlanningError, ShardingError, UnsupportedError
from alpa_lite.ir.graph import Op, OpGraph, TensorInfo
from alpa_lite.ir.hlo_names import RESHARD_P, SHARDING_CONSTRAINTS, hlo_name, op_flops
from alpa_lite.ir.signature import dtype_name, leaf_aval
from alpa_lite.ir.specs import ShardingSpec

log = logging.getLogger("alpa_lite.tracing.tracer")

# Call-like primitives whose body is inlined; value: the param holding the (closed) jaxpr.
_INLINE: dict[Any, str] = {
    P.jit_p: "jaxpr",
    P.closed_call_p: "call_jaxpr",
    P.core_call_p if hasattr(P, "core_call_p") else P.call_p: "call_jaxpr",
    P.remat_p: "jaxpr",
    P.custom_jvp_call_p: "call_jaxpr",
    P.custom_vjp_call_p: "call_jaxpr",
}


def register_inline(primitive: Any, jaxpr_param: str) -> None:
    """Treat ``primitive`` as a call whose body (in ``params[jaxpr_param]``) is inlined; the param
    holds a (closed) jaxpr, or a zero-argument callable returning one (traced on first use)."""
    _INLINE[primitive] = jaxpr_param


# Identity primitives marking layer boundaries (``al.mark_layer``): their outputs are their
# inputs (no op); value: whether an equation (given its params) starts a new layer.
_LAYER_MARKERS: dict[Any, Callable[[dict[str, Any]], bool]] = {}


def register_layer_marker(primitive: Any, starts_layer: Callable[[dict[str, Any]], bool]) -> None:
    """Treat ``primitive`` as an identity that may start a new layer (``Op.layer``)."""
    _LAYER_MARKERS[primitive] = starts_layer


@dataclass
class _Builder:
    tensors: list[TensorInfo] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    fixed: dict[int, ShardingSpec] = field(default_factory=dict)
    layer: int = 0
    barriers: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def new_tensor(self, aval: Any) -> int:
        shape = tuple(int(d) for d in getattr(aval, "shape", ()))
        dtype = _dtype_name(aval)
        self.tensors.append(TensorInfo(shape, dtype))
        return len(self.tensors) - 1

    def add_op(self, kind: str, operands: Sequence[int], outputs: Sequence[int], *,
               primitive: Any = None, params: dict[str, Any] | None = None, source: str = "") -> Op:
        params = params or {}
        flops = 0.0
        if primitive is not None:
            outs = [self.tensors[t] for t in outputs]
            ins = [self.tensors[t] for t in operands]
            try:
                flops = op_flops(primitive, outs, ins, params)
            except Exception:  # noqa: BLE001 - FLOPs are a cost estimate; never fail tracing on them
                flops = 0.0
        op = Op(len(self.ops), kind, tuple(operands), tuple(outputs), primitive, params, flops,
                source, self.layer)
        self.ops.append(op)
        return op

    def constant(self, value: Any, aval: Any) -> int:
        t = self.new_tensor(aval)
        self.add_op("constant", (), (t,), params={"value": value})
        return t


def _dtype_name(aval: Any) -> str:
    return dtype_name(aval.dtype) if hasattr(aval, "dtype") else "float32"


def _source_of(eqn: Any) -> str:
    try:
        return str(eqn.source_info.name_stack)
    except Exception:  # noqa: BLE001 - cosmetic only
        return ""


def _needed(jaxpr: Any, live_out: Sequence[bool]) -> set[Any]:
    """Variables of ``jaxpr`` that reach a live output or an effect (a backward sweep).

    XLA deletes dead code before partitioning, so an op nobody reads must not be planned:
    its strategy and collectives would be costed and predicted, yet never run.
    """
    need = {v for v, live in zip(jaxpr.outvars, live_out) if live and not isinstance(v, jcore.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in need for v in eqn.outvars):
            need.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return need


def _walk(b: _Builder, jaxpr: Any, consts: Sequence[Any], in_ids: Sequence[int],
          live_out: Sequence[bool] | None = None) -> list[int | None]:
    """Add the live equations of ``jaxpr`` to ``b``; return the tensor ids of its outputs
    (None for an output ``live_out`` marks dead)."""
    live_out = [True] * len(jaxpr.outvars) if live_out is None else live_out
    need = _needed(jaxpr, live_out)
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, consts):
        if v in need:
            env[v] = b.constant(c, v.aval)
    for v, t in zip(jaxpr.invars, in_ids):
        env[v] = t

    def read(x: Any) -> int:
        if isinstance(x, jcore.Literal):
            return b.constant(x.val, x.aval)
        return env[x]

    for eqn in jaxpr.eqns:
        prim = eqn.primitive
        if not eqn.effects and not any(v in need for v in eqn.outvars):
            if prim in _LAYER_MARKERS:  # dead, yet a boundary all the same
                b.layer += bool(_LAYER_MARKERS[prim](eqn.params))
            continue
        ins = [read(x) for x in eqn.invars]
        if prim in _LAYER_MARKERS:
            outs = ins
            b.layer += bool(_LAYER_MARKERS[prim](eqn.params))
        elif prim in _INLINE:
            if _recomputes(eqn):
                b.barriers.append((len(b.ops), tuple(dict.fromkeys(ins))))
            outs = _inline(b, eqn, ins, [v in need for v in eqn.outvars])
        else:
            outs = [b.new_tensor(v.aval) for v in eqn.outvars]
            b.add_op(hlo_name(prim), ins, outs, primitive=prim, params=dict(eqn.params),
                     source=_source_of(eqn))
            if prim in SHARDING_CONSTRAINTS and _states_a_layout(prim, eqn.params[SHARDING_CONSTRAINTS[prim]]):
                _record_constraint(b, eqn.params[SHARDING_CONSTRAINTS[prim]], outs[0])
        for v, t in zip(eqn.outvars, outs):
            env[v] = t
    return [read(x) if live else None for x, live in zip(jaxpr.outvars, live_out)]


def _recomputes(eqn: Any) -> bool:
    """Whether ``eqn`` is the backward half of a ``jax.checkpoint`` that must not be merged with
    the forward it repeats: jax lowers it behind an optimization barrier on all its operands
    (``prevent_cse``), which inlining its body would lose (``OpGraph.barriers`` keeps it)."""
    return (eqn.primitive is P.remat_p and bool(eqn.params.get("differentiated"))
            and bool(eqn.params.get("prevent_cse")))


def _inline(b: _Builder, eqn: Any, ins: list[int], live_out: Sequence[bool]) -> list[int | None]:
    body = eqn.params[_INLINE[eqn.primitive]]
    if callable(body):  # traced on first use (a jaxpr itself is not callable)
        body = body()
    if isinstance(body, jcore.ClosedJaxpr):
        return _walk(b, body.jaxpr, body.consts, ins, live_out)
    return _walk(b, body, (), ins, live_out)


def _states_a_layout(prim: Any, sharding: Any) -> bool:
    """Whether a constraint fixes its result's layout. A ``reshard`` onto Auto axes does not:
    it is how ``auto_axes`` hands values to the compiler ("decide this"), not a layout."""
    if prim is not RESHARD_P:
        return True
    mesh = getattr(sharding, "mesh", None)
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _record_constraint(b: _Builder, sharding: Any, out: int) -> None:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return
    rank = b.tensors[out].rank
    b.fixed[out] = ShardingSpec.from_partition_spec(spec, rank)


def _input_spec(x: Any, rank: int) -> ShardingSpec | None:
    """The spec a committed input (or a ShapeDtypeStruct with a sharding) already has."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    if isinstance(x, jax.Array) and not getattr(x, "_committed", True):
        return None
    spec = ShardingSpec.from_partition_spec(sharding.spec, rank)
    # Replicated commitments are what jax.set_mesh gives every array made under it: no intent.
    return spec if spec.axes_used() else None


def _check_input_shardings(dyn: Sequence[Any]) -> None:
    """A sharding an input brings (a ``ShapeDtypeStruct``'s; jax refuses uneven arrays) must fit
    its shape: say which argument and dimension, before jax fails inside tracing."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(dyn):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding) or not hasattr(leaf, "shape"):
            continue
        try:
            spec = ShardingSpec.from_partition_spec(sharding.spec, len(leaf.shape))
            spec.validate(tuple(leaf.shape), dict(sharding.mesh.shape))
        except ShardingError as e:
            raise ShardingError(f"argument leaf {jax.tree_util.keystr(path)} comes sharded "
                                f"{sharding.spec}: {e}") from None


def trace(fn: Callable[..., Any], *args: Any, static_argnums: Sequence[int] = ()) -> OpGraph:
    """Trace ``fn(*args)`` into a flat ``OpGraph``. Static args are baked in, as jit does."""
    static = tuple(sorted({i % len(args) for i in static_argnums})) if args else ()
    dyn = [a for i, a in enumerate(args) if i not in static]
    leaves, in_tree = jax.tree.flatten(dyn)
    if not leaves:
        raise PlanningError("the function has no array inputs to shard; pass the arrays it "
                            "computes on as arguments (not closed over), or mark non-array "
                            "arguments with static_argnums")
    for path, leaf in jax.tree_util.tree_leaves_with_path(dyn):
        if not hasattr(leaf, "shape") and not isinstance(leaf, (int, float, bool, complex)):
            raise PlanningError(f"argument leaf {jax.tree_util.keystr(path)} is a "
                                f"{type(leaf).__name__}, not an array; pass it with "
                                "static_argnums or make it an array (an Equinox model: pass "
                                "the arrays of eqx.partition(model, eqx.is_array) and close "
                                "over the rest)")

    _check_input_shardings(dyn)

    def flat_fn(*flat: Any) -> Any:
        full, it = list(args), iter(jax.tree.unflatten(in_tree, flat))
        for i in range(len(full)):
            if i not in static:
                full[i] = next(it)
        return fn(*full)

    try:
        # Traced on the types jax.jit gives the leaves, without their shardings
        # (``alpa_lite.ir.signature``): committed shardings are recorded below, as constraints.
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*map(leaf_aval, leaves))
    except PlanningError:
        raise
    except Exception as e:
        raise UnsupportedError(f"tracing the function failed: {type(e).__name__}: {e}") from e
    b = _Builder()
    in_ids = []
    for leaf, v in zip(leaves, closed.jaxpr.invars):
        t = b.new_tensor(v.aval)
        b.add_op("parameter", (), (t,), params={"index": len(in_ids)})
        spec = _input_spec(leaf, b.tensors[t].rank)
        if spec is not None:
            b.fixed[t] = spec
        in_ids.append(t)
    out_ids = _walk(b, closed.jaxpr, closed.consts, in_ids)
    out_tree = jax.tree.structure(out_shape)
    g = OpGraph(tuple(b.tensors), tuple(b.ops), tuple(in_ids), tuple(out_ids), in_tree,
                out_tree, dict(b.fixed), num_layers=b.layer + 1, barriers=tuple(b.barriers))
    log.info("traced %s", g.summary())
    return g


@functools.lru_cache(maxsize=64)
def trace_body(closed: Any) -> OpGraph:
    """The body of a scan (a ``ClosedJaxpr``) as a flat ``OpGraph`` of one iteration."""
    b = _Builder()
    in_ids = []
    for i, v in enumerate(closed.jaxpr.invars):
        t = b.new_tensor(v.aval)
        b.add_op("parameter", (), (t,), params={"index": i})
        in_ids.append(t)
    out_ids = _walk(b, closed.jaxpr, closed.consts, in_ids)
    return OpGraph(tuple(b.tensors), tuple(b.ops), tuple(in_ids), tuple(out_ids), fixed=dict(b.fixed),
                   num_layers=b.layer + 1)
