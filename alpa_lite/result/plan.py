"""``Plan``: what the planner decided, as data that prints, saves and compiles.

Everything needed to run the plan is plain data (specs as strings, per-op layouts, mesh shape,
costs, solver statistics); the traced graph and the concrete mesh ride along when available and
are rebuilt by ``compile(fn)`` after loading from JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from alpa_lite.ir.errors import PlanFileError, PlanningError, SignatureError
from alpa_lite.ir.signature import leaf_signature
from alpa_lite.ir.specs import ShardingSpec
from cost_model.strategy import Collective

PLAN_VERSION = 1
VIEW_AXES = ("dp", "tp")  # a pipeline stage's logical view of its sub-mesh: (data, tensor) parallel


@dataclass(frozen=True)
class OpLayout:
    """What the plan decided for one op: its outputs' specs, the specs its operands arrive in,
    and whether it is left to XLA (no rule)."""

    outs: tuple[ShardingSpec, ...]
    ins: tuple[ShardingSpec, ...]
    free: bool = False


@dataclass(frozen=True)
class PlanCost:
    compute_s: float
    communication_s: float
    resharding_s: float
    peak_memory_bytes: float
    hbm_s: float = 0.0  # of compute_s, the ops whose roofline is bytes / HBM bandwidth

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s

    @property
    def bound(self) -> str:
        """What bounds the step: the largest of HBM bandwidth (bytes-bound ops), compute
        (FLOP-bound ops) and collectives (communication + resharding)."""
        terms = {"HBM bandwidth": self.hbm_s, "compute": self.compute_s - self.hbm_s,
                 "collectives": self.communication_s + self.resharding_s}
        return max(terms, key=terms.__getitem__)


@dataclass(frozen=True)
class PredictedCollective:
    """A collective the plan predicts. In a pipeline: the ``stage`` running it, its ``phase``
    ("fwd" or "bwd" per microbatch, "sync" once per step, "send": a ``device_put`` of
    ``nbytes`` to another stage, 1/``group_size`` of it per device) and ``runs`` per step;
    ``wire_bytes`` counts every run."""

    kind: str
    axes: tuple[str, ...]
    nbytes: float
    group_size: int
    where: str
    stage: int = -1
    phase: str = ""
    runs: int = 1

    def wire_bytes(self) -> float:
        if self.kind == "send":
            return self.runs * self.nbytes / max(self.group_size, 1)
        return self.runs * Collective(self.kind, self.axes, self.nbytes, self.group_size).wire_bytes()


@dataclass(frozen=True)
class StageInfo:
    """One pipeline stage (the whole program when there is one stage). In a pipeline ``cost_s``
    is t_i + u_i, ``t_s`` its forward+backward per microbatch, ``u_s`` its once-per-step work,
    ``view`` the logical (dp, tp) shape of its sub-mesh, ``memory_bytes`` per device with its
    in-flight microbatches' activations. ``remat``: its layers recompute their forward in the
    backward pass, holding only their inputs per microbatch (``remat_policy`` "full"), or their
    inputs and matmul outputs ("dots"); that adds ``remat_extra_s`` to t_s and holds
    ``remat_saved_bytes`` fewer bytes per device per microbatch in flight (residuals minus what it
    holds; both 0 when it keeps its activations)."""

    layers: tuple[int, int]
    submesh: tuple[int, ...]
    devices: tuple[int, ...]
    cost_s: float
    memory_bytes: float
    view: tuple[int, ...] = ()
    t_s: float = 0.0
    u_s: float = 0.0
    inflight: int = 1
    remat: bool = False
    remat_extra_s: float = 0.0
    remat_saved_bytes: float = 0.0
    remat_policy: str = "keep"  # a REMAT_POLICIES entry: "keep", "full" or "dots"

    def __post_init__(self) -> None:
        if self.remat and self.remat_policy == "keep":  # a recomputing stage made without a policy: full
            object.__setattr__(self, "remat_policy", "full")


@dataclass(frozen=True)
class LayerPlan:
    """The intra-op plan of one layer's forward+backward graph on its stage's view."""

    view: tuple[int, int]
    layouts: tuple[OpLayout, ...]
    in_specs: tuple[ShardingSpec, ...]
    out_specs: tuple[ShardingSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"view": list(self.view), "layouts": _layouts_out(self.layouts),
                "in_specs": [str(s) for s in self.in_specs],
                "out_specs": [str(s) for s in self.out_specs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        P = ShardingSpec.parse
        return cls(tuple(int(x) for x in d["view"]), _layouts_in(d["layouts"]),
                   tuple(P(x) for x in d["in_specs"]), tuple(P(x) for x in d["out_specs"]))


@dataclass(frozen=True)
class PipelineInfo:
    """What a multi-stage plan adds: microbatches, schedule, the predicted step
    T = Σ t_i + (B − 1)·max t_i + max u_i, and each layer's plan (for compile)."""

    num_microbatches: int
    schedule: str
    step_s: float
    bubble_fraction: float
    one_stage_s: float | None  # the one-stage plan's predicted step, when it was planned
    layer_starts: tuple[int, ...]  # first loss equation of each layer
    batch_leaves: tuple[int, ...]  # flat inputs split into microbatches
    state_leaves: tuple[int, ...]  # flat inputs of the carried state
    layer_plans: tuple[LayerPlan, ...]
    # When the one-stage plan was not searched: a lower bound on its step (its ILP's LP
    # relaxation), above ``step_s`` (``alpa_lite.pipeline.planner``).
    one_stage_bound_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("num_microbatches", "schedule", "step_s",
                                           "bubble_fraction", "one_stage_s", "one_stage_bound_s")}
        d.update(layer_starts=list(self.layer_starts), batch_leaves=list(self.batch_leaves),
                 state_leaves=list(self.state_leaves),
                 layer_plans=[lp.to_dict() for lp in self.layer_plans])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineInfo:
        one = d.get("one_stage_s")
        return cls(int(d["num_microbatches"]), str(d["schedule"]), float(d["step_s"]),
                   float(d["bubble_fraction"]), None if one is None else float(one),
                   tuple(int(x) for x in d["layer_starts"]), tuple(int(x) for x in d["batch_leaves"]),
                   tuple(int(x) for x in d["state_leaves"]),
                   tuple(LayerPlan.from_dict(x) for x in d["layer_plans"]),
                   None if d.get("one_stage_bound_s") is None else float(d["one_stage_bound_s"]))


def _layouts_out(layouts: Sequence[OpLayout]) -> list[Any]:
    return [[[str(s) for s in lay.outs], [str(s) for s in lay.ins], lay.free] for lay in layouts]


def _layouts_in(rows: Sequence[Any]) -> tuple[OpLayout, ...]:
    P = ShardingSpec.parse
    return tuple(OpLayout(tuple(P(s) for s in o), tuple(P(s) for s in i), bool(f)) for o, i, f in rows)


# A one-stage plan's choice per layer of the loss (``pipeline.checkpointing``): keep the activations,
# recompute the layer but its matmul outputs (``jax.checkpoint_policies.dots_saveable``), or
# recompute it whole (``jax.checkpoint``).
REMAT_POLICIES = ("keep", "dots", "full")


@dataclass(frozen=True)
class RematInfo:
    """A one-stage plan's recomputation: ``policies[k]`` (a ``REMAT_POLICIES`` entry) for layer k of
    the loss, cut at ``layer_starts`` (equation positions in the loss: ``compile`` cuts it again).
    ``recomputed_flops``: FLOPs of the ops the backward pass runs again (whole program, all devices).
    ``unbounded_s``/``unbounded_peak_bytes``: the plan keeping every activation with no memory
    budget, predicted (None when not planned): what the budget costs and what recomputation saves.
    ``tried``: the candidates the search weighed, one line each."""

    policies: tuple[str, ...]
    layer_starts: tuple[int, ...]
    recomputed_flops: float = 0.0
    unbounded_s: float | None = None
    unbounded_peak_bytes: float | None = None
    tried: tuple[str, ...] = ()

    @property
    def recomputes(self) -> bool:
        return any(p != "keep" for p in self.policies)

    def to_dict(self) -> dict[str, Any]:
        return {"policies": list(self.policies), "layer_starts": list(self.layer_starts),
                "recomputed_flops": self.recomputed_flops, "unbounded_s": self.unbounded_s,
                "unbounded_peak_bytes": self.unbounded_peak_bytes, "tried": list(self.tried)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RematInfo:
        policies = tuple(str(p) for p in d["policies"])
        bad = [p for p in policies if p not in REMAT_POLICIES]
        if bad:
            raise PlanFileError(f"plan file has recomputation policy {bad[0]!r}, not one of {REMAT_POLICIES}: "
                                "the file is corrupt")
        starts = tuple(int(x) for x in d["layer_starts"])
        if len(starts) != len(policies):
            raise PlanFileError(f"plan file has {len(policies)} recomputation policies for {len(starts)} layers: "
                                "the file is corrupt")

        def opt(x: Any) -> float | None:
            return None if x is None else float(x)

        return cls(policies, starts, float(d.get("recomputed_flops", 0.0)), opt(d.get("unbounded_s")),
                   opt(d.get("unbounded_peak_bytes")), tuple(str(x) for x in d.get("tried", ())))


@dataclass(frozen=True)
class SolverInfo:
    status: str
    objective: float
    bound: float
    gap: float
    wall_s: float
    variables: int
    constraints: int
    note: str = ""
    # The model's size on the way (``ilp.solver``): ILP nodes (ops, output sinks, copies), leaders
    # after follower merging, classes after tying identical layers (0: not tied); CP-SAT solves.
    nodes: int = 0
    leaders: int = 0
    tied_classes: int = 0
    solves: int = 1


@dataclass(frozen=True, eq=False)
class Plan:
    method: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    signature: tuple[tuple[tuple[int, ...], str], ...]  # flat dynamic inputs: (shape, dtype)
    input_specs: tuple[ShardingSpec, ...]  # flat
    output_specs: tuple[ShardingSpec, ...]  # flat
    layouts: tuple[OpLayout, ...]  # per op of the traced program
    op_kinds: tuple[str, ...]
    cost: PlanCost
    collectives: tuple[PredictedCollective, ...]
    solver: SolverInfo
    stages: tuple[StageInfo, ...]
    static_argnums: tuple[int, ...] = ()
    donate_argnums: tuple[int, ...] = ()
    num_args: int = 0
    cluster: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    pipeline: PipelineInfo | None = None  # a multi-stage plan
    static_values: tuple[str, ...] = ()  # repr of each static argument: other values are another program
    layer_remat: RematInfo | None = None  # a one-stage plan's recomputation per layer (None: none planned)
    # Not saved: rebuilt by compile(fn).
    graph: Any = None
    mesh: Any = None

    # ---- pytrees of specs / shardings --------------------------------------------------
    def _tree(self, flat: Sequence[Any], which: str) -> Any:
        if self.graph is None:
            return list(flat)
        tree = self.graph.in_tree if which == "in" else self.graph.out_tree
        return jax.tree.unflatten(tree, list(flat))

    @property
    def in_specs(self) -> Any:
        """PartitionSpecs shaped like the (dynamic) arguments."""
        return self._tree([s.to_partition_spec() for s in self.input_specs], "in")

    @property
    def out_specs(self) -> Any:
        return self._tree([s.to_partition_spec() for s in self.output_specs], "out")

    def _shardings(self, specs: Sequence[ShardingSpec], which: str) -> Any:
        if self.mesh is None:
            raise PlanningError("this plan has no concrete mesh: pass mesh= to al.plan or to "
                                "compile() to get NamedShardings")
        return self._tree([NamedSharding(self.mesh, s.to_partition_spec()) for s in specs], which)

    @property
    def in_shardings(self) -> Any:
        return self._shardings(self.input_specs, "in")

    @property
    def out_shardings(self) -> Any:
        return self._shardings(self.output_specs, "out")

    @property
    def num_devices(self) -> int:
        return int(np.prod(self.mesh_shape))

    @property
    def remat(self) -> tuple[bool, ...]:
        """Per layer: True where the backward pass recomputes (some of) the layer's forward (a
        pipeline: its stage recomputes; one stage: ``layer_remat``). () when no layers were planned."""
        return tuple(p != "keep" for p in self.remat_policies)

    @property
    def remat_policies(self) -> tuple[str, ...]:
        """Per layer, a ``REMAT_POLICIES`` entry: "keep", "dots" (all but matmul outputs
        recomputed) or "full" (a pipeline stage that recomputes does so in full)."""
        if self.pipeline is not None:
            return tuple(s.remat_policy if s.remat else "keep" for s in self.stages
                         for _ in range(s.layers[0], s.layers[1] + 1))
        return () if self.layer_remat is None else self.layer_remat.policies

    @property
    def predicted_wire_bytes(self) -> float:
        return float(sum(c.wire_bytes() for c in self.collectives))

    # ---- running --------------------------------------------------------------------
    def check_signature(self, args: Sequence[Any]) -> None:
        dyn = [a for i, a in enumerate(args) if i not in self.static_argnums]
        # Typed as jax.jit types them: Python and NumPy scalars included (NumPy int64 is int32
        # unless x64 is on), so whatever jax.jit accepts for this signature is accepted.
        got = tuple(leaf_signature(x) for x in jax.tree.leaves(dyn))
        if got != self.signature:
            raise SignatureError(_signature_diff(self.signature, got))
        statics = tuple(repr(args[i]) for i in self.static_argnums if i < len(args))
        if self.static_values and statics != self.static_values:
            raise SignatureError(f"static arguments {', '.join(statics)} differ from the ones the plan was "
                                 f"made for ({', '.join(self.static_values)}): that is another program, "
                                 "plan it again")

    def compile(self, fn: Callable[..., Any], mesh: Any = None,
                example_args: Sequence[Any] | None = None) -> Any:
        """A function equal to ``fn`` that runs this plan (one stage: a ``jax.jit`` function;
        a pipeline: a ``PipelineRunner``)."""
        if self.pipeline is not None:
            from alpa_lite.pipeline.runtime import compile_pipeline

            return compile_pipeline(self, fn, mesh=mesh, example_args=example_args)
        from alpa_lite.emit.runtime import compile_plan

        if self.graph is None and self.layer_remat is not None and self.layer_remat.recomputes \
                and example_args is not None:  # a loaded plan: the program it was made for recomputes
            from alpa_lite.pipeline.checkpointing import checkpointed_step

            fn = checkpointed_step(fn, example_args, self.static_argnums, self.layer_remat.layer_starts,
                                   self.layer_remat.policies)
        return compile_plan(self, fn, mesh=mesh, example_args=example_args)

    def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Compile here and compare predicted with compiled collectives, FLOPs and memory."""
        if self.pipeline is not None:  # per stage: its forward, backward, gradient sync and update
            from alpa_lite.pipeline.check import check_pipeline

            return check_pipeline(self, fn, *args)
        from alpa_lite.measure.check import check_plan

        return check_plan(self, fn, *args)

    # ---- reports --------------------------------------------------------------------
    def summary(self) -> str:
        from alpa_lite.report.terminal import plan_summary

        text = plan_summary(self)
        if self.pipeline is not None:
            from alpa_lite.report.pipeline import pipeline_summary

            text += "\n" + pipeline_summary(self)
        return text

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        mesh = "x".join(map(str, self.mesh_shape))
        return (f"<alpa_lite.Plan {self.method} on mesh {mesh} {self.axis_names}: {len(self.stages)} stage(s), "
                f"predicted {self.cost.total_s * 1e3:.3f} ms, solver {self.solver.status}>")

    def _repr_html_(self) -> str:
        from alpa_lite.report.html import plan_html

        return plan_html(self)

    # ---- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "method": self.method, "mesh_shape": list(self.mesh_shape),
            "axis_names": list(self.axis_names),
            "signature": [[list(s), d] for s, d in self.signature],
            "input_specs": [str(s) for s in self.input_specs],
            "output_specs": [str(s) for s in self.output_specs],
            "layouts": [[[str(s) for s in lay.outs], [str(s) for s in lay.ins], lay.free]
                        for lay in self.layouts],
            "op_kinds": list(self.op_kinds),
            "cost": {**self.cost.__dict__, "total_s": self.cost.total_s},
            "collectives": [_collective_dict(c) for c in self.collectives],
            "solver": dict(self.solver.__dict__),
            "stages": [{"layers": list(s.layers), "submesh": list(s.submesh),
                        "devices": list(s.devices), "cost_s": s.cost_s,
                        "memory_bytes": s.memory_bytes, "view": list(s.view), "t_s": s.t_s,
                        "u_s": s.u_s, "inflight": s.inflight, "remat": s.remat,
                        "remat_extra_s": s.remat_extra_s, "remat_saved_bytes": s.remat_saved_bytes,
                        "remat_policy": s.remat_policy}
                       for s in self.stages],
            "static_argnums": list(self.static_argnums), "donate_argnums": list(self.donate_argnums),
            "static_values": list(self.static_values),
            "num_args": self.num_args,
            # Through JSON, so tuples read as lists: to_dict() equals that of the reloaded plan.
            "cluster": json.loads(json.dumps(self.cluster)), "timings": self.timings,
            "warnings": list(self.warnings),
            "pipeline": None if self.pipeline is None else self.pipeline.to_dict(),
            "layer_remat": None if self.layer_remat is None else self.layer_remat.to_dict(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Load a saved plan; never executes anything from the file."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise PlanFileError(f"plan file is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(d, dict) or "version" not in d:
            raise PlanFileError("plan file has no 'version' field: not an alpa-lite plan")
        if not isinstance(d["version"], int) or isinstance(d["version"], bool):
            raise PlanFileError(f"plan file's 'version' is {d['version']!r} ({type(d['version']).__name__}), "
                                f"not an integer: this alpa-lite writes and reads version {PLAN_VERSION}")
        if d["version"] != PLAN_VERSION:
            raise PlanFileError(f"plan file has version {d['version']}, this alpa-lite reads "
                                f"version {PLAN_VERSION}: plan again with this version")
        try:
            plan = cls._from_dict(d)
            plan._check_axes()
            return plan
        except PlanFileError:
            raise
        except (KeyError, TypeError, ValueError, PlanningError) as e:
            raise PlanFileError(f"plan file is corrupt: {type(e).__name__}: {e}") from None

    def _check_axes(self) -> None:
        known = set(self.axis_names)
        specs = [*self.input_specs, *self.output_specs, *(s for lay in self.layouts for s in (*lay.outs, *lay.ins))]
        if self.pipeline is not None:  # a pipeline's specs name the axes of its stages' logical views
            known |= set(VIEW_AXES)
            specs += [s for lp in self.pipeline.layer_plans
                      for s in (*lp.in_specs, *lp.out_specs, *(x for lay in lp.layouts for x in (*lay.outs, *lay.ins)))]
        for s in specs:
            for a in (*s.axes_used(), *s.partial):
                if a not in known:
                    raise PlanFileError(f"plan file names mesh axis {a!r} in spec {s}; its mesh has axes "
                                        f"{list(self.axis_names)}: the file is corrupt")

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Plan:
        P = ShardingSpec.parse
        cost = d["cost"]
        return cls(
            method=str(d["method"]), mesh_shape=tuple(int(x) for x in d["mesh_shape"]),
            axis_names=tuple(str(a) for a in d["axis_names"]),
            signature=tuple((tuple(int(x) for x in s), str(t)) for s, t in d["signature"]),
            input_specs=tuple(P(s) for s in d["input_specs"]),
            output_specs=tuple(P(s) for s in d["output_specs"]),
            layouts=tuple(OpLayout(tuple(P(s) for s in o), tuple(P(s) for s in i), bool(f))
                          for o, i, f in d["layouts"]),
            op_kinds=tuple(str(k) for k in d["op_kinds"]),
            cost=PlanCost(float(cost["compute_s"]), float(cost["communication_s"]),
                          float(cost["resharding_s"]), float(cost["peak_memory_bytes"]),
                          float(cost.get("hbm_s", 0.0))),
            collectives=tuple(PredictedCollective(str(c["kind"]), tuple(c["axes"]),
                                                  float(c["nbytes"]), int(c["group_size"]),
                                                  str(c["where"]), int(c.get("stage", -1)),
                                                  str(c.get("phase", "")), int(c.get("runs", 1)))
                              for c in d["collectives"]),
            solver=SolverInfo(**d["solver"]),
            stages=tuple(StageInfo(tuple(s["layers"]), tuple(s["submesh"]), tuple(s["devices"]),
                                   float(s["cost_s"]), float(s["memory_bytes"]),
                                   tuple(s.get("view", ())), float(s.get("t_s", 0.0)),
                                   float(s.get("u_s", 0.0)), int(s.get("inflight", 1)),
                                   _flag(s.get("remat", False)), float(s.get("remat_extra_s", 0.0)),
                                   float(s.get("remat_saved_bytes", 0.0)),  # absent in older files
                                   _policy(s.get("remat_policy", "keep")))
                         for s in d["stages"]),
            static_argnums=tuple(d["static_argnums"]), donate_argnums=tuple(d["donate_argnums"]),
            static_values=tuple(str(v) for v in d.get("static_values", ())),
            num_args=int(d["num_args"]), cluster=dict(d["cluster"]),
            timings={k: float(v) for k, v in d["timings"].items()},
            warnings=tuple(d.get("warnings", ())),
            pipeline=None if d.get("pipeline") is None else PipelineInfo.from_dict(d["pipeline"]),
            layer_remat=None if d.get("layer_remat") is None else RematInfo.from_dict(d["layer_remat"]),
        )

    def with_runtime(self, graph: Any = None, mesh: Any = None) -> Plan:
        return replace(self, graph=graph if graph is not None else self.graph,
                       mesh=mesh if mesh is not None else self.mesh)


def _policy(x: Any) -> str:
    if x not in REMAT_POLICIES:
        raise PlanFileError(f"plan file has remat_policy={x!r}, not one of {REMAT_POLICIES}: the file is corrupt")
    return str(x)


def _flag(x: Any) -> bool:
    if not isinstance(x, bool):
        raise PlanFileError(f"plan file has remat={x!r}, not true or false: the file is corrupt")
    return x


def _collective_dict(c: PredictedCollective) -> dict[str, Any]:
    """A collective as JSON; the pipeline fields only when set (one-stage plans as before)."""
    d = {**c.__dict__, "axes": list(c.axes)}
    if c.stage < 0 and not c.phase and c.runs == 1:
        for k in ("stage", "phase", "runs"):
            d.pop(k)
    return d


def _signature_diff(want: Sequence[Any], got: Sequence[Any]) -> str:
    if len(want) != len(got):
        return (f"the plan was made for {len(want)} array inputs, these arguments have "
                f"{len(got)}: plan again for these arguments")
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            return (f"input leaf {i} is {g[1]}{list(g[0])}, the plan was made for "
                    f"{w[1]}{list(w[0])}: plan again for these shapes")
    return "arguments do not match the plan's signature"
