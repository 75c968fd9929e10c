/* floor.c: the pure-C floor of the hot path. Drives the native host's own C functions
 * (_wasihost/wasihost.c) in a loop, doing per run what the Python face does: open the log file,
 * run the module (or component) with stdout/stderr in CRI format, close the file.
 *
 *   floor WASM CACHE_PATH LOG_PATH RUNS   -> one line per run: nanoseconds of that run
 *
 * Built by bench/hotpath.py: cc -O2 floor.c ../_wasihost/wasihost.c -l:_libwasmtime.so
 * With -DWH_PHASES (`hotpath.py --components` prints them) a component run's C time by phase; the
 * C and WAT hello components, 2026-11-30 16:54-16:56 UTC, load 3-4, means in us: WASI config and the
 * output FIFOs 8-12 (FIFOs tried and dropped; the pipes kept: 15-17), store 2-3, instantiate
 * 34-80, the call 15-33, output drained 7-19, store freed 13-36, the rest (log open/close, CPU
 * clocks) 9-16; total 87-199 (README, Components: where it goes).
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "wasihost.h"

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint8_t *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *buf = malloc(n > 0 ? n : 1);
  if (buf && fread(buf, 1, n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *len = n;
  return buf;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s WASM CACHE_PATH LOG_PATH RUNS\n", argv[0]);
    return 2;
  }
  char err[2048];
  size_t len;
  uint8_t *wasm = read_file(argv[1], &len);
  if (!wasm) {
    perror(argv[1]);
    return 1;
  }
  if (wh_init(err, sizeof err) != 0) {
    fprintf(stderr, "wh_init: %s\n", err);
    return 1;
  }
  wh_module *module;
  int from_cache, imports_http;
  int component = len >= 8 && wasm[6] == 1 && wasm[7] == 0; /* the component header's layer */
  if ((component ? wh_component_load(wasm, len, argv[2], &module, &from_cache, &imports_http, err, sizeof err)
                 : wh_module_load(wasm, len, argv[2], &module, &from_cache, err, sizeof err)) != 0) {
    fprintf(stderr, "loading %s: %s\n", argv[1], err);
    return 1;
  }
  int runs = atoi(argv[4]);
  long long *times = calloc(runs, sizeof *times);
  const char *run_argv[] = {"hello"};
  wh_result res;
  for (int i = 0; i < runs; i++) {
    long long t0 = now_ns();
    int fd = open(argv[3], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    wh_run_config c = {0};
    c.argv = run_argv;
    c.argc = 1;
    c.stdout_fd = fd;
    c.stderr_fd = fd;
    c.log_format = WH_LOG_CRI;
    c.memory_limit = -1;
    wh_run *r = wh_run_new();
    int rc = wh_run_exec(module, &c, r, &res);
    wh_run_free(r);
    close(fd);
    times[i] = now_ns() - t0;
    if (rc != 0 || res.status != WH_EXITED || res.exit_code != 0) {
      fprintf(stderr, "run %d failed: rc=%d status=%d exit=%d %s\n", i, rc, res.status, res.exit_code, res.message);
      return 1;
    }
  }
  for (int i = 0; i < runs; i++) printf("%lld\n", times[i]);
#ifdef WH_PHASES
  extern long long wh_phase_ns[WH_PHASES];
  for (int i = 0; i < WH_PHASES; i++) fprintf(stderr, "%lld\n", wh_phase_ns[i] / runs);
#endif
  free(times);
  wh_module_free(module);
  free(wasm);
  return 0;
}
