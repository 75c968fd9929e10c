"""Build of the `_wasihost._native` cffi extension; metadata lives in pyproject.toml.

The extension is abi3 (py_limited_api), so one wheel per platform serves CPython 3.10+. It does not
link against wasmtime: `_wasihost/__init__.py` dlopens the wasmtime wheel's `_libwasmtime` with
RTLD_GLOBAL before importing `_native` (see `_wasihost/_build.py`).
"""
from setuptools import setup

try:
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:  # setuptools >= 70 ships its own
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel


class bdist_wheel_abi3(_bdist_wheel):
    """Tag the wheel cp310-abi3: the extension uses only the limited API."""

    def finalize_options(self):
        self.py_limited_api = "cp310"
        super().finalize_options()


setup(
    cffi_modules=["_wasihost/_build.py:ffi"],
    cmdclass={"bdist_wheel": bdist_wheel_abi3},
)
