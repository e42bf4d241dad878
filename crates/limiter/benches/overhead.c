/* Calls per second through whatever libcuda.so.1 the dynamic linker gives us: run once plain
 * (the double directly) and once under LD_PRELOAD=libgpuvisor_limiter.so. Prints
 * "<case> <ns per call>" lines, best of 5 rounds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
CUresult cuInit(unsigned);
CUresult cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, void *, void **, void **);
CUresult cuMemAlloc_v2(unsigned long long *, size_t);
CUresult cuMemFree_v2(unsigned long long);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* `churn N`: N cuMemAlloc_v2 + cuMemFree_v2 cycles (every pointer new, as the double hands them
 * out) with 256 allocations held throughout; prints ns per cycle for each million, and ns per
 * free of a pointer nobody allocated (a lookup that misses) after each million. */
static int churn(long n) {
    unsigned long long p, held[256];
    for (int i = 0; i < 256; i++)
        if (cuMemAlloc_v2(&held[i], 4096) != 0) return 1;
    double t0 = now();
    for (long i = 1; i <= n; i++) {
        if (cuMemAlloc_v2(&p, 4096) != 0) return 1;
        if (cuMemFree_v2(p) != 0) return 1;
        if (i % 1000000 == 0) {
            double t1 = now();
            for (int j = 0; j < 1000; j++) cuMemFree_v2(0x10000 + 4096ull * j);
            double t2 = now();
            printf("churn %ld %.1f %.1f\n", i / 1000000, (t1 - t0) / 1e6, (t2 - t1) / 1000);
            t0 = now();
        }
    }
    for (int i = 0; i < 256; i++) cuMemFree_v2(held[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 2 && argv[1][0] == 'c') {
        cuInit(0);
        return churn(atol(argv[2]));
    }
    long n = argc > 1 ? atol(argv[1]) : 2000000;
    cuInit(0);
    unsigned long long p;
    /* warm up: first calls resolve symbols and attach to the region */
    cuMemAlloc_v2(&p, 256);
    cuMemFree_v2(p);
    cuLaunchKernel(0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
    double best_launch = 1e18, best_alloc = 1e18;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        for (long i = 0; i < n; i++) cuLaunchKernel(0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
        double t1 = now();
        for (long i = 0; i < n / 4; i++) {
            if (cuMemAlloc_v2(&p, 4096) != 0) return 1;
            if (cuMemFree_v2(p) != 0) return 1;
        }
        double t2 = now();
        if ((t1 - t0) / n < best_launch) best_launch = (t1 - t0) / n;
        if ((t2 - t1) / (n / 4) < best_alloc) best_alloc = (t2 - t1) / (n / 4);
    }
    printf("launch %.1f\nalloc_free %.1f\n", best_launch, best_alloc);
    return 0;
}
