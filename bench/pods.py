"""N pods created at once, as a user would, watched as a client does: how fast they run and finish.

Against the tests' fake API server started in this process (default), or a real cluster:
`--kubeconfig USER.kubeconfig --node-kubeconfig NODE.kubeconfig --node-name NAME` (the node's
identity for the kubelet this script starts; pods are bound to it by nodeName, with the wasm
tolerations). The kubelet is a child process (bench/common.py: minikrust's main() plus two
timestamps), so its CPU, peak RSS and threads are its own.

    python bench/pods.py --pods 100          # and --pods 1000

Reported: creation -> Running and creation -> Succeeded as the watching client sees them (p50,
p90, p99, max); the kubelet's share: watch event -> module running (the module's first log line,
stamped by the host) and module exit (its last log line) -> the Succeeded status patch leaving;
API requests per pod by verb; the kubelet's CPU seconds, peak RSS and peak thread count. Then the
API floor: the same writes (2 status patches and 3 Events per pod) sent by a plain client over 8
parallel connections to the same server, on pods bound to the same (now stopped) node. Last line:

    pods n=<n> kubelet_p50_ms=<x> kubelet_p99_ms=<x> client_p99_ms=<x> writes_per_pod=<x>
         all_done_s=<x> floor_s=<x> vs_floor=<x> peak_threads=<n>

kubelet_* is the kubelet's share (event -> running plus exit -> status sent) per pod, client_p99
is creation -> Succeeded, vs_floor = (last Succeeded - last create) / floor_s.

Then `--alone` pods one at a time, each created once the last is Succeeded and its Events out: hello
pods (their exit lands while the kubelet still sends their Running status and Events), then
"napper" pods that log, sleep 150 ms and log again, so their exit lands on an idle kubelet (writers
idle: the condition of issue 10's exit -> status target).
"""
import argparse
import collections
import concurrent.futures
import json
import os
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import (Kubelet, ThreadSampler, fmt_ms, hello_module, log_times, percentiles,  # noqa: E402
                          request_kind, sleep_ns, wat_module, write_line)
import minikrust  # noqa: E402

NS = "bench"
NAP = 0.15      # seconds the napper pods of the one-at-a-time pass sleep between their two log lines
WRITES = ("PATCH pods/status", "POST events", "PATCH events", "DELETE pods", "POST pods")
TOLERATIONS = [{"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wasi", "effect": e}
               for e in ("NoExecute", "NoSchedule")]


class Api:
    """A plain client of one identity: a requests session (one keep-alive connection) per thread."""

    def __init__(self, kubeconfig):
        self._client = minikrust.ApiClient(minikrust.load_kubeconfig(kubeconfig))
        self._local = threading.local()

    def session(self):
        if not hasattr(self._local, "s"):
            self._local.s = self._client._new_session()
            token = self._client.credential()
            if token:
                self._local.s.headers["Authorization"] = f"Bearer {token}"
        return self._local.s

    def connect(self, pool, n=8):
        """Open this client's connection in each of the `n` threads of `pool` (before timing)."""
        barrier = threading.Barrier(n)
        list(pool.map(lambda _: (self.call("GET", "/version"), barrier.wait()), range(n)))

    def call(self, method, path, body=None, ctype="application/json", **kw):
        r = self.session().request(method, self._client.server + path, data=None if body is None else json.dumps(body),
                                   headers={"Content-Type": ctype, "Accept": "application/json"}, timeout=60, **kw)
        if r.status_code >= 400 and not kw.get("stream"):
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r


def pod_manifest(name, node, image):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "restartPolicy": "Never", "tolerations": TOLERATIONS,
                     "terminationGracePeriodSeconds": 1, "containers": [{"name": "main", "image": image}]}}


class Watcher:
    """Watches the namespace's pods from `rv`; the first time each pod is seen in each phase
    (and "Deleted")."""

    def __init__(self, api, rv):
        self.seen = {}      # name -> {phase: time}
        self._response = api.call("GET", f"/api/v1/namespaces/{NS}/pods",
                                  params={"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true"},
                                  stream=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for line in self._response.iter_lines(chunk_size=None):
                if not line:
                    continue
                now = time.monotonic()
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    phase = "Deleted" if event["type"] == "DELETED" else (obj.get("status") or {}).get("phase")
                    self.seen.setdefault(obj["metadata"]["name"], {}).setdefault(phase, now)
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            pass

    def count(self, phase):
        return sum(1 for p in list(self.seen.values()) if phase in p)

    def close(self):
        minikrust._shutdown_response(self._response)


def status_body(uid, phase, started):
    """A status patch like a kubelet's (the floor's writes)."""
    running = phase == "Running"
    cond = [{"type": t, "status": "True" if running or t in ("PodScheduled", "Initialized") else "False",
             "lastProbeTime": None, "lastTransitionTime": started}
            for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled")]
    state = {"running": {"startedAt": started}} if running else {"terminated": {
        "exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": started,
        "containerID": "wasm://floor"}}
    return {"metadata": {"uid": uid}, "status": {
        "phase": phase, "conditions": cond, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "startTime": started, "qosClass": "BestEffort",
        "containerStatuses": [{"name": "main", "state": state, "lastState": {}, "ready": running,
                               "restartCount": 0, "image": "file:hello.wasm", "imageID": "file:hello.wasm",
                               "started": running, "containerID": "wasm://floor"}]}}


def event_body(pod, uid, reason, node, now):
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{pod}.{uuid.uuid4().hex[:16]}", "namespace": NS},
            "involvedObject": {"kind": "Pod", "namespace": NS, "name": pod, "uid": uid, "apiVersion": "v1",
                               "fieldPath": "spec.containers{main}"},
            "reason": reason, "message": f"{reason} container main", "type": "Normal",
            "source": {"component": "kubelet", "host": node}, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1, "reportingComponent": "kubelet", "reportingInstance": node}


def floor(user, node_api, node, n, image):
    """Seconds a plain client needs for 2 status patches + 3 Events per pod over 8 connections."""
    pods = [user.call("POST", f"/api/v1/namespaces/{NS}/pods", pod_manifest(f"floor-{i}", node, image)).json()
            for i in range(n)]
    now = minikrust._k8s_time()

    def writes(pod):
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        path = f"/api/v1/namespaces/{NS}/pods/{name}/status"
        node_api.call("PATCH", path, status_body(uid, "Running", now), "application/merge-patch+json")
        for reason in ("Pulled", "Created", "Started"):
            node_api.call("POST", f"/api/v1/namespaces/{NS}/events", event_body(name, uid, reason, node, now))
        node_api.call("PATCH", path, status_body(uid, "Succeeded", now), "application/merge-patch+json")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        node_api.connect(pool)
        began = time.monotonic()
        list(pool.map(writes, pods))
        return time.monotonic() - began


def setup(args, work, modules):
    """(user kubeconfig, node kubeconfig, node name, fake or None, {name: file: image}) for the
    fake API server started here, or the real cluster of --kubeconfig."""
    images = {}
    for name, data in modules.items():
        with open(os.path.join(work, f"{name}.wasm"), "wb") as f:
            f.write(data)
        images[name] = f"file:{os.path.join(work, name)}.wasm"
    if args.kubeconfig:
        return args.kubeconfig, args.node_kubeconfig, args.node_name, None, images
    from tests.fake_apiserver import FakeApiServer
    fake = FakeApiServer().start()
    node = args.node_name or "bench"
    return (fake.kubeconfig(os.path.join(work, "admin.kubeconfig"), admin=True),
            fake.kubeconfig(os.path.join(work, "node.kubeconfig"), node=node), node, fake, images)


def start_kubelet(node_cfg, node, user, work, max_pods, profile=None, trace=None):
    """The kubelet child for `node`, once its Node is Ready (and the bench namespace exists)."""
    kubelet = Kubelet(["--kubeconfig", node_cfg, "--node-name", node, "--root-dir", os.path.join(work, "root"),
                       "--serve", "false", "--max-pods", str(max_pods), "--log-level", "warning"], work,
                      profile=profile, trace=trace)
    with_ns(user)
    if not wait(lambda: node_is_ready(user, node), 30, 0.1):
        kubelet.stop()
        raise SystemExit("the kubelet's node did not become Ready")
    time.sleep(1.0)         # its start-up settles
    return kubelet


def add_arguments(parser):
    parser.add_argument("--kubeconfig", help="a user's kubeconfig of a real cluster (default: the fake API server)")
    parser.add_argument("--node-kubeconfig", help="with --kubeconfig: the node identity the kubelet runs as")
    parser.add_argument("--node-name", help="the node's name (default with the fake: bench)")


def wait(predicate, timeout, step=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def run(args, work):
    napper = wat_module(write_line(6) + sleep_ns(int(NAP * 1e9)) + write_line(6))     # logs, naps, logs, exits
    user_cfg, node_cfg, node, fake, images = setup(args, work, {"hello": hello_module(), "napper": napper})
    image = images["hello"]
    user, node_api = Api(user_cfg), Api(node_cfg)
    root = os.path.join(work, "root")
    trace = os.path.join(work, "trace.json") if args.trace else None
    kubelet = start_kubelet(node_cfg, node, user, work, args.pods + 10, args.profile, trace)
    sampler = ThreadSampler(kubelet.pid)
    try:
        rv = user.call("GET", f"/api/v1/namespaces/{NS}/pods").json()["metadata"]["resourceVersion"]
        watcher = Watcher(user, rv)
        requests_before = len(fake.requests) if fake else 0
        cpu0 = kubelet.cpu()
        created, t_first = {}, time.monotonic()
        for i in range(args.pods):
            pod = user.call("POST", f"/api/v1/namespaces/{NS}/pods", pod_manifest(f"hello-{i}", node, image)).json()
            created[pod["metadata"]["name"]] = (time.monotonic(), pod["metadata"]["uid"])
        t_last = time.monotonic()
        ok = wait(lambda: watcher.count("Succeeded") >= args.pods, args.timeout)
        t_done = max((s.get("Succeeded", 0) for s in watcher.seen.values()), default=t_last)
        wait(lambda: fake is None or len(fake.events(namespace=NS)) >= 3 * args.pods, 30, 0.05)
        time.sleep(0.5)
        cpu = kubelet.cpu() - cpu0
        peak_rss = kubelet.peak_rss_mb()
        requests_burst = len(fake.requests) if fake else 0
        alone = {"hello": {}, "napper": {}}     # pods one at a time: the kubelet's share, writers idle
        for kind, pods in alone.items():
            for i in range(args.alone):
                name = f"alone-{kind}-{i}"
                pod = user.call("POST", f"/api/v1/namespaces/{NS}/pods", pod_manifest(name, node, images[kind])).json()
                pods[name] = (time.monotonic(), pod["metadata"]["uid"])
                wait(lambda: "Succeeded" in watcher.seen.get(name, {}), 30)
                time.sleep(0.2)     # its Events are out too
        watcher.close()
    finally:
        peak_threads = sampler.stop()
        probe = kubelet.stop()
    requests_during = fake.requests[requests_before:requests_burst] if fake else []
    floor_s = floor(user, node_api, node, args.pods, image)
    report(args, created, watcher, probe, root, fake, requests_during, ok, t_first, t_last, t_done, cpu, peak_rss,
           peak_threads, floor_s)
    for kind, pods in alone.items():
        start, exit_, _, queued = kubelet_share(pods, probe, root)
        print(f"kubelet, {len(start)} {kind} pods one at a time: watch event -> module running: "
              f"{fmt_ms(percentiles(start))}; module exit -> Succeeded status sent: {fmt_ms(percentiles(exit_))}"
              f"; of which exit -> handed to the writer: {fmt_ms(percentiles(queued))}")
        if trace:
            with open(trace) as f:
                steps_table(kind, json.load(f), pods, probe, root)

def with_ns(user):
    try:
        user.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    except RuntimeError as exc:
        if " 409 " not in str(exc):
            raise


def node_is_ready(user, node):
    try:
        got = user.call("GET", f"/api/v1/nodes/{node}").json()
    except RuntimeError:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in got.get("status", {}).get("conditions", []))


def kubelet_share(created, probe, root):
    """Per pod: watch event -> module running (its first log line, stamped by the host), module exit
    (its last line) -> Succeeded status patch sent, their sum, and of the latter: exit -> status
    handed to the StatusWriter."""
    start_share, exit_share, share, queued = [], [], [], []
    for name, (_, uid) in created.items():
        first, last = log_times(root, uid)
        added = probe["added"].get(uid)
        sent = (probe["status_sent"].get(uid) or {}).get("Succeeded")
        if first is None or added is None or sent is None:
            continue
        start_share.append(first - added)
        exit_share.append(sent - last)
        share.append(start_share[-1] + exit_share[-1])
        queued.append((probe["status_queued"].get(uid) or {}).get("Succeeded", sent) - last)
    return start_share, exit_share, share, queued


def steps_table(kind, steps, pods, probe, root):
    """The traced steps (bench/common.py TRACED) of pods run one at a time, medians over the pods:
    those begun from the watch event to the first log line (start), and from the last log line to
    the Succeeded patch leaving (exit); when each first began (ms after the event or the exit), its
    wall and thread CPU ms (summed per pod; nested steps are inside their callers)."""
    for part in ("start", "exit"):
        rows = {}       # step -> {"at": [], "wall": [], "cpu": [], "threads": set()}
        for _, uid in pods.values():
            first, last = log_times(root, uid)
            added, sent = probe["added"].get(uid), (probe["status_sent"].get(uid) or {}).get("Succeeded")
            if None in (first, added, sent):
                continue
            begin, end = (added, first) if part == "start" else (last, sent)
            mine = collections.defaultdict(list)
            for wall, took, cpu, thread, step in steps:
                if begin <= wall < end:
                    mine[step].append((wall, took, cpu, thread))
            for step, runs in mine.items():
                row = rows.setdefault(step, {"at": [], "wall": [], "cpu": [], "threads": set()})
                row["at"].append(min(r[0] for r in runs) - begin)
                row["wall"].append(sum(r[1] for r in runs))
                row["cpu"].append(sum(r[2] for r in runs))
                row["threads"].update(r[3].replace("minikrust-", "") for r in runs)
        print(f"{kind} pods, {part}: step, pods, first began (ms after the {'event' if part == 'start' else 'exit'}), "
              "wall ms, CPU ms (medians), threads")
        for step, row in sorted(rows.items(), key=lambda item: percentiles(item[1]["at"])["p50"]):
            med = {k: percentiles(row[k])["p50"] * 1000 for k in ("at", "wall", "cpu")}
            print(f"  {step:34} {len(row['at']):3} {med['at']:7.2f} {med['wall']:7.2f} {med['cpu']:7.2f}  "
                  + ",".join(sorted(row["threads"])))


def report(args, created, watcher, probe, root, fake, requests_during, ok, t_first, t_last, t_done, cpu, peak_rss,
           peak_threads, floor_s):
    n = args.pods
    to_running = [s["Running"] - created[name][0] for name, s in watcher.seen.items() if "Running" in s and name in created]
    to_done = [s["Succeeded"] - created[name][0] for name, s in watcher.seen.items() if "Succeeded" in s and name in created]
    start_share, exit_share, share, queued = kubelet_share(created, probe, root)
    if fake is not None:        # the server's own log: every request of the node during the run
        counts = {}
        for r in requests_during:
            if r.user == "system:node:" + (args.node_name or "bench"):
                key = request_kind(r.method, r.path)
                counts[key] = counts.get(key, 0) + 1
        source = "the fake API server's request log"
    else:
        counts, source = probe["requests"], "the kubelet's requests"
    writes = sum(v for k, v in counts.items() if k in WRITES)
    print(f"pods: {n} created in {t_last - t_first:.2f}s; {len(to_done)} seen Succeeded"
          f"{'' if ok else ' (TIMED OUT)'}; all done {t_done - t_first:.2f}s after the first create, "
          f"{t_done - t_last:.2f}s after the last")
    print(f"creation -> Running   ({len(to_running)} seen): {fmt_ms(percentiles(to_running))}")
    print(f"creation -> Succeeded ({len(to_done)} seen): {fmt_ms(percentiles(to_done))}")
    print(f"kubelet: watch event -> module running: {fmt_ms(percentiles(start_share))}")
    print(f"kubelet: module exit -> Succeeded status sent: {fmt_ms(percentiles(exit_share))}; of which exit -> "
          f"status handed to the writer: {fmt_ms(percentiles(queued))}")
    print(f"requests per pod ({source}): " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(counts.items())))
    print(f"kubelet: {cpu:.2f} CPU s ({cpu / n * 1000:.2f} ms per pod), peak RSS {peak_rss:.0f} MB, "
          f"peak threads {peak_threads}")
    print(f"API floor: {n * 5} writes by a plain client over 8 connections: {floor_s:.2f}s")
    stats = percentiles(share)
    vs = (t_done - t_last) / floor_s if floor_s else float("nan")
    ms = lambda v: f"{v * 1000:.2f}" if v is not None else "nan"   # noqa: E731
    print(f"pods n={n} kubelet_p50_ms={ms(stats['p50'])} kubelet_p99_ms={ms(stats['p99'])} "
          f"client_p99_ms={ms(percentiles(to_done)['p99'])} writes_per_pod={writes / n:.2f} "
          f"all_done_s={t_done - t_first:.2f} floor_s={floor_s:.2f} vs_floor={vs:.2f} peak_threads={peak_threads}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--alone", type=int, default=20, help="then this many hello and this many napper pods one at a time")
    add_arguments(parser)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", help="write the kubelet's cProfile stats (all threads) to this file")
    parser.add_argument("--trace", action="store_true", help="the one-at-a-time pods' steps: wall and CPU ms each")
    args = parser.parse_args(argv)
    if args.kubeconfig and not (args.node_kubeconfig and args.node_name):
        parser.error("--kubeconfig needs --node-kubeconfig and --node-name")
    with tempfile.TemporaryDirectory(prefix="minikrust-bench-") as work:
        run(args, work)


if __name__ == "__main__":
    main()
