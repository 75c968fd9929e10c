"""minikrust: a minimal, single-file kubelet that runs WebAssembly (WASI preview 1) modules as the
containers of Kubernetes pods, on wasmtime: through the compiled `_wasihost` extension when it is
installed, else through the `wasmtime` Python package (slower, same behaviour).

    python minikrust.py --kubeconfig ~/.kube/config             # join a cluster as a Node
    python minikrust.py --pod-manifest-path examples/ --once    # static pods, no cluster at all

    with minikrust.Kubelet(minikrust.Config(pod_manifest_path="examples")) as kubelet:   # in-process
        ...
"""

__version__ = "0.1.0"
__all__ = [   # the public API, each name shown in the README's "In-process" section; the rest is internal
    "Kubelet", "Config", "parse_args", "main", "ClusterConfig", "load_kubeconfig", "ApiClient", "load_host",
    "push_module", "read_container_log", "LogOptions",
    "MinikrustError", "ConfigError", "ApiError", "ImageError", "ModuleError",
]

import argparse
import atexit
import base64
import collections.abc
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import enum
import errno
import fractions
import functools
import glob
import gzip
import hashlib
import heapq
import hmac
import http.server
import importlib.metadata
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import platform
import queue
import random
import re
import select
import selectors
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


# --- Exceptions: what minikrust raises ---
# MinikrustError and its kinds; those of a container's setup carry its waiting reason for the status.

class MinikrustError(Exception):
    """Base class of every error minikrust raises."""


class ConfigError(MinikrustError):
    """A flag, environment variable, kubeconfig or manifest that cannot be used."""


class ApiError(MinikrustError):
    """An error answer of the API server; carries its Status (code, reason, message)."""

    def __init__(self, code, reason="", message="", status=None):
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")
        self.code, self.reason, self.message, self.status = code, reason, message, status or {}


class ImageError(MinikrustError):
    """A module that cannot be pulled or resolved; `reason` is the container waiting reason."""

    def __init__(self, message, reason="ErrImagePull"):
        super().__init__(message)
        self.message, self.reason = message, reason


class ModuleError(MinikrustError):
    """A module that cannot be loaded or started (invalid wasm, missing _start, bad import)."""


class ContainerConfigError(MinikrustError):
    """A container that cannot be set up (missing configMap/secret, refused hostPath, bad volume);
    `reason` is its waiting reason, `retry` whether to try again later (a configMap yet to come)."""

    def __init__(self, message, reason="CreateContainerConfigError", retry=True):
        super().__init__(message)
        self.message, self.reason, self.retry = message, reason, retry


# --- Files: one way in, beneath a root ---
# A module can plant symlinks (WASI path_symlink) wherever it may write, and the kubelet works in
# those folders on the host, unconfined. So every open, write, mkdir, chmod, rename, removal and
# listing there starts from open_beneath: openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) lets
# the kernel refuse any step out of the root (links inside it are followed); where the kernel has
# no openat2, each component is opened O_NOFOLLOW from the root's fd, so no link is followed at all.

_OPENAT2 = {"x86_64": 437, "amd64": 437, "aarch64": 437, "arm64": 437}.get(platform.machine().lower())
_RESOLVE_BENEATH = 0x08 | 0x02                       # RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
_BENEATH = {"openat2": None if sys.platform.startswith("linux") and _OPENAT2 else False, "syscall": None}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd, path, flags, mode):
    """openat2(2) beneath dir_fd; None when the kernel (or a seccomp filter) does not offer it."""
    if _BENEATH["syscall"] is None:
        _BENEATH["syscall"] = ctypes.CDLL(None, use_errno=True).syscall
        _BENEATH["syscall"].restype = ctypes.c_long
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE_BENEATH)
    for _ in range(16):                  # EAGAIN: a rename raced the lookup; the kernel asks again
        fd = _BENEATH["syscall"](ctypes.c_long(_OPENAT2), ctypes.c_int(dir_fd), os.fsencode(path),
                                 ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        err = ctypes.get_errno() if fd < 0 else 0
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    if err in (errno.ENOSYS, errno.EPERM) and _BENEATH["openat2"] is None:
        _BENEATH["openat2"] = False
        return None
    if fd < 0:
        raise OSError(err, os.strerror(err), path)
    _BENEATH["openat2"] = True
    return fd


def _beneath_parts(path):
    """The components of a path meant to stay beneath a root: relative, no `..`."""
    path = os.fspath(path)
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts or "\0" in path:
        raise OSError(errno.EXDEV, "path leaves its root", path)
    return parts


def open_beneath(root, path, flags=os.O_RDONLY, mode=0o600):
    """A file descriptor of `path` opened beneath `root` (a directory path or fd), never through a
    symlink that leads out of it (OSError EXDEV or ELOOP instead). The caller closes it."""
    parts = _beneath_parts(path)
    root_fd = root if isinstance(root, int) else os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _BENEATH["openat2"] is not False:
            fd = _openat2(root_fd, "/".join(parts) or ".", flags, mode)
            if fd is not None:
                return fd
        fd = os.dup(root_fd)
        for index, part in enumerate(parts):
            step = flags if index == len(parts) - 1 else os.O_RDONLY | os.O_DIRECTORY
            try:
                next_fd = os.open(part, step | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
            finally:
                os.close(fd)
            fd = next_fd
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):    # O_PATH|O_NOFOLLOW holds a link itself
            os.close(fd)
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        return fd
    finally:
        if root_fd is not root:
            os.close(root_fd)


def _makedirs_beneath(root, path, mode=0o755):
    """The fd of the directory `path` beneath `root`, made (with its parents) where missing."""
    fd = open_beneath(root, "", os.O_RDONLY | os.O_DIRECTORY)
    for part in _beneath_parts(path):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            next_fd = open_beneath(fd, part, os.O_RDONLY | os.O_DIRECTORY)
        finally:
            os.close(fd)
        fd = next_fd
    return fd


def _write_beneath(root, path, content, mode=0o644, dir_mode=0o755, sync=True):
    """Write the file `path` beneath `root` atomically: a temp file beside it (fsync'd unless not
    `sync`: then whole for other processes, not yet for the disk), renamed over it."""
    parts = _beneath_parts(path)
    dir_fd = _makedirs_beneath(root, "/".join(parts[:-1]), dir_mode)
    temp = f".tmp-{uuid.uuid4().hex[:16]}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            os.fchmod(out.fileno(), mode)
            out.flush()
            if sync:
                os.fsync(out.fileno())      # on disk before the rename: a crash leaves the old file or the new
        os.replace(temp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _open_dir_to_empty(dir_fd, name):
    """The fd of the directory `name` (never a link), made writable so its entries can go."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:              # a folder made unreadable: chmod it through an O_PATH fd
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        fd = os.open(name, flags, dir_fd=dir_fd)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o700)
    return fd


def _remove_beneath(root, path):
    """Remove `path` beneath `root` and all it holds, never following a symlink; best effort (logged).
    Trees deeper than 64 folders are moved up in pieces: the stack and open fds stay bounded."""
    parts = _beneath_parts(path)
    try:
        with _dir_beneath(root, "/".join(parts[:-1])) as top:    # _remove_entry logs its own failures
            pending = [parts[-1]]
            while pending:
                _remove_entry(top, pending.pop(), top, 0, pending)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s beneath %s: %s", path, root, exc)


def _remove_entry(dir_fd, name, top, depth, pending):
    try:
        try:
            os.unlink(name, dir_fd=dir_fd)
            return
        except (IsADirectoryError, PermissionError):     # a folder (EISDIR; POSIX also allows EPERM)
            pass
        if depth >= 64:
            moved = f".minikrust-deep-{uuid.uuid4().hex[:12]}"
            os.rename(name, moved, src_dir_fd=dir_fd, dst_dir_fd=top)
            pending.append(moved)
            return
        fd = _open_dir_to_empty(dir_fd, name)
        try:
            for entry in list(os.scandir(fd)):
                _remove_entry(fd, entry.name, top, depth + 1, pending)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc)


def _read_beneath(root, path, limit, tail=False):
    """Up to `limit` bytes of the regular file `path` beneath `root` (its last ones with `tail`)."""
    fd = open_beneath(root, path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if tail:
            f.seek(max(0, info.st_size - limit))
        return f.read(limit)


@contextlib.contextmanager
def _dir_beneath(root, path=""):
    """The directory `path` beneath `root` as an fd (open_beneath), for the `with` block."""
    fd = open_beneath(root, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _list_beneath(root, path=""):
    """The names in the directory `path` beneath `root`, sorted; none when it is missing."""
    try:
        with _dir_beneath(root, path) as fd:
            return sorted(os.listdir(fd))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _rename_beneath(root, source, target):
    """Rename `source` to `target`, both beneath `root` (their folders resolved by open_beneath)."""
    with _dir_beneath(root, os.path.dirname(source)) as src, _dir_beneath(root, os.path.dirname(target)) as dst:
        os.replace(os.path.basename(source), os.path.basename(target), src_dir_fd=src, dst_dir_fd=dst)


class _Held(os.PathLike):
    """A file or folder opened beneath its root (O_PATH) and held open: its path, /proc/self/fd/N,
    leads to what was checked, whatever is linked in its place since. Closed when the object goes."""

    def __init__(self, fd):
        self.fd = fd

    def __fspath__(self):
        return f"/proc/self/fd/{self.fd}"

    def __del__(self, close=os.close):      # os may be gone at interpreter exit
        close(self.fd)


def _held(fd, root, path):
    """An fd opened by open_beneath as a _Held path (it takes the fd); without /proc, the root
    joined with the path (no link was followed to it) and the fd closed."""
    if os.path.exists(f"/proc/self/fd/{fd}"):
        return _Held(fd)
    os.close(fd)
    return os.path.join(os.path.realpath(root), *_beneath_parts(path))


# --- Config: flags, environment, kubeconfig, in-cluster ---
# Every setting of one kubelet (Config, checked where it is built), read from flags and MINIKRUST_*
# variables (parse_args); how to reach the API server: a kubeconfig or a pod's service account.

KUBE_VERSION = "v1.36.0"        # the Kubernetes API level this kubelet speaks, reported as v1.36.0-minikrust


def _flag(default=None, help="", parse=None, factory=None):
    """A Config field that is also the flag --<field> and the variable MINIKRUST_<FIELD>."""
    meta = {"help": help, "parse": parse}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Every setting of one kubelet, named after the real kubelet's flags; `Config()` is a valid
    standalone configuration (no kubeconfig: no API server, static pods only)."""
    kubeconfig: str = _flag(None, "kubeconfig of the node identity ('in-cluster' for the pod's service account); "
                                  "none: standalone", parse="path")
    context: str = _flag(None, "kubeconfig context to use instead of current-context")
    node_name: str = _flag(help="name of the Node (default: hostname)", factory=lambda: socket.gethostname().lower())
    node_ip: str = _flag(None, "IP address reported for the Node (default: auto-detected)")
    port: int = _flag(10250, "port of the kubelet HTTPS server")
    root_dir: str = _flag(help="directory for modules, logs and volumes", parse="path",
                          factory=lambda: os.path.expanduser("~/.minikrust"))
    max_pods: int = _flag(110, "number of pods this node accepts")
    node_labels: dict = _flag(help="extra Node labels, key=value,...", factory=dict)
    pod_manifest_path: str = _flag(None, "directory (or file) of static pod manifests")
    sync: str = _flag("watch", "how pods are fetched from the API server: watch or poll")
    poll_interval: float = _flag(10.0, "seconds between lists in poll mode")
    log_level: str = _flag("info", "debug, info, warning or error")
    log_format: str = _flag("text", "text or json")
    once: bool = _flag(False, "run the static pods to completion and exit")
    allowed_host_paths: tuple = _flag((), "host directories hostPath volumes may use, comma-separated")
    registry_config: str = _flag(None, "docker config.json with registry credentials")
    insecure_registries: tuple = _flag((), "registries reached over plain HTTP, comma-separated")
    tls_cert_file: str = _flag(None, "certificate of the kubelet server")
    tls_private_key_file: str = _flag(None, "private key of the kubelet server")
    client_ca_file: str = _flag(None, "CA that signs client certificates accepted by the kubelet server")
    anonymous_auth: bool = _flag(False, "allow anonymous requests to the kubelet server")
    rotate_server_certificates: bool = _flag(False, "also request a kubelet-serving certificate by CSR and serve it "
                                                    "once approved")
    bootstrap_kubeconfig: str = _flag(None, "kubeconfig used to obtain a node identity")
    container_log_max_size: int = _flag(10 * 1024 * 1024, "size at which a container log is rotated", parse="size")
    container_log_max_files: int = _flag(5, "container log files kept per container")
    image_gc_high_threshold: int = _flag(85, "disk usage percent that starts module garbage collection")
    image_gc_low_threshold: int = _flag(80, "disk usage percent module garbage collection frees down to")
    image_minimum_gc_age: float = _flag(120.0, "seconds an unused module is kept")
    image_pull_credentials_verification_policy: str = _flag(        # KEP-2535 (images section)
        "NeverVerifyPreloadedImages", "NeverVerify, NeverVerifyPreloadedImages or AlwaysVerify")
    lease_duration: int = _flag(40, "seconds of the node Lease")
    lease_renew_interval: float = _flag(10.0, "seconds between Lease renewals")
    node_status_report_frequency: float = _flag(300.0, "seconds between unchanged node status reports")
    resync_interval: float = _flag(300.0, "seconds between full re-lists of the node's pods")
    serve: bool = _flag(True, "run the kubelet HTTPS server")
    address: str = _flag("0.0.0.0", "address the kubelet server binds")
    backoff_base: float = 10.0      # CrashLoopBackOff: first delay, doubled up to backoff_max (tests shorten it)
    backoff_max: float = 300.0
    echo: bool = _flag(False, "print standalone pods' output and phases to stdout (default: true)")

    def __post_init__(self):
        """Refuse a bad value here, naming the field (ConfigError), not deep in a thread later."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            problem = _config_problem(item, value)
            if problem:
                raise ConfigError(f"Config.{item.name}: {value!r} {problem}")
        if self.image_gc_low_threshold > self.image_gc_high_threshold:
            raise ConfigError("Config.image_gc_low_threshold: must not be above image_gc_high_threshold")


_CONFIG_RANGES = {"max_pods": (1, 10**6), "container_log_max_size": (0, 2**62), "container_log_max_files": (1, 10**6),
                  "image_gc_high_threshold": (0, 100), "image_gc_low_threshold": (0, 100), "lease_duration": (1, 10**6)}
_POSITIVE = {"max_pods", "poll_interval", "lease_duration", "lease_renew_interval", "resync_interval",
             "node_status_report_frequency", "container_log_max_files", "backoff_base", "backoff_max"}


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


_QUANTITY = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?\Z")
_QUANTITY_SUFFIX = {
    "n": fractions.Fraction(1, 10**9), "u": fractions.Fraction(1, 10**6), "m": fractions.Fraction(1, 1000),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def parse_quantity(value):
    """A Kubernetes resource quantity ("500m", "128Mi", "1e3", 2) as an exact Fraction."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ContainerConfigError(f"invalid resource quantity {value!r}", retry=False)
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE" and len(suffix) > 1:     # an exponent ("1e3"), not exa ("1E")
        return fractions.Fraction(number + suffix)
    return fractions.Fraction(number) * _QUANTITY_SUFFIX.get(suffix, 1)


_PARSERS = {"str": str, "int": int, "float": float, "bool": _parse_bool, "tuple": _parse_list, "dict": _parse_labels,
            "size": lambda text: int(parse_quantity(text)), "path": os.path.expanduser}
# (flag, parser, help) of each Config field made by _flag; the env var is MINIKRUST_<FIELD>.
_FLAGS = [("--" + item.name.replace("_", "-"),
           _PARSERS[item.metadata["parse"] or item.type.__name__], item.metadata["help"])
          for item in dataclasses.fields(Config) if "help" in item.metadata]
_CHOICES = {"sync": ("watch", "poll"), "log_level": ("debug", "info", "warning", "error"),
            "log_format": ("text", "json"),
            "image_pull_credentials_verification_policy": ("NeverVerify", "NeverVerifyPreloadedImages", "AlwaysVerify")}


_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
# --node-labels a kubelet may set in the kubernetes.io and k8s.io namespaces (NodeRestriction refuses others)
_ALLOWED_KUBE_LABELS = frozenset({
    "kubernetes.io/hostname", "kubernetes.io/instance-type", "kubernetes.io/os", "kubernetes.io/arch",
    "beta.kubernetes.io/instance-type", "beta.kubernetes.io/os", "beta.kubernetes.io/arch",
    "failure-domain.beta.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone", "topology.kubernetes.io/region", "node.kubernetes.io/instance-type"})


def _label_problem(key, value):
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.fullmatch(name) or (prefix and not _NODE_NAME.fullmatch(prefix)):
        return f"label key {key!r} is not valid"
    if value and not _LABEL_NAME.fullmatch(value):
        return f"label value {value!r} of {key} is not valid"
    domain = "." + prefix.lower()
    if domain.endswith((".kubernetes.io", ".k8s.io")):
        kubelet_owned = domain.endswith((".kubelet.kubernetes.io", ".node.kubernetes.io"))
        if not kubelet_owned and key not in _ALLOWED_KUBE_LABELS:
            return f"label {key} is in a namespace a kubelet may not set (use kubelet.kubernetes.io/ or node.kubernetes.io/)"
    return None


def _config_problem(item, value):
    """Why a Config value is refused (its type, choices, range, or what the API server refuses), or None."""
    name = item.name
    if value is None and item.default is None:
        return None
    accepted = {float: (int, float), tuple: (tuple, list)}.get(item.type, item.type)     # 1 for 1.0; a list
    if not isinstance(value, accepted) or (isinstance(value, bool) and item.type is not bool):
        return f"is not of type {item.type.__name__}"
    strings = [*value, *value.values()] if isinstance(value, dict) else value if item.type is tuple else ()
    if not all(isinstance(v, str) for v in strings):
        return "must hold strings only"
    if value not in _CHOICES.get(name, (value,)):
        return f"is not one of {', '.join(_CHOICES[name])}"
    if name == "node_labels":
        return next(filter(None, (_label_problem(k, v) for k, v in value.items())), None)
    if name == "node_name" and (len(value) > 253 or not _NODE_NAME.fullmatch(value)):
        return "is not a valid node name (lowercase DNS subdomain)"
    if name == "node_ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return "is not an IP address"
    if name == "port" and not 0 <= value <= 65535:
        return "is not a port number"
    if name in _POSITIVE and value <= 0:
        return "must be positive"
    low, high = _CONFIG_RANGES.get(name, (None, None))
    if low is not None and not low <= value <= high:
        return f"is not between {low} and {high}"
    if item.type is float and not 0 <= value <= threading.TIMEOUT_MAX:    # NaN fails this too
        return f"must be a number of seconds between 0 and {threading.TIMEOUT_MAX:.0f}"
    return None


def parse_args(argv=None, environ=None):
    """Config from flags, then MINIKRUST_* variables, then defaults; ConfigError names the flag."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="minikrust", description="A kubelet that runs WASI modules as pod containers.",
        epilog="Every flag can also be set by the environment variable MINIKRUST_<FLAG> "
               "(e.g. MINIKRUST_NODE_NAME).")
    parser.add_argument("--version", action="version", version=f"minikrust {__version__}")
    for flag, convert, help_text in _FLAGS:      # metavar: NODE_NAME for --node-name; a bool: BOOL, optional
        optional = {"nargs": "?", "const": "true", "metavar": "BOOL"} if convert is _parse_bool else {}
        parser.add_argument(flag, help=help_text, **optional)
    args = parser.parse_args(argv)       # None: sys.argv[1:]
    values, sources = {}, {}
    for flag, convert, _help in _FLAGS:
        dest = flag[2:].replace("-", "_")
        raw, source = getattr(args, dest), flag
        if raw is None:
            env_name = "MINIKRUST_" + dest.upper()
            raw, source = environ.get(env_name), env_name
        if raw is None:
            continue
        try:
            value = convert(raw)
        except (ValueError, ContainerConfigError) as exc:     # ContainerConfigError: not a quantity
            raise ConfigError(f"{source}: {exc}") from None
        values[dest], sources[dest] = value, source
    values.setdefault("echo", True)
    try:
        return Config(**values)
    except ConfigError as exc:      # named as the flag or variable the user set it with
        raise ConfigError(re.sub(r"^Config\.(\w+)", lambda m: sources.get(m.group(1), m.group(0)), str(exc))) from None


@dataclass(frozen=True)
class ClusterConfig:
    """How to reach one API server (kubeconfig or in-cluster); `source` is for error messages."""
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

    def cluster_entry(self):
        """This API server as a kubeconfig `cluster` entry (for a kubeconfig the kubelet writes)."""
        entry = {"server": self.server, "certificate-authority": self.ca_file, "tls-server-name": self.tls_server_name,
                 "certificate-authority-data": self.ca_data and base64.b64encode(self.ca_data).decode(),
                 "insecure-skip-tls-verify": self.insecure, "proxy-url": self.proxy_url}
        return {key: value for key, value in entry.items() if value}

    def ssl_context(self, cert_data=None, key_data=None):
        """An SSLContext trusting the CA, presenting the client certificate (or `cert_data`/`key_data`)."""
        cadata = self.ca_data.decode("ascii", "replace") if self.ca_data else None
        try:        # the kubeconfig's CA and no other, as client-go trusts it (none named: the system's)
            ctx = ssl.create_default_context(cafile=self.ca_file, cadata=cadata)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{self.source}: certificate-authority: not a usable CA "
                              f"certificate ({exc})") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        pems = (cert_data or self.client_cert_data, key_data or self.client_key_data)
        if not any(pems) and not self.client_cert_file:
            return ctx
        with tempfile.TemporaryDirectory(prefix="minikrust-tls-") as tmp:     # ssl reads chains from files
            files = [self.client_cert_file, self.client_key_file]
            for index, data in enumerate(pems):
                if data:
                    files[index] = os.path.join(tmp, f"{index}.pem")
                    _write_beneath(tmp, f"{index}.pem", data, 0o600, sync=False)
            try:
                ctx.load_cert_chain(*files)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise ConfigError(f"{self.source}: client-certificate/client-key: not a usable "
                                  f"certificate and key pair ({reason})") from None
        return ctx


def _named(items, name, kind, path):
    """The `kind` entry (cluster, user or context) called `name` in a kubeconfig list."""
    if not isinstance(items, list):
        raise ConfigError(f"{path}: {kind}s: expected a list")
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind)
            if body is not None and not isinstance(body, dict):
                raise ConfigError(f"{path}: {kind}s[{name}].{kind}: expected a mapping")
            return body or {}
    raise ConfigError(f"{path}: {kind}s: no {kind} named {name!r}")


def _data_or_file(entry, key, dest, where, base_dir):
    """{`dest`_data: bytes} from the base64 `<key>-data`, or {`dest`_file: path} from `<key>`, or {}."""
    if f"{key}-data" in entry:
        try:
            return {f"{dest}_data": base64.b64decode(entry[f"{key}-data"], validate=True)}
        except (ValueError, TypeError):
            raise ConfigError(f"{where}.{key}-data: not valid base64") from None
    return {f"{dest}_file": _file_field(entry, key, where, base_dir)} if key in entry else {}


def _file_field(entry, key, where, base_dir):
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a file path")
    path = os.path.join(base_dir, os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.{key}: file {path} does not exist")
    return path


def _read_yaml(path, what):
    """The YAML documents of a file; ConfigError names the file (as `what`), and the line yaml failed at."""
    try:
        with open(path, "rb") as f:
            return list(yaml.safe_load_all(f))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}: not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None


def load_kubeconfig(path, context=None):
    """ClusterConfig from a kubeconfig file, for `context` or its current-context; relative paths
    are from the file's folder, as kubectl reads them. ConfigError names the file and field."""
    path = os.path.abspath(os.path.expanduser(path))
    docs = _read_yaml(path, "kubeconfig")
    doc = docs[0] if len(docs) == 1 else None
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
    values = {"server": server.rstrip("/"), **_data_or_file(cluster, "certificate-authority", "ca", where, base_dir)}
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
    cert = _data_or_file(user, "client-certificate", "client_cert", where, base_dir)
    key = _data_or_file(user, "client-key", "client_key", where, base_dir)
    if bool(cert) != bool(key):
        missing = "client-key" if cert else "client-certificate"
        raise ConfigError(f"{where}.{missing}: missing (client-certificate and client-key go together)")
    values.update(cert, **key)
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
            "install_hint": " ".join(str(spec.get("installHint") or "").split()), "where": where}


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_config(environ=None, sa_dir=None):
    """ClusterConfig of a pod: KUBERNETES_SERVICE_HOST/PORT and the mounted service account
    (its token file is re-read as the kubelet rotates it)."""
    environ = os.environ if environ is None else environ
    sa_dir = sa_dir or SERVICE_ACCOUNT_DIR
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
# The one REST client every part talks to the API server through (retries, exec/token credentials,
# watches), and the one set of time formats the API and CRI logs use.

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_API_CONNECTIONS = 16       # kept open: the status writers (8), watches, heartbeats, volume reads
_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def _rfc3339nano(ns, digits=9):
    """Nanoseconds since the epoch as RFC 3339 in UTC with `digits` fraction digits (9: a CRI log time)."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + (f".{frac:09d}"[:digits + 1] if digits else "") + "Z"


def _k8s_time(ts=None, micro=False):
    """A Kubernetes Time (or MicroTime, `micro`) of `ts` seconds since the epoch, default now."""
    return _rfc3339nano(time.time_ns() if ts is None else int(ts * 1e9), 6 if micro else 0)


def _parse_rfc3339(text):
    """An RFC 3339 time (any fraction, any offset) as integer nanoseconds since the epoch."""
    match = _RFC3339.match(text)
    if not match:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    base, fraction, zone = match.groups()
    seconds = datetime.datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return int(seconds) * 10**9 + int((fraction or "0").ljust(9, "0"))


class _Adapter(requests.adapters.HTTPAdapter):
    """The connections to the API server, its pool found once (not per request); over TLS, the
    cluster's own SSLContext (CA, client cert) and tls-server-name on every pool, since requests'
    `verify`/`cert` take file paths and cannot override the name checked."""

    def __init__(self, ssl_context=None, server_name=None):
        self._ssl_context, self._server_name, self._pool = ssl_context, server_name, None
        super().__init__(pool_connections=1, pool_maxsize=_API_CONNECTIONS)

    def _tls_kwargs(self, kwargs):
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
            kwargs["assert_hostname"] = self._server_name
        return kwargs

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **self._tls_kwargs(kwargs))

    def proxy_manager_for(self, proxy, **kwargs):
        return super().proxy_manager_for(proxy, **self._tls_kwargs(kwargs))

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        """One server, one pool: verification comes from the cluster's SSLContext alone (neither
        `verify` nor REQUESTS_CA_BUNDLE may add CAs the kubeconfig does not name)."""
        if self._pool is None:
            self._pool = super().get_connection_with_tls_context(request, True, proxies)
        return self._pool

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, _ = super().build_connection_pool_key_attributes(request, True, None)
        return host_params, {} if self._ssl_context is None else {"cert_reqs": self._ssl_context.verify_mode}

    def cert_verify(self, conn, url, verify, cert):
        """Verification is configured in the SSLContext; requests must not reset it."""

    def build_response(self, req, resp):
        """requests' Response without its cookie jar and URL copy (the API sets no cookies)."""
        response = requests.Response()
        response.status_code, response.reason, response.headers = resp.status, resp.reason, resp.headers
        response.raw, response.request, response.connection = resp, req, self
        return response


def _api_error(response):
    """ApiError from an error answer; the API's Status when the body is one, else the HTTP reason."""
    with contextlib.suppress(ValueError):
        status = response.json()
        if isinstance(status, dict) and status.get("kind") == "Status":
            return ApiError(status.get("code") or response.status_code, status.get("reason", ""),
                            status.get("message", ""), status)
    return ApiError(response.status_code, response.reason or "", (response.text or "")[:200])


class ApiClient:
    """A REST client of the Kubernetes API: one session, retries with backoff and jitter on
    connection errors, 429 (Retry-After) and 5xx; other errors raise ApiError at once."""

    def __init__(self, cluster, *, retries=5, backoff=0.2, max_backoff=5.0):
        self.cluster, self.server = cluster, cluster.server
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._closed = threading.Event()
        self._streams = {}              # open watch response -> its path
        self._lock, self._exec_lock = threading.Lock(), threading.Lock()
        self._exec = (None, None, None)     # an exec plugin's (ExecCredential status, expiry ns, cert pair)
        self._token_file_state = (None, None)      # (mtime, token) of cluster.token_file
        self.on_error = None        # callable(code) told of every error answer (0: no answer), for metrics
        self.session = self._new_session()
        self._headers = {"User-Agent": f"minikrust/{__version__}", "Accept": "application/json",
                         "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}
        if cluster.username:
            basic = base64.b64encode(f"{cluster.username}:{cluster.password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"

    def _new_session(self, cert=None, key=None):
        """The connections (a requests adapter) and the environment's proxies, read once."""
        session = requests.Session()
        tls = self.server.startswith("https:")
        session.mount(self.server, _Adapter(self.cluster.ssl_context(cert, key), self.cluster.tls_server_name)
                      if tls else _Adapter())
        proxy = self.cluster.proxy_url
        session.proxies = {"http": proxy, "https": proxy} if proxy else requests.utils.get_environ_proxies(self.server)
        session.trust_env = False
        return session

    def credential(self, refresh=False):
        """The bearer token to send (None when authenticating otherwise); runs exec plugins, whose
        credential is kept until it expires (a new client certificate: new TLS connections)."""
        cluster = self.cluster
        if cluster.exec_config:
            with self._exec_lock:
                status, expiry, pair = self._exec
                if refresh or status is None or (expiry and time.time_ns() >= expiry):
                    status, expiry = self._run_exec()
                    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
                    if cert and (cert, key) != pair:
                        pair, old = (cert, key), self.session
                        self.session = self._new_session(cert.encode(), key and key.encode())
                        old.close()
                    self._exec = (status, expiry, pair)
                return status.get("token")
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

    def _run_exec(self):
        """Run the client.authentication.k8s.io exec plugin: (ExecCredential status, expiry ns or None)."""
        spec = self.cluster.exec_config
        info = {"apiVersion": spec["apiVersion"], "kind": "ExecCredential",
                "spec": {"interactive": False, "cluster": {"server": self.server}}}
        env = dict(os.environ, KUBERNETES_EXEC_INFO=json.dumps(info))
        env.update(spec["env"])
        try:
            done = subprocess.run([spec["command"], *spec["args"]], env=env, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            hint = f" ({spec['install_hint']})" if spec.get("install_hint") else ""
            raise ConfigError(f"{spec['where']}.command: cannot run {spec['command']!r}: {exc}{hint}") from None
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
        return status, _parse_rfc3339(expiry) if expiry else None

    def request(self, method, path, body=None, *, params=None, content_type="application/json", timeout=30,
                stream=False, retries=None):
        """Send one API request; the parsed JSON answer, or the open response when `stream`."""
        retries = self.retries if retries is None else retries
        url = self.server + path + (f"?{urllib.parse.urlencode(params, doseq=True)}" if params else "")
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        sent = {} if data is None else {"Content-Type": content_type, "Content-Length": str(len(data))}
        refreshed, attempt, wait = False, -1, 0
        while True:
            attempt += 1
            if self._closed.wait(wait):
                raise ApiError(0, "ClientClosed", "the API client was closed")
            token = self.credential()
            # straight to the adapter with a request made here: requests' own preparing and merging
            # (URL parsing, hooks, cookies, settings) costs as much CPU as the rest of the call
            prepared = requests.PreparedRequest()
            prepared.method, prepared.url, prepared.body = method, url, data
            prepared.headers = {**self._headers, **sent}
            if token:
                prepared.headers["Authorization"] = f"Bearer {token}"
            code, retry_after = 0, None         # 0: no answer (a connection error), retried as a 5xx
            try:
                session = self.session
                response = session.get_adapter(url).send(prepared, stream=stream, timeout=(10, timeout),
                                                         proxies=session.proxies)
            except requests.RequestException as exc:
                error = ApiError(0, "ConnectionError", f"{method} {path}: {exc}")
            else:
                code, retry_after = response.status_code, response.headers.get("Retry-After")
                if code < 400:
                    return response if stream else json.loads(response.raw.read(decode_content=True) or b"{}")
                error = _api_error(response)
                response.close()
            self._note_error(code)
            if code == 401 and self.cluster.exec_config and not refreshed:
                refreshed, attempt, wait = True, attempt - 1, 0      # a revoked plugin credential: ask again
                self.credential(refresh=True)
                continue
            if (code and code not in _RETRY_STATUSES) or attempt >= retries:
                raise error
            wait = random.uniform(0.5, 1.0) * min(self.max_backoff, self.backoff * 2 ** attempt)
            with contextlib.suppress(ValueError):       # the server may say how long (Retry-After), as client-go reads it
                wait = min(float(retry_after or "x"), 60.0)
            log.debug("%s %s: %s; retrying", method, path, error)

    get = functools.partialmethod(request, "GET")
    post = functools.partialmethod(request, "POST")
    put = functools.partialmethod(request, "PUT")
    patch = functools.partialmethod(request, "PATCH", content_type="application/merge-patch+json")
    delete = functools.partialmethod(request, "DELETE")

    def _note_error(self, code):
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error(code)

    def watch(self, path, params):
        """(type, object) watch events until the server ends the stream or goes quiet past its timeoutSeconds;
        an expired resourceVersion raises ApiError(410), as an answer or an ERROR event."""
        params = dict(params, watch="true")
        timeout = float(params.get("timeoutSeconds", 300)) + 30
        response = self.request("GET", path, params=params, timeout=timeout, stream=True)
        with self._lock:
            self._streams[response] = path
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
                self._streams.pop(response, None)
            response.close()

    def interrupt_watches(self, path=None):
        """End every open watch (of `path` only, if given) now; the client stays usable."""
        with self._lock:
            streams = [r for r, p in self._streams.items() if path is None or p == path]
        for response in streams:
            _shutdown_response(response)

    def close(self):
        """Stop: interrupt retry sleeps and open watches, close the connections."""
        self._closed.set()
        self.interrupt_watches()
        self.session.close()

    @property
    def closed(self):
        return self._closed.is_set()


def _shutdown_response(response):
    """Wake a thread blocked reading `response` from another thread: shutdown() the socket."""
    with contextlib.suppress(AttributeError, OSError):
        response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        response.close()


def api_client_for(config):
    """The ApiClient of a Config's --kubeconfig, or None (standalone: static pods only)."""
    if not config.kubeconfig:
        return None
    in_cluster = config.kubeconfig == "in-cluster"
    api = ApiClient(in_cluster_config() if in_cluster else load_kubeconfig(config.kubeconfig, config.context))
    api.credential()            # a broken exec plugin is a configuration error, found now
    return api


# --- Node: registration, lease, status ---
# The Node: labels, taints, conditions, capacity and allocatable measured from the host (pure
# builders), the Event builder, and NodeAgent, the thread that keeps the Node, its Lease and status.

# Krustlet's wasi provider labels and taints, so manifests written for Krustlet (nodeSelector
# kubernetes.io/arch: wasm32-wasi, tolerations for the kubernetes.io/arch taint) run here unchanged.
WASM_ARCH = "wasm32-wasi"
LEASE_NAMESPACE = "kube-node-lease"
_MEMORY_EVICTION_HARD = 100 * 1024 * 1024       # memory.available<100Mi, the kubelet's default
_DISK_EVICTION_FRACTION = 0.10                  # nodefs.available<10%
_PID_PRESSURE_FRACTION = 0.90
# A heartbeat that hangs is worse than one that fails: the next beat (or a quick retry) comes soon,
# while a 30 s timeout retried five times would outlast the 40 s Lease.
_HEARTBEAT = {"timeout": 10, "retries": 1}


def node_labels(config):
    """--node-labels, then Krustlet's Node labels and the hostname (which those may not override)."""
    managed = {"beta.kubernetes.io/arch": WASM_ARCH, "beta.kubernetes.io/os": "linux",
               "kubernetes.io/arch": WASM_ARCH, "kubernetes.io/os": "linux",
               "kubernetes.io/hostname": config.node_name, "type": "krustlet"}
    for key in set(config.node_labels) & set(managed):
        log.warning("node label %s is managed by the kubelet; ignoring --node-labels value", key)
    return {**config.node_labels, **managed}


def node_taints():
    """Krustlet's taints: they keep ordinary (OCI container) pods off this node."""
    return [{"key": "kubernetes.io/arch", "value": WASM_ARCH, "effect": "NoSchedule"},
            {"key": "kubernetes.io/arch", "value": WASM_ARCH, "effect": "NoExecute"}]


def runtime_version():
    """wasmtime's version from the installed package's metadata, without loading the engine."""
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _meminfo():
    """/proc/meminfo in bytes, by field name."""
    info = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def host_facts(root_dir):
    """What the node reports about its host, measured now (cheap: a few /proc reads)."""
    meminfo = _meminfo()
    try:
        disk_total, _, disk_free = shutil.disk_usage(root_dir)
    except OSError:
        disk_total = disk_free = 0
    try:
        os_image = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        os_image = platform.system()
    loadavg = _read("/proc/loadavg").split()
    processes = int(loadavg[3].split("/")[1]) if len(loadavg) > 3 and "/" in loadavg[3] else 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpus": cpus, "memory_total": meminfo.get("MemTotal", 0),
            "memory_available": meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
            "disk_total": disk_total, "disk_free": disk_free, "processes": processes,
            "pid_max": int(_read("/proc/sys/kernel/pid_max", "32768") or 32768),
            "machine_id": _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id"),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "kernel": platform.release(), "os_image": os_image}


def detect_node_ip(server=None):
    """The address this host uses to reach the API server (the kubelet's default --node-ip)."""
    host = urllib.parse.urlsplit(server).hostname if server else None
    try:
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host or "10.255.255.255", 443))      # UDP connect sends nothing
            return s.getsockname()[0]
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


def _ki(nbytes):
    return f"{nbytes // 1024}Ki"


def node_condition_states(facts, ready=True):
    """(status, reason, message) per condition type, from host facts, as the kubelet words them."""
    memory = facts["memory_available"] < _MEMORY_EVICTION_HARD
    disk = facts["disk_total"] > 0 and facts["disk_free"] < _DISK_EVICTION_FRACTION * facts["disk_total"]
    pids = facts["processes"] > _PID_PRESSURE_FRACTION * facts["pid_max"]
    return {
        "MemoryPressure": ("True", "KubeletHasInsufficientMemory", "kubelet has insufficient memory available")
        if memory else ("False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        "DiskPressure": ("True", "KubeletHasDiskPressure", "kubelet has disk pressure")
        if disk else ("False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        "PIDPressure": ("True", "KubeletHasInsufficientPID", "kubelet has insufficient PID available")
        if pids else ("False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        "Ready": ("True", "KubeletReady", "kubelet is posting ready status")
        if ready else ("False", "KubeletNotReady", "kubelet is shutting down"),
    }


def node_conditions(states, previous, now):
    """Conditions with lastTransitionTime kept from `previous` while the status is unchanged."""
    before = {c.get("type"): c for c in previous or []}
    conditions = []
    for kind, (status, reason, message) in states.items():
        old = before.get(kind)
        since = (old.get("lastTransitionTime") or now) if old and old.get("status") == status else now
        conditions.append({"type": kind, "status": status, "reason": reason, "message": message,
                           "lastHeartbeatTime": now, "lastTransitionTime": since})
    return conditions


def node_allocatable(facts):
    """The Node's allocatable cpu, memory and ephemeral-storage: its capacity less the kubelet's default
    hard eviction thresholds. An unset limit in the downward API is this value (as the kubelet's)."""
    return {"cpu": str(facts["cpus"]), "memory": _ki(max(0, facts["memory_total"] - _MEMORY_EVICTION_HARD)),
            "ephemeral-storage": _ki(int(facts["disk_total"] * (1 - _DISK_EVICTION_FRACTION)))}


def node_status(config, node_ip, facts, conditions, port=None, images=None):
    """The Node's status; `port` is the server's real port (config.port 0), `images` status.images."""
    pods = {"pods": str(config.max_pods)}
    capacity = {"cpu": str(facts["cpus"]), "memory": _ki(facts["memory_total"]),
                "ephemeral-storage": _ki(facts["disk_total"]), **pods}
    return {
        "capacity": capacity, "allocatable": node_allocatable(facts) | pods, "conditions": conditions,
        "addresses": [{"type": "InternalIP", "address": node_ip},
                      {"type": "Hostname", "address": config.node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": config.port if port is None else port}},
        "nodeInfo": {"machineID": facts["machine_id"], "systemUUID": facts["machine_id"],
                     "bootID": facts["boot_id"], "kernelVersion": facts["kernel"],
                     "osImage": facts["os_image"], "operatingSystem": "linux",
                     "architecture": "wasm-wasi",
                     "containerRuntimeVersion": f"wasmtime://{runtime_version()}",
                     "kubeletVersion": f"{KUBE_VERSION}-minikrust", "kubeProxyVersion": ""},
    } | ({"images": images} if images is not None else {})


def _status_signature(status):
    """What makes a status worth sending: everything but heartbeat times and volatile numbers."""
    conditions = [(c["type"], c["status"], c["reason"]) for c in status["conditions"]]
    return json.dumps([status["capacity"], status["allocatable"], status["addresses"], status["nodeInfo"],
                       status["daemonEndpoints"], conditions, status.get("images")], sort_keys=True)


def node_object(config, status):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": config.node_name, "labels": node_labels(config),
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                         "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
            "spec": {"taints": node_taints()},
            "status": status}


def _event(node_name, involved, reason, message, kind="Normal"):
    """A core/v1 Event about `involved` (its involvedObject: the Node or a pod), as the kubelet records them."""
    now = _k8s_time()
    return {"apiVersion": "v1", "kind": "Event", "involvedObject": involved,
            "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": involved.get("namespace", "default")},
            "reason": reason, "message": message, "type": kind, "count": 1, "firstTimestamp": now,
            "lastTimestamp": now, "source": {"component": "kubelet", "host": node_name},
            "reportingComponent": "kubelet", "reportingInstance": node_name}


class _Loop:
    """A daemon thread calling `self._run()` from start() until stop() sets `self._stop`."""

    def __init__(self, name):
        self._name, self._stop, self._thread = name, threading.Event(), None

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        self._stop.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class NodeAgent(_Loop):
    """Keeps this kubelet's Node: registers (or adopts) it, renews its Lease, patches its status on
    change and every node_status_report_frequency, and marks it NotReady on stop()."""

    def __init__(self, api, config, *, images=None):
        self.api, self.config = api, config
        self.name = config.node_name
        self.port = config.port            # the server's real port once it listens (Kubelet.start)
        self.images = images               # callable -> status.images, or None
        self.node_ip = config.node_ip or detect_node_ip(api.server)
        self.node = None                   # the Node as last read or written
        self.lease = None
        self._last_status, self._last_sent, self._sent_at = None, None, 0.0
        self.registered = threading.Event()
        super().__init__(f"node-{self.name}")

    def _status(self, ready=True):
        facts = host_facts(self.config.root_dir)
        conditions = node_conditions(node_condition_states(facts, ready=ready),
                                     (self._last_status or {}).get("conditions"), _k8s_time())
        images = None
        if self.images is not None:
            try:
                images = self.images()
            except (OSError, ValueError, MinikrustError) as exc:
                log.debug("node images unavailable: %s", exc)
        return node_status(self.config, self.node_ip, facts, conditions, port=self.port, images=images)

    def register(self):
        """Create the Node, or adopt an existing one (its labels, our status): tryRegisterWithAPIServer."""
        status = self._status()
        try:
            self.node = self.api.post("/api/v1/nodes", node_object(self.config, status))
            log.info("registered node %s", self.name)
            self._last_status, self._last_sent, self._sent_at = status, _status_signature(status), time.monotonic()
        except ApiError as exc:
            if exc.code != 409:
                raise
            self.node = self.api.get(f"/api/v1/nodes/{self.name}")
            labels = node_labels(self.config)
            current = self.node.get("metadata", {}).get("labels") or {}
            if any(current.get(k) != v for k, v in labels.items()):
                self.node = self.api.patch(f"/api/v1/nodes/{self.name}", {"metadata": {"labels": labels}},
                                           content_type="application/strategic-merge-patch+json")
            existing = self.node.get("status") or {}
            self._last_status = existing if existing.get("conditions") else None    # keeps transition times
            self.update_status(force=True)
            log.info("adopted existing node %s", self.name)
        self.registered.set()
        self._event("Starting", "Starting kubelet.")
        self._event("NodeReady", f"Node {self.name} status is now: NodeReady")

    def _event(self, reason, message):
        """Record a Node event; best effort (an event never stops the node)."""
        node = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.name}
        try:
            self.api.post("/api/v1/namespaces/default/events", _event(self.name, node, reason, message), timeout=5)
        except ApiError as exc:
            log.debug("event %s for node %s not recorded: %s", reason, self.name, exc)

    def update_status(self, force=False):
        """Patch the node status if it changed, if the report frequency is due, or when forced."""
        status = self._status()
        signature = _status_signature(status)
        due = time.monotonic() - self._sent_at >= self.config.node_status_report_frequency
        if not (force or due or signature != self._last_sent):
            return
        try:
            self.node = self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": status},
                                       content_type="application/strategic-merge-patch+json", **_HEARTBEAT)
        except ApiError as exc:
            if exc.code == 404:             # the Node was deleted: register it again next beat
                log.warning("node %s is gone from the API server; registering again", self.name)
                self.registered.clear()
                self._last_status = self._last_sent = None
            raise
        self._last_status, self._last_sent, self._sent_at = status, signature, time.monotonic()

    def _lease_body(self):
        lease = self.lease or {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                               "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE}}
        lease = json.loads(json.dumps(lease))
        if self.node and self.node.get("metadata", {}).get("uid"):
            lease["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                                     "uid": self.node["metadata"]["uid"]}]
        lease["spec"] = dict(lease.get("spec") or {}, holderIdentity=self.name,
                             leaseDurationSeconds=self.config.lease_duration, renewTime=_k8s_time(micro=True))
        return lease

    def renew_lease(self):
        """Renew (or create) the node Lease; a 409 Conflict means our copy is stale: re-read, retry."""
        base = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        create = False
        for _attempt in range(4):
            try:
                if create:
                    self.lease = self.api.post(base, self._lease_body(), **_HEARTBEAT)
                    return self.lease
                if self.lease is None:
                    self.lease = self.api.get(f"{base}/{self.name}", **_HEARTBEAT)
                self.lease = self.api.put(f"{base}/{self.name}", self._lease_body(), **_HEARTBEAT)
                return self.lease
            except ApiError as exc:
                if exc.code not in (404, 409) or (create and exc.code == 404):
                    raise
                self.lease, create = None, exc.code == 404      # gone: create it; changed: read it again
        raise ApiError(409, "Conflict", f"lease {self.name} kept changing")

    def heartbeat(self):
        """One beat: register if not yet, renew the Lease, update the status if needed."""
        if not self.registered.is_set():
            self.register()
        self.renew_lease()
        self.update_status()

    def _run(self):
        failures, wait = 0, 0
        while not self._stop.wait(wait):
            try:
                self.heartbeat()
                failures, wait = 0, self.config.lease_renew_interval
            except (MinikrustError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                failures += 1
                wait = min(self.config.lease_renew_interval, 0.5 * 2 ** failures)
                log.warning("node %s heartbeat failed: %s", self.name, exc)

    def stop(self, timeout=10.0):
        """Stop the heartbeat and report the node NotReady (it keeps its Lease until it expires)."""
        super().stop(timeout)
        if self.registered.is_set() and not self.api.closed:
            try:
                status = self._status(ready=False)
                self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": {"conditions": status["conditions"]}},
                               content_type="application/strategic-merge-patch+json", timeout=5)
                log.info("node %s marked NotReady", self.name)
                self._event("NodeNotReady", f"Node {self.name} status is now: NodeNotReady")
            except ApiError as exc:
                log.warning("could not mark node %s NotReady: %s", self.name, exc)


# --- Sources: API watch or poll, static manifests ---
# Where pods come from: the API server (watch or poll, with resync) and static manifest files; each
# source turns what it sees into pod_added/pod_updated/pod_deleted calls on the pod handler.

def _pod_key(pod):
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _pod_uid(pod):
    return (pod.get("metadata") or {}).get("uid") or _pod_key(pod)


def _pod_rv(pod):
    return (pod.get("metadata") or {}).get("resourceVersion")


def _deliver(call, pod):
    """call(pod), a handler's pod_added/pod_updated/pod_deleted; its error is logged, never fatal to the source."""
    try:
        call(pod)
    except Exception:
        log.exception("pod handler %s(%s) failed", call.__name__, _pod_key(pod))


class _PodSet:
    """The pods a source has reported, by uid: raw events into de-duplicated handler calls."""

    def __init__(self, handler):
        self.handler = handler
        self.pods = {}

    def upsert(self, pod):
        uid, rv = _pod_uid(pod), _pod_rv(pod)
        old = self.pods.get(uid)
        if old is not None and (_pod_rv(old) == rv if rv is not None else old == pod):
            return      # unchanged (a static pod has no resourceVersion: compared whole)
        self.pods[uid] = pod
        _deliver(self.handler.pod_added if old is None else self.handler.pod_updated, pod)

    def remove(self, pod):
        old = self.pods.pop(_pod_uid(pod), None)
        if old is not None:
            _deliver(self.handler.pod_deleted, pod)

    def reconcile(self, pods):
        """A full list is the truth: deliver changes, and deletions of pods no longer listed."""
        listed = {_pod_uid(p) for p in pods}
        for uid in [uid for uid in self.pods if uid not in listed]:
            self.remove(self.pods[uid])
        for pod in pods:
            self.upsert(pod)


class ApiPodSource(_Loop):
    """Feeds the pods bound to this node to a handler. watch: list, then watch from its
    resourceVersion (resumed after a drop, listed again after 410 and every `resync_interval`, so a
    deletion missed while disconnected is still reported); poll: a list every `poll_interval`."""

    def __init__(self, api, node_name, handler, sync="watch", poll_interval=10.0, resync_interval=300.0):
        self.api, self.node_name, self.sync = api, node_name, sync
        self.poll_interval, self.resync_interval = poll_interval, resync_interval
        self.known = _PodSet(handler)
        self.resource_version = None
        self.lists = 0                      # full lists done (tests and metrics read it)
        self.synced = threading.Event()     # set after the first successful list
        self._selector = {"fieldSelector": f"spec.nodeName={node_name}"}
        super().__init__(f"pods-{node_name}")

    def list(self):
        """List this node's pods and reconcile them with what was reported."""
        answer = self.api.get("/api/v1/pods", params=self._selector)
        self.known.reconcile(answer.get("items") or [])
        self.resource_version = (answer.get("metadata") or {}).get("resourceVersion")
        self.lists += 1
        self.synced.set()

    def _watch(self, until):
        """Watch from the last resourceVersion until the server ends the stream or `until`."""
        timeout = max(1, int(until - time.monotonic()))
        params = dict(self._selector, allowWatchBookmarks="true", resourceVersion=self.resource_version,
                      timeoutSeconds=str(timeout))
        for kind, obj in self.api.watch("/api/v1/pods", params):
            if self._stop.is_set():
                return
            if kind in ("ADDED", "MODIFIED"):
                self.known.upsert(obj)
            elif kind == "DELETED":
                self.known.remove(obj)
            self.resource_version = _pod_rv(obj) or self.resource_version     # ERROR events raise in watch()

    def _run(self):
        failures, next_list, wait = 0, 0.0, 0
        while not self._stop.wait(wait):
            try:
                if self.sync == "poll":
                    self.list()
                    failures, wait = 0, self.poll_interval
                    continue
                if self.resource_version is None or time.monotonic() >= next_list:
                    self.list()
                    next_list = time.monotonic() + self.resync_interval
                started = time.monotonic()
                self._watch(next_list)
                failures = 0
                wait = 1.0 if time.monotonic() - started < 1.0 else 0     # no spin if watches end at once
            except (MinikrustError, OSError, ValueError) as exc:
                if self._stop.is_set() or self.api.closed:
                    break
                if isinstance(exc, ApiError) and exc.code == 410:
                    log.info("pod watch of %s expired (410); listing again", self.node_name)
                    self.resource_version, wait = None, 0
                    continue
                failures += 1
                log.warning("pods of %s: %s", self.node_name, exc)
                wait = min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.0)

    def stop(self, timeout=5.0):
        """Stop reporting pods; an open watch is interrupted."""
        self._stop.set()
        self.api.interrupt_watches("/api/v1/pods")
        super().stop(timeout)


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_RFC1123 = ("a lowercase RFC 1123 {} must consist of lower case alphanumeric characters{}, and must start and end "
            "with an alphanumeric character")
_SUBDOMAIN_ERROR, _LABEL_ERROR = _RFC1123.format("subdomain", ", '-' or '.'"), _RFC1123.format("label", " or '-'")
_SPEC_TYPES = {"containers": list, "initContainers": list, "volumes": list, "restartPolicy": str,
               "activeDeadlineSeconds": int, "terminationGracePeriodSeconds": int, "imagePullSecrets": list}
_MOUNT_TYPES = {"name": str, "mountPath": str, "subPath": str, "subPathExpr": str, "readOnly": bool}
_ENV_TYPES = {"name": str, "value": str, "valueFrom": dict}
_CONTAINER_TYPES = {"image": str, "command": list, "args": list, "env": list, "envFrom": list, "volumeMounts": list,
                    "resources": dict, "workingDir": str, "terminationMessagePath": str, "imagePullPolicy": str}


def _invalid(path, value, why):
    shown = json.dumps(value, default=str)
    return f"{path}: Invalid value: {shown if len(shown) <= 80 else shown[:77] + '...'}: {why}"


def _typed(path, obj, types):
    """The first field of `obj` whose value is not of its type (as the API's decoding refuses it)."""
    for key, kind in types.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            return _invalid(f"{path}.{key}", value, f"must be {'a list' if kind is list else 'of type ' + kind.__name__}")
        if kind is list and any(not isinstance(item, str if key in ("command", "args") else dict) for item in value or ()):
            return _invalid(f"{path}.{key}", value, "has an item of the wrong type")
    return None


def pod_problem(pod):
    """The first reason the API server would refuse this pod, as its field error, or None: the part
    of ValidatePodCreate the kubelet builds on (names, required fields, mounts, field types)."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    spec = pod.get("spec") if isinstance(pod, dict) else None
    if not isinstance(meta, dict) or not meta.get("name"):
        return "metadata.name: Required value: name or generateName is required"
    name, namespace = meta["name"], meta.get("namespace", "default")
    if not isinstance(name, str) or len(name) > 253 or not _NODE_NAME.fullmatch(name):
        return _invalid("metadata.name", name, _SUBDOMAIN_ERROR)
    if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
        return _invalid("metadata.namespace", namespace, _LABEL_ERROR)
    uid = meta.get("uid", "")
    if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9-]{0,128}", uid):
        return _invalid("metadata.uid", uid, "must be a UID")
    for key in ("labels", "annotations"):
        if not isinstance(meta.get(key) or {}, dict):
            return _invalid(f"metadata.{key}", meta[key], "must be a map")
    if not isinstance(spec, dict):
        return "spec: Required value"
    problem = _typed("spec", spec, _SPEC_TYPES)
    if problem or not spec.get("containers"):
        return problem or "spec.containers: Required value"
    volumes, names = set(), set()       # filled as they are checked: every volume before any container
    problems = itertools.chain(
        (_name_problem(f"spec.volumes[{i}]", v, volumes) for i, v in enumerate(spec.get("volumes") or ())),
        (_container_problem(f"spec.{kind}[{i}]", container, names, volumes)
         for kind in ("initContainers", "containers") for i, container in enumerate(spec.get(kind) or ())))
    return next(filter(None, problems), None)


def _name_problem(path, obj, seen):
    """A container or volume: an object with a DNS-1123 label name not in `seen` (then added)."""
    if not isinstance(obj, dict):
        return _invalid(path, obj, "must be an object")
    name = obj.get("name")
    if not name:
        return f"{path}.name: Required value"
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
        return _invalid(f"{path}.name", name, _LABEL_ERROR)
    if name in seen:
        return f"{path}.name: Duplicate value: {json.dumps(name)}"
    seen.add(name)
    return None


def _container_problem(path, container, names, volumes):
    problem = _name_problem(path, container, names) or _typed(path, container, _CONTAINER_TYPES)
    if problem or not container.get("image"):
        return problem or f"{path}.image: Required value"
    mount_paths = set()
    for index, mount in enumerate(container.get("volumeMounts") or ()):
        where = f"{path}.volumeMounts[{index}]"
        problem = _typed(where, mount, _MOUNT_TYPES)
        if problem:
            return problem
        if mount.get("name") not in volumes:
            return f"{where}.name: Not found: {json.dumps(mount.get('name'), default=str)}"
        mount_path = mount.get("mountPath")
        if not mount_path or not isinstance(mount_path, str):
            return f"{where}.mountPath: Required value"
        if mount_path in mount_paths:
            return _invalid(f"{where}.mountPath", mount_path, "must be unique")
        mount_paths.add(mount_path)
    for index, var in enumerate(container.get("env") or ()):
        problem = _typed(f"{path}.env[{index}]", var, _ENV_TYPES)
        if problem or not var.get("name"):
            return problem or f"{path}.env[{index}].name: Required value"
    return None


_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_MANIFEST_ANNOTATION = "minikrust.io/manifest"     # the file a static pod came from (its base dir for file: images)


def _annotations(pod):
    return (pod.get("metadata") or {}).get("annotations") or {}


def _is_static(pod):
    """A pod read from a manifest file by this kubelet (not its mirror in the API)."""
    return _MANIFEST_ANNOTATION in _annotations(pod)


def static_pods_from_manifest(path, node_name):
    """The pods of one manifest file as the kubelet's file source makes them (`<name>-<node>`, a uid
    hashed from the manifest, config.source/config.hash); ConfigError names file and document."""
    pods = []
    for index, doc in enumerate(d for d in _read_yaml(path, "manifest") if d is not None):
        where = f"{path}: document {index + 1}"
        if not isinstance(doc, dict) or doc.get("kind") != "Pod" or doc.get("apiVersion", "v1") != "v1":
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            raise ConfigError(f"{where}: kind {kind!r} is not a v1 Pod (only Pod manifests are run)")
        problem = pod_problem(doc)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        pod = json.loads(json.dumps(doc, default=str))     # YAML's dates and the like as text, as in JSON
        digest = hashlib.sha256(json.dumps([pod, node_name, os.path.abspath(path)], sort_keys=True).encode()).hexdigest()
        uid = str(uuid.UUID(digest[:32]))
        meta = pod.setdefault("metadata", {})
        meta["name"] = f"{meta['name']}-{node_name}"
        if len(meta["name"]) > 253:
            raise ConfigError(f"{where}: metadata.name: Too long: {meta['name']!r} (with the node name) is over 253")
        meta.setdefault("namespace", "default")
        meta["uid"] = uid
        meta.setdefault("annotations", {}).update({
            "kubernetes.io/config.source": "file", "kubernetes.io/config.hash": digest[:32],
            _MANIFEST_ANNOTATION: os.path.abspath(path)})
        spec = pod["spec"]
        spec["nodeName"] = node_name
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        for c in spec["containers"] + (spec.get("initContainers") or []):
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
        pods.append(pod)
    return pods


class StaticPodSource(_Loop):
    """Static pods from --pod-manifest-path (a folder or one file), rescanned every `interval` s; a
    changed manifest is a new pod (new uid); bad ones are skipped, kept in `errors` by file."""

    def __init__(self, path, node_name, handler, interval=1.0):
        self.path, self.node_name, self.interval = path, node_name, interval
        self.known = _PodSet(handler)
        self.errors = {}
        self.synced = threading.Event()     # set after the first scan
        self._files = {}                    # path -> ((mtime, size), its pods or the ConfigError's text)
        super().__init__("static-pods")

    def _manifests(self, errors):
        if os.path.isfile(self.path):
            return [self.path]
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            errors[self.path] = f"{self.path}: cannot list: {exc.strerror}"
            return []
        return [os.path.join(self.path, n) for n in names
                if n.endswith(_MANIFEST_SUFFIXES) and not n.startswith(".") and os.path.isfile(os.path.join(self.path, n))]

    def scan(self):
        """One look: report added, changed and removed pods (files of unchanged mtime and size unread)."""
        errors, files = {}, {}
        for path in self._manifests(errors):
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp, files[path] = (st.st_mtime_ns, st.st_size), self._files.get(path)
            if files[path] is None or files[path][0] != stamp:     # new or changed: read it
                try:
                    files[path] = (stamp, static_pods_from_manifest(path, self.node_name))
                except ConfigError as exc:
                    files[path] = (stamp, str(exc))
        self._files, pods, chosen = files, [], {}
        for path, (_, loaded) in files.items():
            if isinstance(loaded, str):
                errors[path] = loaded
            else:
                pods += [(pod, path) for pod in loaded]
        # one pod per name, as the kubelet's file source: the one running keeps it, else the first file's
        for pod, path in sorted(pods, key=lambda item: item[0]["metadata"]["uid"] not in self.known.pods):
            twin = chosen.setdefault(_pod_key(pod), pod)
            if twin is not pod:
                errors[path] = (f"{path}: pod {_pod_key(pod)} is already defined in "
                                f"{twin['metadata']['annotations'][_MANIFEST_ANNOTATION]}")
        for path, error in errors.items():
            if self.errors.get(path) != error:
                log.error("static pod manifest skipped: %s", error)
        self.errors = errors
        self.known.reconcile(list(chosen.values()))     # removed first: a pod of the same name may follow
        self.synced.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("static pods in %s", self.path)
            self._stop.wait(self.interval)


# --- Images: OCI pulls, content-addressed store ---
# From an image to a module file: registry pulls (auth challenges, resume, digest checks), pull policy
# and backoff, a content-addressed store with GC, and `push` to publish a module.

# Media types from their sources: the OCI image spec, Docker's distribution, bytecodealliance/
# rust-oci-wasm (CNCF Wasm artifact), engineerd/wasm-to-oci (Krustlet's), solo-io/wasm (tar layers).
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_WASM_LAYER = "application/wasm"
_INDEX_TYPES = (MT_OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json")
_MANIFEST_ACCEPT = ", ".join([MT_OCI_MANIFEST, MT_DOCKER_MANIFEST, *_INDEX_TYPES])
_CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
_WASM_LAYERS = (MT_WASM_LAYER, "application/vnd.wasm.content.layer.v1+wasm")
_TAR_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "r:",
    "application/vnd.oci.image.layer.v1.tar+gzip": "r:gz",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "r:gz",
}
_DOCKER_HUB = "docker.io"
_DOCKER_HUBS = (_DOCKER_HUB, "index.docker.io", "registry-1.docker.io")     # one registry, three names
_MAX_MANIFEST = 4 * 1024 * 1024
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^\w[\w.-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed `[registry/]repository[:tag][@sha256:hex]` with Docker's defaults filled in."""
    registry: str
    repository: str
    tag: str = None
    digest: str = None

    @property
    def name(self):
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self):
        return self.digest or self.tag

    @property
    def key(self):
        """The module store's key: `name@digest` when pinned, else `name:tag`."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"

    def __str__(self):
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class ModuleRef:
    """A module ready to load: file, digest (the host's cache key), imageID; `pulled`: a pull's seconds."""
    path: str
    digest: str
    image_id: str
    pulled: float = field(default=None, compare=False)
    store: str = field(default=None, compare=False)     # the module store's root, when it is stored there

    def held(self):
        """The file for a host to read: a stored module opened beneath the store root, or the user's file."""
        if self.store is None:
            return self.path
        rel = os.path.relpath(self.path, self.store)
        return _held(open_beneath(self.store, rel, os.O_PATH), self.store, rel)


def parse_image_ref(image):
    """Parse an image reference like docker and the kubelet: docker.io, library/ and :latest by default."""
    def invalid(why):
        return ImageError(f'couldn\'t parse image reference "{image}": {why}', "InvalidImageName")
    text, digest, tag = image.strip(), None, None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise invalid("invalid digest (want sha256:<64 hex>)")
    if text.rfind(":") > text.rfind("/"):
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise invalid("invalid tag")
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = _DOCKER_HUB, text
    if registry in _DOCKER_HUBS:
        registry, repository = _DOCKER_HUB, repository if "/" in repository else "library/" + repository
    if not _HOST_RE.match(registry) or not _REPO_RE.match(repository):
        raise invalid("invalid reference format")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest)


def default_pull_policy(image):
    """The API server's default imagePullPolicy: Always for `:latest` or no tag (`name:latest@digest`
    too, as the API defaults it), else IfNotPresent."""
    try:
        latest = not image.startswith("file:") and parse_image_ref(image).tag == "latest"
    except ImageError:
        latest = False
    return "Always" if latest else "IfNotPresent"


@dataclass(frozen=True)
class RegistryCredential:
    """A username and password for one registry; `source` says where it came from (for messages)."""
    registry: str
    username: str
    password: str = field(repr=False)
    source: str = ""


def _registry_matches(pattern, registry):
    """Whether a credential's registry (`host[:port]`, or a glob like `*.example.com`) covers `registry`."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^.:]*"), registry) is not None


def docker_config_credentials(doc, source=""):
    """Credentials in a docker config.json (`{"auths": {...}}`) or a legacy .dockercfg document."""
    auths = doc.get("auths", doc) if isinstance(doc, dict) else {}
    creds = []
    for key, entry in (auths if isinstance(auths, dict) else {}).items():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        host = key.split("://", 1)[-1].split("/", 1)[0].lower()     # `https://index.docker.io/v1/`, `host:port`
        if user and password is not None:
            registry = _DOCKER_HUB if host in _DOCKER_HUBS else host
            creds.append(RegistryCredential(registry, user, password, source))
    return creds


def _registry_config_credentials(path, registry):
    """The credentials for `registry` in a --registry-config file; raises OSError, ValueError."""
    with open(os.path.expanduser(path)) as f:
        doc = json.load(f)
    return [c for c in docker_config_credentials(doc, "--registry-config") if _registry_matches(c.registry, registry)]


def _secret_credentials(secret):
    """Credentials in a kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg Secret."""
    key = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson",
           "kubernetes.io/dockercfg": ".dockercfg"}.get(secret.get("type"))
    try:
        doc = json.loads(base64.b64decode((secret.get("data") or {})[key]))
    except (KeyError, TypeError, ValueError):      # not a pull secret, or not one that can be read
        return []
    return docker_config_credentials(doc, f'pull secret "{secret.get("metadata", {}).get("name", "")}"')


class _AuthError(ImageError):
    """The registry refused our credentials (or wants some): the next credential may work."""


class _Transient(ImageError):
    """A failure worth retrying (connection lost, 5xx, short read)."""


def _short(exc, limit=300):
    text = str(exc) or exc.__class__.__name__
    return text if len(text) <= limit else text[:limit] + "..."


class RegistryClient:
    """A client of one repository in one registry (OCI distribution spec). A 401's challenge leads
    to a Bearer token request or Basic auth; credentials go only into Authorization headers."""

    def __init__(self, ref, credential=None, insecure=False, timeout=30.0):
        self.ref, self.credential, self.timeout = ref, credential, timeout
        host = "registry-1.docker.io" if ref.registry == _DOCKER_HUB else ref.registry
        self.origin = f"{'http' if insecure else 'https'}://{host}"
        self.base = f"{self.origin}/v2/{ref.repository}/"
        self.session = requests.Session()    # its Authorization header: the one a challenge led to

    def request(self, method, path, *, headers=None, params=None, data=None, stream=False, actions="pull"):
        """Send a request, answering one auth challenge; connection errors, 429 and 5xx raise _Transient."""
        url = urllib.parse.urljoin(self.base, path)
        for attempt in (0, 1):
            try:
                resp = self.session.request(method, url, headers=headers, params=params, data=data,
                                            stream=stream, timeout=self.timeout)
            except requests.exceptions.SSLError as exc:  # retrying will not help
                why = re.search(r"\] ([^\]]+?) \(_ssl", str(exc))
                raise ImageError(f"TLS with {self.origin} failed: {why.group(1) if why else _short(exc)} "
                                 "(trust its CA, or list it in --insecure-registries for plain HTTP)") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(f"cannot reach {self.origin}: {_short(exc)}") from None
            if resp.status_code != 401 or attempt:
                break
            resp.close()
            self._authenticate(resp.headers.get("WWW-Authenticate", ""), actions)
        if resp.status_code in (401, 403):
            resp.close()
            raise _AuthError(f"{self.ref.registry} refused {self._who()}: {resp.status_code} "
                             f"{'unauthorized' if resp.status_code == 401 else 'denied'}")
        if resp.status_code >= 500 or resp.status_code == 429:
            resp.close()
            raise _Transient(f"{self.ref.registry} answered {resp.status_code} for {method} {path}")
        return resp

    def _who(self):
        c = self.credential
        return f'the credentials of user "{c.username}" from {c.source or "the node"}' if c else "anonymous access"

    def _authenticate(self, challenge, actions):
        scheme, _, rest = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        cred = self.credential
        self.session.headers.pop("Authorization", None)
        if scheme.lower() == "basic":
            if cred is None:
                raise _AuthError(f"{self.ref.registry} requires authentication and no credentials were found")
            token = base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
            self.session.headers["Authorization"] = f"Basic {token}"
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise _AuthError(f"{self.ref.registry} asked for unsupported authentication {scheme or '(none)'}")
        # requests leaves out a parameter whose value is None (no service named)
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:{actions}",
                 "service": params.get("service")}
        log.debug("registry %s: requesting a bearer token for %s", self.ref.registry, query["scope"])
        try:
            resp = self.session.get(params["realm"], params=query, timeout=self.timeout,
                                    auth=(cred.username, cred.password) if cred else None)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"cannot reach the token service of {self.ref.registry}: {_short(exc)}") from None
        if resp.status_code in (401, 403):
            raise _AuthError(f"the token service of {self.ref.registry} refused {self._who()}: {resp.status_code}")
        if resp.status_code != 200:
            raise _Transient(f"the token service of {self.ref.registry} answered {resp.status_code}")
        try:
            body = resp.json()
            self.session.headers["Authorization"] = "Bearer " + (body.get("token") or body["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ImageError(f"the token service of {self.ref.registry} sent no token") from None

    def get_manifest(self, reference):
        """(document, digest, media type) of a manifest or index, verified when fetched by digest."""
        with self.request("GET", f"manifests/{reference}", headers={"Accept": _MANIFEST_ACCEPT}) as resp:
            if resp.status_code == 404:
                raise ImageError(f"{self.ref.name}:{reference} not found: manifest unknown")
            if resp.status_code != 200:
                raise ImageError(f"{self.ref.registry} answered {resp.status_code} for manifest {reference}")
            body = resp.content
        if len(body) > _MAX_MANIFEST:
            raise ImageError(f"manifest {reference} is larger than {_MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise ImageError(f"manifest {reference} failed verification: its content has digest {digest}")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ImageError(f"manifest {reference} is not a JSON object")
        media_type = doc.get("mediaType") or (MT_OCI_INDEX if "manifests" in doc else
                                               resp.headers.get("Content-Type", "").split(";")[0].strip())
        return doc, digest, media_type

    def download(self, digest, size, out):
        """Download a blob into the file `out`, resuming what it holds; emptied if it fails to verify."""
        have = out.seek(0, os.SEEK_END)
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self.request("GET", f"blobs/{digest}", headers=headers, stream=True)
        with resp:
            if resp.status_code == 404:
                raise ImageError(f"blob {digest} not found in {self.ref.name}")
            if resp.status_code == 416:  # nothing left to resume from: start again
                out.truncate(0)
                raise _Transient(f"cannot resume the download of {digest}")
            if resp.status_code not in (200, 206):
                raise ImageError(f"{self.ref.registry} answered {resp.status_code} for blob {digest}")
            resumed = resp.status_code == 206
            out.seek(have if resumed else 0)
            out.truncate()
            try:
                for chunk in resp.iter_content(1 << 16):
                    out.write(chunk)
                    if size is not None and out.tell() > size:
                        raise ImageError(f"blob {digest} is larger than its declared size {size}")
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.Timeout) as exc:
                raise _Transient(f"download of {digest} interrupted: {_short(exc, 120)}") from None
        if size is not None and out.tell() != size:
            raise _Transient(f"download of {digest} ended after {out.tell()} of {size} bytes")
        actual = _file_digest(out)
        if actual != digest:
            out.truncate(0)
            if resumed:
                raise _Transient(f"resumed download of {digest} did not verify; restarting")
            raise ImageError(f"blob {digest} failed verification: the registry sent content with digest {actual}")

    def push_blob(self, data):
        """Upload a blob (monolithic POST then PUT) unless the registry has it; return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self.request("HEAD", f"blobs/{digest}", actions="pull,push") as resp:
            if resp.status_code == 200:
                return digest
        with self.request("POST", "blobs/uploads/", actions="pull,push") as resp:
            if resp.status_code != 202 or "Location" not in resp.headers:
                raise ImageError(f"{self.ref.registry} refused an upload: {resp.status_code}")
            location = urllib.parse.urljoin(resp.url, resp.headers["Location"])
        with self.request("PUT", location, params={"digest": digest}, data=data, actions="pull,push",
                          headers={"Content-Type": "application/octet-stream"}) as resp:
            if resp.status_code != 201:
                raise ImageError(f"{self.ref.registry} refused blob {digest}: {resp.status_code} {resp.text[:200]}")
        return digest


def _read_state(root, path, valid=lambda doc: True):
    """A JSON object the kubelet kept at `path` beneath `root`, or None; one corrupt or not `valid`
    is logged and set aside as `<path>.corrupt`: the kubelet starts without it, never crashes on it."""
    try:
        with os.fdopen(open_beneath(root, path), "rb") as f:
            doc = json.loads(f.read())
        if isinstance(doc, dict) and valid(doc):
            return doc
        raise ValueError("not the object expected")
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("state file %s cannot be read: %s", path, exc)
    except ValueError as exc:       # also UnicodeDecodeError
        with contextlib.suppress(OSError):
            _rename_beneath(root, path, f"{path}.corrupt")
        log.error("state file %s is corrupt (%s): set aside as %s.corrupt", path, exc, os.path.basename(path))
    return None


def _file_digest(f):
    """The sha256 digest of all a binary file holds."""
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


class ModuleStore:
    """Modules by digest under `root` (`sha256/<hex>.wasm`), image refs and last-used times in
    `index.json`; files arrive in `tmp/` and are renamed into place (never a half module). Every
    file operation resolves beneath `root` (open_beneath): a link planted there is not followed out."""

    def __init__(self, root):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.tmp_dir = os.path.join(self.root, "tmp")
        os.makedirs(self.root, exist_ok=True)
        for folder in ("sha256", "tmp"):
            os.close(_makedirs_beneath(self.root, folder))
        self.remove_stale_temps()
        self._lock = threading.RLock()
        self._persisted = 0.0
        self._hmac_key = None           # see credential_id
        index = _read_state(self.root, "index.json") or {}
        self._index = {"refs": dict(index.get("refs") or {}), "modules": dict(index.get("modules") or {})}

    def _save(self):
        _write_beneath(self.root, "index.json", json.dumps(self._index, indent=1, sort_keys=True).encode())
        self._persisted = time.time()

    def path(self, digest):
        return os.path.join(self.root, "sha256", digest.split(":", 1)[-1] + ".wasm")

    def open(self, path, flags=os.O_RDONLY, mode="rb"):
        """The file `path` (in the store) opened beneath its root, as a file object."""
        return os.fdopen(open_beneath(self.root, os.path.relpath(path, self.root), flags, 0o644), mode)

    def discard(self, path):
        """Remove the file `path` (in the store), if there."""
        _remove_beneath(self.root, os.path.relpath(path, self.root))

    def size(self, digest):
        """The size of the stored module `digest`, None when it is not there as a regular file. The
        hosts verify the digest of what they load, so a file swapped after this check cannot run."""
        try:
            with self.open(self.path(digest), os.O_RDONLY | os.O_NONBLOCK) as f:
                info = os.fstat(f.fileno())
        except OSError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def has(self, digest):
        return self.size(digest) is not None

    def temp_path(self):
        """A fresh name in the store's temp dir (same filesystem: rename is atomic)."""
        return os.path.join(self.tmp_dir, uuid.uuid4().hex)

    @contextlib.contextmanager
    def temp(self):
        """A new temp file: (path, file open r+b); removed at the end unless add() moved it into place."""
        path = self.temp_path()
        try:
            with self.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "r+b") as f:
                yield path, f
        finally:
            self.discard(path)

    def remove_stale_temps(self, age=600.0):
        """Delete temp files of interrupted pulls (untouched for `age` s: a live download writes)."""
        limit = time.time() - age
        with _dir_beneath(self.root, "tmp") as folder:
            for name in os.listdir(folder):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(name, dir_fd=folder, follow_symlinks=False).st_mtime < limit:
                        os.unlink(name, dir_fd=folder)

    def lookup(self, key):
        """(module digest, image_id, auth labels or None) of a stored key (`name:tag` or `name@digest`)."""
        with self._lock:
            entry = self._index["refs"].get(key)
        if entry and self.has(entry["module"]):
            return entry["module"], entry["image_id"], entry.get("auth")
        return None

    def add(self, digest, keys, image_id, temp=None, auth=None):
        """Move a verified temp file into place (if given) and record the keys pointing to it;
        `auth` labels the credential the pull used (kept per key, see ImageManager._stored)."""
        if temp is not None:
            _rename_beneath(self.root, os.path.relpath(temp, self.root), os.path.relpath(self.path(digest), self.root))
        now = time.time()
        with self._lock:
            for key in keys:
                old = self._index["refs"].get(key) or {}
                labels = set(old.get("auth") or ()) if old.get("module") == digest else set()
                entry = self._index["refs"][key] = {"module": digest, "image_id": image_id}
                if auth or labels:
                    entry["auth"] = sorted(labels | {auth} - {None})
            entry = self._index["modules"].setdefault(digest, {"added": now})
            entry.update(size=self.size(digest) or 0, last_used=now)
            self._save()

    def credential_id(self, cred):
        """A label for the credential of a pull: anonymous, node, or a hash of a pod's secret keyed by
        the store's secret key (made on first use, read once: pod starts check labels)."""
        if cred is None:
            return "anonymous"
        if cred.source == "--registry-config":
            return "node"
        with self._lock:
            if self._hmac_key is None:
                if "credential-key" not in _list_beneath(self.root):
                    _write_beneath(self.root, "credential-key", os.urandom(32), 0o600)
                self._hmac_key = _read_beneath(self.root, "credential-key", 32)
        text = f"{cred.registry}\0{cred.username}\0{cred.password}".encode()
        return "hmac:" + hmac.new(self._hmac_key, text, hashlib.sha256).hexdigest()

    def touch(self, digest):
        """Mark a module used now (kept in memory, written at most every 30 s)."""
        now = time.time()
        with self._lock:
            entry = self._index["modules"].setdefault(digest, {"added": now, "size": 0})
            entry["last_used"] = now
            if now - self._persisted > 30:
                self._save()

    def modules(self):
        """{digest: {"size", "added", "last_used"}} for every stored module."""
        with self._lock:
            return {d: dict(m) for d, m in self._index["modules"].items() if self.has(d)}

    def node_images(self, limit=50):
        """The Node's `status.images`, largest first, at most `limit` (--node-status-max-images)."""
        with self._lock:
            names = collections.defaultdict(set)
            for key, entry in self._index["refs"].items():
                names[entry["module"]].update((entry["image_id"], key))
            sizes = {d: m.get("size", 0) for d, m in self._index["modules"].items()}
        images = [{"names": sorted(names[d]), "sizeBytes": sizes.get(d, 0)} for d in names if self.has(d)]
        return sorted(images, key=lambda image: (-image["sizeBytes"], image["names"]))[:limit]

    def remove(self, digest):
        with self._lock:
            self.discard(self.path(digest))
            self._index["modules"].pop(digest, None)
            self._index["refs"] = {k: e for k, e in self._index["refs"].items() if e["module"] != digest}
            self._save()

    def gc(self, high=85, low=80, min_age=120.0, in_use=(), usage=None):
        """Image GC as the kubelet's: at `high` percent of disk used, remove modules unused for
        `min_age` s, least recently used first, down to `low` percent; the removed digests."""
        self.remove_stale_temps()
        disk = None if usage else shutil.disk_usage(self.root)    # what the GC thresholds measure
        capacity, used = usage() if usage else (disk.total, disk.total - disk.free)
        if capacity <= 0 or used * 100 < high * capacity:
            return []
        to_free = used - capacity * low // 100
        now, removed = time.time(), []
        candidates = sorted(self.modules().items(), key=lambda item: item[1].get("last_used", 0))
        for digest, meta in candidates:
            if to_free <= 0:
                break
            if digest in in_use or now - meta.get("last_used", 0) < min_age:
                continue
            self.remove(digest)
            to_free -= meta.get("size", 0)
            removed.append(digest)
            log.info("image GC removed module %s (%d bytes)", digest, meta.get("size", 0))
        return removed


class ImageManager:
    """Resolves a container's `image` to a module file (`file:PATH`, or a registry pull), as the
    kubelet's image manager: pull policies, ImagePullBackOff, pull secrets, one pull per image."""

    retries = 3                         # tries of a pull (and of each blob) that fails on a _Transient

    def __init__(self, config, store=None, api=None, *, backoff=None, retry_delay=0.2):
        self.config = config
        self.store = store if store is not None else ModuleStore(os.path.join(config.root_dir, "modules"))
        self.api = api
        # the kubelet backs off image pulls as it does container restarts: 10 s doubling to 300 s
        self.backoff = backoff or (config.backoff_base, config.backoff_max)
        self.retry_delay = retry_delay
        self.in_use = None              # callable -> digests of modules running pods use (for GC)
        self.metrics = None             # the kubelet's Metrics, if any: minikrust_image_pulls_total
        self.compiled_cache_dir = None  # the WASI host's cache dir: GC drops a module's machine code too
        self._lock = threading.Lock()
        self._inflight = {}
        self._blob_locks = collections.defaultdict(threading.Lock)
        self._failures = {}             # image -> (retry not before, current delay)
        self._file_digests = {}

    def ensure(self, image, pull_policy=None, pull_secrets=(), namespace=None, base_dir=None):
        """A ModuleRef for `image`, pulled if the policy says so (`pull_secrets`: their names); ImageError."""
        if image.startswith("file:"):
            return self._ensure_file(image[len("file:"):], base_dir)
        ref = parse_image_ref(image)
        policy = pull_policy or default_pull_policy(image)
        hit = self._stored(ref, pull_secrets, namespace) if policy != "Always" else None
        if hit:
            return hit
        if policy == "Never":
            why = ("was pulled with credentials this pod does not have, and pull policy Never cannot check "
                   "them" if self.store.lookup(ref.key) else "is not present with pull policy of Never")
            raise ImageError(f'Container image "{image}" {why}', "ErrImageNeverPull")
        # pulls with other credentials are checked on their own, and back off on their own (the
        # kubelet keys its image backoff by pod and image)
        flight = f"{ref} {namespace} {','.join(sorted(pull_secrets or ()))}"
        with self._lock:
            if time.monotonic() < self._failures.get(flight, (0, 0))[0]:
                raise ImageError(f'Back-off pulling image "{image}"', "ImagePullBackOff")
        try:
            result = self._single_flight(flight, lambda: self._pull(ref, pull_secrets, namespace))
        except ImageError as exc:
            with self._lock:
                until, delay = self._failures.get(flight, (0, 0))
                if time.monotonic() >= until:  # callers that shared one failed pull count once
                    delay = min(self.backoff[1], delay * 2) if delay else self.backoff[0]
                    self._failures[flight] = (time.monotonic() + delay, delay)
            self._count_pull("error")
            log.warning('failed to pull image "%s": %s', image, exc.message)
            raise ImageError(f'Failed to pull image "{image}": {exc.message}', exc.reason) from None
        with self._lock:
            self._failures.pop(flight, None)
        self._count_pull("success")
        return result

    def _count_pull(self, result):
        if self.metrics is not None:
            self.metrics.inc("minikrust_image_pulls_total", result=result)

    def present(self, image, pull_secrets=(), namespace=None):
        """Whether `image` is on the node for this pod (a `file:` image always is): no pull for IfNotPresent."""
        if image.startswith("file:"):
            return True
        try:
            return self._stored(parse_image_ref(image), pull_secrets, namespace) is not None
        except ImageError:
            return False

    def _stored(self, ref, pull_secrets, namespace):
        """The stored module of `ref` if this pod may use it without a pull, else None. KEP-2535
        (KubeletEnsureSecretPulledImages): a module pulled with a pod's secret serves another pod
        only if that pod has the same credential; one pulled anonymously or with node credentials
        serves every pod. Modules stored without a record ("preloaded") pass under
        NeverVerifyPreloadedImages (the default), not under AlwaysVerify."""
        hit = self.store.lookup(ref.key)
        if not hit:
            return None
        digest, image_id, labels = hit
        policy = self.config.image_pull_credentials_verification_policy
        if labels is None:
            allowed = policy != "AlwaysVerify"
        else:
            allowed = policy == "NeverVerify" or "anonymous" in labels or "node" in labels or any(
                self.store.credential_id(c) in labels
                for c in self.credentials(ref.registry, pull_secrets, namespace, node=False))
        if not allowed:
            return None
        self.store.touch(digest)
        return ModuleRef(self.store.path(digest), digest, image_id, store=self.store.root)

    def _ensure_file(self, path, base_dir):
        path = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ImageError(f'module file "{path}": {exc.strerror}', "ErrImagePull") from None
        key = (path, st.st_mtime_ns, st.st_size)
        digest = self._file_digests.get(key)
        if digest is None:
            with open(path, "rb") as f:     # the user's own file, wherever its links lead
                digest = self._file_digests[key] = _file_digest(f)
        return ModuleRef(path, digest, f"file:{path}@{digest}")

    def _single_flight(self, key, pull):
        """pull(), or the result of the same pull that another thread is already making."""
        with self._lock:
            flight = self._inflight.get(key)
            leader = flight is None
            if leader:
                flight = self._inflight[key] = concurrent.futures.Future()
        if leader:
            try:
                flight.set_result(pull())
            except BaseException as exc:
                flight.set_exception(exc)
            finally:
                with self._lock:
                    del self._inflight[key]
        return flight.result()

    def credentials(self, registry, pull_secrets=(), namespace=None, node=True):
        """Credentials for `registry`: the pod's imagePullSecrets first, then (`node`) --registry-config."""
        creds = []
        for name in pull_secrets if self.api is not None else ():
            ns = namespace or "default"
            try:
                secret = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
            except Exception as exc:  # the kubelet pulls anyway, without that secret
                log.warning('pull secret "%s/%s" unavailable (%s); pulling without it',
                            ns, name, exc.code if isinstance(exc, ApiError) else exc.__class__.__name__)
                continue
            creds += [c for c in _secret_credentials(secret) if _registry_matches(c.registry, registry)]
        path = self.config.registry_config if node else None
        if path:
            try:
                creds += _registry_config_credentials(path, registry)
            except (OSError, ValueError) as exc:
                log.warning("registry config %s unreadable: %s", path, exc.__class__.__name__)
        return creds

    def _pull(self, ref, pull_secrets, namespace):
        """Try each credential for the registry in turn (anonymous when there is none)."""
        started = time.monotonic()
        for cred in self.credentials(ref.registry, pull_secrets, namespace) or [None]:
            client = RegistryClient(ref, cred, insecure=ref.registry in self.config.insecure_registries)
            label = self.store.credential_id(cred)
            with client.session:
                try:
                    module = self._retrying(lambda: self._pull_with(client, ref, label))
                except _AuthError as exc:
                    error = exc
                    continue
            took = time.monotonic() - started
            log.info("pulled %s as %s in %.2fs", ref, module.digest, took)
            try:
                self.gc()
            except OSError as exc:
                log.warning("image GC failed: %s", exc)
            return dataclasses.replace(module, pulled=took)
        raise ImageError(error.message)

    def _retrying(self, attempt):
        for n in range(self.retries):
            try:
                return attempt()
            except _Transient as exc:
                last = exc
                log.debug("pull attempt %d failed: %s", n + 1, exc)
                if n + 1 < self.retries:
                    time.sleep(self.retry_delay * (2 ** n) * (1 + random.random() / 2))
        raise ImageError(str(last))

    def _pull_with(self, client, ref, auth):
        """Pull with one client: the module stored under the image's keys, its credential label `auth`."""
        doc, digest, media_type = client.get_manifest(ref.reference)
        image_id = f"{ref.name}@{digest}"
        if media_type in _INDEX_TYPES:
            doc, _, media_type = client.get_manifest(_pick_platform(doc)["digest"])
        if media_type not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST):
            raise ImageError(f"unsupported manifest type {media_type or '(none)'}")
        # `name:tag@digest` pulls the digest; the tag says nothing about what it points to now
        keys = [image_id] + ([ref.key] if not ref.digest else [])      # ref.key: `name:tag`
        hit = self.store.lookup(image_id)
        wasm = [layer for layer in doc.get("layers") or [] if layer.get("mediaType") in _WASM_LAYERS]
        if hit:  # same digest as stored (Always, or a pod proving its credentials): nothing to download
            module_digest = hit[0]
            self.store.add(module_digest, keys, image_id, auth=auth)
        elif wasm:  # a module or a component (wasip2): the host tells them apart by their header
            if len(wasm) != 1:
                raise ImageError(f"the image has {len(wasm)} wasm layers; expected one module")
            module_digest = wasm[0].get("digest", "")
            if not _DIGEST_RE.match(module_digest):     # before it names a file: never `sha256:../<other>`
                raise ImageError(f"unsupported blob digest {module_digest!r}")
            with self._blob_locks[module_digest]:
                if self.store.has(module_digest):
                    self.store.add(module_digest, keys, image_id, auth=auth)
                else:
                    with self._blob(client, wasm[0]) as (temp, _):
                        self.store.add(module_digest, keys, image_id, temp=temp, auth=auth)
        else:  # stores the module and its keys itself
            module_digest = self._extract_entrypoint(client, doc, keys, image_id, auth)
        return ModuleRef(self.store.path(module_digest), module_digest, image_id, store=self.store.root)

    @contextlib.contextmanager
    def _blob(self, client, desc):
        """One blob downloaded into a store temp file, retried and resumed: (path, file at its start)."""
        digest, size = desc.get("digest", ""), desc.get("size")
        if not _DIGEST_RE.match(digest):
            raise ImageError(f"unsupported blob digest {digest!r}")
        try:
            with self.store.temp() as (temp, out):
                self._retrying(lambda: client.download(digest, size, out))
                out.seek(0)
                yield temp, out
        except OSError as exc:  # a full disk, a read-only store
            raise ImageError(f"cannot write to the module store: {exc.strerror}") from None

    def _entrypoint(self, client, doc):
        """The module path an image of tar layers names: its config's Entrypoint (or Cmd)."""
        config = doc.get("config") or {}
        config_type = config.get("mediaType")
        types = [layer.get("mediaType", "") for layer in doc.get("layers") or []]
        if config_type not in _CONFIG_TYPES or not types or not all(t in _TAR_LAYERS for t in types):
            raise ImageError(f"no WebAssembly module in the image: config {config_type or '(none)'}, "
                             f"layers [{', '.join(types) or 'none'}]")
        if (config.get("size") or 0) > _MAX_MANIFEST:
            raise ImageError("image config is too large")
        with self._blob(client, config) as (_, f):
            try:
                settings = json.load(f).get("config") or {}
            except (ValueError, AttributeError):
                raise ImageError("image config is not JSON") from None
        entry = settings.get("Entrypoint") or settings.get("Cmd")
        if not entry:
            raise ImageError("the image config has no Entrypoint naming the module")
        return entry[0]

    def _extract_entrypoint(self, client, doc, keys, image_id, auth):
        """Find the Entrypoint file in the topmost layer holding it; store it; return its digest."""
        entrypoint = self._entrypoint(client, doc)
        wanted = os.path.normpath("/" + entrypoint).lstrip("/")
        for layer in reversed(doc["layers"]):
            with self._blob(client, layer) as (_, raw), self.store.temp() as (module, out):
                try:
                    with tarfile.open(fileobj=raw, mode=_TAR_LAYERS[layer["mediaType"]]) as tar:
                        member = next((m for m in tar.getmembers()
                                       if os.path.normpath("/" + m.name).lstrip("/") == wanted), None)
                        if member is None:
                            continue
                        if not member.isfile():
                            raise ImageError(f"Entrypoint {entrypoint} is not a regular file in the image")
                        shutil.copyfileobj(tar.extractfile(member), out, 1 << 20)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    why = _short(exc, 120)
                    raise ImageError(f"layer {layer['digest']} is not a readable tar: {why}") from None
                out.seek(0)
                if out.read(4) != b"\0asm":
                    raise ImageError(f"Entrypoint {entrypoint} is not a WebAssembly module")
                digest = _file_digest(out)
                self.store.add(digest, keys, image_id, temp=module, auth=auth)
                return digest
        raise ImageError(f"Entrypoint {entrypoint} is not in any layer of the image")

    def gc(self, usage=None):
        """Run image GC with the --image-gc-* settings; returns the removed digests."""
        config = self.config
        removed = self.store.gc(config.image_gc_high_threshold, config.image_gc_low_threshold,
                                config.image_minimum_gc_age, set(self.in_use() if self.in_use else ()), usage)
        if removed and self.compiled_cache_dir:  # the host's cache files are named <sha256hex>.*
            prefixes = tuple(d.split(":", 1)[-1] + "." for d in removed)
            for name in _list_beneath(self.compiled_cache_dir):
                if name.startswith(prefixes):
                    _remove_beneath(self.compiled_cache_dir, name)
        return removed


def _pick_platform(index):
    """The index entry for wasip1/wasm, wasi/wasm or wasip2/wasm, else the sole entry; else an error naming them."""
    entries = index.get("manifests") or []
    platforms = [(p.get("os"), p.get("architecture")) for p in (e.get("platform") or {} for e in entries)]
    for wanted in (("wasip1", "wasm"), ("wasi", "wasm"), ("wasip2", "wasm")):
        if wanted in platforms:
            return entries[platforms.index(wanted)]
    # buildx adds attestation manifests as unknown/unknown entries: they are not candidates
    images = [entry for entry, (os_name, _) in zip(entries, platforms) if os_name != "unknown"]
    if len(images) == 1:
        return images[0]
    found = ", ".join(f"{os_name}/{arch}" for os_name, arch in platforms)
    raise ImageError(f"no wasip1/wasm, wasi/wasm or wasip2/wasm entry in the image index (found: {found or 'none'})")


def _is_component(data):
    """Whether wasm bytes are a WASI 0.2 component (header: magic, version 0x0d, layer 1), not a module."""
    return data[:4] == b"\0asm" and data[6:8] == b"\x01\x00"


def push_module(wasm_path, image, *, credential=None, insecure=False):
    """Publish a module as a CNCF Wasm OCI artifact; the manifest digest."""
    ref = parse_image_ref(image)
    with open(wasm_path, "rb") as f:
        data = f.read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layer = {"mediaType": MT_WASM_LAYER, "digest": digest, "size": len(data)}
    config = json.dumps({"created": _k8s_time(), "author": None, "architecture": "wasm",
                         "os": "wasip2" if _is_component(data) else "wasip1",
                         "layerDigests": [digest], "component": None}).encode()
    client = RegistryClient(ref, credential, insecure=insecure)
    with client.session:
        config_desc = {"mediaType": "application/vnd.wasm.config.v0+json", "digest": client.push_blob(config),
                       "size": len(config)}
        client.push_blob(data)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": config_desc,
                               "layers": [layer]}, separators=(",", ":")).encode()
        with client.request("PUT", f"manifests/{ref.reference}", data=manifest, actions="pull,push",
                            headers={"Content-Type": MT_OCI_MANIFEST}) as resp:
            if resp.status_code != 201:
                raise ImageError(f"{ref.registry} refused the manifest: {resp.status_code} {resp.text[:300]}")
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def cmd_push(argv, environ=None):
    """`minikrust.py push module.wasm registry/repo:tag`: publish a module (CNCF Wasm artifact).
    Credentials: --registry-config, or MINIKRUST_REGISTRY_USERNAME/_PASSWORD (never on the command line)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="minikrust.py push", description=cmd_push.__doc__.split("\n")[0])
    parser.add_argument("module", help="the .wasm file")
    parser.add_argument("image", help="[registry/]repository[:tag]")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP registry")
    parser.add_argument("--registry-config", default=environ.get("MINIKRUST_REGISTRY_CONFIG"))
    args = parser.parse_args(argv)
    try:
        ref = parse_image_ref(args.image)
        credential = None
        if environ.get("MINIKRUST_REGISTRY_USERNAME"):
            credential = RegistryCredential(ref.registry, environ["MINIKRUST_REGISTRY_USERNAME"],
                                            environ.get("MINIKRUST_REGISTRY_PASSWORD", ""), "the environment")
        elif args.registry_config:
            credential = next(iter(_registry_config_credentials(args.registry_config, ref.registry)), None)
        digest = push_module(args.module, args.image, credential=credential, insecure=args.insecure)
    except (ImageError, OSError, ValueError) as exc:
        print(f"push failed: {exc}", file=sys.stderr)
        return 1
    print(f"{ref.name}@{digest}")
    return 0


# --- Volumes: emptyDir, hostPath, configMap, secret, downwardAPI, projected ---
# The folders a module sees: made beneath the pod's folder through Files, filled from the API
# (ConfigMaps and Secrets through a TTL cache, tokens kept fresh), preopened at their mountPaths.

# Volume types whose content comes from the API: the kubelet always mounts them read-only.
_API_VOLUME_TYPES = ("configMap", "secret", "downwardAPI", "projected")
_VAR_REF = re.compile(r"\$(?:\$|\(([^)]*)\))")


def _expand_refs(text, env):
    """Expand `$(VAR)` as the kubelet does (its third_party expansion package): `$$` is an escaped
    `$`; an undefined `$(NAME)`, an unclosed `$(` and any other `$` stay as written."""
    return _VAR_REF.sub(lambda m: "$" if m.group(1) is None else env.get(m.group(1), m.group(0)), text or "")


def _namespace(pod):
    return (pod.get("metadata") or {}).get("namespace") or "default"


def _pod_field(pod, field_path, node_ip, whole_maps):
    """The value of a downward API `fieldRef.fieldPath`, as the kubelet's podFieldSelectorRuntimeValue;
    status.podIP is the node IP (a module shares its network); whole maps only in volumes (`whole_maps`)."""
    meta, spec, status = (pod.get(part) or {} for part in ("metadata", "spec", "status"))
    subscript = re.match(r"metadata\.(labels|annotations)\['(.*)'\]\Z", field_path or "")
    if subscript:
        return (meta.get(subscript.group(1)) or {}).get(subscript.group(2), "")
    host_ip = node_ip or status.get("hostIP") or ""
    pod_ip = node_ip or status.get("podIP") or host_ip
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": _namespace(pod),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName") or spec.get("serviceAccount") or "",
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
    }
    if field_path in simple:
        return simple[field_path]
    if whole_maps and field_path in ("metadata.labels", "metadata.annotations"):    # `key="value"` lines
        mapping = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f"{key}={json.dumps(mapping[key], ensure_ascii=False)}" for key in sorted(mapping))
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {field_path!r}", retry=False)


def _downward_value(pod, source, node_ip, root_dir, container_name=None, whole_maps=False):
    """The value of a downward API `fieldRef` or `resourceFieldRef` (None for neither). A resource
    (limits.cpu, ...) as the kubelet writes it: ceil(value / divisor); an unset limit is the Node's
    allocatable (its disk: that of `root_dir`), an unset request the limit, then 0."""
    if "fieldRef" in source:
        return _pod_field(pod, (source["fieldRef"] or {}).get("fieldPath"), node_ip, whole_maps)
    if "resourceFieldRef" not in source:
        return None
    ref, spec = source["resourceFieldRef"] or {}, pod.get("spec") or {}
    container_name, resource = ref.get("containerName") or container_name, ref.get("resource") or ""
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    container = next((c for c in containers if c.get("name") == container_name), None)
    if container is None:
        raise ContainerConfigError(f"resourceFieldRef names unknown container {container_name!r}", retry=False)
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise ContainerConfigError(f"unsupported resourceFieldRef resource {resource!r}", retry=False)
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(name)
    if value is None and kind == "limits":
        value = node_allocatable(host_facts(root_dir))[name]
    divide = parse_quantity(ref["divisor"]) if ref.get("divisor") not in (None, "", 0, "0") else 1
    return str(math.ceil(parse_quantity(value or "0") / divide))


def _api_object(objects, pod, source, keys, what, binary=True):
    """(kind, reference, data {key: bytes} or None: optional and missing) of a ConfigMap (keys[0]) or
    Secret (keys[1]) `source`; a ConfigMap's binaryData fills volumes only (the kubelet's env reads data)."""
    kind = "ConfigMap" if keys[0] in source else "Secret" if keys[1] in source else None
    if kind is None:
        raise ContainerConfigError(f"{what} {sorted(source)} is not supported", retry=False)
    ref = source[keys[kind == "Secret"]] or {}
    obj = objects.read(kind, _namespace(pod), ref.get("name"), ref.get("optional"), _pod_uid(pod))
    if obj is None:
        return kind, ref, None
    encoded, plain = ("data", "stringData") if kind == "Secret" else ("binaryData" if binary else "", "data")
    data = {k: base64.b64decode(v or "") for k, v in (obj.get(encoded) or {}).items()}
    data.update((k, (v or "").encode()) for k, v in (obj.get(plain) or {}).items())
    return kind, ref, data


class _Fetching(ContainerConfigError):
    """What a pod needs is being read from the API server: it waits, and is synced again once it is in."""

    def __init__(self, what):
        super().__init__(f"waiting for {what} from the API server", retry=True)


_OBJECT_TTL = (5.0, 2.0)      # seconds a ConfigMap or Secret read is kept: found; missing or failed


class ApiObjects:
    """ConfigMaps and Secrets, one GET per object per `_OBJECT_TTL` (the kubelet's TTL cache); with
    `ready`, a read never waits: it raises _Fetching, its own thread fetches, then calls ready(uid).
    403 (the Node authorizer, contract 25-27) counts as missing, like 404."""

    def __init__(self, api, ready=None):
        self.api, self.ready = api, ready
        self._lock = threading.Lock()
        self._entries = {}      # (kind, namespace, name) -> (object | None: missing | ContainerConfigError, expiry)
        self._wanted = {}       # key -> uids waiting for its fetch
        self._thread = None

    def read(self, kind, namespace, name, optional, uid=None):
        """The object, None when optional and missing; ContainerConfigError when not (yet) usable."""
        if not name:
            raise ContainerConfigError(f"a {kind} reference without a name", retry=False)
        if self.api is None:
            if optional:
                return None
            raise ContainerConfigError(f"{kind} {namespace}/{name} cannot be read: no API server in standalone mode",
                                       retry=False)
        key = (kind, namespace, name)
        with self._lock:
            obj, expiry = self._entries.get(key, (None, 0.0))
            if expiry <= time.monotonic() and self.ready is not None:
                self._wanted.setdefault(key, set()).add(uid)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="minikrust-objects", daemon=True)
                    self._thread.start()
                raise _Fetching(f"{kind} {namespace}/{name}")
        if expiry <= time.monotonic():
            obj = self._fetch(key)
        if isinstance(obj, ContainerConfigError):
            raise obj
        if obj is None and not optional:
            raise ContainerConfigError(f'{kind.lower()} "{name}" not found', retry=True)
        return obj

    def _fetch(self, key):
        """One try of 5 s at most (a down or hanging API server: the next read tries again)."""
        kind, namespace, name = key
        try:
            obj = self.api.get(f"/api/v1/namespaces/{namespace}/{kind.lower()}s/{name}", retries=0, timeout=5)
        except ApiError as exc:
            obj = None if exc.code in (403, 404) else ContainerConfigError(
                f"cannot read {kind} {namespace}/{name}: {exc.code} {exc.reason}", retry=True)
        except Exception as exc:        # unreachable, or an answer that is not an object
            obj = ContainerConfigError(f"cannot read {kind} {namespace}/{name}: {exc}", retry=True)
        now = time.monotonic()
        with self._lock:
            if len(self._entries) > 1024:       # the expired ones go
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            self._entries[key] = (obj, now + _OBJECT_TTL[obj is None or isinstance(obj, Exception)])
        return obj

    def _loop(self):
        while True:
            with self._lock:
                if not self._wanted:
                    self._thread = None
                    return
                key = next(iter(self._wanted))
            self._fetch(key)
            with self._lock:
                waiting = self._wanted.pop(key, set())
            for uid in waiting:
                self.ready(uid)


def _check_relpath(path, what):
    """A path inside a volume: a string, relative, no `..` (as API validation demands; Files' rule)."""
    try:
        _beneath_parts(path or "/")
        return path
    except (OSError, TypeError):
        raise ContainerConfigError(f"{what} {path!r} must be a relative path without '..'", retry=False) from None


def _keys_to_files(source, data, default_mode, what):
    """Files {path: (bytes, mode)} of a configMap or secret source, honouring items and optional."""
    if data is None:
        return {}
    files = {}
    for item in source.get("items") or [{"key": key} for key in data]:
        key = item.get("key")
        if key not in data:
            if source.get("optional"):
                continue
            raise ContainerConfigError(f"{what}: key {key!r} not found", retry=True)
        files[_check_relpath(item.get("path") or key, what)] = (data[key], item.get("mode", default_mode))
    return files


def _downward_files(pod, source, default_mode, node_ip, root_dir, what):
    """Files {path: (bytes, mode)} of a downwardAPI source: pod fields and container resources."""
    files = {}
    for item in source.get("items") or []:
        path = _check_relpath(item.get("path"), what)
        value = _downward_value(pod, item, node_ip, root_dir, whole_maps=True)
        if value is None:
            raise ContainerConfigError(f"{what}: item {path!r} has neither fieldRef nor resourceFieldRef", retry=False)
        files[path] = (str(value).encode(), item.get("mode", default_mode))
    return files


def _request_token(pod, source, api):
    """(token bytes, lifetime in seconds) from the TokenRequest API for the source's audience, bound
    to the pod (contract 28). One try of 5 s (ServiceAccountTokens tries again); MinikrustError."""
    meta = pod.get("metadata") or {}
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    spec = {"expirationSeconds": int(source.get("expirationSeconds") or 3600),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta.get("name"), "uid": meta.get("uid")}}
    if source.get("audience"):
        spec["audiences"] = [source["audience"]]
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    asked = time.time()
    try:
        status = api.post(f"/api/v1/namespaces/{_namespace(pod)}/serviceaccounts/{account}/token", body,
                          retries=0, timeout=5).get("status") or {}
        expires = _parse_rfc3339(status.get("expirationTimestamp") or "") / 1e9
    except ApiError as exc:
        raise MinikrustError(exc.message or f"{exc.code} {exc.reason}") from None
    except (requests.RequestException, OSError, ValueError) as exc:
        raise MinikrustError(str(exc)) from None
    if not status.get("token"):
        raise MinikrustError("TokenRequest answered without a token")
    lifetime = expires - asked          # the server may cap what was asked (--service-account-max-token-expiration)
    return status["token"].encode(), lifetime if lifetime > 0 else spec["expirationSeconds"]    # else: skewed clocks


_TOKEN_BACKOFF = (1.0, 60.0)        # a failed TokenRequest is tried again after 1 s, doubling up to 60 s


class ServiceAccountTokens:
    """The pods' projected service-account tokens, kept valid (the kubelet's token manager): asked
    for on this class's thread (the pod waits, _Fetching, for the first try), renewed at 80% of
    their lifetime; a failed TokenRequest does not hold the pod back: retried with backoff, with a
    FailedMount Warning Event each time."""

    def __init__(self, api, report, ready):
        self.api, self.report, self.ready = api, report, ready     # report(pod, message): a Warning Event
        self._entries = {}      # (uid, what, path) -> [pod, source, what, token, due, delay, volume dir]
        self._cond = threading.Condition()
        self._thread = None
        self._stopped = False

    def token(self, pod, source, directory, relpath, what):
        """The token for `relpath` in the volume `directory` (None: refused so far; no directory: asked
        ahead), kept fresh from now on; _Fetching until its first request is answered."""
        key = (_pod_uid(pod), what, relpath)
        with self._cond:
            entry = self._entries.setdefault(key, [pod, source, what, None, 0.0, 0.0, None])
            entry[6] = directory or entry[6]
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._loop, name="minikrust-tokens", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            if entry[3] is None and entry[4] == 0.0:
                raise _Fetching(f"the service account token of {what}")
            return entry[3]

    def prefetch(self, pod):
        """Ask now for the tokens of a pod just admitted; True while one is asked (ready() syncs its pod)."""
        fetching = False
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            for ref in [s["serviceAccountToken"] for s in (volume.get("projected") or {}).get("sources") or []
                        if "serviceAccountToken" in s]:
                what = f"volume {volume.get('name')!r}"
                try:
                    self.token(pod, ref, None, _check_relpath(ref.get("path"), what), what)
                except MinikrustError as exc:
                    fetching = fetching or isinstance(exc, _Fetching)
        return fetching

    def forget(self, uid):
        with self._cond:
            for key in [k for k in self._entries if k[0] == uid]:
                del self._entries[key]

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _loop(self):
        while True:
            with self._cond:
                now = time.monotonic()
                due = [(k, e) for k, e in self._entries.items() if e[4] <= now]
                if self._stopped:
                    return
                if not due:
                    self._cond.wait(min((e[4] for e in self._entries.values()), default=now + 60.0) - now)
                    continue
            for key, entry in due:      # one at a time, on this thread (the budget: running modules + 16)
                self._due(key, entry)

    def _due(self, key, entry):
        """Request the entry's token and write it into its volume: next due at 80% of its lifetime,
        or after the backoff on failure (with a Warning Event)."""
        pod, source, what, _, due, delay, _ = entry
        if due and entry[6] is None:        # asked ahead for a pod that never wrote it
            with self._cond:
                self._entries.pop(key, None)
            return
        try:
            token, lifetime = _request_token(pod, source, self.api)
            entry[3:6] = token, time.monotonic() + 0.8 * lifetime, 0.0
            if due:
                _write_beneath(entry[6], key[2], token, 0o600, 0o700)
        except MinikrustError as exc:
            entry[5] = min(_TOKEN_BACKOFF[1], delay * 2 or _TOKEN_BACKOFF[0])
            entry[4] = time.monotonic() + entry[5]
            log.warning("pod %s %s: service account token not (yet) issued, trying again in %.0f s: %s",
                        _pod_key(pod), what, entry[5], exc)
            self.report(pod, f"MountVolume.SetUp failed for {what} : failed to fetch token: {exc}")
        except OSError as exc:      # the volume is gone (the pod finished): done with it
            log.debug("token of %s not written: %s", _pod_key(pod), exc)
            with self._cond:
                self._entries.pop(key, None)
        if not due:
            self.ready(key[0])      # its pod writes it now (or goes on without it)


def _volume_files(pod, volume, kind, target, api, node_ip, objects, tokens, root_dir):
    """Files {path: (bytes, mode)} of an API volume, read as a projection of its sources; the
    `kube-api-access-*` volume admission adds to every pod (contract 14) skips what it cannot read."""
    name, source = volume["name"], volume[kind] or {}
    if kind == "secret":
        source = {**source, "name": source.get("secretName")}
    sources = (source.get("sources") or []) if kind == "projected" else [{kind: source}]
    default_mode = source.get("defaultMode", 0o644)
    best_effort = kind == "projected" and name.startswith("kube-api-access-")
    what, files, fetching = f"volume {name!r}", {}, None
    for item in sources:
        try:
            if "configMap" in item or "secret" in item:
                _, ref, data = _api_object(objects, pod, item, ("configMap", "secret"), what)
                files.update(_keys_to_files(ref, data, default_mode, what))
            elif "downwardAPI" in item:
                files.update(_downward_files(pod, item["downwardAPI"], default_mode, node_ip, root_dir, what))
            elif "serviceAccountToken" in item:
                ref, token = item["serviceAccountToken"], None
                path = _check_relpath(ref.get("path"), what)
                if tokens is not None:
                    token = tokens.token(pod, ref, target, path, what)
                elif api is not None:
                    try:
                        token = _request_token(pod, ref, api)[0]
                    except MinikrustError as exc:
                        log.warning("%s: serviceAccountToken skipped: %s", what, exc)
                files.update({path: (token, 0o600)} if token is not None else {})
            else:
                kinds = ", ".join(sorted(item)) or "empty"
                raise ContainerConfigError(f"{what}: unsupported projected source {kinds}", retry=False)
        except _Fetching as exc:     # the other sources' fetches start too: one wait for all
            fetching = exc
        except ContainerConfigError as exc:
            if not best_effort:
                raise
            log.info("%s: source skipped: %s", what, exc.message)
    if fetching:
        raise fetching
    return files


def _write_files(directory, files, private):
    """Make `directory` hold exactly `files` ({relpath: (bytes, mode)}), written beneath it;
    `private` (secrets, tokens): a 0700 directory of 0600 files, else the modes given."""
    dir_mode = 0o700 if private else 0o755
    with _dir_beneath(directory) as root:
        os.fchmod(root, dir_mode)
        for relpath, (content, mode) in files.items():
            _write_beneath(root, relpath, content, 0o600 if private else int(mode) & 0o777, dir_mode)
        _prune_beneath(root, (), {tuple(_beneath_parts(p)) for p in files})


def _prune_beneath(dir_fd, prefix, wanted):
    """Remove what is not `wanted` (tuples of path parts) from a folder, and folders left empty."""
    for entry in list(os.scandir(dir_fd)):
        parts = prefix + (entry.name,)
        if entry.is_dir(follow_symlinks=False) and parts not in wanted:
            with _dir_beneath(dir_fd, entry.name) as fd:
                _prune_beneath(fd, parts, wanted)
            with contextlib.suppress(OSError):
                os.rmdir(entry.name, dir_fd=dir_fd)       # only the ones left empty
        elif parts not in wanted:
            _remove_beneath(dir_fd, entry.name)


_SHM_DIR = "/dev/shm"


def _shm_name(link):
    """The `minikrust-*` name in /dev/shm a volume's link leads to, or None (no other link is followed)."""
    folder, name = os.path.split(link)
    return name if folder == _SHM_DIR and name.startswith("minikrust-") else None


def _private_dir(pod_dir, name):
    """The real directory of the secret or token volume `name` (linked at `<pod_dir>/volumes/<name>`):
    a 0700 folder on tmpfs (/dev/shm) when there is one, so secrets never reach the disk."""
    volumes = _makedirs_beneath(pod_dir, "volumes")
    try:
        with contextlib.suppress(OSError):   # not a link: the pod's own folder (no tmpfs), or nothing yet
            real = os.readlink(name, dir_fd=volumes)
            with contextlib.suppress(OSError):
                if _shm_name(real):
                    os.close(open_beneath(_SHM_DIR, _shm_name(real), os.O_RDONLY | os.O_DIRECTORY))
                    return real
            os.unlink(name, dir_fd=volumes)
        if name not in os.listdir(volumes) and os.access(_SHM_DIR, os.W_OK):
            try:
                real = tempfile.mkdtemp(prefix="minikrust-", dir=_SHM_DIR)  # random name, 0700
                os.symlink(real, name, dir_fd=volumes)
                return real
            except OSError as exc:
                log.debug("no tmpfs for volume %s (%s): using the pod directory", name, exc)
        os.close(_makedirs_beneath(volumes, name, 0o700))
        return os.path.join(pod_dir, "volumes", name)
    finally:
        os.close(volumes)


def _host_path(volume, config, base_dir):
    """The real directory of a hostPath volume, refused unless under --allowed-host-paths, off --root-dir."""
    source = volume.get("hostPath") or {}
    kind = source.get("type") or ""
    real = os.path.realpath(os.path.join(base_dir or "", source.get("path") or ""))
    prefixes = map(os.path.expanduser, config.allowed_host_paths)
    allowed = [os.path.realpath(prefix) for prefix in prefixes if os.path.isabs(prefix)]
    root = os.path.realpath(config.root_dir)
    where = f"hostPath {source.get('path')!r} of volume {volume['name']!r}"
    if not any(os.path.commonpath([real, prefix]) == prefix for prefix in allowed):
        problem = f"is not allowed: it is not under --allowed-host-paths ({', '.join(allowed) or 'none'})"
    elif os.path.commonpath([real, root]) in (real, root):     # the kubelet's own files: never a module's
        problem = f"is not allowed: it overlaps --root-dir {root}"
    elif kind not in ("", "Directory", "DirectoryOrCreate") or os.path.exists(real) != os.path.isdir(real):
        problem = f"is not a directory (type {kind or 'unset'}): WASI preopens only directories"
    elif kind == "Directory" and not os.path.isdir(real):
        raise ContainerConfigError(f"{where} does not exist (type Directory)", retry=True)
    else:
        os.makedirs(real, mode=0o755, exist_ok=True)
        return real
    raise ContainerConfigError(f"{where} {problem}", retry=False)


def _volume_type(volume):
    kinds = [key for key in volume if key != "name"]
    if len(kinds) != 1:
        raise ContainerConfigError(f"volume {volume.get('name')!r} must have exactly one type, has "
                                   f"{', '.join(kinds) or 'none'}", retry=False)
    return kinds[0]


def prepare_volumes(pod, pod_dir, config, api=None, base_dir=None, node_ip=None, tokens=None, objects=None):
    """{volume name: host dir} of a pod's volumes, ready, API contents rewritten; ContainerConfigError."""
    dirs, objects = {}, objects or ApiObjects(api)
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = volume.get("name") or ""
        if not name or "/" in name or name in (".", ".."):
            raise ContainerConfigError(f"invalid volume name {name!r}", retry=False)
        kind = _volume_type(volume)
        if kind == "hostPath":
            dirs[name] = _host_path(volume, config, base_dir)
            continue
        if kind not in ("emptyDir", *_API_VOLUME_TYPES):
            raise ContainerConfigError(f"volume {name!r} has type {kind}, which minikrust does not support",
                                       retry=False)
        private = kind in ("secret", "projected")      # a 0700 folder of 0600 files
        if private or (volume[kind] or {}).get("medium") == "Memory":
            dirs[name] = _private_dir(pod_dir, name)    # tmpfs, as the kubelet mounts it (no sizeLimit)
        else:
            os.close(_makedirs_beneath(pod_dir, f"volumes/{name}"))     # beneath the pod's folder
            dirs[name] = os.path.join(pod_dir, "volumes", name)
        if kind != "emptyDir":
            files = _volume_files(pod, volume, kind, dirs[name], api, node_ip, objects, tokens,
                                  config.root_dir)
            _write_files(dirs[name], files, private)
    return dirs


def _subpath(volume_dir, sub_path, api_volume):
    """The host path of a `subPath`, resolved beneath its volume (a planted symlink is never followed
    out); a missing one is made a directory, as the kubelet does."""
    _check_relpath(sub_path, "subPath")
    try:
        try:
            fd = open_beneath(volume_dir, sub_path, os.O_PATH)
        except FileNotFoundError:
            if api_volume:  # its content is the API object's: a key may still be added
                raise ContainerConfigError(f"subPath {sub_path!r} does not exist in its volume", retry=True) from None
            os.close(_makedirs_beneath(volume_dir, sub_path))
            fd = open_beneath(volume_dir, sub_path, os.O_PATH)
    except OSError as exc:
        raise ContainerConfigError(f"subPath {sub_path!r} cannot be used: {exc.strerror} (a symlink out of "
                                   "its volume?)", retry=False) from None
    if stat.S_IFMT(os.fstat(fd).st_mode) not in (stat.S_IFDIR, stat.S_IFREG):
        os.close(fd)
        raise ContainerConfigError(f"subPath {sub_path!r} is neither a directory nor a regular file", retry=False)
    return _held(fd, volume_dir, sub_path)


def _link_or_copy(source, folder, name):
    """Hard-link the file `source` (a _Held path, or one that must not be a link) as `name` in the
    directory fd `folder`, or copy it there when it is on another file system."""
    held = not isinstance(source, str)
    try:
        os.link(source, name, dst_dir_fd=folder, follow_symlinks=held)
    except OSError:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with open(os.open(source, os.O_RDONLY | (0 if held else os.O_NOFOLLOW)), "rb") as src, \
                os.fdopen(open_beneath(folder, name, flags, os.fstat(src.fileno()).st_mode & 0o777), "wb") as out:
            shutil.copyfileobj(src, out)


def _file_mounts(files, seen, pod_dir, staging):
    """Preopens for subPaths naming files: WASI preopens only directories, so each guest folder of such
    files becomes `<pod_dir>/<staging>/<n>`, of hard links (or copies), read-only if any is."""
    by_parent = collections.defaultdict(list)
    for host_file, guest, readonly in files:
        by_parent[os.path.dirname(guest)].append((host_file, os.path.basename(guest), readonly))
    if by_parent and pod_dir is None:
        raise ContainerConfigError("a subPath naming a file needs the pod directory", retry=False)
    mounts = []
    for index, (parent, entries) in enumerate(sorted(by_parent.items())):
        if parent in seen:
            raise ContainerConfigError(f"{parent!r} is both a mountPath and the folder of a file subPath",
                                       retry=False)
        folder = _makedirs_beneath(pod_dir, f"{staging}/{index}", 0o700)
        try:
            for host_file, base, _ in entries:
                _link_or_copy(host_file, folder, base)
        finally:
            os.close(folder)
        mounts.append((os.path.join(pod_dir, staging, str(index)), parent, any(readonly for _, _, readonly in entries)))
    return mounts


def container_mounts(pod, container, volume_dirs, env=None, pod_dir=None):
    """The preopens [(host_dir, guest_dir, readonly)] of a container's volumeMounts; API volumes are
    read-only whatever the mount says, as in the kubelet; subPath files staged (_file_mounts)."""
    volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or []}
    env_map = dict(env or ())
    mounts, files, seen = [], [], set()
    for mount in container.get("volumeMounts") or []:
        name, mount_path = mount.get("name"), mount.get("mountPath") or ""
        if name not in volume_dirs or name not in volumes:
            raise ContainerConfigError(f"volumeMount {mount_path!r} refers to unknown volume {name!r}", retry=False)
        if not mount_path.startswith("/"):
            raise ContainerConfigError(f"mountPath {mount_path!r} must be absolute", retry=False)
        guest = "/" + os.path.normpath(mount_path).lstrip("/")     # normpath keeps a leading "//"
        if guest in seen:
            raise ContainerConfigError(f"mountPath {guest!r} is mounted twice", retry=False)
        seen.add(guest)
        api_volume = _volume_type(volumes[name]) in _API_VOLUME_TYPES
        readonly = bool(mount.get("readOnly")) or api_volume
        host = volume_dirs[name]
        sub_path = mount.get("subPath") or _expand_refs(mount.get("subPathExpr"), env_map)
        if sub_path:
            host = _subpath(host, sub_path, api_volume)
            if os.path.isfile(host):
                if guest == "/":
                    raise ContainerConfigError(f"subPath {sub_path!r} is a file: it cannot be mounted at /",
                                               retry=False)
                files.append((host, guest, readonly))
                continue
        mounts.append((host, guest, readonly))
    staging = f"volumes/.subpaths/{container.get('name') or 'container'}"
    if pod_dir is not None:
        _remove_beneath(pod_dir, staging)
    return mounts + _file_mounts(files, seen, pod_dir, staging)


def read_guest_file(mounts, guest_path, limit):
    """The first `limit` bytes of the file a module sees at `guest_path` (beneath its mount), or None."""
    guest = os.path.normpath(guest_path or ".")     # a relative path: held by no mount
    holders = [(host, mount.rstrip("/")) for host, mount, _ro in mounts if guest.startswith(mount.rstrip("/") + "/")]
    if holders:
        host, mount = max(holders, key=lambda holder: len(holder[1]))
        with contextlib.suppress(OSError):
            return _read_beneath(host, guest[len(mount) + 1:], limit)
    return None


def cleanup_volumes(pod_dir):
    """Remove `<pod_dir>/volumes` and the tmpfs folders it links to (never a hostPath), following no link."""
    with contextlib.suppress(OSError):
        volumes = open_beneath(pod_dir, "volumes", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for entry in list(os.scandir(volumes)):
                shm = _shm_name(os.readlink(entry.name, dir_fd=volumes)) if entry.is_symlink() else None
                if shm:
                    _remove_beneath(_SHM_DIR, shm)
        finally:
            os.close(volumes)
    _remove_beneath(pod_dir, "volumes")


# --- Env: argv, environment and $(VAR) expansion ---
# A container's argv, environment and working directory, with $(VAR) expanded as Kubernetes does;
# env values from configMaps, secrets, the downward API and resources.

# The kubelet's validation.IsEnvVarName: keys of envFrom sources that fail it are skipped.
_ENV_VAR_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")


def _env_from(pod, container, objects, warnings):
    """Variables of `envFrom` sources, in order; keys that are not valid names are skipped."""
    result = {}
    for source in container.get("envFrom") or []:
        kind, ref, data = _api_object(objects, pod, source, ("configMapRef", "secretRef"), "envFrom source",
                                      binary=False)
        prefix = source.get("prefix") or ""
        named = {prefix + key: value.decode(errors="replace") for key, value in sorted((data or {}).items())}
        invalid = [name for name in named if not _ENV_VAR_NAME.match(name)]
        result.update((name, value) for name, value in named.items() if name not in invalid)
        if invalid:  # the kubelet's Warning event, word for word
            message = (f"Keys [{', '.join(invalid)}] from the EnvFrom {kind.lower()} {_namespace(pod)}/"
                       f"{ref.get('name')} were skipped since they are considered invalid environment "
                       "variable names.")
            log.warning("container %s: %s", container.get("name"), message)
            if warnings is not None:
                warnings.append(("InvalidEnvironmentVariableNames", message))
    return result


def _env_value_from(pod, container, source, node_ip, objects, root_dir):
    """The value of one `valueFrom`, or None when an optional configMap/secret key is missing."""
    value = _downward_value(pod, source, node_ip, root_dir, container.get("name"))
    if value is not None:
        return value
    kind, ref, data = _api_object(objects, pod, source, ("configMapKeyRef", "secretKeyRef"), "valueFrom",
                                  binary=False)
    key = ref.get("key")
    if data is None or key not in data and ref.get("optional"):
        return None
    if key not in data:
        raise ContainerConfigError(f"couldn't find key {key} in {kind} {_namespace(pod)}/{ref.get('name')}")
    return data[key].decode(errors="replace")


def container_env(pod, container, api=None, node_ip=None, warnings=None, objects=None, root_dir="/"):
    """The environment [(name, value)] of a container, as the kubelet's makeEnvironmentVariables;
    `workingDir` is passed as PWD (WASI has no cwd); `warnings` gets the kubelet's Warning events."""
    objects = objects or ApiObjects(api)
    env = _env_from(pod, container, objects, warnings)
    for var in container.get("env") or []:      # each has a name (pod_problem)
        if var.get("valueFrom"):
            value = _env_value_from(pod, container, var["valueFrom"], node_ip, objects, root_dir)
        else:
            value = _expand_refs(var.get("value") or "", env)
        if value is not None:       # an optional configMap/secret key that is missing
            env[var["name"]] = value
    workdir = container_workdir(container)
    if workdir and "PWD" not in env:
        env["PWD"] = workdir
    return list(env.items())


def container_workdir(container):
    """The container's `workingDir` as an absolute guest path, or None when unset."""
    workdir = container.get("workingDir") or ""
    if not workdir:
        return None
    if not workdir.startswith("/"):
        raise ContainerConfigError(f"workingDir {workdir!r} must be an absolute path", retry=False)
    return os.path.normpath(workdir)


def container_argv(container, env):
    """command + args, $(VAR)-expanded (ExpandContainerCommandAndArgs); no command: argv[0] is the name."""
    env_map = dict(env or ())
    command = [_expand_refs(part, env_map) for part in container.get("command") or []]
    args = [_expand_refs(part, env_map) for part in container.get("args") or []]
    return (command or [container.get("name") or "module"]) + args


# --- Runtime: the WASI host, native (_wasihost) or the wasmtime package fallback ---
# Runs a module (or WASI 0.2 component) on its own thread and writes its CRI log: _wasihost when built,
# else FallbackHost. Hosts report facts; the OOM rule and rotation limits are decided here.

class ModuleLoadError(ModuleError):
    """A module that cannot be loaded: invalid wasm, no `_start`, an import WASI does not provide."""


class ModuleRunError(ModuleError):
    """A run that cannot be set up, e.g. a preopened directory that does not exist."""


# How one fallback run ended (twin of `_wasihost.Result`); exit_code None: `trap` says why.
RunResult = collections.namedtuple("RunResult", "exit_code trap duration killed timed_out instantiate_failed "
                                   "cpu_seconds peak_memory", defaults=(False, False, False, 0.0, 0))


_CRI_MAX_LINE = 16 * 1024  # the kubelet's CRI logger cuts longer lines into P records
_WASM_PAGE = 65536
_EPOCH_TICK = 0.005        # seconds between epoch ticks; kill() lands within a few ticks
_KILLED, _TIMED_OUT = "killed", "deadline exceeded"


# Rotated logs are named and compressed as the kubelet's container log manager does (pkg/kubelet/
# logs): `<log>.<YYYYMMDD-HHMMSS>` (UTC), all but the newest gzip-compressed to `<name>.gz`.
_ROTATED_STAMP = re.compile(r"^\d{8}-\d{6}(\.gz)?$")


@contextlib.contextmanager
def _open_log(folder, name):
    """The log file `name` in the directory fd `folder` for reading, gunzipped when it is `.gz`."""
    raw = os.fdopen(open_beneath(folder, name, os.O_RDONLY | os.O_NONBLOCK), "rb")
    with raw, (gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else contextlib.nullcontext(raw)) as handle:
        yield handle


def _rotate_log(folder, base, max_files):
    """Rotate the log `base` in the directory fd `folder` as the kubelet (and C's sink_rotate): rotated
    files beyond `max_files - 2` go, the rest are gzipped; `base` becomes `<base>.<UTC stamp>` (returned)."""
    rotated = rotated_log_files(folder, base)
    cut = max(0, len(rotated) - max(0, max_files - 2))
    unfinished = [name for name in os.listdir(folder) if name.startswith(base + ".") and name.endswith(".tmp")
                  and _ROTATED_STAMP.match(name[len(base) + 1:-4])]     # a compression cut short
    for name in unfinished + rotated[:cut]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(name, dir_fd=folder)
    for name in rotated[cut:]:
        if not name.endswith(".gz"):
            with contextlib.suppress(OSError):      # not compressed, as in C (a link planted there is not followed)
                _compress_log(folder, name)
    now = int(time.time())
    if rotated:
        newest = datetime.datetime.strptime(rotated[-1][len(base) + 1:][:15], "%Y%m%d-%H%M%S")
        now = max(now, int(newest.replace(tzinfo=datetime.timezone.utc).timestamp()) + 1)
    target = f"{base}.{datetime.datetime.fromtimestamp(now, datetime.timezone.utc):%Y%m%d-%H%M%S}"
    os.rename(base, target, src_dir_fd=folder, dst_dir_fd=folder)
    if max_files == 1:      # the live file alone
        os.remove(target, dir_fd=folder)
    return target


def _compress_log(folder, name):
    """gzip the log `name` in the directory fd `folder` to `<name>.gz` (by way of `<name>.tmp`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with _open_log(folder, name) as source, os.fdopen(open_beneath(folder, name + ".tmp", flags, 0o644), "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as packed:
            shutil.copyfileobj(source, packed)
    os.replace(name + ".tmp", name + ".gz", src_dir_fd=folder, dst_dir_fd=folder)
    os.remove(name, dir_fd=folder)


def rotated_log_files(folder, base):
    """The rotated files of the log `base` in the directory fd `folder`, oldest first; of one found
    both compressed and not (a compression cut short), the compressed one."""
    stamps = {}
    for name in sorted(os.listdir(folder)):  # "<stamp>" sorts before "<stamp>.gz", which then wins
        suffix = name[len(base) + 1:]
        if name.startswith(base + ".") and _ROTATED_STAMP.match(suffix):
            stamps[suffix[:15]] = name
    return [stamps[stamp] for stamp in sorted(stamps)]


def _records(handle, buffered, block=1 << 20):
    """The complete records (ending in a newline) next in `handle`; a half-written one waits in `buffered`."""
    while data := handle.read(block):
        buffered.extend(data)
        end = buffered.rfind(b"\n")
        if end >= 0:
            chunk = bytes(buffered[:end + 1])
            del buffered[:end + 1]
            return chunk.splitlines(keepends=True)
    return []


class _LogCursor:
    """Reads a container log's records as they are written, across rotations: the rotated files, then
    the live one; when that is renamed away, its rest and what came after. Inodes are reused, so the
    file read last is known by its first bytes and, once rotated, its stamp. Holds no file open
    between reads: each resolves the folder beneath `root` and opens beneath the folder."""

    def __init__(self, path, root=None):
        folder, self.path = os.path.split(os.fspath(path))
        self._root = (folder or ".") if root is None else root
        self._folder = os.path.relpath(folder or ".", self._root)
        self._inode, self._offset, self._buffered = None, 0, bytearray()
        self._head, self._stamp, self._after = b"", None, ""    # _stamp None: the live file

    def exists(self):
        """Whether the log or any rotated file of it is there (not once its folder is gone, with its pod)."""
        with contextlib.suppress(FileNotFoundError), _dir_beneath(self._root, self._folder) as folder:
            return self.path in os.listdir(folder) or bool(rotated_log_files(folder, self.path))
        return False

    def _same(self, folder, name):
        """Whether `name` starts with the bytes the file read last started with (an empty one: any)."""
        try:
            with _open_log(folder, name) as handle:
                return handle.read(len(self._head)) == self._head
        except (OSError, EOFError):
            return False

    def _unread(self, folder):
        """[(file, offset)] to read now, oldest first."""
        if self.path not in os.listdir(folder):
            return []
        live = self._inode is not None and self._stamp is None
        if live and self._head and self._same(folder, self.path):
            return [(self.path, self._offset)]
        rotated = rotated_log_files(folder, self.path)
        stamps = [name[len(self.path) + 1:][:15] for name in rotated]
        after, self._after = self._after, (stamps[-1] if stamps else "")
        for i, name in enumerate(rotated if self._inode is not None else ()):   # the rest are newer
            if (stamps[i] == self._stamp if self._stamp else stamps[i] > after) and self._same(folder, name):
                return [(name, self._offset)] + [(later, 0) for later in rotated[i + 1:] + [self.path]]
        if live and not self._head:     # the live file was empty and has not been rotated since
            return [(self.path, 0)]
        return [(name, 0) for name in rotated + [self.path]]

    def records(self, final=False):
        """The records written since the last call, oldest first; `final`: also a last one without newline."""
        with contextlib.suppress(FileNotFoundError), _dir_beneath(self._root, self._folder) as folder:
            yield from self._read(folder)      # none once the folder is gone (with its pod)
        if final and self._buffered:
            yield bytes(self._buffered)
            self._buffered.clear()

    def _read(self, folder):
        for name, offset in self._unread(folder):
            with contextlib.ExitStack() as stack:
                try:
                    handle = stack.enter_context(_open_log(folder, name))
                except FileNotFoundError:
                    continue
                st = os.fstat(handle.fileno())
                if offset == 0 or (st.st_size < offset and not name.endswith(".gz")):  # another file, or truncated
                    offset = 0
                    self._buffered.clear()
                handle.seek(offset)     # in a .gz: an offset of the bytes it holds
                while records := _records(handle, self._buffered):
                    yield from records
                self._inode, self._offset = st.st_ino, handle.tell()
                self._stamp = None if name == self.path else name[len(self.path) + 1:][:15]
                handle.seek(0)
                self._head = handle.read(min(self._offset, 64))


def _write_all(fd, data):
    """os.write until all of `data` is written (a write may take only part of it)."""
    while data:
        data = data[os.write(fd, data):]


class _LogFile:
    """An output path of a run, shared by its two streams: appended, rotated after the record that
    fills `max_size`, then reopened; with `folder` (a resolved directory fd), `path` is a name in it."""

    def __init__(self, path, max_size=None, max_files=None, folder=None):
        self.path, self.max_size, self.max_files = os.fspath(path), max_size, max_files
        self.folder = self.fd = -1
        try:
            head, self.name = ("", self.path) if folder is not None else os.path.split(self.path)
            self.folder = os.dup(folder) if folder is not None else os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY)
            self.fd = open_beneath(self.folder, self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self.close()
            raise ModuleRunError(f"cannot open log {self.path}: {exc.strerror}") from exc
        self.size = os.fstat(self.fd).st_size
        self._lock = threading.Lock()

    def write(self, pieces):
        """Append the list `pieces` (whole CRI records, or raw chunks), rotating between them when full."""
        with self._lock:
            start = 0
            for end, piece in enumerate(pieces, 1):
                self.size += len(piece)
                if self.max_size and self.size >= self.max_size:
                    _write_all(self.fd, b"".join(pieces[start:end]))
                    start = end
                    self._rotate()
            _write_all(self.fd, b"".join(pieces[start:]))

    def _rotate(self):
        self.size = 0  # also when it fails: tried again after another max_size bytes
        try:
            _rotate_log(self.folder, self.name, self.max_files)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot rotate log %s: %s", self.path, exc)
                return
        fd = open_beneath(self.folder, self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, self.fd, inheritable=False)
        os.close(fd)

    def close(self):
        for fd in (self.fd, self.folder):
            if fd >= 0:
                os.close(fd)


class _StreamWriter:
    """One WASI output stream as CRI records `<timestamp> <stream> <F|P> <line>` (log_format "cri")
    or raw bytes ("plain"), handed in lists to `sink` (see _FallbackRun._sink), or dropped (None)."""

    def __init__(self, sink, stream, log_format, clock):
        if log_format not in ("cri", "plain"):
            raise ModuleRunError(f"unknown log_format {log_format!r} (want 'cri' or 'plain')")
        self.sink, self.stream, self.cri, self.clock, self.buf = sink, stream, log_format == "cri", clock, b""

    def write(self, data):
        """The WASI custom-output callback: consume all of `data`, return its length."""
        if self.sink is None or not self.cri:
            if self.sink is not None:
                self.sink([data])
            return len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        records = []
        for line in lines:      # cut into P records of _CRI_MAX_LINE bytes, ended by an F one
            pieces = [line[i:i + _CRI_MAX_LINE] for i in range(0, len(line) or 1, _CRI_MAX_LINE)]
            records += [(b"P", piece) for piece in pieces[:-1]] + [(b"F", pieces[-1])]
        whole = len(self.buf) - len(self.buf) % _CRI_MAX_LINE       # an unended line's full pieces
        records += [(b"P", self.buf[i:i + _CRI_MAX_LINE]) for i in range(0, whole, _CRI_MAX_LINE)]
        self.buf = self.buf[whole:]
        if records:
            self._records(records)
        return len(data)

    def _records(self, records):
        """Write (tag, line) records stamped with one time."""
        head = f"{self.clock()} {self.stream} ".encode()
        self.sink([head + tag + b" " + line + b"\n" for tag, line in records])

    def close(self):
        """Flush a trailing fragment without newline as a P record (the run closes its files)."""
        _OUTPUTS.pop(id(self), None)
        if self.buf and self.cri:
            self._records([(b"P", self.buf)])
        self.buf = b""


def _is_oom(result, memory_limit):
    """Whether a failed run (of either host) ran out of its memory limit: wasmtime only refuses a
    memory.grow, so a run that failed on its own counts when it could not instantiate under the
    limit or ended within 1/8 of it (a failed malloc asks for more than one page)."""
    if memory_limit is None or result.exit_code == 0 or result.killed or result.timed_out:
        return False
    return result.instantiate_failed or result.peak_memory > memory_limit - max(_WASM_PAGE, memory_limit // 8)


_OUTPUTS = {}  # id(writer) -> _StreamWriter, for the one custom-output callback below


@ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t)
def _on_output(key, buf, size):
    writer = _OUTPUTS.get(key)
    if writer is None:  # the run is over: wasmtime flushes nothing we still want
        return size
    try:
        return writer.write(ctypes.string_at(buf, size))
    except OSError as exc:  # a full disk must not stop the module (as in the C host): the output is lost
        log.debug("output of a module lost: %s", exc)
        return size
    except Exception:  # an exception must not cross into wasmtime
        log.exception("writing the output of a module failed")
        return -errno.EIO


def _set_custom_output(wt, wasi, stream, writer):
    """Send a WASI stream to `writer`, with no finalizer: wasmtime may drop the stream on one of its
    own threads late, even during interpreter exit, where a Python callback aborts the process."""
    _OUTPUTS[id(writer)] = writer
    setter = wt._ffi.wasi_config_set_stdout_custom if stream == "stdout" else wt._ffi.wasi_config_set_stderr_custom
    setter(wasi.ptr(), _on_output, id(writer), ctypes.CFUNCTYPE(None, ctypes.c_void_p)())


class _FallbackRun:
    """One run on the fallback host: a thread calling `_start`, stoppable by kill() or deadline."""

    _done = None  # the _DoneFd its thread writes at the end
    _stop_reason = _poll_original = _result = None   # _KILLED or _TIMED_OUT; see _original_poll; a RunResult

    def __init__(self, host, module, argv, env=None, preopens=(), stdout=None, stderr=None, log_format="cri",
                 memory_limit=None, deadline=None, stdin=None, log_max_size=None, log_max_files=None,
                 outgoing_http=False, log_dir_fd=None):
        wt = host._wt
        memory_limit, deadline, *rotation = _run_limits(memory_limit, deadline, log_max_size, log_max_files)
        self._host, self._module = host, module
        self._stop_event = threading.Event()  # set by kill(); wakes a module sleeping in poll_oneoff
        self._deadline_at = math.inf if deadline is None else time.monotonic() + deadline
        self._usage_lock = threading.Lock()
        self._usage_live, self._cpu_total, self._memory, self._memory_span, self._peak = False, 0.0, None, None, 0
        self._writers, self._files, self._last_stamp = [], {}, 0
        try:
            wasi = wt.WasiConfig()
            argv = [str(a) for a in argv]
            pairs = [(str(k), str(v)) for k, v in (env.items() if isinstance(env, dict) else env or ())]
            if any("\0" in text for text in argv + [t for pair in pairs for t in pair]):
                raise ModuleRunError("an argument or environment string contains a NUL byte")
            wasi.argv = argv
            wasi.env = pairs
            for host_dir, guest_dir, readonly in preopens or ():
                if not os.path.isdir(host_dir):
                    raise ModuleRunError(f"preopened directory does not exist: {host_dir} (for {guest_dir})")
                wasi.preopen_dir(os.fspath(host_dir), guest_dir, not readonly)
            for target, stream in ((stdout, "stdout"), (stderr, "stderr")):
                sink = self._sink(target, *rotation, log_dir_fd)
                writer = _StreamWriter(sink, stream, log_format, self._stamp)
                self._writers.append(writer)
                _set_custom_output(wt, wasi, stream, writer)
            if stdin is not None:
                data = (ctypes.c_uint8 * len(stdin)).from_buffer_copy(bytes(stdin))
                vec = wt._ffi.wasm_byte_vec_t()  # filled with a copy that WASI then owns
                wt._ffi.wasm_byte_vec_new(ctypes.byref(vec), len(stdin), ctypes.cast(data, ctypes.POINTER(ctypes.c_uint8)))
                wt._ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))
            self._store = wt.Store(host._engine)
            self._store.set_wasi(wasi)
            self._http = False if outgoing_http in (False, None) or not module.component else \
                True if outgoing_http is True else host._http_filter(tuple(outgoing_http))
            if self._http is not False:  # after WASI, as wasmtime requires
                wt._ffi.wasmtime_context_set_wasi_http(self._store._context())
            self._wasi_start = time.monotonic_ns()  # WASI's monotonic clock starts at or before this
            if memory_limit is not None:
                self._store.set_limits(memory_size=int(memory_limit))
            self._store.set_epoch_deadline(1)
            host._register(self)
            self._done = _DoneFd()
        except wt.WasmtimeError as exc:
            self._close_writers()
            raise ModuleRunError(f"cannot set up run of {module.digest}: {exc}") from exc
        except BaseException:
            self._close_writers()
            raise

    def _sink(self, target, max_size, max_files, folder):
        """Where a stream's pieces go: an fd, a callable (a call a piece), or the path's _LogFile (shared)."""
        if target is None:
            return None
        if isinstance(target, int):
            return lambda pieces: _write_all(target, b"".join(pieces))
        if callable(target):
            def sink(pieces):
                for piece in pieces:
                    target(piece)
            return sink
        path = os.fsdecode(target)
        if path not in self._files:
            self._files[path] = _LogFile(path, max_size, max_files, folder)
        return self._files[path].write

    def _stamp(self):
        """A CRI timestamp for either stream, never going backwards (they may share a file)."""
        self._last_stamp = max(self._last_stamp, time.time_ns())
        return _rfc3339nano(self._last_stamp)

    def _close_writers(self):
        try:
            for writer in self._writers:
                writer.close()
        finally:
            for file in self._files.values():
                file.close()
            self._files = {}

    def _should_stop(self):
        """Called from the epoch callback on the run's thread: why to stop, or None to go on."""
        if self._stop_event.is_set():
            return _KILLED
        if time.monotonic() >= self._deadline_at:
            return _TIMED_OUT
        return None

    def _main(self):
        wt = self._host._wt
        self._host._local.run = self
        start, exit_code, trap, instantiated = time.monotonic(), None, None, False
        # Live usage, as the native host's wh_run_usage: this thread publishes its CPU clock and its
        # linear memory (at instantiation, each epoch tick, before a sleep); any thread reads them.
        # Where the thread's CPU clock cannot be read from another thread (macOS), the last
        # thread_time() sampled at a publish stands for it.
        clock = time.CLOCK_THREAD_CPUTIME_ID
        if _THREAD_CLOCKS:
            clock = time.pthread_getcpuclockid(threading.get_ident())
        with self._usage_lock:
            self._cpu_clock, self._cpu0, self._usage_live = clock, time.clock_gettime(clock), True
        try:
            if self._module.component:
                run = self._host._component_run(self._store, self._module, self._http, self)
            else:
                exports = self._module._pre.instantiate(self._store).exports(self._store)
                memory, run = exports.get("memory"), exports["_start"]
                self._memory = memory if isinstance(memory, wt.Memory) else None
            instantiated = True
            self._publish_memory()
            try:
                outcome = run(self._store)
                exit_code = 1 if getattr(outcome, "tag", None) == "err" else 0  # wasi:cli/run's result
            except wt.ExitTrap as exc:
                exit_code = exc.code
            except (wt.Trap, wt.WasmtimeError) as exc:
                trap = None if self._stop_reason else str(exc)  # killed/timed_out say it, as native does
            self._publish_memory()      # its size at the end is its peak: a memory never shrinks
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
            self._host._unregister(self)
            self._host._local.run = None
            self._memory = None
            self._publish_memory()  # before the memory goes: a reader's mincore must not outlive it
            self._store.close()
        cpu = time.thread_time() - self._cpu0
        with self._usage_lock:
            self._usage_live, self._cpu_total = False, cpu
        self._result = RunResult(exit_code, trap, time.monotonic() - start, self._stop_reason == _KILLED,
                                 self._stop_reason == _TIMED_OUT, not instantiated, cpu, self._peak)
        self._done.post()  # the end, as the native host posts it

    def _publish_memory(self):
        """On the run's thread: the linear memory's place and size now (none once it goes)."""
        memory = self._memory
        span = None if memory is None else (ctypes.cast(memory.data_ptr(self._store), ctypes.c_void_p).value,
                                            memory.data_len(self._store))
        with self._usage_lock:
            self._memory_span = span
            self._peak = max(self._peak, span[1] if span else 0)
            if not _THREAD_CLOCKS:
                self._cpu_total = time.thread_time() - self._cpu0

    def usage(self):
        """(cpu_seconds, resident bytes of linear memory (0 once ended), peak_memory_bytes), any thread."""
        with self._usage_lock:
            if not self._usage_live:
                return self._cpu_total, 0, self._peak
            cpu = time.clock_gettime(self._cpu_clock) - self._cpu0 if _THREAD_CLOCKS else self._cpu_total
            return cpu, _resident_bytes(*self._memory_span) if self._memory_span else 0, self._peak

    def kill(self):
        """Stop the module from any thread; it stops at its next epoch tick (a few ms)."""
        self._stop_event.set()

    def _sleep(self, seconds):
        """Sleep for a guest's poll_oneoff, cut short by kill() or the deadline; why we stopped, or None."""
        end = min(time.monotonic() + seconds, self._deadline_at)
        while not (reason := self._should_stop()) and (left := end - time.monotonic()) > 0:
            self._stop_event.wait(min(left, 3600.0))  # in slices: Event.wait refuses timeouts of centuries
        if reason:
            self._stop_reason = reason
        return reason

    def wait(self, timeout=None):
        """The RunResult, or None if the run is still going after `timeout` seconds."""
        return self._result if self._done.ready(timeout) else None

    @property
    def done(self):
        return self._done.ready(0)

    def fileno(self):
        """An fd that is readable once the run is over."""
        return self._done.read_fd

    def __del__(self):
        if self._done is not None:
            self._done.close()


class _DoneFd:
    """The fd a run's thread writes once at its end (an eventfd, or a pipe where there is none):
    readable from then on, so one selector can wait for the ends of many runs."""

    def __init__(self):
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_CLOEXEC)
        else:
            self.read_fd, self.write_fd = os.pipe()

    def ready(self, timeout):
        """Whether the run is over within `timeout` seconds (None: wait for it)."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

    def post(self):
        os.write(self.write_fd, (1).to_bytes(8, sys.byteorder))

    def clear(self):
        """Make it unreadable again (after it was seen readable)."""
        os.read(self.read_fd, 4096)

    def close(self):
        for fd in {self.read_fd, self.write_fd} - {-1}:
            os.close(fd)
        self.read_fd = self.write_fd = -1


_THREAD_CLOCKS = hasattr(time, "pthread_getcpuclockid")  # another thread's CPU clock is readable
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=None)
def _mincore():
    return ctypes.CDLL(None, use_errno=True).mincore


def _resident_bytes(address, size):
    """Bytes of [address, address + size) resident in RAM (mincore), as the native host counts them."""
    start = address - address % _PAGE_SIZE
    pages = (address + size - start + _PAGE_SIZE - 1) // _PAGE_SIZE
    vec = (ctypes.c_ubyte * max(pages, 1))()
    if not pages or _mincore()(ctypes.c_void_p(start), ctypes.c_size_t(pages * _PAGE_SIZE), vec) != 0:
        return 0
    raw = bytes(vec)
    return (len(raw) - raw.count(0)) * _PAGE_SIZE


def _whole(value, what, low):
    """`value` if it is an int (not a bool) of at least `low`, else ModuleRunError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModuleRunError(f"{what} must be a whole number of at least {low}, not {value!r}")
    return value


def _run_limits(memory_limit, deadline, log_max_size, log_max_files):
    """A run's limits, checked once for both hosts (the native one calls this as its `check`): NaN,
    negative or mistyped is refused; beyond any run (2**48 bytes, 1e9 seconds) is no limit (None);
    no log_max_size is no rotation, a larger one than 2**62 is 2**62, log_max_files defaults to 5."""
    if memory_limit is not None and _whole(memory_limit, "memory_limit", 0) > 1 << 48:
        memory_limit = None
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not deadline >= 0):
        raise ModuleRunError(f"deadline must be a number of seconds of at least 0, not {deadline!r}")
    if log_max_size is None:
        log_max_files = None
    else:
        log_max_size = min(_whole(log_max_size, "log_max_size", 1), 1 << 62)
        log_max_files = _whole(5 if log_max_files is None else log_max_files, "log_max_files", 1)
    return memory_limit, None if deadline is None or deadline > 1e9 else deadline, log_max_size, log_max_files


class _FallbackModule:
    """A compiled module with its imports resolved once (an InstancePre)."""

    def __init__(self, host, digest, module, pre, imports_http=None):
        self._host, self.digest, self._wasm_module, self._pre = host, digest, module, pre
        self.component, self.imports_http = pre is None, bool(imports_http)

    def start(self, *args, **kwargs):
        """Start a run in a thread (ModuleRunError for setup errors); as `_wasihost.Module.start`."""
        run = _FallbackRun(self._host, self, *args, **kwargs)
        threading.Thread(target=run._main, name=f"wasm-{self.digest[7:19]}", daemon=True).start()
        return run

    def run(self, *args, **kwargs):
        """Run to the end on the calling thread: the RunResult."""
        run = _FallbackRun(self._host, self, *args, **kwargs)
        run._main()
        return run.wait()

    def __repr__(self):
        return f"<module {self.digest} on wasmtime-py>"


_WASI = "wasi_snapshot_preview1"
_CLI_RUN = "wasi:cli/run@0.2.0"  # wasmtime matches any 0.2.x export to it


_ALLOW_HTTP = "minikrust.io/allow-outgoing-http"


def _outgoing_http(module, pod):
    """The outgoing HTTP a run of `module` for `pod` gets: False (it imports no wasi:http), True (the
    annotation `minikrust.io/allow-outgoing-http` is "*") or the hosts it lists; ModuleRunError for
    a component importing wasi:http without the annotation."""
    if not module.imports_http:
        return False
    allowed = _annotations(pod).get(_ALLOW_HTTP)
    if allowed is None:
        raise ModuleRunError(f"the component imports wasi:http/outgoing-handler; allow its outgoing HTTP "
                             f"requests with the pod annotation {_ALLOW_HTTP}: \"host1,host2:8080\" (or \"*\")")
    hosts = tuple(host.strip() for host in allowed.split(",") if host.strip())
    return True if "*" in hosts else hosts


_POLL_TRAMPOLINE = (
    '(module (import "guest" "memory" (memory 0))'
    ' (import "wasi" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))'
    ' (export "memory" (memory 0))'
    ' (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)'
    '  local.get 0 local.get 1 local.get 2 local.get 3 call $p))')


def _poll_clocks(memory, store, subs_ptr, events_ptr, nsubs, nevents_ptr, wasi_start):
    """[(userdata, ns until it fires)] when a poll_oneoff is only realtime/monotonic clocks, in bounds
    and aligned (a sleep), else None; absolute monotonic times count from `wasi_start`."""
    size = memory.data_len(store)
    if not 0 < nsubs <= 4096 or subs_ptr % 8 or events_ptr % 8 or nevents_ptr % 4:
        return None
    if subs_ptr + 48 * nsubs > size or events_ptr + 32 * nsubs > size or nevents_ptr + 4 > size:
        return None
    raw = memory.read(store, subs_ptr, subs_ptr + 48 * nsubs)
    mono, real = time.monotonic_ns() - wasi_start, time.time_ns()
    clocks = []
    for i in range(0, len(raw), 48):
        tag, clock_id = raw[i + 8], int.from_bytes(raw[i + 16:i + 20], "little")
        if tag != 0 or clock_id not in (0, 1):  # not a clock, or a CPU clock
            return None
        timeout = int.from_bytes(raw[i + 24:i + 32], "little")
        if int.from_bytes(raw[i + 40:i + 42], "little") & 1:  # absolute
            timeout = max(0, timeout - (mono if clock_id == 1 else real))
        clocks.append((int.from_bytes(raw[i:i + 8], "little"), timeout))
    return clocks


class FallbackHost:
    """`_wasihost.Host` on the `wasmtime` Python package (slower, same behaviour): a ticker thread bumps
    the epoch and each run's epoch callback decides whether to stop; compiled code cached on disk."""

    backend = "wasmtime-py"

    def __init__(self, cache_dir):
        try:
            import wasmtime
            import wasmtime.component  # noqa: F401  (WASI 0.2 components)
        except ImportError as exc:
            raise ModuleError("no WebAssembly runtime: build the _wasihost extension or `pip install wasmtime`") from exc
        self._wt = wasmtime
        self.wasmtime_version = runtime_version()
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        os.makedirs(self.cache_dir, exist_ok=True)
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        config.parallel_compilation = False     # no thread per core kept for good (as the native host)
        self._engine = wasmtime.Engine(config)
        self._linker = wasmtime.Linker(self._engine)
        self._linker.define_wasi()
        # poll_oneoff is ours so that kill() and deadlines also stop a module that sleeps
        self._wasi_linker = wasmtime.Linker(self._engine)
        self._wasi_linker.define_wasi()
        self._linker.allow_shadowing = True
        i32 = wasmtime.ValType.i32()
        self._linker.define_func(_WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), self._poll_oneoff,
                                 access_caller=True)
        self._poll_trampoline = wasmtime.Module(self._engine, _POLL_TRAMPOLINE)
        self._local = threading.local()
        self._component_linkers = self._filter = None  # see _component_linker, _http_filter
        self._modules, self._runs = {}, {}     # digest -> module; id(run) -> run, while it runs
        self._lock = threading.Lock()
        self._ticking = threading.Condition(self._lock)
        self._ticker, self._closing = None, False
        atexit.register(self._shutdown)
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

    def _compile(self, digest, data):
        wt = self._wt
        if data[:4] != b"\0asm":
            raise ModuleLoadError("not a WebAssembly module (bad magic number)")
        name = f"{digest[7:]}.wasmtime-{self.wasmtime_version}-{platform.machine()}.cwasm"
        path = os.path.join(self.cache_dir, name)
        kind = wt.component.Component if _is_component(data) else wt.Module
        compiled = None
        try:        # a link planted at the entry's name is not followed
            cached = _held(open_beneath(*os.path.split(path)), *os.path.split(path))
            compiled = kind.deserialize_file(self._engine, os.fspath(cached))
        except OSError:
            pass
        except wt.WasmtimeError as exc:
            log.warning("recompiling %s: cached code unusable: %s", digest, exc)
        fresh = compiled is None
        if fresh:
            try:
                compiled = kind(self._engine, data)
            except wt.WasmtimeError as exc:
                raise ModuleLoadError(f"invalid WebAssembly {kind.__name__.lower()}: {exc}") from exc
            if kind is not wt.Module:
                self._write_cache(path, compiled.serialize())
        if kind is not wt.Module:
            return _FallbackModule(self, digest, compiled, None, self._component_imports(compiled))
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
        try:
            _write_beneath(*os.path.split(path), blob)
        except OSError as exc:  # a read-only cache only costs a recompile next time
            log.warning("cannot write compiled module cache %s: %s", path, exc)

    def _component_imports(self, component):
        """Whether `component` imports wasi:http/outgoing-handler; ModuleLoadError when it has no
        wasi:cli/run or does not link (tried once in a store of its own, as the native host does)."""
        wt = self._wt
        http = any(name.startswith("wasi:http/outgoing-handler@") for name in component.type.imports(self._engine))
        store = wt.Store(self._engine)
        store.set_wasi(wt.WasiConfig())
        store.set_epoch_deadline(1000)  # no code runs here, but never hang: ~5 s
        if http:
            wt._ffi.wasmtime_context_set_wasi_http(store._context())
        try:
            self._component_linker(http).instantiate(store, component)
        except wt.WasmtimeError as exc:
            raise ModuleLoadError(f"cannot link component: {exc}") from exc
        finally:
            store.close()
        if component.get_export_index("run", component.get_export_index(_CLI_RUN)) is None:
            raise ModuleLoadError("component does not export `wasi:cli/run` (not a WASI 0.2 command)")
        return http

    def _component_linker(self, http):
        """The component linker with WASI 0.2, + wasi:http (http True), + our `handle` in place of
        wasi:http's (http a tuple of hosts: see _http_handle), made on first use."""
        wc = self._wt.component
        if self._component_linkers is None:
            linkers = []
            for kind in range(3):
                linker = wc.Linker(self._engine)
                linker.add_wasip2()
                if kind:
                    linker.add_wasi_http()
                if kind == 2:  # under every 0.2.x name: an import finds its very version first (as native)
                    linker.allow_shadowing = True
                    with linker.root() as root:
                        for minor in range(64):
                            with root.add_instance(f"wasi:http/outgoing-handler@0.2.{minor}") as handler:
                                handler.add_func("handle", self._http_handle)
                linkers.append(linker)
            self._component_linkers = linkers
        return self._component_linkers[2 if isinstance(http, tuple) else int(http)]

    def _http_filter(self, hosts):
        """`hosts`, once the filter component is compiled (ModuleRunError when it cannot be)."""
        if self._filter is None:
            try:
                with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_wasihost", "http_filter.wat")) as f:
                    self._filter = self._wt.component.Component(self._engine, self._wt.wat2wasm(f.read()))
            except (OSError, self._wt.WasmtimeError) as exc:
                raise ModuleRunError(f"cannot load the outgoing-HTTP filter: {exc}") from exc
        return hosts

    def _component_run(self, store, module, http, run):
        """`run` of wasi:cli/run in a new instance of the component `module` in `store`; a run
        allowed `http` hosts only first gets its own instance of the filter (_wasihost/http_filter.wat)."""
        linker = self._component_linker(http)
        if isinstance(http, tuple):
            filter_ = self._component_linker(True).instantiate(store, self._filter)
            run._filter = (filter_.get_func(store, "authority"), filter_.get_func(store, "handle"))
        instance = linker.instantiate(store, module._wasm_module)
        return instance.get_func(store, instance.get_export_index(store, "run", instance.get_export_index(store, _CLI_RUN)))

    def _http_handle(self, store, request, options):
        """wasi:http's handle for a run allowed some hosts only: a request to another fails in the
        guest with HTTP-request-denied and a stderr line (as the native host does)."""
        run = self._local.run
        authority, handle = run._filter
        host = authority(store, request)
        authority.post_return(store)
        if host in run._http:
            response = handle(store, request, options)
            handle.post_return(store)
            return response
        run._writers[1].write(f"minikrust: outgoing HTTP request to {host} denied: not an allowed host\n".encode()
                              if host is not None else b"minikrust: outgoing HTTP request without a host denied\n")
        return self._wt.component.Variant("HTTP-request-denied")

    # -- runs and the epoch ticker --

    def _register(self, run):
        """Tick the epoch for `run` (by id(run), its epoch callback's data, until _unregister)."""
        with self._lock:
            self._runs[id(run)] = run
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._ticker.start()
            self._ticking.notify()
        self._set_epoch_callback(ctypes.cast(run._store.ptr(), ctypes.c_void_p), self._callback, id(run), None)

    def _unregister(self, run):
        with self._lock:
            self._runs.pop(id(run), None)

    def _tick(self):
        while True:
            with self._lock:
                self._ticking.wait_for(lambda: self._runs or self._closing)
                if not self._runs:
                    return
            self._engine.increment_epoch()
            time.sleep(_EPOCH_TICK)

    def _shutdown(self):
        """At exit, stop the runs then the ticker (one inside wasmtime at teardown aborts the process)."""
        with self._lock:
            self._closing = True
            runs = list(self._runs.values())
            self._ticking.notify()
        for run in runs:
            run.kill()
        if self._ticker is not None:
            self._ticker.join(timeout=1.0)

    def _on_epoch(self, _context, data, delta, _kind):
        run = self._runs.get(data)
        if run is not None:
            run._publish_memory()
            run._stop_reason = run._should_stop()
        if run is None or run._stop_reason is None:
            delta[0] = 1
            return None
        return ctypes.cast(self._wt._ffi.wasmtime_error_new(run._stop_reason.encode()), ctypes.c_void_p).value

    # -- poll_oneoff: clock-only polls sleep here, interruptibly; the rest goes to wasmtime's WASI --

    def _poll_oneoff(self, caller, subs_ptr, events_ptr, nsubs, nevents_ptr):
        run, memory = self._local.run, caller.get("memory")     # only a run's guest calls it
        clocks = isinstance(memory, self._wt.Memory) and _poll_clocks(
            memory, caller, subs_ptr, events_ptr, nsubs, nevents_ptr, run._wasi_start)
        if not clocks:      # not only clocks (a list of at least one), or no memory to read them in
            return self._original_poll(caller, run, memory)(caller, subs_ptr, events_ptr, nsubs, nevents_ptr)
        started = time.monotonic_ns()
        shortest = min(timeout for _, timeout in clocks)
        run._publish_memory()
        reason = run._sleep(shortest / 1e9)
        if reason:
            raise self._wt.Trap(reason)
        waited = max(time.monotonic_ns() - started, shortest)
        ready = [userdata for userdata, timeout in clocks if timeout <= waited]
        events = b"".join(userdata.to_bytes(8, "little") + bytes(24) for userdata in ready)  # type clock, errno 0
        memory.write(caller, events, events_ptr)
        memory.write(caller, len(ready).to_bytes(4, "little"), nevents_ptr)
        return 0

    def _original_poll(self, caller, run, memory):
        """wasmtime's poll_oneoff (found once a run), through a trampoline that sees the guest's memory."""
        wt = self._wt
        if run._poll_original is None:
            run._poll_original = self._wasi_linker.get(caller, _WASI, "poll_oneoff")
            if isinstance(memory, wt.Memory):
                with contextlib.suppress(wt.WasmtimeError, wt.Trap):
                    trampoline = wt.Instance(caller, self._poll_trampoline, [memory, run._poll_original])
                    run._poll_original = trampoline.exports(caller)["poll_oneoff"]
        return run._poll_original

    def __repr__(self):
        return f"<FallbackHost wasmtime {self.wasmtime_version} cache={self.cache_dir}>"


_HOSTS = {}
_HOSTS_LOCK = threading.Lock()


def _native_host(cache_dir):
    """The compiled `_wasihost.Host` (ImportError if missing); a source checkout's unbuilt `_wasihost/`
    first on sys.path would hide an installed wheel's: then the next one on sys.path is imported (logged)."""
    try:
        import _wasihost
    except ImportError as exc:
        found = importlib.util.find_spec("_wasihost") if exc.name != "_wasihost" else None
        if found is None or not found.origin:
            raise
        shadowed = os.path.dirname(found.origin)        # the unbuilt one, and the sys.path entry holding it
        entry = os.path.realpath(os.path.dirname(shadowed))
        spec = importlib.machinery.PathFinder.find_spec(
            "_wasihost", [path for path in sys.path if os.path.realpath(path or ".") != entry])
        if spec is None:
            raise
        log.warning("the _wasihost at %s is not built (%s); using the installed one at %s", shadowed, exc,
                    os.path.dirname(spec.origin))
        _wasihost = sys.modules["_wasihost"] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(_wasihost)
        except BaseException:
            del sys.modules["_wasihost"]
            raise
    return _wasihost.Host(cache_dir=cache_dir, check=_run_limits)


def load_host(cache_dir, backend=None):
    """The process's WASI host for `cache_dir`: native when it imports, else the wasmtime-py
    fallback; `backend` (or MINIKRUST_WASM_BACKEND) is "native", "wasmtime-py" or "auto"."""
    choice = backend or os.environ.get("MINIKRUST_WASM_BACKEND") or "auto"
    if choice not in ("auto", "native", "wasmtime-py"):
        raise ConfigError(f"MINIKRUST_WASM_BACKEND={choice!r}: want native, wasmtime-py or auto")
    key = (os.path.abspath(os.fspath(cache_dir)), choice)
    with _HOSTS_LOCK:
        host = _HOSTS.get(key)
        if host is not None:
            return host
        why = "MINIKRUST_WASM_BACKEND=wasmtime-py"
        if choice != "wasmtime-py":
            try:
                host = _native_host(key[0])
                why = f"_wasihost from {os.path.dirname(sys.modules['_wasihost'].__file__)}"
            except Exception as exc:  # not built, ABI mismatch (ImportError), or no engine
                if choice == "native":
                    raise ModuleError(f"native WASI host unavailable: {exc}") from exc
                why = f"native WASI host unavailable: {exc}"
        if host is None:
            host = FallbackHost(key[0])
        log.log(logging.DEBUG if _HOSTS else logging.INFO, "WASI host: %s, wasmtime %s (%s)", host.backend,
                host.wasmtime_version, why)
        _HOSTS[key] = host
        return host


@contextlib.contextmanager
def module_errors():
    """Turn the native host's errors into ModuleLoadError/ModuleRunError, message intact."""
    native = sys.modules.get("_wasihost")
    try:
        yield
    except getattr(native, "WasiHostError", ()) as exc:
        cls = ModuleLoadError if isinstance(exc, getattr(native, "LoadError", ())) else ModuleRunError
        raise cls(str(exc)) from exc


# --- Status: pod status computation, coalesced patches, events ---
# A pod's status as pure functions of its spec and container states (phase, conditions, QoS), and
# StatusWriter: per pod in order, newest status wins, only the difference patched, Events on the side.

_TERMINAL_PHASES = ("Succeeded", "Failed")


def qos_class(pod):
    """The pod's QoS class as the API server computes it (Guaranteed, Burstable or BestEffort)."""
    def amounts(container, kind):     # the cpu and memory amounts above zero: all the QoS class counts
        found = {}
        for name in ("cpu", "memory"):
            with contextlib.suppress(KeyError, TypeError, ContainerConfigError):
                found[name] = parse_quantity(((container.get("resources") or {}).get(kind) or {})[name])
        return {name: amount for name, amount in found.items() if amount > 0}
    spec = pod.get("spec") or {}
    pairs = [(amounts(c, "limits"), amounts(c, "requests"))
             for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])]
    if not any(limits or requests_ for limits, requests_ in pairs):
        return "BestEffort"
    guaranteed = all(n in limits and requests_.get(n, limits[n]) == limits[n]
                     for limits, requests_ in pairs for n in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


def _waiting_after_failure(status):
    """A container waiting to restart after it terminated (CrashLoopBackOff): counted as stopped."""
    return "waiting" in status.get("state", {}) and "terminated" in (status.get("lastState") or {})


def pod_phase(pod, init_statuses, statuses):
    """The phase the kubelet derives from container states (kubelet_pods.go getPhase): init
    containers first; then any waiting: Pending, any running: Running, all stopped: by policy."""
    policy = pod["spec"].get("restartPolicy", "Always")
    by_name = {s["name"]: s for s in init_statuses}
    for c in pod["spec"].get("initContainers") or []:
        s = by_name.get(c["name"], {})
        term = (s.get("state") or {}).get("terminated")
        if term and term.get("exitCode") == 0:
            continue
        failed = (term and term.get("exitCode") != 0) or (
            _waiting_after_failure(s) and s["lastState"]["terminated"].get("exitCode") != 0)
        return "Failed" if failed and policy == "Never" else "Pending"
    by_name, n = {s["name"]: s for s in statuses}, collections.Counter()
    for c in pod["spec"]["containers"]:
        s = by_name.get(c["name"]) or {}
        state = s.get("state") or {}
        if "terminated" in state:
            n["succeeded" if state["terminated"].get("exitCode") == 0 else "failed"] += 1
        else:       # running, waiting (after a failure: stopped, failed) or no state known yet
            n["failed" if _waiting_after_failure(s) else next(iter(state), "unknown")] += 1
    if n["waiting"] or n["unknown"] or not (n["running"] or n["succeeded"] or n["failed"]):
        return "Pending"
    if n["running"] or policy == "Always":
        return "Running"
    if not n["failed"]:
        return "Succeeded"
    return "Failed" if policy == "Never" else "Running"


def _condition(type_, ok, prev, now, reason=None, message=None):
    """One pod condition; keeps the previous lastTransitionTime while its status is unchanged."""
    status, old = "True" if ok else "False", prev.get(type_) or {}
    cond = {"type": type_, "status": status, "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"] if old.get("status") == status else now}
    cond.update({k: v for k, v in (("reason", reason), ("message", message)) if v})
    return cond


def pod_conditions(pod, phase, init_statuses, statuses, ready_to_start, prev_conditions=(), now=None):
    """The five pod conditions (status_manager/generate.go), in the order the kubelet writes them;
    Ready means every app container running (no probes), PodReadyToStartContainers the volumes."""
    now = now or _k8s_time()
    prev = {c["type"]: c for c in prev_conditions or ()}
    init_done = {s["name"] for s in init_statuses if s.get("ready")}
    init_pending = [c["name"] for c in pod["spec"].get("initContainers") or [] if c["name"] not in init_done]
    app_ready = {s["name"] for s in statuses if s.get("ready")}
    unready = [c["name"] for c in pod["spec"]["containers"] if c["name"] not in app_ready]
    initialized = phase == "Succeeded" or not init_pending
    ready = initialized and not unready and phase not in _TERMINAL_PHASES
    why_init = why_unready = (None, None)
    if phase == "Succeeded":
        why_unready = ("PodCompleted", None)
        why_init = why_unready if init_pending else why_init
    elif not initialized:
        why_init = why_unready = ("ContainersNotInitialized", f"containers with incomplete status: "
                                                              f"[{' '.join(init_pending)}]")
    elif not ready:
        why_unready = ("ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
    return [
        _condition("PodReadyToStartContainers", ready_to_start, prev, now),
        _condition("Initialized", initialized, prev, now, *why_init),
        _condition("Ready", ready, prev, now, *why_unready),     # the kubelet's order (recording extended/29)
        _condition("ContainersReady", ready, prev, now, *why_unready),
        _condition("PodScheduled", True, prev, prev.get("PodScheduled", {}).get("lastTransitionTime") or now),
    ]


def compute_pod_status(pod, init_statuses, statuses, *, host_ip, ready_to_start, start_time=None,
                       phase=None, reason=None, message=None, prev=None, now=None):
    """The status a kubelet reports for `pod` from its ContainerStatuses; `phase`, `reason`,
    `message` are pod-level outcomes (DeadlineExceeded, ...); a terminal phase in `prev` is kept."""
    prev = prev or {}
    if prev.get("phase") in _TERMINAL_PHASES:
        phase = prev["phase"]
    phase = phase or pod_phase(pod, init_statuses, statuses)
    status = {"phase": phase, "conditions": pod_conditions(pod, phase, init_statuses, statuses, ready_to_start,
                                                           prev.get("conditions"), now)}
    status.update({k: v for k, v in (("reason", reason), ("message", message), ("startTime", start_time))
                   if v})
    if host_ip:
        status.update(hostIP=host_ip, hostIPs=[{"ip": host_ip}], podIP=host_ip, podIPs=[{"ip": host_ip}])
    if init_statuses:
        status["initContainerStatuses"] = list(init_statuses)
    status.update(containerStatuses=list(statuses), qosClass=qos_class(pod))
    return status


def status_patch(old, new):
    """The JSON merge patch that turns `old` into `new` at the top level of status; lists are
    sent complete (contract lesson 12), removed fields as null. None when nothing changed."""
    old = old or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in ("reason", "message", "initContainerStatuses") if k in old and k not in new})
    return {"status": patch} if patch else None


def _pod_path(pod):
    meta = pod["metadata"]
    return f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta['name']}"


# A core/v1 Event about a pod (Pulling, Pulled, Created, Started, Killing, BackOff, Failed).
PodEvent = collections.namedtuple("PodEvent", "namespace pod_name pod_uid reason message type field_path",
                                  defaults=("Normal", None))


@dataclass(eq=False)
class _Queue:
    """The writes queued for one pod (by API path) or its Events (by uid), sent in order by one writer."""
    items: collections.deque = field(default_factory=collections.deque)    # requests or PodEvents, in order
    statuses: dict = field(default_factory=dict)    # uid -> (path, status, send uid): the newest only
    deletes: dict = field(default_factory=dict)     # uid -> path, sent after that uid's last status
    not_before: float = 0.0     # monotonic time before which it is not tried again

    def __bool__(self):
        return bool(self.items or self.statuses or self.deletes)


_WRITER_IDLE = 2.0      # seconds a writer thread (status, state files) waits for work before it ends
_EVENT_DELAY = 0.05     # seconds a pod's first queued Event waits (the ones after it join it)


_DROPPED = (403, 404, 409, 422)     # answers after which a write is not tried again (logged)


class StatusWriter:
    """The writer of pod statuses and Events: a few threads in parallel across pods, one at a time
    for any one pod. A pod's queue: mirror-pod requests, then the newest status of each uid (only
    the difference from the last acknowledged one, naming the uid: a recreated pod's 422 stops its
    writes), then its final delete. Events use at most half the writers; a repeated one raises its
    count. A failing API server keeps everything queued, retried with backoff."""

    def __init__(self, api, node_name, retry_max=10.0, writers=8):
        self.api, self.node_name = api, node_name
        self.retry_max, self.max_writers = retry_max, writers
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._pods = {}              # pod path -> _Queue, oldest first
        self._events = {}            # uid -> _Queue of PodEvents, oldest first
        self._busy = set()           # keys of the queues being written
        self._sent = {}              # uid -> status acknowledged by the server
        self._gone = set()           # uids the server refused: deleted and made again
        self._unanswered = set()     # uids whose final delete was sent but not answered
        self._event_names = {}       # uid -> {(reason, message, field): (name, count)}
        self._forgotten = collections.Counter()     # uid -> times forget() was called
        self._idle = []              # Conditions of writers waiting for work
        self._writers = self._event_writers = 0
        self._paused_until = self._delay = 0.0       # backoff of every write while the API fails
        self._stopping = False      # writers start with the first write, until stop()

    def stop(self, flush_timeout=2.0):
        """Try to send what is queued for up to flush_timeout seconds, then stop."""
        with self._lock:
            self._flushed.wait_for(lambda: not ((self._pods or self._events) and self._writers), flush_timeout)
            self._stopping = True
            for idle in self._idle:
                idle.notify()
            self._flushed.wait_for(lambda: not self._writers, 2.0)

    def forget(self, uid):
        """A pod gone from the API: drop what is queued or remembered for it."""
        with self._lock:
            self._forgotten[uid] += 1   # a write in flight must not be remembered as sent
            self._sent.pop(uid, None)
            self._event_names.pop(uid, None)
            for pending in self._pods.values():
                pending.statuses.pop(uid, None)

    def seed(self, uid, status):
        """What the server already has for a pod (from a list), so an equal status is not resent."""
        with self._lock:
            self._sent.setdefault(uid, status or {})

    def set_status(self, pod, status):
        uid, path = pod["metadata"]["uid"], _pod_path(pod)
        with self._lock:
            if uid not in self._gone:     # a static pod's patches name no uid: its mirror has another
                self._queue(self._pods, path).statuses[uid] = (f"{path}/status", status, not _is_static(pod))

    def record(self, event):
        """Queue an Event: a pod's Events wait _EVENT_DELAY, off the path of its start and statuses."""
        with self._lock:
            if event.pod_uid not in self._gone:
                self._queue(self._events, event.pod_uid, _EVENT_DELAY).items.append(event)

    def request(self, method, path, body=None, key=None):
        """Another write about a pod (mirror pods), before its statuses, under `key` (default `path`);
        a callable `body` is called at sending (raising keeps it queued)."""
        with self._lock:
            self._queue(self._pods, key or path).items.append((method, path, body))

    def delete_pod(self, pod):
        """Final delete (gracePeriodSeconds 0, uid precondition), after the pod's last status."""
        uid, path = pod["metadata"]["uid"], _pod_path(pod)
        with self._lock:
            if uid not in self._gone:
                self._queue(self._pods, path).deletes[uid] = path

    # -- the writers (threads); the lock is held where a name says so --

    def _queue(self, queues, key, delay=0.0):
        """With the lock: `key`'s queue; a new one (due in `delay` s) gets a writer, as queued ones have."""
        if key not in queues:
            queues[key] = _Queue(not_before=time.monotonic() + delay)
            if not self._stopping:
                self._kick()
        return queues[key]

    def _kick(self):
        if self._idle:
            self._idle.pop().notify()
        elif self._writers < self.max_writers:
            self._writers += 1
            threading.Thread(target=self._loop, name="minikrust-status", daemon=True).start()

    def _take(self, now):
        """With the lock: (key, queue, is_events) of the oldest queue ready to send, statuses first."""
        for events, queues in ((False, self._pods), (True, self._events)):
            if now < self._paused_until or (events and self._event_writers >= max(1, self.max_writers // 2)):
                break
            for key, pending in queues.items():
                if key not in self._busy and pending.not_before <= now:
                    return key, pending, events
        return None, None, False

    def _loop(self):
        me = threading.Condition(self._lock)
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                key, queue, events = self._take(now)
                if queue is None:   # wait for new work, a backoff's end, or end idle (busy queues: not ours)
                    due = [t for t in [q.not_before for k, q in (*self._pods.items(), *self._events.items())
                                       if k not in self._busy] + [self._paused_until] if t > now]
                    self._idle.append(me)
                    me.wait(min(min(due, default=now + _WRITER_IDLE) - now, _WRITER_IDLE))
                    if me in self._idle:
                        self._idle.remove(me)
                        if not (self._pods or self._events):
                            break       # idle: end; the next write starts a writer
                    continue
                self._busy.add(key)
                self._event_writers += events
                self._lock.release()
                try:
                    failed = self._write(queue)
                finally:
                    self._lock.acquire()
                self._busy.discard(key)
                self._event_writers -= events
                self._done(self._events if events else self._pods, key, queue, failed)
            self._writers -= 1
            self._flushed.notify_all()

    def _done(self, queues, key, queue, failed):
        """With the lock: requeue `queue` last if it still has writes, backing off after a failure."""
        now = time.monotonic()
        if failed is None:
            self._delay = 0.0
        elif isinstance(failed, ApiError) and (failed.code in _RETRY_STATUSES or failed.code == 0):
            self._delay = min(self.retry_max, max(0.2, self._delay * 2 or 0.5))
            self._paused_until = now + self._delay
            log.debug("status writes deferred %.1fs: %s", self._delay, failed)
        else:
            queue.not_before = now + self.retry_max / 4
            log.debug("writes of %s deferred: %s", key, failed)
        if queues.get(key) is queue:
            del queues[key]
            if queue:
                queues[key] = queue
        self._flushed.notify_all()

    def _write(self, queue):
        """Send a queue's requests or Events in order, then its newest statuses, then its final
        deletes; the exception that stopped it (the API unreachable or failing: kept queued)."""
        try:
            while True:
                with self._lock:
                    if queue.items:
                        kind, item = "item", queue.items[0]
                    elif queue.statuses:
                        kind, uid = "status", next(iter(queue.statuses))
                        path, status, with_uid = queue.statuses[uid]
                        old, generation = self._sent.get(uid), self._forgotten[uid]
                    elif queue.deletes:
                        kind, (uid, path) = "delete", next(iter(queue.deletes.items()))
                    else:
                        return None
                if kind == "item":
                    self._send_event(item) if isinstance(item, PodEvent) else self._send_request(*item)
                    with self._lock:
                        queue.items.popleft()
                elif kind == "status":
                    self._send_status(uid, path, status, with_uid, old, generation)
                    with self._lock:
                        if (queue.statuses.get(uid, (0, 0))[1] is status
                                and self._forgotten[uid] == generation):
                            del queue.statuses[uid]
                else:
                    self._send_delete(uid, path)
                    with self._lock:
                        queue.deletes.pop(uid, None)
                        self._sent.pop(uid, None)
        except Exception as exc:    # noqa: BLE001 - kept queued, retried after a backoff
            return exc

    def _send_status(self, uid, path, status, with_uid, old, generation):
        patch = status_patch(old, status)
        if patch is None or ((old or {}).get("phase") in _TERMINAL_PHASES
                             and status["phase"] not in _TERMINAL_PHASES):
            return      # nothing new, or (never) a pod out of a terminal phase (contract lesson 9)
        if with_uid:
            patch["metadata"] = {"uid": uid}
        try:
            self.api.patch(path, patch)
        except ApiError as exc:
            if exc.code == 422 and any(c.get("field") == "metadata.uid" for c in
                                       (exc.status.get("details") or {}).get("causes") or ()):
                log.info("status of %s not written: the pod was deleted and made again", path)
                return self._pod_gone(uid, path.rsplit("/", 1)[0])
            if exc.code not in _DROPPED:
                raise
            log.warning("status of %s not written: %s", path, exc)
        with self._lock:
            if self._forgotten[uid] == generation:
                self._sent[uid] = status

    def _pod_gone(self, uid, key):
        """The server refused the pod's uid: a pod of that name was deleted and made again."""
        self.forget(uid)
        with self._lock:
            self._gone.add(uid)
            self._pods.get(key, _Queue()).deletes.pop(uid, None)
            if uid in self._events and uid not in self._busy:
                del self._events[uid]

    def _send_request(self, method, path, body):
        try:
            self.api.request(method, path, body() if callable(body) else body)
        except ApiError as exc:
            if exc.code not in _DROPPED:
                raise
            log.debug("%s %s: %s", method, path, exc)

    def _send_delete(self, uid, path):
        """Sent once: after a try that got no answer (it may have been applied), a GET tells whether
        the pod is gone before another is sent (soak finding: a second delete got 404)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid}}
        try:
            if uid in self._unanswered and self.api.get(path)["metadata"].get("uid") != uid:
                raise ApiError(404, "NotFound", "deleted by the unanswered try")
            self.api.delete(path, body, retries=0)
        except ApiError as exc:
            if exc.code == 0:
                self._unanswered.add(uid)
            if exc.code not in (403, 404, 409):
                raise
            log.info("final delete of %s: %s", path, exc)
        self._unanswered.discard(uid)

    def _send_event(self, ev):
        """Create the Event, or raise the count of the one made for the same reason, message and container."""
        key = (ev.reason, ev.message, ev.field_path)
        with self._lock:
            if ev.pod_uid in self._gone:
                return
            name, count = self._event_names.get(ev.pod_uid, {}).get(key, (None, 0))
        base = f"/api/v1/namespaces/{ev.namespace}/events"
        if name is not None:
            try:
                self.api.patch(f"{base}/{name}", {"count": count + 1, "lastTimestamp": _k8s_time()})
                return self._name_event(ev.pod_uid, key, name, count + 1)
            except ApiError as exc:
                if exc.code != 404:
                    raise       # else the event expired: create it again
        involved = {"kind": "Pod", "namespace": ev.namespace, "name": ev.pod_name, "uid": ev.pod_uid,
                    "apiVersion": "v1", **({"fieldPath": ev.field_path} if ev.field_path else {})}
        body = _event(self.node_name, involved, ev.reason, ev.message, ev.type)
        try:
            self.api.post(base, body)
        except ApiError as exc:
            if exc.code not in _DROPPED:
                raise
            return log.debug("event %s not recorded: %s", ev.reason, exc)
        self._name_event(ev.pod_uid, key, body["metadata"]["name"], 1)

    def _name_event(self, uid, key, name, count):
        with self._lock:
            if uid not in self._gone:
                self._event_names.setdefault(uid, {})[key] = (name, count)


# --- Pods: one worker and state machine per pod ---
# A PodWorker per pod moves one PodState forward (image, volumes, runs, restarts, termination);
# PodManager admits pods, keeps workers and their state on disk, and answers the server.

_BACKOFF_RESET = 600.0          # seconds of good running that forgive a container's past crashes
_CONFIG_RETRY = 2.0             # seconds between tries of a pod whose configMap/secret is missing
_TERMINATION_MESSAGE_MAX = 4096
_KILLED_EXIT = 137
_SYNC_THREADS = 2               # the pool that syncs pods, however many there are (threads: issue 10)


def _memory_limit(container):
    """resources.limits.memory in bytes (the module's memory limit), or None."""
    value = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return int(parse_quantity(value)) if value is not None else None     # ContainerConfigError if invalid


def _termination_reason(result, memory_limit):
    """(exitCode, reason, message) of a finished run, as a container runtime reports them."""
    if _is_oom(result, memory_limit):
        return _KILLED_EXIT, "OOMKilled", "memory limit reached"
    if result.timed_out:
        return _KILLED_EXIT, "DeadlineExceeded", None
    if result.killed:
        return _KILLED_EXIT, "Error", None
    if result.exit_code is None:
        return 134, "Error", f"wasm trap: {result.trap}"
    return result.exit_code, ("Completed" if result.exit_code == 0 else "Error"), None


def _log_tail(path, max_lines=80, max_bytes=2048):
    """The last lines of a CRI log file, content only (FallbackToLogsOnError)."""
    try:
        lines = _read_beneath(*os.path.split(path), 64 * 1024, tail=True).decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    content = [line.split(" ", 3)[3] if line.count(" ") >= 3 else line for line in lines[-max_lines:]]
    return "\n".join(content)[-max_bytes:]


def _base_dir(pod):
    """The folder of a static pod's manifest (its relative file: images start there), else None."""
    manifest = _annotations(pod).get(_MANIFEST_ANNOTATION)
    return os.path.dirname(manifest) if manifest else None


class _StateFiles:
    """The pods' state files, no pod waiting on the disk: save() writes `<file>.new` (not synced);
    a thread makes it durable (fsync, rename over `<file>`) and removes a finished pod's folder
    after its last save; _read_saved() prefers `.new`. A full disk keeps the last file, logged."""

    def __init__(self):
        self._lock = threading.Condition()
        self._pending = collections.OrderedDict()   # a path (its `.new` to sync) or (pod dir, volumes only)
        self._thread = None
        self._writing = False       # the thread is at work on one taken from _pending

    def save(self, root, path, doc):
        """Keep `doc` as the file `path` beneath `root` (its folders made where missing)."""
        try:
            with self._lock:    # no rename of a `.new` between its fsync and its rename
                _write_beneath(root, path + ".new", json.dumps(doc).encode(), sync=False)
                self._queue(os.path.join(root, path))
        except OSError as exc:
            log.warning("cannot keep %s: %s", path, exc.strerror or exc)

    def remove(self, pod_dir, volumes_only=False):
        """Remove a finished pod's volumes (cleanup_volumes) and, unless `volumes_only`, its folder."""
        with self._lock:
            self._queue((pod_dir, volumes_only))

    def _queue(self, key):
        self._pending[key] = None
        self._lock.notify_all()     # the thread waiting for work, if it is
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minikrust-save", daemon=True)
            self._thread.start()

    def flush(self, timeout=None):
        """Wait until every saved file is durable; True if they are."""
        with self._lock:
            return self._lock.wait_for(lambda: not (self._pending or self._writing), timeout)

    def _loop(self):
        while True:
            with self._lock:
                self._writing = False
                self._lock.notify_all()
                if not self._pending:       # idle a while (no thread started per save), then end
                    self._lock.wait(_WRITER_IDLE)
                if not self._pending:
                    self._thread = None
                    return
                path, _ = self._pending.popitem(last=False)
                self._writing = True
            if isinstance(path, tuple):
                with contextlib.suppress(OSError):
                    cleanup_volumes(path[0])
                    if not path[1]:
                        _remove_beneath(*os.path.split(path[0]))
                continue
            head, name = os.path.split(path)
            try:
                with _dir_beneath(head) as folder, open(open_beneath(folder, f"{name}.new"), "rb") as new:
                    os.fsync(new.fileno())
                    with self._lock:    # a newer `.new` (saved meanwhile) waits for its own fsync
                        newest = os.stat(f"{name}.new", dir_fd=folder, follow_symlinks=False)
                        if newest.st_ino == os.fstat(new.fileno()).st_ino:
                            os.replace(f"{name}.new", name, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError as exc:
                if exc.errno != errno.ENOENT:       # else the pod's folder, or its `.new`, is gone
                    log.warning("cannot keep %s: %s", path, exc.strerror or exc)


def _read_saved(root, path, valid=lambda doc: True):
    """A state file kept by _StateFiles: its newest version (`<path>.new` when there is one)."""
    doc = _read_state(root, path + ".new", valid)
    return doc if doc is not None else _read_state(root, path, valid)


class _Container:
    """What the worker knows of one container: its API status fields and its current run."""

    def __init__(self, spec, init, waiting_reason):
        self.spec, self.init, self.name = spec, init, spec["name"]
        self.field_path = f"spec.{'initContainers' if init else 'containers'}{{{self.name}}}"  # in its Events
        self.state = {"waiting": {"reason": waiting_reason}}
        self.last_state = {}
        self.restart_count = 0
        self.image_id = self.container_id = ""
        self.run = None
        self.started_mono = 0.0
        self.backoff = 0.0          # delay before the next restart; 0 = restart at once
        self.not_before = 0.0       # monotonic time before which it must not start
        self.mounts = []
        self.log_path = None    # the CRI log file the WASI host writes (and rotates)
        self.result = None                  # the last run's Result
        self.digest = None                  # the module's sha256 (image GC keeps it while it runs)
        self.wall_start = 0.0
        self.ever_started = False

    @property
    def terminated(self):
        return self.state.get("terminated")

    def succeeded(self):
        return bool(self.terminated) and self.terminated.get("exitCode") == 0

    def restore(self, saved):
        """Take over what a previous kubelet reported: counts, states; a run it lost is an exit."""
        self.restart_count = saved.get("restartCount", 0)
        self.last_state = saved.get("lastState") or {}
        self.image_id, self.container_id = saved.get("imageID", ""), saved.get("containerID", "")
        state = saved.get("state") or {}
        if "running" in state:
            self.last_state = {"terminated": {
                "exitCode": _KILLED_EXIT, "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the kubelet restarted",
                "startedAt": state["running"].get("startedAt"), "finishedAt": _k8s_time(),
                "containerID": self.container_id}}
        if "terminated" in state or self.last_state:    # it ran before: a next run is a restart
            self.state = state if "terminated" in state else {"waiting": {"reason": "ContainerCreating"}}
            self.ever_started = True

    def ended(self, now, config, code, reason, message=None):
        """The run ended (or did not start); the time it may restart, by the kubelet's back-off: at once,
        then backoff_base doubling up to backoff_max; a run of _BACKOFF_RESET seconds forgives the past."""
        finished = _k8s_time()
        started = self.state.get("running", {}).get("startedAt", finished)
        self.state = {"terminated": {"exitCode": code, "reason": reason, "startedAt": started,
                                     "finishedAt": finished, "containerID": self.container_id}}
        if message:
            self.state["terminated"]["message"] = message
        if now - self.started_mono >= _BACKOFF_RESET:
            self.backoff = 0.0
        self.not_before = now + self.backoff
        self.backoff = min(config.backoff_max, self.backoff * 2 if self.backoff else config.backoff_base)
        return self.not_before

    def status(self):
        ready = self.succeeded() if self.init else "running" in self.state
        status = {"name": self.name, "state": self.state, "lastState": self.last_state, "ready": ready,
                  "restartCount": self.restart_count, "image": self.spec.get("image", ""),
                  "imageID": self.image_id, "started": "running" in self.state}
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class PodState(enum.Enum):
    """A pod's life on this node, as the kubelet's pod workers (pod_workers.go) see it: it only
    moves forward, through _NEXT_STATES, in PodWorker._advance."""
    SYNCING = "syncing"             # admitted: volumes, images, containers started and restarted
    TERMINATING = "terminating"     # stopping: its modules are killed at kill_at, their ends awaited
    TERMINATED = "terminated"       # a terminal phase (Succeeded/Failed); volumes removed, nothing runs
    FINALIZED = "finalized"         # deleted from the API, or forgotten: never admitted again


_NEXT_STATES = {PodState.SYNCING: {PodState.TERMINATING}, PodState.TERMINATING: {PodState.TERMINATED},
                PodState.TERMINATED: {PodState.FINALIZED}, PodState.FINALIZED: set()}


@dataclass(frozen=True)
class PodServices:
    """All a PodWorker uses of the kubelet: each field a value or a callable."""
    config: "Config"
    node_ip: str
    host: collections.abc.Callable             # () -> the WASI host
    ensure_image: collections.abc.Callable     # (pod, container) -> module ref; Pulling/Pulled events
    prepare_volumes: collections.abc.Callable  # (pod, pod_dir) -> {volume name: host dir}
    container_env: collections.abc.Callable    # (pod, container spec) -> [(name, value)]
    record_event: collections.abc.Callable     # (pod, reason, message, type, container=None)
    send_status: collections.abc.Callable      # (worker, old phase): its status changed
    run_started: collections.abc.Callable      # (worker, container, run or None, began): watch it, count it
    finalized: collections.abc.Callable        # (worker): it reached FINALIZED
    files: "_StateFiles"                       # the pod folders' state files and removal


class PodWorker:
    """One pod's state machine. `sync()` takes it as far as it can go now (on the PodDriver's pool,
    one sync of a pod at a time) and says when to look again; updates, deletions and the ends of
    runs come from other threads and are only recorded, then the driver syncs the pod (its states:
    PodState). Every failure is a reason on the pod, never an exception out of sync()."""

    def __init__(self, services, pod, saved=None, rejected=None):
        self.s, self.pod, self.uid, self.key = services, pod, pod["metadata"]["uid"], _pod_key(pod)
        self.dir = os.path.join(services.config.root_dir, "pods", self.uid)
        self.rejected = rejected                        # (reason, message) of a pod not admitted
        spec = pod["spec"]
        self.inits = [_Container(c, True, "PodInitializing") for c in spec.get("initContainers") or []]
        self.apps = [_Container(c, False, "PodInitializing" if self.inits else "ContainerCreating")
                     for c in spec["containers"]]
        self.state = PodState.SYNCING
        self.outcome = (None, None, None)   # (phase, reason, message); phase None: from the containers
        self.delete_at = None               # once it is to stop: the monotonic time its modules are killed
        self.silent = False                 # it is gone from its source: nothing more is written for it
        self.kill_at = None                 # monotonic time its modules are killed (TERMINATING)
        self.status = self.volume_dirs = self.start_time = self.deadline = None
        self._prepared_at = 0.0             # monotonic time volumes were last (re)written
        self._fetching = False              # its volumes wait for a token, configMap or secret being read
        self._exits = []                    # (container, run, result) not yet taken in
        self._killed = False
        self._lock = threading.Lock()
        self.echoed = set()                 # container notes already printed (standalone)
        if saved:
            self._restore(*saved)

    def _restore(self, state, status):
        """Carry on from what a previous kubelet saved (or from the API's status)."""
        self.start_time = status.get("startTime")
        dirs = _read_saved(self.dir, "volumes.json")   # volumes a previous kubelet prepared
        if dirs and all(isinstance(d, str) and os.path.isdir(d) for d in dirs.values()):
            self.volume_dirs, self._prepared_at = dirs, time.monotonic()
        by_name = {s["name"]: s for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])}
        for c in self.inits + self.apps:
            if c.name in by_name:
                c.restore(by_name[c.name])
            if self._policy() == "Never" and c.ever_started and "waiting" in c.state and c.last_state.get("terminated"):
                c.state, c.last_state = c.last_state, {}    # a run lost with the last kubelet is not run again
        if state is PodState.TERMINATED or status.get("phase") in _TERMINAL_PHASES:
            self.state = PodState.TERMINATED
            self.outcome = (status["phase"], status.get("reason"), status.get("message"))
        self.status = status

    # -- inputs, from any thread: recorded here, acted on by the next sync --

    def update(self, pod):
        with self._lock:
            self.pod = pod
            if pod["metadata"].get("deletionTimestamp") and self.delete_at is None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                self.delete_at = time.monotonic() + max(0, grace)

    def remove(self, grace=0):
        """The pod is gone from its source: stop its modules after `grace` seconds, no API writes."""
        with self._lock:
            self.silent = True      # before delete_at: a sync that sees it deleted sees it silent
            if self.delete_at is None:
                self.delete_at = time.monotonic() + max(0, grace)

    def exited(self, container, run, result):
        """A run ended: `result` is its Result, or the exception its end raised."""
        with self._lock:
            self._exits.append((container, run, result))

    # -- the state machine --

    def sync(self):
        """Move the pod forward; the monotonic time to sync it again, or None (on the next event)."""
        now, wake, self._fetching = time.monotonic(), None, False
        self._collect_exits(now)
        try:
            if self.state is PodState.SYNCING:
                wake = self._run_containers(now)
            if self.state is PodState.TERMINATING:
                wake = self._stop_containers(now)
        except Exception as exc:    # a bug must not take the kubelet down: fail this pod only
            log.exception("pod %s: internal error", self.key)
            if self.state is PodState.SYNCING:
                self._terminate("Failed", "InternalError", f"minikrust: {exc}")
            wake = time.monotonic() + _CONFIG_RETRY
        if self.state is PodState.TERMINATED and self.delete_at is not None:
            self._advance(PodState.FINALIZED)
        elif not self._fetching:    # a status "waiting for volumes" waits for the fetch instead (a moment)
            self._publish()
        return wake

    def _advance(self, state):
        """The one place the pod's state changes, with what entering each state does."""
        if state not in _NEXT_STATES[self.state]:
            raise MinikrustError(f"pod {self.key}: no way from {self.state.value} to {state.value}")
        self.state = state
        if state is PodState.TERMINATING and not self.silent:
            for c in self.inits + self.apps:    # the Killing events, once (as the kubelet does)
                if c.run is not None:
                    self.s.record_event(self.pod, "Killing", f"Stopping container {c.name}", "Normal", c)
        elif state is PodState.TERMINATED:
            self._decide_phase()
        elif state is PodState.FINALIZED:
            self._publish()             # the final status goes out before the final delete
            self.s.finalized(self)

    def _terminate(self, phase, reason=None, message=None):
        """Stop the pod: killing its modules at once, or at the end of a deletion's grace period."""
        self.outcome = (phase, reason, message)
        self.kill_at = self.delete_at if phase is None and self.delete_at is not None else time.monotonic()
        self._advance(PodState.TERMINATING)

    def _run_containers(self, now):
        spec = self.pod["spec"]
        if self.delete_at is not None:
            return self._terminate(None)
        if self.rejected:
            return self._terminate("Failed", *self.rejected)
        if self.start_time is None:
            self.start_time = _k8s_time()
        if spec.get("activeDeadlineSeconds") is not None:     # may be updated: read each time
            self.deadline = now + _parse_rfc3339(self.start_time) / 1e9 + spec["activeDeadlineSeconds"] - time.time()
        if self.deadline is not None and now >= self.deadline:
            why = "Pod was active on the node longer than the specified deadline"
            return self._terminate("Failed", "DeadlineExceeded", why)
        if self.volume_dirs is None and not self._prepare():
            return self._until(now + _CONFIG_RETRY)
        for c in self.inits:
            if c.succeeded():
                continue
            if c.run is not None:
                return self._until(None)
            if c.terminated and self._policy() == "Never":
                return self._terminate("Failed")
            return self._until(self._maybe_start(c, now))
        wakes = [self._maybe_start(c, now) for c in self.apps if c.run is None and self._wants_run(c)]
        if self.state is not PodState.SYNCING:     # a container's config failed the pod
            return None
        if all(c.run is None and not self._wants_run(c) for c in self.apps):
            return self._terminate(None)
        return self._until(min((w for w in wakes if w), default=None))

    def _stop_containers(self, now):
        running = [c for c in self.inits + self.apps if c.run is not None]
        if not running:
            return self._advance(PodState.TERMINATED)
        if now < self.kill_at:
            return self.kill_at
        if not self._killed:
            self._killed = True
            for c in running:
                log.info("pod %s: killing %s", self.key, c.name)
                c.run.kill()
        return None                 # their ends come as events

    def _decide_phase(self):
        """The terminal phase: Failed/Succeeded from the containers unless the outcome says."""
        phase, reason, message = self.outcome
        if phase is None:
            derived = pod_phase(self.pod, [c.status() for c in self.inits], [c.status() for c in self.apps])
            phase = derived if derived in _TERMINAL_PHASES else "Failed"
            if self.delete_at is not None and phase == "Failed" and all(c.succeeded() for c in self.apps):
                phase = "Succeeded"
        self.outcome = (phase, reason, message)
        for c in self.apps + self.inits:
            if c.state.get("waiting", {}).get("reason") == "CrashLoopBackOff" and c.last_state.get("terminated"):
                c.state, c.last_state = c.last_state, {}
        self.s.files.remove(self.dir, volumes_only=True)     # after the status is saved, off the sync pool
        log.info("pod %s %s%s", self.key, phase, f" ({reason}: {message})" if reason else "")

    def _policy(self):
        return self.pod["spec"].get("restartPolicy", "Always")

    def _until(self, when):
        """`when` or the active deadline, whichever comes first (None: neither)."""
        return min((t for t in (when, self.deadline) if t is not None), default=None)

    def _wants_run(self, c):
        """Whether an app container that is not running should be (re)started."""
        if not c.ever_started or not c.terminated:
            return True         # never run, or waiting to restart (back-off, lost run, config error)
        return self._policy() == "Always" or (self._policy() == "OnFailure" and c.terminated.get("exitCode") != 0)

    def _collect_exits(self, now):
        with self._lock:
            exits, self._exits = self._exits, []
        for c, run, result in exits:
            if c.run is not run:
                continue
            c.run = None
            if isinstance(result, Exception):   # the host could not run it after all
                self._start_failed(c, now, result)
                continue
            c.result = result
            code, reason, message = _termination_reason(result, _memory_limit(c.spec))
            message = self._termination_message(c, code) or message
            c.ended(now, self.s.config, code, reason, message)
            if result.instantiate_failed:     # it never started (a trap linking it, its memory over the limit)
                self.s.record_event(self.pod, "Failed", f"Error: module cannot start: {message or reason}", "Warning", c)
            log.info("pod %s container %s exited: %s (%s)", self.key, c.name, code, reason)

    def _termination_message(self, c, exit_code):
        path = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        text = (read_guest_file(c.mounts, path, _TERMINATION_MESSAGE_MAX) or b"").decode("utf-8", "replace")
        if not text and exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            text = _log_tail(c.log_path) if c.log_path else ""
        return text

    def _config_error(self, exc, containers, container=None):
        """A configMap, secret or volume not usable: the containers wait (an Event); `retry` False fails the pod."""
        for c in containers:
            if "waiting" in c.state or c is container:
                c.state = {"waiting": {"reason": exc.reason, "message": exc.message}}
        self.s.record_event(self.pod, "Failed", f"Error: {exc.message}", "Warning", container)
        if not exc.retry:
            self._terminate("Failed", exc.reason, exc.message)

    def _prepare(self):
        """Volumes ready (the kubelet's sandbox); False when the pod must wait or has failed."""
        try:
            os.close(_makedirs_beneath(self.s.config.root_dir, f"pods/{self.uid}"))
            self.volume_dirs = self.s.prepare_volumes(self.pod, self.dir)
            self._prepared_at = time.monotonic()
            self.s.files.save(self.dir, "volumes.json", self.volume_dirs)
            return True
        except (ContainerConfigError, OSError) as exc:
            if isinstance(exc, _Fetching):      # synced again once it is in
                self._fetching = self.volume_dirs is None
                return False
            if isinstance(exc, OSError):    # a full disk: wait for room, as the kubelet retries a failed mount
                exc = ContainerConfigError(f"cannot write the pod's volumes: {exc.strerror or exc}", retry=True)
            if exc.retry and self.volume_dirs is not None:     # the API is away: keep what was written
                log.warning("pod %s: volumes not refreshed, using their last contents: %s", self.key, exc.message)
                return True
            self._config_error(exc, self.inits + self.apps)
            return False

    def _maybe_start(self, c, now):
        """Start `c` unless it is backing off; the monotonic time to try again, or None."""
        if now >= c.not_before:
            return self._start(c, now)
        if c.terminated:        # it just exited: show the back-off until it may restart
            pod = f"{self.pod['metadata']['name']}_{_namespace(self.pod)}({self.uid})"
            c.last_state = {"terminated": c.terminated}
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message":
                       f"back-off {c.not_before - now:.0f}s restarting failed container={c.name} pod={pod}"}}
            self.s.record_event(self.pod, "BackOff", f"Back-off restarting failed container {c.name} in pod {pod}",
                                "Warning", c)
        return c.not_before

    def _start(self, c, now):
        """Start a run of `c`; the monotonic time to try again, or None when it runs."""
        if self.state is not PodState.SYNCING:     # failed by another container meanwhile
            return None
        ref = self._image(c)
        if ref is None:
            return now + _CONFIG_RETRY
        try:
            if now - self._prepared_at > 1.0 and not self._prepare():     # refresh configMaps, secrets
                return now + _CONFIG_RETRY
            env = self.s.container_env(self.pod, c.spec)
            argv = container_argv(c.spec, env)
            c.mounts = container_mounts(self.pod, c.spec, self.volume_dirs, env, pod_dir=self.dir)
            memory_limit = _memory_limit(c.spec)
        except ContainerConfigError as exc:
            if not isinstance(exc, _Fetching):      # else synced again once it is in
                self._config_error(exc, [c], c)
            return now + _CONFIG_RETRY
        if c.ever_started:
            prior = c.terminated or c.last_state.get("terminated")
            if prior:
                c.last_state = {"terminated": prior}
            c.restart_count += 1
        c.ever_started, c.image_id, c.digest = True, ref.image_id, ref.digest
        c.container_id = f"wasm://{uuid.uuid4().hex}"
        config, log_name = self.s.config, f"{c.restart_count}.log"
        c.log_path = os.path.join(self.dir, "logs", c.name, log_name)
        c.started_mono = time.monotonic()
        c.state = {"running": {"startedAt": _k8s_time()}}
        if self._policy() != "Always":      # a run that may not be repeated is on disk before it starts (soak finding)
            self._publish(save_only=True)
        logs = -1
        try:
            logs = _makedirs_beneath(config.root_dir, f"pods/{self.uid}/logs/{c.name}")   # the hosts write beneath it
            os.close(open_beneath(logs, log_name, os.O_WRONLY | os.O_CREAT, 0o644))  # there as soon as the server is asked
            with module_errors():
                module = self.s.host().load(ref.held(), digest=ref.digest)
                # the host writes both streams to the log and rotates it (--container-log-max-size/-files)
                run = module.start(argv, env=env, preopens=c.mounts, stdout=log_name, stderr=log_name,
                                   log_dir_fd=logs, log_format="cri", memory_limit=memory_limit,
                                   outgoing_http=_outgoing_http(module, self.pod),
                                   log_max_size=config.container_log_max_size or None,
                                   log_max_files=config.container_log_max_files)
        except (ModuleError, OSError) as exc:     # invalid wasm, no _start, a preopen gone: as an exit
            self.s.run_started(self, c, None, now)
            return self._start_failed(c, now, exc)
        finally:
            if logs >= 0:
                os.close(logs)
        c.run, c.wall_start = run, time.time()
        self.s.record_event(self.pod, "Created", f"Created container: {c.name}", "Normal", c)
        self.s.record_event(self.pod, "Started", f"Started container {c.name}", "Normal", c)
        self.s.run_started(self, c, run, now)
        log.info("pod %s container %s started%s", self.key, c.name, f" (restart {c.restart_count})" if c.restart_count else "")
        return None

    def _image(self, c):
        """The module of `c`'s image, or None (waiting, with the kubelet's reason and Events)."""
        try:
            return self.s.ensure_image(self.pod, c)
        except ImageError as exc:
            c.state = {"waiting": {"reason": exc.reason, "message": exc.message}}
            if exc.reason == "ImagePullBackOff":
                self.s.record_event(self.pod, "BackOff", exc.message, "Normal", c)
            else:
                self.s.record_event(self.pod, "Failed", exc.message, "Warning", c)
                self.s.record_event(self.pod, "Failed", f"Error: {exc.reason}", "Warning", c)
            return None

    def _start_failed(self, c, now, exc):
        self.s.record_event(self.pod, "Failed", f"Error: {exc}", "Warning", c)
        log.warning("pod %s container %s cannot start: %s", self.key, c.name, exc)
        return c.ended(now, self.s.config, 128, "StartError", str(exc))

    def _publish(self, save_only=False):
        """Compute the status; when it changed, save it with the state and hand it on (`save_only`:
        only save it, before a module runs: a kubelet killed meanwhile finds the run started)."""
        done = self.state in (PodState.TERMINATED, PodState.FINALIZED)
        phase, reason, message = self.outcome if done else (None, None, None)
        status = compute_pod_status(
            self.pod, [c.status() for c in self.inits], [c.status() for c in self.apps],
            host_ip=self.s.node_ip, ready_to_start=self.volume_dirs is not None and not done,
            start_time=self.start_time, phase=phase, reason=reason, message=message, prev=self.status)
        if status == self.status:
            return
        if not save_only:       # handed on first: the file is not durable before its thread syncs it anyway
            old_phase, self.status = (self.status or {}).get("phase"), status
            self.s.send_status(self, old_phase)
        if not self.silent and self.state is not PodState.FINALIZED:
            self.s.files.save(self.s.config.root_dir, f"pods/{self.uid}/status.json",
                              {"state": self.state.value, "status": status})


class _LogEcho:
    """Standalone terminal output: follows the CRI log files of running containers and prints
    each line's content after a `pod/container` prefix; and the pods' phases, exits and waits."""

    def __init__(self, write):
        self._write = write
        self._files = {}            # path -> (prefix, _LogCursor)
        self._lock = threading.RLock()      # one whole line at a time, whichever thread writes
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="minikrust-echo", daemon=True).start()

    def follow(self, prefix, path):
        with self._lock:
            self._files.setdefault(path, (prefix, _LogCursor(path)))

    def drain(self):
        """Print whatever the followed files gained since the last look, across rotations."""
        with self._lock:
            for prefix, cursor in list(self._files.values()):
                for record in cursor.records():
                    parts = record.rstrip(b"\n").split(b" ", 3)
                    if len(parts) == 4:  # a partial (P) record too: it may be the last
                        self._write(f"{prefix} {parts[3].decode('utf-8', 'replace')}")

    def pod_changed(self, worker, old_phase):
        """A line when the pod's phase changes, or a container exits or waits for a reason worth knowing."""
        name, status = worker.pod["metadata"]["name"], worker.status
        with self._lock:
            if status["phase"] != old_phase:
                if status["phase"] in _TERMINAL_PHASES:
                    self.drain()       # the last output lines before the pod's end
                reason = f" ({status['reason']})" if status.get("reason") else ""
                self._write(f"{name}: {status['phase']}{reason}")
            for cs in (status.get("initContainerStatuses") or []) + status["containerStatuses"]:
                ended, waiting = cs["state"].get("terminated"), cs["state"].get("waiting") or {}
                if ended:
                    note = f"exited {ended.get('exitCode')} ({ended.get('reason')})"
                elif waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                    note = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
                else:
                    continue
                if (cs["name"], cs.get("restartCount"), note) not in worker.echoed:
                    worker.echoed.add((cs["name"], cs.get("restartCount"), note))
                    self.drain()       # the output that led to it comes first
                    self._write(f"{name}/{cs['name']}: {note}")

    def _loop(self):
        while not self._stop.wait(0.2):
            self.drain()

    def stop(self):
        self._stop.set()
        self.drain()


class PodDriver:
    """Drives the pod workers with a fixed number of threads: one waits for the ends of runs (their
    fds, one selector) and timers; a pool of _SYNC_THREADS syncs pods, one sync of a pod at a time,
    the ends of runs first."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._wake = _DoneFd()           # written to wake the loop (a new timer, stop)
        self._selector.register(self._wake.read_fd, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._timers = []                # heap of (monotonic time, seq, worker)
        self._next_wake = {}             # worker -> the earliest of its timers
        self._seq = itertools.count()
        self._busy = {}                  # worker -> "queued" | "syncing" | "again"
        self._queue = queue.PriorityQueue()  # (0: a run ended, 1: else, 2: stop; seq, worker)
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name="minikrust-pods", daemon=True)] + [
            threading.Thread(target=self._sync_loop, name=f"minikrust-sync-{i}", daemon=True) for i in range(_SYNC_THREADS)]
        for thread in self._threads:
            thread.start()

    def schedule(self, worker, first=False):
        """Sync `worker` soon (again after the sync under way, if there is one); `first`: before
        the others queued (queued already, it is queued again: the later turn finds it done)."""
        with self._lock:
            busy = self._busy.get(worker)
            if self._stopping or busy == "again" or (busy == "queued" and not first):
                return
            self._busy[worker] = "again" if busy == "syncing" else "queued"
        if busy != "syncing":
            self._queue.put((0 if first else 1, next(self._seq), worker))

    def watch(self, worker, container, run):
        """Hand the end of `run` to `worker` and sync it, when the run is over."""
        self._selector.register(run, selectors.EVENT_READ, (worker, container))

    def _sync_loop(self):
        while (worker := self._queue.get()[2]) is not None:
            with self._lock:
                if self._busy.get(worker) != "queued":
                    continue        # its other turn synced it
                self._busy[worker] = "syncing"
            while True:
                try:
                    wake = worker.sync()
                except Exception:       # sync() keeps a pod's failures to the pod; this is a bug
                    log.exception("pod %s: sync failed", worker.key)
                    wake = time.monotonic() + _CONFIG_RETRY
                with self._lock:
                    if wake is not None and wake < self._next_wake.get(worker, math.inf):
                        self._next_wake[worker] = wake
                        heapq.heappush(self._timers, (wake, next(self._seq), worker))
                        self._wake.post()
                    if self._busy[worker] != "again":
                        del self._busy[worker]
                        break
                    self._busy[worker] = "syncing"

    def _loop(self):
        while not self._stopping:
            with self._lock:
                now, due = time.monotonic(), []
                while self._timers and self._timers[0][0] <= now:
                    when, _, worker = heapq.heappop(self._timers)
                    if self._next_wake.get(worker) == when:
                        del self._next_wake[worker]
                        due.append(worker)
                timeout = self._timers[0][0] - now if self._timers else None
            for worker in due:
                self.schedule(worker)
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._wake.clear()
                    continue
                self._selector.unregister(key.fileobj)
                try:
                    result = key.fileobj.wait(0)
                except Exception as exc:        # the host could not run it (an output, WASI setup)
                    result = exc
                key.data[0].exited(key.data[1], key.fileobj, result)
                self.schedule(key.data[0], first=True)
            key = result = None     # the last run seen ended is not kept (its fd open) until the next event (soak finding)

    def stop(self, workers):
        """Kubelet shutdown: no more syncs; the modules of `workers` killed and reaped."""
        with self._lock:
            self._stopping = True
        self._wake.post()
        for _ in range(_SYNC_THREADS):
            self._queue.put((2, next(self._seq), None))
        for thread in self._threads:
            thread.join(5.0)
        runs = [c.run for w in workers for c in w.inits + w.apps if c.run is not None]
        for run in runs:
            run.kill()
        for run in runs:
            with contextlib.suppress(Exception):
                run.wait(2.0)
        self._selector.close()
        self._wake.close()


def _saved_state(root_dir, uid):
    """(PodState, status) a previous kubelet kept for pod `uid`, or None."""
    doc = _read_saved(root_dir, f"pods/{uid}/status.json", lambda d: isinstance(
        d.get("status"), dict) and d.get("state") in {s.value for s in PodState})
    return (PodState(doc["state"]), doc["status"]) if doc else None


def _saved_pods(root_dir):
    """The specs of the pods a previous kubelet ran (<root_dir>/pods/<uid>/pod.json)."""
    for uid in _list_beneath(root_dir, "pods"):
        pod = _read_saved(root_dir, f"pods/{uid}/pod.json", lambda p: isinstance(p.get("spec"), dict)
                          and isinstance(p["spec"].get("containers"), list) and _pod_uid(p) == uid)
        if pod is not None:
            yield pod


class PodManager:
    """The kubelet's pod handler: admits pods (max-pods), keeps a PodWorker each (one PodDriver, one
    StatusWriter), answers the server, and keeps specs and statuses under `<root_dir>/pods/<uid>/`."""

    _FINALIZED_KEPT = 4096     # uids of finalized pods remembered, so a late event cannot revive one

    def __init__(self, config, metrics, store, *, api=None, node=None, echo=None):
        self.config, self.metrics, self.api, self.node = config, metrics, api, node  # NodeAgent (API)
        self.images = ImageManager(config, store, api=api)
        self.images.metrics, self.images.in_use = metrics, self._digests_in_use
        self.images.compiled_cache_dir = os.path.join(config.root_dir, "cache")
        self.node_ip = (node and node.node_ip) or config.node_ip or "127.0.0.1"
        self.writer = StatusWriter(api, config.node_name) if api is not None else None
        self.tokens = None if api is None else ServiceAccountTokens(
            api, lambda pod, message: self._record_event(pod, "FailedMount", message, "Warning"), self._resume)
        self.objects = ApiObjects(api, ready=self._resume)     # configMaps and secrets, off the sync pool
        self.files = _StateFiles()
        self.echo = _LogEcho(echo) if echo else None
        self.workers = {}           # uid -> PodWorker
        self._finalized = collections.OrderedDict()     # uid -> None, oldest first
        self._held = {}             # uid run again from disk, unseen in the API yet (no writes) -> its Events
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._started = False
        self.driver = None
        self.services = PodServices(
            config=config, node_ip=self.node_ip, ensure_image=self._ensure_image,
            host=functools.partial(load_host, os.path.join(config.root_dir, "cache")),
            prepare_volumes=lambda pod, pod_dir: prepare_volumes(pod, pod_dir, config, api=api, base_dir=_base_dir(pod),
                                                                 node_ip=self.node_ip, tokens=self.tokens, objects=self.objects),
            container_env=self._container_env,
            record_event=self._record_event, send_status=self._status_changed, run_started=self._run_started,
            finalized=self._finalize, files=self.files)

    def start(self):
        self.driver = PodDriver()
        self._started = True
        self.restore()
        return self

    def stop(self):
        """Kill every module, keep pods on disk, flush queued writes briefly."""
        self._started = False
        if self.driver is not None:
            self.driver.stop(self._snapshot())
        for part in (self.echo, self.tokens, self.writer):
            if part is not None:
                part.stop()
        self.files.flush(5.0)

    def _resume(self, uid):
        """What the pod `uid` waited for (a token, a configMap or secret) is in: sync it."""
        with self._lock:
            worker = self.workers.get(uid)
        if worker is not None and self.driver is not None:
            self.driver.schedule(worker)

    # -- the handler face (called by the sources) --

    def pod_added(self, pod):
        problem = pod_problem(pod)     # the API server's checks again (defence in depth)
        if problem and problem.startswith(("metadata.name:", "metadata.namespace:", "metadata.uid:")):
            log.error("pod ignored: it cannot be named on this node: %s", problem)
            return None
        if problem:     # rejected as the kubelet rejects a pod: Failed, with the reason and an Event
            pod = dict(pod, spec={"containers": [], "nodeName": (pod.get("spec") or {}).get("nodeName")})
        uid = pod["metadata"]["uid"]
        if _is_mirror(pod):     # the API's copy of one of our static pods: the file source runs it
            return self._mirror_changed(pod, deleted=False)
        with self._lock:
            worker = self.workers.get(uid)
            if uid in self._finalized:      # finalized already: an event that came late changes nothing
                return None
        if worker is None:
            return self._admit(pod, problem)
        if uid in self._held:
            self._confirm_restored(worker, pod)
        worker.update(pod)
        self.driver.schedule(worker)

    pod_updated = pod_added

    def pod_deleted(self, pod):
        if _is_mirror(pod):
            return self._mirror_changed(pod, deleted=True)
        with self._lock:
            worker = self.workers.get((pod.get("metadata") or {}).get("uid"))
        if worker is not None:
            static = _is_static(worker.pod)
            worker.remove(grace=pod["spec"].get("terminationGracePeriodSeconds", 30) if static else 0)
            self.driver.schedule(worker)
            if static and self.writer is not None:
                self.writer.request("DELETE", _pod_path(worker.pod))

    def _mirror_changed(self, mirror, deleted):
        """The API's copy of one of our static pods changed: made again if deleted (as the kubelet
        keeps one mirror per static pod); one being deleted is finalized at once."""
        static = next((w for w in self._snapshot() if _is_static(w.pod) and not w.silent
                       and _pod_path(w.pod) == _pod_path(mirror)), None)
        if static is None or self.writer is None:
            return
        if deleted:
            self.writer.forget(static.uid)
            self._create_mirror(static.pod, static.status)
        elif mirror["metadata"].get("deletionTimestamp"):
            self.writer.request("DELETE", _pod_path(mirror), {"kind": "DeleteOptions", "apiVersion": "v1",
                                "gracePeriodSeconds": 0, "preconditions": {"uid": mirror["metadata"]["uid"]}})

    def _create_mirror(self, pod, status=None):
        def body():     # made when sent: it names the Node's uid, known once the Node is registered
            uid = ((self.node.node or {}).get("metadata") or {}).get("uid")
            if not uid:
                raise MinikrustError("mirror pod waits for the Node to be registered")
            return _mirror_pod(pod, uid)
        self.writer.request("POST", _pod_path(pod).rsplit("/", 1)[0], body, key=_pod_path(pod))
        if status:
            self.writer.set_status(pod, status)

    def _admit(self, pod, problem=None):
        uid = pod["metadata"]["uid"]
        if self.config.once and _is_static(pod):   # --once runs it anew: what is kept is for restarts
            _remove_beneath(self.config.root_dir, f"pods/{uid}")
        saved = _saved_state(self.config.root_dir, uid) or (
            (PodState.SYNCING, pod["status"]) if pod.get("status") else None)
        with self._lock:
            active = sum(1 for w in self.workers.values() if w.state is PodState.SYNCING)
            rejected = ("Invalid", f"Pod was rejected: {problem}") if problem else None
            ended = saved is not None and saved[1].get("phase") in _TERMINAL_PHASES    # it runs nothing
            if not rejected and not ended and active >= self.config.max_pods:      # the kubelet's max-pods
                rejected = ("OutOfpods", "Pod was rejected: Node didn't have enough resource: pods, "
                            f"requested: 1, used: {active}, capacity: {self.config.max_pods}")
            worker = PodWorker(self.services, pod, saved=saved, rejected=rejected)
            worker.update(pod)          # a pod first seen already deleted is finalized at once
            self.workers[uid] = worker
        fetching = self.tokens is not None and not (rejected or ended or worker.delete_at) and \
            self.tokens.prefetch(pod)       # its TokenRequests go out now: the answer syncs it (no sync to wait)
        self.files.save(self.config.root_dir, f"pods/{uid}/pod.json", pod)
        if self.writer is not None:
            if _is_static(pod):
                self._create_mirror(pod)
            elif uid not in self._held:     # a spec saved on disk carries a stale status: send ours whole
                self.writer.seed(uid, pod.get("status"))
        log.info("pod %s added%s", _pod_key(pod), f" but rejected: {rejected[1]}" if rejected else "")
        if rejected:
            self._record_event(pod, rejected[0], rejected[1], "Warning")
        if not fetching:
            self.driver.schedule(worker)

    # -- what workers call (their PodServices) --

    def _container_env(self, pod, spec):
        """container_env, with its Warning Events (InvalidEnvironmentVariableNames) on the pod."""
        warnings = []
        env = container_env(pod, spec, node_ip=self.node_ip, warnings=warnings, objects=self.objects,
                            root_dir=self.config.root_dir)
        for reason, message in warnings:
            self._record_event(pod, reason, message, "Warning")
        return env

    def _ensure_image(self, pod, container):
        """The module of a container's image (ImageManager), with the kubelet's Pulling/Pulled Events."""
        secrets = [s.get("name") for s in pod["spec"].get("imagePullSecrets") or [] if s.get("name")]
        image, policy = container.spec.get("image") or "", container.spec.get("imagePullPolicy")
        namespace = pod["metadata"].get("namespace")
        if policy == "Always" or not self.images.present(image, secrets, namespace):
            self._record_event(pod, "Pulling", f'Pulling image "{image}"', "Normal", container)
        ref = self.images.ensure(image, policy, secrets, namespace=namespace, base_dir=_base_dir(pod))
        pulled = (f'Successfully pulled image "{image}" in {ref.pulled:.3f}s' if ref.pulled is not None
                  else f'Container image "{image}" already present on machine')
        self._record_event(pod, "Pulled", pulled, "Normal", container)
        return ref

    def _record_event(self, pod, reason, message, type_="Normal", container=None):
        meta = pod["metadata"]
        held = self._held.get(meta["uid"])
        if held is not None:
            held.append((pod, reason, message, type_, container))
        elif self.writer is not None:
            self.writer.record(PodEvent(_namespace(pod), meta["name"], meta["uid"], reason,
                                        message, type_, container.field_path if container else None))

    def _run_started(self, worker, container, run, began):
        if run is not None:
            self.driver.watch(worker, container, run)
            if self.echo is not None:
                self.echo.follow(f"{worker.pod['metadata']['name']}/{container.name}", container.log_path)
        self.metrics.inc("minikrust_module_starts_total", result="success" if run is not None else "error")
        self.metrics.observe("minikrust_module_start_duration_seconds", time.monotonic() - began)

    def _digests_in_use(self):
        return {c.digest for w in self._snapshot() for c in w.inits + w.apps
                if c.run is not None and c.digest}

    def _status_changed(self, worker, old_phase):
        if self.writer is not None and not worker.silent and worker.uid not in self._held:
            self.writer.set_status(worker.pod, worker.status)
        if self.echo is not None:
            self.echo.pod_changed(worker, old_phase)
        with self._changed:
            self._changed.notify_all()

    def _finalize(self, worker):
        """Its modules stopped and volumes gone: delete the pod from the API, once (its uid is kept)."""
        if self.tokens is not None:
            self.tokens.forget(worker.uid)
        deleting = self.writer is not None and not worker.silent and not _is_static(worker.pod)
        if deleting and worker.pod["metadata"].get("deletionGracePeriodSeconds") != 0:
            self.writer.delete_pod(worker.pod)      # (grace 0: the API server removes it itself, a soak finding)
        elif self.writer is not None:
            self.writer.forget(worker.uid)
        with self._lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
            self._held.pop(worker.uid, None)
            if deleting:
                self._finalized[worker.uid] = None
                while len(self._finalized) > self._FINALIZED_KEPT:
                    self._finalized.popitem(last=False)
            self._changed.notify_all()
        self.files.remove(worker.dir)
        log.info("pod %s finalized", worker.key)

    # -- restart: the pods a previous kubelet left on disk --

    def restore(self):
        """Run again the pods a previous kubelet left on disk (the API may be unreachable now)."""
        for pod in _saved_pods(self.config.root_dir):
            uid = pod["metadata"]["uid"]
            with self._lock:
                known = uid in self.workers
            if not known and not _is_static(pod):
                self._held[uid] = []
                self._admit(pod)

    def prune_after(self, synced):
        """Once `synced` (the API source's first full list) is set, the restored pods not yet seen
        in the API were deleted meanwhile: stopped, with nothing sent (in _held until finalized)."""
        def wait_then_prune():
            while not synced.wait(1.0):
                if not self._started:
                    return
            for uid in list(self._held):
                with self._lock:
                    worker = self.workers.get(uid)
                if worker is not None:
                    worker.remove()
                    self.driver.schedule(worker)
        threading.Thread(target=wait_then_prune, name="minikrust-prune", daemon=True).start()

    def _confirm_restored(self, worker, pod):
        """A pod run again from disk is in the API: its status and held Events go out now, diffed
        against what the API has (the one on disk may never have reached it)."""
        if self.writer is not None:
            self.writer.seed(worker.uid, pod.get("status"))
        for args in self._held.pop(worker.uid, ()):
            self._record_event(*args)
        status = None
        while self.writer is not None and worker.status is not status:   # the newest, also if it just changed
            status = worker.status
            self.writer.set_status(pod, status)

    # -- what the server and the CLI read --

    def _snapshot(self):
        with self._lock:
            return list(self.workers.values())

    def pods(self):
        return [dict(w.pod, status=w.status or {}) for w in self._snapshot()]

    def container_log_path(self, namespace, pod, container, previous=False):
        w = next((w for w in self._snapshot() if w.pod["metadata"]["name"] == pod
                  and _namespace(w.pod) == namespace), None)
        c = next((c for c in (w.inits + w.apps if w else []) if c.name == container), None)
        if c is None or not c.ever_started:
            return None
        if not previous:
            return c.log_path
        path = os.path.join(w.dir, "logs", c.name, f"{c.restart_count - 1}.log")
        return path if c.restart_count > 0 and os.path.exists(path) else None

    def container_stats(self):
        """One entry per container run (running, or its last finished run): CPU and memory."""
        stats = []
        for w in self._snapshot():
            for c in w.inits + w.apps:
                run, result = c.run, c.result
                if run is None and result is None:
                    continue
                cpu, memory, peak = run.usage() if run is not None else (result.cpu_seconds, 0, result.peak_memory)
                stats.append({"namespace": _namespace(w.pod),
                              "pod": w.pod["metadata"]["name"], "uid": w.uid, "container": c.name,
                              "running": run is not None, "start_time": c.wall_start,
                              "cpu_seconds": cpu, "memory_bytes": memory, "peak_memory_bytes": peak})
        return stats

    def wait_all_finished(self, timeout=None):
        """Block until every pod is finished (--once); True if they are."""
        with self._changed:
            return self._changed.wait_for(lambda: all((w.status or {}).get("phase") in _TERMINAL_PHASES
                                                      for w in self.workers.values()), timeout)


def _is_mirror(pod):
    return "kubernetes.io/config.mirror" in _annotations(pod) and not _is_static(pod)


def _mirror_pod(pod, node_uid):
    """The API copy of a static pod (the kubelet's mirror pod): same spec, annotated config.mirror,
    owned by its Node as controller (NodeRestriction refuses a node's pod without that reference)."""
    meta = pod["metadata"]
    annotations = {k: v for k, v in _annotations(pod).items() if k != _MANIFEST_ANNOTATION}
    annotations["kubernetes.io/config.mirror"] = annotations.get("kubernetes.io/config.hash", "")
    owner = {"apiVersion": "v1", "kind": "Node", "name": pod["spec"]["nodeName"], "uid": node_uid,
             "controller": True}
    mirror_meta = {"name": meta["name"], "namespace": _namespace(pod),
                   "labels": meta.get("labels") or {}, "annotations": annotations, "ownerReferences": [owner]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": mirror_meta, "spec": pod["spec"]}


# --- Server: HTTPS logs, healthz, pods, metrics, stats ---
# The kubelet API: container logs (read, or followed across rotations), healthz, pods, metrics, stats;
# serving certificates and the kubelet's webhook authentication and authorization.

# Log files: the CRI format the WASI host writes, one record a line, `<RFC3339Nano time>
# <stdout|stderr> <F|P> <content>`; a P (partial) record is continued by the next until an F one.

# One line of a container log: CRI partial records joined; `complete` False for a trailing fragment.
LogLine = collections.namedtuple("LogLine", "time_ns stream content complete", defaults=(True,))


class _LineJoiner:
    """Turns CRI records into LogLines, joining each stream's P records with the F that ends them."""

    def __init__(self):
        self._pending = {}  # stream -> (time of the first fragment, [fragments])

    def feed(self, record):
        parts = record.rstrip(b"\n").split(b" ", 3)
        if len(parts) < 3:
            return None
        try:
            when = _parse_rfc3339(parts[0].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        stream = parts[1].decode("ascii", "replace")
        first, fragments = self._pending.pop(stream, (when, []))
        fragments.append(parts[3] if len(parts) == 4 else b"")
        if parts[2].split(b":")[0] == b"P":
            self._pending[stream] = (first, fragments)
            return None
        return LogLine(first, stream, b"".join(fragments))

    def flush(self):
        """The fragments still waiting for their F record, as incomplete lines, oldest first."""
        lines = [LogLine(first, stream, b"".join(fragments), complete=False)
                 for stream, (first, fragments) in self._pending.items()]
        self._pending.clear()
        return sorted(lines, key=lambda line: line.time_ns)


@dataclass(frozen=True)
class LogOptions:
    """The query of GET /containerLogs (PodLogOptions as the kubelet reads them)."""
    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int = None
    since_ns: int = None
    limit_bytes: int = None
    stream: str = None      # "stdout" or "stderr" (PodLogOptions.stream Stdout|Stderr); None: both

    def selects(self, line):
        """Whether a line passes the sinceTime/sinceSeconds and stream filters."""
        return ((self.since_ns is None or line.time_ns >= self.since_ns)
                and (self.stream is None or line.stream == self.stream))

    @classmethod
    def from_query(cls, query):
        """Parse a query dict (name -> list of values); raise ValueError with a message for a bad one."""
        one = {name: values[-1] for name, values in query.items() if values}.get

        def flag(name):
            value = one(name, "")
            if value not in ("", "false", "False", "0", "true", "True", "1"):
                raise ValueError(f"{name}: invalid boolean {value!r}")
            return value in ("true", "True", "1")

        def number(name, minimum):
            value = one(name)
            if value is not None and (not re.fullmatch(r"-?\d+", value) or int(value) < minimum):
                raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
            return None if value is None else int(value)

        if one("sinceSeconds") is not None and one("sinceTime") is not None:
            raise ValueError("at most one of sinceTime or sinceSeconds may be specified")
        seconds = number("sinceSeconds", 1)
        since_ns = None if seconds is None else int((time.time() - seconds) * 10**9)
        if one("sinceTime") is not None:
            since_ns = _parse_rfc3339(one("sinceTime"))
        stream = one("stream") or "All"
        if stream not in ("All", "Stdout", "Stderr"):
            raise ValueError(f"stream: must be All, Stdout or Stderr, got {stream!r}")
        return cls(follow=flag("follow"), previous=flag("previous"), timestamps=flag("timestamps"),
                   tail_lines=number("tailLines", 0), since_ns=since_ns, limit_bytes=number("limitBytes", 1),
                   stream=None if stream == "All" else stream.lower())


def read_container_log(path, options, root=None, follow=None):
    """A container run's log (rotated files first; its folder beneath `root`) filtered by `options`, as
    bytes chunks; `follow=(ended, wait)`: then as it is written (`kubectl logs -f`) until `ended()` and
    its last records are read, the byte limit is reached, or `wait(seconds)` returns True."""
    budget, joiner, cursor = options.limit_bytes, _LineJoiner(), _LogCursor(path, root)

    def emit(lines):
        """The selected lines as bytes, within the byte budget (None: no limit)."""
        nonlocal budget
        for line in filter(options.selects, lines):
            stamp = (_rfc3339nano(line.time_ns) + " ").encode() if options.timestamps else b""
            data = stamp + line.content + (b"\n" if line.complete else b"")
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            if data:
                yield data
            if budget == 0:
                return

    def backlog():
        yield from filter(None, map(joiner.feed, cursor.records(final=not follow)))
        if not follow:
            yield from joiner.flush()

    selected = filter(options.selects, backlog())
    if options.tail_lines is not None:
        selected = collections.deque(selected, maxlen=options.tail_lines)
    yield from emit(selected)
    if not follow:
        return
    ended, wait = follow
    finished, last_check, idle = False, time.monotonic(), 0.05
    while budget != 0:
        records = list(cursor.records())
        if records:
            yield from emit(filter(None, map(joiner.feed, records)))
            idle = 0.05
            continue
        if finished:
            yield from emit(joiner.flush())
            return
        if time.monotonic() - last_check >= 0.5:      # ask whether the run ended twice a second
            finished, last_check = bool(ended()), time.monotonic()
            if finished:
                continue  # read once more: the run may have written its last records just now
        if wait(idle):
            return
        idle = min(idle * 1.5, 0.25)  # a quiet log is polled less often


# Metrics: a tiny Prometheus registry the other parts increment through `kubelet.metrics`.

_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KUBELET_METRICS = {
    "minikrust_module_starts_total": ("counter", "WebAssembly module starts, by result (success|error)."),
    "minikrust_module_start_duration_seconds": (
        "histogram", "Seconds from the decision to start a container to its module running."),
    "minikrust_image_pulls_total": ("counter", "Module (OCI image) pulls, by result (success|error)."),
    "minikrust_api_errors_total": ("counter", "Failed API server requests, by HTTP code (0: no answer)."),
}
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})  # in label values


def _format_labels(labels, extra=()):
    pairs = sorted(labels) + list(extra)
    return "{" + ",".join(f'{k}="{str(v).translate(_ESCAPES)}"' for k, v in pairs) + "}" if pairs else ""


def _format_value(value):
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class Metrics:
    """Counters, gauges and histograms with labels in the Prometheus text format; thread-safe.
    `inc`, `set` and `observe` declare an unknown name (counter, gauge, histogram) rather than fail."""

    def __init__(self, families=None):
        """`families`: {name: (kind, help)} declared at once, the kubelet's own by default."""
        self._lock = threading.Lock()
        self._families = {}  # name -> (kind, help, buckets)
        self._values = {}    # name -> {labels tuple -> float | (bucket counts, sum, count)}
        for name, (kind, help_text) in (_KUBELET_METRICS if families is None else families).items():
            self.declare(name, kind, help_text)

    def declare(self, name, kind, help_text="", buckets=_DEFAULT_BUCKETS):
        """A family of kind counter, gauge or histogram (with these bucket bounds); declared once."""
        buckets = tuple(sorted(buckets)) if kind == "histogram" else ()
        with self._lock:
            self._families.setdefault(name, (kind, help_text, buckets))
            self._values.setdefault(name, {})

    def _update(self, name, kind, labels, change):
        """Set one series to `change(its value or None, the family's buckets)`; declares a new family."""
        if name not in self._families:
            self.declare(name, kind)
        with self._lock:
            series, key = self._values[name], tuple(sorted(labels.items()))
            series[key] = change(series.get(key), self._families[name][2])

    def inc(self, name, amount=1.0, **labels):
        self._update(name, "counter", labels, lambda value, _: (value or 0) + amount)

    def set(self, name, value, **labels):
        self._update(name, "gauge", labels, lambda *_: value)

    def observe(self, name, value, **labels):
        def change(state, buckets):
            counts, total, count = state or ([0] * len(buckets), 0.0, 0)
            return [seen + (value <= bound) for seen, bound in zip(counts, buckets)], total + value, count + 1
        self._update(name, "histogram", labels, change)

    def render(self, stamp=None):
        """All families in the Prometheus text exposition format (version 0.0.4), stamped `stamp` (ms)."""
        out, at = [], "" if stamp is None else f" {stamp}"
        with self._lock:
            for name in sorted(self._families):
                kind, help_text, buckets = self._families[name]
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self._values[name].items()):
                    if kind != "histogram":
                        out.append(f"{name}{_format_labels(labels)} {_format_value(value)}{at}")
                        continue
                    counts, total, count = value
                    for bound, seen in zip([*map(_format_value, buckets), "+Inf"], [*counts, count]):
                        out.append(f"{name}_bucket{_format_labels(labels, [('le', bound)])} {seen}")
                    out.append(f"{name}_sum{_format_labels(labels)} {_format_value(total)}")
                    out.append(f"{name}_count{_format_labels(labels)} {count}")
        return "\n".join(out) + "\n"


# Resource stats: /stats/summary (stats/v1alpha1 Summary) and /metrics/resource as metrics-server reads
# them for `kubectl top`, from `kubelet.container_stats()` (a dict a container run: namespace, pod, uid,
# container, running, start_time, cpu_seconds, memory_bytes, peak_memory_bytes). As the kubelet
# (cgroups), a pod's working set is its running containers', its CPU also counts the runs that ended.

def _node_usage():
    """(CPU core-seconds busy: not idle nor iowait, memory working set bytes, available bytes), from /proc."""
    ticks = [int(value) for value in _read("/proc/stat").split("\n")[0].split()[1:]]
    meminfo = _meminfo()
    available = meminfo.get("MemAvailable")
    working_set = None if available is None or "MemTotal" not in meminfo else meminfo["MemTotal"] - available
    return (sum(ticks[:8]) - sum(ticks[3:5])) / os.sysconf("SC_CLK_TCK"), working_set, available


def _local_ephemeral(volume):
    """Whether a volume counts in a pod's ephemeral-storage (volumeutil.IsLocalEphemeralVolume)."""
    empty_dir = volume.get("emptyDir")
    return (empty_dir is not None and (empty_dir or {}).get("medium", "") == "") or "configMap" in volume


def _disk_usage(path):
    """(bytes of disk used, inodes used) under `path`, as `du` counts them (blocks, not sizes);
    walked by fds (os.fwalk), so a folder a module swaps for a link meanwhile is not followed."""
    used = inodes = 0
    for _, _, files, folder in os.fwalk(os.path.realpath(path)):
        for name in [".", *files]:
            with contextlib.suppress(OSError):
                used += os.stat(name, dir_fd=folder, follow_symlinks=False).st_blocks * 512
                inodes += 1
    return used, inodes


_RESOURCE_METRICS = {      # the families of the kubelet's /metrics/resource: type, help
    "node_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the node in core-seconds"),
    "node_memory_working_set_bytes": ("gauge", "Current working set of the node in bytes"),
    "container_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the container in core-seconds"),
    "container_memory_working_set_bytes": ("gauge", "Current working set of the container in bytes"),
    "container_start_time_seconds": ("gauge", "Start time of the container since unix epoch in seconds"),
    "pod_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the pod in core-seconds"),
    "pod_memory_working_set_bytes": ("gauge", "Current working set of the pod in bytes"),
    "resource_scrape_error": ("gauge", "1 if there was an error while getting container metrics, 0 otherwise"),
}


class _ResourceStats:
    """Samples node and container usage; remembers the last sample to report CPU as a rate (nano cores)."""

    def __init__(self, kubelet):
        self.kubelet = kubelet
        self._last = {}  # key -> (monotonic ns, cpu core-nanoseconds)
        self._lock = threading.Lock()
        self._started = time.time()

    def _cpu(self, key, seconds, now_ns, stamp):
        """A CPUStats: cumulative core-nanoseconds, and usageNanoCores from the previous sample of `key`."""
        used = int(seconds * 1e9)
        sample = {"time": stamp, "usageCoreNanoSeconds": used}
        with self._lock:
            before = self._last.get(key)
            self._last[key] = (now_ns, used)
        if before and now_ns > before[0] and used >= before[1]:
            sample["usageNanoCores"] = int((used - before[1]) * 1e9 / (now_ns - before[0]))
        return sample

    def _pods(self):
        """{(namespace, name): {"uid", "start", "cpu", "memory", "running": [container runs]}}."""
        pods = {}
        for item in self.kubelet.container_stats():
            start = item.get("start_time") or self._started
            pod = pods.setdefault((item["namespace"], item["pod"]), {
                "uid": item.get("uid", ""), "start": start, "cpu": 0.0, "memory": 0, "running": []})
            pod["start"] = min(pod["start"], start)
            pod["cpu"] += float(item["cpu_seconds"])
            if item["running"]:
                pod["running"].append(item)
                pod["memory"] += int(item["memory_bytes"])
        return pods

    def _storage(self, pod, spec_volumes, fs, stamp):
        """FsStats: the pod's "volume" (local ephemeral), running containers' "logs", "ephemeral-storage"."""
        pod_dir = os.path.join(self.kubelet.config.root_dir, "pods", pod["uid"])

        def fs_stats(used, inodes, **extra):
            return dict(extra, time=stamp, usedBytes=used, inodesUsed=inodes, **fs)

        names = [volume.get("name") for volume in spec_volumes if _local_ephemeral(volume)]
        volumes = [fs_stats(*_disk_usage(os.path.join(pod_dir, "volumes", n)), name=n) for n in names]
        logs = {os.path.basename(folder): _disk_usage(folder)
                for folder in glob.glob(os.path.join(glob.escape(pod_dir), "logs", "*"))}
        used = sum(v["usedBytes"] for v in volumes) + sum(u for u, _ in logs.values())
        inodes = sum(v["inodesUsed"] for v in volumes) + sum(n for _, n in logs.values())
        running = {item["container"]: fs_stats(*logs.get(item["container"], (0, 0))) for item in pod["running"]}
        return volumes, running, fs_stats(used, inodes)

    def summary(self):
        """A stats/v1alpha1 Summary: the node, then each pod with its running containers."""
        now_ns, stamp = time.monotonic_ns(), _k8s_time()
        cpu, working_set, available = _node_usage()
        memory = {"time": stamp, "workingSetBytes": working_set, "usageBytes": working_set,
                  "availableBytes": available}
        node = {"nodeName": self.kubelet.config.node_name, "startTime": _k8s_time(self._started),
                "systemContainers": [], "cpu": self._cpu(("node",), cpu, now_ns, stamp),
                "memory": {k: v for k, v in memory.items() if v is not None}}
        fs = {}
        with contextlib.suppress(OSError):
            disk = os.statvfs(self.kubelet.config.root_dir)
            fs = {"availableBytes": disk.f_bavail * disk.f_frsize, "capacityBytes": disk.f_blocks * disk.f_frsize,
                  "inodesFree": disk.f_favail, "inodes": disk.f_files}
        specs = {(_namespace(p), (p.get("metadata") or {}).get("name")):
                 (p.get("spec") or {}).get("volumes") or [] for p in self.kubelet.pods()}
        pods = []
        for (namespace, name), pod in self._pods().items():
            volumes, logs, ephemeral = self._storage(pod, specs.get((namespace, name), ()), fs, stamp)
            containers = [{
                "name": item["container"], "startTime": _k8s_time(item.get("start_time") or self._started),
                "cpu": self._cpu((namespace, name, item["container"]), item["cpu_seconds"], now_ns, stamp),
                "memory": {"time": stamp, "workingSetBytes": int(item["memory_bytes"]),
                           "usageBytes": int(item["memory_bytes"])},
                "logs": logs[item["container"]]}
                for item in pod["running"]]
            pods.append({"podRef": {"name": name, "namespace": namespace, "uid": pod["uid"]},
                         "startTime": _k8s_time(pod["start"]), "containers": containers,
                         "cpu": self._cpu((namespace, name), pod["cpu"], now_ns, stamp),
                         "memory": {"time": stamp, "workingSetBytes": pod["memory"], "usageBytes": pod["memory"]},
                         "volume": volumes, "ephemeral-storage": ephemeral})
        return {"node": node, "pods": pods}

    def resource_metrics(self):
        """The /metrics/resource text: node, pod and running containers' CPU and memory, sample times in ms."""
        cpu, working_set, _ = _node_usage()
        metrics = Metrics({name: (kind, f"[STABLE] {text}") for name, (kind, text)
                           in _RESOURCE_METRICS.items()})
        metrics.set("node_cpu_usage_seconds_total", float(cpu))
        if working_set is not None:
            metrics.set("node_memory_working_set_bytes", working_set)
        for (namespace, name), pod in self._pods().items():
            metrics.set("pod_cpu_usage_seconds_total", pod["cpu"], namespace=namespace, pod=name)
            metrics.set("pod_memory_working_set_bytes", pod["memory"], namespace=namespace, pod=name)
            for item in pod["running"]:
                labels = {"namespace": namespace, "pod": name, "container": item["container"]}
                metrics.set("container_cpu_usage_seconds_total", float(item["cpu_seconds"]), **labels)
                metrics.set("container_memory_working_set_bytes", int(item["memory_bytes"]), **labels)
                metrics.set("container_start_time_seconds", float(item.get("start_time") or self._started), **labels)
        metrics.set("resource_scrape_error", 0)
        return metrics.render(stamp=int(time.time() * 1000))


# Certificates: ECDSA P-256 keys (as the kubelet's) and CSRs made by the `openssl` command, so the
# dependencies stay requests and pyyaml; a ConfigError says so when openssl is missing.

CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
SERVING_SIGNER = "kubernetes.io/kubelet-serving"
CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"


def _openssl(*args, stdin=None):
    """Run the openssl command; its stdout, or MinikrustError with its stderr."""
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("the `openssl` command is needed to make keys and certificate requests "
                          "(apt-get install openssl), or pass --tls-cert-file/--tls-private-key-file")
    done = subprocess.run([binary, *args], input=stdin, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise MinikrustError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def new_key_and_csr(common_name, organization, dns_names=(), ip_addresses=(), self_signed_days=None):
    """A new ECDSA P-256 key and a CSR (or self-signed certificate, `self_signed_days`), both PEM."""
    with tempfile.TemporaryDirectory(prefix="minikrust-csr-") as scratch:
        key_path = os.path.join(scratch, "key.pem")
        subject = (f"/O={organization}" if organization else "") + f"/CN={common_name}"
        args = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", key_path, "-subj", subject]
        if self_signed_days:
            args += ["-x509", "-days", str(self_signed_days)]
        names = [f"DNS:{name}" for name in dns_names] + [f"IP:{ip}" for ip in ip_addresses]
        if names:
            args += ["-addext", "subjectAltName=" + ",".join(names)]
        csr = _openssl(*args)
        with open(key_path, "rb") as handle:
            return handle.read(), csr


def certificate_validity(cert_pem):
    """(notBefore, notAfter) of a PEM certificate, as epoch seconds, if it is valid now; else None."""
    try:
        text = _openssl("x509", "-noout", "-startdate", "-enddate", stdin=cert_pem).decode()
        dates = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        begin, end = ssl.cert_time_to_seconds(dates["notBefore"]), ssl.cert_time_to_seconds(dates["notAfter"])
    except (MinikrustError, KeyError, ValueError):
        return None
    return (begin, end) if begin <= time.time() < end else None


def request_certificate(api, csr_pem, signer_name, usages, timeout=900.0, stop=None):
    """Create a CertificateSigningRequest and poll for its issued certificate (PEM); MinikrustError
    when it is denied or failed, or nothing is issued within `timeout` seconds."""
    stop = stop or threading.Event()
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"generateName": "csr-"},
            "spec": {"request": base64.b64encode(csr_pem).decode(), "signerName": signer_name,
                     "usages": list(usages)}}
    name = api.post(CSR_PATH, body)["metadata"]["name"]
    log.info("requested a certificate from %s with CertificateSigningRequest %s", signer_name, name)
    deadline, interval = time.monotonic() + timeout, 0.1
    while True:
        status = api.get(f"{CSR_PATH}/{name}").get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") in ("Denied", "Failed") and condition.get("status", "True") == "True":
                raise MinikrustError(f"CertificateSigningRequest {name} {condition['type'].lower()}: "
                                     f"{condition.get('reason', '')} {condition.get('message', '')}".rstrip())
        if status.get("certificate"):
            return base64.b64decode(status["certificate"])
        if time.monotonic() >= deadline:
            raise MinikrustError(f"CertificateSigningRequest {name}: no certificate issued within {timeout:.0f}s")
        if stop.wait(interval):
            raise MinikrustError(f"CertificateSigningRequest {name}: stopped while waiting")
        # Approval may take a human: back off to one look every 10 s (6 requests a minute).
        interval = min(interval * 2, 10.0)


def _write_private(path, data):
    """Write a file only its owner can read (in the pki folder), by a temporary name and a rename."""
    parent, leaf = os.path.split(os.path.dirname(path))
    os.makedirs(parent, exist_ok=True)      # the root dir: the user's own path
    _write_beneath(parent, os.path.join(leaf, os.path.basename(path)), data, 0o600, dir_mode=0o700)


def store_certificate(pki_dir, prefix, cert_pem, key_pem):
    """Store cert+key as `<prefix>-<stamp>.pem` and point `<prefix>-current.pem` at it (the kubelet's layout)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H-%M-%S-%f")
    _write_private(os.path.join(pki_dir, f"{prefix}-{stamp}.pem"), cert_pem.rstrip(b"\n") + b"\n" + key_pem)
    with _dir_beneath(pki_dir) as fd:
        os.symlink(f"{prefix}-{stamp}.pem", f".tmp-{prefix}-{stamp}", dir_fd=fd)
        os.replace(f".tmp-{prefix}-{stamp}", f"{prefix}-current.pem", src_dir_fd=fd, dst_dir_fd=fd)
    return os.path.join(pki_dir, f"{prefix}-current.pem")


def _pki_file(path):
    """A file of the pki folder opened beneath it, as a path ssl can load: a `-current.pem` link is
    followed only to a name in the same folder, and no other link at all."""
    folder, name = os.path.split(path)
    with _dir_beneath(folder) as fd:
        with contextlib.suppress(OSError):      # EINVAL: not a link
            name = os.readlink(name, dir_fd=fd)
        if os.path.basename(name) != name:
            raise OSError(errno.EXDEV, "certificate link leads out of its folder", path)
        return _held(open_beneath(fd, name), folder, name)


def _valid_certificate(path):
    """(notBefore, notAfter) of the certificate in a PEM file (in the pki folder) if it is valid now, else None."""
    with contextlib.suppress(OSError), open(_pki_file(path), "rb") as handle:
        return certificate_validity(handle.read())
    return None


def _node_addresses(kubelet):
    """(DNS names, IP addresses) for the serving certificate: node name and hostname, node IPs."""
    config = kubelet.config
    dns = list(dict.fromkeys(name for name in (config.node_name, socket.gethostname().lower()) if name))
    ip = ((kubelet.node.node_ip if kubelet.node else None) or config.node_ip
          or detect_node_ip(kubelet.api.server if kubelet.api else None))
    return dns, list(dict.fromkeys(part.strip() for part in str(ip).split(",") if part.strip()))


def bootstrap_client_certificate(config, api=None, timeout=900.0):
    """The kubelet's TLS bootstrap: the kubeconfig to use. Unless `config.kubeconfig` (default
    `<root_dir>/kubelet.kubeconfig`) has a valid client certificate, a CSR for system:node:<node>
    goes to the client-kubelet signer with the bootstrap credentials (`api`), and a kubeconfig
    naming the issued `<root_dir>/pki/kubelet-client-current.pem` is written."""
    if not config.bootstrap_kubeconfig:
        return config.kubeconfig
    target = config.kubeconfig or os.path.join(config.root_dir, "kubelet.kubeconfig")
    with contextlib.suppress(OSError, ValueError, MinikrustError):  # kept while it loads, its client cert valid
        cluster = load_kubeconfig(target)
        with open(cluster.client_cert_file or os.devnull, "rb") as handle:
            pem = cluster.client_cert_data or handle.read()
        if not pem or certificate_validity(pem):
            return target
    bootstrap = load_kubeconfig(config.bootstrap_kubeconfig)
    with contextlib.ExitStack() as stack:
        api = api or stack.enter_context(contextlib.closing(ApiClient(bootstrap)))
        key, csr = new_key_and_csr(f"system:node:{config.node_name}", "system:nodes")
        cert = request_certificate(api, csr, CLIENT_SIGNER, ["digital signature", "client auth"], timeout)
    current = store_certificate(os.path.join(config.root_dir, "pki"), "kubelet-client", cert, key)
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "default-cluster", "cluster": bootstrap.cluster_entry()}],
        "users": [{"name": "default-auth", "user": {"client-certificate": current, "client-key": current}}],
        "contexts": [{"name": "default-context",
                      "context": {"cluster": "default-cluster", "user": "default-auth", "namespace": "default"}}],
        "current-context": "default-context",
    }
    _write_private(target, yaml.safe_dump(kubeconfig, sort_keys=False).encode())
    log.info("client certificate bootstrap done: wrote %s", target)
    return target


class _ServingTLS:
    """The server's TLS context: --tls-cert-file, else as the kubelet, a self-signed certificate
    (pki/kubelet-self-signed.pem, renewed at 70-90% of its life); with --rotate-server-certificates
    also one asked of the kubelet-serving signer by CSR, served to new connections once issued."""

    SELF_SIGNED_DAYS = 365      # the kubelet's self-signed serving certificate lasts a year
    context = _thread = None    # new connections take the current context; open ones keep theirs

    def __init__(self, kubelet, stop):
        self.kubelet, self.config, self.stop = kubelet, kubelet.config, stop
        self.pki_dir = os.path.join(self.config.root_dir, "pki")
        self.issued = os.path.join(self.pki_dir, "kubelet-server-current.pem")
        self.self_signed = os.path.join(self.pki_dir, "kubelet-self-signed.pem")
        self._renew_at = {}  # (notBefore, notAfter) -> when to renew: the jitter is drawn once per certificate

    def _install(self, path, keyfile=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # say so: Go clients (the API server) would otherwise try h2
        context.load_cert_chain(path, keyfile)
        if self.config.client_ca_file:
            context.verify_mode = ssl.CERT_OPTIONAL  # a client cert is verified when given, else token or anonymous
            context.load_verify_locations(cafile=self.config.client_ca_file)
        self.context = context

    def start(self):
        if self.config.tls_cert_file:
            self._install(self.config.tls_cert_file, self.config.tls_private_key_file)
            return
        self._refresh()
        self._thread = threading.Thread(target=self._rotate, name="minikrust-serving-cert", daemon=True)
        self._thread.start()

    def join(self, timeout=None):
        if self._thread is not None:
            self._thread.join(timeout)

    def _due(self, validity):
        """When to renew: at a jittered 70-90% of the certificate's lifetime, as the kubelet does."""
        begin, end = validity
        return self._renew_at.setdefault(validity, begin + (end - begin) * random.uniform(0.7, 0.9))

    def _refresh(self):
        """Install the issued certificate if one is valid, else the self-signed one (made anew when
        missing or due); returns (issued?, when the installed one is due for renewal)."""
        validity = self.config.rotate_server_certificates and _valid_certificate(self.issued)
        if validity:
            self._install(_pki_file(self.issued))
            return True, self._due(validity)
        validity = _valid_certificate(self.self_signed)
        if not validity or time.time() >= self._due(validity):
            dns, ips = _node_addresses(self.kubelet)
            key, cert = new_key_and_csr(f"{dns[0]}@{int(time.time())}", None, dns, ips, self.SELF_SIGNED_DAYS)
            _write_private(self.self_signed, cert + key)
            validity = certificate_validity(cert)
            log.info("serving a self-signed certificate for %s (%s)", ", ".join(dns + ips), self.self_signed)
        self._install(_pki_file(self.self_signed))
        return False, self._due(validity)

    def _rotate(self):
        backoff = 1.0
        while not self.stop.is_set():
            try:
                issued, due = self._refresh()
                if not self.config.rotate_server_certificates or (issued and time.time() < due):
                    self.stop.wait(min(max(due - time.time(), 1.0), 3600.0))
                    continue
                dns, ips = _node_addresses(self.kubelet)
                key, csr = new_key_and_csr(f"system:node:{self.config.node_name}", "system:nodes", dns, ips)
                cert = request_certificate(self.kubelet.api, csr, SERVING_SIGNER,
                                           ["digital signature", "server auth"], stop=self.stop)
                self._install(_pki_file(store_certificate(self.pki_dir, "kubelet-server", cert, key)))
                log.info("serving the certificate issued for %s", ", ".join(dns + ips))
                backoff = 1.0
            except (MinikrustError, ssl.SSLError, OSError, requests.RequestException) as exc:
                if self.stop.is_set():
                    return
                log.warning("serving certificate: %s (retrying in %.0fs)", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)


_User = collections.namedtuple("_User", "name groups uid", defaults=((), ""))
_ANONYMOUS = _User("system:anonymous", ("system:unauthenticated",))


class _Authorizer:
    """The kubelet's webhook mode: client certificates, TokenReview, SubjectAccessReview; cached as
    the kubelet's defaults: tokens 2 min, allowed 5 min, denied 30 s."""

    TOKEN_TTL, ALLOWED_TTL, DENIED_TTL = 120.0, 300.0, 30.0

    def __init__(self, api, node_name, anonymous):
        self.api, self.node_name, self.anonymous = api, node_name, anonymous
        self._cache = {}
        self._lock = threading.Lock()

    def _cached(self, key, compute, ttl_of):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._cache) > 4096:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + ttl_of(value), value)
        return value

    def authenticate(self, peer_cert, authorization):
        """The caller as a _User, or None (401). Raises ApiError when the TokenReview cannot be made."""
        if peer_cert:
            subject = [pair for rdn in peer_cert.get("subject", ()) for pair in rdn]
            names = [value for key, value in subject if key == "commonName"]
            if names:  # as the API server's x509 authenticator: CN user, O groups, plus system:authenticated
                groups = [value for key, value in subject if key == "organizationName"] + ["system:authenticated"]
                return _User(names[0], tuple(dict.fromkeys(groups)))
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            if not token or self.api is None:
                return None
            digest = hashlib.sha256(token.encode()).hexdigest()  # never keep the token itself
            return self._cached(("token", digest), lambda: self._review_token(token),
                                lambda user: self.TOKEN_TTL if user else self.DENIED_TTL)
        # standalone serves loopback only, without an API server to review anyone: all callers are anonymous
        return _ANONYMOUS if self.anonymous or self.api is None else None

    def _review_token(self, token):
        review = self.api.post("/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        return _User(user.get("username", ""), tuple(user.get("groups") or ()), user.get("uid", ""))

    def authorize(self, user, verb, subresource):
        """(allowed, reason) for `user` doing `verb` on nodes/<subresource> of this node."""
        if self.api is None:
            return True, ""
        attributes = {"verb": verb, "resource": "nodes", "subresource": subresource, "name": self.node_name,
                      "group": "", "version": "v1", "namespace": ""}
        return self._cached(("sar", user, verb, subresource), lambda: self._review_access(user, attributes),
                            lambda result: self.ALLOWED_TTL if result[0] else self.DENIED_TTL)

    def _review_access(self, user, attributes):
        spec = {"user": user.name, "groups": list(user.groups), "resourceAttributes": attributes}
        if user.uid:
            spec["uid"] = user.uid
        review = self.api.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})
        status = review.get("status") or {}
        return bool(status.get("allowed")) and not status.get("denied"), status.get("reason", "")


def _subresource(path):
    """The nodes subresource the kubelet authorizes a path as (its server/auth.go mapping)."""
    for prefix, name in (("/stats", "stats"), ("/metrics", "metrics"), ("/logs", "log")):
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return "proxy"


_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_STREAMING = ("exec", "attach", "portForward", "run")


def _container_ended(kubelet, namespace, name, container, path):
    """Whether the container run writing `path` (`<restartCount>.log`) has ended, from kubelet.pods()."""
    run = int(os.path.basename(path).split(".")[0])
    for pod in kubelet.pods():
        meta = pod.get("metadata") or {}
        if (_namespace(pod), meta.get("name")) != (namespace, name):
            continue
        status = pod.get("status") or {}
        for entry in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            if entry.get("name") != container:
                continue
            count = entry.get("restartCount", 0)
            if count > run:
                return True  # a later run has started: this one is over
            # a terminated state reported for an earlier run is stale: this run just started
            over = "terminated" in (entry.get("state") or {}) or _waiting_after_failure(entry)
            return over and count == run
        return False  # not reported yet: the container is starting
    return True  # the pod is gone


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request to the kubelet API: authenticate, authorize, route."""

    protocol_version = "HTTP/1.1"
    server_version = f"minikrust/{__version__}"
    timeout = 60  # an idle or stuck client frees its thread after this many seconds

    def log_message(self, fmt, *args):
        log.debug("server: %s " + fmt, self.address_string(), *args)

    def _send(self, code, body, content_type="text/plain; charset=utf-8"):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _denial(self, path):
        """None when the caller may make this request, else the (code, message) to answer."""
        auth = self.server.auth
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        try:
            user = auth.authenticate(peer, self.headers.get("Authorization"))
        except (ApiError, requests.RequestException) as exc:
            log.warning("server: token review failed: %s", exc)
            user = None
        if user is None:
            return 401, "Unauthorized"
        verb, subresource = _VERBS.get(self.command, ""), _subresource(path)
        what = f"user={user.name}, verb={verb}, resource=nodes, subresource={subresource}"
        try:
            allowed, reason = auth.authorize(user, verb, subresource)
        except (ApiError, requests.RequestException) as exc:
            log.warning("server: subject access review failed: %s", exc)
            return 500, f"Authorization error ({what})"
        if not allowed:
            return 403, f"Forbidden ({what})" + (f": {reason}" if reason else "")
        return None

    def _dispatch(self):
        method = self.command
        try:
            self._answer(method)
        except OSError as exc:  # the client went away
            log.debug("server: %s %s: %s", method, self.path, exc)
            self.close_connection = True
        except Exception:  # a bug must cost one answer, not the connection's thread silently
            log.exception("server: %s %s failed", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(500, "internal error")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _answer(self, method):
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            return self._send(400, "bad Content-Length")
        if int(length):  # no endpoint takes a body: skip it (a huge one ends the connection instead)
            self.rfile.read(min(int(length), 1 << 20))
            self.close_connection = self.close_connection or int(length) > 1 << 20
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(part) for part in url.path.split("/")[1:]]
        if url.path == "/healthz":
            return self._send(200, "ok")
        if denial := self._denial(url.path):
            return self._send(*denial)
        if parts and parts[0] in _STREAMING:
            return self._send(501, f"{parts[0]} is not supported: minikrust runs WebAssembly modules, which have "
                                   "no shell, terminal or network ports to reach into")
        if method not in ("GET", "HEAD"):
            return self._send(405, f"method {method} not allowed on {url.path}")
        path, server = url.path, self.server
        if path == "/pods":
            return self._send(200, json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                               "items": list(server.kubelet.pods())}), "application/json")
        if path == "/metrics":
            return self._send(200, server.render_metrics(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/metrics/resource":
            return self._send(200, server.stats.resource_metrics(), "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/stats/summary", "/stats/summary/"):
            return self._send(200, json.dumps(server.stats.summary()), "application/json")
        if len(parts) == 4 and parts[0] == "containerLogs":
            return self._container_logs(*parts[1:], urllib.parse.parse_qs(url.query, keep_blank_values=True))
        return self._send(404, f"404 page not found: {path}")

    def _container_logs(self, namespace, name, container, query):
        try:
            options = LogOptions.from_query(query)
        except ValueError as exc:
            return self._send(400, str(exc))
        kubelet = self.server.kubelet
        path = kubelet.container_log_path(namespace, name, container, previous=options.previous)
        root = kubelet.config.root_dir         # every log lives beneath it, read through no link
        found = False
        with contextlib.suppress(OSError):
            found = bool(path) and _LogCursor(path, root).exists()
        if not found:
            if options.previous:
                return self._send(400, f'previous terminated container "{container}" in pod "{name}" not found')
            return self._send(404, f'container "{container}" in pod "{namespace}/{name}" is not available')
        if self.command == "HEAD":
            return self._send(200, b"")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not options.follow or options.previous:
            return self._write_chunked(read_container_log(path, options, root), batch=1 << 16)
        self.close_connection = True
        ended = functools.partial(_container_ended, kubelet, namespace, name, container, path)
        try:
            self._write_chunked(read_container_log(path, options, root, follow=(ended, self._client_gone)))
        except OSError as exc:  # the client went away mid-write
            log.debug("server: log follower for %s/%s/%s ended: %s", namespace, name, container, exc)

    def _write_chunked(self, chunks, batch=0):
        """Send a body in HTTP/1.1 chunks, gathering small pieces up to `batch` bytes (0: send each now)."""
        pending = bytearray()
        for chunk in chunks:
            pending += chunk
            if len(pending) >= batch:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(pending), bytes(pending)))
                pending.clear()
        if pending:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(pending), bytes(pending)))
        self.wfile.write(b"0\r\n\r\n")

    def _client_gone(self, seconds):
        """Wait up to `seconds`; True when the server stops or the client closed its connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], seconds)
        except (OSError, ValueError):
            return True
        return bool(readable) or self.server.stopping.is_set()


class KubeletServer(http.server.ThreadingHTTPServer):
    """The kubelet API: logs, health, pods, metrics, stats. With an API server: HTTPS with webhook
    authentication and authorization; standalone: plain HTTP on 127.0.0.1 only. A thread a connection."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, kubelet):
        """Made at the kubelet's start, after its API client (None: standalone); binds at start()."""
        api, self.kubelet, self.config = kubelet.api, kubelet, kubelet.config
        self.stopping = threading.Event()
        self.stats = _ResourceStats(kubelet)
        self.tls = None if api is None else _ServingTLS(kubelet, self.stopping)
        self.auth = _Authorizer(api, self.config.node_name, self.config.anonymous_auth)
        self._thread = None
        host = "127.0.0.1" if api is None else (self.config.address or "0.0.0.0")
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, self.config.port), _Handler, bind_and_activate=False)

    @property
    def port(self):
        return self.server_address[1]

    @property
    def scheme(self):
        return "http" if self.tls is None else "https"

    def start(self):
        host = self.server_address[0]
        if self.tls is not None:
            self.tls.start()
            if not (self.config.client_ca_file or self.config.anonymous_auth):
                log.warning("the kubelet API will refuse the API server's client certificate (kubectl logs "
                            "gets 401): set --client-ca-file to the cluster's CA (kubeadm: /etc/kubernetes/pki/ca.crt)")
        try:
            self.server_bind()
            self.server_activate()
        except OSError as exc:      # fatal, as in the kubelet: a node whose API is unreachable fails later, silently
            self.stopping.set()     # the certificate rotation too
            self.server_close()
            raise MinikrustError(f"cannot serve the kubelet API on {host}:{self.config.port}: "
                                 f"{exc.strerror or exc} (choose another --port, or --serve=false)") from exc
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="minikrust-server", daemon=True)
        self._thread.start()
        log.info("serving the kubelet API on %s://%s:%d", self.scheme, host, self.port)
        return self

    def stop(self):
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()
        if self.tls is not None:
            self.tls.join(5)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look up the FQDN: slow, unneeded
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        """Serve one connection, in its own thread: the TLS handshake too, with the current certificate."""
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(10)
        try:
            connection = self.tls.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("server: TLS handshake with %s failed: %s", client_address[0], exc)
            return None
        try:
            return self.RequestHandlerClass(connection, client_address, self)
        finally:
            connection.close()

    def render_metrics(self):
        """/metrics: the kubelet's registry plus pods running and per-container CPU and memory, read now."""
        extra = Metrics({
            "minikrust_running_pods": ("gauge", "Pods in phase Running on this node."),
            "minikrust_container_cpu_seconds_total": ("counter", "CPU seconds used by each container run."),
            "minikrust_container_memory_bytes": ("gauge", "Linear memory of each container run, in bytes.")})
        extra.set("minikrust_running_pods",
                  sum((pod.get("status") or {}).get("phase") == "Running" for pod in self.kubelet.pods()))
        for item in self.kubelet.container_stats():
            labels = {"namespace": item["namespace"], "pod": item["pod"], "container": item["container"]}
            extra.set("minikrust_container_cpu_seconds_total", float(item.get("cpu_seconds", 0.0)), **labels)
            extra.set("minikrust_container_memory_bytes", int(item.get("memory_bytes", 0)), **labels)
        return self.kubelet.metrics.render() + extra.render()


# --- Kubelet: wires the above; start()/stop(); embeddable ---
# One node from the parts above. Kubelet(config) does no I/O; start() makes and starts the parts,
# stop() ends them in reverse. No global state: many Kubelets can share a process.

class Kubelet:
    """One node: its Node, Lease and status, and its pods; standalone (api None) with no kubeconfig.
    `with Kubelet(config) as kubelet: kubelet.wait()` runs it until stop() or a signal (see main)."""

    def __init__(self, config=None, *, handler=None):
        """Records the settings only: no file, network or thread until start()."""
        self.config = config if config is not None else Config()
        self.handler = handler      # the pods' handler: a PodManager unless the caller brings one
        self.api = self.node = self.pod_manager = self.server = None
        self.sources = []           # pod sources, started in order, stopped in reverse
        self.metrics = Metrics()
        self._stop_requested = threading.Event()
        self._started = self._wired = False
        self._lock = threading.Lock()

    def _wire(self):
        """Make the parts (at the first start): TLS bootstrap, API client, Node, pods, sources, server."""
        config = self.config
        if config.bootstrap_kubeconfig:      # TLS bootstrap: a client certificate for the node first
            self.config = config = dataclasses.replace(config, kubeconfig=bootstrap_client_certificate(config))
        self.api = api_client_for(config)        # None: standalone
        store = ModuleStore(os.path.join(config.root_dir, "modules"))    # pods' modules: status.images
        if self.api is not None:
            self.node = NodeAgent(self.api, config, images=store.node_images)
            self.api.on_error = lambda code: self.metrics.inc("minikrust_api_errors_total", code=str(code))
        if self.handler is None:
            self.handler = self.pod_manager = PodManager(
                config, self.metrics, store, api=self.api, node=self.node,
                echo=functools.partial(print, flush=True) if self.api is None and config.echo else None)
        if config.pod_manifest_path:
            self.sources.append(StaticPodSource(config.pod_manifest_path, config.node_name, self.handler))
        if self.api is not None:
            self.sources.append(ApiPodSource(self.api, config.node_name, self.handler, config.sync,
                                             config.poll_interval, config.resync_interval))
        self.server = KubeletServer(self) if config.serve else None
        self._wired = True

    def start(self):
        """Register the node (when there is an API server) and start the pod sources."""
        with self._lock:
            if self._started:
                return self
            if not self._wired:
                self._wire()
            if self.server is not None:
                self.server.start()
            self._started = True
            if self.node is not None and self.server is not None:
                self.node.port = self.server.port
            for part in (self.node, self.pod_manager, *self.sources):
                if part is not None:
                    part.start()
            if self.pod_manager is not None and self.api is not None:
                self.pod_manager.prune_after(self.sources[-1].synced)
        log.info("kubelet %s started (%s)", self.config.node_name, "standalone" if self.api is None else "API")
        return self

    def stop(self):
        """Shut down as on SIGTERM: sources, then the pods' modules within their grace periods, then
        the node NotReady (not drained: its pods stay bound and run again when it is back)."""
        self._stop_requested.set()
        with self._lock:
            if not self._started:
                return
            self._started = False
            for part in (self.server, *reversed(self.sources), self.pod_manager, self.node):
                if part is not None:
                    part.stop()
            if self.api is not None:
                self.api.close()
        log.info("kubelet %s stopped", self.config.node_name)

    def pods(self):
        """The pods this kubelet runs, each with its current status."""
        return self.pod_manager.pods() if self.pod_manager is not None else []

    def container_stats(self):
        """CPU and memory of each container run (for /metrics and /stats/summary)."""
        return self.pod_manager.container_stats() if self.pod_manager is not None else []

    def container_log_path(self, namespace, pod, container, previous=False):
        """The CRI log file of a container's current (or previous) run, or None."""
        return self.pod_manager and self.pod_manager.container_log_path(namespace, pod, container, previous)

    def run_once(self):
        """--once: wait until every static pod has finished; 0 if all succeeded, else 1."""
        static = next((s for s in self.sources if isinstance(s, StaticPodSource)), None)
        if static is None or self.pod_manager is None:
            raise ConfigError("--once: needs --pod-manifest-path (static pods to run)")
        while not (static.synced.wait(0.5) and self.pod_manager.wait_all_finished(timeout=0.5)):
            if self._stop_requested.is_set():
                return 1
        succeeded = all(pod["status"].get("phase") == "Succeeded" for pod in self.pods())
        return 0 if succeeded and not static.errors else 1

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
# main(): flags to a Config, logs to stderr, SIGTERM/SIGINT to stop(); `minikrust push` publishes a
# module. Runs under __name__ == "__main__", re-executed as a module to reuse cached bytecode.

class _JsonLogFormatter(logging.Formatter):
    def format(self, record):
        entry = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
                 "level": record.levelname.lower(), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@contextlib.contextmanager
def _logging_to_stderr(config):
    """Log to stderr at --log-level in --log-format while the kubelet runs, then restore the logger."""
    saved = log.handlers[:], log.level, log.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLogFormatter() if config.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(config.log_level.upper())
    log.propagate = False
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved


def main(argv=None):
    """Run a kubelet until SIGTERM or SIGINT (or `push`: cmd_push); exit 0 when clean, 2 on a bad
    config, 1 when it cannot start (its port is taken, ...)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["push"]:
        return cmd_push(argv[1:])
    try:
        config = parse_args(argv)
        with _logging_to_stderr(config):
            return _run(config)
    except MinikrustError as exc:   # a bad config, or a kubelet that cannot start (its port is taken, ...)
        print(f"minikrust: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _run(config):
    """The kubelet's life in the CLI: signals ask it to stop; --once returns the pods' verdict."""
    kubelet = Kubelet(config)
    previous = {sig: signal.signal(sig, lambda *_: kubelet.request_stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    _trim_heap()
    try:
        with kubelet:
            if config.once:
                return kubelet.run_once()
            kubelet.wait(5.0)
            _trim_heap()
            while not kubelet.wait(1.0):
                pass
            log.info("shutting down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _trim_heap():
    """Hand back the ~10 MB of heap compiling this file used at start-up (malloc_trim, if any)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


if __name__ == "__main__":
    if (__spec__ is None and sys.executable and os.path.basename(__file__) == "minikrust.py"
            and not os.environ.get("MINIKRUST_NO_REEXEC")):
        # A script is compiled at every start and glibc keeps much of the ~20 MB that takes (15 MB
        # of an idle kubelet's 47); run as a module (same file, same pid), its bytecode is cached.
        options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]       # -X, -W, ... kept
        os.execv(sys.executable, [sys.executable, *options, "-c", "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                                  "runpy.run_module('minikrust', run_name='__main__', alter_sys=True)",
                                  os.path.dirname(os.path.abspath(__file__)), *sys.argv[1:]])
    sys.exit(main())
