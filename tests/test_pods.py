"""Pods: the status computation (pure, with dicts) and pod workers against the fake API server."""
import json
import os
import threading
import time

import pytest
import wasmtime

import minikrust
from minikrust import compute_pod_status, pod_phase, qos_class
from tests.helpers import contract, wait_for


# -- modules ---------------------------------------------------------------------------------

def sleeper(ms, code=0, repeat=1, text="tick"):
    """A module that sleeps `ms` (WASI poll_oneoff), prints `text`, `repeat` times (0: forever), exits `code`."""
    data = (text + "\n").encode()
    return bytes(wasmtime.wat2wasm(f"""(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (data (i32.const 512) "{text}\\n")
  (func (export "_start")
    (block $done (loop $again
      (i32.store8 (i32.const 8) (i32.const 0))
      (i32.store (i32.const 16) (i32.const 1))
      (i64.store (i32.const 24) (i64.const {int(ms * 1_000_000)}))
      (i64.store (i32.const 32) (i64.const 0))
      (i32.store16 (i32.const 40) (i32.const 0))
      (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
      (i32.store (i32.const 300) (i32.const 512)) (i32.store (i32.const 304) (i32.const {len(data)}))
      (drop (call $fd_write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 400)))
      (global.set $n (i32.add (global.get $n) (i32.const 1)))
      (br_if $done (i32.eq (global.get $n) (i32.const {repeat})))
      (br $again)))
    (call $exit (i32.const {code}))))"""))


# -- pure status computation -------------------------------------------------------------------

def _pod(containers=("main",), inits=(), policy="Always", **spec):
    return {"metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": dict(restartPolicy=policy, containers=[{"name": n, "image": "i"} for n in containers],
                         initContainers=[{"name": n, "image": "i"} for n in inits], **spec)}


def _st(name, state, last=None, ready=None):
    kind = next(iter(state))
    return {"name": name, "state": state, "lastState": last or {},
            "ready": kind == "running" if ready is None else ready}


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
WAITING = {"waiting": {"reason": "ContainerCreating"}}


def _term(code):
    return {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}


def test_phase_follows_the_kubelets_rules():
    assert pod_phase(_pod(), [], [_st("main", WAITING)]) == "Pending"
    assert pod_phase(_pod(), [], [_st("main", RUNNING)]) == "Running"
    assert pod_phase(_pod(policy="Never"), [], [_st("main", _term(0))]) == "Succeeded"
    assert pod_phase(_pod(policy="Never"), [], [_st("main", _term(1))]) == "Failed"
    assert pod_phase(_pod(policy="OnFailure"), [], [_st("main", _term(1))]) == "Running"
    assert pod_phase(_pod(policy="Always"), [], [_st("main", _term(0))]) == "Running"
    crash = _st("main", {"waiting": {"reason": "CrashLoopBackOff"}}, last=_term(1))
    assert pod_phase(_pod(policy="OnFailure"), [], [crash]) == "Running"
    two = _pod(("a", "b"), policy="Never")
    assert pod_phase(two, [], [_st("a", _term(0)), _st("b", RUNNING)]) == "Running"
    assert pod_phase(two, [], [_st("a", _term(0)), _st("b", _term(2))]) == "Failed"


def test_phase_is_pending_until_init_containers_succeed_and_failed_on_never():
    pod = _pod(inits=("i1", "i2"), policy="Never")
    apps = [_st("main", {"waiting": {"reason": "PodInitializing"}})]
    assert pod_phase(pod, [_st("i1", _term(0), ready=True), _st("i2", RUNNING)], apps) == "Pending"
    assert pod_phase(pod, [_st("i1", _term(0), ready=True), _st("i2", _term(1))], apps) == "Failed"
    pod["spec"]["restartPolicy"] = "OnFailure"
    assert pod_phase(pod, [_st("i1", _term(0), ready=True), _st("i2", _term(1))], apps) == "Pending"


def test_qos_class():
    pod = _pod()
    assert qos_class(pod) == "BestEffort"
    pod["spec"]["containers"][0]["resources"] = {"limits": {"memory": "64Mi"}}
    assert qos_class(pod) == "Burstable"
    pod["spec"]["containers"][0]["resources"] = {"limits": {"memory": "64Mi", "cpu": "1"}}
    assert qos_class(pod) == "Guaranteed"
    # Kubernetes' ComputePodQOS: quantities compare by value; only cpu and memory above zero count
    pod["spec"]["containers"][0]["resources"] = {"limits": {"memory": "64Mi", "cpu": "1"},
                                                 "requests": {"memory": "67108864", "cpu": "1000m"}}
    assert qos_class(pod) == "Guaranteed"
    pod["spec"]["containers"][0]["resources"] = {"requests": {"ephemeral-storage": "1Gi", "cpu": "0"}}
    assert qos_class(pod) == "BestEffort"


def test_conditions_keep_transition_times_while_unchanged():
    pod = _pod(inits=("init",))
    init = [_st("init", RUNNING, ready=False)]
    apps = [_st("main", {"waiting": {"reason": "PodInitializing"}})]
    first = compute_pod_status(pod, init, apps, host_ip="10.0.0.1", ready_to_start=True,
                               start_time="T0", now="T1")
    conds = {c["type"]: c for c in first["conditions"]}
    kubelets = contract("extended/29-pod-status-running")["status"]["conditions"]   # as a kubelet wrote them
    assert [c["type"] for c in first["conditions"]] == [c["type"] for c in kubelets]
    assert conds["Initialized"]["status"] == "False"
    assert conds["Initialized"]["message"] == "containers with incomplete status: [init]"
    assert first["phase"] == "Pending" and first["hostIPs"] == [{"ip": "10.0.0.1"}]
    assert first["podIP"] == "10.0.0.1" and first["startTime"] == "T0" and first["qosClass"] == "BestEffort"
    init = [_st("init", _term(0), ready=True)]
    apps = [_st("main", RUNNING)]
    second = compute_pod_status(pod, init, apps, host_ip="10.0.0.1", ready_to_start=True,
                                start_time="T0", prev=first, now="T2")
    conds = {c["type"]: c for c in second["conditions"]}
    assert second["phase"] == "Running"
    assert conds["PodReadyToStartContainers"]["lastTransitionTime"] == "T1"     # unchanged
    assert conds["Ready"] == {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "T2"}
    assert conds["PodScheduled"]["lastTransitionTime"] == "T1"


def test_terminal_phase_is_never_left_and_patch_has_only_changes_with_whole_lists():
    pod = _pod(policy="Never")
    done = compute_pod_status(pod, [], [_st("main", _term(0), ready=False)], host_ip="h", ready_to_start=False)
    assert done["phase"] == "Succeeded"
    again = compute_pod_status(pod, [], [_st("main", RUNNING)], host_ip="h", ready_to_start=True, prev=done)
    assert again["phase"] == "Succeeded"
    patch = minikrust.status_patch(done, dict(done, containerStatuses=[_st("main", _term(0), ready=False), ]))
    assert patch is None
    changed = dict(done, message="m")
    assert minikrust.status_patch(done, changed) == {"status": {"message": "m"}}
    assert minikrust.status_patch(changed, done) == {"status": {"message": None}}


# -- pods on a kubelet against the fake API server ---------------------------------------------

def _manifest(name, containers, policy="Never", inits=(), volumes=(), **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": dict(restartPolicy=policy, containers=list(containers), initContainers=list(inits),
                         volumes=list(volumes), terminationGracePeriodSeconds=spec.pop("grace", 1), **spec)}


def _status(fake, name):
    pod = fake.get("pods", "default", name)
    return (pod or {}).get("status") or {}


def _phase(fake, name, phase):
    return lambda: _status(fake, name).get("phase") == phase and _status(fake, name)


def _cstatus(fake, name, container, init=False):
    key = "initContainerStatuses" if init else "containerStatuses"
    return next((c for c in _status(fake, name).get(key) or [] if c["name"] == container), {})


def test_run_to_completion_pod_reports_every_field_with_exactly_five_writes(fake_api, kubelet_factory, module_file):
    image = module_file(sleeper(1000, 0))     # long enough for Running to be written on a busy machine
    kubelet_factory(fake_api)
    wait_for(lambda: fake_api.get("nodes", "node-1"), what="node registered")
    fake_api.create_pod(_manifest("job", [{"name": "main", "image": image}]), node_name="node-1")
    running = wait_for(_phase(fake_api, "job", "Running"), what="Running")
    main = running["containerStatuses"][0]
    assert main["state"]["running"]["startedAt"] and main["ready"] and main["started"]
    assert main["containerID"].startswith("wasm://") and main["imageID"].startswith("file:")
    assert main["image"] == image and main["restartCount"] == 0
    assert {c["type"]: c["status"] for c in running["conditions"]} == {
        "PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True",
        "PodScheduled": "True"}
    assert running["hostIP"] == running["podIP"] == "127.0.0.1" and running["startTime"]
    done = wait_for(_phase(fake_api, "job", "Succeeded"), what="Succeeded")
    term = done["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed" and term["finishedAt"]
    assert done["containerStatuses"][0]["ready"] is False
    ready = {c["type"]: c for c in done["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "PodCompleted"
    wait_for(lambda: len(fake_api.events(involved_name="job")) >= 3, what="events")
    time.sleep(0.5)     # nothing more may come
    def about_job(r):
        body = r.body if isinstance(r.body, dict) else {}
        return "/pods/job" in r.path or (body.get("involvedObject") or {}).get("name") == "job" or (
            "/events/job." in r.path)
    writes = [r for r in fake_api.requests if r.user == "system:node:node-1" and r.method != "GET" and about_job(r)]
    summary = [(r.method, r.path) for r in writes]
    assert summary.count(("PATCH", "/api/v1/namespaces/default/pods/job/status")) == 2, summary
    assert sorted(e["reason"] for e in fake_api.events(involved_name="job")) == ["Created", "Pulled", "Started"]
    assert len(writes) == 5, [(r.method, r.path, r.body.get("reason") if isinstance(r.body, dict) else None) for r in writes]
    patches = [r for r in writes if r.method == "PATCH"]
    assert all(r.content_type.startswith("application/merge-patch+json") for r in patches)


def test_init_containers_run_in_order_then_apps_in_parallel(fake_api, kubelet_factory, wasm):
    tool = f"file:{wasm.tool}"
    mount = [{"name": "data", "mountPath": "/data"}]
    inits = [{"name": "first", "image": tool, "args": ["write", "/data/a", "one"], "volumeMounts": mount},
             {"name": "second", "image": tool, "args": ["cat", "/data/a"], "volumeMounts": mount}]
    apps = [{"name": "a", "image": tool, "args": ["spin"]}, {"name": "b", "image": tool, "args": ["spin"]}]
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("ordered", apps, policy="Never", inits=inits,
                                  volumes=[{"name": "data", "emptyDir": {}}]), node_name="node-1")
    status = wait_for(_phase(fake_api, "ordered", "Running"), what="Running")
    assert all("running" in c["state"] for c in status["containerStatuses"])
    assert [c["state"]["terminated"]["exitCode"] for c in status["initContainerStatuses"]] == [0, 0]
    path = kubelet.container_log_path("default", "ordered", "second")
    assert open(path).read().endswith(" one\n")


def test_on_failure_restarts_with_crash_loop_backoff(fake_api, kubelet_factory, module_file):
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("crash", [{"name": "main", "image": module_file(sleeper(50, 3))}],
                                  policy="OnFailure"), node_name="node-1")
    wait_for(lambda: _cstatus(fake_api, "crash", "main").get("state", {}).get("waiting", {}).get("reason")
             == "CrashLoopBackOff", what="CrashLoopBackOff")
    status = _cstatus(fake_api, "crash", "main")
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["restartCount"] >= 1 and "back-off" in status["state"]["waiting"]["message"]
    assert _status(fake_api, "crash")["phase"] == "Running"
    # 0.2 s doubling: restarts after 0, 0.2, 0.4, 0.8 s... a few, not dozens, in 2 s
    time.sleep(2.0)
    count = _cstatus(fake_api, "crash", "main")["restartCount"]
    assert 3 <= count <= 7
    wait_for(lambda: any(e["reason"] == "BackOff" and e.get("count", 1) >= 2
                         for e in fake_api.events(involved_name="crash")), what="BackOff event with a count")
    path = kubelet.container_log_path("default", "crash", "main", previous=True)
    assert path and path.endswith(f"{kubelet.pods()[0]['status']['containerStatuses'][0]['restartCount'] - 1}.log")


@pytest.mark.parametrize("policy,code,phase", [("Never", 3, "Failed"), ("OnFailure", 0, "Succeeded"),
                                               ("Never", 0, "Succeeded")])
def test_restart_policy_decides_the_terminal_phase(fake_api, kubelet_factory, module_file, policy, code, phase):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("p", [{"name": "main", "image": module_file(sleeper(10, code))}],
                                  policy=policy), node_name="node-1")
    status = wait_for(_phase(fake_api, "p", phase), what=phase)
    assert status["containerStatuses"][0]["restartCount"] == 0
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == code
    # a finished pod keeps no thread, and is still finalized when deleted
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "pod-default/p"], what="idle thread gone")
    fake_api.delete_pod("default", "p")
    wait_for(lambda: fake_api.get("pods", "default", "p") is None, timeout=3, what="finished pod deleted")


def test_always_restarts_even_after_success(fake_api, kubelet_factory, module_file):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("svc", [{"name": "main", "image": module_file(sleeper(10, 0))}],
                                  policy="Always"), node_name="node-1")
    wait_for(lambda: _cstatus(fake_api, "svc", "main").get("restartCount", 0) >= 2, what="restarts")
    assert _status(fake_api, "svc")["phase"] == "Running"


def test_deleted_pod_in_infinite_loop_is_finalised_within_grace(fake_api, kubelet_factory, wasm, module_file):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("loop", [{"name": "main", "image": module_file(wasm.loop)}],
                                  policy="Always", grace=1), node_name="node-1")
    wait_for(_phase(fake_api, "loop", "Running"), what="Running")
    uid = fake_api.get("pods", "default", "loop")["metadata"]["uid"]
    started = time.monotonic()
    fake_api.delete_pod("default", "loop")
    wait_for(lambda: fake_api.get("pods", "default", "loop") is None, timeout=5, what="pod gone")
    took = time.monotonic() - started
    assert took < 2.0, f"pod gone {took:.2f}s after its delete (grace 1 s)"
    def node_deletes():     # the fake logs a request as it answers it: just after the pod is gone
        return [r for r in fake_api.requests if r.method == "DELETE" and r.user == "system:node:node-1"]
    final = wait_for(node_deletes, what="the kubelet's final DELETE")
    assert len(final) == 1 and final[0].body["gracePeriodSeconds"] == 0
    assert final[0].body["preconditions"] == {"uid": uid}
    assert any(e["reason"] == "Killing" for e in fake_api.events(involved_name="loop"))


def test_missing_configmap_waits_then_runs_once_created(fake_api, kubelet_factory, wasm):
    tool = f"file:{wasm.tool}"
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("cfg", [{"name": "main", "image": tool, "args": ["cat", "/cfg/greeting"],
                                           "volumeMounts": [{"name": "c", "mountPath": "/cfg"}]}],
                                  volumes=[{"name": "c", "configMap": {"name": "settings"}}]), node_name="node-1")
    wait_for(lambda: _cstatus(fake_api, "cfg", "main").get("state", {}).get("waiting", {}).get("reason")
             == "CreateContainerConfigError", what="CreateContainerConfigError")
    assert "settings" in _cstatus(fake_api, "cfg", "main")["state"]["waiting"]["message"]
    assert _status(fake_api, "cfg")["phase"] == "Pending"
    fake_api.create_pod(_manifest("sec", [{"name": "main", "image": tool, "args": ["env"], "env": [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}]}]),
        node_name="node-1")
    wait_for(lambda: _cstatus(fake_api, "sec", "main").get("state", {}).get("waiting", {}).get("reason")
             == "CreateContainerConfigError", what="secret missing")
    fake_api.create_configmap("default", "settings", {"greeting": "hi there"})
    fake_api.create_secret("default", "creds", {"password": "s3cret"})
    wait_for(_phase(fake_api, "cfg", "Succeeded"), timeout=10, what="Succeeded")
    wait_for(_phase(fake_api, "sec", "Succeeded"), timeout=10, what="Succeeded with the secret")
    assert "s3cret" not in json.dumps(_status(fake_api, "sec"))


def test_unrunnable_pods_fail_clearly_while_others_run(fake_api, kubelet_factory, module_file, tmp_path):
    kubelet_factory(fake_api)
    good = module_file(sleeper(10, 0))
    bad_wasm = module_file(b"\0asm\x01\0\0\0garbage")
    fake_api.create_pod(_manifest("novol", [{"name": "main", "image": good}],
                                  volumes=[{"name": "x", "flocker": {"datasetName": "d"}}]), node_name="node-1")
    fake_api.create_pod(_manifest("noimage", [{"name": "main", "image": f"file:{tmp_path}/missing.wasm"}]),
                        node_name="node-1")
    fake_api.create_pod(_manifest("badwasm", [{"name": "main", "image": bad_wasm}]), node_name="node-1")
    fake_api.create_pod(_manifest("hostpath", [{"name": "main", "image": good}],
                                  volumes=[{"name": "h", "hostPath": {"path": "/etc"}}]), node_name="node-1")
    fake_api.create_pod(_manifest("good", [{"name": "main", "image": good}]), node_name="node-1")
    wait_for(_phase(fake_api, "good", "Succeeded"), what="the healthy pod")
    novol = wait_for(_phase(fake_api, "novol", "Failed"), what="novol Failed")
    assert novol["reason"] == "CreateContainerConfigError" and "flocker" in novol["message"]
    waiting = wait_for(lambda: _cstatus(fake_api, "noimage", "main").get("state", {}).get("waiting"), what="waiting")
    assert waiting["reason"] in ("ErrImagePull", "ImagePullBackOff") and "missing.wasm" in waiting["message"]
    refused = wait_for(_phase(fake_api, "hostpath", "Failed"), what="hostPath refused")
    assert refused["reason"] == "CreateContainerConfigError" and "/etc" in refused["message"]
    bad = wait_for(_phase(fake_api, "badwasm", "Failed"), what="badwasm Failed")
    term = bad["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "StartError" and term["message"]
    node = fake_api.get("nodes", "node-1")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"


def test_active_deadline_fails_the_pod(fake_api, kubelet_factory, wasm, module_file):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("late", [{"name": "main", "image": module_file(wasm.loop)}],
                                  activeDeadlineSeconds=1), node_name="node-1")
    status = wait_for(_phase(fake_api, "late", "Failed"), timeout=8, what="DeadlineExceeded")
    assert status["reason"] == "DeadlineExceeded"
    assert "terminated" in status["containerStatuses"][0]["state"]


def test_pods_over_max_pods_are_rejected_out_of_pods(fake_api, kubelet_factory, wasm, module_file):
    kubelet_factory(fake_api, max_pods=1)
    image = module_file(wasm.loop)
    fake_api.create_pod(_manifest("one", [{"name": "main", "image": image}]), node_name="node-1")
    wait_for(_phase(fake_api, "one", "Running"), what="first pod")
    fake_api.create_pod(_manifest("two", [{"name": "main", "image": image}]), node_name="node-1")
    status = wait_for(_phase(fake_api, "two", "Failed"), what="OutOfpods")
    assert status["reason"] == "OutOfpods" and "pods" in status["message"]


def test_termination_message_from_file_and_from_logs(fake_api, kubelet_factory, wasm):
    tool = f"file:{wasm.tool}"
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("msg", [
        {"name": "file", "image": tool, "args": ["write", "/msg/termination-log", "all good"],
         "terminationMessagePath": "/msg/termination-log", "volumeMounts": [{"name": "m", "mountPath": "/msg"}]},
        {"name": "logs", "image": tool, "args": ["cat", "/nope"], "terminationMessagePolicy": "FallbackToLogsOnError"}],
        volumes=[{"name": "m", "emptyDir": {}}]), node_name="node-1")
    wait_for(_phase(fake_api, "msg", "Failed"), what="Failed")
    assert _cstatus(fake_api, "msg", "file")["state"]["terminated"]["message"] == "all good"
    assert "open /nope" in _cstatus(fake_api, "msg", "logs")["state"]["terminated"]["message"]


def test_memory_limit_is_enforced_as_oom_killed(fake_api, kubelet_factory, wasm, module_file):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("oom", [{"name": "main", "image": module_file(wasm.grow),
                                           "resources": {"limits": {"memory": "1Mi"}}}]), node_name="node-1")
    status = wait_for(_phase(fake_api, "oom", "Failed"), what="Failed")
    assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    assert status["qosClass"] == "Burstable"


def test_kubelet_restart_mid_run_loses_nothing(fake_api, kubelet_factory, wasm, module_file):
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("done", [{"name": "main", "image": module_file(sleeper(10, 0))}]),
                        node_name="node-1")
    fake_api.create_pod(_manifest("svc", [{"name": "main", "image": module_file(wasm.loop)}], policy="Always"),
                        node_name="node-1")
    wait_for(_phase(fake_api, "done", "Succeeded"), what="done")
    wait_for(_phase(fake_api, "svc", "Running"), what="svc Running")
    first.stop()
    starts = len([e for e in fake_api.events(involved_name="done") if e["reason"] == "Started"])
    second = kubelet_factory(fake_api, root_dir=first.config.root_dir)
    wait_for(lambda: _cstatus(fake_api, "svc", "main").get("restartCount") == 1
             and "running" in _cstatus(fake_api, "svc", "main")["state"], what="svc restarted once")
    last = _cstatus(fake_api, "svc", "main")["lastState"]["terminated"]
    assert last["reason"] == "ContainerStatusUnknown"
    time.sleep(0.5)
    assert _status(fake_api, "done")["phase"] == "Succeeded"
    assert len([e for e in fake_api.events(involved_name="done") if e["reason"] == "Started"]) == starts
    assert {p["metadata"]["name"] for p in second.pods()} == {"done", "svc"}


def test_api_unreachable_never_stops_pods_and_statuses_arrive_later(fake_api, kubelet_factory, module_file):
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("job", [{"name": "main", "image": module_file(sleeper(600, 0))}]),
                        node_name="node-1")
    wait_for(_phase(fake_api, "job", "Running"), what="Running")
    fake_api.pause(path="/pods/job/status")
    wait_for(lambda: kubelet.pods()[0]["status"]["phase"] == "Succeeded", what="local Succeeded")
    assert _status(fake_api, "job")["phase"] == "Running"
    fake_api.resume()
    wait_for(_phase(fake_api, "job", "Succeeded"), timeout=15, what="Succeeded after resume")


def test_kubelet_restarted_while_api_is_down_runs_its_pods_from_disk(fake_api, kubelet_factory, wasm, module_file):
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("svc", [{"name": "main", "image": module_file(wasm.loop)}], policy="Always"),
                        node_name="node-1")
    wait_for(_phase(fake_api, "svc", "Running"), what="svc Running")
    first.stop()
    fake_api.stop()
    second = kubelet_factory(fake_api, root_dir=first.config.root_dir)
    wait_for(lambda: [c for p in second.pods() for c in p["status"].get("containerStatuses", [])
                      if c["restartCount"] == 1 and "running" in c["state"]], timeout=10, what="running from disk")
    fake_api.start()
    wait_for(lambda: _cstatus(fake_api, "svc", "main").get("restartCount") == 1, timeout=20, what="status sent later")
    assert "running" in _cstatus(fake_api, "svc", "main")["state"]


def test_status_while_initializing_shows_pod_initializing(fake_api, kubelet_factory, module_file):
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("init", [{"name": "app", "image": module_file(sleeper(10, 0))}],
                                  inits=[{"name": "slow", "image": module_file(sleeper(1500, 0))}]),
                        node_name="node-1")
    pending = wait_for(lambda: "running" in _cstatus(fake_api, "init", "slow", init=True).get("state", {})
                       and _status(fake_api, "init"), what="init running")
    assert pending["phase"] == "Pending"
    conds = {c["type"]: c for c in pending["conditions"]}
    assert conds["Initialized"]["status"] == "False" and conds["Initialized"]["reason"] == "ContainersNotInitialized"
    assert conds["PodReadyToStartContainers"]["status"] == "True"
    app = pending["containerStatuses"][0]
    assert app["state"] == {"waiting": {"reason": "PodInitializing"}} and app["ready"] is False
    assert pending["initContainerStatuses"][0]["started"] is True
    done = wait_for(_phase(fake_api, "init", "Succeeded"), what="Succeeded")
    assert done["initContainerStatuses"][0]["ready"] is True and done["initContainerStatuses"][0]["started"] is False
    stats = {s["container"]: s for s in kubelet.container_stats()}
    assert set(stats) == {"slow", "app"} and stats["app"]["peak_memory_bytes"] > 0   # a finished run uses none now


def test_pod_deleted_while_the_kubelet_was_down_is_cleaned_up(fake_api, kubelet_factory, wasm, module_file):
    first = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("old", [{"name": "main", "image": module_file(wasm.loop)}], policy="Always",
                                  volumes=[{"name": "scratch", "emptyDir": {}}]), node_name="node-1")
    wait_for(_phase(fake_api, "old", "Running"), what="Running")
    uid = fake_api.get("pods", "default", "old")["metadata"]["uid"]
    first.stop()
    fake_api.remove_pod("default", "old")
    second = kubelet_factory(fake_api, root_dir=first.config.root_dir)
    pod_dir = os.path.join(first.config.root_dir, "pods", uid)
    wait_for(lambda: not second.pods() and not os.path.exists(pod_dir), timeout=10, what="pod forgotten and removed")
    assert fake_api.count(method="POST", path="/pods$", user="system:node:node-1") == 0


def test_a_module_that_cannot_start_is_retried_with_backoff_under_on_failure(fake_api, kubelet_factory, module_file):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("nostart", [{"name": "main", "image": module_file(b"\0asm\x01\0\0\0junk")}],
                                  policy="OnFailure"), node_name="node-1")
    status = wait_for(lambda: _cstatus(fake_api, "nostart", "main").get("restartCount", 0) >= 2
                      and _cstatus(fake_api, "nostart", "main"), what="restarts")
    last = status["lastState"].get("terminated") or status["state"].get("terminated")
    assert last["reason"] == "StartError" and last["exitCode"] == 128


# -- the pod workers' life: finalized once, few threads, prompt deletion -------------------------

def _node_writes(fake, name):
    """The node's writes (not GETs, not Events) naming pod `name`."""
    return [(r.method, r.path) for r in fake.requests if r.user == "system:node:node-1" and r.method != "GET"
            and (r.path.endswith(f"/pods/{name}") or f"/pods/{name}/" in r.path)]


def test_a_finalized_pod_is_not_revived_by_a_late_event(fake_api, kubelet_factory, module_file):
    """Deletion churn: an event for a pod the kubelet already finalized (a late MODIFIED, a re-list)
    neither admits it again nor finalizes it again; no second DELETE, no write at all."""
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("churn", [{"name": "main", "image": module_file(sleeper(60000))}]),
                        node_name="node-1")
    wait_for(_phase(fake_api, "churn", "Running"), what="Running")
    fake_api.delete_pod("default", "churn")
    stale = fake_api.get("pods", "default", "churn")     # as the watch sent it: deletionTimestamp set
    assert stale["metadata"]["deletionTimestamp"]
    final = ("DELETE", "/api/v1/namespaces/default/pods/churn")
    wait_for(lambda: final in _node_writes(fake_api, "churn"), what="the final delete")
    wait_for(lambda: fake_api.get("pods", "default", "churn") is None and not kubelet.pods(), what="pod gone")
    writes = _node_writes(fake_api, "churn")
    assert writes.count(final) == 1, writes
    for replay in (kubelet.handler.pod_updated, kubelet.handler.pod_added, kubelet.handler.pod_deleted):
        replay(json.loads(json.dumps(stale)))
    time.sleep(0.5)     # nothing may come
    assert not kubelet.pods()
    assert _node_writes(fake_api, "churn") == writes


def _threads_and_runs(kubelet, baseline, server_baseline):
    """(threads the kubelet added to this process, modules it runs), the fake's handlers left out."""
    threads = len(os.listdir("/proc/self/task")) - baseline
    threads -= sum(1 for t in threading.enumerate() if "process_request" in t.name) - server_baseline
    return threads, sum(1 for s in kubelet.container_stats() if s["running"])


def test_threads_stay_within_running_modules_plus_16(fake_api, kubelet_factory, module_file):
    baseline = len(os.listdir("/proc/self/task"))
    server_baseline = sum(1 for t in threading.enumerate() if "process_request" in t.name)
    kubelet = kubelet_factory(fake_api)
    image = module_file(sleeper(60000))
    for i in range(50):
        fake_api.create_pod(_manifest(f"long-{i}", [{"name": "main", "image": image}]), node_name="node-1")
    seen = []

    def all_running():
        seen.append(_threads_and_runs(kubelet, baseline, server_baseline))
        return seen[-1][1] == 50 and sum(1 for p in kubelet.pods() if p["status"].get("phase") == "Running") == 50
    wait_for(all_running, timeout=60, what="50 pods running")
    seen.append(_threads_and_runs(kubelet, baseline, server_baseline))
    assert seen[-1][1] == 50 and all(threads <= runs + 16 for threads, runs in seen), seen


def test_deleting_200_running_pods_is_prompt(fake_api, kubelet_factory, module_file):
    kubelet = kubelet_factory(fake_api, max_pods=250)
    image = module_file(sleeper(60000))
    names = [f"many-{i}" for i in range(200)]
    for name in names:
        fake_api.create_pod(_manifest(name, [{"name": "main", "image": image}], grace=1), node_name="node-1")
    wait_for(lambda: all(_status(fake_api, n).get("phase") == "Running" for n in names), timeout=120,
             interval=0.2, what="200 pods running")
    started = time.monotonic()
    for name in names:
        fake_api.delete_pod("default", name, grace=1)
    wait_for(lambda: not any(fake_api.get("pods", "default", n) for n in names), timeout=20, interval=0.1,
             what="200 pods gone")
    took = time.monotonic() - started
    print(f"200 running pods deleted (grace 1 s): all gone from the API in {took:.2f} s")
    assert not kubelet.pods()
    deletes = [r for r in fake_api.requests if r.method == "DELETE" and r.user == "system:node:node-1"]
    assert len(deletes) == 200


def test_env_from_keys_that_are_not_names_give_the_pod_a_warning_event(fake_api, kubelet_factory, module_file, wasm):
    # the kubelet skips such keys and says so in a Warning Event on the pod (InvalidEnvironmentVariableNames)
    fake_api.create_configmap("default", "cfg", {"GOOD": "1", "1bad": "x"})
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("envy", [{"name": "main", "image": module_file(wasm.hello),
                                            "envFrom": [{"configMapRef": {"name": "cfg"}}]}]), node_name="node-1")
    wait_for(_phase(fake_api, "envy", "Succeeded"), what="Succeeded")
    event = wait_for(lambda: fake_api.events(involved_name="envy", reason="InvalidEnvironmentVariableNames"),
                     what="the Warning Event")[0]
    assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "Pod"
    assert event["message"] == ("Keys [1bad] from the EnvFrom configmap default/cfg were skipped since they "
                                "are considered invalid environment variable names.")
