/* wasihost.h: the small C interface that _wasihost/__init__.py calls (through cffi). */
#ifndef WASIHOST_H
#define WASIHOST_H

#include <stddef.h>
#include <stdint.h>

/* wh_module_load / wh_run_exec return codes */
#define WH_ERR_LOAD 1       /* invalid wasm, no _start, unresolvable import */
#define WH_ERR_NEED_BYTES 2 /* cache miss and no wasm bytes were given */
#define WH_ERR_RUN 3        /* setup failed before the module ran (preopen, argv) */

/* wh_result.status */
#define WH_EXITED 0
#define WH_TRAPPED 1
#define WH_KILLED 2
#define WH_TIMED_OUT 3

#define WH_LOG_PLAIN 0
#define WH_LOG_CRI 1

typedef struct wh_module wh_module;
typedef struct wh_run wh_run;

typedef struct {
  const char *const *argv;
  size_t argc;
  const char *const *env_names;
  const char *const *env_values;
  size_t envc;
  const char *const *preopen_host;
  const char *const *preopen_guest;
  const int *preopen_readonly;
  size_t npreopens;
  int stdout_fd; /* -1 discards */
  int stderr_fd;
  const char *stdout_path; /* opened (append) by wh_run_exec when the fd is -1 */
  const char *stderr_path;
  /* >= 0: the paths are names in this directory (the caller resolved it; it stays the caller's):
   * opened, rotated and listed relative to it. -1: each path's own directory. A name is never
   * followed when it is a symlink (O_NOFOLLOW), in opens and rotation alike. */
  int log_dir_fd;
  int log_format;       /* WH_LOG_PLAIN or WH_LOG_CRI */
  /* Rotation of an output given by path (also when its fd is given): once the file reaches
   * log_max_size bytes (<= 0: never) it is renamed to "<path>.<UTC %Y%m%d-%H%M%S.%06d>", the
   * oldest rotated files beyond log_max_files - 1 are removed, and the path is reopened. */
  int64_t log_max_size;
  int log_max_files;
  int64_t memory_limit; /* bytes of linear memory, -1 for none */
  double deadline;      /* seconds from the start, <= 0 for none */
  int has_stdin;
  const uint8_t *stdin_data;
  size_t stdin_len;
  /* A component's outgoing HTTP: WH_HTTP_NONE (wasi:http not linked), WH_HTTP_ANY (linked), or
   * WH_HTTP_HOSTS: only requests whose authority is one of http_hosts (matched exactly) go out;
   * any other fails in the guest with error-code HTTP-request-denied and a line on its stderr. */
  int outgoing_http;
  const char *const *http_hosts;
  size_t nhttp_hosts;
} wh_run_config;

#define WH_HTTP_NONE 0
#define WH_HTTP_ANY 1
#define WH_HTTP_HOSTS 2

typedef struct {
  int status;
  int exit_code;
  int instantiate_failed;
  double duration;
  double cpu_seconds;
  uint64_t peak_memory;
  char message[2048];
  int rc; /* wh_run_start: wh_run_exec's return code, set before done_fd is written */
  /* wh_run_start: CLOCK_MONOTONIC ns when it handed the run over, when a thread took it, when the
   * end was signalled (bench/hotpath.py times the hand-off with them) */
  int64_t handoff[3];
} wh_result;

/* A run's usage now (wh_run_usage, from any thread): while it runs, CPU seconds of its thread since
 * it began and resident bytes of its linear memory plus the host's buffers for it; once it ended,
 * its total CPU and memory 0. peak_memory: the largest linear memory plus buffers it reached. */
typedef struct {
  int running;
  double cpu_seconds;
  uint64_t memory;
  uint64_t peak_memory;
} wh_usage;

int wh_init(char *err, size_t errlen);
const char *wh_pool_info(void); /* how the instance pool was sized for this device (after wh_init) */
int wh_module_load(const uint8_t *wasm, size_t len, const char *cache_path, wh_module **out,
                   int *from_cache, char *err, size_t errlen);
void wh_module_free(wh_module *m);
/* A WASI 0.2 component (run through wasi:cli/run), cached like a module; *imports_http tells
 * whether it imports wasi:http/outgoing-handler (then runs need outgoing_http). */
int wh_component_load(const uint8_t *wasm, size_t len, const char *cache_path, wh_module **out,
                      int *from_cache, int *imports_http, char *err, size_t errlen);
/* The filter component that WH_HTTP_HOSTS runs need (http_filter.wat's text), compiled once. */
int wh_http_filter_load(const char *wat, size_t len, char *err, size_t errlen);
wh_run *wh_run_new(void);
void wh_run_free(wh_run *r);
void wh_kill(wh_run *r);
void wh_run_usage(wh_run *r, wh_usage *out);
int wh_run_exec(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res);
/* wh_run_exec on a new thread of its own. When the run is over (res filled in), that thread writes
 * res->rc (wh_run_exec's return code), then writes the uint64 1 to done_fd (an eventfd or a pipe's
 * write end) and touches nothing of the caller's after it: m, c, r, res and done_fd must live until then.
 * Returns 0, or WH_ERR_RUN with a message in err when no thread could be started. */
int wh_run_start(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res, int done_fd, char *err,
                 size_t errlen);

#endif
