"""Subpackage ir (see its modules)."""
