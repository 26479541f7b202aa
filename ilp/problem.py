"""The ILP's input and output as plain frozen data, and ``evaluate`` to score a choice.

A problem is a graph: every node (an op) picks one strategy out of ``len(node_costs[v])``; an
edge charges a resharding cost for the pair of strategies at its two ends; memory is bounded at
every program point over the nodes alive there. ``np.inf`` marks a forbidden strategy (node
cost) or a forbidden pair (edge cost). Arrays are copied to read-only float64 on construction.

Array-holding classes use ``eq=False``: the generated ``__eq__`` would compare numpy arrays and
fail with "truth value of an array is ambiguous", so they compare by identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


def _frozen_array(values, ndim: int, what: str) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == np.float64 and not values.flags.writeable \
            and values.ndim == ndim:
        return values  # already frozen: a problem rebuilt with other rows shares its arrays
    array = np.array(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Edge:
    """Resharding cost between node ``src`` and node ``dst``.

    ``cost[i, j]`` is the seconds charged when ``src`` takes strategy ``i`` and ``dst`` takes
    strategy ``j``; ``np.inf`` forbids that pair.
    """

    src: int
    dst: int
    cost: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", int(self.src))
        object.__setattr__(self, "dst", int(self.dst))
        object.__setattr__(self, "cost", _frozen_array(self.cost, 2, "Edge.cost"))


@dataclass(frozen=True, eq=False)
class IlpProblem:
    """One intra-op planning problem; ``validate`` runs on construction.

    node_costs: per node, seconds per strategy (compute + its own communication); np.inf forbids.
    edges: several edges between one pair add up; an edge may point "backwards" (ties).
    memory: per node, bytes per device each strategy keeps alive.
    live_sets: per program point, the nodes alive there.
    memory_budget: bytes per device; None means unbounded.
    names: optional node names, used in messages.
    """

    node_costs: tuple[np.ndarray, ...]
    edges: tuple[Edge, ...]
    memory: tuple[np.ndarray, ...]
    live_sets: tuple[tuple[int, ...], ...]
    memory_budget: float | None = None
    names: tuple[str, ...] = ()
    # follow[u] = (v, j): strategy j[i] of node u lays out its value as strategy i of node v does
    # (-1: none). Lets merging fold u into v the way Alpa does; without it a heuristic is used.
    follow: Mapping[int, tuple[int, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        costs = tuple(
            _frozen_array(c, 1, f"node_costs[{v}]") for v, c in enumerate(self.node_costs)
        )
        memory = tuple(_frozen_array(m, 1, f"memory[{v}]") for v, m in enumerate(self.memory))
        live_sets = tuple(tuple(int(v) for v in live) for live in self.live_sets)
        object.__setattr__(self, "node_costs", costs)
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "edges", tuple(self.edges))
        object.__setattr__(self, "live_sets", live_sets)
        object.__setattr__(self, "names", tuple(self.names))
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", float(self.memory_budget))
        validate(self)

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    def name(self, v: int) -> str:
        return self.names[v] if self.names else f"node {v}"


# Deterministic work units per second of a time limit: ``IlpOptions`` without ``deterministic_time``
# gets this share of its wall limit in units, and ``al.plan``'s ``time_limit_s`` becomes this many
# units per second under ``IlpOptions.deterministic`` (its wall clock then a safety net).
DETERMINISTIC_SHARE = 0.5
# The wall-clock safety net of a search bounded by deterministic units (``IlpOptions.deterministic``),
# seconds per unit. Measured with ortools 9.15 on this project's 2-core machine: idle, 0.2 to 0.6
# units per second on planning models (a 96-layer GPT's tied model: 6.2 units in 12.6 s), with
# other work beside it 0.1 to 0.3 (17.4 units in 60 s seen): 10 s per unit leaves the
# deterministic limit the one that stops a search down to 0.1 units per second.
WALL_S_PER_UNIT = 10.0


@dataclass(frozen=True)
class IlpOptions:
    """How to solve. ``num_workers=1`` with a fixed seed makes CP-SAT deterministic when it
    finishes within its limits; ``deterministic_time`` (CP-SAT's ``max_deterministic_time``, in
    its own work units, of the order of seconds) bounds the search reproducibly, unlike the
    wall-clock ``time_limit_s``. Left None it is ``DETERMINISTIC_SHARE × time_limit_s``, so that
    on a machine not overloaded the deterministic limit stops a long search first and the same
    input gives the same plan; ``IlpSolution.wall_clock_stop`` says when the wall clock did."""

    time_limit_s: float = 30.0
    num_workers: int = 1
    random_seed: int = 0
    merge_followers: bool = True
    deterministic_time: float | None = None
    log_progress: bool = False
    # Leaf elimination and dead-end pruning (``ilp.eliminate``): exact, off only to see the
    # whole model (tests of its size).
    eliminate: bool = True
    # The LP relaxation first (``ilp.lp_first``): an integral optimum ends the solve without
    # CP-SAT. Off to see CP-SAT's model (tests of its size) or CP-SAT's own search.
    lp_first: bool = True
    # Abandon the solve (``CutOffError``) when the LP relaxation's bound on the objective, in
    # seconds, passes this: the caller has a plan at least this fast (``ilp.lp_first``).
    cutoff_s: float | None = None
    # On a budget no plan meets, search for the least memory a plan needs to say it in the error
    # (``_PEAK_SOLVE_LIMIT_S`` at most); False: say only that none fits (a caller that weighs
    # candidates and needs only the verdict).
    explain_infeasible: bool = True
    # Identical layers solved once (``ilp.symmetry``): refinement rounds (0: never tie), and the
    # smallest model (leader nodes after merging) worth it; small models solve exactly anyway.
    # Rounds = the radius (in edges) of the neighbourhood tied nodes share. Measured on GPT
    # training steps (2 and 4 layers, meshes (8,) and 2x4): 2 rounds give the same optimum as the
    # untied model with the smallest tied model; more rounds split the copies of a block by
    # their distance to the program's ends (embedding, loss) and give larger models.
    tie_rounds: int = 2
    tie_min_nodes: int = 300

    @classmethod
    def deterministic(cls, units: float, min_wall_s: float = 10.0, **kw) -> IlpOptions:
        """A search bounded by ``units`` of CP-SAT's deterministic time, the same in every run and
        process; the wall clock (``WALL_S_PER_UNIT`` per unit, at least ``min_wall_s``: model
        building and presolve count little deterministic time) only as a safety net."""
        return cls(time_limit_s=max(min_wall_s, WALL_S_PER_UNIT * units), deterministic_time=units, **kw)

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s}")
        if self.deterministic_time is not None and not self.deterministic_time > 0:
            raise ValueError(f"deterministic_time must be positive, got {self.deterministic_time}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")


@dataclass(frozen=True)
class IlpSolution:
    """A solved problem. ``choice`` is on the original nodes; ``objective`` is recomputed in float
    from it; ``bound`` and ``gap`` are CP-SAT's, for the model it solved (after merging)."""

    choice: tuple[int, ...]
    status: str
    objective: float
    bound: float
    gap: float
    wall_s: float
    num_variables: int
    num_constraints: int
    peak_memory: float
    leaders: int = 0  # nodes after follower merging
    model_nodes: int = 0  # nodes left after leaf elimination (``ilp.eliminate``)
    tied_classes: int | None = None  # nodes of the tied model (``ilp.symmetry``); None: untied
    wall_clock_stop: bool = False  # stopped by time_limit_s before the deterministic limit
    solves: int = 1  # CP-SAT solves it took (``alpa_lite.intra.fit`` solves again when a plan overshoots)


def validate(problem: IlpProblem) -> None:
    """Raise ValueError when shapes, indices or values are inconsistent."""
    n = problem.num_nodes
    if len(problem.memory) != n:
        raise ValueError(f"memory has {len(problem.memory)} entries for {n} nodes")
    for v, (c, m) in enumerate(zip(problem.node_costs, problem.memory, strict=True)):
        if c.size == 0:
            raise ValueError(f"node {v} has no strategy")
        if m.shape != c.shape:
            raise ValueError(f"node {v}: memory shape {m.shape} != cost shape {c.shape}")
        if np.isnan(c).any() or (c == -np.inf).any():
            raise ValueError(f"node {v}: costs must be finite or +inf")
        if not np.isfinite(m).all() or (m < 0).any():
            raise ValueError(f"node {v}: memory must be finite and non-negative")
    for k, e in enumerate(problem.edges):
        if not (0 <= e.src < n and 0 <= e.dst < n) or e.src == e.dst:
            raise ValueError(f"edge {k} ({e.src} -> {e.dst}) is a self-loop or out of range")
        want = (problem.node_costs[e.src].size, problem.node_costs[e.dst].size)
        if e.cost.shape != want:
            raise ValueError(f"edge {k} ({e.src} -> {e.dst}): cost shape {e.cost.shape} != {want}")
        if np.isnan(e.cost).any() or (e.cost == -np.inf).any():
            raise ValueError(f"edge {k}: costs must be finite or +inf")
    for t, live in enumerate(problem.live_sets):
        if any(not 0 <= v < n for v in live):
            raise ValueError(f"live set {t} names a node out of range: {live}")
    if problem.names and len(problem.names) != n:
        raise ValueError(f"{len(problem.names)} names for {n} nodes")
    if problem.memory_budget is not None and np.isnan(problem.memory_budget):
        raise ValueError("memory_budget is NaN")


def evaluate(problem: IlpProblem, choice) -> tuple[float, float]:
    """``(cost_seconds, peak_memory_bytes)`` of a choice of one strategy per node.

    cost = Σ_v c_v[choice_v] + Σ_edges R[choice_src, choice_dst] (np.inf if anything forbidden);
    peak = max over live sets t of Σ_{v in t} m_v[choice_v] (0 without live sets). A node that
    appears twice in a live set counts once.
    """
    choice = tuple(int(i) for i in choice)
    if len(choice) != problem.num_nodes:
        raise ValueError(f"choice has {len(choice)} entries for {problem.num_nodes} nodes")
    cost = sum(float(c[i]) for c, i in zip(problem.node_costs, choice, strict=True))
    cost += sum(float(e.cost[choice[e.src], choice[e.dst]]) for e in problem.edges)
    peak = max(
        (sum(float(problem.memory[v][choice[v]]) for v in set(live)) for live in problem.live_sets),
        default=0.0,
    )
    return cost, peak
