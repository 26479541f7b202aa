"""Strategy rules, one module per family; importing this package fills the rule table."""

from cost_model.rules import conv, dot, indexing, misc, pointwise, reshape, shape, window  # noqa: F401
