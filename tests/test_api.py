"""ApiClient: timeouts, retries with backoff on connection errors, 429 (Retry-After) and 5xx, no
retry on other 4xx, errors carrying the API's Status, watch streams and their interruption."""
import http.server
import json
import socket
import threading
import time

import pytest

import minikrust
from tests.helpers import wait_for


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers from a script: a list of (status, body, headers) or callables writing the answer."""
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, self.headers.get("Content-Type"), body))
        step = self.server.script.pop(0) if self.server.script else (200, {"kind": "Ok"}, {})
        if callable(step):
            return step(self)
        status, payload, headers = step
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.seen, server.script = [], []
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server, **kw):
    cluster = minikrust.ClusterConfig(server=f"http://127.0.0.1:{server.server_address[1]}", token="tok")
    return minikrust.ApiClient(cluster, backoff=0.01, **kw)


def _status(code, reason, message="m"):
    return (code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                   "reason": reason, "message": message}, {})


def test_errors_carry_the_api_status_and_4xx_is_not_retried(scripted):
    scripted.script = [_status(404, "NotFound", 'nodes "n1" not found')]
    api = _client(scripted)
    with pytest.raises(minikrust.ApiError) as err:
        api.get("/api/v1/nodes/n1")
    assert (err.value.code, err.value.reason, err.value.message) == (404, "NotFound", 'nodes "n1" not found')
    assert err.value.status["kind"] == "Status" and len(scripted.seen) == 1
    api.close()


def test_5xx_and_429_are_retried_honouring_retry_after(scripted):
    scripted.script = [_status(500, "InternalError"), (429, {"kind": "Status", "code": 429}, {"Retry-After": "1"}),
                       _status(503, "ServiceUnavailable"), (200, {"kind": "Node"}, {})]
    api = _client(scripted)
    started = time.monotonic()
    assert api.get("/api/v1/nodes/n1") == {"kind": "Node"}
    assert time.monotonic() - started >= 0.9         # the Retry-After second was waited
    assert len(scripted.seen) == 4
    api.close()


def test_retries_end_with_the_last_error(scripted):
    scripted.script = [_status(500, "InternalError")] * 3
    api = _client(scripted, retries=2)
    with pytest.raises(minikrust.ApiError) as err:
        api.get("/x")
    assert err.value.code == 500 and len(scripted.seen) == 3
    api.close()


def test_conflict_is_not_retried(scripted):
    scripted.script = [_status(409, "Conflict"), (200, {"ok": True}, {})]
    api = _client(scripted)
    with pytest.raises(minikrust.ApiError) as err:
        api.put("/x", {"a": 1})
    assert err.value.code == 409 and len(scripted.seen) == 1
    api.close()


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = minikrust.ApiClient(minikrust.ClusterConfig(server=f"http://127.0.0.1:{port}"), retries=2, backoff=0.01)
    with pytest.raises(minikrust.ApiError) as err:
        api.get("/x")
    assert err.value.code == 0 and err.value.reason == "ConnectionError"
    api.close()


def test_requests_send_token_json_and_patch_content_type(scripted):
    api = _client(scripted)
    api.patch("/api/v1/nodes/n1/status", {"status": {}}, content_type="application/strategic-merge-patch+json")
    api.post("/api/v1/nodes", {"kind": "Node"})
    method, path, ctype, body = scripted.seen[0]
    assert (method, path, ctype) == ("PATCH", "/api/v1/nodes/n1/status", "application/strategic-merge-patch+json")
    assert json.loads(body) == {"status": {}}
    assert scripted.seen[1][2] == "application/json"
    api.close()


def _stream(lines, hold=None):
    def write(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for line in lines:
            data = (json.dumps(line) + "\n").encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()
        if hold is not None:
            hold.wait(10)
        handler.wfile.write(b"0\r\n\r\n")
    return write


def test_watch_yields_events_and_raises_410_from_an_error_event(scripted):
    scripted.script = [_stream([{"type": "ADDED", "object": {"metadata": {"name": "a"}}},
                                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
                                {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                             "message": "too old resource version"}}])]
    api = _client(scripted)
    events = []
    with pytest.raises(minikrust.ApiError) as err:
        for event in api.watch("/api/v1/pods", {"resourceVersion": "1"}):
            events.append(event)
    assert err.value.code == 410 and err.value.reason == "Expired"
    assert [kind for kind, _ in events] == ["ADDED", "BOOKMARK"]
    assert "watch=true" in scripted.seen[0][1] and "resourceVersion=1" in scripted.seen[0][1]
    api.close()


def test_watch_answered_410_raises(scripted):
    scripted.script = [_status(410, "Expired", "too old")]
    api = _client(scripted)
    with pytest.raises(minikrust.ApiError) as err:
        list(api.watch("/api/v1/pods", {}))
    assert err.value.code == 410
    api.close()


def test_close_interrupts_an_open_watch_and_retry_sleeps(scripted):
    hold = threading.Event()
    scripted.script = [_stream([{"type": "ADDED", "object": {}}], hold=hold)]
    api = _client(scripted)
    seen, done = [], threading.Event()

    def consume():
        for event in api.watch("/api/v1/pods", {"timeoutSeconds": "60"}):
            seen.append(event)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    wait_for(lambda: seen, 5, what="first watch event")
    api.interrupt_watches()
    assert done.wait(2), "watch still blocked after interrupt_watches()"
    hold.set()
    scripted.script = [_status(503, "ServiceUnavailable")] * 10
    slow = minikrust.ApiClient(api.cluster, retries=10, backoff=5, max_backoff=5)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(minikrust.ApiError, slow.get, "/x")), daemon=True)
    t.start()
    wait_for(lambda: scripted.seen[1:], 5, what="first retried request")
    started = time.monotonic()
    slow.close()
    t.join(3)
    assert not t.is_alive() and time.monotonic() - started < 2
    api.close()


def test_a_call_may_ask_for_fewer_retries(scripted):
    scripted.script = [_status(500, "InternalError")] * 3
    api = _client(scripted)
    with pytest.raises(minikrust.ApiError):
        api.get("/x", retries=1)
    assert len(scripted.seen) == 2
    api.close()
