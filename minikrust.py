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
]

import argparse
import base64
import collections
import contextlib
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


# --- Runtime: the WASI host, native (_wasihost) or the wasmtime package fallback ---


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
