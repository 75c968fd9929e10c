"""Volumes: host directories for a pod's volumes, the preopens of its containers, cleanup."""
import logging
import os
import shutil
import stat

import pytest

import minikrust
from minikrust import (ApiError, Config, ContainerConfigError, cleanup_volumes, container_mounts,
                       prepare_volumes)
from tests.helpers import contract, unavailable
from tests.test_env import FakeApi
from tests.test_security import resolver  # noqa: F401  (a fixture)


class TokenApi(FakeApi):
    """FakeApi that also answers TokenRequests (or refuses them like contract 28)."""

    def __init__(self, *a, token="tok-VALUE-123", refuse=False, **kw):
        super().__init__(*a, **kw)
        self.token, self.refuse, self.posts = token, refuse, []

    def post(self, path, body, **kw):
        self.posts.append((path, body))
        if self.refuse:
            raise ApiError(403, "Forbidden", "audience not found in pod spec volume")
        return {"kind": "TokenRequest", "status": {"token": self.token, "expirationTimestamp": "2026-11-26T00:00:00Z"}}


@pytest.fixture(autouse=True)
def no_tmpfs_leftovers(tmp_path):
    """Secret folders live on /dev/shm, outside tmp_path: remove the ones a test did not clean."""
    yield
    for root, dirs, files in os.walk(tmp_path):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            if os.path.islink(path) and os.readlink(path).startswith("/dev/shm/minikrust-"):
                shutil.rmtree(os.readlink(path), ignore_errors=True)


def make_pod(volumes, mounts=(), **container):
    return {
        "metadata": {"name": "job", "namespace": "default", "uid": "uid-1", "labels": {"b": "2", "a": "1"},
                     "annotations": {"x": "y"}},
        "spec": {"nodeName": "node-1", "volumes": list(volumes),
                 "containers": [{"name": "main", "volumeMounts": list(mounts),
                                 "resources": {"limits": {"memory": "64Mi"}}, **container}]},
    }


def read(path):
    with open(path) as f:
        return f.read()


def test_empty_dir_is_created_and_kept_across_prepares(tmp_path):
    pod = make_pod([{"name": "e", "emptyDir": {}}], [{"name": "e", "mountPath": "/work"}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    assert dirs == {"e": str(tmp_path / "volumes" / "e")}
    (tmp_path / "volumes" / "e" / "kept").write_text("data")
    assert prepare_volumes(pod, str(tmp_path), Config()) == dirs
    assert read(tmp_path / "volumes" / "e" / "kept") == "data"
    assert container_mounts(pod, pod["spec"]["containers"][0], dirs) == [(dirs["e"], "/work", False)]


def test_memory_empty_dir_is_on_tmpfs_and_removed(tmp_path):
    pod = make_pod([{"name": "m", "emptyDir": {"medium": "Memory"}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    with open(os.path.join(dirs["m"], "scratch"), "w") as f:
        f.write("x")
    assert prepare_volumes(pod, str(tmp_path), Config()) == dirs
    assert read(os.path.join(dirs["m"], "scratch")) == "x"  # kept across container restarts
    if os.access("/dev/shm", os.W_OK):
        assert dirs["m"].startswith("/dev/shm/minikrust-")
    cleanup_volumes(str(tmp_path))
    assert not os.path.exists(dirs["m"])

def test_config_map_volume_with_items_and_modes(tmp_path):
    api = FakeApi(configmaps={"cfg": {"greeting": "hi", "other": "o"}})
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg", "defaultMode": 0o640,
                                                "items": [{"key": "greeting", "path": "sub/g.txt"},
                                                          {"key": "other", "path": "o", "mode": 0o600}]}}],
                   [{"name": "c", "mountPath": "/config"}])
    dirs = prepare_volumes(pod, str(tmp_path), Config(), api=api)
    assert read(os.path.join(dirs["c"], "sub/g.txt")) == "hi"
    assert stat.S_IMODE(os.stat(os.path.join(dirs["c"], "sub/g.txt")).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.join(dirs["c"], "o")).st_mode) == 0o600
    # configMap volumes are read-only whatever the mount says
    assert container_mounts(pod, pod["spec"]["containers"][0], dirs) == [(dirs["c"], "/config", True)]


def test_config_map_binary_data_becomes_files(tmp_path):
    api = FakeApi(configmaps={"cfg": {"text": "t"}})
    api.objects["/api/v1/namespaces/default/configmaps/cfg"]["binaryData"] = {"blob": "AAH/"}
    dirs = prepare_volumes(make_pod([{"name": "c", "configMap": {"name": "cfg"}}]), str(tmp_path), Config(), api=api)
    with open(os.path.join(dirs["c"], "blob"), "rb") as f:
        assert f.read() == b"\x00\x01\xff"
    assert read(os.path.join(dirs["c"], "text")) == "t"


def test_config_map_update_rewrites_and_drops_stale_keys(tmp_path):
    api = FakeApi(configmaps={"cfg": {"a": "1", "b": "2"}})
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg"}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config(), api=api)
    assert sorted(os.listdir(dirs["c"])) == ["a", "b"]
    api.objects["/api/v1/namespaces/default/configmaps/cfg"]["data"] = {"a": "changed"}
    prepare_volumes(pod, str(tmp_path), Config(), api=api)
    assert os.listdir(dirs["c"]) == ["a"] and read(os.path.join(dirs["c"], "a")) == "changed"


def test_secret_volume_is_private_and_removed_with_the_pod(tmp_path, caplog):
    api = FakeApi(secrets={"sec": {"password": "hunter2"}})
    pod = make_pod([{"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o644}}])
    with caplog.at_level(logging.DEBUG, logger="minikrust"):
        dirs = prepare_volumes(pod, str(tmp_path), Config(), api=api)
    path = os.path.join(dirs["s"], "password")
    assert read(path) == "hunter2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs["s"]).st_mode) == 0o700
    assert "hunter2" not in caplog.text
    if os.access("/dev/shm", os.W_OK):  # on tmpfs, linked from the pod dir
        assert os.path.dirname(dirs["s"]) == "/dev/shm"
        assert os.path.realpath(tmp_path / "volumes" / "s") == dirs["s"]
    assert prepare_volumes(pod, str(tmp_path), Config(), api=api) == dirs  # the same folder again
    cleanup_volumes(str(tmp_path))
    assert not os.path.exists(tmp_path / "volumes")
    assert not os.path.exists(dirs["s"])


@pytest.mark.parametrize("kind", ["configMap", "secret"])
def test_missing_object_is_retried_unless_optional(tmp_path, kind):
    ref = {"name": "gone"} if kind == "configMap" else {"secretName": "gone"}
    pod = make_pod([{"name": "v", kind: ref}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path), Config(), api=FakeApi())
    assert err.value.retry is True and "gone" in err.value.message
    ref["optional"] = True
    dirs = prepare_volumes(pod, str(tmp_path), Config(), api=FakeApi())
    assert os.listdir(dirs["v"]) == []


def test_forbidden_config_map_counts_as_missing(tmp_path):
    api = FakeApi(forbidden=["/api/v1/namespaces/default/configmaps/unrelated"])
    pod = make_pod([{"name": "v", "configMap": {"name": "unrelated"}}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path), Config(), api=api)
    assert err.value.retry is True


def test_missing_item_key_is_an_error_unless_optional(tmp_path):
    api = FakeApi(configmaps={"cfg": {"a": "1"}})
    pod = make_pod([{"name": "v", "configMap": {"name": "cfg", "items": [{"key": "zz", "path": "zz"}]}}])
    with pytest.raises(ContainerConfigError):
        prepare_volumes(pod, str(tmp_path), Config(), api=api)
    pod["spec"]["volumes"][0]["configMap"]["optional"] = True
    assert os.listdir(prepare_volumes(pod, str(tmp_path), Config(), api=api)["v"]) == []


def test_item_path_escaping_the_volume_is_refused(tmp_path):
    api = FakeApi(configmaps={"cfg": {"a": "1"}})
    for bad in ("../evil", "/etc/evil", "a/../../evil", 5):     # 5: a YAML manifest's number, no path
        pod = make_pod([{"name": "v", "configMap": {"name": "cfg", "items": [{"key": "a", "path": bad}]}}])
        with pytest.raises(ContainerConfigError) as err:
            prepare_volumes(pod, str(tmp_path), Config(), api=api)
        assert err.value.retry is False
    assert not (tmp_path / "evil").exists()


def test_downward_api_volume(tmp_path):
    pod = make_pod([{"name": "d", "downwardAPI": {"items": [
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['a']"}},
        {"path": "mem", "resourceFieldRef": {"containerName": "main", "resource": "limits.memory",
                                             "divisor": "1Mi"}},
    ]}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    assert read(os.path.join(dirs["d"], "name")) == "job"
    assert read(os.path.join(dirs["d"], "labels")) == 'a="1"\nb="2"'
    assert read(os.path.join(dirs["d"], "app")) == "1"
    assert read(os.path.join(dirs["d"], "mem")) == "64"


def test_admitted_service_account_volume_projects_token_and_tolerates_missing_sources(tmp_path):
    """The kube-api-access volume admission adds (contract 14) with only kube-root-ca.crt existing."""
    pod = contract("14-pod-create-admitted")
    api = TokenApi(configmaps={"cfg": {"greeting": "hi"}, "kube-root-ca.crt": {"ca.crt": "CA"}},
                   secrets={"sec": {"password": "p"}})
    dirs = prepare_volumes(pod, str(tmp_path), Config(allowed_host_paths=("/tmp",)), api=api)
    access = dirs["kube-api-access-rjfts"]
    assert sorted(os.listdir(access)) == ["ca.crt", "namespace", "token"]
    assert read(os.path.join(access, "token")) == "tok-VALUE-123"
    assert read(os.path.join(access, "namespace")) == "default"
    path, body = api.posts[0]
    assert path == "/api/v1/namespaces/default/serviceaccounts/default/token"
    assert "audiences" not in body["spec"]  # exactly what the source names: nothing
    assert body["spec"]["expirationSeconds"] == 3607
    assert body["spec"]["boundObjectRef"] == {"kind": "Pod", "apiVersion": "v1", "name": "job",
                                              "uid": "6213ebc1-f1c9-457a-bb66-0b7dd394ba84"}
    mounts = container_mounts(pod, pod["spec"]["containers"][0], dirs)
    assert (access, "/var/run/secrets/kubernetes.io/serviceaccount", True) in mounts


def test_token_request_names_exactly_the_audience_and_refusal_is_skipped(tmp_path, caplog):
    pod = make_pod([{"name": "t", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "vault", "path": "vault-token"}}]}}])
    api = TokenApi(refuse=True)
    with caplog.at_level(logging.DEBUG, logger="minikrust"):
        dirs = prepare_volumes(pod, str(tmp_path), Config(), api=api)
    assert api.posts[0][1]["spec"]["audiences"] == ["vault"]
    assert api.posts[0][1]["spec"]["expirationSeconds"] == 3600
    assert os.listdir(dirs["t"]) == []
    assert "skipped" in caplog.text


def test_standalone_skips_the_token(tmp_path):
    pod = make_pod([{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}},
                                                            {"downwardAPI": {"items": [{"path": "n", "fieldRef": {
                                                                "fieldPath": "metadata.name"}}]}}]}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config(), api=None)
    assert os.listdir(dirs["t"]) == ["n"]


def test_user_projected_volume_with_missing_config_map_waits(tmp_path):
    pod = make_pod([{"name": "p", "projected": {"sources": [{"configMap": {"name": "gone"}}]}}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path), Config(), api=TokenApi())
    assert err.value.retry is True


def test_host_path_refused_without_allow_list(tmp_path):
    pod = make_pod([{"name": "h", "hostPath": {"path": str(tmp_path)}}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path / "pod"), Config())
    assert err.value.retry is False and "allowed-host-paths" in err.value.message


def test_host_path_under_allowed_prefix(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    pod = make_pod([{"name": "h", "hostPath": {"path": str(allowed / "data")}},
                    {"name": "n", "hostPath": {"path": str(allowed / "new"), "type": "DirectoryOrCreate"}}],
                   [{"name": "h", "mountPath": "/data", "readOnly": True}])
    dirs = prepare_volumes(pod, str(tmp_path / "pod"), Config(allowed_host_paths=(str(allowed),)))
    assert dirs["h"] == os.path.realpath(allowed / "data")
    assert os.path.isdir(allowed / "new")
    assert container_mounts(pod, pod["spec"]["containers"][0], dirs) == [(dirs["h"], "/data", True)]
    cleanup_volumes(str(tmp_path / "pod"))
    assert os.path.isdir(allowed / "data")  # hostPath content is never removed


@pytest.mark.parametrize("escape", ["dotdot", "symlink", "prefix-sibling"])
def test_host_path_escapes_are_resolved_before_the_check(tmp_path, escape):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "allowed-not").mkdir()
    if escape == "dotdot":
        path = str(allowed) + "/../outside"
    elif escape == "symlink":
        os.symlink(tmp_path / "outside", allowed / "link")
        path = str(allowed / "link")
    else:
        path = str(tmp_path / "allowed-not")
    pod = make_pod([{"name": "h", "hostPath": {"path": path}}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path / "pod"), Config(allowed_host_paths=(str(allowed),)))
    assert err.value.retry is False


def test_empty_or_relative_allowed_prefix_allows_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    pod = make_pod([{"name": "h", "hostPath": {"path": str(tmp_path / "data")}}])
    for prefixes in (("",), (".",), ("data",)):
        with pytest.raises(ContainerConfigError):
            prepare_volumes(pod, str(tmp_path / "pod"), Config(allowed_host_paths=prefixes))


def test_host_path_file_types_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    pod = make_pod([{"name": "h", "hostPath": {"path": str(tmp_path / "f")}}])
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(pod, str(tmp_path / "pod"), Config(allowed_host_paths=(str(tmp_path),)))
    assert err.value.retry is False and "directories" in err.value.message


@pytest.mark.parametrize("volume, kind", [
    ({"name": "x", "persistentVolumeClaim": {"claimName": "c"}}, "persistentVolumeClaim"),
    ({"name": "x", "nfs": {"server": "s", "path": "/"}}, "nfs"),
    ({"name": "x"}, "none"),
])
def test_unknown_volume_type_names_it(tmp_path, volume, kind):
    with pytest.raises(ContainerConfigError) as err:
        prepare_volumes(make_pod([volume]), str(tmp_path), Config())
    assert err.value.retry is False and kind in err.value.message


def test_sub_path_and_sub_path_expr(tmp_path):
    pod = make_pod([{"name": "e", "emptyDir": {}}],
                   [{"name": "e", "mountPath": "/a", "subPath": "one/two"},
                    {"name": "e", "mountPath": "/b/", "subPathExpr": "$(POD)", "readOnly": True}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    mounts = container_mounts(pod, pod["spec"]["containers"][0], dirs, env=[("POD", "job")])
    mounts = [(os.path.realpath(host), guest, readonly) for host, guest, readonly in mounts]   # held: /proc/self/fd/N
    assert mounts == [(os.path.join(dirs["e"], "one/two"), "/a", False), (os.path.join(dirs["e"], "job"), "/b", True)]
    assert os.path.isdir(os.path.join(dirs["e"], "one/two"))


def test_sub_path_naming_a_file_is_staged_in_its_folder(backend, wasm, tmp_path):
    """The common `subPath: app.conf` mount of one configMap key as a file, and a writable one."""
    api = FakeApi(configmaps={"cfg": {"app.conf": "setting=1", "other": "hidden"}})
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg"}}, {"name": "e", "emptyDir": {}}],
                   [{"name": "c", "mountPath": "/etc/app.conf", "subPath": "app.conf"},
                    {"name": "e", "mountPath": "/state/count", "subPath": "count"}])
    pod_dir = str(tmp_path / "pod")
    os.mkdir(pod_dir)                # the pod worker makes it before its volumes
    dirs = prepare_volumes(pod, pod_dir, Config(), api=api)
    with open(os.path.join(dirs["e"], "count"), "w") as f:
        f.write("0")
    mounts = container_mounts(pod, pod["spec"]["containers"][0], dirs, pod_dir=pod_dir)
    assert [(guest, readonly) for _, guest, readonly in mounts] == [("/etc", True), ("/state", False)]
    assert sorted(os.listdir(mounts[0][0])) == ["app.conf"]
    result, output = run_module(backend, wasm.tool, ["tool", "cat", "/etc/app.conf"], mounts, tmp_path)
    assert output == "setting=1"
    result, output = run_module(backend, wasm.tool, ["tool", "cat", "/etc/other"], mounts, tmp_path)
    assert result.exit_code == 2
    result, output = run_module(backend, wasm.tool, ["tool", "write", "/state/count", "41"], mounts, tmp_path)
    assert result.exit_code == 0, output
    assert read(os.path.join(dirs["e"], "count")) == "41"  # written through to the emptyDir
    # again (a restart): staging is rebuilt, and cleanup removes it with the volumes
    assert container_mounts(pod, pod["spec"]["containers"][0], dirs, pod_dir=pod_dir) == mounts
    cleanup_volumes(pod_dir)
    assert not os.path.exists(os.path.join(pod_dir, "volumes"))


def test_file_sub_path_in_a_mounted_folder_is_refused(tmp_path):
    pod = make_pod([{"name": "e", "emptyDir": {}}],
                   [{"name": "e", "mountPath": "/data"}, {"name": "e", "mountPath": "/data/f", "subPath": "f"}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    open(os.path.join(dirs["e"], "f"), "w").close()
    with pytest.raises(ContainerConfigError) as err:
        container_mounts(pod, pod["spec"]["containers"][0], dirs, pod_dir=str(tmp_path))
    assert err.value.retry is False

@pytest.mark.parametrize("sub_path", ["../x", "/etc", "a/../../x", "link", "link/deeper"])
def test_sub_path_cannot_leave_its_volume(tmp_path, sub_path):
    pod = make_pod([{"name": "e", "emptyDir": {}}], [{"name": "e", "mountPath": "/a", "subPath": sub_path}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    os.symlink(str(tmp_path), os.path.join(dirs["e"], "link"))  # as a module might have planted
    with pytest.raises(ContainerConfigError) as err:
        container_mounts(pod, pod["spec"]["containers"][0], dirs)
    assert err.value.retry is False


def test_mount_errors(tmp_path):
    pod = make_pod([{"name": "e", "emptyDir": {}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    for mounts in ([{"name": "nope", "mountPath": "/x"}], [{"name": "e", "mountPath": "relative"}],
                   [{"name": "e", "mountPath": "/x"}, {"name": "e", "mountPath": "/x/"}]):
        with pytest.raises(ContainerConfigError):
            container_mounts(pod, {"name": "c", "volumeMounts": mounts}, dirs)




def test_read_guest_file_stays_inside_its_mount(tmp_path, resolver):
    data, logs, outside = tmp_path / "data", tmp_path / "data" / "logs", tmp_path / "outside"
    logs.mkdir(parents=True)
    outside.mkdir()
    (outside / "shadow").write_text("root:x")
    (data / "msg").write_text("done")
    (logs / "x").write_text("log")
    os.symlink(outside / "shadow", data / "evil")
    os.symlink("../outside/shadow", data / "rel")
    os.symlink("rel", data / "chain")
    os.symlink("msg", data / "alias")
    mounts = [(str(data), "/dev", False), (str(logs), "/dev/logs", True)]
    read = minikrust.read_guest_file
    assert read(mounts, "/dev/msg", 4096) == b"done"
    assert read(mounts, "/dev/msg", 2) == b"do"
    # a link that stays inside the mount: openat2 follows it, the walk follows no link at all
    assert read(mounts, "/dev/alias", 4096) == (b"done" if resolver == "openat2" else None)
    assert read(mounts, "/dev/logs/x", 4096) == b"log"        # the longest mount wins
    for bad in ("/dev/evil", "/dev/rel", "/dev/chain", "/dev/../outside/shadow", "/etc/passwd", "/dev",
                "/dev/logs", "dev/msg", "", None):
        assert read(mounts, bad, 4096) is None, bad


def test_cleanup_removes_everything_without_following_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    pod = make_pod([{"name": "e", "emptyDir": {}}])
    dirs = prepare_volumes(pod, str(tmp_path), Config())
    os.symlink(victim, os.path.join(dirs["e"], "link"))
    os.makedirs(os.path.join(dirs["e"], "deep/er"))
    os.makedirs(os.path.join(dirs["e"], "locked/in"))
    os.chmod(os.path.join(dirs["e"], "deep"), 0o500)
    os.chmod(os.path.join(dirs["e"], "locked"), 0)
    cleanup_volumes(str(tmp_path / "pod"))
    assert not (tmp_path / "pod" / "volumes").exists()
    assert (victim / "precious").read_text() == "keep"
    cleanup_volumes(str(tmp_path / "pod"))  # twice is fine


# --- Sandbox: a module reaches its mounts and nothing else ---

# escape PATH... -- RAW...: each PATH through libc ("libc <path> ok <first line>" or the errno text),
# then each RAW through path_open on every preopened fd (3..) as given, `..` and leading `/` included.
ESCAPE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <wasi/api.h>

static void try_libc(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { printf("libc %s %s\n", path, strerror(errno)); return; }
    char line[256] = "";
    if (!fgets(line, sizeof line, f)) line[0] = 0;
    line[strcspn(line, "\n")] = 0;
    fclose(f);
    printf("libc %s ok %s\n", path, line);
}

static void try_raw(int dirfd, const char *path) {
    __wasi_fd_t fd;
    __wasi_errno_t err = __wasi_path_open(dirfd, __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, path, 0,
                                          __WASI_RIGHTS_FD_READ, 0, 0, &fd);
    if (err) { printf("raw %d %s errno %d\n", dirfd, path, err); return; }
    char buf[256] = "";
    __wasi_iovec_t iov = {(uint8_t *)buf, sizeof buf - 1};
    __wasi_size_t n = 0;
    __wasi_fd_read(fd, &iov, 1, &n);
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
    __wasi_fd_close(fd);
    printf("raw %d %s ok %s\n", dirfd, path, buf);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--"); i++) try_libc(argv[i]);
    for (int dirfd = 3; dirfd < 16; dirfd++) {
        __wasi_prestat_t pre;
        if (__wasi_fd_prestat_get(dirfd, &pre)) break;
        for (int j = i + 1; j < argc; j++) try_raw(dirfd, argv[j]);
    }
    return 0;
}
"""

SECRET = "TOP-SECRET-HOST-DATA"


@pytest.fixture
def sandbox(tmp_path):
    """A pod dir with an emptyDir full of escape routes and a secret file outside any mount."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET + "\n")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "shared.txt").write_text("shared\n")
    os.symlink(outside / "secret.txt", allowed / "hostlink")
    pod = make_pod([{"name": "e", "emptyDir": {}}, {"name": "h", "hostPath": {"path": str(allowed)}}],
                   [{"name": "e", "mountPath": "/data"}, {"name": "h", "mountPath": "/host", "readOnly": True}])
    pod_dir = tmp_path / "pods" / "uid-1"
    pod_dir.mkdir(parents=True)      # the pod worker makes it before its volumes
    dirs = prepare_volumes(pod, str(pod_dir), Config(allowed_host_paths=(str(allowed),)))
    data = dirs["e"]
    with open(os.path.join(data, "ok.txt"), "w") as f:
        f.write("fine\n")
    os.symlink(outside / "secret.txt", os.path.join(data, "abs-link"))
    os.symlink(os.path.relpath(outside / "secret.txt", data), os.path.join(data, "rel-link"))
    os.symlink(outside, os.path.join(data, "dir-link"))
    os.symlink("/", os.path.join(data, "root-link"))
    mounts = container_mounts(pod, pod["spec"]["containers"][0], dirs)
    return {"mounts": mounts, "outside": str(outside), "tmp": tmp_path, "data": data}


def run_module(host, path, argv, mounts, tmp_path):
    with open(path, "rb") as f:
        module = host.load(f.read())
    out = tmp_path / f"out-{len(os.listdir(tmp_path))}.log"
    result = module.run(argv, env=[], preopens=mounts, stdout=str(out), stderr=str(out), log_format="plain")
    return result, out.read_text()


def test_module_cannot_reach_host_paths_outside_its_mounts(backend, wasm, sandbox):
    escape = wasm.c(ESCAPE_C, "escape")
    secret = os.path.join(sandbox["outside"], "secret.txt")
    tries = ["/data/ok.txt", "/host/shared.txt",                                   # the controls
             "/data/../outside/secret.txt", "/data/../../../../../../" + secret.lstrip("/"),
             secret, "/etc/passwd", "../outside/secret.txt", "outside/secret.txt",
             "/data/abs-link", "/data/rel-link", "/data/dir-link/secret.txt", "/data/root-link/etc/passwd",
             "/host/hostlink", "/host/../outside/secret.txt"]
    raw = ["ok.txt", "shared.txt", "..", "../outside/secret.txt", "../../../../../../../" + secret.lstrip("/"),
           secret, "/etc/passwd", "abs-link", "rel-link", "dir-link/secret.txt", "root-link/etc/passwd",
           "hostlink", "dir-link/../ok.txt"]
    result, output = run_module(backend, escape, ["escape", *tries, "--", *raw], sandbox["mounts"], sandbox["tmp"])
    assert result.exit_code == 0, output
    assert "libc /data/ok.txt ok fine" in output
    assert "libc /host/shared.txt ok shared" in output
    assert SECRET not in output
    assert "root:" not in output  # /etc/passwd never read
    ok_lines = sorted(line.split(" ok ")[0] for line in output.splitlines() if " ok " in line)
    # only the controls succeed: through libc, and raw on the preopen that holds them
    assert ok_lines == ["libc /data/ok.txt", "libc /host/shared.txt", "raw 3 ok.txt", "raw 4 shared.txt"], output


def test_read_only_mount_refuses_writes(backend, wasm, tmp_path):
    api = FakeApi(configmaps={"cfg": {"a": "1"}})
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg"}}, {"name": "e", "emptyDir": {}}],
                   [{"name": "c", "mountPath": "/config"}, {"name": "e", "mountPath": "/ro", "readOnly": True}])
    dirs = prepare_volumes(pod, str(tmp_path), Config(), api=api)
    mounts = container_mounts(pod, pod["spec"]["containers"][0], dirs)
    for target in ("/config/a", "/config/new", "/ro/new"):
        result, output = run_module(backend, wasm.tool, ["tool", "write", target, "x"], mounts, tmp_path)
        assert result.exit_code == 2, output
    assert read(os.path.join(dirs["c"], "a")) == "1"
    assert os.listdir(dirs["e"]) == []
    result, output = run_module(backend, wasm.tool, ["tool", "cat", "/config/a"], mounts, tmp_path)
    assert output == "1"


# --- Examples: the manifests and modules in examples/ run on these functions and the WASI host ---

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(relpath):
    import yaml
    with open(os.path.join(EXAMPLES, relpath)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return [d for d in docs if d.get("kind") == "Pod"], [d for d in docs if d.get("kind") == "ConfigMap"]


def run_example_container(host, pod, container, pod_dir, base_dir, api=None, deadline=None):
    """What the pods worker does for one container, minus status: env, argv, volumes, run."""
    dirs = prepare_volumes(pod, pod_dir, Config(), api=api, base_dir=base_dir)
    env = minikrust.container_env(pod, container, api=api, node_ip="127.0.0.1")
    argv = minikrust.container_argv(container, env)
    mounts = container_mounts(pod, container, dirs, env=env)
    image = container["image"]
    assert image.startswith("file:")
    with open(os.path.join(base_dir, image[len("file:"):]), "rb") as f:
        module = host.load(f.read())
    out = os.path.join(pod_dir, f"{container['name']}.log")
    result = module.run(argv, env=env, preopens=mounts, stdout=out, stderr=out, log_format="plain",
                        deadline=deadline)
    with open(out) as f:
        return result, f.read(), dirs


def test_example_hello(backend, tmp_path):
    (pod,), _ = load_example("hello.yaml")
    pod["spec"]["nodeName"] = "node-1"
    result, output, _ = run_example_container(backend, pod, pod["spec"]["containers"][0], str(tmp_path), EXAMPLES)
    assert result.exit_code == 0, output
    assert output == "Hello, minikrust! I am hello, a WebAssembly module in pod hello on node node-1.\n"


def test_example_job_standalone_init_then_greet(backend, tmp_path):
    (pod,), _ = load_example("job.yaml")
    (init,), (main,) = pod["spec"]["initContainers"], pod["spec"]["containers"]
    result, output, dirs = run_example_container(backend, pod, init, str(tmp_path), EXAMPLES)
    assert result.exit_code == 0, output
    result, output, dirs = run_example_container(backend, pod, main, str(tmp_path), EXAMPLES)
    assert result.exit_code == 0, output
    assert output.splitlines() == ["Hello, Ada!", "Hello, Grace!", "Hello, Barbara!",
                                   "wrote 3 greetings to greetings.txt"]
    # workingDir /work: the relative path landed in the emptyDir
    assert read(os.path.join(dirs["work"], "greetings.txt")) == "Hello, Ada!\nHello, Grace!\nHello, Barbara!\n"


def test_example_job_with_a_config_map(backend, tmp_path):
    (pod,), (config_map,) = load_example("cluster/job-configmap.yaml")
    pod["metadata"].update(namespace="default", uid="uid-9")
    api = FakeApi(configmaps={config_map["metadata"]["name"]: config_map["data"]})
    repo = os.path.dirname(EXAMPLES)
    result, output, dirs = run_example_container(backend, pod, pod["spec"]["containers"][0], str(tmp_path), repo,
                                                 api=api)
    assert result.exit_code == 0, output
    assert read(os.path.join(dirs["work"], "greetings.txt")) == "Hello, Ada!\nHello, Grace!\nHello, Barbara!\n"


def test_example_ticker_ticks_every_second(backend, tmp_path):
    (pod,), _ = load_example("long-running/ticker.yaml")
    base = os.path.join(EXAMPLES, "long-running")
    result, output, _ = run_example_container(backend, pod, pod["spec"]["containers"][0], str(tmp_path), base,
                                              deadline=2.5)
    assert result.timed_out and result.exit_code is None
    lines = output.splitlines()
    assert 2 <= len(lines) <= 4 and lines[0].startswith("tick 1 from ticker at "), output


def test_example_crasher_exits_1(backend, tmp_path):
    (pod,), _ = load_example("long-running/crasher.yaml")
    base = os.path.join(EXAMPLES, "long-running")
    result, output, _ = run_example_container(backend, pod, pod["spec"]["containers"][0], str(tmp_path), base)
    assert result.exit_code == 1
    assert "crasher: starting up" in output and "giving up" in output
    assert pod["spec"]["restartPolicy"] == "Always"


def test_examples_folder_holds_only_pods_that_finish():
    """`--pod-manifest-path examples/ --once` must end: no restartPolicy Always at the top level."""
    names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith((".yaml", ".yml", ".json")))
    assert names == ["hello.yaml", "job.yaml"]
    for name in names:
        for pod in load_example(name)[0]:
            assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure"), name


def test_example_modules_rebuild_from_their_sources(wasm, tmp_path):
    import shutil
    import subprocess
    if not shutil.which("clang"):
        unavailable("clang is not installed")
    proc = subprocess.run(["sh", os.path.join(EXAMPLES, "build.sh")], env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = sorted(os.listdir(os.path.join(EXAMPLES, "modules")))
    assert committed == sorted(os.listdir(tmp_path)) == ["crasher.wasm", "hello.wasm", "job.wasm", "ticker.wasm"]
    for name in committed:
        with open(os.path.join(EXAMPLES, "modules", name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"examples/modules/{name} is not what build.sh makes from its source"


# --- Against the fake API server: what a module sees of an admitted pod ---

def test_admitted_pod_reads_its_token_and_secret_and_they_vanish_with_it(kubelet_factory, fake_api, wasm, caplog,
                                                                          monkeypatch):
    """Admission adds the kube-api-access volume (contract 14): the token comes from a TokenRequest,
    the secret volume is readable, and both tmpfs folders are removed when the pod is deleted."""
    from tests.helpers import wait_for
    tool = f"file:{wasm.tool}"
    private = []
    real_private_dir = minikrust._private_dir

    def recording_private_dir(pod_dir, name):  # the tmpfs folders, to check they are gone at the end
        private.append(real_private_dir(pod_dir, name))
        return private[-1]
    monkeypatch.setattr(minikrust, "_private_dir", recording_private_dir)
    fake_api.create_secret("default", "creds", {"password": "s3cr3t-pw"})
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    mounts = [{"name": "creds", "mountPath": "/creds"}]
    pod = {"metadata": {"name": "reader"}, "spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
        "containers": [
            {"name": "token", "image": tool, "args": ["cat", f"{sa}/token"], "volumeMounts": mounts},
            {"name": "ns", "image": tool, "args": ["cat", f"{sa}/namespace"], "volumeMounts": mounts},
            {"name": "secret", "image": tool, "args": ["cat", "/creds/password"], "volumeMounts": mounts}]}}
    with caplog.at_level(logging.DEBUG, logger="minikrust"):
        kubelet = kubelet_factory(fake_api)
        fake_api.create_pod(pod, node_name="node-1")

        def succeeded():
            status = (fake_api.get("pods", "default", "reader") or {}).get("status") or {}
            return status.get("phase") == "Succeeded" and status
        wait_for(succeeded, timeout=15, what="reader Succeeded")
        logs = {}
        for name in ("token", "ns", "secret"):
            with open(kubelet.container_log_path("default", "reader", name)) as f:
                logs[name] = "".join(line.split(" ", 3)[3] for line in f if line.strip())
        assert len(set(private)) == 2  # the secret and the kube-api-access volume
        assert logs["ns"].strip() == "default"
        assert logs["secret"].strip() == "s3cr3t-pw"
        token = logs["token"].strip()
        assert token, "the projected token is empty"
        posts = [r for r in fake_api.requests if r.method == "POST" and r.path.startswith(
            "/api/v1/namespaces/default/serviceaccounts/default/token")]
        assert posts and posts[0].user == "system:node:node-1"
        fake_api.delete_pod("default", "reader")
        wait_for(lambda: fake_api.get("pods", "default", "reader") is None, timeout=10, what="pod gone")
        wait_for(lambda: not any(os.path.exists(p) for p in private), timeout=5, what="volumes removed")
    assert token not in caplog.text and "s3cr3t-pw" not in caplog.text


def test_host_path_allow_list_in_a_standalone_kubelet(kubelet_factory, wasm, tmp_path):
    """One static pod writes through an allowed hostPath; one asking for /etc fails with a clear reason."""
    import yaml
    from tests.helpers import wait_for
    allowed = tmp_path / "shared"
    allowed.mkdir()
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    def pod(name, host_path, args):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "h", "hostPath": {"path": host_path, "type": "DirectoryOrCreate"}}],
            "containers": [{"name": "main", "image": f"file:{wasm.tool}", "args": args,
                            "volumeMounts": [{"name": "h", "mountPath": "/host"}]}]}}
    (manifests / "ok.yaml").write_text(yaml.safe_dump(pod("ok", str(allowed / "out"), ["write", "/host/result", "42"])))
    (manifests / "etc.yaml").write_text(yaml.safe_dump(pod("etc", "/etc", ["cat", "/host/passwd"])))
    kubelet = kubelet_factory(manifests=str(manifests), allowed_host_paths=(str(allowed),))

    def phase(prefix, wanted):
        def check():
            pods = [p for p in kubelet.pods() if p["metadata"]["name"].startswith(prefix + "-")]
            return pods and pods[0].get("status", {}).get("phase") == wanted and pods[0]["status"]
        return check
    wait_for(phase("ok", "Succeeded"), timeout=15, what="ok Succeeded")
    assert (allowed / "out" / "result").read_text() == "42"
    refused = wait_for(phase("etc", "Failed"), timeout=15, what="etc Failed")
    assert refused["reason"] == "CreateContainerConfigError"
    assert "/etc" in refused["message"] and "allowed-host-paths" in refused["message"]


def test_cluster_example_job_runs_against_the_fake_api(kubelet_factory, fake_api, monkeypatch):
    """examples/cluster/job-configmap.yaml as `kubectl apply` would send it, its image relative to the repo."""
    from tests.helpers import wait_for
    monkeypatch.chdir(os.path.dirname(EXAMPLES))
    (pod,), (config_map,) = load_example("cluster/job-configmap.yaml")
    kubelet = kubelet_factory(fake_api)
    fake_api.create({**config_map, "metadata": {**config_map["metadata"], "namespace": "default"}})
    fake_api.create_pod(pod, node_name="node-1")
    name = pod["metadata"]["name"]

    def succeeded():
        status = (fake_api.get("pods", "default", name) or {}).get("status") or {}
        return status.get("phase") == "Succeeded" and status
    wait_for(succeeded, timeout=15, what=f"{name} Succeeded")
    with open(kubelet.container_log_path("default", name, "greet")) as f:
        lines = [line.rstrip("\n").split(" ", 3)[3] for line in f]
    assert lines == ["Hello, Ada!", "Hello, Grace!", "Hello, Barbara!", "wrote 3 greetings to greetings.txt"]
