"""Subpackage tracing (see its modules)."""
