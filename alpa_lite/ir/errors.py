"""Errors the planner raises on bad input. Every one is a ``PlanningError``."""

from __future__ import annotations


class PlanningError(Exception):
    """Base class of every error alpa-lite raises on bad input; the message says what to do."""


class UnsupportedError(PlanningError):
    """The program uses something the planner cannot handle."""


class MeshError(PlanningError):
    """A mesh string, mesh shape or cluster description is wrong."""


class ShardingError(PlanningError):
    """A sharding cannot be applied: a dimension not divisible by its mesh axes, a clash, ..."""


class InfeasibleError(PlanningError):
    """No plan fits the memory budget; the message names the smallest memory that would fit."""


class CutOffError(PlanningError):
    """No plan can cost less than a cutoff the caller gave: a candidate that cannot win (the
    one-stage plan beside a faster pipeline), abandoned before its search."""

    def __init__(self, message: str, bound: float, cutoff: float) -> None:
        super().__init__(message)
        self.bound, self.cutoff = bound, cutoff


class PlanFileError(PlanningError):
    """A plan file is corrupt, from another version, or for another input signature."""


class SignatureError(PlanningError):
    """A plan was applied to arguments of other shapes or dtypes than it was made for."""
