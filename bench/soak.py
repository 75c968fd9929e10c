"""Fault soak: kubelets (child processes) against the tests' fake API server while it misbehaves.

A driver creates and deletes pods of every kind (run to completion, failing, crashing, long
running, with volumes, with init containers) on one or more nodes; the fake API server drops
watches, answers 500 and 429 (Retry-After), delays answers by seconds, expires watches in a storm
of 410s, restarts losing its watch cache, accepts connections but never answers, and goes away for
an outage; the kubelets are SIGKILLed and restarted on the same root dir, once while the API server
is down. Then a quiet phase of churn measures threads, fds and RSS. At the end the invariants are
checked from the fake's history of every pod write, its request log, the kubelets' logs, root dirs
and /proc, and printed as a table; the last line is

    soak minutes=<n> pods=<n> kills=<n> violations=<n> leaked_threads=<n> leaked_fds=<n> rss_growth_mb=<x>

and the exit code is 1 on any violation.

    python bench/soak.py --minutes 10 [--kubelets 2] [--keep]
"""
import argparse
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fake_apiserver import FakeApiServer  # noqa: E402
from tests.wasm_modules import WasmModules  # noqa: E402

NS = "soak"
TERMINAL = ("Succeeded", "Failed")
RANK = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2}
RSS_FLAT_MB = 10.0          # growth over the quiet phase above this is a violation
SOCKET_SLACK = 2            # more open sockets than this after the quiet phase is a leak

# soak MARKER MODE [ARGS]: appends "run" to MARKER (so every run is counted on the host), then
# exit N | sleep MS | forever (a line a second) | check PATH... (exit 3 unless every PATH is readable),
# and appends "exit N" when it ends by itself (a run a kubelet kill cut short has no such line)
SOAK_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int mark(const char *path, const char *line) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) { perror(path); return 2; }
    int ok = write(fd, line, strlen(line)) == (ssize_t)strlen(line);
    close(fd);
    return ok ? 0 : 2;
}

static int run(int argc, char **argv) {
    const char *mode = argv[2];
    if (!strcmp(mode, "exit")) return atoi(argv[3]);
    if (!strcmp(mode, "sleep")) { usleep(atoi(argv[3]) * 1000); puts("slept"); return 0; }
    if (!strcmp(mode, "forever")) for (int i = 0;; i++) { printf("tick %d\n", i); fflush(stdout); sleep(1); }
    if (!strcmp(mode, "check")) {
        for (int i = 3; i < argc; i++) if (access(argv[i], R_OK)) { perror(argv[i]); return 3; }
        puts("volumes ok");
        return 0;
    }
    return 64;
}

int main(int argc, char **argv) {
    if (argc < 3 || mark(argv[1], "run\n")) return 64;
    int code = run(argc, argv);
    char line[32];
    snprintf(line, sizeof line, "exit %d\n", code);
    mark(argv[1], line);
    return code;
}
"""

# kind -> (restartPolicy, final phases the pod may end in before it is deleted; None: runs until deleted)
KINDS = {
    "done": ("Never", ("Succeeded",)),
    "fail": ("Never", ("Failed",)),
    "sleeper": ("Never", ("Succeeded",)),
    "init": ("Never", ("Succeeded",)),
    "vol": ("OnFailure", ("Succeeded",)),
    "crash": ("Always", None),
    "long": ("Always", None),
}


class SoakApiServer(FakeApiServer):
    """The fake, also keeping every stored pod version (compaction never drops these)."""

    def __init__(self):
        super().__init__()
        self.audit = []             # (time, event type, pod)

    def _store(self, etype, res, ns, name, obj, old=None):
        stored = super()._store(etype, res, ns, name, obj, old)
        if res.name == "pods":
            self.audit.append((time.time(), etype, stored))
        return stored


# --- the kubelets -----------------------------------------------------------------------------

class KubeletProcess:
    """One node: `python minikrust.py --kubeconfig ...` restarted on the same root dir after a kill."""

    def __init__(self, fake, work, node, runs_dir):
        self.node, self.root = node, os.path.join(work, node)
        self.log_path = os.path.join(work, f"{node}.log")
        self.kubeconfig = fake.kubeconfig(os.path.join(work, f"kubeconfig-{node}"), node=node)
        self.runs_dir = runs_dir
        self.proc = None
        self.pids = []

    def start(self):
        cmd = [sys.executable, os.path.join(ROOT, "minikrust.py"), "--kubeconfig", self.kubeconfig,
               "--node-name", self.node, "--root-dir", self.root, "--serve", "false", "--node-ip", "127.0.0.1",
               "--allowed-host-paths", self.runs_dir, "--lease-renew-interval", "2", "--log-level", "info"]
        with open(self.log_path, "a") as log:
            log.write(f"=== soak: start at {time.time():.3f}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pids.append(self.proc.pid)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def fd_kinds(self):
        """What the process's open fds are: socket, pipe, anon_inode:[eventfd], or a file's folder."""
        kinds = collections.Counter()
        for fd in _listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except OSError:
                continue
            kinds[target.split(":[")[0] if ":" in target else os.path.dirname(target)] += 1
        return kinds

    def sample(self):
        """(threads, fds, rss MB) of the running process, or None."""
        pid = self.proc.pid
        try:
            threads = len(os.listdir(f"/proc/{pid}/task"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            return None
        return threads, fds, rss


# --- the driver -------------------------------------------------------------------------------

class Driver:
    """Creates pods of every kind round robin over the nodes and deletes them as a user would."""

    def __init__(self, fake, nodes, image, runs_dir, rng, life):
        self.fake, self.nodes, self.image, self.runs_dir, self.rng = fake, nodes, image, runs_dir, rng
        self.life = life                # seconds a long-running or crashing pod lives before deletion
        self.pods = {}                  # name -> {"kind", "uid", "created", "deleted", "node"}
        self.count = 0
        self.creating = threading.Event()
        self._stop = threading.Event()
        self.errors = []

    def container(self, name, *args):
        return {"name": name, "image": self.image, "args": [f"/runs/{name}", *args],
                "volumeMounts": [{"name": "runs", "mountPath": "/runs"}]}

    def manifest(self, kind, name):
        policy, _ = KINDS[kind]
        c = self.container
        volumes = [{"name": "runs", "hostPath": {"path": os.path.join(self.runs_dir, name), "type": "DirectoryOrCreate"}}]
        inits = []
        if kind == "done":
            main = c("main", "exit", "0")
        elif kind == "fail":
            main = c("main", "exit", "1")
        elif kind == "sleeper":
            main = c("main", "sleep", "4000")
        elif kind == "init":
            inits = [c("init-1", "exit", "0"), c("init-2", "sleep", "300")]
            main = c("main", "exit", "0")
        elif kind == "vol":
            volumes += [{"name": "config", "configMap": {"name": "soak-config"}},
                        {"name": "secret", "secret": {"secretName": "soak-secret"}},
                        {"name": "scratch", "emptyDir": {}},
                        {"name": "info", "downwardAPI": {"items": [{"path": "name",
                                                                   "fieldRef": {"fieldPath": "metadata.name"}}]}}]
            main = c("main", "check", "/config/greeting", "/secret/password", "/info/name")
            main["volumeMounts"] += [{"name": "config", "mountPath": "/config"},
                                     {"name": "secret", "mountPath": "/secret"},
                                     {"name": "scratch", "mountPath": "/scratch"},
                                     {"name": "info", "mountPath": "/info"}]
        elif kind == "crash":
            main = c("main", "exit", "1")
        else:
            main = c("main", "forever")
        spec = {"restartPolicy": policy, "terminationGracePeriodSeconds": 2, "volumes": volumes, "containers": [main]}
        if inits:
            spec["initContainers"] = inits
        return {"metadata": {"name": name, "labels": {"soak": kind}}, "spec": spec}

    def create(self, kind=None):
        kind = kind or self.rng.choice(list(KINDS))
        self.count += 1
        name = f"{kind}-{self.count}"
        node = self.nodes[self.count % len(self.nodes)]
        pod = self.fake.create_pod(self.manifest(kind, name), node_name=node, namespace=NS)
        self.pods[name] = {"kind": kind, "uid": pod["metadata"]["uid"], "created": time.time(), "deleted": None,
                           "node": node}

    def phase(self, name):
        pod = self.fake.get("pods", NS, name)
        return None if pod is None else (pod.get("status") or {}).get("phase")

    def delete(self, name):
        info = self.pods[name]
        if info["deleted"] is None:
            info["deleted"] = time.time()
            try:
                self.fake.delete_pod(NS, name)
            except Exception as exc:        # gone already (finalized by its kubelet): nothing to delete
                self.errors.append(f"delete {name}: {exc}")

    def tick(self):
        """Deletes what a user would delete now: long-running pods after their life, some finished ones."""
        now = time.time()
        for name, info in list(self.pods.items()):
            if info["deleted"] is not None:
                continue
            if KINDS[info["kind"]][1] is None:
                if now - info["created"] > info.setdefault("life", self.rng.uniform(*self.life)):
                    self.delete(name)
            elif self.phase(name) in TERMINAL and self.rng.random() < 0.1:
                self.delete(name)

    def run(self, interval):
        while not self._stop.wait(interval * self.rng.uniform(0.5, 1.5)):
            try:
                if self.creating.is_set():
                    self.create()
                self.tick()
            except Exception as exc:
                self.errors.append(f"driver: {exc!r}")

    def stop(self):
        self._stop.set()

    def finishing_pods(self):
        return [n for n, i in list(self.pods.items()) if KINDS[i["kind"]][1] and i["deleted"] is None
                and self.phase(n) not in TERMINAL]

    def delete_all(self):
        for name in list(self.pods):
            self.delete(name)

    def alive(self):
        return [n for n in list(self.pods) if self.fake.get("pods", NS, n) is not None]


def wait_until(predicate, timeout, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


# --- faults -----------------------------------------------------------------------------------

class Faults:
    """The fault schedule, run on its own thread; each fault is logged with its time."""

    def __init__(self, fake, kubelets, rng, scale):
        self.fake, self.kubelets, self.rng, self.scale = fake, kubelets, rng, scale
        self.kills = 0
        self.log = []
        self._stop = threading.Event()

    def note(self, what):
        self.log.append((time.time(), what))
        print(f"  [{time.strftime('%H:%M:%S')}] {what}", flush=True)

    def kill(self, kubelet, down_for=1.0):
        self.note(f"SIGKILL {kubelet.node} (pid {kubelet.proc.pid})")
        kubelet.kill()
        self.kills += 1
        self._stop.wait(down_for)
        kubelet.start()

    def storm_410(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._stop.is_set():
            self.fake.expire_watches()
            self._stop.wait(0.3)

    def outage(self, seconds):
        """The API server is gone (connections refused); a kubelet is killed and restarted meanwhile."""
        self.fake.stop()
        self._stop.wait(seconds / 3)
        self.kill(self.kubelets[0], down_for=0.5)
        self.note(f"{self.kubelets[0].node} restarted while the API server is down")
        self._stop.wait(seconds * 2 / 3)
        self.fake.start()

    def hang(self, seconds):
        """Connections are accepted, requests are read, nothing is answered until `seconds` pass."""
        self.fake.pause()
        self._stop.wait(seconds)
        self.fake.resume()

    def schedule(self, span):
        s = self.scale
        k = self.kubelets
        return [
            (0.04, "watch streams dropped", lambda: self.fake.drop_watches()),
            (0.10, "10 answers 500", lambda: self.fake.fail_next(10, 500)),
            (0.15, "10 answers 429 with Retry-After: 2", lambda: self.fake.fail_next(10, 429, retry_after=2)),
            (0.20, "kubelet killed", lambda: self.kill(k[0])),
            (0.26, f"20 answers delayed by {3 * s:.0f} s", lambda: self.fake.delay_next(20, seconds=3 * s)),
            (0.33, "storm of 410s", lambda: self.storm_410(10 * s)),
            (0.42, "API server restart losing its watch cache", lambda: self.fake.restart(expire_watches=True)),
            (0.47, f"API server accepts connections but answers nothing for {40 * s:.0f} s", lambda: self.hang(40 * s)),
            (0.58, "kubelet killed", lambda: self.kill(k[-1])),
            (0.63, f"API server outage of {30 * s:.0f} s", lambda: self.outage(30 * s)),
            (0.85, "watch streams ended + 5 status patches answered 500",
             lambda: (self.fake.drop_watches(graceful=True), self.fake.fail_next(5, 500, method="PATCH"))),
            (0.92, "kubelet killed", lambda: self.kill(k[self.rng.randrange(len(k))])),
        ]

    def run(self, span):
        start = time.monotonic()
        for at, what, action in self.schedule(span):
            if self._stop.wait(max(0.0, start + at * span - time.monotonic())):
                return
            self.note(what)
            action()

    def stop(self):
        self._stop.set()


# --- invariants -------------------------------------------------------------------------------

def pod_histories(fake):
    """uid -> [(time, type, pod)] from the fake's record of every pod write."""
    histories = collections.defaultdict(list)
    for t, etype, pod in list(fake.audit):
        histories[pod["metadata"]["uid"]].append((t, etype, pod))
    return histories


def container_statuses(pod):
    status = pod.get("status") or {}
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


def _marker(runs_dir, name, container):
    try:
        with open(os.path.join(runs_dir, name, container)) as f:
            return f.read().split("\n")
    except OSError:
        return []


def check_history(name, info, history, runs_dir, problems):
    """Status never backwards, restartCount never down, terminal phase reached once and as expected."""
    policy, finals = KINDS[info["kind"]]
    phases = [(p.get("status") or {}).get("phase") or "Pending" for _, etype, p in history if etype != "DELETED"]
    for a, b in zip(phases, phases[1:]):
        if RANK[b] < RANK[a] or (a in TERMINAL and a != b):
            problems["status went backwards"].append(f"{name}: {a} -> {b}")
    terminal = sum(1 for i, p in enumerate(phases) if p in TERMINAL and (i == 0 or phases[i - 1] not in TERMINAL))
    if terminal > 1:
        problems["final state reached once"].append(f"{name}: terminal {terminal} times ({phases})")
    if finals is not None:
        final = next((p for p in phases if p in TERMINAL), None)
        lost = [cs["name"] for _, _, p in history[-1:] for cs in container_statuses(p) if
                ((cs.get("state") or {}).get("terminated") or {}).get("reason") == "ContainerStatusUnknown"]
        if final not in finals and not (final == "Failed" and policy == "Never" and lost):
            problems["final state reached once"].append(f"{name}: final phase {final}, expected {'/'.join(finals)}")
        for container in lost:      # lost with a killed kubelet: allowed only if the run did not end by itself
            ended = [line for line in _marker(runs_dir, name, container) if line.startswith("exit")]
            if ended:
                problems["final state reached once"].append(f"{name}/{container}: ended ({ended[0]}) but "
                                                             "reported lost (ContainerStatusUnknown)")
    counts = {}
    for _, etype, pod in history:
        for cs in container_statuses(pod):
            n = cs.get("restartCount", 0)
            if n < counts.get(cs["name"], 0):
                problems["restartCount never decreased"].append(f"{name}/{cs['name']}: {counts[cs['name']]} -> {n}")
            counts[cs["name"]] = max(n, counts.get(cs["name"], 0))
    if policy == "Never" and any(counts.values()):
        problems["Never container ran once"].append(f"{name}: restartCount {counts}")


def check_runs(name, info, runs_dir, problems):
    if KINDS[info["kind"]][0] != "Never":
        return
    for entry in sorted(_listdir(os.path.join(runs_dir, name))):
        runs = _marker(runs_dir, name, entry).count("run")
        if runs > 1:
            problems["Never container ran once"].append(f"{name}/{entry}: ran {runs} times")


def finalized_lines(kubelets):
    """(pod name -> times logged "finalized" within one kubelet process) over all processes."""
    most = collections.Counter()
    for k in kubelets:
        with open(k.log_path, errors="replace") as f:
            text = f.read()
        for part in text.split("=== soak: start"):
            for name, n in collections.Counter(re.findall(rf"pod {NS}/(\S+) finalized", part)).items():
                most[name] = max(most[name], n)
    return most


def check_finalization(driver, histories, fake, kubelets, problems):
    """Each pod deleted once in the API, finalized at most once per kubelet process, one final
    delete, and no status patch or delete of it after it was gone."""
    finalized = finalized_lines(kubelets)
    nodes = {f"system:node:{k.node}" for k in kubelets}
    writes = [r for r in list(fake.requests) if r.user in nodes and r.method in ("POST", "PUT", "PATCH", "DELETE")]
    for name, info in list(driver.pods.items()):
        history = histories.get(info["uid"], [])
        gone = [t for t, etype, _ in history if etype == "DELETED"]
        if len(gone) != 1:
            problems["deleted pod finalized once"].append(f"{name}: deleted {len(gone)} times in the API")
            continue
        if finalized[name] > 1:
            problems["deleted pod finalized once"].append(f"{name}: finalized {finalized[name]} times by one kubelet")
        path = f"/api/v1/namespaces/{NS}/pods/{name}"      # Events may arrive later: they tell the past
        mine = [r for r in writes if r.path in (path, path + "/status")]
        deletes = [r for r in mine if r.method == "DELETE" and r.status == 200]
        if len(deletes) > 1:
            problems["deleted pod finalized once"].append(f"{name}: {len(deletes)} final deletes")
        late = [f"{r.method} {r.path} -> {r.status}" for r in mine if r.time > gone[0]]
        if late:
            problems["no pod writes after finalization"].append(f"{name}: {late[:3]}{' ...' if len(late) > 3 else ''}")


def leftovers(kubelets, shm_seen):
    """Pod folders, temp files and tmpfs volume folders left on disk."""
    found = []
    for k in kubelets:
        pods = os.path.join(k.root, "pods")
        found += [f"pod folder {e}" for e in (os.listdir(pods) if os.path.isdir(pods) else ())]
        for folder, _dirs, files in os.walk(k.root):
            for f in files:
                if f.endswith(".tmp") or f.startswith(".tmp-") or os.path.basename(folder) == "tmp":
                    found.append(f"temp file {os.path.join(folder, f)}")
    found += [f"tmpfs volume {d}" for d in sorted(shm_seen) if os.path.exists(d)]
    return found


def watch_shm(kubelets, shm_seen, stop):
    """Remembers every tmpfs folder a pod volume links to (secrets, tokens), to find leaks at the end."""
    while not stop.wait(1.0):
        for k in kubelets:
            for pod_dir in _listdir(os.path.join(k.root, "pods")):
                volumes = os.path.join(k.root, "pods", pod_dir, "volumes")
                for entry in _listdir(volumes):
                    path = os.path.join(volumes, entry)
                    if os.path.islink(path):
                        shm_seen.add(os.path.realpath(path))


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def settle(kubelet, baseline, timeout):
    """Samples until threads and fds are back to the baseline or the timeout: the last sample."""
    last = kubelet.sample()
    deadline = time.monotonic() + timeout
    while last and (last[0] > baseline[0] or last[1] > baseline[1]) and time.monotonic() < deadline:
        time.sleep(0.5)
        last = kubelet.sample() or last
    return last


# --- the run ----------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kubelets", type=int, default=None, help="nodes (default: 2, 1 for a soak under 3 minutes)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, root dirs)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    span = args.minutes * 60
    scale = min(1.0, args.minutes / 10.0) ** 0.5      # fault lengths: full at 10 minutes, ~1/3 at 1
    work = tempfile.mkdtemp(prefix="minikrust-soak-")
    runs_dir = os.path.join(work, "runs")
    os.makedirs(runs_dir)
    image = "file:" + WasmModules(work).c(SOAK_C, "soak")
    n_kubelets = args.kubelets or (2 if args.minutes >= 3 else 1)
    print(f"soak: {args.minutes:g} min, {n_kubelets} kubelet(s), seed {seed}, work {work}", flush=True)

    fake = SoakApiServer().start()
    fake.create_configmap(NS, "soak-config", {"greeting": "hello"})
    fake.create_secret(NS, "soak-secret", {"password": "s3cret"})
    kubelets = [KubeletProcess(fake, work, f"soak-{i + 1}", runs_dir) for i in range(n_kubelets)]
    for k in kubelets:
        k.start()
    driver = Driver(fake, [k.node for k in kubelets], image, runs_dir, rng, life=(5 * scale + 3, 20 * scale + 4))
    faults = Faults(fake, kubelets, rng, scale)
    stop_watch, shm_seen = threading.Event(), set()
    threads = [threading.Thread(target=watch_shm, args=(kubelets, shm_seen, stop_watch), daemon=True),
               threading.Thread(target=driver.run, args=(1.5 if n_kubelets > 1 else 1.0,), daemon=True)]
    problems = collections.defaultdict(list)
    rss_samples = []
    leaked_threads = leaked_fds = 0
    rss_growth = 0.0
    try:
        if not wait_until(lambda: all(fake.get("nodes", k.node) for k in kubelets), 60):
            raise SystemExit("soak: the kubelets did not register")
        for t in threads:
            t.start()
        driver.creating.set()
        fault_span = 0.6 * span
        fault_thread = threading.Thread(target=faults.run, args=(fault_span,), daemon=True)
        fault_thread.start()
        fault_thread.join()

        # quiet phase: drain, take the baseline, churn without faults, drain, measure again
        # quiet phase: churn without faults, twice (the first brings pools and caches to their working
        # size); threads, fds and RSS after the second must be what they were after the first
        quiet = max(10.0, (span - fault_span) / 2 - 10)
        print(f"  quiet phase: two rounds of {quiet:.0f} s of churn without faults", flush=True)
        drain(driver, kubelets, problems, "after the faults")
        churn(driver, kubelets, quiet, rss_samples)
        baseline = drain(driver, kubelets, problems, "after the first quiet round")
        fds_before = [k.fd_kinds() for k in kubelets]
        churn(driver, kubelets, quiet, rss_samples)
        drain(driver, kubelets, problems, "at the end")
        driver.stop()
        stop_watch.set()
        for k, base, fds in zip(kubelets, baseline, fds_before):
            last = settle(k, base, 15.0) if base else None
            if base and last:
                leaked_threads += max(0, last[0] - base[0])
                more = k.fd_kinds() - fds
                # idle keep-alive connections of the API client's pool come and go: a couple more
                # sockets is the pool, not a leak (a leaked one would add up round after round)
                leaked_fds += sum(n for kind, n in more.items() if kind != "socket") + max(0, more["socket"] - SOCKET_SLACK)
                rss_growth += last[2] - base[2]
                print(f"  {k.node}: threads {base[0]} -> {last[0]}, fds {base[1]} -> {last[1]}"
                      f"{' (+' + ', '.join(f'{n} {kind}' for kind, n in more.items()) + ')' if more else ''}, "
                      f"RSS {base[2]:.1f} -> {last[2]:.1f} MB", flush=True)
        for what in leftovers(kubelets, shm_seen):
            problems["no leaked threads/fds/temp files/volumes"].append(what)
        if leaked_threads or leaked_fds:
            problems["no leaked threads/fds/temp files/volumes"].append(f"threads +{leaked_threads}, fds +{leaked_fds}")
        if rss_growth > RSS_FLAT_MB:
            problems["RSS flat"].append(f"grew {rss_growth:.1f} MB over the quiet phase")
        for k in kubelets:
            if k.proc.poll() is not None:
                problems["kubelets alive"].append(f"{k.node} exited {k.proc.returncode}")
        histories = pod_histories(fake)
        for name, info in list(driver.pods.items()):
            check_history(name, info, histories.get(info["uid"], []), runs_dir, problems)
            check_runs(name, info, runs_dir, problems)
        check_finalization(driver, histories, fake, kubelets, problems)
    finally:
        faults.stop()
        driver.stop()
        stop_watch.set()
        for k in kubelets:
            k.stop()
        fake.stop()
    report(args, driver, faults, problems, leaked_threads, leaked_fds, rss_growth, rss_samples, work)
    violations = sum(len(v) for v in problems.values())
    if not args.keep and not violations:
        shutil.rmtree(work, ignore_errors=True)
    print(f"took {time.monotonic() - began:.0f} s")
    print(f"soak minutes={args.minutes:g} pods={len(driver.pods)} kills={faults.kills} violations={violations} "
          f"leaked_threads={leaked_threads} leaked_fds={leaked_fds} rss_growth_mb={rss_growth:.1f}")
    return 1 if violations else 0


def churn(driver, kubelets, seconds, rss_samples):
    driver.creating.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rss_samples.append(sum(s[2] for s in (k.sample() for k in kubelets) if s))
        time.sleep(2.0)


def drain(driver, kubelets, problems, when):
    """Stop creating, let finishing pods finish, delete every pod, wait until all are finalized;
    returns each kubelet's (threads, fds, rss) once idle."""
    driver.creating.clear()
    if not wait_until(lambda: not driver.finishing_pods(), 60):
        problems["final state reached once"] += [f"{n}: never finished ({when})" for n in driver.finishing_pods()]
    driver.delete_all()
    if not wait_until(lambda: not driver.alive(), 90):
        problems["deleted pod finalized once"] += [f"{n}: not finalized ({when})" for n in driver.alive()]
    time.sleep(3.0)         # the last status and event writes, threads ending
    return [k.sample() for k in kubelets]


ROWS = ["final state reached once", "Never container ran once", "status went backwards",
        "restartCount never decreased", "deleted pod finalized once", "no pod writes after finalization",
        "no leaked threads/fds/temp files/volumes", "RSS flat", "kubelets alive"]


def report(args, driver, faults, problems, leaked_threads, leaked_fds, rss_growth, rss_samples, work):
    kinds = collections.Counter(i["kind"] for i in list(driver.pods.values()))
    print(f"\npods: {len(driver.pods)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
          f"faults: {len(faults.log)}; kubelet kills: {faults.kills}")
    if rss_samples:
        print(f"RSS of the kubelets in the quiet phase: first {rss_samples[0]:.1f} MB, "
              f"max {max(rss_samples):.1f} MB, last {rss_samples[-1]:.1f} MB")
    print(f"\n{'invariant':<42} {'violations':>10}  first examples")
    for row in ROWS + sorted(set(problems) - set(ROWS)):
        found = problems.get(row, [])
        print(f"{row:<42} {len(found):>10}  {'; '.join(found[:3])}")
    if driver.errors:
        print(f"driver notes: {driver.errors[:5]}")
    if any(problems.values()):
        with open(os.path.join(work, "violations.txt"), "w") as f:
            for row, found in sorted(problems.items()):
                f.writelines(f"{row}: {line}\n" for line in found)
        print(f"work folder kept for inspection: {work} (every violation in violations.txt)")


if __name__ == "__main__":
    sys.exit(main())
