"""A small decoder-only transformer (GPT) training step with optax adam, ready to pipeline.

The step computes its gradients with ``al.value_and_grad`` (the loss is what gets cut into
pipeline stages) and marks a layer boundary after every transformer block with
``al.mark_layer``; both are drop-ins that compute exactly what ``jax.value_and_grad`` and the
identity compute.

    python examples/gpt.py                 # plan a pipeline on 8 CPU devices, run 3 steps, check
    alpa-lite plan examples.gpt:target --mesh 2x4
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

import alpa_lite as al


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 128
    seq: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 256
    dtype: Any = jnp.float32
    tie_embeddings: bool = False  # the output logits use the token embedding, transposed (GPT-2)
    mark_layers: bool = True  # al.mark_layer after every block; False: the planner clusters layers


def large_config(n_layers: int = 24) -> GPTConfig:
    """GPT-3 1.3B's shape (d_model 2048, 16 heads, sequence 1024; Brown et al. 2020, table 2.1)."""
    return GPTConfig(vocab=51200, seq=1024, d_model=2048, n_heads=16, n_layers=n_layers, d_ff=8192,
                     dtype=jnp.bfloat16)


def init_params(key: jax.Array, cfg: GPTConfig) -> dict[str, Any]:
    d, f = cfg.d_model, cfg.d_ff
    keys = iter(jax.random.split(key, 4 + 4 * cfg.n_layers))

    def dense(k: jax.Array, a: int, b: int) -> jax.Array:
        return (jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)).astype(cfg.dtype)

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones((d,), cfg.dtype), "b": jnp.zeros((d,), cfg.dtype)}

    blocks = [{"ln1": norm(), "qkv": dense(next(keys), d, 3 * d), "out": dense(next(keys), d, d),
               "ln2": norm(), "fc1": dense(next(keys), d, f), "fc2": dense(next(keys), f, d)}
              for _ in range(cfg.n_layers)]
    params = {"wte": dense(next(keys), cfg.vocab, d), "wpe": dense(next(keys), cfg.seq, d),
              "blocks": blocks, "ln_f": norm(), "head": dense(next(keys), d, cfg.vocab)}
    if cfg.tie_embeddings:
        del params["head"]
    return params


def layer_norm(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def attention(p: dict[str, Any], x: jax.Array, n_heads: int) -> jax.Array:
    b, s, d = x.shape
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    heads = lambda t: t.reshape(b, s, n_heads, d // n_heads)  # noqa: E731
    scores = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / np.sqrt(d // n_heads)
    causal = jnp.tril(jnp.ones((s, s), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", att, heads(v)).reshape(b, s, d) @ p["out"]


def block(p: dict[str, Any], x: jax.Array, n_heads: int) -> jax.Array:
    x = x + attention(p, layer_norm(p["ln1"], x), n_heads)
    return x + jax.nn.gelu(layer_norm(p["ln2"], x) @ p["fc1"]) @ p["fc2"]


def loss_fn(params: dict[str, Any], tokens: jax.Array, targets: jax.Array, n_heads: int,
            mark_layers: bool = True) -> jax.Array:
    """Mean next-token cross entropy; a layer boundary after every block unless ``mark_layers``
    is False. Without a ``head`` matrix the logits use the token embedding, transposed."""
    x = jnp.take(params["wte"], tokens, axis=0) + params["wpe"][None, : tokens.shape[1]]
    n = len(params["blocks"])
    for i, p in enumerate(params["blocks"]):
        x = block(p, x, n_heads)
        if mark_layers and i < n - 1:
            x = al.mark_layer(x)
    head = params["head"] if "head" in params else params["wte"].T
    logits = (layer_norm(params["ln_f"], x) @ head).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1))


def make_step(cfg: GPTConfig, optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    def train_step(params, opt_state, tokens, targets):
        loss, grads = al.value_and_grad(loss_fn)(params, tokens, targets, cfg.n_heads, cfg.mark_layers)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_example(cfg: GPTConfig = GPTConfig(), batch: int = 16,  # noqa: B008
                 lr: float = 1e-3) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    opt = optax.adam(lr)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = init_params(k1, cfg)
    tokens = jax.random.randint(k2, (batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32)
    return make_step(cfg, opt), (params, opt.init(params), tokens[:, :-1], tokens[:, 1:])


def abstract_example(cfg: GPTConfig, batch: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The step and ``ShapeDtypeStruct`` arguments: nothing is allocated (plans for big models)."""
    opt = optax.adam(1e-4)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    opt_state = jax.eval_shape(opt.init, params)
    tok = jax.ShapeDtypeStruct((batch, cfg.seq), jnp.int32)
    return make_step(cfg, opt), (params, opt_state, tok, tok)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: a 4-block GPT, batch 16."""
    return make_example(GPTConfig(), batch=16)


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """GPT-3 1.3B's shape, batch 64: worth planning on a GPU cluster preset (nothing runs)."""
    return abstract_example(large_config(), batch=64)


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    fn, args = target()
    cluster = al.ClusterSpec.preset("cpu", num_hosts=2, devices_per_host=4)
    mesh = jax.make_mesh((2, 4), ("host", "device"))
    plan = al.plan(fn, *args, mesh=mesh, cluster=cluster, num_stages=2, num_microbatches=4)
    print(plan.summary())
    step = plan.compile(fn)
    want, got = args, jax.tree.map(jnp.copy, args)
    for _ in range(3):
        want = (*fn(*want)[:2], *args[2:])
        out = step(*got)
        got = (*out[:2], *args[2:])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    print("pipelined step == unsharded step over 3 steps ✓")


if __name__ == "__main__":
    main()
