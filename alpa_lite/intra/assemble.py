"""A solved intra-op problem as a ``Plan``: each op's layout, the input and output specs, the
cost split (compute, communication, resharding, memory) and the predicted collectives,
resharding included (a tensor moved to a spec once, for all its readers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from alpa_lite.intra.problem import IntraOpProblem, peak_memory
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.result.plan import OpLayout, Plan, PlanCost, PredictedCollective, SolverInfo, StageInfo
from cost_model.builder import StrategyGraph
from cost_model.resharding import reshard
from ilp import IlpSolution


def assemble_plan(iop: IntraOpProblem, sol: IlpSolution, *, method: str, mesh: Any,
                  static: Sequence[int], donate: Sequence[int], num_args: int,
                  timings: dict[str, float], note: str = "") -> Plan:
    """The one-stage ``Plan`` of solution ``sol`` of ``iop`` (also each pipeline layer's)."""
    sg: StrategyGraph = iop.sgraph
    g, cluster = sg.graph, sg.cluster
    n_ops = len(g.ops)
    chosen = [sg.strategies[v][sol.choice[v]] for v in range(n_ops)]
    layouts = tuple(OpLayout(s.out_specs, s.in_specs, v in sg.unconstrained)
                    for v, s in enumerate(chosen))
    input_specs = tuple(chosen[g.producer[t]].out_specs[0] for t in g.inputs)
    sink_spec = {pos: iop.sink_specs[k][sol.choice[n_ops + k]]
                 for k, pos in enumerate(iop.sink_outputs)}
    output_specs = tuple(sink_spec[p] if p in sink_spec else input_specs[iop.ties[p]]
                         for p in range(len(g.outputs)))
    compute = sum(s.compute_s for s in chosen)
    comm = sum(s.comm_s for s in chosen)
    colls = [PredictedCollective(c.kind, c.axes, c.nbytes, c.group_size, str(g.ops[v]))
             for v, s in enumerate(chosen) for c in s.collectives]
    resh = 0.0
    moved: set[tuple[int, ShardingSpec]] = set()
    for e, ref in zip(iop.problem.edges, iop.edge_refs):
        i, j = sol.choice[e.src], sol.choice[e.dst]
        cost = float(e.cost[i, j])
        src_spec = chosen[ref.src_op].out_specs[ref.out_index]
        want = dst_spec(iop, chosen, ref, sol)
        if cost <= 0 or (ref.tensor, want) in moved:
            continue  # the emitted program moves a tensor to a spec once, for all its readers
        moved.add((ref.tensor, want))
        _, cs = reshard(src_spec, want, g.tensors[ref.tensor], cluster)
        colls.extend(PredictedCollective(c.kind, c.axes, c.nbytes, c.group_size,
                                         f"{g.ops[ref.src_op]} → {_node_name(iop, ref.dst_node)}")
                     for c in cs)
        if src_spec.is_partial:
            comm += cost
        else:
            resh += cost
    peak = peak_memory(iop, sol.choice)  # every resharded copy charged exactly (problem)
    cost = PlanCost(float(compute), float(comm), float(resh), peak,
                    float(sum(s.hbm_s for s in chosen)))
    solver = SolverInfo(sol.status, sol.objective, sol.bound, sol.gap, sol.wall_s,
                        sol.num_variables, sol.num_constraints, note, nodes=iop.problem.num_nodes,
                        leaders=sol.leaders, tied_classes=sol.tied_classes or 0, solves=sol.solves)
    stage = StageInfo((0, max(g.num_layers - 1, 0)), tuple(cluster.mesh_shape),
                      tuple(range(cluster.num_devices)), cost.total_s, peak)
    warnings = tuple(f"no sharding rule for {p}: left to XLA, costed as replicated"
                     for p in sg.missing_rules)
    return Plan(method=method, mesh_shape=tuple(cluster.mesh_shape),
                axis_names=tuple(cluster.axis_names),
                signature=tuple((t.shape, t.dtype) for t in (g.tensors[i] for i in g.inputs)),
                input_specs=input_specs, output_specs=output_specs, layouts=layouts,
                op_kinds=tuple(op.kind for op in g.ops), cost=cost, collectives=tuple(colls),
                solver=solver, stages=(stage,), static_argnums=tuple(static),
                donate_argnums=tuple(donate), num_args=num_args, cluster=cluster.to_dict(),
                timings=timings, warnings=warnings, graph=g,
                mesh=mesh if isinstance(mesh, jax.sharding.Mesh) else mesh)


def dst_spec(iop: IntraOpProblem, chosen: Sequence[Any], ref: Any, sol: IlpSolution) -> ShardingSpec:
    """The spec edge ``ref``'s reader wants under ``sol`` (``chosen``: each op's strategy)."""
    n_ops = len(iop.sgraph.graph.ops)
    if ref.dst_node >= n_ops:
        k = ref.dst_node - n_ops
        return iop.sink_specs[k][sol.choice[ref.dst_node]]
    s = chosen[ref.dst_node]
    return s.in_specs[ref.operand] if ref.operand >= 0 else s.out_specs[0]


def _node_name(iop: IntraOpProblem, node: int) -> str:
    return iop.problem.names[node] if node < len(iop.problem.names) else f"node{node}"
