"""Fixtures that build in-process kubelets (a pytest plugin module).

    def test_x(kubelet_factory, fake_api):
        kubelet = kubelet_factory(fake_api)                 # node "node-1", started, server off
        kubelet = kubelet_factory(manifests=str(folder))    # standalone, static pods only
        kubelet = kubelet_factory(fake_api, root_dir=kubelet.config.root_dir, node="node-1")  # a restart

Every kubelet gets its own tmp root dir (unless given), CrashLoopBackOff shortened to 0.2 s, the
HTTPS server off, and is stopped at the end of the test.
"""
import os

import pytest

import minikrust


@pytest.fixture
def kubelet_factory(tmp_path):
    made = []

    def make(fake=None, node="node-1", manifests=None, start=True, handler=None, **config):
        root = config.pop("root_dir", None) or str(tmp_path / f"root-{node}-{len(made)}")
        values = dict(root_dir=root, node_name=node, node_ip="127.0.0.1", serve=False, backoff_base=0.2,
                      lease_renew_interval=1.0)
        if fake is not None:
            values["kubeconfig"] = fake.kubeconfig(str(tmp_path / f"kubeconfig-{node}"), node=node)
        if manifests is not None:
            values["pod_manifest_path"] = str(manifests)
        values.update(config)
        kubelet = minikrust.Kubelet(minikrust.Config(**values), handler=handler)
        made.append(kubelet)
        if start:
            kubelet.start()
        return kubelet

    yield make
    for kubelet in reversed(made):
        kubelet.stop()


@pytest.fixture
def module_file(tmp_path):
    """Write wasm bytes to a file; returns the `file:` image naming it."""
    counter = [0]

    def write(data, name=None):
        counter[0] += 1
        path = os.path.join(str(tmp_path), name or f"module-{counter[0]}.wasm")
        with open(path, "wb") as f:
            f.write(data)
        return f"file:{path}"

    return write
