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

CDEF = """
#define WH_ERR_LOAD ...
#define WH_ERR_NEED_BYTES ...
#define WH_ERR_RUN ...
#define WH_EXITED ...
#define WH_TRAPPED ...
#define WH_KILLED ...
#define WH_TIMED_OUT ...
#define WH_LOG_PLAIN ...
#define WH_LOG_CRI ...

typedef struct wh_module wh_module;
typedef struct wh_run wh_run;

typedef struct {
  const char *const *argv;
  size_t argc;
  const char *const *env_names;
  const char *const *env_values;
  size_t envc;
  const char *const *preopen_host;
  const char *const *preopen_guest;
  const int *preopen_readonly;
  size_t npreopens;
  int stdout_fd;
  int stderr_fd;
  const char *stdout_path; /* opened (append) by wh_run_exec when the fd is -1 */
  const char *stderr_path;
  int log_format;
  int64_t log_max_size; /* rotate an output path at this size, <= 0 for never */
  int log_max_files;
  int64_t memory_limit;
  double deadline;
  int has_stdin;
  const uint8_t *stdin_data;
  size_t stdin_len;
} wh_run_config;

typedef struct {
  int status;
  int exit_code;
  int instantiate_failed;
  double duration;
  double cpu_seconds;
  uint64_t peak_memory;
  char message[2048];
} wh_result;

int wh_init(char *err, size_t errlen);
int wh_module_load(const uint8_t *wasm, size_t len, const char *cache_path, wh_module **out,
                   int *from_cache, char *err, size_t errlen);
void wh_module_free(wh_module *m);
wh_run *wh_run_new(void);
void wh_run_free(wh_run *r);
void wh_kill(wh_run *r);
int wh_run_exec(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res);
"""

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
    libraries=["pthread"],
    py_limited_api=True,
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=True)
