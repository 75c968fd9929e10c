"""Pod density: what long-running pods cost the kubelet, and how fast they go away.

1. --pods (1,000) pods whose module sleeps in poll_oneoff and logs a line once a minute: once all
   run, the kubelet's RSS, CPU (share of one core over --window seconds) and thread count; then
   the time from deleting them all (grace 1 s) to the last one gone from the API.
2. --loggers (200) pods that each log 5 lines a second: the kubelet's CPU per 1,000 log lines
   over --window seconds; then the same deletion, timed (target: within 3 s).

Against the tests' fake API server started in this process, or a real cluster with --kubeconfig
(see bench/pods.py). The kubelet is a child process; figures are read from /proc.

    python bench/density.py [--pods 1000] [--loggers 200] [--window 30]

Last line: density pods=<n> rss_mb=<x> cpu_pct=<x> threads=<n> delete_s=<x> loggers=<n>
           cpu_ms_per_1000_lines=<x> logger_threads=<n> delete_loggers_s=<x>
"""
import argparse
import collections
import concurrent.futures
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ThreadSampler, fmt_ms, percentiles, ticker_module  # noqa: E402
from bench.pods import NS, Api, Watcher, add_arguments, pod_manifest, setup, start_kubelet, wait  # noqa: E402


def phase_run(user, node, kubelet, image, prefix, n, window, timeout):
    """Create n pods of `image`, wait until all run, measure for `window` s, delete them all (grace 1 s).
    Returns (seconds to all Running, rss MB, share of a core over the window, threads, Deleting)."""
    rv = user.call("GET", f"/api/v1/namespaces/{NS}/pods").json()["metadata"]["resourceVersion"]
    watcher = Watcher(user, rv)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:      # a user's parallel kubectl create
        list(pool.map(lambda i: user.call("POST", f"/api/v1/namespaces/{NS}/pods",
                                          pod_manifest(f"{prefix}-{i}", node, image)), range(n)))
    if not wait(lambda: watcher.count("Running") >= n, timeout, 0.05):
        print(f"only {watcher.count('Running')} of {n} pods Running after {timeout}s")
    running_s = time.monotonic() - began
    time.sleep(2.0)     # starting is over
    cpu0, t0 = kubelet.cpu(), time.monotonic()
    time.sleep(window)
    cpu, elapsed = kubelet.cpu() - cpu0, time.monotonic() - t0
    rss, threads = kubelet.rss_mb(), kubelet.threads()
    answered = {}
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in user.call("GET", f"/api/v1/namespaces/{NS}/pods").json()["items"]}

    def delete(i):
        user.call("DELETE", f"/api/v1/namespaces/{NS}/pods/{prefix}-{i}",
                  {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 1})
        answered[f"{prefix}-{i}"] = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:     # 8 connections, opened before timing
        user.connect(pool)
        began = time.monotonic()
        list(pool.map(delete, range(n)))
    wait(lambda: watcher.count("Deleted") >= n, timeout, 0.02)
    gone = {name: s["Deleted"] for name, s in watcher.seen.items() if name in answered and "Deleted" in s}
    watcher.close()
    deleting = Deleting(max(gone.values(), default=time.monotonic()) - began, max(answered.values()) - began,
                        max((gone[name] - answered[name] for name in gone), default=float("nan")), len(gone))
    wall = time.time() - time.monotonic()     # the probe's stamps are wall-clock
    deleting.steps = {uids[n]: (answered[n] + wall, gone[n] + wall) for n in gone if n in uids}
    return running_s, rss, cpu / elapsed, threads, deleting


def deletion_steps(deleting, probe):
    """Where a deletion's time goes, per pod: its DELETE answered -> the kubelet hands its final
    status to the StatusWriter (grace 1 s, kill, sync) -> that patch leaves -> the pod gone (the
    final DELETE and the watch)."""
    handed, sent, rest = [], [], []
    for uid, (deleted, gone) in deleting.steps.items():
        queued, out = probe["status_queued"].get(uid, {}), probe["status_sent"].get(uid, {})
        phase = next((p for p in ("Failed", "Succeeded") if p in queued and p in out), None)
        if phase:
            handed.append(queued[phase] - deleted)
            sent.append(out[phase] - queued[phase])
            rest.append(gone - out[phase])
    return (f"DELETE -> final status handed to the writer: {fmt_ms(percentiles(handed))}; handed -> sent: "
            f"{fmt_ms(percentiles(sent))}; sent -> gone: {fmt_ms(percentiles(rest))}")


class Deleting(collections.namedtuple("Deleting", "all_gone_s sent_s kubelet_max_s gone")):
    """First DELETE -> last pod gone; -> last DELETE answered; the longest DELETE answered -> gone."""

    def __str__(self):
        return (f"{self.gone} gone from the API {self.all_gone_s:.2f}s after the first DELETE (the DELETEs took "
                f"{self.sent_s:.2f}s to send; from its DELETE to gone, each pod took at most "
                f"{self.kubelet_max_s:.2f}s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--loggers", type=int, default=200)
    parser.add_argument("--window", type=float, default=30.0, help="seconds over which CPU is measured")
    parser.add_argument("--timeout", type=float, default=600.0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minikrust-density-") as work:
        user_cfg, node_cfg, node, fake, images = setup(
            args, work, {"minutely": ticker_module(60.0), "chatty": ticker_module(0.2)})
        user = Api(user_cfg)
        kubelet = start_kubelet(node_cfg, node, user, work, max(args.pods, args.loggers) + 10)
        sampler = ThreadSampler(kubelet.pid, 0.05)
        try:
            idle_rss, idle_threads = kubelet.rss_mb(), kubelet.threads()
            print(f"idle kubelet: RSS {idle_rss:.0f} MB, {idle_threads} threads")
            up, rss, share, threads, gone = phase_run(
                user, node, kubelet, images["minutely"], "sleeper", args.pods, args.window, args.timeout)
            print(f"{args.pods} sleeping pods: all Running {up:.1f}s after the first create; RSS {rss:.0f} MB, "
                  f"CPU {share * 100:.1f}% of a core over {args.window:.0f}s, {threads} threads; deleted (grace "
                  f"1 s): {gone}")
            up2, _rss, share2, threads2, gone2 = phase_run(
                user, node, kubelet, images["chatty"], "logger", args.loggers, args.window, args.timeout)
            lines = args.loggers * 5 * args.window
            per_1000 = share2 * args.window / (lines / 1000) * 1000
            print(f"{args.loggers} pods logging 5 lines/s: CPU {share2 * 100:.1f}% of a core, "
                  f"{per_1000:.2f} ms CPU per 1,000 lines, {threads2} threads; deleted (grace 1 s): {gone2}")
        finally:
            peak = sampler.stop()
            probe = kubelet.stop()
        print(f"peak threads {peak}")
        print(f"deleting {args.pods} sleeping pods, per pod: {deletion_steps(gone, probe)}")
        print(f"deleting {args.loggers} logging pods, per pod: {deletion_steps(gone2, probe)}")
        print(f"density pods={args.pods} rss_mb={rss:.0f} cpu_pct={share * 100:.2f} threads={threads} "
              f"delete_s={gone.all_gone_s:.2f} loggers={args.loggers} cpu_ms_per_1000_lines={per_1000:.2f} "
              f"logger_threads={threads2} delete_loggers_s={gone2.all_gone_s:.2f}")


if __name__ == "__main__":
    main()
