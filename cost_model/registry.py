"""The per-primitive strategy rule table.

``@register_strategy(lax.dot_general_p)`` files a rule; the builder calls
``rule(ctx, *operands, **eqn.params)`` with ``operands`` the operand ``TensorInfo``s and
``ctx.outs`` the results, so each rule names only the params it reads. A primitive with no rule
falls back to ``replicated_strategy`` with one warning naming it (never a crash).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cost_model.strategy import Strategy

log = logging.getLogger("alpa_lite.cost_model")

Rule = Callable[..., list[Strategy]]
_RULES: dict[Any, Rule] = {}
_WARNED: set[str] = set()


def register_strategy(*primitives: Any) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` gives the strategies of every primitive listed."""

    def deco(rule: Rule) -> Rule:
        for p in primitives:
            _RULES[p] = rule
        return rule

    return deco


def rule_for(primitive: Any) -> Rule | None:
    return _RULES.get(primitive)


def has_rule(primitive: Any) -> bool:
    return primitive in _RULES


def warn_missing(primitive: Any) -> None:
    """Log once per primitive that it has no rule and is costed as replicated."""
    name = str(primitive)
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("alpa-lite has no sharding rule for primitive %r: it is left to XLA in the "
                    "emitted program and costed as replicated", name)
