"""The test helpers' own promises: under CI a missing tool fails the run instead of skipping."""
import pytest

from tests.helpers import unavailable


def test_a_missing_tool_skips_but_fails_the_run_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="clang is not installed"):
        unavailable("clang is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="clang is not installed"):
        unavailable("clang is not installed")
