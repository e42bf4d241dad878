/* dlsym(RTLD_NEXT / RTLD_DEFAULT) through the limiter's dlsym: glibc resolves both relative to
 * the object that called dlsym, so the limiter must not stand in as the caller.
 * Built three ways by tests/interpose.rs:
 *   -DGV_BASE  libgvnextbase.so: the "next" definition of gv_next_fn, and gv_base_only;
 *   -DGV_WRAP  libgvnextwrap.so (linked against the base): wraps gv_next_fn with RTLD_NEXT the
 *              way LD_PRELOAD interposers do, and looks up gv_base_only with RTLD_DEFAULT;
 *   otherwise  the program: `rtldnext preload` (the wrapper preloaded after the limiter) or
 *              `rtldnext dlopen` (the wrapper dlopen()ed RTLD_LOCAL). Exit 0 = passed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(GV_BASE)

int gv_next_fn(void) { return 42; }
int gv_base_only(void) { return 7; }

#elif defined(GV_WRAP)

int gv_next_fn(void);
static int depth;

/* -1000: RTLD_NEXT handed back this very function (it would recurse without end);
 * -2000: RTLD_NEXT found nothing after this object. */
int gv_next_fn(void) {
    if (depth > 0) return -1000;
    int (*next)(void) = (int (*)(void))dlsym(RTLD_NEXT, "gv_next_fn");
    if (!next) return -2000;
    depth++;
    int r = next();
    depth--;
    return r < 0 ? r : r + 1;
}

/* The same at load time, before anything else called dlsym (the limiter resolves libc's dlsym
 * on first use). */
int gv_ctor_result;
__attribute__((constructor)) static void wrap_init(void) { gv_ctor_result = gv_next_fn(); }

/* RTLD_DEFAULT searches the caller's scope: a library loaded RTLD_LOCAL sees its own
 * dependencies. -3000: not found. */
int gv_default_probe(void) {
    int (*f)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "gv_base_only");
    return f ? f() : -3000;
}

#else

#define CHECK(c, ...) do { if (!(c)) { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)

int main(int argc, char **argv) {
    CHECK(argc == 2, "usage: rtldnext preload|dlopen");
    void *h = RTLD_DEFAULT;
    if (!strcmp(argv[1], "dlopen")) {
        h = dlopen("libgvnextwrap.so", RTLD_NOW | RTLD_LOCAL);
        CHECK(h, "dlopen: %s", dlerror());
    }
    int (*f)(void) = (int (*)(void))dlsym(h, "gv_next_fn");
    int (*probe)(void) = (int (*)(void))dlsym(h, "gv_default_probe");
    CHECK(f && probe, "wrapper symbols not found");
    int *ctor = (int *)dlsym(h, "gv_ctor_result");
    CHECK(ctor && *ctor == 43, "at load time the wrapper got %d, expected 43", ctor ? *ctor : 0);
    int r = f();
    CHECK(r == 43, "wrapper -> next definition returned %d, expected 43 (42 + 1)", r);
    r = probe();
    CHECK(r == 7, "RTLD_DEFAULT from the wrapper returned %d, expected 7", r);
    printf("OK rtldnext %s\n", argv[1]);
    return 0;
}

#endif
