"""Alpha-beta time of one collective over some mesh axes (design.md, "Cost model").

With ``n`` devices in the group (the product of the axes' sizes), ``b`` the per-device result
buffer (the shape compiled HLO shows), α the latency and β the bytes/s a device sends:

===================  ==========================================  ==========================
all-reduce           ``α + 2(n−1)/n · b / β``                    b: the reduced buffer
all-gather           ``α + (n−1)/n · b / β``                     b: the gathered buffer
reduce-scatter       ``α + (n−1) · b / β``                       b: the scattered piece
all-to-all           ``α + (n−1)/n · b / β``                     b: the buffer (in = out)
collective-permute   ``α + b / β``                               b: the buffer moved
===================  ==========================================  ==========================

Each is ``α + wire_bytes / β`` with ``Collective.wire_bytes()`` the bytes a device sends. A group
over several mesh axes runs at the slowest axis's β and pays the largest α
(``ClusterSpec.beta`` / ``ClusterSpec.alpha``).

A backend without reduce-scatter (``ClusterSpec.has_reduce_scatter`` False: XLA's CPU backend,
seen on jax 0.10.2) compiles one as an all-reduce of the whole buffer followed by a local
slice, so :func:`collective` returns that all-reduce and the cost and the reported collective
are both what the compiled program runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from alpa_lite.ir.cluster import ClusterSpec
from cost_model.strategy import COLLECTIVE_KINDS, Collective

__all__ = ["all_gather", "all_reduce", "all_to_all", "collective", "collective_permute",
           "collective_time", "reduce_scatter"]


def collective(kind: str, axes: Sequence[str], nbytes: float,
               cluster: ClusterSpec) -> Collective | None:
    """The collective the backend runs for ``kind`` over ``axes``; None when the group is 1.

    ``nbytes`` is the per-device *result* buffer (the scattered piece for a reduce-scatter, the
    gathered buffer for an all-gather). On a cluster without reduce-scatter a reduce-scatter
    comes back as the all-reduce of the unscattered buffer (``nbytes · n``) that XLA emits.
    """
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {COLLECTIVE_KINDS}")
    sizes = cluster.axis_sizes
    axes = tuple(a for a in axes if sizes[a] > 1)  # a size-1 axis moves nothing
    n = cluster.group_size(axes)
    if n <= 1:
        return None
    if kind == "reduce-scatter" and not cluster.has_reduce_scatter:
        return Collective("all-reduce", axes, nbytes * n, n)
    return Collective(kind, axes, float(nbytes), n)


def collective_time(c: Collective | None, cluster: ClusterSpec) -> float:
    """Seconds of ``c``: ``α + wire_bytes/β`` over its axes (0 for None)."""
    if c is None or c.group_size <= 1:
        return 0.0
    return cluster.alpha(c.axes) + c.wire_bytes() / cluster.beta(c.axes)


def all_reduce(axes: Sequence[str], nbytes: float, cluster: ClusterSpec) -> Collective | None:
    """Sum a buffer of ``nbytes`` per device over ``axes``."""
    return collective("all-reduce", axes, nbytes, cluster)


def all_gather(axes: Sequence[str], nbytes: float, cluster: ClusterSpec) -> Collective | None:
    """Gather over ``axes`` into a buffer of ``nbytes`` per device (the gathered size)."""
    return collective("all-gather", axes, nbytes, cluster)


def reduce_scatter(axes: Sequence[str], nbytes: float,
                   cluster: ClusterSpec) -> Collective | None:
    """Sum over ``axes`` and keep a piece of ``nbytes`` (all-reduce where the backend lacks it)."""
    return collective("reduce-scatter", axes, nbytes, cluster)


def all_to_all(axes: Sequence[str], nbytes: float, cluster: ClusterSpec) -> Collective | None:
    """Exchange pieces of a buffer of ``nbytes`` per device over ``axes``."""
    return collective("all-to-all", axes, nbytes, cluster)


def collective_permute(axes: Sequence[str], nbytes: float,
                       cluster: ClusterSpec) -> Collective | None:
    """Send a buffer of ``nbytes`` to one other device of the devices along ``axes``."""
    return collective("collective-permute", axes, nbytes, cluster)
