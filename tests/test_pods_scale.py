"""Status writes at scale: many pods at once, the writes each costs, and the pod uid on every patch."""
import collections
import json
import threading

from tests.helpers import contract_dir, wait_for
from tests.test_pods import _manifest, _status, sleeper

NODE_USER = "system:node:node-1"


def _writes_by_pod(fake, uids):
    """{pod name: [(method, what)]} of the node's writes about each pod (status, events, deletes)."""
    names = {uid: name for name, uid in uids.items()}
    out = collections.defaultdict(list)
    for r in fake.requests:
        if r.user != NODE_USER or r.method == "GET":
            continue
        body = r.body if isinstance(r.body, dict) else {}
        if r.path.endswith("/status") and "/pods/" in r.path:
            out[r.path.split("/")[-2]].append((r.method, "status", r.status, body))
        elif body.get("involvedObject", {}).get("uid") in names:
            out[names[body["involvedObject"]["uid"]]].append((r.method, "event", r.status, body))
    return out


def test_200_pods_at_once_all_succeed_with_at_most_five_writes_each(fake_api, kubelet_factory, module_file, wasm):
    image = module_file(wasm.hello)
    kubelet_factory(fake_api, max_pods=250)        # all 200 may be admitted before the first ends
    wait_for(lambda: fake_api.get("nodes", "node-1"), what="node registered")
    uids = {}
    for i in range(200):
        pod = fake_api.create_pod(_manifest(f"hello-{i}", [{"name": "main", "image": image}]), node_name="node-1")
        uids[pod["metadata"]["name"]] = pod["metadata"]["uid"]
    # about 15 s on 2 idle cores; the deadline allows for a machine shared with other work
    wait_for(lambda: all(_status(fake_api, name).get("phase") == "Succeeded" for name in uids), timeout=180,
             interval=0.5, what="200 pods Succeeded")
    wait_for(lambda: len(fake_api.events(reason="Started")) >= 200, timeout=30, what="every Started event")
    writes = _writes_by_pod(fake_api, uids)
    assert set(writes) == set(uids)
    for name, done in writes.items():
        assert len(done) <= 5, (name, [(m, w, s) for m, w, s, _ in done])
        patches = [body for m, what, s, body in done if what == "status"]
        assert 1 <= len(patches) <= 2, (name, patches)
        assert all(body["metadata"]["uid"] == uids[name] for body in patches), name     # the status manager's uid
        assert all(s < 300 for _m, _w, s, _b in done), (name, done)
    assert sum(map(len, writes.values())) <= 5 * 200


def test_a_status_for_a_pod_deleted_and_made_again_does_not_land_on_the_new_pod(fake_api, kubelet_factory,
                                                                                 module_file):
    kubelet = kubelet_factory(fake_api)
    sending, patch = threading.Event(), kubelet.api.patch

    def watched(path, body, **kw):
        if path.endswith("/pods/p/status"):
            sending.set()
        return patch(path, body, **kw)
    kubelet.api.patch = watched
    fake_api.pause(method="PATCH", path="/pods/p/status")          # the first status patch is held in flight
    first = fake_api.create_pod(_manifest("p", [{"name": "main", "image": module_file(sleeper(50, 3))}]),
                                node_name="node-1")["metadata"]["uid"]
    assert sending.wait(10)
    fake_api.remove_pod("default", "p")
    second = fake_api.create_pod(_manifest("p", [{"name": "main", "image": module_file(sleeper(60_000, 0))}],
                                           policy="Always"), node_name="node-1")["metadata"]["uid"]
    fake_api.resume()
    wait_for(lambda: "running" in ((_status(fake_api, "p").get("containerStatuses") or [{}])[0].get("state") or {}),
             what="the new pod Running")
    patches = [r for r in fake_api.requests if r.path.endswith("/pods/p/status") and r.user == NODE_USER]
    refused = [r for r in patches if r.body["metadata"]["uid"] == first]
    assert [r.status for r in refused] == [422], [(r.body["metadata"], r.status) for r in patches]
    assert all(r.status == 200 for r in patches if r.body["metadata"]["uid"] == second)
    assert fake_api.get("pods", "default", "p")["metadata"]["uid"] == second
    assert "terminated" not in fake_api.get("pods", "default", "p")["status"]["containerStatuses"][0]["state"]


def test_fake_refuses_a_status_patch_naming_another_uid_as_recorded(fake_api):
    with open(f"{contract_dir()}/extended/38-pod-status-wrong-uid.json") as f:
        recorded = json.load(f)
    fake_api.create_pod({"metadata": {"name": "workload"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
                        node_name="fake-node")
    req = recorded["request"]
    answer = fake_api.client().patch(req["path"], json=req["body"], content_type=req["headers"]["Content-Type"])
    assert (answer.status_code, answer.json()) == (recorded["response"]["status"], recorded["response"]["body"])
    uid = fake_api.get("pods", "default", "workload")["metadata"]["uid"]
    ok = fake_api.client().patch(req["path"], json={"metadata": {"uid": uid}, "status": {"message": "x"}},
                                 content_type=req["headers"]["Content-Type"])
    assert ok.status_code == 200 and ok.json()["status"]["message"] == "x"
