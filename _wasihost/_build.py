"""cffi build script (API mode) for `_wasihost._native`: `setup.py` names it in `cffi_modules`.

The extension does not link against wasmtime: `_libwasmtime.so` (from the `wasmtime` wheel) has
no SONAME and lives in another package's directory, so `_wasihost/__init__.py` dlopens it with
RTLD_GLOBAL before importing `_native`, whose wasmtime symbols then resolve against it. That works
the same from a checkout (`pip install -e .`), from a wheel and from any venv layout, with no
LD_LIBRARY_PATH and no rpath, and keeps auditwheel/delocate from copying the 30 MB library.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_from_header(path):
    """The declarations cffi needs, read from our own header so the interface is written once:
    preprocessor lines dropped, each `#define NAME value` given as `#define NAME ...` (API mode
    lets the compiler fill the value in and checks every declaration against the real code)."""
    lines = []
    with open(path) as header:
        for line in header:
            words = line.split()
            if words[:1] == ["#define"] and len(words) >= 3:
                lines.append(f"#define {words[1]} ...")
            elif not line.lstrip().startswith("#"):
                lines.append(line.rstrip("\n"))
    return "\n".join(lines)


CDEF = _cdef_from_header(os.path.join(HERE, "wasihost.h"))

if sys.platform == "darwin":
    link_args = ["-undefined", "dynamic_lookup"]
else:
    # Resolve every wasmtime symbol at import time: a declaration the library lacks then fails
    # the import with a clear "undefined symbol" instead of crashing on first call.
    link_args = ["-Wl,-z,now"]

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "_wasihost._native",
    '#include "wasihost.h"',
    sources=[os.path.relpath(os.path.join(HERE, "wasihost.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=c11", "-Wall"],
    extra_link_args=link_args,
    libraries=["pthread", "dl"],  # dl: libz is loaded at first use (gzip for rotated logs)
    py_limited_api=True,
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=True)
