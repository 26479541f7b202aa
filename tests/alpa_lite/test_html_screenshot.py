"""The plan's HTML view rendered by headless Chromium: the page is drawn, the mesh in its colours.

``.ci/run`` installs Debian's ``chromium``; the test skips (saying why) only where it is absent.
The screenshot is read with the standard library (``zlib``, ``struct``): no imaging package.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

import alpa_lite as al
from alpa_lite.report.html import COST_COLOURS, STAGE_COLOURS
from alpa_lite.report.rows import tensor_rows
from alpa_lite.result.plan import StageInfo
from examples.mlp import make_example
from tests.helpers import make_mesh

pytestmark = pytest.mark.slow
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """8-bit RGB or RGBA PNG → (width, height, rows of RGB bytes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), prev, bpp)
        rows.append(bytes(row) if bpp == 3 else bytes(b for i, b in enumerate(row) if i % 4 != 3))
        prev = row
    return width, height, rows


def _unfilter(kind: int, row: bytearray, prev: bytearray, bpp: int) -> bytearray:
    """Undo one scanline's PNG filter (None, Sub, Up, Average, Paeth)."""
    n = len(row)
    if kind == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 255
    elif kind == 2:
        for i in range(n):
            row[i] = (row[i] + prev[i]) & 255
    elif kind == 3:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prev[i]) >> 1)) & 255
    elif kind == 4:
        for i in range(n):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    else:
        assert kind == 0, f"bad PNG filter {kind}"
    return row


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _near(counts: Counter, colour: tuple[int, int, int], tol: int = 3) -> int:
    """Pixels within ``tol`` of ``colour`` per channel (colour management may shift a step)."""
    return sum(k for c, k in counts.items() if all(abs(a - b) <= tol for a, b in zip(c, colour)))


@pytest.fixture(scope="module")
def shot(tmp_path_factory):
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium here (.ci/run installs Debian's 'chromium')")
    fn, args = make_example(batch=16, hidden=128, layers=2, dim=32, optimizer="sgd")
    plan = al.plan(fn, *args, mesh=make_mesh((2, 4)))
    s = plan.stages[0]  # drawn as a 2-stage pipeline: each row of the mesh a stage
    plan = replace(plan, stages=(StageInfo((0, 0), (1, 4), (0, 1, 2, 3), s.cost_s / 2, s.memory_bytes),
                                 StageInfo((1, 1), (1, 4), (4, 5, 6, 7), s.cost_s / 2, s.memory_bytes)))
    d = tmp_path_factory.mktemp("shot")
    html = plan._repr_html_()
    (d / "plan.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{html}</body></html>")
    cmd = [shutil.which(browser), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--screenshot={d / 'out.png'}", "--window-size=1200,1600", (d / "plan.html").as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=d)
    assert (d / "out.png").exists(), r.stderr[-2000:]
    width, height, rows = read_png(d / "out.png")
    counts = Counter(bytes(row[i:i + 3]) for row in rows for i in range(0, len(row), 3))
    return plan, html, (width, height), Counter({tuple(c): k for c, k in counts.items()})


def test_html_has_the_table_rows_and_the_mesh(shot):
    plan, html, _, _ = shot
    assert "<svg class='alpa-lite-mesh'" in html
    assert html.count("class='alpa-lite-in-row'") == len(plan.input_specs)
    for r in tensor_rows(plan, "in"):
        assert r.name.replace("'", "&#x27;") in html


def test_screenshot_is_a_drawn_page(shot):
    _, _, size, counts = shot
    assert size == (1200, 1600)
    total = sum(counts.values())
    white = counts.get((255, 255, 255), 0)
    assert total - white > 0.02 * total, "the page is (nearly) blank"
    assert len(counts) > 50, "too few colours for text, tables and drawings"


def test_screenshot_shows_each_stage_colour_and_the_cost_bars(shot):
    _, _, _, counts = shot
    # Each stage holds 4 devices of 52×52 px (less rounded corners and the white device numbers).
    for stage, colour in enumerate(STAGE_COLOURS[:2]):
        assert _near(counts, _rgb(colour)) > 4 * 40 * 40, f"stage {stage} colour {colour} missing"
    assert _near(counts, _rgb(STAGE_COLOURS[2])) < 200  # a third stage colour is not drawn
    assert _near(counts, _rgb(COST_COLOURS["compute"])) > 200
