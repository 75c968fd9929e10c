"""The hot path, measured: per instantiate-and-run cost of the native host against the alternatives.

    python bench/hotpath.py           # the full run (>= 2,000 runs per contender and module)
    python bench/hotpath.py --quick   # a short run, to check that it works
    python bench/hotpath.py --components   # the component rows only

Contenders, interleaved in batches so machine noise hits them alike, stdout to a CRI log file:
  (a) the native host (`_wasihost`) through its Python face, as the kubelet calls it: start() + wait()
  (b) the wasmtime Python package doing the same work as well as it can (engine, linker and
      InstancePre reused; per run a store, a WASI config and stdout to a log): CRI through a
      custom output, and raw stdout_file; the faster of the two is (b)
  (c) bench/floor.c: a C program driving the native host's own C functions in a loop
Components (WASI 0.2, made from the same hello modules with jco): (a) the native host against
(b) wasmtime-py's component API (linker reused; per run a store, WASI, instantiate, call
wasi:cli/run), and against (a) on the same program as a p1 module, each beside its C floor (what
start()+wait() adds over it is the Python face and the hand-off to a run thread); and a 10,000-line
log through a component against the module's log path.
Also: compile vs cache-load of a >= 1 MB module, a 10,000-line log through (a) and (b), the
kubelet's way of running that module (start() + wait(), the container log path and rotation
limits given to the host) on the native host against minikrust's wasmtime-py fallback host, and
RSS after 10,000 runs. The last line is machine-readable.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import wasmtime  # noqa: E402

from tests import wasm_modules  # noqa: E402


def rfc3339nano(ns):
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


class CriFile:
    """A minimal CRI writer for (b): whole lines become F records, the rest is kept for later."""

    def __init__(self, fd, stream):
        self.fd, self.stream, self.buf = fd, stream.encode(), b""

    def write(self, data):
        self.buf += data
        if b"\n" in self.buf:
            *lines, self.buf = self.buf.split(b"\n")
            out = []
            for line in lines:
                out.append(b"%s %s F %s\n" % (rfc3339nano(time.time_ns()).encode(), self.stream, line))
            os.write(self.fd, b"".join(out))
        return len(data)

    def close(self):
        if self.buf:
            os.write(self.fd, b"%s %s P %s\n" % (rfc3339nano(time.time_ns()).encode(), self.stream, self.buf))


class WasmtimePy:
    """(b): the wasmtime package with everything reusable reused."""

    def __init__(self, wasm):
        self.engine = wasmtime.Engine()
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.pre = linker.instantiate_pre(wasmtime.Module(self.engine, wasm))

    def _run(self, wasi):
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        instance = self.pre.instantiate(store)
        try:
            instance.exports(store)["_start"](store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise
        store.close()

    def run_cri(self, argv, log_path):
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        out, err = CriFile(fd, "stdout"), CriFile(fd, "stderr")
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.stdout_custom = out.write
        wasi.stderr_custom = err.write
        try:
            self._run(wasi)
        finally:
            out.close()
            err.close()
            os.close(fd)

    def run_file(self, argv, log_path):
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.stdout_file = log_path
        wasi.stderr_file = log_path
        self._run(wasi)


class WasmtimePyComponent(WasmtimePy):
    """(b) for a component: the wasmtime package's component API, linker and component reused."""

    def __init__(self, wasm):
        import wasmtime.component as wc
        self.engine = wasmtime.Engine()
        self.component = wc.Component(self.engine, wasm)
        self.linker = wc.Linker(self.engine)
        self.linker.add_wasip2()
        self.run_index = self.component.get_export_index(
            "run", self.component.get_export_index("wasi:cli/run@0.2.0"))

    def _run(self, wasi):
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        instance = self.linker.instantiate(store, self.component)
        assert instance.get_func(store, self.run_index)(store).tag == "ok"
        store.close()

    def phases(self, log_path, n):
        """run_cri's steps (its faster mode) timed one by one: medians of n runs, us (means are mostly
        its garbage collector and this VM's noise)."""
        now, steps = time.perf_counter_ns, []
        for _ in range(n):
            t0 = now()
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            out, err = CriFile(fd, "stdout"), CriFile(fd, "stderr")
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["hello"]
            wasi.stdout_custom, wasi.stderr_custom = out.write, err.write
            t1 = now()
            store = wasmtime.Store(self.engine)
            store.set_wasi(wasi)
            t2 = now()
            instance = self.linker.instantiate(store, self.component)
            t3 = now()
            assert instance.get_func(store, self.run_index)(store).tag == "ok"
            t4 = now()
            store.close()
            out.close()
            err.close()
            os.close(fd)
            steps.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, now() - t4))
        os.truncate(log_path, 0)
        names = ("log open + WASI config with output callbacks", "store + WASI context", "instantiate",
                 "the call (its output through the callbacks)", "store freed + log closed")
        return f"wasmtime-py by phase (CRI, medians of {n} runs, us): " + ", ".join(
            f"{name} {statistics.median(s[i] for s in steps) / 1000:.1f}" for i, name in enumerate(names))


def component_rows(host, mods, tmp, runs, batches, log, floor):
    """The component rows; {name: (speedup vs wasmtime-py, native component / native module)}."""
    import _wasihost
    try:
        jco = wasm_modules.jco_binary()
    except BaseException as exc:  # pytest's skip outside pytest
        print(f"components: skipped ({exc})", file=sys.stderr)
        return {}
    del jco
    programs = {"WAT hello": os.path.join(tmp, "hello-wat.wasm")}
    if mods.clang:
        programs["C hello"] = mods.c(wasm_modules.HELLO_C, "hello")
        programs["C tool"] = mods.tool
    per_batch, ratios = runs // batches, {}
    for name, module_path in programs.items():
        component_path = wasm_modules.to_component(module_path, os.path.join(tmp, name.replace(" ", "-") + ".p2.wasm"))
        with open(component_path, "rb") as f:
            wasm = f.read()
        component, module = host.load(wasm), host.load(module_path)
        if name == "C tool":  # the log path: 10,000 lines from the component and from the module
            tc, tm = [], []
            for _ in range(5):
                tc += timed(lambda: component.start(["tool", "lines", "10000"], stdout=log, stderr=log).wait(), 1)
                os.truncate(log, 0)
                tm += timed(lambda: module.start(["tool", "lines", "10000"], stdout=log, stderr=log).wait(), 1)
                os.truncate(log, 0)
            lc, lm = statistics.median(tc) / 1e6, statistics.median(tm) / 1e6
            print(f"component 10,000-line log, native: component {lc:.2f} ms, module {lm:.2f} ms ({lc / lm:.2f}x)")
            continue
        py = WasmtimePyComponent(wasm)
        bare = _wasihost.Run(component, ["hello"], (), (), log, log, "cri", None, None, None)  # C alone: its config
        res, exec_alone = _wasihost.ffi.new("wh_result *"), _wasihost.lib.wh_run_exec
        contenders = {
            "(a) native host, component": lambda: component.start(["hello"], stdout=log, stderr=log).wait(),
            "(a) native, component, run() inline": lambda: component.run(["hello"], stdout=log, stderr=log),
            "(a) its C call alone (wh_run_exec)": lambda: exec_alone(component._ptr, bare._config, bare._ptr, res),
            "(b) wasmtime-py component, CRI": lambda: py.run_cri(["hello"], log),
            "(b) wasmtime-py component, file": lambda: py.run_file(["hello"], log),
            "(m) native host, same p1 module": lambda: module.start(["hello"], stdout=log, stderr=log).wait(),
        }
        for fn in contenders.values():
            fn()
        times = {k: [] for k in contenders}
        floors = {"(c) C floor, component": (component_path, component), "(c) C floor, same p1 module": (module_path, module)}
        for _ in range(batches):
            for label, fn in contenders.items():
                times[label] += timed(fn, per_batch)
                os.truncate(log, 0)
            for label, (path, loaded) in floors.items():
                times.setdefault(label, []).extend(floor_times(floor, path, host.cache_path(loaded.digest), log, per_batch))
                os.truncate(log, 0)
        med = {}
        for label, ns in times.items():
            med[label], p99 = summary(ns)
            print(f"{name + ' p2':<12} {label:<34} {med[label]:>10.1f} {p99:>10.1f}")
        a, m = med["(a) native host, component"], med["(m) native host, same p1 module"]
        inline = med["(a) native, component, run() inline"]
        b = min(med["(b) wasmtime-py component, CRI"], med["(b) wasmtime-py component, file"])
        ratios[name] = (b / a, a / m)
        print(f"{name + ' p2':<12} speedup (a) vs best (b): {b / a:.1f}x (run() inline: {b / inline:.1f}x, C floor: "
              f"{b / med['(c) C floor, component']:.1f}x)   component/module (a)/(m): {a / m:.2f}")
        print(f"{name + ' p2':<12} start()+wait() over its C floor (the Python face and the run thread's hand-off): "
              f"component {a - med['(c) C floor, component']:.1f} us, module {m - med['(c) C floor, same p1 module']:.1f} us"
              f"; of it the Python face of run() {inline - med['(a) its C call alone (wh_run_exec)']:.1f} us, "
              f"start()+wait() over run() {a - inline:.1f} us (the hand-off's two thread wake-ups, less the store "
              f"freed after the end's signal)")
        print(f"{name + ' p2':<12} " + floor_phases(tmp, component_path, host.cache_path(component.digest), log, runs))
        print(f"{name + ' p2':<12} " + py.phases(log, runs))
        print(f"{name + ' p2':<12} " + handoff(component, log, runs))
    return ratios


def handoff(loaded, log, n):
    """start()+wait() step by step (medians of n runs, us), from the CLOCK_MONOTONIC stamps C leaves in
    the result (wh_result.handoff) and Python's own."""
    now, steps = time.monotonic_ns, []
    for _ in range(n):
        t0 = now()
        run = loaded.start(["hello"], stdout=log, stderr=log)
        run.wait()
        t1 = now()
        handed, took, signalled = run._res.handoff
        del run
        steps.append((handed - t0, took - handed, signalled - took, t1 - signalled, now() - t1))
    os.truncate(log, 0)
    names = ("start() until the run is handed over", "a run thread takes it (wake-up)", "the run",
             "wait() back after the end's signal (wake-up, result)", "the Run freed")
    return "start()+wait() step by step (medians, us): " + ", ".join(
        f"{name} {statistics.median(s[i] for s in steps) / 1000:.1f}" for i, name in enumerate(names))


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t)
    return out


PHASES = ("WASI config + output pipes", "store + WASI context", "instantiate", "the call", "output drained",
          "store freed (put off past the end's signal under start())")


def build_floor(tmp, phases=False):
    """Compile bench/floor.c with the native host's C source against the wheel's libwasmtime (with
    `phases`, timing a component run's phases: wasihost.c's WH_PHASES)."""
    libdir = os.path.dirname(str(wasmtime._ffi.filename))
    exe = os.path.join(tmp, "floor-phases" if phases else "floor")
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"
    cmd = [cc, "-O2", "-std=c11", *([f"-DWH_PHASES={len(PHASES)}"] if phases else []), "-I",
           os.path.join(ROOT, "_wasihost"), os.path.join(ROOT, "bench", "floor.c"),
           os.path.join(ROOT, "_wasihost", "wasihost.c"), "-L", libdir, f"-l:{os.path.basename(str(wasmtime._ffi.filename))}",
           f"-Wl,-rpath,{libdir}", "-lpthread", "-lz", "-o", exe]
    subprocess.run(cmd, check=True)
    return exe


def floor_times(exe, wasm_path, cache_path, log_path, n, phases=None):
    """The floor's per-run ns; with a list `phases`, the phase means (ns) of a WH_PHASES floor go in it."""
    proc = subprocess.run([exe, wasm_path, cache_path, log_path, str(n)], capture_output=True, text=True, check=True)
    if phases is not None:
        phases[:] = [int(x) for x in proc.stderr.split()]
    return [int(x) for x in proc.stdout.split()]


def floor_phases(tmp, component_path, cache_path, log, n):
    """Where the C floor of a component run goes, by phase (means over n runs)."""
    phases = []
    total = statistics.mean(floor_times(build_floor(tmp, phases=True), component_path, cache_path, log, n, phases))
    os.truncate(log, 0)
    parts = [f"{name} {ns / 1000:.1f}" for name, ns in zip(PHASES, phases)]
    return (f"C floor by phase (means of {n} runs, us): " + ", ".join(parts) +
            f", the rest (log open/close, CRI streams, CPU clocks) {(total - sum(phases)) / 1000:.1f}; total {total / 1000:.1f}")


def summary(ns):
    ns = sorted(ns)
    return statistics.median(ns) / 1000, ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1000


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (200 runs per contender)")
    parser.add_argument("--components", action="store_true", help="only the component rows")
    parser.add_argument("--profile", action="store_true",
                        help="only profile (a) on the WAT hello: where the time over the C floor goes")
    args = parser.parse_args(argv)
    if args.profile:
        return profile()
    runs = 200 if args.quick else 2000
    batches = 4 if args.quick else 10
    rss_runs = 1000 if args.quick else 10000
    log_runs = 3 if args.quick else 15

    import _wasihost
    tmp = tempfile.mkdtemp(prefix="hotpath-")
    try:
        if args.components:
            mods = wasm_modules.WasmModules(os.path.join(tmp, "modules"))
            os.makedirs(mods.cache_dir)
            with open(os.path.join(tmp, "hello-wat.wasm"), "wb") as f:
                f.write(mods.hello)
            host = _wasihost.Host(os.path.join(tmp, "cache"))
            component_rows(host, mods, tmp, runs, batches, os.path.join(tmp, "bench.log"), build_floor(tmp))
            return 0
        return _bench(_wasihost, tmp, runs, batches, rss_runs, log_runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile(runs=5000):
    """cProfile of (a) on the WAT hello: the Python face's share is what (a) costs over (c)."""
    import cProfile
    import pstats
    import _wasihost
    tmp = tempfile.mkdtemp(prefix="hotpath-")
    try:
        module = _wasihost.Host(os.path.join(tmp, "cache")).load(wasm_modules._write_module(wasm_modules.HELLO_BODY))
        log = os.path.join(tmp, "bench.log")
        for _ in range(200):
            module.start(["hello"], stdout=log, stderr=log).wait()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(runs):
            module.start(["hello"], stdout=log, stderr=log).wait()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def kubelet_log_path(native, tool_wasm, tmp, n):
    """The 10,000-line module as the pod worker runs it (start() + wait(), the log path and rotation
    limits given to the host), native vs minikrust's fallback host, interleaved. Native's speedup at 64 KiB."""
    import minikrust
    hosts = {"native": native, "wasmtime-py": minikrust.FallbackHost(os.path.join(tmp, "cache-py"))}
    modules = {name: host.load(tool_wasm) for name, host in hosts.items()}
    times = {}
    for size in (10 * 1024 * 1024, 64 * 1024):
        for _ in range(n):
            for name, module in modules.items():
                path = os.path.join(tmp, "logs", name, f"{size}", "0.log")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                times.setdefault((size, name), []).extend(timed(lambda: module.start(
                    ["tool", "lines", "10000"], stdout=path, stderr=path, log_max_size=size, log_max_files=5).wait(), 1))
                shutil.rmtree(os.path.dirname(path))
    for (size, name), ns in times.items():
        print(f"kubelet path, 10,000 lines, max size {size // 1024} KiB: {name} {statistics.median(ns) / 1e6:.2f} ms")
    return statistics.median(times[(64 * 1024, "wasmtime-py")]) / statistics.median(times[(64 * 1024, "native")])


def _bench(_wasihost, tmp, runs, batches, rss_runs, log_runs):
    mods = wasm_modules.WasmModules(os.path.join(tmp, "modules"))
    os.makedirs(mods.cache_dir)
    with open(os.path.join(tmp, "hello-wat.wasm"), "wb") as f:
        f.write(mods.hello)
    modules = {"WAT hello": f.name}
    if mods.clang:
        modules["C hello"] = mods.c(wasm_modules.HELLO_C, "hello")
    else:
        print("clang missing: skipping the C hello", file=sys.stderr)
    host = _wasihost.Host(os.path.join(tmp, "cache"))
    floor = build_floor(tmp)
    per_batch = runs // batches
    results, ratios = {}, {}
    log = os.path.join(tmp, "bench.log")

    print(f"hot path: per instantiate-and-run, stdout+stderr to a CRI log file, {runs} runs each, "
          f"interleaved in {batches} batches (wasmtime {host.wasmtime_version})")
    print(f"{'module':<10} {'contender':<36} {'median us':>10} {'p99 us':>10}")
    for name, path in modules.items():
        with open(path, "rb") as f:
            wasm = f.read()
        module = host.load(wasm)
        py = WasmtimePy(wasm)
        contenders = {
            "(a) native host, Python face": lambda: module.start(["hello"], stdout=log, stderr=log).wait(),
            "(b) wasmtime-py, CRI custom output": lambda: py.run_cri(["hello"], log),
            "(b) wasmtime-py, raw stdout_file": lambda: py.run_file(["hello"], log),
        }
        times = {k: [] for k in contenders}
        times["(c) C floor (bench/floor.c)"] = []
        for fn in contenders.values():  # warm up
            fn()
        for _ in range(batches):
            for label, fn in contenders.items():
                times[label] += timed(fn, per_batch)
                os.truncate(log, 0)
            times["(c) C floor (bench/floor.c)"] += floor_times(floor, path, host.cache_path(module.digest), log, per_batch)
            os.truncate(log, 0)
        for label, ns in times.items():
            med, p99 = summary(ns)
            results[(name, label)] = med
            print(f"{name:<10} {label:<36} {med:>10.1f} {p99:>10.1f}")
        a = results[(name, "(a) native host, Python face")]
        b = min(results[(name, "(b) wasmtime-py, CRI custom output")], results[(name, "(b) wasmtime-py, raw stdout_file")])
        c = results[(name, "(c) C floor (bench/floor.c)")]
        ratios[name] = (b / a, a / c)
        print(f"{name:<10} speedup (a) vs best (b): {b / a:.1f}x   (a)/(c): {a / c:.2f}")

    # compile vs cache load of a >= 1 MB module, fresh Host objects (their in-memory maps are empty)
    big = mods.big
    compile_ns, load_ns = [], []
    for i in range(3 if runs < 2000 else 5):
        cache = os.path.join(tmp, f"big-cache-{i}")
        t = time.perf_counter_ns()
        _wasihost.Host(cache).load(big)
        compile_ns.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        m = _wasihost.Host(cache).load(big)
        load_ns.append(time.perf_counter_ns() - t)
        assert m.from_cache
    compile_ms, load_ms = statistics.median(compile_ns) / 1e6, statistics.median(load_ns) / 1e6
    print(f"module of {len(big) / 1e6:.2f} MB: compile {compile_ms:.1f} ms, cache load {load_ms:.2f} ms "
          f"({compile_ms / load_ms:.0f}x)")

    # a log-heavy module: 10,000 lines to a CRI log
    log_speedup = kubelet_speedup = float("nan")
    if mods.clang:
        tool = mods.tool
        with open(tool, "rb") as f:
            tool_wasm = f.read()
        tool_module = host.load(tool_wasm)
        tool_py = WasmtimePy(tool_wasm)
        ta, tb = [], []
        for _ in range(log_runs):
            ta += timed(lambda: tool_module.start(["tool", "lines", "10000"], stdout=log, stderr=log).wait(), 1)
            os.truncate(log, 0)
            tb += timed(lambda: tool_py.run_cri(["tool", "lines", "10000"], log), 1)
            os.truncate(log, 0)
        la, lb = statistics.median(ta) / 1e6, statistics.median(tb) / 1e6
        log_speedup = lb / la
        print(f"10,000-line log: (a) {la:.2f} ms, (b) {lb:.2f} ms ({log_speedup:.1f}x)")
        kubelet_speedup = kubelet_log_path(host, tool_wasm, tmp, log_runs)

    # memory: RSS after many runs (ok and trapping)
    hello = host.load(mods.hello)
    trap = host.load(mods.trap)
    before = rss_kb()
    for _ in range(rss_runs):
        hello.start(["hello"], stdout=log).wait()
    os.truncate(log, 0)
    after_ok = rss_kb()
    for _ in range(rss_runs):
        trap.start(["trap"], stdout=log).wait()
    os.truncate(log, 0)
    after_trap = rss_kb()
    print(f"RSS: {before / 1024:.1f} MB before, {after_ok / 1024:.1f} MB after {rss_runs} runs, "
          f"{after_trap / 1024:.1f} MB after {rss_runs} more trapping runs")

    component = component_rows(host, mods, tmp, runs, batches, log, floor)
    top_overhead = top_rows(host, mods, log, runs, batches)

    wat_speedup, wat_floor = ratios["WAT hello"]
    c_speedup = ratios.get("C hello", (float("nan"),))[0]
    print(f"hotpath speedup_vs_wasmtime_py={wat_speedup:.2f} speedup_c_hello={c_speedup:.2f} "
          f"ratio_to_c_floor={wat_floor:.2f} cache_load_speedup={compile_ms / load_ms:.1f} log_speedup={log_speedup:.2f} "
          f"kubelet_log_speedup={kubelet_speedup:.2f} "
          f"component_speedup_c_hello={component.get('C hello', (float('nan'),))[0]:.2f} "
          f"component_over_module_c_hello={component.get('C hello', (0, float('nan')))[1]:.2f} "
          f"top_read_overhead={top_overhead:.2f}")
    return 0


def top_rows(host, mods, log, runs, batches):
    """`kubectl top` reads live usage (Run.usage(): the run thread's CPU clock, mincore of the
    linear memory) from another thread: the hot path (hello's start+wait) with a reader calling
    usage() 1,000 times a second on a running module, against no reader, interleaved; the ratio."""
    hello = host.load(mods.hello)
    busy = host.load(mods.hold(16)).start(["hold"])  # 16 MiB touched: what a read walks
    reading, stop = threading.Event(), threading.Event()

    def reader():
        while not stop.is_set():
            if reading.wait(0.1):
                busy.usage()
                time.sleep(0.001)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    times = {False: [], True: []}
    per_batch = max(1, runs // batches)
    for _ in range(batches):
        for on in (False, True):
            reading.set() if on else reading.clear()
            times[on] += timed(lambda: hello.start(["hello"], stdout=log, stderr=log).wait(), per_batch)
            os.truncate(log, 0)
    reading.clear()
    call = statistics.median(timed(busy.usage, 2000)) / 1e3
    stop.set()
    thread.join()
    busy.kill()
    busy.wait(5)
    off, on = summary(times[False])[0], summary(times[True])[0]
    print(f"kubectl top reads: hello start+wait median {off:.1f} us without a reader, {on:.1f} us with usage() "
          f"read 1,000/s ({on / off:.2f}x); one usage() of a run holding 16 MiB: {call:.1f} us")
    return on / off


if __name__ == "__main__":
    sys.exit(main())
