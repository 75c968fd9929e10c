"""_wasihost: run WASI preview 1 modules on wasmtime through a small C host (cffi, API mode).

    host = Host("~/.minikrust/cache")
    module = host.load(open("hello.wasm", "rb").read())       # compiled once, cached on disk
    result = module.run(["hello"], stdout="/tmp/hello.log")   # CRI log lines, GIL released
    run = module.start(["loop"]); run.kill(); run.wait()      # from any thread

Output: stdout/stderr go to a path (appended; one shared file keeps the two streams' records in
order), an fd, or a callable (called with one CRI record per call, or raw chunks in "plain"
mode). The C side buffers them and writes at least every epoch tick (5 ms of guest execution),
before any call that may block, and at the end of the run. With `log_max_size=`, C rotates an
output path once it reaches that size, as the kubelet rotates container logs: rotated files beyond
`log_max_files - 2` are removed oldest first and the others gzip-compressed (`<name>.gz`), the path
is renamed to `<path>.<UTC %Y%m%d-%H%M%S>` (a second rotation within one second takes the next
second's name) and reopened; a CRI record never straddles two files.

The extension is built against wasmtime's C API as shipped by the `wasmtime` wheel (pinned in
pyproject.toml). At import we check that wheel's version and dlopen its `_libwasmtime` with RTLD_GLOBAL,
so `_native` finds the symbols without LD_LIBRARY_PATH or an rpath (see `_build.py`). A mismatch
raises `WasmtimeVersionError` (an ImportError), so callers fall back to the pure-Python host.
"""

import ctypes
import hashlib
import importlib.metadata
import logging
import operator
import os
import platform
import select
import threading

__all__ = ["Host", "Module", "Run", "Result", "WasiHostError", "LoadError", "RunError",
           "WasmtimeVersionError", "WASMTIME_RANGE"]

log = logging.getLogger("minikrust")

# The wasmtime releases whose C API our declarations in wasmtime_api.h match: [low, high) majors.
WASMTIME_RANGE = (50, 51)


class WasiHostError(Exception):
    """Base class of every error the host raises."""


class LoadError(WasiHostError):
    """A module that cannot be loaded: invalid wasm, no `_start`, an import WASI does not provide."""


class RunError(WasiHostError):
    """A run that cannot be set up: missing preopen directory, unusable argv/env or output."""


class WasmtimeVersionError(ImportError):
    """The installed `wasmtime` package is outside the range this extension was built for."""


def check_wasmtime_version(version):
    """Raise WasmtimeVersionError unless `version` (e.g. "50.0.1") is in WASMTIME_RANGE."""
    low, high = WASMTIME_RANGE
    try:
        major = int(version.split(".")[0])
    except (AttributeError, ValueError):
        major = -1
    if not low <= major < high:
        raise WasmtimeVersionError(
            f"_wasihost was built for wasmtime >={low},<{high} but wasmtime {version} is installed; "
            f"run `pip install 'wasmtime>={low},<{high}'` (or rebuild minikrust against the new "
            f"wasmtime after checking _wasihost/wasmtime_api.h)")


def _load_libwasmtime():
    """Make the wasmtime wheel's shared library global, so `_native`'s symbols resolve to it."""
    try:
        version = importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        raise WasmtimeVersionError("_wasihost needs the `wasmtime` package: pip install "
                                   f"'wasmtime>={WASMTIME_RANGE[0]},<{WASMTIME_RANGE[1]}'") from None
    check_wasmtime_version(version)
    from wasmtime import _ffi  # the package's own loader knows its platform directory layout
    ctypes.CDLL(str(_ffi.filename), mode=ctypes.RTLD_GLOBAL)
    return version


WASMTIME_VERSION = _load_libwasmtime()
from ._native import ffi, lib  # noqa: E402  (needs the library loaded above)


class Result(tuple):
    """How a run ended. exit_code is None when the module trapped, was killed or timed out.

    Immutable, with the fields of a frozen dataclass (equal only to another Result, hashable, no
    ordering, a dataclass-like repr), but a tuple underneath: a run builds one in a single
    `tuple.__new__` instead of eight frozen-attribute sets (half a microsecond per run)."""

    __slots__ = ()
    _fields = ("exit_code", "trap", "duration", "killed", "timed_out", "instantiate_failed", "cpu_seconds",
               "peak_memory")
    __match_args__ = _fields

    def __new__(cls, exit_code, trap=None, duration=0.0, killed=False, timed_out=False, instantiate_failed=False,
                cpu_seconds=0.0, peak_memory=0):
        return tuple.__new__(cls, (exit_code, trap, duration, killed, timed_out, instantiate_failed, cpu_seconds,
                                  peak_memory))

    exit_code = property(operator.itemgetter(0), doc="the WASI exit code, None unless the module exited")
    trap = property(operator.itemgetter(1), doc="the trap (or kill/deadline) message, else None")
    duration = property(operator.itemgetter(2), doc="seconds from start to end")
    killed = property(operator.itemgetter(3), doc="stopped by kill()")
    timed_out = property(operator.itemgetter(4), doc="stopped by the deadline")
    instantiate_failed = property(operator.itemgetter(5), doc="the module could not be instantiated (e.g. its memory)")
    cpu_seconds = property(operator.itemgetter(6), doc="CPU time of the running thread")
    peak_memory = property(operator.itemgetter(7), doc="bytes of linear memory at the end")

    def __repr__(self):
        return "Result(" + ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self)) + ")"

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return tuple.__eq__(self, other)
        return False if isinstance(other, tuple) else NotImplemented  # tuple's own == would say True

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __lt__(self, other):
        return NotImplemented

    __le__ = __gt__ = __ge__ = __lt__
    __hash__ = tuple.__hash__

    def __getnewargs__(self):
        return tuple(self)

    def _replace(self, **changes):
        """A copy with some fields changed (what dataclasses.replace did)."""
        return Result(**{**dict(zip(self._fields, self)), **changes})


_new_result = tuple.__new__  # _new_result(Result, (8 fields)): the hot path's constructor


_ERRLEN = 2048
_POOL_LOGGED = []  # the pool's sizing is logged by the process's first Host
_EXITED, _TRAPPED, _KILLED, _TIMED_OUT = lib.WH_EXITED, lib.WH_TRAPPED, lib.WH_KILLED, lib.WH_TIMED_OUT


def is_component(data):
    """Whether wasm bytes are a component (binary header: magic, version 0x0d, layer 1), not a module."""
    return data[:4] == b"\0asm" and data[6:8] == b"\x01\x00"


def _err_text(buf):
    return ffi.string(buf).decode("utf-8", "replace")


class Host:
    """The native WASI host: one wasmtime engine per process, compiled modules cached on disk."""

    backend = "native"

    def __init__(self, cache_dir, check=None):
        # check(memory_limit, deadline, log_max_size, log_max_files) -> the four, checked and
        # defaulted: the caller's policy (minikrust's _run_limits); None: they are taken as given
        self.check = check
        self.cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir)))
        os.makedirs(self.cache_dir, exist_ok=True)
        self.wasmtime_version = WASMTIME_VERSION
        self._modules = {}
        self._loading = {}  # digest -> lock held while that module compiles
        self._lock = threading.Lock()
        err = ffi.new("char[]", _ERRLEN)
        first = not _POOL_LOGGED
        if lib.wh_init(err, _ERRLEN) != 0:
            raise WasiHostError(_err_text(err))
        self.pool = ffi.string(lib.wh_pool_info()).decode()
        if first:
            _POOL_LOGGED.append(True)
            log.info("wasmtime instance pool: %s", self.pool)

    def cache_path(self, digest):
        """Where the compiled form of `digest` lives: keyed by sha256, wasmtime version, arch."""
        hexdigest = digest.split(":", 1)[1]
        name = f"{hexdigest}.wasmtime-{self.wasmtime_version}.{platform.machine()}.native.cwasm"
        return os.path.join(self.cache_dir, name)

    def load(self, wasm, digest=None):
        """Load (compile once, then from the on-disk cache) a module from bytes or a path."""
        if digest is not None and digest in self._modules:
            return self._modules[digest]
        if isinstance(wasm, (bytes, bytearray, memoryview)):
            data = bytes(wasm)
        else:
            try:
                with open(wasm, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise LoadError(f"cannot read module {wasm}: {e.strerror}") from None
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != actual:
            raise LoadError(f"module digest is {actual}, expected {digest}")
        with self._lock:
            module = self._modules.get(actual)
            if module is not None:
                return module
            loading = self._loading.setdefault(actual, threading.Lock())
        with loading:  # one compile per digest; other modules load meanwhile
            module = self._modules.get(actual)
            if module is None:
                module = self._compile(data, actual)
                with self._lock:
                    self._modules[actual] = module
                    self._loading.pop(actual, None)
        return module

    def _compile(self, data, digest):
        out = ffi.new("wh_module **")
        from_cache, imports_http = ffi.new("int *"), ffi.new("int *")
        err = ffi.new("char[]", _ERRLEN)
        path = self.cache_path(digest).encode()
        component = is_component(data)
        if component:
            rc = lib.wh_component_load(data, len(data), path, out, from_cache, imports_http, err, _ERRLEN)
        else:
            rc = lib.wh_module_load(data, len(data), path, out, from_cache, err, _ERRLEN)
        if rc != 0:
            raise LoadError(_err_text(err))
        module = Module(self, ffi.gc(out[0], lib.wh_module_free), digest, bool(from_cache[0]))
        module.component, module.imports_http = component, bool(imports_http[0])
        return module


class Module:
    """A compiled module, linked against WASI once; each run gets a fresh store and instance."""

    _TEMPLATES_MAX = 64
    component = imports_http = False  # a WASI 0.2 component; one importing wasi:http/outgoing-handler

    def __init__(self, host, ptr, digest, from_cache):
        self.host = host
        self.digest = digest
        self.from_cache = from_cache
        self._ptr = ptr
        self._templates = {}  # (argv, env, preopens, paths) -> (wh_run_config template, buffers it points to)

    def __repr__(self):
        return f"<_wasihost.Module {self.digest}>"

    def start(self, argv, env=(), preopens=(), stdout=None, stderr=None, log_format="cri",
              memory_limit=None, deadline=None, stdin=None, log_max_size=None, log_max_files=None,
              outgoing_http=False, log_dir_fd=None):
        """Start a run on a thread of its own (made in C); returns a Run (kill(), wait(), done, and
        fileno(), readable once the run is over: a selector can wait for many runs at once). A
        component gets wasi:http with `outgoing_http`: True for any host, or the hosts (request
        authorities, matched exactly) it may reach; a request to another fails in the guest. With
        `log_dir_fd` (a directory fd the caller resolved; the run keeps a dup of it), stdout and
        stderr paths are names in that directory."""
        run = Run(self, argv, env, preopens, stdout, stderr, log_format, memory_limit, deadline, stdin,
                  log_max_size, log_max_files, outgoing_http, log_dir_fd)
        run._launch()
        return run

    def run(self, argv, env=(), preopens=(), stdout=None, stderr=None, log_format="cri",
            memory_limit=None, deadline=None, stdin=None, log_max_size=None, log_max_files=None,
            outgoing_http=False, log_dir_fd=None):
        """Run to the end in the calling thread (the GIL is released while the module runs)."""
        run = Run(self, argv, env, preopens, stdout, stderr, log_format, memory_limit, deadline, stdin,
                  log_max_size, log_max_files, outgoing_http, log_dir_fd)
        run._execute()
        if run._error is not None:
            raise run._error
        return run._result

    def _config(self, argv, env, preopens, paths):
        """A fresh wh_run_config with argv/env/preopens and the output paths filled in (their C arrays
        are cached)."""
        pairs = tuple(env.items()) if isinstance(env, dict) else tuple(map(tuple, env))
        key = (tuple(argv), pairs, tuple(map(tuple, preopens)), paths)
        entry = self._templates.get(key)
        if entry is None:
            entry = _template(*key)
            if len(self._templates) >= self._TEMPLATES_MAX:
                self._templates.clear()
            self._templates[key] = entry
        return ffi.new("wh_run_config *", entry[0][0]), entry[1]


def _template(argv, pairs, preopens, paths):
    keep = [ffi.new("char[]", os.fsencode(t)) if t is not None else ffi.NULL for t in paths]
    c = ffi.new("wh_run_config *")
    c.stdout_path, c.stderr_path = keep
    c.argv, c.argc = _cstrings(argv, keep), len(argv)
    c.env_names = _cstrings([k for k, _ in pairs], keep)
    c.env_values = _cstrings([v for _, v in pairs], keep)
    c.envc = len(pairs)
    c.preopen_host = _cstrings([os.fspath(h) for h, _, _ in preopens], keep)
    c.preopen_guest = _cstrings([g for _, g, _ in preopens], keep)
    readonly = ffi.new("int[]", [1 if ro else 0 for _, _, ro in preopens]) if preopens else ffi.NULL
    keep.append(readonly)
    c.preopen_readonly, c.npreopens = readonly, len(preopens)
    c.stdout_fd = c.stderr_fd = c.log_dir_fd = -1
    c.log_format = lib.WH_LOG_CRI
    c.memory_limit = -1
    return c, keep


def _cstrings(values, keep):
    """A `const char *[]` for `values` (str, or bytes as they are), its buffers kept alive in `keep`."""
    bufs = []
    for value in values:
        raw = bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8")
        if b"\0" in raw:
            raise RunError(f"argument or environment string contains a NUL byte: {value!r}")
        bufs.append(ffi.new("char[]", raw))
    keep.extend(bufs)
    array = ffi.new("char *[]", bufs) if bufs else ffi.NULL
    keep.append(array)
    return array


_FILTER = []  # http_filter.wat, loaded into C once


def _http(module, outgoing_http):
    """(outgoing_http, http_hosts, nhttp_hosts, buffers) of wh_run_config: `outgoing_http` is False
    (no wasi:http), True (any host) or the hosts (authorities) a component's requests may go to."""
    if outgoing_http is False or outgoing_http is None or not module.component:
        return lib.WH_HTTP_NONE, ffi.NULL, 0, None
    if outgoing_http is True:
        return lib.WH_HTTP_ANY, ffi.NULL, 0, None
    if not _FILTER:
        err = ffi.new("char[]", _ERRLEN)
        try:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "http_filter.wat"), "rb") as f:
                wat = f.read()
        except OSError as e:
            raise RunError(f"cannot load the outgoing-HTTP filter: {e}") from None
        if lib.wh_http_filter_load(wat, len(wat), err, _ERRLEN) != 0:
            raise RunError(_err_text(err))
        _FILTER.append(True)
    keep = []
    hosts = list(outgoing_http)
    return lib.WH_HTTP_HOSTS, _cstrings(hosts, keep), len(hosts), keep


def _is_path(target):
    return target is None or isinstance(target, (str, bytes, os.PathLike))


class _Output:
    """The fds a run writes stdout/stderr to: opened files, pipes to callables, or given fds."""

    def __init__(self, stdout, stderr, cri, log_dir_fd=-1):
        self._cri, self._dir_fd = cri, log_dir_fd
        self._close = []
        self._readers = []
        opened = {}
        try:
            self.fds = [self._open(target, opened) for target in (stdout, stderr)]
        except BaseException:
            self.close()
            raise

    def _open(self, target, opened):
        if target is None:
            return -1
        key = target if callable(target) else (os.fspath(target) if not isinstance(target, int) else target)
        if isinstance(key, str) and key in opened:
            return opened[key]
        if callable(target) and id(target) in opened:
            return opened[id(target)]
        if isinstance(target, int):
            return target
        if callable(target):
            r, w = os.pipe()
            os.set_inheritable(w, False)
            self._close.append(w)
            reader = threading.Thread(target=_pump, args=(r, target, self._cri), daemon=True, name="wasihost-output")
            reader.start()
            self._readers.append(reader)
            opened[id(target)] = w
            return w
        try:       # never through a symlink at the name (wasihost.c's open_outputs likewise)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(key, flags, 0o644, dir_fd=self._dir_fd if self._dir_fd >= 0 else None)
        except OSError as e:
            raise RunError(f"cannot open output {key}: {e.strerror}") from None
        self._close.append(fd)
        opened[key] = fd
        return fd

    def close(self):
        for fd in self._close:
            os.close(fd)
        self._close = []
        for reader in self._readers:
            reader.join()  # every byte reaches the callable before the run reports its end
        self._readers = []


def _pump(fd, callback, cri):
    """Feed what the C side writes into a pipe to a callable: one call per CRI record (as the
    fallback host does, so a consumer that rotates files never cuts a record), raw chunks in
    plain mode."""
    pending = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if cri:
                *records, pending = (pending + chunk).split(b"\n")
                _deliver(callback, [record + b"\n" for record in records])
            else:
                _deliver(callback, [chunk])
        if pending:
            _deliver(callback, [pending])
    finally:
        os.close(fd)


def _deliver(callback, pieces):
    for piece in pieces:
        try:
            callback(piece)
        except Exception:  # a broken log consumer must not stall the module
            log.exception("stdout/stderr callback failed")


def _to_result(res):
    """The Result of a finished wh_run_exec: facts only (whether that was running out of memory is
    minikrust's call, _is_oom)."""
    status, code = res.status, res.exit_code
    return _new_result(Result, (code if status == _EXITED else None, _err_text(res.message) if status == _TRAPPED
                                else None, res.duration, status == _KILLED, status == _TIMED_OUT,
                                bool(res.instantiate_failed), res.cpu_seconds, res.peak_memory))


class Run:
    """One running (or finished) instance of a module."""

    _done = None  # the _DoneFd of a started run
    _log_dir = -1  # the run's own dup of log_dir_fd, closed when its end is seen

    def __init__(self, module, argv, env, preopens, stdout, stderr, log_format, memory_limit,
                 deadline, stdin, log_max_size=None, log_max_files=None, outgoing_http=False, log_dir_fd=None):
        if log_format != "cri" and log_format != "plain":
            raise RunError(f"log_format must be 'cri' or 'plain', not {log_format!r}")
        preopens = preopens or ()
        for host_dir, _, _ in preopens:
            if not os.path.isdir(host_dir):
                raise RunError(f"preopen directory {host_dir} does not exist")
        self.module = module
        if module.host.check is not None:
            memory_limit, deadline, log_max_size, log_max_files = module.host.check(
                memory_limit, deadline, log_max_size, log_max_files)
        ptr = lib.wh_run_new()
        if ptr == ffi.NULL:
            raise MemoryError("wh_run_new: out of memory")
        self._ptr = ffi.gc(ptr, lib.wh_run_free)
        self._result = self._error = self._thread = self._done = None
        # Paths: C opens them (fewer steps per run), in wh_run_exec, or in wh_run_start before it
        # returns (so that start() raises at once); C rotates them.
        paths = tuple(t if t is not None and _is_path(t) else None for t in (stdout, stderr))
        c, self._keep = module._config(argv, env or (), preopens, paths)
        self._config = c
        c.log_format = lib.WH_LOG_CRI if log_format == "cri" else lib.WH_LOG_PLAIN
        # wh_run_config's encoding: -1 is no memory limit, 0 no deadline, a size of 0 no rotation
        c.memory_limit = -1 if memory_limit is None else memory_limit
        c.deadline = 0.0 if deadline is None else max(float(deadline), 1e-9)
        if stdin is not None:
            self._stdin = data = ffi.from_buffer(bytes(stdin))
            c.has_stdin, c.stdin_data, c.stdin_len = 1, data, len(data)
        c.stdout_fd = c.stderr_fd = -1
        if log_dir_fd is not None:
            self._log_dir = c.log_dir_fd = os.dup(log_dir_fd)
        c.log_max_size, c.log_max_files = log_max_size or 0, log_max_files or 0
        c.outgoing_http, c.http_hosts, c.nhttp_hosts, self._hosts = _http(module, outgoing_http)
        self._output = None
        if not (_is_path(stdout) and _is_path(stderr)):
            self._output = _Output(stdout, stderr, log_format == "cri", self._log_dir)
            c.stdout_fd, c.stderr_fd = self._output.fds

    def _execute(self):
        res = ffi.new("wh_result *")
        try:
            rc = lib.wh_run_exec(self.module._ptr, self._config, self._ptr, res)
        finally:
            if self._output is not None:
                self._output.close()
        self._finish(rc, res)

    def _finish(self, rc, res):
        self._close_log_dir()
        if rc != 0:
            self._error = RunError(_err_text(res.message))
        else:
            self._result = _to_result(res)

    def _launch(self):
        """Run on a C thread, which makes the done fd readable at the end (C never calls Python)."""
        self._res = res = ffi.new("wh_result *")
        self._done = _DoneFd()
        if lib.wh_run_start(self.module._ptr, self._config, self._ptr, res, self._done.write_fd,
                            res.message, _ERRLEN) != 0:  # the result's message holds the error
            self._done.close()
            if self._output is not None:
                self._output.close()
            self._close_log_dir()
            raise RunError(_err_text(res.message))
        self._lock = threading.Lock()
        _live.add(self)  # what C reads stays alive until the end is seen

    def kill(self):
        """Stop the module (from any thread); it stops within about two epoch ticks (10 ms)."""
        lib.wh_kill(self._ptr)

    def fileno(self):
        """An fd that is readable once the run is over (then wait() returns at once)."""
        return self._done.read_fd

    def usage(self):
        """(cpu_seconds, memory_bytes, peak_memory_bytes) now, from any thread (see wh_run_usage):
        memory is the resident part of the linear memory plus the host's buffers, 0 once ended."""
        u = ffi.new("wh_usage *")
        lib.wh_run_usage(self._ptr, u)
        return u.cpu_seconds, u.memory, u.peak_memory

    @property
    def done(self):
        return self._done is None or self._done.ready(0)

    def wait(self, timeout=None):
        """The Result, or None if still running after `timeout` seconds; raises RunError."""
        if self._done is not None and self._result is None and self._error is None:
            if not self._done.ready(timeout):
                return None
            with self._lock:
                if self._result is None and self._error is None:
                    if self._output is not None:
                        self._output.close()
                    self._finish(self._res.rc, self._res)
                    _live.discard(self)
        if self._error is not None:
            raise self._error
        return self._result

    def _close_log_dir(self):
        if self._log_dir >= 0:
            os.close(self._log_dir)
            self._log_dir = -1

    def __del__(self):
        if self._done is not None:
            self._done.close()
        self._close_log_dir()


_live = set()  # started Runs whose end no wait() has seen yet: C still uses their memory


class _DoneFd:
    """The fd a run's thread writes once at its end: an eventfd, or a pipe where there is none."""

    def __init__(self):
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_CLOEXEC)
        else:
            self.read_fd, self.write_fd = os.pipe()

    def ready(self, timeout):
        """Whether the fd is readable within `timeout` seconds (None: wait for it); not consumed."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

    def close(self):
        for fd in {self.read_fd, self.write_fd} - {-1}:
            os.close(fd)
        self.read_fd = self.write_fd = -1
