"""The IR: plain data every other part speaks.

``graph`` (``OpGraph``, ``Op``, ``TensorInfo``), ``specs`` (``ShardingSpec``), ``cluster``
(``ClusterSpec``: mesh, links, device figures), ``errors`` (``PlanningError`` and its kinds),
``hlo_names`` (an op's HLO name and FLOPs, the sharding-constraint primitives), ``signature`` (an
argument leaf's type as ``jax.jit`` sees it) and ``hashing`` (``cached_hash``). The only
front-end modules that ``cost_model``, ``ilp`` and ``dp_stages`` import.

May import: jax, numpy; nothing else of the project.
"""
