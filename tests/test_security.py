"""The sandbox holds on the host side too: a module plants symlinks (WASI path_symlink) where the
kubelet later reads, writes or removes files, and the kubelet refuses to follow them out, on both
WASI backends. Every place the kubelet touches files for a pod has its test here."""
import gzip
import json
import logging
import os
import shutil
import stat

import pytest

import minikrust
from tests.helpers import unavailable, wait_for
from tests.test_pods import _cstatus, _manifest, _status

# planter [-0] TARGET LINK [TARGET LINK ...]: symlink() each pair (WASI path_symlink); exits with
# the number that failed (0 anyway with -0), printing why.
PLANTER_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int failed = 0, first = argc > 1 && !strcmp(argv[1], "-0") ? 2 : 1;
    for (int i = first; i + 1 < argc; i += 2)
        if (symlink(argv[i], argv[i + 1])) { printf("%s -> %s: %s\n", argv[i + 1], argv[i], strerror(errno)); failed++; }
    return first == 2 ? 0 : failed;
}
"""

SECRET = "HOST-ONLY-SECRET-7f3a"
ESCAPES = ("absolute", "relative", "chain")


@pytest.fixture(params=["native", "wasmtime-py"])
def kubelet_backend(request, monkeypatch):
    """Kubelets of this test run modules on this WASI backend."""
    if request.param == "native":
        from tests.wasm_modules import native_available
        if native_available():
            unavailable(native_available())
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", request.param)
    return request.param


@pytest.fixture
def victim(tmp_path):
    """A host folder outside every volume and the root dir, holding a secret file."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "secret").write_text(SECRET)
    return folder


def plant(escape, link, target):
    """planter args that leave at guest path `link` a symlink leading to host path `target`."""
    rel = "../" * 40 + str(target).lstrip("/")           # enough `..` to reach / from any folder
    if escape == "absolute":
        return [str(target), link]
    if escape == "relative":
        return [rel, link]
    hop = os.path.join(os.path.dirname(link), ".hop")
    return [rel, hop, ".hop", link]                       # link -> .hop -> out


def unchanged(victim):
    return sorted(os.listdir(victim)) == ["secret"] and (victim / "secret").read_text() == SECRET


@pytest.mark.parametrize("escape", ESCAPES)
def test_termination_message_link_out_is_not_read(fake_api, kubelet_factory, wasm, kubelet_backend, victim, escape):
    planter = f"file:{wasm.c(PLANTER_C, 'planter')}"
    container = {"name": "main", "image": planter, "args": plant(escape, "/msg/termination-log", victim / "secret"),
                 "terminationMessagePath": "/msg/termination-log", "volumeMounts": [{"name": "m", "mountPath": "/msg"}]}
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("term", [container], volumes=[{"name": "m", "emptyDir": {}}]), node_name="node-1")
    status = wait_for(lambda: _cstatus(fake_api, "term", "main").get("state", {}).get("terminated"), what="terminated")
    assert SECRET not in str(_status(fake_api, "term"))
    assert status.get("message", "") == "" or "->" in status["message"]   # only the planter's own report
    if escape != "absolute":       # the sandbox lets a module make relative links: the attack was real
        assert status["exitCode"] == 0, status
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
def test_sub_path_link_out_is_refused(fake_api, kubelet_factory, wasm, kubelet_backend, victim, escape):
    planter = f"file:{wasm.c(PLANTER_C, 'planter')}"
    init = {"name": "plant", "image": planter, "args": ["-0", *plant(escape, "/data/sub", victim)],
            "volumeMounts": [{"name": "d", "mountPath": "/data"}]}
    main = {"name": "main", "image": f"file:{wasm.tool}", "args": ["cat", "/x/secret"],
            "volumeMounts": [{"name": "d", "mountPath": "/x", "subPath": "sub"}]}
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("sub", [main], inits=[init], volumes=[{"name": "d", "emptyDir": {}}]),
                        node_name="node-1")
    state = wait_for(lambda: (lambda s: s if s.get("terminated") or s.get("waiting", {}).get("message") else None)(
        _cstatus(fake_api, "sub", "main").get("state", {})), what="main refused or run")
    if escape == "absolute" and "terminated" in state:   # the sandbox refused the link: `sub` was a new folder
        assert state["terminated"]["exitCode"] == 2, state
    else:
        waiting = state["waiting"]
        assert waiting["reason"] == "CreateContainerConfigError" and "subPath 'sub'" in waiting["message"]
        wait_for(lambda: fake_api.events(involved_name="sub", reason="Failed"), what="a Failed event")
    assert SECRET not in str(_status(fake_api, "sub"))
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_sub_path_swapped_for_a_link_after_its_check_is_not_what_the_module_gets(
        backend, wasm, tmp_path, victim, escape, kind):
    """The preopen (or the staged file) is made from the fd the check resolved (container_mounts'
    steps, _subpath then the preopen or _file_mounts), not the name: a link a sibling container
    plants at the subPath in between leads the module nowhere new."""
    from tests.test_volumes import make_pod
    guest = "/x/secret" if kind == "folder" else "/x/own"
    pod = make_pod([{"name": "d", "emptyDir": {}}], [{"name": "d", "mountPath": os.path.dirname(guest) if kind ==
                                                      "folder" else guest, "subPath": "sub"}])
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    volume = minikrust.prepare_volumes(pod, str(pod_dir), minikrust.Config())["d"]
    sub = os.path.join(volume, "sub")
    if kind == "folder":
        os.mkdir(sub)
    else:
        with open(sub, "w") as f:
            f.write("own words\n")
    held = minikrust._subpath(volume, "sub", False)            # the check, then the race:
    os.rename(sub, os.path.join(volume, "moved"))
    host_link(escape, sub, victim / ("" if kind == "folder" else "secret"))
    if kind == "file":      # staged (linked or copied) from what was checked
        mounts = minikrust._file_mounts([(held, guest, False)], set(), str(pod_dir), "volumes/.subpaths/main")
    else:
        mounts = [(held, "/x", False)]
    out = tmp_path / "out.log"
    with minikrust.module_errors():
        backend.load(open(wasm.tool, "rb").read()).run(["tool", "cat", guest], preopens=mounts,
                                                       stdout=str(out), stderr=str(out))
    text = out.read_text()
    assert SECRET not in text and ("own words" in text if kind == "file" else "No such file" in text), text
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
def test_empty_dir_cleanup_does_not_follow_links_out(fake_api, kubelet_factory, wasm, kubelet_backend, victim,
                                                     escape):
    planter = f"file:{wasm.c(PLANTER_C, 'planter')}"
    args = plant(escape, "/data/dir", victim) + plant(escape, "/data/file", victim / "secret")[-2:] \
        if escape != "chain" else plant(escape, "/data/dir", victim)
    container = {"name": "main", "image": planter, "args": args, "volumeMounts": [{"name": "d", "mountPath": "/data"}]}
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("clean", [container], volumes=[{"name": "d", "emptyDir": {}}]), node_name="node-1")
    term = wait_for(lambda: _cstatus(fake_api, "clean", "main").get("state", {}).get("terminated"), what="ran")
    if escape != "absolute":
        assert term["exitCode"] == 0, term
    uid = fake_api.get("pods", "default", "clean")["metadata"]["uid"]
    pod_dir = os.path.join(kubelet.config.root_dir, "pods", uid)
    wait_for(lambda: not os.path.exists(os.path.join(pod_dir, "volumes")), what="volumes removed (pod done)")
    assert unchanged(victim)
    fake_api.delete_pod("default", "clean")
    wait_for(lambda: not os.path.exists(pod_dir), what="pod folder removed")
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
def test_links_planted_in_api_volumes_are_refused_by_the_sandbox_and_replaced_on_update(
        fake_api, kubelet_factory, wasm, kubelet_backend, victim, escape):
    """configMap/secret/downwardAPI/projected volumes are read-only to modules: the planting fails;
    the kubelet's next write of the volume (here a changed ConfigMap) stays inside it."""
    fake_api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "default"},
                     "data": {"a": "1"}})
    planter = f"file:{wasm.c(PLANTER_C, 'planter')}"
    mounts = [{"name": "c", "mountPath": "/c"}, {"name": "p", "mountPath": "/p"}]
    container = {"name": "main", "image": planter, "args": plant(escape, "/c/a", victim / "secret")
                 + plant(escape, "/p/b", victim / "secret"), "volumeMounts": mounts}
    volumes = [{"name": "c", "configMap": {"name": "cfg"}},
               {"name": "p", "projected": {"sources": [{"configMap": {"name": "cfg"}},
                                                       {"downwardAPI": {"items": [{"path": "b", "fieldRef": {
                                                           "fieldPath": "metadata.name"}}]}}]}}]
    kubelet = kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("api", [container], policy="Always", volumes=volumes), node_name="node-1")
    term = wait_for(lambda: _cstatus(fake_api, "api", "main").get("lastState", {}).get("terminated"), what="ran")
    assert term["exitCode"] == len(container["args"]) // 2, term      # every planting refused (read-only mounts)
    uid = fake_api.get("pods", "default", "api")["metadata"]["uid"]
    folder = os.path.join(kubelet.config.root_dir, "pods", uid, "volumes")
    cm = fake_api.get("configmaps", "default", "cfg")
    fake_api.update(dict(cm, data={"a": "2"}))           # the kubelet rewrites both volumes on a restart
    for path in ("c/a", "p/a"):
        wait_for(lambda: open(os.path.join(folder, path)).read() == "2", what=f"{path} updated")
        assert not os.path.islink(os.path.join(folder, path))
    assert unchanged(victim)


@pytest.mark.parametrize("inside", ["", "pods"])
def test_host_path_over_the_root_dir_is_refused_so_no_module_reaches_logs_or_state(
        fake_api, kubelet_factory, wasm, kubelet_backend, tmp_path, inside):
    """Log and state files live in the root dir, which no module may mount: a module can plant
    nothing there, even where --allowed-host-paths would cover it."""
    kubelet = kubelet_factory(fake_api, allowed_host_paths=(str(tmp_path),))
    planter = f"file:{wasm.c(PLANTER_C, 'planter')}"
    path = os.path.join(kubelet.config.root_dir, inside)
    container = {"name": "main", "image": planter, "args": ["/etc/shadow", "/r/x"],
                 "volumeMounts": [{"name": "r", "mountPath": "/r"}]}
    fake_api.create_pod(_manifest("root", [container], volumes=[{"name": "r", "hostPath": {"path": path}}]),
                        node_name="node-1")
    waiting = wait_for(lambda: _cstatus(fake_api, "root", "main").get("state", {}).get("waiting", {}).get("message")
                       and _cstatus(fake_api, "root", "main")["state"]["waiting"], what="refused")
    assert waiting["reason"] == "CreateContainerConfigError" and "overlaps --root-dir" in waiting["message"]
    assert wait_for(lambda: _status(fake_api, "root").get("phase") == "Failed", what="Failed")
    assert not os.path.lexists(os.path.join(kubelet.config.root_dir, "x"))


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """open_beneath on each of its two ways: the kernel's openat2, or the O_NOFOLLOW walk."""
    if request.param == "openat2":
        os.close(minikrust.open_beneath("/", ""))     # probes the kernel
        if minikrust._BENEATH["openat2"] is not True:
            pytest.skip("this kernel has no openat2")
    monkeypatch.setitem(minikrust._BENEATH, "openat2", request.param == "openat2")
    return request.param


def test_state_and_log_files_never_go_through_a_link(tmp_path, victim, resolver):
    pod_dir = tmp_path / "pod"
    (pod_dir / "logs" / "main").mkdir(parents=True)
    os.symlink(victim / "secret", pod_dir / "status.json")
    os.symlink(victim / "secret", pod_dir / "logs" / "main" / "0.log")
    os.symlink(victim, pod_dir / "logs" / "other")
    files = minikrust._StateFiles()
    files.save(str(pod_dir), "status.json", {"phase": "Running"})      # replaces the link
    assert files.flush(10)
    assert not os.path.islink(pod_dir / "status.json") and (pod_dir / "status.json").read_text() == '{"phase": "Running"}'
    assert minikrust._log_tail(str(pod_dir / "logs" / "main" / "0.log")) == ""
    with pytest.raises(OSError):
        minikrust.open_beneath(str(pod_dir), "logs/other/secret")
    with pytest.raises(OSError):
        minikrust._write_beneath(str(pod_dir), "logs/other/new", b"x")
    minikrust._remove_beneath(str(tmp_path), "pod")
    assert not pod_dir.exists() and unchanged(victim)


def host_link(escape, link, target):
    """Leave at host path `link` the symlink (absolute, relative, or a chain) a module's planter would."""
    args = plant(escape, str(link), target)
    for source, name in zip(args[::2], args[1::2]):
        if os.path.lexists(name):       # the chain's hop of an earlier link in the same folder
            os.remove(name)
        os.symlink(source, name)


def _run_logged(backend, wasm, argv, logs, given="log_dir_fd", starts=(False, True), **limits):
    """Run a module with run() (the native host opens the log in C) and start() (in Python), both
    streams to `0.log` in the folder `logs`: a name in its fd (log_dir_fd) or a path; the results."""
    folder = os.open(logs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with minikrust.module_errors():
            module = backend.load(open(wasm.tool, "rb").read())
            if given == "log_dir_fd":
                limits.update(stdout="0.log", stderr="0.log", log_dir_fd=folder)
            else:
                limits.update(stdout=str(logs / "0.log"), stderr=str(logs / "0.log"))
            return [module.start(argv, **limits).wait() if start else module.run(argv, **limits) for start in starts]
    finally:
        os.close(folder)


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("given", ["log_dir_fd", "path"])
def test_a_link_at_the_log_name_is_never_written_through(backend, wasm, tmp_path, victim, escape, given):
    """Both hosts open a log relative to its folder's fd and never through a link at its name,
    whether C opens it (run) or Python does (start)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    host_link(escape, logs / "0.log", victim / "secret")
    for start in (False, True):
        with pytest.raises(minikrust.ModuleRunError, match="0.log"):
            _run_logged(backend, wasm, ["tool", "lines", "3"], logs, given, starts=(start,))
    assert unchanged(victim)


def _files_hold(folder, text):
    """Whether any regular file in `folder` (gunzipped when .gz; links not followed) holds `text`."""
    found = False
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            with (gzip.open if entry.name.endswith(".gz") else open)(entry.path, "rb") as handle:
                found = found or text.encode() in handle.read()
    return found


@pytest.mark.parametrize("escape", ESCAPES)
def test_rotation_never_follows_a_link_named_like_a_rotated_log(backend, wasm, tmp_path, victim, escape):
    """A link planted where rotation compresses or removes an old file is neither read nor
    written through: the host's secret never lands in the log folder, the victim is untouched."""
    logs = tmp_path / "logs"
    logs.mkdir()
    host_link(escape, logs / "0.log.20200101-000000", victim / "secret")
    results = _run_logged(backend, wasm, ["tool", "lines", "400"], logs, log_max_size=2000, log_max_files=4)
    assert [result.exit_code for result in results] == [0, 0], results
    assert len(os.listdir(logs)) > 2 and unchanged(victim)
    assert not _files_hold(logs, SECRET)
    text = b"".join(minikrust.read_container_log(str(logs / "0.log"), minikrust.LogOptions(), root=str(tmp_path)))
    assert text.endswith(b"line 399 of 400\n") and SECRET.encode() not in text


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("at", ["folder", "file"])
def test_log_reads_resolve_beneath_the_root_dir(tmp_path, victim, resolver, escape, at):
    """The server's log reads (read_container_log, also with follow) resolve the log's folder
    beneath the root dir and open its files beneath that folder: a planted link is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "0.log").write_text(f"2026-01-01T00:00:00.000000000Z stdout F {SECRET}\n")
    root = tmp_path / "root"
    (root / "pods" / "uid" / "logs").mkdir(parents=True)
    if at == "folder":
        host_link(escape, root / "pods" / "uid" / "logs" / "app", outside)
    else:
        (root / "pods" / "uid" / "logs" / "app").mkdir()
        host_link(escape, root / "pods" / "uid" / "logs" / "app" / "0.log", outside / "0.log")
    path = str(root / "pods" / "uid" / "logs" / "app" / "0.log")
    try:
        text = b"".join(minikrust.read_container_log(path, minikrust.LogOptions(), root=str(root)))
    except OSError:
        text = b""
    try:
        followed = b"".join(minikrust.read_container_log(path, minikrust.LogOptions(), str(root),
                                                         follow=(lambda: True, lambda seconds: True)))
    except OSError:
        followed = b""
    assert SECRET.encode() not in text + followed


@pytest.mark.parametrize("escape", ESCAPES)
def test_a_link_planted_as_a_containers_log_folder_fails_that_pod_not_the_kubelet(
        fake_api, kubelet_factory, wasm, kubelet_backend, victim, escape):
    kubelet = kubelet_factory(fake_api, start=False)
    container = {"name": "main", "image": f"file:{wasm.tool}", "args": ["hello"]}
    uid = fake_api.create_pod(_manifest("logs", [container]), node_name="node-1")["metadata"]["uid"]
    folder = os.path.join(kubelet.config.root_dir, "pods", uid, "logs")
    os.makedirs(folder)
    host_link(escape, os.path.join(folder, "main"), victim)
    kubelet.start()
    state = wait_for(lambda: _cstatus(fake_api, "logs", "main").get("state", {}).get("terminated"), what="terminated")
    assert state["reason"] == "StartError", state
    fake_api.create_pod(_manifest("fine", [dict(container)]), node_name="node-1")
    wait_for(lambda: _cstatus(fake_api, "fine", "main").get("state", {}).get("terminated"), timeout=30, what="another pod ran")
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
def test_the_image_store_follows_no_link_planted_in_it(tmp_path, registry, victim, resolver, escape):
    """No module reaches the store (it is under --root-dir), but a link planted there (module
    file, index, credential key, temp folder) is refused or replaced, never read or written through."""
    from tests.test_images import make_manager
    from tests.registry import fake_module, sha256
    module = fake_module(500)
    registry.push_cncf("sec/store", "v1", module)
    image = f"{registry.host}/sec/store:v1"
    images = make_manager(tmp_path, [registry.host])
    stored = images.ensure(image, "IfNotPresent").path
    os.remove(stored)
    host_link(escape, stored, victim / "secret")
    assert not images.store.has(sha256(module)) and images.store.lookup(image) is None
    ref = images.ensure(image, "IfNotPresent")                      # pulled again, the link replaced
    assert not os.path.islink(ref.path) and open(ref.path, "rb").read() == module
    root = images.store.root
    os.remove(os.path.join(root, "index.json"))
    host_link(escape, os.path.join(root, "index.json"), victim / "secret")
    store = minikrust.ModuleStore(root)                              # the index is refused: empty
    assert store.modules() == {} and store.has(sha256(module))
    store.add(sha256(module), [image], "id")                         # written by a rename over the link
    assert not os.path.islink(os.path.join(root, "index.json"))
    host_link(escape, os.path.join(root, "credential-key"), victim / "secret")
    with pytest.raises(OSError):
        store.credential_id(minikrust.RegistryCredential(registry.host, "u", "p", "pod secret"))
    shutil.rmtree(os.path.join(root, "tmp"))
    host_link(escape, os.path.join(root, "tmp"), victim)
    with pytest.raises(OSError):
        minikrust.ModuleStore(root)
    assert os.fspath(ref.held()).startswith("/proc/self/fd/")      # what a pod's host reads: the module
    os.remove(ref.path)
    host_link(escape, ref.path, victim / "secret")
    with pytest.raises(OSError):                                     # ... and never a link planted there
        ref.held()
    assert unchanged(victim)


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("kind", ["native", "wasmtime-py"])
def test_a_link_planted_at_a_compiled_cache_entry_is_not_followed(wasm, tmp_path, kind, escape):
    """The compiled-module cache is under --root-dir: a link planted at an entry's name, leading to
    another module's compiled code, is not followed; the module is compiled from its own bytes."""
    from tests.wasm_modules import native_available
    if kind == "native" and native_available():
        unavailable(native_available())
    hello, other = wasm.hello, wasm.exit(7)         # module bytes
    entries = {}
    for name, data in (("hello", hello), ("other", other)):
        folder = tmp_path / name
        minikrust.load_host(str(folder), backend=kind).load(data)
        entries[name] = [folder / n for n in os.listdir(folder) if n.endswith("wasm")]
    assert len(entries["hello"]) == 1 and len(entries["other"]) == 1
    cache = tmp_path / "cache"
    cache.mkdir()
    host_link(escape, cache / entries["hello"][0].name, entries["other"][0])
    with minikrust.module_errors():
        result = minikrust.load_host(str(cache), backend=kind).load(hello).run(
            ["hello"], stdout=str(tmp_path / "out.log"), stderr=str(tmp_path / "out.log"))
    assert result.exit_code == 0 and (tmp_path / "out.log").read_text().endswith(" stdout F hello\n")


@pytest.mark.parametrize("escape", ESCAPES)
def test_restore_reads_no_pod_or_status_file_through_a_link(tmp_path, resolver, escape):
    """A restarted kubelet reads `pods/<uid>/pod.json` and `status.json` (and their `.new`) beneath
    --root-dir: a link planted there is refused (logged), never read, and not renamed aside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    pod = _manifest("planted", [{"name": "main", "image": "file:/bin/true"}])
    pod["metadata"].update(uid="uid-planted", namespace="default")
    state = {"state": minikrust.PodState.SYNCING.value, "status": {"phase": "Running"}}
    folder = tmp_path / "root" / "pods" / "uid-planted"
    folder.mkdir(parents=True)
    for name, doc in (("pod.json", pod), ("status.json", state), ("status.json.new", state)):
        (outside / name).write_text(json.dumps(doc))
        host_link(escape, folder / name, outside / name)
    assert list(minikrust._saved_pods(str(tmp_path / "root"))) == []
    assert minikrust._saved_state(str(tmp_path / "root"), "uid-planted") is None
    assert sorted(os.listdir(outside)) == ["pod.json", "status.json", "status.json.new"]


def test_deep_trees_are_removed_without_deep_recursion(tmp_path, resolver):
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("vol", dir_fd=fd)
    for _ in range(1500):                      # deeper than Python's recursion limit
        next_fd = minikrust._makedirs_beneath(fd if _ else str(tmp_path), "vol" if not _ else "d")
        os.close(fd)
        fd = next_fd
    os.close(fd)
    minikrust._remove_beneath(str(tmp_path), "vol")
    assert os.listdir(tmp_path) == []


# --- Manifests and pods validated as the API server would ---

def _static(name="ok", **spec):
    containers = spec.pop("containers", [{"name": "main", "image": "file:x.wasm"}])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": dict(containers=containers, **spec)}


BAD_MANIFESTS = {      # file -> (document, the field its one error line names)
    "dotdot-name.yaml": (_static("../../etc"), "metadata.name: Invalid value"),
    "upper-name.yaml": (_static("Web_1"), "metadata.name: Invalid value"),
    "namespace.yaml": (dict(_static(), metadata={"name": "a", "namespace": "../kube-system"}),
                       "metadata.namespace: Invalid value"),
    "no-name.yaml": (dict(_static(), metadata={}), "metadata.name: Required value"),
    "no-containers.yaml": (_static(containers=[]), "spec.containers: Required value"),
    "container-name.yaml": (_static(containers=[{"name": "../c", "image": "file:x.wasm"}]),
                            "spec.containers[0].name: Invalid value"),
    "init-name.yaml": (_static(initContainers=[{"name": "A", "image": "file:x.wasm"}]),
                       "spec.initContainers[0].name: Invalid value"),
    "dup-container.yaml": (_static(initContainers=[{"name": "main", "image": "file:x.wasm"}]),
                           'spec.containers[0].name: Duplicate value: "main"'),
    "no-image.yaml": (_static(containers=[{"name": "main"}]), "spec.containers[0].image: Required value"),
    "dup-volume.yaml": (_static(volumes=[{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}]),
                        'spec.volumes[1].name: Duplicate value: "v"'),
    "volume-name.yaml": (_static(volumes=[{"name": "a/b", "emptyDir": {}}]), "spec.volumes[0].name: Invalid value"),
    "dup-mount.yaml": (_static(volumes=[{"name": "v", "emptyDir": {}}], containers=[{
        "name": "main", "image": "file:x.wasm", "volumeMounts": [{"name": "v", "mountPath": "/a"},
                                                                 {"name": "v", "mountPath": "/a"}]}]),
        'spec.containers[0].volumeMounts[1].mountPath: Invalid value: "/a": must be unique'),
    "unknown-mount.yaml": (_static(containers=[{"name": "main", "image": "file:x.wasm",
                                                "volumeMounts": [{"name": "nope", "mountPath": "/a"}]}]),
                           'spec.containers[0].volumeMounts[0].name: Not found: "nope"'),
    "args-type.yaml": (_static(containers=[{"name": "main", "image": "file:x.wasm", "args": "not-a-list"}]),
                       "spec.containers[0].args: Invalid value"),
    "spec-type.yaml": (dict(_static(), spec=["x"]), "spec: Required value"),
}


def test_each_bad_manifest_gets_one_line_naming_file_and_field_and_the_good_one_runs(
        tmp_path, kubelet_factory, wasm, caplog):
    import yaml
    folder = tmp_path / "manifests"
    folder.mkdir()
    for filename, (doc, _) in BAD_MANIFESTS.items():
        (folder / filename).write_text(yaml.safe_dump(doc))
    (folder / "x.wasm").write_bytes(wasm.hello)
    (folder / "good.yaml").write_text(yaml.safe_dump(_static("good", restartPolicy="Never")))
    kubelet = kubelet_factory(manifests=folder, node="n1")
    wait_for(lambda: any(p["metadata"]["name"] == "good-n1" and (w.status or {}).get("phase") == "Succeeded"
                         for p, w in ((w.pod, w) for w in kubelet.pod_manager.workers.values())), timeout=30, what="good pod ran")
    assert [w.pod["metadata"]["name"] for w in kubelet.pod_manager.workers.values()] == ["good-n1"]
    lines_of = lambda filename: [r.getMessage() for r in list(caplog.records) if str(folder / filename) in r.getMessage()]
    wait_for(lambda: all(lines_of(f) for f in BAD_MANIFESTS), what="a line for each bad manifest")  # read after good.yaml
    for filename, (_, field) in BAD_MANIFESTS.items():
        lines = lines_of(filename)
        assert len(lines) == 1 and f"{folder / filename}: document 1: {field}" in lines[0], (filename, lines)


@pytest.mark.parametrize("spec_change, field", [
    ({"containers": [{"name": "Bad_Name", "image": "x"}]}, "spec.containers[0].name: Invalid value"),
    ({"containers": [{"name": "a", "image": "x"}], "volumes": [{"name": "Bad.Vol", "emptyDir": {}}]},
     "spec.volumes[0].name: Invalid value"),
])
def test_an_invalid_api_pod_fails_with_reason_message_and_event_and_others_run(
        fake_api, kubelet_factory, module_file, wasm, spec_change, field):
    kubelet_factory(fake_api)
    bad = _manifest("bad", [])
    bad["spec"].update(spec_change)
    fake_api.create_pod(bad, node_name="node-1")           # the fake lets it through; a real API would not
    fake_api.create_pod(_manifest("good", [{"name": "main", "image": module_file(wasm.hello)}]), node_name="node-1")
    status = wait_for(lambda: _status(fake_api, "bad").get("phase") == "Failed" and _status(fake_api, "bad"),
                      what="bad pod Failed")
    assert status["reason"] == "Invalid" and field in status["message"], status
    event = wait_for(lambda: fake_api.events(involved_name="bad", reason="Invalid"), what="Invalid event")[0]
    assert event["type"] == "Warning" and field in event["message"]
    wait_for(lambda: _status(fake_api, "good").get("phase") == "Succeeded", timeout=30, what="good pod ran")


# --- Run limits: refused or clamped at the boundary, on both backends ---

def _run(backend, wasm, tmp_path, argv=("hello",), module=None, **limits):
    with minikrust.module_errors():
        loaded = backend.load(module or wasm.hello)
        return loaded.run(list(argv), stdout=str(tmp_path / "out.log"), stderr=str(tmp_path / "out.log"), **limits)


@pytest.mark.parametrize("limits", [dict(deadline=1e18), dict(deadline=float("inf")), dict(deadline=10**30),
                                    dict(memory_limit=10**30), dict(log_max_size=10**30, log_max_files=2),
                                    dict(deadline=30, memory_limit=64 << 20)])
def test_huge_limits_are_clamped_to_none_not_overflowed(backend, wasm, tmp_path, limits):
    result = _run(backend, wasm, tmp_path, **limits)
    assert result.exit_code == 0 and not result.timed_out and not result.instantiate_failed, result
    assert (tmp_path / "out.log").read_text().endswith("hello\n")


@pytest.mark.parametrize("limits", [dict(deadline=float("nan")), dict(deadline=-1), dict(deadline="5"),
                                    dict(deadline=True), dict(memory_limit=-1), dict(memory_limit=1.5),
                                    dict(memory_limit="64Mi"), dict(log_max_size=0), dict(log_max_size=-5),
                                    dict(log_max_files=0, log_max_size=1000), dict(log_max_size=1e3)])
def test_nan_negative_and_mistyped_limits_are_refused(backend, wasm, tmp_path, limits):
    with pytest.raises(minikrust.ModuleRunError, match=next(iter(limits))):
        _run(backend, wasm, tmp_path, **limits)


def test_a_short_deadline_still_stops_a_spinning_module(backend, wasm, tmp_path):
    result = _run(backend, wasm, tmp_path, argv=("tool", "spin"), module=open(wasm.tool, "rb").read(), deadline=0.3)
    assert result.timed_out and result.exit_code is None


def test_fuzz_finding_an_env_value_that_is_not_a_string_is_refused_not_a_crash():
    """Found by tests/test_fuzz.py: `env[0].value: {}` reached $(VAR) expansion and raised there."""
    pod = {"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": [
        {"name": "c", "image": "i", "env": [{"name": "A", "value": {"x": 1}}]}]}}
    assert minikrust.pod_problem(pod).startswith("spec.containers[0].env[0].value: Invalid value")
    pod["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": 5, "mountPath": "/a"}]
    assert minikrust.pod_problem(pod).startswith("spec.containers[0].volumeMounts[0].name: Invalid value")


# --- Secrets stay secret (every test's log lines are grepped by tests/secret_watch.py too) ---

def test_secret_and_token_files_are_private_and_gone_with_their_pod(fake_api, kubelet_factory, wasm,
                                                                     secrets_stay_out_of_logs, caplog):
    """Secret values reach the module (files, env) but no log line; their files are 0600 in 0700
    folders and removed with the pod."""
    fake_api.create_secret("default", "creds", {"password": "pw-Zq81-never-logged", "key": "api-key-77f1"})
    tool = f"file:{wasm.tool}"
    pod = _manifest("secretive", [{
        "name": "main", "image": tool, "args": ["env"], "volumeMounts": [{"name": "s", "mountPath": "/s"}],
        "env": [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}]}],
        policy="Always", volumes=[{"name": "s", "secret": {"secretName": "creds"}}])
    with caplog.at_level(logging.DEBUG, logger="minikrust"):
        kubelet = kubelet_factory(fake_api)
        fake_api.create_pod(pod, node_name="node-1")
        wait_for(lambda: _cstatus(fake_api, "secretive", "main").get("restartCount", 0) >= 1, what="ran")
        uid = fake_api.get("pods", "default", "secretive")["metadata"]["uid"]
        volumes = os.path.join(kubelet.config.root_dir, "pods", uid, "volumes")
        private = [os.path.realpath(os.path.join(volumes, name)) for name in os.listdir(volumes)
                   if name == "s" or name.startswith("kube-api-access-")]
        assert len(private) == 2
        for folder in private:
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
            files = [os.path.join(folder, f) for f in os.listdir(folder)]
            assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files), files
        assert "PW=pw-Zq81-never-logged" in open(kubelet.container_log_path("default", "secretive", "main")).read()
        fake_api.delete_pod("default", "secretive")
        wait_for(lambda: not any(os.path.exists(p) for p in private), what="secret folders removed")
    assert len(secrets_stay_out_of_logs.lines) > 5      # the kubelet spoke, and every line was grepped
    assert not [line for line in secrets_stay_out_of_logs.lines if "pw-Zq81" in line or "api-key-77f1" in line]
