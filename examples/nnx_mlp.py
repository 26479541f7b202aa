"""A Flax NNX MLP trained with ``nnx.Optimizer``, planned on 8 CPU devices in both of NNX's styles.

    python examples/nnx_mlp.py             # plan, run 3 steps of each style, check numerics
    alpa-lite plan examples.nnx_mlp:target --mesh 2x4

- functional (``functional_step``): ``graphdef, state = nnx.split((model, optimizer))`` once; the
  step merges, trains, and returns ``nnx.state((model, optimizer))``: a pytree in, the same out.
- decorated (``train_step``): the step as NNX documents it, ``@nnx.jit`` with in-place updates of
  the model and optimizer, returning the loss. NNX modules are pytrees, so alpa-lite plans a
  function of them; ``module_step`` calls the decorated step and returns the (updated) modules
  with the loss, which is what makes the new state an output the plan can tie to its input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, sizes: list[int], rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.gelu(x)
        return x


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """NNX's documented step: updates ``model`` and ``optimizer`` in place."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def module_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
    """``train_step`` as a function of its inputs: the updated modules come back out."""
    loss = train_step(model, optimizer, x, y)
    return model, optimizer, loss


def make_functional_step(graphdef: Any) -> Callable[..., Any]:
    def functional_step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return functional_step


def make_modules(sizes: tuple[int, ...] = (32, 256, 256, 32)) -> tuple[MLP, nnx.Optimizer]:
    model = MLP(list(sizes), nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def make_batch(batch: int = 32, dim: int = 32) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (batch, dim)), jax.random.normal(ky, (batch, dim))


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: the functional step of a 3-layer MLP (width 256, batch 32)."""
    graphdef, state = nnx.split(make_modules())
    return make_functional_step(graphdef), (state, *make_batch())


def module_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: the decorated step, on the modules themselves."""
    return module_step, (*make_modules(), *make_batch())


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    for name, make in (("functional", target), ("decorated", module_target)):
        fn, args = make()
        step = al.parallelize(fn, mesh=mesh)
        n_state = len(args) - 2
        # The plan donates its state inputs: the reference runs on copies, fed its own outputs.
        state, ref = list(args[:n_state]), [jax.tree.map(jnp.copy, a) for a in args[:n_state]]
        for i in range(3):
            *state, loss = step(*state, *args[n_state:])
            *ref, ref_loss = jax.jit(fn)(*ref, *args[n_state:])
            for a, b in zip(jax.tree.leaves((ref, ref_loss)), jax.tree.leaves((state, loss))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
            print(f"{name} step {i + 1}: loss {float(loss):.6f}, sharded == unsharded ✓ "
                  f"(plans made: {step.num_plans})")


if __name__ == "__main__":
    main()
