/* Our own declarations of the subset of wasmtime's C API that wasihost.c uses.
 *
 * The `wasmtime` wheel ships `_libwasmtime.so` without headers, so these are written from the
 * signatures of wasmtime 50 (crates/c-api/include/ of that release, cross-checked against the
 * wheel's generated ctypes bindings). Struct layouts must match exactly; every struct here is
 * one that we allocate ourselves. If wasmtime is bumped past the range pinned in pyproject.toml,
 * re-check every line (e.g. wasi_config_preopen_dir's last argument changed across releases).
 */
#ifndef WASIHOST_WASMTIME_API_H
#define WASIHOST_WASMTIME_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* --- wasm.h: opaque types, vectors --- */
typedef struct wasm_config_t wasm_config_t;
typedef struct wasm_engine_t wasm_engine_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasm_valtype_t wasm_valtype_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasm_externtype_t wasm_externtype_t;
typedef struct wasm_exporttype_t wasm_exporttype_t;

typedef struct wasm_byte_vec_t { size_t size; uint8_t *data; } wasm_byte_vec_t;
typedef wasm_byte_vec_t wasm_name_t;
typedef wasm_byte_vec_t wasm_message_t;
typedef struct wasm_valtype_vec_t { size_t size; wasm_valtype_t **data; } wasm_valtype_vec_t;
typedef struct wasm_exporttype_vec_t { size_t size; wasm_exporttype_t **data; } wasm_exporttype_vec_t;

typedef uint8_t wasm_valkind_t;
typedef uint8_t wasm_externkind_t;
#define WH_WASM_I32 0
#define WH_WASM_EXTERN_FUNC 0

wasm_config_t *wasm_config_new(void);
wasm_engine_t *wasm_engine_new_with_config(wasm_config_t *config);
void wasm_engine_delete(wasm_engine_t *engine);
void wasm_byte_vec_new(wasm_byte_vec_t *out, size_t size, const uint8_t *data);
void wasm_byte_vec_delete(wasm_byte_vec_t *vec);
wasm_valtype_t *wasm_valtype_new(wasm_valkind_t kind);
void wasm_valtype_vec_new(wasm_valtype_vec_t *out, size_t size, wasm_valtype_t *const data[]);
wasm_functype_t *wasm_functype_new(wasm_valtype_vec_t *params, wasm_valtype_vec_t *results);
void wasm_functype_delete(wasm_functype_t *ty);
void wasm_trap_message(const wasm_trap_t *trap, wasm_message_t *out);
void wasm_trap_delete(wasm_trap_t *trap);
const wasm_name_t *wasm_exporttype_name(const wasm_exporttype_t *ty);
const wasm_externtype_t *wasm_exporttype_type(const wasm_exporttype_t *ty);
wasm_externkind_t wasm_externtype_kind(const wasm_externtype_t *ty);
void wasm_exporttype_vec_delete(wasm_exporttype_vec_t *vec);

/* --- wasmtime/config.h, engine.h --- */
typedef struct wasmtime_pooling_allocation_config_t wasmtime_pooling_allocation_config_t;
typedef uint8_t wasmtime_opt_level_t;
#define WH_WASMTIME_OPT_LEVEL_SPEED 1

void wasmtime_config_epoch_interruption_set(wasm_config_t *config, bool enable);
void wasmtime_config_cranelift_opt_level_set(wasm_config_t *config, wasmtime_opt_level_t level);
void wasmtime_config_parallel_compilation_set(wasm_config_t *config, bool enable);
wasmtime_pooling_allocation_config_t *wasmtime_pooling_allocation_config_new(void);
void wasmtime_pooling_allocation_config_delete(wasmtime_pooling_allocation_config_t *pc);
void wasmtime_pooling_allocation_config_total_core_instances_set(wasmtime_pooling_allocation_config_t *pc, uint32_t n);
void wasmtime_pooling_allocation_config_total_memories_set(wasmtime_pooling_allocation_config_t *pc, uint32_t n);
void wasmtime_pooling_allocation_config_total_tables_set(wasmtime_pooling_allocation_config_t *pc, uint32_t n);
void wasmtime_pooling_allocation_config_total_stacks_set(wasmtime_pooling_allocation_config_t *pc, uint32_t n);
void wasmtime_pooling_allocation_config_max_memory_size_set(wasmtime_pooling_allocation_config_t *pc, size_t n);
void wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(wasmtime_pooling_allocation_config_t *pc, size_t n);
void wasmtime_pooling_allocation_config_table_keep_resident_set(wasmtime_pooling_allocation_config_t *pc, size_t n);
void wasmtime_pooling_allocation_config_max_unused_warm_slots_set(wasmtime_pooling_allocation_config_t *pc, uint32_t n);
void wasmtime_pooling_allocation_strategy_set(wasm_config_t *config, const wasmtime_pooling_allocation_config_t *pc);
void wasmtime_engine_increment_epoch(wasm_engine_t *engine);

/* --- wasmtime/error.h, trap.h --- */
typedef struct wasmtime_error_t wasmtime_error_t;
wasmtime_error_t *wasmtime_error_new(const char *message);
void wasmtime_error_delete(wasmtime_error_t *error);
void wasmtime_error_message(const wasmtime_error_t *error, wasm_name_t *out);
bool wasmtime_error_exit_status(const wasmtime_error_t *error, int *status);

/* --- wasmtime/module.h --- */
typedef struct wasmtime_module_t wasmtime_module_t;
wasmtime_error_t *wasmtime_module_new(wasm_engine_t *engine, const uint8_t *wasm, size_t len, wasmtime_module_t **out);
void wasmtime_module_delete(wasmtime_module_t *m);
void wasmtime_module_exports(const wasmtime_module_t *m, wasm_exporttype_vec_t *out);
wasmtime_error_t *wasmtime_module_serialize(wasmtime_module_t *m, wasm_byte_vec_t *out);
wasmtime_error_t *wasmtime_module_deserialize(wasm_engine_t *engine, const uint8_t *bytes, size_t len,
                                              wasmtime_module_t **out);
wasmtime_error_t *wasmtime_module_deserialize_file(wasm_engine_t *engine, const char *path, wasmtime_module_t **out);

/* --- wasmtime/store.h --- */
typedef struct wasmtime_store_t wasmtime_store_t;
typedef struct wasmtime_context_t wasmtime_context_t;
typedef uint8_t wasmtime_update_deadline_kind_t;
#define WH_WASMTIME_UPDATE_DEADLINE_CONTINUE 0

wasmtime_store_t *wasmtime_store_new(wasm_engine_t *engine, void *data, void (*finalizer)(void *));
wasmtime_context_t *wasmtime_store_context(wasmtime_store_t *store);
void wasmtime_store_delete(wasmtime_store_t *store);
void wasmtime_store_limiter(wasmtime_store_t *store, int64_t memory_size, int64_t table_elements,
                            int64_t instances, int64_t tables, int64_t memories);
void wasmtime_store_epoch_deadline_callback(
    wasmtime_store_t *store,
    wasmtime_error_t *(*func)(wasmtime_context_t *context, void *data, uint64_t *epoch_deadline_delta,
                              wasmtime_update_deadline_kind_t *update_kind),
    void *data, void (*finalizer)(void *));
void *wasmtime_context_get_data(const wasmtime_context_t *context);
void wasmtime_context_set_epoch_deadline(wasmtime_context_t *context, uint64_t ticks_beyond_current);

/* --- wasmtime/extern.h, val.h, instance.h: value layouts (sizes 16/24/16/32 on 64-bit) --- */
typedef struct wasmtime_func { uint64_t store_id; void *__private; } wasmtime_func_t;
typedef struct wasmtime_memory { struct { uint64_t store_id; uint32_t __private1; } s; uint32_t __private2; } wasmtime_memory_t;
typedef struct wasmtime_global { uint64_t store_id; uint32_t __private1, __private2, __private3; } wasmtime_global_t;
typedef struct wasmtime_instance { uint64_t store_id; size_t __private; } wasmtime_instance_t;
typedef uint8_t wasmtime_extern_kind_t;
#define WH_WASMTIME_EXTERN_FUNC 0
#define WH_WASMTIME_EXTERN_MEMORY 3
typedef union wasmtime_extern_union {
  wasmtime_func_t func;
  wasmtime_global_t global;
  wasmtime_memory_t memory;
  void *sharedmemory;
} wasmtime_extern_union_t;
typedef struct wasmtime_extern { wasmtime_extern_kind_t kind; wasmtime_extern_union_t of; } wasmtime_extern_t;
typedef union wasmtime_val_raw {
  int32_t i32; int64_t i64; float f32; double f64; uint8_t v128[16];
  uint32_t anyref; uint32_t externref; uint32_t exnref; void *funcref;
} wasmtime_val_raw_t;

void wasmtime_extern_delete(wasmtime_extern_t *val);
uint8_t *wasmtime_memory_data(const wasmtime_context_t *store, const wasmtime_memory_t *memory);
size_t wasmtime_memory_data_size(const wasmtime_context_t *store, const wasmtime_memory_t *memory);
bool wasmtime_instance_export_get(wasmtime_context_t *store, const wasmtime_instance_t *instance,
                                  const char *name, size_t name_len, wasmtime_extern_t *item);

/* --- wasmtime/func.h --- */
typedef struct wasmtime_caller wasmtime_caller_t;
typedef wasmtime_error_t *(*wasmtime_func_unchecked_callback_t)(void *env, wasmtime_caller_t *caller,
                                                                 wasmtime_val_raw_t *args_and_results,
                                                                 size_t num_args_and_results);
wasmtime_error_t *wasmtime_func_call_unchecked(wasmtime_context_t *store, const wasmtime_func_t *func,
                                               wasmtime_val_raw_t *args_and_results,
                                               size_t args_and_results_len, wasm_trap_t **trap);
wasmtime_context_t *wasmtime_caller_context(wasmtime_caller_t *caller);
bool wasmtime_caller_export_get(wasmtime_caller_t *caller, const char *name, size_t name_len,
                                wasmtime_extern_t *item);

/* --- wasmtime/linker.h, instance.h --- */
typedef struct wasmtime_linker wasmtime_linker_t;
typedef struct wasmtime_instance_pre wasmtime_instance_pre_t;
wasmtime_linker_t *wasmtime_linker_new(wasm_engine_t *engine);
void wasmtime_linker_delete(wasmtime_linker_t *linker);
void wasmtime_linker_allow_shadowing(wasmtime_linker_t *linker, bool allow_shadowing);
wasmtime_error_t *wasmtime_linker_define_wasi(wasmtime_linker_t *linker);
wasmtime_error_t *wasmtime_linker_define_func_unchecked(
    wasmtime_linker_t *linker, const char *module, size_t module_len, const char *name, size_t name_len,
    const wasm_functype_t *ty, wasmtime_func_unchecked_callback_t cb, void *data, void (*finalizer)(void *));
bool wasmtime_linker_get(const wasmtime_linker_t *linker, wasmtime_context_t *store, const char *module,
                         size_t module_len, const char *name, size_t name_len, wasmtime_extern_t *item);
wasmtime_error_t *wasmtime_linker_instantiate_pre(const wasmtime_linker_t *linker, const wasmtime_module_t *module,
                                                  wasmtime_instance_pre_t **instance_pre);
wasmtime_error_t *wasmtime_instance_new(wasmtime_context_t *store, const wasmtime_module_t *module,
                                        const wasmtime_extern_t *imports, size_t nimports,
                                        wasmtime_instance_t *instance, wasm_trap_t **trap);
void wasmtime_instance_pre_delete(wasmtime_instance_pre_t *instance_pre);
wasmtime_error_t *wasmtime_instance_pre_instantiate(const wasmtime_instance_pre_t *instance_pre,
                                                    wasmtime_context_t *store, wasmtime_instance_t *instance,
                                                    wasm_trap_t **trap);

/* --- wasmtime/wat.h --- */
wasmtime_error_t *wasmtime_wat2wasm(const char *wat, size_t wat_len, wasm_byte_vec_t *out);

/* --- wasi.h --- */
typedef struct wasi_config_t wasi_config_t;
wasi_config_t *wasi_config_new(void);
void wasi_config_delete(wasi_config_t *config);
bool wasi_config_set_argv(wasi_config_t *config, size_t argc, const char *argv[]);
bool wasi_config_set_env(wasi_config_t *config, size_t envc, const char *names[], const char *values[]);
void wasi_config_set_stdin_bytes(wasi_config_t *config, wasm_byte_vec_t *binary);
bool wasi_config_preopen_dir(wasi_config_t *config, const char *host_path, const char *guest_path, bool fs_mutable);
wasmtime_error_t *wasmtime_context_set_wasi(wasmtime_context_t *context, wasi_config_t *wasi);

bool wasi_config_set_stdout_file(wasi_config_t *config, const char *path); /* created (truncated) */
bool wasi_config_set_stderr_file(wasi_config_t *config, const char *path);

/* --- wasi.h: custom output streams (WASI 0.2 components write stdout/stderr through these) --- */
void wasi_config_set_stdout_custom(wasi_config_t *config, ptrdiff_t (*callback)(void *, const uint8_t *, size_t),
                                   void *data, void (*finalizer)(void *));
void wasi_config_set_stderr_custom(wasi_config_t *config, ptrdiff_t (*callback)(void *, const uint8_t *, size_t),
                                   void *data, void (*finalizer)(void *));

/* --- wasmtime/component/{component,instance,func,val,linker,types/component}.h (wasmtime 50) --- */
typedef struct wasmtime_component_t wasmtime_component_t;
typedef struct wasmtime_component_export_index_t wasmtime_component_export_index_t;
typedef struct wasmtime_component_linker_t wasmtime_component_linker_t;
typedef struct wasmtime_component_type_t wasmtime_component_type_t;
typedef struct wasmtime_component_extern_t wasmtime_component_extern_t;
typedef struct wasmtime_component_instance { uint64_t store_id; uint32_t __private; } wasmtime_component_instance_t;
typedef struct wasmtime_component_func {
  struct { uint64_t store_id; uint32_t __private1; } s;
  uint32_t __private2;
  void *__private3;
} wasmtime_component_func_t;
typedef struct wasmtime_component_resource_any wasmtime_component_resource_any_t;
typedef struct wasmtime_component_func_type_t wasmtime_component_func_type_t;
typedef struct wasmtime_component_linker_instance_t wasmtime_component_linker_instance_t;
typedef uint8_t wasmtime_component_valkind_t;
#define WH_WASMTIME_COMPONENT_STRING 12
#define WH_WASMTIME_COMPONENT_VARIANT 16
#define WH_WASMTIME_COMPONENT_OPTION 18
#define WH_WASMTIME_COMPONENT_RESULT 19
#define WH_WASMTIME_COMPONENT_RESOURCE 21
/* Only the cases used here are spelled out; the pad gives the union its real size (24 bytes). */
typedef struct wasmtime_component_val {
  wasmtime_component_valkind_t kind;
  union {
    wasm_name_t string;
    struct { wasm_name_t discriminant; struct wasmtime_component_val *val; } variant;
    struct wasmtime_component_val *option;
    struct { bool is_ok; struct wasmtime_component_val *val; } result;
    wasmtime_component_resource_any_t *resource;
    uint8_t __pad[24];
    void *__align;
  } of;
} wasmtime_component_val_t;
typedef wasmtime_error_t *(*wasmtime_component_func_callback_t)(
    void *env, wasmtime_context_t *context, const wasmtime_component_func_type_t *type,
    wasmtime_component_val_t *args, size_t nargs, wasmtime_component_val_t *results, size_t nresults);

wasmtime_error_t *wasmtime_component_new(const wasm_engine_t *engine, const uint8_t *buf, size_t len,
                                         wasmtime_component_t **component_out);
wasmtime_error_t *wasmtime_component_serialize(const wasmtime_component_t *component, wasm_byte_vec_t *ret);
wasmtime_error_t *wasmtime_component_deserialize(const wasm_engine_t *engine, const uint8_t *buf, size_t len,
                                                 wasmtime_component_t **component_out);
wasmtime_error_t *wasmtime_component_deserialize_file(const wasm_engine_t *engine, const char *path,
                                                      wasmtime_component_t **component_out);
void wasmtime_component_delete(wasmtime_component_t *component);
wasmtime_component_export_index_t *wasmtime_component_get_export_index(
    const wasmtime_component_t *component, const wasmtime_component_export_index_t *instance_export_index,
    const char *name, size_t name_len);
void wasmtime_component_export_index_delete(wasmtime_component_export_index_t *export_index);
wasmtime_component_type_t *wasmtime_component_type(const wasmtime_component_t *component);
void wasmtime_component_type_delete(wasmtime_component_type_t *ty);
size_t wasmtime_component_type_import_count(const wasmtime_component_type_t *ty, const wasm_engine_t *engine);
bool wasmtime_component_type_import_nth(const wasmtime_component_type_t *ty, const wasm_engine_t *engine, size_t nth,
                                        const char **name_ret, size_t *name_len_ret,
                                        wasmtime_component_extern_t **type_ret);
void wasmtime_component_extern_delete(wasmtime_component_extern_t *ty);
bool wasmtime_component_instance_get_func(const wasmtime_component_instance_t *instance, wasmtime_context_t *context,
                                          const wasmtime_component_export_index_t *export_index,
                                          wasmtime_component_func_t *func_out);
wasmtime_error_t *wasmtime_component_func_call(const wasmtime_component_func_t *func, wasmtime_context_t *context,
                                               const wasmtime_component_val_t *args, size_t args_size,
                                               wasmtime_component_val_t *results, size_t results_size);
wasmtime_error_t *wasmtime_component_func_post_return(const wasmtime_component_func_t *func,
                                                      wasmtime_context_t *context);
void wasmtime_component_val_delete(wasmtime_component_val_t *value);
wasmtime_component_val_t *wasmtime_component_val_new(wasmtime_component_val_t *val); /* takes val's contents */
wasmtime_error_t *wasmtime_component_resource_any_drop(wasmtime_context_t *context,
                                                       const wasmtime_component_resource_any_t *resource);
void wasmtime_component_linker_allow_shadowing(wasmtime_component_linker_t *linker, bool allow);
wasmtime_component_linker_instance_t *wasmtime_component_linker_root(wasmtime_component_linker_t *linker);
wasmtime_error_t *wasmtime_component_linker_instance_add_instance(wasmtime_component_linker_instance_t *linker_instance,
                                                                  const char *name, size_t name_len,
                                                                  wasmtime_component_linker_instance_t **out);
wasmtime_error_t *wasmtime_component_linker_instance_add_func(wasmtime_component_linker_instance_t *linker_instance,
                                                              const char *name, size_t name_len,
                                                              wasmtime_component_func_callback_t callback, void *data,
                                                              void (*finalizer)(void *));
void wasmtime_component_linker_instance_delete(wasmtime_component_linker_instance_t *linker_instance);
wasmtime_component_linker_t *wasmtime_component_linker_new(const wasm_engine_t *engine);
wasmtime_error_t *wasmtime_component_linker_add_wasip2(wasmtime_component_linker_t *linker);
wasmtime_error_t *wasmtime_component_linker_add_wasi_http(wasmtime_component_linker_t *linker);
wasmtime_error_t *wasmtime_component_linker_instantiate(const wasmtime_component_linker_t *linker,
                                                        wasmtime_context_t *context,
                                                        const wasmtime_component_t *component,
                                                        wasmtime_component_instance_t *instance_out);
void wasmtime_context_set_wasi_http(wasmtime_context_t *context); /* after wasmtime_context_set_wasi */

#endif
