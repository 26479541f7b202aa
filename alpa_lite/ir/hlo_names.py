"""HLO names of JAX primitives, and the FLOPs each op does.

Keyed by primitive object (never by name: names change between jax releases).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import primitives as P

from alpa_lite.ir.graph import TensorInfo


def _reshard_primitive() -> Any:
    """jax's explicit-sharding ``reshard`` primitive. jax exports no handle to it
    (``jax.extend.core.primitives`` lists none): it is taken, as an object, from the one equation
    ``jax.sharding.reshard`` traces to on a one-device abstract mesh (no device needed)."""
    from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

    mesh = AbstractMesh((1,), ("a",), axis_types=(AxisType.Explicit,))
    closed = jax.make_jaxpr(lambda x: jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec("a"))))(
        jax.ShapeDtypeStruct((1,), "float32"))
    return closed.jaxpr.eqns[0].primitive


# ``jax.sharding.reshard(x, sharding)``: an identity whose result must have ``sharding`` (param
# ``dst_sharding``), as ``with_sharding_constraint`` asks of its (param ``sharding``).
RESHARD_P = _reshard_primitive()
# Identity primitives that fix their result's sharding → the param holding that sharding.
SHARDING_CONSTRAINTS: dict[Any, str] = {P.sharding_constraint_p: "sharding", RESHARD_P: "dst_sharding"}

_HLO_NAME: dict[Any, str] = {
    P.dot_general_p: "dot", P.add_p: "add", P.add_jaxvals_p: "add", P.sub_p: "subtract",
    P.mul_p: "multiply", P.div_p: "divide", P.max_p: "maximum", P.min_p: "minimum",
    P.neg_p: "negate", P.exp_p: "exponential", P.log_p: "log", P.tanh_p: "tanh",
    P.logistic_p: "logistic", P.sqrt_p: "sqrt", P.rsqrt_p: "rsqrt", P.pow_p: "power",
    P.integer_pow_p: "power", P.abs_p: "abs", P.sign_p: "sign",
    P.convert_element_type_p: "convert", P.select_n_p: "select", P.broadcast_in_dim_p: "broadcast",
    P.reshape_p: "reshape", P.squeeze_p: "reshape", P.transpose_p: "transpose",
    P.reduce_sum_p: "reduce", P.reduce_max_p: "reduce", P.reduce_min_p: "reduce",
    P.reduce_prod_p: "reduce", P.argmax_p: "reduce", P.argmin_p: "reduce",
    P.conv_general_dilated_p: "convolution", P.gather_p: "gather", P.scatter_add_p: "scatter",
    P.scatter_p: "scatter", P.dynamic_slice_p: "dynamic-slice",
    P.dynamic_update_slice_p: "dynamic-update-slice", P.concatenate_p: "concatenate",
    P.iota_p: "iota", P.slice_p: "slice", P.pad_p: "pad", P.eq_p: "compare", P.ne_p: "compare",
    P.lt_p: "compare", P.le_p: "compare", P.gt_p: "compare", P.ge_p: "compare",
    P.sharding_constraint_p: "custom-call", P.stop_gradient_p: "copy", P.copy_p: "copy",
    P.cumsum_p: "reduce-window", P.while_p: "while", P.scan_p: "while", P.cond_p: "conditional",
    P.sort_p: "sort", P.rng_bit_generator_p: "rng-bit-generator", P.erf_p: "erf",
    P.reduce_window_sum_p: "reduce-window", P.reduce_window_max_p: "reduce-window",
}


def hlo_name(primitive: Any) -> str:
    """The HLO counterpart's name, or the primitive's own name when there is none listed."""
    return _HLO_NAME.get(primitive, str(primitive))


FlopsRule = Callable[..., float]
_FLOPS: dict[Any, FlopsRule] = {}


def _dot_flops(outs: Sequence[TensorInfo], lhs: TensorInfo, rhs: TensorInfo, *,
               dimension_numbers: Any, **_: Any) -> float:
    # An FMA is 2 FLOPs: 2 · (output elements) · (contracted elements).
    (lc, _rc), _ = dimension_numbers
    return 2.0 * outs[0].size * math.prod(lhs.shape[d] for d in lc)


def _conv_flops(outs: Sequence[TensorInfo], lhs: TensorInfo, rhs: TensorInfo, *,
                dimension_numbers: Any, feature_group_count: int = 1, **_: Any) -> float:
    # 2 · output elements · (kernel window × input features per group).
    rhs_spec = dimension_numbers.rhs_spec  # (out feature, in feature, spatial...)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * outs[0].size * window * rhs.shape[rhs_spec[1]]


def _reduce_flops(outs: Sequence[TensorInfo], x: TensorInfo, *rest: TensorInfo, **_: Any) -> float:
    return float(x.size)  # one add (or compare) per input element


_FLOPS[P.dot_general_p] = _dot_flops
_FLOPS[P.conv_general_dilated_p] = _conv_flops
for _p in (P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p, P.argmax_p,
           P.argmin_p, P.cumsum_p):
    _FLOPS[_p] = _reduce_flops

# Element-wise arithmetic: one FLOP per output element (transcendentals counted as one, as
# XLA's cost analysis does).
ELEMENTWISE = {
    P.add_p, P.add_jaxvals_p, P.sub_p, P.mul_p, P.div_p, P.max_p, P.min_p, P.neg_p, P.exp_p,
    P.exp2_p, P.log_p, P.log1p_p, P.expm1_p, P.tanh_p, P.logistic_p, P.sqrt_p, P.rsqrt_p,
    P.cbrt_p, P.pow_p, P.integer_pow_p, P.abs_p, P.sign_p, P.erf_p, P.erfc_p, P.erf_inv_p,
    P.sin_p, P.cos_p, P.tan_p, P.floor_p, P.ceil_p, P.round_p, P.rem_p, P.atan2_p, P.square_p,
    P.select_n_p, P.eq_p, P.ne_p, P.lt_p, P.le_p, P.gt_p, P.ge_p, P.and_p, P.or_p, P.not_p,
    P.xor_p, P.is_finite_p, P.clamp_p, P.nextafter_p, P.convert_element_type_p,
    P.stop_gradient_p, P.copy_p, P.reduce_precision_p, P.lgamma_p, P.digamma_p,
    P.shift_left_p, P.shift_right_logical_p, P.shift_right_arithmetic_p, P.imag_p, P.real_p,
    P.population_count_p, P.clz_p, P.asin_p, P.acos_p, P.atan_p, P.sinh_p, P.cosh_p,
    P.asinh_p, P.acosh_p, P.atanh_p,
}
_ARITH_FREE = {P.convert_element_type_p, P.stop_gradient_p, P.copy_p, P.reduce_precision_p}


def op_flops(primitive: Any, outs: Sequence[TensorInfo], ins: Sequence[TensorInfo],
             params: dict[str, Any]) -> float:
    rule = _FLOPS.get(primitive)
    if rule is not None:
        return float(rule(outs, *ins, **params))
    if primitive in ELEMENTWISE and primitive not in _ARITH_FREE:
        return float(sum(o.size for o in outs))
    return 0.0
