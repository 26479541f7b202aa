"""Random JAX programs for fuzzing the planner, as plain data that prints as Python source.

A ``Program`` is a list of ``Node``s in order (a DAG: operands are earlier nodes) and the nodes
it returns. Inputs are nodes too; a dot or a concatenate may bring a new input (its weight, the
piece it joins). ``Program.fn`` runs it with ``jax.numpy``; ``Program.source`` prints the same
function as Python, which is what a failing case reports and what a regression test pastes.

The hypothesis strategy ``programs()`` draws chains and DAGs of dot (einsum with batch dims),
element-wise unary/binary ops (with a bias-like broadcast operand), reductions (mean, max),
reshape, transpose, broadcast and concatenate, with dimension sizes from ``SIZES`` (some
divisible by the mesh axes, some not). ``cases()`` adds an 8-device mesh of either axis type, a
cost regime, and inputs committed to a sharding; on Auto meshes programs may force splits with
``with_sharding_constraint``.
Values stay near 1 (dots and sums are means, element-wise ops are bounded or mild), so f32
results compare with a tolerance of 1e-4 after a second step fed the first step's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite.ir.specs import enumerate_specs

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MESHES = ((8,), (2, 4), (4, 2), (2, 2, 2))
AXIS_TYPES = ("explicit", "auto")
MAX_ELEMENTS = 4096  # per tensor: keeps compiling and running each case well under a second
LETTERS = "abcdefgh"

UNARY = {  # name -> (source template, function)
    "tanh": ("jnp.tanh({0})", jnp.tanh),
    "sin": ("jnp.sin({0})", jnp.sin),
    "neg": ("-{0}", lambda x: -x),
    "abs": ("jnp.abs({0})", jnp.abs),
    "relu": ("jnp.maximum({0}, 0.0)", lambda x: jnp.maximum(x, 0.0)),
    "half": ("{0} * 0.5", lambda x: x * 0.5),
}
BINARY = {
    "add": ("{0} + {1}", lambda a, b: a + b),
    "sub": ("{0} - {1}", lambda a, b: a - b),
    "mul": ("{0} * {1}", lambda a, b: a * b),
    "max": ("jnp.maximum({0}, {1})", jnp.maximum),
}


@dataclass(frozen=True)
class Node:
    """One value of the program: ``op`` applied to earlier nodes ``args`` with ``params``."""

    op: str  # input, unary, binary, dot, reduce, reshape, transpose, broadcast, concat, constrain
    args: tuple[int, ...]
    params: tuple
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]

    @property
    def inputs(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.op == "input"]

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [self.nodes[i].shape for i in self.inputs]

    def example_args(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s).astype(np.float32) for s in self.input_shapes]

    def function(self, mesh: Mesh | None = None) -> Callable[..., tuple]:
        """The program as a JAX function (``mesh``: what its sharding constraints name)."""

        def program(*args):
            env = dict(zip(self.inputs, args, strict=True))
            for i, n in enumerate(self.nodes):
                if n.op != "input":
                    env[i] = _apply(n, [env[a] for a in n.args], mesh)
            return tuple(env[o] for o in self.outputs)

        return program

    def source(self, name: str = "program") -> str:
        """The program as Python (``jnp``, and for constraints ``mesh``, ``NamedSharding``, ``P``)."""
        names = {i: f"v{i}" for i in range(len(self.nodes))}
        lines = [f"def {name}({', '.join(names[i] for i in self.inputs)}):"]
        shapes = ", ".join(f"{names[i]}: {list(self.nodes[i].shape)}" for i in self.inputs)
        lines.append(f"    # inputs {shapes}")
        for i, n in enumerate(self.nodes):
            if n.op != "input":
                lines.append(f"    {names[i]} = {_source(n, [names[a] for a in n.args])}"
                             f"  # {list(n.shape)}")
        outs = ", ".join(names[o] for o in self.outputs)
        lines.append(f"    return ({outs},)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.source()


# ---- running and printing one node ---------------------------------------------------------

def _apply(n: Node, xs: Sequence, mesh: Mesh | None) -> object:
    p = n.params
    if n.op == "constrain":
        return jax.lax.with_sharding_constraint(xs[0], NamedSharding(mesh, PartitionSpec(*p[0])))
    if n.op == "unary":
        return UNARY[p[0]][1](xs[0])
    if n.op == "binary":
        return BINARY[p[0]][1](xs[0], xs[1])
    if n.op == "dot":
        return jnp.einsum(p[0], xs[0], xs[1]) * p[1]
    if n.op == "reduce":
        return (jnp.mean if p[0] == "mean" else jnp.max)(xs[0], axis=p[1])
    if n.op == "reshape":
        return jnp.reshape(xs[0], n.shape)
    if n.op == "transpose":
        return jnp.transpose(xs[0], p[0])
    if n.op == "broadcast":
        return jnp.broadcast_to(jnp.expand_dims(xs[0], p[0]), n.shape)
    if n.op == "concat":
        return jnp.concatenate(list(xs), axis=p[0])
    raise ValueError(n.op)


def _source(n: Node, xs: Sequence[str]) -> str:
    p = n.params
    if n.op == "constrain":
        return f"jax.lax.with_sharding_constraint({xs[0]}, NamedSharding(mesh, P{tuple(p[0])!r}))"
    if n.op == "unary":
        return UNARY[p[0]][0].format(*xs)
    if n.op == "binary":
        return BINARY[p[0]][0].format(*xs)
    if n.op == "dot":
        return f"jnp.einsum({p[0]!r}, {xs[0]}, {xs[1]}) * {p[1]!r}"
    if n.op == "reduce":
        return f"jnp.{p[0]}({xs[0]}, axis={p[1]})"
    if n.op == "reshape":
        return f"jnp.reshape({xs[0]}, {n.shape})"
    if n.op == "transpose":
        return f"jnp.transpose({xs[0]}, {p[0]})"
    if n.op == "broadcast":
        return f"jnp.broadcast_to(jnp.expand_dims({xs[0]}, {p[0]}), {n.shape})"
    if n.op == "concat":
        return f"jnp.concatenate([{', '.join(xs)}], axis={p[0]})"
    raise ValueError(n.op)


# ---- the strategy ------------------------------------------------------------------------

sizes = st.sampled_from(SIZES)


def shapes(min_rank: int = 1, max_rank: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(sizes, min_size=min_rank, max_size=max_rank).map(tuple).filter(_small)


def _small(shape: Sequence[int]) -> bool:
    return math.prod(shape) <= MAX_ELEMENTS


class _Builder:
    def __init__(self, draw: Callable, mesh_sizes: dict[str, int] | None) -> None:
        self.draw = draw
        self.nodes: list[Node] = []
        self.mesh_sizes = mesh_sizes  # given: constraints may name these axes

    def add(self, op: str, args: Sequence[int], params: tuple, shape: Sequence[int]) -> int:
        self.nodes.append(Node(op, tuple(args), params, tuple(int(d) for d in shape)))
        return len(self.nodes) - 1

    def new_input(self, shape: Sequence[int]) -> int:
        return self.add("input", (), (), shape)

    def pick(self) -> int:
        """An operand: recent values more often (chains), older ones sometimes (DAGs)."""
        n = len(self.nodes)
        back = self.draw(st.integers(0, n - 1))
        return n - 1 - (back if self.draw(st.booleans()) else min(back, 1))

    def same_shape(self, shape: tuple[int, ...], exclude: int) -> int | None:
        cands = [i for i, n in enumerate(self.nodes) if n.shape == shape and i != exclude]
        return self.draw(st.sampled_from(cands)) if cands else None


def _unary(b: _Builder, x: int) -> int | None:
    return b.add("unary", (x,), (b.draw(st.sampled_from(sorted(UNARY))),), b.nodes[x].shape)


def _binary(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    kind = b.draw(st.sampled_from(("same", "same", "bias")))
    if kind == "bias" and shape:  # a bias-like operand broadcast over the leading dims
        y = b.new_input(shape[-1:])
    else:
        y = b.same_shape(shape, x)
        if y is None or b.draw(st.booleans()):
            y = b.new_input(shape) if b.draw(st.booleans()) else x
    name = b.draw(st.sampled_from(sorted(BINARY)))
    a, c = (x, y) if b.draw(st.booleans()) else (y, x)
    if b.nodes[a].shape != shape:
        a, c = c, a  # the full-shape operand first (jnp broadcasts the bias either way)
    return b.add("binary", (a, c), (name,), shape)


def _dot(b: _Builder, x: int) -> int | None:
    """einsum: contract one dim of x with a weight, keeping some leading dims as batch dims."""
    shape = b.nodes[x].shape
    r = len(shape)
    if r == 0:
        return None
    k = b.draw(st.integers(0, r - 1))
    nbatch = b.draw(st.integers(0, min(k, 1)))  # batch dims: a leading dim kept in both operands
    n = b.draw(sizes)
    lhs = LETTERS[:r]
    batch = lhs[:nbatch]
    rhs = batch + lhs[k] + "z"
    rhs_shape = tuple(shape[:nbatch]) + (shape[k], n)
    if b.draw(st.booleans()):  # a weight on the other side: z leads the output
        out = batch + "z" + "".join(c for i, c in enumerate(lhs) if i != k and c not in batch)
        eq = f"{rhs},{lhs}->{out}"
    else:
        out = "".join(c for i, c in enumerate(lhs) if i != k) + "z"
        eq = f"{lhs},{rhs}->{out}"
    dims = dict(zip(lhs, shape)) | {"z": n}
    out_shape = tuple(dims[c] for c in out)
    if not _small(out_shape) or not _small(rhs_shape):
        return None
    w = b.same_shape(rhs_shape, x)
    if w is None or b.draw(st.booleans()):
        w = b.new_input(rhs_shape)
    args = (w, x) if eq.startswith(rhs + ",") else (x, w)
    return b.add("dot", args, (eq, 1.0 / shape[k]), out_shape)


def _reduce(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    if not shape:
        return None
    axes = b.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True))
    axes = tuple(sorted(axes))
    out = tuple(d for i, d in enumerate(shape) if i not in axes)
    return b.add("reduce", (x,), (b.draw(st.sampled_from(("mean", "max"))), axes), out)


def _factorings(n: int) -> list[tuple[int, int]]:
    return [(a, n // a) for a in range(2, n) if n % a == 0]


def _reshape(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    how = b.draw(st.sampled_from(("merge", "split", "flatten")))
    if how == "merge" and len(shape) >= 2:
        i = b.draw(st.integers(0, len(shape) - 2))
        new = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
    elif how == "split" and shape and len(shape) < 4:
        i = b.draw(st.integers(0, len(shape) - 1))
        fs = _factorings(shape[i])
        if not fs:
            return None
        new = shape[:i] + b.draw(st.sampled_from(fs)) + shape[i + 1:]
    elif how == "flatten" and len(shape) >= 2:
        total = math.prod(shape)
        fs = _factorings(total)
        new = b.draw(st.sampled_from(fs)) if fs and b.draw(st.booleans()) else (total,)
    else:
        return None
    if new == shape:
        return None  # jnp returns x itself: no op
    return b.add("reshape", (x,), (), new)


def _transpose(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    if len(shape) < 2:
        return None
    perm = tuple(b.draw(st.permutations(range(len(shape)))))
    if perm == tuple(range(len(shape))):
        return None  # jnp returns x itself: no op
    return b.add("transpose", (x,), (perm,), tuple(shape[p] for p in perm))


def _broadcast(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    if len(shape) >= 3:
        return None
    pos = b.draw(st.integers(0, len(shape)))
    new = shape[:pos] + (b.draw(sizes),) + shape[pos:]
    if not _small(new):
        return None
    return b.add("broadcast", (x,), (pos,), new)


def _concat(b: _Builder, x: int) -> int | None:
    shape = b.nodes[x].shape
    if not shape:
        return None
    axis = b.draw(st.integers(0, len(shape) - 1))
    cands = [i for i, n in enumerate(b.nodes) if len(n.shape) == len(shape)
             and all(a == c for d, (a, c) in enumerate(zip(n.shape, shape)) if d != axis)]
    y = b.draw(st.sampled_from(cands))
    if y == x and b.draw(st.booleans()):
        y = b.new_input(shape[:axis] + (b.draw(sizes),) + shape[axis + 1:])
    new = shape[:axis] + (shape[axis] + b.nodes[y].shape[axis],) + shape[axis + 1:]
    if not _small(new):
        return None
    args = (x, y) if b.draw(st.booleans()) else (y, x)
    return b.add("concat", args, (axis,), new)


def even_spec(b: _Builder, shape: Sequence[int], sizes: dict[str, int]) -> tuple | None:
    """A random split of ``shape`` that divides evenly, as PartitionSpec entries (None: none)."""
    specs = [sp for sp in enumerate_specs(shape, sizes) if sp.axes_used()]
    if not specs:
        return None
    spec = b.draw(st.sampled_from(specs))
    return tuple(None if not a else a[0] if len(a) == 1 else a for a in spec.dims)


def _constrain(b: _Builder, x: int) -> int | None:
    """A user-forced split (``with_sharding_constraint``, Auto meshes: on Explicit ones it only
    asserts): the planner must keep it and plan the rest around it."""
    if b.mesh_sizes is None or not b.nodes[x].shape:
        return None
    entries = even_spec(b, b.nodes[x].shape, b.mesh_sizes)
    return None if entries is None else b.add("constrain", (x,), (entries,), b.nodes[x].shape)


OPS = {"unary": _unary, "binary": _binary, "dot": _dot, "reduce": _reduce, "reshape": _reshape,
       "transpose": _transpose, "broadcast": _broadcast, "concat": _concat, "constrain": _constrain}
# dots weigh double: they are what sharding is about
_OP_CHOICES = ("dot", "dot", "unary", "binary", "reduce", "reshape", "transpose", "broadcast", "concat",
               "constrain")


@st.composite
def programs(draw: Callable, max_ops: int = 7, mesh_sizes: dict[str, int] | None = None) -> Program:
    """A random program; with ``mesh_sizes``, it may force splits over those axes."""
    b = _Builder(draw, mesh_sizes)
    for _ in range(draw(st.integers(1, 2))):
        b.new_input(draw(shapes()))
    computed: list[int] = []
    for _ in range(draw(st.integers(1, max_ops))):
        x = b.pick()
        made = OPS[draw(st.sampled_from(_OP_CHOICES))](b, x)
        if made is None:
            made = _unary(b, x)
        computed.append(made)
    outputs = [computed[-1]]
    extra = [i for i in computed[:-1] if b.nodes[i].shape]
    if extra and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(extra)))
    # Carried state: an input updated by a value of its shape, returned (a training step's shape).
    for i in [j for j, n in enumerate(b.nodes) if n.op == "input"]:
        n = b.nodes[i]
        same = [j for j in computed if b.nodes[j].shape == n.shape]
        if same and draw(st.booleans()):
            outputs.append(b.add("binary", (i, draw(st.sampled_from(same))), ("sub",), n.shape))
    return Program(tuple(b.nodes), tuple(dict.fromkeys(outputs)))


# Cost regimes: "cpu" is the cpu preset of the devices at hand, on which programs this small
# stay replicated (a collective's 20 µs latency outweighs their compute); "slow-compute"
# divides the device's FLOP/s and bandwidth by 10^4 and the links' latency by 10^4, so splitting
# pays and the planner shards, reshards and reduces: the paths where emission can go wrong.
REGIMES = ("cpu", "slow-compute", "slow-compute")


@dataclass(frozen=True)
class Case:
    """A program, the mesh it runs on, the cost regime, and the inputs that arrive committed to
    a sharding: (input position, PartitionSpec entries)."""

    program: Program
    mesh_shape: tuple[int, ...]
    axis_type: str
    regime: str = "cpu"
    committed: tuple[tuple[int, tuple], ...] = ()

    @property
    def axis_names(self) -> tuple[str, ...]:
        return ("x", "y", "z")[: len(self.mesh_shape)]

    def __str__(self) -> str:
        names = ", ".join(f"{a}={n}" for a, n in zip(self.axis_names, self.mesh_shape))
        lines = [f"mesh ({names}) {self.axis_type}, regime {self.regime}"]
        lines += [f"input {i} committed to P{tuple(e)!r}" for i, e in self.committed]
        return "\n".join(lines + [self.program.source()])


@st.composite
def cases(draw: Callable, max_ops: int = 7) -> Case:
    shape = draw(st.sampled_from(MESHES))
    axis_type = draw(st.sampled_from(AXIS_TYPES))
    regime = draw(st.sampled_from(REGIMES))
    sizes = dict(zip(("x", "y", "z"), shape))
    prog = draw(programs(max_ops, sizes if axis_type == "auto" else None))
    b = _Builder(draw, sizes)
    committed = []
    for k, s in enumerate(prog.input_shapes):
        if s and draw(st.integers(0, 4)) == 0:
            entries = even_spec(b, s, sizes)
            if entries is not None:
                committed.append((k, entries))
    return Case(prog, shape, axis_type, regime, tuple(committed))
