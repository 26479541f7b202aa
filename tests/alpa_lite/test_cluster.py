"""``alpa_lite.ir.cluster``: presets, per-axis links, mesh views, ``from_mesh``, JSON and mesh
strings."""

from __future__ import annotations

import json

import jax
import pytest

from alpa_lite.ir.cluster import GB, ClusterSpec, DeviceModel, Link, parse_mesh
from alpa_lite.ir.errors import MeshError, PlanningError
from tests.helpers import make_mesh

GiB = 2**30

# Figures from the comments in cluster.py (NVIDIA datasheets): NVLink bandwidth is the total
# bidirectional figure halved; InfiniBand 8 × HDR 200 Gb/s or 8 × NDR 400 Gb/s per 8 GPUs.
PRESET_TABLE = [
    # name, peak FLOP/s, HBM B/s, memory, intra (α, β), inter (α, β)
    ("dgx-a100", 312e12, 2039e9, 80 * GiB, (5e-6, 600 * GB / 2), (10e-6, 200e9 / 8)),
    ("dgx-h100", 989e12, 3.35e12, 80 * GiB, (5e-6, 900 * GB / 2), (10e-6, 400e9 / 8)),
]


@pytest.mark.parametrize("name,peak,hbm,mem,intra,inter", PRESET_TABLE)
def test_gpu_presets(name, peak, hbm, mem, intra, inter):
    c = ClusterSpec.preset(name)
    assert c.name == name
    assert c.device.peak_flops == pytest.approx(peak)
    assert c.device.hbm_bandwidth == pytest.approx(hbm)
    assert c.device.memory == mem
    assert (c.intra_host.alpha, c.intra_host.beta) == pytest.approx(intra)
    assert (c.inter_host.alpha, c.inter_host.beta) == pytest.approx(inter)
    assert c.has_reduce_scatter
    assert c.devices_per_host == 8
    assert c.mesh_shape == (1, 8) and c.axis_names == ("host", "device")
    assert c.num_devices == 1 * 8


def test_cpu_preset_has_no_reduce_scatter():
    c = ClusterSpec.preset("cpu")
    assert not c.has_reduce_scatter
    assert c.device.efficiency == 1.0


@pytest.mark.parametrize("hosts,dph,shape", [(2, None, (2, 8)), (4, 4, (4, 4)), (1, 2, (1, 2))])
def test_preset_mesh_is_hosts_by_devices(hosts, dph, shape):
    c = ClusterSpec.preset("DGX-H100", num_hosts=hosts, devices_per_host=dph)
    assert c.mesh_shape == shape
    assert c.axis_sizes == {"host": shape[0], "device": shape[1]}
    assert c.devices_per_host == shape[1]
    assert c.num_devices == shape[0] * shape[1]


def test_preset_axis_names():
    c = ClusterSpec.preset("dgx-a100", num_hosts=2, axis_names=("dp", "tp"))
    assert c.axis_names == ("dp", "tp") and c.mesh_shape == (2, 8)


def test_unknown_preset_names_the_choices():
    with pytest.raises(MeshError) as e:
        ClusterSpec.preset("tpu-v4")
    msg = str(e.value)
    assert "'tpu-v4'" in msg
    for choice in ("cpu", "dgx-a100", "dgx-h100"):
        assert choice in msg


@pytest.mark.parametrize("hosts,dph", [(0, 8), (2, -1)])
def test_preset_bad_counts(hosts, dph):
    with pytest.raises(MeshError, match="≥ 1"):
        ClusterSpec.preset("dgx-h100", num_hosts=hosts, devices_per_host=dph)


# ---- links per axis ----------------------------------------------------------------------

H100 = ClusterSpec.preset("dgx-h100", num_hosts=2)
IN, ACROSS = H100.intra_host, H100.inter_host

LINK_TABLE = [
    # Devices are numbered host-major with 8 per host: an axis stays in a host when its size
    # times the sizes of the axes after it is at most 8.
    ((2, 8), ("host", "device"), [ACROSS, IN]),  # 2·8 = 16 > 8; 8 ≤ 8
    ((16,), ("x",), [ACROSS]),  # 16 > 8
    ((2, 2, 4), ("a", "b", "c"), [ACROSS, IN, IN]),  # 2·2·4 = 16 > 8; 2·4 = 8; 4
    ((1, 8), ("host", "device"), [IN, IN]),  # one host
    ((4, 2), ("a", "b"), [IN, IN]),  # 4·2 = 8
]


@pytest.mark.parametrize("shape,names,links", LINK_TABLE)
def test_link_per_axis(shape, names, links):
    c = H100.with_mesh(shape, names)
    assert [c.link(a) for a in names] == links


def test_multi_axis_collective_uses_slowest_link():
    assert H100.beta(("host", "device")) == ACROSS.beta == 50 * GB
    assert H100.alpha(("host", "device")) == ACROSS.alpha == 10e-6
    assert H100.beta(("device",)) == IN.beta == 450 * GB
    assert H100.alpha(()) == 0.0
    assert H100.group_size(("host", "device")) == 2 * 8
    assert H100.group_size(()) == 1


def test_scaled_changes_only_the_bandwidths_given():
    c = H100.scaled(inter_beta=1 * GB)
    assert c.inter_host == Link(ACROSS.alpha, 1 * GB)
    assert c.intra_host == IN
    assert H100.inter_host.beta == 50 * GB  # the original is untouched


# ---- mesh views --------------------------------------------------------------------------

def test_with_mesh_keeps_hardware():
    c = H100.with_mesh((4, 4), ("x", "y"))
    assert c.mesh_shape == (4, 4) and c.axis_names == ("x", "y")
    assert c.device == H100.device and c.devices_per_host == 8


@pytest.mark.parametrize("shape,names,fragment", [
    ((2, 4), ("x",), "differ in length"),
    ((2, 4), ("x", "x"), "repeat"),
    ((0, 8), ("x", "y"), "below 1"),
])
def test_with_mesh_errors(shape, names, fragment):
    with pytest.raises(MeshError, match=fragment) as e:
        H100.with_mesh(shape, names)
    assert isinstance(e.value, PlanningError)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_from_cpu_mesh(axis_type):
    mesh = make_mesh((2, 4), axis_type)
    c = ClusterSpec.from_mesh(mesh)
    assert c.name == "cpu"
    assert not c.has_reduce_scatter
    assert c.mesh_shape == (2, 4) and c.axis_names == ("x", "y")
    assert c.devices_per_host == 2 * 4  # one process holds every device
    assert c.device == ClusterSpec.preset("cpu").device


def test_from_mesh_preset_override():
    c = ClusterSpec.from_mesh(make_mesh((8,)), preset="dgx-h100")
    assert c.has_reduce_scatter and c.device.peak_flops == 989e12
    assert c.mesh_shape == (8,)


def test_from_abstract_mesh():
    """An AbstractMesh has no devices (its ``devices`` property raises): the cpu figures."""
    c = ClusterSpec.from_mesh(jax.sharding.AbstractMesh((2, 4), ("x", "y")))
    assert c.name == "cpu" and c.mesh_shape == (2, 4) and c.devices_per_host == 8


# ---- JSON --------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [
    H100,
    ClusterSpec.preset("dgx-a100").with_mesh((2, 2, 2), ("a", "b", "c")),
    ClusterSpec.preset("cpu").with_mesh((8,), ("x",)).scaled(inter_beta=3 * GB),
    ClusterSpec((4,), ("x",), DeviceModel("toy", 1e12, 1e11, 2**20, 0.5), Link(1e-6, 1e9),
                Link(2e-6, 5e8), 2, False, "toy"),
])
def test_json_round_trip(cluster):
    text = cluster.to_json()
    back = ClusterSpec.from_json(text)
    assert back == cluster
    assert json.loads(back.to_json()) == json.loads(text)


def test_json_missing_field_is_mesh_error():
    d = H100.to_dict()
    del d["intra_host"]
    with pytest.raises(MeshError, match="intra_host"):
        ClusterSpec.from_dict(d)


def test_json_corrupt_is_mesh_error():
    with pytest.raises(MeshError, match="not valid JSON"):
        ClusterSpec.from_json("{mesh_shape: [2")


# ---- mesh strings ------------------------------------------------------------------------

@pytest.mark.parametrize("text,shape", [
    ("2x4", (2, 4)), ("8", (8,)), ("2X2x2", (2, 2, 2)), ("2×4", (2, 4)), ("1x8", (1, 8)),
])
def test_parse_mesh(text, shape):
    assert parse_mesh(text) == shape


@pytest.mark.parametrize("text", ["2x", "axb", "0x4", "2x-1", "", "2*4", "2 x 4 x"])
def test_parse_mesh_bad_strings_name_the_string(text):
    with pytest.raises(MeshError) as e:
        parse_mesh(text)
    assert repr(text) in str(e.value)
