"""How an argument leaf looks to ``jax.jit``: the one definition of an input's type that tracing,
plan signatures and ``@al.parallelize``'s cache share.

``jax.jit`` sees a leaf through ``jax.typeof``: a Python scalar is a weakly typed int32/float32,
a NumPy int64 or float64 (a step count restored from a checkpoint) is int32/float32 unless x64 is
on, a committed ``jax.Array`` carries its sharding in the type on an Explicit mesh. A plan is made
for shapes and dtypes only: the sharding an input arrives with is recorded separately (a hard
constraint, ``tracing.tracer._input_spec``), never put into the traced types, where jax's
sharding-in-types rules would fail on the program's own layout ("Contracting dimensions are
sharded") before the planner chose one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def leaf_aval(x: Any) -> jax.ShapeDtypeStruct:
    """Shape, canonical dtype and weak type of ``x`` as ``jax.jit`` traces it; no sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        dtype = x.dtype if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) else \
            jax.dtypes.canonicalize_dtype(x.dtype)
        return jax.ShapeDtypeStruct(x.shape, dtype, weak_type=x.weak_type)
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def dtype_name(dtype: Any) -> str:
    """numpy's name of a dtype; extended dtypes (PRNG keys) keep jax's name, e.g. 'key<fry>'."""
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return str(dtype)


def leaf_signature(x: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of a leaf as a plan's signature lists it (weak types left out: the
    compiled plan replays the traced program, whose ops have their dtypes already)."""
    aval = leaf_aval(x)
    return tuple(int(d) for d in aval.shape), dtype_name(aval.dtype)
