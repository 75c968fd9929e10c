"""Container log rotation done by the WASI hosts (log_max_size/log_max_files), on both backends,
and read back the way the server and the standalone terminal read it."""
import gzip
import os
import re

import pytest

import minikrust
from tests.helpers import rotated_logs, wait_for

CRI = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) ([FP]) (.*)$")
# The kubelet's container log manager (pkg/kubelet/logs/container_log_manager.go): a rotated log is
# `<log>.<time in Go's "20060102-150405" layout>`, every rotation but the newest gzip-compressed (".gz").
STAMP = re.compile(r"^\d{8}-\d{6}$")

# Writes lines in pieces (one fd_write each), long lines cut into P records, and both streams.
PIECES_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    static char long_line[40001];
    memset(long_line, 'x', 40000);
    for (int i = 0; i < n; i++) {
        char head[64], tail[64];
        int h = snprintf(head, sizeof head, "piece %d begins", i);
        int t = snprintf(tail, sizeof tail, " and ends %d\n", i);
        write(1, head, h);              /* a fragment: no newline yet */
        if (i % 97 == 0) write(1, long_line, 40000);   /* an overlong line: P, P, F records */
        write(1, tail, t);
        if (i % 5 == 0) { char e[64]; write(2, e, snprintf(e, sizeof e, "err %d\n", i)); }
    }
    write(1, "no newline at the end", 21);
    return 0;
}
"""


def records(name):
    """(stream, tag, content) of every line of a CRI log file; fails on anything else."""
    with (gzip.open if name.endswith(".gz") else open)(name, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), f"{name} ends inside a record"
    out = []
    for line in data.split(b"\n")[:-1]:
        match = CRI.match(line)
        assert match, f"not a CRI record in {name}: {line[:120]!r}"
        out.append((match.group(1).decode(), match.group(2).decode(), match.group(3)))
    return out


def log_files(path):
    """The rotated files (oldest first) and the live file; checks they are named and compressed
    as the kubelet names and compresses them: the newest rotation plain, the older ones gzip."""
    rotated = rotated_logs(path)
    stamps = [name[len(path) + 1:] for name in rotated]
    assert all(STAMP.match(stamp) for stamp in stamps[-1:]), stamps
    assert all(stamp.endswith(".gz") and STAMP.match(stamp[:-3]) for stamp in stamps[:-1]), stamps
    for name in rotated[:-1]:
        with open(name, "rb") as f:
            assert f.read(2) == b"\x1f\x8b", name      # the gzip magic
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(os.path.basename(n) for n in rotated + [path])
    return rotated + [path]


def run(backend, module, argv, path, **limits):
    result = backend.load(module).run(argv, stdout=path, stderr=path, **limits)
    assert result.exit_code == 0, result
    return result


def test_a_log_heavy_module_rotates_keeping_every_line_once_in_order(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    run(backend, wasm.tool, ["tool", "lines", "20000"], path, log_max_size=40_000, log_max_files=100)
    files = log_files(path)
    assert 10 < len(files) <= 100
    contents = []
    for name in files:
        recs = records(name)
        assert all(stream == "stdout" and tag == "F" for stream, tag, _ in recs)
        contents += [text for _, _, text in recs]
        size = sum(len(line) for line in ((gzip.open if name.endswith(".gz") else open)(name, "rb")))
        if name != path:    # rotated after the record that filled it: full, and by less than a record
            assert 40_000 <= size < 40_000 + 80, (name, size)
    assert contents == [f"line {i} of 20000".encode() for i in range(20000)]


def test_rotation_keeps_at_most_max_files_with_the_newest_lines(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    run(backend, wasm.tool, ["tool", "lines", "20000"], path, log_max_size=20_000, log_max_files=3)
    files = log_files(path)
    assert len(files) == 3
    numbers = [int(text.split()[1]) for name in files for _, _, text in records(name)]
    assert numbers == list(range(numbers[0], 20000)) and numbers[0] > 0   # a gapless tail, in order
    timestamps = [line.split(b" ", 1)[0] for name in files
                  for line in (gzip.open if name.endswith(".gz") else open)(name, "rb")]
    assert timestamps == sorted(timestamps)


def test_one_max_file_keeps_the_live_file_only(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    run(backend, wasm.tool, ["tool", "lines", "5000"], path, log_max_size=10_000, log_max_files=1)
    assert log_files(path) == [path]
    assert os.path.getsize(path) < 10_000
    assert records(path)[-1][2] == b"line 4999 of 5000"


def test_fragments_long_lines_and_both_streams_survive_rotation(backend, wasm, tmp_path):
    module = wasm.c(PIECES_C, "pieces")
    path = str(tmp_path / "0.log")
    run(backend, module, ["pieces", "500"], path, log_max_size=8_192, log_max_files=1000)
    files = log_files(path)
    assert len(files) > 10
    for name in files:
        recs = records(name)    # every file holds whole records only
        # a fragment never becomes a record of its own: only 16 KiB cuts and the last line are P
        for stream, tag, text in recs:
            assert tag == "F" or len(text) == 16384 or text == b"no newline at the end"
    text = b"".join(minikrust.read_container_log(path, minikrust.LogOptions())).decode()
    out = [f"piece {i} begins{'x' * 40000 if i % 97 == 0 else ''} and ends {i}" for i in range(500)]
    err = [f"err {i}" for i in range(0, 500, 5)]
    lines = text.split("\n")
    assert [line for line in lines if line.startswith("piece")] == out
    assert [line for line in lines if line.startswith("err")] == err
    assert lines[-1] == "no newline at the end"
    stderr_only = b"".join(minikrust.read_container_log(path, minikrust.LogOptions(stream="stderr")))
    assert stderr_only.decode().splitlines() == err


def test_a_started_run_rotates_too_and_a_callable_is_left_alone(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    got = []
    run_ = backend.load(wasm.tool).start(["tool", "lines", "3000"], stdout=path, stderr=got.append,
                                         log_max_size=10_000, log_max_files=50)
    assert run_.wait(30).exit_code == 0
    assert len(log_files(path)) > 5
    assert sum(len(records(name)) for name in log_files(path)) == 3000


def test_no_limit_means_no_rotation(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    run(backend, wasm.tool, ["tool", "lines", "3000"], path)
    assert log_files(path) == [path] and len(records(path)) == 3000


@pytest.mark.parametrize("limits", [dict(log_max_size=0), dict(log_max_size=-5),
                                    dict(log_max_size=1000, log_max_files=0)])
def test_bad_limits_are_refused(wasm, tmp_path, limits):
    """One check, minikrust's: the fallback host runs it, and the native one through its Host's `check`."""
    with pytest.raises(minikrust.ModuleRunError, match="log_max"):
        minikrust._run_limits(None, None, limits.get("log_max_size"), limits.get("log_max_files"))
    with pytest.raises(minikrust.ModuleRunError, match="log_max"):
        minikrust.FallbackHost(str(tmp_path)).load(wasm.hello).run(["hello"], stdout=str(tmp_path / "0.log"), **limits)


def test_rotation_continues_the_names_the_server_made(backend, wasm, tmp_path):
    path = str(tmp_path / "0.log")
    with open(path, "w") as f:
        f.write("2026-01-01T00:00:00.000000000Z stdout F before\n")
    future = f"{path}.29991231-235958"   # a name newer than now: the host's must still sort after
    os.rename(path, future)
    run(backend, wasm.tool, ["tool", "lines", "2000"], path, log_max_size=10_000, log_max_files=100)
    rotated = log_files(path)[:-1]
    assert rotated[:3] == [future + ".gz", f"{path}.29991231-235959.gz", f"{path}.30000101-000000.gz"]
    assert len(set(rotated)) == len(rotated) > 3


def test_a_kubelet_passes_its_limits_and_the_server_reads_across_files(fake_api, kubelet_factory, wasm):
    kubelet = kubelet_factory(fake_api, container_log_max_size=30_000, container_log_max_files=4)
    fake_api.create_pod({"metadata": {"name": "chatty"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "app", "image": f"file:{wasm.tool}", "args": ["lines", "20000"]}]}},
        node_name="node-1", namespace="default")

    def finished():
        pod = fake_api.get("pods", "default", "chatty") or {}
        return pod.get("status", {}).get("phase") == "Succeeded"
    wait_for(finished, timeout=60, what="the pod to succeed")
    path = kubelet.container_log_path("default", "chatty", "app")
    files = log_files(path)
    assert len(files) == 4
    text = b"".join(minikrust.read_container_log(path, minikrust.LogOptions(tail_lines=2))).decode()
    assert text == "line 19998 of 20000\nline 19999 of 20000\n"


def test_the_terminal_echo_follows_the_log_across_rotations(tmp_path):
    path = str(tmp_path / "0.log")
    printed = []
    echo = minikrust._LogEcho(printed.append)
    try:
        echo.follow("pod/app", path)
        log = minikrust._LogFile(path, max_size=200, max_files=100)
        stamp = "2026-01-01T00:00:00.000000000Z"
        for batch in range(3):  # several rotations between two looks
            log.write([f"{stamp} stdout F line {batch * 20 + i}\n".encode() for i in range(20)])
            echo.drain()
        log.close()
    finally:
        echo.stop()
    assert printed == [f"pod/app line {i}" for i in range(60)]


def test_log_cursors_hold_no_fd_between_reads(tmp_path):
    """The standalone echo keeps a cursor per container run, the server one per follower: none
    may hold its log's folder open (a crash-looping pod would leak one fd per restart)."""
    path = tmp_path / "0.log"
    path.write_bytes(b"2026-01-01T00:00:00.000000000Z stdout F hi\n")
    before = len(os.listdir("/proc/self/fd"))
    cursors = [minikrust._LogCursor(str(path), str(tmp_path)) for _ in range(50)]
    assert all(list(cursor.records()) == [b"2026-01-01T00:00:00.000000000Z stdout F hi\n"] for cursor in cursors)
    assert all(cursor.exists() for cursor in cursors)
    assert len(os.listdir("/proc/self/fd")) < before + 10
