"""Subpackage result (see its modules)."""
