"""What each argument of a step is, and the mesh it is planned on.

A training step returns its new state (params, optimizer state) in the same pytree shape as the
inputs it came from: those outputs are *tied* to the inputs (``find_ties``; the emitted jit
donates them), and the other dynamic inputs are the batch (``state_and_batch``;
``batch_argnums`` overrides). ``state_groups`` pairs optimizer-state leaves with their
parameters (the baselines shard them alike).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import MeshError
from alpa_lite.ir.graph import OpGraph
from alpa_lite.ir.signature import leaf_signature

log = logging.getLogger("alpa_lite.intra.roles")


def resolve_mesh(mesh: Any, cluster: ClusterSpec | None) -> tuple[Any, ClusterSpec]:
    """A (concrete or abstract) mesh and the cluster figures viewed on its axes."""
    if mesh is None and cluster is None:
        raise MeshError("give mesh= (a jax Mesh or AbstractMesh) or cluster= (a ClusterSpec)")
    if mesh is None:
        mesh = jax.sharding.AbstractMesh(cluster.mesh_shape, cluster.axis_names)
    if not hasattr(mesh, "axis_names") or not hasattr(mesh, "axis_sizes"):
        raise MeshError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__}")
    shape, names = tuple(int(s) for s in mesh.axis_sizes), tuple(mesh.axis_names)
    if cluster is None:
        cluster = ClusterSpec.from_mesh(mesh)
    elif math.prod(cluster.mesh_shape) != math.prod(shape) and cluster.mesh_shape != shape:
        log.info("viewing cluster %s as mesh %s", cluster.mesh_shape, shape)
    return mesh, cluster.with_mesh(shape, names)


def _leaf_avals(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    return [leaf_signature(x) for x in jax.tree.leaves(tree)]


def find_ties(graph: OpGraph | None, args: Sequence[Any], static: Sequence[int],
              out_example: Any) -> tuple[dict[int, int], list[int]]:
    """Flat output position → flat input position for carried state; and the args tied whole.

    An output (a top-level element of a tuple result, or the whole result) is carried state
    when some dynamic argument has the same pytree structure and leaf shapes/dtypes.
    """
    dyn_idx = [i for i in range(len(args)) if i not in static]
    starts, n = {}, 0
    for i in dyn_idx:
        starts[i] = n
        n += len(jax.tree.leaves(args[i]))
    outs = list(out_example) if isinstance(out_example, (tuple, list)) else [out_example]
    ties, tied_args, pos = {}, [], 0
    for o in outs:
        k = len(jax.tree.leaves(o))
        for i in dyn_idx:
            if i in tied_args or not jax.tree.leaves(args[i]):
                continue
            if (jax.tree.structure(args[i]) == jax.tree.structure(o)
                    and _leaf_avals(args[i]) == _leaf_avals(o)):
                for j in range(k):
                    if graph is None or graph.outputs[pos + j] != graph.inputs[starts[i] + j]:  # unchanged: no tie
                        ties[pos + j] = starts[i] + j
                tied_args.append(i)
                break
        pos += k
    return ties, tied_args


def state_groups(args: Sequence[Any], static: Sequence[int], state_args: Sequence[int]) -> dict[int, int]:
    """Optimizer-state leaf → the parameter leaf with the same tree-path tail and shape."""
    leaves, starts, n = {}, {}, 0
    for i in range(len(args)):
        if i in static:
            continue
        starts[i] = n
        for j, (path, x) in enumerate(jax.tree_util.tree_leaves_with_path(args[i])):
            leaves[n + j] = (i, path, tuple(np.shape(x)))
        n += len(jax.tree.leaves(args[i]))
    if not state_args:
        return {}
    first = state_args[0]
    params = {pos: v for pos, v in leaves.items() if v[0] == first}
    groups = {}
    for pos, (i, path, shape) in leaves.items():
        if i == first or i not in state_args:
            continue
        for ppos, (_, ppath, pshape) in params.items():
            if pshape == shape and len(ppath) <= len(path) and path[len(path) - len(ppath):] == ppath:
                groups[pos] = ppos
                break
    return groups


def state_and_batch(args: Sequence[Any], static: Sequence[int], tied_args: Sequence[int],
                     batch_argnums: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Flat input positions of the state and of the batch."""
    dyn = [i for i in range(len(args)) if i not in static]
    if batch_argnums is not None:
        batch_args = {i % len(args) for i in batch_argnums}
    elif tied_args:
        batch_args = {i for i in dyn if i not in tied_args and i > min(tied_args)}
    else:  # a forward function: the first argument is the weights, the rest the data
        batch_args = set(dyn[1:]) if len(dyn) > 1 else set(dyn)
    state, batch, n = [], [], 0
    for i in dyn:
        k = len(jax.tree.leaves(args[i]))
        (batch if i in batch_args else state).extend(range(n, n + k))
        n += k
    return state, batch


def out_example_of(graph: OpGraph, fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> Any:
    """The result's shapes and dtypes as a pytree, from the traced graph (a second trace costs
    as much as the first: 3 s of 9 for a 96-layer GPT); traced again only for PRNG-key outputs."""
    if graph.out_tree is None or any(graph.tensors[t].dtype.startswith("key<") for t in graph.outputs):
        return jax.eval_shape(lambda *a: fn(*a), *args) if not static else _eval_shape_static(fn, args, static)
    leaves = [jax.ShapeDtypeStruct(graph.tensors[t].shape, np.dtype(graph.tensors[t].dtype)) for t in graph.outputs]
    return jax.tree.unflatten(graph.out_tree, leaves)


def _eval_shape_static(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> Any:
    dyn = [a for i, a in enumerate(args) if i not in static]

    def f(*d: Any) -> Any:
        full, it = list(args), iter(d)
        for i in range(len(full)):
            if i not in static:
                full[i] = next(it)
        return fn(*full)

    return jax.eval_shape(f, *dyn)
