"""Greedy generation with a KV cache: a small GPT as two planned programs, prefill and decode.

``prefill(params, tokens) -> (logits, cache)`` runs the prompt and fills the cache;
``decode(params, cache, token, pos) -> (logits, cache)`` runs one token per sequence, writes its
key and value at ``pos`` with ``lax.dynamic_update_slice`` and attends over the cache. The cache
(per layer ``k``, ``v`` of shape [batch, ctx, kv_heads, head_dim]) is decode's carried state: the
planner ties its output to its input and the emitted step donates it. Grouped-query attention:
``n_kv_heads`` divides ``n_heads``, each group of ``n_heads / n_kv_heads`` query heads reads one
key/value head (Ainslie et al. 2023).

    python examples/generate.py        # plan both on 8 CPU devices, generate 32 tokens, check
    alpa-lite plan examples.generate:decode_target --mesh 8
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __name__ == "__main__" and not __package__:  # run as a file: the repository root holds examples/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.gpt import layer_norm  # noqa: E402

Params = dict[str, Any]
Cache = list[dict[str, jax.Array]]


@dataclass(frozen=True)
class GenConfig:
    vocab: int = 128
    d_model: int = 64
    n_heads: int = 8
    n_kv_heads: int = 8  # < n_heads: grouped-query attention
    n_layers: int = 2
    d_ff: int = 256
    ctx: int = 64  # cache length: prompt + generated tokens fit in it
    dtype: Any = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def llama70b_shape(**overrides: Any) -> GenConfig:
    """The 70B-class shape of the inference benchmark: 80 layers, hidden 8192, 64 heads, vocab
    32,000 (Llama-2-70B's depth, width, heads and vocabulary, Touvron et al. 2023, table 1) with
    this example's GELU MLP of 4x hidden; context 4096, bf16."""
    cfg = dict(vocab=32000, d_model=8192, n_heads=64, n_kv_heads=64, n_layers=80, d_ff=4 * 8192,
               ctx=4096, dtype=jnp.bfloat16)
    return GenConfig(**{**cfg, **overrides})


def llama7b_shape(**overrides: Any) -> GenConfig:
    """The 7B-class shape: 32 layers, hidden 4096, 32 heads, vocab 32,000 (Llama-2-7B, ibid.)."""
    cfg = dict(vocab=32000, d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, d_ff=4 * 4096,
               ctx=4096, dtype=jnp.bfloat16)
    return GenConfig(**{**cfg, **overrides})


def init_params(key: jax.Array, cfg: GenConfig) -> Params:
    d, f, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(key, 3 + 6 * cfg.n_layers))

    def dense(a: int, b: int) -> jax.Array:
        return (jax.random.normal(next(keys), (a, b), jnp.float32) / np.sqrt(a)).astype(cfg.dtype)

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones((d,), cfg.dtype), "b": jnp.zeros((d,), cfg.dtype)}

    blocks = [{"ln1": norm(), "wq": dense(d, d), "wk": dense(d, kv), "wv": dense(d, kv),
               "out": dense(d, d), "ln2": norm(), "fc1": dense(d, f), "fc2": dense(f, d)}
              for _ in range(cfg.n_layers)]
    return {"wte": dense(cfg.vocab, d), "wpe": dense(cfg.ctx, d), "blocks": blocks,
            "ln_f": norm(), "head": dense(d, cfg.vocab)}


def empty_cache(cfg: GenConfig, batch: int) -> Cache:
    shape = (batch, cfg.ctx, cfg.n_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
            for _ in range(cfg.n_layers)]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√head_dim, masked to ``visible`` [q, s]) · v, query heads grouped over the
    key/value heads: q [b, q, H, hd], k/v [b, s, KV, hd] → [b, q, H, hd]."""
    b, sq, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, sq, kvh, h // kvh, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k) / np.sqrt(hd)
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", att, v).reshape(b, sq, h, hd)


def block(p: Params, x: jax.Array, layer_cache: dict[str, jax.Array], pos: jax.Array,
          visible: jax.Array, cfg: GenConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One transformer block over the tokens at ``pos``...: their keys and values written into
    the cache there, attention over the cache's ``visible`` positions."""
    b, s, d = x.shape
    h = layer_norm(p["ln1"], x)
    q = (h @ p["wq"]).reshape(b, s, cfg.n_heads, cfg.head_dim)
    kv_shape = (b, s, cfg.n_kv_heads, cfg.head_dim)
    start = (0, pos, 0, 0)
    k = lax.dynamic_update_slice(layer_cache["k"], (h @ p["wk"]).reshape(kv_shape), start)
    v = lax.dynamic_update_slice(layer_cache["v"], (h @ p["wv"]).reshape(kv_shape), start)
    x = x + attend(q, k, v, visible).reshape(b, s, d) @ p["out"]
    x = x + jax.nn.gelu(layer_norm(p["ln2"], x) @ p["fc1"]) @ p["fc2"]
    return x, {"k": k, "v": v}


def forward(params: Params, cache: Cache, tokens: jax.Array, pos: jax.Array,
            cfg: GenConfig) -> tuple[jax.Array, Cache]:
    """Logits of the last token [b, vocab] (float32) and the cache with ``tokens`` [b, s] written
    at ``pos``; token i of the chunk sees cache positions ≤ pos + i."""
    s = tokens.shape[1]
    x = jnp.take(params["wte"], tokens, axis=0)
    x = x + lax.dynamic_slice_in_dim(params["wpe"], pos, s, axis=0)[None]
    visible = jnp.arange(cfg.ctx)[None, :] <= (pos + jnp.arange(s))[:, None]
    new_cache = []
    for p, c in zip(params["blocks"], cache, strict=True):
        x, c = block(p, x, c, pos, visible, cfg)
        new_cache.append(c)
    logits = (layer_norm(params["ln_f"], x[:, -1]) @ params["head"]).astype(jnp.float32)
    return logits, new_cache


def make_steps(cfg: GenConfig) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(prefill, decode) for ``cfg``."""

    def prefill(params: Params, tokens: jax.Array) -> tuple[jax.Array, Cache]:
        return forward(params, empty_cache(cfg, tokens.shape[0]), tokens, jnp.int32(0), cfg)

    def decode(params: Params, cache: Cache, token: jax.Array,
               pos: jax.Array) -> tuple[jax.Array, Cache]:
        return forward(params, cache, token[:, None], pos, cfg)

    return prefill, decode


def generate(prefill: Callable[..., Any], decode: Callable[..., Any], params: Params,
             prompt: jax.Array, steps: int) -> np.ndarray:
    """Greedy: ``steps`` tokens after ``prompt`` [b, p], each the argmax of the last logits."""
    logits, cache = prefill(params, prompt)
    out = []
    pos = prompt.shape[1]
    for i in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
        if i + 1 < steps:
            logits, cache = decode(params, cache, token, jnp.int32(pos + i))
    return np.stack(out, axis=1)


def abstract_args(cfg: GenConfig, batch: int, prompt: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``ShapeDtypeStruct`` arguments of (prefill, decode): nothing is allocated."""
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    cache = jax.eval_shape(lambda: empty_cache(cfg, batch))
    i32 = jnp.int32
    return ((params, jax.ShapeDtypeStruct((batch, prompt), i32)),
            (params, cache, jax.ShapeDtypeStruct((batch,), i32), jax.ShapeDtypeStruct((), i32)))


def example(cfg: GenConfig = GenConfig(), batch: int = 8,  # noqa: B008
            prompt: int = 8) -> tuple[Params, jax.Array]:
    """Random params and a random prompt [batch, prompt]."""
    k1, k2 = jax.random.split(jax.random.key(0))
    return init_params(k1, cfg), jax.random.randint(k2, (batch, prompt), 0, cfg.vocab, jnp.int32)


def decode_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: decode of a 2-layer GQA GPT (8 query, 4 key/value heads), batch 8."""
    cfg = GenConfig(n_kv_heads=4)
    params, prompt = example(cfg)
    _, decode = make_steps(cfg)
    token = prompt[:, 0]
    return decode, (params, empty_cache(cfg, prompt.shape[0]), token, jnp.int32(prompt.shape[1]))


def main(steps: int = 32) -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    cfg = GenConfig(n_kv_heads=4)
    params, prompt = example(cfg)
    prefill, decode = make_steps(cfg)
    mesh = jax.make_mesh((8,), ("x",))
    pre_args, dec_args = abstract_args(cfg, prompt.shape[0], prompt.shape[1])
    pre_plan = al.plan(prefill, *pre_args, mesh=mesh)
    dec_plan = al.plan(decode, *dec_args, mesh=mesh)
    print(dec_plan.summary())
    want = generate(jax.jit(prefill), jax.jit(decode), params, prompt, steps)
    got = generate(pre_plan.compile(prefill), dec_plan.compile(decode), params, prompt, steps)
    np.testing.assert_array_equal(got, want)
    print(f"{steps} tokens x {prompt.shape[0]} sequences from the planned prefill and decode "
          "== the unsharded loop ✓")


if __name__ == "__main__":
    main()
