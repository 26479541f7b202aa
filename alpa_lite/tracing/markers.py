"""Markers inside a training step: ``al.value_and_grad`` / ``al.grad`` and ``al.mark_layer``.

``al.value_and_grad(loss_fn)`` is a drop-in for ``jax.value_and_grad`` (as in Alpa): it binds
``value_and_grad_p``, a call primitive whose params carry the loss function's closed jaxpr, so
the pipeline planner finds the forward computation to cut into stages and run per microbatch.
Evaluated normally (eagerly, under ``jit``, ``vmap`` or ``jvp``) it computes exactly what
``jax.value_and_grad`` computes: its rules evaluate ``vag_jaxpr``, the traced
``jax.value_and_grad`` of that jaxpr.

Equation params of ``value_and_grad_p``:
    jaxpr       ClosedJaxpr (no consts) of the loss: invars = consts closed over by the loss,
                then the flat argument leaves; outvars = the loss, then the aux leaves
    vag_jaxpr   ``VagJaxpr``: called, the ClosedJaxpr (no consts) of its value_and_grad, same
                invars; outvars = the loss, the aux leaves, then one gradient per differentiated
                leaf. Traced on first use: differentiating a deep model is most of the cost of
                tracing its step, and the pipeline planner, which reads only ``jaxpr``, traces
                the step once per microbatch count
    num_consts  how many leading operands are hoisted closure constants (never differentiated)
    diff        per argument leaf, whether it is differentiated (``argnums``)
    num_aux     number of aux leaves (0 without ``has_aux``)

``al.mark_layer(x)`` is the identity on a pytree; it binds ``mark_layer_p`` on the array
leaves, which the stage planner reads as a layer boundary. Its tangent and cotangent pass
through ``mark_layer_p`` with ``backward=True``, so a boundary survives ``grad`` (in reverse);
it lowers to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

from alpa_lite.tracing.tracer import register_inline, register_layer_marker

# ---- al.value_and_grad ------------------------------------------------------------------

value_and_grad_p = Primitive("alpa_value_and_grad")
value_and_grad_p.multiple_results = True


class VagJaxpr:
    """The ``jax.value_and_grad`` of a loss jaxpr, traced when first called, then kept. Its
    output avals need no tracing: the loss's outputs, then each differentiated leaf's aval."""

    def __init__(self, jaxpr: ClosedJaxpr, num_consts: int, diff: Sequence[bool], num_aux: int,
                 avals: Sequence[Any]) -> None:
        self._args = (jaxpr, num_consts, tuple(diff), num_aux, tuple(avals))
        self._closed: ClosedJaxpr | None = None
        leaves = avals[num_consts:]
        self.out_avals = [*jaxpr.out_avals, *(a for a, d in zip(leaves, diff) if d)]

    @property
    def traced(self) -> bool:
        """Whether the value_and_grad jaxpr has been traced yet."""
        return self._closed is not None

    def __call__(self) -> ClosedJaxpr:
        if self._closed is None:
            self._closed = _vag_jaxpr(*self._args)
        return self._closed


def _vag_impl(*args: Any, vag_jaxpr: VagJaxpr, **_: Any) -> list[Any]:
    return jaxpr_as_fun(vag_jaxpr())(*args)


def _vag_abstract(*_avals: Any, vag_jaxpr: VagJaxpr, **_: Any) -> list[Any]:
    return list(vag_jaxpr.out_avals)


def _vag_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, vag_jaxpr: VagJaxpr,
             **_: Any) -> tuple[list[Any], list[Any]]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    out, tan = jax.jvp(jaxpr_as_fun(vag_jaxpr()), list(primals), tangents)
    return list(out), list(tan)


def _vag_batch(args: Sequence[Any], dims: Sequence[Any], *, vag_jaxpr: VagJaxpr,
               **_: Any) -> tuple[list[Any], list[int]]:
    in_axes = list(dims)  # None: not mapped
    out = jax.vmap(jaxpr_as_fun(vag_jaxpr()), in_axes=in_axes)(*args)
    return list(out), [0] * len(out)


value_and_grad_p.def_impl(_vag_impl)
value_and_grad_p.def_abstract_eval(_vag_abstract)
ad.primitive_jvps[value_and_grad_p] = _vag_jvp
batching.primitive_batchers[value_and_grad_p] = _vag_batch
mlir.register_lowering(value_and_grad_p, mlir.lower_fun(_vag_impl, multiple_results=True))
# Planning one stage: the body that runs is the forward and backward together.
register_inline(value_and_grad_p, "vag_jaxpr")


def _argnums_tuple(argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums:
        raise ValueError("argnums must name at least one argument")
    for a in nums:
        if not -nargs <= a < nargs:
            raise ValueError(f"argnums {argnums} out of range for {nargs} positional arguments")
    return tuple(a % nargs for a in nums)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


def _trace_loss(fun: Callable[..., Any], args: tuple[Any, ...], nums: Sequence[int], has_aux: bool):
    """The loss jaxpr of ``fun(*args)`` (closure constants hoisted into leading inputs), flat in
    the dynamic leaves: array leaves and the leaves of differentiated arguments. Other leaves
    (Python numbers, strings) stay static, as ``jax.value_and_grad`` leaves them."""
    leaves, in_tree = jax.tree.flatten(args)
    owner = [i for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
    dyn = [k for k, x in enumerate(leaves) if owner[k] in nums or _is_array(x)]
    aux_tree: list[Any] = []

    def flat_fun(*flat: Any) -> list[Any]:
        full = list(leaves)
        for k, x in zip(dyn, flat):
            full[k] = x
        out = fun(*jax.tree.unflatten(in_tree, full))
        loss, aux = out if has_aux else (out, None)
        if np.shape(loss) != ():
            raise TypeError("al.value_and_grad: the loss function must return a scalar, got "
                            f"shape {np.shape(loss)}")
        aux_leaves, tree = jax.tree.flatten(aux)
        aux_tree.append(tree)
        return [loss, *aux_leaves]

    dyn_leaves = [leaves[k] for k in dyn]
    closed, shape = jax.make_jaxpr(flat_fun, return_shape=True)(*dyn_leaves)
    consts = list(closed.consts)
    nc = len(consts)

    def hoisted(*cl: Any) -> list[Any]:
        return jaxpr_as_fun(ClosedJaxpr(closed.jaxpr, list(cl[:nc])))(*cl[nc:])

    specs = [jax.ShapeDtypeStruct(np.shape(c), c.dtype) for c in consts]
    jaxpr = jax.make_jaxpr(hoisted)(*specs, *dyn_leaves)
    diff = tuple(owner[k] in nums for k in dyn)
    return jaxpr, consts, dyn_leaves, diff, aux_tree[0], len(shape) - 1


def _vag_jaxpr(jaxpr: ClosedJaxpr, num_consts: int, diff: Sequence[bool], num_aux: int,
               avals: Sequence[Any]) -> ClosedJaxpr:
    fwd = jaxpr_as_fun(jaxpr)
    pos = [k for k, d in enumerate(diff) if d]

    def vag(*cl: Any) -> list[Any]:
        consts, leaves = cl[:num_consts], list(cl[num_consts:])

        def f(*d: Any) -> tuple[Any, list[Any]]:
            full = list(leaves)
            for k, v in zip(pos, d):
                full[k] = v
            outs = fwd(*consts, *full)
            return outs[0], list(outs[1:])

        (loss, aux), grads = jax.value_and_grad(f, argnums=tuple(range(len(pos))), has_aux=True)(
            *[leaves[k] for k in pos])
        return [loss, *aux, *grads]

    return jax.make_jaxpr(vag)(*avals)


def value_and_grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable[..., Any]:
    """Drop-in for ``jax.value_and_grad`` that marks ``fun`` as the pipelined loss."""

    def wrapped(*args: Any) -> Any:
        nums = _argnums_tuple(argnums, len(args))
        jaxpr, consts, leaves, diff, aux_tree, num_aux = _trace_loss(fun, args, nums, has_aux)
        avals = [v.aval for v in jaxpr.jaxpr.invars]
        vag = VagJaxpr(jaxpr, len(consts), diff, num_aux, avals)
        outs = value_and_grad_p.bind(*consts, *leaves, jaxpr=jaxpr, vag_jaxpr=vag,
                                     num_consts=len(consts), diff=tuple(diff), num_aux=num_aux)
        loss, aux, flat_grads = outs[0], outs[1:1 + num_aux], list(outs[1 + num_aux:])
        grads, it = [], iter(flat_grads)
        for i in nums:
            tree = jax.tree.structure(args[i])
            grads.append(jax.tree.unflatten(tree, [next(it) for _ in range(tree.num_leaves)]))
        g = grads[0] if isinstance(argnums, int) else tuple(grads)
        if has_aux:
            return (loss, jax.tree.unflatten(aux_tree, list(aux))), g
        return loss, g

    return wrapped


def grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0,
         has_aux: bool = False) -> Callable[..., Any]:
    """Drop-in for ``jax.grad`` that marks ``fun`` as the pipelined loss."""
    vag = value_and_grad(fun, argnums=argnums, has_aux=has_aux)

    def wrapped(*args: Any) -> Any:
        (value, g) = vag(*args)
        return (g, value[1]) if has_aux else g

    return wrapped


# ---- al.mark_layer ----------------------------------------------------------------------

mark_layer_p = Primitive("alpa_mark_layer")
mark_layer_p.multiple_results = True


def _mark_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, backward: bool):
    out = mark_layer_p.bind(*primals, backward=backward)
    return out, _mark_nonzero(tangents)


def _mark_nonzero(xs: Sequence[Any]) -> list[Any]:
    """``mark_layer_p(backward=True)`` on the non-zero (co)tangents; symbolic zeros pass."""
    xs = list(xs)
    nz = [i for i, x in enumerate(xs) if type(x) is not ad.Zero]
    if nz:
        for i, v in zip(nz, mark_layer_p.bind(*[xs[i] for i in nz], backward=True)):
            xs[i] = v
    return xs


def _mark_transpose(cts: Sequence[Any], *args: Any, backward: bool) -> list[Any]:
    return _mark_nonzero(cts)


mark_layer_p.def_impl(lambda *xs, backward: list(xs))
mark_layer_p.def_abstract_eval(lambda *avals, backward: list(avals))
ad.primitive_jvps[mark_layer_p] = _mark_jvp
ad.primitive_transposes[mark_layer_p] = _mark_transpose
batching.primitive_batchers[mark_layer_p] = lambda args, dims, **p: (mark_layer_p.bind(*args, **p), dims)
mlir.register_lowering(mark_layer_p, lambda ctx, *xs, backward: list(xs))
# A forward marker starts a new layer; the backward copies (its transpose) do not.
register_layer_marker(mark_layer_p, lambda params: not params["backward"])


def mark_layer(x: Any) -> Any:
    """The identity on ``x`` (any pytree); marks a layer boundary for the stage planner."""
    leaves, tree = jax.tree.flatten(x)
    pos = [i for i, v in enumerate(leaves) if isinstance(v, (jax.Array, np.ndarray))
           or hasattr(v, "aval")]
    if not pos:
        return x
    out = mark_layer_p.bind(*[leaves[i] for i in pos], backward=False)
    for i, v in zip(pos, out):
        leaves[i] = v
    return jax.tree.unflatten(tree, leaves)
