"""A GShard-style mixture-of-experts transformer training step (optax adam), as Alpa benchmarks it.

Decoder blocks alternate a dense FFN and a mixture-of-experts FFN (GShard: every other FFN is
MoE), each after causal self-attention (``examples/gpt.py``'s attention and layer norm). The MoE
FFN routes the block's ``B·S`` tokens in groups of ``group_size`` through ``examples/moe.py``'s
top-2 gating (capacity ``C = k·group_size/E``, over-capacity tokens dropped) and one-hot
dispatch/combine einsums to ``E`` experts stacked as ``wi (E, M, F)``, ``wo (E, F, M)``:

    expert_in = einsum('gsec,gsm->egcm', dispatch, x)
    y         = einsum('gsec,egcm->gsm', combine, gelu(expert_in @ wi) @ wo)

The FFN width is ``F = 8·M`` for dense and expert FFNs alike (Alpa's MoE benchmark model), the
LM head is the transposed token embedding, the loss is next-token cross entropy plus 0.01 × the
GShard load-balancing loss of every MoE block. Parameters and Adam moments are fp32 (master
weights); the step computes in ``dtype`` (bf16), casting the weights once per step.

    python examples/moe_gpt.py
    alpa-lite plan examples.moe_gpt:target --mesh 8
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
from examples.gpt import attention, layer_norm
from examples.moe import MoeConfig, top_k_gating

AUX_WEIGHT = 0.01  # GShard's load-balancing loss weight


@dataclass(frozen=True)
class MoeGPTConfig:
    vocab: int = 256
    seq: int = 32
    d_model: int = 64  # M
    n_heads: int = 4
    n_layers: int = 2  # blocks; the odd ones (1, 3, ...) have the MoE FFN
    experts: int = 4  # E
    group_size: int = 32  # GShard's S: tokens routed together (a group may span sequences)
    top_k: int = 2
    mlp_factor: int = 8  # F = mlp_factor · M
    dtype: Any = jnp.bfloat16  # compute dtype; parameters stay fp32

    @property
    def d_ff(self) -> int:
        return self.mlp_factor * self.d_model

    def moe_config(self, tokens: int) -> MoeConfig:
        """The gating of one MoE FFN over ``tokens`` tokens: ``tokens / group_size`` groups."""
        if tokens % self.group_size:
            raise ValueError(f"{tokens} tokens do not split into groups of {self.group_size}")
        return MoeConfig(groups=tokens // self.group_size, group_size=self.group_size, model=self.d_model,
                         hidden=self.d_ff, experts=self.experts, top_k=self.top_k)

    def param_count(self) -> int:
        """Weights (no norms): blocks' attention 4M², dense FFN 2MF, MoE FFN E·2MF + router M·E;
        embeddings (V + seq)·M."""
        m, f = self.d_model, self.d_ff
        moe = self.n_layers // 2
        return (self.n_layers * 4 * m * m + (self.n_layers - moe) * 2 * m * f
                + moe * (self.experts * 2 * m * f + m * self.experts) + (self.vocab + self.seq) * m)

    def step_flops(self, batch: int) -> float:
        """Model FLOPs of one training step: 3 × the forward's matmul FLOPs (backward = 2
        forwards), 2 FLOPs per multiply-add. Per token, forward: attention projections 8M²,
        scores and weighted sum 4·seq·M (causal mask not discounted), dense FFN 4MF, per MoE
        FFN the top-k experts 4MF·k, the router 2ME, dispatch and combine 2·2·E·C·M with
        E·C = k·group_size (GShard's one-hot einsums); the LM head 2MV."""
        m, f = self.d_model, self.d_ff
        moe = self.n_layers // 2
        per_token = (self.n_layers * (8 * m * m + 4 * self.seq * m) + (self.n_layers - moe) * 4 * m * f
                     + moe * (4 * m * f * self.top_k + 2 * m * self.experts + 4 * self.top_k * self.group_size * m)
                     + 2 * m * self.vocab)
        return 3.0 * per_token * batch * self.seq


def init_params(key: jax.Array, cfg: MoeGPTConfig) -> dict[str, Any]:
    m, f, e = cfg.d_model, cfg.d_ff, cfg.experts
    keys = iter(jax.random.split(key, 2 + 5 * cfg.n_layers))

    def dense(*shape: int) -> jax.Array:
        return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[-2])

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones((m,)), "b": jnp.zeros((m,))}

    def block(i: int) -> dict[str, Any]:
        p = {"ln1": norm(), "qkv": dense(m, 3 * m), "out": dense(m, m), "ln2": norm()}
        if i % 2:
            p["moe"] = {"router": dense(m, e), "wi": dense(e, m, f), "wo": dense(e, f, m)}
        else:
            p["fc1"], p["fc2"] = dense(m, f), dense(f, m)
        return p

    return {"wte": dense(cfg.vocab, m), "wpe": dense(cfg.seq, m),
            "blocks": [block(i) for i in range(cfg.n_layers)], "ln_f": norm()}


def moe_ffn(p: dict[str, jax.Array], h: jax.Array, cfg: MoeGPTConfig) -> tuple[jax.Array, jax.Array]:
    """The MoE FFN of ``h (B, S, M)``: tokens regrouped (G, group_size, M), routed in fp32,
    dispatched, run by their experts and combined in ``h``'s dtype; (output, aux loss)."""
    b, s, m = h.shape
    c = cfg.moe_config(b * s)
    x = h.reshape(c.groups, c.group_size, m)
    dispatch, combine, aux = top_k_gating((x @ p["router"]).astype(jnp.float32), c)
    expert_in = jnp.einsum("gsec,gsm->egcm", dispatch.astype(h.dtype), x)
    hidden = jax.nn.gelu(jnp.einsum("egcm,emh->egch", expert_in, p["wi"]))
    expert_out = jnp.einsum("egch,ehm->egcm", hidden, p["wo"])
    return jnp.einsum("gsec,egcm->gsm", combine.astype(h.dtype), expert_out).reshape(b, s, m), aux


def block(p: dict[str, Any], x: jax.Array, cfg: MoeGPTConfig) -> tuple[jax.Array, jax.Array]:
    """Pre-norm attention, then the dense or MoE FFN; (output, aux loss: 0 for a dense block)."""
    x = x + attention(p, layer_norm(p["ln1"], x), cfg.n_heads)
    h = layer_norm(p["ln2"], x)
    if "moe" in p:
        y, aux = moe_ffn(p["moe"], h, cfg)
        return x + y, aux
    return x + jax.nn.gelu(h @ p["fc1"]) @ p["fc2"], jnp.zeros((), jnp.float32)


def loss_fn(params: dict[str, Any], tokens: jax.Array, targets: jax.Array, cfg: MoeGPTConfig) -> jax.Array:
    """Next-token cross entropy + AUX_WEIGHT × the MoE blocks' load-balancing losses; a layer
    boundary (``al.mark_layer``) after every block."""
    p = jax.tree.map(lambda a: a.astype(cfg.dtype), params)
    x = jnp.take(p["wte"], tokens, axis=0) + p["wpe"][None, : tokens.shape[1]]
    aux_total = jnp.zeros((), jnp.float32)
    for i, bp in enumerate(p["blocks"]):
        x, aux = block(bp, x, cfg)
        aux_total = aux_total + aux
        if i < cfg.n_layers - 1:
            x = al.mark_layer(x)
    logits = (layer_norm(p["ln_f"], x) @ p["wte"].T).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.mean(jnp.sum(logp * jax.nn.one_hot(targets, cfg.vocab), axis=-1))
    return ce + AUX_WEIGHT * aux_total


def make_step(cfg: MoeGPTConfig, opt: optax.GradientTransformation) -> Callable[..., Any]:
    def train_step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_example(cfg: MoeGPTConfig = MoeGPTConfig(), batch: int = 8,  # noqa: B008
                 ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    opt = optax.adam(1e-3)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = init_params(k1, cfg)
    tokens = jax.random.randint(k2, (batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32)
    return make_step(cfg, opt), (params, opt.init(params), tokens[:, :-1], tokens[:, 1:])


def abstract_example(cfg: MoeGPTConfig, batch: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The step and ``ShapeDtypeStruct`` arguments: nothing is allocated (plans for big models)."""
    opt = optax.adam(1e-3)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    tok = jax.ShapeDtypeStruct((batch, cfg.seq), jnp.int32)
    return make_step(cfg, opt), (params, jax.eval_shape(opt.init, params), tok, tok)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    fn, args = target()
    plan = al.plan(fn, *args, mesh=jax.make_mesh((8,), ("x",)))
    print(plan.summary())
