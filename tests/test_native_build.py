"""The native extension `_wasihost._native`: its build and packaging, and what only it does.

The behaviour shared with the fallback host is tested by tests/test_wasihost.py on both backends;
here: the cibuildwheel selection, the wasmtime version pin, loading without LD_LIBRARY_PATH, the
compiled-module cache across processes, the GIL, leaks over 10,000 failing runs, our fd_write
(shadowing wasmtime's) against wasmtime's own on pointer edge cases, and a wheel in a fresh venv.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import minikrust
from tests.helpers import unavailable
from tests.wasm_modules import WASI, native_available, wat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _native_extension():
    """Every test here needs the built extension: a skip without it, a failure under CI."""
    if native_available():
        unavailable(native_available())


def python(code, env=None, cwd=ROOT, timeout=60):
    """Run `code` in a new interpreter of this venv; its CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


needs_checkout = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "pyproject.toml")),
                                    reason="needs the source checkout (cibuildwheel tests the installed wheel)")


def rss_bytes():
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource  # macOS: the peak, in bytes, is enough to see growth
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture
def host(tmp_path):
    import _wasihost
    return _wasihost.Host(tmp_path / "cache")


# -- packaging --

@needs_checkout
def test_cibuildwheel_builds_one_abi3_wheel_per_linux_platform():
    cibuildwheel = shutil.which("cibuildwheel", path=os.path.dirname(sys.executable)) or shutil.which("cibuildwheel")
    if cibuildwheel is None:
        unavailable("cibuildwheel is not installed (pip install -e '.[test]')")
    out = subprocess.run([cibuildwheel, "--platform", "linux", "--archs", "x86_64,aarch64",
                          "--print-build-identifiers"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["cp310-manylinux_aarch64", "cp310-manylinux_x86_64",
                                          "cp310-musllinux_aarch64", "cp310-musllinux_x86_64"]
    out = subprocess.run([cibuildwheel, "--platform", "macos", "--print-build-identifiers"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["cp310-macosx_arm64", "cp310-macosx_x86_64"]


@needs_checkout
def test_pinned_wasmtime_range_is_the_same_in_metadata_and_at_import():
    import _wasihost
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pins = re.findall(r'"wasmtime>=(\d+),<(\d+)"', f.read())
    low, high = _wasihost.WASMTIME_RANGE
    assert pins and set(pins) == {(str(low), str(high))}
    assert low <= int(_wasihost.WASMTIME_VERSION.split(".")[0]) < high


def test_wasmtime_outside_the_pinned_range_fails_the_import_clearly():
    import _wasihost
    _wasihost.check_wasmtime_version("50.0.1")
    for bad in ("51.0.0", "49.0.2", "garbage"):
        with pytest.raises(_wasihost.WasmtimeVersionError, match=r"wasmtime>=50,<51"):
            _wasihost.check_wasmtime_version(bad)
    # the real import path, in a fresh process where the metadata says 51
    out = python("""
        import importlib.metadata
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "51.0.0" if name == "wasmtime" else real(name)
        try:
            import _wasihost
        except ImportError as exc:
            print(type(exc).__name__, exc)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WasmtimeVersionError ") and "wasmtime 51.0.0 is installed" in out.stdout


def test_extension_loads_without_ld_library_path_or_rpath(wasm, tmp_path):
    import _wasihost._native
    so = _wasihost._native.__file__
    assert so.endswith(".abi3.so") or so.endswith(".abi3.dylib") or ".abi3." in so
    readelf = shutil.which("readelf")
    if readelf:
        dyn = subprocess.run([readelf, "-d", so], capture_output=True, text=True).stdout
        # (an RUNPATH may come from the Python build's own LDFLAGS; none may point at wasmtime)
        assert "wasmtime" not in dyn, dyn
    (tmp_path / "hello.wasm").write_bytes(wasm.hello)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(_wasihost.__file__))  # this _wasihost, installed or not
    out = python(f"""
        import _wasihost
        host = _wasihost.Host({str(tmp_path / "cache")!r})
        chunks = []
        result = host.load({str(tmp_path / "hello.wasm")!r}).run(["hello"], stdout=chunks.append, log_format="plain")
        print(host.backend, result.exit_code, b"".join(chunks))
    """, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", "0", "b'hello\\n'"]


def test_unbuilt_checkout_does_not_hide_the_installed_extension(tmp_path):
    # `python minikrust.py` from a checkout whose _wasihost/ has no .so, with a built one (this
    # test's, standing for a wheel's) later on sys.path: the built one runs, and the log says why.
    import _wasihost
    checkout = tmp_path / "checkout"
    (checkout / "_wasihost").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "minikrust.py"), checkout)
    for name in ("__init__.py", "_build.py"):
        shutil.copy(os.path.join(os.path.dirname(_wasihost.__file__), name), checkout / "_wasihost")
    installed = os.path.dirname(os.path.dirname(_wasihost.__file__))
    # -S: no site processing, so an editable install's import hook (which maps _wasihost._native to
    # the installed folder whatever package asks) is not there, as on a device with a wheel.
    # The dependencies come from this venv's site-packages, after the installed extension.
    import site
    out = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        sys.path[:0] = [{str(checkout)!r}]
        import minikrust
        print(minikrust.load_host({str(tmp_path / "cache")!r}).backend, sys.modules["_wasihost"].__file__)
    """)], capture_output=True, text=True, timeout=60, cwd=str(checkout),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([installed, *site.getsitepackages()])))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", _wasihost.__file__], out.stderr
    assert f"the _wasihost at {checkout / '_wasihost'} is not built" in out.stderr
    assert "WASI host: native" in out.stderr


@needs_checkout
def test_wheel_builds_and_runs_a_module_in_a_fresh_venv(wasm, tmp_path):
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "-w", str(dist), ROOT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = os.listdir(dist)
    assert re.match(r"minikrust-[\d.]+-cp310-abi3-\w+\.whl$", wheel), wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = str(venv / "bin" / "python")
    out = subprocess.run([vpy, "-m", "pip", "install", "-q", str(dist / wheel)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    (tmp_path / "exit7.wasm").write_bytes(wasm.exit(7))
    out = subprocess.run([vpy, "-c", textwrap.dedent(f"""
        import _wasihost, minikrust
        assert _wasihost.__file__.startswith({str(venv)!r}), _wasihost.__file__
        host = _wasihost.Host({str(tmp_path / "cache")!r})
        print(host.load({str(tmp_path / "exit7.wasm")!r}).run(["m"]).exit_code)
    """)], capture_output=True, text=True, cwd=str(tmp_path), timeout=60,
        env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
    assert (out.returncode, out.stdout.strip()) == (0, "7"), out.stderr


# -- the engine room --

def test_compiled_module_is_loaded_from_the_cache_by_a_new_process(wasm, tmp_path):
    path = tmp_path / "big.wasm"
    path.write_bytes(wasm.big)
    script = f"""
        import time, _wasihost
        t = time.perf_counter()
        module = _wasihost.Host({str(tmp_path / "cache")!r}).load({str(path)!r})
        print(module.from_cache, time.perf_counter() - t)
    """
    first = python(script)
    assert first.returncode == 0, first.stderr
    second = python(script)
    assert second.returncode == 0, second.stderr
    (cached1, compile_s), (cached2, load_s) = [(o.stdout.split()[0], float(o.stdout.split()[1])) for o in (first, second)]
    assert (cached1, cached2) == ("False", "True")
    assert load_s < compile_s, (load_s, compile_s)
    print(f"compile {compile_s * 1e3:.1f} ms, cache load {load_s * 1e3:.1f} ms: x{compile_s / load_s:.0f}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux only")
def test_small_address_space_runs_without_the_pool_instead_of_aborting(wasm, tmp_path):
    (tmp_path / "hello.wasm").write_bytes(wasm.hello)
    out = python(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # far below the pool's reservation
        import _wasihost
        result = _wasihost.Host({str(tmp_path / "cache")!r}).load({str(tmp_path / "hello.wasm")!r}).run(["m"])
        print(result.exit_code)
    """)
    assert (out.returncode, out.stdout.strip()) == (0, "0"), out.stderr[-2000:]


@pytest.mark.parametrize("limit_gib, slots", [(8, 0), (100, 4), (None, 256)])
def test_pool_is_sized_from_the_address_space_and_more_runs_than_slots_still_run(wasm, tmp_path, limit_gib, slots):
    # 256 slots reserve 2 TiB: x86_64's 47-bit space holds them; RLIMIT_AS (ulimit -v) bounds them
    (tmp_path / "loop.wasm").write_bytes(wasm.loop)
    out = python(f"""
        import resource
        if {limit_gib!r}:
            resource.setrlimit(resource.RLIMIT_AS, ({limit_gib!r} << 30, {limit_gib!r} << 30))
        import _wasihost
        host = _wasihost.Host({str(tmp_path / "cache")!r})
        module = host.load({str(tmp_path / "loop.wasm")!r})
        # beyond the slots, runs go to the engine without the pool (4 GiB reserved each: one fits 8 GiB)
        runs = [module.start(["loop"]) for _ in range({slots} + 2 if {slots} else 1)]
        for run in runs:
            run.kill()
        print(sum(run.wait(30).killed for run in runs) == len(runs))
        print(host.pool)
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    killed, pool = out.stdout.strip().splitlines()
    assert killed == "True" and pool.startswith(f"{slots} slots of 8 GiB address space"), pool
    assert ("runs without the pool" in pool) == (slots == 0) and "MemTotal" in pool


def test_runs_release_the_gil(host, wasm):
    run = host.load(wasm.loop).start(["loop"], deadline=2.0)
    try:
        t = time.monotonic()
        total = sum(range(200_000))  # Python work while the module spins
        assert total and time.monotonic() - t < 1.0 and not run.done
    finally:
        run.kill()
    assert run.wait(timeout=5).killed


def test_buffered_log_reaches_the_file_while_the_module_still_runs(host, tmp_path):
    from tests.helpers import wait_for
    from tests.wasm_modules import HELLO_BODY, _write_module
    log = tmp_path / "c.log"
    run = host.load(_write_module(HELLO_BODY + " (loop $l (br $l))")).start(["m"], stdout=str(log))
    try:
        wait_for(lambda: log.exists() and log.read_bytes().endswith(b" stdout F hello\n"), timeout=5,
                 what="the line written before the loop to be in the log")
        assert not run.done
    finally:
        run.kill()
    assert run.wait(timeout=5).killed


def test_kill_before_the_thread_runs_the_module_still_kills(host, wasm):
    from _wasihost import Run
    run = Run(host.load(wasm.loop), ["loop"], (), (), None, None, "cri", None, None, None)
    run.kill()
    run._execute()
    assert run.wait(0).killed


def test_ten_thousand_failing_runs_do_not_grow_rss(host, wasm, tmp_path):
    import _wasihost
    trap = host.load(wasm.trap)
    grow = host.load(wasm.grow)
    big_memory = host.load(wat(f'(module (memory (export "memory") 100) (func (export "_start")))'))
    log = str(tmp_path / "log")
    missing = str(tmp_path / "missing")

    def fail(i):
        kind = i % 5
        if kind == 0:
            assert trap.run(["t"], stdout=log).trap
        elif kind == 1:
            with pytest.raises(_wasihost.LoadError):
                host.load(b"\0asm\x01\0\0\0" + i.to_bytes(4, "little"))
        elif kind == 2:
            with pytest.raises(_wasihost.RunError):
                trap.run(["t"], preopens=[(missing, "/x", False)])
        elif kind == 3:
            assert big_memory.run(["m"], memory_limit=1 << 20).instantiate_failed
        else:
            assert minikrust._is_oom(grow.run(["g"], memory_limit=2 << 20, stdout=log), 2 << 20)

    for i in range(1000):
        fail(i)
    before = rss_bytes()
    t = time.monotonic()
    for i in range(1000, 11000):
        fail(i)
    grown = rss_bytes() - before
    assert grown < 8 << 20, f"RSS grew {grown >> 10} KiB over 10,000 failing runs"
    print(f"10,000 failing runs in {time.monotonic() - t:.1f} s, RSS +{grown >> 10} KiB")


# -- our fd_write in front of wasmtime's: same answers, pointer edge cases included --

def _fd_module(body):
    """A module that does `body` and exits with the last call's errno, or nwritten (at 8) on success."""
    return wat(f"""(module
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "fd_close" (func $close (param i32) (result i32)))
  (import "{WASI}" "fd_renumber" (func $ren (param i32 i32) (result i32)))
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "hello\\n")
  (func $iov (param $at i32) (param $buf i32) (param $len i32)
    (i32.store (local.get $at) (local.get $buf)) (i32.store (i32.add (local.get $at) (i32.const 4)) (local.get $len)))
  (func $report (param $e i32)
    (if (local.get $e) (then (call $exit (local.get $e))))
    (call $exit (i32.load (i32.const 8))))
  (func (export "_start") {body}))""")


HELLO_IOV = "(call $iov (i32.const 0) (i32.const 1024) (i32.const 6))"


def _write(fd=1, iovs=0, count=1, nwritten=8):
    return f"(call $report (call $w (i32.const {fd}) (i32.const {iovs}) (i32.const {count}) (i32.const {nwritten})))"


FD_CASES = {
    "plain": HELLO_IOV + _write(),
    "stderr": HELLO_IOV + _write(fd=2),
    "zero_iovecs_bad_pointer": _write(iovs=70001, count=0),
    "iovs_out_of_bounds": _write(iovs=65532),
    "iovs_misaligned": "(call $iov (i32.const 2) (i32.const 1024) (i32.const 6))" + _write(iovs=2),
    "buffer_out_of_bounds": "(call $iov (i32.const 0) (i32.const 65530) (i32.const 100))" + _write(),
    "nwritten_out_of_bounds": HELLO_IOV + _write(nwritten=65534),
    "nwritten_misaligned": HELLO_IOV + _write(nwritten=9),
    "only_first_non_empty_iovec": "(call $iov (i32.const 16) (i32.const 1024) (i32.const 0))"
                                  "(call $iov (i32.const 24) (i32.const 1025) (i32.const 5))"
                                  "(call $iov (i32.const 32) (i32.const 1024) (i32.const 6))" + _write(iovs=16, count=3),
    "iovec_array_past_the_end": "(call $iov (i32.const 65520) (i32.const 1024) (i32.const 6))" + _write(iovs=65520, count=3),
    "later_iovec_out_of_bounds": HELLO_IOV + "(call $iov (i32.const 8) (i32.const 70000) (i32.const 6))" + _write(count=2, nwritten=16),
    "too_many_iovecs": HELLO_IOV + _write(count=1 << 24),
    "all_iovecs": HELLO_IOV + _write(count=-1),
    "closed_stdout": "(drop (call $close (i32.const 1)))" + HELLO_IOV + _write(),
    "stdout_renumbered_onto_stderr": "(drop (call $ren (i32.const 1) (i32.const 2)))" + HELLO_IOV + _write(fd=2),
    "stdout_renumbered_away": "(drop (call $ren (i32.const 1) (i32.const 9)))" + HELLO_IOV + _write(fd=9),
    "stdin": HELLO_IOV + _write(fd=0),
    "bad_fd": HELLO_IOV + _write(fd=7),
    "negative_fd": HELLO_IOV + _write(fd=-1),
}


@pytest.mark.parametrize("case", sorted(FD_CASES))
def test_shadowed_fd_write_answers_like_wasmtime(both_hosts, case):
    module = _fd_module(FD_CASES[case])
    seen = []
    for host in both_hosts:
        out, err = [], []
        result = host.load(module).run(["m"], stdout=out.append, stderr=err.append, log_format="plain")
        last_line = (result.trap or "").strip().splitlines()[-1:]
        seen.append((result.exit_code, last_line, b"".join(out), b"".join(err)))
    assert seen[0] == seen[1]


def test_run_opens_logs_in_c_and_reports_an_unwritable_one(host, wasm, tmp_path):
    import _wasihost
    with pytest.raises(_wasihost.RunError, match="no/such/dir"):
        host.load(wasm.hello).run(["m"], stdout=str(tmp_path / "no" / "such" / "dir" / "x.log"))


def test_streams_sharing_a_log_keep_their_order(host, tmp_path):
    writes = "".join(HELLO_IOV.replace("1024", str(1024 + 2 * i)).replace("(i32.const 6)", "(i32.const 2)")
                     + f"(drop (call $w (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))"
                     for i, fd in enumerate([1, 2, 1, 2, 1]))
    module = wat(f"""(module
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "a\\nb\\nc\\nd\\ne\\n")
  (func $iov (param $at i32) (param $buf i32) (param $len i32)
    (i32.store (local.get $at) (local.get $buf)) (i32.store (i32.add (local.get $at) (i32.const 4)) (local.get $len)))
  (func (export "_start") {writes}))""")
    log = tmp_path / "shared.log"
    assert host.load(module).run(["m"], stdout=str(log), stderr=str(log)).exit_code == 0
    records = [line.split(b" ", 1)[1] for line in log.read_bytes().splitlines()]
    assert records == [b"stdout F a", b"stderr F b", b"stdout F c", b"stderr F d", b"stdout F e"]


def test_callable_gets_one_whole_record_per_call_even_when_c_writes_in_bulk(host, wasm):
    got = []
    result = host.load(wasm.tool).run(["tool", "lines", "3000"], stdout=got.append)
    assert result.exit_code == 0 and len(got) == 3000
    assert all(record.endswith(b"\n") and record.count(b"\n") == 1 for record in got)
    assert got[-1].endswith(b" stdout F line 2999 of 3000\n")


def test_result_is_an_immutable_record_equal_only_to_results():
    import pickle

    import _wasihost
    r = _wasihost.Result(3, None, 0.5, peak_memory=65536)
    assert (r.exit_code, r.trap, r.duration, r.killed, r.timed_out, r.instantiate_failed, r.cpu_seconds, r.peak_memory) == \
        (3, None, 0.5, False, False, False, 0.0, 65536)
    assert repr(r) == ("Result(exit_code=3, trap=None, duration=0.5, killed=False, timed_out=False, instantiate_failed=False, "
                       "cpu_seconds=0.0, peak_memory=65536)")
    with pytest.raises(AttributeError):
        r.exit_code = 0
    assert r == _wasihost.Result(3, None, 0.5, peak_memory=65536) and hash(r) == hash(_wasihost.Result(3, None, 0.5, peak_memory=65536))
    assert r != tuple(r) and r != _wasihost.Result(4, None, 0.5, peak_memory=65536)
    with pytest.raises(TypeError):
        r < r  # noqa: B015 (no ordering, as a dataclass without order=True)
    assert pickle.loads(pickle.dumps(r)) == r and r._replace(exit_code=0).exit_code == 0


def test_run_prepares_each_set_of_arguments_apart(host, wasm, tmp_path):
    import _wasihost
    tool = host.load(wasm.tool)
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    for env in ([("X", "1")], {"X": "2"}, (("X", "3"),), None, [["X", "4"]], [("X", "1")]):
        assert tool.run(["tool", "env"], env=env, stdout=str(a)).exit_code == 0
    assert [fields[3] for fields in _cri(a)] == [b"X=1", b"X=2", b"X=3", b"X=4", b"X=1"]
    assert tool.run(["tool", "exit", "7"], stdout=str(a), stderr=str(b)).exit_code == 7
    assert tool.run(["tool", "hello"], stdout=str(b), log_format="plain").exit_code == 0
    assert tool.run(["tool", "hello"], stdout=str(b)).exit_code == 0
    plain, cri = b.read_bytes().split(b"\n")[-3:-1]
    assert not plain[:4].isdigit() and cri.endswith(b" stdout F " + plain)
    assert tool.run(["tool", "hello"], stdout=str(b), log_max_size=1 << 20).exit_code == 0
    with pytest.raises(_wasihost.RunError, match="log_format"):
        tool.run(["tool", "hello"], stdout=str(b), log_format="json")
    grow = host.load(wasm.grow)
    assert grow.run(["grow"], memory_limit=1 << 20).trap and grow.run(["grow"], memory_limit=1 << 20).trap
    assert not minikrust._is_oom(tool.run(["tool", "hello"], stdout=str(b), memory_limit=1 << 20), 1 << 20)


def _cri(path):
    return [line.split(b" ", 3) for line in path.read_bytes().splitlines()]
