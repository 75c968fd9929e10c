"""WASI conformance of the native host's shadowed calls, checked against wasmtime's own WASI.

The native host answers fd_write, fd_close, fd_renumber and poll_oneoff itself (see
_wasihost/wasihost.c) and delegates the rest to wasmtime. A module here makes those calls the way
a conformance suite does (stdout/stderr, files in a preopen, fds closed or renumbered, clock sleeps,
polls of clocks and fds, pointer edge cases) and notes every answer in a file; each backend must
give the answers wasmtime gives, and the two backends must agree byte for byte. Last, modules that
wasmtime runs but the native host's instance pool cannot hold (too big, or too many at once) must
run too. The probe module and its expectations are our own (written for minikrust, not taken from
any suite).
"""
import os

import pytest

import minikrust
from tests.helpers import unavailable
from tests.wasm_modules import WASI, wat

PROBE_C = r"""
/* Probes of the WASI calls the native host shadows (fd_write, fd_close, fd_renumber, poll_oneoff):
 * `probe NAME` makes raw WASI calls and notes every answer in res.txt of the preopen at fd 3. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>
#include <time.h>
#define OK0(c) do { if (c) { P("setup failed line %d\n", __LINE__); return 91; } } while (0)
static __wasi_fd_t R = 0;
#define P(...) dprintf(R, __VA_ARGS__)
static void open_res(void) {
  if (__wasi_path_open(3, 0, "res.txt", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC, __WASI_RIGHTS_FD_WRITE, 0, 0, &R)) exit(90);
}
static int wr(__wasi_fd_t fd, const char *s, __wasi_size_t *n) {
  __wasi_ciovec_t v = {(const uint8_t *)s, strlen(s)};
  return __wasi_fd_write(fd, &v, 1, n);
}
static void fdstat(__wasi_fd_t fd) {
  __wasi_fdstat_t st;
  memset(&st, 0, sizeof st);
  int e = __wasi_fd_fdstat_get(fd, &st);
  P("fdstat %u: e=%d type=%d flags=%d base=%llx inh=%llx\n", fd, e, st.fs_filetype, st.fs_flags,
    (unsigned long long)st.fs_rights_base, (unsigned long long)st.fs_rights_inheriting);
}
static uint8_t *top(void) { return (uint8_t *)(__builtin_wasm_memory_size(0) * 65536); }
static int poll_raw(__wasi_subscription_t *s, int n, __wasi_event_t *ev, __wasi_size_t *got) {
  return __wasi_poll_oneoff(s, ev, n, got);
}
static __wasi_subscription_t clk(uint64_t ud, int id, uint64_t timeout, int flags) {
  __wasi_subscription_t s;
  memset(&s, 0, sizeof s);
  s.userdata = ud; s.u.tag = __WASI_EVENTTYPE_CLOCK; s.u.u.clock.id = id; s.u.u.clock.timeout = timeout; s.u.u.clock.flags = flags;
  return s;
}
static __wasi_subscription_t fdsub(uint64_t ud, int type, __wasi_fd_t fd) {
  __wasi_subscription_t s;
  memset(&s, 0, sizeof s);
  s.userdata = ud; s.u.tag = type; s.u.u.fd_read.file_descriptor = fd;
  return s;
}
static void poll_show(const char *what, __wasi_subscription_t *s, int n) {
  __wasi_event_t ev[8];
  memset(ev, 0xAB, sizeof ev);
  __wasi_size_t got = 99;
  int e = poll_raw(s, n, ev, &got);
  P("poll %s: e=%d n=%u", what, e, got);
  for (unsigned i = 0; e == 0 && i < got && i < 8; i++)
    P(" [ud=%llu err=%d type=%d nbytes=%llu flags=%d]", (unsigned long long)ev[i].userdata, ev[i].error, ev[i].type,
      (unsigned long long)ev[i].fd_readwrite.nbytes, ev[i].fd_readwrite.flags);
  P("\n");
}

int main(int argc, char **argv) {
  open_res();
  const char *w = argc > 1 ? argv[1] : "";
  __wasi_size_t n = 77;
  int e;
  if (!strcmp(w, "stdio-calls")) {
    for (int fd = 0; fd < 3; fd++) fdstat(fd);
    __wasi_filestat_t fs; memset(&fs, 0, sizeof fs);
    e = __wasi_fd_filestat_get(1, &fs); P("filestat 1: e=%d type=%d size=%llu\n", e, fs.filetype, (unsigned long long)fs.size);
    __wasi_filesize_t off = 5;
    e = __wasi_fd_seek(1, 0, __WASI_WHENCE_CUR, &off); P("seek 1: e=%d off=%llu\n", e, (unsigned long long)off);
    e = __wasi_fd_tell(1, &off); P("tell 1: e=%d\n", e);
    __wasi_ciovec_t cv = {(const uint8_t *)"pw", 2};
    n = 77; e = __wasi_fd_pwrite(1, &cv, 1, 0, &n); P("pwrite 1: e=%d n=%u\n", e, n);
    char b[4]; __wasi_iovec_t iv = {(uint8_t *)b, 4};
    n = 77; e = __wasi_fd_read(1, &iv, 1, &n); P("read 1: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_pread(1, &iv, 1, 0, &n); P("pread 1: e=%d n=%u\n", e, n);
    P("sync 1: e=%d datasync: e=%d\n", __wasi_fd_sync(1), __wasi_fd_datasync(1));
    P("advise 1: e=%d allocate: e=%d\n", __wasi_fd_advise(1, 0, 1, 0), __wasi_fd_allocate(1, 0, 1));
    P("set_size 1: e=%d set_times: e=%d\n", __wasi_fd_filestat_set_size(1, 0), __wasi_fd_filestat_set_times(1, 0, 0, 0));
    P("set_flags 1 append: e=%d\n", __wasi_fd_fdstat_set_flags(1, __WASI_FDFLAGS_APPEND)); fdstat(1);
    P("set_flags 2 nonblock: e=%d\n", __wasi_fd_fdstat_set_flags(2, __WASI_FDFLAGS_NONBLOCK)); fdstat(2);
    n = 77; e = wr(1, "after-flags\n", &n); P("write 1: e=%d n=%u\n", e, n);
    n = 77; e = wr(2, "after-flags-2\n", &n); P("write 2: e=%d n=%u\n", e, n);
    P("set_rights 1: e=%d\n", __wasi_fd_fdstat_set_rights(1, 0, 0)); fdstat(1);
    n = 77; e = wr(1, "after-rights\n", &n); P("write 1 no rights: e=%d n=%u\n", e, n);
    __wasi_prestat_t ps; P("prestat 1: e=%d\n", __wasi_fd_prestat_get(1, &ps));
    P("readdir 1: e=%d\n", __wasi_fd_readdir(1, (uint8_t *)b, 4, 0, &n));
  } else if (!strcmp(w, "iovecs")) {
    __wasi_ciovec_t v[4];
    n = 77; e = __wasi_fd_write(1, v, 0, &n); P("zero iovecs: e=%d n=%u\n", e, n);
    v[0] = (__wasi_ciovec_t){(const uint8_t *)0xFFFFFFF0u, 0};
    v[1] = (__wasi_ciovec_t){(const uint8_t *)"ab\n", 3};
    v[2] = (__wasi_ciovec_t){(const uint8_t *)"cd\n", 3};
    n = 77; e = __wasi_fd_write(1, v, 3, &n); P("empty-bad then two: e=%d n=%u\n", e, n);
    v[0] = (__wasi_ciovec_t){(const uint8_t *)"", 0};
    v[1] = (__wasi_ciovec_t){(const uint8_t *)"", 0};
    n = 77; e = __wasi_fd_write(2, v, 2, &n); P("all empty: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, (const __wasi_ciovec_t *)0, 0, &n); P("null iovs count 0: e=%d n=%u\n", e, n);
    /* an iovec array running past the end of memory after a good first entry */
    __wasi_ciovec_t *end = (__wasi_ciovec_t *)(top() - 16);
    end[0] = (__wasi_ciovec_t){(const uint8_t *)"tail\n", 5};
    end[1] = (__wasi_ciovec_t){(const uint8_t *)"x", 1};
    n = 77; e = __wasi_fd_write(1, end, 2, &n); P("array at end, fits: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, end, 3, &n); P("array past end: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, end, 100000, &n); P("array far past end: e=%d n=%u\n", e, n);
    v[0] = (__wasi_ciovec_t){top() - 2, 2};
    n = 77; e = __wasi_fd_write(1, v, 1, &n); P("buf at end: e=%d n=%u\n", e, n);
    v[0] = (__wasi_ciovec_t){top() - 2, 3};
    n = 77; e = __wasi_fd_write(1, v, 1, &n); P("buf past end: e=%d n=%u\n", e, n);
    v[0] = (__wasi_ciovec_t){(const uint8_t *)"ok\n", 3};
    v[1] = (__wasi_ciovec_t){top() - 2, 3};
    n = 77; e = __wasi_fd_write(1, v, 2, &n); P("good then bad buf: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, (const __wasi_ciovec_t *)((char *)v + 2), 1, &n); P("misaligned iovs: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, (const __wasi_ciovec_t *)(top() - 4), 1, &n); P("iovs past end: e=%d n=%u\n", e, n);
    n = 77; e = __wasi_fd_write(1, (const __wasi_ciovec_t *)(top() + 64), 1, &n); P("iovs beyond: e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "nwritten-misaligned")) {
    __wasi_ciovec_t v = {(const uint8_t *)"mis\n", 4};
    e = __wasi_fd_write(1, &v, 1, (__wasi_size_t *)((char *)&n + 1)); P("e=%d\n", e);
  } else if (!strcmp(w, "nwritten-oob")) {
    __wasi_ciovec_t v = {(const uint8_t *)"oob\n", 4};
    e = __wasi_fd_write(1, &v, 1, (__wasi_size_t *)(top() - 2)); P("e=%d\n", e);
  } else if (!strcmp(w, "close-stdout")) {
    n = 77; e = wr(-1, "minus-one-before\n", &n); P("write -1 before close: e=%d n=%u\n", e, n);
    P("close 1: e=%d\n", __wasi_fd_close(1));
    P("close 1 again: e=%d\n", __wasi_fd_close(1));
    n = 77; e = wr(1, "closed\n", &n); P("write 1 after close: e=%d n=%u\n", e, n);
    n = 77; e = wr(-1, "minus-one-after\n", &n); P("write -1 after close: e=%d n=%u\n", e, n);
    n = 77; e = wr(0xFFFFFFFFu, "minus-one-u\n", &n); P("write 0xffffffff: e=%d n=%u\n", e, n);
    P("renumber -1 -> 2: e=%d\n", __wasi_fd_renumber(-1, 2));
    P("close -1: e=%d\n", __wasi_fd_close(-1));
    n = 77; e = wr(2, "stderr-still\n", &n); P("write 2: e=%d n=%u\n", e, n);
    __wasi_fd_t f;
    e = __wasi_path_open(3, 0, "reused", __WASI_OFLAGS_CREAT, __WASI_RIGHTS_FD_WRITE, 0, 0, &f); P("open: e=%d fd=%u\n", e, f);
    n = 77; e = wr(f, "to-file\n", &n); P("write reused: e=%d n=%u\n", e, n);
    P("close 2: e=%d\n", __wasi_fd_close(2));
    n = 77; e = wr(-1, "minus-one-both\n", &n); P("write -1 both closed: e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "renumber")) {
    P("renumber 1->1: e=%d\n", __wasi_fd_renumber(1, 1));
    n = 77; e = wr(1, "after-self\n", &n); P("write 1: e=%d n=%u\n", e, n);
    P("renumber 1->9 (not open): e=%d\n", __wasi_fd_renumber(1, 9));
    n = 77; e = wr(1, "still-1\n", &n); P("write 1: e=%d n=%u\n", e, n);
    P("renumber 2->1: e=%d\n", __wasi_fd_renumber(2, 1));
    n = 77; e = wr(1, "err-on-1\n", &n); P("write 1: e=%d n=%u\n", e, n);
    n = 77; e = wr(2, "gone-2\n", &n); P("write 2: e=%d n=%u\n", e, n);
    __wasi_fd_t f;
    e = __wasi_path_open(3, 0, "f2", __WASI_OFLAGS_CREAT, __WASI_RIGHTS_FD_WRITE, 0, 0, &f); P("open: e=%d fd=%u\n", e, f);
    P("renumber 1->f: e=%d\n", __wasi_fd_renumber(1, f));
    n = 77; e = wr(f, "err-via-f\n", &n); P("write f: e=%d n=%u\n", e, n);
    e = __wasi_path_open(3, 0, "f3", __WASI_OFLAGS_CREAT, __WASI_RIGHTS_FD_WRITE, 0, 0, &f); P("open: e=%d fd=%u\n", e, f);
    P("renumber f3->%u: e=%d\n", 2, __wasi_fd_renumber(f, 2));
    n = 77; e = wr(2, "to-f3\n", &n); P("write 2: e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll")) {
    __wasi_subscription_t s[4];
    __wasi_event_t ev[2];
    n = 77; e = poll_raw(s, 0, ev, &n); P("poll nsubs=0: e=%d n=%u\n", e, n);
    s[0] = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0); poll_show("mono 1ms", s, 1);
    s[0] = clk(2, __WASI_CLOCKID_REALTIME, 1000000, 0); poll_show("real 1ms", s, 1);
    s[0] = clk(3, __WASI_CLOCKID_MONOTONIC, 0, 0); poll_show("mono 0", s, 1);
    s[0] = clk(4, __WASI_CLOCKID_MONOTONIC, 1000000, 2); poll_show("flags=2", s, 1);
    s[0] = clk(5, __WASI_CLOCKID_MONOTONIC, 1000000, 0xFFFE); poll_show("flags=fffe", s, 1);
    s[0] = clk(6, __WASI_CLOCKID_PROCESS_CPUTIME_ID, 1000000, 0); poll_show("cputime", s, 1);
    s[0] = clk(7, 9, 1000000, 0); poll_show("clock 9", s, 1);
    s[0] = clk(8, __WASI_CLOCKID_MONOTONIC, 1000000, 0); s[1] = clk(9, __WASI_CLOCKID_MONOTONIC, 300000000, 0);
    poll_show("1ms+300ms", s, 2);
    s[0] = clk(10, __WASI_CLOCKID_MONOTONIC, 2000000, 0); s[1] = clk(11, __WASI_CLOCKID_MONOTONIC, 2000000, 0);
    poll_show("2ms+2ms", s, 2);
    s[0] = clk(12, __WASI_CLOCKID_REALTIME, 0, 1); poll_show("real abs 0", s, 1);
    s[0] = clk(13, __WASI_CLOCKID_MONOTONIC, 0, 1); poll_show("mono abs 0", s, 1);
    s[0] = fdsub(14, __WASI_EVENTTYPE_FD_WRITE, 1); s[1] = fdsub(15, __WASI_EVENTTYPE_FD_WRITE, 2);
    poll_show("write 1,2", s, 2);
    s[0] = fdsub(16, __WASI_EVENTTYPE_FD_READ, 1); s[1] = clk(17, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    poll_show("read 1 + clock", s, 2);
    s[0] = fdsub(18, __WASI_EVENTTYPE_FD_WRITE, 33); poll_show("write 33", s, 1);
    s[0] = fdsub(19, __WASI_EVENTTYPE_FD_READ, 0); poll_show("read stdin", s, 1);
    s[0] = fdsub(20, __WASI_EVENTTYPE_FD_WRITE, 3); poll_show("write dir 3", s, 1);
    s[0] = clk(21, __WASI_CLOCKID_MONOTONIC, 1000000, 0); s[0].u.tag = 7; poll_show("tag 7", s, 1);
  } else if (!strcmp(w, "poll-nevents-oob")) {
    __wasi_subscription_t s = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    __wasi_event_t ev;
    int e2 = __wasi_poll_oneoff(&s, &ev, 1, (__wasi_size_t *)(top() - 2)); P("e=%d\n", e2);
  } else if (!strcmp(w, "poll-nevents-misaligned")) {
    __wasi_subscription_t s = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    __wasi_event_t ev;
    int e2 = __wasi_poll_oneoff(&s, &ev, 1, (__wasi_size_t *)((char *)&n + 1)); P("e=%d\n", e2);
  } else if (!strcmp(w, "big-writes")) {
    static const unsigned sizes[] = {4095, 4096, 4097, 65536, 100000, 1 << 20, 5 << 20};
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
      char *b = malloc(sizes[i]);
      memset(b, 'a' + i, sizes[i]);
      b[sizes[i] - 1] = '\n';
      __wasi_ciovec_t v[2] = {{(const uint8_t *)b, sizes[i]}, {(const uint8_t *)"zz\n", 3}};
      n = 77; e = __wasi_fd_write(1 + (i & 1), v, 2, &n); P("write %u: e=%d n=%u\n", sizes[i], e, n);
      free(b);
    }
  } else if (!strcmp(w, "poll-misaligned-events")) {
    __wasi_subscription_t s = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    __wasi_event_t ev[2];
    n = 77; e = __wasi_poll_oneoff(&s, (__wasi_event_t *)((char *)ev + 4), 1, &n); P("e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll-events-oob")) {
    __wasi_subscription_t s = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    n = 77; e = __wasi_poll_oneoff(&s, (__wasi_event_t *)(top() - 8), 1, &n); P("e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll-subs-oob")) {
    __wasi_event_t ev[2];
    n = 77; e = __wasi_poll_oneoff((__wasi_subscription_t *)(top() - 8), ev, 1, &n); P("e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll-subs-misaligned")) {
    __wasi_subscription_t s[2]; __wasi_event_t ev[2];
    s[0] = clk(1, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    char *p = (char *)s + 4; memmove(p, s, sizeof s[0]);
    n = 77; e = __wasi_poll_oneoff((__wasi_subscription_t *)p, ev, 1, &n); P("e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll-many")) {
    static __wasi_subscription_t s[5000]; static __wasi_event_t ev[5000];
    for (int i = 0; i < 5000; i++) s[i] = clk(i, __WASI_CLOCKID_MONOTONIC, i < 3 ? 0 : 1000000000, 0);
    n = 77; e = __wasi_poll_oneoff(s, ev, 5000, &n); P("5000: e=%d n=%u ud=%llu,%llu\n", e, n, (unsigned long long)ev[0].userdata, (unsigned long long)ev[n-1].userdata);
    n = 77; e = __wasi_poll_oneoff(s, ev, 4096, &n); P("4096: e=%d n=%u ud=%llu,%llu\n", e, n, (unsigned long long)ev[0].userdata, (unsigned long long)ev[n-1].userdata);
  } else if (!strcmp(w, "files")) {
    __wasi_fd_t a, b, c;
    OK0(__wasi_path_open(3, 0, "a.txt", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC, __WASI_RIGHTS_FD_WRITE | __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_SEEK, 0, 0, &a));
    OK0(__wasi_path_open(3, 0, "b.txt", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC, __WASI_RIGHTS_FD_WRITE, 0, __WASI_FDFLAGS_APPEND, &b));
    n = 77; e = wr(a, "to a\n", &n); P("write a: e=%d n=%u\n", e, n);
    __wasi_ciovec_t v[3] = {{(const uint8_t *)"", 0}, {(const uint8_t *)"x1\n", 3}, {(const uint8_t *)"x2\n", 3}};
    n = 77; e = __wasi_fd_write(a, v, 3, &n); P("write a 3 iovecs: e=%d n=%u\n", e, n);
    n = 77; e = wr(b, "to b\n", &n); P("write b: e=%d n=%u\n", e, n);
    P("renumber a->b: e=%d\n", __wasi_fd_renumber(a, b));
    n = 77; e = wr(b, "a via b\n", &n); P("write b: e=%d n=%u\n", e, n);
    n = 77; e = wr(a, "gone\n", &n); P("write old a: e=%d n=%u\n", e, n);
    P("renumber 1->b: e=%d\n", __wasi_fd_renumber(1, b));
    n = 77; e = wr(b, "stdout via b\n", &n); P("write b: e=%d n=%u\n", e, n);
    OK0(__wasi_path_open(3, 0, "c.txt", __WASI_OFLAGS_CREAT, __WASI_RIGHTS_FD_WRITE, 0, 0, &c));
    P("renumber c->2: e=%d\n", __wasi_fd_renumber(c, 2));
    n = 77; e = wr(2, "c via 2\n", &n); P("write 2: e=%d n=%u\n", e, n);
    P("close 2: e=%d close c: e=%d close b: e=%d\n", __wasi_fd_close(2), __wasi_fd_close(c), __wasi_fd_close(b));
    n = 77; e = wr(b, "closed b\n", &n); P("write b: e=%d n=%u\n", e, n);
    __wasi_fd_t r;
    OK0(__wasi_path_open(3, 0, "ro.txt", __WASI_OFLAGS_CREAT, __WASI_RIGHTS_FD_READ, 0, 0, &r));
    n = 77; e = wr(r, "ro\n", &n); P("write read-only: e=%d n=%u\n", e, n);
    n = 77; e = wr(3, "dir\n", &n); P("write dir: e=%d n=%u\n", e, n);
  } else if (!strcmp(w, "poll-files")) {
    __wasi_fd_t a;
    OK0(__wasi_path_open(3, 0, "p.txt", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC, __WASI_RIGHTS_FD_WRITE | __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_SEEK | __WASI_RIGHTS_POLL_FD_READWRITE, 0, 0, &a));
    n = 77; e = wr(a, "0123456789", &n);
    __wasi_filesize_t pos; OK0(__wasi_fd_seek(a, 3, __WASI_WHENCE_SET, &pos));
    /* one fd at a time: with two ready fds, which ones wasmtime reports depends on timing */
    __wasi_subscription_t s[2] = {fdsub(1, __WASI_EVENTTYPE_FD_READ, a), clk(3, __WASI_CLOCKID_MONOTONIC, 5000000000ull, 0)};
    poll_show("file read + clock", s, 2);
    s[0] = fdsub(2, __WASI_EVENTTYPE_FD_WRITE, a); poll_show("file write + clock", s, 2);
    s[0] = fdsub(4, __WASI_EVENTTYPE_FD_READ, 1); poll_show("read stdout", s, 1);
    __wasi_fd_t ro;
    OK0(__wasi_path_open(3, 0, "p.txt", 0, __WASI_RIGHTS_FD_READ, 0, 0, &ro));
    s[0] = fdsub(5, __WASI_EVENTTYPE_FD_WRITE, ro); poll_show("ro write", s, 1);
    s[0] = fdsub(6, __WASI_EVENTTYPE_FD_READ, ro); poll_show("ro read", s, 1);
    P("close a: e=%d\n", __wasi_fd_close(a));
    s[0] = fdsub(7, __WASI_EVENTTYPE_FD_READ, a); s[1] = clk(8, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    poll_show("closed fd + clock", s, 2);
    P("renumber 1->ro: e=%d\n", __wasi_fd_renumber(1, ro));
    s[0] = fdsub(9, __WASI_EVENTTYPE_FD_WRITE, ro); s[1] = fdsub(10, __WASI_EVENTTYPE_FD_WRITE, 1);
    poll_show("stdout moved", s, 2);
    P("close 2: e=%d\n", __wasi_fd_close(2));
    s[0] = fdsub(11, __WASI_EVENTTYPE_FD_WRITE, 2); poll_show("closed stderr", s, 1);
  } else if (!strcmp(w, "sleeps")) {
    __wasi_timestamp_t t0, t1, t2;
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t0);
    __wasi_subscription_t s[2] = {clk(1, __WASI_CLOCKID_MONOTONIC, 20000000, 0), clk(2, __WASI_CLOCKID_REALTIME, 60000000, 0)};
    poll_show("mono 20ms + real 60ms", s, 2);
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t1);
    s[0] = clk(3, __WASI_CLOCKID_MONOTONIC, t1 + 20000000, 1); poll_show("mono abs +20ms", s, 1);
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t2);
    P("slept relative >= 20ms: %d, < 55ms: %d; absolute >= 20ms: %d\n", t1 - t0 >= 20000000, t1 - t0 < 55000000, t2 - t1 >= 20000000);
    __wasi_timestamp_t r0; __wasi_clock_time_get(__WASI_CLOCKID_REALTIME, 1, &r0);
    s[0] = clk(4, __WASI_CLOCKID_REALTIME, r0 + 20000000, 1); poll_show("real abs +20ms", s, 1);
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t1);
    P("real abs slept >= 15ms: %d\n", t1 - t2 >= 15000000);
    struct timespec ts = {0, 10000000}; __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t0);
    P("nanosleep: %d\n", nanosleep(&ts, 0));
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &t1);
    P("nanosleep >= 10ms: %d\n", t1 - t0 >= 10000000);
  } else if (!strcmp(w, "abs-sleeps")) {
    int early = 0;
    for (int i = 0; i < 20; i++) { /* an absolute deadline is never reported before the clock reaches it */
      __wasi_timestamp_t now, after;
      int id = i & 1 ? __WASI_CLOCKID_REALTIME : __WASI_CLOCKID_MONOTONIC;
      __wasi_clock_time_get(id, 1, &now);
      __wasi_subscription_t s = clk(i, id, now + 1000000, 1);
      __wasi_event_t ev; __wasi_size_t got;
      e = __wasi_poll_oneoff(&s, &ev, 1, &got);
      __wasi_clock_time_get(id, 1, &after);
      early += e != 0 || got != 1 || ev.userdata != (uint64_t)i || after < now + 1000000;
    }
    P("early or wrong: %d\n", early);
    __wasi_timestamp_t m0;
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &m0);
    __wasi_subscription_t s[3] = {clk(1, __WASI_CLOCKID_MONOTONIC, m0 + 300000000, 1),
                                  clk(2, __WASI_CLOCKID_MONOTONIC, 5000000, 0),
                                  clk(3, __WASI_CLOCKID_MONOTONIC, m0 - 1, 1)};
    poll_show("abs 300ms + rel 5ms + abs past", s, 3);
    s[0] = clk(4, __WASI_CLOCKID_MONOTONIC, m0 + 300000000, 1); s[1] = clk(5, __WASI_CLOCKID_MONOTONIC, 2000000, 0);
    poll_show("abs 300ms + rel 2ms", s, 2);
  } else if (!strcmp(w, "abs-sleep-long")) {
    __wasi_timestamp_t now;
    __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &now);
    __wasi_subscription_t s = clk(1, __WASI_CLOCKID_MONOTONIC, now + 30000000000ull, 1);
    __wasi_event_t ev; __wasi_size_t got;
    P("e=%d\n", __wasi_poll_oneoff(&s, &ev, 1, &got));
  } else if (!strcmp(w, "close-mid-line")) {
    wr(1, "fragment", &n); wr(2, "e1\n", &n); wr(1, " more", &n);
    P("close 1: e=%d\n", __wasi_fd_close(1));
    wr(2, "e2 no newline", &n);
  } else if (!strcmp(w, "mixed")) {
    for (int i = 0; i < 5; i++) { printf("out %d\n", i); fprintf(stderr, "err %d\n", i); }
    printf("no newline at end");
  } else {
    return 3;
  }
  return 0;
}
"""

# "sleeps", "abs-sleeps" and "abs-sleep-long" are left out: timings are checked per backend above
PROBES = ["stdio-calls", "iovecs", "nwritten-misaligned", "nwritten-oob", "close-stdout", "renumber", "poll",
          "poll-nevents-oob", "poll-nevents-misaligned", "poll-misaligned-events", "poll-events-oob",
          "poll-subs-oob", "poll-subs-misaligned", "poll-many", "big-writes", "files", "poll-files", "close-mid-line",
          "mixed"]


@pytest.fixture(scope="module")
def probe(wasm):
    return wasm.c(PROBE_C, "conformance-probe")


def run_probe(host, path, name, workdir, log_format="plain", shared_log=False):
    """Run `probe NAME` with `workdir` preopened as "/"; what a test can compare across backends."""
    os.makedirs(workdir)
    log = os.path.join(workdir, "log")
    err = log if shared_log else os.path.join(workdir, "err")
    with minikrust.module_errors():
        result = host.load(path).run(["probe", name], preopens=[(workdir, "/", False)], stdout=log, stderr=err,
                                     log_format=log_format, deadline=20)
    files = {}
    for entry in sorted(os.listdir(workdir)):
        with open(os.path.join(workdir, entry), "rb") as f:
            data = f.read()
        if entry == "log" and log_format == "cri":  # timestamps differ run to run
            data = b"\n".join(line.split(b" ", 1)[1] for line in data.splitlines())
        files[entry] = data
    # the trap's cause, not its backtrace (the native host's trampoline adds a frame)
    trap = (result.trap or "").strip().splitlines()[-1:]
    return {"exit": result.exit_code, "trap": trap, "files": files}


def answers(outcome):
    return outcome["files"].get("res.txt", b"").decode()


# -- the regression: a closed stdout must not be found again as fd -1 --

def _closed_stdout_module(body):
    return wat(f"""(module
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "fd_close" (func $close (param i32) (result i32)))
  (import "{WASI}" "fd_renumber" (func $ren (param i32 i32) (result i32)))
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "leak\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 5))
    {body}))""")


@pytest.mark.parametrize("how", ["close", "renumber_onto", "close_both"])
def test_write_to_fd_minus_one_after_stdout_is_gone_is_ebadf_and_logs_nothing(backend, tmp_path, how):
    gone = {"close": "(drop (call $close (i32.const 1)))",
            "renumber_onto": "(drop (call $ren (i32.const 2) (i32.const 1)))",
            "close_both": "(drop (call $close (i32.const 1))) (drop (call $close (i32.const 2)))"}[how]
    module = _closed_stdout_module(gone + "(call $exit (call $w (i32.const -1) (i32.const 0) (i32.const 1) (i32.const 8)))")
    log = tmp_path / "log"
    result = backend.load(module).run(["m"], stdout=str(log), stderr=str(log), log_format="plain")
    assert result.exit_code == 8  # EBADF
    assert log.read_bytes() == b""


def test_renumber_and_close_of_fd_minus_one_after_stdout_is_closed_are_ebadf(backend):
    module = _closed_stdout_module("(drop (call $close (i32.const 1)))"
                                   "(if (i32.ne (call $ren (i32.const -1) (i32.const 2)) (i32.const 8)) (then (call $exit (i32.const 1))))"
                                   "(call $exit (call $close (i32.const -1)))")
    out = []
    result = backend.load(module).run(["m"], stdout=out.append, stderr=out.append, log_format="plain")
    assert (result.exit_code, out) == (8, [])


# -- each backend answers as wasmtime does --

def test_stdout_closed_or_renumbered_answers_like_wasmtime(backend, probe, tmp_path):
    outcome = run_probe(backend, probe, "close-stdout", str(tmp_path / "w"))
    lines = answers(outcome).splitlines()
    assert "write 1 after close: e=8 n=77" in lines
    assert "write -1 after close: e=8 n=77" in lines
    assert "write 0xffffffff: e=8 n=77" in lines
    assert "close 1 again: e=8" in lines
    assert "open: e=0 fd=1" in lines  # the lowest free fd is reused, and writes go to the file
    assert outcome["files"]["reused"] == b"to-file\n"
    assert outcome["files"]["log"] == b""
    assert outcome["files"]["err"] == b"stderr-still\n"


def test_renumbered_stdio_follows_its_fd(backend, probe, tmp_path):
    outcome = run_probe(backend, probe, "renumber", str(tmp_path / "w"))
    files = outcome["files"]
    assert files["log"] == b"after-self\nstill-1\n"
    assert files["err"] == b"err-on-1\nerr-via-f\n"  # stderr moved to 1, then to f
    assert files["f3"] == b"to-f3\n"
    assert "renumber 1->9 (not open): e=8" in answers(outcome)


def test_file_writes_close_and_renumber_in_a_preopen(backend, probe, tmp_path):
    outcome = run_probe(backend, probe, "files", str(tmp_path / "w"))
    files = outcome["files"]
    assert outcome["exit"] == 0
    # only the first non-empty iovec is written; after renumber(a, b), fd b is a.txt's handle
    assert files["a.txt"] == b"to a\nx1\na via b\n"
    assert files["b.txt"] == b"to b\n"
    assert files["log"] == b"stdout via b\n"  # after renumber(1, b), fd b is stdout
    assert files["c.txt"] == b"c via 2\n"
    assert files["err"] == b""
    assert "write old a: e=8 n=77" in answers(outcome)


def test_poll_of_clocks_and_fds(backend, probe, tmp_path):
    text = answers(run_probe(backend, probe, "poll", str(tmp_path / "w")))
    assert "poll nsubs=0: e=28 n=77" in text  # EINVAL
    assert "poll 1ms+300ms: e=0 n=1 [ud=8 err=0 type=0 nbytes=0 flags=0]" in text
    assert "poll 2ms+2ms: e=0 n=2 [ud=10" in text
    assert "poll cputime: e=28" in text and "poll clock 9: e=28" in text
    assert "poll write 1,2: e=0 n=2 [ud=14 err=0 type=2 nbytes=1 flags=0] [ud=15 err=0 type=2" in text
    assert "poll write 33: e=8" in text and "poll tag 7: e=28" in text


def test_clock_sleeps_last_as_asked(backend, probe, tmp_path):
    text = answers(run_probe(backend, probe, "sleeps", str(tmp_path / "w")))
    assert "poll mono 20ms + real 60ms: e=0 n=1 [ud=1 err=0 type=0" in text
    assert "slept relative >= 20ms: 1" in text and "absolute >= 20ms: 1" in text
    assert "real abs slept >= 15ms: 1" in text and "nanosleep >= 10ms: 1" in text


def test_absolute_clock_sleeps_never_wake_early(backend, probe, tmp_path):
    text = answers(run_probe(backend, probe, "abs-sleeps", str(tmp_path / "w")))
    assert "early or wrong: 0" in text
    assert "poll abs 300ms + rel 5ms + abs past: e=0 n=1 [ud=3 err=0 type=0" in text  # the past one only
    assert "poll abs 300ms + rel 2ms: e=0 n=1 [ud=5 err=0 type=0" in text


def test_kill_and_deadline_cut_an_absolute_clock_sleep_short(tmp_path, probe):
    """clock_nanosleep(TIMER_ABSTIME) of 30 s: the native host sleeps it itself, interruptibly."""
    from tests.wasm_modules import native_available
    if native_available():
        unavailable(native_available())
    import _wasihost
    module = _wasihost.Host(cache_dir=str(tmp_path / "cache")).load(probe)
    os.makedirs(tmp_path / "w")
    run = module.start(["probe", "abs-sleep-long"], preopens=[(str(tmp_path / "w"), "/", False)])
    assert run.wait(0.2) is None
    run.kill()
    result = run.wait(1)
    assert result is not None and result.killed
    timed = module.run(["probe", "abs-sleep-long"], preopens=[(str(tmp_path / "w"), "/", False)], deadline=0.2)
    assert timed.timed_out and timed.duration < 1


def test_poll_of_file_fds_and_closed_stdio(backend, probe, tmp_path):
    text = answers(run_probe(backend, probe, "poll-files", str(tmp_path / "w")))
    assert "poll file read + clock: e=0 n=1 [ud=1 err=0 type=1 nbytes=1 flags=0]" in text  # wasmtime says 1, not 7
    assert "poll file write + clock: e=0 n=1 [ud=2 err=0 type=2" in text
    assert "poll closed fd + clock: e=8" in text
    assert "poll stdout moved: e=8" in text
    assert "poll closed stderr: e=8" in text


# -- the two backends agree on every probe, byte for byte --

@pytest.mark.parametrize("name", PROBES)
def test_native_answers_every_probe_like_wasmtime(both_hosts, probe, tmp_path, name):
    native, fallback = (run_probe(host, probe, name, str(tmp_path / host.backend)) for host in both_hosts)
    assert native == fallback


@pytest.mark.parametrize("name", ["mixed", "renumber", "close-stdout", "close-mid-line", "files", "big-writes"])
def test_native_cri_log_shared_by_both_streams_matches_wasmtime(both_hosts, probe, tmp_path, name):
    native, fallback = (run_probe(host, probe, name, str(tmp_path / host.backend), log_format="cri", shared_log=True)
                        for host in both_hosts)
    assert native == fallback


# -- modules that wasmtime runs but the native host's instance pool cannot hold --

def _hello_with(extra, body=""):
    return wat(f"""(module
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  {extra}
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 6))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))) {body}))""")


BEYOND_THE_POOL = {
    "table_of_30000_elements": "(table 30000 funcref)",
    "two_memories": "(memory 1)",
    "two_tables": "(table 1 funcref) (table 1 externref)",
    "instance_over_1_mib": " ".join(f"(global (mut i64) (i64.const {i}))" for i in range(70000)),
}


@pytest.mark.parametrize("kind", sorted(BEYOND_THE_POOL))
def test_module_beyond_the_pool_limits_runs_as_on_wasmtime(backend, kind):
    out = []
    result = backend.load(_hello_with(BEYOND_THE_POOL[kind])).run(["m"], stdout=out.append, log_format="plain")
    assert (result.exit_code, result.trap, b"".join(out)) == (0, None, b"hello\n")


def test_module_beyond_the_pool_is_stopped_and_cached_like_any(tmp_path):
    from tests.wasm_modules import native_available
    if native_available():
        unavailable(native_available())
    import _wasihost
    module_bytes = _hello_with(BEYOND_THE_POOL["table_of_30000_elements"], "(loop (br 0))")
    module = _wasihost.Host(cache_dir=str(tmp_path)).load(module_bytes)
    out = []
    timed = module.run(["m"], stdout=out.append, log_format="plain", deadline=0.1)
    assert timed.timed_out and out == [b"hello\n"]
    run = module.start(["m"])
    run.kill()
    assert run.wait(2).killed
    assert not module.from_cache
    assert _wasihost.Host(cache_dir=str(tmp_path)).load(module_bytes).from_cache  # a new host, as after a restart


def test_more_concurrent_runs_than_the_pool_has_slots_all_run(backend):
    """The native pool has 256 slots; wasmtime alone has no such limit, so run 300 at once."""
    module = backend.load(wat(f"""(module
  (import "{WASI}" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "hello\\n")
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 1)) (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1)) (i64.store (i32.const 24) (i64.const 300000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (i32.store (i32.const 300) (i32.const 200)) (i32.store (i32.const 304) (i32.const 6))
    (drop (call $w (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 400)))))"""))
    outputs = [[] for _ in range(300)]
    runs = [module.start(["m"], stdout=out.append, log_format="plain") for out in outputs]
    results = [run.wait(30) for run in runs]
    assert [(r.exit_code, r.trap) for r in results] == [(0, None)] * 300
    assert {b"".join(out) for out in outputs} == {b"hello\n"}
