"""The rest of a pipelined step (the optimizer update), run once per step on each stage's own
sub-mesh.

Every variable of the step after ``al.value_and_grad`` gets a *home*: a weight and its gradient
live on the stage that owns the weight (the first stage reading it), the loss and the aux
outputs on the stage computing them; anything computed only from variables without a home (the
optimizer's step count, its bias corrections) has none and is recomputed wherever it is needed.
An equation's home is its inputs' homes. When each equation has at most one, the update splits
into one program per stage: the stage's outputs and what they need, inputs moved onto that
stage's sub-mesh (an optimizer-state leaf in the spec of the weight it belongs to, the rest
replicated). An equation reading two stages' variables (gradient-norm clipping, a weight shared
by two stages' updates) makes the split impossible: the whole update then runs as one program on
the whole mesh, every input replicated there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from alpa_lite.pipeline.program import StepProgram, eval_eqns, is_literal
from alpa_lite.pipeline.stage import StageProgram, move

Var = Any


class Segment:
    """Equations of the step as one jitted function of the variables they read from outside."""

    def __init__(self, eqns: Sequence[Any], outputs: Sequence[Var]) -> None:
        made = {v for e in eqns for v in e.outvars}
        self.eqns = tuple(eqns)
        self.inputs = list(dict.fromkeys(x for e in eqns for x in e.invars if not is_literal(x) and x not in made))
        self.outputs = [v for v in dict.fromkeys(outputs) if v in made]

        def f(*xs: Any) -> list[Any]:
            env = dict(zip(self.inputs, xs))
            eval_eqns(self.eqns, env)
            return [env[v] for v in self.outputs]

        self.fn = jax.jit(f)

    def run(self, env: dict[Var, Any], shardings: Sequence[Any]) -> None:
        if not self.outputs:
            return
        xs = [move(env[v], s) for v, s in zip(self.inputs, shardings)]
        env.update(zip(self.outputs, self.fn(*xs)))


def backward_slice(eqns: Sequence[Any], outputs: Sequence[Var]) -> list[Any]:
    """The equations ``outputs`` depend on, in program order."""
    need = {v for v in outputs if not is_literal(v)}
    keep = []
    for e in reversed(eqns):
        if e.effects or any(v in need for v in e.outvars):
            keep.append(e)
            need.update(x for x in e.invars if not is_literal(x))
    return keep[::-1]


class StageUpdates:
    """The post-gradient part of the step: per stage when it splits, else one program."""

    def __init__(self, prog: StepProgram, stages: Sequence[StageProgram], full_mesh: Any,
                 state_pairs: dict[int, int]) -> None:
        self.prog, self.stages, self.full_mesh = prog, list(stages), full_mesh
        home, spec = self._homes(state_pairs)
        eqns = prog.post_eqns
        homes = self._propagate(eqns, home)
        outs = [v for v in prog.jaxpr.outvars if not is_literal(v)]
        self.per_stage: list[tuple[Segment, list[Any]]] | None = None
        self.global_segment: Segment | None = None
        if homes is None:
            self.global_segment = Segment(eqns, outs)
            return
        self.per_stage = []
        for p, sp in enumerate(self.stages):
            mine = [v for v in outs if homes.get(v, 0) == p]
            seg = Segment(backward_slice(eqns, mine), mine)
            shard = [NamedSharding(sp.mesh, spec[v].to_partition_spec()) if v in spec and homes.get(v) == p
                     else NamedSharding(sp.mesh, PartitionSpec()) for v in seg.inputs]
            self.per_stage.append((seg, shard))

    def _homes(self, state_pairs: dict[int, int]) -> tuple[dict[Var, int], dict[Var, Any]]:
        """Homes (stage index) and specs of the update's inputs: weights, gradients, loss, aux,
        and optimizer-state leaves paired with a weight."""
        prog = self.prog
        owner, spec = {}, {}
        for p, sp in enumerate(self.stages):
            for v in sp.weights:
                if v not in owner:
                    owner[v], spec[v] = p, sp.specs[v]
        home: dict[Var, int] = {}
        loss = prog.loss
        for k, (operand, var) in enumerate(zip(prog.vag.invars, loss.invars)):
            if not is_literal(operand) and var in owner and not prog.micro[k]:
                home[operand], spec[operand] = owner[var], spec[var]
        outs = prog.vag.outvars
        made = {v: p for p, sp in enumerate(self.stages) for v in sp.acts_out}
        for k, v in enumerate(loss.outvars):
            if not is_literal(v) and v in made:
                home[outs[k]] = made[v]
        grads = [var for var, d in zip(loss.invars, loss.diff_invars) if d]
        for out, var in zip(outs[len(loss.outvars):], grads):
            home[out] = owner.get(var, 0)
            if var in spec:
                spec[out] = spec[var]
        invars = prog.jaxpr.invars
        for s_pos, w_pos in state_pairs.items():
            w = invars[w_pos]
            if w in home:
                home[invars[s_pos]], spec[invars[s_pos]] = home[w], spec[w]
        return home, spec

    @staticmethod
    def _propagate(eqns: Sequence[Any], home: dict[Var, int]) -> dict[Var, int] | None:
        homes = dict(home)
        for e in eqns:
            hs = {homes[x] for x in e.invars if not is_literal(x) and x in homes}
            if len(hs) > 1:
                return None
            if hs:
                homes.update((v, hs.pop()) for v in e.outvars)
        return homes

    @property
    def split(self) -> bool:
        return self.per_stage is not None

    def run(self, env: dict[Var, Any]) -> None:
        if self.global_segment is not None:
            rep = NamedSharding(self.full_mesh, PartitionSpec())
            self.global_segment.run(env, [rep] * len(self.global_segment.inputs))
            return
        for seg, shard in self.per_stage:
            seg.run(env, shard)
