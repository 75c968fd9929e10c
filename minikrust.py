"""minikrust: a minimal, single-file kubelet that runs WebAssembly (WASI preview 1) modules as
the containers of Kubernetes pods.

Two ways to use it:

    # CLI: join a cluster as a Node, or run static pods from a folder with no cluster at all
    python minikrust.py --kubeconfig ~/.kube/config
    python minikrust.py --pod-manifest-path examples/ --once

    # Library: drive a kubelet in-process (tests, hollow nodes)
    import minikrust
    with minikrust.Kubelet(minikrust.Config(pod_manifest_path="examples")) as kubelet:
        ...

Modules run on wasmtime through the compiled `_wasihost` extension when it is installed, else
through the `wasmtime` Python package (slower, same behaviour).
"""

__version__ = "0.1.0"
__all__ = [
    "MinikrustError", "ConfigError", "ApiError", "ImageError", "ModuleError", "ContainerConfigError",
    "Config", "Kubelet", "main", "parse_args", "ClusterConfig", "load_kubeconfig", "in_cluster_config",
    "ModuleLoadError", "ModuleRunError", "RunResult", "FallbackHost", "load_host", "module_errors",
]

import argparse
import base64
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import http.server
import io
import json
import logging
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

import requests
import yaml

log = logging.getLogger("minikrust")


###############################################################################
# Exceptions ##################################################################
###############################################################################

class MinikrustError(Exception):
    """Base class of every error minikrust raises."""


class ConfigError(MinikrustError):
    """A flag, environment variable, kubeconfig or manifest that cannot be used."""


class ApiError(MinikrustError):
    """An error answer of the API server; carries its Status (code, reason, message)."""

    def __init__(self, code, reason="", message="", status=None):
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}


class ImageError(MinikrustError):
    """A module that cannot be pulled or resolved; `reason` is the container waiting reason."""

    def __init__(self, message, reason="ErrImagePull"):
        super().__init__(message)
        self.reason = reason
        self.message = message


class ModuleError(MinikrustError):
    """A module that cannot be loaded or started (invalid wasm, missing _start, bad import)."""


class ContainerConfigError(MinikrustError):
    """A container that cannot be set up (missing configMap/secret, refused hostPath, bad volume).

    `reason` is the container's waiting reason (CreateContainerConfigError, ...); `retry` tells
    whether the kubelet should try again later (a configMap that may still be created)."""

    def __init__(self, message, reason="CreateContainerConfigError", retry=True):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


# --- Config: flags, environment, kubeconfig, in-cluster ---

KUBE_VERSION = "v1.36.0"        # the Kubernetes API level this kubelet speaks, reported as v1.36.0-minikrust
_ENV_PREFIX = "MINIKRUST_"


def _default_node_name():
    return socket.gethostname().lower()


@dataclass(frozen=True)
class Config:
    """Every setting of one kubelet, named after the real kubelet's flags; `Config()` is a valid
    standalone configuration (no kubeconfig: no API server, static pods only)."""
    kubeconfig: str = None
    context: str = None
    node_name: str = field(default_factory=_default_node_name)
    node_ip: str = None
    port: int = 10250
    root_dir: str = field(default_factory=lambda: os.path.expanduser("~/.minikrust"))
    max_pods: int = 110
    node_labels: dict = field(default_factory=dict)
    pod_manifest_path: str = None
    sync: str = "watch"
    poll_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "text"
    once: bool = False
    allowed_host_paths: tuple = ()
    registry_config: str = None
    insecure_registries: tuple = ()
    tls_cert_file: str = None
    tls_private_key_file: str = None
    client_ca_file: str = None
    anonymous_auth: bool = False
    bootstrap_kubeconfig: str = None
    container_log_max_size: int = 10 * 1024 * 1024
    container_log_max_files: int = 5
    image_gc_high_threshold: int = 85
    image_gc_low_threshold: int = 80
    image_minimum_gc_age: float = 120.0
    lease_duration: int = 40
    lease_renew_interval: float = 10.0
    node_status_report_frequency: float = 300.0
    resync_interval: float = 300.0
    serve: bool = True
    address: str = "0.0.0.0"


def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_labels(text):
    """`k=v,k2=v2` (the kubelet's --node-labels form) into a dict."""
    labels = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key] = value
    return labels


def _parse_list(text):
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def _parse_size(text):
    """Bytes from `10Mi`, `512Ki`, `1G` or a plain integer."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?)?B?\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r}")
    units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    return int(match.group(1)) * units.get(match.group(2), 1)


# (flag, parser, help); the field is the flag's snake_case name, the env var MINIKRUST_<FIELD>.
_FLAGS = [
    ("--kubeconfig", str, "kubeconfig of the node identity ('in-cluster' for the pod's service account); none: standalone"),
    ("--context", str, "kubeconfig context to use instead of current-context"),
    ("--node-name", str, "name of the Node (default: hostname)"),
    ("--node-ip", str, "IP address reported for the Node (default: auto-detected)"),
    ("--port", int, "port of the kubelet HTTPS server"),
    ("--root-dir", str, "directory for modules, logs and volumes"),
    ("--max-pods", int, "number of pods this node accepts"),
    ("--node-labels", _parse_labels, "extra Node labels, key=value,..."),
    ("--pod-manifest-path", str, "directory (or file) of static pod manifests"),
    ("--sync", str, "how pods are fetched from the API server: watch or poll"),
    ("--poll-interval", float, "seconds between lists in poll mode"),
    ("--log-level", str, "debug, info, warning or error"),
    ("--log-format", str, "text or json"),
    ("--once", _parse_bool, "run the static pods to completion and exit"),
    ("--allowed-host-paths", _parse_list, "host directories hostPath volumes may use, comma-separated"),
    ("--registry-config", str, "docker config.json with registry credentials"),
    ("--insecure-registries", _parse_list, "registries reached over plain HTTP, comma-separated"),
    ("--tls-cert-file", str, "certificate of the kubelet server"),
    ("--tls-private-key-file", str, "private key of the kubelet server"),
    ("--client-ca-file", str, "CA that signs client certificates accepted by the kubelet server"),
    ("--anonymous-auth", _parse_bool, "allow anonymous requests to the kubelet server"),
    ("--bootstrap-kubeconfig", str, "kubeconfig used to obtain a node identity"),
    ("--container-log-max-size", _parse_size, "size at which a container log is rotated"),
    ("--container-log-max-files", int, "container log files kept per container"),
    ("--image-gc-high-threshold", int, "disk usage percent that starts module garbage collection"),
    ("--image-gc-low-threshold", int, "disk usage percent module garbage collection frees down to"),
    ("--image-minimum-gc-age", float, "seconds an unused module is kept"),
    ("--lease-duration", int, "seconds of the node Lease"),
    ("--lease-renew-interval", float, "seconds between Lease renewals"),
    ("--node-status-report-frequency", float, "seconds between unchanged node status reports"),
    ("--resync-interval", float, "seconds between full re-lists of the node's pods"),
    ("--serve", _parse_bool, "run the kubelet HTTPS server"),
    ("--address", str, "address the kubelet server binds"),
]
_CHOICES = {"sync": ("watch", "poll"), "log_level": ("debug", "info", "warning", "error"),
            "log_format": ("text", "json")}


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="minikrust", description="A kubelet that runs WASI modules as pod containers.",
        epilog="Every flag can also be set by the environment variable MINIKRUST_<FLAG> "
               "(e.g. MINIKRUST_NODE_NAME).")
    parser.add_argument("--version", action="version", version=f"minikrust {__version__}")
    for flag, _parser, help_text in _FLAGS:
        dest = flag[2:].replace("-", "_")
        if _parser is _parse_bool:
            parser.add_argument(flag, dest=dest, nargs="?", const="true", default=None, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=dest.upper(), help=help_text)
    return parser


def parse_args(argv=None, environ=None):
    """Config from command-line flags, then MINIKRUST_* environment variables, then defaults.

    Raises ConfigError naming the flag (or variable) whose value cannot be used."""
    environ = os.environ if environ is None else environ
    args = _build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    values = {}
    for flag, convert, _help in _FLAGS:
        dest = flag[2:].replace("-", "_")
        raw, source = getattr(args, dest), flag
        if raw is None:
            env_name = _ENV_PREFIX + dest.upper()
            raw, source = environ.get(env_name), env_name
        if raw is None:
            continue
        try:
            value = convert(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if dest in _CHOICES and value not in _CHOICES[dest]:
            raise ConfigError(f"{source}: {value!r} is not one of {', '.join(_CHOICES[dest])}")
        values[dest] = value
    if "root_dir" in values:
        values["root_dir"] = os.path.expanduser(values["root_dir"])
    if "kubeconfig" in values and values["kubeconfig"] != "in-cluster":
        values["kubeconfig"] = os.path.expanduser(values["kubeconfig"])
    return Config(**values)

@dataclass(frozen=True)
class ClusterConfig:
    """How to reach and authenticate to one API server (from a kubeconfig or in-cluster).

    `source` names where it came from, for error messages; secrets stay out of repr."""
    server: str
    source: str = ""
    ca_file: str = None
    ca_data: bytes = field(default=None, repr=False)
    insecure: bool = False
    tls_server_name: str = None
    proxy_url: str = None
    token: str = field(default=None, repr=False)
    token_file: str = None
    client_cert_file: str = None
    client_cert_data: bytes = field(default=None, repr=False)
    client_key_file: str = None
    client_key_data: bytes = field(default=None, repr=False)
    username: str = None
    password: str = field(default=None, repr=False)
    exec_config: dict = field(default=None, repr=False)

    def ssl_context(self, cert_data=None, key_data=None):
        """An SSLContext that trusts the configured CA and presents the client certificate.

        `cert_data`/`key_data` (PEM) override the configured client certificate (exec plugins)."""
        if self.insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context()
            try:
                if self.ca_file:
                    ctx.load_verify_locations(cafile=self.ca_file)
                if self.ca_data:
                    ctx.load_verify_locations(cadata=self.ca_data.decode("ascii", "replace"))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"{self.source}: certificate-authority: not a usable CA certificate ({exc})") from None
        cert_data = cert_data or self.client_cert_data
        key_data = key_data or self.client_key_data
        if cert_data or key_data or self.client_cert_file:
            _load_client_cert(ctx, self, cert_data, key_data)
        return ctx


def _load_client_cert(ctx, cluster, cert_data, key_data):
    """Load a client certificate; PEM data goes through files that live only for the call,
    because `ssl` reads certificate chains from files only."""
    with tempfile.TemporaryDirectory(prefix="minikrust-tls-") as tmp:
        cert_file, key_file = cluster.client_cert_file, cluster.client_key_file
        if cert_data:
            cert_file = os.path.join(tmp, "cert.pem")
            with open(os.open(cert_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(cert_data)
        if key_data:
            key_file = os.path.join(tmp, "key.pem")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(key_data)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{cluster.source}: client-certificate/client-key: not a usable "
                              f"certificate and key pair ({getattr(exc, 'reason', None) or exc})") from None


def _named(items, name, kind, path):
    """The `kind` entry (cluster, user or context) called `name` in a kubeconfig list."""
    if not isinstance(items, list):
        raise ConfigError(f"{path}: {kind}s: expected a list")
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind)
            if body is None:
                return {}
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: {kind}s[{name}].{kind}: expected a mapping")
            return body
    raise ConfigError(f"{path}: {kind}s: no {kind} named {name!r}")


def _b64_field(entry, key, where):
    try:
        return base64.b64decode(entry[key], validate=True)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}.{key}: not valid base64") from None


def _file_field(entry, key, where, base_dir):
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a file path")
    path = os.path.join(base_dir, os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.{key}: file {path} does not exist")
    return path


def load_kubeconfig(path, context=None):
    """ClusterConfig from a kubeconfig file, for `context` or the file's current-context.

    Relative file paths are relative to the kubeconfig's directory, as kubectl reads them. Any
    unusable field raises ConfigError naming the file and the field."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read kubeconfig: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a kubeconfig (expected a mapping with clusters, users, contexts)")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"{path}: current-context: not set (pass --context)")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if not cluster_name:
        raise ConfigError(f"{path}: contexts[{name}].context.cluster: missing")
    cluster = _named(doc.get("clusters"), cluster_name, "cluster", path)
    user = _named(doc.get("users"), user_name, "user", path) if user_name else {}
    base_dir = os.path.dirname(path)
    values = {"source": f"{path} (context {name})"}
    values.update(_cluster_fields(cluster, f"{path}: clusters[{cluster_name}].cluster", base_dir))
    values.update(_user_fields(user, f"{path}: users[{user_name}].user", base_dir))
    config = ClusterConfig(**values)
    if config.server.startswith("https:"):
        config.ssl_context()        # fail now, naming the file, rather than at the first request
    return config


def _cluster_fields(cluster, where, base_dir):
    server = cluster.get("server")
    if not server or not isinstance(server, str):
        raise ConfigError(f"{where}.server: missing")
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{where}.server: {server!r} is not an http(s) URL")
    values = {"server": server.rstrip("/")}
    if "certificate-authority-data" in cluster:
        values["ca_data"] = _b64_field(cluster, "certificate-authority-data", where)
    elif "certificate-authority" in cluster:
        values["ca_file"] = _file_field(cluster, "certificate-authority", where, base_dir)
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}.insecure-skip-tls-verify: expected true or false")
    values["insecure"] = insecure
    for key, dest in (("tls-server-name", "tls_server_name"), ("proxy-url", "proxy_url")):
        if cluster.get(key):
            values[dest] = str(cluster[key])
    return values


def _user_fields(user, where, base_dir):
    values = {}
    if "auth-provider" in user:
        raise ConfigError(f"{where}.auth-provider: not supported (use exec or a token)")
    if user.get("token"):
        values["token"] = str(user["token"])
    if user.get("tokenFile"):
        values["token_file"] = _file_field(user, "tokenFile", where, base_dir)
    for kind in ("certificate", "key"):
        key = f"client-{kind}"
        if f"{key}-data" in user:
            values[f"client_{'cert' if kind == 'certificate' else 'key'}_data"] = _b64_field(user, f"{key}-data", where)
        elif key in user:
            values[f"client_{'cert' if kind == 'certificate' else 'key'}_file"] = _file_field(user, key, where, base_dir)
    has_cert = "client_cert_data" in values or "client_cert_file" in values
    has_key = "client_key_data" in values or "client_key_file" in values
    if has_cert != has_key:
        missing = "client-key" if has_cert else "client-certificate"
        raise ConfigError(f"{where}.{missing}: missing (client-certificate and client-key go together)")
    if user.get("username") or user.get("password"):
        if not (user.get("username") and user.get("password") is not None):
            raise ConfigError(f"{where}.password: username and password go together")
        values["username"], values["password"] = str(user["username"]), str(user["password"])
    if "exec" in user:
        values["exec_config"] = _exec_fields(user["exec"], f"{where}.exec")
    return values


def _exec_fields(spec, where):
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    if spec.get("apiVersion") not in ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"):
        raise ConfigError(f"{where}.apiVersion: {spec.get('apiVersion')!r} is not client.authentication.k8s.io/v1")
    if not spec.get("command"):
        raise ConfigError(f"{where}.command: missing")
    env = spec.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, dict) and "name" in e for e in env):
        raise ConfigError(f"{where}.env: expected a list of name/value")
    return {"apiVersion": spec["apiVersion"], "command": str(spec["command"]),
            "args": [str(a) for a in spec.get("args") or []],
            "env": [(str(e["name"]), str(e.get("value", ""))) for e in env],
            "where": where}


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_config(environ=None, sa_dir=SERVICE_ACCOUNT_DIR):
    """ClusterConfig of a pod: KUBERNETES_SERVICE_HOST/PORT and the mounted service account
    (its token file is re-read as the kubelet rotates it)."""
    environ = os.environ if environ is None else environ
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("in-cluster config: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set")
    token_file, ca_file = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    for needed in (token_file, ca_file):
        if not os.path.isfile(needed):
            raise ConfigError(f"in-cluster config: {needed}: file does not exist")
    if ":" in host:
        host = f"[{host}]"
    return ClusterConfig(server=f"https://{host}:{port}", source="in-cluster config",
                         ca_file=ca_file, token_file=token_file)


# --- API: REST client, retries, Status errors ---

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class _TLSAdapter(requests.adapters.HTTPAdapter):
    """Puts the cluster's own SSLContext (CA, client cert) and tls-server-name on every pool,
    since requests' `verify`/`cert` take file paths and cannot override the name checked."""

    def __init__(self, ssl_context, server_name=None):
        self._ssl_context, self._server_name = ssl_context, server_name
        super().__init__(pool_connections=1, pool_maxsize=4)

    def _tls_kwargs(self, kwargs):
        kwargs["ssl_context"] = self._ssl_context
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
            kwargs["assert_hostname"] = self._server_name
        return kwargs

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **self._tls_kwargs(kwargs))

    def proxy_manager_for(self, proxy, **kwargs):
        return super().proxy_manager_for(proxy, **self._tls_kwargs(kwargs))

    def cert_verify(self, conn, url, verify, cert):
        """Verification is configured in the SSLContext; requests must not reset it."""


class _ExecCredentials:
    """Runs a client.authentication.k8s.io exec plugin and caches its credential until expiry."""

    def __init__(self, spec, server):
        self.spec, self.server = spec, server
        self._credential, self._expiry = None, None
        self._lock = threading.Lock()

    def get(self, force=False):
        """(token, cert_pem, key_pem) from the cached credential, running the plugin when needed."""
        with self._lock:
            now = datetime.datetime.now(datetime.timezone.utc)
            if force or self._credential is None or (self._expiry and now >= self._expiry):
                self._credential, self._expiry = self._run()
            status = self._credential
            cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
            return status.get("token"), cert and cert.encode(), key and key.encode()

    def _run(self):
        spec = self.spec
        info = {"apiVersion": spec["apiVersion"], "kind": "ExecCredential",
                "spec": {"interactive": False, "cluster": {"server": self.server}}}
        env = dict(os.environ, KUBERNETES_EXEC_INFO=json.dumps(info))
        env.update(spec["env"])
        try:
            done = subprocess.run([spec["command"], *spec["args"]], env=env, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{spec['where']}.command: cannot run {spec['command']!r}: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"{spec['where']}: plugin {spec['command']!r} exited {done.returncode}: "
                              f"{done.stderr.decode(errors='replace').strip()[:200]}")
        try:
            status = json.loads(done.stdout)["status"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{spec['where']}: plugin {spec['command']!r} did not print an ExecCredential") from None
        if not status.get("token") and not status.get("clientCertificateData"):
            raise ConfigError(f"{spec['where']}: ExecCredential has neither token nor clientCertificateData")
        expiry = status.get("expirationTimestamp")
        return status, _parse_time(expiry) if expiry else None


def _parse_time(text):
    """An RFC 3339 time (`2026-11-25T23:59:59Z`, with or without fraction) as an aware datetime."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_microtime():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _api_error(response):
    """ApiError from an error answer; the API's Status when the body is one, else the HTTP reason."""
    try:
        status = response.json()
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        return ApiError(status.get("code") or response.status_code, status.get("reason", ""),
                        status.get("message", ""), status)
    return ApiError(response.status_code, response.reason or "", (response.text or "")[:200])


def _retry_after(response):
    value = response.headers.get("Retry-After", "")
    try:
        return min(float(value), 60.0)
    except ValueError:
        return None


class ApiClient:
    """A small REST client for the Kubernetes API: one requests.Session (connection reuse),
    a timeout on every call, retries with exponential backoff and jitter on connection errors,
    429 (honouring Retry-After) and 5xx; 4xx answers raise ApiError at once (409 is retried only
    when the caller asks). `close()` interrupts any sleep between retries and any open watch."""

    def __init__(self, cluster, *, retries=5, backoff=0.2, max_backoff=5.0, user_agent=None):
        self.cluster = cluster
        self.server = cluster.server
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._closed = threading.Event()
        self._streams = set()
        self._lock = threading.Lock()
        self._exec = _ExecCredentials(cluster.exec_config, cluster.server) if cluster.exec_config else None
        self._token_file_state = (None, None)      # (mtime, token) of cluster.token_file
        self._exec_cert = None
        self.session = self._new_session()
        self.session.headers["User-Agent"] = user_agent or f"minikrust/{__version__}"

    def _new_session(self, cert=None, key=None):
        session = requests.Session()
        if self.server.startswith("https:"):
            adapter = _TLSAdapter(self.cluster.ssl_context(cert, key), self.cluster.tls_server_name)
            session.mount("https://", adapter)
            session.verify = not self.cluster.insecure
        if self.cluster.proxy_url:
            session.proxies = {"http": self.cluster.proxy_url, "https": self.cluster.proxy_url}
            session.trust_env = False
        if self.cluster.username:
            session.auth = (self.cluster.username, self.cluster.password)
        return session

    def _token(self, refresh=False):
        cluster = self.cluster
        if self._exec is not None:
            token, cert, key = self._exec.get(force=refresh)
            if cert and (cert, key) != self._exec_cert:       # a new client cert: new TLS pools
                self._exec_cert = (cert, key)
                old, self.session = self.session, self._new_session(cert, key)
                self.session.headers.update(old.headers)
                old.close()
            return token
        if cluster.token_file:
            try:
                mtime = os.stat(cluster.token_file).st_mtime
                if mtime != self._token_file_state[0]:       # rotated tokens are picked up
                    with open(cluster.token_file) as f:
                        self._token_file_state = (mtime, f.read().strip())
            except OSError as exc:
                log.warning("cannot read token file %s: %s", cluster.token_file, exc.strerror)
            return self._token_file_state[1]
        return cluster.token

    def _sleep(self, seconds):
        if self._closed.wait(seconds):
            raise ApiError(0, "ClientClosed", "the API client was closed")

    def _delay(self, attempt):
        return random.uniform(0.5, 1.0) * min(self.max_backoff, self.backoff * (2 ** attempt))

    def request(self, method, path, *, params=None, body=None, content_type="application/json",
                timeout=30, retry_conflict=False, stream=False):
        """Send one API request; the parsed JSON answer, or the open response when `stream`."""
        url = self.server + path
        data = None if body is None else json.dumps(body)
        refreshed = False
        for attempt in range(self.retries + 1):
            if self._closed.is_set():
                raise ApiError(0, "ClientClosed", "the API client was closed")
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            token = self._token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            last = attempt == self.retries
            try:
                response = self.session.request(method, url, params=params, data=data, headers=headers,
                                                timeout=(10, timeout), stream=stream)
            except requests.RequestException as exc:
                if last:
                    raise ApiError(0, "ConnectionError", f"{method} {path}: {exc}") from None
                log.debug("%s %s: %s; retrying", method, path, exc)
                self._sleep(self._delay(attempt))
                continue
            code = response.status_code
            if code < 400:
                return response if stream else (response.json() if response.content else {})
            error = _api_error(response)
            response.close()
            if code == 401 and self._exec is not None and not refreshed:
                refreshed = True                # an expired plugin credential: ask the plugin again
                self._token(refresh=True)
                continue
            retryable = code in _RETRY_STATUSES or (code == 409 and retry_conflict)
            if not retryable or last:
                raise error
            wait = _retry_after(response) if code in (429, 503) else None
            log.debug("%s %s: %s; retrying", method, path, error)
            self._sleep(wait if wait is not None else self._delay(attempt))
        raise AssertionError("unreachable")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body=body, **kw)

    def put(self, path, body, **kw):
        return self.request("PUT", path, body=body, **kw)

    def patch(self, path, body, content_type="application/merge-patch+json", **kw):
        return self.request("PATCH", path, body=body, content_type=content_type, **kw)

    def delete(self, path, body=None, **kw):
        return self.request("DELETE", path, body=body, **kw)

    def watch(self, path, params, timeout=None):
        """Iterate (type, object) watch events, one JSON object per line, until the server ends
        the stream. An expired resourceVersion raises ApiError(410), whether the server answers
        410 or sends an ERROR event carrying a 410 Status; no data for `timeout` seconds ends it."""
        params = dict(params, watch="true")
        read_timeout = timeout or float(params.get("timeoutSeconds", 300)) + 30
        response = self.request("GET", path, params=params, timeout=read_timeout, stream=True)
        with self._lock:
            self._streams.add(response)
        try:
            for line in response.iter_lines(chunk_size=None):
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(obj.get("code") or 500, obj.get("reason", ""), obj.get("message", ""), obj)
                yield kind, obj
        except (requests.RequestException, ValueError, AttributeError, OSError) as exc:
            if not self._closed.is_set():
                log.debug("watch %s ended: %s", path, exc)
        finally:
            with self._lock:
                self._streams.discard(response)
            response.close()

    def close(self):
        """Stop: interrupt retry sleeps and open watches, close the connections."""
        self._closed.set()
        with self._lock:
            streams = list(self._streams)
        for response in streams:
            _shutdown_response(response)
        self.session.close()

    @property
    def closed(self):
        return self._closed.is_set()


def _shutdown_response(response):
    """Wake a thread blocked reading `response` from another thread: shutdown() the socket."""
    try:
        sock = response.raw.connection.sock
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass
    with contextlib.suppress(Exception):
        response.close()


def api_client_for(config):
    """The ApiClient of a Config: from --kubeconfig ('in-cluster' for the service account),
    or None when there is no kubeconfig (standalone: static pods only)."""
    if not config.kubeconfig:
        return None
    if config.kubeconfig == "in-cluster":
        return ApiClient(in_cluster_config())
    return ApiClient(load_kubeconfig(config.kubeconfig, config.context))


# --- Runtime: the WASI host, native (_wasihost) or the wasmtime package fallback ---

class ModuleLoadError(ModuleError):
    """A module that cannot be loaded: invalid wasm, no `_start`, an import WASI does not provide."""


class ModuleRunError(ModuleError):
    """A run that cannot be set up, e.g. a preopened directory that does not exist."""


@dataclass(frozen=True)
class RunResult:
    """How one run of a module ended: the fallback's twin of `_wasihost.Result`.

    exit_code is None when the module trapped or was stopped; `trap` then says why."""
    exit_code: "int | None"
    trap: "str | None"
    duration: float
    killed: bool = False
    timed_out: bool = False
    oom: bool = False
    cpu_seconds: float = 0.0
    peak_memory: int = 0


_CRI_MAX_LINE = 16 * 1024  # the kubelet's CRI logger cuts longer lines into P records
_WASM_PAGE = 65536
_EPOCH_TICK = 0.005        # seconds between epoch ticks; kill() lands within a few ticks
_KILLED, _TIMED_OUT = "killed", "deadline exceeded"


def _rfc3339nano(ns):
    """Format a time.time_ns() value as the CRI log timestamp, e.g. 2026-11-25T23:59:59.123456789Z."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


class _LogClock:
    """Timestamps shared by a run's two streams, never going backwards (they may share a file)."""

    def __init__(self):
        self.last = 0

    def now(self):
        self.last = max(self.last, time.time_ns())
        return _rfc3339nano(self.last)


class _StreamWriter:
    """Where one WASI output stream goes: a path (appended), an fd, a callable, or nowhere.

    log_format "cri" writes `<timestamp> <stream> <F|P> <line>` records; "plain" the raw bytes.
    A callable receives each record (or raw chunk) as bytes."""

    def __init__(self, target, stream, log_format, clock):
        if log_format not in ("cri", "plain"):
            raise ModuleRunError(f"unknown log_format {log_format!r} (want 'cri' or 'plain')")
        self.stream, self.cri, self.clock = stream, log_format == "cri", clock
        self.buf = b""
        self.fd = self.callback = None
        self.own_fd = False
        if isinstance(target, int) and not isinstance(target, bool):
            self.fd = target
        elif callable(target):
            self.callback = target
        elif target is not None:
            try:
                self.fd = os.open(os.fspath(target), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ModuleRunError(f"cannot open {stream} log {target}: {exc.strerror}") from exc
            self.own_fd = True

    def write(self, data):
        """The WASI custom-output callback: consume all of `data`, return its length."""
        if self.fd is None and self.callback is None:
            return len(data)
        if not self.cri:
            self._emit(data)
            return len(data)
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            while len(line) > _CRI_MAX_LINE:
                self._record(b"P", line[:_CRI_MAX_LINE])
                line = line[_CRI_MAX_LINE:]
            self._record(b"F", line)
        while len(self.buf) >= _CRI_MAX_LINE:
            self._record(b"P", self.buf[:_CRI_MAX_LINE])
            self.buf = self.buf[_CRI_MAX_LINE:]
        return len(data)

    def _record(self, tag, line):
        head = f"{self.clock.now()} {self.stream} ".encode()
        self._emit(head + tag + b" " + line + b"\n")

    def _emit(self, data):
        if self.callback is not None:
            self.callback(data)
            return
        while data:
            data = data[os.write(self.fd, data):]

    def close(self):
        """Flush a trailing fragment without newline as a P record; close a file we opened."""
        try:
            if self.buf and self.cri:
                self._record(b"P", self.buf)
            self.buf = b""
        finally:
            if self.own_fd:
                os.close(self.fd)
                self.own_fd = False


def _env_pairs(env):
    if env is None:
        return []
    items = env.items() if isinstance(env, dict) else env
    return [(str(k), str(v)) for k, v in items]


class _FallbackRun:
    """One run on the fallback host: a thread calling `_start`, stoppable by kill() or deadline."""

    def __init__(self, host, module, argv, env, preopens, stdout, stderr, log_format,
                 memory_limit, deadline, stdin):
        wt = host._wt
        self._host, self._module = host, module
        self._killed = False
        self._stop_reason = None
        self._deadline_at = None if deadline is None else time.monotonic() + deadline
        self._memory_limit = memory_limit
        self._done = threading.Event()
        self._result = None
        for host_dir, guest_dir, _ro in preopens or ():
            if not os.path.isdir(host_dir):
                raise ModuleRunError(f"preopened directory does not exist: {host_dir} (for {guest_dir})")
        clock = _LogClock()
        self._writers = []
        try:
            self._writers.append(_StreamWriter(stdout, "stdout", log_format, clock))
            self._writers.append(_StreamWriter(stderr, "stderr", log_format, clock))
            wasi = wt.WasiConfig()
            wasi.argv = [str(a) for a in argv]
            wasi.env = _env_pairs(env)
            for host_dir, guest_dir, readonly in preopens or ():
                wasi.preopen_dir(os.fspath(host_dir), guest_dir, not readonly)
            wasi.stdout_custom = self._writers[0].write
            wasi.stderr_custom = self._writers[1].write
            if stdin is not None:
                vec = wt._ffi.wasm_byte_vec_t()
                wt._ffi.wasm_byte_vec_new(ctypes.byref(vec), len(stdin), ctypes.create_string_buffer(bytes(stdin), len(stdin)))
                wt._ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))
            self._store = wt.Store(host._engine)
            self._store.set_wasi(wasi)
            if memory_limit is not None:
                self._store.set_limits(memory_size=int(memory_limit))
            self._store.set_epoch_deadline(1)
            self._run_id = host._register(self)
        except wt.WasmtimeError as exc:
            self._close_writers()
            raise ModuleRunError(f"cannot set up run of {module.digest}: {exc}") from exc
        except BaseException:
            self._close_writers()
            raise
        self._thread = threading.Thread(target=self._main, name=f"wasm-{module.digest[7:19]}", daemon=True)
        self._thread.start()

    def _close_writers(self):
        for writer in self._writers:
            writer.close()

    def _should_stop(self):
        """Called from the epoch callback on the run's thread: why to stop, or None to go on."""
        if self._killed:
            return _KILLED
        if self._deadline_at is not None and time.monotonic() >= self._deadline_at:
            return _TIMED_OUT
        return None

    def _main(self):
        wt = self._host._wt
        start, cpu0 = time.monotonic(), time.thread_time()
        exit_code = trap = None
        peak = 0
        instantiated = False
        try:
            instance = self._module._pre.instantiate(self._store)
            instantiated = True
            exports = instance.exports(self._store)
            memory = exports.get("memory")
            try:
                exports["_start"](self._store)
                exit_code = 0
            except wt.ExitTrap as exc:
                exit_code = exc.code
            except (wt.Trap, wt.WasmtimeError) as exc:
                trap = self._stop_reason or str(exc)
            if isinstance(memory, wt.Memory):
                peak = memory.data_len(self._store)
        except (wt.Trap, wt.WasmtimeError) as exc:
            trap = str(exc)
        except Exception as exc:  # a bug of ours must still end the run, never hang wait()
            log.exception("fallback run of %s failed", self._module.digest)
            trap = f"host error: {exc}"
        finally:
            try:
                self._close_writers()
            except OSError as exc:
                log.warning("closing the logs of %s: %s", self._module.digest, exc)
            self._host._unregister(self._run_id)
            self._store.close()
        oom = self._memory_limit is not None and exit_code != 0 and not self._stop_reason and (
            not instantiated or peak + _WASM_PAGE > self._memory_limit)
        self._result = RunResult(
            exit_code=exit_code, trap=trap, duration=time.monotonic() - start,
            killed=self._stop_reason == _KILLED, timed_out=self._stop_reason == _TIMED_OUT, oom=oom,
            cpu_seconds=time.thread_time() - cpu0, peak_memory=peak)
        self._done.set()

    def kill(self):
        """Stop the module from any thread; it stops at its next epoch tick (a few ms)."""
        self._killed = True

    def wait(self, timeout=None):
        """The RunResult, or None if the run is still going after `timeout` seconds."""
        return self._result if self._done.wait(timeout) else None

    @property
    def done(self):
        return self._done.is_set()


class _FallbackModule:
    """A compiled module with its imports resolved once (an InstancePre)."""

    def __init__(self, host, digest, module, pre):
        self._host, self.digest, self._wasm_module, self._pre = host, digest, module, pre

    def start(self, argv, env=None, preopens=(), stdout=None, stderr=None, log_format="cri",
              memory_limit=None, deadline=None, stdin=None):
        """Start a run in a thread; raises ModuleRunError for setup errors."""
        return _FallbackRun(self._host, self, argv, env, preopens, stdout, stderr, log_format,
                            memory_limit, deadline, stdin)

    def run(self, argv, **kwargs):
        """start() then wait(): the RunResult."""
        return self.start(argv, **kwargs).wait()

    def __repr__(self):
        return f"<module {self.digest} on wasmtime-py>"


class FallbackHost:
    """The WASI host face of `_wasihost.Host`, on the `wasmtime` Python package (slower, same behaviour).

    One engine with epoch interruption; one ticker thread bumps the epoch while runs are active and
    each run's epoch callback decides whether to stop (kill, deadline). Compiled modules are
    serialized to `cache_dir`, keyed by sha256 and wasmtime version, so restarts never recompile."""

    backend = "wasmtime-py"

    def __init__(self, cache_dir):
        try:
            import wasmtime
        except ImportError as exc:
            raise ModuleError("no WebAssembly runtime: build the _wasihost extension or `pip install wasmtime`") from exc
        import importlib.metadata
        self._wt = wasmtime
        self.wasmtime_version = importlib.metadata.version("wasmtime")
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        os.makedirs(self.cache_dir, exist_ok=True)
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        self._engine = wasmtime.Engine(config)
        self._linker = wasmtime.Linker(self._engine)
        self._linker.define_wasi()
        self._modules = {}
        self._lock = threading.Lock()
        self._runs = {}
        self._next_id = 1
        self._ticking = threading.Condition(self._lock)
        self._ticker = None
        proto = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))
        self._callback = proto(self._on_epoch)  # kept alive as long as the host
        set_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, proto, ctypes.c_void_p, ctypes.c_void_p)
        self._set_epoch_callback = set_cb(("wasmtime_store_epoch_deadline_callback", wasmtime._ffi.dll))

    # -- modules --

    def load(self, wasm, digest=None):
        """A module from wasm bytes or a path; same sha256 digest, same module object."""
        if digest is not None and digest in self._modules:
            return self._modules[digest]
        if isinstance(wasm, (bytes, bytearray, memoryview)):
            data = bytes(wasm)
        else:
            try:
                with open(os.fspath(wasm), "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise ModuleLoadError(f"cannot read module {wasm}: {exc.strerror}") from exc
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != actual:
            raise ModuleLoadError(f"module digest is {actual}, expected {digest}")
        with self._lock:
            module = self._modules.get(actual)
            if module is None:
                module = self._modules[actual] = self._compile(actual, data)
        return module

    def _cache_path(self, digest):
        name = f"{digest[7:]}.wasmtime-{self.wasmtime_version}-{platform.machine()}.cwasm"
        return os.path.join(self.cache_dir, name)

    def _compile(self, digest, data):
        wt = self._wt
        if data[:4] != b"\0asm":
            raise ModuleLoadError("not a WebAssembly module (bad magic number)")
        path = self._cache_path(digest)
        compiled = None
        if os.path.exists(path):
            try:
                compiled = wt.Module.deserialize_file(self._engine, path)
            except wt.WasmtimeError as exc:
                log.warning("recompiling %s: cached code unusable: %s", digest, exc)
        fresh = compiled is None
        if fresh:
            try:
                compiled = wt.Module(self._engine, data)
            except wt.WasmtimeError as exc:
                raise ModuleLoadError(f"invalid WebAssembly module: {exc}") from exc
        start = next((e for e in compiled.exports if e.name == "_start"), None)
        if start is None or not isinstance(start.type, wt.FuncType):
            raise ModuleLoadError("module has no `_start` function to run (not a WASI command)")
        if start.type.params or start.type.results:
            raise ModuleLoadError("module's `_start` must take and return nothing")
        try:
            pre = self._linker.instantiate_pre(compiled)
        except wt.WasmtimeError as exc:
            raise ModuleLoadError(f"module imports what WASI does not provide: {exc}") from exc
        if fresh:
            self._write_cache(path, compiled.serialize())
        return _FallbackModule(self, digest, compiled, pre)

    def _write_cache(self, path, blob):
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs a recompile next time
            log.warning("cannot write compiled module cache %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- runs and the epoch ticker --

    def _register(self, run):
        with self._lock:
            run_id = self._next_id
            self._next_id += 1
            self._runs[run_id] = run
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._ticker.start()
            self._ticking.notify()
        self._set_epoch_callback(ctypes.cast(run._store.ptr(), ctypes.c_void_p), self._callback, run_id, None)
        return run_id

    def _unregister(self, run_id):
        with self._lock:
            self._runs.pop(run_id, None)

    def _tick(self):
        while True:
            with self._lock:
                while not self._runs:
                    self._ticking.wait()
            self._engine.increment_epoch()
            time.sleep(_EPOCH_TICK)

    def _on_epoch(self, _context, data, delta, _kind):
        run = self._runs.get(data)
        reason = run._should_stop() if run is not None else None
        if reason is None:
            delta[0] = 1
            return None
        run._stop_reason = reason
        return ctypes.cast(self._wt._ffi.wasmtime_error_new(reason.encode()), ctypes.c_void_p).value

    def __repr__(self):
        return f"<FallbackHost wasmtime {self.wasmtime_version} cache={self.cache_dir}>"


_HOSTS = {}
_HOSTS_LOCK = threading.Lock()


def _native_host(cache_dir):
    """The compiled `_wasihost.Host`; ImportError when the extension is missing or its ABI check failed."""
    import _wasihost
    return _wasihost.Host(cache_dir=cache_dir)


def load_host(cache_dir, backend=None):
    """The process's WASI host for `cache_dir`: native when it imports, else the wasmtime-py fallback.

    `backend` (or MINIKRUST_WASM_BACKEND) is "native", "wasmtime-py" or "auto" (the default)."""
    choice = backend or os.environ.get("MINIKRUST_WASM_BACKEND") or "auto"
    if choice not in ("auto", "native", "wasmtime-py"):
        raise ConfigError(f"MINIKRUST_WASM_BACKEND={choice!r}: want native, wasmtime-py or auto")
    key = (os.path.abspath(os.fspath(cache_dir)), choice)
    with _HOSTS_LOCK:
        host = _HOSTS.get(key)
        if host is not None:
            return host
        if choice != "wasmtime-py":
            try:
                host = _native_host(key[0])
            except ImportError as exc:
                if choice == "native":
                    raise ModuleError(f"native WASI host unavailable: {exc}") from exc
                log.debug("native WASI host unavailable (%s); using the wasmtime package", exc)
        if host is None:
            host = FallbackHost(key[0])
        _HOSTS[key] = host
        return host


def _is_native_error(exc):
    native = sys.modules.get("_wasihost")
    base = getattr(native, "WasiHostError", None)
    return base is not None and isinstance(exc, base)


@contextlib.contextmanager
def module_errors():
    """Turn the native host's errors into ModuleLoadError/ModuleRunError, message intact."""
    try:
        yield
    except ModuleError:
        raise
    except Exception as exc:
        if not _is_native_error(exc):
            raise
        load_error = getattr(sys.modules["_wasihost"], "LoadError", ())
        cls = ModuleLoadError if isinstance(exc, load_error) else ModuleRunError
        raise cls(str(exc)) from exc


# --- Node: registration, lease, status ---


# --- Sources: API watch or poll, static manifests ---


# --- Images: OCI pulls, content-addressed store ---


# --- Volumes: emptyDir, hostPath, configMap, secret, downwardAPI, projected ---


# --- Env: argv, environment and $(VAR) expansion ---


# --- Status: pod status computation, coalesced patches, events ---


# --- Pods: one worker and state machine per pod ---


# --- Server: HTTPS logs, healthz, pods, metrics, stats ---


# --- Kubelet: wires the above; start()/stop(); embeddable ---

class _LoggingPodHandler:
    """The pod handler of a kubelet that runs no pods: it only logs what the sources report."""

    def pod_added(self, pod):
        log.info("pod added: %s", _pod_key(pod))

    def pod_updated(self, pod):
        log.debug("pod updated: %s", _pod_key(pod))

    def pod_deleted(self, pod):
        log.info("pod deleted: %s", _pod_key(pod))


def _pod_key(pod):
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Kubelet:
    """One node: registers it, keeps its Lease and status fresh, and feeds its pods to a handler.

    Holds no global state, so many kubelets (many nodes) can run in one process. With no
    kubeconfig it runs standalone: `api` is None and only static pods exist.

        with Kubelet(Config(kubeconfig="k.yaml", root_dir="/tmp/k")) as kubelet:
            kubelet.wait()          # until stop() or a signal (see main)
    """

    def __init__(self, config=None, *, handler=None):
        self.config = config if config is not None else Config()
        self.api = None
        self.handler = handler if handler is not None else _LoggingPodHandler()
        self.node = None            # NodeAgent when there is an API server
        self.sources = []           # pod sources, started in order, stopped in reverse
        self._stop_requested = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self):
        """Register the node (when there is an API server) and start the pod sources."""
        with self._lock:
            if self._started:
                return self
            self._started = True
            os.makedirs(self.config.root_dir, exist_ok=True)
            for source in self.sources:
                source.start()
        log.info("kubelet %s started (%s)", self.config.node_name, "standalone" if self.api is None else "API")
        return self

    def stop(self):
        """Stop taking pods, stop the pod sources, then report the node NotReady; idempotent."""
        self._stop_requested.set()
        with self._lock:
            if not self._started:
                return
            self._started = False
            for source in reversed(self.sources):
                source.stop()
        log.info("kubelet %s stopped", self.config.node_name)

    def request_stop(self):
        """Ask `wait()` to return (safe from a signal handler)."""
        self._stop_requested.set()

    def wait(self, timeout=None):
        """Block until stop() or request_stop() is called; True if it was."""
        return self._stop_requested.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# --- CLI ---

class _JsonLogFormatter(logging.Formatter):
    def format(self, record):
        entry = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
                 "level": record.levelname.lower(), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(config):
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(config.log_level.upper())
    log.propagate = False


def main(argv=None):
    """Run a kubelet until SIGTERM or SIGINT; exit 0 after a clean shutdown, 2 on a bad config.

    A first argument naming a subcommand (`push`) runs the function `cmd_<name>(argv)`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):
        command = globals().get(f"cmd_{argv[0]}")
        if command is None:
            print(f"minikrust: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return command(argv[1:])
    try:
        config = parse_args(argv)
        _setup_logging(config)
        kubelet = Kubelet(config)
    except ConfigError as exc:
        print(f"minikrust: error: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, lambda *_: kubelet.request_stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with kubelet:
            while not kubelet.wait(1.0):
                pass
            log.info("shutting down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
