"""An Equinox MLP trained with optax, planned on 8 CPU devices.

    python examples/equinox_mlp.py         # plan, run 3 steps, check numerics
    alpa-lite plan examples.equinox_mlp:target --mesh 2x4

Equinox's way of separating what is traced from what is not: ``eqx.partition(model,
eqx.is_array)`` gives the arrays (a pytree; other leaves None) and the rest (activation
functions, sizes); the step takes the arrays and closes over the rest, recombining them with
``eqx.combine``, and differentiates with ``eqx.filter_value_and_grad``. The same step runs under
``eqx.filter_jit`` unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_step(static: Any, optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    def loss_fn(model: eqx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        model = eqx.combine(params, static)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.filter(eqx.apply_updates(model, updates), eqx.is_array), opt_state, loss

    return train_step


def make_example(dim: int = 32, width: int = 256, depth: int = 2,
                 batch: int = 32) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    k_model, kx, ky = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(dim, dim, width, depth, activation=jax.nn.gelu, key=k_model)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adam(1e-3)
    x, y = jax.random.normal(kx, (batch, dim)), jax.random.normal(ky, (batch, dim))
    return make_step(static, optimizer), (params, optimizer.init(params), x, y)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: a 3-layer MLP (width 256, batch 32)."""
    return make_example()


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, (params, opt_state, x, y) = target()
    step = al.parallelize(fn, mesh=jax.make_mesh((2, 4), ("data", "model")))
    # The plan donates params and optimizer state: the reference runs on copies.
    ref = jax.tree.map(jnp.copy, (params, opt_state))
    for i in range(3):
        params, opt_state, loss = step(params, opt_state, x, y)
        *ref, ref_loss = eqx.filter_jit(fn)(*ref, x, y)
        for a, b in zip(jax.tree.leaves((ref, ref_loss)), jax.tree.leaves((params, opt_state, loss))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        print(f"step {i + 1}: loss {float(loss):.6f}, sharded == unsharded ✓ (plans made: {step.num_plans})")


if __name__ == "__main__":
    main()
