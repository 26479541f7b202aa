"""Inter-op parallelism: the step cut into pipeline stages on sub-meshes, planned and run.

Planning: ``program`` (the step split around ``al.value_and_grad``, the loss into layers),
``layers`` (each layer's forward+backward solved by the intra-op ILP per logical view),
``collectives`` and ``accum`` (the collectives a stage runs; gradients reduced once per step),
``planner`` (the stage DP over layers × sub-meshes, weighed against the one-stage plan);
``checkpointing`` and ``one_stage`` (one stage with chosen layers of the loss recomputed: the step
under ``jax.checkpoint``, and the search over those choices).
Running: ``stage`` (a stage's forward and backward programs), ``update`` (the optimizer update
per stage), ``runtime`` (microbatches, schedules, transfers) and ``check`` (predicted vs compiled,
per stage). The pipeline planner uses the one-stage planner (``intra.planner``), never the
dispatching ``al.plan``.

May import: ``alpa_lite.ir``, ``alpa_lite.tracing``, ``alpa_lite.result``, ``alpa_lite.intra``,
``alpa_lite.emit``, ``alpa_lite.measure``, ``cost_model``, ``ilp``, ``dp_stages``.
"""
