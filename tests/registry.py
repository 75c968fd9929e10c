"""Fixtures: real OCI registries (Debian's docker-registry, the CNCF distribution registry).

Three session-wide registries on 127.0.0.1: `registry` (no auth), `basic_registry` (htpasswd),
`token_registry` (the registry's token auth, tokens from a small token server here, signed with a
throwaway key). `registry_factory` starts more (for tests that stop one), `registry_proxy` puts a
proxy in front of one that counts, corrupts or cuts blob downloads. Push helpers publish a module
in each format minikrust pulls, with plain requests (so the client under test is not also the
publisher)."""
import base64
import collections
import datetime
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
import uuid

import pytest
import requests

from tests.helpers import unavailable

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "correct-horse-battery"
SERVICE, ISSUER = "minikrust-test-registry", "minikrust-test-token-issuer"

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def fake_module(size=1024, seed=b""):
    """Bytes that start like a WASI module (magic + version) followed by deterministic filler."""
    filler = hashlib.sha256(seed or uuid.uuid4().bytes).digest()
    body = (filler * (size // len(filler) + 1))[:max(0, size - 8)]
    return b"\0asm\x01\0\0\0" + body


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One docker-registry process; `host` is what image references use (127.0.0.1:port)."""

    def __init__(self, workdir, auth=None, tls=None):
        self.workdir = workdir
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.auth = auth or {}
        self.tls = tls          # (cert path, key path): serve HTTPS
        self.proc = None
        self.push_auth = None   # requests auth for pushes (basic) or a callable giving headers

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(self.workdir, "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.auth:
            config["auth"] = self.auth
        if self.tls:
            config["http"]["tls"] = {"certificate": self.tls[0], "key": self.tls[1]}
        path = os.path.join(self.workdir, "config.yml")
        with open(path, "w") as f:
            json.dump(config, f)   # JSON is YAML
        self._log = open(os.path.join(self.workdir, "registry.log"), "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", path], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start; see {self._log.name}")
                time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        self.proc = None

    # -- pushing, with plain requests --

    def _headers(self, repo):
        if callable(self.push_auth):
            return self.push_auth(repo)
        return {}

    def _basic(self):
        return self.push_auth if isinstance(self.push_auth, tuple) else None

    def push_blob(self, repo, data):
        digest = sha256(data)
        r = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=self._headers(repo), auth=self._basic())
        assert r.status_code == 202, r.text
        location = urllib.parse.urljoin(r.url, r.headers["Location"])
        sep = "&" if "?" in location else "?"
        r = requests.put(f"{location}{sep}digest={digest}", data=data, auth=self._basic(),
                         headers={**self._headers(repo), "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return {"digest": digest, "size": len(data)}

    def push_manifest(self, repo, reference, doc, media_type):
        body = json.dumps(doc).encode()
        r = requests.put(f"{self.url}/v2/{repo}/manifests/{reference}", data=body, auth=self._basic(),
                         headers={**self._headers(repo), "Content-Type": media_type})
        assert r.status_code == 201, r.text
        return sha256(body)

    def _manifest(self, repo, tag, config, config_type, layers, media_type=MT_OCI_MANIFEST):
        cdesc = dict(self.push_blob(repo, config), mediaType=config_type)
        ldescs = [dict(self.push_blob(repo, data), mediaType=mt) for data, mt in layers]
        doc = {"schemaVersion": 2, "mediaType": media_type, "config": cdesc, "layers": ldescs}
        return self.push_manifest(repo, tag, doc, media_type)

    def push_cncf(self, repo, tag, module, os_name="wasip1"):
        """The CNCF Wasm OCI artifact: wasm config v0, one application/wasm layer."""
        config = json.dumps({"created": "2026-01-01T00:00:00Z", "architecture": "wasm", "os": os_name,
                             "layerDigests": [sha256(module)]}).encode()
        return self._manifest(repo, tag, config, "application/vnd.wasm.config.v0+json",
                              [(module, "application/wasm")])

    def push_wasm_to_oci(self, repo, tag, module):
        """wasm-to-oci's layout (what Krustlet pulled): config v1+json, content.layer.v1+wasm."""
        return self._manifest(repo, tag, b"{}", "application/vnd.wasm.config.v1+json",
                              [(module, "application/vnd.wasm.content.layer.v1+wasm")])

    def push_tar_image(self, repo, tag, module, entrypoint="/app/hello.wasm", gzipped=True, docker=False,
                       extra_layer=True):
        """An ordinary image for platform wasi/wasm: the module in a tar layer, Entrypoint naming it."""
        config = json.dumps({"architecture": "wasm", "os": "wasi",
                             "config": {"Entrypoint": [entrypoint]},
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        layers = []
        tar_type = ("application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else
                    "application/vnd.oci.image.layer.v1.tar+gzip" if gzipped else
                    "application/vnd.oci.image.layer.v1.tar")
        if extra_layer:
            layers.append((_tar({"etc/motd": b"hello\n"}, gzipped or docker), tar_type))
        layers.append((_tar({entrypoint.lstrip("/"): module, "README": b"x"}, gzipped or docker), tar_type))
        return self._manifest(repo, tag, config,
                              "application/vnd.docker.container.image.v1+json" if docker else
                              "application/vnd.oci.image.config.v1+json",
                              layers, MT_DOCKER_MANIFEST if docker else MT_OCI_MANIFEST)

    def push_index(self, repo, tag, entries):
        """An OCI index over manifests already pushed: entries = [(manifest digest, os, arch)]."""
        manifests = []
        for digest, os_name, arch in entries:
            r = requests.get(f"{self.url}/v2/{repo}/manifests/{digest}", auth=self._basic(),
                             headers={**self._headers(repo), "Accept": MT_OCI_MANIFEST + "," + MT_DOCKER_MANIFEST})
            manifests.append({"mediaType": r.headers["Content-Type"], "digest": digest,
                              "size": len(r.content), "platform": {"os": os_name, "architecture": arch}})
        doc = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}
        return self.push_manifest(repo, tag, doc, MT_OCI_INDEX)


def _tar(files, gzipped):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue()) if gzipped else raw.getvalue()


# -- the token server --

def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry bearer tokens (RS256 JWT with the cert in x5c): USER/PASSWORD may pull and
    push anything; anonymous callers may pull repositories under `public/`; a wrong password is 401."""

    def __init__(self, workdir):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "minikrust test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = os.path.join(workdir, "token-signer.pem")
        os.makedirs(workdir, exist_ok=True)
        with open(self.cert_path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        self.requests = []   # (username or None, scope) of every token request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                user = server._user(self.headers.get("Authorization", ""))
                if user is False:
                    return self._send(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                scopes = query.get("scope", [])
                server.requests.append((user, scopes))
                return self._send(200, {"token": server.token(user, scopes, query.get("service", [""])[0])})

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _user(self, header):
        """None for anonymous, the user name for good credentials, False for bad ones."""
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if (user, password) == (USER, PASSWORD) else False

    def token(self, user, scopes, service):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            allowed = {"pull", "push"} if user else ({"pull"} if name.startswith("public/") else set())
            granted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user or "", "aud": service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._der).decode()]}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- a proxy in front of a registry --

class RegistryProxy:
    """Forwards to a registry; counts blob GETs; may corrupt blobs or cut the first N downloads."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.blob_gets = collections.Counter()
        self.corrupt = False
        self.cut = 0            # cut this many blob downloads (of blobs over 1 KiB) halfway
        self.ranges = []        # the Range header of each blob GET (None for whole blobs)
        self.requests = []      # (method, path) of every request
        self.delay = 0.0        # seconds to wait before answering a blob GET
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                proxy._forward(self)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _forward(self, h):
        self.requests.append((h.command, h.path))
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        resp = requests.request(h.command, self.upstream.url + h.path, headers=headers, allow_redirects=False)
        body = resp.content
        is_blob = h.command == "GET" and "/blobs/sha256:" in h.path and resp.status_code in (200, 206)
        cut = False
        if is_blob:
            with self._lock:
                self.blob_gets[h.path.rsplit("/", 1)[-1]] += 1
                self.ranges.append(h.headers.get("Range"))
                if self.cut > 0 and len(body) > 1024:
                    self.cut -= 1
                    cut = True
            time.sleep(self.delay)
            if self.corrupt and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
        h.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if cut:
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- fixtures --

def _need_registry():
    if not os.path.exists(REGISTRY_BIN):
        unavailable(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A registry without auth."""
    _need_registry()
    reg = Registry(str(tmp_path_factory.mktemp("registry"))).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    """A registry with htpasswd basic auth: USER / PASSWORD."""
    _need_registry()
    if not shutil.which("htpasswd"):
        unavailable("htpasswd is not installed (apt-get install apache2-utils)")
    workdir = str(tmp_path_factory.mktemp("basic-registry"))
    htpasswd = os.path.join(workdir, "htpasswd")
    subprocess.run(["htpasswd", "-Bbc", htpasswd, USER, PASSWORD], check=True, capture_output=True)
    reg = Registry(workdir, auth={"htpasswd": {"realm": "minikrust-test", "path": htpasswd}})
    reg.push_auth = (USER, PASSWORD)
    yield reg.start()
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """A registry with token auth; `reg.tokens` is the TokenServer (anonymous pulls of public/*)."""
    _need_registry()
    workdir = str(tmp_path_factory.mktemp("token-registry"))
    tokens = TokenServer(workdir)
    reg = Registry(workdir, auth={"token": {"realm": tokens.realm, "service": SERVICE, "issuer": ISSUER,
                                            "rootcertbundle": tokens.cert_path}})
    reg.tokens = tokens

    def push_headers(repo):
        token = tokens.token(USER, [f"repository:{repo}:pull,push"], SERVICE)
        return {"Authorization": f"Bearer {token}"}
    reg.push_auth = push_headers
    yield reg.start()
    reg.stop()
    tokens.close()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory, test_pki):
    """A registry without auth over HTTPS, its certificate signed by `test_pki`'s CA (127.0.0.1)."""
    _need_registry()
    reg = Registry(str(tmp_path_factory.mktemp("tls-registry")),
                   tls=(test_pki.server_cert_path, test_pki.server_key_path)).start()
    yield reg
    reg.stop()


@pytest.fixture
def registry_factory(tmp_path):
    """Start extra no-auth registries (stopped at teardown): `registry_factory()` -> Registry."""
    _need_registry()
    started = []

    def start():
        reg = Registry(str(tmp_path / f"registry-{len(started)}")).start()
        started.append(reg)
        return reg
    yield start
    for reg in started:
        reg.stop()


@pytest.fixture
def registry_proxy(registry):
    """A RegistryProxy in front of the `registry` fixture."""
    proxy = RegistryProxy(registry)
    yield proxy
    proxy.close()
