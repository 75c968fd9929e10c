"""The kubelet API server: endpoints, log parameters, follow, rotation, webhook auth, TLS bootstrap.

Every HTTPS test uses real TLS with a CA made here with `cryptography`. The kubelet is a stub that
offers only what the server reads (config, api, pods(), container_log_path(), metrics,
container_stats()); the API server is a stub with the three review/CSR endpoints the server calls,
so these tests do not depend on the pods or node parts.
"""
import base64
import datetime
import http.server
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import types
import urllib.parse

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import minikrust
from tests.helpers import kubectl_binary, rotate_log, rotated_logs, wait_for

NODE = "node-1"
UTC = datetime.timezone.utc


# --- a test PKI --------------------------------------------------------------------------------

class CA:
    """A certificate authority that writes PEM files and signs certificates and CSRs."""

    def __init__(self, folder, name):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = self.write(f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def write(self, name, data):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def _sign(self, subject, public_key, sans, usage, seconds):
        now = datetime.datetime.now(UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(seconds=5))
                   .not_valid_after(now + datetime.timedelta(seconds=seconds))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, name, common_name, groups=(), server=False):
        """(cert path, key path) of a new leaf: a server cert for 127.0.0.1/localhost or a client cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        subject = x509.Name(attributes + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = self._sign(subject, key.public_key(), sans if server else None, usage, 86400)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return self.write(f"{name}.crt", cert), self.write(f"{name}.key", key_pem)

    def sign_csr(self, csr_pem, seconds=86400):
        """Sign a CSR as a kube-controller-manager signer would: its subject, SANs and public key."""
        csr = x509.load_pem_x509_csr(csr_pem)
        try:
            sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = None
        return self._sign(csr.subject, csr.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, seconds)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pki"))
    ca, other = CA(folder, "test"), CA(folder, "other")
    return types.SimpleNamespace(
        ca=ca, other=other,
        server=ca.issue("server", "node-1", server=True),
        alice=ca.issue("alice", "alice", groups=("team-a",)),
        mallory=other.issue("mallory", "mallory"),
    )


# --- stubs of the API server and the kubelet ---------------------------------------------------

class StubApi:
    """The API calls the server makes: TokenReview, SubjectAccessReview, CertificateSigningRequests."""

    def __init__(self):
        self.tokens = {}                      # token -> (user, groups)
        self.allow = lambda spec: True        # SubjectAccessReview policy
        self.reviews = []                     # every SubjectAccessReview spec
        self.token_reviews = 0
        self.csrs = {}
        self.server = "https://127.0.0.1:6443"
        self._lock = threading.Lock()

    def post(self, path, body, **kw):
        with self._lock:
            if path.endswith("/tokenreviews"):
                self.token_reviews += 1
                found = self.tokens.get(body["spec"]["token"])
                status = {"authenticated": bool(found)}
                if found:
                    status["user"] = {"username": found[0], "groups": list(found[1])}
                return dict(body, status=status)
            if path.endswith("/subjectaccessreviews"):
                self.reviews.append(body["spec"])
                return dict(body, status={"allowed": bool(self.allow(body["spec"]))})
            if path == minikrust.CSR_PATH:
                name = f"csr-{len(self.csrs) + 1}"
                self.csrs[name] = dict(body, metadata={"name": name}, status={})
                return self.csrs[name]
        raise AssertionError(f"unexpected POST {path}")

    def get(self, path, **kw):
        name = path.rsplit("/", 1)[1]
        with self._lock:
            return json.loads(json.dumps(self.csrs[name]))

    def close(self):
        pass

    def pending(self):
        with self._lock:
            return [name for name, csr in self.csrs.items() if not csr["status"]]

    def issue(self, name, ca, seconds=86400):
        """Approve a CSR and sign it with the test CA, as an approver and signer would."""
        with self._lock:
            csr = self.csrs[name]
            cert = ca.sign_csr(base64.b64decode(csr["spec"]["request"]), seconds)
            csr["status"] = {"conditions": [{"type": "Approved", "status": "True", "reason": "Test"}],
                             "certificate": base64.b64encode(cert).decode()}

    def deny(self, name):
        with self._lock:
            self.csrs[name]["status"] = {"conditions": [{"type": "Denied", "status": "True", "reason": "NoWay"}]}


def cri(moment, stream, tag, content):
    return f"{minikrust._rfc3339nano(int(moment * 1e9))} {stream} {tag} {content}\n"


class StubKubelet:
    """What the server reads from a Kubelet, with pods and log files a test controls."""

    def __init__(self, root, api=None, **config):
        config.setdefault("port", 0)
        self.config = minikrust.Config(root_dir=str(root), node_name=NODE, **config)
        self.api, self.node = api, None
        self.metrics = minikrust.Metrics()
        self.stats = []
        self.logs = {}       # (ns, pod, container, previous) -> path
        self.statuses = {}   # (ns, pod) -> {container: containerStatus}
        self.root = str(root)

    def pods(self):
        return [{"metadata": {"namespace": ns, "name": name, "uid": f"uid-{name}"},
                 "status": {"phase": "Running", "containerStatuses": list(containers.values())}}
                for (ns, name), containers in list(self.statuses.items())]

    def container_log_path(self, namespace, pod, container, previous=False):
        return self.logs.get((namespace, pod, container, previous))

    def container_stats(self):
        return list(self.stats)

    def add_container(self, pod, container, restart_count=0, lines=(), namespace="default"):
        """A running container run with its `<restartCount>.log` holding `lines`."""
        folder = os.path.join(self.root, "pods", f"uid-{pod}", "logs", container)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{restart_count}.log")
        with open(path, "w") as handle:
            handle.writelines(lines)
        if restart_count:
            self.logs[(namespace, pod, container, True)] = os.path.join(folder, f"{restart_count - 1}.log")
        self.logs[(namespace, pod, container, False)] = path
        self.set_state(pod, container, "running", restart_count, namespace)
        return path

    def set_state(self, pod, container, state, restart_count=0, namespace="default"):
        self.statuses.setdefault((namespace, pod), {})[container] = {
            "name": container, "restartCount": restart_count, "state": {state: {}}}


@pytest.fixture
def api():
    return StubApi()


@pytest.fixture
def make_server(tmp_path, pki):
    """Start a KubeletServer for a StubKubelet; stops every one at the end of the test."""
    started = []

    def make(api=None, tls=True, client_ca=True, **config):
        if api is not None and tls:
            config.setdefault("tls_cert_file", pki.server[0])
            config.setdefault("tls_private_key_file", pki.server[1])
        if client_ca:
            config.setdefault("client_ca_file", pki.ca.path)
        kubelet = StubKubelet(tmp_path / f"root{len(started)}", api=api, **config)
        server = minikrust.KubeletServer(kubelet).start()
        started.append(server)
        return kubelet, server

    yield make
    for server in started:
        server.stop()


def url(server, path):
    return f"{server.scheme}://127.0.0.1:{server.port}{path}"


@pytest.fixture
def secure(make_server, api, pki):
    """An HTTPS server with webhook auth; `get(path)` calls it as alice (a client cert of the test CA)."""
    kubelet, server = make_server(api=api)

    def call(method, path, **kw):
        # verify given on each call: REQUESTS_CA_BUNDLE in the environment would override a Session's
        kw.setdefault("timeout", 10)
        return requests.request(method, url(server, path), verify=pki.ca.path, cert=pki.alice, **kw)

    yield types.SimpleNamespace(kubelet=kubelet, server=server, api=api, call=call,
                                get=lambda path, **kw: call("GET", path, **kw))


T0 = 1_795_000_000.0   # a fixed moment for log records


# --- endpoints ---------------------------------------------------------------------------------

def test_healthz_is_open_without_credentials(secure, pki):
    answer = requests.get(url(secure.server, "/healthz"), verify=pki.ca.path, timeout=10)
    assert (answer.status_code, answer.text) == (200, "ok")


def test_pods_is_a_podlist_of_the_kubelets_pods(secure):
    secure.kubelet.add_container("web", "app")
    document = secure.get("/pods").json()
    assert document["kind"] == "PodList" and document["apiVersion"] == "v1"
    assert [pod["metadata"]["name"] for pod in document["items"]] == ["web"]


def test_metrics_renders_the_registry_running_pods_and_container_usage(secure):
    secure.kubelet.add_container("web", "app")
    secure.kubelet.metrics.inc("minikrust_module_starts_total", result="success")
    secure.kubelet.metrics.observe("minikrust_module_start_duration_seconds", 0.03)
    secure.kubelet.metrics.inc("minikrust_image_pulls_total", result="success")
    secure.kubelet.metrics.inc("minikrust_api_errors_total", code="500")
    secure.kubelet.stats = [{"namespace": "default", "pod": "web", "uid": "u", "container": "app",
                             "running": True, "cpu_seconds": 1.25, "memory_bytes": 65536, "peak_memory_bytes": 65536,
                             "start_time": T0}]
    answer = secure.get("/metrics")
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    assert 'minikrust_module_starts_total{result="success"} 1' in text
    assert 'minikrust_module_start_duration_seconds_bucket{le="0.05"} 1' in text
    assert 'minikrust_module_start_duration_seconds_bucket{le="0.025"} 0' in text
    assert "minikrust_module_start_duration_seconds_count 1" in text
    assert 'minikrust_image_pulls_total{result="success"} 1' in text
    assert 'minikrust_api_errors_total{code="500"} 1' in text
    assert "minikrust_running_pods 1" in text
    assert 'minikrust_container_cpu_seconds_total{container="app",namespace="default",pod="web"} 1.25' in text
    assert 'minikrust_container_memory_bytes{container="app",namespace="default",pod="web"} 65536' in text


def test_metrics_resource_has_the_series_metrics_server_reads(secure):
    secure.kubelet.stats = [{"namespace": "ns", "pod": "web", "uid": "u", "container": "app",
                             "running": True, "cpu_seconds": 2.5, "memory_bytes": 131072, "peak_memory_bytes": 131072,
                             "start_time": T0}]
    lines = secure.get("/metrics/resource").text.splitlines()
    samples = {line.rsplit(" ", 2)[0]: line.rsplit(" ", 2)[1:] for line in lines if not line.startswith("#")}
    labels = '{container="app",namespace="ns",pod="web"}'
    assert samples["container_cpu_usage_seconds_total" + labels][0] == "2.5"
    assert samples["container_memory_working_set_bytes" + labels][0] == "131072"
    assert samples["container_start_time_seconds" + labels][0] == str(int(T0))
    assert samples['pod_cpu_usage_seconds_total{namespace="ns",pod="web"}'][0] == "2.5"
    assert samples['pod_memory_working_set_bytes{namespace="ns",pod="web"}'][0] == "131072"
    assert float(samples["node_cpu_usage_seconds_total"][0]) > 0
    assert int(samples["node_memory_working_set_bytes"][0]) > 0
    assert abs(int(samples["node_cpu_usage_seconds_total"][1]) / 1000 - time.time()) < 60  # ms timestamps
    assert "# TYPE container_cpu_usage_seconds_total counter" in lines


def test_stats_summary_has_the_v1alpha1_summary_shape_with_cpu_rates(secure):
    item = {"namespace": "ns", "pod": "web", "uid": "u1", "container": "app",
            "running": True, "cpu_seconds": 1.0, "memory_bytes": 4096, "peak_memory_bytes": 4096, "start_time": T0}
    secure.kubelet.stats = [item]
    first = secure.get("/stats/summary").json()
    assert first["node"]["nodeName"] == NODE
    assert first["node"]["cpu"]["usageCoreNanoSeconds"] > 0 and first["node"]["memory"]["workingSetBytes"] > 0
    (pod,) = first["pods"]
    assert pod["podRef"] == {"name": "web", "namespace": "ns", "uid": "u1"}
    (container,) = pod["containers"]
    assert container["name"] == "app"
    assert container["cpu"]["usageCoreNanoSeconds"] == 1_000_000_000
    assert container["memory"]["workingSetBytes"] == 4096
    assert pod["memory"]["workingSetBytes"] == 4096
    secure.kubelet.stats = [dict(item, cpu_seconds=1.5)]
    second = secure.get("/stats/summary").json()
    assert second["pods"][0]["containers"][0]["cpu"]["usageNanoCores"] > 0


@pytest.mark.parametrize("path", ["/exec/default/web/app?command=sh", "/attach/default/web/app",
                                  "/portForward/default/web", "/run/default/web/app"])
def test_streaming_endpoints_answer_501_with_a_reason(secure, path):
    answer = secure.call("POST", path)
    assert answer.status_code == 501
    assert "not supported" in answer.text and "WebAssembly" in answer.text


def test_unknown_path_is_404_and_writes_are_405(secure):
    assert secure.get("/nope").status_code == 404
    assert secure.call("POST", "/pods").status_code == 405


# --- container logs ----------------------------------------------------------------------------

LINES = [cri(T0, "stdout", "F", "one"),
         cri(T0 + 1, "stderr", "F", "two"),
         cri(T0 + 2, "stdout", "P", "thr"),
         cri(T0 + 2.5, "stdout", "F", "ee"),
         cri(T0 + 3, "stdout", "F", "four")]


def test_logs_join_partial_records_and_print_only_content(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    answer = secure.get("/containerLogs/default/web/app")
    assert answer.status_code == 200
    assert answer.text == "one\ntwo\nthree\nfour\n"


def test_logs_timestamps_prefix_each_line_with_its_first_records_time(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    text = secure.get("/containerLogs/default/web/app?timestamps=true").text
    stamp = minikrust._rfc3339nano(int((T0 + 2) * 1e9))
    assert text.splitlines()[2] == f"{stamp} three"
    assert len(stamp) == len("2026-11-25T23:59:59.123456789Z")


def test_logs_tail_lines(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    assert secure.get("/containerLogs/default/web/app?tailLines=2").text == "three\nfour\n"
    assert secure.get("/containerLogs/default/web/app?tailLines=0").text == ""
    assert secure.get("/containerLogs/default/web/app?tailLines=99").text == "one\ntwo\nthree\nfour\n"


def test_logs_since_time_and_since_seconds(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    since = minikrust._rfc3339nano(int((T0 + 1) * 1e9))
    assert secure.get(f"/containerLogs/default/web/app?sinceTime={since}").text == "two\nthree\nfour\n"
    now = time.time()
    secure.kubelet.add_container("job", "app", lines=[cri(now - 600, "stdout", "F", "old"),
                                                       cri(now - 1, "stdout", "F", "new")])
    assert secure.get("/containerLogs/default/job/app?sinceSeconds=60").text == "new\n"


def test_logs_limit_bytes_cuts_the_output(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    assert secure.get("/containerLogs/default/web/app?limitBytes=6").text == "one\ntw"


def test_logs_previous_serves_the_run_before(secure):
    folder = os.path.dirname(secure.kubelet.add_container("web", "app", restart_count=1, lines=[cri(T0, "stdout", "F", "now")]))
    with open(os.path.join(folder, "0.log"), "w") as handle:
        handle.write(cri(T0 - 10, "stdout", "F", "before the crash"))
    assert secure.get("/containerLogs/default/web/app").text == "now\n"
    assert secure.get("/containerLogs/default/web/app?previous=true").text == "before the crash\n"


def test_logs_missing_container_is_404_and_missing_previous_is_400(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    assert secure.get("/containerLogs/default/web/other").status_code == 404
    answer = secure.get("/containerLogs/default/web/app?previous=true")
    assert answer.status_code == 400 and "previous terminated container" in answer.text


@pytest.mark.parametrize("query", ["tailLines=-1", "limitBytes=0", "sinceSeconds=abc", "follow=maybe",
                                   "sinceTime=yesterday", "sinceSeconds=5&sinceTime=2026-01-01T00:00:00Z"])
def test_logs_bad_parameters_are_400(secure, query):
    secure.kubelet.add_container("web", "app", lines=LINES)
    assert secure.get(f"/containerLogs/default/web/app?{query}").status_code == 400


def test_logs_stream_selects_stdout_or_stderr_before_tail(secure):
    secure.kubelet.add_container("web", "app", lines=LINES)
    assert secure.get("/containerLogs/default/web/app?stream=Stderr").text == "two\n"
    assert secure.get("/containerLogs/default/web/app?stream=Stdout&tailLines=3").text == "one\nthree\nfour\n"
    assert secure.get("/containerLogs/default/web/app?stream=Both").status_code == 400


def test_logs_a_trailing_fragment_is_printed_without_newline(secure):
    secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "done"),
                                                      cri(T0 + 1, "stdout", "P", "no newline")])
    assert secure.get("/containerLogs/default/web/app").text == "done\nno newline"


# --- rotation ----------------------------------------------------------------------------------

def test_rotated_logs_keep_max_files_and_read_in_order(tmp_path):
    path = str(tmp_path / "0.log")
    for index in range(6):   # the rotation the WASI hosts do (the native host's twin is in C)
        with open(path, "a") as handle:
            handle.write(cri(T0 + index, "stdout", "F", f"line {index}"))
        assert rotate_log(path, max_files=3) in rotated_logs(path)
    with open(path, "a"):
        pass
    older, newest = rotated_logs(path)    # named and compressed as the kubelet does
    assert re.fullmatch(re.escape(path) + r"\.\d{8}-\d{6}\.gz", older) and re.fullmatch(re.escape(path) + r"\.\d{8}-\d{6}", newest)
    text = b"".join(minikrust.read_container_log(path, minikrust.LogOptions())).decode()
    assert text == "line 4\nline 5\n"


def test_previous_reads_the_earlier_run_across_its_compressed_rotations(secure):
    folder = os.path.dirname(secure.kubelet.add_container("web", "app", restart_count=1,
                                                          lines=[cri(T0 + 10, "stdout", "F", "now")]))
    earlier = os.path.join(folder, "0.log")
    for index in range(3):
        with open(earlier, "a") as handle:
            handle.write(cri(T0 + index, "stdout", "F", f"earlier {index}"))
        rotate_log(earlier, 5)
    with open(earlier, "a") as handle:
        handle.write(cri(T0 + 3, "stdout", "F", "earlier 3"))
    assert [name.endswith(".gz") for name in rotated_logs(earlier)] == [True, True, False]
    assert secure.get("/containerLogs/default/web/app?previous=true").text == \
        "earlier 0\nearlier 1\nearlier 2\nearlier 3\n"
    assert secure.get("/containerLogs/default/web/app?previous=true&tailLines=2").text == "earlier 2\nearlier 3\n"


def test_a_rotating_log_file_is_read_across_files_by_the_server(secure):
    path = secure.kubelet.add_container("web", "app")
    writer = minikrust._LogFile(path, max_size=200, max_files=3)   # the fallback host's log sink
    for index in range(12):
        writer.write([cri(T0 + index, "stdout", "F", f"record number {index:02d}").encode()])
    writer.close()
    rotated = rotated_logs(path)
    assert len(rotated) == 2 and all(os.path.getsize(name) <= 250 for name in rotated)
    text = secure.get("/containerLogs/default/web/app").text
    numbers = [int(line.split()[-1]) for line in text.splitlines()]
    assert numbers == list(range(4, 12))  # 4 records a file; the oldest file was removed
    assert secure.get("/containerLogs/default/web/app?tailLines=1").text == "record number 11\n"


# --- follow ------------------------------------------------------------------------------------

def test_follow_streams_lines_as_they_are_written_and_ends_with_the_container(secure):
    path = secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "first")])
    answer = secure.get("/containerLogs/default/web/app?follow=true&timestamps=false", stream=True)
    assert answer.status_code == 200
    lines = answer.iter_lines()
    assert next(lines) == b"first"
    for index in range(3):
        with open(path, "a") as handle:
            handle.write(cri(time.time(), "stdout", "P", f"par"))
            handle.flush()
            handle.write(cri(time.time(), "stdout", "F", f"t {index}"))
        assert next(lines) == f"part {index}".encode()
    with open(path, "a") as handle:
        handle.write(cri(time.time(), "stdout", "F", "last words"))
    secure.kubelet.set_state("web", "app", "terminated")
    assert list(lines) == [b"last words"]   # the stream ends by itself


def test_follow_continues_across_a_rotation(secure):
    path = secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "before")])
    answer = secure.get("/containerLogs/default/web/app?follow=true", stream=True)
    lines = answer.iter_lines()
    assert next(lines) == b"before"
    with open(path, "a") as handle:
        handle.write(cri(T0 + 1, "stdout", "F", "in the rotated file"))
    rotate_log(path, 5)
    with open(path, "a") as handle:
        handle.write(cri(T0 + 2, "stdout", "F", "after"))
    assert next(lines) == b"in the rotated file"
    assert next(lines) == b"after"
    secure.kubelet.set_state("web", "app", "terminated")
    assert list(lines) == []


def test_follow_with_tail_and_limit_bytes(secure):
    path = secure.kubelet.add_container("web", "app", lines=LINES)
    answer = secure.get("/containerLogs/default/web/app?follow=true&tailLines=1&limitBytes=12", stream=True)
    lines = answer.iter_lines()
    assert next(lines) == b"four"
    with open(path, "a") as handle:
        handle.write(cri(T0 + 9, "stdout", "F", "abcdefghij"))
    assert list(lines) == [b"abcdefg"]   # 12 bytes in all: the stream ends at the limit


def _open_follower(server, context, path):
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    connection = context.wrap_socket(raw, server_hostname="127.0.0.1")
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"ready\n" not in data:
        chunk = connection.recv(4096)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return connection


def test_100_concurrent_followers_free_their_threads_when_clients_leave(secure, pki):
    secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "ready")])
    context = ssl.create_default_context(cafile=pki.ca.path)
    context.load_cert_chain(*pki.alice)
    baseline = threading.active_count()
    followers = [_open_follower(secure.server, context, "/containerLogs/default/web/app?follow=true")
                 for _ in range(100)]
    assert threading.active_count() >= baseline + 100
    for connection in followers:
        connection.close()
    wait_for(lambda: threading.active_count() <= baseline, timeout=20,
             what=f"threads back to {baseline} (now {threading.active_count()})")


def test_followers_all_end_when_the_container_ends(secure, pki):
    secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "ready")])
    context = ssl.create_default_context(cafile=pki.ca.path)
    context.load_cert_chain(*pki.alice)
    baseline = threading.active_count()
    followers = [_open_follower(secure.server, context, "/containerLogs/default/web/app?follow=true")
                 for _ in range(20)]
    secure.kubelet.set_state("web", "app", "terminated")
    for connection in followers:
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = connection.recv(4096)
            assert chunk, data
            data += chunk
        connection.close()
    wait_for(lambda: threading.active_count() <= baseline, timeout=20, what="follower threads gone")


def test_follow_of_a_restarted_container_ends_when_a_later_run_starts(secure):
    secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "run zero")])
    lines = secure.get("/containerLogs/default/web/app?follow=true", stream=True).iter_lines()
    assert next(lines) == b"run zero"
    secure.kubelet.set_state("web", "app", "running", restart_count=1)
    assert list(lines) == []


def test_follow_ends_when_the_container_backs_off_after_its_run(secure):
    secure.kubelet.add_container("web", "app", restart_count=2, lines=[cri(T0, "stdout", "F", "run two")])
    lines = secure.get("/containerLogs/default/web/app?follow=true", stream=True).iter_lines()
    assert next(lines) == b"run two"
    status = secure.kubelet.statuses[("default", "web")]["app"]
    status.update(state={"waiting": {"reason": "CrashLoopBackOff"}}, lastState={"terminated": {"exitCode": 1}})
    assert list(lines) == []


# --- authentication and authorization ----------------------------------------------------------

def test_no_credentials_is_401(secure, pki):
    answer = requests.get(url(secure.server, "/pods"), verify=pki.ca.path, timeout=10)
    assert answer.status_code == 401
    assert secure.api.reviews == []


def test_client_cert_from_another_ca_is_refused(secure, pki):
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url(secure.server, "/pods"), verify=pki.ca.path, cert=pki.mallory, timeout=10)


def test_token_that_tokenreview_rejects_is_401(secure, pki):
    secure.api.tokens["good"] = ("bob", ["team-b"])
    answer = requests.get(url(secure.server, "/pods"), verify=pki.ca.path, timeout=10,
                          headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401
    assert secure.api.token_reviews == 1


def test_token_that_tokenreview_accepts_is_authorized_as_its_user(secure, pki):
    secure.api.tokens["good"] = ("bob", ["team-b"])
    answer = requests.get(url(secure.server, "/stats/summary"), verify=pki.ca.path, timeout=10,
                          headers={"Authorization": "Bearer good"})
    assert answer.status_code == 200
    (spec,) = secure.api.reviews
    assert (spec["user"], spec["groups"]) == ("bob", ["team-b"])
    assert spec["resourceAttributes"] == {"verb": "get", "resource": "nodes", "subresource": "stats",
                                          "name": NODE, "group": "", "version": "v1", "namespace": ""}


def test_subject_access_review_denial_is_403(secure):
    secure.api.allow = lambda spec: spec["resourceAttributes"]["subresource"] != "proxy"
    answer = secure.get("/pods")
    assert answer.status_code == 403
    assert "user=alice" in answer.text and "subresource=proxy" in answer.text
    assert secure.get("/metrics").status_code == 200


def test_client_cert_caller_maps_cn_to_user_and_o_to_groups(secure):
    assert secure.get("/pods").status_code == 200
    (spec,) = secure.api.reviews
    assert spec["user"] == "alice" and sorted(spec["groups"]) == ["system:authenticated", "team-a"]


@pytest.mark.parametrize("path, subresource", [
    ("/stats/summary", "stats"), ("/metrics", "metrics"), ("/metrics/resource", "metrics"),
    ("/containerLogs/default/web/app", "proxy"), ("/pods", "proxy"), ("/logs/", "log"),
])
def test_paths_are_authorized_as_the_kubelets_node_subresources(secure, path, subresource):
    secure.kubelet.add_container("web", "app", lines=LINES)
    secure.get(path)
    assert secure.api.reviews[-1]["resourceAttributes"]["subresource"] == subresource


def test_authorization_decisions_are_cached(secure):
    for _ in range(3):
        assert secure.get("/pods").status_code == 200
    secure.api.allow = lambda spec: False
    for _ in range(3):
        assert secure.get("/metrics").status_code == 403
    assert len(secure.api.reviews) == 2


def test_anonymous_requests_are_authorized_when_anonymous_auth_is_set(make_server, api, pki):
    _, server = make_server(api=api, anonymous_auth=True)
    api.allow = lambda spec: spec["user"] == "system:anonymous" and spec["resourceAttributes"]["subresource"] == "metrics"
    assert requests.get(url(server, "/metrics"), verify=pki.ca.path, timeout=10).status_code == 200
    assert requests.get(url(server, "/pods"), verify=pki.ca.path, timeout=10).status_code == 403
    assert api.reviews[0]["groups"] == ["system:unauthenticated"]


def test_a_port_that_cannot_be_bound_stops_the_start_with_a_clear_error(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kubelet = minikrust.Kubelet(minikrust.Config(root_dir=str(tmp_path), port=port))
        with pytest.raises(minikrust.MinikrustError, match=f"cannot serve the kubelet API on 127.0.0.1:{port}: "
                                                           "Address already in use"):
            kubelet.start()
        kubelet.stop()
        assert minikrust.main(["--root-dir", str(tmp_path), "--port", str(port)]) == 1
        assert f"minikrust: error: cannot serve the kubelet API on 127.0.0.1:{port}" in capsys.readouterr().err
        with minikrust.Kubelet(minikrust.Config(root_dir=str(tmp_path), port=port, serve=False)) as unserved:
            assert unserved.server is None      # the server disabled: the port does not matter


@pytest.mark.parametrize("settings, warned", [({}, True), ({"client_ca": True}, False),
                                              ({"anonymous_auth": True}, False)])
def test_one_warning_at_start_when_the_api_server_would_be_refused(make_server, api, caplog, settings, warned):
    caplog.set_level("WARNING", logger="minikrust")
    make_server(api=api, client_ca=settings.pop("client_ca", False), **settings)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert "--client-ca-file" in lines[0] and "401" in lines[0]


def test_standalone_serves_plain_http_on_loopback_only(make_server):
    kubelet, server = make_server(api=None, client_ca=False, address="0.0.0.0")
    assert server.scheme == "http"
    assert server.server_address[0] == "127.0.0.1"
    assert requests.get(url(server, "/pods"), timeout=10).json()["kind"] == "PodList"


# --- TLS bootstrap -----------------------------------------------------------------------------

def served_certificate(server):
    """The certificate the server presents to a new connection (not verified)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def test_without_tls_files_the_server_serves_at_once_a_self_signed_certificate_kept_for_restarts(make_server, api, pki):
    """The kubelet's default (serverTLSBootstrap off): a self-signed certificate for the node's names
    and addresses, made at start; no CertificateSigningRequest is sent."""
    kubelet, server = make_server(api=api, tls=False, node_ip="127.0.0.1")
    stored = os.path.join(kubelet.config.root_dir, "pki", "kubelet-self-signed.pem")
    assert os.stat(stored).st_mode & 0o077 == 0
    assert requests.get(url(server, "/healthz"), verify=stored, timeout=5).ok     # at once, no wait
    cert = served_certificate(server)
    assert cert.issuer == cert.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert NODE in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    assert requests.get(url(server, "/pods"), verify=stored, timeout=5).status_code == 401  # anonymous: refused
    assert requests.get(url(server, "/pods"), verify=stored, cert=pki.alice, timeout=5).ok
    server.stop()
    again = minikrust.KubeletServer(kubelet).start()   # a restart serves the same certificate
    try:
        assert served_certificate(again) == cert
        assert api.csrs == {}
    finally:
        again.stop()


def _self_signed(common_name, not_before, not_after):
    """(certificate, PEM of it and its key) of a self-signed EC certificate valid in that window."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before)
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    return cert, cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_a_self_signed_certificate_is_made_anew_before_it_expires(make_server, api, pki, tmp_path):
    root = tmp_path / "root0"        # make_server's first root dir: a short-lived certificate is there
    os.makedirs(root / "pki")
    now = datetime.datetime.now(UTC)
    short, pem = _self_signed("short-lived", now - datetime.timedelta(seconds=1), now + datetime.timedelta(seconds=4))
    (root / "pki" / "kubelet-self-signed.pem").write_bytes(pem)
    _, server = make_server(api=api, tls=False, node_ip="127.0.0.1")
    assert served_certificate(server) == short
    renewed = wait_for(lambda: (lambda c: c if c != short else None)(served_certificate(server)),
                       timeout=20, what="a new self-signed certificate")
    assert renewed.not_valid_after_utc - now > datetime.timedelta(days=300)


@pytest.mark.parametrize("escape", ["absolute", "relative", "chain"])
def test_the_serving_certificate_is_never_read_through_a_link_planted_in_the_pki_folder(
        make_server, api, pki, tmp_path, escape):
    """The pki folder is under --root-dir: its files are opened beneath it, and `-current.pem` is
    followed only to a file of that folder, so a planted link to a certificate elsewhere is not served."""
    from tests.test_security import host_link
    victim = tmp_path / "victim.pem"
    now = datetime.datetime.now(UTC)
    planted, pem = _self_signed("victim", now - datetime.timedelta(days=1), now + datetime.timedelta(days=300))
    victim.write_bytes(pem)
    folder = tmp_path / "root0" / "pki"     # make_server's first root dir
    folder.mkdir(parents=True)
    for link in ("kubelet-self-signed.pem", "kubelet-server-current.pem"):
        host_link(escape, folder / link, victim)
    kubelet, server = make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
    served = served_certificate(server)
    assert served != planted and served.issuer == served.subject      # a self-signed one of its own
    assert victim.read_bytes() == pem and not os.path.islink(folder / "kubelet-self-signed.pem")


def test_rotate_server_certificates_serves_self_signed_while_the_csr_waits_then_swaps_without_restart(
        make_server, api, pki):
    kubelet, server = make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
    self_signed = os.path.join(kubelet.config.root_dir, "pki", "kubelet-self-signed.pem")
    (name,) = wait_for(api.pending, timeout=20, what="a CertificateSigningRequest")
    assert requests.get(url(server, "/healthz"), verify=self_signed, timeout=5).ok   # served while pending
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url(server, "/healthz"), verify=pki.ca.path, timeout=5)
    session = requests.Session()    # an open connection keeps its certificate; new ones get the issued one
    assert session.get(url(server, "/healthz"), verify=self_signed, timeout=5).ok
    api.issue(name, pki.ca)
    wait_for(lambda: requests.get(url(server, "/healthz"), verify=pki.ca.path, timeout=5).ok,
             timeout=20, what="HTTPS with the issued certificate")
    assert session.get(url(server, "/healthz"), verify=self_signed, timeout=5).ok
    session.close()
    assert served_certificate(server).issuer == pki.ca.cert.subject


def test_serving_certificate_is_bootstrapped_with_a_csr_and_reused(make_server, api, pki, tmp_path):
    kubelet, server = make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
    (name,) = wait_for(api.pending, timeout=20, what="a CertificateSigningRequest")
    spec = api.csrs[name]["spec"]
    assert spec["signerName"] == "kubernetes.io/kubelet-serving"
    assert spec["usages"] == ["digital signature", "server auth"]
    csr = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"system:node:{NODE}"
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert NODE in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(requests.exceptions.SSLError):  # not issued yet: the self-signed one is served
        requests.get(url(server, "/healthz"), verify=pki.ca.path, timeout=5)
    api.issue(name, pki.ca)
    wait_for(lambda: requests.get(url(server, "/healthz"), verify=pki.ca.path, timeout=5).ok,
             timeout=20, what="HTTPS with the issued certificate")
    stored = os.path.join(kubelet.config.root_dir, "pki", "kubelet-server-current.pem")
    assert os.stat(stored).st_mode & 0o077 == 0
    server.stop()
    again = minikrust.KubeletServer(kubelet).start()   # a restart reuses the stored certificate
    try:
        assert requests.get(url(again, "/healthz"), verify=pki.ca.path, timeout=5).ok
        assert len(api.csrs) == 1
    finally:
        again.stop()


def test_serving_certificate_is_renewed_before_it_expires(make_server, api, pki):
    make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
    (first,) = wait_for(api.pending, timeout=20, what="a first CSR")
    api.issue(first, pki.ca, seconds=4)    # renewed at 70-90% of its life
    second = wait_for(api.pending, timeout=20, what="a renewal CSR")
    assert second != [first]


def test_serving_certificate_bootstrap_retries_after_a_denied_csr(make_server, api, pki):
    _, server = make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
    (first,) = wait_for(api.pending, timeout=20, what="a first CSR")
    api.deny(first)
    (second,) = wait_for(api.pending, timeout=20, what="a new CSR after the denial")
    api.issue(second, pki.ca)
    wait_for(lambda: requests.get(url(server, "/healthz"), verify=pki.ca.path, timeout=5).ok,
             timeout=20, what="HTTPS with the second CSR's certificate")


def test_request_certificate_raises_when_the_csr_is_denied(api):
    _, csr = minikrust.new_key_and_csr("system:node:x", "system:nodes")
    worker = threading.Thread(target=lambda: (wait_for(api.pending, timeout=10), api.deny("csr-1")))
    worker.start()
    with pytest.raises(minikrust.MinikrustError, match="denied"):
        minikrust.request_certificate(api, csr, minikrust.SERVING_SIGNER, ["server auth"], timeout=10)
    worker.join()


def test_client_certificate_bootstrap_writes_the_kubeconfig_once(api, pki, tmp_path):
    bootstrap = tmp_path / "bootstrap.kubeconfig"
    bootstrap.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "boot",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority": pki.ca.path}}],
        "users": [{"name": "u", "user": {"token": "abcdef.0123456789abcdef"}}],
        "contexts": [{"name": "boot", "context": {"cluster": "c", "user": "u"}}]}))
    config = minikrust.Config(root_dir=str(tmp_path / "root"), node_name=NODE, bootstrap_kubeconfig=str(bootstrap),
                              kubeconfig=str(tmp_path / "kubelet.kubeconfig"))
    signer = threading.Thread(target=lambda: api.issue(wait_for(api.pending, timeout=20)[0], pki.ca))
    signer.start()
    path = minikrust.bootstrap_client_certificate(config, api=api, timeout=20)
    signer.join()
    assert path == config.kubeconfig
    spec = api.csrs["csr-1"]["spec"]
    assert spec["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    assert spec["usages"] == ["digital signature", "client auth"]
    written = yaml.safe_load(open(path))
    assert written["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443", "certificate-authority": pki.ca.path}
    user = written["users"][0]["user"]
    pem = open(user["client-certificate"], "rb").read()
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"system:node:{NODE}"
    assert b"PRIVATE KEY" in open(user["client-key"], "rb").read()
    assert minikrust.bootstrap_client_certificate(config, api=api) == path
    assert len(api.csrs) == 1   # a valid kubeconfig is kept: no second CSR


# --- the Metrics registry ----------------------------------------------------------------------

def test_metrics_registry_counts_sets_observes_and_escapes_labels():
    metrics = minikrust.Metrics({})
    metrics.inc("x_total", reason='a "quoted"\nvalue')
    metrics.inc("x_total", 2, reason='a "quoted"\nvalue')
    metrics.set("y", 7)
    metrics.declare("z_seconds", "histogram", "Z.", buckets=(1, 5))
    for value in (0.5, 3, 9):
        metrics.observe("z_seconds", value)
    text = metrics.render()
    assert 'x_total{reason="a \\"quoted\\"\\nvalue"} 3' in text
    assert "# TYPE y gauge\ny 7" in text
    assert 'z_seconds_bucket{le="1"} 1\nz_seconds_bucket{le="5"} 2\nz_seconds_bucket{le="+Inf"} 3' in text
    assert "z_seconds_sum 12.5\nz_seconds_count 3" in text


# --- against the fake API server, with minikrust's own ApiClient ---------------------------------

def _node_api(fake, tmp_path):
    return minikrust.ApiClient(minikrust.load_kubeconfig(fake.write_kubeconfig(tmp_path / "node.kubeconfig", user=NODE)))


def test_webhook_auth_through_the_fake_api_server(make_server, fake_api, pki, tmp_path):
    api = _node_api(fake_api, tmp_path)
    try:
        kubelet, server = make_server(api=api)
        fake_api.token_users = {"good-token": ("carol", ["ops"])}
        fake_api.sar_policy = lambda spec: (spec["user"] == "carol", "only carol")

        def get(path, token=None, cert=None):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return requests.get(url(server, path), headers=headers, cert=cert, verify=pki.ca.path, timeout=10)

        assert get("/pods").status_code == 401
        assert get("/pods", token="bad-token").status_code == 401
        assert get("/stats/summary", token="good-token").status_code == 200
        denied = get("/pods", cert=pki.alice)
        assert denied.status_code == 403 and "only carol" in denied.text
        sar = fake_api.subject_access_reviews[0]
        assert sar["user"] == "carol" and sar["resourceAttributes"]["subresource"] == "stats"
        assert sar["resourceAttributes"]["name"] == NODE
    finally:
        api.close()


def test_serving_certificate_bootstrap_against_the_fake_api_server(make_server, fake_api, pki, tmp_path):
    api = _node_api(fake_api, tmp_path)
    try:
        _, server = make_server(api=api, tls=False, node_ip="127.0.0.1", rotate_server_certificates=True)
        (csr,) = wait_for(fake_api.csrs, timeout=20, what="a CSR in the fake API server")
        assert csr["spec"]["signerName"] == "kubernetes.io/kubelet-serving"
        assert csr["spec"]["username"] == f"system:node:{NODE}"
        # the test approves it and signs it with its own CA
        fake_api.approve_csr(csr["metadata"]["name"], certificate_pem=pki.ca.sign_csr(base64.b64decode(csr["spec"]["request"])))
        wait_for(lambda: requests.get(url(server, "/metrics"), verify=pki.ca.path, cert=pki.alice, timeout=5).ok,
                 timeout=20, what="HTTPS with the issued serving certificate")
    finally:
        api.close()


def test_client_certificate_bootstrap_against_the_fake_api_server(fake_api_tls, tmp_path):
    fake = fake_api_tls
    token = fake.add_bootstrap_token()
    bootstrap = fake.write_kubeconfig(tmp_path / "bootstrap.kubeconfig", token=token)
    config = minikrust.Config(root_dir=str(tmp_path / "root"), node_name=NODE, bootstrap_kubeconfig=bootstrap)
    fake.on_csr_created = lambda csr: threading.Timer(0.2, fake.approve_csr, [csr["metadata"]["name"]]).start()
    path = minikrust.bootstrap_client_certificate(config, timeout=20)
    assert path == os.path.join(config.root_dir, "kubelet.kubeconfig")
    (csr,) = fake.csrs()
    assert csr["spec"]["username"] == f"system:bootstrap:{token.split('.')[0]}"
    assert csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    api = minikrust.ApiClient(minikrust.load_kubeconfig(path))
    try:
        with pytest.raises(minikrust.ApiError) as refused:
            api.get(f"/api/v1/nodes/{NODE}")
        assert refused.value.code == 404      # authenticated as the node: its own Node does not exist yet
    finally:
        api.close()
    assert fake.requests[-1].user == f"system:node:{NODE}"


def test_a_failing_kubelet_call_is_a_500_and_the_server_keeps_serving(secure):
    def broken():
        raise RuntimeError("boom")
    secure.kubelet.pods = broken
    answer = secure.get("/pods")
    assert answer.status_code == 500
    assert secure.get("/metrics/resource").status_code == 200


def test_client_bootstrap_without_a_bootstrap_kubeconfig_keeps_the_kubeconfig(tmp_path):
    config = minikrust.Config(root_dir=str(tmp_path), kubeconfig="/somewhere/kubeconfig")
    assert minikrust.bootstrap_client_certificate(config) == "/somewhere/kubeconfig"


def test_kubelet_serves_its_api_and_stops_it(tmp_path):
    kubelet = minikrust.Kubelet(minikrust.Config(root_dir=str(tmp_path), port=0))
    with kubelet:
        answer = requests.get(f"http://127.0.0.1:{kubelet.server.port}/pods", timeout=10)
        assert answer.json()["kind"] == "PodList"
        assert "minikrust_module_starts_total" in requests.get(
            f"http://127.0.0.1:{kubelet.server.port}/metrics", timeout=10).text
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{kubelet.server.port}/healthz", timeout=2)


# --- kubectl logs, through an API server front that proxies pods/log to the kubelet -------------

class _ApiFront:
    """Forwards every request to the fake API server, except pods/log, which it proxies to the kubelet
    as kube-apiserver does (GET /containerLogs/<ns>/<pod>/<container>?<the same log options>)."""

    LOG_PATH = "/api/v1/namespaces/{ns}/pods/{pod}/log"

    def __init__(self, fake, kubelet_url, verify, cert):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", parts.path)
                if match:
                    query = urllib.parse.parse_qs(parts.query)
                    pod = fake.get("pods", match[1], match[2])
                    container = query.pop("container", [pod["spec"]["containers"][0]["name"]])[0]
                    target = (f"{kubelet_url}/containerLogs/{match[1]}/{match[2]}/{container}?"
                              + urllib.parse.urlencode(query, doseq=True))
                    upstream = requests.get(target, verify=verify, cert=cert, stream=True, timeout=60)
                else:
                    # kubectl sends no token over plain HTTP: the front speaks as admin
                    headers = {"Accept": self.headers.get("Accept", "application/json"),
                               "Authorization": f"Bearer {fake.admin_token}"}
                    upstream = requests.get(fake.url + self.path, headers=headers, stream=True, timeout=60)
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("Content-Type", "text/plain"))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in upstream.raw.stream(65536, decode_content=True):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    upstream.close()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kubectl_logs(secure, fake_api, pki, tmp_path):
    """`kubectl(*args)` against a fake API server whose pods/log reaches the secure kubelet server."""
    binary = kubectl_binary()
    fake_api.create_pod({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app", "image": "file:x.wasm"}]}},
                        node_name=NODE, namespace="default")
    front = _ApiFront(fake_api, url(secure.server, ""), pki.ca.path, pki.alice)
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "admin.kubeconfig")
    document = yaml.safe_load(open(kubeconfig))
    document["clusters"][0]["cluster"]["server"] = front.url
    with open(kubeconfig, "w") as handle:
        yaml.safe_dump(document, handle)

    def kubectl(*args, wait=True):
        command = [binary, "--kubeconfig", kubeconfig, *args]
        if not wait:
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    yield kubectl
    front.close()


def test_kubectl_logs_previous_timestamps_and_tail(secure, kubectl_logs):
    folder = os.path.dirname(secure.kubelet.add_container("web", "app", restart_count=1, lines=LINES))
    with open(os.path.join(folder, "0.log"), "w") as handle:
        handle.write(cri(T0 - 60, "stdout", "F", "the first run"))
    assert kubectl_logs("logs", "web") == "one\ntwo\nthree\nfour\n"
    assert kubectl_logs("logs", "web", "-c", "app", "--previous") == "the first run\n"
    stamped = kubectl_logs("logs", "web", "--timestamps", "--tail=2").splitlines()
    assert stamped == [f"{minikrust._rfc3339nano(int((T0 + 2) * 1e9))} three",
                       f"{minikrust._rfc3339nano(int((T0 + 3) * 1e9))} four"]
    assert kubectl_logs("logs", "web", "--limit-bytes=5") == "one\nt"


def test_kubectl_logs_follow_streams_until_the_container_ends(secure, kubectl_logs):
    path = secure.kubelet.add_container("web", "app", lines=[cri(T0, "stdout", "F", "hello")])
    follower = kubectl_logs("logs", "-f", "web", wait=False)
    try:
        assert follower.stdout.readline() == b"hello\n"
        with open(path, "a") as handle:
            handle.write(cri(time.time(), "stdout", "F", "written later"))
        assert follower.stdout.readline() == b"written later\n"
        secure.kubelet.set_state("web", "app", "terminated")
        assert follower.wait(timeout=20) == 0
    finally:
        follower.kill()
        follower.wait()


# --- a real Kubelet running a wasm pod ---------------------------------------------------------

def test_a_real_kubelet_streams_the_log_of_a_running_wasm_pod(fake_api, kubelet_factory, wasm, pki):
    kubelet = kubelet_factory(fake_api, node=NODE, serve=True, port=0, tls_cert_file=pki.server[0],
                              tls_private_key_file=pki.server[1], client_ca_file=pki.ca.path)
    fake_api.create_pod({"metadata": {"name": "sleeper"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "app", "image": f"file:{wasm.tool}", "args": ["sleep", "1500"]}]}}, node_name=NODE, namespace="default")
    wait_for(lambda: kubelet.container_log_path("default", "sleeper", "app"), timeout=30, what="the container's log")
    answer = requests.get(url(kubelet.server, "/containerLogs/default/sleeper/app?follow=true&timestamps=true"),
                          verify=pki.ca.path, cert=pki.alice, stream=True, timeout=30)
    lines = [line.decode().split(" ", 1) for line in answer.iter_lines()]   # ends when the run ends
    assert [text for _, text in lines] == ["sleeping", "woke"]
    assert all(minikrust._parse_rfc3339(stamp) for stamp, _ in lines)
    assert fake_api.subject_access_reviews[-1]["resourceAttributes"]["subresource"] == "proxy"
    phase = wait_for(lambda: (fake_api.get("pods", "default", "sleeper").get("status") or {}).get("phase") == "Succeeded",
                     timeout=30, what="the pod Succeeded")
    assert phase


def test_kubectl_logs_at_once_on_a_cluster_that_approves_nothing(fake_api_tls, kubelet_factory, wasm, tmp_path):
    """A kubelet with only --kubeconfig and --client-ca-file, on a cluster where nobody approves CSRs:
    it serves its self-signed certificate at once, which kube-apiserver accepts as it does by default
    (no --kubelet-certificate-authority), so kubectl logs, --tail, --timestamps and -f work."""
    binary = kubectl_binary()
    fake = fake_api_tls
    kubelet = kubelet_factory(fake, node=NODE, serve=True, port=0, client_ca_file=fake.pki.ca_path)
    fake.kubelet_address = {NODE: ("127.0.0.1", kubelet.server.port)}
    fake.create_pod({"metadata": {"name": "sleeper"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "app", "image": f"file:{wasm.tool}", "args": ["sleep", "1500"]}]}}, node_name=NODE, namespace="default")
    wait_for(lambda: kubelet.container_log_path("default", "sleeper", "app"), timeout=30, what="the container's log")
    kubeconfig = fake.write_kubeconfig(tmp_path / "admin.kubeconfig")

    def kubectl(*args):
        done = subprocess.run([binary, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert kubectl("logs", "-f", "sleeper") == "sleeping\nwoke\n"    # ends when the module exits
    assert kubectl("logs", "sleeper", "--tail=1") == "woke\n"
    stamps = [line.split(" ", 1) for line in kubectl("logs", "sleeper", "--timestamps").splitlines()]
    assert [text for _, text in stamps] == ["sleeping", "woke"] and all(minikrust._parse_rfc3339(t) for t, _ in stamps)
    assert fake.csrs() == []
    served = os.path.join(kubelet.config.root_dir, "pki", "kubelet-self-signed.pem")
    anonymous = requests.get(url(kubelet.server, "/containerLogs/default/sleeper/app"), verify=served, timeout=10)
    assert anonymous.status_code == 401


def test_kubectl_logs_end_to_end_with_a_bootstrapped_serving_certificate(fake_api_tls, kubelet_factory, wasm, tmp_path):
    """The whole path a user takes: the kubelet gets its serving certificate by CSR, the API server
    proxies pods/log to it with its kubelet-client certificate, the kubelet authorizes that by SAR."""
    binary = kubectl_binary()
    fake = fake_api_tls
    fake.on_csr_created = lambda csr: threading.Timer(0.1, fake.approve_csr, [csr["metadata"]["name"]]).start()
    kubelet = kubelet_factory(fake, node=NODE, serve=True, port=0, client_ca_file=fake.pki.ca_path,
                              rotate_server_certificates=True)
    fake.kubelet_address = {NODE: ("127.0.0.1", kubelet.server.port)}
    fake.kubelet_ca_path = fake.pki.ca_path      # the API server verifies the bootstrapped certificate
    fake.create_pod({"metadata": {"name": "sleeper"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "app", "image": f"file:{wasm.tool}", "args": ["sleep", "1500"]}]}}, node_name=NODE, namespace="default")
    wait_for(lambda: kubelet.container_log_path("default", "sleeper", "app"), timeout=30, what="the container's log")
    wait_for(lambda: fake.csrs() and fake.csrs()[0].get("status", {}).get("certificate"), timeout=20,
             what="the serving certificate issued")
    wait_for(lambda: requests.get(url(kubelet.server, "/healthz"), verify=fake.pki.ca_path, timeout=5).ok,
             timeout=20, what="the issued serving certificate served")
    kubeconfig = fake.write_kubeconfig(tmp_path / "admin.kubeconfig")

    def kubectl(*args):
        done = subprocess.run([binary, "--kubeconfig", kubeconfig, *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert kubectl("logs", "-f", "sleeper") == "sleeping\nwoke\n"    # ends when the module exits
    stamp, text = kubectl("logs", "sleeper", "--timestamps", "--tail=1").split()
    assert text == "woke" and minikrust._parse_rfc3339(stamp)
    (csr,) = [c for c in fake.csrs() if c["spec"]["signerName"] == "kubernetes.io/kubelet-serving"]
    assert csr["spec"]["username"] == f"system:node:{NODE}"
    assert fake.subject_access_reviews[-1]["user"] == "kube-apiserver-kubelet-client"


def test_a_kubelet_with_only_a_bootstrap_token_joins_with_its_bootstrapped_client_certificate(fake_api_tls, tmp_path):
    fake = fake_api_tls
    bootstrap = fake.write_kubeconfig(tmp_path / "bootstrap.kubeconfig", token=fake.add_bootstrap_token())
    fake.on_csr_created = lambda csr: threading.Timer(0.1, fake.approve_csr, [csr["metadata"]["name"]]).start()
    config = minikrust.Config(root_dir=str(tmp_path / "root"), node_name=NODE, node_ip="127.0.0.1", serve=False,
                              bootstrap_kubeconfig=bootstrap, kubeconfig=str(tmp_path / "kubelet.kubeconfig"))
    kubelet = minikrust.Kubelet(config)
    try:
        kubelet.start()
        wait_for(lambda: fake.get("nodes", NODE), timeout=20, what="the Node registered")
        assert fake.count(method="POST", path="/api/v1/nodes$", user=f"system:node:{NODE}") == 1
    finally:
        kubelet.stop()
    assert os.path.exists(os.path.join(config.root_dir, "pki", "kubelet-client-current.pem"))
