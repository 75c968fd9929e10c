"""Fixtures: kubelet_fixtures (being written)."""
