"""``ClusterSpec``: what the planner knows of the hardware, as plain frozen data.

Per mesh axis an alpha-beta link model (α seconds per collective, β bytes/s per device), plus
roofline figures per device (peak FLOP/s × efficiency, HBM bytes/s) and memory per device.
A mesh axis whose devices sit in one host uses the in-host link (NVLink); an axis that spans
hosts uses the cross-host link (InfiniBand): devices are numbered host-major, so an axis of
size s whose minor axes hold p devices stays in a host when s·p ≤ devices_per_host.

``axis_links`` (optional, what ``alpa-lite calibrate`` writes) overrides the link of named mesh
axes with figures measured on that mesh. They hold for that mesh only: viewing the cluster as a
mesh of another shape drops them (the host links remain); the same shape under other axis names
renames them in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from alpa_lite.ir.errors import MeshError
from alpa_lite.ir.hashing import cached_hash

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Link:
    """Alpha-beta model of one kind of link: time(b) = alpha + b / beta."""

    alpha: float  # seconds of latency per collective step
    beta: float  # bytes/s a device sends


@dataclass(frozen=True)
class DeviceModel:
    name: str
    peak_flops: float  # FLOP/s, dense, in the compute dtype the preset names
    hbm_bandwidth: float  # bytes/s
    memory: float  # bytes per device
    efficiency: float = 0.6  # fraction of peak a large matmul reaches


# Public figures. A100 SXM4 80GB: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e (NVIDIA A100
# datasheet). H100 SXM5 80GB: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3 (H100 datasheet).
# NVLink: A100 600 GB/s, H100 900 GB/s total bidirectional per GPU → half each way.
# InfiniBand: DGX A100 has 8× HDR 200 Gb/s (25 GB/s per GPU), DGX H100 8× NDR 400 Gb/s
# (50 GB/s per GPU). Latencies: a few µs per NCCL step in a host, ~10 µs across IB.
_PRESETS: dict[str, tuple[DeviceModel, Link, Link, int, bool]] = {
    "dgx-a100": (DeviceModel("A100-SXM4-80GB", 312e12, 2.039e12, 80 * GiB),
                 Link(5e-6, 300 * GB), Link(10e-6, 25 * GB), 8, True),
    "dgx-h100": (DeviceModel("H100-SXM5-80GB", 989e12, 3.35e12, 80 * GiB),
                 Link(5e-6, 450 * GB), Link(10e-6, 50 * GB), 8, True),
    # The CPU backend of XLA, as forced host devices here: figures of the order measured on a
    # 2-core machine (`alpa-lite calibrate` measures them); it has no reduce-scatter.
    "cpu": (DeviceModel("cpu", 20e9, 10 * GB, 3 * GiB, 1.0),
            Link(20e-6, 2 * GB), Link(20e-6, 2 * GB), 8, False),
}


@cached_hash
@dataclass(frozen=True)
class ClusterSpec:
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    device: DeviceModel
    intra_host: Link
    inter_host: Link
    devices_per_host: int
    has_reduce_scatter: bool = True
    name: str = "custom"
    # (axis name, Link) pairs measured on this mesh; a tuple so the spec stays hashable.
    axis_links: tuple[tuple[str, Link], ...] = ()

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, num_hosts: int = 1, devices_per_host: int | None = None,
               axis_names: Sequence[str] | None = None) -> ClusterSpec:
        """A real machine: ``"dgx-a100"``, ``"dgx-h100"`` or ``"cpu"``; mesh (hosts, devices)."""
        key = name.lower()
        if key not in _PRESETS:
            raise MeshError(f"unknown cluster preset {name!r}; choose one of {sorted(_PRESETS)}")
        dev, intra, inter, dph, rs = _PRESETS[key]
        dph = devices_per_host or dph
        if num_hosts < 1 or dph < 1:
            raise MeshError(f"num_hosts and devices_per_host must be ≥ 1, got {num_hosts}, {dph}")
        shape = (num_hosts, dph)
        names = tuple(axis_names) if axis_names else ("host", "device")
        return cls(shape, names, dev, intra, inter, dph, rs, key).with_mesh(shape, names)

    @classmethod
    def from_mesh(cls, mesh: Any, preset: str | None = None) -> ClusterSpec:
        """Figures for the devices of ``mesh`` (a ``Mesh`` or ``AbstractMesh``).

        CPU devices get the ``cpu`` preset; GPUs get the DGX preset of their kind (A100 or
        H100); ``preset`` overrides. All devices count as one host unless the mesh has devices
        of several processes.
        """
        shape = tuple(int(s) for s in mesh.axis_sizes)
        names = tuple(mesh.axis_names)
        n = math.prod(shape)
        key = preset
        dph = n
        try:
            devices = mesh.devices
        except (AttributeError, ValueError):  # an AbstractMesh has none (its getter raises)
            devices = None
        if key is None:
            key = "cpu"
            if devices is not None:
                d0 = devices.flat[0]
                kind = str(getattr(d0, "device_kind", "")).lower()
                if d0.platform == "gpu" or "nvidia" in kind:
                    key = "dgx-a100" if "a100" in kind else "dgx-h100"
        if devices is not None:
            procs = {d.process_index for d in devices.flat}
            dph = n // max(len(procs), 1)
        dev, intra, inter, _, rs = _PRESETS[key]
        base = cls(shape, names, dev, intra, inter, dph, rs, key)
        return base.with_mesh(shape, names)

    def with_mesh(self, shape: Sequence[int], names: Sequence[str]) -> ClusterSpec:
        """The same hardware viewed as a mesh of ``shape`` with axes ``names``."""
        shape, names = tuple(int(s) for s in shape), tuple(names)
        if len(shape) != len(names):
            raise MeshError(f"mesh shape {shape} and axis names {names} differ in length")
        if len(set(names)) != len(names):
            raise MeshError(f"mesh axis names {names} repeat a name")
        if any(s < 1 for s in shape):
            raise MeshError(f"mesh shape {shape} has a size below 1")
        links = self.axis_links
        if shape != self.mesh_shape:
            links = ()  # measured on another mesh: fall back to the host links
        elif names != self.axis_names:
            rename = dict(zip(self.axis_names, names))
            links = tuple((rename[a], lk) for a, lk in links)
        return replace(self, mesh_shape=shape, axis_names=names, axis_links=links)

    # ---- per-axis figures --------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.mesh_shape))

    def crosses_hosts(self, axis: str) -> bool:
        """Whether the devices along ``axis`` sit in more than one host (host-major numbering)."""
        i = self.axis_names.index(axis)
        span = math.prod(self.mesh_shape[i:])  # devices covered by this axis and its minors
        return span > self.devices_per_host

    def link(self, axis: str) -> Link:
        """The axis's measured link if ``axis_links`` has one; else the in-host link when the
        axis's devices share a host, the cross-host link when they do not."""
        for name, measured in self.axis_links:
            if name == axis:
                return measured
        return self.inter_host if self.crosses_hosts(axis) else self.intra_host

    def alpha(self, axes: Sequence[str]) -> float:
        return max((self.link(a).alpha for a in axes), default=0.0)

    def beta(self, axes: Sequence[str]) -> float:
        """A collective over several axes runs at the slowest axis's bandwidth."""
        return min((self.link(a).beta for a in axes), default=math.inf)

    def group_size(self, axes: Sequence[str]) -> int:
        sizes = self.axis_sizes
        return math.prod(sizes[a] for a in axes)

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``axis_links`` as ``{axis: {alpha, beta}}``, left out when empty (so plan
        files written before it existed and after are alike)."""
        d = asdict(self)
        d.pop("axis_links")
        if self.axis_links:
            d["axis_links"] = {a: asdict(lk) for a, lk in self.axis_links}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterSpec:
        try:
            return cls(mesh_shape=tuple(d["mesh_shape"]), axis_names=tuple(d["axis_names"]),
                       device=DeviceModel(**d["device"]), intra_host=Link(**d["intra_host"]),
                       inter_host=Link(**d["inter_host"]), devices_per_host=int(d["devices_per_host"]),
                       has_reduce_scatter=bool(d["has_reduce_scatter"]), name=str(d.get("name", "custom")),
                       axis_links=_axis_links(d.get("axis_links") or {}, d["axis_names"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise MeshError(f"cluster description is missing or has a bad field: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> ClusterSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise MeshError(f"cluster file is not valid JSON: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def scaled(self, *, inter_beta: float | None = None, intra_beta: float | None = None) -> ClusterSpec:
        """A copy with other link bandwidths (what-if studies: a slow cross-host link); a measured
        axis link takes the new bandwidth of the kind of link its axis is."""
        def beta(crosses: bool, old: float) -> float:
            return (inter_beta if crosses else intra_beta) or old

        links = tuple((a, replace(lk, beta=beta(self.crosses_hosts(a), lk.beta))) for a, lk in self.axis_links)
        return replace(self, axis_links=links,
                       inter_host=replace(self.inter_host, beta=inter_beta or self.inter_host.beta),
                       intra_host=replace(self.intra_host, beta=intra_beta or self.intra_host.beta))


def _axis_links(d: dict[str, Any], axis_names: Sequence[str]) -> tuple[tuple[str, Link], ...]:
    """``{axis: {alpha, beta}}`` → ``axis_links``, in mesh-axis order; unknown axes are an error."""
    unknown = sorted(set(d) - set(axis_names))
    if unknown:
        raise MeshError(f"cluster description has axis_links for {unknown}, not axes of its mesh {list(axis_names)}")
    return tuple((a, Link(**d[a])) for a in axis_names if a in d)


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"2x4"`` → ``(2, 4)``; ``"8"`` → ``(8,)``."""
    try:
        shape = tuple(int(p) for p in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise MeshError(f"bad mesh {text!r}: write sizes joined by 'x', e.g. '8' or '2x4'") from None
    if not shape or any(s < 1 for s in shape):
        raise MeshError(f"bad mesh {text!r}: every size must be a positive integer")
    return shape
