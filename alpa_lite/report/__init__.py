"""Views of a plan for people: ``rows`` (what every view shows, computed once), ``terminal``
(rich report, plain-text summary, method comparison, check report), ``html`` (the notebook
view), ``pipeline`` (a pipeline's stage table as text) and ``progress`` (the CLI's phase spinner).
A view takes a ``Plan`` and reads its fields; it never plans.

May import: ``alpa_lite.ir``.
"""
