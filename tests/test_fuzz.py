"""Fuzzing with hypothesis (fixed seed: derandomize=True; a few seconds each): pod specs, as
manifests and as API pods, with missing, wrongly typed and huge fields; module bytes that are
garbage, truncated, enormous, import unknown functions or carry huge data segments. The kubelet
keeps running, a bad pod gets a reason, a message and an Event, nothing is written outside the
root dir and the pod's volumes, and no worker dies of an internal error."""
import copy
import logging
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minikrust
from tests.helpers import wait_for
from tests.test_security import kubelet_backend  # noqa: F401  (a fixture)
from tests.wasm_modules import wat

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

HUGE = "x" * 100_000
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats()
    | st.text(max_size=12) | st.sampled_from([HUGE, "../../etc", "/", "", "a" * 300, "64Mi", "-1", "1e400"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

# Where a mutation lands: every field the kubelet reads on its way to running a container.
FIELDS = [
    ("metadata", "labels"), ("metadata", "annotations"), ("spec",), ("spec", "containers"),
    ("spec", "containers", 0), ("spec", "containers", 0, "name"), ("spec", "containers", 0, "image"),
    ("spec", "containers", 0, "args"), ("spec", "containers", 0, "command"), ("spec", "containers", 0, "env"),
    ("spec", "containers", 0, "env", 0), ("spec", "containers", 0, "env", 0, "value"),
    ("spec", "containers", 0, "env", 0, "valueFrom"), ("spec", "containers", 0, "volumeMounts"),
    ("spec", "containers", 0, "volumeMounts", 0), ("spec", "containers", 0, "volumeMounts", 0, "mountPath"),
    ("spec", "containers", 0, "volumeMounts", 0, "subPath"), ("spec", "containers", 0, "resources"),
    ("spec", "containers", 0, "resources", "limits"), ("spec", "containers", 0, "resources", "limits", "memory"),
    ("spec", "containers", 0, "workingDir"), ("spec", "containers", 0, "terminationMessagePath"),
    ("spec", "containers", 0, "terminationMessagePolicy"), ("spec", "containers", 0, "imagePullPolicy"),
    ("spec", "volumes"), ("spec", "volumes", 0), ("spec", "volumes", 0, "emptyDir"),
    ("spec", "volumes", 0, "name"), ("spec", "restartPolicy"), ("spec", "activeDeadlineSeconds"),
    ("spec", "terminationGracePeriodSeconds"), ("spec", "initContainers"), ("spec", "imagePullSecrets"),
    ("spec", "hostNetwork"), ("spec", "nodeName"),
]


def base_pod(image):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fz", "labels": {"app": "fz"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                     "volumes": [{"name": "d", "emptyDir": {}}],
                     "containers": [{"name": "main", "image": image, "args": ["hello"],
                                     "env": [{"name": "A", "value": "1"}],
                                     "volumeMounts": [{"name": "d", "mountPath": "/d"}],
                                     "resources": {"limits": {"memory": "64Mi"}}}]}}


@st.composite
def mutated_pods(draw, image):
    pod = base_pod(image)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELDS))
        holder = pod
        for key in path[:-1]:
            holder = holder[key] if isinstance(holder, dict) and key in holder or (
                isinstance(holder, list) and isinstance(key, int) and key < len(holder)) else None
            if not isinstance(holder, (dict, list)):
                break
        else:
            last = path[-1]
            if draw(st.booleans()) and isinstance(holder, dict):
                holder.pop(last, None)
            elif isinstance(holder, dict) or (isinstance(holder, list) and isinstance(last, int) and last < len(holder)):
                holder[last] = draw(JUNK)
    return pod


def tree(folder, skip):
    """Every path under `folder` except under `skip`, with its size: what a test compares."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != skip]
        for name in dirs + files:
            path = os.path.join(root, name)
            found[path] = os.lstat(path).st_size if name in files else None
    return found


@pytest.fixture
def crashes(caplog):
    """Log records of exceptions the kubelet caught from a bug (an internal error)."""
    caplog.set_level(logging.INFO, logger="minikrust")
    return lambda: [r.getMessage() for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]


def test_fuzzed_manifests_are_refused_in_one_line_or_run_and_never_crash(tmp_path, wasm):
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "m.wasm").write_bytes(wasm.hello)
    seen = []

    @settings(FUZZ, max_examples=50)
    @given(mutated_pods("file:m.wasm"))
    def check(pod):
        path = folder / "pod.yaml"
        path.write_text(yaml.safe_dump(pod))
        try:
            pods = minikrust.static_pods_from_manifest(str(path), "n1")
        except minikrust.ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: document 1: ") and "\n" not in message
            assert len(message) < 1000
            seen.append("refused")
            return
        assert len(pods) == 1 and minikrust.pod_problem(pods[0]) is None
        seen.append("accepted")

    check()
    assert "refused" in seen and "accepted" in seen       # the fuzzer reached both sides


def test_fuzzed_api_pods_fail_with_reason_and_event_and_the_kubelet_runs_on(
        fake_api, kubelet_factory, module_file, wasm, tmp_path, crashes):
    image = module_file(wasm.hello)
    kubelet = kubelet_factory(fake_api)
    manager = kubelet.pod_manager
    before = tree(str(tmp_path), kubelet.config.root_dir)
    sent = []

    @settings(FUZZ, max_examples=60)
    @given(mutated_pods(image))
    def feed(pod):
        pod = copy.deepcopy(pod)
        index = len(sent)
        meta = pod.setdefault("metadata", {}) if isinstance(pod.get("metadata"), dict) else pod["metadata"]
        meta.update(name=f"fz-{index}", namespace="default", uid=f"00000000-0000-0000-0000-{index:012d}")
        sent.append(pod)
        manager.pod_added(pod)           # as the API source delivers it; a bug here raises

    feed()
    assert not crashes(), crashes()

    def settled(pod):
        worker = manager.workers.get(pod["metadata"]["uid"])
        status = (worker.status or {}) if worker else {}
        waiting = [c["state"]["waiting"] for c in status.get("containerStatuses") or [] if "waiting" in c["state"]
                   and c["state"]["waiting"].get("message")]
        return status.get("phase") in ("Succeeded", "Failed", "Running") or waiting
    for pod in sent:
        wait_for(lambda: settled(pod), timeout=30, what=f"pod {pod['metadata']['name']} settled")
    invalid = [p for p in sent if minikrust.pod_problem(p)]
    assert invalid and len(invalid) < len(sent)
    for pod in invalid:
        status = manager.workers[pod["metadata"]["uid"]].status
        assert status["phase"] == "Failed" and status["reason"] == "Invalid" and status["message"], status
        wait_for(lambda: fake_api.events(involved_name=pod["metadata"]["name"], reason="Invalid"),
                 what="an Invalid event")
    assert not crashes(), crashes()
    assert not any("InternalError" in str(w.status) for w in manager.workers.values())
    fake_api.create_pod({"metadata": {"name": "after"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": image}]}}, node_name="node-1")
    wait_for(lambda: (fake_api.get("pods", "default", "after").get("status") or {}).get("phase") == "Succeeded",
             what="a good pod still runs")
    after = tree(str(tmp_path), kubelet.config.root_dir)
    assert {p for p in after if p not in before and "kubeconfig" not in p} == set()


# --- Module bytes ---

def _modules():
    hello = wat("""(module (import "wasi_snapshot_preview1" "proc_exit" (func $e (param i32)))
                   (memory (export "memory") 1) (func (export "_start") (call $e (i32.const 0))))""")
    return hello, {
        "unknown-import": wat("""(module (import "wasi_snapshot_preview1" "no_such_call" (func $f))
                                 (import "env" "mystery" (func $g)) (memory (export "memory") 1)
                                 (func (export "_start") (call $f) (call $g)))"""),
        "data-out-of-bounds": wat("""(module (memory (export "memory") 1) (data (i32.const 65530) "0123456789ABCDEF0123456789")
                                     (func (export "_start")))"""),
        "huge-data-segment": wat(f"""(module (memory (export "memory") 100) (data (i32.const 0) "{'ab' * (8 << 20)}")
                                     (func (export "_start")))"""),
        "huge-memory": wat("""(module (memory (export "memory") 65536) (func (export "_start")))"""),
        "no-start": wat("(module (memory (export \"memory\") 1))"),
    }


@pytest.fixture(scope="module")
def modules():
    return _modules()


@st.composite
def bad_bytes(draw, hello):
    kind = draw(st.sampled_from(["garbage", "truncated", "flipped", "magic+garbage", "enormous"]))
    if kind == "garbage":
        return draw(st.binary(max_size=4096))
    if kind == "truncated":
        return hello[:draw(st.integers(0, len(hello) - 1))]
    if kind == "flipped":
        data = bytearray(hello)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(8, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "magic+garbage":
        return b"\0asm\x01\0\0\0" + draw(st.binary(max_size=512))
    return b"\0asm\x01\0\0\0" + bytes([draw(st.integers(0, 255))]) * (32 << 20)      # 32 MiB


def test_fuzzed_module_bytes_load_or_fail_cleanly_on_both_backends(backend, modules, tmp_path):
    hello, _ = modules
    results = []

    @settings(FUZZ, max_examples=40)
    @given(bad_bytes(hello))
    def check(data):
        try:
            with minikrust.module_errors():
                module = backend.load(data)
                result = module.run(["m"], stdout=str(tmp_path / "o.log"), stderr=str(tmp_path / "o.log"),
                                    deadline=5, memory_limit=64 << 20)
        except minikrust.ModuleError as exc:
            assert str(exc)
            results.append("refused")
            return
        results.append("ran" if result.exit_code is not None else "trapped")

    check()
    assert "refused" in results


@pytest.mark.parametrize("name", ["unknown-import", "data-out-of-bounds", "huge-data-segment", "huge-memory",
                                  "no-start", "garbage", "truncated"])
def test_bad_modules_in_pods_get_reason_message_and_event(fake_api, kubelet_factory, module_file, modules,
                                                          kubelet_backend, name):
    hello, named = modules
    data = named.get(name) or {"garbage": os.urandom(1000), "truncated": hello[:20]}[name]
    kubelet_factory(fake_api)
    pod = {"metadata": {"name": "bad"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": module_file(data), "resources": {"limits": {"memory": "64Mi"}}}]}}
    fake_api.create_pod(pod, node_name="node-1")

    def ended():
        status = fake_api.get("pods", "default", "bad").get("status") or {}
        main = (status.get("containerStatuses") or [{}])[0].get("state", {})
        return status.get("phase") == "Failed" and main.get("terminated")
    try:
        term = wait_for(ended, timeout=30, what="bad module's pod Failed")
    except AssertionError:
        raise AssertionError(fake_api.get("pods", "default", "bad").get("status")) from None
    assert term["reason"] and term.get("message"), term
    wait_for(lambda: [e for e in fake_api.events(involved_name="bad") if e["type"] == "Warning"], what="a Warning")
    fake_api.create_pod({"metadata": {"name": "good"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": module_file(hello)}]}}, node_name="node-1")
    wait_for(lambda: (fake_api.get("pods", "default", "good").get("status") or {}).get("phase") == "Succeeded",
             what="the kubelet runs on")
