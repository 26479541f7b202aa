"""ilp package."""
