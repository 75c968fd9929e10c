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
EXTENDED = os.path.join(CONTRACT, "extended")


def names(folder):
    return [os.path.basename(f)[:-5] for f in sorted(glob.glob(os.path.join(folder, "[0-9][0-9]-*.json")))]


FILES = sorted(glob.glob(os.path.join(CONTRACT, "[0-9][0-9]-*.json")))
NAMES = names(CONTRACT)
EXTENDED_NAMES = names(EXTENDED)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def load(name, folder=CONTRACT):
    with open(os.path.join(folder, name + ".json")) as f:
        return json.load(f)


class Replay:
    """Runs every exchange once, in order; keeps (status, body) per file."""

    folder = CONTRACT

    def __init__(self, fake, node_cert=None):
        self.fake = fake
        self.node_cert = node_cert
        self.map = {}           # recorded uid/resourceVersion -> the fake's
        self.results = {}
        self.content_types = []

    def token(self, placeholder):
        return {"<node token>": self.fake.node_token("fake-node"), "<admin token>": self.fake.admin_token,
                "<wrong token>": "not-a-known-token",
                "<a token the server does not know>": "not-a-known-token"}[placeholder]

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
        data = body if isinstance(body, str) else json.dumps(body) if body is not None else None  # a str: not JSON
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
        for name in names(self.folder):
            if name not in self.results:    # a hook may have run it already
                self.exchange(name)
        self.history = list(self.fake._history)

    def exchange(self, name):
        ex = load(name, self.folder)
        hook = type(self).__dict__.get("run_" + name.split("-")[0])   # each replay's own hooks only
        got = hook(self, ex) if hook else self.send(ex["request"])
        if got[1] is not None:
            self.learn(ex["response"]["body"], got[1])
        self.results[name] = got
        return got

    def watch_while(self, ex, path, during):
        """Send a watch and, once it is open, do `during()`; the watch's (status, events)."""
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", self.send(ex["request"], path)))
        t.start()
        deadline = time.monotonic() + 5
        while self.fake.open_watches() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        during()
        t.join(15)
        return out["r"]

    def run_17(self, ex):
        """The watch after the list; meanwhile an admin creates, labels and deletes the pod `watched`."""
        path = ex["request"]["path"]
        rv = self.map.get("806", "806")
        path = path.replace("resourceVersion=806", f"resourceVersion={rv}").replace("timeoutSeconds=4",
                                                                                    "timeoutSeconds=2")
        first = ex["response"]["body"][0]["object"]
        assert first["spec"]["nodeName"] == "fake-node"

        def during():
            manifest = {"metadata": {"name": "watched"}, "spec": {
                "nodeName": "fake-node", "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "c", "image": "x"}]}}
            self.fake.create_pod(manifest)
            self.fake.patch("pods", "default", "watched", {"metadata": {"labels": {"l": "1"}}})
            self.fake.delete_pod("default", "watched")
        return self.watch_while(ex, path, during)


class ExtendedReplay(Replay):
    """The 61 exchanges of extended/, with what the recording's server had beforehand: the
    `default/kubernetes` Service (the fake's own), configmaps app-config and other-config, secrets
    app-secret and other-secret; `web` is created by an admin after 19, as its resourceVersion shows.
    Hooks reproduce what happened around an exchange (see each)."""

    folder = EXTENDED

    def setup(self):
        f = self.fake
        f.create_configmap("default", "app-config", {"app.toml": "level = 1\n", "greeting": "hello"})
        f.create_configmap("default", "other-config", {"k": "v"})
        f.create_secret("default", "app-secret", {"password": "s3cr3t"})
        f.create_secret("default", "other-secret", {"password": "x"})

    def run_20(self, ex):
        web = {"metadata": {"name": "web", "labels": {"app": "web"}}, "spec": {
            "containers": [{"name": "web", "image": "registry.example/wasm/web:v2"}],
            "tolerations": [{"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wasi", "effect": e}
                            for e in ("NoExecute", "NoSchedule")]}}
        self.fake.create_pod(web, node_name="fake-node", namespace="default")
        return self.send(ex["request"])

    def run_26(self, ex):
        """The watch from the list's resourceVersion while an admin creates, labels and deletes
        `watched` (grace 5 s from its spec) and the node makes the final delete; shortened to 2 s."""
        path = re.sub(r"resourceVersion=(\d+)", lambda m: "resourceVersion=" + self.map.get(m[1], m[1]),
                      ex["request"]["path"]).replace("timeoutSeconds=5", "timeoutSeconds=2")

        def during():
            pod = self.fake.create_pod({"metadata": {"name": "watched"}, "spec": {
                "terminationGracePeriodSeconds": 5, "containers": [{"name": "c", "image": "registry.example/wasm/w:v1"}]}},
                node_name="fake-node", namespace="default")
            self.fake.patch("pods", "default", "watched", {"metadata": {"labels": {"color": "blue"}}})
            self.fake.delete_pod("default", "watched")
            self.fake.delete_pod("default", "watched", grace=0, uid=pod["metadata"]["uid"])
        return self.watch_while(ex, path, during)

    def run_27(self, ex):
        """The recording's server had compacted its history past resourceVersion 1."""
        self.fake.compact()
        return self.send(ex["request"])

    def run_33(self, ex):
        """Between 32 and 33 the recording's client sent 29's status again (33 answers 29's
        containerStatuses, where 32 had left one): done here the same way."""
        restore = load("29-pod-status-running", EXTENDED)["request"]
        self.send(dict(restore, body={"status": {"containerStatuses": restore["body"]["status"]["containerStatuses"]}}))
        return self.send(ex["request"])

    def run_40(self, ex):
        """Open during 41-43 (the graceful delete, the refused and the final node delete of `web`)."""
        path = re.sub(r"resourceVersion=(\d+)", f"resourceVersion={self.fake.resource_version}",
                      ex["request"]["path"]).replace("timeoutSeconds=4", "timeoutSeconds=2")
        return self.watch_while(ex, path, lambda: [self.exchange(n) for n in EXTENDED_NAMES if n[:2] in ("41", "42", "43")])

    def run_47(self, ex):
        """No controller manager ran there, so nothing had published kube-root-ca.crt: the fake, set up
        the same way for this exchange, has none either."""
        self.fake.remove("configmaps", "default", "kube-root-ca.crt")
        return self.send(ex["request"])


def _replay(kind, transport, tmp_path_factory):
    """The whole replay, once with bearer tokens over HTTP and once with the node's client certificate."""
    if transport == "http+token":
        fake, cert = FakeApiServer().start(), None
    else:
        fake = FakeApiServer(tls=True, pki_dir=str(tmp_path_factory.mktemp("contract-pki"))).start()
        cert = fake.client_cert("fake-node")
    try:
        r = kind(fake, cert)
        r.run()
        yield r
    finally:
        fake.stop()


@pytest.fixture(scope="module", params=["http+token", "https+client-cert"])
def replay(request, tmp_path_factory):
    yield from _replay(Replay, request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["http+token", "https+client-cert"])
def extended(request, tmp_path_factory):
    yield from _replay(ExtendedReplay, request.param, tmp_path_factory)


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
            elif k in ("uid", "resourceVersion") and isinstance(v, str):    # also involvedObject's, regarding's
                out[k] = f"<{k}>"
            elif path[-1:] == ("status",) and k in ("token", "expirationTimestamp") and "token" in value:
                out[k] = f"<{k}>"       # a TokenRequest's: redacted in the recording, and server time
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


def _periodic_bookmarks_apart(events):
    """(the events without periodic BOOKMARKs, those BOOKMARKs). How many periodic BOOKMARKs a watch
    gets, and when, follows the real server's bookmark timer (the recordings show 0, 1 or 2 before a
    timeout): compared are their shape and, when the recording has one, that the fake sends one too.
    The BOOKMARK that ends a watch-list's initial events (annotated) is compared in place."""
    periodic = [e for e in events if e["type"] == "BOOKMARK" and not e["object"]["metadata"].get("annotations")]
    return [e for e in events if e not in periodic], periodic


def _bookmark_shape(events):
    """A recorded BOOKMARK's object, without the initial-events-end annotation."""
    for e in events:
        if e["type"] == "BOOKMARK":
            obj = json.loads(json.dumps(e["object"]))
            obj["metadata"].pop("annotations", None)
            return obj
    return None


def check(ex, status, body, patch_error=False, history_tail=False):
    """The fake's answer against the recorded one; `patch_error`: a 422 whose message embeds the
    patched object (compared: its Go json error tail); `history_tail`: a watch from resourceVersion 1
    before compaction (compared: the events this replay produced, the recording's tail)."""
    want = ex["response"]
    assert status == want["status"], (status, body)
    rbody = want["body"]
    if status == 0:
        return
    if patch_error:
        assert body["reason"] == rbody["reason"] and body["code"] == rbody["code"]
        tail = rbody["message"].split("\": ")[-1]
        assert body["message"].endswith(tail), (body["message"][-200:], tail)
        assert body["details"]["causes"][0]["field"] == "patch"
        return
    if history_tail:
        got = [(e["type"], e["object"]["metadata"].get("name")) for e in body]
        assert "ERROR" not in [t for t, _ in got]
        recorded_tail = [(e["type"], e["object"]["metadata"].get("name")) for e in rbody][-len(got):]
        assert got == recorded_tail
        for e, r in zip(body, rbody[-len(got):]):
            compare_object(r["object"], e["object"])
        return
    if isinstance(rbody, list):
        (got, fake_marks), (recorded, marks) = _periodic_bookmarks_apart(body), _periodic_bookmarks_apart(rbody)
        assert [e["type"] for e in got] == [e["type"] for e in recorded]
        assert bool(fake_marks) >= bool(marks), "the recording has a BOOKMARK before the timeout; the fake none"
        for mark in fake_marks:
            compare_object(_bookmark_shape(rbody) or mark["object"], mark["object"])
        for e, r in zip(got, recorded):
            if e["type"] == "ERROR":    # the message names the fake's own oldest resourceVersion
                compare_status(dict(r["object"], message=""), dict(e["object"], message=""))
                assert re.fullmatch(r"too old resource version: \d+ \(\d+\)", e["object"]["message"])
            else:
                compare_object(r["object"], e["object"])
        return
    if rbody.get("kind") == "Status":
        compare_status(rbody, body)
    else:
        compare_object(rbody, body)


@pytest.mark.parametrize("name", NAMES)
def test_recorded_exchange_is_reproduced(replay, name):
    num = name.split("-")[0]
    check(load(name), *replay.results[name], patch_error=num == "09", history_tail=num == "18")


@pytest.mark.parametrize("name", EXTENDED_NAMES)
def test_extended_recorded_exchange_is_reproduced(extended, name):
    ex = load(name, EXTENDED)
    if extended.node_cert and name[:2] in ("60", "61"):
        ex["response"]["body"]["spec"].pop("uid")    # recorded with a token; a certificate's user has no uid
    check(ex, *extended.results[name], patch_error=name.startswith("12-"))


def test_every_extended_exchange_was_replayed_and_answered_json_as_recorded(extended):
    assert len(EXTENDED_NAMES) == 61 and set(extended.results) == set(EXTENDED_NAMES)
    recorded = {(load(n, EXTENDED)["request"]["method"], load(n, EXTENDED)["request"]["path"]):
                load(n, EXTENDED)["response"]["headers"] for n in EXTENDED_NAMES}
    checked = 0
    for method, path, ctype in extended.content_types:
        want = recorded.get((method, path), {}).get("Content-Type")
        if want:
            assert ctype == want, (method, path, ctype)
            checked += 1
    assert checked >= 50


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
