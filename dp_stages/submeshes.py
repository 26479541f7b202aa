"""Sub-mesh shapes a stage may run on, and the 2-D logical views of one sub-mesh.

After Alpa's ``get_submesh_choices``: a cluster of N hosts × M devices is cut into sub-meshes
(1,1), (1,2), (1,4), …, (1,M) inside one host and (k,M) spanning k whole hosts. Alpa asserts M
is a power of two; we also allow other M by adding (1,M) itself.
"""

from __future__ import annotations


def submesh_shapes(num_hosts: int, devices_per_host: int, host_counts: str = "all") -> list[tuple[int, int]]:
    """Candidate (hosts, devices) shapes: (1, 2^i) up to M, (1, M), then (k, M) for k = 2..N
    (``host_counts="all"``) or for k a power of two and N (``"pow2"``, Alpa's "power_of_two"
    space: log2 N shapes instead of N − 1; every total still has an exact cover)."""
    if host_counts not in ("all", "pow2"):
        raise ValueError(f"host_counts must be 'all' or 'pow2', got {host_counts!r}")
    if num_hosts < 1 or devices_per_host < 1:
        raise ValueError(
            f"need num_hosts >= 1 and devices_per_host >= 1, got {num_hosts} x {devices_per_host}"
        )
    shapes = []
    m = 1
    while m <= devices_per_host:
        shapes.append((1, m))
        m *= 2
    if shapes[-1][1] != devices_per_host:  # M not a power of two: the whole host is a choice too
        shapes.append((1, devices_per_host))
    ks = range(2, num_hosts + 1)
    if host_counts == "pow2":
        ks = [k for k in ks if k & (k - 1) == 0 or k == num_hosts]
    shapes.extend((k, devices_per_host) for k in ks)
    return shapes


def num_devices(shape: tuple[int, int]) -> int:
    """Devices a (hosts, devices) sub-mesh holds."""
    hosts, devices = shape
    return hosts * devices


def logical_views(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Every (dp, tp) with dp·tp = the sub-mesh's device count, dp ascending.

    >>> logical_views((1, 4))
    [(1, 4), (2, 2), (4, 1)]
    """
    n = num_devices(shape)
    if n < 1:
        raise ValueError(f"a sub-mesh needs at least one device, got shape {shape}")
    return [(dp, n // dp) for dp in range(1, n + 1) if n % dp == 0]
