"""Many nodes in one process: --nodes (100) kubelets (minikrust.Kubelet objects) in one child process
against one fake API server (the tests', in this process).

1. Idle for --idle seconds (120) once every Node is Ready: API requests per node per minute (from
   the fake's request log), the process's CPU (share of one core, all nodes together) and RSS per
   node.
2. Then --pods (1,000) run-to-completion pods spread evenly over the nodes: the time from the first
   create to the last Succeeded (as a watching client sees it), CPU seconds and peak threads.

    python bench/nodes.py [--nodes 100] [--idle 120] [--pods 1000]

Last line: nodes n=<n> idle_cpu_pct=<x> requests_per_node_min=<x> rss_mb_per_node=<x> pods=<n>
           all_done_s=<x> cpu_s=<x> peak_threads=<n>
"""
import argparse
import collections
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ThreadSampler, cpu_seconds, hello_module, request_kind, rss_bytes  # noqa: E402
from bench.pods import NS, Api, Watcher, pod_manifest, wait, with_ns  # noqa: E402


def child(work, n):
    """The measured process: n kubelets, until SIGTERM."""
    import minikrust
    logging.basicConfig(level=logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kubelets = []
    for i in range(n):
        config = minikrust.Config(kubeconfig=os.path.join(work, f"node-{i}.kubeconfig"), node_name=f"node-{i}",
                                  root_dir=os.path.join(work, f"root-{i}"), serve=False, node_ip="127.0.0.1",
                                  max_pods=110)
        kubelets.append(minikrust.Kubelet(config).start())
    stop.wait()
    for kubelet in kubelets:
        kubelet.stop()


def ready_nodes(fake):
    return sum(1 for node in fake.list("nodes") if any(
        c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", [])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=120.0, help="seconds of idling measured")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.nodes)
    from tests.fake_apiserver import FakeApiServer
    fake = FakeApiServer().start()
    with tempfile.TemporaryDirectory(prefix="minikrust-nodes-") as work:
        for i in range(args.nodes):
            fake.kubeconfig(os.path.join(work, f"node-{i}.kubeconfig"), node=f"node-{i}")
        image = os.path.join(work, "hello.wasm")
        with open(image, "wb") as f:
            f.write(hello_module())
        log = open(os.path.join(work, "nodes.log"), "w")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", work, "--nodes", str(args.nodes)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = ThreadSampler(proc.pid, 0.05)
        try:
            began = time.monotonic()
            if not wait(lambda: ready_nodes(fake) >= args.nodes, args.timeout, 0.2):
                raise SystemExit(f"only {ready_nodes(fake)} of {args.nodes} nodes Ready")
            print(f"{args.nodes} nodes Ready {time.monotonic() - began:.1f}s after the start")
            time.sleep(5.0)         # start-up settles
            first, cpu0, t0 = len(fake.requests), cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.idle)
            elapsed = time.monotonic() - t0
            idle_cpu, rss = cpu_seconds(proc.pid) - cpu0, rss_bytes(proc.pid) / 2**20
            idle = [r for r in fake.requests[first:] if r.user.startswith("system:node:")]
            kinds = collections.Counter(request_kind(r.method, r.path) for r in idle)
            per_min = len(idle) / args.nodes / (elapsed / 60)
            print(f"idle {elapsed:.0f}s: {per_min:.2f} requests per node per minute ("
                  + ", ".join(f"{k} {v / args.nodes / (elapsed / 60):.2f}" for k, v in kinds.most_common())
                  + f"); CPU {idle_cpu / elapsed * 100:.2f}% of a core for all; RSS {rss:.0f} MB "
                  f"({rss / args.nodes:.2f} MB per node)")
            user = Api(fake.kubeconfig(os.path.join(work, "admin.kubeconfig"), admin=True))
            with_ns(user)
            rv = user.call("GET", f"/api/v1/namespaces/{NS}/pods").json()["metadata"]["resourceVersion"]
            watcher = Watcher(user, rv)
            cpu0, t_first = cpu_seconds(proc.pid), time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: user.call("POST", f"/api/v1/namespaces/{NS}/pods", pod_manifest(
                    f"hello-{i}", f"node-{i % args.nodes}", f"file:{image}")), range(args.pods)))
            t_last = time.monotonic()
            ok = wait(lambda: watcher.count("Succeeded") >= args.pods, args.timeout, 0.02)
            done = max((s.get("Succeeded", 0) for s in watcher.seen.values()), default=t_last) - t_first
            cpu = cpu_seconds(proc.pid) - cpu0
            watcher.close()
            print(f"{args.pods} pods over {args.nodes} nodes: created in {t_last - t_first:.2f}s, "
                  f"{watcher.count('Succeeded')} Succeeded{'' if ok else ' (TIMED OUT)'}, the last {done:.2f}s after "
                  f"the first create; {cpu:.2f} CPU s ({cpu / args.pods * 1000:.1f} ms per pod)")
        finally:
            peak = sampler.stop()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            fake.stop()
        print(f"nodes n={args.nodes} idle_cpu_pct={idle_cpu / elapsed * 100:.2f} requests_per_node_min={per_min:.2f} "
              f"rss_mb_per_node={rss / args.nodes:.2f} pods={args.pods} all_done_s={done:.2f} cpu_s={cpu:.2f} "
              f"peak_threads={peak}")


if __name__ == "__main__":
    main()
