"""From a JAX function to an ``OpGraph``.

``tracer`` (``jax.make_jaxpr``, nested calls inlined, a ``lax.scan`` kept as one op and its body
traced apart by ``trace_body``) and ``markers`` (``al.value_and_grad``, ``al.grad``,
``al.mark_layer``: what is pipelined and where layers end).

May import: ``alpa_lite.ir``.
"""
