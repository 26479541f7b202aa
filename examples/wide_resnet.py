"""A Wide-ResNet-style conv stack training step (SGD with Nesterov momentum, as the WRN paper), NHWC.

A 3×3 stem conv, then stages of pre-activation residual blocks (batch norm with batch
statistics → ReLU → 3×3 conv, twice, plus the identity), 2×2 pooling between stages
(``reduce_window``: average by default; ``pool="max"`` for max pooling, whose gradient is a
``select_and_scatter_add``), global average pooling and a dense classifier with softmax
cross-entropy. ``width`` sets the channel count of every block: Wide-ResNet widens the blocks,
which is what moves the best plan from data parallel to splitting channels.

    python examples/wide_resnet.py
    alpa-lite plan examples.wide_resnet:target --mesh 8
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DIMS = ("NHWC", "HWIO", "NHWC")


@dataclass(frozen=True)
class ResNetConfig:
    batch: int = 32
    image: int = 16  # height = width
    in_channels: int = 3
    width: int = 32  # channels of every block
    stages: int = 2  # max-pooled 2× between stages
    blocks: int = 1  # residual blocks per stage
    classes: int = 10
    pool: str = "avg"  # "avg" or "max"
    lr: float = 0.1


def init_params(key: jax.Array, c: ResNetConfig) -> dict[str, Any]:
    keys = iter(jax.random.split(key, 2 + 2 * c.stages * c.blocks))

    def conv(cin: int, cout: int) -> jax.Array:
        return jax.random.normal(next(keys), (3, 3, cin, cout), jnp.float32) * np.sqrt(2 / (9 * cin))

    def bn() -> dict[str, jax.Array]:
        return {"scale": jnp.ones((c.width,)), "bias": jnp.zeros((c.width,))}

    blocks = {f"s{s}b{b}": {"bn1": bn(), "conv1": conv(c.width, c.width),
                            "bn2": bn(), "conv2": conv(c.width, c.width)}
              for s in range(c.stages) for b in range(c.blocks)}
    return {"stem": conv(c.in_channels, c.width), "blocks": blocks, "bn_f": bn(),
            "head": jax.random.normal(next(keys), (c.width, c.classes), jnp.float32) / np.sqrt(c.width)}


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMS)


def batch_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """Training-mode batch norm: statistics over the batch and spatial dims of this batch."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def pool(x: jax.Array, kind: str) -> jax.Array:
    """2×2 pooling with stride 2 via ``reduce_window``."""
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4


def forward(params: dict[str, Any], x: jax.Array, c: ResNetConfig) -> jax.Array:
    x = conv3x3(x, params["stem"])
    for s in range(c.stages):
        if s:
            x = pool(x, c.pool)
        for b in range(c.blocks):
            p = params["blocks"][f"s{s}b{b}"]
            h = conv3x3(jax.nn.relu(batch_norm(x, p["bn1"])), p["conv1"])
            x = x + conv3x3(jax.nn.relu(batch_norm(h, p["bn2"])), p["conv2"])
    x = jnp.mean(jax.nn.relu(batch_norm(x, params["bn_f"])), axis=(1, 2))  # global average pool
    return x @ params["head"]


def loss_fn(params: dict[str, Any], x: jax.Array, labels: jax.Array, c: ResNetConfig) -> jax.Array:
    logits = forward(params, x, c)
    return jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, c.classes)))


def make_example(c: ResNetConfig = ResNetConfig()) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # noqa: B008
    opt = optax.sgd(c.lr, momentum=0.9, nesterov=True)

    def train_step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels, c)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = init_params(k1, c)
    x = jax.random.normal(k2, (c.batch, c.image, c.image, c.in_channels), jnp.float32)
    labels = jax.random.randint(k3, (c.batch,), 0, c.classes, jnp.int32)
    return train_step, (params, opt.init(params), x, labels)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """WRN-50-2-like widths on ImageNet-sized crops, for a GPU cluster preset (nothing runs)."""
    fn, args = make_example(ResNetConfig(batch=256, image=224, width=512, stages=4, blocks=3, classes=1000))
    return fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, args = target()
    plan = al.plan(fn, *args, mesh=jax.make_mesh((8,), ("x",)))
    print(plan.summary())
