"""The fake API server's own behaviour beyond the recorded contract: the parts other tests lean on."""
import base64
import json
import subprocess
import threading
import time

import pytest
import requests

from tests.fake_apiserver import TestPKI
from tests.helpers import kubectl_binary, wait_for

NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "lastHeartbeatTime": "2026-11-24T15:15:41.5Z",
                                   "lastTransitionTime": "2026-11-24T15:15:41Z"}],
                   "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                 {"type": "Hostname", "address": "n1"}],
                   "nodeInfo": {"kubeletVersion": "v1.36.0-minikrust"}}}
POD = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "reg/x:v1"}]}}


def pods_url(node):
    return f"/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"


def watch_lines(fake, user, path, n, timeout=5):
    """Collect the first n watch events (type, object) from a stream opened in a thread."""
    out = []
    c = fake.client(user)

    def run():
        try:
            with c.get(path, stream=True, timeout=timeout) as r:
                for line in r.iter_lines():
                    if line:
                        ev = json.loads(line)
                        out.append((ev["type"], ev["object"]))
                        if len(out) >= n:
                            return
        except requests.RequestException as exc:
            out.append(("EXC", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return out, t


def test_node_registration_keeps_status_adds_not_ready_taint_and_rounds_times(fake_api):
    c = fake_api.client("n1")
    r = c.post("/api/v1/nodes", json=NODE)
    assert r.status_code == 201
    node = r.json()
    assert {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["status"]["conditions"][0]["lastHeartbeatTime"] == "2026-11-24T15:15:41Z"
    assert node["status"]["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 0}}
    assert c.post("/api/v1/nodes", json=NODE).json()["reason"] == "AlreadyExists"
    assert fake_api.get("nodes", "n1")["metadata"]["uid"] == node["metadata"]["uid"]


def test_node_restriction_on_labels_taints_and_other_nodes(fake_api):
    c = fake_api.client("n1")
    bad = json.loads(json.dumps(NODE))
    bad["metadata"]["labels"]["node-role.kubernetes.io/agent"] = ""
    r = c.post("/api/v1/nodes", json=bad)
    assert r.status_code == 403 and "node-role.kubernetes.io/agent" in r.json()["message"]
    assert c.post("/api/v1/nodes", json=NODE).status_code == 201
    r = c.patch("/api/v1/nodes/n1", {"spec": {"taints": []}})
    assert r.status_code == 403 and "taints" in r.json()["message"]
    assert c.get("/api/v1/nodes/n2").status_code == 403
    assert c.get("/api/v1/nodes").status_code == 403
    assert c.get("/api/v1/nodes?fieldSelector=metadata.name%3Dn1").json()["items"][0]["metadata"]["name"] == "n1"
    assert fake_api.client("n2").patch("/api/v1/nodes/n1/status", {"status": {}}).status_code == 403


def test_strategic_patch_merges_node_addresses_and_conditions_by_type(fake_api):
    c = fake_api.client("n1")
    c.post("/api/v1/nodes", json=NODE)
    r = c.patch("/api/v1/nodes/n1/status", {"status": {
        "conditions": [{"type": "MemoryPressure", "status": "False"}],
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}},
        content_type="application/strategic-merge-patch+json")
    st = r.json()["status"]
    assert [c["type"] for c in st["conditions"]] == ["Ready", "MemoryPressure"]
    assert st["addresses"] == [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": "n1"}]
    r = c.patch("/api/v1/nodes/n1/status", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    assert [c["type"] for c in r.json()["status"]["conditions"]] == ["Ready"]
    r = c.patch("/api/v1/nodes/n1/status", {"status": {"capacity": []}})
    assert r.status_code == 422


def test_lease_conflict_and_node_lease_restriction(fake_api):
    c = fake_api.client("n1")
    base = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"},
             "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40, "renewTime": "2026-11-24T15:15:41.7016769Z"}}
    r = c.post(base, json=lease)
    assert r.status_code == 201 and r.json()["spec"]["renewTime"] == "2026-11-24T15:15:41.701676Z"
    stored = r.json()
    assert c.put(base + "/n1", json=stored).json()["metadata"]["resourceVersion"] == \
        stored["metadata"]["resourceVersion"]   # a no-op update writes nothing
    stored["spec"]["renewTime"] = "2026-11-24T15:15:51.000000Z"
    assert c.put(base + "/n1", json=stored).status_code == 200
    assert c.put(base + "/n1", json=stored).json()["reason"] == "Conflict"
    other = dict(lease, metadata={"name": "n2"})
    assert c.post(base, json=other).status_code == 403


@pytest.mark.parametrize("image, policy", [
    ("app", "Always"), ("app:latest", "Always"), ("app:v1", "IfNotPresent"), ("r.io:5000/app", "Always"),
    ("app@sha256:" + "c" * 64, "IfNotPresent"), ("app:latest@sha256:" + "c" * 64, "Always")])
def test_admission_defaults_image_pull_policy_from_the_tag_as_kubernetes_does(fake_api, image, policy):
    """SetDefaults_Container: Always when ParseImageName reads the tag "latest" (also beside a digest)."""
    pod = fake_api.create_pod({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": image}]}})
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == policy


@pytest.mark.parametrize("resources, qos", [
    ([{}], "BestEffort"),
    ([{"requests": {"cpu": "0", "ephemeral-storage": "1Gi"}}], "BestEffort"),      # only cpu/memory above 0
    ([{"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1000m", "memory": "1073741824"}}], "Guaranteed"),
    ([{"limits": {"cpu": "1", "memory": "1Gi"}}, {}], "Burstable"),                 # every container needs both
    ([{"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}], "Burstable")])
def test_admission_sets_the_qos_class_as_kubernetes_computes_it(fake_api, resources, qos):
    containers = [{"name": f"c{i}", "image": "x", "resources": r} for i, r in enumerate(resources)]
    pod = fake_api.create_pod({"metadata": {"name": "p"}, "spec": {"containers": containers}})
    assert pod["status"]["qosClass"] == qos


def test_pod_admission_defaults(fake_api):
    pod = fake_api.create_pod({"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "x", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
         "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}, node_name="n1")
    spec = pod["spec"]
    c = spec["containers"][0]
    assert c["imagePullPolicy"] == "Always" and c["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] == "v1"
    assert pod["status"] == {"phase": "Pending", "qosClass": "Guaranteed"}
    assert [t["key"] for t in spec["tolerations"]] == ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"]
    assert spec["volumes"][0]["name"].startswith("kube-api-access-")
    assert c["volumeMounts"][-1]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    no_sa = fake_api.create_pod({"metadata": {"name": "q"}, "spec": {"automountServiceAccountToken": False,
                                                                       "containers": [{"name": "c", "image": "x"}]}})
    assert "volumes" not in no_sa["spec"]
    r = fake_api.client().post("/api/v1/namespaces/default/pods", json={"kind": "Pod", "apiVersion": "v1",
                                                                        "metadata": {"name": "bad"},
                                                                        "spec": {"containers": [{"name": "c"}]}})
    assert r.status_code == 422 and r.json()["details"]["causes"][0]["field"] == "spec.containers[0].image"


def test_node_reads_only_configmaps_and_secrets_its_pods_reference(fake_api):
    for name in ("env-from", "key-ref", "vol", "proj", "other"):
        fake_api.create_configmap("default", name, {"k": "v"})
        fake_api.create_secret("default", name, {"k": "v"})
    fake_api.create_secret("default", "pull", {"k": "v"})
    fake_api.create_pod({"metadata": {"name": "p"}, "spec": {
        "imagePullSecrets": [{"name": "pull"}],
        "containers": [{"name": "c", "image": "x", "envFrom": [{"configMapRef": {"name": "env-from"}},
                                                               {"secretRef": {"name": "env-from"}}],
                        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "key-ref", "key": "k"}}},
                                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "key-ref", "key": "k"}}}]}],
        "volumes": [{"name": "a", "configMap": {"name": "vol"}}, {"name": "b", "secret": {"secretName": "vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "proj"}},
                                                            {"secret": {"name": "proj"}}]}}]}}, node_name="n1")
    c = fake_api.client("n1")
    for name in ("env-from", "key-ref", "vol", "proj"):
        assert c.get(f"/api/v1/namespaces/default/configmaps/{name}").status_code == 200
        assert c.get(f"/api/v1/namespaces/default/secrets/{name}").status_code == 200
    assert c.get("/api/v1/namespaces/default/secrets/pull").json()["data"]["k"] == base64.b64encode(b"v").decode()
    assert c.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt").status_code == 200
    assert c.get("/api/v1/namespaces/default/configmaps/other").status_code == 403
    assert c.get("/api/v1/namespaces/default/secrets/other").status_code == 403
    assert fake_api.client("n2").get("/api/v1/namespaces/default/secrets/vol").status_code == 403
    r = c.get("/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name%3Dvol")
    assert [i["metadata"]["name"] for i in r.json()["items"]] == ["vol"]


def test_token_request_for_the_audience_the_pod_names(fake_api):
    pod = fake_api.create_pod({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
                              node_name="n1")
    c = fake_api.client("n1")
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3607, "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p",
                                                                   "uid": pod["metadata"]["uid"]}}}
    r = c.post("/api/v1/namespaces/default/serviceaccounts/default/token", json=body)
    assert r.status_code == 201, r.text
    token = r.json()["status"]["token"]
    assert r.json()["status"]["expirationTimestamp"]
    review = fake_api.client("n1").post("/apis/authentication.k8s.io/v1/tokenreviews", json={
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}).json()
    assert review["status"]["user"]["username"] == "system:serviceaccount:default:default"
    assert fake_api.client("n2").post("/api/v1/namespaces/default/serviceaccounts/default/token",
                                      json=body).status_code == 403


def test_list_watch_bookmarks_and_graceful_delete(fake_api):
    fake_api.bookmark_interval = 0.2
    c = fake_api.client("n1")
    fake_api.create_pod(POD, node_name="n1")
    fake_api.create_pod(dict(POD, metadata={"name": "elsewhere"}), node_name="n2")
    lst = c.get(pods_url("n1")).json()
    assert [i["metadata"]["name"] for i in lst["items"]] == ["p"] and "kind" not in lst["items"][0]
    rv = lst["metadata"]["resourceVersion"]
    out, t = watch_lines(fake_api, "n1", pods_url("n1") + f"&watch=1&resourceVersion={rv}&allowWatchBookmarks=true",
                         4)
    wait_for(lambda: fake_api.open_watches() == 1, 5, what="watch open")
    fake_api.delete_pod("default", "p")
    assert fake_api.get("pods", "default", "p")["metadata"]["deletionGracePeriodSeconds"] == 30
    pod = fake_api.get("pods", "default", "p")
    r = c.delete("/api/v1/namespaces/default/pods/p", json={"gracePeriodSeconds": 0,
                                                           "preconditions": {"uid": pod["metadata"]["uid"]}})
    assert r.status_code == 200 and fake_api.get("pods", "default", "p") is None
    t.join(5)
    types = [e for e, _ in out]
    assert [e for e in types if e != "BOOKMARK"][:3] == ["MODIFIED", "MODIFIED", "DELETED"], out
    assert "BOOKMARK" in types, out     # asked for, and the watch outlives several bookmark intervals


def test_watch_without_resource_version_starts_with_added_and_timeout_ends_it(fake_api):
    fake_api.create_pod(POD, node_name="n1")
    c = fake_api.client("n1")
    start = time.monotonic()
    events = list(c.watch("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1", "timeoutSeconds": "1"}))
    assert [e for e, _ in events] == ["ADDED"] and 0.9 < time.monotonic() - start < 3


def test_expired_resource_version_as_event_or_http(fake_api):
    fake_api.create_pod(POD, node_name="n1")
    old = fake_api.resource_version - 1
    fake_api.compact()
    c = fake_api.client("n1")
    events = list(c.watch("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1", "resourceVersion": str(old)}))
    assert events[0][0] == "ERROR" and events[0][1]["code"] == 410
    fake_api.watch_expired_as = "http"
    events = list(c.watch("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1", "resourceVersion": str(old)}))
    assert events[0][0] == "HTTP" and events[0][1]["reason"] == "Expired"


def test_expire_and_drop_open_watches(fake_api):
    rv = fake_api.resource_version
    out, t = watch_lines(fake_api, "n1", pods_url("n1") + f"&watch=1&resourceVersion={rv}", 5)
    wait_for(lambda: fake_api.open_watches() == 1, 5)
    fake_api.expire_watches()
    t.join(5)
    assert out and out[0][0] == "ERROR" and out[0][1]["reason"] == "Expired"
    out, t = watch_lines(fake_api, "n1", pods_url("n1") + f"&watch=1&resourceVersion={fake_api.resource_version}", 5)
    wait_for(lambda: fake_api.open_watches() == 1, 5)
    fake_api.drop_watches()
    t.join(5)
    assert not t.is_alive() and fake_api.open_watches() == 0


def test_fault_injection_fail_close_pause(fake_api):
    c = fake_api.client("n1")
    fake_api.fail_next(2, status=429, path="/nodes/", retry_after=3)
    r = c.get("/api/v1/nodes/n1")
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert c.get("/api/v1/nodes/n1").status_code == 429
    assert c.get("/api/v1/nodes/n1").status_code == 404
    fake_api.fail_next(1, status=500, method="POST")
    assert c.get("/api/v1/nodes/n1").status_code == 404
    assert c.post("/api/v1/nodes", json=NODE).status_code == 500
    fake_api.close_next(1)
    with pytest.raises(requests.ConnectionError):
        c.get("/api/v1/nodes/n1")
    fake_api.pause(path="/nodes/")
    done = []
    t = threading.Thread(target=lambda: done.append(c.get("/api/v1/nodes/n1").status_code))
    t.start()
    time.sleep(0.3)
    assert not done
    fake_api.resume()
    t.join(5)
    assert done == [404]
    assert fake_api.count("GET", "/nodes/n1$", user="n1") >= 6


def test_restart_on_the_same_port_keeps_state_and_cuts_watches(fake_api):
    fake_api.create_pod(POD, node_name="n1")
    port, rv = fake_api.port, fake_api.resource_version
    out, t = watch_lines(fake_api, "n1", pods_url("n1") + f"&watch=1&resourceVersion={rv}", 5)
    wait_for(lambda: fake_api.open_watches() == 1, 5)
    fake_api.stop()
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(fake_api.url + "/version", timeout=2)
    fake_api.start()
    assert fake_api.port == port
    assert fake_api.client("n1").get("/api/v1/namespaces/default/pods/p").status_code == 200


def test_csr_create_watch_approve_and_sign(fake_api):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
        x509.NameAttribute(NameOID.COMMON_NAME, "system:node:n1")])).sign(key, hashes.SHA256())
    token = fake_api.add_bootstrap_token()
    c = fake_api.client(None)
    c.session.headers["Authorization"] = f"Bearer {token}"
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"generateName": "csr-"},
            "spec": {"request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
                     "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                     "usages": ["digital signature", "client auth"]}}
    r = c.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", json=body)
    assert r.status_code == 201, r.text
    name = r.json()["metadata"]["name"]
    assert r.json()["spec"]["username"].startswith("system:bootstrap:")
    assert c.get("/api/v1/nodes/n1").status_code == 403
    fake_api.approve_csr(name)
    got = c.get(f"/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}").json()
    cert = x509.load_pem_x509_certificate(base64.b64decode(got["status"]["certificate"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n1"


def test_subject_access_review_policy_is_recorded(fake_api):
    fake_api.sar_policy = lambda spec: (spec["resourceAttributes"]["subresource"] == "log", "only logs")
    c = fake_api.client("n1")
    url = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
    mk = lambda sub: {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",  # noqa: E731
                      "spec": {"user": "alice", "resourceAttributes": {"verb": "get", "resource": "nodes",
                                                                       "subresource": sub, "name": "n1"}}}
    assert c.post(url, json=mk("log")).json()["status"]["allowed"] is True
    denied = c.post(url, json=mk("metrics")).json()["status"]
    assert denied["allowed"] is False and denied["reason"] == "only logs"
    assert len(fake_api.subject_access_reviews) == 2


def test_client_certificate_identifies_the_node(fake_api_tls, tmp_path):
    fake = fake_api_tls
    cert, key = fake.pki.node_cert("n1", tmp_path)
    r = requests.post(fake.url + "/api/v1/nodes", data=json.dumps(NODE), cert=(cert, key),
                      verify=fake.pki.ca_path, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 201
    assert fake.requests[-1].user == "system:node:n1"
    r = requests.get(fake.url + "/api/v1/nodes/n1", verify=fake.pki.ca_path, timeout=10)
    assert r.status_code == 403


def test_kubectl_get_describe_delete(fake_api_tls, tmp_path):
    fake = fake_api_tls
    binary = kubectl_binary()
    kc = fake.write_kubeconfig(tmp_path / "admin.kubeconfig")
    fake.client("n1").post("/api/v1/nodes", json=NODE)
    fake.create_pod(POD, node_name="n1")

    def kubectl(*args):
        p = subprocess.run([binary, "--kubeconfig", kc, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    manifest = tmp_path / "pod.yaml"
    manifest.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: applied}\nspec:\n  nodeName: n1\n"
                        "  containers: [{name: c, image: 'file:hello.wasm'}]\n")
    # The fake serves no protobuf OpenAPI v2, which older kubectl (Debian's 1.20) validates against.
    assert "pod/applied created" in kubectl("apply", "--validate=false", "-f", str(manifest))
    assert "pod/applied unchanged" in kubectl("apply", "--validate=false", "-f", str(manifest))
    assert "pod/applied labeled" in kubectl("label", "pod", "applied", "x=y")
    assert fake.get("pods", "default", "applied")["metadata"]["labels"] == {"x": "y"}
    assert "Ready" in kubectl("get", "nodes").splitlines()[1]
    assert kubectl("get", "pod", "p").split()[5:8] == ["p", "0/1", "Pending"]
    assert "kube-api-access-" in kubectl("describe", "pod", "p")
    threading.Timer(1.0, lambda: fake.remove_pod("default", "p")).start()
    assert 'pod "p" deleted' in kubectl("delete", "pod", "p")


def test_mirror_pods_get_no_service_account_and_may_not_use_api_objects(fake_api):
    c = fake_api.client("n1")
    node_uid = c.post("/api/v1/nodes", json=NODE).json()["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node_uid, "controller": True}
    mirror = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "static-n1", "annotations": {
        "kubernetes.io/config.mirror": "abc", "kubernetes.io/config.source": "file"}, "ownerReferences": [owner]},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}}
    for owners, message in (([], "an owner reference set to itself"),
                            ([dict(owner, controller=False)], "a controller owner reference"),
                            ([dict(owner, uid="0000")], "does not match"),
                            ([owner, owner], "a single owner reference")):
        bad = json.loads(json.dumps(mirror))
        bad["metadata"]["ownerReferences"] = owners
        r = c.post("/api/v1/namespaces/default/pods", json=bad)
        assert r.status_code == 403 and message in r.json()["message"], r.text
    r = c.post("/api/v1/namespaces/default/pods", json=mirror)
    assert r.status_code == 201, r.text
    assert "serviceAccountName" not in r.json()["spec"] and "volumes" not in r.json()["spec"]
    with_cm = json.loads(json.dumps(mirror))
    with_cm["metadata"]["name"] = "static2-n1"
    with_cm["spec"]["volumes"] = [{"name": "v", "configMap": {"name": "cfg"}}]
    assert c.post("/api/v1/namespaces/default/pods", json=with_cm).status_code == 403
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": mirror["spec"]}
    assert "mirror pods" in c.post("/api/v1/namespaces/default/pods", json=plain).json()["message"]


class _FakeKubelet:
    """An HTTPS /containerLogs endpoint that requires a client certificate from the fake's CA."""

    def __init__(self, pki):
        import http.server
        import ssl

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.server.seen.append((self.path, self.connection.getpeercert()))
                body = b"line 1\nline 2\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.seen = []
        cert, key = pki.issue("kubelet-serving", (), server=True, sans=("127.0.0.1",))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(pki.ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_pod_log_is_proxied_to_the_kubelet_with_the_apiserver_client_cert(fake_api_tls, tmp_path):
    fake = fake_api_tls
    kubelet = _FakeKubelet(fake.pki)
    try:
        node = json.loads(json.dumps(NODE))
        node["status"]["daemonEndpoints"] = {"kubeletEndpoint": {"Port": kubelet.port}}
        fake.client("n1").post("/api/v1/nodes", json=node)
        fake.create_pod(POD, node_name="n1")
        r = fake.client().get("/api/v1/namespaces/default/pods/p/log?tailLines=5&timestamps=true")
        assert r.status_code == 200 and r.text == "line 1\nline 2\n"
        path, peer = kubelet.server.seen[-1]
        assert path == "/containerLogs/default/p/c?timestamps=true&tailLines=5"
        assert dict(x[0] for x in peer["subject"])["commonName"] == "kube-apiserver-kubelet-client"
        assert fake.client("n1").get("/api/v1/namespaces/default/pods/p/log").status_code == 403
        fake.kubelet_ca_path = fake.ca_path          # verify the kubelet's serving certificate too
        assert fake.client().get("/api/v1/namespaces/default/pods/p/log").text == "line 1\nline 2\n"
        fake.kubelet_ca_path = str(tmp_path / "other-ca.crt")
        with open(fake.kubelet_ca_path, "wb") as f:
            f.write(TestPKI(tmp_path / "other").ca_pem)
        assert fake.client().get("/api/v1/namespaces/default/pods/p/log").status_code == 500
        fake.kubelet_ca_path = None
        # kubectl, an independent client, through the same proxy
        kc = fake.write_kubeconfig(tmp_path / "admin.kubeconfig")
        p = subprocess.run([kubectl_binary(), "--kubeconfig", kc, "logs", "p", "--tail=5"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and p.stdout == "line 1\nline 2\n", p.stderr
    finally:
        kubelet.close()


def test_delay_and_restart_that_expires_old_resource_versions(fake_api):
    c = fake_api.client("n1")
    fake_api.delay_next(1, 0.5, path="/nodes/")
    start = time.monotonic()
    assert c.get("/api/v1/nodes/n1").status_code == 404 and time.monotonic() - start >= 0.5
    fake_api.create_pod(POD, node_name="n1")
    rv = fake_api.resource_version - 1
    fake_api.restart(expire_watches=True)
    events = list(c.watch("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1", "resourceVersion": str(rv)}))
    assert events[0][1]["code"] == 410


def test_kubeconfig_with_a_client_certificate(fake_api_tls, tmp_path):
    import yaml
    path = fake_api_tls.write_kubeconfig(tmp_path / "n1.kubeconfig", "n1", client_cert=True)
    cfg = yaml.safe_load(open(path))
    user = cfg["users"][0]["user"]
    assert cfg["clusters"][0]["cluster"]["certificate-authority"] == fake_api_tls.ca_path
    r = requests.get(fake_api_tls.url + "/api/v1/nodes/n1", cert=(user["client-certificate"], user["client-key"]),
                     verify=fake_api_tls.ca_path, timeout=10)
    assert r.status_code == 404 and fake_api_tls.requests[-1].user == "system:node:n1"
    r = requests.get(fake_api_tls.url + "/api/v1/nodes/n1", headers={"Authorization": "Bearer nope"},
                     verify=fake_api_tls.ca_path, timeout=10)
    assert r.status_code == 401


def test_names_labels_and_ips_are_validated_like_the_real_server(fake_api):
    c = fake_api.client("MyHost")
    bad = dict(NODE, metadata={"name": "MyHost"})
    r = c.post("/api/v1/nodes", json=bad)
    assert r.status_code == 422 and r.json()["details"]["causes"][0]["field"] == "metadata.name"
    bad = dict(NODE, metadata={"name": "n1", "labels": {"kubernetes.io/arch": "wasm32/wasi"}})
    assert fake_api.client("n1").post("/api/v1/nodes", json=bad).status_code == 422
    fake_api.create_pod(POD, node_name="n1")
    r = fake_api.client("n1").patch("/api/v1/namespaces/default/pods/p/status", {"status": {"podIP": "localhost"}})
    assert r.status_code == 422 and "valid IP" in r.json()["message"]
    r = fake_api.client("n1").patch("/api/v1/namespaces/default/pods/p/status",
                                    {"status": {"startTime": "yesterday"}})
    assert r.status_code == 422


def test_rbac_grants_for_other_users(fake_api):
    fake_api.add_token("viewer-token", "viewer", ("viewers",))
    fake_api.create_pod(POD, node_name="n1")
    c = fake_api.client(None)
    c.session.headers["Authorization"] = "Bearer viewer-token"
    r = c.get("/api/v1/namespaces/default/pods")
    assert r.status_code == 403 and r.json()["message"].startswith('pods is forbidden: User "viewer" cannot list')
    fake_api.allow("viewers", ("get", "list"), ("pods",), namespace="default")
    assert c.get("/api/v1/namespaces/default/pods").status_code == 200
    assert c.delete("/api/v1/namespaces/default/pods/p").status_code == 403


def test_subject_access_review_with_the_fakes_own_authorizer(fake_api):
    fake_api.sar_policy = fake_api.authorizer_sar
    fake_api.allow("log-readers", ("get",), ("nodes/log",))
    url = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
    mk = lambda user, groups, sub: {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",  # noqa
                                    "spec": {"user": user, "groups": groups, "resourceAttributes": {
                                        "verb": "get", "resource": "nodes", "subresource": sub, "name": "n1"}}}
    c = fake_api.client()
    assert c.post(url, json=mk("admin", ["system:masters"], "proxy")).json()["status"]["allowed"] is True
    assert c.post(url, json=mk("bob", ["log-readers"], "log")).json()["status"]["allowed"] is True
    assert c.post(url, json=mk("bob", ["log-readers"], "metrics")).json()["status"]["allowed"] is False


def test_patch_functions():
    from tests.fake_apiserver import CloseConnection, json_merge_patch, json_patch, strategic_merge_patch
    node = {"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "DiskPressure", "status": "False"}],
                       "addresses": [{"type": "InternalIP", "address": "1.1.1.1"}]}}
    smp = strategic_merge_patch(node, {"status": {
        "conditions": [{"type": "DiskPressure", "$patch": "delete"}, {"type": "PIDPressure", "status": "False"}],
        "$setElementOrder/conditions": [{"type": "PIDPressure"}, {"type": "Ready"}]}}, "Node")
    assert [c["type"] for c in smp["status"]["conditions"]] == ["PIDPressure", "Ready"]
    assert smp["status"]["addresses"] == node["status"]["addresses"]
    assert json_merge_patch(node, {"status": {"addresses": None}}) == {"status": {"conditions": node["status"][
        "conditions"]}}
    assert json_patch(node, [{"op": "replace", "path": "/status/conditions/0/status", "value": "False"}])[
        "status"]["conditions"][0]["status"] == "False"
    pod = {"status": {"containerStatuses": [{"name": "a"}, {"name": "b"}]}}
    with pytest.raises(CloseConnection):
        strategic_merge_patch(pod, {"status": {"containerStatuses": [{"name": "b", "ready": True}],
                                               "$setElementOrder/containerStatuses": [{"name": "a"}, {"name": "b"}]}},
                              "Pod")
    assert strategic_merge_patch(pod, {"status": {"containerStatuses": [{"name": "b"}]}}, "Pod")[
        "status"]["containerStatuses"] == [{"name": "b"}]


def test_finalizers_hold_a_deletion_until_removed(fake_api):
    fake_api.create_configmap("default", "held", {"a": "b"}, )
    fake_api.patch("configmaps", "default", "held", {"metadata": {"finalizers": ["test/hold"]}})
    r = fake_api.client().delete("/api/v1/namespaces/default/configmaps/held")
    assert r.status_code == 200 and r.json()["metadata"]["deletionTimestamp"]
    assert fake_api.get("configmaps", "default", "held") is not None
    fake_api.patch("configmaps", "default", "held", {"metadata": {"finalizers": None}})
    assert fake_api.get("configmaps", "default", "held") is None


def test_watch_from_a_future_resource_version_times_out_with_504(fake_api):
    fake_api.too_large_rv_wait = 0.2
    events = list(fake_api.client("n1").watch("/api/v1/pods", {"fieldSelector": "spec.nodeName=n1",
                                                              "resourceVersion": str(fake_api.resource_version + 50)}))
    assert [e for e, _ in events] == ["ERROR"] and events[0][1]["code"] == 504
    assert events[0][1]["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


def test_dry_run_answers_without_writing(fake_api):
    rv = fake_api.resource_version
    r = fake_api.client().post("/api/v1/namespaces/default/pods?dryRun=All",
                               json={"apiVersion": "v1", "kind": "Pod", **POD})
    assert r.status_code == 201 and r.json()["spec"]["volumes"][0]["name"].startswith("kube-api-access-")
    assert fake_api.get("pods", "default", "p") is None and fake_api.resource_version == rv


def test_pod_ip_fields_round_trip_like_the_v1_conversion(fake_api):
    fake_api.create_pod(POD, node_name="n1")
    c = fake_api.client("n1")
    st = c.patch("/api/v1/namespaces/default/pods/p/status", {"status": {"podIP": "10.0.0.1",
                                                                         "hostIP": "10.0.0.2"}}).json()["status"]
    assert st["podIPs"] == [{"ip": "10.0.0.1"}] and st["hostIPs"] == [{"ip": "10.0.0.2"}]
    st = c.patch("/api/v1/namespaces/default/pods/p/status", {"status": {"podIP": "10.0.0.3"}}).json()["status"]
    assert st["podIPs"] == [{"ip": "10.0.0.3"}]
