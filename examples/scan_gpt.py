"""A GPT-style decoder LM training step (optax adam) with stacked layer params ``(L, ...)``.

Token embedding tied to the output projection, causal self-attention (mask from ``iota``), RMS
norm, a SiLU-gated MLP, and cross-entropy over the vocabulary. The layers run either under
``jax.lax.scan`` over the stacked params (``scan=True``: one traced layer with a trip count) or
unrolled in a Python loop over the same params (``scan=False``): both compute the same thing.

    python examples/scan_gpt.py
    alpa-lite plan examples.scan_gpt:target --mesh 8
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
class GptConfig:
    batch: int = 8
    seq: int = 32
    vocab: int = 512
    hidden: int = 128
    heads: int = 4
    mlp: int = 512
    layers: int = 2
    scan: bool = True
    dtype: Any = jnp.float32  # compute dtype; params stay float32 (master weights)


def init_params(key: jax.Array, c: GptConfig) -> dict[str, Any]:
    ks = jax.random.split(key, 6)
    L, h = c.layers, c.hidden

    def dense(k: jax.Array, *shape: int) -> jax.Array:
        return jax.random.normal(k, (L, *shape), jnp.float32) / np.sqrt(shape[0])

    return {
        "embed": jax.random.normal(ks[0], (c.vocab, h), jnp.float32) * 0.02,
        "layers": {
            "qkv": dense(ks[1], h, 3 * h), "out": dense(ks[2], h, h),
            "gate": dense(ks[3], h, c.mlp), "up": dense(ks[4], h, c.mlp), "down": dense(ks[5], c.mlp, h),
            "norm1": jnp.ones((L, h)), "norm2": jnp.ones((L, h)),
        },
        "norm_f": jnp.ones((h,)),
    }


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q, k, v: (batch, seq, heads, d). Softmax in float32, masked above the diagonal."""
    s = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
    mask = jax.lax.broadcasted_iota(jnp.int32, (s, s), 0) >= jax.lax.broadcasted_iota(jnp.int32, (s, s), 1)
    logits = jnp.where(mask, logits, -1e9)
    att = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", att, v)


def block(p: dict[str, Any], x: jax.Array, heads: int) -> jax.Array:
    """One pre-norm decoder layer; ``p`` holds one layer's params (no leading L dim)."""
    b, s, h = x.shape
    dt = x.dtype
    qkv = rms_norm(x, p["norm1"]) @ p["qkv"].astype(dt)
    q, k, v = jnp.split(qkv.reshape(b, s, 3 * heads, h // heads), 3, axis=2)
    x = x + causal_attention(q, k, v).reshape(b, s, h) @ p["out"].astype(dt)
    y = rms_norm(x, p["norm2"])
    y = jax.nn.silu(y @ p["gate"].astype(dt)) * (y @ p["up"].astype(dt))
    return x + y @ p["down"].astype(dt)


def logits_of(params: dict[str, Any], tokens: jax.Array, c: GptConfig) -> jax.Array:
    emb = params["embed"]
    x = emb[tokens].astype(c.dtype)  # gather; its gradient is a scatter-add
    if c.scan:
        x, _ = jax.lax.scan(lambda x, p: (block(p, x, c.heads), None), x, params["layers"])
    else:
        for i in range(c.layers):
            x = block(jax.tree.map(lambda a, i=i: a[i], params["layers"]), x, c.heads)
    x = rms_norm(x, params["norm_f"])
    return (x @ emb.T.astype(c.dtype)).astype(jnp.float32)  # tied output projection


def loss_fn(params: dict[str, Any], tokens: jax.Array, targets: jax.Array, c: GptConfig) -> jax.Array:
    logp = jax.nn.log_softmax(logits_of(params, tokens, c), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_example(c: GptConfig = GptConfig()) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # noqa: B008
    opt = optax.adam(1e-3)

    def train_step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, c)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2 = jax.random.split(jax.random.key(0))
    params = init_params(k1, c)
    tokens = jax.random.randint(k2, (c.batch, c.seq + 1), 0, c.vocab, jnp.int32)
    return train_step, (params, opt.init(params), tokens[:, :-1], tokens[:, 1:])


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """GPT-2 medium sized, 24 scanned layers, for planning on a GPU cluster preset (nothing runs)."""
    fn, args = make_example(GptConfig(batch=64, seq=1024, vocab=50304, hidden=1024, heads=16,
                                      mlp=4096, layers=24, dtype=jnp.bfloat16))
    return fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, args = target()
    plan = al.plan(fn, *args, mesh=jax.make_mesh((8,), ("x",)))
    print(plan.summary())
