"""Fixtures: wasm_modules (being written)."""
