/* wasihost.c: the hot path of minikrust's WASI host, in C over wasmtime's C API.
 *
 * One engine per process (epoch interruption, pooling allocator, cranelift "speed"; a second one
 * without the pool for the rare module the pool cannot hold), one ticker thread bumping their
 * epochs, one linker holding wasmtime's WASI with our own fd_write (plus fd_close/fd_renumber
 * bookkeeping) shadowing it for fds 1 and 2, our poll_oneoff for
 * plain sleeps (so that kill() and deadlines stop a sleeping module too), and a second linker
 * holding only wasmtime's WASI, from which the originals are fetched to delegate everything
 * that is not a plain write to the container's stdout/stderr.
 *
 * Every error becomes a code and a message returned to Python; C never calls into Python.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <dlfcn.h>

#include "wasmtime_api.h"
#include "wasihost.h"

_Static_assert(sizeof(wasmtime_extern_t) == 32, "wasmtime_extern_t layout");
_Static_assert(sizeof(wasmtime_val_raw_t) == 16, "wasmtime_val_raw_t layout");
_Static_assert(sizeof(wasmtime_func_t) == 16, "wasmtime_func_t layout");

#define WASI_MODULE "wasi_snapshot_preview1"
#define WH_DEADLINE_MAX 1e9 /* seconds (31 years): a longer deadline is none */
#define TICK_NS (5 * 1000 * 1000) /* epoch period: kill/deadline latency is about two ticks */
#define CRI_MAX_LINE 16384        /* the kubelet's CRI log line limit; longer lines become P records */
#define WASI_ERRNO_SUCCESS 0
#define POOL_SLOTS 256 /* concurrent runs with the pooling allocator, at most (see size_pool) */
#ifndef KEEP_RESIDENT
#define KEEP_RESIDENT (1 << 20)
#endif
#ifdef WH_PHASES /* bench/floor.c built with it: a component run's C time by phase (wh_phase_ns[i]: ns summed) */
long long wh_phase_ns[WH_PHASES];
static __thread struct timespec t_phase;
#define PHASE(i) \
  do { \
    struct timespec now_; \
    clock_gettime(CLOCK_MONOTONIC, &now_); \
    if ((i) >= 0) wh_phase_ns[i] += (now_.tv_sec - t_phase.tv_sec) * 1000000000LL + now_.tv_nsec - t_phase.tv_nsec; \
    t_phase = now_; \
  } while (0)
#else
#define PHASE(i) ((void)0)
#endif

/* ---------------------------------------------------------------- errors */

static void set_msg(char *dst, size_t cap, const char *prefix, const uint8_t *text, size_t len) {
  if (!dst || cap == 0) return;
  size_t n = strlen(prefix);
  if (n >= cap) n = cap - 1;
  memcpy(dst, prefix, n);
  while (len > 0 && text[len - 1] == '\0') len--; /* wasmtime's messages may carry a trailing NUL */
  if (len > cap - 1 - n) len = cap - 1 - n;
  if (len) memcpy(dst + n, text, len);
  dst[n + len] = '\0';
}

/* Consumes `e`: copies its message after `prefix` into dst. */
static void take_error(wasmtime_error_t *e, const char *prefix, char *dst, size_t cap) {
  wasm_name_t m;
  wasmtime_error_message(e, &m);
  set_msg(dst, cap, prefix, m.data, m.size);
  wasm_byte_vec_delete(&m);
  wasmtime_error_delete(e);
}

static void take_trap(wasm_trap_t *t, const char *prefix, char *dst, size_t cap) {
  wasm_message_t m;
  wasm_trap_message(t, &m);
  set_msg(dst, cap, prefix, m.data, m.size);
  wasm_byte_vec_delete(&m);
  wasm_trap_delete(t);
}

/* ---------------------------------------------------------------- engine */

/* An engine with what runs need on it. The main engine uses the pooling allocator (when the
 * address space allows); a module the pool cannot hold (a table over 20,000 elements, two
 * memories, a large instance...), which wasmtime itself runs, goes to a second engine without
 * the pool, made the first time one is needed. */
typedef struct {
  wasm_engine_t *engine;
  wasmtime_linker_t *linker;      /* WASI + our shadows: modules link against this */
  wasmtime_linker_t *wasi_linker; /* WASI only: the originals we delegate to */
  wasmtime_module_t *trampolines; /* see TRAMPOLINES_WAT */
  int pooling;
} engine_ctx_t;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static engine_ctx_t g_main;
static pthread_once_t g_unpooled_once = PTHREAD_ONCE_INIT;
static engine_ctx_t g_unpooled;
static _Atomic(wasm_engine_t *) g_unpooled_engine; /* for the ticker, once g_unpooled is ready */
static char g_init_error[512];
static char g_unpooled_error[512];

/* The ticker sleeps on a condition variable once no module has run for a second, so an idle
 * kubelet costs nothing, and back-to-back runs do not pay a thread wake-up each. */
static pthread_mutex_t g_tick_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_tick_cond = PTHREAD_COND_INITIALIZER;
static long g_active_runs;
static int g_ticker_asleep;
#define IDLE_TICKS_BEFORE_SLEEP (1000 * 1000 * 1000 / TICK_NS)

static void pipes_poll(void);

static void *ticker_main(void *arg) {
  (void)arg;
  struct timespec ts = {0, TICK_NS};
  long idle = 0;
  for (;;) {
    pthread_mutex_lock(&g_tick_lock);
    idle = g_active_runs ? 0 : idle + 1;
    if (idle > IDLE_TICKS_BEFORE_SLEEP) {
      g_ticker_asleep = 1;
      while (g_active_runs == 0) pthread_cond_wait(&g_tick_cond, &g_tick_lock);
      g_ticker_asleep = 0;
      idle = 0;
    }
    pthread_mutex_unlock(&g_tick_lock);
    nanosleep(&ts, NULL);
    pipes_poll();
    wasmtime_engine_increment_epoch(g_main.engine);
    wasm_engine_t *other = atomic_load(&g_unpooled_engine);
    if (other) wasmtime_engine_increment_epoch(other);
  }
  return NULL;
}

static void runs_add(long delta) {
  pthread_mutex_lock(&g_tick_lock);
  g_active_runs += delta;
  if (delta > 0 && g_ticker_asleep) pthread_cond_signal(&g_tick_cond);
  pthread_mutex_unlock(&g_tick_lock);
}

/* The pool, sized for this device once (size_pool): slots for concurrent runs, warm slots. */
static struct {
  size_t slots, warm;
  char text[320];
} g_pool;

static wasm_engine_t *new_engine(int pooling) {
  wasm_config_t *config = wasm_config_new();
  if (!config) return NULL;
  wasmtime_config_epoch_interruption_set(config, true);
  wasmtime_config_cranelift_opt_level_set(config, WH_WASMTIME_OPT_LEVEL_SPEED);
  /* compiles on the caller's thread: wasmtime's parallel compilation keeps a thread per core for
   * the process's life, against a kubelet's budget of its running modules + 16 threads (a module is
   * compiled once per digest, then loaded from the cache; 1.2-1.7x longer on 2 cores) */
  wasmtime_config_parallel_compilation_set(config, false);
  if (pooling) {
    /* g_pool.slots concurrent instances, each memory up to 4 GiB (wasm32's whole space); a run
     * finding every slot taken runs on the engine without the pool. */
    wasmtime_pooling_allocation_config_t *pc = wasmtime_pooling_allocation_config_new();
    wasmtime_pooling_allocation_config_total_core_instances_set(pc, 2 * g_pool.slots); /* + trampolines */
    wasmtime_pooling_allocation_config_total_memories_set(pc, g_pool.slots);
    wasmtime_pooling_allocation_config_total_tables_set(pc, g_pool.slots);
    wasmtime_pooling_allocation_config_total_stacks_set(pc, g_pool.slots);
    wasmtime_pooling_allocation_config_max_memory_size_set(pc, (size_t)4 << 30);
    /* Reset a slot's first pages with memset, not madvise: cheaper for the small memories of
     * most modules (the rest of a slot is still given back to the kernel). */
    wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pc, KEEP_RESIDENT);
    wasmtime_pooling_allocation_config_table_keep_resident_set(pc, 64 * 1024);
    wasmtime_pooling_allocation_config_max_unused_warm_slots_set(pc, g_pool.warm); /* <= warm MiB kept */
    wasmtime_pooling_allocation_strategy_set(config, pc);
    wasmtime_pooling_allocation_config_delete(pc);
  }
  return wasm_engine_new_with_config(config); /* takes ownership of config */
}

static int define_shadows(wasmtime_linker_t *linker, char *err, size_t errlen);

/* Delegating to wasmtime's WASI from our host functions: calling the original function directly
 * would run it with no calling instance, and wasmtime's WASI reads and writes the *caller's*
 * exported "memory". So, once per run that needs it, we instantiate this tiny module with the
 * guest's memory and the originals as imports: it re-exports the memory and calls the originals
 * from wasm, where the caller is an instance whose "memory" is the guest's. */
static const char TRAMPOLINES_WAT[] =
    "(module $wasihost" /* named, so a trap's backtrace reads wasihost!fd_write, not <wasm function 4> */
    " (import \"guest\" \"memory\" (memory 0))"
    " (import \"wasi\" \"fd_write\" (func $w (param i32 i32 i32 i32) (result i32)))"
    " (import \"wasi\" \"fd_close\" (func $c (param i32) (result i32)))"
    " (import \"wasi\" \"fd_renumber\" (func $r (param i32 i32) (result i32)))"
    " (import \"wasi\" \"poll_oneoff\" (func $p (param i32 i32 i32 i32) (result i32)))"
    " (export \"memory\" (memory 0))"
    " (func $fd_write (export \"fd_write\") (param i32 i32 i32 i32) (result i32)"
    "  local.get 0 local.get 1 local.get 2 local.get 3 call $w)"
    " (func $fd_close (export \"fd_close\") (param i32) (result i32) local.get 0 call $c)"
    " (func $fd_renumber (export \"fd_renumber\") (param i32 i32) (result i32) local.get 0 local.get 1 call $r)"
    " (func $poll_oneoff (export \"poll_oneoff\") (param i32 i32 i32 i32) (result i32)"
    "  local.get 0 local.get 1 local.get 2 local.get 3 call $p))";

/* ---------------------------------------------------------------- sizing the pool for the device
 *
 * A slot reserves address space, not memory: SLOT_VA (4 GiB of linear memory, its guard pages and
 * the instance's tables, generously) of PROT_NONE pages, of which a run makes accessible only
 * what its memory grows to. So the slot count is bounded by the address space: RLIMIT_AS (ulimit
 * -v) when set, else what the kernel's virtual address size lets us reserve (256 slots need 2 TiB:
 * fine with 47- or 48-bit addresses, not with the 39-bit ones of some arm64 kernels, 512 GiB).
 * We keep half of the space for everything else, halve from POOL_SLOTS until the reservation
 * succeeds (wasm_engine_new_with_config would abort the process if it failed), and below
 * MIN_POOL_SLOTS run without the pool. RAM bounds only what the pool keeps resident: up to
 * KEEP_RESIDENT per warm (recently freed) slot, so warm slots are at most 1/64 of MemTotal, and at
 * most 4 under vm.overcommit_memory=2, where resident pages count against the commit limit. */
#define SLOT_VA ((size_t)8 << 30)
#define MIN_POOL_SLOTS 4

static int reservable(size_t size) {
  void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return 0;
  munmap(p, size);
  return 1;
}

/* The first number on the line of `path` starting with `key` (the whole file when key is ""), or -1. */
static long long read_number(const char *path, const char *key) {
  FILE *f = fopen(path, "re");
  if (!f) return -1;
  char line[256];
  long long value = -1;
  while (value < 0 && fgets(line, sizeof line, f))
    if (strncmp(line, key, strlen(key)) == 0) sscanf(line + strlen(key), " %lld", &value);
  fclose(f);
  return value;
}

static void size_pool(void) {
  struct rlimit rl;
  size_t budget = SIZE_MAX;
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) budget = (size_t)rl.rlim_cur / 2;
  size_t slots = POOL_SLOTS;
  while (slots >= MIN_POOL_SLOTS && (slots * SLOT_VA > budget || !reservable(2 * slots * SLOT_VA))) slots /= 2;
  g_pool.slots = slots >= MIN_POOL_SLOTS ? slots : 0;
  long long ram_kib = read_number("/proc/meminfo", "MemTotal:");
  int overcommit = (int)read_number("/proc/sys/vm/overcommit_memory", "");
  size_t warm = 32;
  if (ram_kib > 0 && (size_t)(ram_kib * 1024 / 64 / KEEP_RESIDENT) < warm) warm = (size_t)(ram_kib * 1024 / 64 / KEEP_RESIDENT);
  if (overcommit == 2 && warm > 4) warm = 4;
  if (warm < 1) warm = 1;
  g_pool.warm = warm < g_pool.slots ? warm : g_pool.slots;
  char limit[64] = "unlimited";
  if (budget != SIZE_MAX) snprintf(limit, sizeof limit, "%llu MiB", (unsigned long long)(rl.rlim_cur >> 20));
  snprintf(g_pool.text, sizeof g_pool.text,
           "%zu slots of %zu GiB address space (RLIMIT_AS %s)%s, %zu warm (MemTotal %lld MiB, vm.overcommit_memory=%d)",
           g_pool.slots, SLOT_VA >> 30, limit, g_pool.slots ? "" : ": runs without the pool", g_pool.warm,
           ram_kib > 0 ? ram_kib / 1024 : -1, overcommit);
}

const char *wh_pool_info(void) { return g_pool.text; }

/* Fills `ec` for a new engine; 0, or -1 with the reason in err. */
static int engine_ctx_init(engine_ctx_t *ec, int pooling, char *err, size_t errlen) {
  ec->pooling = pooling;
  ec->engine = new_engine(pooling);
  if (!ec->engine) {
    snprintf(err, errlen, "cannot create the wasmtime engine");
    return -1;
  }
  wasmtime_error_t *e;
  ec->wasi_linker = wasmtime_linker_new(ec->engine);
  ec->linker = wasmtime_linker_new(ec->engine);
  if (!ec->wasi_linker || !ec->linker) {
    snprintf(err, errlen, "cannot create the wasmtime linkers: out of memory");
    return -1;
  }
  if ((e = wasmtime_linker_define_wasi(ec->wasi_linker)) || (e = wasmtime_linker_define_wasi(ec->linker))) {
    take_error(e, "define WASI: ", err, errlen);
    return -1;
  }
  wasmtime_linker_allow_shadowing(ec->linker, true);
  if (define_shadows(ec->linker, err, errlen) != 0) return -1;
  wasm_byte_vec_t wasm;
  if ((e = wasmtime_wat2wasm(TRAMPOLINES_WAT, strlen(TRAMPOLINES_WAT), &wasm))) {
    take_error(e, "trampolines: ", err, errlen);
    return -1;
  }
  e = wasmtime_module_new(ec->engine, wasm.data, wasm.size, &ec->trampolines);
  wasm_byte_vec_delete(&wasm);
  if (e) {
    take_error(e, "trampolines: ", err, errlen);
    return -1;
  }
  return 0;
}

static void engine_init(void) {
  struct rlimit files; /* a component run holds 4 fds (its output pipes): allow what the system does */
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  size_pool();
  int pooling = getenv("WASIHOST_NO_POOLING") == NULL && g_pool.slots > 0;
  if (!pooling && g_pool.slots) snprintf(g_pool.text, sizeof g_pool.text, "off (WASIHOST_NO_POOLING)");
  if (engine_ctx_init(&g_main, pooling, g_init_error, sizeof g_init_error) != 0) return;
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  if (pthread_create(&t, &attr, ticker_main, NULL) != 0)
    snprintf(g_init_error, sizeof g_init_error, "cannot start the epoch ticker thread");
  pthread_attr_destroy(&attr);
}

static void unpooled_init(void) {
  if (engine_ctx_init(&g_unpooled, 0, g_unpooled_error, sizeof g_unpooled_error) == 0)
    atomic_store(&g_unpooled_engine, g_unpooled.engine);
}

/* The engine without the pool, or NULL (with the reason in err). */
static engine_ctx_t *unpooled_engine(char *err, size_t errlen) {
  pthread_once(&g_unpooled_once, unpooled_init);
  if (g_unpooled_error[0]) {
    set_msg(err, errlen, "", (const uint8_t *)g_unpooled_error, strlen(g_unpooled_error));
    return NULL;
  }
  return &g_unpooled;
}

int wh_init(char *err, size_t errlen) {
  pthread_once(&g_once, engine_init);
  if (g_init_error[0]) {
    set_msg(err, errlen, "", (const uint8_t *)g_init_error, strlen(g_init_error));
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- modules */

struct wh_module {
  wasmtime_module_t *module;
  wasmtime_instance_pre_t *pre;
  engine_ctx_t *ec; /* the engine it was compiled for */
  /* the same code on the engine without the pool, made when a run finds the pool full */
  pthread_mutex_t twin_lock;
  wasmtime_module_t *twin;
  wasmtime_instance_pre_t *twin_pre;
  /* a WASI 0.2 component instead (then module/pre are NULL): see "components" below */
  wasmtime_component_t *component, *component_twin; /* the twin: on the engine without the pool */
  wasmtime_component_export_index_t *run_iface, *run_func, *twin_run_iface, *twin_run_func;
};

static int exec_component(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res);
static void component_free(wh_module *m);

static int has_start(const wasmtime_module_t *m) {
  wasm_exporttype_vec_t exports;
  wasmtime_module_exports(m, &exports);
  int found = 0;
  for (size_t i = 0; i < exports.size && !found; i++) {
    const wasm_name_t *name = wasm_exporttype_name(exports.data[i]);
    found = name->size == 6 && memcmp(name->data, "_start", 6) == 0 &&
            wasm_externtype_kind(wasm_exporttype_type(exports.data[i])) == WH_WASM_EXTERN_FUNC;
  }
  wasm_exporttype_vec_delete(&exports);
  return found;
}

/* Writes `bytes` next to `path` and renames it into place (never a half file). */
static void write_file_atomic(const char *path, const wasm_byte_vec_t *bytes) {
  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%lx", path, (long)getpid(), (unsigned long)pthread_self());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644); /* never through a link */
  if (fd >= 0) {
    size_t off = 0;
    while (off < bytes->size) {
      ssize_t n = write(fd, bytes->data + off, bytes->size - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      off += (size_t)n;
    }
    int ok = off == bytes->size && fsync(fd) == 0;
    close(fd);
    if (!ok || rename(tmp, path) != 0) unlink(tmp);
  }
}

/* Writes the serialized module to the cache at `path`. */
static void write_cache(wasmtime_module_t *m, const char *path) {
  wasm_byte_vec_t bytes;
  wasmtime_error_t *e = wasmtime_module_serialize(m, &bytes);
  if (e) {
    wasmtime_error_delete(e);
    return;
  }
  write_file_atomic(path, &bytes);
  wasm_byte_vec_delete(&bytes);
}

/* A cache entry opened without following a link planted at its name, as a path wasmtime can open
 * (/proc/self/fd/N in `proc`): its fd (close it after use), or -1 when there is no usable entry. */
static int open_cache_entry(const char *path, char proc[32]) {
  if (!path || !path[0]) return -1;
  int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  struct stat st;
  if (fd >= 0 && (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))) {
    close(fd);
    fd = -1;
  }
  if (fd >= 0) snprintf(proc, 32, "/proc/self/fd/%d", fd);
  return fd;
}

/* The module compiled for `ec`: from the cache at `path` when it is there and usable, else from
 * the bytes (then cached). NULL with *e set, or with *e NULL when the bytes were needed. */
static wasmtime_module_t *compile_for(engine_ctx_t *ec, const uint8_t *wasm, size_t len, const char *path,
                                      int *from_cache, wasmtime_error_t **e) {
  wasmtime_module_t *m = NULL;
  *e = NULL;
  char proc[32];
  int fd = open_cache_entry(path, proc);
  if (fd >= 0) {
    wasmtime_error_t *de = wasmtime_module_deserialize_file(ec->engine, proc, &m);
    close(fd);
    if (!de) {
      *from_cache = 1;
      return m;
    }
    wasmtime_error_delete(de); /* stale or corrupt cache entry: compile again and overwrite it */
    m = NULL;
  }
  if (!wasm) return NULL;
  if ((*e = wasmtime_module_new(ec->engine, wasm, len, &m))) return NULL;
  if (path && path[0]) write_cache(m, path);
  return m;
}

static int error_mentions(wasmtime_error_t *e, const char *a, const char *b) {
  wasm_name_t msg;
  wasmtime_error_message(e, &msg);
  int found = memmem(msg.data, msg.size, a, strlen(a)) && (!b || memmem(msg.data, msg.size, b, strlen(b)));
  wasm_byte_vec_delete(&msg);
  return found;
}

/* Whether wasmtime refused the module for the pooling allocator's limits only. */
static int pool_refused(wasmtime_error_t *e) { return error_mentions(e, "pooling allocator", NULL); }

/* Whether an instantiation failed only because every slot of the pool is taken. */
static int pool_full(wasmtime_error_t *e) { return error_mentions(e, "concurrent", "limit"); }

int wh_module_load(const uint8_t *wasm, size_t len, const char *cache_path, wh_module **out,
                   int *from_cache, char *err, size_t errlen) {
  *out = NULL;
  *from_cache = 0;
  if (wh_init(err, errlen) != 0) return WH_ERR_LOAD;
  char unpooled_path[4200] = "";
  if (cache_path && cache_path[0]) snprintf(unpooled_path, sizeof unpooled_path, "%s.unpooled", cache_path);
  engine_ctx_t *ec = NULL;
  wasmtime_module_t *m = NULL;
  wasmtime_error_t *e = NULL;
  /* a module that did not fit the pool before goes straight to the engine without it */
  if (g_main.pooling && unpooled_path[0] && faccessat(AT_FDCWD, unpooled_path, R_OK, AT_SYMLINK_NOFOLLOW) == 0 && (ec = unpooled_engine(err, errlen)))
    m = compile_for(ec, wasm, len, unpooled_path, from_cache, &e);
  if (!m && !e) {
    ec = &g_main;
    m = compile_for(ec, wasm, len, cache_path, from_cache, &e);
  }
  if (!m && e && ec == &g_main && g_main.pooling && pool_refused(e)) {
    wasmtime_error_delete(e);
    e = NULL;
    if (!(ec = unpooled_engine(err, errlen))) return WH_ERR_LOAD;
    m = compile_for(ec, wasm, len, unpooled_path, from_cache, &e);
  }
  if (!m) {
    if (!e) {
      set_msg(err, errlen, "", (const uint8_t *)"module bytes needed", 19);
      return WH_ERR_NEED_BYTES;
    }
    take_error(e, "invalid module: ", err, errlen);
    return WH_ERR_LOAD;
  }
  if (!has_start(m)) {
    wasmtime_module_delete(m);
    set_msg(err, errlen, "", (const uint8_t *)"module does not export a `_start` function", 42);
    return WH_ERR_LOAD;
  }
  wasmtime_instance_pre_t *pre = NULL;
  if ((e = wasmtime_linker_instantiate_pre(ec->linker, m, &pre))) {
    wasmtime_module_delete(m);
    take_error(e, "cannot link module: ", err, errlen);
    return WH_ERR_LOAD;
  }
  wh_module *wm = calloc(1, sizeof *wm);
  if (!wm) {
    wasmtime_instance_pre_delete(pre);
    wasmtime_module_delete(m);
    set_msg(err, errlen, "", (const uint8_t *)"out of memory", 13);
    return WH_ERR_LOAD;
  }
  wm->module = m;
  wm->pre = pre;
  wm->ec = ec;
  pthread_mutex_init(&wm->twin_lock, NULL);
  *out = wm;
  return 0;
}

void wh_module_free(wh_module *m) {
  if (!m) return;
  if (m->component) return component_free(m);
  if (m->twin_pre) wasmtime_instance_pre_delete(m->twin_pre);
  if (m->twin) wasmtime_module_delete(m->twin);
  pthread_mutex_destroy(&m->twin_lock);
  wasmtime_instance_pre_delete(m->pre);
  wasmtime_module_delete(m->module);
  free(m);
}

/* The module's twin on the engine without the pool (its compiled code, moved over), or NULL
 * with the reason in err. */
static wasmtime_instance_pre_t *unpooled_twin(wh_module *m, char *err, size_t errlen) {
  pthread_mutex_lock(&m->twin_lock);
  engine_ctx_t *ec = m->twin_pre ? NULL : unpooled_engine(err, errlen);
  if (ec) {
    wasm_byte_vec_t code;
    wasmtime_module_t *twin = NULL;
    wasmtime_error_t *e = wasmtime_module_serialize(m->module, &code);
    if (!e) {
      e = wasmtime_module_deserialize(ec->engine, code.data, code.size, &twin);
      wasm_byte_vec_delete(&code);
    }
    if (!e && (e = wasmtime_linker_instantiate_pre(ec->linker, twin, &m->twin_pre))) wasmtime_module_delete(twin);
    if (e)
      take_error(e, "the instance pool is full, and the engine without it failed: ", err, errlen);
    else
      m->twin = twin;
  }
  pthread_mutex_unlock(&m->twin_lock);
  return m->twin_pre;
}

/* ---------------------------------------------------------------- output streams */

enum { ORIG_FD_WRITE, ORIG_FD_CLOSE, ORIG_FD_RENUMBER, ORIG_POLL_ONEOFF, ORIG_COUNT };
static const char *const ORIG_NAMES[ORIG_COUNT] = {"fd_write", "fd_close", "fd_renumber", "poll_oneoff"};

/* Where a run's output goes: one buffer per distinct fd (stdout and stderr sharing a log file
 * share a sink, so their records stay in order). Output is written when the buffer fills, at
 * each epoch tick (every TICK_NS of guest execution), before a call that may block, and at the
 * end of the run: a chatty module costs a few write(2)s, and a log is never more than a tick
 * behind the module. */
typedef struct {
  int fd; /* -1 discards */
  char *buf;
  size_t len, cap;
  /* rotation (see wh_run_config): the file's directory and name in it, its size, the limits;
   * max_size 0 for none */
  int dir;
  const char *name;
  int64_t size, max_size;
  int max_files;
} sink_t;

#define SINK_FLUSH_AT (64 * 1024)

/* A run's two outputs: the fds written to and, for one given by path, its directory's fd and its
 * name in it (see wh_run_config.log_dir_fd); what wh_run_exec opened itself is closed at the end. */
typedef struct {
  int fd[2], opened[2], dir[2], own_dir[2];
  const char *name[2];
} outputs_t;
#define NO_OUTPUTS ((outputs_t){{-1, -1}, {-1, -1}, {-1, -1}, {-1, -1}, {NULL, NULL}})

/* Outside the range of a guest fd (a u32): fd_write(-1) after close(1) must not find the stream. */
#define FD_CLOSED INT64_MIN

typedef struct {
  sink_t *sink;
  int64_t guest_fd; /* the guest's fd for this stream: 1/2, moved by fd_renumber, FD_CLOSED once closed */
  const char *name; /* "stdout" / "stderr" */
  size_t name_len;
  char *line;       /* CRI: the current line not yet ended by '\n' */
  size_t line_len;
  int64_t *clock;   /* the run's last timestamp: both streams may share a file, never go back */
} stream_t;

struct wh_run {
  atomic_int killed;
  pthread_mutex_t wake_lock; /* kill() wakes a guest sleeping in poll_oneoff through wake */
  pthread_cond_t wake;
  /* the rest is only touched by the thread running the module */
  int timed_out;
  struct timespec deadline;
  int has_deadline;
  int cri;
  sink_t sinks[2];
  stream_t streams[2];
  int64_t clock;
  wasmtime_func_t orig[ORIG_COUNT];
  int have_orig;
  engine_ctx_t *ec;   /* the engine of the module being run */
  int64_t wasi_start; /* CLOCK_MONOTONIC ns just after the WASI context was made: its clock's zero */
  wasmtime_memory_t memory; /* the instance's exported "memory", when has_memory */
  int has_memory;
  /* Live usage (wh_run_usage), written by the run's thread, read by any: under usage_lock. */
  pthread_mutex_t usage_lock;
  int live;            /* the run's thread is inside wh_run_exec: cpu_clock is valid */
  clockid_t cpu_clock; /* that thread's CPU clock */
  int64_t cpu0, cpu_ns; /* its reading when the run began; the run's total once it ended */
  uint8_t *mem_base;   /* the guest's linear memory as last published (NULL: none, or ended) */
  size_t mem_size;
  uint64_t host_bytes, peak; /* our own buffers for the run; the largest memory + buffers seen */
  int pipes[2][2]; /* a component's stdout/stderr pipes, or -1 (see pipes_open) */
  int piped;        /* its output goes through pipes: the sinks are only touched under g_pipes.lock */
  int pipes_polled; /* in the ticker's epoll set */
  struct wh_run *pipes_next;
  /* a WH_HTTP_HOSTS run: the allowed hosts, its filter instance's exports */
  struct {
    const char *const *hosts;
    size_t nhosts;
    wasmtime_component_func_t authority, handle;
  } http;
};

wh_run *wh_run_new(void) {
  wh_run *r = calloc(1, sizeof(wh_run));
  pthread_condattr_t attr;
  if (!r) return NULL;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&r->wake, &attr);
  pthread_condattr_destroy(&attr);
  pthread_mutex_init(&r->wake_lock, NULL);
  pthread_mutex_init(&r->usage_lock, NULL);
  return r;
}
void wh_run_free(wh_run *r) {
  pthread_cond_destroy(&r->wake);
  pthread_mutex_destroy(&r->wake_lock);
  pthread_mutex_destroy(&r->usage_lock);
  free(r);
}
void wh_kill(wh_run *r) {
  pthread_mutex_lock(&r->wake_lock);
  atomic_store(&r->killed, 1);
  pthread_cond_broadcast(&r->wake);
  pthread_mutex_unlock(&r->wake_lock);
}

/* The number of bytes written. */
static size_t write_all(int fd, const char *p, size_t n) {
  size_t done = 0;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break; /* a full disk or a closed reader must not kill the module */
    p += w;
    n -= (size_t)w;
    done += (size_t)w;
  }
  return done;
}

static void sink_rotate(sink_t *k);

/* Counts bytes that reached a rotated file, and rotates it once it is full: the sink's buffer
 * only ever holds whole records, so a record never straddles two files. */
static void sink_wrote(sink_t *k, size_t n) {
  if (!k->max_size) return;
  k->size += (int64_t)n;
  if (k->size >= k->max_size) sink_rotate(k);
}

static void sink_flush(sink_t *k) {
  if (k->len && k->fd >= 0) sink_wrote(k, write_all(k->fd, k->buf, k->len));
  k->len = 0;
}

/* After appending to the buffer: a file to rotate is flushed as soon as it would be full. */
static void sink_check(sink_t *k) {
  if (k->max_size && k->size + (int64_t)k->len >= k->max_size) sink_flush(k);
}

static void flush_all(wh_run *r) {
  sink_flush(&r->sinks[0]);
  sink_flush(&r->sinks[1]);
}

/* Log rotation as the kubelet's container log manager does it (pkg/kubelet/logs): of the rotated
 * files, those beyond max_files - 2 are removed oldest first and the rest gzip-compressed to
 * "<name>.gz"; then the live file becomes "<path>.<YYYYMMDD-HHMMSS>" (UTC), the newest rotation left
 * uncompressed. A second rotation within one second takes the next second's name, so names stay
 * unique and sort by age. minikrust.py's _rotate_log does the same for the fallback host. */
#define STAMP_LEN 15

/* The length of the stamp `s` starts with when it is a rotated name's suffix ("<stamp>" or
 * "<stamp>.gz"; with `tmp`, "<stamp>.tmp", a compression cut short), else 0. */
static size_t stamp_len(const char *s, int tmp) {
  static const char shape[] = "dddddddd-dddddd";
  for (int i = 0; i < STAMP_LEN; i++)
    if (shape[i] == 'd' ? s[i] < '0' || s[i] > '9' : s[i] != shape[i]) return 0;
  return strcmp(s + STAMP_LEN, tmp ? ".tmp" : "") == 0 || (!tmp && strcmp(s + STAMP_LEN, ".gz") == 0)
             ? STAMP_LEN : 0;
}

static int64_t stamp_secs(const char *s) {
  struct tm tm = {0};
  if (sscanf(s, "%4d%2d%2d-%2d%2d%2d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
             &tm.tm_sec) != 6)
    return 0;
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return (int64_t)timegm(&tm);
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The suffixes of `base`'s rotated files in the directory `dir` ("<stamp>" or "<stamp>.gz"), oldest
 * first (a malloc'd array, *n of them); left-over "<stamp>.tmp" files are removed on the way. */
static char **rotated_names(int dir, const char *base, size_t *n) {
  *n = 0;
  int dup_fd = dup(dir);
  DIR *d = dup_fd >= 0 ? fdopendir(dup_fd) : NULL;
  if (!d) {
    if (dup_fd >= 0) close(dup_fd);
    return NULL;
  }
  rewinddir(d); /* the dup shares its offset with `dir`, which the last listing left at the end */
  size_t cap = 0, blen = strlen(base);
  char **out = NULL;
  struct dirent *e;
  while ((e = readdir(d))) {
    const char *name = e->d_name;
    if (strncmp(name, base, blen) != 0 || name[blen] != '.') continue;
    if (stamp_len(name + blen + 1, 1)) unlinkat(dir, name, 0);
    if (!stamp_len(name + blen + 1, 0)) continue;
    if (*n == cap) {
      char **grown = realloc(out, (cap = cap ? 2 * cap : 8) * sizeof *out);
      if (!grown) break;
      out = grown;
    }
    if (!(out[*n] = strdup(name + blen + 1))) break;
    (*n)++;
  }
  closedir(d);
  if (*n) qsort(out, *n, sizeof *out, by_name);
  return out;
}

/* zlib's gzip file functions, from the system's libz.so.1 loaded at first use rather than linked:
 * the wheel then needs nothing beyond glibc (manylinux2014 does not list libz, and a cross-built
 * wheel has no target libz to link). Without libz, rotated logs stay uncompressed. */
static struct {
  pthread_once_t once;
  void *(*dopen)(int fd, const char *mode);
  int (*write)(void *file, const void *buf, unsigned len);
  int (*close)(void *file); /* Z_OK is 0 */
} g_zlib = {PTHREAD_ONCE_INIT, NULL, NULL, NULL};

static void zlib_load(void) {
  void *z = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!z) return;
  *(void **)&g_zlib.write = dlsym(z, "gzwrite");
  *(void **)&g_zlib.close = dlsym(z, "gzclose");
  if (g_zlib.write && g_zlib.close) *(void **)&g_zlib.dopen = dlsym(z, "gzdopen");
}

/* gzip `src` in `dir` to "<src>.gz" (by way of "<src>.tmp"), then remove `src`; 0 when done. */
static int gzip_log(int dir, const char *src) {
  pthread_once(&g_zlib.once, zlib_load);
  if (!g_zlib.dopen) return -1;
  char tmp[4300], gz[4300];
  snprintf(tmp, sizeof tmp, "%s.tmp", src);
  snprintf(gz, sizeof gz, "%s.gz", src);
  int in = openat(dir, src, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (in < 0) return -1;
  int out_fd = openat(dir, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  void *out = out_fd >= 0 ? g_zlib.dopen(out_fd, "wb6") : NULL; /* gzclose closes out_fd */
  if (out_fd >= 0 && !out) close(out_fd);
  int ok = out != NULL;
  char buf[65536];
  ssize_t got;
  while (ok && (got = read(in, buf, sizeof buf)) != 0) {
    if (got < 0 && errno == EINTR) continue;
    ok = got > 0 && g_zlib.write(out, buf, (unsigned)got) == (int)got;
  }
  close(in);
  if (out && g_zlib.close(out) != 0) ok = 0;
  if (ok && renameat(dir, tmp, dir, gz) == 0) return unlinkat(dir, src, 0);
  unlinkat(dir, tmp, 0);
  return -1;
}

static void sink_rotate(sink_t *k) {
  k->size = 0; /* also when it fails: tried again after another max_size bytes */
  char target[4200], stamp[40];
  size_t n, keep = k->max_files > 2 ? (size_t)(k->max_files - 2) : 0;
  char **old = rotated_names(k->dir, k->name, &n);
  int64_t newest = n ? stamp_secs(old[n - 1]) : 0;
  for (size_t i = 0; i < n; i++) {
    /* a file both compressed and not (a compression cut short) is the .gz one, which sorts next */
    int duplicate = i + 1 < n && strncmp(old[i], old[i + 1], STAMP_LEN) == 0;
    if (snprintf(target, sizeof target, "%s.%s", k->name, old[i]) < (int)sizeof target) {
      if (duplicate || i + keep < n) unlinkat(k->dir, target, 0);
      else if (!strstr(old[i], ".gz")) gzip_log(k->dir, target);
    }
    free(old[i]);
  }
  free(old);
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  time_t secs = (time_t)(now.tv_sec > newest ? now.tv_sec : newest + 1);
  struct tm tm;
  gmtime_r(&secs, &tm);
  strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
  snprintf(target, sizeof target, "%s.%s", k->name, stamp);
  int renamed = renameat(k->dir, k->name, k->dir, target) == 0;
  if (renamed || errno == ENOENT) { /* reopen the name; the fd keeps its number (others hold it) */
    int fd = openat(k->dir, k->name, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd >= 0 && fd != k->fd) {
      if (dup2(fd, k->fd) >= 0) fcntl(k->fd, F_SETFD, FD_CLOEXEC);
      close(fd);
    }
  }
  if (renamed && k->max_files == 1) unlinkat(k->dir, target, 0); /* max_files 1: the live file alone */
}

/* Room for `need` more bytes at the end of the buffer, or NULL (then the bytes are dropped). */
static char *sink_reserve(sink_t *k, size_t need) {
  if (k->len + need > SINK_FLUSH_AT) sink_flush(k);
  if (k->len + need > k->cap) {
    size_t cap = k->len + need > SINK_FLUSH_AT ? k->len + need : SINK_FLUSH_AT;
    char *nb = realloc(k->buf, cap);
    if (!nb) return NULL;
    k->buf = nb;
    k->cap = cap;
  }
  return k->buf + k->len;
}

/* "2026-11-25T23:59:59.123456789Z" (30 chars) */
static size_t rfc3339nano(char *buf, int64_t *clock) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  if (ns < *clock) {
    ns = *clock;
    ts.tv_sec = (time_t)(ns / 1000000000);
    ts.tv_nsec = (long)(ns % 1000000000);
  }
  *clock = ns;
  gmtime_r(&ts.tv_sec, &tm);
  size_t n = strftime(buf, 32, "%Y-%m-%dT%H:%M:%S", &tm);
  n += (size_t)snprintf(buf + n, 32 - n, ".%09ldZ", (long)ts.tv_nsec);
  return n;
}

/* One CRI record: "<ts> <stream> <tag> <a><b>\n". */
static void cri_record(stream_t *s, const char *ts, size_t ts_len, char tag, const char *a, size_t alen,
                       const char *b, size_t blen) {
  char *p = sink_reserve(s->sink, ts_len + s->name_len + 5 + alen + blen);
  if (!p) return;
  char *start = p;
  memcpy(p, ts, ts_len);
  p += ts_len;
  *p++ = ' ';
  memcpy(p, s->name, s->name_len);
  p += s->name_len;
  *p++ = ' ';
  *p++ = tag;
  *p++ = ' ';
  if (alen) memcpy(p, a, alen);
  p += alen;
  if (blen) memcpy(p, b, blen);
  p += blen;
  *p++ = '\n';
  s->sink->len += (size_t)(p - start);
  sink_check(s->sink);
}

static void cri_write(stream_t *s, const char *data, size_t len) {
  char ts[40];
  size_t ts_len = rfc3339nano(ts, s->clock); /* one timestamp for the lines of one write */
  while (len > 0) {
    const char *nl = memchr(data, '\n', len);
    size_t chunk = nl ? (size_t)(nl - data) : len; /* bytes before the newline */
    if (nl && s->line_len + chunk <= CRI_MAX_LINE) { /* a complete line */
      cri_record(s, ts, ts_len, 'F', s->line, s->line_len, data, chunk);
      s->line_len = 0;
      data += chunk + 1;
      len -= chunk + 1;
    } else if (s->line_len + chunk >= CRI_MAX_LINE) { /* an overlong line: cut it */
      size_t take = CRI_MAX_LINE - s->line_len;
      cri_record(s, ts, ts_len, 'P', s->line, s->line_len, data, take);
      s->line_len = 0;
      data += take;
      len -= take;
    } else { /* no newline yet: keep the fragment for the next write */
      if (!s->line) s->line = malloc(CRI_MAX_LINE);
      if (!s->line) return;
      memcpy(s->line + s->line_len, data, chunk);
      s->line_len += chunk;
      data += chunk;
      len -= chunk;
    }
  }
}

static void stream_emit(wh_run *r, stream_t *s, const char *data, size_t len) {
  if (s->sink->fd < 0 || len == 0) return;
  if (r->cri) {
    cri_write(s, data, len);
  } else if (len >= SINK_FLUSH_AT) {
    sink_flush(s->sink);
    sink_wrote(s->sink, write_all(s->sink->fd, data, len));
  } else {
    char *p = sink_reserve(s->sink, len);
    if (!p) return;
    memcpy(p, data, len);
    s->sink->len += len;
    sink_check(s->sink);
  }
}

/* End of run: a trailing fragment without its newline becomes a P record. */
static void stream_finish(stream_t *s) {
  if (s->line_len && s->sink->fd >= 0) {
    char ts[40];
    size_t ts_len = rfc3339nano(ts, s->clock);
    cri_record(s, ts, ts_len, 'P', s->line, s->line_len, NULL, 0);
  }
  free(s->line);
  s->line = NULL;
  s->line_len = 0;
}

/* A sink for output `i`, rotating its file (when given by path, with a size limit) as the config says. */
static sink_t sink_for(const outputs_t *o, int i, const wh_run_config *c) {
  int fd = o->fd[i];
  sink_t k = {fd, NULL, 0, 0, -1, NULL, 0, 0, 0};
  struct stat st;
  if (fd >= 0 && o->name[i] && c->log_max_size > 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    k.dir = o->dir[i];
    k.name = o->name[i];
    k.size = st.st_size;
    k.max_size = c->log_max_size;
    k.max_files = c->log_max_files > 0 ? c->log_max_files : 1;
  }
  return k;
}

static void streams_begin(wh_run *r, const wh_run_config *c, const outputs_t *o) {
  int shared = o->fd[1] >= 0 && o->fd[1] == o->fd[0];
  r->clock = 0;
  r->sinks[0] = sink_for(o, 0, c);
  r->sinks[1] = shared ? (sink_t){-1, NULL, 0, 0, -1, NULL, 0, 0, 0} : sink_for(o, 1, c);
  r->sinks[1].fd = o->fd[1]; /* shared: both streams use sinks[0] */
  sink_t *err_sink = shared ? &r->sinks[0] : &r->sinks[1];
  r->streams[0] = (stream_t){&r->sinks[0], 1, "stdout", 6, NULL, 0, &r->clock};
  r->streams[1] = (stream_t){err_sink, 2, "stderr", 6, NULL, 0, &r->clock};
}

static void streams_end(wh_run *r) {
  stream_finish(&r->streams[0]);
  stream_finish(&r->streams[1]);
  for (int i = 0; i < 2; i++) {
    sink_flush(&r->sinks[i]);
    free(r->sinks[i].buf);
    r->sinks[i].buf = NULL;
    r->sinks[i].cap = 0;
  }
}

/* ---------------------------------------------------------------- live usage */

/* What `kubectl top` needs while a module runs, readable from any thread at any time, at a cost
 * to the run of a lock/unlock when it starts, when it ends, and at each publish (instantiation,
 * every epoch tick of guest execution, and before a sleep in poll_oneoff): CPU from the run
 * thread's own clock, memory as the resident pages of the guest's linear memory (mincore: pages it
 * touched, not the pool's reservation nor grown-but-untouched pages) plus our own buffers. */

static uint64_t host_bytes(const wh_run *r) {
  uint64_t n = sizeof *r;
  for (int i = 0; i < 2; i++) n += r->sinks[i].cap + (r->streams[i].line ? CRI_MAX_LINE : 0);
  return n;
}

/* Called by the run's thread with the guest's memory as it is now (NULL, 0 when it goes away). */
static void publish_memory(wh_run *r, uint8_t *base, size_t size) {
  uint64_t own = host_bytes(r);
  pthread_mutex_lock(&r->usage_lock);
  r->mem_base = base;
  r->mem_size = size;
  r->host_bytes = own;
  if (size + own > r->peak) r->peak = size + own;
  pthread_mutex_unlock(&r->usage_lock);
}

static void publish_store_memory(wh_run *r, wasmtime_context_t *ctx) {
  if (r->has_memory) publish_memory(r, wasmtime_memory_data(ctx, &r->memory), wasmtime_memory_data_size(ctx, &r->memory));
}

/* Bytes of [base, base + size) resident in RAM. */
static uint64_t resident_bytes(const uint8_t *base, size_t size) {
  static long page;
  if (!page) page = sysconf(_SC_PAGESIZE);
  unsigned char vec[4096];
  uint64_t pages = 0;
  uintptr_t start = (uintptr_t)base & ~(uintptr_t)(page - 1), end = (uintptr_t)base + size;
  for (uintptr_t at = start; at < end;) {
    size_t len = end - at > sizeof vec * (size_t)page ? sizeof vec * (size_t)page : end - at;
    if (mincore((void *)at, len, vec) == 0)
      for (size_t i = 0; i < (len + page - 1) / page; i++) pages += vec[i] & 1;
    at += len;
  }
  return pages * (uint64_t)page;
}

void wh_run_usage(wh_run *r, wh_usage *u) {
  pthread_mutex_lock(&r->usage_lock);
  u->running = r->live;
  int64_t cpu = r->cpu_ns;
  if (r->live) {
    struct timespec ts;
    cpu = clock_gettime(r->cpu_clock, &ts) == 0 ? (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - r->cpu0 : 0;
  }
  u->cpu_seconds = (double)cpu / 1e9;
  u->memory = r->live && r->mem_base ? resident_bytes(r->mem_base, r->mem_size) + r->host_bytes : 0;
  u->peak_memory = r->peak;
  pthread_mutex_unlock(&r->usage_lock);
}

/* The run's thread, when the run begins (cpu0: its CPU clock now) and ends. */
static void usage_begin(wh_run *r, const struct timespec *cpu0) {
  clockid_t clock;
  int ok = pthread_getcpuclockid(pthread_self(), &clock) == 0;
  pthread_mutex_lock(&r->usage_lock);
  r->live = ok;
  r->cpu_clock = clock;
  r->cpu0 = (int64_t)cpu0->tv_sec * 1000000000 + cpu0->tv_nsec;
  r->cpu_ns = 0;
  r->mem_base = NULL;
  r->mem_size = 0;
  r->peak = 0;
  pthread_mutex_unlock(&r->usage_lock);
}

static void usage_end(wh_run *r, double cpu_seconds) {
  pthread_mutex_lock(&r->usage_lock);
  r->live = 0;
  r->cpu_ns = (int64_t)(cpu_seconds * 1e9);
  r->mem_base = NULL;
  pthread_mutex_unlock(&r->usage_lock);
}

/* ---------------------------------------------------------------- shadowed WASI calls */

/* The originals of this run's store, straight from the WASI-only linker. */
static wasmtime_error_t *get_originals(engine_ctx_t *ec, wasmtime_context_t *ctx, wasmtime_extern_t out[ORIG_COUNT]) {
  for (int i = 0; i < ORIG_COUNT; i++) {
    const char *name = ORIG_NAMES[i];
    if (!wasmtime_linker_get(ec->wasi_linker, ctx, WASI_MODULE, strlen(WASI_MODULE), name, strlen(name), &out[i]) ||
        out[i].kind != WH_WASMTIME_EXTERN_FUNC)
      return wasmtime_error_new("wasihost: wasmtime's WASI function is missing");
  }
  return NULL;
}

/* Makes r->orig[] callable: trampolines bound to the guest's memory, or (no memory export to
 * bind) the bare originals, which then fail exactly as wasmtime's WASI does for such a module. */
static wasmtime_error_t *bind_originals(wasmtime_caller_t *caller, wh_run *r) {
  wasmtime_context_t *ctx = wasmtime_caller_context(caller);
  wasmtime_extern_t imports[1 + ORIG_COUNT];
  wasmtime_error_t *e = get_originals(r->ec, ctx, imports + 1);
  if (e) return e;
  int bound = 0;
  if (wasmtime_caller_export_get(caller, "memory", 6, &imports[0])) {
    if (imports[0].kind != WH_WASMTIME_EXTERN_MEMORY) {
      wasmtime_extern_delete(&imports[0]); /* e.g. a shared memory: the originals will refuse it */
    } else {
      wasmtime_instance_t inst;
      wasm_trap_t *trap = NULL;
      e = wasmtime_instance_new(ctx, r->ec->trampolines, imports, 1 + ORIG_COUNT, &inst, &trap);
      if (trap) wasm_trap_delete(trap);
      if (e) wasmtime_error_delete(e);
      if (!e && !trap) {
        bound = 1;
        for (int i = 0; i < ORIG_COUNT; i++) {
          wasmtime_extern_t ext;
          const char *name = ORIG_NAMES[i];
          if (!wasmtime_instance_export_get(ctx, &inst, name, strlen(name), &ext)) {
            bound = 0;
            break;
          }
          r->orig[i] = ext.of.func;
        }
      }
    }
  }
  if (!bound)
    for (int i = 0; i < ORIG_COUNT; i++) r->orig[i] = imports[1 + i].of.func;
  r->have_orig = 1;
  return NULL;
}

static wasmtime_error_t *call_orig(wasmtime_caller_t *caller, int which, wasmtime_val_raw_t *args,
                                   size_t n) {
  wasmtime_context_t *ctx = wasmtime_caller_context(caller);
  wh_run *r = wasmtime_context_get_data(ctx);
  if (!r->have_orig) {
    wasmtime_error_t *e = bind_originals(caller, r);
    if (e) return e;
  }
  flush_all(r); /* wasmtime's call may block (poll_oneoff on fds): the log must not lag behind */
  wasm_trap_t *trap = NULL;
  wasmtime_error_t *e = wasmtime_func_call_unchecked(ctx, &r->orig[which], args, n, &trap);
  if (trap) {
    char msg[1024];
    take_trap(trap, "", msg, sizeof msg);
    return wasmtime_error_new(msg);
  }
  return e;
}

static int get_memory(wasmtime_caller_t *caller, uint8_t **data, size_t *size) {
  wasmtime_extern_t ext;
  if (!wasmtime_caller_export_get(caller, "memory", 6, &ext)) return 0;
  if (ext.kind != WH_WASMTIME_EXTERN_MEMORY) {
    wasmtime_extern_delete(&ext);
    return 0;
  }
  wasmtime_context_t *ctx = wasmtime_caller_context(caller);
  *data = wasmtime_memory_data(ctx, &ext.of.memory);
  *size = wasmtime_memory_data_size(ctx, &ext.of.memory);
  return 1;
}

static inline uint32_t load_u32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v; /* wasm is little-endian, as are the hosts we build for */
}

/* fd_write(fd, iovs, iovs_len, nwritten) -> errno. Mirrors wasmtime's preview1 for stdout/stderr:
 * only the first non-empty iovec is written, and its length is reported. Anything unusual
 * (another fd, an out-of-bounds or misaligned pointer, no memory) goes to wasmtime's own
 * fd_write, which then gives exactly wasmtime's errno or trap. */
static wasmtime_error_t *shadow_fd_write(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                                         size_t n) {
  (void)env;
  wh_run *r = wasmtime_context_get_data(wasmtime_caller_context(caller));
  int32_t fd = args[0].i32;
  stream_t *s = r->streams[0].guest_fd == fd ? &r->streams[0] : r->streams[1].guest_fd == fd ? &r->streams[1] : NULL;
  if (!s) return call_orig(caller, ORIG_FD_WRITE, args, n);
  uint8_t *mem;
  size_t size;
  if (!get_memory(caller, &mem, &size)) return call_orig(caller, ORIG_FD_WRITE, args, n);
  uint64_t iovs = (uint32_t)args[1].i32, count = (uint32_t)args[2].i32, out = (uint32_t)args[3].i32;
  /* wasmtime answers ENOMEM, writing nothing, for 2^24 iovecs or more (measured on 50.0.1) */
  if (count >= ((uint64_t)1 << 24)) return call_orig(caller, ORIG_FD_WRITE, args, n);
  uint64_t buf = 0, len = 0;
  for (uint64_t i = 0; i < count; i++) {
    uint64_t p = iovs + 8 * i;
    if (p % 4 || p + 8 > size) return call_orig(caller, ORIG_FD_WRITE, args, n);
    len = load_u32(mem + p + 4);
    if (len == 0) continue;
    buf = load_u32(mem + p);
    if (buf + len > size) return call_orig(caller, ORIG_FD_WRITE, args, n);
    break;
  }
  stream_emit(r, s, (const char *)mem + buf, (size_t)len);
  /* wasmtime writes, then traps on a bad nwritten pointer: the bytes are logged either way */
  if (out % 4 || out + 4 > size) return call_orig(caller, ORIG_FD_WRITE, args, n);
  uint32_t written = (uint32_t)len;
  memcpy(mem + out, &written, 4);
  args[0].i32 = WASI_ERRNO_SUCCESS;
  return NULL;
}

/* fd_close / fd_renumber: wasmtime does the work (and answers); we follow where the guest's
 * stdout/stderr descriptors went, so that fd_write keeps finding them. */
static wasmtime_error_t *shadow_fd_close(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                                         size_t n) {
  (void)env;
  int32_t fd = args[0].i32;
  wasmtime_error_t *e = call_orig(caller, ORIG_FD_CLOSE, args, n);
  if (!e && args[0].i32 == WASI_ERRNO_SUCCESS) {
    wh_run *r = wasmtime_context_get_data(wasmtime_caller_context(caller));
    for (int i = 0; i < 2; i++)
      if (r->streams[i].guest_fd == fd) r->streams[i].guest_fd = FD_CLOSED;
  }
  return e;
}

static wasmtime_error_t *shadow_fd_renumber(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                                            size_t n) {
  (void)env;
  int32_t from = args[0].i32, to = args[1].i32;
  wasmtime_error_t *e = call_orig(caller, ORIG_FD_RENUMBER, args, n);
  if (!e && args[0].i32 == WASI_ERRNO_SUCCESS && from != to) {
    wh_run *r = wasmtime_context_get_data(wasmtime_caller_context(caller));
    for (int i = 0; i < 2; i++) /* `to` is replaced (closed), then `from` moves there */
      if (r->streams[i].guest_fd == to) r->streams[i].guest_fd = FD_CLOSED;
    for (int i = 0; i < 2; i++)
      if (r->streams[i].guest_fd == from) r->streams[i].guest_fd = to;
  }
  return e;
}

static uint64_t load_u64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

static int64_t now_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleeps `ns` unless kill() (which signals r->wake) or the deadline cut it short: NULL, or why we
 * stopped. One timed wait, not slices: a thousand sleeping guests cost nothing while they sleep. */
static const char *interruptible_sleep(wh_run *r, int64_t ns) {
  flush_all(r);
  int64_t now = now_ns(CLOCK_MONOTONIC), end = now + ns;
  int64_t deadline = r->has_deadline ? (int64_t)r->deadline.tv_sec * 1000000000 + r->deadline.tv_nsec : INT64_MAX;
  const char *why = NULL;
  pthread_mutex_lock(&r->wake_lock);
  for (;;) {
    if (atomic_load(&r->killed)) {
      why = "killed";
      break;
    }
    if (now >= deadline) {
      r->timed_out = 1;
      why = "deadline exceeded";
      break;
    }
    if (now >= end) break;
    int64_t until = end < deadline ? end : deadline;
    struct timespec ts = {(time_t)(until / 1000000000), (long)(until % 1000000000)};
    pthread_cond_timedwait(&r->wake, &r->wake_lock, &ts);
    now = now_ns(CLOCK_MONOTONIC);
  }
  pthread_mutex_unlock(&r->wake_lock);
  return why;
}

/* How long until a clock subscription fires, from `mono`/`real` (CLOCK_MONOTONIC/REALTIME ns). An
 * absolute timeout is on wasmtime's clocks: realtime is the host's, monotonic counts from the
 * WASI context's creation, which is at or before r->wasi_start (so we never wake early). */
static uint64_t clock_remaining(const wh_run *r, const uint8_t *sub, int64_t mono, int64_t real) {
  uint64_t timeout = load_u64(sub + 24);
  uint16_t flags;
  memcpy(&flags, sub + 40, 2);
  if (!(flags & 1)) return timeout;
  int64_t now = load_u32(sub + 16) == 1 ? mono - r->wasi_start : real;
  return now < 0 || timeout > (uint64_t)now ? timeout - (uint64_t)(now < 0 ? 0 : now) : 0;
}

/* poll_oneoff(subs, events, nsubs, nevents) -> errno. A poll of realtime/monotonic clocks only,
 * relative (what sleep() asks) or absolute (clock_nanosleep), all in bounds and aligned, sleeps
 * here, so that kill() and the deadline cut it short; anything else (fds, CPU clocks, bad
 * pointers) is wasmtime's. Events are what wasmtime writes: the ready clocks, in order. */
static wasmtime_error_t *shadow_poll_oneoff(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args,
                                            size_t n) {
  (void)env;
  wh_run *r = wasmtime_context_get_data(wasmtime_caller_context(caller));
  uint8_t *mem;
  size_t size;
  if (!get_memory(caller, &mem, &size)) return call_orig(caller, ORIG_POLL_ONEOFF, args, n);
  uint64_t subs = (uint32_t)args[0].i32, events = (uint32_t)args[1].i32, nsubs = (uint32_t)args[2].i32,
           nevents = (uint32_t)args[3].i32;
  if (nsubs == 0 || nsubs > 4096 || subs % 8 || events % 8 || nevents % 4 || subs + 48 * nsubs > size ||
      events + 32 * nsubs > size || nevents + 4 > size)
    return call_orig(caller, ORIG_POLL_ONEOFF, args, n);
  for (uint64_t i = 0; i < nsubs; i++) {
    const uint8_t *sub = mem + subs + 48 * i;
    if (sub[8] != 0 || load_u32(sub + 16) > 1) /* not a clock, or a CPU clock */
      return call_orig(caller, ORIG_POLL_ONEOFF, args, n);
  }
  int64_t started = now_ns(CLOCK_MONOTONIC), real = now_ns(CLOCK_REALTIME);
  uint64_t shortest = UINT64_MAX;
  for (uint64_t i = 0; i < nsubs; i++) {
    uint64_t left = clock_remaining(r, mem + subs + 48 * i, started, real);
    if (left < shortest) shortest = left;
  }
  int64_t ns = shortest > (uint64_t)INT64_MAX / 2 ? INT64_MAX / 2 : (int64_t)shortest;
  publish_memory(r, mem, size);
  const char *stop = interruptible_sleep(r, ns);
  if (stop) return wasmtime_error_new(stop);
  uint64_t waited = (uint64_t)(now_ns(CLOCK_MONOTONIC) - started);
  if (waited < shortest) waited = shortest;
  uint32_t ready = 0;
  for (uint64_t i = 0; i < nsubs; i++) {
    const uint8_t *sub = mem + subs + 48 * i;
    if (clock_remaining(r, sub, started, real) > waited) continue;
    uint8_t *ev = mem + events + 32 * (uint64_t)ready++;
    memcpy(ev, sub, 8); /* userdata; errno 0, type clock, no fd_readwrite */
    memset(ev + 8, 0, 24);
  }
  memcpy(mem + nevents, &ready, 4);
  args[0].i32 = WASI_ERRNO_SUCCESS;
  return NULL;
}

static int define_i32_func(wasmtime_linker_t *linker, const char *name, size_t nparams,
                           wasmtime_func_unchecked_callback_t cb, char *err, size_t errlen) {
  wasm_valtype_t *params[4], *results[1];
  for (size_t i = 0; i < nparams; i++) params[i] = wasm_valtype_new(WH_WASM_I32);
  results[0] = wasm_valtype_new(WH_WASM_I32);
  wasm_valtype_vec_t pv, rv;
  wasm_valtype_vec_new(&pv, nparams, params);
  wasm_valtype_vec_new(&rv, 1, results);
  wasm_functype_t *ty = wasm_functype_new(&pv, &rv); /* takes ownership of both vectors */
  wasmtime_error_t *e = wasmtime_linker_define_func_unchecked(linker, WASI_MODULE, strlen(WASI_MODULE), name,
                                                              strlen(name), ty, cb, NULL, NULL);
  wasm_functype_delete(ty);
  if (e) {
    take_error(e, "define shadow: ", err, errlen);
    return -1;
  }
  return 0;
}

static int define_shadows(wasmtime_linker_t *linker, char *err, size_t errlen) {
  if (define_i32_func(linker, "fd_write", 4, shadow_fd_write, err, errlen)) return -1;
  if (define_i32_func(linker, "fd_close", 1, shadow_fd_close, err, errlen)) return -1;
  if (define_i32_func(linker, "fd_renumber", 2, shadow_fd_renumber, err, errlen)) return -1;
  if (define_i32_func(linker, "poll_oneoff", 4, shadow_poll_oneoff, err, errlen)) return -1;
  return 0;
}

/* ---------------------------------------------------------------- runs */

static int ts_after(const struct timespec *a, const struct timespec *b) {
  return a->tv_sec > b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec >= b->tv_nsec);
}

static wasmtime_error_t *on_epoch(wasmtime_context_t *ctx, void *data, uint64_t *delta,
                                  wasmtime_update_deadline_kind_t *kind) {
  wh_run *r = data;
  if (!r->piped) flush_all(r); /* a component's sinks are the ticker's (pipes_poll) */
  publish_store_memory(r, ctx);
  if (atomic_load(&r->killed)) return wasmtime_error_new("killed");
  if (r->has_deadline) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (ts_after(&now, &r->deadline)) {
      r->timed_out = 1;
      return wasmtime_error_new("deadline exceeded");
    }
  }
  *delta = 1;
  *kind = WH_WASMTIME_UPDATE_DEADLINE_CONTINUE;
  return NULL;
}

static double since(const struct timespec *t0, clockid_t clock) {
  struct timespec t1;
  clock_gettime(clock, &t1);
  return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static wasi_config_t *make_wasi(const wh_run_config *c, char *err, size_t errlen) {
  /* wasmtime's own stdout/stderr stay its default sinks: every byte written to them comes
   * through our fd_write, and a custom stream would cost ~10 us per run (tokio tasks). */
  wasi_config_t *w = wasi_config_new();
  if (!w) {
    set_msg(err, errlen, "", (const uint8_t *)"out of memory", 13);
    return NULL;
  }
  if (!wasi_config_set_argv(w, c->argc, (const char **)c->argv) ||
      !wasi_config_set_env(w, c->envc, (const char **)c->env_names, (const char **)c->env_values)) {
    wasi_config_delete(w);
    set_msg(err, errlen, "", (const uint8_t *)"argv or env is not valid UTF-8", 30);
    return NULL;
  }
  for (size_t i = 0; i < c->npreopens; i++) {
    if (!wasi_config_preopen_dir(w, c->preopen_host[i], c->preopen_guest[i], !c->preopen_readonly[i])) {
      wasi_config_delete(w);
      char msg[4200];
      snprintf(msg, sizeof msg, "cannot preopen %s as %s", c->preopen_host[i], c->preopen_guest[i]);
      set_msg(err, errlen, "", (const uint8_t *)msg, strlen(msg));
      return NULL;
    }
  }
  if (c->has_stdin) {
    wasm_byte_vec_t v;
    wasm_byte_vec_new(&v, c->stdin_len, c->stdin_data);
    wasi_config_set_stdin_bytes(w, &v); /* takes ownership */
  }
  return w;
}

/* Fills `res` from what _start returned (or instantiation failed with). Consumes e / trap. */
static void classify(wh_run *r, wasmtime_error_t *e, wasm_trap_t *trap, wh_result *res) {
  int status;
  if (e && wasmtime_error_exit_status(e, &status)) {
    res->status = WH_EXITED;
    res->exit_code = status;
    wasmtime_error_delete(e);
    return;
  }
  if (atomic_load(&r->killed) && (e || trap))
    res->status = WH_KILLED;
  else if (r->timed_out && (e || trap))
    res->status = WH_TIMED_OUT;
  else if (e || trap)
    res->status = WH_TRAPPED;
  else {
    res->status = WH_EXITED;
    res->exit_code = 0;
  }
  if (e) take_error(e, "", res->message, sizeof res->message);
  if (trap) take_trap(trap, "", res->message, sizeof res->message);
}

static void close_outputs(const outputs_t *o) {
  for (int i = 0; i < 2; i++) {
    if (o->opened[i] >= 0) close(o->opened[i]);
    if (o->own_dir[i] >= 0) close(o->own_dir[i]);
  }
}

/* The directory and name of output `i`, given by `path`: in c->log_dir_fd, or in its own directory
 * (opened here only for rotation, which renames in it; else the path is the name); 0, or -1 with errno set. */
static int output_dir(const wh_run_config *c, outputs_t *o, int i, const char *path) {
  const char *slash = strrchr(path, '/');
  if (c->log_dir_fd >= 0 || c->log_max_size <= 0) {
    o->dir[i] = c->log_dir_fd >= 0 ? c->log_dir_fd : AT_FDCWD;
    o->name[i] = path;
    errno = EXDEV; /* a name in that directory, not a path through others */
    return slash && c->log_dir_fd >= 0 ? -1 : 0;
  }
  char dir[4096];
  snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash > path ? slash - path : 1) : 1, slash ? path : ".");
  o->dir[i] = o->own_dir[i] = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  o->name[i] = slash ? slash + 1 : path;
  return o->dir[i] >= 0 ? 0 : -1;
}

/* Paths given instead of fds are opened here (append; both streams share one fd for one path),
 * never through a symlink at the name. */
static int open_outputs(const wh_run_config *c, outputs_t *o, char *err, size_t errlen) {
  const char *paths[2] = {c->stdout_path, c->stderr_path};
  *o = (outputs_t){{c->stdout_fd, c->stderr_fd}, {-1, -1}, {-1, -1}, {-1, -1}, {NULL, NULL}};
  int i;
  for (i = 0; i < 2; i++) {
    if (!paths[i]) continue;
    int same = i == 1 && paths[0] && strcmp(paths[0], paths[1]) == 0;
    if (same) {
      o->dir[1] = o->dir[0];
      o->name[1] = o->name[0];
    }
    if (!same && output_dir(c, o, i, paths[i]) != 0) goto fail;
    if (o->fd[i] >= 0) continue;
    if (same && o->opened[0] >= 0) {
      o->fd[1] = o->opened[0];
      continue;
    }
    o->fd[i] = o->opened[i] = openat(o->dir[i], o->name[i], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (o->fd[i] < 0) goto fail;
  }
  return 0;
fail:;
  char msg[4200];
  snprintf(msg, sizeof msg, "cannot open output %s: %s", paths[i], strerror(errno));
  set_msg(err, errlen, "", (const uint8_t *)msg, strlen(msg));
  close_outputs(o);
  return -1;
}

/* A store for one run on r->ec's engine, with the run's memory limit, epoch callback and `wasi`
 * (always consumed); NULL with the reason in res->message. */
static wasmtime_store_t *run_store(wh_run *r, const wh_run_config *c, wasi_config_t *wasi, wh_result *res) {
  wasmtime_store_t *store = wasmtime_store_new(r->ec->engine, r, NULL);
  if (!store) {
    wasi_config_delete(wasi);
    set_msg(res->message, sizeof res->message, "", (const uint8_t *)"out of memory", 13);
    return NULL;
  }
  wasmtime_context_t *ctx = wasmtime_store_context(store);
  if (c->memory_limit >= 0) wasmtime_store_limiter(store, c->memory_limit, -1, -1, -1, -1);
  wasmtime_store_epoch_deadline_callback(store, on_epoch, r, NULL);
  wasmtime_context_set_epoch_deadline(ctx, 1);
  wasmtime_error_t *e = wasmtime_context_set_wasi(ctx, wasi); /* takes ownership */
  if (e) {
    take_error(e, "WASI setup: ", res->message, sizeof res->message);
    wasmtime_store_delete(store);
    return NULL;
  }
  r->wasi_start = now_ns(CLOCK_MONOTONIC);
  return store;
}

#define POOL_FULL (-2)

/* One instance of `pre` (compiled for r->ec) in a new store, and its _start called: 0, WH_ERR_RUN
 * for a setup error, or POOL_FULL when every slot of the pool was taken (then nothing ran). */
static int exec_once(wasmtime_instance_pre_t *pre, const wh_run_config *c, wh_run *r, wh_result *res) {
  wasi_config_t *wasi = make_wasi(c, res->message, sizeof res->message);
  if (!wasi) return WH_ERR_RUN;
  r->have_orig = 0;
  wasmtime_store_t *store = run_store(r, c, wasi, res);
  if (!store) return WH_ERR_RUN;
  wasmtime_context_t *ctx = wasmtime_store_context(store);
  wasmtime_error_t *e;

  wasmtime_instance_t inst;
  wasm_trap_t *trap = NULL;
  e = wasmtime_instance_pre_instantiate(pre, ctx, &inst, &trap);
  if (e && !trap && r->ec->pooling && pool_full(e)) {
    wasmtime_error_delete(e);
    wasmtime_store_delete(store);
    return POOL_FULL;
  }
  if (e || trap) {
    classify(r, e, trap, res);
    res->instantiate_failed = 1;
  } else {
    wasmtime_extern_t mem;
    if (wasmtime_instance_export_get(ctx, &inst, "memory", 6, &mem)) {
      r->has_memory = mem.kind == WH_WASMTIME_EXTERN_MEMORY;
      if (r->has_memory)
        r->memory = mem.of.memory; /* a plain handle (nothing to delete) */
      else
        wasmtime_extern_delete(&mem);
    }
    publish_store_memory(r, ctx);
    wasmtime_extern_t start;
    if (!wasmtime_instance_export_get(ctx, &inst, "_start", 6, &start) || start.kind != WH_WASMTIME_EXTERN_FUNC) {
      res->status = WH_TRAPPED;
      set_msg(res->message, sizeof res->message, "", (const uint8_t *)"no _start function", 18);
    } else {
      wasmtime_val_raw_t none[1];
      e = wasmtime_func_call_unchecked(ctx, &start.of.func, none, 0, &trap);
      classify(r, e, trap, res);
    }
    if (r->has_memory) res->peak_memory = wasmtime_memory_data_size(ctx, &r->memory);
  }
  publish_memory(r, NULL, 0); /* before the memory goes: a reader's mincore must not outlive it */
  r->has_memory = 0;
  wasmtime_store_delete(store);
  return 0;
}

/* wh_run_exec once the outputs are open (`o`, closed here; none when the run was killed). */
static int exec_opened(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res, outputs_t *o) {
  memset(res, 0, sizeof *res);
  res->exit_code = -1;
  struct timespec t0, c0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
  if (atomic_load(&r->killed)) {
    close_outputs(o);
    res->status = WH_KILLED;
    return 0;
  }
  wh_run_config cfg = *c;
  cfg.stdout_fd = o->fd[0];
  cfg.stderr_fd = o->fd[1];
  c = &cfg;

  r->timed_out = 0;
  r->cri = c->log_format == WH_LOG_CRI;
  /* Python clamps it too; here a NaN, negative or beyond-any-run deadline (which would overflow
   * the nanosecond arithmetic below into an immediate timeout) also means no deadline. */
  r->has_deadline = c->deadline > 0 && c->deadline <= WH_DEADLINE_MAX;
  if (r->has_deadline) {
    r->deadline = t0;
    double whole = (double)(long)c->deadline;
    r->deadline.tv_sec += (time_t)whole;
    r->deadline.tv_nsec += (long)((c->deadline - whole) * 1e9);
    if (r->deadline.tv_nsec >= 1000000000L) {
      r->deadline.tv_sec++;
      r->deadline.tv_nsec -= 1000000000L;
    }
  }
  streams_begin(r, c, o);
  usage_begin(r, &c0);
  runs_add(1);
  r->ec = m->ec;
  int rc = m->component ? exec_component(m, c, r, res) : exec_once(m->pre, c, r, res);
  if (rc == POOL_FULL) { /* wasmtime alone has no such limit: run on the engine without the pool */
    wasmtime_instance_pre_t *twin = unpooled_twin(m, res->message, sizeof res->message);
    r->ec = &g_unpooled;
    rc = twin ? exec_once(twin, c, r, res) : WH_ERR_RUN;
  }
  streams_end(r);
  runs_add(-1);
  close_outputs(o);
  double cpu = since(&c0, CLOCK_THREAD_CPUTIME_ID);
  usage_end(r, cpu);
  if (rc != 0) return rc;
  res->duration = since(&t0, CLOCK_MONOTONIC);
  res->cpu_seconds = cpu;
  return 0;
}

int wh_run_exec(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res) {
  outputs_t o = NO_OUTPUTS;
  char err[sizeof res->message];
  if (!atomic_load(&r->killed) && open_outputs(c, &o, err, sizeof err) != 0) {
    memset(res, 0, sizeof *res);
    res->exit_code = -1;
    memcpy(res->message, err, sizeof err);
    return WH_ERR_RUN;
  }
  return exec_opened(m, c, r, res, &o);
}

/* ---------------------------------------------------------------- runs on their own thread
 *
 * A run's thread, once its run is over, waits a few seconds for another (at most IDLE_RUNNERS
 * threads wait): a new thread costs a start (and wasmtime's per-thread set-up), about as much as a
 * small component's whole run. */
#define IDLE_RUNNERS 2

/* A component's store whose deletion a run thread put off until the run's end was signalled, with
 * its output pipes (see "components" below). */
typedef struct ended {
  wasmtime_store_t *store;
  int pipes[2][2];
  struct ended *next;
} ended_t;
static __thread int t_defer;      /* a run thread of wh_run_start: put stores off */
static __thread ended_t *t_ended; /* what it put off */
static void ended_free(void);
#define IDLE_SECONDS 5

typedef struct start_args {
  wh_module *m;
  const wh_run_config *c;
  wh_run *r;
  wh_result *res;
  int done_fd;
  int64_t handed; /* when wh_run_start handed it over (CLOCK_MONOTONIC ns) */
  outputs_t o; /* opened by wh_run_start, so that it fails at once when it cannot */
  struct start_args *next;
} start_args;

static struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  start_args *queue; /* runs handed to idle threads, not yet taken */
  int idle, queued;
} g_runners = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0};

/* The next run for this thread, counted idle (g_runners.idle) by its caller; NULL once it waited
 * IDLE_SECONDS (then it ends). */
static start_args *next_run(void) {
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += IDLE_SECONDS;
  pthread_mutex_lock(&g_runners.lock);
  while (!g_runners.queue && pthread_cond_timedwait(&g_runners.wake, &g_runners.lock, &until) == 0) {
  }
  start_args *a = g_runners.queue;
  if (a) {
    g_runners.queue = a->next;
    g_runners.queued--;
  }
  g_runners.idle--;
  pthread_mutex_unlock(&g_runners.lock);
  return a;
}

static void *run_main(void *arg) {
#ifdef __linux__
  pthread_setname_np(pthread_self(), "wasm-run"); /* here: a detached thread's handle dies with it */
#endif
  t_defer = 1;
  for (start_args *next = arg; next;) {
    start_args a = *next;
    free(next);
    int64_t took = now_ns(CLOCK_MONOTONIC);
    int rc = exec_opened(a.m, a.c, a.r, a.res, &a.o);
    a.res->rc = rc;
    a.res->handoff[0] = a.handed;
    a.res->handoff[1] = took;
    pthread_mutex_lock(&g_runners.lock); /* idle before the run is seen over: the next start finds it */
    int stay = g_runners.idle < IDLE_RUNNERS;
    g_runners.idle += stay;
    pthread_mutex_unlock(&g_runners.lock);
    uint64_t done = 1;
    a.res->handoff[2] = now_ns(CLOCK_MONOTONIC);
    /* the last touch of the caller's memory: once done_fd is readable, it may free everything */
    while (write(a.done_fd, &done, sizeof done) < 0 && errno == EINTR) {
    }
    ended_free();
    next = stay ? next_run() : NULL;
  }
  return NULL;
}

int wh_run_start(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res, int done_fd, char *err,
                 size_t errlen) {
  start_args *a = malloc(sizeof *a);
  if (!a) {
    set_msg(err, errlen, "", (const uint8_t *)"out of memory", 13);
    return WH_ERR_RUN;
  }
  *a = (start_args){m, c, r, res, done_fd, 0, NO_OUTPUTS, NULL};
  if (open_outputs(c, &a->o, err, errlen) != 0) {
    free(a);
    return WH_ERR_RUN;
  }
  a->handed = now_ns(CLOCK_MONOTONIC);
  pthread_mutex_lock(&g_runners.lock);
  int handed = g_runners.idle > g_runners.queued;
  if (handed) { /* to an idle thread (the queue's order does not matter: each has one) */
    a->next = g_runners.queue;
    g_runners.queue = a;
    g_runners.queued++;
  }
  pthread_mutex_unlock(&g_runners.lock);
  if (handed) { /* signalled unlocked: the woken thread must not find the lock still held */
    pthread_cond_signal(&g_runners.wake);
    return 0;
  }
  pthread_attr_t attr;
  pthread_t thread;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int rc = pthread_create(&thread, &attr, run_main, a);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    close_outputs(&a->o);
    free(a);
    char msg[256];
    snprintf(msg, sizeof msg, "cannot start a thread for the run: %s", strerror(rc));
    set_msg(err, errlen, "", (const uint8_t *)msg, strlen(msg));
    return WH_ERR_RUN;
  }
  return 0;
}

/* ---------------------------------------------------------------- components (WASI 0.2)
 *
 * A component runs on the main engine through wasmtime's own WASI 0.2 (one component linker
 * holding it, a second one with wasi:http as well, for runs that may make outgoing requests),
 * by calling `run` of its `wasi:cli/run` export. Its stdout/stderr never pass through fd_write:
 * they reach the same CRI writer as a module's through pipes read in C (see "Where a component's
 * output goes" below).
 *
 * Unlike a module's, a component's sleep happens inside wasmtime (wasi:io/poll), where epoch
 * interruption cannot reach: kill() and the deadline take effect when the guest wakes. */

static pthread_once_t g_comp_once = PTHREAD_ONCE_INIT, g_comp_unpooled_once = PTHREAD_ONCE_INIT;
/* [engine: main, unpooled][outgoing_http: WASI 0.2; + wasi:http; + our `handle` shadowing wasi:http's] */
static wasmtime_component_linker_t *g_comp_linkers[2][3];
static char g_comp_error[512];

static wasmtime_error_t *http_handle(void *env, wasmtime_context_t *ctx, const wasmtime_component_func_type_t *ty,
                                     wasmtime_component_val_t *args, size_t nargs, wasmtime_component_val_t *results,
                                     size_t nresults);

/* Our `handle` in place of wasi:http's, for guests whose requests go through the filter: under
 * every 0.2.x name, as a guest's import finds the very version it names before any compatible one
 * (so one name would leave wasi:http's own under the version wasmtime defines it, found by any
 * guest importing that one). */
#define HTTP_MINORS 64
static wasmtime_error_t *shadow_http_handle(wasmtime_component_linker_t *linker) {
  wasmtime_component_linker_allow_shadowing(linker, true);
  wasmtime_component_linker_instance_t *root = wasmtime_component_linker_root(linker), *handler = NULL;
  wasmtime_error_t *e = NULL;
  for (int minor = 0; minor < HTTP_MINORS && !e; minor++) {
    char name[64];
    int n = snprintf(name, sizeof name, "wasi:http/outgoing-handler@0.2.%d", minor);
    e = wasmtime_component_linker_instance_add_instance(root, name, (size_t)n, &handler);
    if (!e) {
      e = wasmtime_component_linker_instance_add_func(handler, "handle", 6, http_handle, NULL, NULL);
      wasmtime_component_linker_instance_delete(handler);
    }
  }
  wasmtime_component_linker_instance_delete(root);
  return e;
}

static void comp_init_for(int unpooled, wasm_engine_t *engine) {
  for (int i = WH_HTTP_NONE; i <= WH_HTTP_HOSTS; i++) {
    wasmtime_component_linker_t *linker = wasmtime_component_linker_new(engine);
    wasmtime_error_t *e = wasmtime_component_linker_add_wasip2(linker);
    if (!e && i != WH_HTTP_NONE) e = wasmtime_component_linker_add_wasi_http(linker);
    if (!e && i == WH_HTTP_HOSTS) e = shadow_http_handle(linker);
    if (e) {
      take_error(e, "define WASI 0.2: ", g_comp_error, sizeof g_comp_error);
      return;
    }
    g_comp_linkers[unpooled][i] = linker;
  }
}
static void comp_init(void) { comp_init_for(0, g_main.engine); }
static void comp_unpooled_init(void) { comp_init_for(1, g_unpooled.engine); }

#define HTTP_HANDLER "wasi:http/outgoing-handler@"

/* Whether the component imports wasi:http/outgoing-handler (any version). */
static int comp_imports_http(const wasmtime_component_t *comp) {
  wasmtime_component_type_t *ty = wasmtime_component_type(comp);
  size_t n = wasmtime_component_type_import_count(ty, g_main.engine);
  int http = 0;
  for (size_t i = 0; i < n && !http; i++) {
    const char *name = NULL;
    size_t len = 0;
    wasmtime_component_extern_t *ext = NULL;
    if (!wasmtime_component_type_import_nth(ty, g_main.engine, i, &name, &len, &ext)) continue;
    http = len > strlen(HTTP_HANDLER) && memcmp(name, HTTP_HANDLER, strlen(HTTP_HANDLER)) == 0;
    if (ext) wasmtime_component_extern_delete(ext);
  }
  wasmtime_component_type_delete(ty);
  return http;
}

/* 0 when the component links against `linker` (instantiated once, in a store of its own, with
 * nothing but an empty WASI), else -1 with wasmtime's reason: a load, not a run, then fails. */
static int comp_links(const wasmtime_component_t *comp, int http, char *err, size_t errlen) {
  wasmtime_store_t *store = wasmtime_store_new(g_main.engine, NULL, NULL);
  wasmtime_context_t *ctx = wasmtime_store_context(store);
  wasmtime_context_set_epoch_deadline(ctx, 1000); /* no code runs here, but never hang: ~5 s */
  wasmtime_error_t *e = wasmtime_context_set_wasi(ctx, wasi_config_new());
  if (!e && http) wasmtime_context_set_wasi_http(ctx);
  wasmtime_component_instance_t inst;
  if (!e) e = wasmtime_component_linker_instantiate(g_comp_linkers[0][http], ctx, comp, &inst);
  wasmtime_store_delete(store);
  if (!e) return 0;
  take_error(e, "cannot link component: ", err, errlen);
  return -1;
}

/* The component from the cache at `path` when usable, else compiled from the bytes (then cached). */
static wasmtime_component_t *comp_compile(const uint8_t *wasm, size_t len, const char *path, int *from_cache,
                                          char *err, size_t errlen, int *rc) {
  wasmtime_component_t *comp = NULL;
  wasmtime_error_t *e;
  char proc[32];
  int fd = open_cache_entry(path, proc);
  if (fd >= 0) {
    e = wasmtime_component_deserialize_file(g_main.engine, proc, &comp);
    close(fd);
    if (!e) {
      *from_cache = 1;
      return comp;
    }
    wasmtime_error_delete(e); /* stale or corrupt: compile again and overwrite it */
    comp = NULL;
  }
  if (!wasm) {
    set_msg(err, errlen, "", (const uint8_t *)"module bytes needed", 19);
    *rc = WH_ERR_NEED_BYTES;
    return NULL;
  }
  if ((e = wasmtime_component_new(g_main.engine, wasm, len, &comp))) {
    take_error(e, "invalid component: ", err, errlen);
    *rc = WH_ERR_LOAD;
    return NULL;
  }
  wasm_byte_vec_t bytes;
  if (path && path[0] && !(e = wasmtime_component_serialize(comp, &bytes))) {
    write_file_atomic(path, &bytes);
    wasm_byte_vec_delete(&bytes);
  } else if (path && path[0]) {
    wasmtime_error_delete(e);
  }
  return comp;
}

/* The export index of `run` in the component's wasi:cli/run, or NULL; *iface: the interface's. */
static wasmtime_component_export_index_t *comp_run_index(const wasmtime_component_t *comp,
                                                         wasmtime_component_export_index_t **iface) {
  static const char RUN[] = "wasi:cli/run@0.2.0"; /* wasmtime matches any 0.2.x export to it */
  *iface = wasmtime_component_get_export_index(comp, NULL, RUN, strlen(RUN));
  return *iface ? wasmtime_component_get_export_index(comp, *iface, "run", 3) : NULL;
}

int wh_component_load(const uint8_t *wasm, size_t len, const char *cache_path, wh_module **out, int *from_cache,
                      int *imports_http, char *err, size_t errlen) {
  *out = NULL;
  *from_cache = *imports_http = 0;
  if (wh_init(err, errlen) != 0) return WH_ERR_LOAD;
  pthread_once(&g_comp_once, comp_init);
  if (g_comp_error[0]) {
    set_msg(err, errlen, "", (const uint8_t *)g_comp_error, strlen(g_comp_error));
    return WH_ERR_LOAD;
  }
  int rc = WH_ERR_LOAD;
  wasmtime_component_t *comp = comp_compile(wasm, len, cache_path, from_cache, err, errlen, &rc);
  if (!comp) return rc;
  wh_module *wm = calloc(1, sizeof *wm);
  if (!wm) {
    wasmtime_component_delete(comp);
    set_msg(err, errlen, "", (const uint8_t *)"out of memory", 13);
    return WH_ERR_LOAD;
  }
  wm->component = comp;
  wm->ec = &g_main;
  pthread_mutex_init(&wm->twin_lock, NULL);
  *imports_http = comp_imports_http(comp);
  if (comp_links(comp, *imports_http, err, errlen) != 0) {
    component_free(wm);
    return WH_ERR_LOAD;
  }
  if (!(wm->run_func = comp_run_index(comp, &wm->run_iface))) {
    component_free(wm);
    set_msg(err, errlen, "", (const uint8_t *)"component does not export `wasi:cli/run` (not a WASI 0.2 command)", 66);
    return WH_ERR_LOAD;
  }
  *out = wm;
  return 0;
}

static void component_free(wh_module *m) {
  wasmtime_component_export_index_t *indices[] = {m->run_func, m->run_iface, m->twin_run_func, m->twin_run_iface};
  for (int i = 0; i < 4; i++)
    if (indices[i]) wasmtime_component_export_index_delete(indices[i]);
  if (m->component_twin) wasmtime_component_delete(m->component_twin);
  wasmtime_component_delete(m->component);
  pthread_mutex_destroy(&m->twin_lock);
  free(m);
}

/* Where a component's output goes. wasmtime's WASI 0.2 hands custom output callbacks to a tokio
 * task of its own (the C API's custom stream gives WASI 0.2 no stream of its own, so it is wrapped
 * as an async writer): a thread switch per write, which the guest waits for (every callback of a
 * hello ran on another thread; its C floor 128-137 -> 223-251 us, measured side by side). A
 * file it writes at once: so each stream of a component run is a pipe whose write end wasmtime opens
 * as a file (/dev/fd/N), and whose read end the epoch ticker drains every tick into the CRI writer
 * that modules use (as containerd reads a container's pipes; lines of stdout and stderr written
 * within one tick may reach a shared log in either order, as there); the run drains the rest when
 * it ends. Cheap for short runs: pipes are reused (kept open, empty), and only a run still going at
 * the next tick is added to the ticker's epoll set. On a run thread of wh_run_start, a run's store
 * is deleted after the run's end is signalled (freeing the instances costs about what a hello's
 * call does): its output is all in the pipes once `run` returns (wasmtime writes a file
 * synchronously), and the pipes are reused only once the store (holding their write ends) is gone.
 * Named FIFOs on tmpfs, which wasmtime could open without the procfs walk of /proc/self/fd/N (about
 * 5 us a run), were tried and dropped: a folder per process to clean at exit, left by a SIGKILL. */
#define FREE_PIPES 64
static struct {
  pthread_mutex_t lock; /* all of this, and the streams of the runs in it */
  int epoll;            /* the read ends of runs past their first tick: data = the run | which stream */
  wh_run *pending;      /* runs started since the last tick (linked by pipes_next) */
  int free[FREE_PIPES][2], nfree;
} g_pipes = {PTHREAD_MUTEX_INITIALIZER, -1, NULL, {{0}}, 0};

/* Moves what the pipe of r's stream `which` holds to its log, `reads` pipe-fulls at most (<0: all
 * of it; the ticker takes a bounded share, or a guest writing without end would hold it); lock held. */
static void pipe_drain(wh_run *r, int which, int reads) {
  static char buf[65536];
  ssize_t n;
  while (reads-- && ((n = read(r->pipes[which][0], buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))) {
    if (n > 0) stream_emit(r, &r->streams[which], buf, (size_t)n);
    if (n > 0 && (size_t)n < sizeof buf) break; /* a short read emptied the pipe */
  }
  sink_flush(r->streams[which].sink);
}

/* Pipes back to the free list (or closed); lock held. */
static void pipes_free(int pipes[2][2]) {
  for (int i = 0; i < 2; i++) {
    int *p = pipes[i];
    if (p[0] < 0) continue;
    if (g_pipes.nfree < FREE_PIPES) memcpy(g_pipes.free[g_pipes.nfree++], p, sizeof g_pipes.free[0]);
    else close(p[0]), close(p[1]);
  }
}

/* Deletes the stores this thread put off, then frees their pipes. */
static void ended_free(void) {
  while (t_ended) {
    ended_t *e = t_ended;
    t_ended = e->next;
    wasmtime_store_delete(e->store);
    pthread_mutex_lock(&g_pipes.lock);
    pipes_free(e->pipes);
    pthread_mutex_unlock(&g_pipes.lock);
    free(e);
  }
}

/* Each tick: the runs started since the last one join the epoll set; the pipes with data are drained. */
static void pipes_poll(void) {
  struct epoll_event ev[64];
  pthread_mutex_lock(&g_pipes.lock);
  if (g_pipes.pending && g_pipes.epoll < 0) g_pipes.epoll = epoll_create1(EPOLL_CLOEXEC);
  for (wh_run *r = g_pipes.pending; r && g_pipes.epoll >= 0; r = r->pipes_next, g_pipes.pending = r) {
    for (int i = 0; i < 2; i++) {
      ev[0] = (struct epoll_event){.events = EPOLLIN, .data.u64 = (uint64_t)(uintptr_t)r | (uint64_t)i};
      if (r->pipes[i][0] >= 0) epoll_ctl(g_pipes.epoll, EPOLL_CTL_ADD, r->pipes[i][0], &ev[0]);
    }
    r->pipes_polled = 1;
  }
  int n = g_pipes.epoll >= 0 ? epoll_wait(g_pipes.epoll, ev, 64, 0) : 0;
  for (int i = 0; i < n; i++) pipe_drain((wh_run *)(uintptr_t)(ev[i].data.u64 & ~(uint64_t)1), (int)(ev[i].data.u64 & 1), 16);
  pthread_mutex_unlock(&g_pipes.lock);
}

/* Points `wasi`'s stdout and stderr at pipes of r's (a discarded stream keeps wasmtime's sink). */
static int pipes_open(wh_run *r, wasi_config_t *wasi) {
  int ok = 1;
  pthread_mutex_lock(&g_pipes.lock);
  for (int i = 0; i < 2; i++) {
    int *p = r->pipes[i];
    p[0] = p[1] = -1;
    if (!ok || r->streams[i].sink->fd < 0) continue;
    if (g_pipes.nfree) memcpy(p, g_pipes.free[--g_pipes.nfree], sizeof g_pipes.free[0]);
    else if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) ok = 0, p[0] = p[1] = -1;
  }
  r->piped = 1;
  r->pipes_polled = 0;
  r->pipes_next = g_pipes.pending;
  g_pipes.pending = r;
  pthread_mutex_unlock(&g_pipes.lock);
  for (int i = 0; i < 2 && ok; i++) {
    char path[32];
    snprintf(path, sizeof path, "/proc/self/fd/%d", r->pipes[i][1]); /* opened anew: a blocking write end */
    if (r->pipes[i][1] >= 0) ok = i ? wasi_config_set_stderr_file(wasi, path) : wasi_config_set_stdout_file(wasi, path);
  }
  return ok ? 0 : -1;
}

/* At a run's end: the rest of its output (wasmtime's writes are done); its store (NULL: none) is
 * deleted, or put off on a run thread, and the pipes freed after it. */
static void pipes_close(wh_run *r, wasmtime_store_t *store) {
  ended_t *ended = store && t_defer ? malloc(sizeof *ended) : NULL;
  if (store && !ended) wasmtime_store_delete(store);
  PHASE(5); /* the store freed (when not put off) */
  pthread_mutex_lock(&g_pipes.lock);
  wh_run **at = &g_pipes.pending;
  while (*at && *at != r) at = &(*at)->pipes_next;
  if (*at) *at = r->pipes_next;
  for (int i = 0; i < 2; i++) {
    if (r->pipes[i][0] < 0) continue;
    if (r->pipes_polled) epoll_ctl(g_pipes.epoll, EPOLL_CTL_DEL, r->pipes[i][0], NULL);
    pipe_drain(r, i, -1); /* all of it */
  }
  if (ended) {
    *ended = (ended_t){store, {{r->pipes[0][0], r->pipes[0][1]}, {r->pipes[1][0], r->pipes[1][1]}}, t_ended};
    t_ended = ended;
  } else {
    pipes_free(r->pipes);
  }
  memset(r->pipes, -1, sizeof r->pipes);
  r->piped = 0;
  pthread_mutex_unlock(&g_pipes.lock);
}

/* ---------------------------------------------------------------- outgoing HTTP, host by host
 *
 * A WH_HTTP_HOSTS run instantiates the filter (http_filter.wat) in its store before the guest,
 * from the linker with wasi:http; the guest's linker has our http_handle in place of wasi:http's
 * `handle`. http_handle asks the filter for the request's authority and either forwards the
 * request to the filter's `handle` (wasi:http's own, passed through) or drops it and answers
 * err(HTTP-request-denied), with a line on the guest's stderr. */

static struct {
  pthread_mutex_t lock;
  wasm_byte_vec_t wasm;                                  /* the filter, once loaded */
  wasmtime_component_t *comp[2];                         /* compiled for [main, unpooled] */
  wasmtime_component_export_index_t *authority[2], *handle[2];
} g_filter = {PTHREAD_MUTEX_INITIALIZER, {0, NULL}, {NULL, NULL}, {NULL, NULL}, {NULL, NULL}};

/* Compiles the filter for engine `u` (0: main, 1: unpooled) unless done; call with the lock held. */
static wasmtime_error_t *filter_compile(int u, wasm_engine_t *engine) {
  if (g_filter.comp[u]) return NULL;
  if (!g_filter.wasm.size) return wasmtime_error_new("wasihost: the outgoing-HTTP filter is not loaded");
  wasmtime_error_t *e = wasmtime_component_new(engine, g_filter.wasm.data, g_filter.wasm.size, &g_filter.comp[u]);
  if (e) return e;
  g_filter.authority[u] = wasmtime_component_get_export_index(g_filter.comp[u], NULL, "authority", 9);
  g_filter.handle[u] = wasmtime_component_get_export_index(g_filter.comp[u], NULL, "handle", 6);
  return g_filter.authority[u] && g_filter.handle[u] ? NULL : wasmtime_error_new("wasihost: the filter lacks its exports");
}

int wh_http_filter_load(const char *wat, size_t len, char *err, size_t errlen) {
  if (wh_init(err, errlen) != 0) return WH_ERR_LOAD;
  pthread_mutex_lock(&g_filter.lock);
  wasmtime_error_t *e = g_filter.wasm.size ? NULL : wasmtime_wat2wasm(wat, len, &g_filter.wasm);
  if (!e) e = filter_compile(0, g_main.engine);
  pthread_mutex_unlock(&g_filter.lock);
  if (!e) return 0;
  take_error(e, "outgoing-HTTP filter: ", err, errlen);
  return WH_ERR_LOAD;
}

/* The run's filter instance in `ctx` (r->ec's engine), its exports in r->http. */
static wasmtime_error_t *filter_begin(wh_run *r, const wh_run_config *c, wasmtime_context_t *ctx) {
  int u = r->ec != &g_main;
  pthread_mutex_lock(&g_filter.lock);
  wasmtime_error_t *e = filter_compile(u, r->ec->engine);
  pthread_mutex_unlock(&g_filter.lock);
  wasmtime_component_instance_t inst;
  if (!e) e = wasmtime_component_linker_instantiate(g_comp_linkers[u][WH_HTTP_ANY], ctx, g_filter.comp[u], &inst);
  if (e) return e;
  if (!wasmtime_component_instance_get_func(&inst, ctx, g_filter.authority[u], &r->http.authority) ||
      !wasmtime_component_instance_get_func(&inst, ctx, g_filter.handle[u], &r->http.handle))
    return wasmtime_error_new("wasihost: the filter instance lacks its exports");
  r->http.hosts = c->http_hosts;
  r->http.nhosts = c->nhttp_hosts;
  return NULL;
}

static int host_allowed(const wh_run *r, const wasmtime_component_val_t *authority) {
  if (!authority || authority->kind != WH_WASMTIME_COMPONENT_STRING) return 0;
  for (size_t i = 0; i < r->http.nhosts; i++)
    if (strlen(r->http.hosts[i]) == authority->of.string.size &&
        memcmp(r->http.hosts[i], authority->of.string.data, authority->of.string.size) == 0)
      return 1;
  return 0;
}

/* Drops the request (and its options) in the store, says so on stderr, answers HTTP-request-denied. */
static void http_deny(wh_run *r, wasmtime_context_t *ctx, const wasmtime_component_val_t *args,
                      const wasmtime_component_val_t *authority, wasmtime_component_val_t *result) {
  const wasmtime_component_val_t *options = args[1].kind == WH_WASMTIME_COMPONENT_OPTION ? args[1].of.option : NULL;
  const wasmtime_component_val_t *owned[2] = {&args[0], options};
  for (int i = 0; i < 2; i++) {
    wasmtime_error_t *e = owned[i] && owned[i]->kind == WH_WASMTIME_COMPONENT_RESOURCE
                              ? wasmtime_component_resource_any_drop(ctx, owned[i]->of.resource) : NULL;
    if (e) wasmtime_error_delete(e);
  }
  char line[400];
  int n = authority && authority->kind == WH_WASMTIME_COMPONENT_STRING
              ? snprintf(line, sizeof line, "minikrust: outgoing HTTP request to %.*s denied: not an allowed host\n",
                         (int)(authority->of.string.size > 256 ? 256 : authority->of.string.size),
                         (const char *)authority->of.string.data)
              : snprintf(line, sizeof line, "minikrust: outgoing HTTP request without a host denied\n");
  pthread_mutex_lock(&g_pipes.lock);
  if (r->pipes[1][0] >= 0) pipe_drain(r, 1, -1); /* after what the guest wrote before (it waits on us) */
  stream_emit(r, &r->streams[1], line, (size_t)n);
  sink_flush(r->streams[1].sink);
  pthread_mutex_unlock(&g_pipes.lock);
  wasmtime_component_val_t code;
  memset(&code, 0, sizeof code);
  code.kind = WH_WASMTIME_COMPONENT_VARIANT;
  wasm_byte_vec_new(&code.of.variant.discriminant, 19, (const uint8_t *)"HTTP-request-denied");
  result->kind = WH_WASMTIME_COMPONENT_RESULT;
  result->of.result.is_ok = false;
  result->of.result.val = wasmtime_component_val_new(&code);
}

/* wasi:http/outgoing-handler.handle(request, options) for a WH_HTTP_HOSTS run (see above). */
static wasmtime_error_t *http_handle(void *env, wasmtime_context_t *ctx, const wasmtime_component_func_type_t *ty,
                                     wasmtime_component_val_t *args, size_t nargs, wasmtime_component_val_t *results,
                                     size_t nresults) {
  (void)env, (void)ty;
  wh_run *r = wasmtime_context_get_data(ctx);
  if (nargs != 2 || nresults != 1 || args[0].kind != WH_WASMTIME_COMPONENT_RESOURCE)
    return wasmtime_error_new("wasihost: unexpected wasi:http/outgoing-handler.handle signature");
  wasmtime_component_val_t authority;
  memset(&authority, 0, sizeof authority);
  wasmtime_error_t *e = wasmtime_component_func_call(&r->http.authority, ctx, args, 1, &authority, 1);
  if (!e) e = wasmtime_component_func_post_return(&r->http.authority, ctx);
  const wasmtime_component_val_t *host = authority.kind == WH_WASMTIME_COMPONENT_OPTION ? authority.of.option : NULL;
  if (!e && host_allowed(r, host)) {
    e = wasmtime_component_func_call(&r->http.handle, ctx, args, nargs, results, 1);
    if (!e) e = wasmtime_component_func_post_return(&r->http.handle, ctx);
  } else if (!e) {
    http_deny(r, ctx, args, host, &results[0]);
  }
  wasmtime_component_val_delete(&authority);
  return e;
}

/* The component's twin on the engine without the pool (its compiled code, moved over) and its
 * `run`, or NULL with the reason in err. */
static wasmtime_component_export_index_t *component_twin(wh_module *m, char *err, size_t errlen) {
  pthread_mutex_lock(&m->twin_lock);
  engine_ctx_t *ec = m->twin_run_func ? NULL : unpooled_engine(err, errlen);
  if (ec) {
    pthread_once(&g_comp_unpooled_once, comp_unpooled_init);
    wasm_byte_vec_t code;
    wasmtime_error_t *e = wasmtime_component_serialize(m->component, &code);
    if (!e) {
      e = wasmtime_component_deserialize(ec->engine, code.data, code.size, &m->component_twin);
      wasm_byte_vec_delete(&code);
    }
    if (e)
      take_error(e, "the instance pool is full, and the engine without it failed: ", err, errlen);
    else
      m->twin_run_func = comp_run_index(m->component_twin, &m->twin_run_iface);
  }
  pthread_mutex_unlock(&m->twin_lock);
  return m->twin_run_func;
}

static int exec_component_on(const wasmtime_component_t *comp, const wasmtime_component_export_index_t *run_func,
                             const wh_run_config *c, wh_run *r, wh_result *res);

static int exec_component(wh_module *m, const wh_run_config *c, wh_run *r, wh_result *res) {
  int rc = exec_component_on(m->component, m->run_func, c, r, res);
  if (rc == POOL_FULL) { /* wasmtime alone has no such limit: run on the engine without the pool */
    wasmtime_component_export_index_t *run = component_twin(m, res->message, sizeof res->message);
    r->ec = &g_unpooled;
    rc = run ? exec_component_on(m->component_twin, run, c, r, res) : WH_ERR_RUN;
  }
  return rc;
}

/* One instance of `comp` (compiled for r->ec) in a new store and its `run` called: 0, WH_ERR_RUN,
 * or POOL_FULL (nothing ran). A `run` that returns err is exit code 1, as wasmtime's CLI says. */
static int exec_component_on(const wasmtime_component_t *comp, const wasmtime_component_export_index_t *run_func,
                             const wh_run_config *c, wh_run *r, wh_result *res) {
  PHASE(-1);
  wasi_config_t *wasi = make_wasi(c, res->message, sizeof res->message);
  if (!wasi) return WH_ERR_RUN;
  int piped = pipes_open(r, wasi);
  PHASE(0); /* the WASI config and its output pipes */
  if (piped != 0) {
    snprintf(res->message, sizeof res->message, "cannot make the output pipes: %s", strerror(errno));
    wasi_config_delete(wasi);
    pipes_close(r, NULL);
    return WH_ERR_RUN;
  }
  wasmtime_store_t *store = run_store(r, c, wasi, res); /* consumes wasi */
  if (!store) {
    pipes_close(r, NULL);
    return WH_ERR_RUN;
  }
  wasmtime_context_t *ctx = wasmtime_store_context(store);
  wasmtime_error_t *e = NULL;
  int http = c->outgoing_http == WH_HTTP_ANY || c->outgoing_http == WH_HTTP_HOSTS ? c->outgoing_http : WH_HTTP_NONE;
  if (http) wasmtime_context_set_wasi_http(ctx);
  if (http == WH_HTTP_HOSTS) e = filter_begin(r, c, ctx);
  wasmtime_component_instance_t inst;
  wasmtime_component_func_t run;
  PHASE(1); /* the store and its WASI context */
  if (!e) e = wasmtime_component_linker_instantiate(g_comp_linkers[r->ec != &g_main][http], ctx, comp, &inst);
  PHASE(2);
  if (e && r->ec->pooling && pool_full(e)) {
    wasmtime_error_delete(e);
    wasmtime_store_delete(store);
    pipes_close(r, NULL);
    return POOL_FULL;
  }
  if (e) {
    classify(r, e, NULL, res);
    res->instantiate_failed = 1;
  } else if (!wasmtime_component_instance_get_func(&inst, ctx, run_func, &run)) {
    res->status = WH_TRAPPED;
    set_msg(res->message, sizeof res->message, "", (const uint8_t *)"no wasi:cli/run function", 24);
  } else {
    wasmtime_component_val_t result;
    memset(&result, 0, sizeof result);
    e = wasmtime_component_func_call(&run, ctx, NULL, 0, &result, 1);
    if (!e) {
      int failed = result.kind == WH_WASMTIME_COMPONENT_RESULT && !result.of.result.is_ok;
      wasmtime_component_val_delete(&result);
      e = wasmtime_component_func_post_return(&run, ctx);
      if (!e && failed) {
        res->status = WH_EXITED;
        res->exit_code = 1;
      }
    }
    if (e || res->exit_code != 1) classify(r, e, NULL, res);
  }
  PHASE(3); /* the call */
  pipes_close(r, store); /* before wh_run_exec frees the buffers the pipes are drained into */
  PHASE(4); /* the pipes drained into the log */
  return 0;
}
