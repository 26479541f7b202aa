"""Shared test helpers: meshes of both axis types, running a plan against the unsharded step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AXIS_TYPES = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}


def make_mesh(shape: Sequence[int], axis_type: str = "explicit",
              names: Sequence[str] | None = None) -> jax.sharding.Mesh:
    names = tuple(names or ("x", "y", "z")[: len(shape)])
    n = int(np.prod(shape))
    return jax.make_mesh(tuple(shape), names, axis_types=(AXIS_TYPES[axis_type],) * len(shape),
                         devices=jax.devices()[:n])


def fresh(tree: Any) -> Any:
    """Copies, so donation by a compiled plan never deletes the caller's arrays."""
    return jax.tree.map(lambda a: jnp.array(np.asarray(a)), tree)


def compiled_with_stats(plan: Any, fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, Any]:
    """``(plan.compile(fn), its CompiledStats)``, compiled once: for copies of ``args`` placed as
    the compiled plan places them when called (jax compiles again for arguments committed to
    other shardings, or to none), so that running the step reuses this executable."""
    from alpa_lite.measure.hlo_stats import stats_of

    step = plan.compile(fn)
    return step, stats_of(step, *placed_args(plan, args))


def placed_args(plan: Any, args: Sequence[Any]) -> list[Any]:
    """Copies of ``args`` on the plan's input shardings (as its compiled step places them)."""
    return jax.device_put(fresh(list(args)), list(plan.in_shardings))


def run_steps(step: Callable[..., Any], args: Sequence[Any], n_state: int, steps: int = 2) -> list[Any]:
    """Run ``steps`` training steps, each fed the previous step's state outputs."""
    outs, cur = [], list(fresh(list(args)))
    for _ in range(steps):
        out = step(*cur)
        outs.append(jax.tree.map(np.asarray, out))
        cur = [*fresh(list(out[:n_state])), *cur[n_state:]]
    return outs


def assert_steps_equal(step: Callable[..., Any], ref: Callable[..., Any], args: Sequence[Any],
                       n_state: int, steps: int = 2, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``steps`` steps of the plan's ``step`` equal those of the unsharded ``ref``. The reference
    runs as one jitted program on one device: run eagerly, each of its primitives is compiled on
    its own (seconds for a GPT step), and the numbers are the same unsharded computation."""
    got = run_steps(step, args, n_state, steps)
    want = run_steps(jax.jit(ref), args, n_state, steps)
    for k, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {k}")
