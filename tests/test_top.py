"""`kubectl top`: a kubelet's /metrics/resource and /stats/summary report what running modules use
now (CPU from the run thread's clock, memory as the touched part of linear memory), on both backends,
with pod sums, usageNanoCores between samples, and ephemeral-storage (emptyDir + container logs)."""
import hashlib
import os

import pytest
import requests
import yaml

from tests.helpers import wait_for
from tests.test_wasihost import thread_cpu_seconds

MiB = 1 << 20


@pytest.fixture
def top(backend, kubelet_factory, tmp_path, monkeypatch, wasm):
    """(kubelet serving plain HTTP on 127.0.0.1, manifests folder) on `backend`'s kind of host."""
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", backend.backend)
    folder = tmp_path / "manifests"
    folder.mkdir()
    kubelet = kubelet_factory(manifests=folder, serve=True, port=0)
    return kubelet, folder


def add_pod(kubelet, folder, name, module, volumes=()):
    """A static pod running `module`; its name as the kubelet gives it (suffixed with the node's)."""
    (folder / f"{name}.wasm").write_bytes(module)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": f"file:{name}.wasm"}],
                    "volumes": [{"name": v, "emptyDir": {}} for v in volumes]}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(pod))
    return f"{name}-{kubelet.config.node_name}"


def resource_metrics(kubelet):
    """{series with labels: (value, timestamp ms)} from /metrics/resource."""
    text = requests.get(f"http://127.0.0.1:{kubelet.server.port}/metrics/resource", timeout=10).text
    return {line.rsplit(" ", 2)[0]: (float(line.rsplit(" ", 2)[1]), int(line.rsplit(" ", 2)[2]))
            for line in text.splitlines() if line and not line.startswith("#") and line.count(" ") == 2}


def summary_pod(kubelet, name):
    summary = requests.get(f"http://127.0.0.1:{kubelet.server.port}/stats/summary", timeout=10).json()
    return next((p for p in summary["pods"] if p["podRef"]["name"] == name), None)


def series(kind, name, container="main"):
    return f'{kind}{{container="{container}",namespace="default",pod="{name}"}}'


def test_spinning_modules_cpu_rises_by_about_the_wall_time_between_scrapes(top, wasm):
    kubelet, folder = top
    spin = add_pod(kubelet, folder, "spin", wasm.loop)
    key = series("container_cpu_usage_seconds_total", spin)
    wait_for(lambda: resource_metrics(kubelet).get(key, (0,))[0] > 0.05, timeout=60,
             what="the spinning pod's CPU in /metrics/resource")
    digest = "sha256:" + hashlib.sha256(wasm.loop).hexdigest()
    # the kernel's account of the run thread's CPU, taken around each scrape, bounds what it reports
    before1, first, after1 = thread_cpu_seconds(digest), resource_metrics(kubelet), thread_cpu_seconds(digest)
    second = wait_for(lambda: (lambda m: m if m[key][1] - first[key][1] >= 1500 else None)(resource_metrics(kubelet)),
                      timeout=30, interval=0.25, what="a second scrape 1.5 s later")
    after2 = thread_cpu_seconds(digest)
    tid = max(after2, key=lambda t: after2[t] - before1.get(t, 0))  # the spinning one (idle run threads stand still)
    before1, after1, after2 = before1.get(tid, 0), after1.get(tid, 0), after2[tid]
    cpu = second[key][0] - first[key][0]
    wall = (second[key][1] - first[key][1]) / 1000
    tick = 2 / os.sysconf("SC_CLK_TCK")  # /proc counts whole clock ticks
    assert 0 < cpu <= wall + 0.1, (cpu, wall)  # about the wall time when the core is free
    assert after2 - after1 - tick <= cpu <= after2 - before1 + tick, (cpu, before1, after1, after2)
    pod_key = f'pod_cpu_usage_seconds_total{{namespace="default",pod="{spin}"}}'
    assert second[pod_key][0] >= second[key][0]
    pod = summary_pod(kubelet, spin)
    (container,) = pod["containers"]
    assert container["cpu"]["usageCoreNanoSeconds"] >= second[key][0] * 1e9
    later = wait_for(lambda: (lambda p: p if "usageNanoCores" in p["containers"][0]["cpu"] else None)(
        summary_pod(kubelet, spin)), what="a second summary sample, with a rate")
    assert 0 < later["containers"][0]["cpu"]["usageNanoCores"] <= 1.1e9  # one spinning thread: <= 1 core
    assert later["cpu"]["usageCoreNanoSeconds"] >= later["containers"][0]["cpu"]["usageCoreNanoSeconds"]


@pytest.mark.parametrize("mib", [32])
def test_module_holding_memory_reports_it_as_working_set_until_its_pod_ends(top, wasm, mib):
    kubelet, folder = top
    holder = add_pod(kubelet, folder, "holder", wasm.hold(mib), volumes=["scratch"])
    key = series("container_memory_working_set_bytes", holder)
    metrics = wait_for(lambda: (lambda m: m if m.get(key, (0,))[0] >= mib * MiB else None)(resource_metrics(kubelet)),
                       timeout=60, what=f"{mib} MiB working set in /metrics/resource")
    assert metrics[key][0] <= (mib + 1) * MiB
    assert metrics[f'pod_memory_working_set_bytes{{namespace="default",pod="{holder}"}}'][0] == metrics[key][0]
    pod = summary_pod(kubelet, holder)
    (container,) = pod["containers"]
    assert mib * MiB <= container["memory"]["workingSetBytes"] <= (mib + 1) * MiB
    assert mib * MiB <= pod["memory"]["workingSetBytes"] <= (mib + 1) * MiB
    # ephemeral-storage: the emptyDir (written here, as a module would) and the container's log
    uid = pod["podRef"]["uid"]
    scratch = os.path.join(kubelet.config.root_dir, "pods", uid, "volumes", "scratch")
    with open(os.path.join(scratch, "data"), "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.flush()
        os.fsync(f.fileno())
    pod = summary_pod(kubelet, holder)
    (volume,) = pod["volume"]
    assert volume["name"] == "scratch" and 3 * MiB <= volume["usedBytes"] <= 3 * MiB + 64 * 1024
    logs = pod["containers"][0]["logs"]["usedBytes"]
    assert pod["ephemeral-storage"]["usedBytes"] == volume["usedBytes"] + logs
    assert pod["ephemeral-storage"]["capacityBytes"] >= pod["ephemeral-storage"]["availableBytes"] > 0
    # the pod ends (its manifest removed): its working set is gone from both endpoints
    os.unlink(folder / "holder.yaml")
    wait_for(lambda: key not in resource_metrics(kubelet), timeout=30, what="the container's series gone")
    ended = summary_pod(kubelet, holder)
    assert ended is None or (ended["containers"] == [] and ended["memory"]["workingSetBytes"] == 0)
