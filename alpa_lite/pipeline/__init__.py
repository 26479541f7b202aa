"""Subpackage pipeline (see its modules)."""
