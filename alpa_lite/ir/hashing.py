"""``cached_hash``: a frozen dataclass that computes its hash once.

The cost model memoises on specs, tensors and the cluster (``functools.lru_cache`` keys), and a
frozen dataclass's generated ``__hash__`` hashes every field again on each lookup: for the
cluster (device model, links) and for a spec (a tuple of tuples) that was 51M ``hash`` calls,
11 s of 52 s, when building a 96-layer GPT's problem under cProfile.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)


def cached_hash(cls: T) -> T:
    """Apply after ``@dataclass(frozen=True)``: the generated hash, computed once per object.

    The hash is kept out of pickles (``__getstate__``): string hashes differ between
    processes (``PYTHONHASHSEED``), so an unpickled object computes its own."""
    field_hash = cls.__hash__

    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]
        except KeyError:
            value = field_hash(self)
            object.__setattr__(self, "_hash", value)  # frozen: bypass its __setattr__
            return value

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

    cls.__hash__ = __hash__
    cls.__getstate__ = __getstate__
    return cls
