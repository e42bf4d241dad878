//! The exported hooks: every CUDA driver and NVML entry the limiter must see, plus `dlsym` and
//! `cuGetProcAddress(_v2)`, through which frameworks reach the driver without calling an
//! exported symbol by name.
//!
//! Key decisions:
//! - **Names.** Each hook is the Rust function `gvh_<name>`; the cdylib exports it as `<name>`
//!   through a linker alias (see `build.rs`), so the rlib, linked into the daemon, interposes
//!   nothing. `gvh_dlsym` is a small assembly trampoline on x86_64 and aarch64, so that
//!   `dlsym(RTLD_NEXT | RTLD_DEFAULT, …)` reaches libc with the real caller's return address.
//! - **Real entries** are found with the real `dlsym` (from `dlvsym(RTLD_NEXT, "dlsym", v)`,
//!   v = `GLIBC_2.2.5`, `GLIBC_2.17` or `GLIBC_2.34`) on a handle to the already-loaded
//!   `libcuda.so.1` / `libnvidia-ml.so.1`, lazily, and cached in one atomic pointer per hook;
//!   `cuGetProcAddress` may fill in entries the driver does not export.
//! - **Lazy start.** `/etc/ld.so.preload` loads us into every process of the instance (shells,
//!   `ls`), so nothing happens at load: the first hook call reads the config (only from
//!   `config::PATH`, never from the environment), maps the region, takes a process slot and
//!   reclaims dead processes' usage. Later calls check one atomic.
//! - **Fail closed.** A missing, unreadable or invalid config, or a region that cannot be mapped,
//!   refuses every allocation with `CUDA_ERROR_OUT_OF_MEMORY` (the driver is not called) and says
//!   why once on stderr: the library is only injected where limits apply.
//! - **Errors.** A hook never unwinds into C: each body runs under `catch_unwind` and a panic
//!   becomes `CUDA_ERROR_UNKNOWN` (or a null pointer from `dlsym`).
//! - **Over quota** the driver is not called at all, so nothing is allocated. Charges happen
//!   before the driver call and are returned if it fails; frees return the charge only when the
//!   driver succeeded.
//! - **Nothing ahead of us.** `LD_PRELOAD` stays the user's, and the dynamic loader puts its
//!   libraries *before* `/etc/ld.so.preload`'s in the global scope: preloading the driver (or
//!   anything defining driver entry points) would have the application's calls bind to it and
//!   never reach a hook. So when `LD_PRELOAD` is set, a constructor checks that every hooked
//!   `cu*`/`nvml*` name resolves to this library, and otherwise stops the process with a message
//!   (`on_load`). A wrapper of the user's that forwards with `dlsym(RTLD_NEXT, …)` would be safe
//!   but cannot be told apart, so it is refused as well.
//! - **Fork.** A child gets its own slot and an empty allocation table (atfork handler); the
//!   region mapping is inherited.
#![allow(non_snake_case)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::config::{Config, PATH};
use crate::procaddr;
use crate::shm::{self, Layout, Region, Slot, MAX_DEVICES};
use crate::table::{self, Kind};
use crate::throttle;

include!(concat!(env!("OUT_DIR"), "/hooks_gen.rs"));

type CUresult = c_int;
type CUdevice = c_int;
type Ptr = *mut c_void;

const CUDA_SUCCESS: CUresult = 0;
const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: CUresult = 901;
const CUDA_ERROR_UNKNOWN: CUresult = 999;
const NVML_SUCCESS: c_int = 0;
const NVML_ERROR_UNKNOWN: c_int = 999;

// ---------------------------------------------------------------------------------------------
// Real entries

static REAL: [AtomicPtr<c_void>; N_HOOKS] = [const { AtomicPtr::new(null_mut()) }; N_HOOKS];
static REAL_DLSYM: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_CTX_GET_DEVICE: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_STREAM_GET_DEVICE: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_STREAM_GET_CTX: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_CTX_PUSH: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_CTX_POP: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_NVML_GET_INDEX: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_IS_CAPTURING: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static REAL_IS_CAPTURING_PTSZ: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static CUDA_HANDLE: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static NVML_HANDLE: AtomicPtr<c_void> = AtomicPtr::new(null_mut());

type DlsymFn = unsafe extern "C" fn(Ptr, *const c_char) -> Ptr;

fn real_dlsym() -> Option<DlsymFn> {
    let mut p = REAL_DLSYM.load(Ordering::Acquire);
    if p.is_null() {
        // x86_64's base version, aarch64's base version (libdl before glibc 2.34), and the
        // libc one since 2.34 (the same function).
        for version in [c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.34"] {
            // SAFETY: dlvsym with valid C strings; RTLD_NEXT finds libc's dlsym after ours.
            p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !p.is_null() {
                break;
            }
        }
        if p.is_null() {
            return None;
        }
        REAL_DLSYM.store(p, Ordering::Release);
    }
    // SAFETY: p is libc's dlsym, whose ABI is DlsymFn.
    Some(unsafe { std::mem::transmute::<Ptr, DlsymFn>(p) })
}

fn library(cache: &AtomicPtr<c_void>, name: &CStr) -> Ptr {
    let h = cache.load(Ordering::Acquire);
    if !h.is_null() {
        return h;
    }
    // SAFETY: dlopen with a valid C string. NOLOAD first: the application has normally loaded
    // the library already and we must not load a second copy or change its flags.
    let mut h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        // SAFETY: as above; a plain local load as a last resort.
        h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    }
    if !h.is_null() {
        cache.store(h, Ordering::Release);
    }
    h
}

fn lookup(cache: &AtomicPtr<c_void>, lib: &CStr, name: &CStr) -> Ptr {
    let h = library(cache, lib);
    let Some(dlsym) = real_dlsym() else {
        return null_mut();
    };
    if h.is_null() {
        return null_mut();
    }
    // SAFETY: libc's dlsym on a live handle with a valid C string.
    unsafe { dlsym(h, name.as_ptr()) }
}

#[cold]
fn resolve_slow(i: usize) -> Ptr {
    let name = HOOK_NAMES[i];
    let p = if name.to_bytes().starts_with(b"nvml") {
        lookup(&NVML_HANDLE, c"libnvidia-ml.so.1", name)
    } else {
        lookup(&CUDA_HANDLE, c"libcuda.so.1", name)
    };
    if !p.is_null() && p != hook_ptr(i) {
        REAL[i].store(p, Ordering::Release);
    }
    REAL[i].load(Ordering::Acquire)
}

#[inline]
fn real_ptr(i: usize) -> Ptr {
    let p = REAL[i].load(Ordering::Acquire);
    if p.is_null() {
        resolve_slow(i)
    } else {
        p
    }
}

macro_rules! real {
    ($name:ident, $ty:ty) => {{
        let p = real_ptr(idx::$name);
        if p.is_null() {
            None
        } else {
            // SAFETY: `p` was resolved for exactly this exported name (or returned by the driver
            // for it), whose C ABI is `$ty`.
            Some(unsafe { std::mem::transmute::<Ptr, $ty>(p) })
        }
    }};
}

/// Calls the real entry or answers `CUDA_ERROR_NOT_INITIALIZED` when the driver is not there.
macro_rules! call_real {
    ($name:ident, $ty:ty, ($($arg:expr),*)) => {
        match real!($name, $ty) {
            // SAFETY: forwarding the caller's own arguments to the entry it meant to call.
            Some(f) => unsafe { f($($arg),*) },
            None => CUDA_ERROR_NOT_INITIALIZED,
        }
    };
}

/// A driver entry the limiter calls for itself (never one it hooks), looked up once; `None` when
/// the driver does not export it.
fn own_entry(cache: &AtomicPtr<c_void>, name: &CStr) -> Option<Ptr> {
    let mut p = cache.load(Ordering::Acquire);
    if p.is_null() {
        p = lookup(&CUDA_HANDLE, c"libcuda.so.1", name);
        if p.is_null() {
            return None;
        }
        cache.store(p, Ordering::Release);
    }
    Some(p)
}

fn ctx_get_device() -> Option<CUdevice> {
    let p = own_entry(&REAL_CTX_GET_DEVICE, c"cuCtxGetDevice")?;
    // SAFETY: cuCtxGetDevice(CUdevice *) -> CUresult.
    let f =
        unsafe { std::mem::transmute::<Ptr, unsafe extern "C" fn(*mut CUdevice) -> CUresult>(p) };
    let mut dev: CUdevice = -1;
    // SAFETY: valid out-pointer.
    (unsafe { f(&mut dev) } == CUDA_SUCCESS).then_some(dev)
}

/// The device `stream` belongs to: `cuStreamGetDevice` (CUDA 12.8 drivers); on older drivers the
/// stream's context is made current for one `cuCtxGetDevice` and popped again.
fn stream_get_device(stream: Ptr) -> Option<CUdevice> {
    type StreamGetDevice = unsafe extern "C" fn(Ptr, *mut CUdevice) -> CUresult;
    type StreamGetCtx = unsafe extern "C" fn(Ptr, *mut Ptr) -> CUresult;
    type CtxPush = unsafe extern "C" fn(Ptr) -> CUresult;
    type CtxPop = unsafe extern "C" fn(*mut Ptr) -> CUresult;
    let mut dev: CUdevice = -1;
    if let Some(p) = own_entry(&REAL_STREAM_GET_DEVICE, c"cuStreamGetDevice") {
        // SAFETY: cuStreamGetDevice(CUstream, CUdevice *) -> CUresult.
        let f = unsafe { std::mem::transmute::<Ptr, StreamGetDevice>(p) };
        // SAFETY: the caller's stream handle and a valid out-pointer.
        if unsafe { f(stream, &mut dev) } == CUDA_SUCCESS {
            return Some(dev);
        }
    }
    let get_ctx = own_entry(&REAL_STREAM_GET_CTX, c"cuStreamGetCtx")?;
    let push = own_entry(&REAL_CTX_PUSH, c"cuCtxPushCurrent_v2")?;
    let pop = own_entry(&REAL_CTX_POP, c"cuCtxPopCurrent_v2")?;
    // SAFETY: the driver's ABIs for these three exported names.
    let (get_ctx, push, pop) = unsafe {
        (
            std::mem::transmute::<Ptr, StreamGetCtx>(get_ctx),
            std::mem::transmute::<Ptr, CtxPush>(push),
            std::mem::transmute::<Ptr, CtxPop>(pop),
        )
    };
    let mut ctx: Ptr = null_mut();
    // SAFETY: the caller's stream handle and a valid out-pointer.
    if unsafe { get_ctx(stream, &mut ctx) } != CUDA_SUCCESS || ctx.is_null() {
        return None;
    }
    // SAFETY: a live context the driver just named; popped again below, so the thread's
    // context stack is as the caller left it.
    if unsafe { push(ctx) } != CUDA_SUCCESS {
        return None;
    }
    let dev = ctx_get_device();
    let mut popped: Ptr = null_mut();
    // SAFETY: pops the context pushed above; valid out-pointer.
    unsafe { pop(&mut popped) };
    dev
}

fn nvml_index(device: Ptr) -> Option<usize> {
    let mut p = REAL_NVML_GET_INDEX.load(Ordering::Acquire);
    if p.is_null() {
        p = lookup(&NVML_HANDLE, c"libnvidia-ml.so.1", c"nvmlDeviceGetIndex");
        if p.is_null() {
            return None;
        }
        REAL_NVML_GET_INDEX.store(p, Ordering::Release);
    }
    // SAFETY: nvmlDeviceGetIndex(nvmlDevice_t, unsigned *) -> nvmlReturn_t.
    let f =
        unsafe { std::mem::transmute::<Ptr, unsafe extern "C" fn(Ptr, *mut c_uint) -> c_int>(p) };
    let mut i: c_uint = 0;
    // SAFETY: the caller's device handle and a valid out-pointer.
    (unsafe { f(device, &mut i) } == NVML_SUCCESS).then_some(i as usize)
}

// ---------------------------------------------------------------------------------------------
// Process state

const UNINIT: u32 = 0;
const INITIALIZING: u32 = 1;
const READY: u32 = 2;

static STATE: AtomicU32 = AtomicU32::new(UNINIT);
static CONFIG_LOADED: AtomicBool = AtomicBool::new(false);
static LAYOUT: AtomicPtr<Layout<'static>> = AtomicPtr::new(null_mut());
static FAIL_CLOSED: AtomicBool = AtomicBool::new(false);
static SLOT: AtomicPtr<Slot> = AtomicPtr::new(null_mut());
static NDEV: AtomicUsize = AtomicUsize::new(0);
static CTX_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IN_INIT: Cell<bool> = const { Cell::new(false) };
}

enum Mode {
    /// After the library's exit handler gave this process's usage back: pass through (see
    /// `at_exit`).
    Pass,
    /// No usable configuration or region: refuse allocations rather than run unlimited.
    Closed,
    Limit(Layout<'static>, Option<&'static Slot>),
}

#[inline]
fn mode() -> Mode {
    if STATE.load(Ordering::Acquire) != READY {
        init_slow();
    }
    let l = LAYOUT.load(Ordering::Acquire);
    if l.is_null() {
        return if FAIL_CLOSED.load(Ordering::Relaxed) {
            Mode::Closed
        } else {
            Mode::Pass
        };
    }
    let s = SLOT.load(Ordering::Acquire);
    // SAFETY: LAYOUT is a leaked Box of leaked, never-unmapped mappings; SLOT points into them.
    unsafe { Mode::Limit(*l, s.as_ref()) }
}

#[cold]
fn init_slow() {
    if IN_INIT.with(Cell::get) {
        return; // a hook called from inside our own initialisation: pass through
    }
    loop {
        match STATE.compare_exchange(UNINIT, INITIALIZING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                IN_INIT.with(|c| c.set(true));
                let _ = std::panic::catch_unwind(init);
                IN_INIT.with(|c| c.set(false));
                STATE.store(READY, Ordering::Release);
                return;
            }
            Err(READY) => return,
            // SAFETY: sched_yield has no preconditions.
            Err(_) => unsafe {
                libc::sched_yield();
            },
        }
    }
}

fn init() {
    if !CONFIG_LOADED.swap(true, Ordering::AcqRel) {
        load_config();
        // SAFETY: registering plain extern "C" handlers, once per process.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_child));
            libc::atexit(at_exit);
        }
    }
    let l = LAYOUT.load(Ordering::Acquire);
    // SAFETY: as in `mode`.
    let Some(&l) = (unsafe { l.as_ref() }) else {
        return;
    };
    shm::reclaim_local(l);
    let pid = std::process::id();
    let start = shm::proc_start_time(pid).unwrap_or(0);
    if let Some(s) = shm::claim_slot(l, pid, start) {
        SLOT.store(std::ptr::from_ref(s).cast_mut(), Ordering::Release);
    }
    table::init();
}

fn load_config() {
    let config = match std::fs::read_to_string(PATH) {
        Ok(text) => match Config::parse(&text) {
            Ok(c) => c,
            Err(e) => return fail_closed(&format!("{PATH}: {e}")),
        },
        Err(e) => return fail_closed(&format!("cannot read {PATH}: {e}")),
    };
    CTX_BYTES.store(config.context_bytes, Ordering::Relaxed);
    match Region::attach(&config.limits, &config.usage) {
        Ok(l) => {
            NDEV.store(l.ndev(), Ordering::Relaxed);
            let l: &'static Layout<'static> = Box::leak(Box::new(l));
            LAYOUT.store(std::ptr::from_ref(l).cast_mut(), Ordering::Release);
        }
        Err(e) => fail_closed(&format!(
            "cannot map the accounting region {} + {}: {e}",
            config.limits.display(),
            config.usage.display()
        )),
    }
}

/// No limits can be applied: every allocation of this process is refused. Said once, on stderr
/// (written directly: the application's stdio may be in any state).
#[cold]
fn fail_closed(why: &str) {
    FAIL_CLOSED.store(true, Ordering::Relaxed);
    let msg = format!(
        "gpuvisor limiter: {why}; this instance's GPU share cannot be enforced, so CUDA \
         allocations are refused (CUDA_ERROR_OUT_OF_MEMORY)\n"
    );
    // SAFETY: writing a valid buffer to fd 2; a failed write is ignored.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Runs when the dynamic loader maps the library into a process (before `main`): see "Nothing
/// ahead of us" above. Only `LD_PRELOAD` (and the executable itself) can put definitions ahead
/// of a library from `/etc/ld.so.preload`, so without it this is one `getenv`.
extern "C" fn on_load() {
    let _ = std::panic::catch_unwind(|| {
        if std::env::var_os("LD_PRELOAD").is_none_or(|v| v.is_empty()) || !is_interposer() {
            return;
        }
        if let Some((name, object)) = shadowed_hook() {
            let msg = format!(
                "gpuvisor limiter: {object} (from LD_PRELOAD or the program) defines {name} ahead \
                 of the GPU limiter, which would bypass this instance's GPU limits; stopping\n"
            );
            // SAFETY: writing a valid buffer to fd 2, then ending the process without running
            // anything of it.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(126);
            }
        }
    });
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

/// Whether this code runs as the injected cdylib (which exports the hooks under the driver's
/// names) rather than as the rlib linked into the daemon (which must not act here).
fn is_interposer() -> bool {
    let Some(dlsym) = real_dlsym() else {
        return false;
    };
    let ours = gvh_cuMemAlloc_v2 as *mut c_void;
    // SAFETY: Dl_info is plain C data; all zeroes is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr with a valid out-struct, on the address of one of our functions.
    let found_self = unsafe { libc::dladdr(ours, &mut info) } != 0;
    if !found_self || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: a NOLOAD dlopen of the object that holds this code, by the name the loader gave.
    let h = unsafe { libc::dlopen(info.dli_fname, libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if h.is_null() {
        return false;
    }
    // SAFETY: libc's dlsym on a live handle with a C string.
    let found = unsafe { dlsym(h, c"cuMemAlloc_v2".as_ptr()) };
    // SAFETY: dropping the reference the NOLOAD dlopen took.
    unsafe { libc::dlclose(h) };
    found == ours
}

/// The first hooked driver name whose global definition is not ours, and the object defining
/// it.
fn shadowed_hook() -> Option<(String, String)> {
    let dlsym = real_dlsym()?;
    for (i, name) in HOOK_NAMES.iter().enumerate() {
        let b = name.to_bytes();
        if !(b.starts_with(b"cu") || b.starts_with(b"nvml")) {
            continue;
        }
        // SAFETY: libc's dlsym with a C string; RTLD_DEFAULT searches the global scope in load
        // order (the executable, LD_PRELOAD, /etc/ld.so.preload, then the rest).
        let p = unsafe { dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if p.is_null() || p == hook_ptr(i) {
            continue;
        }
        // SAFETY: Dl_info is plain C data; all zeroes is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr with a valid out-struct, on an address the loader just returned.
        let named = unsafe { libc::dladdr(p, &mut info) } != 0;
        let object = if named && !info.dli_fname.is_null() {
            // SAFETY: the loader's C string for the object.
            unsafe { CStr::from_ptr(info.dli_fname) }
                .to_string_lossy()
                .into_owned()
        } else {
            "a library".into()
        };
        return Some((name.to_string_lossy().into_owned(), object));
    }
    None
}

extern "C" fn after_fork_child() {
    // The child is a new process: it holds nothing yet and must take its own slot.
    SLOT.store(null_mut(), Ordering::Release);
    ctx_book_reset();
    table::reset_after_fork();
    STATE.store(UNINIT, Ordering::Release);
}

/// At `exit`: gives this process's usage back with its slot. Hooks that run later (the
/// application's own `atexit` handlers registered before the library started, C++ static
/// destructors freeing memory) must not give it back a second time, so from here on the process
/// passes through unlimited: the driver frees what is left when the process ends.
extern "C" fn at_exit() {
    let l = LAYOUT.swap(null_mut(), Ordering::AcqRel);
    let s = SLOT.swap(null_mut(), Ordering::AcqRel);
    // SAFETY: as in `mode`; the slot was claimed by this process.
    if let (Some(&l), Some(s)) = unsafe { (l.as_ref(), s.as_ref()) } {
        if s.pid.load(Ordering::Relaxed) == std::process::id() {
            shm::release_slot(l, s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounting helpers

#[inline]
fn guard(f: impl FnOnce() -> CUresult) -> CUresult {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(CUDA_ERROR_UNKNOWN)
}

/// The device the current context is on, if the region limits it.
#[inline]
fn current_dev() -> Option<usize> {
    let n = ndev();
    if n == 1 {
        return Some(0);
    }
    let d = usize::try_from(ctx_get_device()?).ok()?;
    (d < n).then_some(d)
}

#[inline]
fn limited_dev(dev: CUdevice) -> Option<usize> {
    usize::try_from(dev).ok().filter(|d| *d < ndev())
}

/// Devices the region limits (0 when not limiting); starts the library if needed.
#[inline]
fn ndev() -> usize {
    if STATE.load(Ordering::Acquire) != READY {
        init_slow();
    }
    NDEV.load(Ordering::Relaxed)
}

#[inline]
fn charge(l: Layout<'_>, s: Option<&Slot>, dev: usize, bytes: u64) -> bool {
    shm::try_charge(l, s, dev, bytes) || {
        // Slow path: a dead peer may still hold memory.
        shm::reclaim_local(l) > 0 && shm::try_charge(l, s, dev, bytes)
    }
}

/// Charge, allocate, record; or refuse without calling the driver.
#[inline]
fn counted_alloc(
    dev: Option<usize>,
    bytes: u64,
    kind: Kind,
    alloc: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> u64,
) -> CUresult {
    match mode() {
        Mode::Pass => alloc(),
        Mode::Closed => CUDA_ERROR_OUT_OF_MEMORY,
        Mode::Limit(l, s) => {
            let Some(dev) = dev.or_else(current_dev) else {
                return alloc();
            };
            if bytes == 0 {
                return alloc();
            }
            if !charge(l, s, dev, bytes) {
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            let rc = alloc();
            if rc != CUDA_SUCCESS {
                shm::uncharge(l, s, dev, bytes);
                return rc;
            }
            // A full table keeps the charge: over-counted, never under.
            let _ = table::insert(kind, key(), dev, bytes);
            rc
        }
    }
}

/// Forget, free, give back (or re-record if the driver refused the free).
#[inline]
fn counted_free(kind: Kind, key: u64, free: impl FnOnce() -> CUresult) -> CUresult {
    let Mode::Limit(l, s) = mode() else {
        return free();
    };
    let held = table::remove(kind, key);
    let rc = free();
    if let Some((dev, bytes)) = held {
        if rc == CUDA_SUCCESS {
            shm::uncharge(l, s, dev, bytes);
        } else {
            let _ = table::insert(kind, key, dev, bytes);
        }
    }
    rc
}

/// The device a launch on `stream` runs on, if the region limits it (multi-device launches name
/// a stream per device; every other launch runs on the current context's device).
fn stream_dev(stream: Ptr) -> Option<usize> {
    let n = ndev();
    if n == 1 {
        return Some(0);
    }
    let Some(d) = stream_get_device(stream) else {
        // Device unknown: count it on the current one rather than let it through ungated.
        return current_dev();
    };
    usize::try_from(d).ok().filter(|d| *d < n)
}

/// The launch gate for a launch on the current context's device.
#[inline]
fn launch_gate() {
    launch_gate_on(current_dev);
}

#[inline]
fn launch_gate_on(dev: impl FnOnce() -> Option<usize>) {
    if let Mode::Limit(l, _) = mode() {
        if let Some(dev) = dev() {
            throttle::gate(l, dev);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream capture
//
// A launch into a stream that is being captured (`cudaStreamBeginCapture`, CUDA graphs, PyTorch
// `torch.cuda.graph`, `torch.compile(mode="reduce-overhead")`) runs nothing: it records a node
// of a graph that runs later, through `cuGraphLaunch`, which passes the gate. Gating it would
// sleep during capture (a graph of a thousand kernels captured at a 20 ms spacing takes 20 s),
// and counting it would tell the controller of launches that used no GPU time. Asking the driver
// about the stream on every launch would cost a driver call on the hot path, so the limiter
// counts the captures this process has in flight and asks only while there are some. A capture
// begun through a route the limiter does not see only means captured launches are gated again.

/// Captures begun and not yet ended in this process.
static CAPTURES: AtomicU32 = AtomicU32::new(0);

/// Whether `stream` is capturing (or its capture was invalidated: the launch fails anyway).
/// `ptsz`: the launch came through a `_ptsz` entry, where the NULL stream is the per-thread one.
#[cold]
fn stream_capturing(stream: Ptr, ptsz: bool) -> Option<bool> {
    let p = if ptsz {
        own_entry(&REAL_IS_CAPTURING_PTSZ, c"cuStreamIsCapturing_ptsz")?
    } else {
        own_entry(&REAL_IS_CAPTURING, c"cuStreamIsCapturing")?
    };
    // SAFETY: cuStreamIsCapturing(CUstream, CUstreamCaptureStatus *) -> CUresult (both names).
    let f =
        unsafe { std::mem::transmute::<Ptr, unsafe extern "C" fn(Ptr, *mut c_int) -> CUresult>(p) };
    let mut status: c_int = 0;
    // SAFETY: the caller's stream handle and a valid out-pointer.
    (unsafe { f(stream, &mut status) } == CUDA_SUCCESS).then_some(status != 0)
}

/// The launch gate for a launch into `stream` on the current context's device; a launch that is
/// only being captured neither waits nor counts.
#[inline]
fn launch_gate_stream(stream: Ptr, ptsz: bool) {
    if CAPTURES.load(Ordering::Acquire) != 0 && stream_capturing(stream, ptsz) == Some(true) {
        return;
    }
    launch_gate();
}

fn capture_begin(begin: impl FnOnce() -> CUresult) -> CUresult {
    // Counted before the driver starts the capture, so no captured launch can miss it.
    CAPTURES.fetch_add(1, Ordering::AcqRel);
    let rc = begin();
    if rc != CUDA_SUCCESS {
        capture_ended();
    }
    rc
}

fn capture_end(stream: Ptr, ptsz: bool, end: impl FnOnce() -> CUresult) -> CUresult {
    let rc = end();
    // Success and an invalidated capture both end it; any other error ends it only if the
    // stream says so.
    if rc == CUDA_SUCCESS
        || rc == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
        || stream_capturing(stream, ptsz) == Some(false)
    {
        capture_ended();
    }
    rc
}

fn capture_ended() {
    let _ = CAPTURES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

/// (total, free) as the instance should see them on the current device, given the driver's.
fn quota_view(dev: Option<usize>, real_free: u64, real_total: u64) -> (u64, u64) {
    if let (Mode::Limit(l, _), Some(dev)) = (mode(), dev) {
        let quota = l.lim.devices[dev].quota.load(Ordering::Relaxed);
        let used = l.usage.devices[dev].used.load(Ordering::Relaxed);
        return (quota, real_free.min(quota.saturating_sub(used)));
    }
    (real_total, real_free)
}

// ---------------------------------------------------------------------------------------------
// dlsym and cuGetProcAddress

/// `dlsym` for every handle but `RTLD_NEXT` and `RTLD_DEFAULT` (see the trampoline below):
/// answers our hook for any name we hook that the lookup finds, so libcudart's
/// `dlopen("libcuda.so.1")` + `dlsym` route is caught. Other names pass through.
extern "C" fn dlsym_hook(handle: Ptr, name: *const c_char) -> Ptr {
    std::panic::catch_unwind(|| {
        let Some(real) = real_dlsym() else {
            return null_mut();
        };
        // SAFETY: forwarding the caller's arguments to libc's dlsym.
        let p = unsafe { real(handle, name) };
        if p.is_null() || name.is_null() {
            return p;
        }
        // SAFETY: dlsym found a symbol under this name, so it is a valid C string.
        let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
        if !(bytes.starts_with(b"cu") || bytes.starts_with(b"nvml")) {
            return p;
        }
        match hook_index(bytes) {
            Some(i) => {
                let hook = hook_ptr(i);
                if p != hook {
                    let _ = REAL[i].compare_exchange(
                        null_mut(),
                        p,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                hook
            }
            None => p,
        }
    })
    .unwrap_or(null_mut())
}

// `dlsym` itself: a trampoline in assembly (x86_64, aarch64).
//
// glibc resolves `RTLD_NEXT` ("the next object after the caller") and `RTLD_DEFAULT` (the
// caller's lookup scope, which for a library loaded with `RTLD_LOCAL` includes its own
// dependencies) from the *return address* of the `dlsym` call. A hook written in Rust calls the
// real `dlsym` itself, so glibc sees the limiter as the caller: a library loaded after the
// limiter that wraps `foo` with `dlsym(RTLD_NEXT, "foo")` got its own `foo` back and recursed,
// and `dlsym(RTLD_DEFAULT, …)` from a locally loaded plugin missed the plugin's dependencies.
// So for those two handles the trampoline tail-jumps to libc's `dlsym` with the stack and the
// return address untouched (glibc sees the real caller); every other handle goes to
// `dlsym_hook`. The real `dlsym` is resolved on first use (nothing runs at load): if it is not
// known yet, the trampoline saves the arguments, calls `trampoline_resolve` and jumps.
//
// What this means for the hooks: `dlsym(RTLD_NEXT, "cuMemAlloc_v2")` names the definition after
// the caller, which for a library loaded after the limiter is the driver's, not ours. That is
// what the caller asked for (an interposer above us forwarding to "the next one" must not be
// sent back up), and its own callers reach it through the global scope, where the limiter's
// export comes first. `dlsym(RTLD_DEFAULT, "cu…")` from anywhere finds the limiter's export
// first (preloaded, so first in the global scope), so it still answers the hook.
//
// Other architectures keep the Rust hook for every handle (the old behaviour: `RTLD_NEXT`
// searches after the limiter).

/// The thread resolving the real `dlsym` for the trampoline (0: none).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
static RESOLVING: AtomicU32 = AtomicU32::new(0);

/// The trampoline's slow path: libc's `dlsym`, or null if it cannot be found or this thread is
/// already resolving it (a `malloc` interposer whose start-up calls `dlsym(RTLD_NEXT, …)` from
/// inside `dlvsym` gets null rather than recursing without end).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
extern "C" fn trampoline_resolve() -> Ptr {
    // SAFETY: gettid has no preconditions (the raw syscall: glibc's wrapper is 2.30+ only).
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    loop {
        let p = REAL_DLSYM.load(Ordering::Acquire);
        if !p.is_null() {
            return p;
        }
        let owner = RESOLVING.load(Ordering::Acquire);
        if owner == me {
            return null_mut();
        }
        if owner == 0
            && RESOLVING
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let p = std::panic::catch_unwind(real_dlsym)
                .ok()
                .flatten()
                .map_or(null_mut(), |f| f as Ptr);
            RESOLVING.store(0, Ordering::Release);
            return p;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

// SAFETY: `gvh_dlsym` has `dlsym`'s C ABI: it leaves the argument registers, the stack and
// the return address as it found them when it jumps (to libc's `dlsym` or to `dlsym_hook`, both
// `dlsym`-shaped), and around its one call it saves the arguments, keeps the stack aligned as the
// ABI requires, and uses only caller-saved scratch registers.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .text.gvh_dlsym,\"ax\",@progbits",
    ".globl gvh_dlsym",
    ".type gvh_dlsym,@function",
    ".p2align 4",
    "gvh_dlsym:",
    ".cfi_startproc",
    "endbr64",
    // RTLD_NEXT is (void *)-1, RTLD_DEFAULT is 0.
    "cmp rdi, -1",
    "je 2f",
    "test rdi, rdi",
    "je 2f",
    "jmp {hook}@PLT",
    "2:",
    "mov rax, qword ptr [rip + {real}@GOTPCREL]",
    "mov rax, qword ptr [rax]",
    "test rax, rax",
    "je 3f",
    "jmp rax",
    "3:",
    // Keep the arguments; 8 + 16 + 8 bytes keep the stack 16-byte aligned for the call.
    "push rdi",
    ".cfi_adjust_cfa_offset 8",
    "push rsi",
    ".cfi_adjust_cfa_offset 8",
    "sub rsp, 8",
    ".cfi_adjust_cfa_offset 8",
    "call {resolve}@PLT",
    "add rsp, 8",
    ".cfi_adjust_cfa_offset -8",
    "pop rsi",
    ".cfi_adjust_cfa_offset -8",
    "pop rdi",
    ".cfi_adjust_cfa_offset -8",
    "test rax, rax",
    "je 4f",
    "jmp rax",
    "4:",
    "ret",
    ".cfi_endproc",
    ".size gvh_dlsym, . - gvh_dlsym",
    ".popsection",
    hook = sym dlsym_hook,
    real = sym REAL_DLSYM,
    resolve = sym trampoline_resolve,
);

// SAFETY: `gvh_dlsym` has `dlsym`'s C ABI: it leaves the argument registers, the stack and
// the return address as it found them when it jumps (to libc's `dlsym` or to `dlsym_hook`, both
// `dlsym`-shaped), and around its one call it saves the arguments, keeps the stack aligned as the
// ABI requires, and uses only caller-saved scratch registers.
#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    ".pushsection .text.gvh_dlsym,\"ax\",%progbits",
    ".globl gvh_dlsym",
    ".type gvh_dlsym,%function",
    ".p2align 2",
    "gvh_dlsym:",
    ".cfi_startproc",
    // BTI landing pad (`bti c`, a NOP without BTI).
    "hint #34",
    // RTLD_NEXT is (void *)-1, RTLD_DEFAULT is 0.
    "cmn x0, #1",
    "b.eq 2f",
    "cbz x0, 2f",
    "b {hook}",
    "2:",
    "adrp x16, :got:{real}",
    "ldr x16, [x16, :got_lo12:{real}]",
    "ldar x16, [x16]",
    "cbz x16, 3f",
    "br x16",
    "3:",
    "stp x29, x30, [sp, #-32]!",
    ".cfi_def_cfa_offset 32",
    ".cfi_offset 29, -32",
    ".cfi_offset 30, -24",
    "mov x29, sp",
    "stp x0, x1, [sp, #16]",
    "bl {resolve}",
    "mov x16, x0",
    "ldp x0, x1, [sp, #16]",
    "ldp x29, x30, [sp], #32",
    ".cfi_def_cfa_offset 0",
    ".cfi_restore 29",
    ".cfi_restore 30",
    "cbz x16, 4f",
    "br x16",
    "4:",
    "mov x0, #0",
    "ret",
    ".cfi_endproc",
    ".size gvh_dlsym, . - gvh_dlsym",
    ".popsection",
    hook = sym dlsym_hook,
    real = sym REAL_DLSYM,
    resolve = sym trampoline_resolve,
);

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
extern "C" {
    /// The trampoline above (exported as `dlsym` by the cdylib, see `build.rs`).
    fn gvh_dlsym(handle: Ptr, name: *const c_char) -> Ptr;
}

/// `dlsym` where no trampoline exists: the Rust hook for every handle.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[no_mangle]
pub unsafe extern "C" fn gvh_dlsym(handle: Ptr, name: *const c_char) -> Ptr {
    dlsym_hook(handle, name)
}

/// After the driver answered a `cuGetProcAddress` request: swap in our hook for the versioned
/// entry the request means (explicit table, see `procaddr`).
///
/// # Safety
/// `symbol` and `pfn` as the caller passed them to the driver.
unsafe fn redirect(
    rc: CUresult,
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
) -> CUresult {
    if rc != CUDA_SUCCESS || symbol.is_null() || pfn.is_null() {
        return rc;
    }
    // SAFETY: the driver succeeded, so `pfn` is a valid out-pointer it wrote.
    let got = unsafe { *pfn };
    if got.is_null() {
        return rc;
    }
    // SAFETY: the caller's symbol name, a C string the driver just read.
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    if let Some(i) = procaddr::resolve(name, ver, flags).and_then(hook_index) {
        let hook = hook_ptr(i);
        if got != hook {
            let _ = REAL[i].compare_exchange(null_mut(), got, Ordering::AcqRel, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { *pfn = hook };
    }
    rc
}

type GpaV1 = unsafe extern "C" fn(*const c_char, *mut Ptr, c_int, u64) -> CUresult;
type GpaV2 = unsafe extern "C" fn(*const c_char, *mut Ptr, c_int, u64, *mut c_int) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
) -> CUresult {
    guard(|| {
        let rc = call_real!(cuGetProcAddress, GpaV1, (symbol, pfn, ver, flags));
        // SAFETY: the caller's arguments, as passed to the driver.
        unsafe { redirect(rc, symbol, pfn, ver, flags) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuGetProcAddress_v2,
            GpaV2,
            (symbol, pfn, ver, flags, status)
        );
        // SAFETY: the caller's arguments, as passed to the driver.
        unsafe { redirect(rc, symbol, pfn, ver, flags) }
    })
}

// ---------------------------------------------------------------------------------------------
// Linear allocations

/// Writes `v` through a caller's out-pointer if it is non-null; reads it back for keys.
fn read<T: Copy + Default>(p: *const T) -> T {
    if p.is_null() {
        T::default()
    } else {
        // SAFETY: non-null out-pointer the driver just wrote successfully.
        unsafe { *p }
    }
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAlloc(dptr: *mut u32, bytes: c_uint) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            u64::from(bytes),
            Kind::DevPtr,
            || {
                call_real!(
                    cuMemAlloc,
                    unsafe extern "C" fn(*mut u32, c_uint) -> CUresult,
                    (dptr, bytes)
                )
            },
            || u64::from(read(dptr)),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || {
                call_real!(
                    cuMemAlloc_v2,
                    unsafe extern "C" fn(*mut u64, usize) -> CUresult,
                    (dptr, bytes)
                )
            },
            || read(dptr),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocManaged(
    dptr: *mut u64,
    bytes: usize,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || {
                call_real!(
                    cuMemAllocManaged,
                    unsafe extern "C" fn(*mut u64, usize, c_uint) -> CUresult,
                    (dptr, bytes, flags)
                )
            },
            || read(dptr),
        )
    })
}

/// Pitched allocations: the pitch is known only afterwards, so charge `width × height` first and
/// the padding after; if the padding does not fit, free and refuse.
fn pitched(
    width: u64,
    height: u64,
    alloc: impl FnOnce() -> CUresult,
    result: impl Fn() -> (u64, u64),
    free: impl FnOnce(u64) -> CUresult,
) -> CUresult {
    let base = width.saturating_mul(height);
    let mut over = false;
    let rc = counted_alloc(None, base, Kind::DevPtr, alloc, || result().0);
    if rc != CUDA_SUCCESS {
        return rc;
    }
    if let Mode::Limit(l, s) = mode() {
        let (ptr, pitch) = result();
        let padding = pitch.saturating_sub(width).saturating_mul(height);
        if padding > 0 {
            if let Some((dev, bytes)) = table::remove(Kind::DevPtr, ptr) {
                if charge(l, s, dev, padding) {
                    let _ = table::insert(Kind::DevPtr, ptr, dev, bytes + padding);
                } else {
                    over = true;
                    let _ = table::insert(Kind::DevPtr, ptr, dev, bytes);
                }
            }
        }
        if over {
            let _ = counted_free(Kind::DevPtr, ptr, || free(ptr));
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocPitch(
    dptr: *mut u32,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    elem: c_uint,
) -> CUresult {
    guard(|| {
        pitched(
            u64::from(width),
            u64::from(height),
            || {
                call_real!(
                    cuMemAllocPitch,
                    unsafe extern "C" fn(*mut u32, *mut c_uint, c_uint, c_uint, c_uint) -> CUresult,
                    (dptr, pitch, width, height, elem)
                )
            },
            || (u64::from(read(dptr)), u64::from(read(pitch))),
            |p| call_real!(cuMemFree, unsafe extern "C" fn(u32) -> CUresult, (p as u32)),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    guard(|| {
        pitched(
            width as u64,
            height as u64,
            || {
                call_real!(
                    cuMemAllocPitch_v2,
                    unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> CUresult,
                    (dptr, pitch, width, height, elem)
                )
            },
            || (read(dptr), read(pitch) as u64),
            |p| call_real!(cuMemFree_v2, unsafe extern "C" fn(u64) -> CUresult, (p)),
        )
    })
}

type AllocAsync = unsafe extern "C" fn(*mut u64, usize, Ptr) -> CUresult;
type AllocPool = unsafe extern "C" fn(*mut u64, usize, Ptr, Ptr) -> CUresult;
type FreeAsync = unsafe extern "C" fn(u64, Ptr) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocAsync(
    dptr: *mut u64,
    bytes: usize,
    stream: Ptr,
) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || call_real!(cuMemAllocAsync, AllocAsync, (dptr, bytes, stream)),
            || read(dptr),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    stream: Ptr,
) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || call_real!(cuMemAllocAsync_ptsz, AllocAsync, (dptr, bytes, stream)),
            || read(dptr),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocFromPoolAsync(
    dptr: *mut u64,
    bytes: usize,
    pool: Ptr,
    stream: Ptr,
) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || {
                call_real!(
                    cuMemAllocFromPoolAsync,
                    AllocPool,
                    (dptr, bytes, pool, stream)
                )
            },
            || read(dptr),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    pool: Ptr,
    stream: Ptr,
) -> CUresult {
    guard(|| {
        counted_alloc(
            None,
            bytes as u64,
            Kind::DevPtr,
            || {
                call_real!(
                    cuMemAllocFromPoolAsync_ptsz,
                    AllocPool,
                    (dptr, bytes, pool, stream)
                )
            },
            || read(dptr),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemFree(dptr: u32) -> CUresult {
    guard(|| {
        counted_free(Kind::DevPtr, u64::from(dptr), || {
            call_real!(cuMemFree, unsafe extern "C" fn(u32) -> CUresult, (dptr))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemFree_v2(dptr: u64) -> CUresult {
    guard(|| {
        counted_free(Kind::DevPtr, dptr, || {
            call_real!(cuMemFree_v2, unsafe extern "C" fn(u64) -> CUresult, (dptr))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemFreeAsync(dptr: u64, stream: Ptr) -> CUresult {
    guard(|| {
        counted_free(Kind::DevPtr, dptr, || {
            call_real!(cuMemFreeAsync, FreeAsync, (dptr, stream))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemFreeAsync_ptsz(dptr: u64, stream: Ptr) -> CUresult {
    guard(|| {
        counted_free(Kind::DevPtr, dptr, || {
            call_real!(cuMemFreeAsync_ptsz, FreeAsync, (dptr, stream))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Virtual memory management (PyTorch expandable segments, NCCL)

/// The leading fields of `CUmemAllocationProp` (type, requestedHandleTypes, location).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct MemAllocPropHead {
    kind: c_int,
    handle_types: c_int,
    location_type: c_int,
    location_id: c_int,
}

const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const MemAllocPropHead,
    flags: u64,
) -> CUresult {
    guard(|| {
        let head = read(prop);
        let real = || {
            call_real!(
                cuMemCreate,
                unsafe extern "C" fn(*mut u64, usize, *const MemAllocPropHead, u64) -> CUresult,
                (handle, bytes, prop, flags)
            )
        };
        if head.location_type != CU_MEM_LOCATION_TYPE_DEVICE {
            return real(); // host memory: not VRAM
        }
        let Some(dev) = limited_dev(head.location_id) else {
            if matches!(mode(), Mode::Closed) {
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            return real();
        };
        counted_alloc(Some(dev), bytes as u64, Kind::Handle, real, || read(handle))
    })
}

// The driver frees a `cuMemCreate` allocation when every reference to its handle is released
// *and* its last mapping is unmapped, in any order; releasing right after `cuMemMap` is the
// documented idiom (cuda-samples, several allocators). `cuMemRetainAllocationHandle` takes one
// more reference to a mapped allocation's handle (the same handle value; NCCL frees with
// retain, release, unmap, release). So a `Handle` entry's extra word counts the handle's
// mappings (made through `cuMemMap`, kept as `Mapping` entries by virtual address) and its
// references beyond the first, and records that the last reference went while still mapped; the
// charge is given back at whichever of the last release and the last unmap comes last. Imported
// handles (`cuMemImportFromShareableHandle`, another process's memory) have no entry: neither
// charged nor tracked.

/// Mappings of a handle (low bits of its entry's extra word).
const HANDLE_MAPS: u64 = 0xffff_ffff;
/// References to the handle beyond the first (bits 32..63): retains not yet released.
const HANDLE_EXTRA_ONE: u64 = 1 << 32;
const HANDLE_EXTRA: u64 = 0x7fff_ffff << 32;
/// Every reference was released while the handle was still mapped (then no extra ones remain).
const HANDLE_RELEASED: u64 = 1 << 63;
/// Mappings one `cuMemUnmap` call gives back; any beyond stay charged (over-, never
/// under-counted).
const MAX_UNMAP: usize = 16;

/// What a `cuMemRelease` does to a tracked handle's extra word.
fn release_step(a: u64) -> u64 {
    if a & HANDLE_EXTRA == HANDLE_EXTRA {
        a // saturated retain count: stays charged until exit (over-, never under-counted)
    } else if a & HANDLE_EXTRA != 0 {
        a - HANDLE_EXTRA_ONE // a retained reference: the allocation lives on
    } else if a & HANDLE_MAPS != 0 && a & HANDLE_RELEASED == 0 {
        a | HANDLE_RELEASED // the last reference, still mapped: charged until the last unmap
    } else {
        a // released already (the driver refuses), or the last reference of an unmapped handle
    }
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemRelease(handle: u64) -> CUresult {
    guard(|| {
        let real = || {
            call_real!(
                cuMemRelease,
                unsafe extern "C" fn(u64) -> CUresult,
                (handle)
            )
        };
        let Mode::Limit(l, s) = mode() else {
            return real();
        };
        let Some((old, new)) = table::update_aux(Kind::Handle, handle, |a| Some(release_step(a)))
        else {
            return real(); // not ours (imported, or created while the table was full)
        };
        if old & (HANDLE_EXTRA | HANDLE_RELEASED | HANDLE_MAPS) != 0 {
            // Not the end of the allocation: only the bookkeeping changed (undone on failure).
            let rc = real();
            if rc != CUDA_SUCCESS && old != new {
                let released = new & HANDLE_RELEASED != old & HANDLE_RELEASED;
                let _ = table::update_aux(Kind::Handle, handle, |a| {
                    Some(if released {
                        a & !HANDLE_RELEASED
                    } else {
                        a + HANDLE_EXTRA_ONE
                    })
                });
            }
            return rc;
        }
        // The last reference of an unmapped handle: forget, free, give back (or restore).
        let Some((dev, bytes, aux)) = table::remove_aux(Kind::Handle, handle) else {
            return real();
        };
        let rc = real();
        if rc == CUDA_SUCCESS {
            shm::uncharge(l, s, dev, bytes);
        } else {
            let _ = table::insert_aux(Kind::Handle, handle, dev, bytes, aux);
        }
        rc
    })
}

/// `cuMemRetainAllocationHandle`: one more reference to the handle of the allocation mapped at
/// `addr`, which must be released too before the driver frees the memory.
#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemRetainAllocationHandle(handle: *mut u64, addr: Ptr) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuMemRetainAllocationHandle,
            unsafe extern "C" fn(*mut u64, Ptr) -> CUresult,
            (handle, addr)
        );
        if rc == CUDA_SUCCESS && matches!(mode(), Mode::Limit(..)) {
            let _ = table::update_aux(Kind::Handle, read(handle), |a| {
                Some(if a & HANDLE_RELEASED != 0 {
                    // Every earlier reference was released; this is the only one now.
                    a & !HANDLE_RELEASED
                } else if a & HANDLE_EXTRA == HANDLE_EXTRA {
                    a // saturated: stays charged until exit (over-, never under-)
                } else {
                    a + HANDLE_EXTRA_ONE
                })
            });
        }
        rc
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemMap(
    ptr: u64,
    size: usize,
    offset: usize,
    handle: u64,
    flags: u64,
) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuMemMap,
            unsafe extern "C" fn(u64, usize, usize, u64, u64) -> CUresult,
            (ptr, size, offset, handle, flags)
        );
        if rc == CUDA_SUCCESS
            && matches!(mode(), Mode::Limit(..))
            && table::update_aux(Kind::Handle, handle, |a| Some(a + 1)).is_some()
        {
            // A full table leaves the mapping unknown: the handle then stays charged.
            let _ = table::insert_aux(Kind::Mapping, ptr, 0, size as u64, handle);
        }
        rc
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemUnmap(ptr: u64, size: usize) -> CUresult {
    guard(|| {
        let real = || {
            call_real!(
                cuMemUnmap,
                unsafe extern "C" fn(u64, usize) -> CUresult,
                (ptr, size)
            )
        };
        let Mode::Limit(l, s) = mode() else {
            return real();
        };
        // Bookkeeping before the driver call (a handle freed here could be reissued by another
        // thread's cuMemCreate the moment the driver returns), undone if the driver refuses.
        let end = ptr.saturating_add(size as u64);
        let mut unmapped = [(0u64, 0u64, 0u64); MAX_UNMAP];
        let mut freed = [(0u64, 0usize, 0u64); MAX_UNMAP];
        let (mut n, mut nf) = (0, 0);
        let mut at = ptr;
        while at < end && n < MAX_UNMAP {
            let Some((_, len, handle)) = table::remove_aux(Kind::Mapping, at) else {
                break;
            };
            unmapped[n] = (at, len, handle);
            n += 1;
            let now = table::update_aux(Kind::Handle, handle, |a| {
                (a & HANDLE_MAPS != 0).then(|| a - 1)
            });
            if let Some((_, HANDLE_RELEASED)) = now {
                if let Some((dev, bytes)) = table::remove(Kind::Handle, handle) {
                    freed[nf] = (handle, dev, bytes);
                    nf += 1;
                }
            }
            if len == 0 {
                break;
            }
            at = at.saturating_add(len);
        }
        let rc = real();
        if rc == CUDA_SUCCESS {
            for &(_, dev, bytes) in &freed[..nf] {
                shm::uncharge(l, s, dev, bytes);
            }
        } else {
            for &(handle, dev, bytes) in &freed[..nf] {
                let _ = table::insert_aux(Kind::Handle, handle, dev, bytes, HANDLE_RELEASED);
            }
            for &(at, len, handle) in &unmapped[..n] {
                let _ = table::update_aux(Kind::Handle, handle, |a| Some(a + 1));
                let _ = table::insert_aux(Kind::Mapping, at, 0, len, handle);
            }
        }
        rc
    })
}

// ---------------------------------------------------------------------------------------------
// Arrays

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct ArrayDesc1 {
    width: c_uint,
    height: c_uint,
    format: c_uint,
    channels: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct ArrayDesc2 {
    width: usize,
    height: usize,
    format: c_uint,
    channels: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Array3dDesc1 {
    width: c_uint,
    height: c_uint,
    depth: c_uint,
    format: c_uint,
    channels: c_uint,
    flags: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Array3dDesc2 {
    width: usize,
    height: usize,
    depth: usize,
    format: c_uint,
    channels: c_uint,
    flags: c_uint,
}

/// Bytes per channel element of a `CUarray_format`; unknown (block-compressed, future) formats
/// count as 16 so they are over-, never under-charged.
fn format_bytes(format: c_uint) -> u64 {
    match format {
        0x01 | 0x08 | 0xc0 | 0xc6 => 1,
        0x02 | 0x09 | 0x10 | 0xc1 | 0xc3 | 0xc7 | 0xc9 => 2,
        0x03 | 0x0a | 0x20 | 0xc2 | 0xc4 | 0xc8 | 0xca => 4,
        0xc5 | 0xcb => 8,
        _ => 16,
    }
}

/// Footprint of an array (or of `levels` mipmap levels), an estimate: the driver's own tiling
/// and alignment are not visible through the API.
pub(crate) fn array_bytes(
    w: u64,
    h: u64,
    d: u64,
    format: c_uint,
    channels: c_uint,
    levels: u32,
) -> u64 {
    let elem = format_bytes(format).saturating_mul(u64::from(channels.max(1)));
    (0..levels.clamp(1, 64)).fold(0u64, |acc, lvl| {
        let dim = |x: u64| (x >> lvl).max(1);
        acc.saturating_add(
            dim(w)
                .saturating_mul(dim(h))
                .saturating_mul(dim(d))
                .saturating_mul(elem),
        )
    })
}

type ArrCreate<D> = unsafe extern "C" fn(*mut Ptr, *const D) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuArrayCreate(arr: *mut Ptr, desc: *const ArrayDesc1) -> CUresult {
    guard(|| {
        let d = read(desc);
        let bytes = array_bytes(
            u64::from(d.width),
            u64::from(d.height),
            1,
            d.format,
            d.channels,
            1,
        );
        counted_alloc(
            None,
            bytes,
            Kind::Array,
            || call_real!(cuArrayCreate, ArrCreate<ArrayDesc1>, (arr, desc)),
            || read(arr) as u64,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuArrayCreate_v2(arr: *mut Ptr, desc: *const ArrayDesc2) -> CUresult {
    guard(|| {
        let d = read(desc);
        let bytes = array_bytes(d.width as u64, d.height as u64, 1, d.format, d.channels, 1);
        counted_alloc(
            None,
            bytes,
            Kind::Array,
            || call_real!(cuArrayCreate_v2, ArrCreate<ArrayDesc2>, (arr, desc)),
            || read(arr) as u64,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuArray3DCreate(arr: *mut Ptr, desc: *const Array3dDesc1) -> CUresult {
    guard(|| {
        let d = read(desc);
        let bytes = array_bytes(
            u64::from(d.width),
            u64::from(d.height),
            u64::from(d.depth),
            d.format,
            d.channels,
            1,
        );
        counted_alloc(
            None,
            bytes,
            Kind::Array,
            || call_real!(cuArray3DCreate, ArrCreate<Array3dDesc1>, (arr, desc)),
            || read(arr) as u64,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuArray3DCreate_v2(
    arr: *mut Ptr,
    desc: *const Array3dDesc2,
) -> CUresult {
    guard(|| {
        let d = read(desc);
        let bytes = array_bytes(
            d.width as u64,
            d.height as u64,
            d.depth as u64,
            d.format,
            d.channels,
            1,
        );
        counted_alloc(
            None,
            bytes,
            Kind::Array,
            || call_real!(cuArray3DCreate_v2, ArrCreate<Array3dDesc2>, (arr, desc)),
            || read(arr) as u64,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuArrayDestroy(arr: Ptr) -> CUresult {
    guard(|| {
        counted_free(Kind::Array, arr as u64, || {
            call_real!(cuArrayDestroy, unsafe extern "C" fn(Ptr) -> CUresult, (arr))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMipmappedArrayCreate(
    arr: *mut Ptr,
    desc: *const Array3dDesc2,
    levels: c_uint,
) -> CUresult {
    guard(|| {
        let d = read(desc);
        let bytes = array_bytes(
            d.width as u64,
            d.height as u64,
            d.depth as u64,
            d.format,
            d.channels,
            levels,
        );
        counted_alloc(
            None,
            bytes,
            Kind::Mipmap,
            || {
                call_real!(
                    cuMipmappedArrayCreate,
                    unsafe extern "C" fn(*mut Ptr, *const Array3dDesc2, c_uint) -> CUresult,
                    (arr, desc, levels)
                )
            },
            || read(arr) as u64,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMipmappedArrayDestroy(arr: Ptr) -> CUresult {
    guard(|| {
        counted_free(Kind::Mipmap, arr as u64, || {
            call_real!(
                cuMipmappedArrayDestroy,
                unsafe extern "C" fn(Ptr) -> CUresult,
                (arr)
            )
        })
    })
}

// ---------------------------------------------------------------------------------------------
// What the instance sees

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuMemGetInfo,
            unsafe extern "C" fn(*mut c_uint, *mut c_uint) -> CUresult,
            (free, total)
        );
        if rc == CUDA_SUCCESS && !free.is_null() && !total.is_null() {
            let (t, f) = quota_view(current_dev(), u64::from(read(free)), u64::from(read(total)));
            // SAFETY: non-null out-pointers the driver just wrote.
            unsafe {
                *free = u32::try_from(f).unwrap_or(u32::MAX);
                *total = u32::try_from(t).unwrap_or(u32::MAX);
            }
        }
        rc
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuMemGetInfo_v2,
            unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult,
            (free, total)
        );
        if rc == CUDA_SUCCESS && !free.is_null() && !total.is_null() {
            let (t, f) = quota_view(current_dev(), read(free) as u64, read(total) as u64);
            // SAFETY: non-null out-pointers the driver just wrote.
            unsafe {
                *free = f as usize;
                *total = t as usize;
            }
        }
        rc
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuDeviceTotalMem,
            unsafe extern "C" fn(*mut c_uint, CUdevice) -> CUresult,
            (bytes, dev)
        );
        if rc == CUDA_SUCCESS && !bytes.is_null() {
            let (t, _) = quota_view(limited_dev(dev), 0, u64::from(read(bytes)));
            // SAFETY: non-null out-pointer the driver just wrote.
            unsafe { *bytes = u32::try_from(t).unwrap_or(u32::MAX) };
        }
        rc
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard(|| {
        let rc = call_real!(
            cuDeviceTotalMem_v2,
            unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult,
            (bytes, dev)
        );
        if rc == CUDA_SUCCESS && !bytes.is_null() {
            let (t, _) = quota_view(limited_dev(dev), 0, read(bytes) as u64);
            // SAFETY: non-null out-pointer the driver just wrote.
            unsafe { *bytes = t as usize };
        }
        rc
    })
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct NvmlMemoryV2 {
    version: c_uint,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

/// (total, free, used) NVML should report for `device`, if the region limits it.
fn nvml_view(device: Ptr) -> Option<(u64, u64, u64)> {
    let Mode::Limit(l, _) = mode() else {
        return None;
    };
    let dev = nvml_index(device).filter(|i| *i < ndev())?;
    let quota = l.lim.devices[dev].quota.load(Ordering::Relaxed);
    let used = l.usage.devices[dev].used.load(Ordering::Relaxed).min(quota);
    Some((quota, quota - used, used))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_nvmlDeviceGetMemoryInfo(device: Ptr, mem: *mut NvmlMemory) -> c_int {
    std::panic::catch_unwind(|| {
        let Some(f) = real!(
            nvmlDeviceGetMemoryInfo,
            unsafe extern "C" fn(Ptr, *mut NvmlMemory) -> c_int
        ) else {
            return NVML_ERROR_UNKNOWN;
        };
        // SAFETY: forwarding the caller's arguments.
        let rc = unsafe { f(device, mem) };
        if rc == NVML_SUCCESS && !mem.is_null() {
            if let Some((total, free, used)) = nvml_view(device) {
                // SAFETY: non-null out-pointer NVML just filled.
                unsafe { *mem = NvmlMemory { total, free, used } };
            }
        }
        rc
    })
    .unwrap_or(NVML_ERROR_UNKNOWN)
}

#[no_mangle]
pub unsafe extern "C" fn gvh_nvmlDeviceGetMemoryInfo_v2(
    device: Ptr,
    mem: *mut NvmlMemoryV2,
) -> c_int {
    std::panic::catch_unwind(|| {
        let Some(f) = real!(
            nvmlDeviceGetMemoryInfo_v2,
            unsafe extern "C" fn(Ptr, *mut NvmlMemoryV2) -> c_int
        ) else {
            return NVML_ERROR_UNKNOWN;
        };
        // SAFETY: forwarding the caller's arguments.
        let rc = unsafe { f(device, mem) };
        if rc == NVML_SUCCESS && !mem.is_null() {
            if let Some((total, free, used)) = nvml_view(device) {
                // SAFETY: non-null out-pointer NVML just filled; `version` is kept.
                unsafe {
                    (*mem).total = total;
                    (*mem).reserved = 0;
                    (*mem).free = free;
                    (*mem).used = used;
                }
            }
        }
        rc
    })
    .unwrap_or(NVML_ERROR_UNKNOWN)
}

// ---------------------------------------------------------------------------------------------
// Contexts: the per-process footprint
//
// `limiter_context_bytes` stands for what the driver keeps per context on a device. It is charged
// on a device while this process has at least one live context there, once however many:
// - a context made by `cuCtxCreate*`, until `cuCtxDestroy(_v2)` of it succeeds (kept in the
//   allocation table by handle, so a destroy of a handle we never saw gives nothing back);
// - the device's primary context while it is active: from a retain until the release of the
//   last reference, or a `cuDevicePrimaryCtxReset(_v2)` (`cudaDeviceReset`), which destroys the
//   context but, as documented, does not release the references; the next retain re-creates it
//   and charges again, and releases of the old references then give nothing back.
// The driver frees a context's memory when it is destroyed, so the charge goes back then, not
// at exit; what is still charged at exit goes back with the process's slot. The bookkeeping
// sits under a small spin lock (context calls are rare and never on a launch or allocation
// path), which is never held across a driver call.

struct CtxBook {
    lock: AtomicBool,
    /// Live contexts per device: created ones plus the primary one while active.
    live: [AtomicU32; MAX_DEVICES],
    /// References to the primary context taken through `cuDevicePrimaryCtxRetain`.
    primary_refs: [AtomicU32; MAX_DEVICES],
    /// Whether the primary context exists (counted in `live`).
    primary_active: [AtomicBool; MAX_DEVICES],
}

static CTX_BOOK: CtxBook = CtxBook {
    lock: AtomicBool::new(false),
    live: [const { AtomicU32::new(0) }; MAX_DEVICES],
    primary_refs: [const { AtomicU32::new(0) }; MAX_DEVICES],
    primary_active: [const { AtomicBool::new(false) }; MAX_DEVICES],
};

/// The book, locked until dropped.
struct CtxLocked;

impl CtxLocked {
    fn new() -> CtxLocked {
        while CTX_BOOK
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        CtxLocked
    }
}

impl Drop for CtxLocked {
    fn drop(&mut self) {
        CTX_BOOK.lock.store(false, Ordering::Release);
    }
}

/// In a forked child: the parent's contexts are not the child's (and the lock may have been
/// held by a thread that does not exist here).
fn ctx_book_reset() {
    for d in 0..MAX_DEVICES {
        CTX_BOOK.live[d].store(0, Ordering::Relaxed);
        CTX_BOOK.primary_refs[d].store(0, Ordering::Relaxed);
        CTX_BOOK.primary_active[d].store(false, Ordering::Relaxed);
    }
    CTX_BOOK.lock.store(false, Ordering::Release);
}

/// Where a context on `dev` is accounted: the region, this process's slot, the device index and
/// the footprint. `None` when nothing is charged for it.
#[derive(Clone, Copy)]
struct CtxAcct {
    l: Layout<'static>,
    s: Option<&'static Slot>,
    dev: usize,
    bytes: u64,
}

fn ctx_acct(dev: CUdevice) -> Option<CtxAcct> {
    let Mode::Limit(l, s) = mode() else {
        return None;
    };
    let bytes = CTX_BYTES.load(Ordering::Relaxed);
    let dev = limited_dev(dev)?;
    (bytes != 0).then_some(CtxAcct { l, s, dev, bytes })
}

impl CtxAcct {
    /// One more live context; the first charges the footprint. False (nothing changed) if it
    /// does not fit.
    fn add(self, _locked: &CtxLocked) -> bool {
        let live = &CTX_BOOK.live[self.dev];
        if live.load(Ordering::Relaxed) == 0 && !charge(self.l, self.s, self.dev, self.bytes) {
            return false;
        }
        live.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// One live context fewer; the last gives the footprint back.
    fn sub(self, _locked: &CtxLocked) {
        let live = &CTX_BOOK.live[self.dev];
        match live.load(Ordering::Relaxed) {
            0 => {}
            1 => {
                live.store(0, Ordering::Relaxed);
                shm::uncharge(self.l, self.s, self.dev, self.bytes);
            }
            n => live.store(n - 1, Ordering::Relaxed),
        }
    }

    /// The primary context lost its last reference or was reset: it is gone.
    fn primary_gone(self, locked: &CtxLocked) {
        if CTX_BOOK.primary_active[self.dev].swap(false, Ordering::Relaxed) {
            self.sub(locked);
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDevicePrimaryCtxRetain(ctx: *mut Ptr, dev: CUdevice) -> CUresult {
    guard(|| {
        let real = || {
            call_real!(
                cuDevicePrimaryCtxRetain,
                unsafe extern "C" fn(*mut Ptr, CUdevice) -> CUresult,
                (ctx, dev)
            )
        };
        let Some(a) = ctx_acct(dev) else {
            return real();
        };
        {
            let locked = CtxLocked::new();
            if !CTX_BOOK.primary_active[a.dev].load(Ordering::Relaxed) {
                if !a.add(&locked) {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                CTX_BOOK.primary_active[a.dev].store(true, Ordering::Relaxed);
            }
            CTX_BOOK.primary_refs[a.dev].fetch_add(1, Ordering::Relaxed);
        }
        let rc = real();
        if rc != CUDA_SUCCESS {
            let locked = CtxLocked::new();
            let refs = &CTX_BOOK.primary_refs[a.dev];
            let left = refs.load(Ordering::Relaxed).saturating_sub(1);
            refs.store(left, Ordering::Relaxed);
            if left == 0 {
                a.primary_gone(&locked);
            }
        }
        rc
    })
}

/// After the driver released a primary context reference: the last one destroys it.
fn primary_released(dev: CUdevice, rc: CUresult) -> CUresult {
    if rc == CUDA_SUCCESS {
        if let Some(a) = ctx_acct(dev) {
            let locked = CtxLocked::new();
            let refs = &CTX_BOOK.primary_refs[a.dev];
            match refs.load(Ordering::Relaxed) {
                0 => {} // a reference taken where the limiter did not see it
                1 => {
                    refs.store(0, Ordering::Relaxed);
                    a.primary_gone(&locked);
                }
                n => refs.store(n - 1, Ordering::Relaxed),
            }
        }
    }
    rc
}

/// After the driver reset a primary context: it is destroyed, its references stay.
fn primary_reset(dev: CUdevice, rc: CUresult) -> CUresult {
    if rc == CUDA_SUCCESS {
        if let Some(a) = ctx_acct(dev) {
            a.primary_gone(&CtxLocked::new());
        }
    }
    rc
}

type DevFn = unsafe extern "C" fn(CUdevice) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    guard(|| primary_released(dev, call_real!(cuDevicePrimaryCtxRelease, DevFn, (dev))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_released(dev, call_real!(cuDevicePrimaryCtxRelease_v2, DevFn, (dev))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev, call_real!(cuDevicePrimaryCtxReset, DevFn, (dev))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    guard(|| primary_reset(dev, call_real!(cuDevicePrimaryCtxReset_v2, DevFn, (dev))))
}

/// `cuCtxCreate*`: counts the new context (charging the footprint if it is the device's first),
/// creates it, and records its handle for `cuCtxDestroy`.
fn ctx_create(ctx: *mut Ptr, dev: CUdevice, create: impl FnOnce() -> CUresult) -> CUresult {
    let Some(a) = ctx_acct(dev) else {
        return create();
    };
    if !a.add(&CtxLocked::new()) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = create();
    if rc != CUDA_SUCCESS {
        a.sub(&CtxLocked::new());
    } else {
        // Not recorded (table full): it stays counted until exit (over-, never under-).
        let _ = table::insert(Kind::Context, read(ctx) as u64, a.dev, 0);
    }
    rc
}

type CtxCreate = unsafe extern "C" fn(*mut Ptr, c_uint, CUdevice) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxCreate(ctx: *mut Ptr, flags: c_uint, dev: CUdevice) -> CUresult {
    guard(|| {
        ctx_create(ctx, dev, || {
            call_real!(cuCtxCreate, CtxCreate, (ctx, flags, dev))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxCreate_v2(
    ctx: *mut Ptr,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        ctx_create(ctx, dev, || {
            call_real!(cuCtxCreate_v2, CtxCreate, (ctx, flags, dev))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxCreate_v3(
    ctx: *mut Ptr,
    params: Ptr,
    nparams: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        ctx_create(ctx, dev, || {
            call_real!(
                cuCtxCreate_v3,
                unsafe extern "C" fn(*mut Ptr, Ptr, c_int, c_uint, CUdevice) -> CUresult,
                (ctx, params, nparams, flags, dev)
            )
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxCreate_v4(
    ctx: *mut Ptr,
    params: Ptr,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        ctx_create(ctx, dev, || {
            call_real!(
                cuCtxCreate_v4,
                unsafe extern "C" fn(*mut Ptr, Ptr, c_uint, CUdevice) -> CUresult,
                (ctx, params, flags, dev)
            )
        })
    })
}

/// After the driver destroyed `ctx`: if it is a context this process created and counted, one
/// live context fewer on its device. The entry goes only once the driver succeeded, so a failed
/// or repeated destroy gives nothing back.
fn ctx_destroyed(ctx: Ptr, rc: CUresult) -> CUresult {
    if rc == CUDA_SUCCESS {
        if let Mode::Limit(l, s) = mode() {
            if let Some((dev, _)) = table::remove(Kind::Context, ctx as u64) {
                let bytes = CTX_BYTES.load(Ordering::Relaxed);
                CtxAcct { l, s, dev, bytes }.sub(&CtxLocked::new());
            }
        }
    }
    rc
}

type CtxDestroy = unsafe extern "C" fn(Ptr) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxDestroy(ctx: Ptr) -> CUresult {
    guard(|| ctx_destroyed(ctx, call_real!(cuCtxDestroy, CtxDestroy, (ctx))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuCtxDestroy_v2(ctx: Ptr) -> CUresult {
    guard(|| ctx_destroyed(ctx, call_real!(cuCtxDestroy_v2, CtxDestroy, (ctx))))
}

// ---------------------------------------------------------------------------------------------
// Launches

type LaunchKernel = unsafe extern "C" fn(
    Ptr,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Ptr,
    *mut Ptr,
    *mut Ptr,
) -> CUresult;
type LaunchKernelEx = unsafe extern "C" fn(*const c_void, Ptr, *mut Ptr, *mut Ptr) -> CUresult;
type LaunchCoop = unsafe extern "C" fn(
    Ptr,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Ptr,
    *mut Ptr,
) -> CUresult;
type GraphLaunch = unsafe extern "C" fn(Ptr, Ptr) -> CUresult;

/// The leading fields of `CUlaunchConfig`, up to its stream.
#[repr(C)]
pub(crate) struct LaunchConfigHead {
    dims: [c_uint; 7],
    stream: Ptr,
}

/// The stream of a `cuLaunchKernelEx` configuration (NULL if there is none; the driver rejects
/// the launch then).
#[inline]
fn config_stream(config: *const c_void) -> Ptr {
    if config.is_null() {
        return null_mut();
    }
    // SAFETY: the caller's launch configuration, which the driver reads the same way; only the
    // stream field is read.
    unsafe { (*config.cast::<LaunchConfigHead>()).stream }
}

type BeginCapture = unsafe extern "C" fn(Ptr) -> CUresult;
type BeginCaptureV2 = unsafe extern "C" fn(Ptr, c_int) -> CUresult;
type BeginCaptureToGraph =
    unsafe extern "C" fn(Ptr, Ptr, *const Ptr, *const c_void, usize, c_int) -> CUresult;
type EndCapture = unsafe extern "C" fn(Ptr, *mut Ptr) -> CUresult;

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCapture(stream: Ptr) -> CUresult {
    guard(|| capture_begin(|| call_real!(cuStreamBeginCapture, BeginCapture, (stream))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCapture_ptsz(stream: Ptr) -> CUresult {
    guard(|| capture_begin(|| call_real!(cuStreamBeginCapture_ptsz, BeginCapture, (stream))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCapture_v2(stream: Ptr, mode: c_int) -> CUresult {
    guard(|| capture_begin(|| call_real!(cuStreamBeginCapture_v2, BeginCaptureV2, (stream, mode))))
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCapture_v2_ptsz(stream: Ptr, mode: c_int) -> CUresult {
    guard(|| {
        capture_begin(|| call_real!(cuStreamBeginCapture_v2_ptsz, BeginCaptureV2, (stream, mode)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCaptureToGraph(
    stream: Ptr,
    graph: Ptr,
    deps: *const Ptr,
    edges: *const c_void,
    n: usize,
    mode: c_int,
) -> CUresult {
    guard(|| {
        capture_begin(|| {
            call_real!(
                cuStreamBeginCaptureToGraph,
                BeginCaptureToGraph,
                (stream, graph, deps, edges, n, mode)
            )
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamBeginCaptureToGraph_ptsz(
    stream: Ptr,
    graph: Ptr,
    deps: *const Ptr,
    edges: *const c_void,
    n: usize,
    mode: c_int,
) -> CUresult {
    guard(|| {
        capture_begin(|| {
            call_real!(
                cuStreamBeginCaptureToGraph_ptsz,
                BeginCaptureToGraph,
                (stream, graph, deps, edges, n, mode)
            )
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamEndCapture(stream: Ptr, graph: *mut Ptr) -> CUresult {
    guard(|| {
        capture_end(stream, false, || {
            call_real!(cuStreamEndCapture, EndCapture, (stream, graph))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuStreamEndCapture_ptsz(stream: Ptr, graph: *mut Ptr) -> CUresult {
    guard(|| {
        capture_end(stream, true, || {
            call_real!(cuStreamEndCapture_ptsz, EndCapture, (stream, graph))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchKernel(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, false);
        call_real!(
            cuLaunchKernel,
            LaunchKernel,
            (f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchKernel_ptsz(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, true);
        call_real!(
            cuLaunchKernel_ptsz,
            LaunchKernel,
            (f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchKernelEx(
    config: *const c_void,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(config_stream(config), false);
        call_real!(cuLaunchKernelEx, LaunchKernelEx, (config, f, params, extra))
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchKernelEx_ptsz(
    config: *const c_void,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(config_stream(config), true);
        call_real!(
            cuLaunchKernelEx_ptsz,
            LaunchKernelEx,
            (config, f, params, extra)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchCooperativeKernel(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: Ptr,
    params: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, false);
        call_real!(
            cuLaunchCooperativeKernel,
            LaunchCoop,
            (f, gx, gy, gz, bx, by, bz, shared, stream, params)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchCooperativeKernel_ptsz(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: Ptr,
    params: *mut Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, true);
        call_real!(
            cuLaunchCooperativeKernel_ptsz,
            LaunchCoop,
            (f, gx, gy, gz, bx, by, bz, shared, stream, params)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuGraphLaunch(exec: Ptr, stream: Ptr) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, false);
        call_real!(cuGraphLaunch, GraphLaunch, (exec, stream))
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuGraphLaunch_ptsz(exec: Ptr, stream: Ptr) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, true);
        call_real!(cuGraphLaunch_ptsz, GraphLaunch, (exec, stream))
    })
}

// The legacy launch API (deprecated since CUDA 4.0; the multi-device cooperative launch since
// 11.3), still exported by the driver: the same gate, so it is no way around the compute share.
// `cuLaunchHostFunc(_ptsz)` is deliberately not hooked: it runs a host function, no kernel.

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunch(f: Ptr) -> CUresult {
    guard(|| {
        launch_gate();
        call_real!(cuLaunch, unsafe extern "C" fn(Ptr) -> CUresult, (f))
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchGrid(f: Ptr, gw: c_int, gh: c_int) -> CUresult {
    guard(|| {
        launch_gate();
        call_real!(
            cuLaunchGrid,
            unsafe extern "C" fn(Ptr, c_int, c_int) -> CUresult,
            (f, gw, gh)
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchGridAsync(
    f: Ptr,
    gw: c_int,
    gh: c_int,
    stream: Ptr,
) -> CUresult {
    guard(|| {
        launch_gate_stream(stream, false);
        call_real!(
            cuLaunchGridAsync,
            unsafe extern "C" fn(Ptr, c_int, c_int, Ptr) -> CUresult,
            (f, gw, gh, stream)
        )
    })
}

/// `CUDA_LAUNCH_PARAMS`.
#[repr(C)]
pub(crate) struct LaunchParams {
    function: Ptr,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared: c_uint,
    stream: Ptr,
    params: *mut Ptr,
}

/// One kernel per device, each on its own stream: every kernel passes the gate of its device.
#[no_mangle]
pub unsafe extern "C" fn gvh_cuLaunchCooperativeKernelMultiDevice(
    list: *mut LaunchParams,
    count: c_uint,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        if !list.is_null() {
            for i in 0..count as usize {
                // SAFETY: the caller passes `count` entries (the driver reads the same ones);
                // only the stream handle is read.
                let stream = unsafe { (*list.add(i)).stream };
                launch_gate_on(|| stream_dev(stream));
            }
        }
        call_real!(
            cuLaunchCooperativeKernelMultiDevice,
            unsafe extern "C" fn(*mut LaunchParams, c_uint, c_uint) -> CUresult,
            (list, count, flags)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_procaddr_answer_is_a_hook() {
        for name in procaddr::all_names() {
            assert!(
                hook_index(name).is_some(),
                "{} has no hook",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn host_functions_are_not_launches() {
        for name in [&b"cuLaunchHostFunc"[..], b"cuLaunchHostFunc_ptsz"] {
            assert!(hook_index(name).is_none());
        }
        for name in [
            &b"cuLaunch"[..],
            b"cuLaunchGrid",
            b"cuLaunchGridAsync",
            b"cuLaunchCooperativeKernelMultiDevice",
        ] {
            assert!(hook_index(name).is_some());
        }
    }

    #[test]
    fn launch_params_layout() {
        // CUDA_LAUNCH_PARAMS on LP64: function, 7 unsigned, (pad), hStream, kernelParams.
        assert_eq!(std::mem::size_of::<LaunchParams>(), 56);
        assert_eq!(std::mem::offset_of!(LaunchParams, stream), 40);
    }

    #[test]
    fn launch_config_stream_offset() {
        // CUlaunchConfig on LP64: seven unsigned, (pad), hStream.
        assert_eq!(std::mem::offset_of!(LaunchConfigHead, stream), 32);
    }

    #[test]
    fn array_sizes() {
        assert_eq!(array_bytes(1024, 1024, 1, 0x20, 4, 1), 16 << 20);
        assert_eq!(array_bytes(4, 4, 1, 0x01, 1, 3), 16 + 4 + 1);
        assert_eq!(array_bytes(8, 0, 0, 0x91, 0, 1), 8 * 16);
    }
}
