"""A Flax linen language model trained with ``flax.training.train_state.TrainState``, planned on
8 CPU devices as written: no parameter dicts, no changes to the step.

    python examples/flax_lm.py             # plan, print, run 3 steps and check numerics, save
                                           # with Orbax, restore into the plan's shardings, step on
    alpa-lite plan examples.flax_lm:target --mesh 2x4

The model: token embedding (``nn.Embed``), blocks of ``nn.LayerNorm`` +
``nn.MultiHeadDotProductAttention`` under ``nn.make_causal_mask`` (with attention dropout drawn
from a ``"dropout"`` rng stream, a key passed to every step) + a ``nn.Dense``/``nn.gelu`` MLP,
and a final ``nn.Dense`` to the vocabulary; loss: mean next-token cross entropy; optimizer:
``optax.adamw``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training.train_state import TrainState


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    width: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                            deterministic=not train)(h, h, mask=mask)
        x = x + h
        h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.width)(h)


class LM(nn.Module):
    vocab: int
    width: int
    layers: int = 2
    heads: int = 4
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Embed(self.vocab, self.width)(tokens)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = Block(self.width, self.heads, self.dropout)(x, mask, train)
        return nn.Dense(self.vocab)(x)


def train_step(state: TrainState, tokens: jax.Array, targets: jax.Array,
               key: jax.Array) -> tuple[TrainState, jax.Array]:
    """One adamw step; ``key`` seeds this step's attention dropout."""

    def loss_fn(params: Any) -> jax.Array:
        logits = state.apply_fn({"params": params}, tokens, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def make_example(vocab: int = 64, width: int = 32, batch: int = 8, seq: int = 8, layers: int = 2,
                 heads: int = 4, dropout: float = 0.1) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``(train_step, (state, tokens, targets, key))``. adamw's ``eps`` is 1e-6, not 1e-8: the
    attention key bias has an exactly zero gradient (softmax is invariant to a per-row shift),
    so what reaches adam there is rounding noise, which ``g / (sqrt(v) + eps)`` with a tiny eps
    turns into ±learning-rate steps that differ between any two summation orders."""
    model = LM(vocab, width, layers, heads, dropout)
    k_init, k_tok, k_drop = jax.random.split(jax.random.key(0), 3)
    tokens = jax.random.randint(k_tok, (batch, seq + 1), 0, vocab)
    params = model.init(k_init, tokens[:, :-1])["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-3, eps=1e-6))
    return train_step, (state, tokens[:, :-1], tokens[:, 1:], k_drop)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """CLI target: a small 2-block LM (vocab 64, width 32, batch 8 x 8 tokens)."""
    return make_example()


def save_and_restore(state: TrainState, shardings: Any, directory: str) -> TrainState:
    """Save a (sharded) train state with Orbax and restore it straight into ``shardings`` (a plan's
    ``in_shardings[0]``): each process reads only the shards its devices hold."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), state, shardings)
    return checkpointer.restore(directory, target)


def main() -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
    import alpa_lite as al

    fn, (state, tokens, targets, key) = target()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    step = al.parallelize(fn, mesh=mesh)
    print(step.get_plan(state, tokens, targets, key).summary())
    # A training loop: each step fed the previous step's (sharded) state, a new dropout key
    # each step, checked against the unsharded step fed the same way. The plan is made once.
    # The plan donates the state it is given (its buffers are reused for the new state): the
    # reference starts from its own copy.
    ref_state, ref_step = jax.tree.map(np.array, state), jax.jit(fn)
    for i in range(3):
        key, sub = jax.random.split(key)
        state, loss = step(state, tokens, targets, sub)
        ref_state, ref_loss = ref_step(ref_state, tokens, targets, sub)
        for a, b in zip(jax.tree.leaves((ref_state, ref_loss)), jax.tree.leaves((state, loss))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        print(f"step {i + 1}: loss {float(loss):.6f}, sharded == unsharded ✓ (plans made: {step.num_plans})")
    # A checkpoint round trip: save, restore into the plan's input shardings, keep training.
    with tempfile.TemporaryDirectory() as tmp:
        plan = step.get_plan(state, tokens, targets, key)
        state = save_and_restore(state, plan.in_shardings[0], os.path.join(tmp, "state"))
    key, sub = jax.random.split(key)
    state, loss = step(state, tokens, targets, sub)
    ref_state, ref_loss = ref_step(ref_state, tokens, targets, sub)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ref_loss), rtol=1e-4, atol=1e-4)
    print(f"step 4 (restored from an Orbax checkpoint): loss {float(loss):.6f}, sharded == unsharded ✓ "
          f"(plans made: {step.num_plans})")


if __name__ == "__main__":
    main()
