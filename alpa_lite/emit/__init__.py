"""Subpackage emit (see its modules)."""
