"""The WASI host face, run against both backends (native `_wasihost` and the wasmtime-py fallback)."""
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import minikrust
from tests import wasm_modules
from tests.helpers import time_scale, unavailable, wait_for
from tests.wasm_modules import native_available

CRI_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)$")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cri_records(path):
    """[(timestamp, stream, tag, line)] of a CRI log file; fails on any malformed line."""
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), data[-100:]
    records = []
    for raw in data.split(b"\n")[:-1]:
        m = CRI_LINE.match(raw)
        assert m, f"not a CRI log line: {raw[:200]!r}"
        records.append((m.group(1).decode(), m.group(2).decode(), m.group(3).decode(), m.group(4)))
    stamps = [r[0] for r in records]
    assert stamps == sorted(stamps), "timestamps go backwards"
    return records


def run(host, wasm, argv=("m",), **kw):
    with minikrust.module_errors():
        return host.load(wasm).run(list(argv), **kw)


def capture(host, wasm, argv=("m",), **kw):
    """(result, stdout bytes, stderr bytes) in plain mode."""
    out, err = [], []
    result = run(host, wasm, argv, stdout=out.append, stderr=err.append, log_format="plain", **kw)
    return result, b"".join(out), b"".join(err)


# -- identity, loading, errors --

def test_host_names_its_backend_and_wasmtime_version(backend):
    assert backend.backend in ("native", "wasmtime-py")
    assert re.match(r"^\d+\.\d+\.\d+", backend.wasmtime_version)


def test_load_is_content_addressed(backend, wasm, tmp_path):
    path = tmp_path / "hello.wasm"
    path.write_bytes(wasm.hello)
    a = backend.load(wasm.hello)
    assert re.match(r"^sha256:[0-9a-f]{64}$", a.digest)
    assert backend.load(str(path)) is a
    assert backend.load(wasm.hello, digest=a.digest) is a


@pytest.mark.parametrize("name, needle", [
    ("garbage", "magic"), ("truncated", ""), ("no_start", "_start"),
    ("unknown_import", "frobnicate"), ("wasi_unknown_function", "no_such_call"),
])
def test_bad_modules_raise_a_clear_load_error(backend, wasm, name, needle):
    data = {"garbage": b"this is not wasm at all", "truncated": wasm.hello[:20]}.get(name)
    data = data if data is not None else getattr(wasm, name)
    with pytest.raises(minikrust.ModuleLoadError) as info, minikrust.module_errors():
        backend.load(data)
    assert needle in str(info.value) and len(str(info.value)) > 10
    assert isinstance(info.value, minikrust.ModuleError)


def test_missing_preopen_dir_raises_run_error(backend, wasm, tmp_path):
    with pytest.raises(minikrust.ModuleRunError) as info, minikrust.module_errors():
        backend.load(wasm.hello).start(["m"], preopens=[(str(tmp_path / "nope"), "/data", False)])
    assert "nope" in str(info.value)


def test_unwritable_log_path_raises_run_error(backend, wasm, tmp_path):
    with pytest.raises(minikrust.ModuleRunError), minikrust.module_errors():
        backend.load(wasm.hello).start(["m"], stdout=str(tmp_path / "no" / "such" / "dir" / "x.log"))


# -- exit codes, traps, results --

@pytest.mark.parametrize("code", [0, 1, 3, 125])
def test_proc_exit_code_is_the_result(backend, wasm, code):
    result = run(backend, wasm.exit(code))
    assert (result.exit_code, result.trap, result.killed, result.timed_out, result.instantiate_failed) == \
        (wasm.status(code), None, False, False, False)


@pytest.mark.parametrize("code", [126, 255, -1])
def test_exit_status_outside_wasi_range_is_a_trap(backend, wasm, code):
    result = run(backend, wasm.exit(code))  # wasmtime refuses statuses outside [0, 126)
    assert result.exit_code is None and "exit status" in result.trap


def test_returning_from_start_is_exit_zero_with_measurements(backend, wasm):
    result = run(backend, wasm.hello)
    assert result.exit_code == 0 and result.trap is None
    assert 0 < result.duration < 5
    assert 0 <= result.cpu_seconds <= result.duration + 0.01   # the run's own thread: at most its wall time
    assert result.peak_memory == 65536


def test_cpu_seconds_count_the_time_a_module_computes(backend, wasm):
    result = run(backend, wasm.loop, deadline=0.5)     # spins until its deadline
    assert result.timed_out
    assert 0.02 < result.cpu_seconds <= result.duration + 0.05, result   # (2 busy cores share it here)


def test_c_main_return_value_is_the_exit_code(backend, wasm):
    assert run(backend, wasm.tool, ["tool", "exit", "7"]).exit_code == wasm.status(7)
    assert run(backend, wasm.tool, ["tool", "hello"]).exit_code == 0


def test_trap_gives_message_and_no_exit_code(backend, wasm):
    result, out, _ = capture(backend, wasm.trap)
    assert result.exit_code is None
    assert "unreachable" in result.trap
    assert out == b"hello\n"  # output before the trap is kept
    assert not (result.killed or result.timed_out or result.instantiate_failed)


# -- WASI: args, env, stdin, preopens --

def test_args_reach_the_module(backend, wasm):
    result, out, _ = capture(backend, wasm.tool, ["tool", "args", "two words", "", "ünïcode"])
    assert result.exit_code == 0
    assert out.decode() == "0=tool\n1=args\n2=two words\n3=\n4=ünïcode\n"


@pytest.mark.parametrize("env", [{"A": "1", "B": "x=y"}, [("A", "1"), ("B", "x=y")]])
def test_env_reaches_the_module(backend, wasm, env):
    _, out, _ = capture(backend, wasm.tool, ["tool", "env"], env=env)
    assert out.decode().splitlines() == ["A=1", "B=x=y"]


def test_empty_env_gives_no_variables(backend, wasm):
    _, out, _ = capture(backend, wasm.tool, ["tool", "env"])
    assert out == b""


def test_stdin_bytes_are_readable(backend, wasm):
    _, out, _ = capture(backend, wasm.tool, ["tool", "stdin"], stdin=b"from stdin\n")
    assert out == b"from stdin\n"


def test_read_only_preopen_can_be_read_but_not_written(backend, wasm, tmp_path):
    (tmp_path / "in.txt").write_text("config value\n")
    pre = [(str(tmp_path), "/config", True)]
    result, out, _ = capture(backend, wasm.tool, ["tool", "cat", "/config/in.txt"], preopens=pre)
    assert (result.exit_code, out) == (0, b"config value\n")
    result, out, _ = capture(backend, wasm.tool, ["tool", "write", "/config/new.txt", "x"], preopens=pre)
    assert result.exit_code == wasm.status(2), out
    assert not (tmp_path / "new.txt").exists()


def test_read_write_preopen_can_be_written(backend, wasm, tmp_path):
    pre = [(str(tmp_path), "/data", False)]
    result, out, _ = capture(backend, wasm.tool, ["tool", "write", "/data/out.txt", "payload"], preopens=pre)
    assert (result.exit_code, out) == (0, b"written\n")
    assert (tmp_path / "out.txt").read_text() == "payload"


def test_several_preopens(backend, wasm, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A")
    pre = [(str(a), "/a", True), (str(b), "/b", False)]
    assert capture(backend, wasm.tool, ["tool", "cat", "/a/f"], preopens=pre)[1] == b"A"
    assert capture(backend, wasm.tool, ["tool", "write", "/b/g", "B"], preopens=pre)[0].exit_code == 0
    assert (b / "g").read_text() == "B"


@pytest.mark.parametrize("target", ["../secret", "/data/../secret", "/secret", "/etc/passwd", "/data/link/secret",
                                    "/data/abs-link"])
def test_module_cannot_leave_its_preopen(backend, wasm, tmp_path, target):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret").write_text("do not read")
    os.symlink(str(tmp_path), str(data / "link"))
    os.symlink(str(tmp_path / "secret"), str(data / "abs-link"))
    result, out, _ = capture(backend, wasm.tool, ["tool", "open", target], preopens=[(str(data), "/data", False)])
    assert result.exit_code == wasm.status(2), out
    assert b"ok" not in out


# -- logging --

def test_hello_writes_one_cri_record(backend, wasm, tmp_path):
    log_path = tmp_path / "0.log"
    before = time.time()
    run(backend, wasm.hello, stdout=str(log_path), stderr=str(log_path))
    [(stamp, stream, tag, line)] = cri_records(log_path)
    assert (stream, tag, line) == ("stdout", "F", b"hello")
    secs = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 2 <= secs <= time.time() + 2


def test_cri_log_interleaves_streams_cuts_long_lines_and_flags_fragments(backend, wasm, tmp_path):
    log_path = tmp_path / "0.log"
    result = run(backend, wasm.fdedge, ["fdedge"], stdout=str(log_path), stderr=str(log_path))
    assert result.exit_code == 0
    records = cri_records(log_path)
    out = [(tag, line) for _, stream, tag, line in records if stream == "stdout"]
    # 100,000-byte line: six 16 KiB P records and an F with the rest
    big = [(tag, line) for tag, line in out if b"yyyy" in line]
    assert [tag for tag, _ in big] == ["P"] * 6 + ["F"]
    assert all(len(line) == 16384 for _, line in big[:6]) and 0 < len(big[6][1]) < 16384
    assert ("F", b"no newline then newline") in out
    err = [(tag, line) for _, stream, tag, line in records if stream == "stderr"]
    assert ("F", b"e1") in err and ("F", b"e2") in err and ("F", b"e3") in err
    assert ("F", b"o2o2b") in out  # "o2" then "o2b\n" on stdout join into one line
    order = [line for _, _, _, line in records if line in (b"o1", b"e1", b"o2o2b", b"e2")]
    assert order == [b"o1", b"e1", b"e2", b"o2o2b"]


def test_trailing_fragment_is_a_partial_record(backend, wasm, tmp_path):
    log_path = tmp_path / "0.log"
    source = '#include <stdio.h>\nint main(void){fputs("first\\nno end", stdout);return 0;}\n'
    run(backend, wasm.c(source, "fragment"), stdout=str(log_path))
    assert [(s, t, line) for _, s, t, line in cri_records(log_path)] == [("stdout", "F", b"first"), ("stdout", "P", b"no end")]


def test_log_appends_across_runs(backend, wasm, tmp_path):
    log_path = tmp_path / "0.log"
    for _ in range(3):
        run(backend, wasm.hello, stdout=str(log_path))
    assert [line for *_, line in cri_records(log_path)] == [b"hello"] * 3


def test_many_lines_are_logged_in_order(backend, wasm, tmp_path):
    log_path = tmp_path / "0.log"
    run(backend, wasm.tool, ["tool", "lines", "10000"], stdout=str(log_path))
    lines = [line for _, stream, tag, line in cri_records(log_path) if stream == "stdout" and tag == "F"]
    assert lines == [f"line {i} of 10000".encode() for i in range(10000)]


def test_plain_mode_writes_raw_bytes(backend, wasm, tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    run(backend, wasm.tool, ["tool", "stderr", "oops"], stdout=str(out), stderr=str(err), log_format="plain")
    assert err.read_bytes() == b"oops\n" and out.read_bytes() == b""


def test_stdout_to_an_open_fd(backend, wasm, tmp_path):
    path = tmp_path / "fd.log"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT)
    try:
        run(backend, wasm.hello, stdout=fd, log_format="plain")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"hello\n"


def test_callable_receives_cri_records(backend, wasm):
    got = []
    run(backend, wasm.hello, stdout=got.append)
    assert len(got) == 1 and CRI_LINE.match(got[0].rstrip(b"\n")).group(4) == b"hello"


# -- limits and control --

def test_kill_stops_an_infinite_loop_within_100ms(backend, wasm):
    handle = backend.load(wasm.loop).start(["loop"])
    assert handle.wait(timeout=0.2) is None and not handle.done
    killed_at = time.monotonic()
    handle.kill()
    wait_for(lambda: handle.done, timeout=5, interval=0.001, what="killed run to finish")
    assert time.monotonic() - killed_at < 0.1 * time_scale()  # 0.22 s seen under qemu-user
    result = handle.wait()
    assert result.killed and result.exit_code is None and not result.timed_out and result.trap is None


def test_a_runs_end_makes_its_fileno_readable_for_one_selector_over_many_runs(backend, wasm):
    import selectors
    loops = [backend.load(wasm.loop).start(["loop"]) for _ in range(3)]
    hello = backend.load(wasm.hello).start(["m"])
    with selectors.DefaultSelector() as selector:
        for run in loops + [hello]:
            selector.register(run, selectors.EVENT_READ)
        ready = [key.fileobj for key, _ in selector.select(timeout=5)]
        assert ready == [hello] and hello.wait(0).exit_code == 0  # wait() does not block once readable
        selector.unregister(hello)
        assert selector.select(timeout=0.05) == [] and not any(run.done for run in loops)
        loops[1].kill()
        assert [key.fileobj for key, _ in selector.select(timeout=5)] == [loops[1]]
        assert loops[1].wait(0).killed and loops[1].done
    for run in loops:
        run.kill()
        assert run.wait(5).killed


def test_a_native_run_starts_no_python_thread(wasm, tmp_path):
    if native_available():
        unavailable(native_available())
    import _wasihost
    module = _wasihost.Host(str(tmp_path / "cache")).load(wasm.loop)
    before = threading.active_count()
    runs = [module.start(["loop"]) for _ in range(4)]
    assert threading.active_count() == before   # each runs on a thread made in C, nothing waits on it

    def run_threads():      # each names itself when it starts
        names = []
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        return names.count("wasm-run") >= 4
    wait_for(run_threads, timeout=5, what="four threads named wasm-run")
    for run in runs:
        run.kill()
    assert all(run.wait(5).killed for run in runs)


@pytest.mark.parametrize("choice", ["native", "wasmtime-py"])
def test_compiling_keeps_no_thread_per_core(choice, wasm, tmp_path):
    """wasmtime's parallel compilation keeps a pool of one thread per core for the process's life;
    a kubelet's threads are its running modules + 16, on any number of cores: modules compile on
    the loading thread. In a fresh process: the threads a host and a compile leave behind."""
    if choice == "native" and native_available():
        unavailable(native_available())
    module = wasm.tool      # a C program (a path)
    (tmp_path / "m.wasm").write_bytes(open(module, "rb").read() if isinstance(module, str) else module)
    script = ("import os, sys, minikrust\n"
              "count = lambda: len(os.listdir('/proc/self/task'))\n"
              "before = count()\n"
              "host = minikrust.load_host(sys.argv[1], sys.argv[2])\n"
              "host.load(open(sys.argv[3], 'rb').read())\n"
              "print(count() - before, host.backend)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), choice, str(tmp_path / "m.wasm")],
                         capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    added, backend = out.stdout.split()
    assert backend == choice and int(added) <= 1, out.stdout    # the native host's epoch ticker at most


@pytest.mark.parametrize("command", ["sleep", "abssleep"])
def test_kill_stops_a_sleeping_module_within_100ms(backend, wasm, command):
    out = []
    handle = backend.load(wasm.tool).start(["tool", command, "3000"], stdout=out.append, log_format="plain")
    wait_for(lambda: b"sleeping" in b"".join(out), timeout=5, what="the module to start sleeping")
    killed_at = time.monotonic()
    handle.kill()
    wait_for(lambda: handle.done, timeout=5, interval=0.001, what="killed sleeper to finish")
    assert time.monotonic() - killed_at < 0.1 * time_scale()
    assert handle.wait().killed


def test_deadline_stops_a_sleeping_module(backend, wasm):
    result = run(backend, wasm.tool, ["tool", "sleep", "3000"], deadline=0.2)
    assert result.timed_out and result.duration < 2


@pytest.mark.parametrize("command", ["sleep", "abssleep"])
def test_sleep_returns_after_its_time(backend, wasm, command):
    started = time.monotonic()
    result, out, _ = capture(backend, wasm.tool, ["tool", command, "50"])
    assert result.exit_code == 0 and out.splitlines()[-1] in (b"woke", b"woke 0")
    assert time.monotonic() - started >= 0.05


def test_kill_after_exit_is_harmless(backend, wasm):
    handle = backend.load(wasm.hello).start(["m"])
    result = handle.wait(timeout=5)
    handle.kill()
    assert result.exit_code == 0 and handle.wait().killed is False


def test_deadline_stops_a_loop(backend, wasm):
    result = run(backend, wasm.loop, deadline=0.2)
    assert result.timed_out and not result.killed and result.exit_code is None and result.trap is None
    assert 0.15 < result.duration < 2


def test_deadline_does_not_touch_a_quick_module(backend, wasm):
    result = run(backend, wasm.hello, deadline=10)
    assert result.exit_code == 0 and not result.timed_out


def test_memory_limit_stops_growth_and_reports_oom(backend, wasm):
    result = run(backend, wasm.grow, memory_limit=1 << 20)
    assert minikrust._is_oom(result, 1 << 20) and result.exit_code is None and "unreachable" in result.trap
    assert result.peak_memory <= 1 << 20


def test_c_malloc_failure_under_limit_is_oom(backend, wasm):
    result, _, err = capture(backend, wasm.tool, ["tool", "alloc", "64"], memory_limit=8 << 20)
    assert result.exit_code == 3 and minikrust._is_oom(result, 8 << 20), err
    assert b"out of memory" in err


def test_memory_limit_leaves_small_modules_alone(backend, wasm):
    result, out, _ = capture(backend, wasm.tool, ["tool", "alloc", "2"], memory_limit=16 << 20)
    assert result.exit_code == 0 and not minikrust._is_oom(result, 16 << 20) and out == b"allocated\n"


def test_initial_memory_above_limit_is_oom(backend, wasm):
    result = run(backend, wasm.hello, memory_limit=1024)
    assert result.instantiate_failed and minikrust._is_oom(result, 1024) and result.exit_code is None and result.trap


def test_eight_threads_run_modules_at_once(backend, wasm, tmp_path):
    """Eight spinning modules with a 1 s deadline each end after about 1 s in all, not 8 s: they
    ran at the same time, each on its own thread."""
    loop = backend.load(wasm.loop)
    started = time.monotonic()
    handles = [loop.start(["loop"], deadline=1.0) for _ in range(8)]
    results = [h.wait(timeout=10) for h in handles]
    elapsed = time.monotonic() - started
    assert all(r is not None and r.timed_out for r in results), results
    assert 0.9 < elapsed < 4.0, elapsed

    tool = backend.load(wasm.tool)
    errors = []

    def worker(n):
        try:
            for i in range(5):
                path = tmp_path / f"{n}-{i}.log"
                result = tool.run(["tool", "lines", str(50 + n)], stdout=str(path))
                lines = [line for *_, line in cri_records(path)]
                assert result.exit_code == 0 and len(lines) == 50 + n, (result, len(lines))
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_failed_setups_do_not_leak_runs(backend, wasm, tmp_path):
    module = backend.load(wasm.hello)
    for _ in range(200):
        with pytest.raises(minikrust.ModuleRunError), minikrust.module_errors():
            module.start(["m"], preopens=[(str(tmp_path / "missing"), "/x", True)])
    assert module.run(["m"]).exit_code == 0


# -- live usage (kubectl top) --

def thread_cpu_seconds(digest):
    """{thread id: CPU seconds} of the threads that may run `digest`, as the kernel accounts them
    (/proc, in ticks): the native host's run threads (named "wasm-run" in C; an idle one waits for
    the next run) and the fallback's (Python threads named after the digest)."""
    tids = [t.native_id for t in threading.enumerate() if t.name.endswith(digest[7:19]) and t.is_alive()]
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:  # other tests' threads come and go (ENOENT, or ESRCH while one exits)
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "wasm-run" and int(tid) not in tids:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return seconds


def test_usage_of_a_spinning_run_follows_its_threads_cpu_clock(backend, wasm):
    module = backend.load(wasm.loop)
    handle = module.start(["loop"])
    try:
        wait_for(lambda: handle.usage()[0] > 0.05, timeout=30, what="the loop to use CPU")
        cpu0, kernel0, wall0 = handle.usage()[0], thread_cpu_seconds(module.digest), time.monotonic()
        wait_for(lambda: handle.usage()[0] - cpu0 >= 0.5, timeout=60, what="half a CPU second more")
        cpu1, kernel1, wall1 = handle.usage()[0], thread_cpu_seconds(module.digest), time.monotonic()
    finally:
        handle.kill()
    kernel0, kernel1 = 0, max(kernel1[tid] - kernel0.get(tid, 0) for tid in kernel1)  # the spinning thread's
    # read from this thread while the module spins: the kernel's figure for that thread, never
    # more than the wall time (about the wall time on an idle machine)
    assert abs((cpu1 - cpu0) - (kernel1 - kernel0)) <= 0.05 + 0.1 * (kernel1 - kernel0)
    assert cpu1 - cpu0 <= (wall1 - wall0) + 0.02
    result = handle.wait(5)
    assert handle.usage()[:2] == (result.cpu_seconds, 0) and result.cpu_seconds >= cpu1


def test_usage_counts_touched_memory_not_grown_or_reserved(backend, wasm):
    handle = backend.load(wasm.hold(16, grow_mib=64)).start(["hold"])
    try:
        usage = wait_for(lambda: (lambda u: u if u[1] >= 16 << 20 else None)(handle.usage()), timeout=30,
                         what="16 MiB touched")
        assert usage[1] <= (16 << 20) + (1 << 20)  # + the first page, the host's buffers: not 64 MiB
        assert usage[2] >= 64 << 20                # the peak: the linear memory it grew to
    finally:
        handle.kill()
    result = handle.wait(5)
    cpu, memory, peak = handle.usage()
    assert memory == 0 and peak >= result.peak_memory >= 64 << 20


# -- the compiled-module cache --

CACHE_SCRIPT = """
import json, sys, time
sys.path.insert(0, {root!r})
import minikrust
host = minikrust.load_host({cache!r}, backend={backend!r})
t = time.perf_counter()
module = host.load({path!r})
load = time.perf_counter() - t
print(json.dumps({{"load": load, "exit": module.run(["m"]).exit_code, "backend": host.backend}}))
"""


def test_compiled_module_cache_survives_a_new_process(backend, wasm, tmp_path):
    path = tmp_path / "big.wasm"
    path.write_bytes(wasm.big)
    cache = tmp_path / "cache"
    script = CACHE_SCRIPT.format(root=ROOT, cache=str(cache), backend=backend.backend, path=str(path))

    def fresh_process():
        # compiling 1 MB takes 3 s here, minutes under qemu-user
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120 * time_scale())
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = fresh_process()
    files = sorted(os.listdir(cache))
    assert files, "nothing cached"
    second = fresh_process()
    assert sorted(os.listdir(cache)) == files
    assert first["exit"] == second["exit"] == 0 and second["backend"] == backend.backend
    assert second["load"] * 3 < first["load"], (first, second)


def test_corrupt_cache_entry_is_recompiled(backend, wasm, tmp_path):
    cache = tmp_path / "cache"
    script = CACHE_SCRIPT.format(root=ROOT, cache=str(cache), backend=backend.backend, path=str(tmp_path / "h.wasm"))
    (tmp_path / "h.wasm").write_bytes(wasm.hello)
    for corrupt in (False, True):
        if corrupt:
            for name in os.listdir(cache):
                (cache / name).write_bytes(b"garbage")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["exit"] == 0


# -- load_host --

def test_load_host_gives_one_host_per_cache_dir(tmp_path):
    a = minikrust.load_host(str(tmp_path / "a"), backend="wasmtime-py")
    assert minikrust.load_host(str(tmp_path / "a"), backend="wasmtime-py") is a
    assert minikrust.load_host(str(tmp_path / "b"), backend="wasmtime-py") is not a


def test_load_host_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", "wasmtime-py")
    assert minikrust.load_host(str(tmp_path)).backend == "wasmtime-py"
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", "bogus")
    with pytest.raises(minikrust.ConfigError):
        minikrust.load_host(str(tmp_path / "x"))


# -- differential: the native host's own WASI calls against wasmtime's --

def _normalised_log(path):
    return [(stream, tag, line) for _, stream, tag, line in cri_records(path)]


@pytest.mark.parametrize("case", ["fdedge", "hello", "c_hello", "trap", "args", "stderr", "lines", "exit"])
def test_native_and_fallback_agree(both_hosts, wasm, tmp_path, case):
    modules = {"fdedge": (wasm.fdedge, ["fdedge"]), "hello": (wasm.hello, ["m"]), "c_hello": (wasm.c_hello, ["h"]),
               "trap": (wasm.trap, ["m"]), "args": (wasm.tool, ["tool", "args", "x", "y z"]),
               "stderr": (wasm.tool, ["tool", "stderr", "to stderr"]), "lines": (wasm.tool, ["tool", "lines", "300"]),
               "exit": (wasm.tool, ["tool", "exit", "42"])}
    module, argv = modules[case]
    seen = []
    for host in both_hosts:
        shared = tmp_path / f"{host.backend}.log"
        out, err = tmp_path / f"{host.backend}.out", tmp_path / f"{host.backend}.err"
        r1 = run(host, module, argv, stdout=str(shared), stderr=str(shared))
        r2 = run(host, module, argv, stdout=str(out), stderr=str(err), log_format="plain")
        seen.append(((r1.exit_code, r1.trap is None, r2.exit_code), _normalised_log(shared),
                     out.read_bytes(), err.read_bytes()))
    assert seen[0] == seen[1]


FDSTAT_IMPORTS = (f'(import "{wasm_modules.WASI}" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))'
                  f'(import "{wasm_modules.WASI}" "fd_renumber" (func $renumber (param i32 i32) (result i32)))'
                  f'(import "{wasm_modules.WASI}" "fd_close" (func $close (param i32) (result i32)))'
                  f'(import "{wasm_modules.WASI}" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))')
HELLO_IOV = "(i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 6))"


def _write(fd, nwritten=8):
    return f"(call $fd_write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const {nwritten}))"


# Raw WASI calls with bad pointers and fd juggling: the module exits with the last errno
FD_CASES = {
    "buf-out-of-bounds": "(i32.store (i32.const 0) (i32.const 70000)) (i32.store (i32.const 4) (i32.const 6))"
                         f"(call $proc_exit {_write(1)})",
    "iovecs-out-of-bounds": "(call $proc_exit (call $fd_write (i32.const 1) (i32.const 65532) (i32.const 1) (i32.const 8)))",
    "nwritten-out-of-bounds": f"{HELLO_IOV} (call $proc_exit {_write(1, 65534)})",
    "len-out-of-bounds": "(i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 65000))"
                         f"(call $proc_exit {_write(1)})",
    "fdstat-out-of-bounds": "(call $proc_exit (call $fdstat (i32.const 1) (i32.const 65530)))",
    "fdstat-bad-fd-out-of-bounds": "(call $proc_exit (call $fdstat (i32.const 77) (i32.const 65530)))",
    "renumber-2-to-1": f"{HELLO_IOV} (drop (call $renumber (i32.const 2) (i32.const 1))) (drop {_write(1)})"
                       f"(call $proc_exit {_write(2)})",
    "renumber-1-to-5": f"{HELLO_IOV} (drop (call $renumber (i32.const 1) (i32.const 5))) (drop {_write(1)})"
                       f"(call $proc_exit {_write(5)})",
    "renumber-1-to-3-preopen": f"{HELLO_IOV} (drop (call $renumber (i32.const 1) (i32.const 3)))"
                               f"(call $proc_exit {_write(3)})",
    "poll-no-subscriptions": "(call $proc_exit (call $poll (i32.const 0) (i32.const 512) (i32.const 0) (i32.const 8)))",
    "poll-misaligned": "(call $proc_exit (call $poll (i32.const 3) (i32.const 512) (i32.const 1) (i32.const 8)))",
    "poll-subs-out-of-bounds": "(call $proc_exit (call $poll (i32.const 65528) (i32.const 512) (i32.const 1) (i32.const 8)))",
    "poll-events-out-of-bounds": "(i32.store (i32.const 16) (i32.const 1))"
                                 "(call $proc_exit (call $poll (i32.const 0) (i32.const 65528) (i32.const 1) (i32.const 1000)))",
    "poll-out-of-bounds": "(call $proc_exit (call $poll (i32.const 65500) (i32.const 512) (i32.const 1) (i32.const 8)))",
    # one relative monotonic clock of 1 ms: nevents and the event's userdata/type land in memory
    "poll-clock": "(i64.store (i32.const 0) (i64.const 77)) (i32.store8 (i32.const 8) (i32.const 0))"
                  "(i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 1000000))"
                  "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                  "(call $proc_exit (i32.add (i32.load (i32.const 1000))"
                  " (i32.add (i32.wrap_i64 (i64.load (i32.const 512))) (i32.load8_u (i32.const 522)))))",
    "poll-bad-clock-id": "(i32.store8 (i32.const 8) (i32.const 0)) (i32.store (i32.const 16) (i32.const 9))"
                         "(call $proc_exit (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))",
    "poll-stdin-read": "(i32.store8 (i32.const 8) (i32.const 1)) (i32.store (i32.const 16) (i32.const 0))"
                       "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                       "(call $proc_exit (i32.add (i32.load (i32.const 1000)) (i32.load16_u (i32.const 520))))",
    "close-2-write-1": f"{HELLO_IOV} (drop (call $close (i32.const 2))) (drop {_write(1)}) (call $proc_exit {_write(2)})",
    "renumber-1-to-1": f"{HELLO_IOV} (drop (call $renumber (i32.const 1) (i32.const 1))) (call $proc_exit {_write(1)})",
    "renumber-99-to-1": f"{HELLO_IOV} (drop (call $renumber (i32.const 99) (i32.const 1))) (call $proc_exit {_write(1)})",
    "renumber-1-to-2": f"{HELLO_IOV} (drop (call $renumber (i32.const 1) (i32.const 2))) (drop {_write(2)})"
                       f"(call $proc_exit {_write(1)})",
    "renumber-preopen-to-1": f"{HELLO_IOV} (drop (call $renumber (i32.const 3) (i32.const 1))) (call $proc_exit {_write(1)})",
    "renumber-returns": f"(call $proc_exit (i32.add (i32.mul (call $renumber (i32.const 1) (i32.const 77)) (i32.const 10))"
                        " (call $renumber (i32.const 1) (i32.const 2))))",
    "close-1-renumber-2-to-1": f"{HELLO_IOV} (drop (call $close (i32.const 1))) (drop (call $renumber (i32.const 2) (i32.const 1)))"
                               f"(drop {_write(1)}) (call $proc_exit {_write(2)})",
    "close-2-fdstat-2": "(drop (call $close (i32.const 2))) (call $proc_exit (call $fdstat (i32.const 2) (i32.const 64)))",
    "renumber-1-to-5-fdstat": "(drop (call $renumber (i32.const 1) (i32.const 5)))"
                              "(drop (call $fdstat (i32.const 5) (i32.const 64)))"
                              "(call $proc_exit (i32.add (i32.load8_u (i32.const 64)) (i32.load8_u (i32.const 80))))",
    "empty-iovec-out-of-bounds": "(i32.store (i32.const 0) (i32.const 70000)) (i32.store (i32.const 4) (i32.const 0))"
                                 f"(call $proc_exit {_write(1)})",
    "2000-empty-iovecs": f"(call $proc_exit (call $fd_write (i32.const 1) (i32.const 16384) (i32.const 2000) (i32.const 8)))",
    "iovec-count-overflow": "(call $proc_exit (call $fd_write (i32.const 1) (i32.const 0) (i32.const 0x20000000) (i32.const 8)))",
    "poll-two-clocks": "(i64.store (i32.const 0) (i64.const 5)) (i32.store (i32.const 16) (i32.const 1))"
                       "(i64.store (i32.const 24) (i64.const 1000000))"
                       "(i64.store (i32.const 48) (i64.const 6)) (i32.store (i32.const 64) (i32.const 0))"
                       "(i64.store (i32.const 72) (i64.const 300000000))"
                       "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 2) (i32.const 1000)))"
                       "(call $proc_exit (i32.add (i32.mul (i32.load (i32.const 1000)) (i32.const 10))"
                       " (i32.wrap_i64 (i64.load (i32.const 512)))))",
    "poll-huge-timeout-and-short": "(i64.store (i32.const 0) (i64.const 5)) (i32.store (i32.const 16) (i32.const 1))"
                                   "(i64.store (i32.const 24) (i64.const -1))"
                                   "(i64.store (i32.const 48) (i64.const 6)) (i32.store (i32.const 64) (i32.const 1))"
                                   "(i64.store (i32.const 72) (i64.const 2000000))"
                                   "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 2) (i32.const 1000)))"
                                   "(call $proc_exit (i32.add (i32.mul (i32.load (i32.const 1000)) (i32.const 10))"
                                   " (i32.wrap_i64 (i64.load (i32.const 512)))))",
    "poll-monotonic-abstime-past": "(i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 1))"
                                   "(i32.store16 (i32.const 40) (i32.const 1))"
                                   "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                                   "(call $proc_exit (i32.load (i32.const 1000)))",
    "poll-zero-timeout": "(i32.store (i32.const 16) (i32.const 1))"
                         "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                         "(call $proc_exit (i32.load (i32.const 1000)))",
    "poll-realtime-abstime-past": "(i32.store (i32.const 16) (i32.const 0)) (i64.store (i32.const 24) (i64.const 1))"
                                  "(i32.store16 (i32.const 40) (i32.const 1))"
                                  "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                                  "(call $proc_exit (i32.load (i32.const 1000)))",
    "poll-stdout-writable": "(i32.store8 (i32.const 8) (i32.const 2)) (i32.store (i32.const 16) (i32.const 1))"
                            "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                            "(call $proc_exit (i32.add (i32.load (i32.const 1000)) (i32.mul (i32.load16_u (i32.const 520))"
                            " (i32.const 10))))",
    "poll-closed-fd": "(drop (call $close (i32.const 1))) (i32.store8 (i32.const 8) (i32.const 2))"
                      "(i32.store (i32.const 16) (i32.const 1))"
                      "(drop (call $poll (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1000)))"
                      "(call $proc_exit (i32.add (i32.load (i32.const 1000)) (i32.mul (i32.load16_u (i32.const 520))"
                      " (i32.const 10))))",
}


@pytest.mark.parametrize("case", sorted(FD_CASES))
def test_native_and_fallback_agree_on_raw_fd_calls(both_hosts, tmp_path, case):
    module = wasm_modules._write_module(FD_CASES[case], imports=FDSTAT_IMPORTS)
    (tmp_path / "pre").mkdir()
    seen = []
    for host in both_hosts:
        shared = tmp_path / f"{host.backend}.log"
        result = run(host, module, stdout=str(shared), stderr=str(shared), preopens=[(str(tmp_path / "pre"), "/p", False)])
        trap_tail = (result.trap or "").strip().splitlines()[-1:]
        seen.append((result.exit_code, trap_tail, _normalised_log(shared)))
    assert seen[0] == seen[1]


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_failing_runs_and_loads_do_not_leak(backend, wasm, tmp_path):
    trap = backend.load(wasm.trap)
    bad = [b"\0asm\x01\0\0\0garbage", wasm.no_start, wasm.unknown_import]

    def churn(n):
        for i in range(n):
            trap.run(["m"], stdout=str(tmp_path / "log"), memory_limit=1 << 20)
            with pytest.raises(minikrust.ModuleLoadError), minikrust.module_errors():
                backend.load(bad[i % 3])
            os.truncate(tmp_path / "log", 0)

    churn(300)  # warm up caches and allocator pools
    before = _rss_kb()
    n = 10000 if backend.backend == "native" else 1500  # the fallback is ~10x slower per run
    churn(n)
    grown = _rss_kb() - before
    assert grown < 20 * 1024, f"RSS grew by {grown} KiB over {n} failing runs and loads"


def test_import_minikrust_does_not_load_wasmtime():
    code = "import sys, minikrust; print('wasmtime' in sys.modules, '_wasihost' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_auto_backend_falls_back_when_native_is_missing(tmp_path, monkeypatch):
    def missing(cache_dir):
        raise ImportError("no _wasihost here")
    monkeypatch.setattr(minikrust, "_native_host", missing)
    assert minikrust.load_host(str(tmp_path / "auto"), backend="auto").backend == "wasmtime-py"
    with pytest.raises(minikrust.ModuleError, match="no _wasihost here"):
        minikrust.load_host(str(tmp_path / "native"), backend="native")


@pytest.mark.parametrize("mode", ["stdout-discarded", "stdout-to-fd", "stdout-to-callable"])
def test_native_and_fallback_agree_whatever_stdout_is(both_hosts, wasm, tmp_path, mode):
    seen = []
    for host in both_hosts:
        err = tmp_path / f"{host.backend}.err"
        chunks = []
        fd = os.open(str(tmp_path / f"{host.backend}.out"), os.O_WRONLY | os.O_CREAT)
        try:
            stdout = {"stdout-discarded": None, "stdout-to-fd": fd, "stdout-to-callable": chunks.append}[mode]
            result = run(host, wasm.fdedge, ["fdedge"], stdout=stdout, stderr=str(err), log_format="plain")
        finally:
            os.close(fd)
        seen.append((result.exit_code, err.read_bytes(), (tmp_path / f"{host.backend}.out").read_bytes(),
                     b"".join(chunks)))
    assert seen[0] == seen[1]


EXIT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import minikrust
host = minikrust.load_host({cache!r}, backend={backend!r})
assert host.load({hello!r}).run(["m"], stdout={log!r}).exit_code == 0
host.load({loop!r}).start(["loop"])  # still running when the interpreter exits
print("bye")
"""


def test_process_exits_cleanly_with_runs_done_and_running(backend, wasm, tmp_path):
    script = EXIT_SCRIPT.format(root=ROOT, cache=str(tmp_path / "cache"), backend=backend.backend, hello=wasm.hello,
                                loop=wasm.loop, log=str(tmp_path / "log"))
    for _ in range(6):  # wasmtime's threads used to abort ~1 exit in 15 (a Python callback at teardown)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (0, "bye\n"), proc.stderr[-2000:]


@pytest.mark.parametrize("where", ["argv", "env-name", "env-value"])
def test_nul_bytes_in_argv_or_env_are_refused(backend, wasm, where):
    argv, env = ["m"], {"A": "1"}
    if where == "argv":
        argv = ["m", "a\0b"]
    else:
        env = {"A\0B": "1"} if where == "env-name" else {"A": "1\0"}
    with pytest.raises(minikrust.ModuleRunError, match="NUL"), minikrust.module_errors():
        backend.load(wasm.hello).run(argv, env=env)


def test_empty_stdin_reads_as_end_of_file(backend, wasm):
    result, out, _ = capture(backend, wasm.tool, ["tool", "stdin"], stdin=b"")
    assert (result.exit_code, out) == (0, b"")


def test_callable_gets_one_cri_record_per_call_from_both_streams(backend, wasm):
    got = []
    lock = threading.Lock()

    def sink(record):
        with lock:
            got.append(record)

    result = run(backend, wasm.fdedge, ["fdedge"], stdout=sink, stderr=sink)
    assert result.exit_code == 0
    assert all(r.endswith(b"\n") and r.count(b"\n") == 1 and CRI_LINE.match(r[:-1]) for r in got), got[:3]
    streams = {CRI_LINE.match(r[:-1]).group(2) for r in got}
    assert streams == {b"stdout", b"stderr"}
    assert len(got) > 30


@pytest.mark.parametrize("extra", ["(table 30000 funcref)", "(memory $second 1)"])
def test_unusual_module_shapes_still_run(backend, wasm, extra):
    body = HELLO_IOV + " " + _write(1)
    module = wasm_modules.wat(f"""(module
      (import "{wasm_modules.WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 300)
      {extra}
      (data (i32.const 1024) "hello\\n")
      (func (export "_start") (drop {body})))""")
    result, out, _ = capture(backend, module)
    assert (result.exit_code, out) == (0, b"hello\n")
    assert result.peak_memory == 300 * 65536
