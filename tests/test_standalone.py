"""Standalone mode: static pods from --pod-manifest-path, --once, folder watching, mirror pods."""
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

import minikrust
from tests.helpers import wait_for
from tests.test_pods import sleeper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_manifest(folder, filename, *pods):
    path = os.path.join(str(folder), filename)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump_all(list(pods), f)
    os.replace(path + ".tmp", path)
    return path


def _pod(name, image, policy="Never", **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": dict(restartPolicy=policy, terminationGracePeriodSeconds=0,
                         containers=[{"name": "main", "image": image}], **spec)}


def _module(folder, name, data):
    with open(os.path.join(str(folder), name), "wb") as f:
        f.write(data)
    return f"file:{name}"       # relative: resolved against the manifest's folder


def test_static_pods_are_named_and_annotated_like_the_kubelets(tmp_path):
    path = _write_manifest(tmp_path, "two.yaml", _pod("a", "file:x.wasm"), _pod("b", "file:x.wasm"))
    pods = minikrust.static_pods_from_manifest(path, "n1")
    assert [p["metadata"]["name"] for p in pods] == ["a-n1", "b-n1"]
    meta = pods[0]["metadata"]
    assert meta["annotations"]["kubernetes.io/config.source"] == "file"
    assert meta["annotations"]["kubernetes.io/config.hash"] == meta["uid"].replace("-", "")
    assert pods[0]["spec"]["nodeName"] == "n1" and meta["namespace"] == "default"
    assert minikrust.static_pods_from_manifest(path, "n1")[0]["metadata"]["uid"] == meta["uid"]   # stable
    _write_manifest(tmp_path, "two.yaml", _pod("a", "file:y.wasm"))
    assert minikrust.static_pods_from_manifest(path, "n1")[0]["metadata"]["uid"] != meta["uid"]


def test_a_manifest_that_is_not_a_pod_is_refused_clearly(tmp_path):
    path = _write_manifest(tmp_path, "svc.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}})
    with pytest.raises(minikrust.ConfigError, match=r"svc.yaml: document 1: kind 'Service' is not a v1 Pod"):
        minikrust.static_pods_from_manifest(path, "n1")
    (tmp_path / "bad.yaml").write_text("kind: Pod\nmetadata: {name: [x\n")
    with pytest.raises(minikrust.ConfigError, match="not valid YAML"):
        minikrust.static_pods_from_manifest(str(tmp_path / "bad.yaml"), "n1")


def _run_once(folder, root, timeout=60):
    return subprocess.run([sys.executable, os.path.join(ROOT, "minikrust.py"), "--pod-manifest-path", str(folder),
                           "--once", "--root-dir", str(root), "--node-name", "demo", "--serve", "false"],
                          capture_output=True, text=True, timeout=timeout)


def test_once_runs_the_examples_each_time_and_exits_zero(tmp_path):
    """The README's demo twice in a row with one root dir: --once runs every manifest anew each time,
    as the kubelet's --runonce did; what the first run kept on disk changes nothing."""
    for run in (1, 2):
        proc = _run_once(os.path.join(ROOT, "examples"), tmp_path / "root")
        assert proc.returncode == 0, (run, proc.stderr)
        out = proc.stdout.splitlines()
        assert "hello-demo: Succeeded" in out and "greeter-demo: Succeeded" in out, (run, out)
        assert len([line for line in out if line.startswith("hello-demo/hello ") and "minikrust" in line]) == 1, out
        assert out.count("greeter-demo/greet Hello, Ada!") == 1, (run, out)


def test_once_exits_one_when_a_pod_fails(tmp_path, wasm):
    _write_manifest(tmp_path, "pods.yaml", _pod("ok", _module(tmp_path, "ok.wasm", wasm.hello)),
                    _pod("bad", _module(tmp_path, "bad.wasm", wasm.exit(3))))
    proc = _run_once(tmp_path, tmp_path / "root")
    assert proc.returncode == 1, proc.stderr
    assert "bad-demo: Failed" in proc.stdout and "ok-demo: Succeeded" in proc.stdout
    assert "ok-demo/main hello" in proc.stdout


def test_folder_is_watched_for_added_changed_and_removed_manifests(fake_api, kubelet_factory, tmp_path, wasm):
    folder = tmp_path / "manifests"
    folder.mkdir()
    kubelet = kubelet_factory(manifests=folder)
    assert kubelet.api is None
    tick = _module(folder, "tick.wasm", sleeper(100, 0, repeat=0))
    _write_manifest(folder, "ticker.yaml", _pod("ticker", tick, policy="Always"))
    first = wait_for(lambda: [p for p in kubelet.pods() if p["status"].get("phase") == "Running"], what="ticker")
    uid = first[0]["metadata"]["uid"]
    _write_manifest(folder, "ticker.yaml", _pod("ticker", tick, policy="Always", activeDeadlineSeconds=600))
    wait_for(lambda: [p["metadata"]["uid"] for p in kubelet.pods() if p["status"].get("phase") == "Running"]
             not in ([], [uid]), timeout=10, what="the changed manifest's pod replacing the old one")
    wait_for(lambda: len(kubelet.pods()) == 1, what="old pod gone")
    os.unlink(folder / "ticker.yaml")
    wait_for(lambda: kubelet.pods() == [], timeout=10, what="pod removed with its file")


def test_standalone_restart_does_not_rerun_finished_pods(kubelet_factory, tmp_path, wasm, capsys):
    folder = tmp_path / "manifests"
    folder.mkdir()
    _write_manifest(folder, "hello.yaml", _pod("hello", _module(folder, "hello.wasm", wasm.hello)))
    first = kubelet_factory(manifests=folder, echo=True)
    wait_for(lambda: [p for p in first.pods() if p["status"].get("phase") == "Succeeded"], what="Succeeded")
    first.stop()
    assert capsys.readouterr().out.count("hello-node-1/main hello") == 1
    second = kubelet_factory(manifests=folder, root_dir=first.config.root_dir, echo=True)
    wait_for(lambda: second.pods(), what="pod known again")
    time.sleep(0.5)
    assert second.pods()[0]["status"]["phase"] == "Succeeded"
    assert "hello-node-1/main hello" not in capsys.readouterr().out


def test_static_pods_appear_in_the_api_as_mirror_pods(fake_api, kubelet_factory, tmp_path, wasm):
    folder = tmp_path / "manifests"
    folder.mkdir()
    _write_manifest(folder, "hello.yaml", _pod("hello", _module(folder, "hello.wasm", wasm.hello)))
    kubelet = kubelet_factory(fake_api, manifests=folder)
    mirror = wait_for(lambda: (fake_api.get("pods", "default", "hello-node-1") or {}).get("status", {}).get("phase")
                      == "Succeeded" and fake_api.get("pods", "default", "hello-node-1"), what="mirror Succeeded")
    assert "kubernetes.io/config.mirror" in mirror["metadata"]["annotations"]
    node = fake_api.get("nodes", None, "node-1")
    assert mirror["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "node-1",
                                                      "uid": node["metadata"]["uid"], "controller": True}]
    assert len(kubelet.pods()) == 1     # the mirror is not run a second time
    os.unlink(folder / "hello.yaml")
    wait_for(lambda: fake_api.get("pods", "default", "hello-node-1") is None, timeout=10, what="mirror deleted")


def test_a_deleted_mirror_pod_is_created_again(fake_api, kubelet_factory, tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    _write_manifest(folder, "tick.yaml", _pod("tick", _module(folder, "tick.wasm", sleeper(100, 0, repeat=0)),
                                              policy="Always"))
    kubelet_factory(fake_api, manifests=folder)
    first = wait_for(lambda: (fake_api.get("pods", "default", "tick-node-1") or {}).get("status", {}).get("phase")
                     == "Running" and fake_api.get("pods", "default", "tick-node-1"), what="mirror Running")
    fake_api.delete_pod("default", "tick-node-1")
    wait_for(lambda: (fake_api.get("pods", "default", "tick-node-1") or {}).get("metadata", {}).get("uid")
             not in (None, first["metadata"]["uid"]) and fake_api.get("pods", "default", "tick-node-1"),
             timeout=10, what="a new mirror")
    wait_for(lambda: (fake_api.get("pods", "default", "tick-node-1") or {}).get("status", {}).get("phase")
             == "Running", what="its status")


def test_once_with_a_bad_manifest_names_it_and_exits_one(tmp_path, wasm):
    _write_manifest(tmp_path, "ok.yaml", _pod("ok", _module(tmp_path, "ok.wasm", wasm.hello)))
    _write_manifest(tmp_path, "deploy.yaml", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
    proc = _run_once(tmp_path, tmp_path / "root")
    assert proc.returncode == 1
    assert "ok-demo: Succeeded" in proc.stdout
    assert "deploy.yaml: document 1: kind 'Deployment' is not a v1 Pod" in proc.stderr


class _Recorder:
    def __init__(self):
        self.calls = []

    def pod_added(self, pod):
        self.calls.append(("added", pod["metadata"]["name"]))

    def pod_updated(self, pod):
        self.calls.append(("updated", pod["metadata"]["name"]))

    def pod_deleted(self, pod):
        self.calls.append(("deleted", pod["metadata"]["name"]))


def test_static_source_reports_changes_once_and_one_pod_per_name(tmp_path):
    handler = _Recorder()
    source = minikrust.StaticPodSource(str(tmp_path), "n1", handler)
    _write_manifest(tmp_path, "a.yaml", _pod("web", "file:x.wasm"))
    _write_manifest(tmp_path, "b.yaml", _pod("web", "file:y.wasm"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    source.scan()
    source.scan()
    assert handler.calls == [("added", "web-n1")]
    assert "already defined in" in source.errors[str(tmp_path / "b.yaml")]
    os.unlink(tmp_path / "a.yaml")
    source.scan()
    assert handler.calls[1:] == [("deleted", "web-n1"), ("added", "web-n1")]   # b.yaml's pod now
    assert not source.errors


def test_a_yaml_date_in_a_manifest_is_text_and_the_manifests_after_it_still_run(tmp_path):
    # YAML reads an unquoted 2024-01-01 as a date, which JSON cannot hold: before, hashing the
    # manifest raised TypeError, which stopped every scan at that file (and standalone waited forever).
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: dated\n"
                                     "  annotations: {released: 2024-01-01}\n"
                                     "spec:\n  containers: [{name: main, image: 'file:x.wasm'}]\n")
    _write_manifest(tmp_path, "b.yaml", _pod("web", "file:x.wasm"))
    handler = _Recorder()
    source = minikrust.StaticPodSource(str(tmp_path), "n1", handler)
    source.scan()
    assert handler.calls == [("added", "dated-n1"), ("added", "web-n1")] and not source.errors
    assert source.synced.is_set()
    os.utime(tmp_path / "b.yaml", ns=(1, 1))       # read again, the same pod: nothing to report
    source.scan()
    assert len(handler.calls) == 2
    pod = minikrust.static_pods_from_manifest(str(tmp_path / "a.yaml"), "n1")[0]
    assert pod["metadata"]["annotations"]["released"] == "2024-01-01"


def test_the_readme_in_process_example_runs_and_uses_every_public_name():
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("**In-process")
    section = readme[start:readme.index("\n## ", start)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Hello, minikrust!" in done.stdout and "stdout F Hello, you!" in done.stdout
    assert len(minikrust.__all__) <= 16
    assert [name for name in minikrust.__all__ if not re.search(rf"\b{name}\b", section)] == []


def test_no_top_level_name_is_defined_twice():
    """One name, one job: a second definition silently replaces the first for every caller."""
    import ast
    import collections
    with open(os.path.join(ROOT, "minikrust.py")) as handle:
        tree = ast.parse(handle.read())
    names = collections.Counter(node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
    assert [name for name, count in names.items() if count > 1] == []
