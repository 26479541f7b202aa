"""Shared harness of the ``test_rules_*`` files, and tests of the harness itself.

``op_strategies`` traces a small jnp function, builds its strategies on the ``cpu`` preset with a
2×4 mesh ``{'x': 2, 'y': 4}`` and returns those of one op. ``check_strategy`` runs that op
alone on the 8 CPU devices (conftest.py) the way a plan would emit it: operands constrained to
the strategy's input specs, the result to its output spec without the partial axes, inside
``jax.jit(auto_axes(...))`` on ``jax.make_mesh((2, 4), ('x', 'y'))``; then it asserts

- the result equals the unsharded op (the spec algebra computes the same thing), and
- the compiled program runs no collective when the strategy claims none, and only the
  all-reduces of the partial-sum axes when its output is a partial sum.

The result is kept in the output spec (``out_sharding`` = that spec, gathered on the host by
``np.asarray``) rather than made replicated inside the program, so a collective in the compiled
text can only come from the op: the operands arrive replicated and constraining them to a split
is a local slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding

from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.graph import Op
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.measure.hlo_stats import CompiledCollective, parse_collectives
from alpa_lite.tracing.tracer import trace
from cost_model.builder import build_strategies
from cost_model.strategy import Strategy

MESH_SHAPE, AXES = (2, 4), ("x", "y")
SIZES = dict(zip(AXES, MESH_SHAPE, strict=True))
CLUSTER = ClusterSpec.preset("cpu").with_mesh(MESH_SHAPE, AXES)


def op_strategies(fn: Callable[..., Any], args: Sequence[Any], kind: str,
                  index: int = 0) -> tuple[Op, dict[str, Strategy]]:
    """The ``index``-th op of ``kind`` in ``trace(fn, *args)`` and its strategies by name."""
    graph = trace(fn, *args)
    ops = [op for op in graph.ops if op.kind == kind]
    assert ops, f"no {kind!r} op in {graph.summary()}"
    op = ops[index]
    sg = build_strategies(graph, CLUSTER)
    assert op.index not in sg.unconstrained, f"{op.primitive} has no rule"
    strats = sg.strategies[op.index]
    by_name = {s.name: s for s in strats}
    assert len(by_name) == len(strats), "strategy names must be unique"
    return op, by_name


def described(strats: dict[str, Strategy]) -> set[str]:
    """``{"x=b0: ([R,R], [x,R,R]) -> [x,R,R]", ...}``: names with operand and result specs."""
    return {str(s) for s in strats.values()}


def rng_array(shape: Sequence[int], seed: int = 0, high: int | None = None) -> np.ndarray:
    """float32 normal values, or int32 in ``[0, high)`` when ``high`` is given."""
    rng = np.random.default_rng(seed)
    if high is not None:
        return rng.integers(0, high, size=tuple(shape)).astype(np.int32)
    return rng.standard_normal(tuple(shape)).astype(np.float32)


def run_strategy(op: Op, strategy: Strategy,
                 args: Sequence[Any]) -> tuple[list[np.ndarray], tuple[CompiledCollective, ...]]:
    """Run ``op`` under ``strategy`` on the 2×4 CPU mesh: its results and compiled collectives."""
    mesh = jax.make_mesh(MESH_SHAPE, AXES)
    multi = op.primitive.multiple_results
    outs = [NamedSharding(mesh, s.without_partial().to_partition_spec())
            for s in strategy.out_specs]

    def body(*xs: Any) -> Any:
        xs = [lax.with_sharding_constraint(x, s.to_partition_spec())
              for x, s in zip(xs, strategy.in_specs, strict=True)]
        res = op.primitive.bind(*xs, **op.params)
        res = [lax.with_sharding_constraint(r, o.spec)
               for r, o in zip(res if multi else [res], outs, strict=True)]
        return res if multi else res[0]

    fn = jax.jit(jax.sharding.auto_axes(body, out_sharding=outs if multi else outs[0]))
    with jax.set_mesh(mesh):
        compiled = fn.lower(*args).compile()
        result = compiled(*args)
    results = [np.asarray(r) for r in (result if multi else [result])]
    return results, parse_collectives(compiled.as_text())


def reference(op: Op, args: Sequence[Any]) -> list[np.ndarray]:
    res = op.primitive.bind(*args, **op.params)
    return [np.asarray(r) for r in (res if op.primitive.multiple_results else [res])]


def check_strategy(op: Op, strategy: Strategy, args: Sequence[Any], rtol: float = 1e-5,
                   atol: float = 1e-5) -> tuple[CompiledCollective, ...]:
    """Assert ``strategy`` computes the unsharded result with only the collectives it claims."""
    results, colls = run_strategy(op, strategy, args)
    for got, want in zip(results, reference(op, args), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=str(strategy))
    partial = {a for s in strategy.out_specs for a in s.partial}
    if not partial:
        assert colls == (), f"{strategy} claims no communication; compiled: {colls}"
    else:
        # The partial sum is reduced by all-reduces over exactly the partial axes.
        assert colls and all(c.kind == "all-reduce" for c in colls), (str(strategy), colls)
        assert math.prod(c.group_size for c in colls) == math.prod(SIZES[a] for a in partial)
    return colls


# ---- the harness catches what it should ------------------------------------------------------

def _emb_lookup() -> tuple[Op, dict[str, Strategy], list[np.ndarray]]:
    emb, ids = rng_array((64, 32)), rng_array((8, 16), seed=1, high=64)
    op, strats = op_strategies(lambda e, i: e[i], (emb, ids), "gather")
    return op, strats, [emb, ids[..., None]]


def test_harness_sees_a_collective_the_rule_would_not_offer():
    # Splitting the *indexed* operand dim makes XLA mask and all-reduce: the rule offers it
    # only with a partial-sum output, and the harness must see the collective when a strategy
    # claiming a reduced output and no communication is run anyway.
    op, strats, args = _emb_lookup()
    bogus = Strategy("indexed", (ShardingSpec.parse("[R,R,R]"),),
                     (ShardingSpec.parse("[x,R]"), ShardingSpec.parse("[R,R,R]")))
    assert all(s.out_spec.partial for s in strats.values() if s.in_specs[0].dims[0])
    results, colls = run_strategy(op, bogus, args)
    assert [c.kind for c in colls] == ["all-reduce"]
    np.testing.assert_allclose(results[0], reference(op, args)[0], rtol=1e-6)
    with pytest.raises(AssertionError, match="claims no communication"):
        check_strategy(op, bogus, args)

