"""Env: container environment, $(VAR) expansion, argv and workingDir, tested with plain dicts."""
import base64
import logging
import os
import shutil

import pytest

import minikrust
from minikrust import ApiError, ContainerConfigError, container_argv, container_env, container_workdir


class FakeApi:
    """Just enough of ApiClient: configmaps and secrets by namespace/name, 404 for the rest."""

    def __init__(self, configmaps=None, secrets=None, forbidden=()):
        self.objects = {}
        for name, data in (configmaps or {}).items():
            self.objects[f"/api/v1/namespaces/default/configmaps/{name}"] = {"kind": "ConfigMap", "data": data}
        for name, data in (secrets or {}).items():
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            self.objects[f"/api/v1/namespaces/default/secrets/{name}"] = {"kind": "Secret", "data": encoded}
        self.forbidden = set(forbidden)
        self.gets = []

    def get(self, path, **kw):
        self.gets.append(path)
        if path in self.forbidden:
            raise ApiError(403, "Forbidden", "no relationship found between node and this object")
        if path not in self.objects:
            raise ApiError(404, "NotFound", f"{path} not found")
        return self.objects[path]


def make_pod(container, **spec):
    return {
        "metadata": {"name": "job", "namespace": "default", "uid": "u-1",
                     "labels": {"app": "job"}, "annotations": {"note": "a b"}},
        "spec": {"nodeName": "node-1", "serviceAccountName": "sa", "containers": [container], **spec},
        "status": {"hostIP": "10.0.0.5", "podIP": "10.0.0.5"},
    }


@pytest.mark.parametrize("text, expected", [
    ("$(A)", "1"),
    ("x$(A)y$(B)", "x1y2"),
    ("$$(A)", "$(A)"),
    ("$$$(A)", "$1"),
    ("$(UNKNOWN)", "$(UNKNOWN)"),
    ("$(A", "$(A"),
    ("$A", "$A"),
    ("a$", "a$"),
    ("$()", "$()"),
    ("$(A)$(A)", "11"),
    ("$$", "$"),
])
def test_expansion_follows_the_kubelet_rules(text, expected):
    assert minikrust._expand_refs(text, {"A": "1", "B": "2"}) == expected


def test_value_references_only_earlier_variables():
    container = {"name": "c", "env": [
        {"name": "FIRST", "value": "a-$(SECOND)"},
        {"name": "SECOND", "value": "b"},
        {"name": "THIRD", "value": "$(FIRST)+$(SECOND)"},
    ]}
    assert container_env(make_pod(container), container) == [
        ("FIRST", "a-$(SECOND)"), ("SECOND", "b"), ("THIRD", "a-$(SECOND)+b")]


def test_later_definition_replaces_earlier_and_sees_it():
    container = {"name": "c", "env": [{"name": "P", "value": "/a"}, {"name": "P", "value": "$(P):/b"}]}
    assert container_env(make_pod(container), container) == [("P", "/a:/b")]


def test_field_refs_resolve_pod_fields():
    fields = {
        "NAME": "metadata.name", "NS": "metadata.namespace", "UID": "metadata.uid",
        "APP": "metadata.labels['app']", "NOTE": "metadata.annotations['note']",
        "MISSING": "metadata.labels['nope']", "NODE": "spec.nodeName", "SA": "spec.serviceAccountName",
        "HOST": "status.hostIP", "IP": "status.podIP",
    }
    container = {"name": "c", "env": [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}}
                                      for k, v in fields.items()]}
    env = dict(container_env(make_pod(container), container, node_ip="192.168.1.9"))
    assert env == {"NAME": "job", "NS": "default", "UID": "u-1", "APP": "job", "NOTE": "a b", "MISSING": "",
                   "NODE": "node-1", "SA": "sa", "HOST": "192.168.1.9", "IP": "192.168.1.9"}


def test_unsupported_field_ref_is_a_permanent_error():
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]}
    with pytest.raises(ContainerConfigError) as err:
        container_env(make_pod(container), container)
    assert err.value.retry is False and "metadata.labels" in err.value.message


@pytest.mark.parametrize("resource, divisor, expected", [
    ("limits.cpu", None, "1"),          # 500m rounds up to one core
    ("limits.cpu", "1m", "500"),
    ("requests.cpu", "1m", "250"),
    ("limits.memory", None, str(128 * 2**20)),
    ("limits.memory", "1Mi", "128"),
    ("requests.memory", "1Mi", "128"),  # no request: falls back to the limit
    ("limits.memory", "1G", "1"),       # 134 MB rounds up
])
def test_resource_field_refs_use_ceil_and_divisor(resource, divisor, expected):
    ref = {"resource": resource}
    if divisor:
        ref["divisor"] = divisor
    container = {"name": "c", "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "0.25"}},
                 "env": [{"name": "R", "valueFrom": {"resourceFieldRef": ref}}]}
    assert container_env(make_pod(container), container) == [("R", expected)]


def test_unset_limits_are_the_node_allocatable(tmp_path):
    """The kubelet's defaults: capacity less the hard eviction thresholds memory.available<100Mi and
    nodefs.available<10% (of the root dir's disk), in Ki as the Node reports them; cpu is whole cores."""
    refs = {"CPU": "limits.cpu", "MEMORY": "limits.memory", "DISK": "limits.ephemeral-storage"}
    container = {"name": "c", "env": [{"name": k, "valueFrom": {"resourceFieldRef": {"resource": v}}}
                                      for k, v in refs.items()]}
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    disk_total = shutil.disk_usage(tmp_path).total
    assert dict(container_env(make_pod(container), container, root_dir=str(tmp_path))) == {
        "CPU": str(len(os.sched_getaffinity(0))), "MEMORY": str(mem_total - 100 * 2**20),
        "DISK": str(int(disk_total * 0.9) // 1024 * 1024)}


@pytest.mark.parametrize("text, value", [("2", 2), ("500m", 0.5), ("1Ki", 1024), ("1e3", 1000), ("1.5G", 1.5e9),
                                         ("3E", 3e18), ("100n", 1e-7)])
def test_parse_quantity(text, value):
    assert float(minikrust.parse_quantity(text)) == pytest.approx(value)


def test_config_map_and_secret_key_refs():
    api = FakeApi(configmaps={"cfg": {"greeting": "hi"}}, secrets={"sec": {"password": "p"}})
    container = {"name": "c", "env": [
        {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "P", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "O", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "other", "optional": True}}},
        {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k", "optional": True}}},
        {"name": "BOTH", "value": "$(G)/$(P)"},
    ]}
    assert container_env(make_pod(container), container, api=api) == [("G", "hi"), ("P", "p"), ("BOTH", "hi/p")]
    assert api.gets.count("/api/v1/namespaces/default/configmaps/cfg") == 1  # read once per call


@pytest.mark.parametrize("forbidden", [False, True])
def test_missing_config_map_is_retried(forbidden):
    path = "/api/v1/namespaces/default/configmaps/cfg"
    api = FakeApi(forbidden=[path] if forbidden else [])
    container = {"name": "c", "env": [{"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "g"}}}]}
    with pytest.raises(ContainerConfigError) as err:
        container_env(make_pod(container), container, api=api)
    assert err.value.retry is True and err.value.reason == "CreateContainerConfigError"
    assert 'configmap "cfg" not found' in err.value.message


def test_binary_data_is_not_env(caplog):
    api = FakeApi(configmaps={"cfg": {"text": "t"}})
    api.objects["/api/v1/namespaces/default/configmaps/cfg"]["binaryData"] = {"blob": "AAE="}
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "cfg"}}],
                 "env": [{"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "blob",
                                                                          "optional": True}}}]}
    assert container_env(make_pod(container), container, api=api) == [("text", "t")]


def test_missing_key_is_retried_unless_optional():
    api = FakeApi(secrets={"sec": {"password": "p"}})
    container = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope"}}}]}
    with pytest.raises(ContainerConfigError) as err:
        container_env(make_pod(container), container, api=api)
    assert err.value.retry is True and "nope" in err.value.message


def test_standalone_config_map_reference_is_a_permanent_error():
    container = {"name": "c", "env": [{"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "g"}}}]}
    with pytest.raises(ContainerConfigError) as err:
        container_env(make_pod(container), container, api=None)
    assert err.value.retry is False and "standalone" in err.value.message


def test_env_from_with_prefix_skips_invalid_keys_and_env_overrides(caplog):
    api = FakeApi(configmaps={"cfg": {"A": "1", "1bad": "x", "b.c": "2"}}, secrets={"sec": {"TOKEN": "s3cret-value"}})
    container = {"name": "c",
                 "envFrom": [{"configMapRef": {"name": "cfg"}}, {"prefix": "S_", "secretRef": {"name": "sec"}},
                             {"configMapRef": {"name": "gone", "optional": True}}],
                 "env": [{"name": "A", "value": "$(A)$(S_TOKEN)"}]}
    warnings = []
    with caplog.at_level(logging.DEBUG, logger="minikrust"):
        env = container_env(make_pod(container), container, api=api, warnings=warnings)
    assert env == [("A", "1s3cret-value"), ("b.c", "2"), ("S_TOKEN", "s3cret-value")]
    assert warnings == [("InvalidEnvironmentVariableNames", "Keys [1bad] from the EnvFrom configmap default/cfg "
                         "were skipped since they are considered invalid environment variable names.")]
    assert "1bad" in caplog.text
    assert "s3cret-value" not in caplog.text


def test_env_from_with_invalid_prefix_skips_everything():
    api = FakeApi(configmaps={"cfg": {"A": "1"}})
    container = {"name": "c", "envFrom": [{"prefix": "9", "configMapRef": {"name": "cfg"}}]}
    assert container_env(make_pod(container), container, api=api) == []


def test_secret_value_is_never_logged(caplog):
    api = FakeApi(secrets={"sec": {"password": "hunter2"}})
    container = {"name": "c", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
                                      {"name": "Q", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope"}}}]}
    with caplog.at_level(logging.DEBUG, logger="minikrust"), pytest.raises(ContainerConfigError) as err:
        container_env(make_pod(container), container, api=api)
    assert "hunter2" not in caplog.text and "hunter2" not in str(err.value)


def test_working_dir_becomes_pwd_unless_set():
    container = {"name": "c", "workingDir": "/data/run/", "env": [{"name": "X", "value": "$(PWD)"}]}
    assert container_workdir(container) == "/data/run"
    assert container_env(make_pod(container), container) == [("X", "$(PWD)"), ("PWD", "/data/run")]
    container["env"].append({"name": "PWD", "value": "/other"})
    assert dict(container_env(make_pod(container), container))["PWD"] == "/other"
    assert container_workdir({"name": "c"}) is None
    with pytest.raises(ContainerConfigError):
        container_workdir({"name": "c", "workingDir": "relative"})


def test_argv_from_command_and_args_with_expansion():
    env = [("WHO", "world"), ("N", "3")]
    assert container_argv({"name": "c", "command": ["hello", "$(WHO)"], "args": ["-n", "$(N)", "$$(N)"]}, env) == [
        "hello", "world", "-n", "3", "$(N)"]
    assert container_argv({"name": "c", "args": ["$(WHO)", "$(NOPE)"]}, env) == ["c", "world", "$(NOPE)"]
    assert container_argv({"name": "c"}, []) == ["c"]


def test_admitted_pod_from_the_contract_gets_its_env():
    """The pod of contract 14 with the configMap and secret of 25 and 27."""
    from tests.helpers import contract
    pod = contract("14-pod-create-admitted")
    api = FakeApi(configmaps={"cfg": {"greeting": "hi"}}, secrets={"sec": {"password": "p"}})
    main = pod["spec"]["containers"][0]
    assert container_env(pod, main, api=api) == [("G", "hi"), ("P", "p")]
    assert container_argv(main, []) == ["main", "a"]
