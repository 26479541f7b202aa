"""From a ``Plan`` to a program that runs: ``program`` (the traced program replayed with the
plan's ``with_sharding_constraint``s, scans included, under ``jax.jit``) and ``runtime``
(``plan.compile(fn)`` for a one-stage plan, a loaded plan included).

May import: ``alpa_lite.ir``, ``alpa_lite.tracing``, ``alpa_lite.result``, ``alpa_lite.intra``
(a scan body's solution), ``cost_model``.
"""
