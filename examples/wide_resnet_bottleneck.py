"""A Wide-ResNet with bottleneck blocks (ResNet-50/101 layout) training step, as Alpa benchmarks it.

NHWC. A 7×7 stride-2 stem conv (``channels`` outputs), batch norm, ReLU and a 3×3 stride-2 max
pool; then stages of bottleneck blocks (ResNet-50: 3, 4, 6, 3 blocks; ResNet-101: 3, 4, 23, 3).
Stage i's block, with ``f = channels·2^i``:

    y = relu(bn(conv1×1(x → f)));  y = relu(bn(conv3×3(y → f, stride)));  y = bn(conv1×1(y → 4·f·width))
    out = relu(y + (x, or bn(conv1×1(x → 4·f·width, stride)) when the shape changes))

(the width factor widens each block's output, as Alpa's benchmark Wide-ResNet does), stride 2 in
the first block of stages 1-3; global average pooling and a dense classifier with softmax
cross-entropy. Batch norm uses the batch's statistics. Parameters and momentum are fp32 (SGD
with Nesterov momentum); the step computes in ``dtype`` (bf16).

    alpa-lite plan examples.wide_resnet_bottleneck:target --mesh 8
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DIMS = ("NHWC", "HWIO", "NHWC")
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks per stage (He et al. 2016, table 1)


@dataclass(frozen=True)
class WideResNetConfig:
    batch: int = 8
    image: int = 32  # height = width
    stages: tuple[int, ...] = (1, 1)  # blocks per stage; DEPTHS[50] for Wide-ResNet-50
    channels: int = 8  # stem output; stage i's bottleneck width is channels·2^i
    width: int = 2  # width factor: a block outputs 4·channels·2^i·width channels
    classes: int = 10
    dtype: Any = jnp.bfloat16  # compute dtype; parameters stay fp32
    lr: float = 0.1

    def blocks(self) -> list[tuple[str, int, int, int, int, int]]:
        """Every block as (name, stride, c_in, bottleneck width f, c_out, output height)."""
        out = []
        side, cin = self.image // 4, self.channels  # after the stem and the stride-2 max pool
        for i, n in enumerate(self.stages):
            f = self.channels * 2**i
            for j in range(n):
                stride = 2 if i and not j else 1
                side //= stride
                out.append((f"s{i}b{j}", stride, cin, f, 4 * f * self.width, side))
                cin = 4 * f * self.width
        return out

    def convs(self) -> list[tuple[int, int, int, int]]:
        """Every conv as (kernel, c_in, c_out, output height), in forward order."""
        out = [(7, 3, self.channels, self.image // 2)]
        for _, stride, cin, f, cout, side in self.blocks():
            out += [(1, cin, f, side * stride), (3, f, f, side), (1, f, cout, side)]
            if stride != 1 or cin != cout:
                out.append((1, cin, cout, side))
        return out

    @property
    def features(self) -> int:
        return 4 * self.channels * 2 ** (len(self.stages) - 1) * self.width

    def param_count(self) -> int:
        """Conv and classifier weights (batch-norm scales and biases not counted)."""
        return sum(k * k * ci * co for k, ci, co, _ in self.convs()) + self.features * self.classes

    def step_flops(self) -> float:
        """Model FLOPs of one training step: 3 × the forward's (backward = 2 forwards; the stem's
        unused input gradient counted too), 2 FLOPs per multiply-add: a conv is
        2·batch·h_out²·k²·c_in·c_out, the classifier 2·batch·features·classes."""
        fwd = sum(2 * self.batch * h * h * k * k * ci * co for k, ci, co, h in self.convs())
        return 3.0 * (fwd + 2 * self.batch * self.features * self.classes)


def init_params(key: jax.Array, c: WideResNetConfig) -> dict[str, Any]:
    keys = iter(jax.random.split(key, len(c.convs()) + 1))

    def conv(k: int, cin: int, cout: int) -> dict[str, jax.Array]:
        return {"w": jax.random.normal(next(keys), (k, k, cin, cout), jnp.float32) * np.sqrt(2 / (k * k * cin)),
                "scale": jnp.ones((cout,)), "bias": jnp.zeros((cout,))}

    params: dict[str, Any] = {"stem": conv(7, 3, c.channels)}
    for name, stride, cin, f, cout, _ in c.blocks():
        params[name] = {"conv1": conv(1, cin, f), "conv2": conv(3, f, f), "conv3": conv(1, f, cout)}
        if stride != 1 or cin != cout:
            params[name]["proj"] = conv(1, cin, cout)
    params["head"] = jax.random.normal(next(keys), (c.features, c.classes), jnp.float32) / np.sqrt(c.features)
    return params


def conv_bn(p: dict[str, jax.Array], x: jax.Array, stride: int = 1) -> jax.Array:
    """conv (SAME padding) then training-mode batch norm over the batch and spatial dims."""
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME", dimension_numbers=DIMS)
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
    return (y - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def bottleneck(p: dict[str, Any], x: jax.Array, stride: int) -> jax.Array:
    y = jax.nn.relu(conv_bn(p["conv1"], x))
    y = jax.nn.relu(conv_bn(p["conv2"], y, stride))
    y = conv_bn(p["conv3"], y)
    return jax.nn.relu(y + (conv_bn(p["proj"], x, stride) if "proj" in p else x))


def forward(params: dict[str, Any], x: jax.Array, c: WideResNetConfig) -> jax.Array:
    p = jax.tree.map(lambda a: a.astype(c.dtype), params)
    x = jax.nn.relu(conv_bn(p["stem"], x.astype(c.dtype), 2))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    for name, stride, *_ in c.blocks():
        x = bottleneck(p[name], x, stride)
    return (jnp.mean(x, axis=(1, 2)) @ p["head"]).astype(jnp.float32)


def loss_fn(params: dict[str, Any], x: jax.Array, labels: jax.Array, c: WideResNetConfig) -> jax.Array:
    logits = forward(params, x, c)
    return jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, c.classes)))


def make_step(c: WideResNetConfig, opt: optax.GradientTransformation) -> Callable[..., Any]:
    def train_step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels, c)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_example(c: WideResNetConfig = WideResNetConfig()) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # noqa: B008
    opt = optax.sgd(c.lr, momentum=0.9, nesterov=True)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = init_params(k1, c)
    x = jax.random.normal(k2, (c.batch, c.image, c.image, 3), jnp.float32)
    labels = jax.random.randint(k3, (c.batch,), 0, c.classes, jnp.int32)
    return make_step(c, opt), (params, opt.init(params), x, labels)


def abstract_example(c: WideResNetConfig) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The step and ``ShapeDtypeStruct`` arguments (images fp32, labels int32): nothing allocated."""
    opt = optax.sgd(c.lr, momentum=0.9, nesterov=True)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), c))
    x = jax.ShapeDtypeStruct((c.batch, c.image, c.image, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((c.batch,), jnp.int32)
    return make_step(c, opt), (params, jax.eval_shape(opt.init, params), x, labels)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return make_example()
