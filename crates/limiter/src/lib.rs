//! `libgpuvisor_limiter.so`: a CUDA driver interposer that keeps an instance with a fractional
//! GPU within its VRAM quota and compute share.
//!
//! The daemon injects the library into every process of such an instance (`/etc/ld.so.preload`
//! inside the container), binds a small read-only [`config`] file at the one path the library
//! reads, naming the instance's shared accounting region, and creates that region
//! ([`shm::Region`]: a limits file the instance can only read, a usage file it writes). The
//! library then:
//! - charges every device allocation path against the quota in the region, refusing with
//!   `CUDA_ERROR_OUT_OF_MEMORY` (and calling nothing) when it does not fit, and reports the quota
//!   through `cuMemGetInfo`, `cuDeviceTotalMem` and NVML's `nvmlDeviceGetMemoryInfo`;
//! - spaces kernel and graph launches so the instance's SM utilisation, as the daemon samples it,
//!   follows its share (`throttle`);
//! - catches every route to the driver: exported symbols, `dlsym`, and `cuGetProcAddress` with an
//!   explicit version table (`procaddr`).
//!
//! As an rlib, the crate is the daemon's API to regions and configs ([`shm`], [`config`]); the
//! hooks are exported only by the cdylib (see `build.rs`), so linking the rlib interposes nothing.
//!
//! Hot-path rules: per launch, no allocation, no lock, no environment read, no logging, no
//! syscall when not throttled; per allocation or free, one uncontended per-process spin lock on
//! the pointer table (see `table`) and nothing else of the kind. Panics never cross the FFI
//! boundary.

pub mod config;
mod hooks;
mod procaddr;
pub mod shm;
mod table;
mod throttle;
