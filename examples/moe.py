"""A GShard-style mixture-of-experts layer training step (optax adam).

Tokens come in G groups of S (``x: (G, S, M)``). A router picks the top-k of E experts per
token (k rounds of argmax, GShard's top-2 gating), each expert takes at most C tokens per group
(position in the expert from a cumulative sum; tokens over capacity are dropped), and one-hot
dispatch/combine einsums move tokens to their experts and back:

    expert_in  = einsum('gsec,gsm->egcm', dispatch, x)
    h          = gelu(einsum('egcm,emh->egch', expert_in, wi))      experts stacked: wi (E, M, H)
    expert_out = einsum('egch,ehm->egcm', h, wo)                                  wo (E, H, M)
    y          = einsum('gsec,egcm->gsm', combine, expert_out)

plus GShard's auxiliary load-balancing loss. Expert parallelism splits e (expert weights in
place) and g elsewhere (tokens): the layouts meet in all-to-alls of the ``(E, G, C, M)`` buffer.

    python examples/moe.py
    alpa-lite plan examples.moe:target --mesh 8
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
class MoeConfig:
    groups: int = 8  # G
    group_size: int = 64  # S tokens per group
    model: int = 256  # M
    hidden: int = 1024  # H, per expert
    experts: int = 8  # E
    top_k: int = 2
    capacity_factor: float = 1.0

    @property
    def capacity(self) -> int:
        """C: tokens an expert takes per group (GShard: k·S/E · capacity factor)."""
        return max(1, int(np.ceil(self.top_k * self.group_size / self.experts * self.capacity_factor)))


def init_params(key: jax.Array, c: MoeConfig) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "router": jax.random.normal(k1, (c.model, c.experts), jnp.float32) * 0.1,
        "wi": jax.random.normal(k2, (c.experts, c.model, c.hidden), jnp.float32) / np.sqrt(c.model),
        "wo": jax.random.normal(k3, (c.experts, c.hidden, c.model), jnp.float32) / np.sqrt(c.hidden),
    }


def top_k_gating(logits: jax.Array, c: MoeConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GShard gating for ``logits (G, S, E)``: dispatch (G,S,E,C) one-hot, combine weights
    (G,S,E,C), and the auxiliary load-balancing loss. k rounds of argmax pick the experts; a
    token's slot in an expert is the count of tokens routed there before it (cumsum)."""
    probs = jax.nn.softmax(logits, axis=-1)
    remaining = probs
    filled = jnp.zeros(logits.shape[:1] + logits.shape[2:], jnp.int32)  # (G, E) slots used so far
    dispatch = combine = 0.0
    aux = 0.0
    for r in range(c.top_k):
        choice = jax.nn.one_hot(jnp.argmax(remaining, axis=-1), c.experts, dtype=jnp.int32)  # (G,S,E)
        if r == 0:  # GShard: fraction of tokens whose first choice is e, times mean gate of e
            aux = jnp.mean(jnp.mean(choice.astype(jnp.float32), axis=1) * jnp.mean(probs, axis=1)) * c.experts**2
        slot = jnp.cumsum(choice, axis=1) - 1 + filled[:, None, :]
        keep = choice * (slot < c.capacity)
        filled = filled + jnp.sum(keep, axis=1)
        gate = jnp.sum(probs * choice, axis=-1)  # (G, S)
        onehot = jax.nn.one_hot(jnp.sum(slot * keep, axis=-1), c.capacity, dtype=jnp.float32)  # (G,S,C)
        d = keep.astype(jnp.float32)[..., None] * onehot[:, :, None, :]
        dispatch = dispatch + d
        combine = combine + gate[..., None, None] * d
        remaining = remaining * (1 - choice)
    return dispatch, combine, aux


def moe_layer(p: dict[str, jax.Array], x: jax.Array, c: MoeConfig) -> tuple[jax.Array, jax.Array]:
    dispatch, combine, aux = top_k_gating(x @ p["router"], c)
    expert_in = jnp.einsum("gsec,gsm->egcm", dispatch, x)
    h = jax.nn.gelu(jnp.einsum("egcm,emh->egch", expert_in, p["wi"]))
    expert_out = jnp.einsum("egch,ehm->egcm", h, p["wo"])
    return jnp.einsum("gsec,egcm->gsm", combine, expert_out), aux


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, c: MoeConfig) -> jax.Array:
    out, aux = moe_layer(params, x, c)
    return jnp.mean((x + out - y) ** 2) + 0.01 * aux


def make_example(c: MoeConfig = MoeConfig()) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # noqa: B008
    opt = optax.adam(1e-3)

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, c)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = init_params(k1, c)
    x = jax.random.normal(k2, (c.groups, c.group_size, c.model), jnp.float32)
    y = jax.random.normal(k3, (c.groups, c.group_size, c.model), jnp.float32)
    return train_step, (params, opt.init(params), x, y)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()


def real_target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A GShard-sized layer (64 experts) for planning on a GPU cluster preset (nothing runs)."""
    fn, args = make_example(MoeConfig(groups=64, group_size=1024, model=2048, hidden=8192, experts=64))
    return fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, args = target()
    plan = al.plan(fn, *args, mesh=jax.make_mesh((8,), ("x",)))
    print(plan.summary())
