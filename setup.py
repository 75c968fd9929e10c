"""Build of the `_wasihost._native` cffi extension; metadata lives in pyproject.toml.

The extension is abi3 (cffi's py_limited_api), so the wheel is tagged cp310-abi3: one wheel per
platform serves CPython 3.10 and later. It does not link against wasmtime: `_wasihost/__init__.py`
dlopens the wasmtime wheel's `_libwasmtime` with RTLD_GLOBAL before importing `_native` (see
`_wasihost/_build.py`), so neither LD_LIBRARY_PATH nor an rpath is needed.
"""
from setuptools import setup

setup(
    cffi_modules=["_wasihost/_build.py:ffi"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
