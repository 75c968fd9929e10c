"""Fixtures that build real WASI modules: WAT through `wasmtime.wat2wasm`, C through Debian's clang.

Use from any test:
    def test_x(wasm):                 # session-wide, cached
        wasm.hello                    # bytes: WAT, one fd_write of b"hello\\n" to stdout
        wasm.exit(3)                  # bytes: proc_exit(3)
        wasm.tool                     # path of the C "tool" module (skips when clang is missing):
                                      #   tool hello|args|env|exit N|stderr TEXT|lines N|cat PATH|
                                      #   write PATH TEXT|open PATH|alloc MB|spin|sleep MS|abssleep MS|stdin
        wasm.loop, wasm.trap, wasm.grow, wasm.no_start, wasm.unknown_import, wasm.big, wasm.fdedge
        wasm.c(source, name)          # any C source -> path of its .wasm (cached for the session)
    def test_y(backend): ...          # a WASI host of each kind: "native" and "wasmtime-py"
"""
import hashlib
import os
import shutil
import subprocess

import pytest

from tests.helpers import unavailable

WASI = "wasi_snapshot_preview1"


def wat(text):
    """WAT text -> wasm bytes."""
    import wasmtime
    return bytes(wasmtime.wat2wasm(text))


def _write_module(body, memory_pages=1, imports=""):
    """A WASI command module: fd_write/proc_exit imported, one memory, `body` as _start."""
    return wat(f"""(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "proc_exit" (func $proc_exit (param i32)))
  {imports}
  (memory (export "memory") {memory_pages})
  (data (i32.const 1024) "hello\\n")
  (func (export "_start") {body}))""")


HELLO_BODY = """
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"""

# Fd edge cases through raw WASI calls: every call's errno (and nwritten) goes to stderr as
# "<step> <errno> <value>" so two backends can be compared byte for byte.
FDEDGE_C = r"""
#include <wasi/api.h>
#include <stdio.h>
#include <string.h>

static char results[8192];
static size_t rlen;

static void note(const char *step, int err, long long value) {
    rlen += snprintf(results + rlen, sizeof results - rlen, "%s %d %lld\n", step, err, value);
}

static void wr(const char *step, int fd, const __wasi_ciovec_t *iov, size_t n) {
    __wasi_size_t nw = 0;
    int err = __wasi_fd_write(fd, iov, n, &nw);
    note(step, err, nw);
}

static void fdstat(const char *step, int fd) {
    __wasi_fdstat_t st;
    memset(&st, 0, sizeof st);
    int err = __wasi_fd_fdstat_get(fd, &st);
    rlen += snprintf(results + rlen, sizeof results - rlen, "%s %d type=%d flags=%d base=%llx inh=%llx\n",
                     step, err, st.fs_filetype, st.fs_flags,
                     (unsigned long long)st.fs_rights_base, (unsigned long long)st.fs_rights_inheriting);
}

static char big[100000];

int main(void) {
    __wasi_ciovec_t iov[80];
    wr("zero-iovecs", 1, iov, 0);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"", 0};
    wr("one-empty-iovec", 1, iov, 1);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"", 0};
    iov[1] = (__wasi_ciovec_t){(const uint8_t *)"a", 1};
    iov[2] = (__wasi_ciovec_t){(const uint8_t *)"", 0};
    iov[3] = (__wasi_ciovec_t){(const uint8_t *)"b\n", 2};
    wr("mixed-empty", 1, iov, 4);
    for (int i = 0; i < 64; i++) iov[i] = (__wasi_ciovec_t){(const uint8_t *)"x", 1};
    iov[64] = (__wasi_ciovec_t){(const uint8_t *)"\n", 1};
    wr("many-iovecs", 1, iov, 65);
    memset(big, 'y', sizeof big);
    big[sizeof big - 1] = '\n';
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)big, sizeof big};
    wr("big-write", 1, iov, 1);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"no newline", 10};
    wr("fragment", 1, iov, 1);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)" then newline\n", 14};
    wr("fragment-end", 1, iov, 1);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"bad\n", 4};
    wr("bad-fd", 99, iov, 1);
    wr("stdin-fd", 0, iov, 1);
    fdstat("stat-0", 0);
    fdstat("stat-1", 1);
    fdstat("stat-2", 2);
    fdstat("stat-99", 99);
    note("set-flags-1", __wasi_fd_fdstat_set_flags(1, __WASI_FDFLAGS_APPEND), 0);
    fdstat("stat-1-after", 1);
    const char *seq[] = {"o1\n", "e1\n", "o2", "e2\n", "o2b\n", "e3"};
    for (int i = 0; i < 6; i++) {
        iov[0] = (__wasi_ciovec_t){(const uint8_t *)seq[i], strlen(seq[i])};
        wr("interleave", 1 + (i & 1), iov, 1);
    }
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"\n", 1};
    wr("interleave-end", 2, iov, 1);
    note("close-1", __wasi_fd_close(1), 0);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)"after close\n", 12};
    wr("write-closed-1", 1, iov, 1);
    fdstat("stat-closed-1", 1);
    note("close-1-again", __wasi_fd_close(1), 0);
    iov[0] = (__wasi_ciovec_t){(const uint8_t *)results, rlen};
    __wasi_size_t nw;
    __wasi_fd_write(2, iov, 1, &nw);
    return 0;
}
"""

# A small multi-tool: `tool <command> args...`.
TOOL_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int fail(const char *what, const char *path) {
    printf("%s %s: %s\n", what, path, strerror(errno));
    return 2;
}

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "hello";
    if (!strcmp(cmd, "hello")) { puts("hello from C"); return 0; }
    if (!strcmp(cmd, "args")) {                       /* one line per argv entry, argv[0] included */
        for (int i = 0; i < argc; i++) printf("%d=%s\n", i, argv[i]);
        return 0;
    }
    if (!strcmp(cmd, "env")) { for (char **e = environ; *e; e++) puts(*e); return 0; }
    if (!strcmp(cmd, "exit")) return atoi(argv[2]);
    if (!strcmp(cmd, "stderr")) { fprintf(stderr, "%s\n", argv[2]); return 0; }
    if (!strcmp(cmd, "lines")) {                      /* lines N: N numbered lines on stdout */
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) printf("line %d of %d\n", i, n);
        return 0;
    }
    if (!strcmp(cmd, "cat")) {                        /* cat PATH: file contents to stdout */
        FILE *f = fopen(argv[2], "r");
        if (!f) return fail("open", argv[2]);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "write")) {                      /* write PATH TEXT: create/truncate PATH */
        FILE *f = fopen(argv[2], "w");
        if (!f) return fail("open", argv[2]);
        fputs(argv[3], f);
        if (fclose(f)) return fail("close", argv[2]);
        puts("written");
        return 0;
    }
    if (!strcmp(cmd, "open")) {                       /* open PATH: "ok" or the errno text */
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return fail("open", argv[2]);
        close(fd);
        puts("ok");
        return 0;
    }
    if (!strcmp(cmd, "alloc")) {                      /* alloc MB: malloc and touch MB MiB */
        int mb = atoi(argv[2]);
        static char *volatile keep[4096];
        for (int i = 0; i < mb && i < 4096; i++) {
            keep[i] = malloc(1 << 20);
            if (!keep[i]) { fprintf(stderr, "out of memory after %d MiB\n", i); return 3; }
            memset(keep[i], 1, 1 << 20);
        }
        puts("allocated");
        return 0;
    }
    if (!strcmp(cmd, "spin")) { for (volatile unsigned i = 0;; i++) {} }
    if (!strcmp(cmd, "sleep")) {                      /* sleep MS: relative sleep, then "woke" */
        puts("sleeping");
        fflush(stdout);
        usleep(atoi(argv[2]) * 1000);
        puts("woke");
        return 0;
    }
    if (!strcmp(cmd, "abssleep")) {                   /* abssleep MS: sleep to an absolute deadline */
        struct timespec t;
        puts("sleeping");
        fflush(stdout);
        clock_gettime(CLOCK_MONOTONIC, &t);
        long long ns = (long long)t.tv_nsec + atoi(argv[2]) * 1000000LL;  /* long is 32 bits here */
        t.tv_sec += ns / 1000000000LL;
        t.tv_nsec = ns % 1000000000LL;
        int err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
        printf("woke %d\n", err);
        return 0;
    }
    if (!strcmp(cmd, "stdin")) {                      /* stdin: copy stdin to stdout */
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, stdout);
        return 0;
    }
    fprintf(stderr, "unknown command %s\n", cmd);
    return 64;
}
"""

HELLO_C = r"""
#include <stdio.h>
int main(void) { puts("hello"); return 0; }
"""


def _big_wat(functions=4000):
    """A module of >= 1 MB of code: many distinct functions doing arithmetic."""
    body = "(local.get 0) " + "(i32.const 7) (i32.mul) (i32.const 3) (i32.xor) " * 40
    funcs = "\n".join(f"(func $f{i} (export \"f{i}\") (param i32) (result i32) {body} (i32.const {i}) (i32.add))"
                      for i in range(functions))
    return f"(module (memory (export \"memory\") 1) {funcs} (func (export \"_start\")))"


class WasmModules:
    """Builders for the test modules, cached for the session."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self._cache = {}
        self.clang = shutil.which("clang")

    @staticmethod
    def status(code):
        """The exit code a run reports when the program exits with `code`."""
        return code

    def _memo(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- WAT modules (always available) --
    @property
    def hello(self):
        """One fd_write of b"hello\\n" to fd 1, then return (exit 0)."""
        return self._memo("hello", lambda: _write_module(HELLO_BODY))

    def exit(self, code):
        """proc_exit(code) right away."""
        return self._memo(("exit", code), lambda: _write_module(f"(call $proc_exit (i32.const {code}))"))

    @property
    def loop(self):
        """An infinite loop that never calls the host."""
        return self._memo("loop", lambda: _write_module("(loop $l (br $l))"))

    @property
    def grow(self):
        """Grows memory a page at a time until memory.grow fails, then traps (unreachable)."""
        return self._memo("grow", lambda: _write_module(
            "(block $done (loop $l (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))"
            " (br $l))) (unreachable)"))

    def hold(self, mib, grow_mib=None):
        """Grows memory by `grow_mib` (default `mib`) MiB, writes a byte in every 4 KiB of the first
        `mib` MiB of it, then sleeps forever (1 s poll_oneoff at a time): `mib` MiB touched, idle."""
        grow_mib = mib if grow_mib is None else grow_mib
        poll = f'(import "{WASI}" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))'
        body = f"""(local $p i32) (local $end i32)
    (local.set $p (i32.mul (memory.grow (i32.const {grow_mib * 16})) (i32.const 65536)))
    (local.set $end (i32.add (local.get $p) (i32.const {mib << 20})))
    (block $done (loop $touch
      (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
      (i32.store8 (local.get $p) (i32.const 1))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br $touch)))
    (i32.store (i32.const 2064) (i32.const 1))           ;; subscription at 2048: a monotonic clock,
    (i64.store (i32.const 2072) (i64.const 1000000000))  ;; relative, 1 s (the rest stays 0)
    (loop $sleep (drop (call $poll (i32.const 2048) (i32.const 2112) (i32.const 1) (i32.const 2176))) (br $sleep))"""
        return self._memo(("hold", mib, grow_mib), lambda: _write_module(body, imports=poll))

    @property
    def trap(self):
        """Hits `unreachable` after writing hello."""
        return self._memo("trap", lambda: _write_module(HELLO_BODY + " (unreachable)"))

    @property
    def no_start(self):
        return self._memo("no_start", lambda: wat('(module (func (export "main")))'))

    @property
    def unknown_import(self):
        return self._memo("unknown_import", lambda: wat(
            '(module (import "env" "frobnicate" (func)) (func (export "_start")))'))

    @property
    def wasi_unknown_function(self):
        return self._memo("wasi_unknown", lambda: wat(
            f'(module (import "{WASI}" "no_such_call" (func)) (func (export "_start")))'))

    @property
    def big(self):
        """A module of >= 1 MB (for compile vs cache-load)."""
        return self._memo("big", lambda: wat(_big_wat()))

    # -- C modules (skip without clang) --
    def c(self, source, name="module"):
        """Compile C source with clang --target=wasm32-wasi -O2; the path of the .wasm."""
        if not self.clang:
            unavailable("clang is not installed (apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32)")
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        out = os.path.join(self.cache_dir, f"{name}-{digest}.wasm")
        if not os.path.exists(out):
            src = os.path.join(self.cache_dir, f"{name}-{digest}.c")
            with open(src, "w") as f:
                f.write(source)
            proc = subprocess.run([self.clang, "--target=wasm32-wasi", "-O2", "-Wl,--strip-all", "-o", out + ".tmp", src],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                if "wasi" in proc.stderr and ("not found" in proc.stderr or "cannot find" in proc.stderr):
                    unavailable(f"clang cannot target wasm32-wasi here: {proc.stderr.strip()[:300]}")
                raise AssertionError(f"clang failed:\n{proc.stderr}")
            os.replace(out + ".tmp", out)
        return out

    @property
    def tool(self):
        return self.c(TOOL_C, "tool")

    @property
    def c_hello(self):
        return self.c(HELLO_C, "hello")

    @property
    def fdedge(self):
        return self.c(FDEDGE_C, "fdedge")


@pytest.fixture(scope="session")
def wasm(tmp_path_factory):
    """The session's WasmModules builder."""
    return WasmModules(str(tmp_path_factory.mktemp("wasm-modules")))


def native_available():
    """None when the native extension imports, else the reason it does not."""
    try:
        import _wasihost._native  # noqa: F401
        import _wasihost
        _wasihost.Host  # noqa: B018
    except Exception as exc:  # ImportError, or the ABI check's error
        return f"_wasihost native extension not importable: {exc}"
    return None


BACKENDS = ["native", "wasmtime-py"]


@pytest.fixture(scope="session")
def host_cache_dir(tmp_path_factory):
    """The hosts' compiled-module cache: MINIKRUST_TEST_HOST_CACHE names one kept across sessions
    (scripts/memcheck fills it natively first, so valgrind runs no compiler), else a fresh one."""
    return os.environ.get("MINIKRUST_TEST_HOST_CACHE") or str(tmp_path_factory.mktemp("host-cache"))


@pytest.fixture(params=BACKENDS)
def backend(request, host_cache_dir):
    """A WASI host of each kind (the process-wide one for a session cache dir)."""
    import minikrust
    if request.param == "native":
        reason = native_available()
        if reason:
            unavailable(reason)
    return minikrust.load_host(os.path.join(host_cache_dir, request.param), backend=request.param)


@pytest.fixture(scope="session")
def both_hosts(host_cache_dir):
    """(native, fallback) hosts for differential tests; skips when native is not built."""
    import minikrust
    reason = native_available()
    if reason:
        unavailable(reason)
    return (minikrust.load_host(os.path.join(host_cache_dir, "native"), backend="native"),
            minikrust.load_host(os.path.join(host_cache_dir, "wasmtime-py"), backend="wasmtime-py"))


# -- WASI 0.2 components, made from the modules above with jco (npm @bytecodealliance/jco) --

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jco_binary():
    """$JCO, the jco that .ci/run installs (.ci/npm), or one on PATH; a skip (a failure in CI)."""
    for found in (os.environ.get("JCO"), os.path.join(ROOT, ".ci", "npm", "node_modules", ".bin", "jco"),
                  shutil.which("jco")):
        if found and os.path.exists(found):
            return found
    unavailable("jco is not installed (npm install --prefix .ci/npm @bytecodealliance/jco)")


def to_component(module_path, out_path):
    """`jco new MODULE --wasi-command`: a p1 command module wrapped as a WASI 0.2 component."""
    proc = subprocess.run([jco_binary(), "new", module_path, "--wasi-command", "-o", out_path + ".tmp"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"jco new {module_path} failed:\n{proc.stderr}"
    os.replace(out_path + ".tmp", out_path)
    return out_path


class WasmComponents:
    """The same builders as WasmModules, each module turned into a component (bytes stay bytes,
    paths stay paths), so that a behaviour test of modules runs unchanged on components."""

    def __init__(self, modules):
        self.modules = modules
        self.clang = modules.clang

    def _convert(self, module):
        data = module if isinstance(module, (bytes, bytearray)) else None
        if data is None:
            with open(module, "rb") as f:
                data = f.read()
        digest = hashlib.sha256(data).hexdigest()[:16]
        src = os.path.join(self.modules.cache_dir, f"p1-{digest}.wasm")
        out = os.path.join(self.modules.cache_dir, f"p2-{digest}.wasm")
        if not os.path.exists(out):
            with open(src, "wb") as f:
                f.write(data)
            to_component(src, out)
        if data is module or isinstance(module, (bytes, bytearray)):
            with open(out, "rb") as f:
                return f.read()
        return out

    @staticmethod
    def status(code):
        """WASI 0.2's `exit` takes a result, not a number: any failure is exit code 1."""
        return 0 if code == 0 else 1

    def exit(self, code):
        return self._convert(self.modules.exit(code))

    # what cannot be made from a module: components that fail to load
    @property
    def no_start(self):
        """A component without wasi:cli/run."""
        return wat("(component)")

    @property
    def unknown_import(self):
        return wat('(component (import "acme:frobnicate/api@1.0.0" (instance (export "f" (func)))))')

    @property
    def wasi_unknown_function(self):
        return wat('(component (import "wasi:cli/environment@0.2.0" (instance (export "no_such_call" (func)))))')

    def c(self, source, name="module"):
        return self._convert(self.modules.c(source, name))

    def __getattr__(self, name):
        value = getattr(self.modules, name)
        if callable(value):  # a builder taking arguments: its module, as a component
            return lambda *args, **kwargs: self._convert(value(*args, **kwargs))
        return self._convert(value)


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    """The session's WasmComponents builder (jco; skips without it, fails in CI)."""
    return WasmComponents(WasmModules(str(tmp_path_factory.mktemp("wasm-components"))))
