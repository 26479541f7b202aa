"""Subpackage intra (see its modules)."""
