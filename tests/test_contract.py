"""Replay every recorded exchange of ../shared/k8s-contract/ against the fake API server.

The exchanges run in file order against one fake (each builds on the state the previous ones left,
as in the recording), with what the recording had in place beforehand created by an admin: the
configmaps `cfg` and `unrelated`, the secret `sec`, and a pod `other` bound to `other-node`.
Identities: `<node token>` is `system:node:fake-node`, `<admin token>` the fake's admin. The replay
runs twice: with bearer tokens over HTTP, and over HTTPS with the node presenting a client
certificate (CN system:node:fake-node, O system:nodes) instead of its token.
uids and resourceVersions the recording shows are mapped to the fake's own as they appear, so a
later request naming a recorded uid (a delete precondition, a TokenRequest's boundObjectRef, an
Event's involvedObject) carries the fake's uid for the same object.

What is compared: the HTTP status (0 = connection closed without an answer), and the body after
replacing what differs by nature (uids, resourceVersions, server-set timestamps, managedFields
contents, the random suffix of `kube-api-access-*`): for a Status, kind/status/reason/code/details
and the message; for an object, the whole object: every field kept, added or dropped.

Deliberate differences, each checked in its own way below:
- 09: the 422 message embeds the whole patched object; compared is its Go json error tail.
- 17: the watch's timeoutSeconds is shortened to 2 s (the events, including the closing BOOKMARK, are the same).
- 18: the recording's history starts with pods of earlier runs; compared are the events this replay
  produced (the recording's tail for the same pods) and that there is no 410 before compaction; the
  410 after `compact()` is tested separately.
- 20: lesson 12 reproduced literally: a strategic merge patch with `$setElementOrder/containerStatuses`
  (a list without a merge key) makes the fake close the connection without an answer.
"""
import glob
import json
import os
import re
import threading
import time

import pytest
import requests

from tests.fake_apiserver import FakeApiServer
from tests.helpers import contract_dir

CONTRACT = contract_dir()
FILES = sorted(glob.glob(os.path.join(CONTRACT, "[0-9][0-9]-*.json")))
NAMES = [os.path.basename(f)[:-5] for f in FILES]

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def load(name):
    with open(os.path.join(CONTRACT, name + ".json")) as f:
        return json.load(f)


class Replay:
    """Runs every exchange once, in order; keeps (status, body) per file."""

    def __init__(self, fake, node_cert=None):
        self.fake = fake
        self.node_cert = node_cert
        self.map = {}           # recorded uid/resourceVersion -> the fake's
        self.results = {}
        self.content_types = []

    def token(self, placeholder):
        return {"<node token>": self.fake.node_token("fake-node"), "<admin token>": self.fake.admin_token,
                "<wrong token>": "not-a-known-token"}[placeholder]

    def subst(self, value):
        if isinstance(value, dict):
            return {k: self.subst(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.subst(v) for v in value]
        if isinstance(value, str):
            return UUID_RE.sub(lambda m: self.map.get(m.group(0), m.group(0)), self.map.get(value, value))
        return value

    def learn(self, recorded, got):
        """Map the recording's uids/resourceVersions onto the fake's, from two versions of one object."""
        if isinstance(recorded, dict) and isinstance(got, dict):
            rm, gm = recorded.get("metadata") or {}, got.get("metadata") or {}
            for k in ("uid", "resourceVersion"):
                if isinstance(rm.get(k), str) and isinstance(gm.get(k), str):
                    self.map[rm[k]] = gm[k]
            for key in ("items",):
                for r, g in zip(recorded.get(key) or [], got.get(key) or []):
                    self.learn(r, g)
        if isinstance(recorded, list) and isinstance(got, list):
            for r, g in zip(recorded, got):
                self.learn(r.get("object"), g.get("object"))

    def send(self, req, path=None):
        headers = {k: v for k, v in req["headers"].items() if k != "Authorization"}
        auth = req["headers"].get("Authorization")
        cert = None
        if auth and self.node_cert and auth.endswith("<node token>"):
            cert = self.node_cert           # the node authenticates with its client certificate instead
        elif auth:
            headers["Authorization"] = "Bearer " + self.token(auth.split(" ", 1)[1])
        body = self.subst(req["body"])
        data = json.dumps(body) if body is not None else None
        url = self.fake.url + (path or req["path"])
        try:
            r = requests.request(req["method"], url, data=data, headers=headers, timeout=30, cert=cert,
                                 verify=self.fake.ca_path if self.fake.tls else True, stream="watch=" in url)
        except requests.ConnectionError:
            return 0, None
        self.content_types.append((req["method"], req["path"], r.headers.get("Content-Type")))
        if "watch=" in url and r.status_code == 200:
            return r.status_code, [json.loads(line) for line in r.iter_lines() if line]
        return r.status_code, r.json() if r.content else None

    def setup(self):
        f = self.fake
        f.create_configmap("default", "cfg", {"greeting": "hi"})
        f.create_configmap("default", "unrelated", {"x": "y"})
        f.create_secret("default", "sec", {"password": "p"})
        f.create_pod({"metadata": {"name": "other"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
                     node_name="other-node")

    def run(self):
        self.setup()
        for name in NAMES:
            ex = load(name)
            hook = getattr(self, "run_" + name.split("-")[0], None)
            got = hook(ex) if hook else self.send(ex["request"])
            if got[1] is not None:
                self.learn(ex["response"]["body"], got[1])
            self.results[name] = got
        self.history = list(self.fake._history)

    def run_17(self, ex):
        """The watch after the list; meanwhile an admin creates, labels and deletes the pod `watched`."""
        path = ex["request"]["path"]
        rv = self.map.get("806", "806")
        path = path.replace("resourceVersion=806", f"resourceVersion={rv}").replace("timeoutSeconds=4",
                                                                                    "timeoutSeconds=2")
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", self.send(ex["request"], path)))
        t.start()
        deadline = time.monotonic() + 5
        while self.fake.open_watches() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        first = ex["response"]["body"][0]["object"]
        manifest = {"metadata": {"name": "watched"}, "spec": {
            "nodeName": "fake-node", "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "x"}]}}
        assert first["spec"]["nodeName"] == "fake-node"
        self.fake.create_pod(manifest)
        self.fake.patch("pods", "default", "watched", {"metadata": {"labels": {"l": "1"}}})
        self.fake.delete_pod("default", "watched")
        t.join(10)
        return out["r"]


@pytest.fixture(scope="module", params=["http+token", "https+client-cert"])
def replay(request, tmp_path_factory):
    """The whole replay, once with bearer tokens over HTTP and once with the node's client certificate."""
    if request.param == "http+token":
        fake, cert = FakeApiServer().start(), None
    else:
        fake = FakeApiServer(tls=True, pki_dir=str(tmp_path_factory.mktemp("contract-pki"))).start()
        cert = fake.client_cert("fake-node")
    try:
        r = Replay(fake, cert)
        r.run()
        yield r
    finally:
        fake.stop()


VOLATILE_META = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")


def normalise(value, path=()):
    """Replace what differs by nature between two servers (see the module docstring)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if path and path[-1] == "metadata" and k in VOLATILE_META and v is not None:
                out[k] = "<" + k + ">"
            elif k == "managedFields":
                out[k] = "<managedFields>" if v else v
            elif k == "uid" and isinstance(v, str):
                out[k] = "<uid>"
            else:
                out[k] = normalise(v, path + (k,))
        return out
    if isinstance(value, list):
        return [normalise(v, path) for v in value]
    if isinstance(value, str):
        value = re.sub(r"kube-api-access-[a-z0-9]{5}", "kube-api-access-<x>", value)
        return UUID_RE.sub("<uid>", value)
    return value


def compare_status(recorded, got):
    assert got is not None, "no body"
    for k in ("kind", "apiVersion", "status", "reason", "code"):
        assert got.get(k) == recorded.get(k), (k, got.get(k), recorded.get(k))
    rd, gd = recorded.get("details") or {}, got.get("details") or {}
    for k in ("name", "group", "kind"):
        assert gd.get(k) == rd.get(k), ("details." + k, gd.get(k), rd.get(k))
    assert normalise(got["message"]) == normalise(recorded["message"])


def diff(a, b, path="$"):
    """Human-readable differences between two JSON values (first few)."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{path}.{k}: missing in fake (recorded {json.dumps(b[k])[:120]})")
            elif k not in b:
                out.append(f"{path}.{k}: extra in fake ({json.dumps(a[k])[:120]})")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: fake {json.dumps(a)[:160]} != recorded {json.dumps(b)[:160]}")
    return out


def compare_object(recorded, got):
    problems = diff(normalise(got), normalise(recorded))
    assert not problems, "\n".join(problems[:30])


@pytest.mark.parametrize("name", NAMES)
def test_recorded_exchange_is_reproduced(replay, name):
    ex = load(name)
    status, body = replay.results[name]
    want = ex["response"]
    assert status == want["status"], (status, body)
    rbody = want["body"]
    if status == 0:
        return
    num = name.split("-")[0]
    if num == "09":
        assert body["reason"] == rbody["reason"] and body["code"] == rbody["code"]
        tail = rbody["message"].split("\": ")[-1]
        assert body["message"].endswith(tail), (body["message"][-200:], tail)
        assert body["details"]["causes"][0]["field"] == "patch"
        return
    if num == "18":
        got = [(e["type"], e["object"]["metadata"].get("name")) for e in body]
        assert "ERROR" not in [t for t, _ in got]
        recorded_tail = [(e["type"], e["object"]["metadata"].get("name")) for e in rbody][-len(got):]
        assert got == recorded_tail
        for e, r in zip(body, rbody[-len(got):]):
            compare_object(r["object"], e["object"])
        return
    if isinstance(rbody, list):
        assert [e["type"] for e in body] == [e["type"] for e in rbody]
        for e, r in zip(body, rbody):
            if e["type"] == "BOOKMARK":
                assert set(e["object"]) == set(r["object"]) and e["object"]["spec"] == r["object"]["spec"]
            else:
                compare_object(r["object"], e["object"])
        return
    if rbody.get("kind") == "Status":
        compare_status(rbody, body)
    else:
        compare_object(rbody, body)


def test_every_recorded_exchange_was_replayed(replay):
    assert len(FILES) >= 32
    assert set(replay.results) == set(NAMES)


def test_every_answer_is_json_as_recorded(replay):
    recorded = {(load(n)["request"]["method"], load(n)["request"]["path"]): load(n)["response"]["headers"]
                for n in NAMES}
    for method, path, ctype in replay.content_types:
        want = recorded.get((method, path), {}).get("Content-Type")
        if want:
            assert ctype == want, (method, path, ctype)


def test_watch_from_compacted_resource_version_gets_410_expired(replay):
    fake = replay.fake
    fake.compact()
    ex = load("18-pods-watch-too-old")
    status, events = replay.send(ex["request"])
    assert status == 200
    assert [e["type"] for e in events] == ["ERROR"]
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"
    fake.watch_expired_as = "http"
    try:
        status, body = replay.send(ex["request"])
        assert status == 410 and body["reason"] == "Expired"
    finally:
        fake.watch_expired_as = "event"


def test_graceful_delete_then_final_delete_as_the_watch_shows(replay):
    """Lesson 7 across files: 30 leaves the pod with deletionTimestamp, 32 removes it (DELETED)."""
    assert replay.fake.get("pods", "default", "job") is None
    types = [(etype, obj["metadata"]["name"], bool(obj["metadata"].get("deletionTimestamp")))
             for rv, etype, res, obj, old in replay.history if res == "pods" and obj["metadata"]["name"] == "job"]
    assert types[-3:] == [("MODIFIED", "job", True), ("MODIFIED", "job", True), ("DELETED", "job", True)]
