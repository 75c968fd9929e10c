"""What bench/pods.py, density.py and nodes.py share: the kubelet as a measured child process,
/proc readings, percentiles, WAT modules, and the plain API client of the benchmarks.

The kubelet runs as `python bench/common.py PROBE_JSON <minikrust flags>`: minikrust's own main()
with timestamps taken on the way (no change to its behaviour): when its pod handler is given a pod
(the watch event), when a pod's status is handed to the StatusWriter (by phase), and when a request
leaves for the API server (counted by verb and kind; a status patch also stamped by the phase it
carries). They are written to PROBE_JSON at exit.
"""
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.idle import cpu_seconds, node_ready, rss_bytes  # noqa: E402,F401

WASI = "wasi_snapshot_preview1"


def percentiles(values, points=(50, 90, 99)):
    """{p50: ..., p90: ..., p99: ..., max: ...} by nearest rank; None values when there are none."""
    data = sorted(values)
    out = {}
    for p in points:
        out[f"p{p}"] = data[min(len(data) - 1, max(0, -(-len(data) * p // 100) - 1))] if data else None
    out["max"] = data[-1] if data else None
    return out


def fmt_ms(stats):
    return " ".join(f"{k}={v * 1000:.1f}ms" if v is not None else f"{k}=-" for k, v in stats.items())


def proc_status(pid, field):
    """A field of /proc/<pid>/status as an int (kB for memory fields)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class ThreadSampler:
    """Samples a process's thread count every `interval` seconds; `.peak` is the highest seen."""

    def __init__(self, pid, interval=0.01):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/task")))
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def wat_module(body, imports=("fd_write", "poll_oneoff", "proc_exit"), data=b"hello\n"):
    """A WASI command module in WAT: `body` is _start's code; `data` sits at address 1024."""
    import wasmtime
    sigs = {"fd_write": "(param i32 i32 i32 i32) (result i32)", "poll_oneoff": "(param i32 i32 i32 i32) (result i32)",
            "proc_exit": "(param i32)"}
    decls = "\n".join(f'(import "{WASI}" "{n}" (func ${n} {sigs[n]}))' for n in imports)
    text = data.decode().replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return bytes(wasmtime.wat2wasm(f"""(module {decls}
  (memory (export "memory") 1)
  (data (i32.const 1024) "{text}")
  (func (export "_start") {body}))"""))


def write_line(n=6):
    """WAT: write the `n` bytes at 1024 to stdout."""
    return (f"(i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const {n}))"
            "(drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))")


def sleep_ns(ns):
    """WAT: one poll_oneoff on a relative monotonic clock of `ns` nanoseconds."""
    return (f"(i64.store (i32.const 64) (i64.const 0)) (i32.store8 (i32.const 72) (i32.const 0))"
            f"(i32.store (i32.const 80) (i32.const 1)) (i64.store (i32.const 88) (i64.const {ns}))"
            f"(i64.store (i32.const 96) (i64.const 0)) (i32.store16 (i32.const 104) (i32.const 0))"
            f"(drop (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 192)))")


def hello_module():
    return wat_module(write_line(6))


def ticker_module(period_s, line=b"tick\n"):
    """Sleeps `period_s` in poll_oneoff, logs `line`, forever."""
    return wat_module(f"(loop $forever {sleep_ns(int(period_s * 1e9))} {write_line(len(line))} (br $forever))",
                      data=line)


def log_times(root_dir, uid, container="main"):
    """(first, last) wall-clock seconds of a container's CRI log lines, from the host's own stamps."""
    folder = os.path.join(root_dir, "pods", uid, "logs", container)
    stamps = []
    try:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                for line in f:
                    stamps.append(line.split(b" ", 1)[0].decode())
    except OSError:
        return None, None
    if not stamps:
        return None, None
    return _epoch(stamps[0]), _epoch(stamps[-1])


def _epoch(stamp):
    """RFC 3339 with nanoseconds (Z) -> float seconds."""
    import calendar
    base, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


class Kubelet:
    """A kubelet child process (minikrust's main() with the probe), measured through /proc."""

    def __init__(self, flags, work, name="kubelet", profile=None, trace=None):
        self.probe_path = os.path.join(work, f"{name}-probe.json")
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        env = dict(os.environ, **({"BENCH_PROFILE": os.path.abspath(profile)} if profile else {}),
                   **({"BENCH_TRACE": os.path.abspath(trace)} if trace else {}))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.probe_path, *flags],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def cpu(self):
        return cpu_seconds(self.pid)

    def rss_mb(self):
        return rss_bytes(self.pid) / 2**20

    def peak_rss_mb(self):
        return proc_status(self.pid, "VmHWM") / 1024

    def threads(self):
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stop(self, timeout=60):
        """SIGTERM, wait, and the probe's record."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        try:
            with open(self.probe_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"added": {}, "status_queued": {}, "status_sent": {}, "requests": {}}


def request_kind(method, path):
    """A request's verb and kind as the benchmarks count it ("PATCH pods/status", "POST events")."""
    parts = path.split("?")[0].strip("/").split("/")
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2:]
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    kind = rest[0] if rest else "?"
    if len(rest) >= 3:
        kind += "/" + rest[2]
    return f"{method} {kind}"


def _probe_main(probe_path, argv):
    """The kubelet child: minikrust.main(argv) with the two timestamps of the module docstring."""
    import minikrust
    added, status_queued, status_sent, requests_ = {}, {}, {}, collections.Counter()
    pod_added, send = minikrust.PodManager.pod_added, minikrust._Adapter.send
    set_status = minikrust.StatusWriter.set_status

    def probed_set_status(self, pod, status):
        status_queued.setdefault(pod["metadata"]["uid"], {}).setdefault(status.get("phase"), time.time())
        return set_status(self, pod, status)

    def probed_pod_added(self, pod):
        added.setdefault(pod["metadata"].get("uid"), time.time())
        return pod_added(self, pod)

    def probed_send(self, request, **kw):
        path = request.url.split("://", 1)[-1].partition("/")[2].partition("?")[0]
        requests_[request_kind(request.method, "/" + path)] += 1
        if request.method == "PATCH" and path.endswith("/status") and "/pods/" in path:
            body = json.loads(request.body)
            phase = (body.get("status") or {}).get("phase")
            uid = (body.get("metadata") or {}).get("uid") or path
            if phase:
                status_sent.setdefault(uid, {}).setdefault(phase, time.time())
        return send(self, request, **kw)

    minikrust.PodManager.pod_added = probed_pod_added
    minikrust._Adapter.send = probed_send
    minikrust.StatusWriter.set_status = probed_set_status
    profiles = _profile_threads() if os.environ.get("BENCH_PROFILE") else None
    steps = _trace(minikrust) if os.environ.get("BENCH_TRACE") else None
    try:
        return minikrust.main(argv)
    finally:
        if steps is not None:
            with open(os.environ["BENCH_TRACE"], "w") as f:
                json.dump(steps, f)
        if profiles is not None:
            import pstats
            pstats.Stats(*profiles).dump_stats(os.environ["BENCH_PROFILE"])
        with open(probe_path + ".tmp", "w") as f:
            json.dump({"added": added, "status_queued": status_queued, "status_sent": status_sent,
                       "requests": dict(requests_)}, f)
        os.replace(probe_path + ".tmp", probe_path)


# The steps BENCH_TRACE times (owner, attribute): minikrust's names, and the native host's ("_wasihost.").
TRACED = [("PodManager", "pod_added"), ("PodManager", "_admit"), ("", "pod_problem"), ("", "_saved_state"),
          ("ServiceAccountTokens", "prefetch"), ("", "_request_token"), ("PodDriver", "schedule"),
          ("PodWorker", "sync"), ("PodWorker", "_collect_exits"), ("PodWorker", "_termination_message"),
          ("PodWorker", "_prepare"), ("", "prepare_volumes"), ("PodWorker", "_image"), ("PodWorker", "_start"),
          ("", "container_env"), ("", "container_mounts"), ("PodWorker", "_publish"), ("", "compute_pod_status"),
          ("_StateFiles", "save"), ("_wasihost.Host", "load"), ("_wasihost.Module", "start"),
          ("PodManager", "_run_started"), ("PodManager", "_status_changed"), ("StatusWriter", "set_status"),
          ("StatusWriter", "record"), ("StatusWriter", "_send_status"), ("StatusWriter", "_send_event"),
          ("ApiClient", "request")]


def _trace(minikrust):
    """Time each TRACED step, wall and thread CPU: a list of [wall start, wall s, CPU s, thread, step]
    (BENCH_TRACE=<json file>, written at exit)."""
    import functools
    import importlib
    steps = []

    def timed(f, label):
        @functools.wraps(f)
        def step(*args, **kwargs):
            wall, cpu = time.time(), time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                steps.append([wall, time.time() - wall, time.thread_time() - cpu, threading.current_thread().name,
                              label])
        return step
    for owner, name in TRACED:
        module, _, cls = owner.rpartition(".")
        where = importlib.import_module(module) if module else minikrust
        where = getattr(where, cls) if cls else where
        setattr(where, name, timed(getattr(where, name), f"{cls}.{name}" if cls else name))
    return steps


def _profile_threads():
    """cProfile every thread in CPU time (a profiler each, merged at the end): BENCH_PROFILE=<stats file>."""
    import cProfile
    profiles = []

    def start(*_):
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()        # replaces this hook for the rest of the thread
    threading.setprofile(start)
    main = cProfile.Profile(time.thread_time)
    profiles.append(main)
    main.enable()
    return profiles


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1], sys.argv[2:]))
