"""WASI 0.2 components as containers: every behaviour test of modules (tests/test_wasihost.py)
replayed on the same programs turned into components with jco (`jco new --wasi-command`), on both
backends. The few that cannot hold as written for a component are redefined below, each saying
what differs and why; the rest run unchanged."""
import sys
import time

import pytest

import minikrust
from tests.helpers import unavailable, wait_for
from tests.test_wasihost import *  # noqa: F401,F403  (collected again here, on components)
from tests.test_wasihost import _normalised_log, capture, cri_records, run
from tests.test_wasihost import test_native_and_fallback_agree as _agree


@pytest.fixture
def wasm(components):
    """Each module of the replayed tests, as a component."""
    return components


def test_header_tells_a_component_from_a_module(components):
    assert minikrust._is_component(components.hello)
    assert not minikrust._is_component(components.modules.hello)
    assert not minikrust._is_component(b"\0asm")


@pytest.mark.parametrize("name, needle", [
    ("garbage", "magic"), ("truncated", ""), ("no_start", "wasi:cli/run"),
    ("unknown_import", "acme:frobnicate/api"), ("wasi_unknown_function", "no_such_call"),
])
def test_bad_modules_raise_a_clear_load_error(backend, wasm, name, needle):
    """A component without wasi:cli/run, or whose imports do not link, fails at load, as a module does."""
    data = {"garbage": b"this is not wasm at all", "truncated": wasm.hello[:20]}.get(name)
    data = data if data is not None else getattr(wasm, name)
    with pytest.raises(minikrust.ModuleLoadError) as info, minikrust.module_errors():
        backend.load(data)
    assert needle in str(info.value) and len(str(info.value)) > 10


@pytest.mark.parametrize("code", [126, 255, -1])
def test_exit_status_outside_wasi_range_is_a_trap(backend, wasm, code):
    """(For a component: not a trap.) The p1 adapter turns any proc_exit status but 0 into
    wasi:cli/exit's `err`, which is exit code 1."""
    result = run(backend, wasm.exit(code))
    assert (result.exit_code, result.trap) == (1, None)


def test_returning_from_start_is_exit_zero_with_measurements(backend, wasm):
    """(For a component: no peak memory.) The C API gives no access to a component's memories."""
    result = run(backend, wasm.hello)
    assert result.exit_code == 0 and result.trap is None
    assert 0 < result.duration < 5 and 0 <= result.cpu_seconds <= result.duration + 0.01
    assert result.peak_memory == 0


@pytest.mark.parametrize("command", ["sleep", "abssleep"])
def test_kill_stops_a_sleeping_module_within_100ms(backend, wasm, command):
    """(For a component: when the sleep ends.) A component sleeps inside wasmtime's WASI 0.2
    (wasi:io/poll), out of reach of epoch interruption; kill() takes effect as the guest wakes."""
    out = []
    handle = backend.load(wasm.tool).start(["tool", command, "600"], stdout=out.append, log_format="plain")
    wait_for(lambda: b"sleeping" in b"".join(out), timeout=5, what="the component to start sleeping")
    handle.kill()
    wait_for(lambda: handle.done, timeout=5, interval=0.001, what="killed sleeper to finish")
    result = handle.wait()
    assert result.killed and result.exit_code is None and b"woke" not in b"".join(out)
    assert result.duration < 0.6 + 0.5


def test_deadline_stops_a_sleeping_module(backend, wasm):
    """(For a component: when the sleep ends, see above.)"""
    result, out, _ = capture(backend, wasm.tool, ["tool", "sleep", "600"], deadline=0.2)
    assert result.timed_out and b"woke" not in out and result.duration < 0.6 + 0.5


def test_memory_limit_stops_growth_and_reports_oom(backend, wasm):
    """(For a component: the limit holds, but a trap is not recognised as OOM without peak memory.)"""
    result = run(backend, wasm.grow, memory_limit=1 << 20)
    assert result.exit_code is None and "unreachable" in result.trap and not result.killed


def test_cri_log_interleaves_streams_cuts_long_lines_and_flags_fragments(backend, wasm, tmp_path):
    """(For a component on the native host: each stream's lines in order, not their order across
    streams.) Its stdout and stderr are two pipes read every tick, as containerd reads a container's."""
    log_path = tmp_path / "0.log"
    result = run(backend, wasm.fdedge, ["fdedge"], stdout=str(log_path), stderr=str(log_path))
    assert result.exit_code == 0
    records = cri_records(log_path)
    out = [(tag, line) for _, stream, tag, line in records if stream == "stdout"]
    big = [(tag, line) for tag, line in out if b"yyyy" in line]  # 100,000 bytes: six 16 KiB P records, an F
    assert [tag for tag, _ in big] == ["P"] * 6 + ["F"]
    assert all(len(line) == 16384 for _, line in big[:6]) and 0 < len(big[6][1]) < 16384
    assert ("F", b"no newline then newline") in out
    err = [line for _, stream, tag, line in records if stream == "stderr" and tag == "F"]
    assert [line for line in err if line in (b"e1", b"e2", b"e3")] == [b"e1", b"e2", b"e3"]
    assert [line for tag, line in out if line in (b"o1", b"o2o2b")] == [b"o1", b"o2o2b"]  # "o2" + "o2b\n": one line


@pytest.mark.parametrize("case", ["fdedge", "hello", "c_hello", "trap", "args", "stderr", "lines", "exit"])
def test_native_and_fallback_agree(both_hosts, wasm, tmp_path, case, monkeypatch):
    """(For a component: each stream's records, see above.)"""
    def by_stream(path):
        return sorted(_normalised_log(path), key=lambda record: record[0])  # stable: each stream in order
    monkeypatch.setattr(sys.modules["tests.test_wasihost"], "_normalised_log", by_stream)
    _agree(both_hosts, wasm, tmp_path, case)


# Not replayed: live usage figures are measured for modules only (the C API gives no access to a
# component's memories), so these two module tests are not collected here.
del test_usage_counts_touched_memory_not_grown_or_reserved  # noqa: F821
del test_usage_of_a_spinning_run_follows_its_threads_cpu_clock  # noqa: F821


def test_more_concurrent_components_than_the_pool_holds_all_run(both_hosts, wasm):
    """A component takes several of the native pool's core instances: past the pool, runs go to
    the engine without it (as modules do), never fail. (The pool is the native host's.)"""
    component = both_hosts[0].load(wasm.tool)
    runs = [component.start(["tool", "sleep", "1000"]) for _ in range(150)]
    results = [run.wait(timeout=60) for run in runs]
    assert [r.exit_code if r else None for r in results] == [0] * 150, next(r for r in results if not r or r.exit_code)


# The p1 adapter asserts ("assertion failed at adapter line 2857") on a stdio call made after
# malloc grew the memory by a large amount, whatever the host: so this program only exits.
ALLOC_C = r"""
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    static char *volatile keep[4096];
    int mb = atoi(argv[1]);
    for (int i = 0; i < mb; i++) {
        keep[i] = malloc(1 << 20);
        if (!keep[i]) return 3;
        memset(keep[i], 1, 1 << 20);
    }
    return 0;
}
"""


def test_c_malloc_failure_under_limit_is_oom(backend, wasm):
    """(For a component: malloc fails at the limit, exit code 1, not flagged OOM, see above.)"""
    alloc = wasm.c(ALLOC_C, "alloc")
    assert run(backend, alloc, ["alloc", "64"]).exit_code == 0
    result = run(backend, alloc, ["alloc", "64"], memory_limit=8 << 20)
    assert (result.exit_code, result.trap) == (1, None)


def test_memory_limit_leaves_small_modules_alone(backend, wasm):
    result = run(backend, wasm.c(ALLOC_C, "alloc"), ["alloc", "2"], memory_limit=16 << 20)
    assert result.exit_code == 0 and not minikrust._is_oom(result, 16 << 20)


# -- components as pods: standalone and from the API, on both backends --

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import wasmtime  # noqa: E402

from tests.test_images import run_static_pod  # noqa: E402
from tests.test_pods import _cstatus, _manifest, _phase  # noqa: E402

HTTP_CLIENT = Path(__file__).with_name("http_client.wat").read_text()


def http_client(authority, path="/", version="0.2.0"):
    """A component sending GET `path` to http://`authority` (tests/http_client.wat), importing
    wasi:http/outgoing-handler@`version`."""
    wat = HTTP_CLIENT.replace("@AUTHORITY@", authority).replace("@AUTHLEN@", str(len(authority)))
    wat = wat.replace("wasi:http/outgoing-handler@0.2.0", f"wasi:http/outgoing-handler@{version}")
    return bytes(wasmtime.wat2wasm(wat.replace("@PATH@", path).replace("@PATHLEN@", str(len(path)))))


@pytest.fixture
def http_server():
    """A local HTTP server answering 200 "hi" to every GET; .seen lists the (Host, path) it served."""
    import http.server
    import threading
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.headers.get("Host"), self.path))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.seen, server.port = seen, server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()

@pytest.fixture(params=["native", "wasmtime-py"])
def pod_backend(request, monkeypatch):
    """Kubelets made in this test run components on this backend (MINIKRUST_WASM_BACKEND)."""
    from tests.wasm_modules import native_available
    if request.param == "native" and native_available():
        unavailable(native_available())
    monkeypatch.setenv("MINIKRUST_WASM_BACKEND", request.param)
    return request.param


def test_component_runs_as_a_static_pod_from_a_file_an_artifact_and_an_image_layer(
        pod_backend, components, registry, tmp_path):
    hello = components.hello
    assert minikrust._is_component(hello)
    (tmp_path / "hello.wasm").write_bytes(hello)
    run_static_pod(tmp_path / "node-file", "file", f"file:{tmp_path / 'hello.wasm'}", [])
    image = f"{registry.host}/p2/hello:v1"
    assert minikrust.main(["push", str(tmp_path / "hello.wasm"), image, "--insecure"]) == 0
    run_static_pod(tmp_path / "node-artifact", "artifact", image, [registry.host])
    registry.push_tar_image("p2/layer", "v1", hello, entrypoint="/app/hello.wasm")
    run_static_pod(tmp_path / "node-layer", "layer", f"{registry.host}/p2/layer:v1", [registry.host])


def test_component_runs_as_an_api_pod_with_args_env_and_logs(pod_backend, fake_api, kubelet_factory, components):
    kubelet = kubelet_factory(fake_api)
    tool = f"file:{components.tool}"
    fake_api.create_pod(_manifest("p2", [
        {"name": "args", "image": tool, "args": ["args", "from the API"]},
        {"name": "env", "image": tool, "args": ["env"], "env": [{"name": "GREETING", "value": "hi"}]},
        {"name": "fails", "image": tool, "args": ["exit", "5"]}]), node_name="node-1")
    status = wait_for(_phase(fake_api, "p2", "Failed"), timeout=30, what="the pod to finish")
    codes = {c["name"]: c["state"]["terminated"]["exitCode"] for c in status["containerStatuses"]}
    assert codes == {"args": 0, "env": 0, "fails": 1}
    logs = {name: b"".join(p.read_bytes() for p in Path(kubelet.config.root_dir).glob(f"pods/*/logs/{name}/*.log"))
            for name in codes}
    assert b" stdout F 1=args\n" in logs["args"] and b" stdout F 2=from the API\n" in logs["args"]
    assert b" stdout F GREETING=hi\n" in logs["env"]


def test_deleted_component_pod_in_a_loop_is_finalised_within_grace(pod_backend, fake_api, kubelet_factory, components):
    kubelet_factory(fake_api)
    fake_api.create_pod(_manifest("spin", [{"name": "main", "image": f"file:{components.tool}", "args": ["spin"]}],
                                  policy="Always", grace=1), node_name="node-1")
    wait_for(_phase(fake_api, "spin", "Running"), timeout=30, what="Running")
    started = time.monotonic()
    fake_api.delete_pod("default", "spin")
    wait_for(lambda: fake_api.get("pods", "default", "spin") is None, timeout=5, what="pod gone")
    assert time.monotonic() - started < 2.0


def test_outgoing_http_goes_only_to_the_hosts_the_pod_allows(pod_backend, fake_api, kubelet_factory, tmp_path,
                                                            http_server):
    port = http_server.port
    allowed, other = f"127.0.0.1:{port}", f"localhost:{port}"  # one server, two authorities
    for name, authority in (("to-allowed", allowed), ("to-other", other)):
        (tmp_path / f"{name}.wasm").write_bytes(http_client(authority, f"/{name}"))
    kubelet = kubelet_factory(fake_api)
    pods = {  # pod: (its client, its annotation or None)
        "listed": ("to-allowed", f"example.com, {allowed}"), "unlisted": ("to-other", allowed),
        "any": ("to-other", "*"), "none": ("to-allowed", None)}
    for pod, (client, allow) in pods.items():
        manifest = _manifest(pod, [{"name": "main", "image": f"file:{tmp_path / client}.wasm"}])
        if allow is not None:
            manifest["metadata"]["annotations"] = {"minikrust.io/allow-outgoing-http": allow}
        fake_api.create_pod(manifest, node_name="node-1")

    def log(pod):
        uid = fake_api.get("pods", "default", pod)["metadata"]["uid"]
        return "".join(p.read_text() for p in Path(kubelet.config.root_dir).glob(f"pods/{uid}/logs/main/*.log"))

    for pod in ("listed", "any"):  # a real response from the real server
        wait_for(_phase(fake_api, pod, "Succeeded"), timeout=30, what=f"{pod} Succeeded")
        assert " stdout F status 200\n" in log(pod), log(pod)
    wait_for(_phase(fake_api, "unlisted", "Failed"), timeout=30, what="unlisted Failed")
    assert _cstatus(fake_api, "unlisted", "main")["state"]["terminated"]["exitCode"] == 1  # run() returned err
    assert " stdout F error 15\n" in log("unlisted")  # error-code::HTTP-request-denied, inside the guest
    assert f" stderr F minikrust: outgoing HTTP request to {other} denied: not an allowed host\n" in log("unlisted")
    assert sorted(http_server.seen) == [(allowed, "/to-allowed"), (other, "/to-other")]  # listed's and any's
    wait_for(_phase(fake_api, "none", "Failed"), timeout=30, what="none Failed")
    term = _cstatus(fake_api, "none", "main")["state"]["terminated"]
    assert term["reason"] == "StartError" and "minikrust.io/allow-outgoing-http" in term["message"], term
    wait_for(lambda: any("minikrust.io/allow-outgoing-http" in e["message"]
                         for e in fake_api.events(involved_name="none", reason="Failed")),
             timeout=10, what="the Failed Event of none")


@pytest.mark.parametrize("version", ["0.2.0", "0.2.3", "0.2.6", "0.2.12", "0.2.70"])
def test_every_0_2_version_of_the_handler_import_is_filtered(backend, http_server, version):
    """wasmtime defines wasi:http under one 0.2.x name, which an import of that very version finds
    before any other: the filter must stand under every name a guest can import."""
    allowed, other = f"127.0.0.1:{http_server.port}", f"localhost:{http_server.port}"
    for authority, code, line in ((allowed, 0, b"status 200"), (other, 1, b"error 15")):
        out = []
        result = backend.load(http_client(authority, "/v", version)).run(
            ["client"], stdout=out.append, stderr=out.append, outgoing_http=[allowed])
        assert result.exit_code == code and line in b"".join(out), (result, out)
    assert http_server.seen == [(allowed, "/v")]


# -- examples/components --

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_example_components_rebuild_from_the_example_modules(tmp_path):
    from tests.wasm_modules import jco_binary
    env = {**os.environ, "OUT": str(tmp_path), "JCO": jco_binary()}
    proc = subprocess.run(["sh", os.path.join(EXAMPLES, "components", "build.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    built = sorted(os.listdir(tmp_path))
    assert built == ["crasher.wasm", "hello.wasm", "job.wasm", "ticker.wasm"]
    for name in built:
        with open(os.path.join(EXAMPLES, "components", name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"examples/components/{name} is not what build.sh makes"


def test_example_component_pods_run_to_completion(pod_backend, tmp_path):
    proc = subprocess.run([sys.executable, minikrust.__file__, "--pod-manifest-path",
                           os.path.join(EXAMPLES, "components"), "--once", "--root-dir", str(tmp_path),
                           "--serve=false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in tmp_path.glob("pods/*/logs/*/*.log"))
    assert "stdout F Hello, minikrust! I am hello" in logs and "stdout F Hello, Barbara!" in logs, logs
