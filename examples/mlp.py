"""A multi-layer perceptron training step (optax adam), planned on 8 CPU devices.

    python examples/mlp.py                 # plan, print, run 2 steps and check numerics
    alpa-lite plan examples.mlp:target --mesh 2x4
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init_params(key: jax.Array, sizes: list[int]) -> dict[str, Any]:
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer{i}": {"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
                          "b": jnp.zeros((b,), jnp.float32)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        p = params[f"layer{i}"]
        x = x @ p["w"] + p["b"]
        if i < n - 1:
            x = jax.nn.gelu(x)
    return x


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((forward(params, x) - y) ** 2)


def make_step(optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_example(batch: int = 64, hidden: int = 512, layers: int = 2, dim: int = 64,
                 optimizer: str = "adam") -> tuple[Callable[..., Any], tuple[Any, ...]]:
    opt = optax.adam(1e-3) if optimizer == "adam" else optax.sgd(1e-2)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = init_params(k1, [dim] + [hidden] * (layers - 1) + [dim])
    x = jax.random.normal(k2, (batch, dim), jnp.float32)
    y = jax.random.normal(k3, (batch, dim), jnp.float32)
    return make_step(opt), (params, opt.init(params), x, y)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: a 4-layer MLP, small batch and wide hidden layers (Megatron territory)."""
    return make_example(batch=32, hidden=1024, layers=4)


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The size worth planning on a GPU cluster preset (abstract mesh, nothing runs)."""
    fn, args = make_example(batch=1024, hidden=16384, layers=8, dim=4096)
    return fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, args = target()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    plan = al.plan(fn, *args, mesh=mesh)
    print(plan.summary())
    step = plan.compile(fn)
    # Two steps as a training loop runs them: each fed the previous step's params and optimizer
    # state (the sharded step's own outputs, left sharded), checked against the unsharded step
    # fed the same way. Copies: the compiled step donates its state arguments.
    params, opt_state, x, y = jax.tree.map(jnp.copy, args)
    ref_params, ref_opt_state = args[0], args[1]
    for i in range(2):
        params, opt_state, loss = step(params, opt_state, x, y)
        ref_params, ref_opt_state, ref_loss = fn(ref_params, ref_opt_state, x, y)
        for a, b in zip(jax.tree.leaves((ref_params, ref_opt_state, ref_loss)),
                        jax.tree.leaves((params, opt_state, loss))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        print(f"step {i + 1}: loss {float(loss):.6f}, sharded == unsharded ✓")


if __name__ == "__main__":
    main()
