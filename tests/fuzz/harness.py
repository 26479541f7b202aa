"""Run one fuzz case: plan → compile → two steps vs the unsharded function, predicted vs compiled
collective wire bytes.

Numbers must always agree (``np.testing.assert_allclose``, rtol = atol = 1e-4 for f32): a wrong
number is a bug, whatever XLA did. Wire bytes must agree within ``REL_TOL`` of the compiled bytes
plus ``ABS_TOL`` bytes (tiny programs, padding of uneven shapes); a larger difference is a
mismatch, reported with the program and both collective lists. A mismatch that XLA announces
as an "Involuntary full rematerialization" is a modelling limit (the cost model does not predict
XLA's fallback; README "Known limits"): ``Outcome.explained`` says so.

The second step is fed the first step's outputs where their shapes match the inputs, matched
greedily in output order as the planner ties carried state (``planner.find_ties``), else the
same inputs again. A ``PlanningError`` is an acceptable outcome only where jax itself refuses
the program on the same inputs (sharding in types on an Explicit mesh), or for a baseline
method (which may not fit the program).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import alpa_lite as al
from alpa_lite.measure.hlo_stats import stats_of
from tests.fuzz.programs import Case
from tests.helpers import make_mesh

REL_TOL = 0.10
ABS_TOL = 256.0
RTOL = ATOL = 1e-4
REMAT = "involuntary full rematerialization"


@dataclass
class Outcome:
    label: str  # the case: mesh, regime, program source
    predicted_wire_bytes: float
    compiled_wire_bytes: float
    predicted: list[str] = field(default_factory=list)  # one line per predicted collective
    compiled: list[str] = field(default_factory=list)
    xla_warnings: tuple[str, ...] = ()
    plan_warnings: tuple[str, ...] = ()
    solver_status: str = ""
    rejected: str = ""  # the PlanningError for a program jax itself refuses on these inputs
    plan: al.Plan | None = None

    @property
    def mismatch(self) -> bool:
        diff = abs(self.predicted_wire_bytes - self.compiled_wire_bytes)
        return diff > REL_TOL * self.compiled_wire_bytes + ABS_TOL

    @property
    def explained(self) -> bool:
        """XLA fell back to rematerializing (it says so): a known modelling limit."""
        return any(REMAT in w.lower() for w in self.xla_warnings)

    def report(self) -> str:
        lines = [self.label,
                 f"solver {self.solver_status}; predicted {self.predicted_wire_bytes:,.0f} B, "
                 f"compiled {self.compiled_wire_bytes:,.0f} B wire per device",
                 "predicted:", *[f"  {c}" for c in self.predicted or ["(none)"]],
                 "compiled:", *[f"  {c}" for c in self.compiled or ["(none)"]]]
        lines += [f"XLA: {w[:300]}" for w in self.xla_warnings]
        lines += [f"plan: {w}" for w in self.plan_warnings]
        return "\n".join(lines)


def cluster_for(mesh: jax.sharding.Mesh, regime: str) -> al.ClusterSpec:
    """The cluster figures of a cost regime (``programs.REGIMES``)."""
    cluster = al.ClusterSpec.from_mesh(mesh)
    if regime == "cpu":
        return cluster
    dev = replace(cluster.device, peak_flops=cluster.device.peak_flops / 1e4,
                  hbm_bandwidth=cluster.device.hbm_bandwidth / 1e4)
    fast = lambda link: replace(link, alpha=link.alpha / 1e4)
    return replace(cluster, device=dev, intra_host=fast(cluster.intra_host),
                   inter_host=fast(cluster.inter_host))


def feed(args: list, outs: Sequence) -> list:
    """Next step's inputs: an output of an input's shape replaces it (greedy, in output order)."""
    nxt, taken = list(args), set()
    for o in outs:
        for i, a in enumerate(args):
            if i not in taken and np.shape(o) == np.shape(a):
                nxt[i] = o
                taken.add(i)
                break
    return nxt


def run_case(case: Case, seed: int = 0, method: str = "auto", time_limit_s: float = 30.0) -> Outcome:
    return run_program(case.program.function, case.program.input_shapes, case.mesh_shape,
                       case.axis_type, case.regime, case.committed, label=str(case), seed=seed,
                       method=method, time_limit_s=time_limit_s)


def run_program(make_fn: Callable[[jax.sharding.Mesh], Callable], shapes: Sequence[tuple[int, ...]],
                mesh_shape: tuple[int, ...], axis_type: str, regime: str = "cpu",
                committed: Sequence[tuple[int, tuple]] = (), *, label: str = "", seed: int = 0,
                method: str = "auto", time_limit_s: float = 30.0) -> Outcome:
    """Plan ``make_fn(mesh)`` for f32 inputs of ``shapes``, check two steps against it unsharded,
    and compare predicted with compiled wire bytes. ``committed``: (input, PartitionSpec entries)."""
    mesh = make_mesh(mesh_shape, axis_type)
    fn = make_fn(mesh)
    shardings = {k: NamedSharding(mesh, PartitionSpec(*e)) for k, e in committed}

    def inputs() -> list:  # fresh arrays each step: the plan donates carried state
        rng = np.random.default_rng(seed)
        arrays = [jax.numpy.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        return [jax.device_put(a, shardings[k]) if k in shardings else a for k, a in enumerate(arrays)]

    args = inputs()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = al.plan(fn, *args, mesh=mesh, cluster=cluster_for(mesh, regime),
                           time_limit_s=time_limit_s, method=method)
    except al.PlanningError as e:
        if method != "auto":  # a baseline may not fit the program (a dim too small to split)
            return Outcome(label, 0.0, 0.0, rejected=f"{type(e).__name__}: {e}")
        # Fine only where jax itself refuses the program on these inputs (sharding in types on an
        # Explicit mesh: a dot over split contracting dims, a concatenate into an uneven split).
        try:
            jax.jit(fn)(*args)
        except Exception as jax_error:  # noqa: BLE001 - any refusal by jax will do
            return Outcome(label, 0.0, 0.0, rejected=f"{type(e).__name__}: {e} (jax: {jax_error})")
        raise AssertionError(f"alpa-lite refused a program jax runs: {e}\n{label}") from e
    run = plan.compile(fn)
    # Compiled before running (a cached compile would log no XLA warnings), for the arguments
    # placed as the compiled plan places them when called: jax compiles once for arguments
    # committed to those shardings, and the steps below reuse this executable.
    stats = stats_of(run, *jax.device_put(args, list(plan.in_shardings)))
    cur = args
    for step in range(2):
        want = jax.jit(fn)(*[np.asarray(a) for a in cur])
        got = run(*cur)  # step 2: the sharded outputs of step 1 themselves, where shapes match
        for k, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL,
                                       err_msg=f"step {step}, output {k}\n{label}")
        cur = feed(inputs(), jax.tree.leaves(got))
    return Outcome(label, plan.predicted_wire_bytes, stats.wire_bytes,
                   [f"{c.kind} axes={','.join(c.axes)} n={c.group_size} {c.nbytes:,.0f} B "
                    f"wire {c.wire_bytes():,.0f} B  ({c.where})" for c in plan.collectives],
                   [f"{c.kind} n={c.group_size} {c.shape} wire {c.wire_bytes():,.0f} B  ({c.op_name})"
                    for c in stats.collectives],
                   stats.warnings, plan.warnings, plan.solver.status, plan=plan)
