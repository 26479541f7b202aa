"""Clustering the forward ops into L layers (Alpa's AutoLayerOption, ``cluster_jaxpr_by_cost``).

Ops stay in program order; a layer is a contiguous run of ops. Every layer's FLOPs must be at
most (1 + eps)·total/L, so no stage is forced to be slow; among such cuts we minimise first the
largest number of bytes crossing a cut (the activation one stage sends the next), then the sum
of bytes over all cuts, then the sum of squared layer FLOPs (ties go to the most even split).

Lexicographic (max, sum) does not compose along a DP, so it is two passes: a min-max pass finds
the least possible largest cut B*, then a pass over cuts of at most B* minimises the additive
pair (Σ bytes, Σ FLOPs²), which does compose.
"""

from __future__ import annotations

import numpy as np

# Relative slack on the balance bound, so that sums of equal FLOPs that round a few ulps above
# total/L (e.g. eps = 0 on uniform ops) still count as balanced.
_SLACK = 1e-9
# Entries of the (cut, start) window matrices built at once per step, to bound memory.
_CHUNK = 1 << 20


def cluster_layers(
    flops: np.ndarray, boundary_bytes: np.ndarray, num_layers: int, eps: float = 0.5
) -> list[int]:
    """Start op index of each of ``num_layers`` layers (the first is 0).

    ``flops[k]``: FLOPs of op k in program order. ``boundary_bytes``: bytes crossing the cut at
    position c (between op c-1 and op c), either of length n-1 (cut c at index c-1) or of length
    n or n+1 (cut c at index c; entries for positions 0 and n are ignored). If no cut meets the
    balance bound (an op heavier than it), the bound is raised to the least achievable largest
    layer FLOPs.
    """
    flops = np.asarray(flops, dtype=np.float64)
    if flops.ndim != 1:
        raise ValueError(f"flops must be 1-D (one entry per op), got shape {flops.shape}")
    n = len(flops)
    if num_layers < 1 or num_layers > n:
        raise ValueError(
            f"cannot cut {n} ops into {num_layers} layers: num_layers must be between 1 "
            f"and the number of ops ({n})"
        )
    if not np.isfinite(flops).all() or (flops < 0).any():
        raise ValueError("flops must be finite and >= 0")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cut = _cut_bytes(boundary_bytes, n)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    bound = (1 + eps) * prefix[-1] / num_layers
    if _min_groups(prefix, bound) > num_layers:
        bound = _least_bound(prefix, num_layers)
    lo = np.searchsorted(prefix, prefix - bound - _slack(bound), side="left")  # earliest start
    largest = _minmax_pass(lo, cut, num_layers)
    if not np.isfinite(largest):
        raise ValueError(
            f"no cut into {num_layers} balanced layers avoids the forbidden (inf) boundaries"
        )
    return _minsum_pass(prefix, lo, np.where(cut <= largest, cut, np.inf), num_layers)


def _cut_bytes(boundary_bytes: np.ndarray, n: int) -> np.ndarray:
    """Bytes at each position 0..n; positions 0 and n (not cuts) get 0."""
    b = np.asarray(boundary_bytes, dtype=np.float64).ravel()
    out = np.zeros(n + 1)
    if len(b) == n - 1:
        out[1:n] = b
    elif len(b) in (n, n + 1):
        out[1:n] = b[1:n]
    else:
        raise ValueError(
            f"boundary_bytes has {len(b)} entries; for {n} ops give n-1 = {n - 1} (cuts 1..n-1) "
            f"or n / n+1 entries indexed by cut position"
        )
    if np.isnan(out).any() or (out < 0).any():
        raise ValueError("boundary_bytes must be >= 0 (inf forbids a cut)")
    return out


def _slack(bound: float) -> float:
    return bound * _SLACK + 1e-300


def _min_groups(prefix: np.ndarray, bound: float) -> float:
    """Fewest contiguous groups with FLOPs <= bound each (greedy); inf if an op is too heavy."""
    n, pos, count = len(prefix) - 1, 0, 0
    while pos < n:
        nxt = int(np.searchsorted(prefix, prefix[pos] + bound + _slack(bound), side="right")) - 1
        if nxt <= pos:
            return np.inf
        pos, count = nxt, count + 1
    return count


def _least_bound(prefix: np.ndarray, num_layers: int) -> float:
    """Smallest largest-layer FLOPs over cuts into num_layers layers (bisection to ~1e-12)."""
    lo = max(float(np.diff(prefix).max()), prefix[-1] / num_layers)
    hi = float(prefix[-1])
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if _min_groups(prefix, mid) <= num_layers:
            hi = mid
        else:
            lo = mid
    return hi


def _windows(lo: np.ndarray, c_first: int, c_last: int, end_ok: np.ndarray, start_ok: np.ndarray):
    """Chunks of layer ends c with their candidate starts p (lo[c] <= p < c) as a mask.

    Only ends with ``end_ok`` and starts with ``start_ok`` are listed (the rest are inf).
    """
    ends = np.flatnonzero(end_ok[c_first : c_last + 1]) + c_first
    starts = np.flatnonzero(start_ok)
    pos = 0
    while pos < len(ends):
        c0 = int(ends[pos])
        first = int(np.searchsorted(starts, lo[c0]))
        width = max(1, int(np.searchsorted(starts, c0)) - first)
        # rows k, columns <= width + k: k = min(CHUNK/width, sqrt(CHUNK)) keeps it <= 2·CHUNK
        k = max(1, min(_CHUNK // width, int(np.sqrt(_CHUNK))))
        cs = ends[pos : pos + k]
        ps = starts[first : int(np.searchsorted(starts, cs[-1]))]
        if len(ps):
            yield cs, ps, (ps[None, :] >= lo[cs][:, None]) & (ps[None, :] < cs[:, None])
        pos += k


def _minmax_pass(lo: np.ndarray, cut: np.ndarray, num_layers: int) -> float:
    """Least possible largest cut bytes: V[g][c] = max(min of V[g-1] over [lo[c], c), cut[c])."""
    n = len(cut) - 1
    prev = np.full(n + 1, np.inf)
    prev[0] = 0.0
    ends = np.arange(n + 1)
    for _ in range(num_layers):
        prev = np.maximum(_window_min(prev, lo, ends - 1), cut)
    return float(prev[n])


def _window_min(vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(vals[lo[c] .. hi[c]]) for every c (inf where empty), by a sparse table."""
    table, k = [vals], 1
    while 2 * k <= len(vals):
        row = table[-1]
        table.append(np.concatenate([np.minimum(row[:-k], row[k:]), np.full(k, np.inf)]))
        k *= 2
    table = np.stack(table)
    length = hi - lo + 1
    level = np.log2(np.maximum(length, 1)).astype(np.int64)  # exact on powers of two
    right = np.clip(hi - (1 << level) + 1, 0, None)
    out = np.minimum(table[level, np.clip(lo, 0, len(vals) - 1)], table[level, right])
    return np.where(length >= 1, out, np.inf)


def _minsum_pass(prefix, lo, cut, num_layers) -> list[int]:
    """Cuts minimising (Σ bytes, Σ FLOPs²) lexicographically, both additive; returns starts."""
    n = len(cut) - 1
    bytes_, sq = np.full(n + 1, np.inf), np.full(n + 1, np.inf)
    bytes_[0], sq[0] = 0.0, 0.0
    arg = np.zeros((num_layers + 1, n + 1), dtype=np.int64)
    live = np.isfinite(bytes_)
    for g in range(1, num_layers + 1):
        nb, nsq = np.full(n + 1, np.inf), np.full(n + 1, np.inf)
        for cs, ps, ok in _windows(lo, g, n - (num_layers - g), np.isfinite(cut), live):
            b = np.where(ok, bytes_[ps][None, :], np.inf)
            b_min = b.min(axis=1)
            layer = prefix[cs][:, None] - prefix[ps][None, :]
            q = np.where(ok & (b == b_min[:, None]), sq[ps][None, :] + layer * layer, np.inf)
            k = q.argmin(axis=1)
            arg[g, cs] = ps[k]
            nb[cs] = b_min + cut[cs]
            nsq[cs] = q[np.arange(len(cs)), k]
        bytes_, sq = nb, nsq
        live = np.isfinite(bytes_)
    assert np.isfinite(bytes_[n]), "min-sum pass lost the min-max solution"
    starts, c = [], n
    for g in range(num_layers, 0, -1):
        c = int(arg[g, c])
        starts.append(c)
    return starts[::-1]
