"""A quick starting plan for CP-SAT: greedy in program order, then coordinate descent.

Each leader v, in index (program) order, takes argmin_i c_v[i] + Σ_(a,v) R_av[i_a, i] over the
neighbours already placed; then a few passes re-pick every leader given all its neighbours
(each pass can only lower the cost). Memory is ignored: CP-SAT repairs a hint that breaks it.
Given to CP-SAT as a solution hint, it makes large models (deep transformers on 2-D meshes)
start from a sensible plan instead of the first feasible one.
"""

from __future__ import annotations

import numpy as np

from ilp.reduced import Simplified


def _neighbour_costs(simple: Simplified, adj: dict[int, list], v: int, choice: dict[int, int]) -> np.ndarray:
    total = simple.costs[v].copy()
    for (a, b), matrix in adj[v]:
        if a == v and b in choice:
            total = total + matrix[:, choice[b]]
        elif b == v and a in choice:
            total = total + matrix[choice[a], :]
    return total


def greedy_choice(simple: Simplified, passes: int = 3) -> dict[int, int]:
    adj: dict[int, list] = {v: [] for v in simple.costs}
    for key, matrix in simple.edges.items():
        adj[key[0]].append((key, matrix))
        adj[key[1]].append((key, matrix))
    choice: dict[int, int] = {}
    for v in sorted(simple.costs):
        choice[v] = int(np.argmin(_neighbour_costs(simple, adj, v, choice)))
    for _ in range(passes):
        changed = False
        for v in sorted(simple.costs):
            others = {k: c for k, c in choice.items() if k != v}
            best = int(np.argmin(_neighbour_costs(simple, adj, v, others)))
            if best != choice[v]:
                choice[v], changed = best, True
        if not changed:
            break
    return choice


def add_hint(model, simple: Simplified, choice: dict[int, int]) -> None:
    """Hint s_v[i] = [i == choice_v] and each edge pair (of classes) variable accordingly."""
    for v, s in model.s.items():
        for i, var in enumerate(s):
            model.cp.add_hint(var, int(i == choice[v]))
    for (a, b), ev in model.e.items():
        picked = ev.value(choice[a], choice[b])
        for pair, var in ev.pairs.items():
            model.cp.add_hint(var, int(pair == picked))
