"""Subpackage report (see its modules)."""
