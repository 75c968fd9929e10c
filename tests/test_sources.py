"""Pod sources: de-duplicated added/updated/deleted calls; (against the fake API server) list +
watch with resume after a dropped stream, re-list after 410, periodic resync and poll mode."""
import threading

import pytest

import minikrust
from tests.helpers import wait_for


class Recorder:
    """A pod handler that records (call, namespace/name, resourceVersion)."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def _record(self, kind, pod):
        meta = pod["metadata"]
        with self.lock:
            self.calls.append((kind, f"{meta.get('namespace')}/{meta['name']}", meta.get("resourceVersion")))

    def pod_added(self, pod):
        self._record("added", pod)

    def pod_updated(self, pod):
        self._record("updated", pod)

    def pod_deleted(self, pod):
        self._record("deleted", pod)

    def kinds(self, name):
        with self.lock:
            return [kind for kind, key, _rv in self.calls if key.endswith("/" + name)]


def _pod(name, rv, uid=None):
    return {"metadata": {"name": name, "namespace": "default", "uid": uid or f"uid-{name}", "resourceVersion": rv}}


def test_podset_deduplicates_by_resource_version():
    handler = Recorder()
    pods = minikrust._PodSet(handler)
    pods.upsert(_pod("a", "1"))
    pods.upsert(_pod("a", "1"))
    pods.upsert(_pod("a", "2"))
    pods.remove(_pod("a", "3"))
    pods.remove(_pod("a", "3"))
    assert [c[0] for c in handler.calls] == ["added", "updated", "deleted"]


def test_reconcile_reports_pods_missing_from_a_list_as_deleted():
    handler = Recorder()
    pods = minikrust._PodSet(handler)
    pods.reconcile([_pod("a", "1"), _pod("b", "1")])
    pods.reconcile([_pod("b", "1"), _pod("c", "2")])
    assert handler.kinds("a") == ["added", "deleted"]
    assert handler.kinds("b") == ["added"] and handler.kinds("c") == ["added"]


def test_a_recreated_pod_with_a_new_uid_is_deleted_then_added():
    handler = Recorder()
    pods = minikrust._PodSet(handler)
    pods.reconcile([_pod("a", "1", uid="u1")])
    pods.reconcile([_pod("a", "5", uid="u2")])
    assert handler.kinds("a") == ["added", "deleted", "added"]


def test_a_failing_handler_does_not_stop_the_source():
    class Broken(Recorder):
        def pod_added(self, pod):
            raise RuntimeError("boom")
    handler = Broken()
    pods = minikrust._PodSet(handler)
    pods.upsert(_pod("a", "1"))
    pods.upsert(_pod("a", "2"))
    assert handler.kinds("a") == ["updated"]


def test_unknown_sync_mode_is_a_config_error():
    with pytest.raises(minikrust.ConfigError):
        minikrust.ApiPodSource(None, "n1", Recorder(), sync="push")
