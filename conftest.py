"""Shared pytest fixtures: each part of the test harness lives in its own module under tests/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest_plugins = [
    "tests.helpers",
    "tests.wasm_modules",
    "tests.fake_apiserver",
    "tests.registry",
    "tests.kubelet_fixtures",
    "tests.secret_watch",
]
