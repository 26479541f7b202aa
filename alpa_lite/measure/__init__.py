"""Measurements on the devices at hand: ``hlo_stats`` (collectives, wire bytes, FLOPs and memory
of a compiled program), ``check`` (a plan's predictions beside its compiled program) and
``calibrate`` (α, β per mesh axis, FLOP/s and memory bandwidth → a ``ClusterSpec``).

May import: ``alpa_lite.ir``, ``cost_model``.
"""
