"""Images: references, pulls from a real registry in each module format, auth, policies, the store."""
import base64
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import requests

import minikrust
from minikrust import ImageError, ImageManager, ModuleStore, parse_image_ref
from tests.helpers import wait_for
from tests.registry import PASSWORD, USER, fake_module, sha256


def make_manager(tmp_path, hosts=(), api=None, **config):
    cfg = minikrust.Config(root_dir=str(tmp_path / "root"), insecure_registries=tuple(hosts), **config)
    store = ModuleStore(os.path.join(cfg.root_dir, "modules"))
    return ImageManager(cfg, store, api, retry_delay=0.02, backoff=(0.3, 1.0))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def assert_no_secret(text):
    assert PASSWORD not in text
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in text


class FakeApi:
    """Just enough of ApiClient for imagePullSecrets: get() of secrets, 404 for anything else."""

    def __init__(self, secrets):
        self.secrets = secrets
        self.paths = []

    def get(self, path, **kw):
        self.paths.append(path)
        if path in self.secrets:
            return self.secrets[path]
        raise minikrust.ApiError(404, "NotFound", f"{path} not found")


def docker_config(host, user=USER, password=PASSWORD):
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"auths": {f"http://{host}": {"auth": auth}}}


def pull_secret(name, host, kind="kubernetes.io/dockerconfigjson", password=PASSWORD):
    doc = docker_config(host, password=password)
    key = ".dockerconfigjson"
    if kind == "kubernetes.io/dockercfg":
        doc, key = doc["auths"], ".dockercfg"
    data = base64.b64encode(json.dumps(doc).encode()).decode()
    return {"metadata": {"name": name}, "type": kind, "data": {key: data}}


# -- references and policies (pure) --

@pytest.mark.parametrize("image, expected", [
    ("hello", ("docker.io", "library/hello", "latest", None)),
    ("user/app:v1", ("docker.io", "user/app", "v1", None)),
    ("ghcr.io/o/app", ("ghcr.io", "o/app", "latest", None)),
    ("localhost/app:1", ("localhost", "app", "1", None)),
    ("127.0.0.1:5000/a/b:tag", ("127.0.0.1:5000", "a/b", "tag", None)),
    ("r.io/app@sha256:" + "a" * 64, ("r.io", "app", None, "sha256:" + "a" * 64)),
    ("r.io/app:v2@sha256:" + "b" * 64, ("r.io", "app", "v2", "sha256:" + "b" * 64)),
])
def test_image_references_get_docker_defaults(image, expected):
    ref = parse_image_ref(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("image", ["", "UPPER/case", "r.io/app@sha256:short", "a b", "r.io/app:bad/tag"])
def test_invalid_image_reference_is_invalid_image_name(image):
    with pytest.raises(ImageError) as err:
        parse_image_ref(image)
    assert err.value.reason == "InvalidImageName"


@pytest.mark.parametrize("image, policy", [
    ("app", "Always"), ("app:latest", "Always"), ("app:v1", "IfNotPresent"),
    ("app@sha256:" + "c" * 64, "IfNotPresent"), ("file:x.wasm", "IfNotPresent"),
    ("app:latest@sha256:" + "c" * 64, "Always"), ("r.io:5000/app", "Always"), ("r.io:5000/app:v2", "IfNotPresent"),
])
def test_default_pull_policy_is_always_only_for_latest(image, policy):
    assert minikrust.default_pull_policy(image) == policy


def test_file_images_are_absolute_or_relative_to_base_dir(tmp_path):
    module = fake_module(100)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "hello.wasm").write_bytes(module)
    images = make_manager(tmp_path)
    ref = images.ensure("file:hello.wasm", None, base_dir=str(tmp_path / "m"))
    assert ref.path == str(tmp_path / "m" / "hello.wasm") and ref.digest == sha256(module)
    assert ref.image_id == f"file:{ref.path}@{ref.digest}"
    assert images.ensure(f"file:{ref.path}", "Never") == ref
    with pytest.raises(ImageError) as err:
        images.ensure("file:missing.wasm", None, base_dir=str(tmp_path))
    assert err.value.reason == "ErrImagePull" and "missing.wasm" in err.value.message


def test_credentials_match_registry_hosts_and_globs():
    matches = minikrust._registry_matches
    assert matches("127.0.0.1:5000", "127.0.0.1:5000") and not matches("127.0.0.1:5000", "127.0.0.1:5001")
    assert matches("*.example.com", "r.example.com") and not matches("*.example.com", "example.com")
    assert not matches("*.example.com", "a.b.example.com")
    doc = {"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}}
    (cred,) = minikrust.docker_config_credentials(doc)
    assert cred.registry == "docker.io" and "p" not in repr(cred)


# -- formats --

def test_pulls_cncf_wasm_artifact_by_tag(tmp_path, registry):
    module = fake_module(3000)
    manifest_digest = registry.push_cncf("fmt/cncf", "v1", module)
    images = make_manager(tmp_path, [registry.host])
    assert not images.present(f"{registry.host}/fmt/cncf:v1")
    ref = images.ensure(f"{registry.host}/fmt/cncf:v1", None)
    assert read(ref.path) == module and ref.pulled > 0
    assert images.store.node_images() == [{"names": sorted([ref.image_id, f"{registry.host}/fmt/cncf:v1"]),
                                           "sizeBytes": len(module)}]
    assert images.present(f"{registry.host}/fmt/cncf:v1")
    assert images.ensure(f"{registry.host}/fmt/cncf:v1", "IfNotPresent").pulled is None
    assert ref.digest == sha256(module)
    assert ref.image_id == f"{registry.host}/fmt/cncf@{manifest_digest}"
    assert ref.path.startswith(str(tmp_path / "root" / "modules"))


def test_pulls_wasm_to_oci_layout(tmp_path, registry):
    module = fake_module(2000)
    registry.push_wasm_to_oci("fmt/wasm-to-oci", "v1", module)
    ref = make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/wasm-to-oci:v1", None)
    assert read(ref.path) == module and ref.digest == sha256(module)


@pytest.mark.parametrize("gzipped, docker", [(True, False), (False, False), (True, True)])
def test_pulls_module_named_by_entrypoint_from_image_layers(tmp_path, registry, gzipped, docker):
    module = fake_module(5000)
    registry.push_tar_image("fmt/image", "v1", module, entrypoint="/app/hello.wasm", gzipped=gzipped, docker=docker)
    ref = make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/image:v1", None)
    assert read(ref.path) == module and ref.digest == sha256(module)


def test_image_whose_entrypoint_is_not_wasm_is_refused(tmp_path, registry):
    registry.push_tar_image("fmt/notwasm", "v1", b"#!/bin/sh\necho hi\n", entrypoint="/bin/app")
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/notwasm:v1", None)
    assert err.value.reason == "ErrImagePull" and "not a WebAssembly module" in err.value.message


def test_index_picks_the_wasip1_wasm_entry(tmp_path, registry):
    module, other = fake_module(1000), fake_module(1000)
    linux = registry.push_tar_image("fmt/multi", "linux", other, entrypoint="/x.wasm")
    wasm = registry.push_cncf("fmt/multi", "wasm", module)
    index = registry.push_index("fmt/multi", "v1", [(linux, "linux", "amd64"), (wasm, "wasip1", "wasm")])
    ref = make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/multi:v1", None)
    assert read(ref.path) == module
    assert ref.image_id == f"{registry.host}/fmt/multi@{index}"
    registry.push_index("fmt/multi", "sole", [(wasm, "linux", "riscv64"), (linux, "unknown", "unknown")])
    assert make_manager(tmp_path / "b", [registry.host]).ensure(f"{registry.host}/fmt/multi:sole", None).digest == ref.digest


def test_index_without_a_wasm_entry_names_the_platforms_found(tmp_path, registry):
    a = registry.push_cncf("fmt/nowasm", "a", fake_module(100))
    b = registry.push_cncf("fmt/nowasm", "b", fake_module(100))
    registry.push_index("fmt/nowasm", "v1", [(a, "linux", "amd64"), (b, "linux", "arm64")])
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/nowasm:v1", None)
    assert "linux/amd64, linux/arm64" in err.value.message


def test_unknown_format_names_the_media_types_found(tmp_path, registry):
    registry._manifest("fmt/other", "v1", b"{}", "application/vnd.example.config+json",
                       [(b"data", "application/vnd.example.thing")])
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/other:v1", None)
    assert err.value.reason == "ErrImagePull"
    assert "application/vnd.example.config+json" in err.value.message
    assert "application/vnd.example.thing" in err.value.message


def test_wasip2_artifact_is_pulled_like_a_module(tmp_path, registry):
    component = b"\0asm\x0d\0\x01\0" + bytes(100)  # the host tells a component by this header
    registry.push_cncf("fmt/component", "v1", component, os_name="wasip2")
    ref = make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/fmt/component:v1", None)
    assert read(ref.path) == component and ref.digest == sha256(component)


# -- tags and digests --

def test_pull_by_digest_pins_the_module(tmp_path, registry):
    old, new = fake_module(500), fake_module(500)
    pinned = registry.push_cncf("ref/pin", "v1", old)
    registry.push_cncf("ref/pin", "v1", new)
    images = make_manager(tmp_path, [registry.host])
    ref = images.ensure(f"{registry.host}/ref/pin@{pinned}", None)
    assert read(ref.path) == old and ref.image_id == f"{registry.host}/ref/pin@{pinned}"
    assert read(images.ensure(f"{registry.host}/ref/pin:v1@{pinned}", None).path) == old
    assert not images.present(f"{registry.host}/ref/pin:v1")      # a pinned pull does not record the tag
    assert read(images.ensure(f"{registry.host}/ref/pin:v1", None).path) == new


def test_unknown_tag_and_digest_fail_with_err_image_pull(tmp_path, registry):
    images = make_manager(tmp_path, [registry.host])
    for image in (f"{registry.host}/ref/none:v1", f"{registry.host}/ref/none@sha256:" + "0" * 64):
        with pytest.raises(ImageError) as err:
            images.ensure(image, "IfNotPresent")
        assert err.value.reason == "ErrImagePull" and "not found" in err.value.message


# -- policies and backoff --

def test_pull_policies(tmp_path, registry):
    first, second = fake_module(400), fake_module(400)
    registry.push_cncf("pol/app", "v1", first)
    image = f"{registry.host}/pol/app:v1"
    images = make_manager(tmp_path, [registry.host])
    with pytest.raises(ImageError) as err:
        images.ensure(image, "Never")
    assert err.value.reason == "ErrImageNeverPull"
    assert err.value.message == f'Container image "{image}" is not present with pull policy of Never'
    assert read(images.ensure(image, "IfNotPresent").path) == first
    registry.push_cncf("pol/app", "v1", second)           # the tag moves
    assert read(images.ensure(image, "IfNotPresent").path) == first
    assert read(images.ensure(image, "Never").path) == first
    assert read(images.ensure(image, "Always").path) == second
    assert read(images.ensure(image, "IfNotPresent").path) == second


def test_failed_pulls_back_off_like_the_kubelet(tmp_path, registry):
    image = f"{registry.host}/pol/missing:v1"
    images = make_manager(tmp_path, [registry.host])            # backoff 0.3 s doubling to 1 s

    def outcome():
        try:
            return images.ensure(image, None), time.monotonic()
        except ImageError as exc:
            return exc.reason, time.monotonic()
    assert outcome()[0] == "ErrImagePull"
    reason, failed_at = outcome()
    assert reason == "ImagePullBackOff"
    with pytest.raises(ImageError) as err:
        images.ensure(image, None)
    assert err.value.message == f'Back-off pulling image "{image}"'
    reason, retried_at = wait_for(lambda: (lambda r: r[0] != "ImagePullBackOff" and r)(outcome()), 5,
                                  what="a retry after the backoff")
    assert reason == "ErrImagePull" and retried_at - failed_at >= 0.25
    assert outcome()[0] == "ImagePullBackOff"                   # backing off again (0.6 s now)
    registry.push_cncf("pol/missing", "v1", fake_module(100))
    ref, _ = wait_for(lambda: (lambda r: isinstance(r[0], minikrust.ModuleRef) and r)(outcome()), 5,
                      what="a pull after the image appeared")
    assert ref.digest and outcome()[0] == ref                    # success resets the backoff


def test_backoff_is_per_pod_credentials_not_per_image(tmp_path, basic_registry):
    basic_registry.push_cncf("pol/perpod", "v1", fake_module(100))
    image = f"{basic_registry.host}/pol/perpod:v1"
    api = FakeApi({"/api/v1/namespaces/a/secrets/cred": pull_secret("cred", basic_registry.host)})
    images = make_manager(tmp_path, [basic_registry.host], api)
    for reason in ("ErrImagePull", "ImagePullBackOff"):
        with pytest.raises(ImageError) as err:
            images.ensure(image, "Always", [], namespace="b")
        assert err.value.reason == reason
    assert images.ensure(image, "Always", ["cred"], namespace="a").digest   # not held back by pod b


def test_insecure_registries_is_off_by_default(tmp_path, registry):
    registry.push_cncf("pol/https", "v1", fake_module(100))
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path).ensure(f"{registry.host}/pol/https:v1", None)
    assert err.value.reason == "ErrImagePull" and f"https://{registry.host}" in err.value.message


# -- auth --

def test_basic_auth_with_node_registry_config(tmp_path, basic_registry, caplog):
    caplog.set_level(logging.DEBUG, logger="minikrust")
    module = fake_module(300)
    basic_registry.push_cncf("auth/basic", "v1", module)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(docker_config(basic_registry.host)))
    images = make_manager(tmp_path, [basic_registry.host], registry_config=str(config))
    assert read(images.ensure(f"{basic_registry.host}/auth/basic:v1", None).path) == module
    assert_no_secret(caplog.text)


def test_basic_auth_without_or_with_wrong_credentials_fails_clearly(tmp_path, basic_registry, caplog):
    caplog.set_level(logging.DEBUG, logger="minikrust")
    basic_registry.push_cncf("auth/basic2", "v1", fake_module(300))
    image = f"{basic_registry.host}/auth/basic2:v1"
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path / "a", [basic_registry.host]).ensure(image, None)
    assert err.value.reason == "ErrImagePull" and "requires authentication" in err.value.message
    api = FakeApi({"/api/v1/namespaces/ns1/secrets/regcred": pull_secret("regcred", basic_registry.host,
                                                                          password="wrong-" + PASSWORD)})
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path / "b", [basic_registry.host], api).ensure(
            image, None, pull_secrets=["regcred"], namespace="ns1")
    assert err.value.reason == "ErrImagePull"
    assert '401' in err.value.message and 'user "alice" from pull secret "regcred"' in err.value.message
    assert_no_secret(err.value.message + str(err.value))
    assert_no_secret(caplog.text)


@pytest.mark.parametrize("kind", ["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"])
def test_basic_auth_with_image_pull_secret(tmp_path, basic_registry, kind, caplog):
    caplog.set_level(logging.DEBUG, logger="minikrust")
    module = fake_module(300)
    basic_registry.push_cncf("auth/secret", "v1", module)
    api = FakeApi({"/api/v1/namespaces/ns1/secrets/regcred": pull_secret("regcred", basic_registry.host, kind)})
    images = make_manager(tmp_path, [basic_registry.host], api)
    ref = images.ensure(f"{basic_registry.host}/auth/secret:v1", None,
                        pull_secrets=["missing", "regcred"], namespace="ns1")
    assert read(ref.path) == module
    assert api.paths == ["/api/v1/namespaces/ns1/secrets/missing", "/api/v1/namespaces/ns1/secrets/regcred"]
    assert_no_secret(caplog.text)


def test_token_flow_anonymous_pull_of_a_public_repository(tmp_path, token_registry):
    module = fake_module(300)
    token_registry.push_cncf("public/app", "v1", module)
    before = len(token_registry.tokens.requests)
    ref = make_manager(tmp_path, [token_registry.host]).ensure(f"{token_registry.host}/public/app:v1", None)
    assert read(ref.path) == module
    assert (None, ["repository:public/app:pull"]) in token_registry.tokens.requests[before:]


def test_token_flow_with_basic_credentials(tmp_path, token_registry, caplog):
    caplog.set_level(logging.DEBUG, logger="minikrust")
    module = fake_module(300)
    token_registry.push_cncf("private/app", "v1", module)
    image = f"{token_registry.host}/private/app:v1"
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path / "anon", [token_registry.host]).ensure(image, None)
    assert err.value.reason == "ErrImagePull" and "anonymous access" in err.value.message
    config = tmp_path / "config.json"
    config.write_text(json.dumps(docker_config(token_registry.host)))
    images = make_manager(tmp_path / "ok", [token_registry.host], registry_config=str(config))
    assert read(images.ensure(image, None).path) == module
    config.write_text(json.dumps(docker_config(token_registry.host, password="nope")))
    with pytest.raises(ImageError) as err:
        make_manager(tmp_path / "bad", [token_registry.host], registry_config=str(config)).ensure(image, None)
    assert "token service" in err.value.message and "401" in err.value.message
    assert "nope" not in err.value.message
    assert_no_secret(caplog.text + err.value.message)


# -- integrity, interruptions, concurrency --

def test_corrupted_blob_is_refused_and_nothing_is_stored(tmp_path, registry, registry_proxy):
    registry.push_cncf("int/corrupt", "v1", fake_module(4000))
    registry_proxy.corrupt = True
    images = make_manager(tmp_path, [registry_proxy.host])
    with pytest.raises(ImageError) as err:
        images.ensure(f"{registry_proxy.host}/int/corrupt:v1", None)
    assert err.value.reason == "ErrImagePull" and "failed verification" in err.value.message
    assert images.store.modules() == {}
    assert os.listdir(images.store.tmp_dir) == []
    assert os.listdir(os.path.join(images.store.root, "sha256")) == []


def test_interrupted_download_is_restarted_cleanly(tmp_path, registry, registry_proxy):
    module = fake_module(200_000)
    registry.push_cncf("int/cut", "v1", module)
    registry_proxy.cut = 1
    images = make_manager(tmp_path, [registry_proxy.host])
    ref = images.ensure(f"{registry_proxy.host}/int/cut:v1", None)
    assert read(ref.path) == module
    assert registry_proxy.blob_gets[sha256(module)] == 2
    assert re.fullmatch(r"bytes=[1-9][0-9]*-", registry_proxy.ranges[-1])   # resumed, not restarted
    assert os.listdir(images.store.tmp_dir) == []


def test_concurrent_ensures_of_one_image_download_once(tmp_path, registry, registry_proxy):
    module = fake_module(50_000)
    registry.push_cncf("int/concurrent", "v1", module)
    registry_proxy.delay = 0.3
    images = make_manager(tmp_path, [registry_proxy.host])
    results, errors = [], []

    def pull():
        try:
            results.append(images.ensure(f"{registry_proxy.host}/int/concurrent:v1", "IfNotPresent"))
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert registry_proxy.blob_gets[sha256(module)] == 1


def test_module_starts_from_the_store_with_the_registry_stopped(tmp_path, registry_factory):
    reg = registry_factory()
    module = fake_module(1000)
    reg.push_cncf("store/app", "v1", module)
    image = f"{reg.host}/store/app:v1"
    images = make_manager(tmp_path, [reg.host])
    pulled = images.ensure(image, None)
    reg.stop()
    again = make_manager(tmp_path, [reg.host])   # a restarted kubelet: the store on disk
    assert again.ensure(image, "IfNotPresent") == pulled
    assert again.ensure(f"{reg.host}/store/app@{pulled.image_id.split('@')[1]}", None) == pulled
    with pytest.raises(ImageError) as err:
        again.ensure(image, "Always")
    assert err.value.reason == "ErrImagePull" and "cannot reach" in err.value.message


# -- the store and GC --

def test_gc_removes_least_recently_used_modules_not_in_use(tmp_path):
    store = ModuleStore(str(tmp_path / "modules"))
    digests = []
    for i in range(4):
        data = fake_module(1000)
        temp = store.temp_path()
        with open(temp, "wb") as f:
            f.write(data)
        digest = sha256(data)
        store.add(digest, [f"r.io/app:v{i}"], f"r.io/app@{digest}", temp=temp)
        store._index["modules"][digest]["last_used"] = 1000 + i   # oldest first
        digests.append(digest)
    store._index["modules"][digests[3]]["last_used"] = 9e12        # just used: too young
    assert store.gc(85, 80, 60, usage=lambda: (100_000, 84_000)) == []
    removed = store.gc(85, 84, 60, in_use={digests[0]}, usage=lambda: (100_000, 85_500))
    assert removed == [digests[1], digests[2]]        # 2000 bytes freed reach 84 %; 0 is in use, 3 too young
    assert store.lookup("r.io/app:v1") is None and store.lookup("r.io/app:v0")[0] == digests[0]
    assert sorted(store.modules()) == sorted([digests[0], digests[3]])
    assert ModuleStore(str(tmp_path / "modules")).modules().keys() == store.modules().keys()


def test_store_removes_stale_temp_files_of_interrupted_pulls_only(tmp_path):
    store = ModuleStore(str(tmp_path / "modules"))
    stale, live = os.path.join(store.tmp_dir, "stale"), os.path.join(store.tmp_dir, "live")
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"half a module")
    os.utime(stale, (1, 1))
    ModuleStore(str(tmp_path / "modules"))     # a restarted kubelet
    assert os.listdir(store.tmp_dir) == ["live"]


def test_image_manager_gc_uses_the_kubelet_flags(tmp_path):
    images = make_manager(tmp_path, image_gc_high_threshold=50, image_gc_low_threshold=10,
                          image_minimum_gc_age=0.0)
    temp = images.store.temp_path()
    data = fake_module(100)
    with open(temp, "wb") as f:
        f.write(data)
    images.store.add(sha256(data), ["r.io/a:v1"], "r.io/a@x", temp=temp)
    images.in_use = lambda: {sha256(data)}
    assert images.gc(usage=lambda: (100, 60)) == []
    images.in_use = None
    cache = tmp_path / "cache"
    cache.mkdir()
    hexdigest = sha256(data).split(":")[1]
    (cache / f"{hexdigest}.wasmtime-50.0.1-x86_64.cwasm").write_bytes(b"code")
    (cache / "other.cwasm").write_bytes(b"code")
    images.compiled_cache_dir = str(cache)
    assert images.gc(usage=lambda: (100, 60)) == [sha256(data)]
    assert os.listdir(cache) == ["other.cwasm"]


# -- push --

def test_push_publishes_a_cncf_artifact_that_pulls(tmp_path, registry, capsys):
    module = fake_module(1234)
    (tmp_path / "m.wasm").write_bytes(module)
    image = f"{registry.host}/push/app:v1"
    assert minikrust.main(["push", str(tmp_path / "m.wasm"), image, "--insecure"]) == 0
    printed = capsys.readouterr().out.strip()
    manifest = requests.get(f"{registry.url}/v2/push/app/manifests/v1",
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert manifest["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
    assert [l["mediaType"] for l in manifest["layers"]] == ["application/wasm"]
    ref = make_manager(tmp_path, [registry.host]).ensure(image, None)
    assert read(ref.path) == module and printed == ref.image_id


def test_push_with_credentials_from_the_environment(tmp_path, token_registry, capsys):
    (tmp_path / "m.wasm").write_bytes(fake_module(100))
    image = f"{token_registry.host}/push/private:v1"
    args = [str(tmp_path / "m.wasm"), image, "--insecure"]
    assert minikrust.cmd_push(args, environ={}) == 1
    assert "anonymous access" in capsys.readouterr().err
    env = {"MINIKRUST_REGISTRY_USERNAME": USER, "MINIKRUST_REGISTRY_PASSWORD": PASSWORD}
    assert minikrust.cmd_push(args, environ=env) == 0
    out = capsys.readouterr()
    assert_no_secret(out.out + out.err)


def test_always_with_an_unchanged_tag_downloads_nothing_again(tmp_path, registry, registry_proxy):
    module = fake_module(3000)
    registry.push_cncf("pol/same", "v1", module)
    metrics = FakeMetrics()
    images = make_manager(tmp_path, [registry_proxy.host])
    images.metrics = metrics
    first = images.ensure(f"{registry_proxy.host}/pol/same:v1", "Always")
    assert images.ensure(f"{registry_proxy.host}/pol/same:v1", "Always") == first
    assert registry_proxy.blob_gets[sha256(module)] == 1
    assert metrics.counts == {("minikrust_image_pulls_total", "success"): 2}


def test_a_layer_digest_that_is_not_sha256_hex_names_no_stored_module(tmp_path, registry, monkeypatch):
    """The manifest is the registry's word: a layer digest like `sha256:../sha256/<hex>` must not
    lead the store to another image's module (one pulled with a pod's secret, say)."""
    stored, other = fake_module(300), fake_module(400)
    registry.push_cncf("dig/stored", "v1", stored)
    registry.push_cncf("dig/other", "v1", other)
    images = make_manager(tmp_path, [registry.host])
    images.ensure(f"{registry.host}/dig/stored:v1", None)
    real = minikrust.RegistryClient.get_manifest

    def crafted(self, reference):
        doc, digest, media_type = real(self, reference)
        doc["layers"][0]["digest"] = "sha256:../sha256/" + sha256(stored).split(":")[1]
        return doc, digest, media_type
    monkeypatch.setattr(minikrust.RegistryClient, "get_manifest", crafted)
    with pytest.raises(ImageError) as err:
        images.ensure(f"{registry.host}/dig/other:v1", None)
    assert err.value.reason == "ErrImagePull" and "unsupported blob digest" in err.value.message
    assert images.store.lookup(f"{registry.host}/dig/other:v1") is None
    assert sorted(images.store.modules()) == [sha256(stored)]


def test_a_full_disk_leaves_nothing_in_the_store(tmp_path, registry, monkeypatch):
    registry.push_cncf("int/full", "v1", fake_module(3000))

    def full_disk(self, digest, size, out):
        out.write(b"\0asm half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(minikrust.RegistryClient, "download", full_disk)
    images = make_manager(tmp_path, [registry.host])
    with pytest.raises(ImageError) as err:
        images.ensure(f"{registry.host}/int/full:v1", None)
    assert err.value.reason == "ErrImagePull" and "No space left on device" in err.value.message
    assert os.listdir(images.store.tmp_dir) == [] and images.store.modules() == {}


def test_pull_secrets_without_an_api_pull_anonymously(tmp_path, registry):
    registry.push_cncf("auth/none", "v1", fake_module(100))
    ref = make_manager(tmp_path, [registry.host]).ensure(f"{registry.host}/auth/none:v1", None,
                                                         pull_secrets=["regcred"], namespace="x")
    assert ref.digest


class FakeMetrics:
    def __init__(self):
        self.counts = {}

    def inc(self, name, amount=1.0, **labels):
        key = (name, labels["result"])
        self.counts[key] = self.counts.get(key, 0) + amount


# -- end to end: the CLI kubelet runs static pods whose images come from the registry --

def run_static_pod(root, name, image, hosts, pods=1):
    manifests = root.parent / f"manifests-{name}"
    manifests.mkdir()
    for i in range(pods):
        (manifests / f"pod{i}.json").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}{i}"},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": image, "imagePullPolicy": "IfNotPresent"}]}}))
    proc = subprocess.run([sys.executable, minikrust.__file__, "--pod-manifest-path", str(manifests), "--once",
                           "--root-dir", str(root), "--serve=false", "--insecure-registries", ",".join(hosts)],
                          capture_output=True, text=True, timeout=60)
    logs = "".join(p.read_text() for p in root.glob("pods/*/logs/main/*.log"))
    # (not the exit code: --once can read a finished pod's phase before its status is computed; noted for pods)
    succeeded = sum(f"{name}{i}-" in line and line.endswith("Succeeded")
                    for line in proc.stderr.splitlines() for i in range(pods))
    assert succeeded == pods and logs.count("stdout F hello") == pods, (proc.returncode, logs, proc.stderr[-3000:])


def test_static_pods_pull_from_the_registry_then_start_from_the_store(tmp_path, registry_factory, wasm):
    reg = registry_factory()
    (tmp_path / "hello.wasm").write_bytes(wasm.hello)
    image = f"{reg.host}/e2e/hello:v1"
    assert minikrust.main(["push", str(tmp_path / "hello.wasm"), image, "--insecure"]) == 0
    run_static_pod(tmp_path / "node1", "first", image, [reg.host])
    reg.stop()
    # another node (no pod state) that has the module in its store: no registry needed
    shutil.copytree(tmp_path / "node1" / "modules", tmp_path / "node2" / "modules")
    run_static_pod(tmp_path / "node2", "second", image, [reg.host])


def test_two_static_pods_with_one_image_download_it_once(tmp_path, registry, registry_proxy, wasm):
    registry.push_cncf("e2e/shared", "v1", wasm.hello)
    registry_proxy.delay = 0.3      # both pods' pulls overlap
    run_static_pod(tmp_path / "node", "pod", f"{registry_proxy.host}/e2e/shared:v1", [registry_proxy.host], pods=2)
    assert registry_proxy.blob_gets[sha256(wasm.hello)] == 1


def test_api_pods_pull_with_their_image_pull_secrets_and_never_show_the_password(
        tmp_path, fake_api, kubelet_factory, basic_registry, wasm):
    host = basic_registry.host
    manifest_digest = basic_registry.push_cncf("api/hello", "v1", wasm.hello)
    image = f"{host}/api/hello:v1"
    for name, password in (("regcred", PASSWORD), ("badcred", "wrong-" + PASSWORD)):
        fake_api.create_secret("default", name, {".dockerconfigjson": json.dumps(docker_config(host, password=password))},
                               type="kubernetes.io/dockerconfigjson")
    kubelet_factory(fake_api, insecure_registries=(host,))
    # one image: once "good" pulled it, "bad" (IfNotPresent) must still prove its credential (KEP-2535)
    for name, secret, img in (("good", "regcred", image), ("bad", "badcred", image)):
        fake_api.create_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                             "spec": {"restartPolicy": "Never", "imagePullSecrets": [{"name": secret}],
                                      "containers": [{"name": "main", "image": img}]}}, node_name="node-1")

    def status(name):
        return fake_api.get("pods", "default", name).get("status") or {}

    good = wait_for(lambda: status("good").get("phase") == "Succeeded" and status("good"), 20, what="good pod Succeeded")
    assert good["containerStatuses"][0]["imageID"] == f"{host}/api/hello@{manifest_digest}"
    seen = set()

    def messages():
        return " ".join(e.get("message", "") for e in fake_api.events(namespace="default"))

    def waiting():
        state = ((status("bad").get("containerStatuses") or [{}])[0].get("state") or {}).get("waiting") or {}
        seen.add(state.get("reason"))
        assert_no_secret(json.dumps(state))
        return seen & {"ErrImagePull", "ImagePullBackOff"} and "badcred" in messages()
    try:
        wait_for(waiting, 20, what="bad pod: waiting in ErrImagePull or ImagePullBackOff")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; reasons seen {seen}; status {status('bad')}") from None
    assert "401" in messages() and 'pull secret "badcred"' in messages()
    assert_no_secret(messages() + json.dumps(fake_api.get("pods", "default", "bad")))
    # the same credential again (IfNotPresent): the stored module serves it, with no Pulling Event
    fake_api.create_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "again"},
                         "spec": {"restartPolicy": "Never", "imagePullSecrets": [{"name": "regcred"}],
                                  "containers": [{"name": "main", "image": image}]}}, node_name="node-1")
    wait_for(lambda: status("again").get("phase") == "Succeeded", 20, what="again pod Succeeded")
    wait_for(lambda: fake_api.events(involved_name="again", reason="Pulled"), what="its Pulled Event")
    reasons = {e["reason"]: e["message"] for e in fake_api.events(involved_name="again")}   # in order
    assert reasons.get("Pulled") == f'Container image "{image}" already present on machine' and "Pulling" not in reasons


def test_https_registry_is_verified_against_the_trusted_cas(tmp_path, tls_registry, test_pki, monkeypatch):
    module = fake_module(500)
    (tmp_path / "m.wasm").write_bytes(module)
    image = f"{tls_registry.host}/tls/app:v1"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", test_pki.ca_path)     # how an operator adds a private CA
    minikrust.push_module(str(tmp_path / "m.wasm"), image)
    images = make_manager(tmp_path)                                # not in --insecure-registries
    assert read(images.ensure(image, None).path) == module
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(ImageError) as err:
        images.ensure(image, "Always")
    assert err.value.reason == "ErrImagePull" and "certificate verify failed: " in err.value.message


# -- KEP-2535: a module pulled with a pod's secret serves other pods only with the same credential --

@pytest.fixture
def basic_proxy(basic_registry):
    from tests.registry import RegistryProxy
    proxy = RegistryProxy(basic_registry)
    yield proxy
    proxy.close()


def test_secret_pulled_modules_serve_only_pods_with_the_credential(tmp_path, basic_registry, basic_proxy, caplog):
    caplog.set_level(logging.DEBUG, logger="minikrust")
    basic_registry.push_cncf("kep/private", "v1", fake_module(700))
    image = f"{basic_proxy.host}/kep/private:v1"
    api = FakeApi({"/api/v1/namespaces/a/secrets/cred": pull_secret("cred", basic_proxy.host),
                   "/api/v1/namespaces/c/secrets/copy": pull_secret("copy", basic_proxy.host)})
    images = make_manager(tmp_path, [basic_proxy.host], api)
    pulled = images.ensure(image, "IfNotPresent", ["cred"], namespace="a")
    # the same credential in another secret: served from the store, no registry request
    before = len(basic_proxy.requests)
    assert images.ensure(image, "IfNotPresent", ["copy"], namespace="c") == pulled
    assert basic_proxy.requests[before:] == []
    # no credential: the kubelet must pull to check, and the registry says no
    with pytest.raises(ImageError) as err:
        images.ensure(image, "IfNotPresent", [], namespace="b")
    assert err.value.reason == "ErrImagePull" and "requires authentication" in err.value.message
    with pytest.raises(ImageError) as err:
        images.ensure(image, "Never", [], namespace="b")
    assert err.value.reason == "ErrImageNeverPull" and "credentials this pod does not have" in err.value.message
    assert images.present(image, ["copy"], namespace="c") and not images.present(image, [], namespace="b")
    assert_no_secret(caplog.text + json.dumps(images.store._index))
    # node-wide credentials serve every pod once a pull used them
    config = tmp_path / "config.json"
    config.write_text(json.dumps(docker_config(basic_proxy.host)))
    node = make_manager(tmp_path, [basic_proxy.host], api, registry_config=str(config))
    assert node.ensure(image, "IfNotPresent", [], namespace="b") == pulled
    before = len(basic_proxy.requests)
    assert make_manager(tmp_path, [basic_proxy.host]).ensure(image, "IfNotPresent", namespace="d") == pulled
    assert basic_proxy.requests[before:] == []


@pytest.mark.parametrize("policy, pulls", [("NeverVerify", 0), ("NeverVerifyPreloadedImages", 0), ("AlwaysVerify", 1)])
def test_credential_verification_policies_for_preloaded_modules(tmp_path, registry, registry_proxy, policy, pulls):
    module = fake_module(300)
    registry.push_cncf("kep/preloaded", "v1", module)
    image = f"{registry_proxy.host}/kep/preloaded:v1"
    images = make_manager(tmp_path, [registry_proxy.host], image_pull_credentials_verification_policy=policy)
    temp = images.store.temp_path()
    with open(temp, "wb") as f:
        f.write(module)
    images.store.add(sha256(module), [f"{registry_proxy.host}/kep/preloaded:v1"], "preloaded", temp=temp)
    images.ensure(image, "IfNotPresent")
    assert sum(method == "GET" and "/manifests/" in path for method, path in registry_proxy.requests) == pulls


def test_unknown_verification_policy_is_a_config_error(tmp_path):
    with pytest.raises(minikrust.ConfigError):
        make_manager(tmp_path, image_pull_credentials_verification_policy="Sometimes")
