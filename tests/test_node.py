"""Node: labels and taints compatible with Krustlet, status with real values, conditions, and
(against the fake API server) registration, adoption, Lease renewal, status updates, shutdown."""
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


# --- against the fake API server ---

import signal  # noqa: E402

from tests.helpers import kubectl_binary, wait_for  # noqa: E402

LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def make_kubelet(fake, tmp_path, name="n1", handler=None, **overrides):
    """A kubelet for node `name` against the fake, without its HTTPS server."""
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(kubeconfig=fake.kubeconfig(directory, node=name), node_name=name, root_dir=str(directory / "root"),
                    serve=False, node_ip="10.1.2.3")
    settings.update(overrides)
    return minikrust.Kubelet(minikrust.Config(**settings), handler=handler)


def _condition(node, kind):
    return next((c for c in (node or {}).get("status", {}).get("conditions", []) if c["type"] == kind), {})


def _ready(fake, name):
    return _condition(fake.get("nodes", name), "Ready").get("status") == "True"


def test_registers_a_fresh_node_with_its_lease(fake_apiserver, tmp_path):
    fake = fake_apiserver
    with make_kubelet(fake, tmp_path, "n1", port=10777, node_labels={"zone": "z1"}):
        wait_for(lambda: _ready(fake, "n1"), 10, what="node n1 Ready")
        lease = wait_for(lambda: fake.get("leases", "n1", namespace="kube-node-lease"), 10, what="lease")
        node = fake.get("nodes", "n1")
    meta, status = node["metadata"], node["status"]
    assert meta["labels"]["kubernetes.io/arch"] == "wasm32-wasi" and meta["labels"]["zone"] == "z1"
    assert {"key": "kubernetes.io/arch", "value": "wasm32-wasi", "effect": "NoExecute"} in node["spec"]["taints"]
    assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10777
    assert {"type": "InternalIP", "address": "10.1.2.3"} in status["addresses"]
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("wasmtime://")
    assert status["capacity"]["pods"] == "110"
    assert lease["spec"]["holderIdentity"] == "n1" and lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["uid"] == meta["uid"]
    assert fake.count("POST", r"^/api/v1/nodes$") == 1
    assert {"Starting", "NodeReady", "NodeNotReady"} <= {e["reason"] for e in fake.events(involved_name="n1")}


def test_adopts_an_existing_node_and_sends_its_status(fake_apiserver, tmp_path):
    fake = fake_apiserver
    fake.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"keep": "me"}},
                 "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}})
    with make_kubelet(fake, tmp_path, "n1"):
        wait_for(lambda: _ready(fake, "n1"), 10, what="adopted node Ready")
    node = fake.get("nodes", "n1")
    assert node["metadata"]["labels"]["keep"] == "me" and node["metadata"]["labels"]["type"] == "krustlet"
    assert node["status"]["nodeInfo"]["kubeletVersion"].endswith("-minikrust")
    assert any(r.status == 409 for r in fake.find_requests("POST", r"^/api/v1/nodes$"))


def test_lease_is_renewed_and_a_conflict_is_recovered(fake_apiserver, tmp_path):
    fake = fake_apiserver
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.2):
        wait_for(lambda: fake.count("PUT", "leases/n1$") >= 2, 10, what="two lease renewals")
        admin = fake.client()
        lease = admin.get(f"{LEASES}/n1").json()
        lease["spec"]["holderIdentity"] = "someone-else"                # bumps the resourceVersion
        assert admin.put(f"{LEASES}/n1", json=lease).status_code == 200
        wait_for(lambda: any(r.status == 409 for r in fake.find_requests("PUT", "leases/n1$")), 10, what="a 409")
        wait_for(lambda: fake.get("leases", "n1", namespace="kube-node-lease")["spec"]["holderIdentity"] == "n1",
                 10, what="lease taken back after the conflict")
        renewed = fake.get("leases", "n1", namespace="kube-node-lease")["spec"]["renewTime"]
        wait_for(lambda: fake.get("leases", "n1", namespace="kube-node-lease")["spec"]["renewTime"] != renewed,
                 10, what="renewals go on after the conflict")


def test_status_is_patched_when_due_and_not_between(fake_apiserver, tmp_path):
    fake = fake_apiserver
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.1, node_status_report_frequency=0.6):
        wait_for(lambda: fake.count("PATCH", "nodes/n1/status") >= 2, 10, what="periodic status reports")
        patches = fake.find_requests("PATCH", "nodes/n1/status")
        assert all(r.content_type.startswith("application/strategic-merge-patch+json") for r in patches)
    fake.clear_requests()
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.1):
        wait_for(lambda: fake.count("PUT", "leases/n1$") >= 5, 10, what="lease renewals")
        # adoption sends the status once; an unchanged status is not sent again before 5 minutes
        assert fake.count("PATCH", "nodes/n1/status") == 1


def test_heartbeat_survives_api_errors(fake_apiserver, tmp_path):
    fake = fake_apiserver
    fake.fail_next(3, status=500, path="^/api/v1/nodes$")
    fake.fail_next(2, status=429, path="leases", retry_after=0)
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.2):
        wait_for(lambda: _ready(fake, "n1"), 20, what="node Ready despite 500s")
        wait_for(lambda: fake.get("leases", "n1", namespace="kube-node-lease"), 20, what="lease despite 429s")


def test_stop_marks_the_node_not_ready(fake_apiserver, tmp_path):
    fake = fake_apiserver
    kubelet = make_kubelet(fake, tmp_path, "n1").start()
    wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready")
    kubelet.stop()
    ready = _condition(fake.get("nodes", "n1"), "Ready")
    assert ready["status"] == "False" and ready["reason"] == "KubeletNotReady"
    kubelet.stop()                      # idempotent


def test_fifty_kubelets_in_one_process(fake_apiserver, tmp_path):
    fake = fake_apiserver
    kubelets = [make_kubelet(fake, tmp_path, f"node-{i}") for i in range(50)]
    try:
        for kubelet in kubelets:
            kubelet.start()
        wait_for(lambda: all(_ready(fake, f"node-{i}") for i in range(50)), 60, what="50 Ready nodes")
        fake.create_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p7"},
                         "spec": {"containers": [{"name": "c", "image": "file:/nonexistent.wasm"}]}},
                        node_name="node-7", namespace="default")
        wait_for(lambda: kubelets[7].sources[0].known.pods, 10, what="node-7 sees its pod")
        assert not any(k.sources[0].known.pods for i, k in enumerate(kubelets) if i != 7)
        for i in range(50):     # each kubelet spoke as its own node only: nothing shared between them
            mine = fake.count(path=f"/leases/node-{i}$", user=f"system:node:node-{i}")
            assert mine >= 1 and fake.count(path=f"/leases/node-{i}$") == mine, i
    finally:
        for kubelet in kubelets:
            kubelet.stop()
    assert all(_condition(fake.get("nodes", f"node-{i}"), "Ready")["status"] == "False" for i in range(50))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_shuts_down_cleanly_with_exit_code_0(fake_apiserver, tmp_path, sig):
    """`python minikrust.py`, configured here through MINIKRUST_* variables only."""
    fake = fake_apiserver
    env = dict(os.environ, MINIKRUST_KUBECONFIG=fake.kubeconfig(tmp_path, node="n1"), MINIKRUST_NODE_NAME="n1",
               MINIKRUST_ROOT_DIR=str(tmp_path / "root"), MINIKRUST_SERVE="false")
    proc = subprocess.Popen([sys.executable, "minikrust.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _ready(fake, "n1"), 30, what="node registered by the CLI")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert _condition(fake.get("nodes", "n1"), "Ready")["status"] == "False"


def test_kubectl_shows_the_ready_node(fake_api_tls, tmp_path):
    """`python minikrust.py --kubeconfig K` registers a node `kubectl get nodes` shows Ready. kubectl
    sends no bearer token over plain HTTP, so this one runs against the HTTPS fake."""
    fake = fake_api_tls
    admin = fake.kubeconfig(tmp_path, admin=True)
    proc = subprocess.Popen([sys.executable, "minikrust.py", "--kubeconfig", fake.kubeconfig(tmp_path, node="n1"),
                             "--node-name", "n1", "--root-dir", str(tmp_path / "root"), "--serve", "false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _ready(fake, "n1"), 30, what="node registered by the CLI")
        done = subprocess.run([kubectl_binary(), "--kubeconfig", admin, "get", "nodes", "-o", "wide"],
                              capture_output=True, text=True, timeout=60)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"]
    row = next(line.split() for line in lines[1:] if line.split()[0] == "n1")
    assert row[1] == "Ready" and row[4].endswith("-minikrust") and row[-1].startswith("wasmtime://")
    assert proc.returncode == 0


def test_a_changed_condition_is_reported_at_once(fake_apiserver, tmp_path, monkeypatch):
    fake = fake_apiserver
    facts = minikrust.host_facts(str(tmp_path))
    monkeypatch.setattr(minikrust, "host_facts", lambda root: dict(facts))
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.1):
        wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready")
        facts["memory_available"] = 1024                      # below the 100Mi eviction threshold
        wait_for(lambda: _condition(fake.get("nodes", "n1"), "MemoryPressure").get("status") == "True", 10,
                 what="MemoryPressure reported")
        pressure = _condition(fake.get("nodes", "n1"), "MemoryPressure")
        assert pressure["reason"] == "KubeletHasInsufficientMemory"
        assert _condition(fake.get("nodes", "n1"), "Ready")["status"] == "True"


def test_a_deleted_node_is_registered_again(fake_apiserver, tmp_path):
    fake = fake_apiserver
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.1, node_status_report_frequency=0.3):
        wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready")
        uid = fake.get("nodes", "n1")["metadata"]["uid"]
        fake.remove("nodes", None, "n1")
        wait_for(lambda: (fake.get("nodes", "n1") or {}).get("metadata", {}).get("uid") not in (None, uid), 10,
                 what="node registered again")
        wait_for(lambda: _ready(fake, "n1"), 10, what="re-registered node Ready")


def test_conditions_adopted_without_times_get_one():
    previous = [{"type": "Ready", "status": "True"}]
    conditions = minikrust.node_conditions(minikrust.node_condition_states(FACTS), previous, "T1")
    assert next(c for c in conditions if c["type"] == "Ready")["lastTransitionTime"] == "T1"


def test_registers_over_https_with_a_client_certificate_identity(fake_api_tls, tmp_path):
    fake = fake_api_tls
    kubeconfig = fake.write_kubeconfig(str(tmp_path / "kc"), user="n1", client_cert=True)
    config = minikrust.Config(kubeconfig=kubeconfig, node_name="n1", root_dir=str(tmp_path / "root"), serve=False)
    with minikrust.Kubelet(config, handler=object()):
        wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready")
    assert {r.user for r in fake.find_requests(path="nodes")} == {"system:node:n1"}


def test_without_a_kubeconfig_the_kubelet_runs_standalone(tmp_path):
    with minikrust.Kubelet(minikrust.Config(root_dir=str(tmp_path / "root"), serve=False)) as kubelet:
        assert kubelet.api is None and kubelet.node is None
        assert not any(isinstance(s, minikrust.ApiPodSource) for s in kubelet.sources)


def test_status_reports_the_server_port_and_stored_modules(fake_apiserver, tmp_path):
    fake = fake_apiserver
    store = minikrust.ModuleStore(str(tmp_path / "n1" / "root" / "modules"))
    temp = store.temp_path()
    with open(temp, "wb") as f:
        f.write(b"\0asm\1\0\0\0")
    digest = "sha256:" + "ab" * 32
    store.add(digest, ["registry.test/hello:v1"], f"registry.test/hello@{digest}", temp=temp)
    with make_kubelet(fake, tmp_path, "n1", serve=True, port=0, address="127.0.0.1") as kubelet:
        wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready")
        status = fake.get("nodes", "n1")["status"]
        assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == kubelet.server.port != 0
        assert status["images"] == [{"names": sorted([f"registry.test/hello@{digest}", "registry.test/hello:v1"]),
                                     "sizeBytes": 8}]


def test_api_errors_are_counted_in_the_metrics(fake_apiserver, tmp_path):
    fake = fake_apiserver
    fake.fail_next(2, status=500, path="leases")
    with make_kubelet(fake, tmp_path, "n1", lease_renew_interval=0.2) as kubelet:
        counted = re.compile(r'^minikrust_api_errors_total\{code="500"\} (\d+)$', re.M)
        wait_for(lambda: int((counted.search(kubelet.metrics.render()) or [0, 0])[1]) >= 2, 10,
                 what="two counted 500s")


def test_tls_bootstrap_gives_the_kubelet_its_node_identity(fake_api_tls, tmp_path):
    fake = fake_api_tls
    fake.csr_auto_approve = True
    bootstrap = fake.write_kubeconfig(str(tmp_path / "bootstrap.kubeconfig"), token=fake.add_bootstrap_token())
    config = minikrust.Config(bootstrap_kubeconfig=bootstrap, node_name="n1", root_dir=str(tmp_path / "root"),
                              serve=False)
    with minikrust.Kubelet(config) as kubelet:
        assert kubelet.config.kubeconfig == str(tmp_path / "root" / "kubelet.kubeconfig")
        wait_for(lambda: _ready(fake, "n1"), 20, what="node Ready with the bootstrapped identity")
    assert {r.user for r in fake.find_requests(path="^/api/v1/nodes")} == {"system:node:n1"}


def test_in_cluster_config_registers_with_the_service_account(fake_api_tls, tmp_path, monkeypatch):
    fake = fake_api_tls
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(fake.node_token("n1"))
    (sa_dir / "ca.crt").write_bytes(open(fake.pki.ca_path, "rb").read())
    monkeypatch.setattr(minikrust, "SERVICE_ACCOUNT_DIR", str(sa_dir))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
    config = minikrust.Config(kubeconfig="in-cluster", node_name="n1", root_dir=str(tmp_path / "root"), serve=False)
    with minikrust.Kubelet(config, handler=object()):
        wait_for(lambda: _ready(fake, "n1"), 10, what="node Ready through in-cluster config")


def test_unset_limits_in_the_downward_api_are_the_nodes_allocatable(fake_api, kubelet_factory, wasm):
    """A pod without limits: its env and downwardAPI files hold what the Node's status.allocatable says,
    read with the kubelet's divisor rules (ceil(value / divisor); cpu in cores, memory in bytes)."""
    refs = {"CPU": ("limits.cpu", None), "MILLICPU": ("limits.cpu", "1m"), "MEMORY": ("limits.memory", None),
            "MEMORY_MI": ("limits.memory", "1Mi"), "DISK": ("limits.ephemeral-storage", None)}

    def ref(resource, divisor, container=None):
        return {"resource": resource, **({"divisor": divisor} if divisor else {}),
                **({"containerName": container} if container else {})}
    tool = f"file:{wasm.tool}"
    env = [{"name": k, "valueFrom": {"resourceFieldRef": ref(*v)}} for k, v in refs.items()]
    files = [{"path": k, "resourceFieldRef": ref(*v, "env")} for k, v in refs.items()]
    readers = [{"name": k.lower().replace("_", "-"), "image": tool, "args": ["cat", f"/d/{k}"],
                "volumeMounts": [{"name": "d", "mountPath": "/d"}]} for k in refs]
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sizes"}, "spec": {
        "restartPolicy": "Never", "volumes": [{"name": "d", "downwardAPI": {"items": files}}],
        "containers": [{"name": "env", "image": tool, "args": ["env"], "env": env}, *readers]}},
        node_name="node-1")
    wait_for(lambda: (fake_api.get("pods", "default", "sizes").get("status") or {}).get("phase") == "Succeeded",
             20, what="the pod Succeeded")
    allocatable = fake_api.get("nodes", "node-1")["status"]["allocatable"]
    cores = int(allocatable["cpu"])      # the Node reports whole CPUs, memory and disk in Ki
    memory = int(allocatable["memory"].removesuffix("Ki")) * 1024
    expected = {"CPU": str(cores), "MILLICPU": str(cores * 1000), "MEMORY": str(memory),
                "MEMORY_MI": str(-(-memory // 2**20)),
                "DISK": str(int(allocatable["ephemeral-storage"].removesuffix("Ki")) * 1024)}

    def output(container):      # the content of each CRI log record
        with open(kubelet.container_log_path("default", "sizes", container)) as f:
            return [line.rstrip("\n").split(" ", 3)[3] for line in f]
    assert dict(line.split("=", 1) for line in output("env") if line.split("=")[0] in refs) == expected
    assert {k: "".join(output(k.lower().replace("_", "-"))) for k in refs} == expected

