"""Subpackage measure (see its modules)."""
