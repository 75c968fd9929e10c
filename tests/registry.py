"""Fixtures: registry (being written)."""
