"""Fixtures: fake_apiserver (being written)."""
