"""Intra-op (one-stage) planning: every op's sharding chosen by one ILP.

``problem`` (strategy graph → ``ilp.IlpProblem``: edges, memory rows), ``liveness`` (what is
alive at each program point), ``follow`` (ops that follow one operand), ``fit`` (solve within
the memory budget, rows added as needed), ``baselines`` (data_parallel, zero3, megatron, dp_tp, expert_parallel as
strategy masks), ``scan`` (a scan's strategies from solving its body; the ``lax.scan_p`` rule),
``roles`` (carried state, batch, the mesh), ``assemble`` (a solution → ``Plan``) and ``planner``
(the one-stage planner).

The ``lax.scan_p`` strategy rule is filed here, in ``scan``, not in ``cost_model/rules``: its
strategies come from solving the body with this package's ILP, which ``cost_model`` may not import.
Importing this package files it (below), so any plan made through it knows scans.

May import: ``alpa_lite.ir``, ``alpa_lite.tracing``, ``alpa_lite.result``, ``cost_model``, ``ilp``.
"""

from alpa_lite.intra import scan  # noqa: F401  (files the lax.scan_p strategy rule)
