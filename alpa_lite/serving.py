"""``al.plan_serving``: plan a serving pair, prefill and decode, and the cache move between them.

Prefill (the prompt, compute-bound) returns the KV cache; decode (one token per sequence per
step, bound by HBM bandwidth) carries it. Each is planned on its own with ``al.plan``; the cache
leaves prefill in prefill's output layout and decode wants it in its input layout. When the two
differ the cache is resharded once per prompt batch, between the phases:

    resharding_s = Σ over cache leaves of reshard(prefill out spec → decode in spec)

(``cost_model.resharding.reshard``: the cheapest collective sequence, alpha-beta). Per request
of ``n`` generated tokens the serving cost is prefill + resharding + n · decode.
``one_layout=True`` plans decode first and then prefill with its cache outputs constrained to
decode's cache layout (a ``with_sharding_constraint``, a hard constraint for the planner), so
there is nothing to move; the prefill plan may then cost more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from alpa_lite.api import plan
from alpa_lite.intra.roles import find_ties, resolve_mesh
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import PlanningError
from alpa_lite.ir.graph import TensorInfo
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.result.plan import Plan
from cost_model.resharding import reshard
from cost_model.strategy import Collective


@dataclass(frozen=True)
class CacheMove:
    """One cache leaf whose layouts differ: where it is (``jax.tree_util.keystr``), the specs,
    and the seconds and collectives of the move."""

    path: str
    src: ShardingSpec
    dst: ShardingSpec
    seconds: float
    collectives: tuple[Collective, ...]


@dataclass(frozen=True)
class ServingPlan:
    prefill: Plan
    decode: Plan
    prefill_fn: Callable[..., Any]  # what ``prefill`` compiles: the constrained wrapper if one_layout
    cache_output: int  # index of the cache in prefill's result tuple
    cache_arg: int  # index of the cache among decode's arguments
    moves: tuple[CacheMove, ...]  # leaves resharded between the phases (empty: one layout)

    @property
    def resharding_s(self) -> float:
        return sum(m.seconds for m in self.moves)

    def request_s(self, new_tokens: int) -> float:
        """Predicted seconds for one prompt batch: prefill + cache move + ``new_tokens`` decodes."""
        return self.prefill.cost.total_s + self.resharding_s + new_tokens * self.decode.cost.total_s

    def compile(self, decode: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(prefill step, decode step) as ``jax.jit`` functions with the plans' shardings. The
        decode step's cache input sharding moves a prefill cache in another layout."""
        return self.prefill.compile(self.prefill_fn), self.decode.compile(decode)

    def summary(self) -> str:
        lines = [f"prefill: {self.prefill.cost.total_s * 1e3:.3f} ms, bound by {self.prefill.cost.bound}",
                 f"decode:  {self.decode.cost.total_s * 1e3:.3f} ms per token, bound by {self.decode.cost.bound}",
                 f"cache resharding between them: {self.resharding_s * 1e3:.3f} ms "
                 f"({len(self.moves)} leaves move)"]
        lines += [f"  {m.path}: {m.src} → {m.dst}  {m.seconds * 1e6:.1f} µs" for m in self.moves[:8]]
        return "\n".join(lines)


def plan_serving(prefill: Callable[..., Any], decode: Callable[..., Any],
                 prefill_args: Sequence[Any], decode_args: Sequence[Any], *, mesh: Any = None,
                 cluster: ClusterSpec | None = None, one_layout: bool = False,
                 **plan_kwargs: Any) -> ServingPlan:
    """Plan ``prefill(*prefill_args) -> (..., cache, ...)`` and ``decode(*decode_args)``, whose
    result carries ``cache`` (an argument with the same pytree and shapes). ``plan_kwargs`` go
    to both ``al.plan`` calls (``method``, ``memory_budget``, ``time_limit_s``, ...)."""
    mesh, cluster = resolve_mesh(mesh, cluster)
    cache_arg = _carried_cache(decode, decode_args)
    cache_output = _cache_output(prefill, prefill_args, decode_args[cache_arg])
    dec = plan(decode, *decode_args, mesh=mesh, cluster=cluster, **plan_kwargs)
    prefill_fn = prefill
    if one_layout:
        prefill_fn = _constrained(prefill, cache_output, dec.in_specs[cache_arg], mesh)
    pre = plan(prefill_fn, *prefill_args, mesh=mesh, cluster=cluster, **plan_kwargs)
    moves = _moves(pre, dec, cache_output, cache_arg, decode_args[cache_arg], cluster)
    return ServingPlan(pre, dec, prefill_fn, cache_output, cache_arg, moves)


def _carried_cache(decode: Callable[..., Any], args: Sequence[Any]) -> int:
    out = jax.eval_shape(decode, *args)
    _, tied = find_ties(None, args, (), out)
    if len(tied) != 1:
        raise PlanningError(
            f"decode must return its cache (one argument's pytree, same shapes and dtypes) as "
            f"carried state; found {len(tied)} such arguments ({tied}): return the updated cache "
            "in the same structure as the cache argument")
    return tied[0]


def _cache_output(prefill: Callable[..., Any], args: Sequence[Any], cache: Any) -> int:
    out = jax.eval_shape(prefill, *args)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    want = (jax.tree.structure(cache), [(x.shape, x.dtype) for x in jax.tree.leaves(cache)])
    for k, o in enumerate(outs):
        if (jax.tree.structure(o), [(x.shape, x.dtype) for x in jax.tree.leaves(o)]) == want:
            return k
    raise PlanningError("prefill returns no cache shaped like decode's cache argument (same pytree, "
                        "shapes and dtypes): make prefill's cache length and batch match decode's")


def _constrained(prefill: Callable[..., Any], k: int, specs: Any, mesh: Any) -> Callable[..., Any]:
    """``prefill`` with result ``k`` (the cache) constrained to ``specs`` (PartitionSpecs). The
    constraint names an Auto-axes copy of the mesh: on Explicit axes ``with_sharding_constraint``
    only asserts, and the emitted step runs its body on Auto axes (``auto_axes``) anyway."""
    names = tuple(mesh.axis_names)
    auto = jax.sharding.AbstractMesh(tuple(mesh.axis_sizes), names,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(names))

    def prefill_in_decode_layout(*args: Any) -> Any:
        out = list(prefill(*args))
        out[k] = jax.tree.map(
            lambda x, s: jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(auto, s)),
            out[k], specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
        return tuple(out)

    return prefill_in_decode_layout


def _moves(pre: Plan, dec: Plan, cache_output: int, cache_arg: int, cache: Any,
           cluster: ClusterSpec) -> tuple[CacheMove, ...]:
    src = _flat_specs(pre.out_specs[cache_output])
    dst = _flat_specs(dec.in_specs[cache_arg])
    moves = []
    for (path, leaf), s, d in zip(jax.tree_util.tree_leaves_with_path(cache), src, dst, strict=True):
        a, b = ShardingSpec.from_partition_spec(s, leaf.ndim), ShardingSpec.from_partition_spec(d, leaf.ndim)
        if a == b:
            continue
        t = TensorInfo(tuple(leaf.shape), str(leaf.dtype))
        seconds, colls = reshard(a, b, t, cluster)
        moves.append(CacheMove(jax.tree_util.keystr(path), a, b, seconds, colls))
    return tuple(moves)


def _flat_specs(tree: Any) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
