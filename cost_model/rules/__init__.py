"""Strategy rules, one module per family; importing this package fills the rule table."""

from cost_model.rules import dot, pointwise, shape  # noqa: F401
