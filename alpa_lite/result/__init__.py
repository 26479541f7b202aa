"""What the planner produces: ``Plan`` and its parts (``plan``: costs, stages, per-op layouts,
predicted collectives, solver statistics, JSON I/O).

``Plan``'s facade methods (``compile``, ``check``, ``summary``, ``_repr_html_``) import the
layers above (``emit``, ``pipeline``, ``measure``, ``report``) inside the method: a plan is data
that those layers read, and the methods only hand it to them.

May import: ``alpa_lite.ir``, ``cost_model`` (and, in the facade methods only, the layers above).
"""
