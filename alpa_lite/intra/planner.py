"""``al.plan``: trace → strategies → ILP → a ``Plan`` (one stage; the stage DP builds on it).

Carried state: a training step returns its new state (params, optimizer state) in the same
pytree shape as the inputs it came from; those outputs are tied to the inputs' specs and the
emitted jit donates them. The other inputs are the batch (``batch_argnums`` overrides).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from alpa_lite.emit.program import OpLayout
from alpa_lite.intra.baselines import BASELINES, baseline_input_specs, baseline_masks
from alpa_lite.intra.fit import solve_within_budget
from alpa_lite.intra.problem import IntraOpProblem, build_problem, peak_memory
from alpa_lite.ir.cluster import ClusterSpec
from alpa_lite.ir.errors import MeshError, PlanningError
from alpa_lite.ir.graph import OpGraph
from alpa_lite.ir.specs import ShardingSpec
from alpa_lite.result.plan import Plan, PlanCost, PredictedCollective, SolverInfo, StageInfo
from alpa_lite.tracing.tracer import trace
from cost_model.builder import StrategyGraph, build_strategies
from cost_model.resharding import reshard
from ilp import IlpOptions, IlpSolution, NoSolutionError
from ilp.problem import DETERMINISTIC_SHARE

log = logging.getLogger("alpa_lite.intra.planner")
METHODS = ("auto", *BASELINES)


def resolve_mesh(mesh: Any, cluster: ClusterSpec | None) -> tuple[Any, ClusterSpec]:
    """A (concrete or abstract) mesh and the cluster figures viewed on its axes."""
    if mesh is None and cluster is None:
        raise MeshError("give mesh= (a jax Mesh or AbstractMesh) or cluster= (a ClusterSpec)")
    if mesh is None:
        mesh = jax.sharding.AbstractMesh(cluster.mesh_shape, cluster.axis_names)
    if not hasattr(mesh, "axis_names") or not hasattr(mesh, "axis_sizes"):
        raise MeshError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__}")
    shape, names = tuple(int(s) for s in mesh.axis_sizes), tuple(mesh.axis_names)
    if cluster is None:
        cluster = ClusterSpec.from_mesh(mesh)
    elif math.prod(cluster.mesh_shape) != math.prod(shape) and cluster.mesh_shape != shape:
        log.info("viewing cluster %s as mesh %s", cluster.mesh_shape, shape)
    return mesh, cluster.with_mesh(shape, names)


def _leaf_avals(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(np.shape(x)), str(np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)))
            for x in jax.tree.leaves(tree)]


def find_ties(graph: OpGraph | None, args: Sequence[Any], static: Sequence[int],
              out_example: Any) -> tuple[dict[int, int], list[int]]:
    """Flat output position → flat input position for carried state; and the args tied whole.

    An output (a top-level element of a tuple result, or the whole result) is carried state
    when some dynamic argument has the same pytree structure and leaf shapes/dtypes.
    """
    dyn_idx = [i for i in range(len(args)) if i not in static]
    starts, n = {}, 0
    for i in dyn_idx:
        starts[i] = n
        n += len(jax.tree.leaves(args[i]))
    outs = list(out_example) if isinstance(out_example, (tuple, list)) else [out_example]
    ties, tied_args, pos = {}, [], 0
    for o in outs:
        k = len(jax.tree.leaves(o))
        for i in dyn_idx:
            if i in tied_args or not jax.tree.leaves(args[i]):
                continue
            if (jax.tree.structure(args[i]) == jax.tree.structure(o)
                    and _leaf_avals(args[i]) == _leaf_avals(o)):
                for j in range(k):
                    if graph is None or graph.outputs[pos + j] != graph.inputs[starts[i] + j]:  # unchanged: no tie
                        ties[pos + j] = starts[i] + j
                tied_args.append(i)
                break
        pos += k
    return ties, tied_args


def _state_groups(args: Sequence[Any], static: Sequence[int], state_args: Sequence[int]) -> dict[int, int]:
    """Optimizer-state leaf → the parameter leaf with the same tree-path tail and shape."""
    leaves, starts, n = {}, {}, 0
    for i in range(len(args)):
        if i in static:
            continue
        starts[i] = n
        for j, (path, x) in enumerate(jax.tree_util.tree_leaves_with_path(args[i])):
            leaves[n + j] = (i, path, tuple(np.shape(x)))
        n += len(jax.tree.leaves(args[i]))
    if not state_args:
        return {}
    first = state_args[0]
    params = {pos: v for pos, v in leaves.items() if v[0] == first}
    groups = {}
    for pos, (i, path, shape) in leaves.items():
        if i == first or i not in state_args:
            continue
        for ppos, (_, ppath, pshape) in params.items():
            if pshape == shape and len(ppath) <= len(path) and path[len(path) - len(ppath):] == ppath:
                groups[pos] = ppos
                break
    return groups


def plan(fn: Callable[..., Any], *args: Any, mesh: Any = None, cluster: ClusterSpec | None = None,
         method: str = "auto", memory_budget: float | None = None, num_stages: int | None = None,
         num_microbatches: int | None = None, batch_argnums: Sequence[int] | None = None,
         donate_argnums: Sequence[int] | None = None, static_argnums: Sequence[int] = (),
         time_limit_s: float = 60.0, progress: Callable[[str], None] | None = None) -> Plan:
    """Plan how to run ``fn(*args)`` on ``mesh`` (see design.md, "Public API").

    ``progress``, when given, is called with each phase's name as it starts: "tracing",
    "strategies", "ILP", "DP" (the CLI shows them on a terminal).
    """
    if method not in METHODS:
        raise PlanningError(f"unknown method {method!r}; choose one of {METHODS}")
    if not time_limit_s > 0:
        raise PlanningError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    if num_stages not in (None, 1) or (num_stages is None and method == "auto"
                                       and _uses_pipeline_markers(fn, args, static_argnums)):
        (progress or (lambda phase: None))("DP")
        from alpa_lite.pipeline.planner import plan_pipeline

        return plan_pipeline(fn, *args, mesh=mesh, cluster=cluster, method=method,
                             memory_budget=memory_budget, num_stages=num_stages,
                             num_microbatches=num_microbatches, batch_argnums=batch_argnums,
                             static_argnums=static_argnums, time_limit_s=time_limit_s, progress=progress)
    return plan_one_stage(fn, *args, mesh=mesh, cluster=cluster, method=method, memory_budget=memory_budget,
                          batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                          static_argnums=static_argnums, time_limit_s=time_limit_s, progress=progress)


def plan_one_stage(fn: Callable[..., Any], *args: Any, mesh: Any = None, cluster: ClusterSpec | None = None,
                   method: str = "auto", memory_budget: float | None = None,
                   batch_argnums: Sequence[int] | None = None, donate_argnums: Sequence[int] | None = None,
                   static_argnums: Sequence[int] = (), time_limit_s: float = 60.0,
                   progress: Callable[[str], None] | None = None, graph: OpGraph | None = None) -> Plan:
    """``plan(..., num_stages=1)``; ``graph``: ``fn`` already traced on ``args`` (the pipeline
    planner traces the step once for its own plan and this candidate)."""
    progress = progress or (lambda phase: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    progress("tracing")
    mesh, cluster = resolve_mesh(mesh, cluster)
    static = tuple(sorted(i % len(args) for i in static_argnums)) if args else ()
    graph = trace(fn, *args, static_argnums=static) if graph is None else graph
    out_example = out_example_of(graph, fn, args, static)
    timings["trace_s"] = time.perf_counter() - t0
    ties, tied_args = find_ties(graph, args, static, out_example)
    t1 = time.perf_counter()
    progress("strategies")
    sgraph = build_strategies(graph, cluster)
    timings["strategies_s"] = time.perf_counter() - t1
    budget = cluster.device.memory if memory_budget is None else float(memory_budget)
    masks = None
    unsplit: list[str] = []
    if method != "auto":
        state, batch = state_and_batch(args, static, tied_args, batch_argnums)
        specs = baseline_input_specs(method, graph, cluster.axis_sizes, cluster.axis_names,
                                     state, batch, _state_groups(args, static, tied_args or [0]), unsplit)
        for message in unsplit:
            log.warning("%s", message)
        masks = baseline_masks(method, sgraph, specs, state)
    t2 = time.perf_counter()
    progress("ILP")
    iop = build_problem(sgraph, ties, budget, masks)
    timings["ilp_build_s"] = time.perf_counter() - t2
    note = ""
    t3 = time.perf_counter()
    try:
        iop, sol = solve_within_budget(
            lambda exact: iop if not exact else build_problem(sgraph, ties, budget, masks, exact_copies=True,
                                                              all_rows=True),
            _ilp_options(time_limit_s))
    except NoSolutionError:
        if method != "auto":
            raise
        iop, sol, name = _fallback_to_baseline(sgraph, ties, budget, args, static, tied_args,
                                               batch_argnums, time_limit_s)
        note = f"ILP timed out: fell back to the {name} baseline"
        log.warning("CP-SAT found no plan within %.3g s; falling back to the %s baseline", time_limit_s, name)
    else:
        if method == "auto" and sol.status != "OPTIMAL":
            # Not proven optimal in time: a hand strategy may still be cheaper. Auto never
            # returns a plan costlier than a baseline the same model can evaluate.
            b_iop, b_sol, name = _fallback_to_baseline(sgraph, ties, budget, args, static, tied_args,
                                                       batch_argnums, time_limit_s)
            if b_sol.objective < sol.objective:
                note = (f"ILP not optimal within {time_limit_s:g} s (its best: {sol.objective * 1e3:.4g} ms); "
                        f"the {name} layout is cheaper and is used")
                iop, sol = b_iop, b_sol
            else:
                note = (f"ILP not proven optimal within {time_limit_s:g} s (gap {sol.gap:.1%}); "
                        f"its plan is cheaper than every baseline layout")
    if sol.wall_clock_stop:
        note += ("; " if note else "") + ("the solver was stopped by the wall clock, not its deterministic "
                                          "limit: another run may give another plan (raise time_limit_s)")
    timings["ilp_solve_s"] = time.perf_counter() - t3  # every solve: rows added, fallbacks
    donate = tuple(tied_args) if donate_argnums is None else tuple(donate_argnums)
    result = assemble_plan(iop, sol, method=method, mesh=mesh, static=static, donate=donate,
                           num_args=len(args), timings=timings, note=note)
    timings["total_s"] = time.perf_counter() - t0
    return replace(result, static_values=tuple(repr(args[i]) for i in static),
                   warnings=result.warnings + tuple(unsplit))


def _ilp_options(time_limit_s: float) -> IlpOptions:
    """``time_limit_s`` as a search budget: ``DETERMINISTIC_SHARE`` of it in CP-SAT's deterministic
    units (the same plan in every run and process), the wall clock a safety net beyond it."""
    return IlpOptions.deterministic(DETERMINISTIC_SHARE * time_limit_s, min_wall_s=time_limit_s)


def _fallback_to_baseline(sgraph: StrategyGraph, ties: dict[int, int], budget: float, args: Sequence[Any],
                          static: Sequence[int], tied_args: Sequence[int], batch_argnums: Sequence[int] | None,
                          time_limit_s: float) -> tuple[IntraOpProblem, IlpSolution, str]:
    """The cheapest hand strategy that solves: (problem, solution, baseline name)."""
    graph = sgraph.graph
    state, batch = state_and_batch(args, static, tied_args, batch_argnums)
    groups = _state_groups(args, static, tied_args or [0])
    best = None
    for m in BASELINES:
        try:
            specs = baseline_input_specs(m, graph, sgraph.cluster.axis_sizes, sgraph.cluster.axis_names,
                                         state, batch, groups)
            mask = baseline_masks(m, sgraph, specs, state)
            # Inputs fixed, a baseline's model is far smaller: give it time enough to be a fallback.
            iop, sol = solve_within_budget(
                lambda exact, mask=mask: build_problem(sgraph, ties, budget, mask, exact_copies=exact,
                                                       all_rows=exact),
                _ilp_options(max(time_limit_s, 30.0)))
        except PlanningError:
            continue
        if best is None or sol.objective < best[1].objective:
            best = (iop, sol, m)
    if best is None:
        raise NoSolutionError(f"no plan found within time_limit_s={time_limit_s:g}, and no baseline "
                              "plan either: raise time_limit_s") from None
    return best


def out_example_of(graph: OpGraph, fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> Any:
    """The result's shapes and dtypes as a pytree, from the traced graph (a second trace costs
    as much as the first: 3 s of 9 for a 96-layer GPT); traced again only for PRNG-key outputs."""
    if graph.out_tree is None or any(graph.tensors[t].dtype.startswith("key<") for t in graph.outputs):
        return jax.eval_shape(lambda *a: fn(*a), *args) if not static else _eval_shape_static(fn, args, static)
    leaves = [jax.ShapeDtypeStruct(graph.tensors[t].shape, np.dtype(graph.tensors[t].dtype)) for t in graph.outputs]
    return jax.tree.unflatten(graph.out_tree, leaves)


def _uses_pipeline_markers(fn: Callable[..., Any], args: Sequence[Any], static_argnums: Sequence[int]) -> bool:
    """Whether ``fn`` computes its gradients with ``al.value_and_grad`` (one ``make_jaxpr``):
    then ``num_stages=None`` weighs pipelines against one stage."""
    from alpa_lite.pipeline.program import uses_value_and_grad

    return uses_value_and_grad(fn, args, tuple(sorted(i % len(args) for i in static_argnums)) if args else ())


def _eval_shape_static(fn: Callable[..., Any], args: Sequence[Any], static: Sequence[int]) -> Any:
    dyn = [a for i, a in enumerate(args) if i not in static]

    def f(*d: Any) -> Any:
        full, it = list(args), iter(d)
        for i in range(len(full)):
            if i not in static:
                full[i] = next(it)
        return fn(*full)

    return jax.eval_shape(f, *dyn)


def state_and_batch(args: Sequence[Any], static: Sequence[int], tied_args: Sequence[int],
                     batch_argnums: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Flat input positions of the state and of the batch."""
    dyn = [i for i in range(len(args)) if i not in static]
    if batch_argnums is not None:
        batch_args = {i % len(args) for i in batch_argnums}
    elif tied_args:
        batch_args = {i for i in dyn if i not in tied_args and i > min(tied_args)}
    else:  # a forward function: the first argument is the weights, the rest the data
        batch_args = set(dyn[1:]) if len(dyn) > 1 else set(dyn)
    state, batch, n = [], [], 0
    for i in dyn:
        k = len(jax.tree.leaves(args[i]))
        (batch if i in batch_args else state).extend(range(n, n + k))
        n += k
    return state, batch


def assemble_plan(iop: IntraOpProblem, sol: IlpSolution, *, method: str, mesh: Any,
                  static: Sequence[int], donate: Sequence[int], num_args: int,
                  timings: dict[str, float], note: str = "") -> Plan:
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
        dst_spec = _dst_spec(iop, chosen, ref, sol)
        if cost <= 0 or (ref.tensor, dst_spec) in moved:
            continue  # the emitted program moves a tensor to a spec once, for all its readers
        moved.add((ref.tensor, dst_spec))
        _, cs = reshard(src_spec, dst_spec, g.tensors[ref.tensor], cluster)
        colls.extend(PredictedCollective(c.kind, c.axes, c.nbytes, c.group_size,
                                         f"{g.ops[ref.src_op]} → {_node_name(iop, ref.dst_node)}")
                     for c in cs)
        if src_spec.is_partial:
            comm += cost
        else:
            resh += cost
    peak = peak_memory(iop, sol.choice)  # every resharded copy charged exactly (intra_op)
    cost = PlanCost(float(compute), float(comm), float(resh), peak)
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


def _dst_spec(iop: IntraOpProblem, chosen: Sequence[Any], ref: Any, sol: IlpSolution) -> ShardingSpec:
    n_ops = len(iop.sgraph.graph.ops)
    if ref.dst_node >= n_ops:
        k = ref.dst_node - n_ops
        return iop.sink_specs[k][sol.choice[ref.dst_node]]
    s = chosen[ref.dst_node]
    return s.in_specs[ref.operand] if ref.operand >= 0 else s.out_specs[0]


def _node_name(iop: IntraOpProblem, node: int) -> str:
    return iop.problem.names[node] if node < len(iop.problem.names) else f"node{node}"
