"""An in-process fake kube-apiserver for minikrust's tests (a pytest plugin module).

It follows the real API server's behaviour as recorded in ../shared/k8s-contract/ (Node and RBAC
authorizers, NodeRestriction, pod admission defaults, watch semantics); tests/test_contract.py
replays every recorded exchange against it. Standard library HTTP server in a thread, JSON only.

Fixtures
--------
``fake_api`` (alias ``fake_apiserver``), function scope: a started ``FakeApiServer`` over plain HTTP.
``fake_api_tls``: the same over HTTPS with a test CA (``.pki``); client certificates signed by the
CA authenticate (CN = user, O = groups; CN ``system:node:<n>`` + O ``system:nodes`` is node <n>).
kubectl sends no bearer token over plain HTTP: run it against ``fake_api_tls``
(``fake.write_kubeconfig(path)`` there names the CA). Tried and working: get (tables, -o wide/yaml, -A,
-w), describe pod (with events), delete pod (waits for the final delete), apply -f (a minimal
/openapi/v3 tells kubectl the server validates fields), label, annotate, logs (see pods/log below).
Not working: kubectl's typed generators (`kubectl create configmap ...`) send protobuf, which the
fake refuses with 415; use `create -f`/`apply -f` instead.
``test_pki`` (session): a ``TestPKI`` (CA + helpers) for tests that need certificates of their own.

The FakeApiServer object
------------------------
Addresses and identities:
  .url                      "http://127.0.0.1:PORT" (or https://...)
  .port, .host
  .admin_token              bearer token of user "admin" in group system:masters
  .node_token(name)         bearer token of "system:node:<name>" (groups system:nodes, system:authenticated)
  .add_token(token, user, groups=())        any extra identity
  .add_bootstrap_token(token_id=None, secret=None) -> "id.secret" (user system:bootstrap:<id>, group system:bootstrappers)
  .add_basic_user(username, password, groups=())
  .allow(user_or_group, verbs=("*",), resources=("*",), namespace=None)   an RBAC grant for other users
        (everyone but system:masters, nodes and bootstrappers starts with no rights)
  .write_kubeconfig(path, user="admin"|<node name>, client_cert=False, token=None) -> path
        (TLS fakes: certificate-authority is the CA file; client_cert=True uses a client cert instead of a token)
  .kubeconfig(dir_or_path, node=None, admin=False) -> path   (convenience alias)
  .client(user="admin") -> Client with .get/.post/.put/.patch/.delete(path, json=..., content_type=..., **requests kw)
        returning requests.Response; .watch(path, params) yields (type, object).  user=None: anonymous.
  .ca_path, .client_cert(user="admin"|<node>, directory=None) -> (cert_path, key_path)
  .pki (made on demand; always used by TLS fakes): TestPKI with .ca_path, .ca_pem, .server_cert_path, .server_key_path,
        .client_cert(cn, orgs=(), directory=None) -> (cert_path, key_path), .sign_csr(pem, usages) -> cert PEM

State (Python side, as admin, no HTTP):
  .get(resource, ns_or_name, name=None, namespace=None) -> dict or None   (resource: "pods", "Pod", "pod", ...)
  .list(resource, namespace=None) -> [dict]
  .create(obj) or .create(kind, namespace, obj) -> stored dict (admission/defaulting as an admin POST;
        the namespace is created if missing, with its default ServiceAccount and CA configmaps)
  .create_pod(manifest, node_name=None, namespace=None) -> stored pod
  .update(obj) / .patch(resource, ns, name, patch, patch_type="merge"|"strategic"|"json", subresource=None)
  .delete_pod(ns, name, grace=None) -> like kubectl delete (bound pod: only deletionTimestamp set, MODIFIED)
  .remove_pod(ns, name) / .remove(resource, ns, name) -> gone now (DELETED)
  .create_configmap(ns, name, data), .create_secret(ns, name, data (str values, encoded for you), type="Opaque")
  .events(namespace=None, involved_name=None, reason=None) -> [Event dicts]
  .resource_version -> current global resourceVersion (int); one counter for every kind
  .csrs() -> [CSR dicts];  .approve_csr(name, certificate_pem=None, sign=True) signs with the test CA
        (generated on demand) and emits MODIFIED;  .deny_csr(name);  .csr_auto_approve = True approves+signs on create
  .on_csr_created = callable(csr) (called after a CSR is stored)
  .token_users = {token: (user, [groups])}  answers for TokenReview (plus every token the fake knows)
  .sar_policy = callable(spec) -> bool or (bool, reason)   SubjectAccessReview answer (default: allow;
        `fake.sar_policy = fake.authorizer_sar` answers with the fake's own authorizer and grants)
  .token_reviews / .subject_access_reviews  lists of the specs received
  pods/log (`kubectl logs`, admin only) is proxied to the node's kubelet like the real API server does:
        https://<InternalIP>:<daemonEndpoints.kubeletEndpoint.Port>/containerLogs/<ns>/<pod>/<container>?<params>
        with client cert CN=kube-apiserver-kubelet-client O=system:masters from `.pki` (so the kubelet's
        --client-ca-file must be `.pki.ca_path`); the kubelet's serving certificate is not verified.
        Overrides: .kubelet_address = {node: (host, port)}, .kubelet_ca_path (verify the kubelet),
        .kubelet_client_token (send this bearer token instead of the client certificate).

Watches and compaction:
  .compact(rv=None)         resourceVersions older than rv (default: now) expire: a watch from them gets 410
  .watch_expired_as = "event" (default: 200 + an ERROR event with Status 410 Expired, as the watch cache does)
                      or "http" (an HTTP 410 answer)
  .expire_watches()         compact now and send ERROR 410 into every open watch, then end it
  .bookmark_interval = 2.0  seconds between BOOKMARKs on watches with allowWatchBookmarks (one also ends a timeout)
  .send_bookmarks()         a BOOKMARK now on every open bookmark-enabled watch
  .service_account_max_token_expiration = None  seconds: tokens are issued for at most this long whatever
        was asked (kube-apiserver --service-account-max-token-expiration; shortens refresh tests)
  A watch from a resourceVersion newer than the fake's waits .too_large_rv_wait (3.0 s) and then gets an
  ERROR event: 504 Timeout "Too large resource version" (e.g. a kubelet resuming against a fresh fake).
  .open_watches() -> int

Fault injection:
  .drop_watches(graceful=False)   end every open watch now (abort the connection, or a clean end)
  .fail_next(n=1, status=500, method=None, path=None, retry_after=None)   next n matching requests
        answer status (429: TooManyRequests with Retry-After); path: regex searched in the path
  .close_next(n=1, method=None, path=None)   next n matching requests: connection closed, no answer
  .lose_answer_next(n=1, method=None, path=None)   next n matching requests: served (their change made),
        then the connection closed before the answer (a connection lost after the server applied it)
  .delay_next(n=1, seconds=1.0, method=None, path=None)   next n matching requests answered late
  .pause(method=None, path=None) / .resume()  hold matching requests until resume() (connections
        accepted, nothing answered; a stop() meanwhile cuts them, they are never served)
  .stop() / .start() / .restart(expire_watches=False)  stop the server (connections refused, open
        connections cut) and start it again on the same port with its state kept (an API server restart;
        expire_watches=True also compacts, so watches resumed from before the restart get 410)
  .smp_set_element_order_crash = True   lesson 12: a strategic merge patch with $setElementOrder on a
        list that has no merge key (e.g. pods/status containerStatuses) closes the connection unanswered

Request log:
  .requests -> [RequestRecord(method, path, query, params, content_type, user, groups, status, body, time)]
        (record.path_with_query, record.user); .count(method=None, path=None, user=None) -> int
        (path: regex searched in the path);  .clear_requests()

What it enforces (each as recorded from the real server, see tests/test_contract.py):
  authentication (unknown token 401, no credentials = system:anonymous -> 403); the Node authorizer (a
  node reads only its own Node, lists/watches pods only with fieldSelector spec.nodeName=<itself>, reads
  only the configmaps/secrets/serviceaccounts its pods reference, requests tokens only for audiences
  its pods' projected volumes name); NodeRestriction (own Node/Lease/pod status only, kubelet label
  set, no taint changes, mirror pods only); admission (pod defaults, DefaultTolerationSeconds, the
  kube-api-access-* projected volume, not-ready taint on new Nodes, QoS class); validation (names,
  labels, wrong JSON types 400 on create / 422 on patch, pod IPs, container state transitions);
  optimistic concurrency (409 on a stale resourceVersion or a wrong uid precondition; no-op writes keep
  the resourceVersion); graceful pod deletion (bound pods get deletionTimestamp + a MODIFIED event, the
  final delete with grace 0 emits MODIFIED then DELETED); strategic merge patch with the merge keys the
  kubelet touches, JSON merge patch replacing lists, JSON patch; Go's output shape (times rounded,
  MicroTime to microseconds, containerStatuses' lastState {} etc., list items without kind).
Deviations: no protobuf (415), no server-side apply (415), strict field validation is not enforced,
managedFields are a single simplified entry per manager, list pagination uses an offset token, and an
untrusted client certificate fails the TLS handshake (the real server answers 401). Also: .find_requests(
method=None, path=None, user=None) -> [RequestRecord] with the same filters as .count.
"""
import base64
import bisect
import collections
import copy
import datetime
import http.server
import json
import os
import random
import re
import socket
import ssl
import string
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from fractions import Fraction

import pytest

SERVER_VERSION = {   # the recorded server's (extended/01)
    "major": "1", "minor": "36", "emulationMajor": "1", "emulationMinor": "36", "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "35", "gitVersion": "v1.36.2", "gitCommit": "8e16b12fda5b1dccc41a6de48b3e356cc7d5048b",
    "gitTreeState": "clean", "buildDate": "2026-11-24T14:23:14Z", "goVersion": "go1.26.4", "compiler": "gc",
    "platform": "linux/amd64",
}
API_AUDIENCES = ["https://kubernetes.default.svc.cluster.local"]
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class Resource:
    name: str
    group: str
    version: str
    kind: str
    namespaced: bool
    short: tuple = ()
    verbs: tuple = ("create", "delete", "get", "list", "patch", "update", "watch")
    subresources: tuple = ()

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self):
        return f"{self.name}.{self.group}" if self.group else self.name


_CREATE_ONLY = ("create",)
RESOURCES = {(f"{r.name}.{r.group}" if r.group == "events.k8s.io" else r.name): r for r in [
    Resource("namespaces", "", "v1", "Namespace", False, ("ns",)),
    Resource("nodes", "", "v1", "Node", False, ("no",), subresources=("status",)),
    Resource("pods", "", "v1", "Pod", True, ("po",),
             subresources=("status", "log")),
    Resource("events", "", "v1", "Event", True, ("ev",)),
    # the same stored Events, in the events.k8s.io/v1 shape (regarding, note, eventTime required)
    Resource("events", "events.k8s.io", "v1", "Event", True),
    Resource("configmaps", "", "v1", "ConfigMap", True, ("cm",)),
    Resource("secrets", "", "v1", "Secret", True),
    Resource("serviceaccounts", "", "v1", "ServiceAccount", True, ("sa",), subresources=("token",)),
    Resource("services", "", "v1", "Service", True, ("svc",)),
    Resource("leases", "coordination.k8s.io", "v1", "Lease", True),
    Resource("certificatesigningrequests", "certificates.k8s.io", "v1", "CertificateSigningRequest", False,
             ("csr",), subresources=("approval", "status")),
    Resource("tokenreviews", "authentication.k8s.io", "v1", "TokenReview", False, verbs=_CREATE_ONLY),
    Resource("subjectaccessreviews", "authorization.k8s.io", "v1", "SubjectAccessReview", False,
             verbs=_CREATE_ONLY),
]}
KIND_TO_RESOURCE = {r.kind.lower(): r.name for r in RESOURCES.values()}
GROUP_VERSIONS = sorted({(r.group, r.version) for r in RESOURCES.values() if r.group})

# Which field selectors each resource supports (anything else: 400 "field label not supported").
FIELD_LABELS = {
    "pods": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
             "spec.hostNetwork", "status.phase", "status.podIP", "status.podIPs", "status.nominatedNodeName"},
    "nodes": {"spec.unschedulable"},
    "events": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
               "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
               "reason", "reportingComponent", "source", "type"},
    "secrets": {"type"},
    "namespaces": {"status.phase"},
    "certificatesigningrequests": {"spec.signerName"},
}


###############################################################################
# Errors, times ###############################################################
###############################################################################

class ApiStatusError(Exception):
    """An answer with a metav1.Status body."""

    def __init__(self, code, reason, message, details=None, headers=None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.headers = details, headers or {}

    def status(self):
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason}
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body


class CloseConnection(Exception):
    """Close the connection without any answer (a panicking handler)."""


def _details(res, name=None, kind=None):
    d = {}
    if name:
        d["name"] = name
    if res is not None and res.group:
        d["group"] = res.group
    d["kind"] = kind or (res.name if res is not None else "")
    return d


def not_found(res, name):
    return ApiStatusError(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name))


def already_exists(res, name):
    return ApiStatusError(409, "AlreadyExists", f'{res.qualified} "{name}" already exists', _details(res, name))


def conflict(res, name):
    return ApiStatusError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": the object '
                          "has been modified; please apply your changes to the latest version and try again",
                          _details(res, name))


def forbidden(res, name, reason):
    subject = f'{res.qualified} "{name}"' if name else res.qualified
    return ApiStatusError(403, "Forbidden", f"{subject} is forbidden: {reason}", _details(res, name))


def invalid(res, name, causes, kind=None):
    """422 Invalid; causes: [(field, reason, message)]."""
    kind = kind or res.kind
    text = ", ".join(f"{f}: {m}" if f else m for f, _, m in causes)
    msg = f'{kind} "{name or ""}" is invalid: {text}' if len(causes) == 1 else \
        f'{kind} "{name or ""}" is invalid: [{text}]'
    details = {"name": name, "group": res and res.group, "kind": kind,
               "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]}
    details = {k: v for k, v in details.items() if v}
    return ApiStatusError(422, "Invalid", msg, details)


def bad_request(message):
    return ApiStatusError(400, "BadRequest", message)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def fmt_time(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_micro(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?(Z|z|[+-]\d{2}:\d{2})$")


def parse_time(value):
    """RFC 3339 -> aware datetime (raises ValueError like Go's time.Parse would fail)."""
    m = _TIME_RE.match(value)
    if not m:
        raise ValueError(f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse')
    frac = (m.group(3) or ".0")[1:7].ljust(6, "0")
    tz = m.group(4)
    tzinfo = datetime.timezone.utc if tz in ("Z", "z") else datetime.timezone(
        datetime.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * (1 if tz[0] == "+" else -1))
    dt = datetime.datetime.strptime(f"{m.group(1)}T{m.group(2)}", "%Y-%m-%dT%H:%M:%S").replace(
        microsecond=int(frac), tzinfo=tzinfo)
    return dt.astimezone(datetime.timezone.utc)


def norm_time(value, micro=False):
    """The server round-trips metav1.Time to whole seconds (MicroTime: microseconds), in UTC."""
    if value is None or not isinstance(value, str):
        return value
    dt = parse_time(value)
    return fmt_micro(dt) if micro else fmt_time(dt)


def rand_suffix(n=5):
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


###############################################################################
# Patches #####################################################################
###############################################################################

_DELETE = object()
PRIMITIVE_MERGE = "<primitive>"
# (kind or "*", path of field names) -> patchMergeKey, for lists with patchStrategy "merge".
MERGE_KEYS = {
    ("Node", ("status", "conditions")): "type",
    ("Node", ("status", "addresses")): "type",
    ("Node", ("status", "volumesAttached")): "name",
    ("Pod", ("spec", "containers")): "name",
    ("Pod", ("spec", "initContainers")): "name",
    ("Pod", ("spec", "ephemeralContainers")): "name",
    ("Pod", ("spec", "volumes")): "name",
    ("Pod", ("spec", "imagePullSecrets")): "name",
    ("Pod", ("spec", "containers", "env")): "name",
    ("Pod", ("spec", "initContainers", "env")): "name",
    ("Pod", ("spec", "containers", "volumeMounts")): "mountPath",
    ("Pod", ("spec", "initContainers", "volumeMounts")): "mountPath",
    ("Pod", ("spec", "containers", "ports")): "containerPort",
    ("Pod", ("spec", "initContainers", "ports")): "containerPort",
    ("Pod", ("status", "conditions")): "type",
    ("Pod", ("status", "podIPs")): "ip",
    ("Pod", ("status", "hostIPs")): "ip",
    ("*", ("metadata", "ownerReferences")): "uid",
    ("*", ("metadata", "finalizers")): PRIMITIVE_MERGE,
}


def merge_key(kind, path):
    return MERGE_KEYS.get((kind, path), MERGE_KEYS.get(("*", path)))


def json_merge_patch(target, patch):
    """RFC 7386: dicts merge, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = json_merge_patch(result.get(k), v)
    return result


def _strip_directives(value):
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def strategic_merge_patch(orig, patch, kind, path=(), crash_on_bad_order=True):
    """Strategic merge patch for the fields the kubelet touches (merge keys in MERGE_KEYS)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip_directives(patch)
    if directive == "delete":
        return _DELETE
    result = dict(orig) if isinstance(orig, dict) else {}
    orders = {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            if isinstance(result.get(name), list) and isinstance(v, list):
                result[name] = [x for x in result[name] if x not in v]
            continue
        if k.startswith("$"):
            continue
        if v is None:
            result.pop(k, None)
            continue
        sub = path + (k,)
        if isinstance(v, list):
            mk = merge_key(kind, sub)
            old = result.get(k) if isinstance(result.get(k), list) else []
            if mk is None:
                result[k] = _strip_directives(v)
            elif mk == PRIMITIVE_MERGE:
                result[k] = old + [x for x in v if x not in old]
            else:
                result[k] = _merge_list(old, v, mk, kind, sub, crash_on_bad_order)
        elif isinstance(v, dict):
            merged = strategic_merge_patch(result.get(k), v, kind, sub, crash_on_bad_order)
            if merged is _DELETE:
                result.pop(k, None)
            else:
                result[k] = merged
        else:
            result[k] = v
    for name, order in orders.items():
        mk = merge_key(kind, path + (name,))
        if mk is None or mk == PRIMITIVE_MERGE:
            if mk is None and crash_on_bad_order and isinstance(order, list) and \
                    any(isinstance(x, dict) for x in order):
                # What the recorded server did (contract 20): its handler panicked.
                raise CloseConnection(f"$setElementOrder/{name} on a list without a merge key")
            continue
        if isinstance(result.get(name), list) and isinstance(order, list):
            keys = [o.get(mk) for o in order if isinstance(o, dict)]
            items = result[name]
            ordered = [i for key in keys for i in items if isinstance(i, dict) and i.get(mk) == key]
            rest = [i for i in items if not (isinstance(i, dict) and i.get(mk) in keys)]
            result[name] = ordered + rest
    return result


def _merge_list(old, patch_items, mk, kind, path, crash):
    result = [copy.deepcopy(x) for x in old]
    for item in patch_items:
        if not isinstance(item, dict) or mk not in item:
            result.append(_strip_directives(item))
            continue
        idx = next((i for i, x in enumerate(result) if isinstance(x, dict) and x.get(mk) == item[mk]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del result[idx]
            continue
        if idx is None:
            result.append(_strip_directives(item))
        else:
            merged = strategic_merge_patch(result[idx], item, kind, path, crash)
            if merged is _DELETE:
                del result[idx]
            else:
                result[idx] = merged
    return result


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc, ops):
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise ValueError("a JSON patch must be a list of operations")

    def walk(parts):
        cur = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    def get(path):
        cur = doc
        for p in _pointer(path):
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur

    def add(path, value):
        parent, last = walk(_pointer(path))
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value

    def remove(path):
        parent, last = walk(_pointer(path))
        return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        try:
            if kind == "add":
                add(path, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                remove(path)
                add(path, copy.deepcopy(op["value"]))
            elif kind == "move":
                add(path, remove(op["from"]))
            elif kind == "copy":
                add(path, copy.deepcopy(get(op["from"])))
            elif kind == "test":
                if get(path) != op.get("value"):
                    raise ValueError(f"testing value {path} failed")
            else:
                raise ValueError(f"Unexpected kind: {kind}")
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"doc is missing path: {path}: {exc}") from None
    return doc


###############################################################################
# Selectors ###################################################################
###############################################################################

def parse_field_selector(text, res):
    """-> [(field, op, value)]; 400 for a field the resource does not support."""
    reqs = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise bad_request(f'invalid selector: \'{text}\'; can\'t understand \'{part}\'')
        f, op, v = m.group(1), m.group(2), m.group(3)
        allowed = {"metadata.name", "metadata.namespace"} | FIELD_LABELS.get(res.name, set())
        if f not in allowed:
            raise bad_request(f'"{f}" is not a known field selector: only "' + '", "'.join(sorted(allowed)) + '"')
        reqs.append((f, "!=" if op == "!=" else "=", v))
    return reqs


def field_value(obj, path):
    if path == "source":
        return (obj.get("source") or {}).get("component", "")
    cur = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def match_fields(obj, reqs):
    return all((field_value(obj, f) == v) == (op == "=") for f, op, v in reqs)


def parse_label_selector(text):
    reqs = []
    for m in re.finditer(r"\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)",
                         text or ""):
        neg, key, op, val, setop, vals = m.groups()
        if not key:
            continue
        if setop:
            reqs.append((key, setop, {v.strip() for v in vals.split(",") if v.strip()}))
        elif op:
            reqs.append((key, "!=" if op == "!=" else "=", val))
        else:
            reqs.append((key, "!" if neg else "exists", None))
    return reqs


def match_labels(obj, reqs):
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, val in reqs:
        ok = {"=": lambda: labels.get(key) == val, "!=": lambda: labels.get(key) != val,
              "exists": lambda: key in labels, "!": lambda: key not in labels,
              "in": lambda: labels.get(key) in val, "notin": lambda: labels.get(key) not in val}[op]()
        if not ok:
            return False
    return True


###############################################################################
# Shapes: what the server's Go types add, drop and normalise ##################
###############################################################################

def _each(lst):
    return [x for x in (lst or []) if isinstance(x, dict)] if isinstance(lst, list) else []


def _set_default(d, key, value):
    if isinstance(d, dict) and key not in d:
        d[key] = value


def _norm_times(d, keys, micro=False):
    if isinstance(d, dict):
        for k in keys:
            if isinstance(d.get(k), str):
                d[k] = norm_time(d[k], micro)


def _container_state(state):
    if not isinstance(state, dict):
        return state
    if isinstance(state.get("running"), dict):
        _set_default(state["running"], "startedAt", None)
        _norm_times(state["running"], ["startedAt"])
    if isinstance(state.get("terminated"), dict):
        t = state["terminated"]
        _set_default(t, "exitCode", 0)
        _set_default(t, "startedAt", None)
        _set_default(t, "finishedAt", None)
        _norm_times(t, ["startedAt", "finishedAt"])
    return state


def _sync_ips(status, one, many):
    """podIP/podIPs (hostIP/hostIPs) after the v1 <-> internal round trip: the single field wins."""
    ips = _each(status.get(many))
    if status.get(one) and (not ips or ips[0].get("ip") != status[one]):
        status[many] = [{"ip": status[one]}]
    elif ips and not status.get(one) and ips[0].get("ip"):
        status[one] = ips[0]["ip"]


def shape_pod_status(status):
    _sync_ips(status, "podIP", "podIPs")
    _sync_ips(status, "hostIP", "hostIPs")
    for c in _each(status.get("conditions")):
        _set_default(c, "lastProbeTime", None)
        _set_default(c, "lastTransitionTime", None)
        _norm_times(c, ["lastProbeTime", "lastTransitionTime"])
    _norm_times(status, ["startTime"])
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in _each(status.get(key)):
            for k, v in (("state", {}), ("lastState", {}), ("ready", False), ("restartCount", 0),
                         ("image", ""), ("imageID", "")):
                _set_default(cs, k, v)
            _container_state(cs.get("state"))
            _container_state(cs.get("lastState"))


def shape(obj):
    """Normalise a stored object the way a round trip through the Go types does."""
    kind = obj.get("kind")
    meta = obj.setdefault("metadata", {})
    _norm_times(meta, ["creationTimestamp", "deletionTimestamp"])
    if kind == "Pod":
        shape_pod_status(obj.setdefault("status", {}))
    elif kind == "Node":
        status = obj.setdefault("status", {})
        for c in _each(status.get("conditions")):
            _set_default(c, "lastHeartbeatTime", None)
            _set_default(c, "lastTransitionTime", None)
            _norm_times(c, ["lastHeartbeatTime", "lastTransitionTime"])
        de = status.setdefault("daemonEndpoints", {})
        if isinstance(de, dict):
            de.setdefault("kubeletEndpoint", {"Port": 0})
        info = status.setdefault("nodeInfo", {})
        if isinstance(info, dict):
            for k in ("machineID", "systemUUID", "bootID", "kernelVersion", "osImage", "containerRuntimeVersion",
                      "kubeletVersion", "kubeProxyVersion", "operatingSystem", "architecture"):
                info.setdefault(k, "")
        obj.setdefault("spec", {})
    elif kind == "Event" and obj.get("apiVersion") == "events.k8s.io/v1":
        _norm_times(obj, ["eventTime"], micro=True)
        for k, v in (("deprecatedSource", {}), ("deprecatedFirstTimestamp", None), ("deprecatedLastTimestamp", None)):
            _set_default(obj, k, v)
    elif kind == "Event":
        for k in ("firstTimestamp", "lastTimestamp"):
            _set_default(obj, k, None)
        _norm_times(obj, ["firstTimestamp", "lastTimestamp"])
        _norm_times(obj, ["eventTime"], micro=True)
        _set_default(obj, "eventTime", None)
        _set_default(obj, "involvedObject", {})
        _set_default(obj, "source", {})
        _set_default(obj, "reportingComponent", "")
        _set_default(obj, "reportingInstance", "")
    elif kind == "Lease":
        spec = obj.setdefault("spec", {})
        if isinstance(spec, dict):
            _norm_times(spec, ["renewTime", "acquireTime"], micro=True)
    return obj


# Go types of the fields a client may write, for the 400/422 a wrong JSON type gets.
_STR, _INT, _BOOL = "string", "int32", "bool"
_STRMAP = {"*": _STR}
_META = {"name": _STR, "namespace": _STR, "generateName": _STR, "labels": _STRMAP, "annotations": _STRMAP,
         "resourceVersion": _STR, "uid": _STR, "finalizers": [_STR]}
_POD_COND = {"type": _STR, "status": _STR, "reason": _STR, "message": _STR}
_STATE = {"waiting": {"reason": _STR, "message": _STR},
          "running": {"startedAt": _STR},
          "terminated": {"exitCode": _INT, "signal": _INT, "reason": _STR, "message": _STR, "containerID": _STR}}
_CSTATUS = {"name": _STR, "ready": _BOOL, "restartCount": _INT, "started": _BOOL, "image": _STR,
            "imageID": _STR, "containerID": _STR, "state": _STATE, "lastState": _STATE}
_CONTAINER = {"name": _STR, "image": _STR, "command": [_STR], "args": [_STR], "workingDir": _STR,
              "env": [{"name": _STR, "value": _STR}], "volumeMounts": [{"name": _STR, "mountPath": _STR,
                                                                       "readOnly": _BOOL, "subPath": _STR}]}
SCHEMAS = {
    "Node": ("v1.Node", {
        "metadata": _META,
        "spec": {"taints": [{"key": _STR, "value": _STR, "effect": _STR}], "unschedulable": _BOOL,
                 "podCIDR": _STR, "providerID": _STR},
        "status": {"conditions": [{"type": _STR, "status": _STR, "reason": _STR, "message": _STR},
                                  "v1.NodeCondition"],
                   "addresses": [{"type": _STR, "address": _STR}, "v1.NodeAddress"], "capacity": _STRMAP, "allocatable": _STRMAP,
                   "nodeInfo": {"*": _STR}, "daemonEndpoints": {"kubeletEndpoint": {"Port": _INT}},
                   "images": [{"names": [_STR], "sizeBytes": "int64"}]}}),
    "Pod": ("v1.Pod", {
        "metadata": _META,
        "spec": {"nodeName": _STR, "restartPolicy": _STR, "containers": [_CONTAINER],
                 "initContainers": [_CONTAINER], "activeDeadlineSeconds": "int64",
                 "terminationGracePeriodSeconds": "int64"},
        "status": {"phase": _STR, "message": _STR, "reason": _STR, "hostIP": _STR, "podIP": _STR,
                   "startTime": _STR, "qosClass": _STR, "conditions": [_POD_COND, "v1.PodCondition"],
                   "hostIPs": [{"ip": _STR}], "podIPs": [{"ip": _STR}],
                   "containerStatuses": [_CSTATUS, "v1.ContainerStatus"],
                   "initContainerStatuses": [_CSTATUS, "v1.ContainerStatus"]}}),
    "Lease": ("v1.Lease", {"metadata": _META, "spec": {"holderIdentity": _STR, "leaseDurationSeconds": _INT,
                                                       "renewTime": _STR, "acquireTime": _STR,
                                                       "leaseTransitions": _INT}}),
    "ConfigMap": ("v1.ConfigMap", {"metadata": _META, "data": _STRMAP, "binaryData": _STRMAP, "immutable": _BOOL}),
    "Secret": ("v1.Secret", {"metadata": _META, "data": _STRMAP, "stringData": _STRMAP, "type": _STR,
                             "immutable": _BOOL}),
    "Event": ("v1.Event", {"metadata": _META, "reason": _STR, "message": _STR, "type": _STR, "count": _INT,
                           "involvedObject": {"*": _STR}, "source": {"component": _STR, "host": _STR}}),
}
_STRUCT_NAMES = {"status": "Status", "spec": "Spec", "metadata": "ObjectMeta"}


def _json_type(v):
    return {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), "null")


def _go_type(schema):
    if isinstance(schema, list):
        return "[]" + (schema[1] if len(schema) > 1 else "string" if schema[0] == _STR else "v1.Item")
    if isinstance(schema, dict):
        return "map[string]string" if set(schema) == {"*"} and schema["*"] == _STR else "struct"
    return schema


def type_error(obj, kind):
    """The first value whose JSON type the Go type cannot take, as Go's json error text, or None."""
    if kind not in SCHEMAS:
        return None
    gokind, schema = SCHEMAS[kind]

    def check(value, sch, path, struct):
        if value is None:
            return None
        if isinstance(sch, dict):
            if not isinstance(value, dict):
                return (value, sch, path, struct)
            for k, v in value.items():
                sub = sch.get(k, sch.get("*"))
                if sub is not None:
                    err = check(v, sub, path + [k], _STRUCT_NAMES.get(k, struct) if "*" not in sch else struct)
                    if err:
                        return err
            return None
        if isinstance(sch, list):
            if not isinstance(value, list):
                return (value, sch, path, struct)
            for item in value:
                err = check(item, sch[0], path, struct)
                if err:
                    return err
            return None
        ok = {_STR: isinstance(value, str), _BOOL: isinstance(value, bool)}.get(
            sch, isinstance(value, int) and not isinstance(value, bool))
        return None if ok else (value, sch, path, struct)

    err = check(obj, schema, [], gokind.split(".")[1])
    if not err:
        return None
    value, sch, path, struct = err
    prefix = kind + _STRUCT_NAMES.get(path[0], "") if path else kind
    return (f"json: cannot unmarshal {_json_type(value)} into Go struct field {prefix}.{'.'.join(path)} "
            f"of type {_go_type(sch)}")


KEY_USAGES = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
              "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
              "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
              "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}


def _csr_causes(spec):
    """CertificateSigningRequest create validation: a PEM CSR, a signer name, known usages."""
    causes = []
    signer = spec.get("signerName") or ""
    if not signer:
        causes.append(("spec.signerName", "FieldValueRequired", "Required value"))
    elif "/" not in signer:
        causes.append(("spec.signerName", "FieldValueInvalid", f'Invalid value: "{signer}": must be a fully '
                       "qualified domain and path of the form 'example.com/signer-name'"))
    try:
        pem = base64.b64decode(spec.get("request") or "", validate=True)
        from cryptography import x509
        x509.load_pem_x509_csr(pem)
    except Exception:
        causes.append(("spec.request", "FieldValueInvalid",
                       "Invalid value: []byte{...}: PEM block type must be CERTIFICATE REQUEST"))
    usages = spec.get("usages") or []
    if not usages:
        causes.append(("spec.usages", "FieldValueRequired", "Required value"))
    for i, u in enumerate(usages):
        if u not in KEY_USAGES:
            causes.append((f"spec.usages[{i}]", "FieldValueNotSupported", f'Unsupported value: "{u}"'))
    exp = spec.get("expirationSeconds")
    if exp is not None and exp < 600:
        causes.append(("spec.expirationSeconds", "FieldValueInvalid",
                       f"Invalid value: {exp}: may not specify a duration less than 600 seconds (10 minutes)"))
    return causes


_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _qualified_name_errors(key):
    prefix, _, name = key.rpartition("/")
    errs = []
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN_RE.match(prefix)):
        errs.append("prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric character")
    if not name or len(name) > 63 or not _LABEL_RE.match(name):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
    return errs


def validate_meta(res, meta):
    """ObjectMeta validation: the name's form, label keys and values, annotation keys -> causes."""
    causes = []
    name = meta.get("name") or ""
    regex, what = (_DNS_LABEL_RE, "RFC 1123 label") if res.name == "namespaces" else (_SUBDOMAIN_RE,
                                                                                      "RFC 1123 subdomain")
    if name and res.name not in ("tokenreviews", "subjectaccessreviews") and (
            len(name) > 253 or not regex.match(name)):
        causes.append(("metadata.name", "FieldValueInvalid",
                       f'Invalid value: "{name}": a lowercase {what} must consist of lower case alphanumeric '
                       "characters, '-' or '.', and must start and end with an alphanumeric character"))
    for key, value in (meta.get("labels") or {}).items():
        for err in _qualified_name_errors(key):
            causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{key}": {err}'))
        if value and (len(value) > 63 or not _LABEL_RE.match(value)):
            causes.append(("metadata.labels", "FieldValueInvalid",
                           f'Invalid value: "{value}": a valid label must be an empty string or consist of '
                           "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
                           "character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                           "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"))
    for key in (meta.get("annotations") or {}):
        for err in _qualified_name_errors(key):
            causes.append(("metadata.annotations", "FieldValueInvalid", f'Invalid value: "{key}": {err}'))
    return causes


def _ip_errors(path, value):
    import ipaddress
    try:
        ipaddress.ip_address(value)
        return []
    except ValueError:
        return [(path, "FieldValueInvalid", f'Invalid value: "{value}": must be a valid IP address, (e.g. 10.9.8.7 '
                 "or 2001:db8::ffff)")]


def validate_fields(res, obj):
    """The few field validations a kubelet can run into (pod IPs, lease duration)."""
    causes = []
    if res.name == "pods":
        st = obj.get("status") or {}
        for key in ("podIP", "hostIP"):
            if st.get(key):
                causes += _ip_errors(f"status.{key}", st[key])
        for key in ("podIPs", "hostIPs"):
            for i, item in enumerate(_each(st.get(key))):
                causes += _ip_errors(f"status.{key}[{i}].ip", item.get("ip") or "")
    elif res.name == "leases":
        dur = (obj.get("spec") or {}).get("leaseDurationSeconds")
        if dur is not None and dur <= 0:
            causes.append(("spec.leaseDurationSeconds", "FieldValueInvalid",
                           f"Invalid value: {dur}: must be greater than 0"))
    return causes


_IMAGE_RE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                       r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::([\w][\w.-]{0,127}))?(@[a-z0-9]+:[a-f0-9]{32,})?$")


def default_pull_policy(image):
    """SetDefaults_Container (pkg/apis/core/v1/defaults.go): Always when the image's tag, as
    ParseImageName reads it, is "latest" (no tag and no digest reads as latest; a digest does not
    hide a tag); IfNotPresent otherwise, also for a name it cannot parse (no tag)."""
    if not _IMAGE_RE.match(image or ""):
        return "IfNotPresent"
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]      # a registry's :port is not a tag
    tag = last.partition(":")[2] if ":" in last else ("" if digest else "latest")
    return "Always" if tag == "latest" else "IfNotPresent"


_SI = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6,
       "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
       "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value):
    """A resource.Quantity's value as an exact fraction (0 for what does not parse)."""
    m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?([a-zA-Z]*)", str(value).strip())
    if not m or m[3] not in _SI or (m[2] and m[3]):
        return Fraction(0)
    return Fraction(m[1]) * Fraction(10) ** int(m[2] or 0) * _SI[m[3]]


def qos_class(spec):
    """ComputePodQOS (pkg/apis/core/helper/qos): only cpu and memory count, and only above zero; the
    pod's requests and limits are summed over init and app containers. BestEffort with none;
    Guaranteed when every container has both limits and the summed requests equal the summed limits."""
    totals = {"requests": collections.Counter(), "limits": collections.Counter()}
    every_container_limited = True
    for c in _each(spec.get("containers")) + _each(spec.get("initContainers")):
        resources = c.get("resources") or {}
        for kind, total in totals.items():
            for name, value in (resources.get(kind) or {}).items():
                if name in ("cpu", "memory") and quantity(value) > 0:
                    total[name] += quantity(value)
        limited = {n for n, v in (resources.get("limits") or {}).items() if quantity(v) > 0}
        every_container_limited &= {"cpu", "memory"} <= limited
    requests, limits = totals["requests"], totals["limits"]
    if not requests and not limits:
        return "BestEffort"
    if every_container_limited and len(requests) == len(limits) and all(limits.get(n) == v for n, v in requests.items()):
        return "Guaranteed"
    return "Burstable"


def _default_container(c):
    c.setdefault("resources", {})
    res = c["resources"]
    if isinstance(res, dict) and res.get("limits") and not res.get("requests"):
        res["requests"] = dict(res["limits"])
    elif isinstance(res, dict) and res.get("limits"):
        for k, v in res["limits"].items():
            res["requests"].setdefault(k, v)
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("imagePullPolicy", default_pull_policy(c.get("image")))
    for p in _each(c.get("ports")):
        p.setdefault("protocol", "TCP")
    for e in _each(c.get("env")):
        fr = (e.get("valueFrom") or {}).get("fieldRef")
        if isinstance(fr, dict):
            fr.setdefault("apiVersion", "v1")


def _default_volume(v):
    for key in ("configMap", "secret", "downwardAPI", "projected"):
        if isinstance(v.get(key), dict):
            v[key].setdefault("defaultMode", 420)
    if isinstance(v.get("hostPath"), dict):
        v["hostPath"].setdefault("type", "")
    items = (v.get("downwardAPI") or {}).get("items") if isinstance(v.get("downwardAPI"), dict) else None
    for it in _each(items):
        if isinstance(it.get("fieldRef"), dict):
            it["fieldRef"].setdefault("apiVersion", "v1")
    for src in _each((v.get("projected") or {}).get("sources") if isinstance(v.get("projected"), dict) else None):
        if isinstance(src.get("serviceAccountToken"), dict):
            src["serviceAccountToken"].setdefault("expirationSeconds", 3600)
        for it in _each((src.get("downwardAPI") or {}).get("items")):
            if isinstance(it.get("fieldRef"), dict):
                it["fieldRef"].setdefault("apiVersion", "v1")


def pod_spec_causes(spec):
    """The pod validations a hand-written manifest most often fails -> [(field, reason, message)]."""
    causes = []
    if not _each(spec.get("containers")):
        causes.append(("spec.containers", "FieldValueRequired", "Required value"))
    seen = set()
    vols = [v.get("name") for v in _each(spec.get("volumes"))]
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(_each(spec.get(kind))):
            if not c.get("name"):
                causes.append((f"spec.{kind}[{i}].name", "FieldValueRequired", "Required value"))
            elif c["name"] in seen:
                causes.append((f"spec.{kind}[{i}].name", "FieldValueDuplicate", f'Duplicate value: "{c["name"]}"'))
            seen.add(c.get("name"))
            if not c.get("image"):
                causes.append((f"spec.{kind}[{i}].image", "FieldValueRequired", "Required value"))
            for j, m in enumerate(_each(c.get("volumeMounts"))):
                if m.get("name") not in vols:
                    causes.append((f"spec.{kind}[{i}].volumeMounts[{j}].name", "FieldValueNotFound",
                                   f'Not found: "{m.get("name")}"'))
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", "FieldValueNotSupported", f'Unsupported value: "{spec["restartPolicy"]}"'
                       ': supported values: "Always", "OnFailure", "Never"'))
    return causes


def _add_token_volume(spec):
    """The kube-api-access-* projected volume and its mount in every container (contract 14)."""
    vname = "kube-api-access-" + rand_suffix()
    spec["volumes"] = _each(spec.get("volumes")) + [{"name": vname, "projected": {"sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                    "fieldPath": "metadata.namespace"}}]}},
        {"configMap": {"name": "openshift-service-ca.crt",
                       "items": [{"key": "service-ca.crt", "path": "service-ca.crt"}]}}],
        "defaultMode": 420}}]
    for c in _each(spec.get("initContainers")) + _each(spec.get("containers")):
        c["volumeMounts"] = _each(c.get("volumeMounts")) + [{"name": vname, "readOnly": True, "mountPath": SA_MOUNT}]


def _tolerates(tols, key):
    for t in _each(tols):
        if t.get("effect") not in (None, "", "NoExecute"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") == key:
            return True
    return False


def pod_references(pod):
    """(configmaps, secrets, serviceaccounts, pvcs) the pod names: what the Node authorizer's graph holds."""
    spec = pod.get("spec") or {}
    cms, secrets, pvcs = set(), set(), set()
    sas = {spec.get("serviceAccountName") or "default"}
    for ps in _each(spec.get("imagePullSecrets")):
        secrets.add(ps.get("name"))
    for c in _each(spec.get("containers")) + _each(spec.get("initContainers")) + _each(
            spec.get("ephemeralContainers")):
        for ef in _each(c.get("envFrom")):
            if isinstance(ef.get("configMapRef"), dict):
                cms.add(ef["configMapRef"].get("name"))
            if isinstance(ef.get("secretRef"), dict):
                secrets.add(ef["secretRef"].get("name"))
        for e in _each(c.get("env")):
            vf = e.get("valueFrom") or {}
            if isinstance(vf.get("configMapKeyRef"), dict):
                cms.add(vf["configMapKeyRef"].get("name"))
            if isinstance(vf.get("secretKeyRef"), dict):
                secrets.add(vf["secretKeyRef"].get("name"))
    for v in _each(spec.get("volumes")):
        if isinstance(v.get("configMap"), dict):
            cms.add(v["configMap"].get("name"))
        if isinstance(v.get("secret"), dict):
            secrets.add(v["secret"].get("secretName"))
        if isinstance(v.get("persistentVolumeClaim"), dict):
            pvcs.add(v["persistentVolumeClaim"].get("claimName"))
        for key in ("csi", "flexVolume", "cephfs", "rbd", "iscsi", "azureFile", "scaleIO", "storageos"):
            ref = (v.get(key) or {}).get("nodePublishSecretRef") or (v.get(key) or {}).get("secretRef")
            if isinstance(ref, dict):
                secrets.add(ref.get("name"))
        for src in _each((v.get("projected") or {}).get("sources") if isinstance(v.get("projected"), dict) else None):
            if isinstance(src.get("configMap"), dict):
                cms.add(src["configMap"].get("name"))
            if isinstance(src.get("secret"), dict):
                secrets.add(src["secret"].get("name"))
    return cms - {None}, secrets - {None}, sas, pvcs - {None}


def token_audiences(pod):
    """Audiences named by the pod's projected serviceAccountToken sources ("" = no audience given)."""
    auds = set()
    for v in _each((pod.get("spec") or {}).get("volumes")):
        for src in _each((v.get("projected") or {}).get("sources") if isinstance(v.get("projected"), dict) else None):
            sat = src.get("serviceAccountToken")
            if isinstance(sat, dict):
                auds.add(sat.get("audience") or "")
    return auds


###############################################################################
# Test PKI ####################################################################
###############################################################################

class TestPKI:
    """A test CA (EC P-256) and the certificates signed by it; files live in `directory`."""
    __test__ = False

    def __init__(self, directory):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "minikrust-test-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                        .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                        .not_valid_before(now - datetime.timedelta(hours=1))
                        .not_valid_after(now + datetime.timedelta(days=365))
                        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                       critical=True)
                        .sign(self.ca_key, hashes.SHA256()))
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_key_pem = self._key_pem(self.ca_key)
        self.ca_path = self._write("ca.crt", self.ca_pem)
        self.ca_key_path = self._write("ca.key", self.ca_key_pem)
        self.server_cert_path, self.server_key_path = self.issue(
            "kube-apiserver", (), "apiserver", server=True, sans=("localhost", "127.0.0.1", "kubernetes"))

    def _key_pem(self, key):
        s = self._ser
        return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _build(self, subject, public_key, sans=(), server=False, client=True, days=365):
        import ipaddress
        x509 = self._x509
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))
        usages = []
        if server:
            usages.append(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        if alt:
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return b.sign(self.ca_key, self._hashes.SHA256())

    def issue(self, cn, orgs=(), basename=None, server=False, client=True, sans=(), directory=None, days=365):
        """A key + certificate signed by the CA; -> (cert_path, key_path)."""
        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attrs = [x509.NameAttribute(oid.ORGANIZATION_NAME, o) for o in orgs] + [x509.NameAttribute(oid.COMMON_NAME, cn)]
        cert = self._build(x509.Name(attrs), key.public_key(), sans, server, client, days)
        basename = basename or re.sub(r"[^\w.-]", "_", cn)
        directory = str(directory or self.directory)
        os.makedirs(directory, exist_ok=True)
        cert_path = os.path.join(directory, basename + ".crt")
        key_path = os.path.join(directory, basename + ".key")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(self._ser.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(self._key_pem(key))
        return cert_path, key_path

    def client_cert(self, cn, orgs=(), directory=None):
        return self.issue(cn, orgs, directory=directory)

    def node_cert(self, node_name, directory=None):
        return self.issue(f"system:node:{node_name}", ("system:nodes",), directory=directory)

    def sign_csr(self, csr_pem, usages=("client auth",), days=365):
        """Sign a PEM CSR as the CA (keeps its subject and SANs) -> certificate PEM bytes."""
        x509 = self._x509
        csr = x509.load_pem_x509_csr(csr_pem if isinstance(csr_pem, bytes) else csr_pem.encode())
        sans = []
        try:
            ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [str(v) for v in ext.get_values_for_type(x509.DNSName)] + \
                   [str(v) for v in ext.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
        cert = self._build(csr.subject, csr.public_key(), sans, server="server auth" in usages,
                           client="client auth" in usages, days=days)
        return cert.public_bytes(self._ser.Encoding.PEM)


###############################################################################
# The fake API server #########################################################
###############################################################################

@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    params: dict
    content_type: str
    user: str
    groups: tuple
    status: int = 0
    body: object = None
    time: float = field(default_factory=time.time)

    @property
    def path_with_query(self):
        return self.path + ("?" + self.query if self.query else "")


@dataclass
class User:
    name: str
    groups: tuple = ()
    uid: str = ""

    @property
    def node(self):
        if "system:nodes" in self.groups and self.name.startswith("system:node:"):
            return self.name[len("system:node:"):]
        return None

    @property
    def admin(self):
        return "system:masters" in self.groups


ANONYMOUS = User("system:anonymous", ("system:unauthenticated",))


@dataclass
class _Rule:
    n: int
    method: str = None
    path: str = None
    status: int = 500
    retry_after: object = None
    action: str = "fail"

    def matches(self, method, path):
        return (self.method is None or self.method.upper() == method) and (
            self.path is None or re.search(self.path, path) is not None)


def _lines(events):
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)


class _Watch:
    """One open watch: its filter, its position in the event history, and the signals tests send it."""

    def __init__(self, fake, handler, res, ns, params, fsel):
        self.fake, self.handler, self.res, self.ns, self.fsel = fake, handler, res, ns, fsel
        self.lsel = parse_label_selector(params.get("labelSelector"))
        self.bookmarks = params.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        self.deadline = time.monotonic() + timeout if timeout else None
        self.rv_param = params.get("resourceVersion") or ""
        self.initial_events = params.get("sendInitialEvents") in ("true", "1", "True")
        self.table = "as=Table" in (handler.headers.get("Accept") or "")   # kubectl get -w
        self.epoch = fake._watch_epoch
        self.kick = None            # "abort" | "end"
        self.expire = False
        self.bookmark_now = False
        self.cursor = 0

    def render(self, events):
        if self.table:
            events = [dict(e, object=as_table(self.res, [e["object"]], e["object"]["metadata"]["resourceVersion"]))
                      if e["type"] in ("ADDED", "MODIFIED", "DELETED") else e for e in events]
        return _lines(events)

    def matches(self, obj):
        return obj is not None and (not self.ns or obj["metadata"].get("namespace") == self.ns) and \
            match_fields(obj, self.fsel) and match_labels(obj, self.lsel)

    def start(self):
        """Under the fake's lock: the initial events (ADDED for rv unset/0, or an ERROR 410)."""
        fake = self.fake
        if self.rv_param in ("", "0"):
            self.cursor = fake._rv
            added = [{"type": "ADDED", "object": copy.deepcopy(o)} for (r, _, _), o in sorted(fake._objects.items())
                     if r == self.res.name and self.matches(o)]
            if self.initial_events:     # a watch-list: the end of the initial events is a marked BOOKMARK
                end = _bookmark(self.res, self.cursor)
                end["object"]["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
                added.append(end)
            return added
        try:
            self.cursor = int(self.rv_param)
        except ValueError:
            raise bad_request(f'invalid resource version "{self.rv_param}"') from None
        if self.cursor < fake._compacted:
            status = ApiStatusError(410, "Expired", f"too old resource version: {self.cursor} ({fake._compacted})")
            if fake.watch_expired_as == "http":
                raise status
            return [{"type": "ERROR", "object": status.status()}]
        if self.cursor > fake._rv:
            # a resourceVersion from the future (another server's): the watch cache waits, then gives up
            fake._cond.wait_for(lambda: fake._rv >= self.cursor, fake.too_large_rv_wait)
            if self.cursor > fake._rv:
                status = ApiStatusError(504, "Timeout", f"Too large resource version: {self.cursor}, current: "
                                        f"{fake._rv}", {"causes": [{"reason": "ResourceVersionTooLarge",
                                                                    "message": "Too large resource version"}],
                                                        "retryAfterSeconds": 1})
                return [{"type": "ERROR", "object": status.status()}]
        return []

    def _translate(self, etype, obj, old):
        """A MODIFIED that moves an object into or out of the filter is an ADDED or DELETED for this watch."""
        now_m, old_m = self.matches(obj), etype == "MODIFIED" and self.matches(old)
        if etype == "MODIFIED" and now_m != old_m:
            return {"type": "ADDED" if now_m else "DELETED", "object": obj}
        return {"type": etype, "object": obj} if now_m else None

    def collect(self, wait):
        """Under the lock: wait for news, then -> (events, end) where end is None|"abort"|"expire"|"end"."""
        fake = self.fake
        i = bisect.bisect_right(fake._history_rvs, self.cursor)
        if i >= len(fake._history) and not (self.kick or self.expire or self.bookmark_now):
            fake._cond.wait(max(wait, 0.0))
            i = bisect.bisect_right(fake._history_rvs, self.cursor)
        out = []
        for rv, etype, rname, obj, old in fake._history[i:]:
            self.cursor = rv
            ev = self._translate(etype, obj, old) if rname == self.res.name else None
            if ev:
                out.append(ev)
        if self.bookmark_now and self.bookmarks:
            out.append(_bookmark(self.res, self.cursor))
        self.bookmark_now = False
        if self.epoch != fake._watch_epoch or not fake._running or self.kick == "abort":
            return out, "abort"
        if self.expire:
            out.append({"type": "ERROR", "object": ApiStatusError(
                410, "Expired", f"too old resource version: {self.cursor} ({fake._compacted})").status()})
            return out, "expire"
        return out, self.kick

    def stream(self):
        """Send events until the watch ends; -> True when the connection must be cut (a drop)."""
        h, fake = self.handler, self.fake
        next_bookmark = time.monotonic() + fake.bookmark_interval
        while True:
            now = time.monotonic()
            # every write, drop, expiry, bookmark request and stop() notifies: an idle watch need not poll
            wait = min(5.0, next_bookmark - now if self.bookmarks else 5.0,
                       self.deadline - now if self.deadline else 5.0)
            with fake._lock:
                events, end = self.collect(wait)
            if end == "abort":
                return True
            now = time.monotonic()
            timed_out = self.deadline is not None and now >= self.deadline
            if self.bookmarks and (timed_out or now >= next_bookmark):
                # the real server sends one right before a timeout closes the watch (contract 17)
                next_bookmark = now + fake.bookmark_interval
                events.append(_bookmark(self.res, self.cursor))
            if events:
                h.write_chunk(self.render(events))
            if end or timed_out:
                return False


class FakeApiServer:
    """The fake kube-apiserver; see the module docstring for its face."""

    def __init__(self, tls=False, pki=None, pki_dir=None, port=0):
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._objects = {}          # (resource, namespace, name) -> dict
        self._history = []          # [(rv, type, resource, obj, old_obj)]
        self._history_rvs = []
        self._rv = 100
        self._compacted = 0
        self._tokens = {}
        self._basic = {}
        self._node_tokens = {}
        self._rules = []
        self._pauses = []
        self._paused = threading.Event()
        self._watches = []
        self._watch_epoch = 0
        self._conns = set()
        self._server = None
        self._thread = None
        self._running = False
        self.requests = []
        self._local = threading.local()   # per request: the field manager named by the User-Agent
        self._grants = []
        self.token_reviews = []
        self.subject_access_reviews = []
        self.token_users = {}
        self.sar_policy = None
        self.csr_auto_approve = False
        self.on_csr_created = None
        self.watch_expired_as = "event"
        self.bookmark_interval = 2.0
        self.too_large_rv_wait = 3.0
        self.service_account_max_token_expiration = None
        self.smp_set_element_order_crash = True
        self.kubelet_address = {}
        self.kubelet_ca_path = None
        self.kubelet_client_token = None
        self.tls = tls
        self._pki = pki
        self._pki_dir = pki_dir
        if tls and pki is None:
            self._pki = TestPKI(pki_dir or _tempdir())
        self.admin_token = "admin-" + uuid.uuid4().hex
        self.add_token(self.admin_token, "admin", ("system:masters", "system:authenticated"))
        self.host = "127.0.0.1"
        self.port = port
        for ns in SYSTEM_NAMESPACES:
            self._ensure_namespace(ns)
        self._store("ADDED", RESOURCES["services"], "default", "kubernetes", {   # what kube-apiserver publishes
            "kind": "Service", "apiVersion": "v1",
            "metadata": {"name": "kubernetes", "namespace": "default", "uid": str(uuid.uuid4()),
                         "creationTimestamp": fmt_time(utcnow()),
                         "labels": {"component": "apiserver", "provider": "kubernetes"},
                         "managedFields": [{"manager": "kube-apiserver", "operation": "Update", "apiVersion": "v1",
                                            "time": fmt_time(utcnow()), "fieldsType": "FieldsV1", "fieldsV1": {}}]},
            "spec": {"ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": 6443}],
                     "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "type": "ClusterIP",
                     "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}}})

    # --- lifecycle ---------------------------------------------------------

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def pki(self):
        if self._pki is None:
            self._pki = TestPKI(self._pki_dir or _tempdir())
        return self._pki

    @property
    def ca_path(self):
        """The CA file that signs the server's certificate and trusted client certificates."""
        return self.pki.ca_path

    def client_cert(self, user="admin", directory=None):
        """(cert_path, key_path) for `user`: "admin" (O=system:masters) or a node name (O=system:nodes)."""
        if user == "admin":
            return self.pki.client_cert("admin", ("system:masters",), directory)
        return self.pki.node_cert(user[len("system:node:"):] if user.startswith("system:node:") else user,
                                  directory)

    def start(self):
        if self._running:
            return self
        server = _HTTPServer((self.host, self.port), _Handler)
        server.fake = self
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.pki.server_cert_path, self.pki.server_key_path)
            ctx.load_verify_locations(self.pki.ca_path)
            ctx.verify_mode = ssl.CERT_OPTIONAL
            server.ssl_context = ctx
        self.port = server.server_address[1]
        self._server = server
        self._running = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fake-apiserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving: the port refuses connections, open ones (watches too) are cut; state is kept."""
        if not self._running:
            return
        self._running = False
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            self._watch_epoch += 1
            self._cond.notify_all()
            conns = list(self._conns)
        for c in conns:
            _abort(c)
        self.resume()
        self._thread.join(5)

    def restart(self, expire_watches=False):
        """Stop and start on the same port. expire_watches: the new "watch cache" starts at the current
        resourceVersion, so resuming a watch from an older one gets 410 Expired (as after a real restart)."""
        self.stop()
        if expire_watches:
            self.compact()
        self.start()

    def close(self):
        self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- identities --------------------------------------------------------

    def add_token(self, token, user, groups=()):
        groups = tuple(groups)
        if "system:authenticated" not in groups:
            groups += ("system:authenticated",)
        self._tokens[token] = User(user, groups, str(uuid.uuid5(uuid.NAMESPACE_OID, user)))
        return token

    def node_token(self, name):
        with self._lock:
            if name not in self._node_tokens:
                token = f"node-{uuid.uuid4().hex}"
                self.add_token(token, f"system:node:{name}", ("system:nodes",))
                self._node_tokens[name] = token
            return self._node_tokens[name]

    add_node_token = node_token

    def add_bootstrap_token(self, token_id=None, secret=None):
        token_id = token_id or "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(6))
        secret = secret or "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(16))
        self.add_token(f"{token_id}.{secret}", f"system:bootstrap:{token_id}",
                       ("system:bootstrappers", "system:bootstrappers:kubeadm:default-node-token"))
        return f"{token_id}.{secret}"

    def add_basic_user(self, username, password, groups=()):
        groups = tuple(groups) + ("system:authenticated",)
        self._basic[(username, password)] = User(username, groups)

    def _token_for(self, user):
        if user in (None, "anonymous"):
            return None
        if user == "admin":
            return self.admin_token
        if user.startswith("system:node:"):
            user = user[len("system:node:"):]
        return self.node_token(user)

    def write_kubeconfig(self, path, user="admin", client_cert=False, token=None):
        path = str(path)
        cluster = {"server": self.url}
        if self.tls:
            cluster["certificate-authority"] = self.pki.ca_path
        if client_cert:
            cert, key = self.client_cert(user, os.path.dirname(path) or ".")
            auth = {"client-certificate": cert, "client-key": key}
        else:
            auth = {"token": token or self._token_for(user)}
        name = "admin" if user == "admin" else f"system:node:{user}"
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": cluster}],
               "users": [{"name": name, "user": auth}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": name}}],
               "preferences": {}}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)  # JSON is YAML
        return path

    def kubeconfig(self, dir_or_path, node=None, admin=False, **kw):
        path = str(dir_or_path)
        if os.path.isdir(path):
            path = os.path.join(path, f"kubeconfig-{'admin' if admin or not node else node}")
        return self.write_kubeconfig(path, "admin" if admin or not node else node, **kw)

    def client(self, user="admin"):
        headers = {}
        token = self._token_for(user)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return Client(self.url, headers, verify=self.pki.ca_path if self.tls else True)

    # --- fault injection ---------------------------------------------------

    def fail_next(self, n=1, status=500, method=None, path=None, retry_after=None, path_prefix=None):
        if path_prefix and not path:
            path = "^" + re.escape(path_prefix)
        if status == 429 and retry_after is None:
            retry_after = 1
        with self._lock:
            self._rules.append(_Rule(n, method, path, status, retry_after))

    def close_next(self, n=1, method=None, path=None):
        with self._lock:
            self._rules.append(_Rule(n, method, path, action="close"))

    def lose_answer_next(self, n=1, method=None, path=None):
        with self._lock:
            self._rules.append(_Rule(n, method, path, action="lose"))

    def delay_next(self, n=1, seconds=1.0, method=None, path=None):
        """The next n matching requests are answered normally, after `seconds`."""
        with self._lock:
            self._rules.append(_Rule(n, method, path, retry_after=seconds, action="delay"))

    def pause(self, method=None, path=None):
        with self._lock:
            self._pauses.append((method, path))
            self._paused.clear()

    def resume(self):
        with self._lock:
            self._pauses = []
            self._paused.set()

    def drop_watches(self, graceful=False):
        with self._lock:
            for w in self._watches:
                w.kick = "end" if graceful else "abort"
            self._cond.notify_all()

    def send_bookmarks(self):
        with self._lock:
            for w in self._watches:
                w.bookmark_now = True
            self._cond.notify_all()

    def open_watches(self):
        with self._lock:
            return len(self._watches)

    def compact(self, rv=None):
        with self._lock:
            rv = self._rv if rv is None else int(rv)
            self._compacted = max(self._compacted, rv)
            cut = bisect.bisect_right(self._history_rvs, rv)
            del self._history[:cut]
            del self._history_rvs[:cut]

    def expire_watches(self):
        with self._lock:
            self.compact()
            for w in self._watches:
                w.expire = True
            self._cond.notify_all()

    # --- request log -------------------------------------------------------

    def count(self, method=None, path=None, user=None):
        return len(self.find_requests(method, path, user))

    def find_requests(self, method=None, path=None, user=None):
        return [r for r in list(self.requests)
                if (method is None or r.method == method.upper())
                and (path is None or re.search(path, r.path))
                and (user is None or r.user == user or r.user == f"system:node:{user}")]

    def clear_requests(self):
        self.requests.clear()

    # --- state helpers (Python side) --------------------------------------

    @property
    def resource_version(self):
        return self._rv

    @staticmethod
    def _res(kind):
        key = kind.lower()
        if key in RESOURCES:
            return RESOURCES[key]
        if key in KIND_TO_RESOURCE:
            return RESOURCES[KIND_TO_RESOURCE[key]]
        if key + "s" in RESOURCES:
            return RESOURCES[key + "s"]
        raise KeyError(f"unknown resource {kind!r}")

    def get(self, kind, ns_or_name, name=None, namespace=None):
        res = self._res(kind)
        if name is None:
            name, ns = ns_or_name, namespace
        else:
            ns = ns_or_name
        if res.namespaced and ns is None:
            ns = "default"
        with self._lock:
            obj = self._objects.get((res.name, ns if res.namespaced else "", name))
            return copy.deepcopy(obj)

    def list(self, kind, namespace=None):
        res = self._res(kind)
        with self._lock:
            return [copy.deepcopy(o) for (r, ns, _), o in sorted(self._objects.items())
                    if r == res.name and (namespace is None or ns == namespace)]

    def create(self, obj, namespace=None, body=None):
        """create(obj) or create(kind, namespace, obj): an admin POST (kind/apiVersion filled in)."""
        if isinstance(obj, str):
            res = self._res(obj)
            obj = dict(body, kind=res.kind, apiVersion=res.api_version)
            namespace = namespace or (obj.get("metadata") or {}).get("namespace")
        res = self._res(obj["kind"])
        ns = (namespace or (obj.get("metadata") or {}).get("namespace") or "default") if res.namespaced else ""
        if ns:
            self._ensure_namespace(ns)
        return self._create(self._admin, res, ns, copy.deepcopy(obj), {})

    def create_pod(self, manifest, node_name=None, namespace=None):
        pod = copy.deepcopy(manifest)
        pod.setdefault("apiVersion", "v1")
        pod.setdefault("kind", "Pod")
        if node_name:
            pod.setdefault("spec", {})["nodeName"] = node_name
        return self.create(pod, namespace)

    def create_configmap(self, ns, name, data, **extra):
        return self.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
                            "data": data, **extra})

    def create_secret(self, ns, name, data, type="Opaque", **extra):
        enc = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()}
        return self.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                            "data": enc, "type": type, **extra})

    def update(self, obj, subresource=None):
        res = self._res(obj["kind"])
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace", "default") if res.namespaced else ""
        return self._update(self._admin, res, ns, meta.get("name"), subresource, copy.deepcopy(obj))

    def patch(self, kind, ns, name, patch, patch_type="merge", subresource=None):
        res = self._res(kind)
        ctype = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
                 "json": "application/json-patch+json"}[patch_type]
        return self._patch(self._admin, res, ns if res.namespaced else "", name, subresource, patch, ctype, {})

    def delete_pod(self, ns, name, grace=None, uid=None):
        opts = {}
        if grace is not None:
            opts["gracePeriodSeconds"] = grace
        if uid:
            opts["preconditions"] = {"uid": uid}
        return self._delete(self._admin, RESOURCES["pods"], ns, name, opts)

    def remove_pod(self, ns, name):
        return self.delete_pod(ns, name, grace=0)

    def remove(self, kind, ns, name):
        res = self._res(kind)
        if res.name == "pods":
            return self.remove_pod(ns, name)
        return self._delete(self._admin, res, ns if res.namespaced else "", name, {})

    def events(self, namespace=None, involved_name=None, reason=None):
        return [e for e in self.list("events", namespace)
                if (involved_name is None or e.get("involvedObject", {}).get("name") == involved_name)
                and (reason is None or e.get("reason") == reason)]

    def csrs(self):
        return self.list("certificatesigningrequests")

    def approve_csr(self, name, certificate_pem=None, sign=True):
        """Approve a CSR (condition Approved) and, with sign, set status.certificate from the test CA."""
        with self._lock:
            key = ("certificatesigningrequests", "", name)
            if key not in self._objects:
                raise KeyError(name)
            csr = copy.deepcopy(self._objects[key])
            status = csr.setdefault("status", {})
            conds = status.setdefault("conditions", [])
            if not any(c.get("type") == "Approved" for c in conds):
                now = fmt_time(utcnow())
                conds.append({"type": "Approved", "status": "True", "reason": "AutoApproved",
                              "message": "approved by the test", "lastUpdateTime": now, "lastTransitionTime": now})
            if certificate_pem is None and sign:
                usages = tuple(csr.get("spec", {}).get("usages") or ("client auth",))
                certificate_pem = self.pki.sign_csr(base64.b64decode(csr["spec"]["request"]), usages)
            if certificate_pem is not None:
                pem = certificate_pem if isinstance(certificate_pem, bytes) else certificate_pem.encode()
                status["certificate"] = base64.b64encode(pem).decode()
            return self._store("MODIFIED", RESOURCES["certificatesigningrequests"], "", name, csr)

    def deny_csr(self, name, message="denied by the test"):
        with self._lock:
            csr = copy.deepcopy(self._objects[("certificatesigningrequests", "", name)])
            now = fmt_time(utcnow())
            csr.setdefault("status", {}).setdefault("conditions", []).append(
                {"type": "Denied", "status": "True", "reason": "Denied", "message": message,
                 "lastUpdateTime": now, "lastTransitionTime": now})
            return self._store("MODIFIED", RESOURCES["certificatesigningrequests"], "", name, csr)

    _admin = User("admin", ("system:masters", "system:authenticated"))

    # --- storage core ------------------------------------------------------

    def _next_rv(self):
        self._rv += 1
        return self._rv

    def _store(self, etype, res, ns, name, obj, old=None):
        """Write (or delete) under the lock; record the watch event; return a copy."""
        with self._lock:
            key = (res.name, ns, name)
            old = self._objects.get(key) if old is None else old
            rv = self._next_rv()
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(rv)
            if etype == "DELETED":
                self._objects.pop(key, None)
            else:
                self._objects[key] = obj
            self._history.append((rv, etype, res.name, obj, old))
            self._history_rvs.append(rv)
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def _ensure_namespace(self, ns):
        with self._lock:
            if ("namespaces", "", ns) in self._objects:
                return
            now = fmt_time(utcnow())
            self._store("ADDED", RESOURCES["namespaces"], "", ns, {
                "kind": "Namespace", "apiVersion": "v1",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now,
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
            self._namespace_children(ns)

    def _namespace_children(self, ns):
        """What controllers put in every namespace: the default ServiceAccount and the CA configmaps."""
        now = fmt_time(utcnow())
        ca = (self._pki.ca_pem.decode() if self._pki else
              "-----BEGIN CERTIFICATE-----\nZmFrZS1jYQ==\n-----END CERTIFICATE-----\n")
        for res, name, body in (
                ("serviceaccounts", "default", {}),
                ("configmaps", "kube-root-ca.crt", {"data": {"ca.crt": ca}}),
                ("configmaps", "openshift-service-ca.crt", {"data": {"service-ca.crt": ca}})):
            r = RESOURCES[res]
            obj = {"kind": r.kind, "apiVersion": r.api_version,
                   "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now},
                   **body}
            self._store("ADDED", r, ns, name, obj)

    def _get_obj(self, res, ns, name):
        obj = self._objects.get((res.name, ns, name))
        if obj is None:
            raise not_found(res, name)
        return obj

    def _new_meta(self, res, ns, obj):
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + rand_suffix()
        if not meta.get("name"):
            raise invalid(res, "", [("metadata.name", "FieldValueRequired",
                                     "Required value: name or generateName is required")])
        if res.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = fmt_time(utcnow())
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "generation"):
            meta.pop(k, None)
        if res.name == "pods":
            meta["generation"] = 1
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        return meta

    def _create(self, user, res, ns, obj, params):
        if not isinstance(obj, dict):
            raise bad_request("the body of the request was in an unknown format")
        err = type_error(obj, res.kind)
        if err:
            raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: {err}')
        with self._lock:
            if res.namespaced and ("namespaces", "", ns) not in self._objects:
                raise ApiStatusError(404, "NotFound", f'namespaces "{ns}" not found',
                                     {"name": ns, "kind": "namespaces"})
            meta = self._new_meta(res, ns, obj)
            name = meta["name"]
            try:
                shape(obj)
            except ValueError as exc:
                raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
                                  f"{exc}") from None
            self._admit_create(user, res, ns, obj)
            self._validate(res, obj, None)
            if (res.name, ns, name) in self._objects:
                raise already_exists(res, name)
            if res.name != "certificatesigningrequests":   # a created CSR comes back without them (extended/60)
                self._managed(obj, params, None)
            stored = self._store("ADDED", res, ns, name, shape(obj))
            if res.name == "namespaces":
                self._namespace_children(name)
        if res.name == "certificatesigningrequests":
            if self.csr_auto_approve:
                stored = self.approve_csr(name)
            if self.on_csr_created:
                self.on_csr_created(copy.deepcopy(stored))
        return stored

    def _managed(self, obj, params, subresource, user_agent="python-requests"):
        manager = params.get("fieldManager") or getattr(self._local, "manager", None) or user_agent
        entry = {"manager": manager, "operation": "Update", "apiVersion": obj.get("apiVersion"),
                 "time": fmt_time(utcnow()), "fieldsType": "FieldsV1", "fieldsV1": {}}
        if subresource:
            entry["subresource"] = subresource
        entries = [e for e in (obj["metadata"].get("managedFields") or [])
                   if isinstance(e, dict) and not (e.get("manager") == manager and e.get("subresource") == subresource)]
        obj["metadata"]["managedFields"] = entries + [entry]

    # --- admission: defaults and checks ------------------------------------

    def _admit_create(self, user, res, ns, obj):
        meta = obj["metadata"]
        node = user.node
        if res.name == "nodes":
            if node is not None and meta["name"] != node:
                raise forbidden(res, meta["name"], f'node "{node}" is not allowed to modify node "{meta["name"]}"')
            if node is not None:
                self._check_node_labels(res, meta["name"], {}, meta.get("labels") or {})
            spec = obj.setdefault("spec", {})
            taints = spec.get("taints") if isinstance(spec.get("taints"), list) else []
            if not any(isinstance(t, dict) and t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
                # TaintNodesByCondition: every new Node starts not-ready for scheduling.
                spec["taints"] = taints + [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
            obj.setdefault("status", {})
        elif res.name == "pods":
            if node is not None:
                anns = meta.get("annotations") or {}
                if "kubernetes.io/config.mirror" not in anns:
                    raise forbidden(res, meta["name"], "pod does not have \"kubernetes.io/config.mirror\" "
                                    "annotation, node \"%s\" can only create mirror pods" % node)
                if (obj.get("spec") or {}).get("nodeName") != node:
                    raise forbidden(res, meta["name"], f'node "{node}" can only create pods with spec.nodeName '
                                    "set to itself")
                self._check_mirror_owner(res, meta, node)
            self._admit_pod(res, ns, obj)
            if node is not None:   # NodeRestriction: a mirror pod may use no API objects
                cms, _, _, pvcs = pod_references(obj)
                if cms:
                    raise forbidden(res, meta["name"], f'node "{node}" can not create pods that use configmaps')
                if pvcs:
                    raise forbidden(res, meta["name"], f'node "{node}" can not create pods that use persistent '
                                    "volumes")
        elif res.name == "leases":
            self._check_lease(user, res, ns, meta["name"])
        elif res.name == "secrets":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if (obj.get("data") or string_data) else obj.get("data")
            for k, v in string_data.items():
                data[k] = base64.b64encode(v.encode()).decode()
        elif res.name == "events":
            self._check_event(res, ns, obj)
        elif res.name == "certificatesigningrequests":
            spec = obj.setdefault("spec", {})
            spec["username"] = user.name
            if user.uid:
                spec["uid"] = user.uid
            spec["groups"] = list(user.groups)
            if user.uid:
                spec["uid"] = user.uid
            causes = _csr_causes(spec)
            if causes:
                raise invalid(res, meta["name"], causes)
            obj["status"] = {}

    def _admit_pod(self, res, ns, pod):
        """Pod create: validation, the ServiceAccount plugin, defaults, DefaultTolerationSeconds (contract 14)."""
        spec = pod.setdefault("spec", {})
        name = pod["metadata"]["name"]
        if not isinstance(spec, dict):
            raise bad_request("spec must be an object")
        causes = pod_spec_causes(spec)
        if causes:
            raise invalid(res, name, causes)
        sa_obj = self._admit_service_account(res, ns, name, pod)
        for c in _each(spec.get("initContainers")) + _each(spec.get("containers")):
            _default_container(c)
        for v in _each(spec.get("volumes")):
            _default_volume(v)
        for k, v in (("restartPolicy", "Always"), ("terminationGracePeriodSeconds", 30), ("dnsPolicy", "ClusterFirst"),
                     ("securityContext", {}), ("schedulerName", "default-scheduler")):
            spec.setdefault(k, v)
        tols = spec.get("tolerations") if isinstance(spec.get("tolerations"), list) else []
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if not _tolerates(tols, key):
                tols = tols + [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        spec["tolerations"] = tols
        for k, v in (("priority", 0), ("enableServiceLinks", True), ("preemptionPolicy", "PreemptLowerPriority")):
            spec.setdefault(k, v)
        automount = spec.get("automountServiceAccountToken", sa_obj.get("automountServiceAccountToken", True))
        mounted = any(m.get("mountPath") == SA_MOUNT for c in _each(spec.get("containers")) +
                      _each(spec.get("initContainers")) for m in _each(c.get("volumeMounts")))
        if automount is not False and not mounted:
            _add_token_volume(spec)
        ordered = {k: spec.pop(k) for k in ("volumes", "initContainers", "containers") if k in spec}
        ordered.update(spec)
        pod["spec"] = ordered
        pod["status"] = {"phase": "Pending", "qosClass": qos_class(ordered)}

    def _admit_service_account(self, res, ns, name, pod):
        """The ServiceAccount plugin: the pod's account must exist; mirror pods get none -> the account."""
        spec = pod["spec"]
        if "kubernetes.io/config.mirror" in (pod["metadata"].get("annotations") or {}):
            if spec.get("serviceAccountName") or spec.get("serviceAccount"):
                raise forbidden(res, name, "a mirror pod may not reference service accounts")
            if pod_references(pod)[1]:
                raise forbidden(res, name, "a mirror pod may not reference secrets")
            return {"automountServiceAccountToken": False}
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        sa_obj = self._objects.get(("serviceaccounts", ns, sa))
        if sa_obj is None:
            raise forbidden(res, name, f'error looking up service account {ns}/{sa}: serviceaccount "{sa}" not found')
        spec["serviceAccountName"] = spec["serviceAccount"] = sa
        return sa_obj

    _ALLOWED_NODE_LABELS = {"kubernetes.io/hostname", "kubernetes.io/arch", "kubernetes.io/os",
                            "beta.kubernetes.io/arch", "beta.kubernetes.io/os", "beta.kubernetes.io/instance-type",
                            "node.kubernetes.io/instance-type", "failure-domain.beta.kubernetes.io/region",
                            "failure-domain.beta.kubernetes.io/zone", "topology.kubernetes.io/region",
                            "topology.kubernetes.io/zone"}

    def _check_mirror_owner(self, res, meta, node):
        """NodeRestriction: a mirror pod has exactly one owner reference, to its own Node (v1, the
        Node's uid), as controller, without blockOwnerDeletion."""
        owners = meta.get("ownerReferences") or []
        if len(owners) > 1:
            raise forbidden(res, meta["name"], f'node "{node}" can only create pods with a single owner '
                            "reference set to itself")
        owner = owners[0] if owners else {}
        if (owner.get("apiVersion"), owner.get("kind"), owner.get("name")) != ("v1", "Node", node):
            raise forbidden(res, meta["name"], f'node "{node}" can only create pods with an owner reference '
                            "set to itself")
        if owner.get("controller") is not True:
            raise forbidden(res, meta["name"], f'node "{node}" can only create pods with a controller owner '
                            "reference set to itself")
        if owner.get("blockOwnerDeletion") is True:
            raise forbidden(res, meta["name"], f'node "{node}" must not set blockOwnerDeletion on an owner '
                            "reference")
        registered = self._objects.get(("nodes", "", node))
        if registered is None:
            raise forbidden(res, meta["name"], f'node "{node}" not found')
        if owner.get("uid") != registered["metadata"].get("uid"):
            raise forbidden(res, meta["name"], f'the UID in the owner reference ({owner.get("uid")}) does not '
                            f'match the node "{node}" UID ({registered["metadata"].get("uid")})')

    def _check_node_labels(self, res, name, old, new):
        """NodeRestriction: a node may not set labels under kubernetes.io/k8s.io outside the kubelet's set."""
        bad = []
        for k in set(new) | set(old):
            if old.get(k) == new.get(k):
                continue
            domain = k.split("/", 1)[0] if "/" in k else ""
            if not (domain.endswith("kubernetes.io") or domain.endswith("k8s.io")):
                continue
            if k in self._ALLOWED_NODE_LABELS or domain.startswith(("kubelet.kubernetes.io", "node.kubernetes.io")):
                continue
            bad.append(k)
        if bad:
            raise forbidden(res, name, "is not allowed to modify labels: " + ", ".join(sorted(bad))
                            if old else "is not allowed to set the following labels: " + ", ".join(sorted(bad)))

    def _check_lease(self, user, res, ns, name):
        node = user.node
        if node is None:
            return
        if ns != "kube-node-lease":
            raise forbidden(res, name, 'can only access leases in the "kube-node-lease" system namespace')
        if name != node:
            raise forbidden(res, name, "can only access node lease with the same name as the requesting node")

    def _check_event(self, res, ns, ev):
        name = ev["metadata"]["name"]
        if res.group == "events.k8s.io" and not ev.get("eventTime"):
            raise invalid(None, name, [("eventTime", "FieldValueRequired", "Required value")], kind="Event")
        io = ev.get("involvedObject") or ev.get("regarding") or {}
        if (io.get("namespace") or "") not in (ns, "") or (not io.get("namespace") and ns != "default"):
            raise invalid(res, name, [("involvedObject.namespace", "FieldValueInvalid",
                                       f'Invalid value: "{io.get("namespace")}": does not match event.namespace')])
        causes = []
        if ev.get("type") not in (None, "", "Normal", "Warning"):
            causes.append(("type", "FieldValueNotSupported",
                           f'Unsupported value: "{ev["type"]}": supported values: "Normal", "Warning"'))
        if causes:
            raise invalid(res, name, causes)

    def _validate(self, res, obj, old):
        causes = validate_meta(res, obj["metadata"]) + validate_fields(res, obj)
        if causes:
            raise invalid(res, obj["metadata"].get("name"), causes)
        if res.name == "nodes":
            causes = []
            for i, c in enumerate(_each(obj.get("status", {}).get("conditions"))):
                if not c.get("type"):
                    causes.append((f"status.conditions[{i}].type", "FieldValueRequired", "Required value"))
            if causes:
                raise invalid(res, obj["metadata"]["name"], causes)
        elif res.name == "leases":
            spec = obj.get("spec") or {}
            for k in ("renewTime", "acquireTime"):
                if isinstance(spec.get(k), str):
                    try:
                        parse_time(spec[k])
                    except ValueError as exc:
                        raise bad_request(f'Lease in version "v1" cannot be handled as a Lease: {exc}')
        elif res.name in ("configmaps", "secrets") and old is not None and old.get("immutable"):
            if obj.get("data") != old.get("data") or obj.get("binaryData") != old.get("binaryData"):
                raise invalid(res, obj["metadata"]["name"], [("data", "FieldValueForbidden",
                                                              "Forbidden: field is immutable when `immutable` is set")])
        elif res.name == "secrets":
            for k, v in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(v, validate=True)
                except Exception:
                    raise bad_request(f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                                      f'at input byte 0 (key {k})') from None

    # --- update / patch ------------------------------------------------------

    def _apply_update(self, user, res, ns, name, subresource, new, old, params):
        """Common tail of PUT and PATCH: status/spec split, NodeRestriction, validation, store."""
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res, name)
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            raise ApiStatusError(409, "Conflict", f"Operation cannot be fulfilled on {res.qualified} \"{name}\": "
                                 f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                                 f"{old['metadata']['uid']}", _details(res, name))
        result = copy.deepcopy(old)
        if subresource == "status":
            if user.node is not None and res.name == "pods" and \
                    (meta.get("labels") or {}) != (old["metadata"].get("labels") or {}):   # NodeRestriction
                raise forbidden(res, name, f'node "{user.node}" cannot update labels through pod status')
            result["status"] = new.get("status", {})
        else:
            for k, v in new.items():
                if k not in ("metadata", "status", "kind", "apiVersion"):
                    result[k] = v
            for k in [k for k in result if k not in new and k not in ("metadata", "status", "kind", "apiVersion")]:
                del result[k]
            rmeta = result["metadata"]
            for k in ("labels", "annotations", "finalizers", "ownerReferences"):
                if k in meta:
                    rmeta[k] = meta[k]
                else:
                    rmeta.pop(k, None)
            if res.name not in ("pods", "nodes", "certificatesigningrequests") and "status" in new:
                result["status"] = new["status"]
        err = type_error(result, res.kind)
        if err:
            raise ApiStatusError(422, "Invalid", f' "" is invalid: patch: Invalid value: '
                                 f'"{json.dumps(result, separators=(",", ":"))}": {err}',
                                 {"causes": [{"reason": "FieldValueInvalid", "message": err, "field": "patch"}]})
        try:
            shape(result)
        except ValueError as exc:
            raise ApiStatusError(422, "Invalid", f' "" is invalid: patch: {exc}',
                                 {"causes": [{"reason": "FieldValueInvalid", "message": str(exc), "field": "patch"}]})
        self._admit_update(user, res, ns, name, subresource, result, old)
        self._validate(res, result, old)
        if res.name == "pods" and subresource is None and result.get("spec") != old.get("spec"):
            result["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if res.name == "secrets" and "stringData" in result:
            for k, v in (result.pop("stringData") or {}).items():
                result.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()
        if _without_managed(result) == _without_managed(old):
            return copy.deepcopy(old)   # a no-op write does not bump resourceVersion
        self._managed(result, params, subresource)
        stored = self._store("MODIFIED", res, ns, name, result, old)
        smeta = stored["metadata"]
        if smeta.get("deletionTimestamp") and not smeta.get("finalizers") and old["metadata"].get("finalizers") \
                and (res.name != "pods" or smeta.get("deletionGracePeriodSeconds") == 0):
            stored = self._finish_delete(res, ns, name)   # the last finalizer is gone
        return stored

    def _admit_update(self, user, res, ns, name, subresource, new, old):
        node = user.node
        if res.name == "nodes" and node is not None:
            if name != node:
                raise forbidden(res, name, f'node "{node}" is not allowed to modify node "{name}"')
            if subresource is None:
                if (new.get("spec") or {}).get("taints") != (old.get("spec") or {}).get("taints"):
                    raise forbidden(res, name, "node \"%s\" is not allowed to modify taints" % node)
                self._check_node_labels(res, name, old["metadata"].get("labels") or {},
                                        new["metadata"].get("labels") or {})
        elif res.name == "pods":
            if node is not None and subresource == "status" and (old.get("spec") or {}).get("nodeName") != node:
                raise forbidden(res, name, f'node "{node}" can only update pod status for pods with spec.nodeName '
                                "set to itself")
            if subresource is None:
                self._check_pod_spec_update(res, name, new, old)
            else:
                self._check_container_transitions(res, name, new, old)
        elif res.name == "leases":
            self._check_lease(user, res, ns, name)
        elif res.name == "events":
            self._check_event(res, ns, new)

    _MUTABLE_POD_SPEC = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates")

    def _check_pod_spec_update(self, res, name, new, old):
        a, b = copy.deepcopy(new.get("spec") or {}), copy.deepcopy(old.get("spec") or {})
        for spec in (a, b):
            for k in self._MUTABLE_POD_SPEC:
                spec.pop(k, None)
            for c in _each(spec.get("containers")) + _each(spec.get("initContainers")):
                c.pop("image", None)
        if a != b:
            raise invalid(res, name, [("spec", "FieldValueForbidden",
                                       "Forbidden: pod updates may not change fields other than `spec.containers[*]"
                                       ".image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                                       "`spec.tolerations` (only additions to existing tolerations),"
                                       "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
                                       "previously negative)")])

    def _check_container_transitions(self, res, name, new, old):
        """ValidateContainerStateTransition: a terminated container that will not restart stays terminated."""
        policy = (old.get("spec") or {}).get("restartPolicy", "Always")
        causes = []
        for key in ("containerStatuses", "initContainerStatuses"):
            olds = {c.get("name"): c for c in _each((old.get("status") or {}).get(key))}
            for i, c in enumerate(_each((new.get("status") or {}).get(key))):
                prev = olds.get(c.get("name"))
                if not prev:
                    continue
                was = (prev.get("state") or {}).get("terminated")
                now_t = (c.get("state") or {}).get("terminated")
                if was is None or now_t is not None:
                    continue
                if policy == "Never" or (policy == "OnFailure" and was.get("exitCode") == 0):
                    causes.append((f"status.{key}[{i}].state", "FieldValueForbidden",
                                   "Forbidden: may not be transitioned to non-terminated state"))
        if causes:
            raise invalid(res, name, causes)

    def _update(self, user, res, ns, name, subresource, body, params=None):
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        err = type_error(body, res.kind)
        if err:
            raise bad_request(f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: {err}')
        with self._lock:
            old = self._objects.get((res.name, ns, name))
            if old is None:
                if res.name == "events" and subresource is None:
                    return self._create(user, res, ns, body, params or {})
                raise not_found(res, name)
            if subresource == "approval":
                return self._csr_approval(res, name, body, old)
            return self._apply_update(user, res, ns, name, subresource, body, old, params or {})

    def _csr_approval(self, res, name, body, old):
        result = copy.deepcopy(old)
        result.setdefault("status", {})["conditions"] = (body.get("status") or {}).get("conditions") or []
        return self._store("MODIFIED", res, "", name, result, old)

    def _patch(self, user, res, ns, name, subresource, patch, ctype, params):
        ctype = (ctype or "").split(";")[0].strip()
        with self._lock:
            old = self._get_obj(res, ns, name)
            try:
                if ctype == "application/merge-patch+json":
                    if not isinstance(patch, dict):
                        raise ValueError("merge patch must be an object")
                    new = json_merge_patch(old, patch)
                elif ctype == "application/strategic-merge-patch+json":
                    if not isinstance(patch, dict):
                        raise ValueError("strategic merge patch must be an object")
                    new = strategic_merge_patch(old, patch, res.kind, (), self.smp_set_element_order_crash)
                elif ctype == "application/json-patch+json":
                    new = json_patch(old, patch)
                elif ctype == "application/apply-patch+yaml":
                    raise ApiStatusError(415, "UnsupportedMediaType",
                                         "the fake API server does not implement server-side apply")
                else:
                    raise ApiStatusError(415, "UnsupportedMediaType",
                                         'the body of the request was in an unknown format - accepted media types '
                                         'include: application/json-patch+json, application/merge-patch+json, '
                                         'application/apply-patch+yaml, application/strategic-merge-patch+json')
            except ValueError as exc:
                raise ApiStatusError(422, "Invalid", f' "" is invalid: patch: {exc}',
                                     {"causes": [{"reason": "FieldValueInvalid", "message": str(exc),
                                                  "field": "patch"}]}) from None
            if not isinstance(new, dict):
                raise ApiStatusError(422, "Invalid", ' "" is invalid: patch: the patch did not give an object')
            prv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            if prv and prv != old["metadata"]["resourceVersion"]:
                raise conflict(res, name)
            new["metadata"] = dict(new.get("metadata") or {}) if isinstance(new.get("metadata"), dict) else \
                new.get("metadata")
            puid = (patch.get("metadata") or {}).get("uid") if isinstance(patch, dict) else None
            if res.name == "pods" and subresource == "status" and puid and puid != old["metadata"]["uid"]:
                cause = {"reason": "FieldValueInvalid", "message": f'Invalid value: "{puid}": field is immutable',
                         "field": "metadata.uid"}     # recording 38: the cause twice, as the server does
                raise ApiStatusError(422, "Invalid", f'Pod "{name}" is invalid: metadata.uid: {cause["message"]}',
                                     {"name": name, "kind": "Pod", "causes": [cause, dict(cause)]})
            if isinstance(new["metadata"], dict):
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
                new["metadata"]["uid"] = old["metadata"]["uid"]
            if subresource == "approval":
                return self._csr_approval(res, name, new, old)
            return self._apply_update(user, res, ns, name, subresource, new, old, params)

    # --- delete ----------------------------------------------------------------

    def _delete(self, user, res, ns, name, opts):
        with self._lock:
            old = self._get_obj(res, ns, name)
            pre = opts.get("preconditions") or {}
            kind_name = f'{res.kind} "{name}"'
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise ApiStatusError(409, "Conflict", f"Operation cannot be fulfilled on {kind_name}: the UID in the "
                                     f"precondition ({pre['uid']}) does not match the UID in record "
                                     f"({old['metadata']['uid']}). The object might have been deleted and then "
                                     "recreated", {"name": name, "kind": res.kind})
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise ApiStatusError(409, "Conflict", f"Operation cannot be fulfilled on {kind_name}: the "
                                     f"ResourceVersion in the precondition ({pre['resourceVersion']}) does not match "
                                     f"the ResourceVersion in record ({old['metadata']['resourceVersion']}). The "
                                     "object might have been modified", {"name": name, "kind": res.kind})
            node = user.node
            if node is not None and res.name == "pods" and (old.get("spec") or {}).get("nodeName") != node:
                raise forbidden(res, name, f'node "{node}" can only delete pods with spec.nodeName set to itself')
            if node is not None and res.name == "nodes" and name != node:
                raise forbidden(res, name, f'node "{node}" is not allowed to modify node "{name}"')
            if res.name == "leases":
                self._check_lease(user, res, ns, name)
            if res.name == "pods":
                return self._delete_pod(res, ns, name, old, opts)
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old)
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = fmt_time(utcnow())
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._store("MODIFIED", res, ns, name, new, old)
            self._store("DELETED", res, ns, name, old, old)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, **({"group": res.group} if res.group else {}), "kind": res.name,
                                "uid": old["metadata"]["uid"]}}

    def _delete_pod(self, res, ns, name, old, opts):
        """Graceful deletion: bound, non-terminal pods keep living with deletionTimestamp until grace 0."""
        spec, meta = old.get("spec") or {}, old["metadata"]
        grace = opts.get("gracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        grace = max(int(grace), 0)
        if not spec.get("nodeName") or (old.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            grace = 0
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and grace >= current:
            return copy.deepcopy(old)    # already pending with a grace no longer than this one
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = fmt_time(utcnow() + datetime.timedelta(seconds=grace))
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        new["metadata"]["generation"] = meta.get("generation", 1) + (0 if meta.get("deletionTimestamp") else 1)
        stored = self._store("MODIFIED", res, ns, name, new, old)
        if grace == 0 and not meta.get("finalizers"):
            return self._finish_delete(res, ns, name)
        return stored

    def _finish_delete(self, res, ns, name):
        obj = self._objects[(res.name, ns, name)]
        return self._store("DELETED", res, ns, name, obj, obj)

    # --- special resources ------------------------------------------------------

    def _token_request(self, user, ns, sa, body):
        res = RESOURCES["serviceaccounts"]
        if ("serviceaccounts", ns, sa) not in self._objects:
            raise not_found(res, sa)
        spec = dict(body.get("spec") or {}) if isinstance(body, dict) else {}
        ref = spec.get("boundObjectRef") or None
        auds = spec.get("audiences") or []
        pod = None
        if ref:
            if ref.get("kind") != "Pod" and ref.get("kind") != "Secret":
                raise invalid(res, sa, [("spec.boundObjectRef.kind", "FieldValueNotSupported",
                                         f'Unsupported value: "{ref.get("kind")}"')], kind="TokenRequest")
            if ref.get("kind") == "Pod":
                pod = self._objects.get(("pods", ns, ref.get("name")))
                if pod is None:
                    raise not_found(RESOURCES["pods"], ref.get("name"))
                if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
                    raise ApiStatusError(409, "Conflict", f'Operation cannot be fulfilled on Pod "{ref.get("name")}":'
                                         f' the UID in the bound object reference ({ref["uid"]}) does not match the '
                                         f'UID in record ({pod["metadata"]["uid"]}). The object might have been '
                                         "deleted and then recreated", {"name": ref.get("name"), "kind": "Pod"})
        node = user.node
        if node is not None:
            if pod is None:
                raise forbidden(res, sa, "node requested token not bound to a pod")
            if (pod.get("spec") or {}).get("nodeName") != node:
                raise forbidden(res, sa, "node requested token bound to a pod scheduled on a different node")
            if len(auds) > 1:
                raise forbidden(res, sa, "node may only request 0 or 1 audiences")
            aud = auds[0] if auds else ""
            if aud not in token_audiences(pod):
                raise forbidden(res, sa, f'audience "{aud}" not found in pod spec volume, system:node:{node} is '
                                "not authorized to request tokens for this audience")
        exp = int(spec.get("expirationSeconds") or 3600)
        if exp < 600:
            raise invalid(res, sa, [("spec.expirationSeconds", "FieldValueInvalid",
                                     f"Invalid value: {exp}: may not specify a duration less than 10 minutes")],
                          kind="TokenRequest")
        if self.service_account_max_token_expiration:   # --service-account-max-token-expiration caps it
            exp = min(exp, int(self.service_account_max_token_expiration))
        spec["audiences"] = auds or list(API_AUDIENCES)
        spec["expirationSeconds"] = exp
        spec.setdefault("boundObjectRef", None)
        now = utcnow()
        expires = now + datetime.timedelta(seconds=exp)
        claims = {"aud": spec["audiences"], "exp": int(expires.timestamp()), "iat": int(now.timestamp()),
                  "iss": "https://kubernetes.default.svc.cluster.local", "sub": f"system:serviceaccount:{ns}:{sa}",
                  "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}}}
        if pod is not None:
            claims["kubernetes.io"]["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
            if pod["spec"].get("nodeName"):
                claims["kubernetes.io"]["node"] = {"name": pod["spec"]["nodeName"]}
        b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
        token = f"{b64({'alg': 'RS256', 'kid': 'fake'})}.{b64(claims)}.{b64({'sig': uuid.uuid4().hex})}"
        self.add_token(token, f"system:serviceaccount:{ns}:{sa}", ("system:serviceaccounts",
                                                                   f"system:serviceaccounts:{ns}"))
        self._tokens[token].audiences = spec["audiences"]
        answer = {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                  "metadata": {"name": sa, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": fmt_time(now)},
                  "spec": spec, "status": {"token": token, "expirationTimestamp": fmt_time(expires)}}
        self._managed(answer, {}, "token")
        return answer

    def _token_review(self, body):
        spec = (body or {}).get("spec") or {}
        self.token_reviews.append(copy.deepcopy(spec))
        token = spec.get("token", "")
        status = {"authenticated": False, "user": {}}
        found = self.token_users.get(token)
        if callable(found):
            found = found(spec)
        if found is not None:
            uname, groups = found[0], list(found[1]) if len(found) > 1 else []
            status = {"authenticated": True, "user": {"username": uname, "groups": groups}}
        elif token in self._tokens:
            u = self._tokens[token]
            status = {"authenticated": True, "user": {"username": u.name, "uid": u.uid, "groups": list(u.groups)}}
        if status["authenticated"]:
            status["audiences"] = spec.get("audiences") or list(API_AUDIENCES)
        else:
            status["error"] = "invalid bearer token"
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    def authorizer_sar(self, spec):
        """A sar_policy that answers with the fake's own authorizer (admins yes, nodes per Node rules, grants)."""
        user = User(spec.get("user", ""), tuple(spec.get("groups") or ()))
        ra = spec.get("resourceAttributes")
        if not ra:
            return user.admin, "" if user.admin else "non-resource requests need system:masters here"
        res = RESOURCES.get(ra.get("resource", ""))
        if res is None:
            res = Resource(ra.get("resource", ""), ra.get("group", ""), ra.get("version", "v1"), "", False)
        try:
            self.authorize(user, ra.get("verb", "get"), res, ra.get("subresource") or None,
                           ra.get("namespace", ""), ra.get("name") or None, [])
            return True, ""
        except ApiStatusError as exc:
            return False, exc.message

    def _sar(self, body):
        spec = (body or {}).get("spec") or {}
        self.subject_access_reviews.append(copy.deepcopy(spec))
        answer = True if self.sar_policy is None else self.sar_policy(spec)
        allowed, reason = (answer if isinstance(answer, tuple) else (bool(answer), ""))
        status = {"allowed": bool(allowed)}
        if reason:
            status["reason"] = reason
        if not allowed:
            status["denied"] = True
        return {"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    # --- authentication and authorization -----------------------------------

    def authenticate(self, handler):
        auth = handler.headers.get("Authorization")
        if auth:
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() == "bearer":
                user = self._tokens.get(cred.strip())
                if user is None:
                    raise ApiStatusError(401, "Unauthorized", "Unauthorized")
                return user
            if scheme.lower() == "basic":
                try:
                    name, _, pw = base64.b64decode(cred).decode().partition(":")
                except Exception:
                    raise ApiStatusError(401, "Unauthorized", "Unauthorized") from None
                user = self._basic.get((name, pw))
                if user is None:
                    raise ApiStatusError(401, "Unauthorized", "Unauthorized")
                return user
            raise ApiStatusError(401, "Unauthorized", "Unauthorized")
        peer = getattr(handler, "peer_cert", None)
        if peer:
            cn, orgs = None, []
            for rdn in peer.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cn = v
                    elif k == "organizationName":
                        orgs.append(v)
            if cn:
                return User(cn, tuple(orgs) + ("system:authenticated",))
        return ANONYMOUS

    def _forbid_rbac(self, user, verb, res, sub, ns, name, why=None):
        resource = res.name + ("/" + sub if sub else "")
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        reason = (f'User "{user.name}" cannot {verb} resource "{resource}" in API group "{res.group}" {scope}'
                  + (f": {why}" if why else ""))
        return forbidden(res, name, reason)

    # What the system:node role grants beyond the Node authorizer's graph rules (no subresources).
    _NODE_RULES = {"events": {"create", "patch", "update"}, "leases": {"get", "create", "update", "patch", "delete"},
                   "services": {"get", "list", "watch"},
                   "certificatesigningrequests": {"create", "get", "list", "watch"},
                   "tokenreviews": {"create"}, "subjectaccessreviews": {"create"}}

    def authorize(self, user, verb, res, sub, ns, name, fsel):
        """The Node authorizer, then a small RBAC: system:masters may do anything, bootstrappers may make
        CSRs, others have the grants `allow` gave them. Raises the 403 the real chain answers."""
        if user.admin:
            return
        if user.node is not None:
            allowed, why = self._authorize_node(user.node, verb, res, sub, ns, name, fsel)
        else:
            bootstrap = "system:bootstrappers" in user.groups and res.name == "certificatesigningrequests" and \
                sub is None and verb in ("create", "get", "list", "watch")
            allowed, why = bootstrap or self._rbac_allows(user, verb, res.name + ("/" + sub if sub else ""), ns), None
        if not allowed:
            raise self._forbid_rbac(user, verb, res, sub, ns, name, why)

    def _authorize_node(self, node, verb, res, sub, ns, name, fsel):
        """-> (allowed, reason) for system:node:<node>, as the Node authorizer with AuthorizeNodeWithSelectors."""
        fields = {f: v for f, op, v in fsel if op == "="}
        if res.name == "nodes":
            if verb == "get" and name != node:
                return False, f"node '{node}' cannot read '{name}', only its own Node object"
            if verb in ("list", "watch") and fields.get("metadata.name") != node:
                return False, f"node '{node}' cannot read all nodes, only its own Node object"
            return sub in (None, "status") and verb != "deletecollection", None
        no_relation = f"no relationship found between node '{node}' and this object"
        if res.name == "pods":
            if verb in ("list", "watch") and sub is None:
                single = self._objects.get(("pods", ns, fields.get("metadata.name"))) if ns else None
                if single is not None and (single.get("spec") or {}).get("nodeName") == node:
                    return True, None   # a read of a single pod known to be bound to the node
                return fields.get("spec.nodeName") == node, "can only list/watch pods with spec.nodeName field selector"
            if verb == "get" and sub is None:
                pod = self._objects.get(("pods", ns, name))
                return pod is not None and (pod.get("spec") or {}).get("nodeName") == node, no_relation
            return (verb in ("create", "delete") and sub is None) or (verb in ("update", "patch") and sub == "status"), \
                None
        if res.name in ("configmaps", "secrets", "serviceaccounts"):
            token = res.name == "serviceaccounts" and verb == "create" and sub == "token"
            if not token and not (verb in ("get", "list", "watch") and sub is None):
                return False, None
            target = name if verb in ("get", "create") else fields.get("metadata.name")
            return bool(target) and self._related(node, res.name, ns, target), \
                no_relation if target else "No Object name found"
        return sub is None and verb in self._NODE_RULES.get(res.name, ()), None

    def allow(self, subject, verbs=("*",), resources=("*",), namespace=None):
        """An RBAC grant for a user or group name (resources like "pods", "pods/log", "*")."""
        self._grants.append((subject, set(verbs), set(resources), namespace))

    def _rbac_allows(self, user, verb, rs, ns):
        for subject, verbs, resources, namespace in self._grants:
            if (subject == user.name or subject in user.groups) and ("*" in verbs or verb in verbs) and \
                    ("*" in resources or rs in resources) and namespace in (None, ns):
                return True
        return False

    def _related(self, node, kind, ns, name):
        index = {"configmaps": 0, "secrets": 1, "serviceaccounts": 2}[kind]
        for (r, pns, _), pod in list(self._objects.items()):     # read without the lock: a copy
            if r == "pods" and pns == ns and (pod.get("spec") or {}).get("nodeName") == node:
                if name in pod_references(pod)[index]:
                    return True
        return False

    # --- HTTP serving ---------------------------------------------------------

    def _handle(self, h):
        """Serve one request: authenticate, log, inject faults, route."""
        url = urllib.parse.urlsplit(h.path)
        path = url.path.rstrip("/") or "/"
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        method = h.command
        rec = RequestRecord(method, path, url.query, params, h.headers.get("Content-Type", ""), "", ())
        h._record = rec
        try:
            raw = _read_body(h)
            try:
                user = self.authenticate(h)
            except ApiStatusError:
                rec.user = "<invalid>"
                raise
            rec.user, rec.groups = user.name, user.groups
            rec.body = _parse_body(raw, rec.content_type, method)
            self._fault(method, path, h)
            self._serve(h, method, path, params, user, rec.body)
            rec.status = getattr(h, "_status", 200)
        except CloseConnection:
            rec.status = 0
            h.close_connection = True
            _abort(h.connection)
        except ApiStatusError as exc:
            rec.status = exc.code
            h.send_json(exc.code, exc.status(), exc.headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            rec.status = rec.status or 0
            h.close_connection = True
        except Exception as exc:  # a bug in the fake: answer 500 so the test sees it
            import traceback
            traceback.print_exc()
            rec.status = 500
            try:
                h.send_json(500, ApiStatusError(500, "InternalError", f"fake apiserver bug: {exc!r}").status())
            except OSError:
                pass
        finally:
            if h._record is rec:        # not logged yet by send_response
                h._record = None
                self.requests.append(rec)

    def _fault(self, method, path, h):
        with self._lock:
            rule = next((r for r in self._rules if r.n > 0 and r.matches(method, path)), None)
            if rule:
                rule.n -= 1
            self._rules = [r for r in self._rules if r.n > 0]
            paused = any((m is None or m.upper() == method) and (p is None or re.search(p, path))
                         for m, p in self._pauses)
            epoch = self._watch_epoch
        while paused and self._running:
            if self._paused.wait(0.05):
                break
        if not self._running or self._watch_epoch != epoch:     # a request held across stop() is cut, never served
            raise CloseConnection("stopped")
        if rule is None:
            return
        if rule.action == "close":
            raise CloseConnection("injected")
        if rule.action == "lose":
            h._lose_answer = True
            return
        if rule.action == "delay":
            time.sleep(rule.retry_after)
            return
        if rule.status == 429:
            raise ApiStatusError(429, "TooManyRequests", "Too many requests, please try again later.",
                                 {"retryAfterSeconds": int(rule.retry_after)}, {"Retry-After": rule.retry_after})
        headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else {}
        reason = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                  410: "Expired", 422: "Invalid", 503: "ServiceUnavailable", 504: "Timeout"}.get(rule.status,
                                                                                               "InternalError")
        raise ApiStatusError(rule.status, reason, f"injected failure ({rule.status})", None, headers)

    def _serve(self, h, method, path, params, user, body):
        if path in ("/healthz", "/livez", "/readyz"):
            return h.send_text(200, "ok")
        route = _route(path)
        if route is None:
            return self._serve_nonresource(h, method, path, user)
        res, ns, name, sub = route
        verb, fsel, name = self._verb(method, params, res, name, sub)
        self.authorize(user, verb, res, sub, ns, name, fsel)
        self._local.manager = (h.headers.get("User-Agent") or "unknown").split("/")[0]
        table = "as=Table" in (h.headers.get("Accept") or "")
        if verb == "watch":
            return self._serve_watch(h, res, ns, params, fsel)
        if verb == "list":
            return h.send_json(200, self._list(res, ns, params, fsel, table))
        if verb == "get" and sub == "log":
            return self._proxy_log(h, ns, name, params)
        if verb == "get":
            with self._lock:
                obj = copy.deepcopy(self._get_obj(res, ns, name))
            return h.send_json(200, as_table(res, [obj], obj["metadata"]["resourceVersion"]) if table else obj)
        if "dryRun" not in params:
            return self._serve_write(h, verb, user, res, ns, name, sub, body, params)
        if params["dryRun"] != "All":
            raise bad_request(f'Invalid dry run value: "{params["dryRun"]}"')
        with self._lock:   # a dry run: the write happens, answers, and is undone before anyone can see it
            saved = dict(self._objects), list(self._history), list(self._history_rvs), self._rv
            try:
                return self._serve_write(h, verb, user, res, ns, name, sub, body, params)
            finally:
                self._objects, self._history, self._history_rvs, self._rv = saved

    def _serve_write(self, h, verb, user, res, ns, name, sub, body, params):
        if verb == "create":
            return h.send_json(201, self._serve_create(user, res, ns, name, sub, body, params))
        if verb == "update":
            return h.send_json(200, self._update(user, res, ns, name, sub, body, params))
        if verb == "patch":
            return h.send_json(200, self._patch(user, res, ns, name, sub, body, h.headers.get("Content-Type"),
                                                params))
        opts = dict(body) if isinstance(body, dict) else {}
        if "gracePeriodSeconds" in params:
            opts["gracePeriodSeconds"] = int(params["gracePeriodSeconds"])
        return h.send_json(200, self._delete(user, res, ns, name, opts))

    def _serve_nonresource(self, h, method, path, user):
        """Discovery and /version; anything else is a 404 (or a 403 for anonymous, as RBAC answers first)."""
        disc = self._discovery(path) if method == "GET" else None
        if user is ANONYMOUS and path not in _NONRESOURCE_OPEN:
            raise ApiStatusError(403, "Forbidden", f'forbidden: User "system:anonymous" cannot {method.lower()} '
                                 f'path "{path}"', {})
        if disc is None:
            raise ApiStatusError(404, "NotFound", "the server could not find the requested resource",
                                 {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]})
        h.send_json(200, disc)

    @staticmethod
    def _verb(method, params, res, name, sub):
        """-> (authorization verb, field selector requirements, name) for a resource request."""
        not_allowed = ApiStatusError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                     "requested resource", _details(res, name))
        watch = params.get("watch") in ("1", "true", "True")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "HEAD": "get", "POST": "create",
                "PUT": "update", "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]
        if method == "POST" and name and sub != "token":
            raise not_allowed
        if sub == "log":
            if method != "GET":
                raise not_allowed
            verb = "get"
        if verb not in res.verbs and sub is None:
            raise not_allowed
        fsel = parse_field_selector(params.get("fieldSelector"), res) if verb in ("list", "watch") else []
        if watch and name:   # /pods/<name>?watch=1 (the deprecated form): a watch on one name
            fsel, name = fsel + [("metadata.name", "=", name)], None
        return verb, fsel, name

    def _list(self, res, ns, params, fsel, table):
        lsel = parse_label_selector(params.get("labelSelector"))
        with self._lock:
            items = [copy.deepcopy(o) for (r, ons, _), o in sorted(self._objects.items())
                     if r == res.name and (not ns or ons == ns) and match_fields(o, fsel) and match_labels(o, lsel)]
            rv = self._rv
        meta = {"resourceVersion": str(rv)}
        limit = int(params.get("limit") or 0)
        start = int(params["continue"]) if (params.get("continue") or "").isdigit() else 0
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
        items = items[start:start + limit] if limit else items[start:]
        if table:
            return as_table(res, items, rv)
        for it in items:     # list items carry no kind/apiVersion (contract 15)
            it.pop("kind", None)
            it.pop("apiVersion", None)
        return {"kind": res.kind + "List", "apiVersion": res.api_version, "metadata": meta, "items": items}

    def _serve_create(self, user, res, ns, name, sub, body, params):
        if res.name == "tokenreviews":
            return self._token_review(body)
        if res.name == "subjectaccessreviews":
            return self._sar(body)
        if sub == "token":
            with self._lock:
                return self._token_request(user, ns, name, body)
        if isinstance(body, dict) and body.get("kind") not in (None, res.kind):
            raise bad_request(f'{body.get("kind")} in version "{res.version}" cannot be handled as a {res.kind}: '
                              "the kind does not match")
        return self._create(user, res, ns, body or {}, params)

    def _kubelet_target(self, ns, name, params):
        """Where and how the API server reaches the kubelet of a pod's node: (host, port, ssl context,
        headers, container). InternalIP, then Hostname; port daemonEndpoints.kubeletEndpoint.Port; the
        kubelet's certificate is not verified (no --kubelet-certificate-authority) unless
        .kubelet_ca_path is set; the client certificate is CN=kube-apiserver-kubelet-client,
        O=system:masters from the fake's CA, or the bearer token .kubelet_client_token."""
        with self._lock:
            pod = copy.deepcopy(self._get_obj(RESOURCES["pods"], ns, name))
            node = copy.deepcopy(self._objects.get(("nodes", "", (pod.get("spec") or {}).get("nodeName") or "")))
        names = [c.get("name") for c in _each(pod["spec"].get("containers"))]
        container = params.get("container")
        if not container:
            if len(names) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(names)}]")
            container = names[0]
        if not pod["spec"].get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        if node is None:
            raise not_found(RESOURCES["nodes"], pod["spec"]["nodeName"])
        addrs = {a.get("type"): a.get("address") for a in _each(node.get("status", {}).get("addresses"))}
        host = addrs.get("InternalIP") or addrs.get("Hostname")
        port = ((node["status"].get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
        host, port = (self.kubelet_address or {}).get(node["metadata"]["name"], (host, port))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        if self.kubelet_ca_path:
            ctx.load_verify_locations(self.kubelet_ca_path)
        else:
            ctx.verify_mode = ssl.CERT_NONE
        headers = {}
        if self.kubelet_client_token:
            headers["Authorization"] = f"Bearer {self.kubelet_client_token}"
        else:
            if not hasattr(self, "_kubelet_client_cert"):
                self._kubelet_client_cert = self.pki.issue("kube-apiserver-kubelet-client", ("system:masters",))
            ctx.load_cert_chain(*self._kubelet_client_cert)
        return host, port, ctx, headers, container

    def _proxy_log(self, h, ns, name, params):
        """pods/log, what `kubectl logs` reads: the kubelet's /containerLogs, streamed back."""
        import http.client
        host, port, ctx, headers, container = self._kubelet_target(ns, name, params)
        query = urllib.parse.urlencode({k: params[k] for k in _LOG_PARAMS if k in params})
        path = f"/containerLogs/{ns}/{name}/{container}" + (f"?{query}" if query else "")
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
        try:
            conn.request("GET", path, headers=headers)
            conn.sock.settimeout(None)   # a follow stream may be idle for long
            resp = conn.getresponse()
        except OSError as exc:
            raise ApiStatusError(500, "InternalError", f'Get "https://{host}:{port}{path}": {exc}') from None
        try:
            if resp.status != 200:
                raise _kubelet_error(resp.status, resp.read())
            h.send_response(200)
            h.send_header("Content-Type", resp.getheader("Content-Type") or "text/plain")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                data = resp.read1(65536)
                if not data:
                    break
                h.write_chunk(data)
            h.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    def _serve_watch(self, h, res, ns, params, fsel):
        """A watch: one JSON event per line, chunked, until timeoutSeconds, a drop, or the client leaves."""
        w = _Watch(self, h, res, ns, params, fsel)
        with self._lock:
            initial = w.start()
            self._watches.append(w)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Cache-Control", "no-cache, private")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        abort = False
        try:
            if initial:
                h.write_chunk(w.render(initial))
            if not (initial and initial[-1]["type"] == "ERROR"):
                abort = w.stream()
        except OSError:
            abort = True
        finally:
            with self._lock:
                if w in self._watches:
                    self._watches.remove(w)
            if abort:
                h.close_connection = True
                _abort(h.connection)
            else:   # a clean end keeps the connection for the next request, as the real server does
                try:
                    h.wfile.write(b"0\r\n\r\n")
                    h.wfile.flush()
                except OSError:
                    h.close_connection = True

    # --- discovery and tables -------------------------------------------------

    def _resource_list(self, group, version):
        out = []
        for r in RESOURCES.values():
            if r.group != group or r.version != version:
                continue
            item = {"name": r.name, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
                    "verbs": list(r.verbs)}
            if r.short:
                item["shortNames"] = list(r.short)
            if r.name == "pods":
                item["categories"] = ["all"]
            out.append(item)
            for s in r.subresources:
                verbs = {"status": ["get", "patch", "update"], "token": ["create"], "log": ["get"],
                         "approval": ["get", "patch", "update"]}[s]
                kind = {"token": "TokenRequest"}.get(s, r.kind)
                out.append({"name": f"{r.name}/{s}", "singularName": "", "namespaced": r.namespaced,
                            "kind": kind, "verbs": verbs})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}

    def _openapi_v3(self, path):
        """Just enough OpenAPI v3 for kubectl to see that the server validates fields itself."""
        gvs = [("", "v1")] + list(GROUP_VERSIONS)
        key = lambda g, v: f"api/{v}" if not g else f"apis/{g}/{v}"  # noqa: E731
        if path == "/openapi/v3":
            return {"paths": {key(g, v): {"serverRelativeURL": f"/openapi/v3/{key(g, v)}?hash=fake"}
                              for g, v in gvs}}
        for g, v in gvs:
            if path != f"/openapi/v3/{key(g, v)}":
                continue
            paths = {}
            for r in RESOURCES.values():
                if (r.group, r.version) != (g, v) or "patch" not in r.verbs:
                    continue
                base = f"/{key(g, v)}" + ("/namespaces/{namespace}" if r.namespaced else "") + f"/{r.name}/{{name}}"
                paths[base] = {"patch": {
                    "x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": r.kind},
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                                   {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}}}}
            return {"openapi": "3.0.0", "info": {"title": "Kubernetes (fake)", "version": SERVER_VERSION["gitVersion"]},
                    "paths": paths, "components": {"schemas": {}}}
        return None

    def _discovery(self, path):
        if path.startswith("/openapi/v3"):
            return self._openapi_v3(path)
        if path == "/version":
            return SERVER_VERSION
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]}
        if path == "/apis":
            groups = []
            for g, v in GROUP_VERSIONS:
                gv = {"groupVersion": f"{g}/{v}", "version": v}
                groups.append({"name": g, "versions": [gv], "preferredVersion": gv})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if path == "/api/v1":
            return self._resource_list("", "v1")
        m = re.match(r"^/apis/([^/]+)/([^/]+)$", path)
        if m and (m.group(1), m.group(2)) in GROUP_VERSIONS:
            return self._resource_list(m.group(1), m.group(2))
        m = re.match(r"^/apis/([^/]+)$", path)
        if m:
            for g, v in GROUP_VERSIONS:
                if g == m.group(1):
                    gv = {"groupVersion": f"{g}/{v}", "version": v}
                    return {"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv],
                            "preferredVersion": gv}
        return None


def _without_managed(obj):
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def _age(ts):
    if not ts:
        return "<unknown>"
    secs = max(0, int((utcnow() - parse_time(ts)).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 3600 * 3:
        return f"{secs // 60}m"
    if secs < 86400 * 2:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def _pod_row(pod):
    st = pod.get("status") or {}
    spec = pod.get("spec") or {}
    cs = _each(st.get("containerStatuses"))
    ready = sum(1 for c in cs if c.get("ready"))
    reason = st.get("reason") or st.get("phase") or "Unknown"
    for c in cs:
        state = c.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif (state.get("terminated") or {}).get("reason") and reason in ("Running", "Pending"):
            reason = state["terminated"]["reason"]
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(int(c.get("restartCount") or 0) for c in cs)
    return [pod["metadata"]["name"], f"{ready}/{len(_each(spec.get('containers')))}", reason, restarts,
            _age(pod["metadata"].get("creationTimestamp")), st.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>", "<none>", "<none>"]


def _node_row(node):
    st = node.get("status") or {}
    ready = next((c for c in _each(st.get("conditions")) if c.get("type") == "Ready"), None)
    status = "Ready" if ready and ready.get("status") == "True" else ("NotReady" if ready else "Unknown")
    if (node.get("spec") or {}).get("unschedulable"):
        status += ",SchedulingDisabled"
    roles = ",".join(sorted(k.split("/", 1)[1] for k in (node["metadata"].get("labels") or {})
                            if k.startswith("node-role.kubernetes.io/"))) or "<none>"
    info = st.get("nodeInfo") or {}
    addr = {a.get("type"): a.get("address") for a in _each(st.get("addresses"))}
    return [node["metadata"]["name"], status, roles, _age(node["metadata"].get("creationTimestamp")),
            info.get("kubeletVersion", ""), addr.get("InternalIP", "<none>"), addr.get("ExternalIP", "<none>"),
            info.get("osImage", ""), info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]


def _col(name, typ="string", priority=0, fmt=""):
    return {"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}


def as_table(res, objs, rv):
    if res.name == "pods":
        cols = [_col("Name", fmt="name"), _col("Ready"), _col("Status"), _col("Restarts", "string"), _col("Age"),
                _col("IP", priority=1), _col("Node", priority=1), _col("Nominated Node", priority=1),
                _col("Readiness Gates", priority=1)]
        rows = [_pod_row(o) for o in objs]
    elif res.name == "nodes":
        cols = [_col("Name", fmt="name"), _col("Status"), _col("Roles"), _col("Age"), _col("Version"),
                _col("Internal-IP", priority=1), _col("External-IP", priority=1), _col("OS-Image", priority=1),
                _col("Kernel-Version", priority=1), _col("Container-Runtime", priority=1)]
        rows = [_node_row(o) for o in objs]
    elif res.name == "events":
        cols = [_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"), _col("Message")]
        rows = [[_age(o.get("lastTimestamp") or o["metadata"].get("creationTimestamp")), o.get("type", ""),
                 o.get("reason", ""), f"{(o.get('involvedObject') or {}).get('kind', '').lower()}/"
                 f"{(o.get('involvedObject') or {}).get('name', '')}", o.get("message", "")] for o in objs]
    else:
        cols = [_col("Name", fmt="name"), _col("Age")]
        rows = [[o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))] for o in objs]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(rv)},
            "columnDefinitions": cols,
            "rows": [{"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                 "metadata": {k: v for k, v in o["metadata"].items()
                                                              if k != "managedFields"}}}
                     for cells, o in zip(rows, objs)]}


###############################################################################
# HTTP ########################################################################
###############################################################################

def _tempdir():
    import tempfile
    return tempfile.mkdtemp(prefix="fake-apiserver-pki-")


def _abort(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    ssl_context = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        pass  # client went away / TLS handshake refused: nothing to report


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"
    disable_nagle_algorithm = True      # as Go's net/http: no 40 ms delayed-ACK stall between header and body
    peer_cert = None

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
            self.peer_cert = self.request.getpeercert() or None
        super().setup()
        with self.server.fake._lock:
            self.server.fake._conns.add(self.connection)

    def finish(self):
        with self.server.fake._lock:
            self.server.fake._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        pass

    def send_response(self, code, message=None):
        if getattr(self, "_lose_answer", False):        # served, but the answer never leaves
            self._lose_answer = False
            raise CloseConnection("answer lost")
        self._status = code
        if getattr(self, "_record", None) is not None:   # logged before the client can read the answer
            self._record.status, record, self._record = code, self._record, None
            self.server.fake.requests.append(record)
        super().send_response(code, message)

    def do_GET(self):
        self.server.fake._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def send_json(self, code, body, headers=None):
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_text(self, code, text):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _read_body(handler):
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        return b"".join(chunks)
    n = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(n) if n else b""


def _go_json_error(exc):
    """A Python JSON decoding error as Go's encoding/json words it."""
    found = exc.doc[exc.pos:exc.pos + 1]
    expected = {"Expecting property name enclosed in double quotes": "beginning of object key string",
                "Expecting value": "beginning of value"}.get(exc.msg)
    if not found:
        return "unexpected end of JSON input"
    return f"invalid character '{found}' looking for {expected}" if expected else exc.msg


def _parse_body(raw, ctype, method=None):
    if not raw:
        return None
    if "protobuf" in (ctype or ""):
        # client-go retries with JSON after a 415 (the fake speaks no protobuf)
        raise ApiStatusError(415, "UnsupportedMediaType", 'the body of the request was in an unknown format - '
                             'accepted media types include: application/json, application/yaml, '
                             'application/json-patch+json, application/merge-patch+json, '
                             'application/strategic-merge-patch+json')
    try:
        return json.loads(raw)
    except ValueError as exc:
        if method == "PATCH" and isinstance(exc, json.JSONDecodeError):
            raise bad_request(f"error decoding patch: {_go_json_error(exc)}") from None
        if "yaml" in (ctype or ""):
            import yaml
            return yaml.safe_load(raw)
        raise bad_request("the body of the request was in an unknown format - accepted media types include: "
                          "application/json, application/yaml") from None


_PATH_RE = re.compile(r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
                      r"(?:/namespaces/(?P<ns>[^/]+))?(?:/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?)?$")


def _route(path):
    """-> (Resource, namespace, name, subresource) or None."""
    m = _PATH_RE.match(path)
    if not m:
        return None
    group = m.group("g") or ""
    version = m.group("cv") or m.group("v")
    ns, rname, name, sub = m.group("ns"), m.group("res"), m.group("name"), m.group("sub")
    if rname is None and ns is not None:   # /api/v1/namespaces/<name>
        rname, name, ns = "namespaces", ns, None
    if rname == "namespaces" and ns is None and name is None and m.group("ns") is None:
        pass
    res = RESOURCES.get(f"{rname}.{group}") or RESOURCES.get(rname or "")
    if res is None or res.group != group or res.version != version:
        return None
    if res.namespaced and ns is None and name is not None:
        return None
    if not res.namespaced and ns is not None:
        return None
    if sub is not None and sub not in res.subresources:
        return None
    return res, urllib.parse.unquote(ns) if ns else "", urllib.parse.unquote(name) if name else None, sub


_NONRESOURCE_OPEN = ("/version", "/healthz", "/livez", "/readyz")


_LOG_PARAMS = ("follow", "previous", "timestamps", "tailLines", "sinceSeconds", "sinceTime", "limitBytes")


def _kubelet_error(status, body):
    text = body.decode(errors="replace").strip()
    reason = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
              501: "NotImplemented"}.get(status, "InternalError")
    return ApiStatusError(status, reason, text)


def _bookmark(res, rv):
    obj = {"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": str(rv)}}
    if res.name == "pods":
        obj["spec"] = {"containers": None}
        obj["status"] = {}
    return {"type": "BOOKMARK", "object": obj}


###############################################################################
# A small client for test setup ###############################################
###############################################################################

class Client:
    """requests.Session bound to the fake's URL and one identity."""

    def __init__(self, base, headers, verify=True, cert=None):
        import requests
        self.base = base
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.session.cert = cert
        self.verify = verify  # per request: REQUESTS_CA_BUNDLE in the environment beats session.verify

    def request(self, method, path, json=None, content_type=None, **kw):
        headers = kw.pop("headers", {})
        if json is not None:
            import json as _json
            kw["data"] = _json.dumps(json)
            headers["Content-Type"] = content_type or (
                "application/merge-patch+json" if method == "PATCH" else "application/json")
        kw.setdefault("timeout", 30)
        kw.setdefault("verify", self.verify)
        return self.session.request(method, self.base + path, headers=headers, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):
        return self.request("POST", path, json=json, **kw)

    def put(self, path, json=None, **kw):
        return self.request("PUT", path, json=json, **kw)

    def patch(self, path, json=None, content_type="application/merge-patch+json", **kw):
        return self.request("PATCH", path, json=json, content_type=content_type, **kw)

    def delete(self, path, json=None, **kw):
        return self.request("DELETE", path, json=json, **kw)

    def watch(self, path, params=None, timeout=30):
        params = dict(params or {})
        params["watch"] = "1"
        with self.session.get(self.base + path, params=params, stream=True, timeout=timeout,
                              verify=self.verify) as r:
            if r.status_code != 200:
                yield "HTTP", r.json()
                return
            for line in r.iter_lines():
                if line:
                    ev = json.loads(line)
                    yield ev["type"], ev["object"]

    def close(self):
        self.session.close()


###############################################################################
# Fixtures ####################################################################
###############################################################################

@pytest.fixture(scope="session")
def test_pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def fake_api():
    fake = FakeApiServer().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_apiserver(fake_api):
    return fake_api


@pytest.fixture
def fake_api_tls(tmp_path):
    fake = FakeApiServer(tls=True, pki_dir=str(tmp_path / "pki")).start()
    try:
        yield fake
    finally:
        fake.stop()
