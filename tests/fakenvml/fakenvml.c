/* fakenvml.c - a stand-in for NVIDIA's libnvidia-ml.so.1, so that the real pynvml code path
 * (dlopen, ctypes struct layouts, the two-call process queries, error classes) runs in tests on
 * machines without a GPU. Built by tests/fakenvml/__init__.py:build_fake_nvml().
 *
 * GPU state comes from the text file named by $FAKE_NVML_STATE. The file is stat()ed on every
 * call and re-parsed when its device/inode/size/mtime/ctime change, so a test can change the
 * state while a process runs (write a temp file, then rename() it over the old one).
 * Without $FAKE_NVML_STATE, or when the file is missing, nvmlInit returns DRIVER_NOT_LOADED (9).
 *
 * State file, one directive per line; '#' starts a comment; numbers are decimal or 0x hex:
 *   driver 550.54.15
 *   init_error 9                    nvmlInit* returns this code (0: success)
 *   gpu uuid=GPU-x total=B reserved=B other=B util=P memutil=P name=Rest Of Line
 *   proc gpu=G pid=N used=B|na kind=compute|graphics
 *   fail fn=NAME gpu=G code=N
 * G is the 0-based position of a `gpu` line in the same file, or a GPU's uuid; in `fail` it may
 * be omitted or -1 (any device, and calls that take no device). `used=na` reports
 * NVML_VALUE_NOT_AVAILABLE. A `fail` matches the C function named NAME and its versioned variants
 * (fn=nvmlDeviceGetComputeRunningProcesses also matches ..._v2 and ..._v3).
 *
 * Memory: used(v2) = other + sum of the GPU's procs; free = total - reserved - used(v2);
 * used(v1) = used(v2) + reserved (so v1 used + free == total, as on drivers >= R510).
 *
 * Devices are enumerated when the library is first initialised (refcount 0 -> 1), like NVML:
 * the device count and indices stay fixed until the last nvmlShutdown. Later state files update
 * the devices by uuid; a GPU missing from the file is lost: nvmlDeviceGetHandleByIndex and every
 * call on a handle held for it return GPU_IS_LOST (15). GPUs added later are seen after re-init.
 *
 * Build: cc -O2 -fPIC -shared -fvisibility=hidden -Wl,-soname,libnvidia-ml.so.1
 *           -o libnvidia-ml.so.1 fakenvml.c -pthread
 * -DFAKE_NO_V3 builds an "old driver" (< R510): no nvmlDeviceGetMemoryInfo_v2 and no *_v3 process
 * queries. -DFAKE_WITH_NVML_H -I<dir of nvml.h> (PyPI nvidia-nvml-dev) has the compiler check
 * every signature against NVIDIA's header.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef FAKE_WITH_NVML_H
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#include <nvml.h>
typedef nvmlProcessInfo_v1_t proc_v1_t;
typedef nvmlProcessInfo_t proc_v2_t;
#else
typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } proc_v1_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory;
                 unsigned int gpuInstanceId, computeInstanceId; } proc_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
#endif

/* The layouts pynvml's ctypes classes expect (x86_64; notes: nvml.md section 2). */
_Static_assert(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40 && offsetof(nvmlMemory_v2_t, total) == 8 &&
               offsetof(nvmlMemory_v2_t, used) == 32, "nvmlMemory_v2_t");
_Static_assert(sizeof(proc_v1_t) == 16 && offsetof(proc_v1_t, usedGpuMemory) == 8, "v1 process");
_Static_assert(sizeof(proc_v2_t) == 24 && offsetof(proc_v2_t, gpuInstanceId) == 16, "v2 process");
_Static_assert(sizeof(nvmlUtilization_t) == 8, "nvmlUtilization_t");

#define OK ((nvmlReturn_t)0)
#define UNINITIALIZED ((nvmlReturn_t)1)
#define INVALID_ARGUMENT ((nvmlReturn_t)2)
#define NOT_FOUND ((nvmlReturn_t)6)
#define INSUFFICIENT_SIZE ((nvmlReturn_t)7)
#define DRIVER_NOT_LOADED ((nvmlReturn_t)9)
#define GPU_IS_LOST ((nvmlReturn_t)15)
#define ARGUMENT_VERSION_MISMATCH ((nvmlReturn_t)25)
#define UNKNOWN 999
#define MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))
#define VALUE_NOT_AVAILABLE ULLONG_MAX
#define API __attribute__((visibility("default")))

#define MAX_GPUS 16
#define MAX_PROCS 256
#define MAX_FAILS 32
#define TEXT 96                      /* NVML's UUID and name buffer sizes (v2) */

typedef struct nvmlDevice_st {        /* a handle is a pointer to one of these */
    char uuid[TEXT], name[TEXT];
    unsigned long long total, reserved, other;
    unsigned int util, memutil;
    int present;                      /* 0: gone from the state file since init: GPU_IS_LOST */
} gpu_t;
typedef struct { char gpu[TEXT]; unsigned int pid; unsigned long long used; int graphics; } proc_t;
typedef struct { char fn[64]; char gpu[TEXT]; int code; } fail_t;   /* gpu "" = any */

typedef struct {
    int exists;
    char driver[80];
    int init_error;
    int ngpus, nprocs, nfails;
    gpu_t gpus[MAX_GPUS];
    proc_t procs[MAX_PROCS];
    fail_t fails[MAX_FAILS];
} state_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static state_t st;                    /* the file as last parsed */
static gpu_t slots[MAX_GPUS];         /* the devices enumerated at init */
static int nslots, refcount;
static struct stat seen;
static int seen_valid;

/* ---- parsing ---------------------------------------------------------------------------- */

static void complain(const char *path, int lineno, const char *what, const char *text) {
    fprintf(stderr, "fakenvml: %s:%d: %s: %s\n", path, lineno, what, text);
}

static int parse_u64(const char *s, unsigned long long *out) {
    if (!strcmp(s, "na")) { *out = VALUE_NOT_AVAILABLE; return 1; }
    char *end;
    if (!*s) return 0;
    *out = strtoull(s, &end, 0);
    return *end == 0;
}

static void copy_text(char *dst, size_t n, const char *src) { snprintf(dst, n, "%s", src); }

/* Splits "key=value key=value name=rest of line" in place; calls back per pair. */
typedef int (*pair_fn)(void *obj, const char *key, const char *value);
static int parse_pairs(char *p, pair_fn fn, void *obj, const char *path, int lineno) {
    int ok = 1;
    while (*p) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) break;
        char *eq = strchr(p, '=');
        if (!eq) { complain(path, lineno, "expected key=value", p); return 0; }
        *eq = 0;
        char *key = p, *value = eq + 1, *end;
        if (!strcmp(key, "name")) end = value + strlen(value);      /* the rest of the line */
        else end = value + strcspn(value, " \t");
        char saved = *end; *end = 0;
        if (!fn(obj, key, value)) { complain(path, lineno, "bad key or value", key); ok = 0; }
        if (!saved) break;
        p = end + 1;
    }
    return ok;
}

static int gpu_pair(void *obj, const char *key, const char *value) {
    gpu_t *g = obj;
    unsigned long long v = 0;
    if (!strcmp(key, "uuid")) { copy_text(g->uuid, sizeof g->uuid, value); return *value != 0; }
    if (!strcmp(key, "name")) { copy_text(g->name, sizeof g->name, value); return 1; }
    if (!parse_u64(value, &v)) return 0;
    if (!strcmp(key, "total")) g->total = v;
    else if (!strcmp(key, "reserved")) g->reserved = v;
    else if (!strcmp(key, "other")) g->other = v;
    else if (!strcmp(key, "util")) g->util = (unsigned int)v;
    else if (!strcmp(key, "memutil")) g->memutil = (unsigned int)v;
    else return 0;
    return 1;
}

static int proc_pair(void *obj, const char *key, const char *value) {
    proc_t *p = obj;
    unsigned long long v = 0;
    if (!strcmp(key, "gpu")) { copy_text(p->gpu, sizeof p->gpu, value); return 1; }
    if (!strcmp(key, "kind")) {
        p->graphics = !strcmp(value, "graphics");
        return p->graphics || !strcmp(value, "compute");
    }
    if (!parse_u64(value, &v)) return 0;
    if (!strcmp(key, "pid")) p->pid = (unsigned int)v;
    else if (!strcmp(key, "used")) p->used = v;
    else return 0;
    return 1;
}

static int fail_pair(void *obj, const char *key, const char *value) {
    fail_t *f = obj;
    if (!strcmp(key, "fn")) { copy_text(f->fn, sizeof f->fn, value); return 1; }
    if (!strcmp(key, "gpu")) { copy_text(f->gpu, sizeof f->gpu, strcmp(value, "-1") ? value : ""); return 1; }
    if (!strcmp(key, "code")) { f->code = (int)strtol(value, NULL, 0); return 1; }
    return 0;
}

/* A `gpu=` reference: a position among the file's gpu lines, or a uuid. Returns 0 if unknown. */
static int resolve(char *ref, const char *path) {
    if (!*ref) return 1;
    char *end;
    long i = strtol(ref, &end, 10);
    if (*end) return 1;                                 /* a uuid: keep it */
    if (i < 0 || i >= st.ngpus) { complain(path, 0, "no such gpu line", ref); return 0; }
    copy_text(ref, TEXT, st.gpus[i].uuid);
    return 1;
}

static void parse(FILE *f, const char *path) {
    memset(&st, 0, sizeof st);
    st.exists = 1;
    copy_text(st.driver, sizeof st.driver, "550.54.15");
    char line[1024];
    for (int lineno = 1; fgets(line, sizeof line, f); lineno++) {
        line[strcspn(line, "#\r\n")] = 0;
        size_t n = strlen(line);
        while (n && (line[n - 1] == ' ' || line[n - 1] == '\t')) line[--n] = 0;
        char *p = line + strspn(line, " \t");
        if (!*p) continue;
        char *rest = p + strcspn(p, " \t");
        if (*rest) *rest++ = 0;
        if (!strcmp(p, "driver")) {
            copy_text(st.driver, sizeof st.driver, rest + strspn(rest, " \t"));
        } else if (!strcmp(p, "init_error")) {
            st.init_error = atoi(rest);
        } else if (!strcmp(p, "gpu") && st.ngpus < MAX_GPUS) {
            gpu_t *g = &st.gpus[st.ngpus];
            snprintf(g->uuid, sizeof g->uuid, "GPU-fake-%04d", st.ngpus);
            snprintf(g->name, sizeof g->name, "Fake GPU %d", st.ngpus);
            g->present = 1;
            parse_pairs(rest, gpu_pair, g, path, lineno);
            st.ngpus++;
        } else if (!strcmp(p, "proc") && st.nprocs < MAX_PROCS) {
            proc_t *q = &st.procs[st.nprocs];
            copy_text(q->gpu, sizeof q->gpu, "0");
            if (parse_pairs(rest, proc_pair, q, path, lineno)) st.nprocs++;
        } else if (!strcmp(p, "fail") && st.nfails < MAX_FAILS) {
            fail_t *x = &st.fails[st.nfails];
            x->code = UNKNOWN;
            if (parse_pairs(rest, fail_pair, x, path, lineno) && x->fn[0]) st.nfails++;
        } else {
            complain(path, lineno, "unknown directive or too many entries", p);
        }
    }
    for (int k = 0; k < st.nprocs; k++) resolve(st.procs[k].gpu, path);
    for (int k = 0; k < st.nfails; k++) resolve(st.fails[k].gpu, path);
}

/* Re-reads the state file if it changed; updates the enumerated devices. Caller holds mu. */
static void reload(int force) {
    const char *path = getenv("FAKE_NVML_STATE");
    struct stat now;
    if (!path || stat(path, &now) != 0) {
        memset(&st, 0, sizeof st);
        seen_valid = 0;
    } else if (force || !seen_valid || now.st_dev != seen.st_dev || now.st_ino != seen.st_ino ||
               now.st_size != seen.st_size || now.st_mtim.tv_sec != seen.st_mtim.tv_sec ||
               now.st_mtim.tv_nsec != seen.st_mtim.tv_nsec ||
               now.st_ctim.tv_sec != seen.st_ctim.tv_sec || now.st_ctim.tv_nsec != seen.st_ctim.tv_nsec) {
        FILE *f = fopen(path, "r");
        if (!f) return;                                   /* keep the last state */
        parse(f, path);
        fclose(f);
        seen = now;
        seen_valid = 1;
    } else {
        return;
    }
    for (int i = 0; i < nslots; i++) {
        slots[i].present = 0;
        for (int k = 0; k < st.ngpus; k++)
            if (!strcmp(st.gpus[k].uuid, slots[i].uuid)) { slots[i] = st.gpus[k]; break; }
    }
}

/* ---- the API ---------------------------------------------------------------------------- */

static int fail_matches(const char *rule, const char *fn) {
    size_t n = strlen(rule);
    return !strncmp(rule, fn, n) && (fn[n] == 0 || (fn[n] == '_' && fn[n + 1] == 'v'));
}

/* An injected failure for fn on the device with this uuid (NULL: a call without a device). */
static nvmlReturn_t injected(const char *fn, const char *uuid) {
    for (int k = 0; k < st.nfails; k++)
        if (fail_matches(st.fails[k].fn, fn) &&
            (!st.fails[k].gpu[0] || (uuid && !strcmp(st.fails[k].gpu, uuid))))
            return (nvmlReturn_t)st.fails[k].code;
    return OK;
}

/* Common prologue: lock, check init, reload, validate the handle, apply injected failures.
 * Returns with mu held; *gpu is the device (NULL for calls without one). */
static nvmlReturn_t enter(const char *fn, nvmlDevice_t dev, gpu_t **gpu) {
    pthread_mutex_lock(&mu);
    if (refcount == 0) return UNINITIALIZED;
    reload(0);
    *gpu = NULL;
    if (dev) {
        uintptr_t p = (uintptr_t)dev;
        if (p < (uintptr_t)slots || p >= (uintptr_t)(slots + nslots) ||
            (p - (uintptr_t)slots) % sizeof(gpu_t))
            return INVALID_ARGUMENT;
        if (!dev->present) return GPU_IS_LOST;
        *gpu = dev;
    }
    return injected(fn, dev ? dev->uuid : NULL);
}
#define ENTER_AS(fn, dev) gpu_t *g = NULL; nvmlReturn_t rc = enter((fn), (dev), &g); (void)g; \
                          if (rc != OK) LEAVE(rc)
#define ENTER(dev) ENTER_AS(__func__, dev)
#define LEAVE(r) do { nvmlReturn_t r_ = (r); pthread_mutex_unlock(&mu); return r_; } while (0)

API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    reload(1);
    if (!st.exists) LEAVE(DRIVER_NOT_LOADED);
    if (st.init_error) LEAVE((nvmlReturn_t)st.init_error);
    if (refcount++ == 0) {
        nslots = st.ngpus;
        memcpy(slots, st.gpus, sizeof slots);
    }
    LEAVE(OK);
}
API nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
API nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

API nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&mu);
    if (refcount == 0) LEAVE(UNINITIALIZED);
    if (--refcount == 0) nslots = 0;
    LEAVE(OK);
}

API const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 15: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch";
    case 25: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t put_text(char *dst, unsigned int len, const char *src) {
    if (!dst) return INVALID_ARGUMENT;
    size_t n = strlen(src) + 1;
    if (n > len) return INSUFFICIENT_SIZE;
    memcpy(dst, src, n);
    return OK;
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER(NULL);
    LEAVE(put_text(version, length, st.driver));
}

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER(NULL);
    if (!count) LEAVE(INVALID_ARGUMENT);
    *count = (unsigned int)nslots;
    LEAVE(OK);
}
API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    pthread_mutex_lock(&mu);
    if (refcount == 0) LEAVE(UNINITIALIZED);
    reload(0);
    if (!device || index >= (unsigned int)nslots) LEAVE(INVALID_ARGUMENT);
    if (!slots[index].present) LEAVE(GPU_IS_LOST);
    nvmlReturn_t rc = injected(__func__, slots[index].uuid);
    if (rc != OK) LEAVE(rc);
    *device = &slots[index];
    LEAVE(OK);
}
API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    ENTER(NULL);
    if (!uuid || !device) LEAVE(INVALID_ARGUMENT);
    for (int i = 0; i < nslots; i++) {
        if (strcmp(slots[i].uuid, uuid)) continue;
        if (!slots[i].present) LEAVE(GPU_IS_LOST);
        *device = &slots[i];
        LEAVE(OK);
    }
    LEAVE(NOT_FOUND);
}

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    ENTER(device);
    if (!index) LEAVE(INVALID_ARGUMENT);
    *index = (unsigned int)(g - slots);
    LEAVE(OK);
}
API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER(device);
    LEAVE(put_text(name, length, g->name));
}
API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER(device);
    LEAVE(put_text(uuid, length, g->uuid));
}

static unsigned long long allocated(const gpu_t *g) {   /* v2 used; caller holds mu */
    unsigned long long used = g->other;
    for (int k = 0; k < st.nprocs; k++)
        if (!strcmp(st.procs[k].gpu, g->uuid) && st.procs[k].used != VALUE_NOT_AVAILABLE)
            used += st.procs[k].used;
    return used;
}
static unsigned long long headroom(const gpu_t *g, unsigned long long taken) {
    return g->total > taken ? g->total - taken : 0;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ENTER(device);
    if (!memory) LEAVE(INVALID_ARGUMENT);
    memory->total = g->total;
    memory->used = allocated(g) + g->reserved;
    memory->free = headroom(g, memory->used);
    LEAVE(OK);
}

#ifndef FAKE_NO_V3
API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ENTER(device);
    if (!memory) LEAVE(INVALID_ARGUMENT);
    if (memory->version != MEMORY_V2_VERSION) LEAVE(ARGUMENT_VERSION_MISMATCH);
    memory->total = g->total;
    memory->reserved = g->reserved;
    memory->used = allocated(g);
    memory->free = headroom(g, memory->used + g->reserved);
    LEAVE(OK);
}
#endif

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    ENTER(device);
    if (!utilization) LEAVE(INVALID_ARGUMENT);
    utilization->gpu = g->util;
    utilization->memory = g->memutil;
    LEAVE(OK);
}

/* NVML's contract: *count too small (0 with NULL infos, the first of pynvml's two calls) ->
 * INSUFFICIENT_SIZE with *count = the number needed; no processes -> SUCCESS with *count = 0. */
static nvmlReturn_t list(const char *fn, nvmlDevice_t device, unsigned int *count, void *infos,
                         int graphics, int v1) {
    ENTER_AS(fn, device);
    if (!count) LEAVE(INVALID_ARGUMENT);
    unsigned int n = 0;
    for (int k = 0; k < st.nprocs; k++)
        if (!strcmp(st.procs[k].gpu, g->uuid) && st.procs[k].graphics == graphics) n++;
    if (*count < n) { *count = n; LEAVE(INSUFFICIENT_SIZE); }
    if (n && !infos) LEAVE(INVALID_ARGUMENT);
    unsigned int j = 0;
    for (int k = 0; k < st.nprocs; k++) {
        const proc_t *p = &st.procs[k];
        if (strcmp(p->gpu, g->uuid) || p->graphics != graphics) continue;
        if (v1) {
            proc_v1_t *o = (proc_v1_t *)infos + j++;
            o->pid = p->pid; o->usedGpuMemory = p->used;
        } else {
            proc_v2_t *o = (proc_v2_t *)infos + j++;
            o->pid = p->pid; o->usedGpuMemory = p->used;
            o->gpuInstanceId = o->computeInstanceId = 0xFFFFFFFFu;   /* MIG off */
        }
    }
    *count = n;
    LEAVE(OK);
}
#define LIST(name, T, graphics) \
    API nvmlReturn_t name(nvmlDevice_t device, unsigned int *count, T *infos) { \
        return list(#name, device, count, infos, graphics, sizeof(T) == sizeof(proc_v1_t)); }
LIST(nvmlDeviceGetComputeRunningProcesses, proc_v1_t, 0)
LIST(nvmlDeviceGetComputeRunningProcesses_v2, proc_v2_t, 0)
LIST(nvmlDeviceGetGraphicsRunningProcesses, proc_v1_t, 1)
LIST(nvmlDeviceGetGraphicsRunningProcesses_v2, proc_v2_t, 1)
#ifndef FAKE_NO_V3
LIST(nvmlDeviceGetComputeRunningProcesses_v3, proc_v2_t, 0)
LIST(nvmlDeviceGetGraphicsRunningProcesses_v3, proc_v2_t, 1)
#endif
