"""A BERT-style encoder stack training step (attention, layer norm, GELU, residuals; optax adam).

    python examples/bert.py
    alpa-lite plan examples.bert:target --mesh 8
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


@dataclass(frozen=True)
class BertConfig:
    batch: int = 8
    seq: int = 32
    hidden: int = 256
    heads: int = 4
    mlp: int = 1024
    layers: int = 2


def init_params(key: jax.Array, c: BertConfig) -> dict[str, Any]:
    def dense(k: jax.Array, a: int, b: int) -> jax.Array:
        return jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)

    layers = {}
    for i, k in enumerate(jax.random.split(key, c.layers)):
        ks = jax.random.split(k, 4)
        layers[f"layer{i}"] = {
            "qkv": dense(ks[0], c.hidden, 3 * c.hidden), "out": dense(ks[1], c.hidden, c.hidden),
            "mlp_in": dense(ks[2], c.hidden, c.mlp), "mlp_out": dense(ks[3], c.mlp, c.hidden),
            "ln1": jnp.ones((c.hidden,)), "ln2": jnp.ones((c.hidden,)),
        }
    return layers


def layer_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale


def encoder_layer(p: dict[str, Any], x: jax.Array, heads: int) -> jax.Array:
    b, s, h = x.shape
    qkv = layer_norm(x, p["ln1"]) @ p["qkv"]
    q, k, v = jnp.split(qkv.reshape(b, s, 3, heads, h // heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (b, s, heads, d)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(h // heads), axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, h)
    x = x + ctx @ p["out"]
    return x + jax.nn.gelu(layer_norm(x, p["ln2"]) @ p["mlp_in"]) @ p["mlp_out"]


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array, heads: int) -> jax.Array:
    for i in range(len(params)):
        x = encoder_layer(params[f"layer{i}"], x, heads)
    return jnp.mean((x - y) ** 2)


def make_example(c: BertConfig = BertConfig()) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # noqa: B008
    opt = optax.adam(1e-3)

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, c.heads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = init_params(k1, c)
    x = jax.random.normal(k2, (c.batch, c.seq, c.hidden), jnp.float32)
    y = jax.random.normal(k3, (c.batch, c.seq, c.hidden), jnp.float32)
    return train_step, (params, opt.init(params), x, y)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """BERT-large sized layers for planning on a GPU cluster preset (nothing runs)."""
    fn, args = make_example(BertConfig(batch=256, seq=512, hidden=1024, heads=16, mlp=4096, layers=24))
    return fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, args = target()
    plan = al.plan(fn, *args, mesh=jax.make_mesh((8,), ("x",)))
    print(plan.summary())
