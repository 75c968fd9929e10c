"""Config: flags and MINIKRUST_* variables, kubeconfig in every auth form, in-cluster config,
and one clear error line (exit code 2) for each broken configuration."""
import base64
import datetime
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading

import pytest
import yaml

import minikrust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- flags and environment ---

def test_defaults_make_a_standalone_config():
    config = minikrust.Config()
    assert config.kubeconfig is None and config.port == 10250 and config.max_pods == 110
    assert config.sync == "watch" and config.node_name and os.path.isabs(config.root_dir)


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {"MINIKRUST_NODE_NAME": "from-env", "MINIKRUST_MAX_PODS": "7", "MINIKRUST_SYNC": "poll"}
    config = minikrust.parse_args(["--node-name", "from-flag", "--poll-interval", "2.5"], env)
    assert config.node_name == "from-flag"
    assert config.max_pods == 7 and config.sync == "poll" and config.poll_interval == 2.5


def test_every_flag_can_come_from_its_environment_variable():
    samples = {int: "3", float: "1.5", minikrust._parse_bool: "true", minikrust._parse_list: "a,b",
               minikrust._parse_labels: "a=b,c=d", minikrust._PARSERS["size"]: "1Mi"}
    for flag, convert, _help in minikrust._FLAGS:
        field = flag[2:].replace("-", "_")
        raw = {"sync": "poll", "log_level": "debug", "log_format": "json", "node_ip": "10.0.0.1",
               "image_pull_credentials_verification_policy": "AlwaysVerify",
               "image_gc_high_threshold": "90"}.get(      # above the default low threshold (80)
            field, samples.get(convert, "x"))
        config = minikrust.parse_args([], {"MINIKRUST_" + field.upper(): raw})
        assert getattr(config, field) == convert(raw), flag


def test_list_label_and_boolean_flags():
    config = minikrust.parse_args(["--node-labels", "zone=a,tier=wasm", "--allowed-host-paths", "/a,/b",
                                   "--once", "--serve", "false", "--container-log-max-size", "2Mi"], {})
    assert config.node_labels == {"zone": "a", "tier": "wasm"}
    assert config.allowed_host_paths == ("/a", "/b")
    assert config.once is True and config.serve is False and config.container_log_max_size == 2 * 1024 * 1024


def test_bad_environment_value_names_the_variable():
    with pytest.raises(minikrust.ConfigError, match="MINIKRUST_MAX_PODS"):
        minikrust.parse_args([], {"MINIKRUST_MAX_PODS": "many"})
    with pytest.raises(minikrust.ConfigError, match="--node-labels"):
        minikrust.parse_args(["--node-labels", "novalue"], {})


def test_config_is_frozen():
    with pytest.raises(Exception):
        minikrust.Config().port = 1


def test_version_flag_prints_the_version():
    done = subprocess.run([sys.executable, "minikrust.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and minikrust.__version__ in done.stdout


# --- a real TLS server with a generated CA and client certificates ---

def _make_ca_and_certs(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False, san=None, client=False):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if client:
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = cert("test-ca", ca_key, ca_name, ca_key, ca=True)
    files = {}
    for kind, san, client in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], False),
                              ("named", [x509.DNSName("api.internal")], False),
                              ("client", None, True)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert("system:node:n1" if client else kind, key, ca_name, ca_key, san=san, client=client)
        files[kind + ".crt"] = c.public_bytes(serialization.Encoding.PEM)
        files[kind + ".key"] = pem_key(key)
    files["ca.crt"] = ca.public_bytes(serialization.Encoding.PEM)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


class _Recorder(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
        cn = None
        if peer:
            cn = dict(x[0] for x in peer["subject"]).get("commonName")
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "cn": cn})
        status = self.server.answers.pop(0) if self.server.answers else 200
        body = json.dumps({"kind": "Status", "code": status} if status >= 400 else {"kind": "APIVersions"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(tmp_path=None, cert="server", tls=True):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.answers = [], []
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / f"{cert}.crt", tmp_path / f"{cert}.key")
        ctx.load_verify_locations(tmp_path / "ca.crt")
        ctx.verify_mode = ssl.CERT_OPTIONAL
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def pki(tmp_path):
    return _make_ca_and_certs(tmp_path)


@pytest.fixture
def tls_server(tmp_path, pki):
    server = _serve(tmp_path)
    yield server
    server.shutdown()
    server.server_close()


def _kubeconfig(tmp_path, cluster, user, name="kubeconfig", extra_contexts=()):
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "main",
           "clusters": [{"name": "c", "cluster": cluster}],
           "users": [{"name": "u", "user": user}],
           "contexts": [{"name": "main", "context": {"cluster": "c", "user": "u"}}, *extra_contexts]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _url(server):
    return f"https://127.0.0.1:{server.server_address[1]}"


def _b64(data):
    return base64.b64encode(data).decode()


def _get(path, context=None, then=None):
    """GET /api with a client of the kubeconfig at `path`; with `then`: call it, and GET again."""
    api = minikrust.ApiClient(minikrust.load_kubeconfig(path, context), retries=0)
    try:
        answer = api.get("/api")
        if then is not None:
            then()
            answer = api.get("/api")
        return answer
    finally:
        api.close()


def test_ca_file_and_token(tmp_path, tls_server):
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, {"token": "t0k"})
    assert _get(path)["kind"] == "APIVersions"
    assert tls_server.seen[-1]["auth"] == "Bearer t0k"


def test_a_named_ca_is_the_only_one_trusted(tmp_path, pki):
    """client-go's rootCAs: the kubeconfig's CA (file or data) replaces the system's, it does not add to them."""
    for cluster in ({"certificate-authority": "ca.crt"}, {"certificate-authority-data": _b64(pki["ca.crt"])}):
        path = _kubeconfig(tmp_path, {"server": "https://127.0.0.1:6443", **cluster}, {"token": "t"})
        assert minikrust.load_kubeconfig(path).ssl_context().cert_store_stats()["x509_ca"] == 1, cluster


def test_ca_data_and_client_certificate_files(tmp_path, pki, tls_server):
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority-data": _b64(pki["ca.crt"])},
                       {"client-certificate": str(tmp_path / "client.crt"), "client-key": "client.key"})
    _get(path)
    assert tls_server.seen[-1]["cn"] == "system:node:n1" and tls_server.seen[-1]["auth"] is None


def test_client_certificate_data_leaves_no_key_file_behind(tmp_path, pki, tls_server):
    import tempfile
    before = set(os.listdir(tempfile.gettempdir()))
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"},
                       {"client-certificate-data": _b64(pki["client.crt"]), "client-key-data": _b64(pki["client.key"])})
    _get(path)
    assert tls_server.seen[-1]["cn"] == "system:node:n1"
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("minikrust-tls-")]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_unknown_ca_is_refused_and_insecure_skip_verify_accepts(tmp_path, tls_server):
    path = _kubeconfig(tmp_path, {"server": _url(tls_server)}, {"token": "x"})
    with pytest.raises(minikrust.ApiError) as err:
        _get(path)
    assert err.value.code == 0 and "certificate" in str(err.value).lower()
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "insecure-skip-tls-verify": True}, {"token": "x"})
    assert _get(path)["kind"] == "APIVersions"


def test_tls_server_name_is_the_name_verified(tmp_path, pki):
    server = _serve(tmp_path, cert="named")
    try:
        cluster = {"server": _url(server), "certificate-authority": "ca.crt"}
        with pytest.raises(minikrust.ApiError):
            _get(_kubeconfig(tmp_path, cluster, {"token": "x"}))
        _get(_kubeconfig(tmp_path, dict(cluster, **{"tls-server-name": "api.internal"}), {"token": "x"}))
        assert server.seen
    finally:
        server.shutdown()
        server.server_close()


def test_basic_auth(tmp_path, tls_server):
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"},
                       {"username": "admin", "password": "s3cret"})
    _get(path)
    assert tls_server.seen[-1]["auth"] == "Basic " + _b64(b"admin:s3cret")


def test_token_file_is_reread_when_rotated(tmp_path, tls_server):
    token = tmp_path / "token"
    token.write_text("first\n")
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, {"tokenFile": "token"})

    def rotate():
        token.write_text("second\n")
        os.utime(token, (1, 1))
    _get(path, then=rotate)
    assert [s["auth"] for s in tls_server.seen] == ["Bearer first", "Bearer second"]


def _exec_plugin(tmp_path, expires_in=3600):
    counter = tmp_path / "calls"
    script = tmp_path / "plugin.py"
    script.write_text(f"""import datetime, json, os, sys
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
assert info["kind"] == "ExecCredential" and info["spec"]["cluster"]["server"].startswith("https://")
n = len(open({str(counter)!r}).read()) if os.path.exists({str(counter)!r}) else 0
open({str(counter)!r}, "a").write("x")
exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds={expires_in})
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
    "status": {{"token": os.environ["PREFIX"] + str(n), "expirationTimestamp": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}))
""")
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(script)], "env": [{"name": "PREFIX", "value": "exec-"}],
                     "interactiveMode": "Never"}}
    return user, counter


@pytest.mark.parametrize("expires_in, tokens", [(3600, ["exec-0", "exec-0"]), (-1, ["exec-0", "exec-1"])],
                         ids=["cached until expiry", "runs again after expiry"])
def test_exec_plugin_token_is_cached_until_expiry(tmp_path, tls_server, expires_in, tokens):
    user, counter = _exec_plugin(tmp_path, expires_in)
    _get(_kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, user),
         then=lambda: None)
    assert [s["auth"] for s in tls_server.seen] == [f"Bearer {token}" for token in tokens]
    assert counter.read_text() == "x" * len(set(tokens))      # the plugin's runs


def test_exec_plugin_runs_again_on_401(tmp_path, tls_server):
    user, counter = _exec_plugin(tmp_path)
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, user)
    _get(path, then=lambda: tls_server.answers.append(401))    # the plugin runs again, the GET is repeated
    assert [s["auth"] for s in tls_server.seen] == ["Bearer exec-0", "Bearer exec-0", "Bearer exec-1"]


def test_current_context_or_the_named_context(tmp_path, tls_server):
    other = {"name": "other", "context": {"cluster": "c", "user": "u2"}}
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, {"token": "main"},
                       extra_contexts=[other])
    doc = yaml.safe_load(open(path))
    doc["users"].append({"name": "u2", "user": {"token": "second"}})
    open(path, "w").write(yaml.safe_dump(doc))
    _get(path)
    _get(path, context="other")
    assert [s["auth"] for s in tls_server.seen] == ["Bearer main", "Bearer second"]


def test_proxy_url_sends_requests_through_the_proxy(tmp_path):
    proxy = _serve(tls=False)
    try:
        path = _kubeconfig(tmp_path, {"server": "http://api.invalid:6443",
                                      "proxy-url": f"http://127.0.0.1:{proxy.server_address[1]}"}, {"token": "p"})
        _get(path)
        assert proxy.seen[-1]["path"] == "http://api.invalid:6443/api"
        assert proxy.seen[-1]["auth"] == "Bearer p"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_in_cluster_config(tmp_path):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(_make_ca_and_certs(tmp_path)["ca.crt"])
    cluster = minikrust.in_cluster_config({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                                          sa_dir=str(tmp_path))
    assert cluster.server == "https://10.0.0.1:443" and cluster.token_file == str(tmp_path / "token")
    with pytest.raises(minikrust.ConfigError, match="KUBERNETES_SERVICE_HOST"):
        minikrust.in_cluster_config({}, sa_dir=str(tmp_path))
    with pytest.raises(minikrust.ConfigError, match="token"):
        minikrust.in_cluster_config({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"},
                                    sa_dir=str(tmp_path / "missing"))


def test_secrets_stay_out_of_repr(tmp_path):
    cluster = minikrust.ClusterConfig(server="https://x", token="tok-secret", password="pw-secret")
    assert "secret" not in repr(cluster)


# --- broken configurations: one error line naming the file and the field, exit code 2 ---

BROKEN = {
    "not yaml": ("clusters: [", "not valid YAML"),
    "not a mapping": ("- a\n- b\n", "not a kubeconfig"),
    "no current context": ({"clusters": [], "users": [], "contexts": []}, "current-context"),
    "unknown context": ({"current-context": "nope", "contexts": []}, "contexts: no context named 'nope'"),
    "unknown cluster": ({"current-context": "m", "contexts": [{"name": "m", "context": {"cluster": "x", "user": "u"}}],
                         "clusters": [], "users": []}, "clusters: no cluster named 'x'"),
    "no server": ({"current-context": "m", "contexts": [{"name": "m", "context": {"cluster": "c"}}],
                   "clusters": [{"name": "c", "cluster": {}}]}, "clusters[c].cluster.server: missing"),
    "bad server": ({"current-context": "m", "contexts": [{"name": "m", "context": {"cluster": "c"}}],
                    "clusters": [{"name": "c", "cluster": {"server": "ftp://x"}}]}, "clusters[c].cluster.server"),
}


def _broken_user(user, cluster_extra=None):
    return {"current-context": "m", "contexts": [{"name": "m", "context": {"cluster": "c", "user": "u"}}],
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", **(cluster_extra or {})}}],
            "users": [{"name": "u", "user": user}]}


BROKEN.update({
    "missing CA file": (_broken_user({}, {"certificate-authority": "nope.crt"}), "clusters[c].cluster.certificate-authority: file"),
    "bad CA data": (_broken_user({}, {"certificate-authority-data": "%%%"}), "certificate-authority-data: not valid base64"),
    "CA data not a certificate": (_broken_user({}, {"certificate-authority-data": _b64(b"hello")}), "certificate-authority"),
    "cert without key": (_broken_user({"client-certificate-data": _b64(b"x")}), "users[u].user.client-key: missing"),
    "missing token file": (_broken_user({"tokenFile": "/nonexistent/token"}), "users[u].user.tokenFile: file"),
    "exec wrong apiVersion": (_broken_user({"exec": {"apiVersion": "v0", "command": "x"}}), "users[u].user.exec.apiVersion"),
    "exec without command": (_broken_user({"exec": {"apiVersion": "client.authentication.k8s.io/v1"}}), "exec.command: missing"),
    "auth provider": (_broken_user({"auth-provider": {"name": "gcp"}}), "users[u].user.auth-provider: not supported"),
    "insecure not a bool": (_broken_user({}, {"insecure-skip-tls-verify": "yes"}), "insecure-skip-tls-verify"),
})


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_kubeconfig_is_one_clear_error_naming_file_and_field(tmp_path, case, capsys):
    content, expected = BROKEN[case]
    path = tmp_path / "kc"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(minikrust.ConfigError) as err:
        minikrust.load_kubeconfig(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)
    assert minikrust.main(["--kubeconfig", str(path), "--root-dir", str(tmp_path / "root")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minikrust: error: ") and str(path) in lines[0]


def test_missing_kubeconfig_exits_2_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "minikrust.py", "--kubeconfig", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"minikrust: error: {tmp_path / 'nope'}: cannot read kubeconfig: "
                                                "No such file or directory"]


def test_exec_plugin_failure_names_the_field(tmp_path):
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": ["-c", "import sys; sys.exit(3)"]}}
    path = _kubeconfig(tmp_path, {"server": "http://127.0.0.1:1"}, user)
    api = minikrust.ApiClient(minikrust.load_kubeconfig(path), retries=0)
    with pytest.raises(minikrust.ConfigError, match=r"users\[u\]\.user\.exec: plugin .* exited 3"):
        api.get("/api")
    api.close()


def test_exec_plugin_client_certificate(tmp_path, pki, tls_server):
    script = tmp_path / "certplugin.py"
    script.write_text(f"""import json
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {{
    "clientCertificateData": open({str(tmp_path / 'client.crt')!r}).read(),
    "clientKeyData": open({str(tmp_path / 'client.key')!r}).read()}}}}))
""")
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(script)]}}
    path = _kubeconfig(tmp_path, {"server": _url(tls_server), "certificate-authority": "ca.crt"}, user)
    _get(path)
    assert tls_server.seen[-1]["cn"] == "system:node:n1" and tls_server.seen[-1]["auth"] is None


def test_a_failing_exec_plugin_stops_the_cli_with_exit_code_2(tmp_path, capsys):
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(tmp_path / "missing-plugin"),
                     "installHint": "get the plugin\nfrom your admin"}}
    path = _kubeconfig(tmp_path, {"server": "http://127.0.0.1:1"}, user)
    assert minikrust.main(["--kubeconfig", path, "--root-dir", str(tmp_path / "root"), "--serve", "false"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "users[u].user.exec.command: cannot run" in lines[0]
    assert lines[0].endswith("(get the plugin from your admin)")


@pytest.mark.parametrize("argv, expected", [
    (["--node-name", "Bad_Name"], "--node-name: 'Bad_Name' is not a valid node name (lowercase DNS subdomain)"),
    (["--node-ip", "10.0.0.300"], "--node-ip: '10.0.0.300' is not an IP address"),
    (["--port", "70000"], "--port: 70000 is not a port number"),
    (["--max-pods", "0"], "--max-pods: 0 must be positive"),
    (["--sync", "push"], "--sync: 'push' is not one of watch, poll"),
])
def test_unusable_flag_values_are_one_clear_error(argv, expected, capsys):
    assert minikrust.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"minikrust: error: {expected}"


def test_an_unknown_flag_exits_2():
    done = subprocess.run([sys.executable, "minikrust.py", "--no-such-flag"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--no-such-flag" in done.stderr


@pytest.mark.parametrize("labels, ok", [
    ("zone=a,example.com/tier=wasm,kubelet.kubernetes.io/role=edge,node.kubernetes.io/pool=x", True),
    ("topology.kubernetes.io/zone=z1,node-role.kubernetes.io/worker=", False),
    ("bad key=x", False),
    ("k=bad value", False),
])
def test_node_labels_the_node_may_not_set_are_refused(labels, ok):
    if ok:
        assert minikrust.parse_args(["--node-labels", labels], {}).node_labels
    else:
        with pytest.raises(minikrust.ConfigError, match="--node-labels"):
            minikrust.parse_args(["--node-labels", labels], {})


@pytest.mark.parametrize("values, field", [
    ({"port": -1}, "port"), ({"port": 70000}, "port"), ({"port": "80"}, "port"), ({"max_pods": 0}, "max_pods"),
    ({"sync": "bogus"}, "sync"), ({"log_format": "xml"}, "log_format"), ({"once": "yes"}, "once"),
    ({"poll_interval": float("nan")}, "poll_interval"), ({"poll_interval": float("inf")}, "poll_interval"),
    ({"resync_interval": -5.0}, "resync_interval"), ({"lease_renew_interval": 1e300}, "lease_renew_interval"),
    ({"node_name": "Bad_Name"}, "node_name"), ({"node_ip": "not-an-ip"}, "node_ip"),
    ({"allowed_host_paths": (1,)}, "allowed_host_paths"), ({"node_labels": {"a": 1}}, "node_labels"),
    ({"image_gc_high_threshold": 101}, "image_gc_high_threshold"), ({"container_log_max_files": True}, "container_log_max_files"),
    ({"container_log_max_size": -1}, "container_log_max_size"), ({"backoff_base": 0}, "backoff_base"),
    ({"root_dir": None}, "root_dir"),
])
def test_config_refuses_bad_values_naming_the_field(values, field):
    with pytest.raises(minikrust.ConfigError, match=rf"^Config\.{field}: "):
        minikrust.Config(**values)


def test_config_accepts_its_defaults_and_ordinary_values():
    minikrust.Config()
    minikrust.Config(port=0, poll_interval=1, allowed_host_paths=["/tmp"], node_ip="10.0.0.1", max_pods=1)
    with pytest.raises(minikrust.ConfigError, match="image_gc_low_threshold"):
        minikrust.Config(image_gc_high_threshold=50, image_gc_low_threshold=60)


def test_flags_out_of_range_are_named_as_flags():
    with pytest.raises(minikrust.ConfigError, match=r"^--image-gc-high-threshold: 200 is not between 0 and 100"):
        minikrust.parse_args(["--image-gc-high-threshold", "200"], {})
    with pytest.raises(minikrust.ConfigError, match=r"^--poll-interval: nan "):
        minikrust.parse_args(["--poll-interval", "nan"], {})
