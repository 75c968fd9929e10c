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
    "Config", "Kubelet", "main",
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


# --- CLI ---


if __name__ == "__main__":
    sys.exit(main())
