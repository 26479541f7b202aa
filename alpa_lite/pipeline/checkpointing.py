"""A training step with chosen layers of its loss under ``jax.checkpoint``: recomputation in a
one-stage plan.

The loss of ``al.value_and_grad`` is cut into layers as the pipeline cuts it (``program``: at
``al.mark_layer`` markers, else clustered). Each layer is kept ("keep": its backward reads the
activations its forward saved), recomputed whole ("full": ``jax.checkpoint`` saving nothing, the
backward recomputes the layer's forward from its inputs) or recomputed but for its matmul
outputs ("dots": ``jax.checkpoint_policies.dots_saveable``: the backward reads the matmul
outputs the forward saved and recomputes the element-wise ops between them).

``checkpointed_step`` returns the step with its ``al.value_and_grad`` rebound on that loss. Traced,
the recomputation is ops of the program like any other: the intra-op ILP prices, shards and
holds them in memory with the same models (extra forward compute in the backward, residuals no
longer alive from the forward to the backward), and the emitted program runs them. jax puts an
optimization barrier before each recomputation (``prevent_cse=True``) so that XLA does not merge
it with the forward it repeats; the tracer keeps it (``OpGraph.barriers``) and emission applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from alpa_lite.ir.errors import PlanningError
from alpa_lite.pipeline.program import (
    LossProgram,
    TracedStep,
    cut_layers,
    flat_function,
    read,
    trace_step,
    vag_positions,
)
from alpa_lite.result.plan import REMAT_POLICIES
from alpa_lite.tracing.markers import VagJaxpr, mark_layer

# What each recomputing policy lets the forward save (None: nothing, ``jax.checkpoint``'s default).
_SAVEABLE = {"full": None, "dots": jax.checkpoint_policies.dots_saveable}


def loss_program(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int],
                 traced: TracedStep | None = None) -> tuple[TracedStep, int, LossProgram]:
    """The step traced with the full batch (``traced`` when already made), the position of its
    one ``al.value_and_grad`` equation, and that equation's loss."""
    traced = trace_step(fn, args, static) if traced is None else traced
    found = vag_positions(traced.full.jaxpr)
    if len(found) != 1:
        raise PlanningError(f"recomputation needs a step that calls al.value_and_grad once (it finds the layers "
                            f"there); this one calls it {len(found)} times: pass remat=False")
    return traced, found[0], LossProgram.from_eqn(traced.full.jaxpr.eqns[found[0]])


def checkpointed_step(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int],
                      layer_starts: Sequence[int], policies: Sequence[str],
                      program: tuple[TracedStep, int, LossProgram] | None = None) -> Callable[..., Any]:
    """``fn`` with layer k of its loss (cut at ``layer_starts``, equation positions in the loss)
    recomputed as ``policies[k]`` says; a function of the same arguments (static ones included)
    returning the same pytree. ``program``: ``loss_program``'s result when already made (a search
    over several choices traces the step once)."""
    bad = [p for p in policies if p not in REMAT_POLICIES]
    if bad:
        raise PlanningError(f"unknown recomputation policy {bad[0]!r}: choose one of {REMAT_POLICIES}")
    traced, pos, loss = loss_program(fn, args, static) if program is None else program
    layers = cut_layers(loss, layer_starts)
    if len(layers) != len(policies):
        raise PlanningError(f"{len(policies)} recomputation policies for a loss of {len(layers)} layers")
    eqn = traced.full.jaxpr.eqns[pos]
    params = eqn.params
    closed = _checkpointed_loss(loss, layers, policies)
    vag = VagJaxpr(closed, params["num_consts"], params["diff"], params["num_aux"],
                   [v.aval for v in closed.jaxpr.invars])
    eqns = list(traced.full.jaxpr.eqns)
    eqns[pos] = eqn.replace(params={**params, "jaxpr": closed, "vag_jaxpr": vag})
    jaxpr, consts = traced.full.jaxpr.replace(eqns=eqns), traced.full.consts
    static_pos = tuple(sorted(i % len(args) for i in static)) if args else ()

    def step(*call_args: Any) -> Any:
        _, leaves, _ = flat_function(fn, call_args, static_pos)
        return jax.tree.unflatten(traced.out_tree, jax.core.eval_jaxpr(jaxpr, consts, *leaves))

    return step


def _checkpointed_loss(loss: LossProgram, layers: Sequence[Any], policies: Sequence[str]) -> Any:
    """The loss jaxpr with layer k under ``jax.checkpoint`` where ``policies[k]`` recomputes;
    layer boundaries stay marked (``al.mark_layer``), as in the loss the user wrote."""

    def f(*vals: Any) -> list[Any]:
        env = dict(zip(loss.invars, vals))
        for k, (layer, policy) in enumerate(zip(layers, policies)):
            run = layer.function()
            if policy != "keep":
                run = jax.checkpoint(run, prevent_cse=True, policy=_SAVEABLE[policy])
            ins = [env[v] for v in layer.inputs]
            if k:
                ins = mark_layer(ins)
            env.update(zip(layer.outputs, run(*ins)))
        return [read(env, x) for x in loss.outvars]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in loss.invars]
    return jax.make_jaxpr(f)(*avals)
