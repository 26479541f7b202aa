"""ilp package.

Intra-op planning as an integer program: one sharding strategy per op, minimum cost within a
per-device memory budget, solved with OR-Tools CP-SAT (``ilp.solver`` states the model).
Needs numpy and ortools; it never imports jax itself (its one alpa_lite import is
``alpa_lite.ir.errors``).
"""

from ilp.problem import Edge, IlpOptions, IlpProblem, IlpSolution, evaluate
from ilp.solver import NoSolutionError, solve

__all__ = [
    "Edge",
    "IlpOptions",
    "IlpProblem",
    "IlpSolution",
    "NoSolutionError",
    "evaluate",
    "solve",
]
