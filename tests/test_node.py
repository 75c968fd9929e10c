"""Node: labels and taints compatible with Krustlet, status with real values, conditions, and
(against the fake API server) registration, adoption, Lease renewal, status updates, shutdown."""
import json
import os
import re
import subprocess
import sys

import pytest

import minikrust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = {"cpus": 2, "memory_total": 4 * 1024**3, "memory_available": 3 * 1024**3, "disk_total": 100 * 1024**3,
         "disk_free": 50 * 1024**3, "processes": 100, "pid_max": 32768, "machine_id": "m", "boot_id": "b",
         "kernel": "6.1", "os_image": "Debian"}


def test_labels_are_krustlets_plus_hostname_and_user_labels():
    config = minikrust.Config(node_name="n1", node_labels={"zone": "a", "kubernetes.io/arch": "amd64"})
    labels = minikrust.node_labels(config)
    assert labels["kubernetes.io/arch"] == labels["beta.kubernetes.io/arch"] == "wasm32-wasi"
    assert labels["type"] == "krustlet" and labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/hostname"] == "n1" and labels["zone"] == "a"


def test_taints_keep_ordinary_pods_off_like_krustlet():
    taints = minikrust.node_taints()
    assert {(t["key"], t["value"], t["effect"]) for t in taints} == {
        ("kubernetes.io/arch", "wasm32-wasi", "NoSchedule"), ("kubernetes.io/arch", "wasm32-wasi", "NoExecute")}


def test_status_reports_capacity_node_info_addresses_and_port():
    config = minikrust.Config(node_name="n1", port=10555, max_pods=42)
    states = minikrust.node_condition_states(FACTS)
    status = minikrust.node_status(config, "10.0.0.5", FACTS, minikrust.node_conditions(states, None, "T0"))
    assert status["capacity"] == {"cpu": "2", "memory": "4194304Ki", "ephemeral-storage": "104857600Ki", "pods": "42"}
    assert status["allocatable"]["memory"] == f"{(4 * 1024**3 - 100 * 1024**2) // 1024}Ki"
    info = status["nodeInfo"]
    assert re.fullmatch(r"v1\.\d+\.0-minikrust", info["kubeletVersion"])
    assert info["containerRuntimeVersion"] == "wasmtime://" + minikrust.runtime_version()
    assert info["operatingSystem"] == "linux" and info["bootID"] == "b" and info["machineID"] == "m"
    assert {"type": "InternalIP", "address": "10.0.0.5"} in status["addresses"]
    assert {"type": "Hostname", "address": "n1"} in status["addresses"]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10555}}
    assert [c["type"] for c in status["conditions"]] == ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]


def test_runtime_version_comes_from_metadata_without_loading_the_engine():
    code = "import minikrust, sys; v = minikrust.runtime_version(); print(v, 'wasmtime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert out[0] == "50.0.1" and out[1] == "False"


def test_real_host_facts():
    facts = minikrust.host_facts(ROOT)
    assert facts["cpus"] >= 1 and facts["memory_total"] > facts["memory_available"] > 0
    assert facts["disk_total"] > 0 and facts["boot_id"] and facts["pid_max"] > 0


def test_pressure_conditions_follow_the_eviction_thresholds():
    low = dict(FACTS, memory_available=50 * 1024**2, disk_free=5 * 1024**3, processes=32000)
    states = minikrust.node_condition_states(low)
    assert states["MemoryPressure"][:2] == ("True", "KubeletHasInsufficientMemory")
    assert states["DiskPressure"][:2] == ("True", "KubeletHasDiskPressure")
    assert states["PIDPressure"][:2] == ("True", "KubeletHasInsufficientPID")
    assert minikrust.node_condition_states(FACTS, ready=False)["Ready"][:2] == ("False", "KubeletNotReady")


def test_transition_time_is_kept_while_a_condition_is_unchanged():
    first = minikrust.node_conditions(minikrust.node_condition_states(FACTS), None, "T0")
    second = minikrust.node_conditions(minikrust.node_condition_states(FACTS), first, "T1")
    assert all(c["lastTransitionTime"] == "T0" and c["lastHeartbeatTime"] == "T1" for c in second)
    third = minikrust.node_conditions(minikrust.node_condition_states(FACTS, ready=False), second, "T2")
    ready = next(c for c in third if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "T2"


def test_status_signature_ignores_heartbeats_but_not_changes():
    config = minikrust.Config(node_name="n1")
    make = lambda facts, now: minikrust.node_status(  # noqa: E731
        config, "1.1.1.1", facts, minikrust.node_conditions(minikrust.node_condition_states(facts), None, now))
    sig = minikrust._status_signature
    assert sig(make(FACTS, "T0")) == sig(make(dict(FACTS, memory_available=2 * 1024**3), "T1"))
    assert sig(make(FACTS, "T0")) != sig(make(dict(FACTS, memory_available=1), "T1"))
