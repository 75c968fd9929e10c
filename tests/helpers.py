"""Small helpers shared by every test file."""
import time


def wait_for(predicate, timeout=10.0, interval=0.02, what=None):
    """Poll `predicate` until it returns a truthy value; fail with what it last returned."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # a predicate may raise while the system settles
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last saw: {last!r}")
        time.sleep(interval)


def time_scale():
    """How many times slower than native this run executes code: 1, or $MINIKRUST_TEST_TIME_SCALE when
    the tests run under an emulator (scripts/test-wheel-aarch64 sets it for qemu-user). Only limits
    that measure the speed of running or compiling wasm code are multiplied by it."""
    import os

    return float(os.environ.get("MINIKRUST_TEST_TIME_SCALE", "1"))


def unavailable(reason):
    """A tool or part a test needs is missing: a skip with the reason, but under CI (CI=true), where
    .ci/run installs and builds everything, a failure: a run there never passes by skipping."""
    import os
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run should have provided it)")
    pytest.skip(reason)


def kubectl_binary():
    """The kubectl the tests use as an independent client: $KUBECTL, else the one on PATH.

    CI installs Debian's kubernetes-client when no kubectl is on the machine, so there these tests
    never skip; elsewhere they skip with this reason."""
    import os
    import shutil

    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        unavailable("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    return found


def contract_dir():
    """The recordings of a real kube-apiserver: ../shared/k8s-contract beside the checkout (as in CI),
    or $K8S_CONTRACT_DIR."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("K8S_CONTRACT_DIR") or os.path.join(os.path.dirname(root), "shared", "k8s-contract")


def contract(name):
    """The body of one recorded exchange's response, e.g. contract("14-pod-create-admitted")."""
    import json
    import os

    with open(os.path.join(contract_dir(), name + ".json")) as f:
        return json.load(f)["response"]["body"]


def rotated_logs(path):
    """The rotated files of the log `path` (full paths, oldest first), as minikrust lists them."""
    import os
    import minikrust

    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [os.path.join(os.path.dirname(path), name)
                for name in minikrust.rotated_log_files(folder, os.path.basename(path))]
    finally:
        os.close(folder)


def rotate_log(path, max_files):
    """Rotate the log `path` as the fallback host does; the rotated file's full path."""
    import os
    import minikrust

    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.path.join(os.path.dirname(path), minikrust._rotate_log(folder, os.path.basename(path), max_files))
    finally:
        os.close(folder)
