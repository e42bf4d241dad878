/* Test program driven by tests/interpose.rs: runs under LD_PRELOAD=libgpuvisor_limiter.so over
 * the fake libcuda.so.1 and checks what an application sees. Exit status 0 = all checks passed;
 * a failed check prints "FAIL file:line: ..." to stderr and exits 1.
 * Modes: boundary Q | paths ROUTE | vmm ROUTE | vmmretain ROUTE | ctxlife ROUTE BYTES | capture ROUTE N M | legacy ROUTE N | gate PATH N | multidev N M | hold BYTES |
 * race CHUNK | latefree BYTES | nvml | ctx BYTES | rate SECS | fork */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long u64;
typedef void *CUstream, *CUfunction, *CUarray, *CUgraphExec, *CUcontext, *CUmemoryPool;
typedef struct { unsigned int w, h, fmt, ch; } DESC1;
typedef struct { size_t w, h; unsigned int fmt, ch; } DESC2;
typedef struct { unsigned int w, h, d, fmt, ch, flags; } DESC3D1;
typedef struct { size_t w, h, d; unsigned int fmt, ch, flags; } DESC3D2;
typedef struct { int type, handleTypes, locType, locId; void *win32; unsigned char flags[8]; } PROP;
typedef struct {
    CUfunction function;
    unsigned int gx, gy, gz, bx, by, bz, shared;
    CUstream stream;
    void **params;
} LAUNCH_PARAMS;

/* Linked directly (the "link" route). */
CUresult cuInit(unsigned int);
CUresult cuMemAlloc(unsigned int *, unsigned int);
CUresult cuMemFree(unsigned int);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemGetInfo(unsigned int *, unsigned int *);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuDeviceTotalMem_v2(size_t *, int);
CUresult cuMemAllocPitch(unsigned int *, unsigned int *, unsigned int, unsigned int, unsigned int);
CUresult cuArrayCreate(CUarray *, const DESC1 *);
CUresult cuArray3DCreate(CUarray *, const DESC3D1 *);
CUresult cuArrayDestroy(CUarray);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, int);
CUresult cuCtxCreate_v2(CUcontext *, unsigned int, int);
CUresult cuDevicePrimaryCtxRelease(int);
CUresult cuDevicePrimaryCtxReset(int);
CUresult cuCtxDestroy(CUcontext);
int fakecuda_primary_active(int);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void **, void **);
CUresult cuLaunch(CUfunction);
CUresult cuLaunchGrid(CUfunction, int, int);
CUresult cuLaunchGridAsync(CUfunction, int, int, CUstream);
CUresult cuLaunchCooperativeKernelMultiDevice(LAUNCH_PARAMS *, unsigned int, unsigned int);
CUresult cuLaunchHostFunc(CUstream, void (*)(void *), void *);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuCtxGetDevice(int *);
CUresult cuStreamCreate(CUstream *, unsigned int);
u64 fakecuda_mem_used(void);
u64 fakecuda_calls(const char *);

#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)

/* The entries one route resolves. */
typedef struct {
    CUresult (*memAlloc)(CUdeviceptr *, size_t);
    CUresult (*memFree)(CUdeviceptr);
    CUresult (*memGetInfo)(size_t *, size_t *);
    CUresult (*allocPitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
    CUresult (*allocManaged)(CUdeviceptr *, size_t, unsigned);
    CUresult (*allocAsync)(CUdeviceptr *, size_t, CUstream);
    CUresult (*allocPool)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUresult (*freeAsync)(CUdeviceptr, CUstream);
    CUresult (*memCreate)(u64 *, size_t, const PROP *, u64);
    CUresult (*memRelease)(u64);
    CUresult (*arrayCreate)(CUarray *, const DESC2 *);
    CUresult (*array3DCreate)(CUarray *, const DESC3D2 *);
    CUresult (*arrayDestroy)(CUarray);
    CUresult (*mipCreate)(void **, const DESC3D2 *, unsigned);
    CUresult (*mipDestroy)(void *);
    CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                       unsigned, CUstream, void **, void **);
    CUresult (*launchEx)(const void *, CUfunction, void **, void **);
    CUresult (*launchCoop)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           unsigned, CUstream, void **);
    CUresult (*graphLaunch)(CUgraphExec, CUstream);
} Api;

static void *cuda_handle(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    CHECK(h, "dlopen libcuda.so.1: %s", dlerror());
    return h;
}

static int g_ver;
static unsigned long long g_flags;
static CUresult (*g_gpa1)(const char *, void **, int, u64);
static CUresult (*g_gpa2)(const char *, void **, int, u64, int *);

static void *resolve(const char *route, const char *base, const char *versioned) {
    void *p = NULL;
    if (!strcmp(route, "dlsym")) {
        p = dlsym(cuda_handle(), versioned);
        CHECK(p, "dlsym %s", versioned);
    } else {
        int status = -1;
        CUresult rc = g_gpa2 ? g_gpa2(base, &p, g_ver, g_flags, &status)
                             : g_gpa1(base, &p, g_ver, g_flags);
        CHECK(rc == 0 && p, "cuGetProcAddress(%s, %d, %llu) = %d", base, g_ver, g_flags, rc);
        if (g_gpa2) CHECK(status == 0, "status %d", status);
    }
    return p;
}

static void setup_route(const char *route) {
    if (!strncmp(route, "gpa", 3)) {
        /* Like libcudart: dlopen + dlsym the entry point, then ask it for everything. */
        g_ver = atoi(route + 3) * 1000 + (atoi(route + 3) == 11 ? 80 : 0);
        g_flags = strstr(route, "ptds") ? 2 : 1;
        void *h = cuda_handle();
        if (g_ver >= 12000) {
            g_gpa2 = dlsym(h, "cuGetProcAddress_v2");
            CHECK(g_gpa2, "no cuGetProcAddress_v2");
        } else {
            g_gpa1 = dlsym(h, "cuGetProcAddress");
            CHECK(g_gpa1, "no cuGetProcAddress");
        }
        /* The entry point handed out by the hook must itself be the hook. */
        void *self = NULL;
        if (g_gpa2) {
            int st;
            CHECK(g_gpa2("cuGetProcAddress", &self, g_ver, 0, &st) == 0, "gpa self");
            CHECK(self == (void *)g_gpa2, "cuGetProcAddress_v2 not hooked through itself");
        }
    }
}

static Api api_for(const char *route) {
    Api a;
    int pt = !strncmp(route, "gpa", 3) && strstr(route, "ptds");
    int dl = !strcmp(route, "dlsym");
    if (!strcmp(route, "link")) {
        /* Only entries declared above are linked; the rest come through dlsym. */
        route = "dlsym";
        dl = 1;
    }
    setup_route(route);
#define R(field, base, ver) a.field = resolve(route, base, ver)
#define RP(field, base) a.field = resolve(route, base, (pt || (dl && 0)) ? base "_ptsz" : base)
    R(memAlloc, "cuMemAlloc", "cuMemAlloc_v2");
    R(memFree, "cuMemFree", "cuMemFree_v2");
    R(memGetInfo, "cuMemGetInfo", "cuMemGetInfo_v2");
    R(allocPitch, "cuMemAllocPitch", "cuMemAllocPitch_v2");
    R(allocManaged, "cuMemAllocManaged", "cuMemAllocManaged");
    RP(allocAsync, "cuMemAllocAsync");
    RP(allocPool, "cuMemAllocFromPoolAsync");
    RP(freeAsync, "cuMemFreeAsync");
    R(memCreate, "cuMemCreate", "cuMemCreate");
    R(memRelease, "cuMemRelease", "cuMemRelease");
    R(arrayCreate, "cuArrayCreate", "cuArrayCreate_v2");
    R(array3DCreate, "cuArray3DCreate", "cuArray3DCreate_v2");
    R(arrayDestroy, "cuArrayDestroy", "cuArrayDestroy");
    R(mipCreate, "cuMipmappedArrayCreate", "cuMipmappedArrayCreate");
    R(mipDestroy, "cuMipmappedArrayDestroy", "cuMipmappedArrayDestroy");
    RP(launch, "cuLaunchKernel");
    RP(launchEx, "cuLaunchKernelEx");
    RP(launchCoop, "cuLaunchCooperativeKernel");
    RP(graphLaunch, "cuGraphLaunch");
    (void)dl;
    return a;
}

static size_t g_last_free;
static Api g_api;

static size_t free_now(void) {
    size_t f = 0, t = 0;
    CHECK(g_api.memGetInfo(&f, &t) == 0, "cuMemGetInfo");
    return f;
}

/* The allocation just made must have taken exactly `bytes` from the quota. */
static void expect_taken(const char *what, u64 bytes) {
    size_t f = free_now();
    CHECK(g_last_free - f == bytes, "%s: free went %zu -> %zu, expected -%llu", what, g_last_free,
          f, bytes);
    g_last_free = f;
}

static void expect_given_back(const char *what, u64 bytes) {
    size_t f = free_now();
    CHECK(f - g_last_free == bytes, "%s: free went %zu -> %zu, expected +%llu", what, g_last_free,
          f, bytes);
    g_last_free = f;
}

static u64 calls(const char *name) { return fakecuda_calls(name); }

static int mode_paths(const char *route, int launches) {
    cuInit(0);
    g_api = api_for(route);
    int pt = strstr(route, "ptds") != NULL;
    g_last_free = free_now();
    CUdeviceptr p;
    size_t pitch;
    u64 before;

    CHECK(g_api.memAlloc(&p, 1 << 20) == 0, "alloc");
    expect_taken("cuMemAlloc_v2", 1 << 20);
    CHECK(g_api.memFree(p) == 0, "free");
    expect_given_back("cuMemFree_v2", 1 << 20);

    CHECK(g_api.allocPitch(&p, &pitch, 1000, 10, 4) == 0, "pitch");
    CHECK(pitch == 1024, "pitch %zu", pitch);
    expect_taken("cuMemAllocPitch_v2", 1024 * 10);
    CHECK(g_api.memFree(p) == 0, "free");
    expect_given_back("free pitched", 1024 * 10);

    CHECK(g_api.allocManaged(&p, 3000, 1) == 0, "managed");
    expect_taken("cuMemAllocManaged", 3000);
    CHECK(g_api.memFree(p) == 0, "free");
    expect_given_back("free managed", 3000);

    before = calls(pt ? "cuMemAllocAsync_ptsz" : "cuMemAllocAsync");
    CHECK(g_api.allocAsync(&p, 5000, NULL) == 0, "async");
    expect_taken("cuMemAllocAsync", 5000);
    CHECK(calls(pt ? "cuMemAllocAsync_ptsz" : "cuMemAllocAsync") == before + 1, "async variant");
    before = calls(pt ? "cuMemFreeAsync_ptsz" : "cuMemFreeAsync");
    CHECK(g_api.freeAsync(p, NULL) == 0, "free async");
    expect_given_back("cuMemFreeAsync", 5000);
    CHECK(calls(pt ? "cuMemFreeAsync_ptsz" : "cuMemFreeAsync") == before + 1, "free variant");

    CHECK(g_api.allocPool(&p, 7000, NULL, NULL) == 0, "pool");
    expect_taken("cuMemAllocFromPoolAsync", 7000);
    CHECK(g_api.freeAsync(p, NULL) == 0, "free pool");
    expect_given_back("free pool", 7000);

    u64 h;
    PROP prop = {.type = 1, .locType = 1, .locId = 0};
    CHECK(g_api.memCreate(&h, 2 << 20, &prop, 0) == 0, "cuMemCreate");
    expect_taken("cuMemCreate", 2 << 20);
    CHECK(g_api.memRelease(h) == 0, "cuMemRelease");
    expect_given_back("cuMemRelease", 2 << 20);

    CUarray arr;
    DESC2 d2 = {.w = 64, .h = 32, .fmt = 0x20, .ch = 4};
    CHECK(g_api.arrayCreate(&arr, &d2) == 0, "cuArrayCreate_v2");
    expect_taken("cuArrayCreate_v2", 64 * 32 * 16);
    CHECK(g_api.arrayDestroy(arr) == 0, "destroy");
    expect_given_back("cuArrayDestroy", 64 * 32 * 16);

    DESC3D2 d3 = {.w = 16, .h = 16, .d = 16, .fmt = 0x02, .ch = 1};
    CHECK(g_api.array3DCreate(&arr, &d3) == 0, "cuArray3DCreate_v2");
    expect_taken("cuArray3DCreate_v2", 16 * 16 * 16 * 2);
    CHECK(g_api.arrayDestroy(arr) == 0, "destroy 3d");
    expect_given_back("destroy 3d", 16 * 16 * 16 * 2);

    void *mip;
    CHECK(g_api.mipCreate(&mip, &d3, 2) == 0, "cuMipmappedArrayCreate");
    expect_taken("cuMipmappedArrayCreate", (16 * 16 * 16 + 8 * 8 * 8) * 2);
    CHECK(g_api.mipDestroy(mip) == 0, "mip destroy");
    expect_given_back("mip destroy", (16 * 16 * 16 + 8 * 8 * 8) * 2);

    const char *lk = pt ? "cuLaunchKernel_ptsz" : "cuLaunchKernel";
    u64 b0 = calls(lk);
    for (int i = 0; i < launches; i++) {
        CHECK(g_api.launch(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL) == 0, "launch");
        CHECK(g_api.launchEx(NULL, NULL, NULL, NULL) == 0, "launchEx");
        CHECK(g_api.launchCoop(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL) == 0, "coop");
        CHECK(g_api.graphLaunch(NULL, NULL) == 0, "graph");
    }
    CHECK(calls(lk) == b0 + launches, "%s called %llu times", lk, calls(lk) - b0);
    CHECK(fakecuda_mem_used() == 0, "double still holds %llu", fakecuda_mem_used());
    printf("OK %s\n", route);
    return 0;
}

/* CUDA graphs by stream capture: launches into a capturing stream record nodes and run nothing,
 * so they must neither wait at the gate nor count; each replay (cuGraphLaunch) counts once.
 * n launches before the capture, n of each kernel launch kind captured, m replays. */
typedef struct {
    unsigned gx, gy, gz, bx, by, bz, shared;
    CUstream stream;
    void *attrs;
    unsigned nattrs;
} LAUNCH_CONFIG;
CUresult cuStreamBeginCapture(CUstream);

static int mode_capture(const char *route, int n, int m) {
    cuInit(0);
    int link = !strcmp(route, "link");
    g_api = api_for(route);
    int pt = strstr(route, "ptds") != NULL;
    CUresult (*begin)(CUstream, int) = NULL;
    CUresult (*end)(CUstream, void **);
    if (!link) begin = resolve(route, "cuStreamBeginCapture", pt ? "cuStreamBeginCapture_v2_ptsz" : "cuStreamBeginCapture_v2");
    end = resolve(link ? "dlsym" : route, "cuStreamEndCapture", pt ? "cuStreamEndCapture_ptsz" : "cuStreamEndCapture");
    CUstream s;
    CHECK(cuStreamCreate(&s, 0) == 0, "stream");
    u64 q0 = calls("cuStreamIsCapturing") + calls("cuStreamIsCapturing_ptsz");
    for (int i = 0; i < n; i++)
        CHECK(g_api.launch(NULL, 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL) == 0, "launch");
    CHECK(calls("cuStreamIsCapturing") + calls("cuStreamIsCapturing_ptsz") == q0,
          "a launch asked the driver about capture while nothing was being captured");
    CHECK((link ? cuStreamBeginCapture(s) : begin(s, 0)) == 0, "begin capture");
    LAUNCH_CONFIG cfg = {.gx = 1, .gy = 1, .gz = 1, .bx = 1, .by = 1, .bz = 1, .stream = s};
    const char *lk = pt ? "cuLaunchKernel_ptsz" : "cuLaunchKernel";
    u64 k0 = calls(lk);
    for (int i = 0; i < n; i++) {
        CHECK(g_api.launch(NULL, 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL) == 0, "captured launch");
        CHECK(g_api.launchEx(&cfg, NULL, NULL, NULL) == 0, "captured launchEx");
        CHECK(g_api.launchCoop(NULL, 1, 1, 1, 1, 1, 1, 0, s, NULL) == 0, "captured coop");
    }
    CHECK(calls(lk) == k0 + n, "captured launches must still reach the driver");
    void *graph = NULL;
    CHECK(end(s, &graph) == 0 && graph, "end capture");
    u64 q1 = calls("cuStreamIsCapturing") + calls("cuStreamIsCapturing_ptsz");
    for (int i = 0; i < m; i++) CHECK(g_api.graphLaunch(graph, s) == 0, "replay");
    CHECK(calls("cuStreamIsCapturing") + calls("cuStreamIsCapturing_ptsz") == q1,
          "after the capture ended, launches still ask the driver");
    /* A failed begin (the legacy stream cannot capture) leaves nothing counted in flight. */
    if (!link) CHECK(begin((CUstream)1, 0) != 0, "capture on the legacy stream must fail");
    for (int i = 0; i < n; i++)
        CHECK(g_api.launch(NULL, 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL) == 0, "launch after");
    CHECK(calls("cuStreamIsCapturing") + calls("cuStreamIsCapturing_ptsz") == q1,
          "a failed begin left a capture counted");
    printf("OK capture %s\n", route);
    return 0;
}

/* Virtual memory management: the driver frees a cuMemCreate allocation when its handle is
 * released and its last mapping unmapped, in either order; the charge must last as long. */
static int mode_vmm(const char *route) {
    cuInit(0);
    g_api = api_for(route);
    CUresult (*map)(CUdeviceptr, size_t, size_t, u64, u64) = resolve(route, "cuMemMap", "cuMemMap");
    CUresult (*unmap)(CUdeviceptr, size_t) = resolve(route, "cuMemUnmap", "cuMemUnmap");
    const size_t G = 2 << 20;
    const CUdeviceptr VA = 0x900000000000ull, VB = 0x910000000000ull;
    PROP prop = {.type = 1, .locType = 1, .locId = 0};
    u64 h1, h2, h3;
    g_last_free = free_now();

    /* create, map, release at once (the documented idiom), use, unmap */
    CHECK(g_api.memCreate(&h1, G, &prop, 0) == 0, "create");
    expect_taken("cuMemCreate", G);
    CHECK(map(VA, G, 0, h1, 0) == 0, "map");
    CHECK(g_api.memRelease(h1) == 0, "release while mapped");
    expect_taken("release while mapped (memory still in use)", 0);
    CHECK(fakecuda_mem_used() == G, "the double freed a mapped allocation");
    CHECK(unmap(VB, G) != 0, "unmapping nothing must fail");
    expect_taken("failed unmap", 0);
    CHECK(unmap(VA, G) == 0, "unmap");
    expect_given_back("last unmap of a released handle", G);
    CHECK(fakecuda_mem_used() == 0, "double still holds %llu", fakecuda_mem_used());

    /* one handle mapped twice, a second handle next to it, one unmap over two mappings */
    CHECK(g_api.memCreate(&h2, G, &prop, 0) == 0 && g_api.memCreate(&h3, G, &prop, 0) == 0, "create");
    expect_taken("two handles", 2 * G);
    CHECK(map(VA, G, 0, h2, 0) == 0 && map(VA + G, G, 0, h3, 0) == 0 && map(VB, G, 0, h2, 0) == 0,
          "maps");
    CHECK(g_api.memRelease(h2) == 0 && g_api.memRelease(h3) == 0, "release");
    expect_taken("released, all mapped", 0);
    CHECK(unmap(VA, 2 * G) == 0, "unmap two mappings");
    expect_given_back("h3 fully unmapped, h2 still mapped", G);
    CHECK(unmap(VB, G) == 0, "unmap");
    expect_given_back("h2 unmapped", G);

    /* unmap first, release last (PyTorch expandable segments, vLLM) */
    CHECK(g_api.memCreate(&h1, G, &prop, 0) == 0 && map(VA, G, 0, h1, 0) == 0, "create+map");
    expect_taken("create", G);
    CHECK(unmap(VA, G) == 0, "unmap");
    expect_taken("unmapped, handle held", 0);
    CHECK(g_api.memRelease(h1) == 0, "release");
    expect_given_back("release after unmap", G);
    CHECK(fakecuda_mem_used() == 0, "double still holds %llu", fakecuda_mem_used());
    printf("OK vmm %s\n", route);
    return 0;
}

/* cuMemRetainAllocationHandle takes one more reference to a mapped allocation's handle: the
 * driver frees the memory only when every reference is released and the last mapping unmapped. */
static int mode_vmmretain(const char *route) {
    cuInit(0);
    g_api = api_for(route);
    CUresult (*map)(CUdeviceptr, size_t, size_t, u64, u64) = resolve(route, "cuMemMap", "cuMemMap");
    CUresult (*unmap)(CUdeviceptr, size_t) = resolve(route, "cuMemUnmap", "cuMemUnmap");
    CUresult (*retain)(u64 *, void *) =
        resolve(route, "cuMemRetainAllocationHandle", "cuMemRetainAllocationHandle");
    u64 b0 = calls("cuMemRetainAllocationHandle");
    const size_t G = 2 << 20;
    const CUdeviceptr VA = 0x920000000000ull;
    PROP prop = {.type = 1, .locType = 1, .locId = 0};
    u64 h, r;
    g_last_free = free_now();

    /* create, map, retain, unmap, release the retained reference: the first one still holds it */
    CHECK(g_api.memCreate(&h, G, &prop, 0) == 0 && map(VA, G, 0, h, 0) == 0, "create+map");
    expect_taken("cuMemCreate", G);
    CHECK(retain(&r, (void *)(VA + 4096)) == 0 && r == h, "retain");
    CHECK(unmap(VA, G) == 0, "unmap");
    CHECK(g_api.memRelease(r) == 0, "release the retained reference");
    expect_taken("retained reference released, first one held", 0);
    CHECK(fakecuda_mem_used() == G, "the double freed a referenced allocation");
    CHECK(g_api.memRelease(h) == 0, "release");
    expect_given_back("last reference released", G);

    /* NCCL's free: retain, release, unmap, release */
    CHECK(g_api.memCreate(&h, G, &prop, 0) == 0 && map(VA, G, 0, h, 0) == 0, "create+map");
    expect_taken("cuMemCreate", G);
    CHECK(retain(&r, (void *)VA) == 0 && r == h, "retain");
    CHECK(g_api.memRelease(h) == 0, "release");
    CHECK(unmap(VA, G) == 0, "unmap");
    expect_taken("unmapped, the retained reference holds it", 0);
    CHECK(fakecuda_mem_used() == G, "the double freed a referenced allocation");
    CHECK(g_api.memRelease(r) == 0, "release the retained reference");
    expect_given_back("last reference released", G);

    /* every reference released while mapped, then a new one taken from the mapping */
    CHECK(g_api.memCreate(&h, G, &prop, 0) == 0 && map(VA, G, 0, h, 0) == 0, "create+map");
    expect_taken("cuMemCreate", G);
    CHECK(g_api.memRelease(h) == 0, "release while mapped");
    CHECK(retain(&r, (void *)VA) == 0 && r == h, "retain from the mapping");
    CHECK(unmap(VA, G) == 0, "unmap");
    expect_taken("unmapped, the new reference holds it", 0);
    CHECK(g_api.memRelease(r) == 0, "release");
    expect_given_back("last reference released", G);
    CHECK(g_api.memRelease(r) != 0, "a release too many must fail");
    expect_taken("failed release", 0);
    CHECK(retain(&r, (void *)VA) != 0, "retain of an unmapped address must fail");
    CHECK(calls("cuMemRetainAllocationHandle") == b0 + 4, "retains reached the driver %llu times",
          calls("cuMemRetainAllocationHandle") - b0);
    CHECK(fakecuda_mem_used() == 0, "double still holds %llu", fakecuda_mem_used());
    printf("OK vmmretain %s\n", route);
    return 0;
}

/* The context footprint lasts as long as a context on the device: given back by the destroy of
 * the last created context, the release of the primary context's last reference, or its reset;
 * charged again by the next retain or create; never given back twice. Leaves one created context
 * at exit (given back with the slot). */
static int mode_ctxlife(const char *route, u64 cb) {
    cuInit(0);
    int link = !strcmp(route, "link");
    g_api = api_for(route);
    CUresult (*retain)(CUcontext *, int);
    CUresult (*release)(int);
    CUresult (*reset)(int);
    CUresult (*create)(CUcontext *, unsigned int, int);
    CUresult (*destroy)(CUcontext);
    const char *rel_name = link ? "cuDevicePrimaryCtxRelease" : "cuDevicePrimaryCtxRelease_v2";
    const char *destroy_name = link ? "cuCtxDestroy" : "cuCtxDestroy_v2";
    if (link) {
        /* Called by name: the v1 entries. */
        retain = cuDevicePrimaryCtxRetain;
        release = cuDevicePrimaryCtxRelease;
        reset = cuDevicePrimaryCtxReset;
        create = cuCtxCreate_v2;
        destroy = cuCtxDestroy;
    } else {
        retain = resolve(route, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain");
        release = resolve(route, "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2");
        reset = resolve(route, "cuDevicePrimaryCtxReset", "cuDevicePrimaryCtxReset_v2");
        /* cuGetProcAddress answers cuCtxCreate_v3/_v4 (other ABIs) for 11.4+: by name here. */
        create = resolve("dlsym", "cuCtxCreate", "cuCtxCreate_v2");
        destroy = resolve(route, "cuCtxDestroy", "cuCtxDestroy_v2");
    }
    u64 r0 = calls(rel_name), d0 = calls(destroy_name);
    CUcontext p, c1, c2;
    g_last_free = free_now();

    /* primary: two references, the last release destroys it */
    CHECK(retain(&p, 0) == 0, "retain");
    expect_taken("retain", cb);
    CHECK(retain(&p, 0) == 0, "retain again");
    expect_taken("second reference", 0);
    CHECK(release(0) == 0, "release");
    expect_taken("one reference left", 0);
    CHECK(release(0) == 0 && !fakecuda_primary_active(0), "last release");
    expect_given_back("last release", cb);
    CHECK(release(0) != 0, "a release too many must fail");
    expect_taken("failed release", 0);

    /* reset destroys the context but keeps the references; a retain re-creates it */
    CHECK(retain(&p, 0) == 0, "retain");
    expect_taken("retain after release", cb);
    CHECK(reset(0) == 0 && !fakecuda_primary_active(0), "reset");
    expect_given_back("reset", cb);
    CHECK(retain(&p, 0) == 0 && fakecuda_primary_active(0), "retain after reset");
    expect_taken("retain after reset", cb);
    CHECK(release(0) == 0, "release the reference from before the reset");
    expect_taken("a reference is left", 0);
    CHECK(release(0) == 0, "release");
    expect_given_back("last release after reset", cb);
    CHECK(reset(0) == 0, "reset with no context");
    CHECK(release(0) != 0, "no reference left");
    expect_taken("reset of an inactive context", 0);

    /* created contexts: the footprint lasts until the last is destroyed, once */
    CHECK(create(&c1, 0, 0) == 0, "create");
    expect_taken("create", cb);
    CHECK(create(&c2, 0, 0) == 0 && c2 != c1, "create another");
    expect_taken("second context", 0);
    CHECK(destroy(c1) == 0, "destroy");
    expect_taken("one context left", 0);
    CHECK(destroy(c1) != 0, "a destroyed context cannot be destroyed again");
    expect_taken("failed destroy", 0);
    CHECK(destroy(c2) == 0, "destroy");
    expect_given_back("last context destroyed", cb);

    /* a primary and a created context on one device */
    CHECK(retain(&p, 0) == 0 && create(&c1, 0, 0) == 0, "retain+create");
    expect_taken("retain+create", cb);
    CHECK(release(0) == 0, "release");
    expect_taken("created context left", 0);
    CHECK(destroy(p) != 0, "the primary context is not destroyed by cuCtxDestroy");
    CHECK(destroy(c1) == 0, "destroy");
    expect_given_back("both gone", cb);

    CHECK(calls(rel_name) == r0 + 7, "%s reached %llu times", rel_name, calls(rel_name) - r0);
    CHECK(calls(destroy_name) == d0 + 5, "%s reached %llu times", destroy_name,
          calls(destroy_name) - d0);
    /* left at exit */
    CHECK(create(&c2, 0, 0) == 0, "create");
    expect_taken("create", cb);
    printf("OK ctxlife %s\n", route);
    return 0;
}

/* The legacy launch API, and cuLaunchHostFunc (a host function: must not pass the gate). */
typedef struct {
    CUresult (*launch)(CUfunction);
    CUresult (*grid)(CUfunction, int, int);
    CUresult (*gridAsync)(CUfunction, int, int, CUstream);
    CUresult (*multi)(LAUNCH_PARAMS *, unsigned int, unsigned int);
    CUresult (*hostFunc)(CUstream, void (*)(void *), void *);
} Legacy;

static Legacy legacy_for(const char *route) {
    Legacy l;
    if (!strcmp(route, "link")) {
        /* Called by name: the dynamic linker binds them to the preloaded limiter. */
        l.launch = cuLaunch;
        l.grid = cuLaunchGrid;
        l.gridAsync = cuLaunchGridAsync;
        l.multi = cuLaunchCooperativeKernelMultiDevice;
        l.hostFunc = cuLaunchHostFunc;
        return l;
    }
    setup_route(route);
    int pt = !strncmp(route, "gpa", 3) && strstr(route, "ptds");
    /* No _v2 and no _ptsz exists for these: every route names the one entry. */
    l.launch = resolve(route, "cuLaunch", "cuLaunch");
    l.grid = resolve(route, "cuLaunchGrid", "cuLaunchGrid");
    l.gridAsync = resolve(route, "cuLaunchGridAsync", "cuLaunchGridAsync");
    l.multi = resolve(route, "cuLaunchCooperativeKernelMultiDevice",
                      "cuLaunchCooperativeKernelMultiDevice");
    l.hostFunc = resolve(route, "cuLaunchHostFunc", pt ? "cuLaunchHostFunc_ptsz" : "cuLaunchHostFunc");
    return l;
}

static void host_fn(void *p) { (*(int *)p)++; }

static int mode_legacy(const char *route, int n) {
    cuInit(0);
    Legacy l = legacy_for(route);
    int pt = strstr(route, "ptds") != NULL;
    CUstream s;
    CHECK(cuStreamCreate(&s, 0) == 0, "stream");
    LAUNCH_PARAMS lp = {.gx = 1, .gy = 1, .gz = 1, .bx = 1, .by = 1, .bz = 1, .stream = s};
    const char *names[] = {"cuLaunch", "cuLaunchGrid", "cuLaunchGridAsync",
                           "cuLaunchCooperativeKernelMultiDevice"};
    const char *hf = pt ? "cuLaunchHostFunc_ptsz" : "cuLaunchHostFunc";
    u64 before[4], hb = calls(hf);
    for (int k = 0; k < 4; k++) before[k] = calls(names[k]);
    int ran = 0;
    for (int i = 0; i < n; i++) {
        CHECK(l.launch(NULL) == 0, "cuLaunch");
        CHECK(l.grid(NULL, 2, 3) == 0, "cuLaunchGrid");
        CHECK(l.gridAsync(NULL, 2, 3, s) == 0, "cuLaunchGridAsync");
        CHECK(l.multi(&lp, 1, 0) == 0, "cuLaunchCooperativeKernelMultiDevice");
        CHECK(l.hostFunc(s, host_fn, &ran) == 0, "cuLaunchHostFunc");
    }
    for (int k = 0; k < 4; k++)
        CHECK(calls(names[k]) == before[k] + n, "%s reached %llu times", names[k],
              calls(names[k]) - before[k]);
    CHECK(calls(hf) == hb + n && ran == n, "%s: %llu calls, host function ran %d times", hf,
          calls(hf) - hb, ran);
    printf("OK legacy %s\n", route);
    return 0;
}

/* Devices from streams and contexts: a multi-device launch passes each stream's device's gate,
 * every other launch the current context's device's. */
static int mode_multidev(int n, int m) {
    cuInit(0);
    CUcontext c0, c1;
    CUstream s0, s1;
    CHECK(cuDevicePrimaryCtxRetain(&c0, 0) == 0 && cuDevicePrimaryCtxRetain(&c1, 1) == 0, "retain");
    CHECK(cuCtxSetCurrent(c1) == 0 && cuStreamCreate(&s1, 0) == 0, "stream on device 1");
    CHECK(cuCtxSetCurrent(c0) == 0 && cuStreamCreate(&s0, 0) == 0, "stream on device 0");
    LAUNCH_PARAMS lp[2] = {
        {.gx = 1, .gy = 1, .gz = 1, .bx = 1, .by = 1, .bz = 1, .stream = s0},
        {.gx = 1, .gy = 1, .gz = 1, .bx = 1, .by = 1, .bz = 1, .stream = s1},
    };
    for (int i = 0; i < n; i++)
        CHECK(cuLaunchCooperativeKernelMultiDevice(lp, 2, 0) == 0, "multi-device launch");
    int d = -1;
    CHECK(cuCtxGetDevice(&d) == 0 && d == 0, "the caller's current context changed (device %d)", d);
    CHECK(cuCtxSetCurrent(c1) == 0, "set current 1");
    for (int i = 0; i < m; i++) {
        CHECK(cuLaunch(NULL) == 0, "cuLaunch");
        CHECK(cuLaunchGrid(NULL, 1, 1) == 0, "cuLaunchGrid");
        CHECK(cuLaunchGridAsync(NULL, 1, 1, s1) == 0, "cuLaunchGridAsync");
    }
    printf("OK multidev getdevice=%llu getctx=%llu\n", calls("cuStreamGetDevice"),
           calls("cuStreamGetCtx"));
    return 0;
}

/* The 32-bit-pointer ABIs of CUDA 2.x, reached by linking and by cuGetProcAddress(…, 3000…). */
static int mode_v1(void) {
    cuInit(0);
    g_api = api_for("dlsym");
    g_last_free = free_now();
    unsigned int p32, pitch32, f32, t32;
    CHECK(cuMemAlloc(&p32, 4096) == 0, "cuMemAlloc v1");
    CHECK(p32 != 0, "v1 pointer");
    expect_taken("cuMemAlloc", 4096);
    CHECK(cuMemGetInfo(&f32, &t32) == 0, "cuMemGetInfo v1");
    CHECK(f32 == g_last_free, "v1 free %u vs %zu", f32, g_last_free);
    CHECK(cuMemFree(p32) == 0, "cuMemFree v1");
    expect_given_back("cuMemFree", 4096);
    CHECK(cuMemAllocPitch(&p32, &pitch32, 100, 4, 4) == 0, "pitch v1");
    expect_taken("cuMemAllocPitch", 512 * 4);
    CHECK(cuMemFree(p32) == 0, "free pitch v1");
    expect_given_back("free pitch v1", 512 * 4);
    CUarray a;
    DESC1 d1 = {.w = 10, .h = 10, .fmt = 0x01, .ch = 2};
    CHECK(cuArrayCreate(&a, &d1) == 0, "cuArrayCreate v1");
    expect_taken("cuArrayCreate", 200);
    CHECK(cuArrayDestroy(a) == 0, "destroy");
    expect_given_back("destroy", 200);
    DESC3D1 d3 = {.w = 4, .h = 4, .d = 4, .fmt = 0x20, .ch = 1};
    CHECK(cuArray3DCreate(&a, &d3) == 0, "cuArray3DCreate v1");
    expect_taken("cuArray3DCreate", 256);
    CHECK(cuArrayDestroy(a) == 0, "destroy");
    expect_given_back("destroy", 256);

    /* cuGetProcAddress asked for the CUDA 3.0 ABI must hand out the v1 entry (hooked). */
    CUresult (*gpa)(const char *, void **, int, u64, int *) =
        dlsym(cuda_handle(), "cuGetProcAddress_v2");
    CHECK(gpa, "gpa");
    CUresult (*alloc1)(unsigned int *, unsigned int) = NULL;
    int st;
    CHECK(gpa("cuMemAlloc", (void **)&alloc1, 3000, 0, &st) == 0, "gpa v1");
    u64 before = calls("cuMemAlloc");
    CHECK(alloc1(&p32, 8192) == 0, "v1 via gpa");
    CHECK(calls("cuMemAlloc") == before + 1, "v1 entry not the one called");
    expect_taken("cuMemAlloc via gpa 3000", 8192);
    CHECK(cuMemFree(p32) == 0, "free");
    printf("OK v1\n");
    return 0;
}

static int mode_boundary(u64 q) {
    cuInit(0);
    size_t f, t, total;
    CHECK(cuMemGetInfo_v2(&f, &t) == 0, "info");
    CHECK(t == q && f == q, "cuMemGetInfo reports free %zu total %zu, quota %llu", f, t, q);
    CHECK(cuDeviceTotalMem_v2(&total, 0) == 0 && total == q, "cuDeviceTotalMem %zu", total);
    CUdeviceptr a, b, c;
    CHECK(cuMemAlloc_v2(&a, q) == 0, "alloc exactly the quota");
    u64 held = fakecuda_mem_used();
    CHECK(cuMemAlloc_v2(&b, 1) == 2, "one byte over must be CUDA_ERROR_OUT_OF_MEMORY");
    CHECK(fakecuda_mem_used() == held, "refused allocation reached the driver");
    CHECK(cuMemFree_v2(a) == 0, "free");
    CHECK(cuMemAlloc_v2(&a, q - 1) == 0, "q-1");
    CHECK(cuMemAlloc_v2(&b, 1) == 0, "last byte");
    CHECK(cuMemAlloc_v2(&c, 1) == 2, "over by one");
    CHECK(cuMemGetInfo_v2(&f, &t) == 0 && f == 0, "free %zu at quota", f);
    CHECK(cuMemFree_v2(a) == 0 && cuMemFree_v2(b) == 0, "free");
    CHECK(cuMemFree_v2(0xdead) != 0, "bogus free must fail");
    CHECK(cuMemGetInfo_v2(&f, &t) == 0 && f == q, "all given back: free %zu", f);
    printf("OK boundary\n");
    return 0;
}

/* One allocation of `bytes`: "GOT" and exit 0 if the driver gave it, "REFUSED <rc>" and exit 1
 * if not (the attack tests: an allocation over the quota must not succeed). */
static int mode_grab(u64 bytes) {
    cuInit(0);
    CUdeviceptr p;
    CUresult rc = cuMemAlloc_v2(&p, bytes);
    if (rc == 0) {
        printf("GOT %llu\n", bytes);
        return 0;
    }
    printf("REFUSED %d\n", rc);
    return 1;
}

/* `grabvmm N`: the same through cuMemCreate (by dlsym). */
static int mode_grabvmm(u64 bytes) {
    cuInit(0);
    g_api = api_for("dlsym");
    PROP prop = {.type = 1, .locType = 1, .locId = 0};
    u64 h;
    CUresult rc = g_api.memCreate(&h, bytes, &prop, 0);
    if (rc == 0) {
        printf("GOT %llu\n", bytes);
        return 0;
    }
    printf("REFUSED %d\n", rc);
    return 1;
}

/* The quota still holds: total reported is q, one byte over q is refused. */
static int mode_over(u64 q) {
    cuInit(0);
    size_t f, t;
    CHECK(cuMemGetInfo_v2(&f, &t) == 0, "info");
    CHECK(t == q, "cuMemGetInfo total %zu, quota %llu", t, q);
    CUdeviceptr a;
    CHECK(cuMemAlloc_v2(&a, q + 1) == 2, "an allocation over the quota succeeded");
    printf("OK over\n");
    return 0;
}

static int mode_hold(u64 bytes) {
    cuInit(0);
    CUdeviceptr p;
    CHECK(cuMemAlloc_v2(&p, bytes) == 0, "hold alloc");
    printf("HELD\n");
    fflush(stdout);
    for (;;) pause();
}

/* An atexit handler registered before the limiter started (so it runs after the limiter's own)
 * frees memory at exit, as C++ static destructors of libraries loaded early do. */
static CUdeviceptr g_late;
static void late_free(void) {
    if (cuMemFree_v2(g_late) != 0) _exit(3);
}

static int mode_latefree(u64 bytes) {
    CHECK(atexit(late_free) == 0, "atexit");
    cuInit(0);
    CHECK(cuMemAlloc_v2(&g_late, bytes) == 0, "alloc");
    printf("OK latefree\n");
    return 0;
}

static int mode_race(u64 chunk) {
    cuInit(0);
    int n = 0;
    CUdeviceptr p;
    CUresult rc;
    while ((rc = cuMemAlloc_v2(&p, chunk)) == 0) n++;
    CHECK(rc == 2, "stopped with %d", rc);
    printf("GOT %d\n", n);
    fflush(stdout);
    char buf[8];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}

typedef struct { unsigned long long total, free, used; } NVMEM;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } NVMEM2;

static int mode_nvml(u64 q) {
    cuInit(0);
    CUdeviceptr p;
    CHECK(cuMemAlloc_v2(&p, 12345) == 0, "alloc");
    void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    CHECK(h, "dlopen nvml");
    int (*init)(void) = dlsym(h, "nvmlInit_v2");
    int (*get)(unsigned, void **) = dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
    int (*mem)(void *, NVMEM *) = dlsym(h, "nvmlDeviceGetMemoryInfo");
    int (*mem2)(void *, NVMEM2 *) = dlsym(h, "nvmlDeviceGetMemoryInfo_v2");
    CHECK(init && get && mem && mem2, "nvml symbols");
    void *dev;
    CHECK(init() == 0 && get(0, &dev) == 0, "nvml device");
    NVMEM m;
    CHECK(mem(dev, &m) == 0, "mem");
    CHECK(m.total == q && m.used == 12345 && m.free == q - 12345, "nvml v1 %llu/%llu/%llu", m.total,
          m.used, m.free);
    NVMEM2 m2 = {.version = 2};
    CHECK(mem2(dev, &m2) == 0, "mem2");
    CHECK(m2.total == q && m2.used == 12345 && m2.free == q - 12345, "nvml v2");
    printf("OK nvml\n");
    return 0;
}

static int mode_ctx(u64 ctx_bytes) {
    cuInit(0);
    g_api = api_for("dlsym");
    size_t f0 = free_now();
    CUcontext c;
    CHECK(cuDevicePrimaryCtxRetain(&c, 0) == 0, "retain");
    CHECK(f0 - free_now() == ctx_bytes, "context footprint not charged");
    CHECK(cuDevicePrimaryCtxRetain(&c, 0) == 0, "retain again");
    CHECK(cuCtxCreate_v2(&c, 0, 0) == 0, "create");
    CHECK(f0 - free_now() == ctx_bytes, "footprint charged twice");
    printf("OK ctx\n");
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Launch as fast as the (fake) GPU allows for `secs`; report the rate over the second half. */
static int mode_rate(double secs) {
    cuInit(0);
    double t0 = now_s(), half = t0 + secs / 2, end = t0 + secs, th = 0;
    long n = 0, nh = 0;
    for (;;) {
        double t = now_s();
        if (t >= end) break;
        if (th == 0 && t >= half) {
            th = t;
            nh = n;
        }
        CHECK(cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL) == 0, "launch");
        n++;
    }
    printf("RATE %.1f\n", (n - nh) / (now_s() - th));
    return 0;
}

static CUresult launch_by(const char *path, CUstream s, LAUNCH_PARAMS *lp, int *ran) {
    if (!strcmp(path, "kernel")) return cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL);
    if (!strcmp(path, "launch")) return cuLaunch(NULL);
    if (!strcmp(path, "grid")) return cuLaunchGrid(NULL, 1, 1);
    if (!strcmp(path, "gridasync")) return cuLaunchGridAsync(NULL, 1, 1, s);
    if (!strcmp(path, "multi")) return cuLaunchCooperativeKernelMultiDevice(lp, 1, 0);
    if (!strcmp(path, "hostfunc")) return cuLaunchHostFunc(s, host_fn, ran);
    FAIL("unknown launch path %s", path);
}

/* One launch (it takes the harness's first sample), READY, wait for the harness to publish the
 * next one, then time n launches through the same path. */
static int mode_gate(const char *path, int n) {
    cuInit(0);
    CUstream s;
    CHECK(cuStreamCreate(&s, 0) == 0, "stream");
    LAUNCH_PARAMS lp = {.gx = 1, .gy = 1, .gz = 1, .bx = 1, .by = 1, .bz = 1, .stream = s};
    int ran = 0;
    CHECK(launch_by(path, s, &lp, &ran) == 0, "first %s", path);
    printf("READY\n");
    fflush(stdout);
    char c;
    CHECK(read(0, &c, 1) == 1, "no go from the harness");
    double t0 = now_s();
    for (int i = 0; i < n; i++) CHECK(launch_by(path, s, &lp, &ran) == 0, "%s", path);
    printf("ELAPSED %.0f\n", (now_s() - t0) * 1e9);
    return 0;
}

static int mode_fork(void) {
    cuInit(0);
    size_t f, t;
    CUdeviceptr p;
    CHECK(cuMemAlloc_v2(&p, 1000) == 0, "parent alloc");
    CHECK(cuMemGetInfo_v2(&f, &t) == 0, "info");
    pid_t c = fork();
    CHECK(c >= 0, "fork");
    if (c == 0) {
        size_t cf, ct;
        CUdeviceptr q;
        CHECK(cuMemGetInfo_v2(&cf, &ct) == 0 && cf == f, "child sees the instance's usage");
        CHECK(cuMemAlloc_v2(&q, 500) == 0, "child alloc");
        _exit(0); /* exits holding 500: its slot must be reclaimed */
    }
    int st;
    waitpid(c, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child failed");
    CHECK(cuMemFree_v2(p) == 0, "parent free");
    printf("OK fork\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) FAIL("usage");
    const char *m = argv[1];
    u64 arg = argc > 2 ? strtoull(argv[2], NULL, 0) : 0;
    if (!strcmp(m, "boundary")) return mode_boundary(arg);
    if (!strcmp(m, "paths")) return mode_paths(argv[2], argc > 3 ? atoi(argv[3]) : 10);
    if (!strcmp(m, "vmm")) return mode_vmm(argv[2]);
    if (!strcmp(m, "vmmretain")) return mode_vmmretain(argv[2]);
    if (!strcmp(m, "ctxlife")) return mode_ctxlife(argv[2], strtoull(argv[3], NULL, 0));
    if (!strcmp(m, "capture"))
        return mode_capture(argv[2], argc > 3 ? atoi(argv[3]) : 5, argc > 4 ? atoi(argv[4]) : 3);
    if (!strcmp(m, "legacy")) return mode_legacy(argv[2], argc > 3 ? atoi(argv[3]) : 10);
    if (!strcmp(m, "gate")) return mode_gate(argv[2], argc > 3 ? atoi(argv[3]) : 4);
    if (!strcmp(m, "multidev"))
        return mode_multidev(atoi(argv[2]), argc > 3 ? atoi(argv[3]) : 0);
    if (!strcmp(m, "v1")) return mode_v1();
    if (!strcmp(m, "hold")) return mode_hold(arg);
    if (!strcmp(m, "grab")) return mode_grab(arg);
    if (!strcmp(m, "grabvmm")) return mode_grabvmm(arg);
    if (!strcmp(m, "over")) return mode_over(arg);
    if (!strcmp(m, "race")) return mode_race(arg);
    if (!strcmp(m, "latefree")) return mode_latefree(arg);
    if (!strcmp(m, "nvml")) return mode_nvml(arg);
    if (!strcmp(m, "ctx")) return mode_ctx(arg);
    if (!strcmp(m, "rate")) return mode_rate(atof(argv[2]));
    if (!strcmp(m, "fork")) return mode_fork();
    FAIL("unknown mode %s", m);
}
