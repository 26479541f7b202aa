"""Per-device numbers of a compiled XLA program: the collectives it runs, FLOPs and memory.

``jax.jit(f).lower(*args).compile()`` gives a ``Compiled`` whose ``as_text()`` is the
partitioned HLO module, one device's view: every collective instruction is printed with its
per-device result shape and its replica groups. This module reads that text (no jax import is
needed for :func:`parse_collectives`) and prices each collective in *wire bytes*, the bytes one
device sends (design.md, "Measuring a plan on this machine"); with ``n`` devices in the replica
group and ``b`` the per-device result buffer:

===================  ===============
all-reduce           ``2(n-1)/n * b``
all-gather           ``(n-1)/n * b``
reduce-scatter       ``(n-1) * b``
all-to-all           ``(n-1)/n * b``
collective-permute   ``b``
===================  ===============

Replica groups are read in the three forms XLA prints:

* mesh form ``replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0))
  {'axis_0'}`` (``device_ids`` optional; the group size is the product of the sizes of the axes in
  the trailing braces, a sub-axis ``'axis_0':(2)2`` counting with its own size, the number after
  the parentheses);
* iota form ``replica_groups=[2,4]<=[8]`` or ``[2,4]<=[4,2]T(1,0)`` (group size: last dim);
* explicit ``replica_groups={{0,1,2,3},{4,5,6,7}}`` (size of the first group); an empty ``{}``
  means every device (``num_partitions`` of the module header).

Async pairs (``all-reduce-start``/``-done`` etc.) count once, at the start, with the result the
``-done`` produces. Only computations the entry reaches are read, reducers (``to_apply=``)
excepted. Each collective instruction counts once, even inside a ``while`` body that runs many
times; :func:`compiled_stats` then says so in ``warnings`` (with the loop's trip count).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COLLECTIVE_KINDS",
    "CompiledCollective",
    "CompiledStats",
    "compiled_stats",
    "extract_warnings",
    "parse_collectives",
    "shape_nbytes",
    "stats_of",
    "wire_bytes",
]

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

# Bits per element of each HLO primitive type.
_DTYPE_BITS = {
    "pred": 8,
    "s1": 1, "u1": 1, "s2": 2, "u2": 2, "s4": 4, "u4": 4,
    "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
    "f4e2m1fn": 4, "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8,
    "f8e5m2": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8,
    "token": 0, "opaque": 0,
}  # fmt: skip


def wire_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes one device sends for a collective of ``kind`` (design.md's formulas)."""
    n = group_size
    if kind == "collective-permute":
        return float(nbytes)
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * nbytes
    if kind in ("all-gather", "all-to-all"):
        return (n - 1) / n * nbytes
    if kind == "reduce-scatter":
        return float((n - 1) * nbytes)
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {COLLECTIVE_KINDS}")


@dataclass(frozen=True)
class CompiledCollective:
    """One collective instruction of a compiled program, per device."""

    kind: str  # one of COLLECTIVE_KINDS
    nbytes: int  # per-device result buffer bytes (tuple results: sum of the elements)
    group_size: int  # devices in each replica group
    shape: str  # result shape text without layouts, e.g. "f32[32,64]"
    op_name: str = ""  # metadata op_name (which jax op it came from), "" if absent

    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.nbytes, self.group_size)


@dataclass(frozen=True)
class CompiledStats:
    """Collectives, FLOPs and memory of one compiled program, all per device."""

    collectives: tuple[CompiledCollective, ...]
    flops: float
    memory_bytes: int  # argument + output - alias + temp
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    warnings: tuple[str, ...] = ()

    @property
    def wire_bytes(self) -> float:
        return float(sum(c.wire_bytes() for c in self.collectives))

    def by_kind(self) -> dict[str, tuple[int, float]]:
        """``{kind: (count, wire bytes)}`` for the kinds present, in first-seen order."""
        out: dict[str, tuple[int, float]] = {}
        for c in self.collectives:
            count, wb = out.get(c.kind, (0, 0.0))
            out[c.kind] = (count + 1, wb + c.wire_bytes())
        return out

    def summary(self) -> str:
        parts = [f"{k} x{n} ({wb:.0f} B)" for k, (n, wb) in self.by_kind().items()]
        return (
            f"flops/device={self.flops:.4g} memory/device={self.memory_bytes} B "
            f"wire/device={self.wire_bytes:.0f} B [{', '.join(parts) or 'no collectives'}]"
        )


# ---------------------------------------------------------------------------------------------
# Shapes


_COMMENT_RE = re.compile(r"/\*.*?\*/")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def _strip_shape(text: str) -> str:
    """Drop ``/*index=5*/`` comments and ``{1,0}`` layouts from a shape."""
    text = _COMMENT_RE.sub("", text)
    out, depth = [], 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return re.sub(r"\s+", " ", "".join(out)).strip()


def shape_nbytes(shape: str) -> int:
    """Bytes of an HLO shape; tuples sum their elements. ``f32[32,64]`` -> 8192."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(_strip_shape(shape)):
        if dtype not in _DTYPE_BITS:
            raise ValueError(f"unknown HLO element type {dtype!r} in shape {shape!r}")
        elems = 1
        for d in dims.split(","):
            d = d.strip().lstrip("<=")  # dynamic dims print as <=N: count the bound
            if d:
                elems *= int(d)
        total += math.ceil(elems * _DTYPE_BITS[dtype] / 8)
    return total


def _split_top(text: str) -> list[str]:
    """Split a tuple shape ``(a, (b, c), d)`` into its top-level elements."""
    text = text.strip()
    if not text.startswith("("):
        return [text]
    inner = text[1 : _matching(text, 0)]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    if inner[start:].strip():
        parts.append(inner[start:].strip())
    return parts


def _matching(text: str, i: int) -> int:
    """Index of the bracket closing the one at ``text[i]``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for j in range(i, len(text)):
        ch = text[j]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return j
    raise ValueError(f"unbalanced brackets in {text!r}")


# ---------------------------------------------------------------------------------------------
# Instructions and computations


_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OPCODE_RE = re.compile(r"\s*(?P<op>[\w\-]+)\((?P<tail>.*)$")
_COMP_HEADER_RE = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME_RE = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_NUM_PARTITIONS_RE = re.compile(r"\bnum_partitions=(\d+)")
_REF_RE = re.compile(r"\b([a-z_]+)=\{?\s*(%[\w.\-]+(?:\s*,\s*%[\w.\-]+)*)\s*\}?")
_OPERAND_RE = re.compile(r"%([\w.\-]+)")


@dataclass
class _Instr:
    name: str
    shape: str
    op: str
    tail: str  # operands and attributes, after "op("


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    rest = m.group("rest").lstrip()
    if not rest:
        return None
    if rest.startswith("("):
        try:
            end = _matching(rest, 0)
        except ValueError:
            return None
        shape, after = rest[: end + 1], rest[end + 1 :]
    else:
        sp = re.match(r"(\S+)(.*)$", rest)
        if not sp:
            return None
        shape, after = sp.group(1), sp.group(2)
    om = _OPCODE_RE.match(after)
    if not om:
        return None
    return _Instr(m.group("name"), shape, om.group("op"), om.group("tail"))


def _split_computations(lines: list[str]) -> tuple[dict[str, list[str]], str | None]:
    """``{computation name: its lines}`` and the entry's name (None if no headers at all)."""
    comps: dict[str, list[str]] = {}
    entry = None
    current: str | None = None
    for line in lines:
        if current is None:
            h = _COMP_HEADER_RE.match(line)
            if h and not line[:1].isspace():
                current = h.group("name")
                comps[current] = []
                if h.group("entry"):
                    entry = current
            continue
        if line.strip() == "}" and not line[:1].isspace():
            current = None
            continue
        comps[current].append(line)
    return comps, entry


_TRIP_COUNT_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _reachable_lines(hlo_text: str) -> list[tuple[str, str | None]]:
    """``(line, loop)`` for each line of the computations the entry runs.

    Reducers passed as ``to_apply`` are not followed. ``loop`` is None outside loops, else a
    description of the innermost ``while`` whose body (directly or through calls) holds the line.
    """
    lines = hlo_text.splitlines()
    comps, entry = _split_computations(lines)
    if entry is None:  # a bare list of instructions, e.g. one line
        return [(line, None) for line in lines]
    loop_of: dict[str, str | None] = {entry: None}
    stack, out = [entry], []
    while stack:
        name = stack.pop()
        for line in comps[name]:
            out.append((line, loop_of[name]))
            refs = [(k, r) for k, rs in _REF_RE.findall(line) for r in _OPERAND_RE.findall(rs)]
            is_while = re.search(r"\swhile\(", line) is not None
            for key, ref in refs:
                if key == "to_apply" or ref not in comps or ref in loop_of:
                    continue
                loop = loop_of[name]
                if is_while and key in ("body", "condition"):
                    trip = _TRIP_COUNT_RE.search(line)
                    instr = _INSTR_RE.match(line)
                    loop = (
                        f"while {instr.group('name') if instr else '?'} "
                        f"(trip count {trip.group(1) if trip else 'unknown'})"
                    )
                loop_of[ref] = loop
                stack.append(ref)
    return out


# ---------------------------------------------------------------------------------------------
# Replica groups


def _group_size(tail: str, num_devices: int) -> int:
    """Devices per replica group from an instruction's attribute text."""
    i = tail.find("replica_groups=")
    if i < 0:
        j = tail.find("source_target_pairs=")
        if j >= 0:  # collective-permute: the devices taking part
            k = j + len("source_target_pairs=")
            ids = {int(x) for x in re.findall(r"\d+", tail[k : _matching(tail, k) + 1])}
            return max(len(ids), 1)
        return num_devices
    s = tail[i + len("replica_groups=") :]
    if s.startswith("mesh["):
        return _mesh_group_size(s)
    iota = re.match(r"\[([\d,\s]+)\]<=\[[\d,\s]+\]", s)
    if iota:
        return int(iota.group(1).split(",")[-1])
    if s.startswith("{"):
        body = s[1 : _matching(s, 0)].strip()
        if not body:
            return num_devices
        first = re.match(r"\{([^}]*)\}", body)
        if first is None:
            raise ValueError(f"cannot read replica groups {s[:80]!r}")
        return max(len([x for x in first.group(1).split(",") if x.strip()]), 1)
    raise ValueError(f"unknown replica_groups form {s[:80]!r}")


def _mesh_group_size(s: str) -> int:
    """``mesh['a'=4,'b'=2], device_ids=(...) {'a'}`` -> 4 (product of the listed axes)."""
    end = _matching(s, 4)
    sizes = {k: int(v) for k, v in re.findall(r"'([^']*)'\s*=\s*(\d+)", s[5:end])}
    j = end + 1
    rest = s[j:]
    dev = re.match(r"\s*,\s*device_ids=", rest)
    if dev:
        k = j + dev.end()
        j = _matching(s, k) + 1 if s[k] in "([{" else k
    brace = re.match(r"\s*\{", s[j:])
    if brace is None:  # no axis list printed: every axis of the mesh
        return math.prod(sizes.values()) if sizes else 1
    b0 = j + brace.end() - 1
    axes_text = s[b0 + 1 : _matching(s, b0)]
    size = 1
    for axis, sub in re.findall(r"'([^']*)'(?:\s*:\s*\(\d+\)(\d+))?", axes_text):
        if sub:
            size *= int(sub)
        elif axis in sizes:
            size *= sizes[axis]
        else:
            raise ValueError(f"axis {axis!r} not in mesh {sizes} of {s[:120]!r}")
    return size


# ---------------------------------------------------------------------------------------------
# Collectives


def _kind_of(op: str) -> tuple[str, str] | None:
    """``'all-gather-start'`` -> ``('all-gather', 'start')``; None for non-collectives."""
    for suffix in ("-start", "-done", ""):
        if suffix and not op.endswith(suffix):
            continue
        base = op[: len(op) - len(suffix)] if suffix else op
        if base == "ragged-all-to-all":
            base = "all-to-all"
        if base in COLLECTIVE_KINDS:
            return base, suffix.lstrip("-")
    return None


def _start_result(kind: str, shape: str) -> str:
    """The part of an async start's result shape that is the collective's real result."""
    if kind in ("all-gather", "collective-permute"):
        # all-gather-start: (operand(s), output(s)); collective-permute-start:
        # (operand, output, u32[] contexts...). The output is the second element.
        parts = _split_top(_COMMENT_RE.sub("", shape))
        if len(parts) >= 2:
            return parts[1]
    return shape


def _parse(
    hlo_text: str, num_devices: int | None
) -> tuple[tuple[CompiledCollective, ...], tuple[str, ...]]:
    m = _NUM_PARTITIONS_RE.search(hlo_text)
    n_all = int(m.group(1)) if m else (num_devices if num_devices is not None else 1)
    pending: list[tuple[str, _Instr, str, str | None]] = []  # (kind, instr, result, loop)
    done_shape: dict[str, str] = {}  # start name -> shape its -done returns
    for line, loop in _reachable_lines(hlo_text):
        if "(" not in line or "=" not in line:
            continue
        instr = _parse_instr(line)
        if instr is None:
            continue
        kk = _kind_of(instr.op)
        if kk is None:
            continue
        kind, phase = kk
        if phase == "done":
            ops = _OPERAND_RE.findall(instr.tail.split(")", 1)[0])
            if ops:
                done_shape[ops[0]] = instr.shape
            continue
        shape = _start_result(kind, instr.shape) if phase == "start" else instr.shape
        pending.append((kind, instr, shape, loop))
    out, notes = [], []
    for kind, instr, shape, loop in pending:
        shape = done_shape.get(instr.name, shape)
        op_name = _OP_NAME_RE.search(instr.tail)
        out.append(
            CompiledCollective(
                kind=kind,
                nbytes=shape_nbytes(shape),
                group_size=_group_size(instr.tail, n_all),
                shape=_strip_shape(_COMMENT_RE.sub("", shape)),
                op_name=op_name.group(1) if op_name else "",
            )
        )
        if loop is not None:
            notes.append(f"{kind} %{instr.name} runs inside {loop}; counted once")
    return tuple(out), tuple(notes)


def parse_collectives(
    hlo_text: str, num_devices: int | None = None
) -> tuple[CompiledCollective, ...]:
    """The collectives a compiled HLO module executes, per device: the entry's first, then
    those of the computations it calls (loop bodies, conditionals, async wrappers).

    Each instruction counts once, also one inside a ``while`` body that runs many times
    (:func:`compiled_stats` then adds a warning). ``num_devices`` sizes
    ``replica_groups={}`` (all devices) when the text has no ``num_partitions=`` header;
    it defaults to 1.
    """
    return _parse(hlo_text, num_devices)[0]


# ---------------------------------------------------------------------------------------------
# Compiled programs


_WARNING_LINE_RE = re.compile(r"^[WE]\d{4}\s")


def extract_warnings(log_text: str) -> tuple[str, ...]:
    """XLA warning/error lines of a captured log (e.g. "Involuntary full rematerialization")."""
    out = []
    for line in log_text.splitlines():
        s = line.strip()
        if s and (_WARNING_LINE_RE.match(s) or "involuntary full rematerialization" in s.lower()):
            out.append(s)
    return tuple(out)


def _cost_flops(compiled: Any) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def compiled_stats(compiled: Any, warnings: Iterable[str] = ()) -> CompiledStats:
    """Stats of a jax ``Compiled`` (``jax.jit(f).lower(*args).compile()``)."""
    warns = list(warnings)
    collectives, loop_notes = _parse(compiled.as_text(), None)
    warns.extend(loop_notes)
    flops = _cost_flops(compiled)
    if flops is None:
        warns.append("cost_analysis() gave no 'flops'; flops reported as 0")
        flops = 0.0
    mem = compiled.memory_analysis()
    if mem is None:
        warns.append("memory_analysis() unavailable; memory reported as 0")
        arg = out = alias = temp = 0
    else:
        arg = int(mem.argument_size_in_bytes)
        out = int(mem.output_size_in_bytes)
        alias = int(mem.alias_size_in_bytes)
        temp = int(mem.temp_size_in_bytes)
    return CompiledStats(
        collectives=collectives,
        flops=flops,
        memory_bytes=arg + out - alias + temp,
        argument_bytes=arg,
        output_bytes=out,
        alias_bytes=alias,
        temp_bytes=temp,
        warnings=tuple(warns),
    )


@contextlib.contextmanager
def _capture_fd2() -> Iterator[list[str]]:
    """Capture what C++ (XLA) writes to file descriptor 2; it is echoed back afterwards."""
    box: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2: capture nothing
        yield box
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                with contextlib.suppress(OSError):
                    os.write(2, data)
            box.append(data.decode("utf-8", "replace"))


def stats_of(jitted_fn: Any, *args: Any, **kwargs: Any) -> CompiledStats:
    """Lower and compile ``jitted_fn`` for ``args`` and return its :class:`CompiledStats`.

    XLA's stderr during compilation is captured and its warning lines (e.g. the SPMD
    partitioner's "Involuntary full rematerialization") become ``warnings``. A function
    compiled before in this process may come from jax's cache and log nothing.
    """
    with _capture_fd2() as log:
        compiled = jitted_fn.lower(*args, **kwargs).compile()
    return compiled_stats(compiled, extract_warnings("".join(log)))
