"""Measure what ``ClusterSpec`` holds on the devices at hand (``alpa-lite calibrate``).

**Links.** For each mesh axis of size n > 1, each collective kind (all-reduce, all-gather,
all-to-all) and several per-device buffer sizes b, time the collective over that axis (every
group along the axis at once, as in a sharded step) and fit the planner's own model
(``cost_model/collectives.py``):

    t = α + w / β,    w = Collective(kind, (axis,), b, n).wire_bytes()
                        (all-reduce 2(n−1)/n·b, all-gather (n−1)/n·b_out, all-to-all (n−1)/n·b)

by least squares on relative error (:func:`fit_alpha_beta`): one (α, β) per axis over every
kind (what the spec stores, as ``ClusterSpec.axis_links``) and one per kind (reported, to show
how far a single alpha-beta model is from each). The host links of the spec are the fit over the
axes within a host (``intra_host``) and across hosts (``inter_host``; the in-host fit when every
axis is within one host, as with the CPU devices of one process).

**One collective's time.** A program chains R collectives (each consumes the previous result,
so XLA can neither merge nor drop them); t = (T(1 + reps) − T(1)) / reps cancels the launch
cost that a step pays once, not per collective.

**Devices.** Matmul: every device multiplies its own N×N by N×N float32 at the same time
(2N³ FLOPs each, an FMA being 2 FLOPs): FLOP/s per device = 2N³ / (T − T₀), T₀ the time of an
empty program. Stored as ``peak_flops`` with ``efficiency`` 1: an achieved rate, not a datasheet
peak. Memory bandwidth: every device computes y = x·a + c over B bytes (reads B, writes B):
bytes/s = 2B / (T − T₀). Memory per device: host memory / devices on CPU (they share it), the
runtime's limit on other devices. Every T is the median of ``repeats`` runs after a warm-up run.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from alpa_lite.ir.cluster import ClusterSpec, DeviceModel, Link
from alpa_lite.ir.errors import PlanningError
from cost_model.strategy import Collective

KiB, MiB = 2**10, 2**20
KINDS = ("all-reduce", "all-gather", "all-to-all")
_ITEMSIZE = 4  # float32: what the CPU backend communicates (bf16 moves as f32 there too)


class CalibrationError(PlanningError):
    """The devices or the timings do not allow a fit (a mesh without an axis of size ≥ 2, ...)."""


@dataclass(frozen=True)
class CalibrationOptions:
    """What to time. ``sizes``: per-device result buffers (bytes) of each collective."""

    sizes: tuple[int, ...] = (4 * KiB, 32 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
    kinds: tuple[str, ...] = KINDS
    reps: int = 4  # collectives added to the chain for the difference T(1 + reps) − T(1)
    repeats: int = 7  # timed runs per point (median)
    matmul_n: int = 1024  # 2·1024³ = 2.1 GFLOP per device
    elementwise_bytes: int = 16 * MiB  # per device

    @classmethod
    def quick(cls) -> CalibrationOptions:
        """A few seconds on 8 CPU devices of a 2-core machine: two sizes, fewer repeats."""
        # reps 4 and repeats 5: at 2 and 3 the chained-timing difference was noise often enough to
        # leave a fit without a positive slope (1 run in 4 on a busy 2-core machine)
        return cls(sizes=(16 * KiB, 2 * MiB), reps=4, repeats=5, matmul_n=384, elementwise_bytes=4 * MiB)


@dataclass(frozen=True)
class Sample:
    """One timed collective: ``nbytes`` the per-device result buffer, ``seconds`` per collective."""

    kind: str
    axis: str
    group_size: int
    nbytes: float
    seconds: float

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.group_size, self.nbytes)


@dataclass(frozen=True)
class LinkFit:
    alpha: float  # s
    beta: float  # bytes/s
    rms_error: float  # root-mean-square relative error of the fit over its points
    points: int

    @property
    def link(self) -> Link:
        return Link(self.alpha, self.beta)


@dataclass(frozen=True)
class Calibration:
    cluster: ClusterSpec  # the spec to write
    base: ClusterSpec  # the preset it replaces figures of (for comparison)
    samples: tuple[Sample, ...]
    axis_fits: dict[str, LinkFit]  # per mesh axis, every kind: what the spec holds
    kind_fits: dict[tuple[str, str], LinkFit]  # (axis, kind)
    matmul_n: int
    elementwise_bytes: int
    launch_s: float  # T₀, an empty program
    wall_s: float = 0.0
    notes: tuple[str, ...] = field(default=())


# ---- the model (pure) --------------------------------------------------------------------------
def wire_bytes(kind: str, n: int, nbytes: float) -> float:
    """Bytes a device sends in ``kind`` over n devices with per-device result buffer ``nbytes``:
    the planner's own formula (``Collective.wire_bytes``), so the fit is the model it uses."""
    return Collective(kind, ("axis",), float(nbytes), n).wire_bytes()


def fit_alpha_beta(wire: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Fit t = α + w/β: minimise Σ ((α + s·wᵢ − tᵢ) / tᵢ)² over α and s = 1/β.

    Relative error, since sizes span orders of magnitude: plain least squares would fit the
    largest points and leave α to their noise. A negative α is refitted with α = 0:
    s = Σ(wᵢ/tᵢ) / Σ(wᵢ/tᵢ)². Needs two distinct w and positive times; a slope s ≤ 0 (times
    that do not grow with the bytes) is a ``CalibrationError``.
    """
    w, t = np.asarray(wire, float), np.asarray(seconds, float)
    if w.shape != t.shape or len(np.unique(w)) < 2:
        raise CalibrationError("a link fit needs timings at two or more message sizes")
    if not (np.all(t > 0) and np.all(np.isfinite(t))):
        raise CalibrationError("collective timings must be positive: time larger messages")
    a = np.stack([1 / t, w / t], axis=1)
    (alpha, s), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha, s = 0.0, float(np.sum(w / t) / np.sum((w / t) ** 2))
    if not s > 0:
        raise CalibrationError("collective times do not grow with message size: time larger messages "
                               "(--sizes) or more repeats")
    rms = float(np.sqrt(np.mean(((alpha + s * w - t) / t) ** 2)))
    return LinkFit(float(alpha), float(1 / s), rms, len(t))


def fit_samples(samples: Sequence[Sample]) -> LinkFit:
    """:func:`fit_alpha_beta` over samples, on their wire bytes. A sample whose time came out
    non-positive (the difference of two noisy chain timings on a busy machine) is a failed
    measurement: it is left out with a warning, and the fit fails only if too few remain."""
    good = [s for s in samples if s.seconds > 0 and np.isfinite(s.seconds)]
    if len(good) < len(samples):
        warnings.warn(f"{len(samples) - len(good)} of {len(samples)} collective timings came out "
                      "non-positive (a busy machine?) and were left out of the fit", stacklevel=2)
    return fit_alpha_beta([s.wire_bytes for s in good], [s.seconds for s in good])


def fit_axes(samples: Sequence[Sample]) -> tuple[dict[str, LinkFit], dict[tuple[str, str], LinkFit]]:
    """Per axis over every kind (what the spec holds), and per (axis, kind) — shown only, to see
    how far one line is from each kind: a kind whose few points noise leaves without a positive
    slope is left out of that display rather than failing the calibration."""
    axes = list(dict.fromkeys(s.axis for s in samples))
    per_axis = {a: fit_samples([s for s in samples if s.axis == a]) for a in axes}
    per_kind = {}
    for a in axes:
        for k in dict.fromkeys(s.kind for s in samples if s.axis == a):
            group = [s for s in samples if s.axis == a and s.kind == k]
            if len({s.nbytes for s in group}) >= 2:
                try:
                    per_kind[(a, k)] = fit_samples(group)
                except CalibrationError:
                    continue
    return per_axis, per_kind


def calibrated_cluster(base: ClusterSpec, samples: Sequence[Sample], axis_fits: dict[str, LinkFit], *,
                       flops: float, hbm: float, memory: float) -> ClusterSpec:
    """``base`` with the measured figures: per-axis links, host links (the fit over the axes
    within a host, and across hosts; the in-host one when no axis crosses hosts), device
    figures with efficiency 1."""
    inside = [s for s in samples if not base.crosses_hosts(s.axis)]
    across = [s for s in samples if base.crosses_hosts(s.axis)]
    intra = fit_samples(inside).link if inside else fit_samples(across).link
    inter = fit_samples(across).link if across else intra
    device = DeviceModel(base.device.name, float(flops), float(hbm), float(memory), 1.0)
    links = tuple((a, axis_fits[a].link) for a in base.axis_names if a in axis_fits)
    return replace(base, device=device, intra_host=intra, inter_host=inter, axis_links=links,
                   name=f"{base.name}-calibrated")


# ---- timing on devices ---------------------------------------------------------------------------
def median_time(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (to ``block_until_ready``) over ``repeats`` runs after one
    warm-up run (compilation, first touch of the buffers)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def buffer_elements(kind: str, n: int, nbytes: float) -> int:
    """float32 elements per device of the *input* for a result buffer of about ``nbytes``: the
    gathered buffer is n inputs (all-gather); an all-to-all splits its buffer in n pieces."""
    elems = max(1, round(nbytes / _ITEMSIZE))
    if kind == "all-gather":
        return max(1, round(elems / n))
    if kind == "all-to-all":
        return n * max(1, round(elems / n))
    return elems


def result_bytes(kind: str, n: int, elements: int) -> float:
    """Per-device result buffer of ``kind`` on ``elements`` input elements per device."""
    return float(elements * _ITEMSIZE * (n if kind == "all-gather" else 1))


def _sharded(mesh: Any, elements: int, fill: float = 1.0) -> Any:
    """A float32 array with ``elements`` per device, split over every mesh axis."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    spec = PartitionSpec(tuple(mesh.axis_names))
    return jax.device_put(jnp.full((mesh.size * elements,), fill, jnp.float32), NamedSharding(mesh, spec))


def _per_device(mesh: Any, body: Callable[..., Any], nargs: int = 1) -> Any:
    """``jit(shard_map(body))`` over arrays split over every axis (each device its own block)."""
    import jax
    from jax.sharding import PartitionSpec

    spec = PartitionSpec(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * nargs, out_specs=spec))


def collective_program(mesh: Any, kind: str, axis: str, count: int) -> Any:
    """``count`` collectives of ``kind`` over ``axis``, chained. An all-gather is followed by a
    dynamic slice of the *next* device's piece (its own piece would let XLA drop the gather)."""
    from jax import lax

    n = mesh.shape[axis]

    def one(x: Any) -> Any:
        if kind == "all-reduce":
            return lax.psum(x, axis)
        if kind == "all-to-all":
            return lax.all_to_all(x, axis, 0, 0, tiled=True)
        if kind == "all-gather":
            k = x.shape[0]
            y = lax.all_gather(x, axis, tiled=True)
            return lax.dynamic_slice_in_dim(y, ((lax.axis_index(axis) + 1) % n) * k, k)
        raise CalibrationError(f"cannot time collective {kind!r}; choose from {KINDS}")

    def body(x: Any) -> Any:
        for _ in range(count):
            x = one(x)
        return x

    return _per_device(mesh, body)


def time_collective(mesh: Any, kind: str, axis: str, nbytes: float, opts: CalibrationOptions) -> Sample:
    """Seconds of one ``kind`` over ``axis`` with a result buffer of about ``nbytes`` per device:
    the median over ``repeats`` pairs of runs of (T(1 + reps) − T(1)) / reps (launch cost
    cancelled; the two programs alternate so load from elsewhere hits both alike)."""
    import jax

    n = mesh.shape[axis]
    elems = buffer_elements(kind, n, nbytes)
    x = _sharded(mesh, elems)
    short, long = (collective_program(mesh, kind, axis, c) for c in (1, 1 + opts.reps))
    diffs = []
    for i in range(opts.repeats + 1):  # the first pair warms up (compiles)
        t0 = time.perf_counter()
        jax.block_until_ready(short(x))
        t1 = time.perf_counter()
        jax.block_until_ready(long(x))
        t2 = time.perf_counter()
        if i:
            diffs.append((t2 - t1) - (t1 - t0))
    return Sample(kind, axis, n, result_bytes(kind, n, elems), float(np.median(diffs)) / opts.reps)


def launch_time(mesh: Any, repeats: int) -> float:
    """T₀: an element-wise op on one element per device (what any program pays to start)."""
    return median_time(_per_device(mesh, lambda x: x + 1.0), _sharded(mesh, 1), repeats=repeats)


def measure_matmul(mesh: Any, n: int, repeats: int, launch_s: float) -> float:
    """FLOP/s per device: every device multiplies its own N×N by N×N at once, 2N³ / (T − T₀)."""
    a, b = _sharded(mesh, n * n), _sharded(mesh, n * n, 1.0 / n)

    def body(x: Any, w: Any) -> Any:
        return (x.reshape(n, n) @ w.reshape(n, n)).reshape(-1)

    t = median_time(_per_device(mesh, body, nargs=2), a, b, repeats=repeats)
    return 2.0 * n**3 / _net(t, launch_s)


def measure_hbm(mesh: Any, nbytes: int, repeats: int, launch_s: float) -> float:
    """Memory bytes/s per device: y = x·a + c over ``nbytes`` on every device, 2B / (T − T₀)."""
    elems = max(1, nbytes // _ITEMSIZE)
    t = median_time(_per_device(mesh, lambda x: x * 1.0001 + 1.0), _sharded(mesh, elems), repeats=repeats)
    return 2.0 * elems * _ITEMSIZE / _net(t, launch_s)


def _net(t: float, launch_s: float) -> float:
    """T − T₀, or T where launching is most of it (a size too small to measure the work)."""
    return t - launch_s if t > 2 * launch_s else t


def device_memory(mesh: Any, base: ClusterSpec) -> float:
    """Bytes per device: host memory shared by the CPU devices, the runtime's limit elsewhere."""
    d0 = mesh.devices.flat[0]
    if d0.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / mesh.size
        except (ValueError, OSError, AttributeError):
            return base.device.memory
    stats = d0.memory_stats() or {}
    return float(stats.get("bytes_limit", base.device.memory))


# Times an axis's collectives are timed again, with twice the repeats each time, when noise leaves
# them without a fit (times not growing with the bytes): a CI run on 2 cores shared with a
# planning job hit it with --quick (4 reps × 5 repeats).
RETIMES = 2


def _fits(samples: Sequence[Sample]) -> bool:
    """Whether one axis's samples give it a link (``fit_samples``, as ``fit_axes`` fits it)."""
    try:
        fit_samples(samples)
    except CalibrationError:
        return False
    return True


def calibrate(mesh: Any, options: CalibrationOptions | None = None,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Time the collectives over each axis of ``mesh`` (size > 1), a matmul and an element-wise
    pass on every device; fit and return the calibrated ``ClusterSpec`` with what was measured."""
    opts = options or CalibrationOptions()
    progress = progress or (lambda phase: None)
    axes = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    if not axes:
        raise CalibrationError(f"mesh {dict(mesh.shape)} has no axis of size ≥ 2: nothing to communicate over")
    t0 = time.perf_counter()
    base = ClusterSpec.from_mesh(mesh)
    samples, retimed = [], []
    for axis in axes:
        axis_opts = opts
        for attempt in range(RETIMES + 1):
            got = []
            for kind in opts.kinds:
                progress(f"{kind} over {axis} ({len(opts.sizes)} sizes)")
                got += [time_collective(mesh, kind, axis, b, axis_opts) for b in opts.sizes]
            if attempt == RETIMES or _fits([s for s in got if s.seconds > 0]):
                break
            axis_opts = replace(axis_opts, repeats=2 * axis_opts.repeats)
            retimed.append(f"axis {axis!r}: times did not grow with message size (a busy machine): timed "
                           f"again with {axis_opts.repeats} repeats")
        samples += got
    dropped = [s for s in samples if not s.seconds > 0]  # noise larger than the collective itself
    samples = [s for s in samples if s.seconds > 0]
    progress("matmul and memory bandwidth")
    launch = launch_time(mesh, opts.repeats)
    flops = measure_matmul(mesh, opts.matmul_n, opts.repeats, launch)
    hbm = measure_hbm(mesh, opts.elementwise_bytes, opts.repeats, launch)
    axis_fits, kind_fits = fit_axes(samples)
    cluster = calibrated_cluster(base, samples, axis_fits, flops=flops, hbm=hbm, memory=device_memory(mesh, base))
    notes = [f"axis {a!r} has size 1: no link measured" for a in mesh.axis_names if a not in axes] + retimed
    notes += [f"dropped {s.kind} over {s.axis} at {s.nbytes:,.0f} B: the longer chain was not slower "
              "(timing noise)" for s in dropped]
    return Calibration(cluster, base, tuple(samples), axis_fits, kind_fits, opts.matmul_n,
                       opts.elementwise_bytes, launch, time.perf_counter() - t0, tuple(notes))


# ---- report ----------------------------------------------------------------------------------
def calibration_renderable(cal: Calibration) -> Any:
    """Rich tables: α/β per axis (all kinds: what the spec holds; then each kind), device figures
    beside the preset's."""
    from rich.console import Group
    from rich.table import Table

    links = Table(title="Links per mesh axis: t = α + wire_bytes/β", title_justify="left")
    for col in ("axis", "size", "collectives", "α µs", "β GB/s", "fit rms error", "points"):
        links.add_column(col, justify="left" if col in ("axis", "collectives") else "right")
    sizes = cal.cluster.axis_sizes
    for axis, fit in cal.axis_fits.items():
        links.add_row(axis, str(sizes[axis]), "all (in the spec)", *_fit_cells(fit), style="bold")
        for (a, kind), kfit in cal.kind_fits.items():
            if a == axis:
                links.add_row("", "", kind, *_fit_cells(kfit))
    ref_link = cal.base.intra_host
    links.add_row(f"preset {cal.base.name!r}", "", "every axis in a host", f"{ref_link.alpha * 1e6:.3g}",
                  f"{ref_link.beta / 1e9:.3g}", "", "", style="dim")
    dev, ref = cal.cluster.device, cal.base.device
    devices = Table(title="Per device (all devices at once)", title_justify="left")
    for col in ("figure", "measured", f"preset {cal.base.name!r}", "how"):
        devices.add_column(col, justify="left" if col in ("figure", "how") else "right")
    devices.add_row("FLOP/s", f"{dev.peak_flops / 1e9:.3g} G", f"{ref.peak_flops * ref.efficiency / 1e9:.3g} G",
                    f"{cal.matmul_n}×{cal.matmul_n} float32 matmul; stored as peak, efficiency 1")
    devices.add_row("memory bandwidth", f"{dev.hbm_bandwidth / 1e9:.3g} GB/s", f"{ref.hbm_bandwidth / 1e9:.3g} GB/s",
                    f"y = x·a + c over {cal.elementwise_bytes / MiB:.3g} MiB")
    devices.add_row("memory", f"{dev.memory / 2**30:.3g} GiB", f"{ref.memory / 2**30:.3g} GiB",
                    "host memory / devices" if cal.cluster.name.startswith("cpu") else "runtime limit")
    devices.add_row("launch", f"{cal.launch_s * 1e6:.3g} µs", "", "empty program, subtracted above")
    return Group(links, devices, *cal.notes, f"calibrated in {cal.wall_s:.1f} s")


def _fit_cells(fit: LinkFit) -> list[str]:
    return [f"{fit.alpha * 1e6:.3g}", f"{fit.beta / 1e9:.3g}", f"{fit.rms_error:.0%}", str(fit.points)]

