"""Idle cost of a registered kubelet: API requests per minute, CPU and RSS over a window.

Starts the fake API server of the tests in this process, runs `python minikrust.py --kubeconfig K`
as a child, waits until its Node is Ready, then watches it idle (no pods) for --seconds (60).
Targets: at most 8 requests per minute, RSS under 40 MB without the wasm engine loaded.

    python bench/idle.py [--seconds 60] [--serve]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fake_apiserver import FakeApiServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK           # utime + stime


def rss_bytes(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def engine_loaded(pid):
    maps = open(f"/proc/{pid}/maps").read()
    return "wasmtime" in maps or "_wasihost" in maps


def node_ready(fake, name):
    node = fake.get("nodes", name) or {}
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--serve", action="store_true", help="also run the kubelet HTTPS server (random port)")
    args = parser.parse_args()
    fake = FakeApiServer().start()
    fake.csr_auto_approve = True        # a cluster that approves kubelet serving certificates
    with tempfile.TemporaryDirectory(prefix="minikrust-bench-") as tmp:
        kubeconfig = fake.kubeconfig(tmp, node="bench")
        command = [sys.executable, os.path.join(ROOT, "minikrust.py"), "--kubeconfig", kubeconfig,
                   "--node-name", "bench", "--root-dir", os.path.join(tmp, "root"), "--log-level", "warning"]
        command += ["--port", "0"] if args.serve else ["--serve", "false"]
        proc = subprocess.Popen(command, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not node_ready(fake, "bench"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the kubelet did not register")
                time.sleep(0.2)
            time.sleep(2)                                # let start-up settle
            fake.clear_requests()
            open_at_start = fake.open_watches()
            cpu0, t0, peak = cpu_seconds(proc.pid), time.monotonic(), 0
            while time.monotonic() - t0 < args.seconds:
                peak = max(peak, rss_bytes(proc.pid))
                time.sleep(1.0)
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            requests = [r for r in fake.requests if r.user == "system:node:bench"]
            # a watch is logged when it ends; one still open at the end was opened in the window
            # only if none was open at its start
            opened_watches = max(0, fake.open_watches() - open_at_start)
            kinds = {}
            for r in requests:
                key = f"{r.method} {r.path}"
                kinds[key] = kinds.get(key, 0) + 1
            result = {"seconds": round(elapsed, 1),
                      "requests_per_minute": round((len(requests) + opened_watches) * 60 / elapsed, 2),
                      "requests": kinds, "cpu_seconds": round(cpu, 3),
                      "cpu_percent": round(100 * cpu / elapsed, 2),
                      "rss_mb_peak": round(peak / 2**20, 1), "rss_mb_end": round(rss_bytes(proc.pid) / 2**20, 1),
                      "engine_loaded": engine_loaded(proc.pid)}
        finally:
            proc.terminate()
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            fake.stop()
    result["exit_code_after_sigterm"] = code
    print(json.dumps(result, indent=1))
    ok = result["requests_per_minute"] <= 8 and result["rss_mb_peak"] < 40 and not result["engine_loaded"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
