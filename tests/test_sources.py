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
    with pytest.raises(minikrust.ConfigError, match="sync"):      # Config checks it; the source takes it as given
        minikrust.Config(sync="push")


# --- against the fake API server ---

def _manifest(name):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "file:/nonexistent.wasm"}]}}


@pytest.fixture
def source_for(fake_apiserver, tmp_path):
    """Start an ApiPodSource for node n1 with a recording handler; stopped at the end."""
    started = []

    def start(node="n1", **kw):
        path = fake_apiserver.kubeconfig(tmp_path, node=node)
        api = minikrust.ApiClient(minikrust.load_kubeconfig(path), backoff=0.05)
        handler = Recorder()
        source = minikrust.ApiPodSource(api, node, handler, **kw).start()
        started.append(source)
        wait_for(source.synced.is_set, 10, what="first list")
        return source, handler

    yield start
    for source in started:
        source.stop()
        source.api.close()


def test_watch_delivers_added_updated_deleted_for_this_node_only(fake_apiserver, source_for):
    fake = fake_apiserver
    source, handler = source_for()
    fake.create_pod(_manifest("mine"), node_name="n1", namespace="default")
    fake.create_pod(_manifest("theirs"), node_name="n2", namespace="default")
    wait_for(lambda: handler.kinds("mine") == ["added"], 10, what="added")
    fake.patch("pods", "default", "mine", {"metadata": {"labels": {"x": "y"}}})
    wait_for(lambda: handler.kinds("mine") == ["added", "updated"], 10, what="updated")
    fake.delete_pod("default", "mine")                  # a bound pod: deletionTimestamp set, MODIFIED
    wait_for(lambda: handler.kinds("mine") == ["added", "updated", "updated"], 10, what="deletionTimestamp")
    fake.remove_pod("default", "mine")
    wait_for(lambda: handler.kinds("mine")[-1:] == ["deleted"], 10, what="deleted")
    assert handler.kinds("theirs") == []
    fake.drop_watches()                                 # a watch is logged when it ends
    watches = wait_for(lambda: [r for r in fake.requests if r.params.get("watch") in ("true", "1")], 10,
                       what="watch requests logged")
    assert all(r.params.get("fieldSelector") == "spec.nodeName=n1" for r in watches)
    assert all(r.params.get("allowWatchBookmarks") == "true" for r in watches)
    assert source.lists == 1


def test_a_dropped_watch_resumes_from_the_last_resource_version_without_losing_events(fake_apiserver, source_for):
    fake = fake_apiserver
    source, handler = source_for()
    fake.create_pod(_manifest("a"), node_name="n1", namespace="default")
    wait_for(lambda: handler.kinds("a") == ["added"], 10, what="a added")
    fake.pause(method="GET", path="^/api/v1/pods$")   # hold the re-watch while events happen
    fake.drop_watches()
    fake.create_pod(_manifest("b"), node_name="n1", namespace="default")
    fake.remove_pod("default", "a")
    last_rv = source.resource_version
    fake.resume()
    wait_for(lambda: handler.kinds("b") == ["added"] and handler.kinds("a")[-1:] == ["deleted"], 10,
             what="events that happened while disconnected")
    assert source.lists == 1                           # resumed, not re-listed
    fake.drop_watches()                                # a watch is logged when it ends
    wait_for(lambda: [r for r in fake.requests if r.params.get("watch") and r.params.get("resourceVersion") == last_rv],
             10, what="a re-watch from the last resourceVersion")


@pytest.mark.parametrize("expired_as", ["event", "http"])
def test_an_expired_watch_lists_again_and_finds_deletions(fake_apiserver, source_for, expired_as):
    fake = fake_apiserver
    fake.watch_expired_as = expired_as
    source, handler = source_for()
    fake.create_pod(_manifest("a"), node_name="n1", namespace="default")
    fake.create_pod(_manifest("b"), node_name="n1", namespace="default")
    wait_for(lambda: handler.kinds("b") == ["added"], 10, what="pods added")
    if expired_as == "event":
        fake.pause(method="GET", path="^/api/v1/pods$")
        fake.expire_watches()                          # ERROR 410 inside the open stream
    else:
        fake.pause(method="GET", path="^/api/v1/pods$")
        fake.drop_watches()                            # the re-watch from an old RV gets HTTP 410
    fake.remove_pod("default", "a")                    # happens while the kubelet is not watching
    fake.create_pod(_manifest("c"), node_name="n1", namespace="default")
    fake.compact()
    fake.resume()
    wait_for(lambda: source.lists >= 2, 10, what="a second list after 410")
    wait_for(lambda: handler.kinds("a")[-1:] == ["deleted"] and handler.kinds("c") == ["added"], 10,
             what="deletion and addition found by the re-list")
    assert handler.kinds("b") == ["added"]             # de-duplicated across the re-list


def test_periodic_resync_lists_again(fake_apiserver, source_for):
    source, handler = source_for(resync_interval=1.0)
    wait_for(lambda: source.lists >= 3, 10, what="resync lists")


def test_poll_mode_lists_on_an_interval(fake_apiserver, source_for):
    fake = fake_apiserver
    source, handler = source_for(sync="poll", poll_interval=0.2)
    fake.create_pod(_manifest("a"), node_name="n1", namespace="default")
    wait_for(lambda: handler.kinds("a") == ["added"], 10, what="added by polling")
    fake.remove_pod("default", "a")
    wait_for(lambda: handler.kinds("a")[-1:] == ["deleted"], 10, what="deleted by polling")
    assert not [r for r in fake.requests if r.params.get("watch")]


def test_bookmarks_advance_the_resource_version(fake_apiserver, source_for):
    fake = fake_apiserver
    source, handler = source_for()
    wait_for(lambda: fake.open_watches() == 1, 10, what="watch open")
    fake.create(_manifest("unrelated") | {"metadata": {"name": "unrelated", "namespace": "default"}})
    before = source.resource_version
    fake.send_bookmarks()
    wait_for(lambda: source.resource_version != before, 10, what="bookmark resourceVersion")
    assert handler.calls == []


def test_api_errors_are_retried_by_the_source(fake_apiserver, source_for):
    fake = fake_apiserver
    fake.fail_next(8, status=500, path="^/api/v1/pods$")
    source, handler = source_for()
    fake.create_pod(_manifest("a"), node_name="n1", namespace="default")
    wait_for(lambda: handler.kinds("a") == ["added"], 20, what="added after errors")


def test_stop_ends_the_watch_promptly(fake_apiserver, source_for):
    import time
    source, handler = source_for()
    wait_for(lambda: fake_apiserver.open_watches() == 1, 10, what="watch open")
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 2 and not source._thread.is_alive()


def test_an_api_server_restart_is_ridden_out(fake_apiserver, source_for):
    fake = fake_apiserver
    source, handler = source_for()
    wait_for(lambda: fake.open_watches() == 1, 10, what="watch open")
    fake.stop()
    fake.start()
    fake.create_pod(_manifest("after"), node_name="n1", namespace="default")
    wait_for(lambda: handler.kinds("after") == ["added"], 20, what="pod created after the restart")
