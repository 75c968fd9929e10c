"""Reliability: kubelet restarts and API outages (what bench/soak.py found), state files on disk,
a full disk, service-account tokens kept fresh."""
import contextlib
import json
import logging
import os
import subprocess
import threading
import time

import pytest

import minikrust
from tests.helpers import unavailable, wait_for
from tests.test_pods import sleeper


def _pod(name, image, policy="Never", **spec):
    return {"metadata": {"name": name},
            "spec": dict(restartPolicy=policy, containers=[{"name": "main", "image": image}], **spec)}


def _phase(fake, name):
    return ((fake.get("pods", "default", name) or {}).get("status") or {}).get("phase")


def _writes_to(fake, name, node="node-1"):
    return [r for r in fake.find_requests(user=node) if r.method != "GET"
            and (r.path.rstrip("/").split("/pods/")[-1].split("/")[0] == name
                 or (isinstance(r.body, dict) and (r.body.get("involvedObject") or {}).get("name") == name))]


# -- restarts: what the soak found ---------------------------------------------------------------

def test_a_status_kept_on_disk_but_never_sent_reaches_the_api_after_a_restart(fake_api, kubelet_factory, module_file):
    """Soak finding: a pod finished while its status could not be sent, then the kubelet was killed;
    the restarted kubelet found the status on disk equal to its own and never sent it."""
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_pod("job", module_file(sleeper(300, 0))), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "job") == "Running", what="Running")
    fake_api.pause(path="/pods/job/status")
    wait_for(lambda: first.pods()[0]["status"]["phase"] == "Succeeded", what="Succeeded on the node")
    first.stop()
    fake_api.stop()             # cuts the held request, as a killed kubelet's connection would be
    wait_for(lambda: fake_api.find_requests("PATCH", "/pods/job/status$"), what="the held request given up")
    fake_api.start()
    assert _phase(fake_api, "job") == "Running"
    kubelet_factory(fake_api, root_dir=first.config.root_dir)
    wait_for(lambda: _phase(fake_api, "job") == "Succeeded", timeout=15, what="Succeeded in the API")


def test_a_pod_deleted_while_its_kubelet_was_down_gets_no_writes_after_the_restart(fake_api, kubelet_factory,
                                                                                  module_file):
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_pod("svc", module_file(sleeper(100, 1)), policy="Always"), node_name="node-1")
    fake_api.create_pod(_pod("kept", module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "svc") == "Running" and _phase(fake_api, "kept") == "Running", what="Running")
    first.stop()
    fake_api.remove_pod("default", "svc")           # gone while the kubelet was away
    fake_api.clear_requests()
    second = kubelet_factory(fake_api, root_dir=first.config.root_dir)
    wait_for(lambda: [p for p in second.pods() if p["metadata"]["name"] == "kept"] and
             not [p for p in second.pods() if p["metadata"]["name"] == "svc"], timeout=15, what="svc pruned")
    wait_for(lambda: fake_api.get("pods", "default", "kept")["status"]["containerStatuses"][0]["restartCount"] >= 1,
             what="kept restarted and reported")
    assert [(r.method, r.path, r.body) for r in _writes_to(fake_api, "svc")] == []
    assert not os.path.exists(os.path.join(first.config.root_dir, "pods", fake_api.get("pods", "default", "kept")
                                           ["metadata"]["uid"], "status.json.corrupt"))


# -- state files ------------------------------------------------------------------------------------

def test_corrupt_or_truncated_state_files_are_reported_and_set_aside_at_start(fake_api, kubelet_factory, module_file,
                                                                            caplog):
    first = kubelet_factory(fake_api)
    for name in ("a", "b", "c"):
        fake_api.create_pod(_pod(name, module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    wait_for(lambda: all(_phase(fake_api, n) == "Running" for n in "abc"), what="Running")
    uids = {n: fake_api.get("pods", "default", n)["metadata"]["uid"] for n in "abc"}
    first.stop()
    pods_dir = os.path.join(first.config.root_dir, "pods")
    damaged = {
        os.path.join(pods_dir, uids["a"], "pod.json"): None,            # truncated halfway
        os.path.join(pods_dir, uids["b"], "status.json"): b"\x00\x00\x00\x00",     # zeroes (a lost write)
        os.path.join(pods_dir, uids["c"], "volumes.json"): b"[1, 2]",     # JSON, but not what was written
    }
    for path, content in list(damaged.items()):
        if content is None:
            with open(path, "rb") as f:
                content = damaged[path] = f.read()[:40]
        with open(path, "wb") as f:
            f.write(content)
    fake_api.stop()             # an offline start: only the disk to go by
    with caplog.at_level(logging.ERROR, logger="minikrust"):
        second = kubelet_factory(fake_api, root_dir=first.config.root_dir)
        wait_for(lambda: {p["metadata"]["name"] for p in second.pods()} == {"b", "c"}, what="b and c run from disk")
    for path, content in damaged.items():
        if os.path.exists(path):        # written anew by the pod that runs
            with open(path) as f:
                assert isinstance(json.load(f), dict)
        with open(path + ".corrupt", "rb") as f:
            assert f.read() == content
    reported = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(reported) == 3 and all(os.path.basename(p) in " ".join(reported) for p in damaged)
    fake_api.start()            # the API still has pod a: it runs again from there
    wait_for(lambda: {p["metadata"]["name"] for p in second.pods()} == {"a", "b", "c"}, timeout=20, what="a back")


def test_a_corrupt_module_index_is_set_aside(tmp_path, caplog):
    store_dir = tmp_path / "modules"
    os.makedirs(store_dir)
    (store_dir / "index.json").write_text('{"refs": {"x": ')
    with caplog.at_level(logging.ERROR, logger="minikrust"):
        store = minikrust.ModuleStore(str(store_dir))
    assert store.lookup("x") is None
    assert (store_dir / "index.json.corrupt").read_text() == '{"refs": {"x": '
    assert any("index.json" in r.getMessage() for r in caplog.records)
    json.dumps(store.modules())     # usable


def test_a_state_file_is_kept_whole_at_once_and_made_durable_by_temp_file_fsync_rename(tmp_path, monkeypatch):
    calls, synced = [], threading.Event()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):      # the disk is slow: an fsync waits until the test lets it finish
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        assert synced.wait(10)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b, **kw: (calls.append(("replace", a, b)), real_replace(a, b, **kw))[1])
    path = tmp_path / "status.json"
    path.write_text('{"phase": "Running"}')
    files = minikrust._StateFiles()
    files.save(str(tmp_path), "status.json", {"phase": "Succeeded"})    # returns without waiting for the disk
    assert path.read_text() == '{"phase": "Running"}'
    assert minikrust._read_saved(str(tmp_path), "status.json") == {"phase": "Succeeded"}   # what a kubelet SIGKILLed now finds
    synced.set()
    assert files.flush(10)
    assert json.loads(path.read_text()) == {"phase": "Succeeded"} and os.listdir(tmp_path) == ["status.json"]
    fsyncs = [c for c in calls if c[0] == "fsync"]
    assert [os.path.basename(c[1]) for c in fsyncs] == ["status.json.new"]
    assert ("replace", "status.json.new", "status.json") in calls
    assert calls.index(fsyncs[0]) < calls.index(("replace", "status.json.new", "status.json"))


# -- a full disk --------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (needs root: CI runs as root, where a failure is an error)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder):
    """Fill the file system of `folder`; returns the filler's path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    with contextlib.suppress(OSError):
        with open(path, "ab") as f:
            while True:
                f.write(b"\0")
                f.flush()
    return path


@pytest.mark.parametrize("backend", ["native", "wasmtime-py"])
def test_a_full_disk_keeps_running_pods_running_and_corrupts_nothing(fake_api, kubelet_factory, module_file,
                                                                    small_disk, backend, monkeypatch):
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", backend)
    kubelet = kubelet_factory(fake_api, root_dir=os.path.join(small_disk, "root"))
    fake_api.create_pod(_pod("ticker", module_file(sleeper(50, 0, repeat=0)), policy="Always"), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "ticker") == "Running", what="Running")
    pod_dir = _pod_dir(kubelet, fake_api, "ticker")
    log_path = os.path.join(_pod_dir(kubelet, fake_api, "ticker"), "logs", "main", "0.log")
    saved = lambda: minikrust._read_saved(pod_dir, "status.json") or {"status": {}}  # noqa: E731
    wait_for(lambda: saved()["status"].get("phase") == "Running", what="the Running status saved")  # by its thread
    filler = _fill(small_disk)
    kept = minikrust._read_saved(pod_dir, "status.json")
    # a new pod: its volume cannot be written, it waits with the reason, then runs once there is room
    fake_api.create_configmap("default", "settings", {"mode": "fast"})
    job = _pod("job", module_file(sleeper(300, 3)), volumes=[{"name": "cfg", "configMap": {"name": "settings"}}])
    job["spec"]["containers"][0]["volumeMounts"] = [{"name": "cfg", "mountPath": "/cfg"}]
    fake_api.create_pod(job, node_name="node-1")
    waiting = wait_for(lambda: fake_api.get("pods", "default", "job")["status"].get("containerStatuses", [{}])[0]
                       .get("state", {}).get("waiting", {}).get("message"), what="job waiting")
    assert "No space left on device" in waiting
    assert _phase(fake_api, "ticker") == "Running"
    assert fake_api.get("pods", "default", "ticker")["status"]["containerStatuses"][0]["restartCount"] == 0
    assert minikrust._read_saved(pod_dir, "status.json") == kept       # the old state, whole
    temps = lambda: [os.path.join(d, f) for d, _, files in os.walk(small_disk) for f in files if ".tmp" in f]
    wait_for(lambda: temps() == [], what="no temp file kept (a write being tried removes its own)")
    size = os.path.getsize(log_path)
    os.unlink(filler)                       # room again: the job runs, the ticker's log grows again
    status = wait_for(lambda: _phase(fake_api, "job") in ("Succeeded", "Failed") and
                      fake_api.get("pods", "default", "job")["status"], timeout=20, what="job finished")
    assert status["phase"] == "Failed" and status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    wait_for(lambda: os.path.getsize(log_path) > size, what="the ticker's log growing again")
    assert _phase(fake_api, "ticker") == "Running"
    fake_api.delete_pod("default", "job")
    wait_for(lambda: fake_api.get("pods", "default", "job") is None, what="job deleted")


# -- service-account tokens -------------------------------------------------------------------------

def _pod_dir(kubelet, fake, name):
    return os.path.join(kubelet.config.root_dir, "pods", fake.get("pods", "default", name)["metadata"]["uid"])


def _token_file(kubelet, name, fake):
    volumes = os.path.join(_pod_dir(kubelet, fake, name), "volumes")
    folder = next((v for v in os.listdir(volumes) if v.startswith("kube-api-access-")), None) \
        if os.path.isdir(volumes) else None
    path = os.path.join(volumes, folder or "-", "token")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    return None


def _claims(token):
    import base64
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_a_token_refused_while_the_service_account_is_missing_is_retried_and_reported(
        fake_api, kubelet_factory, module_file):
    fake_api.create_pod(_pod("early", module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    fake_api.remove("serviceaccounts", "default", "default")      # not created yet by its controller
    kubelet = kubelet_factory(fake_api)
    wait_for(lambda: _phase(fake_api, "early") == "Running", what="Running without its token")
    event = wait_for(lambda: fake_api.events(involved_name="early", reason="FailedMount"), what="FailedMount")[0]
    assert event["type"] == "Warning" and 'serviceaccounts "default" not found' in event["message"]
    assert _token_file(kubelet, "early", fake_api) is None
    fake_api.create({"kind": "ServiceAccount", "apiVersion": "v1", "metadata": {"name": "default", "namespace": "default"}})
    token = wait_for(lambda: _token_file(kubelet, "early", fake_api), timeout=15, what="the token written")
    assert _claims(token)["kubernetes.io"]["pod"]["name"] == "early"
    assert fake_api.count("POST", "/serviceaccounts/default/token$") >= 2


def test_a_token_refused_by_the_node_authorizer_is_retried(fake_api, kubelet_factory, module_file):
    fake_api.fail_next(2, 403, method="POST", path="/token$")
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_pod("bound", module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    wait_for(lambda: _token_file(kubelet, "bound", fake_api), timeout=15, what="the token written after two 403s")
    assert [r.status for r in fake_api.find_requests("POST", "/token$")] == [403, 403, 201]
    assert len(fake_api.events(involved_name="bound", reason="FailedMount")) == 1     # one Event, counted
    assert fake_api.events(involved_name="bound", reason="FailedMount")[0]["count"] == 2


def test_a_token_is_requested_anew_at_80_percent_of_its_lifetime(fake_api, kubelet_factory, module_file):
    fake_api.service_account_max_token_expiration = 5
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_pod("svc", module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    first = wait_for(lambda: _token_file(kubelet, "svc", fake_api), what="the first token")
    issued = [r.time for r in fake_api.find_requests("POST", "/token$") if r.status == 201]
    second = wait_for(lambda: (_token_file(kubelet, "svc", fake_api) or first) != first and _token_file(kubelet, "svc", fake_api),
                      timeout=10, what="the token refreshed")
    again = [r.time for r in fake_api.find_requests("POST", "/token$") if r.status == 201]
    assert 3.0 <= again[1] - issued[0] < 5.0          # 80% of 5 s (4 s after it was asked), before it expires
    assert _claims(second)["exp"] > _claims(first)["exp"]


# -- offline start ------------------------------------------------------------------------------------

def _started(fake, name):
    return sum(e.get("count", 1) for e in fake.events(involved_name=name, reason="Started"))


def test_an_offline_start_runs_the_pods_kept_on_disk_and_converges_once_the_api_returns(
        fake_api, kubelet_factory, module_file):
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_pod("done", module_file(sleeper(10, 0))), node_name="node-1")
    fake_api.create_pod(_pod("svc", module_file(sleeper(100, 0, repeat=0)), policy="Always"), node_name="node-1")
    fake_api.create_pod(_pod("job", module_file(sleeper(1500, 0)), policy="OnFailure"), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "done") == "Succeeded" and _phase(fake_api, "svc") == "Running"
             and _phase(fake_api, "job") == "Running" and _started(fake_api, "job") == 1, what="all reported")
    first.stop()
    fake_api.stop()
    second = kubelet_factory(fake_api, root_dir=first.config.root_dir)     # the API server is unreachable
    pods = lambda: {p["metadata"]["name"]: p["status"] for p in second.pods()}  # noqa: E731
    wait_for(lambda: pods().get("job", {}).get("phase") == "Succeeded", timeout=15, what="job ran offline")
    assert pods()["svc"]["phase"] == "Running" and pods()["svc"]["containerStatuses"][0]["restartCount"] == 1
    assert pods()["done"]["phase"] == "Succeeded"
    fake_api.clear_requests()
    fake_api.start()
    wait_for(lambda: _phase(fake_api, "job") == "Succeeded", timeout=20, what="job's end reported")
    wait_for(lambda: fake_api.get("pods", "default", "svc")["status"]["containerStatuses"][0]["restartCount"] == 1,
             what="svc's restart reported")
    wait_for(lambda: _started(fake_api, "job") == 2 and _started(fake_api, "svc") == 2, what="held Events sent")
    time.sleep(1.0)     # nothing more may come
    assert _started(fake_api, "job") == 2 and _started(fake_api, "svc") == 2 and _started(fake_api, "done") == 1
    assert _writes_to(fake_api, "done") == []           # nothing changed: nothing sent
    patches = [r for r in _writes_to(fake_api, "job") if r.path.endswith("/status")]
    assert len([p for p in patches if (p.body.get("status") or {}).get("phase") == "Succeeded"]) == 1


def test_a_hanging_api_server_delays_a_pod_start_by_5_s_at_most_for_its_token(fake_api, kubelet_factory,
                                                                              module_file):
    kubelet = kubelet_factory(fake_api)
    fake_api.pause(method="POST", path="/token$")       # accepted, never answered
    try:
        fake_api.create_pod(_pod("quick", module_file(sleeper(10, 0, repeat=0)), policy="Always"),
                            node_name="node-1")
        wait_for(lambda: _phase(fake_api, "quick") == "Running", timeout=9, what="started without its token")
    finally:
        fake_api.resume()
    wait_for(lambda: _token_file(kubelet, "quick", fake_api), timeout=10, what="the token, later")


def test_a_hanging_api_server_holds_a_container_restart_5_s_at_most(fake_api, kubelet_factory, module_file):
    """Soak finding: refreshing a restarting container's configMap waited out the client's retries
    (minutes against an API server that never answers) on a pod pool thread, its exit unsaved."""
    kubelet = kubelet_factory(fake_api, backoff_base=0.1)
    fake_api.create_configmap("default", "settings", {"mode": "fast"})
    pod = _pod("again", module_file(sleeper(300, 1)), policy="Always",
               volumes=[{"name": "cfg", "configMap": {"name": "settings"}}])
    fake_api.create_pod(pod, node_name="node-1")
    wait_for(lambda: _phase(fake_api, "again") == "Running", what="Running")
    fake_api.pause(method="GET", path="/configmaps/")
    fake_api.pause(method="PATCH")        # nothing reported meanwhile: the pod's own folder tells
    try:
        pod_dir = _pod_dir(kubelet, fake_api, "again")      # what a kubelet restarted now would find:
        saved = lambda: minikrust._read_saved(pod_dir, "status.json") or {"status": {}}  # noqa: E731
        wait_for(lambda: saved()["status"].get("phase") == "Running", what="the Running status saved")
        counts = lambda: saved()["status"]["containerStatuses"][0]["restartCount"]  # noqa: E731
        before = counts()
        wait_for(lambda: counts() >= before + 2, timeout=14, what="two restarts while the API hangs")
    finally:
        fake_api.resume()


def test_a_finished_pod_deleted_by_its_user_gets_no_final_delete(fake_api, kubelet_factory, module_file):
    """Soak finding: the API server removes a finished pod at once (grace 0: MODIFIED, then DELETED);
    a kubelet acting on the MODIFIED sent a final DELETE that could only get 404. (A finalizer holds
    the pod here, so the kubelet surely sees it deleted with grace 0 before it is gone.)"""
    kubelet = kubelet_factory(fake_api)
    pod = _pod("done", module_file(sleeper(10, 0)))
    pod["metadata"]["finalizers"] = ["example.com/hold"]
    fake_api.create_pod(pod, node_name="node-1")
    wait_for(lambda: _phase(fake_api, "done") == "Succeeded", what="Succeeded")
    fake_api.delete_pod("default", "done")
    assert fake_api.get("pods", "default", "done")["metadata"]["deletionGracePeriodSeconds"] == 0
    wait_for(lambda: kubelet.pods() == [], what="finalized")
    time.sleep(0.5)     # a final DELETE would be on its way
    assert fake_api.find_requests("DELETE", "/pods/", user="node-1") == []
    fake_api.patch("pods", "default", "done", {"metadata": {"finalizers": None}})
    assert fake_api.get("pods", "default", "done") is None


def test_a_final_delete_whose_answer_was_lost_is_not_sent_again(fake_api, kubelet_factory, module_file):
    """Soak finding: a final DELETE the API server applied but whose answer was lost (the connection
    dropped) was sent again and got 404, a write for a pod already gone. The kubelet asks first."""
    kubelet_factory(fake_api)
    fake_api.create_pod(_pod("svc", module_file(sleeper(100, 0, repeat=0))), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "svc") == "Running", what="Running")
    fake_api.lose_answer_next(method="DELETE", path="/pods/svc$")
    fake_api.delete_pod("default", "svc", grace=1)
    deletes = lambda: [r.status for r in _writes_to(fake_api, "svc") if r.method == "DELETE"]
    checks = lambda: [r for r in fake_api.find_requests("GET", "/pods/svc$", user="node-1") if r.status in (403, 404)]
    wait_for(lambda: fake_api.get("pods", "default", "svc") is None, what="svc deleted by the kubelet")
    wait_for(lambda: checks() or len(deletes()) > 1, what="the kubelet's next step after the lost answer")
    assert deletes() == [0] and checks()    # (403: the Node authorizer no longer knows the pod)


def test_a_run_that_may_not_be_repeated_is_on_disk_before_it_starts(fake_api, kubelet_factory, module_file,
                                                                    monkeypatch):
    """Soak finding: a kubelet SIGKILLed right after starting a restartPolicy=Never container (which
    ran to its end meanwhile) had saved it as never started, and ran it again after the restart."""
    seen = []
    real_load_host = minikrust.load_host

    class Module:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def start(self, *args, **kw):
            pod_dirs = [os.path.join(root, d) for root in roots for d in os.listdir(root)]
            for d in pod_dirs:      # what a kubelet restarted now would find
                saved = minikrust._read_saved(d, "status.json")
                seen.append(saved["status"]["containerStatuses"][0]["state"])
            return self.module.start(*args, **kw)

    class Host:
        def __init__(self, host):
            self.host = host

        def __getattr__(self, name):
            return getattr(self.host, name)

        def load(self, *args, **kw):
            return Module(self.host.load(*args, **kw))

    monkeypatch.setattr(minikrust, "load_host", lambda *a, **kw: Host(real_load_host(*a, **kw)))
    kubelet = kubelet_factory(fake_api)
    roots = [os.path.join(kubelet.config.root_dir, "pods")]
    fake_api.create_pod(_pod("once", module_file(sleeper(10, 0))), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "once") == "Succeeded", what="Succeeded")
    assert len(seen) == 1 and "running" in seen[0], seen


def _eventfds():
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):      # the listing's own fd, closed meanwhile
            found += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    return found


def test_a_finished_run_keeps_no_fd_open_once_its_pod_is_gone(fake_api, kubelet_factory, module_file):
    """Soak finding: the pods' loop kept the last run it saw end (and its eventfd) until its next
    event, which an idle kubelet may never get: one more fd after a quiet round."""
    kubelet_factory(fake_api)
    wait_for(lambda: fake_api.get("nodes", "node-1"), what="node registered")
    before = _eventfds()
    fake_api.create_pod(_pod("brief", module_file(sleeper(10, 0))), node_name="node-1")
    wait_for(lambda: _phase(fake_api, "brief") == "Succeeded", what="Succeeded")
    fake_api.delete_pod("default", "brief")
    wait_for(lambda: fake_api.get("pods", "default", "brief") is None, what="deleted")
    wait_for(lambda: _eventfds() <= before, timeout=5, what="the run's eventfd closed")
