//! A test double for the CUDA driver (`libcuda.so.1`) and the few NVML calls the limiter hooks,
//! so the limiter's tests and benchmark run in CI without a GPU.
//!
//! What it models: device memory as a byte count with a configurable total (every allocation
//! path the limiter counts, each returning distinct pointers or handles; 32-bit pointers for the
//! CUDA 2.x `_v1` ABIs), launches that take a configurable time (every kernel launch entry,
//! the legacy `cuLaunch`/`cuLaunchGrid`/`cuLaunchGridAsync` and the multi-device cooperative
//! launch included; `cuLaunchHostFunc` runs its host function at once and is no launch), and
//! `cuGetProcAddress(_v2)` answering for any CUDA version (11.x, 12.x, 13.x) with the versioned
//! and per-thread-stream variants a real driver returns. Each exported entry counts its calls, so
//! tests can check that a request reached exactly the variant it should have (`fakecuda_calls`).
//!
//! Devices, contexts and streams are modelled just enough to tell which device a launch is on:
//! a context handle names its device, each thread has a context stack (`cuCtxSetCurrent`,
//! `cuCtxPushCurrent_v2`, `cuCtxPopCurrent_v2`; with none current, `cuCtxGetDevice` answers
//! device 0), and a stream belongs to the device current when it was created
//! (`cuStreamGetDevice`, `cuStreamGetCtx`). Context lifetimes are modelled as the driver
//! documents them: a created context lives until `cuCtxDestroy(_v2)` (a second destroy fails),
//! the primary context from a retain until its last release or a reset (which keeps the
//! references), and a `cuMemCreate` allocation until every reference to its handle (creation and
//! `cuMemRetainAllocationHandle`) is released and its last mapping unmapped.
//!
//! Configuration is read once, on first use, from the environment (acceptable in a double):
//! `FAKECUDA_TOTAL_MEM` (bytes, default 8 GiB), `FAKECUDA_LAUNCH_NS` (each launch sleeps that
//! long, default 0), `FAKECUDA_BUSY_FILE` (an 8-byte file; the double adds the nanoseconds it
//! spent "executing" to it, like the SM-busy time the daemon reads from NVML on a real GPU),
//! `FAKECUDA_DEVICES` (default 1), `FAKECUDA_DRIVER_VERSION` (default 12080; below 12080
//! `cuStreamGetDevice` fails as if the driver did not have it).
//!
//! The entry points deliberately keep the driver's C ABI and names, hence the lint allowances.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

type CUresult = c_int;
type Ptr = *mut c_void;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const NOT_FOUND: CUresult = 500;
const NOT_SUPPORTED: CUresult = 801;

// ---------------------------------------------------------------------------------------------
// Call counters, indexed at compile time

const CALL_NAMES: &[&str] = &[
    "cuMemAlloc",
    "cuMemAlloc_v2",
    "cuMemAllocPitch",
    "cuMemAllocPitch_v2",
    "cuMemAllocManaged",
    "cuMemAllocAsync",
    "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync",
    "cuMemAllocFromPoolAsync_ptsz",
    "cuMemFree",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemFreeAsync_ptsz",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemRetainAllocationHandle",
    "cuArrayCreate",
    "cuArrayCreate_v2",
    "cuArray3DCreate",
    "cuArray3DCreate_v2",
    "cuArrayDestroy",
    "cuMipmappedArrayCreate",
    "cuMipmappedArrayDestroy",
    "cuMemGetInfo",
    "cuMemGetInfo_v2",
    "cuDeviceTotalMem",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease",
    "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxReset",
    "cuDevicePrimaryCtxReset_v2",
    "cuCtxCreate",
    "cuCtxCreate_v2",
    "cuCtxCreate_v3",
    "cuCtxCreate_v4",
    "cuCtxDestroy",
    "cuCtxDestroy_v2",
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuLaunchCooperativeKernel_ptsz",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
    "cuLaunch",
    "cuLaunchGrid",
    "cuLaunchGridAsync",
    "cuLaunchCooperativeKernelMultiDevice",
    "cuLaunchHostFunc",
    "cuLaunchHostFunc_ptsz",
    "cuStreamGetDevice",
    "cuStreamGetCtx",
    "cuGetProcAddress",
    "cuGetProcAddress_v2",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "cuStreamBeginCapture",
    "cuStreamBeginCapture_ptsz",
    "cuStreamBeginCapture_v2",
    "cuStreamBeginCapture_v2_ptsz",
    "cuStreamBeginCaptureToGraph",
    "cuStreamBeginCaptureToGraph_ptsz",
    "cuStreamEndCapture",
    "cuStreamEndCapture_ptsz",
    "cuStreamIsCapturing",
    "cuStreamIsCapturing_ptsz",
];

static CALLS: [AtomicU64; 96] = [const { AtomicU64::new(0) }; 96];

const fn pos(name: &str) -> usize {
    let mut i = 0;
    while i < CALL_NAMES.len() {
        let a = CALL_NAMES[i].as_bytes();
        let b = name.as_bytes();
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not in CALL_NAMES")
}

macro_rules! bump {
    ($n:literal) => {{
        const I: usize = pos($n);
        CALLS[I].fetch_add(1, Ordering::Relaxed);
    }};
}

/// Calls made to the entry `name` (exact versioned name) in this process.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_calls(name: *const c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller passes a C string.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    CALL_NAMES
        .iter()
        .position(|n| n.as_bytes() == name)
        .map_or(0, |i| CALLS[i].load(Ordering::Relaxed))
}

/// Bytes of device memory currently allocated in this process.
#[no_mangle]
pub extern "C" fn fakecuda_mem_used() -> u64 {
    dev().mem.lock().map_or(0, |m| m.used)
}

// ---------------------------------------------------------------------------------------------
// The device

struct Mem {
    used: u64,
    next: u64,
    next32: u64,
    live: HashMap<u64, u64>,
}

struct Device {
    total: u64,
    launch_ns: u64,
    devices: c_int,
    driver_version: c_int,
    busy: Option<&'static AtomicU64>,
    mem: Mutex<Mem>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn map_busy_file() -> Option<&'static AtomicU64> {
    let path = std::env::var_os("FAKECUDA_BUSY_FILE")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: shared mapping of the first 8 bytes of a file we hold open; checked for failure.
    let p = unsafe {
        libc::mmap(
            null_mut(),
            8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: page-aligned, 8 valid bytes, never unmapped.
    Some(unsafe { &*p.cast::<AtomicU64>() })
}

fn dev() -> &'static Device {
    static DEV: OnceLock<Device> = OnceLock::new();
    DEV.get_or_init(|| Device {
        total: env_u64("FAKECUDA_TOTAL_MEM", 8 << 30),
        launch_ns: env_u64("FAKECUDA_LAUNCH_NS", 0),
        devices: c_int::try_from(env_u64("FAKECUDA_DEVICES", 1)).unwrap_or(1),
        driver_version: c_int::try_from(env_u64("FAKECUDA_DRIVER_VERSION", 12080)).unwrap_or(12080),
        busy: map_busy_file(),
        mem: Mutex::new(Mem {
            used: 0,
            next: 0x7000_0000_0000,
            next32: 0x1000_0000,
            live: HashMap::new(),
        }),
    })
}

/// Allocates `bytes`; `small` asks for an address below 4 GiB (the 32-bit `_v1` ABIs).
fn alloc(bytes: u64, small: bool) -> Result<u64, CUresult> {
    if bytes == 0 {
        return Err(INVALID_VALUE);
    }
    let d = dev();
    let Ok(mut m) = d.mem.lock() else {
        return Err(OUT_OF_MEMORY);
    };
    if m.used.saturating_add(bytes) > d.total {
        return Err(OUT_OF_MEMORY);
    }
    let step = bytes.div_ceil(256) * 256;
    let at = if small {
        let at = m.next32;
        if at + step > u64::from(u32::MAX) {
            return Err(OUT_OF_MEMORY);
        }
        m.next32 += step;
        at
    } else {
        let at = m.next;
        m.next += step;
        at
    };
    m.used += bytes;
    m.live.insert(at, bytes);
    Ok(at)
}

fn free(at: u64) -> CUresult {
    let Ok(mut m) = dev().mem.lock() else {
        return INVALID_VALUE;
    };
    match m.live.remove(&at) {
        Some(bytes) => {
            m.used -= bytes;
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

fn launch() -> CUresult {
    let d = dev();
    if d.launch_ns > 0 {
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_nanos(d.launch_ns));
        if let Some(b) = d.busy {
            b.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Stream capture: a launch into a capturing stream records a node and runs nothing.

const ILLEGAL_STATE: CUresult = 401;
const STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
/// `CU_STREAM_PER_THREAD`, what the NULL stream means to a `_ptsz` entry.
const PER_THREAD_STREAM: usize = 2;

/// Streams being captured.
static CAPTURING: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The stream a capture call names; `None` for the legacy NULL stream, which cannot capture.
fn capture_key(s: Ptr, ptsz: bool) -> Option<usize> {
    match s as usize {
        0 if ptsz => Some(PER_THREAD_STREAM),
        0 | 1 => None,
        k => Some(k),
    }
}

fn is_capturing(s: Ptr, ptsz: bool) -> bool {
    capture_key(s, ptsz).is_some_and(|k| CAPTURING.lock().is_ok_and(|c| c.contains(&k)))
}

fn begin_capture(s: Ptr, ptsz: bool) -> CUresult {
    let Some(k) = capture_key(s, ptsz) else {
        return STREAM_CAPTURE_UNSUPPORTED;
    };
    let Ok(mut c) = CAPTURING.lock() else {
        return ILLEGAL_STATE;
    };
    if c.contains(&k) {
        return ILLEGAL_STATE;
    }
    c.push(k);
    SUCCESS
}

fn end_capture(s: Ptr, ptsz: bool, graph: *mut Ptr) -> CUresult {
    let Some(k) = capture_key(s, ptsz) else {
        return ILLEGAL_STATE;
    };
    let Ok(mut c) = CAPTURING.lock() else {
        return ILLEGAL_STATE;
    };
    let Some(i) = c.iter().position(|x| *x == k) else {
        return ILLEGAL_STATE;
    };
    c.swap_remove(i);
    put(graph, 0x6700_0000 as Ptr)
}

/// A launch into stream `s`: captured (nothing runs) or executed.
fn launch_in(s: Ptr, ptsz: bool) -> CUresult {
    if is_capturing(s, ptsz) {
        return SUCCESS;
    }
    launch()
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture(s: Ptr) -> CUresult {
    bump!("cuStreamBeginCapture");
    begin_capture(s, false)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_ptsz(s: Ptr) -> CUresult {
    bump!("cuStreamBeginCapture_ptsz");
    begin_capture(s, true)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(s: Ptr, _mode: c_int) -> CUresult {
    bump!("cuStreamBeginCapture_v2");
    begin_capture(s, false)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2_ptsz(s: Ptr, _mode: c_int) -> CUresult {
    bump!("cuStreamBeginCapture_v2_ptsz");
    begin_capture(s, true)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCaptureToGraph(
    s: Ptr,
    _g: Ptr,
    _deps: *const Ptr,
    _edges: *const c_void,
    _n: usize,
    _mode: c_int,
) -> CUresult {
    bump!("cuStreamBeginCaptureToGraph");
    begin_capture(s, false)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCaptureToGraph_ptsz(
    s: Ptr,
    _g: Ptr,
    _deps: *const Ptr,
    _edges: *const c_void,
    _n: usize,
    _mode: c_int,
) -> CUresult {
    bump!("cuStreamBeginCaptureToGraph_ptsz");
    begin_capture(s, true)
}

#[no_mangle]
pub extern "C" fn cuStreamEndCapture(s: Ptr, g: *mut Ptr) -> CUresult {
    bump!("cuStreamEndCapture");
    end_capture(s, false, g)
}

#[no_mangle]
pub extern "C" fn cuStreamEndCapture_ptsz(s: Ptr, g: *mut Ptr) -> CUresult {
    bump!("cuStreamEndCapture_ptsz");
    end_capture(s, true, g)
}

#[no_mangle]
pub extern "C" fn cuStreamIsCapturing(s: Ptr, status: *mut c_int) -> CUresult {
    bump!("cuStreamIsCapturing");
    put(status, c_int::from(is_capturing(s, false)))
}

#[no_mangle]
pub extern "C" fn cuStreamIsCapturing_ptsz(s: Ptr, status: *mut c_int) -> CUresult {
    bump!("cuStreamIsCapturing_ptsz");
    put(status, c_int::from(is_capturing(s, true)))
}

/// Writes through an out-pointer if non-null.
fn put<T>(p: *mut T, v: T) -> CUresult {
    if p.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: the caller's non-null out-pointer.
    unsafe { p.write(v) };
    SUCCESS
}

fn out<T>(p: *mut T, r: Result<T, CUresult>) -> CUresult {
    match r {
        Ok(v) => put(p, v),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Init, devices, contexts

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    let _ = dev();
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    put(v, dev().driver_version)
}

#[no_mangle]
pub extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    put(n, dev().devices)
}

fn valid_device(d: c_int) -> bool {
    (0..dev().devices).contains(&d)
}

#[no_mangle]
pub extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> CUresult {
    if !valid_device(ordinal) {
        return INVALID_VALUE;
    }
    put(d, ordinal)
}

/// Context handles: `CTX + device` for the primary context, `CTX + (serial << 8) + device` for
/// one made by `cuCtxCreate*`.
const CTX: usize = 0xc0de_0000;
const CTX_END: usize = CTX + (1 << 24);
/// Stream handles: `STREAM + (serial << 8) + device`.
const STREAM: usize = 0x5700_0000;
const STREAM_END: usize = 0x5800_0000;

fn ctx_handle(d: c_int) -> Ptr {
    (CTX + d as usize) as Ptr
}

fn ctx_device(ctx: Ptr) -> Option<c_int> {
    let c = ctx as usize;
    if !(CTX..CTX_END).contains(&c) {
        return None;
    }
    let d = ((c - CTX) & 0xff) as c_int;
    (valid_device(d) && (c - CTX < 0x100 || CREATED.lock().is_ok_and(|l| l.contains(&c))))
        .then_some(d)
}

/// Contexts made by `cuCtxCreate*` and not destroyed yet.
static CREATED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Primary contexts, per device: (references, active). As in the driver, a reset destroys the
/// context but keeps the references; a retain re-creates it.
static PRIMARY: Mutex<[(u32, bool); 16]> = Mutex::new([(0, false); 16]);

thread_local! {
    /// This thread's context stack, top last.
    static CTX_STACK: RefCell<Vec<Ptr>> = const { RefCell::new(Vec::new()) };
}

/// The current context's device; device 0 when no context is current (lenient: a real driver
/// answers `CUDA_ERROR_INVALID_CONTEXT`).
fn current_device() -> c_int {
    CTX_STACK
        .with(|s| s.borrow().last().copied())
        .and_then(ctx_device)
        .unwrap_or(0)
}

/// The device a stream belongs to; the NULL, legacy and per-thread streams are the current
/// context's.
fn stream_device(s: Ptr) -> c_int {
    let s = s as usize;
    if (STREAM..STREAM_END).contains(&s) {
        (s & 0xff) as c_int
    } else {
        current_device()
    }
}

#[no_mangle]
pub extern "C" fn cuCtxGetDevice(d: *mut c_int) -> CUresult {
    put(d, current_device())
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: Ptr) -> CUresult {
    if !ctx.is_null() && ctx_device(ctx).is_none() {
        return INVALID_CONTEXT;
    }
    CTX_STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.pop();
        if !ctx.is_null() {
            s.push(ctx);
        }
    });
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: Ptr) -> CUresult {
    if ctx_device(ctx).is_none() {
        return INVALID_CONTEXT;
    }
    CTX_STACK.with(|s| s.borrow_mut().push(ctx));
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxPopCurrent_v2(ctx: *mut Ptr) -> CUresult {
    match CTX_STACK.with(|s| s.borrow_mut().pop()) {
        Some(c) => {
            if !ctx.is_null() {
                put(ctx, c);
            }
            SUCCESS
        }
        None => INVALID_CONTEXT,
    }
}

#[no_mangle]
pub extern "C" fn cuStreamCreate(s: *mut Ptr, _flags: c_uint) -> CUresult {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed) as usize & 0xffff;
    put(
        s,
        (STREAM + (serial << 8) + current_device() as usize) as Ptr,
    )
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(_s: Ptr) -> CUresult {
    SUCCESS
}

/// CUDA 12.8; fails on an older `FAKECUDA_DRIVER_VERSION`, as if it were not there.
#[no_mangle]
pub extern "C" fn cuStreamGetDevice(s: Ptr, d: *mut c_int) -> CUresult {
    bump!("cuStreamGetDevice");
    if dev().driver_version < 12080 {
        return NOT_SUPPORTED;
    }
    put(d, stream_device(s))
}

#[no_mangle]
pub extern "C" fn cuStreamGetCtx(s: Ptr, ctx: *mut Ptr) -> CUresult {
    bump!("cuStreamGetCtx");
    put(ctx, ctx_handle(stream_device(s)))
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Ptr, d: c_int) -> CUresult {
    bump!("cuDevicePrimaryCtxRetain");
    if !valid_device(d) || ctx.is_null() {
        return INVALID_DEVICE;
    }
    let Ok(mut p) = PRIMARY.lock() else {
        return INVALID_VALUE;
    };
    let e = &mut p[d as usize & 15];
    *e = (e.0 + 1, true);
    put(ctx, ctx_handle(d))
}

fn primary_release(d: c_int) -> CUresult {
    if !valid_device(d) {
        return INVALID_DEVICE;
    }
    let Ok(mut p) = PRIMARY.lock() else {
        return INVALID_VALUE;
    };
    let e = &mut p[d as usize & 15];
    if e.0 == 0 {
        return INVALID_CONTEXT;
    }
    e.0 -= 1;
    if e.0 == 0 {
        e.1 = false;
    }
    SUCCESS
}

fn primary_reset(d: c_int) -> CUresult {
    if !valid_device(d) {
        return INVALID_DEVICE;
    }
    if let Ok(mut p) = PRIMARY.lock() {
        p[d as usize & 15].1 = false;
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease(d: c_int) -> CUresult {
    bump!("cuDevicePrimaryCtxRelease");
    primary_release(d)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(d: c_int) -> CUresult {
    bump!("cuDevicePrimaryCtxRelease_v2");
    primary_release(d)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset(d: c_int) -> CUresult {
    bump!("cuDevicePrimaryCtxReset");
    primary_reset(d)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(d: c_int) -> CUresult {
    bump!("cuDevicePrimaryCtxReset_v2");
    primary_reset(d)
}

/// Whether device `d`'s primary context exists (for tests).
#[no_mangle]
pub extern "C" fn fakecuda_primary_active(d: c_int) -> c_int {
    PRIMARY
        .lock()
        .map_or(0, |p| c_int::from(valid_device(d) && p[d as usize & 15].1))
}

/// `cuCtxCreate*`: a new context, which becomes current (pushed), as with the driver.
fn create_ctx(ctx: *mut Ptr, d: c_int) -> CUresult {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    if !valid_device(d) {
        return INVALID_DEVICE;
    }
    let serial = (SERIAL.fetch_add(1, Ordering::Relaxed) as usize % 0xffff) + 1;
    let c = CTX + (serial << 8) + d as usize;
    let rc = put(ctx, c as Ptr);
    if rc == SUCCESS {
        if let Ok(mut l) = CREATED.lock() {
            l.push(c);
        }
        CTX_STACK.with(|s| s.borrow_mut().push(c as Ptr));
    }
    rc
}

/// Destroys a context made by `cuCtxCreate*` (a primary context, or one destroyed already, is
/// refused) and takes it off this thread's context stack.
fn destroy_ctx(ctx: Ptr) -> CUresult {
    let Ok(mut l) = CREATED.lock() else {
        return INVALID_VALUE;
    };
    let Some(i) = l.iter().position(|c| *c == ctx as usize) else {
        return INVALID_CONTEXT;
    };
    l.swap_remove(i);
    CTX_STACK.with(|s| s.borrow_mut().retain(|c| *c != ctx));
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxCreate(ctx: *mut Ptr, _f: c_uint, d: c_int) -> CUresult {
    bump!("cuCtxCreate");
    create_ctx(ctx, d)
}

#[no_mangle]
pub extern "C" fn cuCtxCreate_v2(ctx: *mut Ptr, _f: c_uint, d: c_int) -> CUresult {
    bump!("cuCtxCreate_v2");
    create_ctx(ctx, d)
}

#[no_mangle]
pub extern "C" fn cuCtxCreate_v3(
    ctx: *mut Ptr,
    _p: Ptr,
    _n: c_int,
    _f: c_uint,
    d: c_int,
) -> CUresult {
    bump!("cuCtxCreate_v3");
    create_ctx(ctx, d)
}

#[no_mangle]
pub extern "C" fn cuCtxCreate_v4(ctx: *mut Ptr, _p: Ptr, _f: c_uint, d: c_int) -> CUresult {
    bump!("cuCtxCreate_v4");
    create_ctx(ctx, d)
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy(ctx: Ptr) -> CUresult {
    bump!("cuCtxDestroy");
    destroy_ctx(ctx)
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(ctx: Ptr) -> CUresult {
    bump!("cuCtxDestroy_v2");
    destroy_ctx(ctx)
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(_s: Ptr) -> CUresult {
    SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Memory

#[no_mangle]
pub extern "C" fn cuMemAlloc(p: *mut u32, bytes: c_uint) -> CUresult {
    bump!("cuMemAlloc");
    out(p, alloc(u64::from(bytes), true).map(|a| a as u32))
}

#[no_mangle]
pub extern "C" fn cuMemAlloc_v2(p: *mut u64, bytes: usize) -> CUresult {
    bump!("cuMemAlloc_v2");
    out(p, alloc(bytes as u64, false))
}

fn pitch_of(width: u64) -> u64 {
    width.div_ceil(512) * 512
}

#[no_mangle]
pub extern "C" fn cuMemAllocPitch(
    p: *mut u32,
    pitch: *mut c_uint,
    w: c_uint,
    h: c_uint,
    _e: c_uint,
) -> CUresult {
    bump!("cuMemAllocPitch");
    let pt = pitch_of(u64::from(w));
    match alloc(pt * u64::from(h), true) {
        Ok(a) => {
            put(pitch, pt as c_uint);
            put(p, a as u32)
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub extern "C" fn cuMemAllocPitch_v2(
    p: *mut u64,
    pitch: *mut usize,
    w: usize,
    h: usize,
    _e: c_uint,
) -> CUresult {
    bump!("cuMemAllocPitch_v2");
    let pt = pitch_of(w as u64);
    match alloc(pt * h as u64, false) {
        Ok(a) => {
            put(pitch, pt as usize);
            put(p, a)
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub extern "C" fn cuMemAllocManaged(p: *mut u64, bytes: usize, _f: c_uint) -> CUresult {
    bump!("cuMemAllocManaged");
    out(p, alloc(bytes as u64, false))
}

#[no_mangle]
pub extern "C" fn cuMemAllocAsync(p: *mut u64, bytes: usize, _s: Ptr) -> CUresult {
    bump!("cuMemAllocAsync");
    out(p, alloc(bytes as u64, false))
}

#[no_mangle]
pub extern "C" fn cuMemAllocAsync_ptsz(p: *mut u64, bytes: usize, _s: Ptr) -> CUresult {
    bump!("cuMemAllocAsync_ptsz");
    out(p, alloc(bytes as u64, false))
}

#[no_mangle]
pub extern "C" fn cuMemAllocFromPoolAsync(
    p: *mut u64,
    bytes: usize,
    _pool: Ptr,
    _s: Ptr,
) -> CUresult {
    bump!("cuMemAllocFromPoolAsync");
    out(p, alloc(bytes as u64, false))
}

#[no_mangle]
pub extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    p: *mut u64,
    bytes: usize,
    _pool: Ptr,
    _s: Ptr,
) -> CUresult {
    bump!("cuMemAllocFromPoolAsync_ptsz");
    out(p, alloc(bytes as u64, false))
}

#[no_mangle]
pub extern "C" fn cuMemFree(p: u32) -> CUresult {
    bump!("cuMemFree");
    free(u64::from(p))
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: u64) -> CUresult {
    bump!("cuMemFree_v2");
    free(p)
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(p: u64, _s: Ptr) -> CUresult {
    bump!("cuMemFreeAsync");
    free(p)
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync_ptsz(p: u64, _s: Ptr) -> CUresult {
    bump!("cuMemFreeAsync_ptsz");
    free(p)
}

/// `cuMemCreate` handles: (handle, mappings, references). As in the driver, the memory is freed
/// when every reference (the creation, each `cuMemRetainAllocationHandle`) is released and its
/// last mapping unmapped, in any order.
static HANDLES: Mutex<Vec<(u64, u32, u32)>> = Mutex::new(Vec::new());
/// `cuMemMap` mappings: (virtual address, size, handle).
static MAPPINGS: Mutex<Vec<(u64, u64, u64)>> = Mutex::new(Vec::new());

#[no_mangle]
pub extern "C" fn cuMemCreate(
    h: *mut u64,
    bytes: usize,
    _prop: *const c_void,
    _f: u64,
) -> CUresult {
    bump!("cuMemCreate");
    // A handle is opaque; the double uses the backing address.
    let r = alloc(bytes as u64, false);
    if let (Ok(a), Ok(mut hs)) = (r, HANDLES.lock()) {
        hs.push((a, 0, 1));
    }
    out(h, r)
}

#[no_mangle]
pub extern "C" fn cuMemRelease(h: u64) -> CUresult {
    bump!("cuMemRelease");
    let Ok(mut hs) = HANDLES.lock() else {
        return INVALID_VALUE;
    };
    let Some(i) = hs.iter().position(|e| e.0 == h && e.2 > 0) else {
        return INVALID_VALUE;
    };
    hs[i].2 -= 1;
    if hs[i].1 > 0 || hs[i].2 > 0 {
        return SUCCESS;
    }
    hs.swap_remove(i);
    free(h)
}

#[no_mangle]
pub extern "C" fn cuMemMap(va: u64, size: usize, _off: usize, h: u64, _f: u64) -> CUresult {
    bump!("cuMemMap");
    let (Ok(mut hs), Ok(mut ms)) = (HANDLES.lock(), MAPPINGS.lock()) else {
        return INVALID_VALUE;
    };
    let Some(e) = hs.iter_mut().find(|e| e.0 == h && e.2 > 0) else {
        return INVALID_VALUE;
    };
    if size == 0 || ms.iter().any(|m| va < m.0 + m.1 && m.0 < va + size as u64) {
        return INVALID_VALUE;
    }
    e.1 += 1;
    ms.push((va, size as u64, h));
    SUCCESS
}

/// Unmaps whole mappings covering `[va, va + size)`; all or nothing.
#[no_mangle]
pub extern "C" fn cuMemUnmap(va: u64, size: usize) -> CUresult {
    bump!("cuMemUnmap");
    let (Ok(mut hs), Ok(mut ms)) = (HANDLES.lock(), MAPPINGS.lock()) else {
        return INVALID_VALUE;
    };
    let end = va + size as u64;
    let inside: Vec<usize> = (0..ms.len())
        .filter(|&i| ms[i].0 >= va && ms[i].0 + ms[i].1 <= end)
        .collect();
    let covered: u64 = inside.iter().map(|&i| ms[i].1).sum();
    if inside.is_empty() || covered != size as u64 {
        return INVALID_VALUE;
    }
    for &i in inside.iter().rev() {
        let (_, _, h) = ms.swap_remove(i);
        if let Some(j) = hs.iter().position(|e| e.0 == h) {
            hs[j].1 -= 1;
            if hs[j].1 == 0 && hs[j].2 == 0 {
                hs.swap_remove(j);
                free(h);
            }
        }
    }
    SUCCESS
}

/// The handle of the allocation mapped at `addr` (anywhere inside a mapping), with one more
/// reference to it.
#[no_mangle]
pub extern "C" fn cuMemRetainAllocationHandle(h: *mut u64, addr: Ptr) -> CUresult {
    bump!("cuMemRetainAllocationHandle");
    let (Ok(mut hs), Ok(ms)) = (HANDLES.lock(), MAPPINGS.lock()) else {
        return INVALID_VALUE;
    };
    let a = addr as u64;
    let Some(m) = ms.iter().find(|m| m.0 <= a && a < m.0 + m.1) else {
        return INVALID_VALUE;
    };
    let Some(e) = hs.iter_mut().find(|e| e.0 == m.2) else {
        return INVALID_VALUE;
    };
    e.2 += 1;
    put(h, m.2)
}

#[repr(C)]
pub struct ArrayDesc1 {
    width: c_uint,
    height: c_uint,
    format: c_uint,
    channels: c_uint,
}

#[repr(C)]
pub struct ArrayDesc2 {
    width: usize,
    height: usize,
    format: c_uint,
    channels: c_uint,
}

#[repr(C)]
pub struct Array3dDesc1 {
    width: c_uint,
    height: c_uint,
    depth: c_uint,
    format: c_uint,
    channels: c_uint,
    flags: c_uint,
}

#[repr(C)]
pub struct Array3dDesc2 {
    width: usize,
    height: usize,
    depth: usize,
    format: c_uint,
    channels: c_uint,
    flags: c_uint,
}

fn elem(format: c_uint, channels: c_uint) -> u64 {
    let b = match format {
        0x01 | 0x08 => 1,
        0x02 | 0x09 | 0x10 => 2,
        _ => 4,
    };
    b * u64::from(channels.max(1))
}

fn array(out_arr: *mut Ptr, w: u64, h: u64, d: u64, e: u64) -> CUresult {
    out(
        out_arr,
        alloc(w.max(1) * h.max(1) * d.max(1) * e, false).map(|a| a as Ptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate(a: *mut Ptr, d: *const ArrayDesc1) -> CUresult {
    bump!("cuArrayCreate");
    // SAFETY: the caller's descriptor.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return INVALID_VALUE;
    };
    let e = elem(d.format, d.channels);
    array(a, d.width.into(), d.height.into(), 1, e)
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(a: *mut Ptr, d: *const ArrayDesc2) -> CUresult {
    bump!("cuArrayCreate_v2");
    // SAFETY: the caller's descriptor.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return INVALID_VALUE;
    };
    array(
        a,
        d.width as u64,
        d.height as u64,
        1,
        elem(d.format, d.channels),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate(a: *mut Ptr, d: *const Array3dDesc1) -> CUresult {
    bump!("cuArray3DCreate");
    // SAFETY: the caller's descriptor.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return INVALID_VALUE;
    };
    let e = elem(d.format, d.channels);
    array(a, d.width.into(), d.height.into(), d.depth.into(), e)
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(a: *mut Ptr, d: *const Array3dDesc2) -> CUresult {
    bump!("cuArray3DCreate_v2");
    // SAFETY: the caller's descriptor.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return INVALID_VALUE;
    };
    let e = elem(d.format, d.channels);
    array(a, d.width as u64, d.height as u64, d.depth as u64, e)
}

#[no_mangle]
pub extern "C" fn cuArrayDestroy(a: Ptr) -> CUresult {
    bump!("cuArrayDestroy");
    free(a as u64)
}

#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    a: *mut Ptr,
    d: *const Array3dDesc2,
    levels: c_uint,
) -> CUresult {
    bump!("cuMipmappedArrayCreate");
    // SAFETY: the caller's descriptor.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return INVALID_VALUE;
    };
    let e = elem(d.format, d.channels);
    let bytes: u64 = (0..levels.max(1))
        .map(|l| {
            (d.width as u64 >> l).max(1)
                * (d.height as u64 >> l).max(1)
                * (d.depth as u64 >> l).max(1)
                * e
        })
        .sum();
    out(a, alloc(bytes, false).map(|x| x as Ptr))
}

#[no_mangle]
pub extern "C" fn cuMipmappedArrayDestroy(a: Ptr) -> CUresult {
    bump!("cuMipmappedArrayDestroy");
    free(a as u64)
}

fn free_bytes() -> u64 {
    dev().total - fakecuda_mem_used()
}

#[no_mangle]
pub extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    bump!("cuMemGetInfo");
    put(free, free_bytes().min(u32::MAX.into()) as c_uint);
    put(total, dev().total.min(u32::MAX.into()) as c_uint)
}

#[no_mangle]
pub extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    bump!("cuMemGetInfo_v2");
    put(free, free_bytes() as usize);
    put(total, dev().total as usize)
}

#[no_mangle]
pub extern "C" fn cuDeviceTotalMem(b: *mut c_uint, _d: c_int) -> CUresult {
    bump!("cuDeviceTotalMem");
    put(b, dev().total.min(u32::MAX.into()) as c_uint)
}

#[no_mangle]
pub extern "C" fn cuDeviceTotalMem_v2(b: *mut usize, _d: c_int) -> CUresult {
    bump!("cuDeviceTotalMem_v2");
    put(b, dev().total as usize)
}

// ---------------------------------------------------------------------------------------------
// Launches

#[no_mangle]
pub extern "C" fn cuLaunchKernel(
    _f: Ptr,
    _gx: c_uint,
    _gy: c_uint,
    _gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _sh: c_uint,
    s: Ptr,
    _p: *mut Ptr,
    _e: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchKernel");
    launch_in(s, false)
}

#[no_mangle]
pub extern "C" fn cuLaunchKernel_ptsz(
    _f: Ptr,
    _gx: c_uint,
    _gy: c_uint,
    _gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _sh: c_uint,
    s: Ptr,
    _p: *mut Ptr,
    _e: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchKernel_ptsz");
    launch_in(s, true)
}

/// The stream of a `CUlaunchConfig` (seven unsigned, then the stream).
fn config_stream(c: *const c_void) -> Ptr {
    #[repr(C)]
    struct Head {
        dims: [c_uint; 7],
        stream: Ptr,
    }
    // SAFETY: the caller's launch configuration, if any.
    unsafe { c.cast::<Head>().as_ref() }.map_or(null_mut(), |h| h.stream)
}

#[no_mangle]
pub extern "C" fn cuLaunchKernelEx(
    c: *const c_void,
    _f: Ptr,
    _p: *mut Ptr,
    _e: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchKernelEx");
    launch_in(config_stream(c), false)
}

#[no_mangle]
pub extern "C" fn cuLaunchKernelEx_ptsz(
    c: *const c_void,
    _f: Ptr,
    _p: *mut Ptr,
    _e: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchKernelEx_ptsz");
    launch_in(config_stream(c), true)
}

#[no_mangle]
pub extern "C" fn cuLaunchCooperativeKernel(
    _f: Ptr,
    _gx: c_uint,
    _gy: c_uint,
    _gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _sh: c_uint,
    s: Ptr,
    _p: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchCooperativeKernel");
    launch_in(s, false)
}

#[no_mangle]
pub extern "C" fn cuLaunchCooperativeKernel_ptsz(
    _f: Ptr,
    _gx: c_uint,
    _gy: c_uint,
    _gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _sh: c_uint,
    s: Ptr,
    _p: *mut Ptr,
) -> CUresult {
    bump!("cuLaunchCooperativeKernel_ptsz");
    launch_in(s, true)
}

#[no_mangle]
pub extern "C" fn cuGraphLaunch(_g: Ptr, s: Ptr) -> CUresult {
    bump!("cuGraphLaunch");
    launch_in(s, false)
}

#[no_mangle]
pub extern "C" fn cuGraphLaunch_ptsz(_g: Ptr, s: Ptr) -> CUresult {
    bump!("cuGraphLaunch_ptsz");
    launch_in(s, true)
}

// The legacy launch API (deprecated, still exported by the driver).

#[no_mangle]
pub extern "C" fn cuLaunch(_f: Ptr) -> CUresult {
    bump!("cuLaunch");
    launch()
}

#[no_mangle]
pub extern "C" fn cuLaunchGrid(_f: Ptr, _gw: c_int, _gh: c_int) -> CUresult {
    bump!("cuLaunchGrid");
    launch()
}

#[no_mangle]
pub extern "C" fn cuLaunchGridAsync(_f: Ptr, _gw: c_int, _gh: c_int, s: Ptr) -> CUresult {
    bump!("cuLaunchGridAsync");
    launch_in(s, false)
}

/// `CUDA_LAUNCH_PARAMS` (only its size matters here).
#[repr(C)]
pub struct LaunchParams {
    function: Ptr,
    dims: [c_uint; 7],
    stream: Ptr,
    params: *mut Ptr,
}

/// One kernel per device; the devices run them side by side, so the call takes one launch time.
#[no_mangle]
pub extern "C" fn cuLaunchCooperativeKernelMultiDevice(
    list: *mut LaunchParams,
    n: c_uint,
    _flags: c_uint,
) -> CUresult {
    bump!("cuLaunchCooperativeKernelMultiDevice");
    if list.is_null() || n == 0 {
        return INVALID_VALUE;
    }
    launch()
}

type HostFn = Option<unsafe extern "C" fn(Ptr)>;

/// A host function, not a kernel: runs it at once and takes no device time.
fn host_func(f: HostFn, user: Ptr) -> CUresult {
    match f {
        // SAFETY: the caller's host function with the caller's argument, as the driver calls it.
        Some(f) => unsafe { f(user) },
        None => return INVALID_VALUE,
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuLaunchHostFunc(_s: Ptr, f: HostFn, user: Ptr) -> CUresult {
    bump!("cuLaunchHostFunc");
    host_func(f, user)
}

#[no_mangle]
pub extern "C" fn cuLaunchHostFunc_ptsz(_s: Ptr, f: HostFn, user: Ptr) -> CUresult {
    bump!("cuLaunchHostFunc_ptsz");
    host_func(f, user)
}

// ---------------------------------------------------------------------------------------------
// cuGetProcAddress: an independent description of the driver's versioned entries (what a
// real driver does), not the limiter's table: (exported name, symbol, since, per-thread stream).

const ENTRIES: &[(&str, &str, c_int, bool)] = &[
    ("cuInit", "cuInit", 2000, false),
    ("cuDriverGetVersion", "cuDriverGetVersion", 2020, false),
    ("cuDeviceGet", "cuDeviceGet", 2000, false),
    ("cuCtxGetDevice", "cuCtxGetDevice", 2000, false),
    ("cuStreamSynchronize", "cuStreamSynchronize", 2000, false),
    ("cuGetProcAddress", "cuGetProcAddress", 11030, false),
    ("cuGetProcAddress_v2", "cuGetProcAddress", 12000, false),
    ("cuMemAlloc", "cuMemAlloc", 2000, false),
    ("cuMemAlloc_v2", "cuMemAlloc", 3020, false),
    ("cuMemAllocPitch", "cuMemAllocPitch", 2000, false),
    ("cuMemAllocPitch_v2", "cuMemAllocPitch", 3020, false),
    ("cuMemAllocManaged", "cuMemAllocManaged", 6000, false),
    ("cuMemAllocAsync", "cuMemAllocAsync", 11020, false),
    ("cuMemAllocAsync_ptsz", "cuMemAllocAsync", 11020, true),
    (
        "cuMemAllocFromPoolAsync",
        "cuMemAllocFromPoolAsync",
        11020,
        false,
    ),
    (
        "cuMemAllocFromPoolAsync_ptsz",
        "cuMemAllocFromPoolAsync",
        11020,
        true,
    ),
    ("cuMemFree", "cuMemFree", 2000, false),
    ("cuMemFree_v2", "cuMemFree", 3020, false),
    ("cuMemFreeAsync", "cuMemFreeAsync", 11020, false),
    ("cuMemFreeAsync_ptsz", "cuMemFreeAsync", 11020, true),
    ("cuMemCreate", "cuMemCreate", 10020, false),
    ("cuMemRelease", "cuMemRelease", 10020, false),
    ("cuMemMap", "cuMemMap", 10020, false),
    ("cuMemUnmap", "cuMemUnmap", 10020, false),
    (
        "cuMemRetainAllocationHandle",
        "cuMemRetainAllocationHandle",
        11000,
        false,
    ),
    ("cuArrayCreate", "cuArrayCreate", 2000, false),
    ("cuArrayCreate_v2", "cuArrayCreate", 3020, false),
    ("cuArray3DCreate", "cuArray3DCreate", 2000, false),
    ("cuArray3DCreate_v2", "cuArray3DCreate", 3020, false),
    ("cuArrayDestroy", "cuArrayDestroy", 2000, false),
    (
        "cuMipmappedArrayCreate",
        "cuMipmappedArrayCreate",
        5000,
        false,
    ),
    (
        "cuMipmappedArrayDestroy",
        "cuMipmappedArrayDestroy",
        5000,
        false,
    ),
    ("cuMemGetInfo", "cuMemGetInfo", 2000, false),
    ("cuMemGetInfo_v2", "cuMemGetInfo", 3020, false),
    ("cuDeviceTotalMem", "cuDeviceTotalMem", 2000, false),
    ("cuDeviceTotalMem_v2", "cuDeviceTotalMem", 3020, false),
    (
        "cuDevicePrimaryCtxRetain",
        "cuDevicePrimaryCtxRetain",
        7000,
        false,
    ),
    ("cuCtxCreate", "cuCtxCreate", 2000, false),
    ("cuCtxCreate_v2", "cuCtxCreate", 3020, false),
    ("cuCtxCreate_v3", "cuCtxCreate", 11040, false),
    ("cuCtxCreate_v4", "cuCtxCreate", 12050, false),
    ("cuCtxDestroy", "cuCtxDestroy", 2000, false),
    ("cuCtxDestroy_v2", "cuCtxDestroy", 4000, false),
    (
        "cuDevicePrimaryCtxRelease",
        "cuDevicePrimaryCtxRelease",
        7000,
        false,
    ),
    (
        "cuDevicePrimaryCtxRelease_v2",
        "cuDevicePrimaryCtxRelease",
        11000,
        false,
    ),
    (
        "cuDevicePrimaryCtxReset",
        "cuDevicePrimaryCtxReset",
        7000,
        false,
    ),
    (
        "cuDevicePrimaryCtxReset_v2",
        "cuDevicePrimaryCtxReset",
        11000,
        false,
    ),
    ("cuLaunchKernel", "cuLaunchKernel", 4000, false),
    ("cuLaunchKernel_ptsz", "cuLaunchKernel", 7000, true),
    ("cuLaunchKernelEx", "cuLaunchKernelEx", 11060, false),
    ("cuLaunchKernelEx_ptsz", "cuLaunchKernelEx", 11060, true),
    (
        "cuLaunchCooperativeKernel",
        "cuLaunchCooperativeKernel",
        9000,
        false,
    ),
    (
        "cuLaunchCooperativeKernel_ptsz",
        "cuLaunchCooperativeKernel",
        9000,
        true,
    ),
    ("cuGraphLaunch", "cuGraphLaunch", 10000, false),
    ("cuGraphLaunch_ptsz", "cuGraphLaunch", 10000, true),
    ("cuLaunch", "cuLaunch", 2000, false),
    ("cuLaunchGrid", "cuLaunchGrid", 2000, false),
    ("cuLaunchGridAsync", "cuLaunchGridAsync", 2000, false),
    (
        "cuLaunchCooperativeKernelMultiDevice",
        "cuLaunchCooperativeKernelMultiDevice",
        9000,
        false,
    ),
    ("cuLaunchHostFunc", "cuLaunchHostFunc", 10000, false),
    ("cuLaunchHostFunc_ptsz", "cuLaunchHostFunc", 10000, true),
    ("cuStreamBeginCapture", "cuStreamBeginCapture", 10000, false),
    (
        "cuStreamBeginCapture_ptsz",
        "cuStreamBeginCapture",
        10000,
        true,
    ),
    (
        "cuStreamBeginCapture_v2",
        "cuStreamBeginCapture",
        10010,
        false,
    ),
    (
        "cuStreamBeginCapture_v2_ptsz",
        "cuStreamBeginCapture",
        10010,
        true,
    ),
    (
        "cuStreamBeginCaptureToGraph",
        "cuStreamBeginCaptureToGraph",
        12030,
        false,
    ),
    (
        "cuStreamBeginCaptureToGraph_ptsz",
        "cuStreamBeginCaptureToGraph",
        12030,
        true,
    ),
    ("cuStreamEndCapture", "cuStreamEndCapture", 10000, false),
    ("cuStreamEndCapture_ptsz", "cuStreamEndCapture", 10000, true),
    ("cuStreamIsCapturing", "cuStreamIsCapturing", 10000, false),
    (
        "cuStreamIsCapturing_ptsz",
        "cuStreamIsCapturing",
        10000,
        true,
    ),
    ("cuDeviceGetCount", "cuDeviceGetCount", 2000, false),
    ("cuCtxSetCurrent", "cuCtxSetCurrent", 4000, false),
    ("cuCtxPushCurrent_v2", "cuCtxPushCurrent", 4000, false),
    ("cuCtxPopCurrent_v2", "cuCtxPopCurrent", 4000, false),
    ("cuStreamCreate", "cuStreamCreate", 2000, false),
    ("cuStreamGetCtx", "cuStreamGetCtx", 9020, false),
    ("cuStreamGetDevice", "cuStreamGetDevice", 12080, false),
];

fn entry_ptr(name: &str) -> Ptr {
    let p: Ptr = match name {
        "cuInit" => cuInit as Ptr,
        "cuDriverGetVersion" => cuDriverGetVersion as Ptr,
        "cuDeviceGet" => cuDeviceGet as Ptr,
        "cuCtxGetDevice" => cuCtxGetDevice as Ptr,
        "cuStreamSynchronize" => cuStreamSynchronize as Ptr,
        "cuGetProcAddress" => cuGetProcAddress as Ptr,
        "cuGetProcAddress_v2" => cuGetProcAddress_v2 as Ptr,
        "cuMemAlloc" => cuMemAlloc as Ptr,
        "cuMemAlloc_v2" => cuMemAlloc_v2 as Ptr,
        "cuMemAllocPitch" => cuMemAllocPitch as Ptr,
        "cuMemAllocPitch_v2" => cuMemAllocPitch_v2 as Ptr,
        "cuMemAllocManaged" => cuMemAllocManaged as Ptr,
        "cuMemAllocAsync" => cuMemAllocAsync as Ptr,
        "cuMemAllocAsync_ptsz" => cuMemAllocAsync_ptsz as Ptr,
        "cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as Ptr,
        "cuMemAllocFromPoolAsync_ptsz" => cuMemAllocFromPoolAsync_ptsz as Ptr,
        "cuMemFree" => cuMemFree as Ptr,
        "cuMemFree_v2" => cuMemFree_v2 as Ptr,
        "cuMemFreeAsync" => cuMemFreeAsync as Ptr,
        "cuMemFreeAsync_ptsz" => cuMemFreeAsync_ptsz as Ptr,
        "cuMemCreate" => cuMemCreate as Ptr,
        "cuMemRelease" => cuMemRelease as Ptr,
        "cuMemMap" => cuMemMap as Ptr,
        "cuMemUnmap" => cuMemUnmap as Ptr,
        "cuMemRetainAllocationHandle" => cuMemRetainAllocationHandle as Ptr,
        "cuArrayCreate" => cuArrayCreate as Ptr,
        "cuArrayCreate_v2" => cuArrayCreate_v2 as Ptr,
        "cuArray3DCreate" => cuArray3DCreate as Ptr,
        "cuArray3DCreate_v2" => cuArray3DCreate_v2 as Ptr,
        "cuArrayDestroy" => cuArrayDestroy as Ptr,
        "cuMipmappedArrayCreate" => cuMipmappedArrayCreate as Ptr,
        "cuMipmappedArrayDestroy" => cuMipmappedArrayDestroy as Ptr,
        "cuMemGetInfo" => cuMemGetInfo as Ptr,
        "cuMemGetInfo_v2" => cuMemGetInfo_v2 as Ptr,
        "cuDeviceTotalMem" => cuDeviceTotalMem as Ptr,
        "cuDeviceTotalMem_v2" => cuDeviceTotalMem_v2 as Ptr,
        "cuDevicePrimaryCtxRetain" => cuDevicePrimaryCtxRetain as Ptr,
        "cuCtxCreate" => cuCtxCreate as Ptr,
        "cuCtxCreate_v2" => cuCtxCreate_v2 as Ptr,
        "cuCtxCreate_v3" => cuCtxCreate_v3 as Ptr,
        "cuCtxCreate_v4" => cuCtxCreate_v4 as Ptr,
        "cuCtxDestroy" => cuCtxDestroy as Ptr,
        "cuCtxDestroy_v2" => cuCtxDestroy_v2 as Ptr,
        "cuDevicePrimaryCtxRelease" => cuDevicePrimaryCtxRelease as Ptr,
        "cuDevicePrimaryCtxRelease_v2" => cuDevicePrimaryCtxRelease_v2 as Ptr,
        "cuDevicePrimaryCtxReset" => cuDevicePrimaryCtxReset as Ptr,
        "cuDevicePrimaryCtxReset_v2" => cuDevicePrimaryCtxReset_v2 as Ptr,
        "cuLaunchKernel" => cuLaunchKernel as Ptr,
        "cuLaunchKernel_ptsz" => cuLaunchKernel_ptsz as Ptr,
        "cuLaunchKernelEx" => cuLaunchKernelEx as Ptr,
        "cuLaunchKernelEx_ptsz" => cuLaunchKernelEx_ptsz as Ptr,
        "cuLaunchCooperativeKernel" => cuLaunchCooperativeKernel as Ptr,
        "cuLaunchCooperativeKernel_ptsz" => cuLaunchCooperativeKernel_ptsz as Ptr,
        "cuGraphLaunch" => cuGraphLaunch as Ptr,
        "cuGraphLaunch_ptsz" => cuGraphLaunch_ptsz as Ptr,
        "cuLaunch" => cuLaunch as Ptr,
        "cuLaunchGrid" => cuLaunchGrid as Ptr,
        "cuLaunchGridAsync" => cuLaunchGridAsync as Ptr,
        "cuLaunchCooperativeKernelMultiDevice" => cuLaunchCooperativeKernelMultiDevice as Ptr,
        "cuLaunchHostFunc" => cuLaunchHostFunc as Ptr,
        "cuLaunchHostFunc_ptsz" => cuLaunchHostFunc_ptsz as Ptr,
        "cuStreamBeginCapture" => cuStreamBeginCapture as Ptr,
        "cuStreamBeginCapture_ptsz" => cuStreamBeginCapture_ptsz as Ptr,
        "cuStreamBeginCapture_v2" => cuStreamBeginCapture_v2 as Ptr,
        "cuStreamBeginCapture_v2_ptsz" => cuStreamBeginCapture_v2_ptsz as Ptr,
        "cuStreamBeginCaptureToGraph" => cuStreamBeginCaptureToGraph as Ptr,
        "cuStreamBeginCaptureToGraph_ptsz" => cuStreamBeginCaptureToGraph_ptsz as Ptr,
        "cuStreamEndCapture" => cuStreamEndCapture as Ptr,
        "cuStreamEndCapture_ptsz" => cuStreamEndCapture_ptsz as Ptr,
        "cuStreamIsCapturing" => cuStreamIsCapturing as Ptr,
        "cuStreamIsCapturing_ptsz" => cuStreamIsCapturing_ptsz as Ptr,
        "cuDeviceGetCount" => cuDeviceGetCount as Ptr,
        "cuCtxSetCurrent" => cuCtxSetCurrent as Ptr,
        "cuCtxPushCurrent_v2" => cuCtxPushCurrent_v2 as Ptr,
        "cuCtxPopCurrent_v2" => cuCtxPopCurrent_v2 as Ptr,
        "cuStreamCreate" => cuStreamCreate as Ptr,
        "cuStreamGetCtx" => cuStreamGetCtx as Ptr,
        "cuStreamGetDevice" => cuStreamGetDevice as Ptr,
        _ => null_mut(),
    };
    p
}

/// (result, status): status 0 found, 1 symbol not found, 2 version not sufficient.
unsafe fn get_proc(
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
) -> (CUresult, c_int) {
    if symbol.is_null() || pfn.is_null() {
        return (INVALID_VALUE, 1);
    }
    // SAFETY: the caller's C string.
    let Ok(sym) = (unsafe { CStr::from_ptr(symbol) }).to_str() else {
        return (INVALID_VALUE, 1);
    };
    let per_thread = flags & 2 != 0;
    let known: Vec<_> = ENTRIES.iter().filter(|e| e.1 == sym).collect();
    let pick = |pt: bool| {
        known
            .iter()
            .filter(|e| e.3 == pt && e.2 <= ver)
            .max_by_key(|e| e.2)
            .map(|e| e.0)
    };
    let chosen = if per_thread {
        pick(true).or_else(|| pick(false))
    } else {
        pick(false)
    };
    put(pfn, null_mut());
    match chosen {
        Some(name) => (put(pfn, entry_ptr(name)), 0),
        None if known.is_empty() => (NOT_FOUND, 1),
        None => (NOT_FOUND, 2),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
) -> CUresult {
    bump!("cuGetProcAddress");
    // SAFETY: the caller's arguments.
    unsafe { get_proc(symbol, pfn, ver, flags) }.0
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut Ptr,
    ver: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    bump!("cuGetProcAddress_v2");
    // SAFETY: the caller's arguments.
    let (rc, st) = unsafe { get_proc(symbol, pfn, ver, flags) };
    if !status.is_null() {
        put(status, st);
    }
    rc
}

// ---------------------------------------------------------------------------------------------
// NVML (this file is also installed as libnvidia-ml.so.1 by the tests)

#[repr(C)]
pub struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
pub struct NvmlMemoryV2 {
    version: c_uint,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

const NVML_DEVICE: usize = 0x4e56;

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> c_int {
    0
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> c_int {
    0
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(i: c_uint, d: *mut Ptr) -> c_int {
    if i != 0 {
        return 2;
    }
    put(d, NVML_DEVICE as Ptr)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetIndex(d: Ptr, i: *mut c_uint) -> c_int {
    if d as usize != NVML_DEVICE {
        return 2;
    }
    put(i, 0)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMemoryInfo(_d: Ptr, m: *mut NvmlMemory) -> c_int {
    bump!("nvmlDeviceGetMemoryInfo");
    let used = fakecuda_mem_used();
    put(
        m,
        NvmlMemory {
            total: dev().total,
            free: dev().total - used,
            used,
        },
    )
}

#[no_mangle]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(_d: Ptr, m: *mut NvmlMemoryV2) -> c_int {
    bump!("nvmlDeviceGetMemoryInfo_v2");
    let used = fakecuda_mem_used();
    put(
        m,
        NvmlMemoryV2 {
            version: 2,
            total: dev().total,
            reserved: 0,
            free: dev().total - used,
            used,
        },
    )
}
