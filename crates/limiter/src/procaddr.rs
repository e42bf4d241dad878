//! `cuGetProcAddress`: which versioned driver entry a (symbol, CUDA version, flags) request means.
//!
//! Why an explicit table: the driver answers `cuGetProcAddress("cuMemAlloc", 12040, 0)` with the
//! entry whose ABI matches what a CUDA 12.4 program was compiled against (`cuMemAlloc_v2`), and a
//! `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM` request with the `_ptsz` variant. HAMi-core
//! guessed by appending `_vN` suffixes, which breaks whenever a symbol gains a version the guess
//! does not know. Here every hooked symbol lists the CUDA version each of its ABIs became the
//! default (from `cudaTypedefs.h`, the `PFN_<name>_v<version>` typedefs), plus its per-thread
//! stream variant. A symbol that is not in the table is passed through untouched: it is not one
//! the limiter needs to see.

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
pub(crate) const PER_THREAD_DEFAULT_STREAM: u64 = 1 << 1;

struct Entry {
    symbol: &'static [u8],
    /// (first CUDA version with this ABI, exported name), ascending.
    versions: &'static [(i32, &'static [u8])],
    /// (first CUDA version, exported name) of the per-thread default stream variants, ascending.
    per_thread: &'static [(i32, &'static [u8])],
}

const fn e(symbol: &'static [u8], versions: &'static [(i32, &'static [u8])]) -> Entry {
    Entry {
        symbol,
        versions,
        per_thread: &[],
    }
}

const fn pt(
    symbol: &'static [u8],
    versions: &'static [(i32, &'static [u8])],
    per_thread: &'static [(i32, &'static [u8])],
) -> Entry {
    Entry {
        symbol,
        versions,
        per_thread,
    }
}

static TABLE: &[Entry] = &[
    e(
        b"cuGetProcAddress",
        &[
            (11030, b"cuGetProcAddress"),
            (12000, b"cuGetProcAddress_v2"),
        ],
    ),
    e(
        b"cuMemAlloc",
        &[(2000, b"cuMemAlloc"), (3020, b"cuMemAlloc_v2")],
    ),
    e(
        b"cuMemAllocPitch",
        &[(2000, b"cuMemAllocPitch"), (3020, b"cuMemAllocPitch_v2")],
    ),
    e(b"cuMemAllocManaged", &[(6000, b"cuMemAllocManaged")]),
    pt(
        b"cuMemAllocAsync",
        &[(11020, b"cuMemAllocAsync")],
        &[(11020, b"cuMemAllocAsync_ptsz")],
    ),
    pt(
        b"cuMemAllocFromPoolAsync",
        &[(11020, b"cuMemAllocFromPoolAsync")],
        &[(11020, b"cuMemAllocFromPoolAsync_ptsz")],
    ),
    e(
        b"cuMemFree",
        &[(2000, b"cuMemFree"), (3020, b"cuMemFree_v2")],
    ),
    pt(
        b"cuMemFreeAsync",
        &[(11020, b"cuMemFreeAsync")],
        &[(11020, b"cuMemFreeAsync_ptsz")],
    ),
    e(b"cuMemCreate", &[(10020, b"cuMemCreate")]),
    e(b"cuMemRelease", &[(10020, b"cuMemRelease")]),
    e(b"cuMemMap", &[(10020, b"cuMemMap")]),
    e(b"cuMemUnmap", &[(10020, b"cuMemUnmap")]),
    e(
        b"cuMemRetainAllocationHandle",
        &[(11000, b"cuMemRetainAllocationHandle")],
    ),
    e(
        b"cuArrayCreate",
        &[(2000, b"cuArrayCreate"), (3020, b"cuArrayCreate_v2")],
    ),
    e(
        b"cuArray3DCreate",
        &[(2000, b"cuArray3DCreate"), (3020, b"cuArray3DCreate_v2")],
    ),
    e(b"cuArrayDestroy", &[(2000, b"cuArrayDestroy")]),
    e(
        b"cuMipmappedArrayCreate",
        &[(5000, b"cuMipmappedArrayCreate")],
    ),
    e(
        b"cuMipmappedArrayDestroy",
        &[(5000, b"cuMipmappedArrayDestroy")],
    ),
    e(
        b"cuMemGetInfo",
        &[(2000, b"cuMemGetInfo"), (3020, b"cuMemGetInfo_v2")],
    ),
    e(
        b"cuDeviceTotalMem",
        &[(2000, b"cuDeviceTotalMem"), (3020, b"cuDeviceTotalMem_v2")],
    ),
    e(
        b"cuDevicePrimaryCtxRetain",
        &[(7000, b"cuDevicePrimaryCtxRetain")],
    ),
    e(
        b"cuDevicePrimaryCtxRelease",
        &[
            (7000, b"cuDevicePrimaryCtxRelease"),
            (11000, b"cuDevicePrimaryCtxRelease_v2"),
        ],
    ),
    e(
        b"cuDevicePrimaryCtxReset",
        &[
            (7000, b"cuDevicePrimaryCtxReset"),
            (11000, b"cuDevicePrimaryCtxReset_v2"),
        ],
    ),
    e(
        b"cuCtxCreate",
        &[
            (2000, b"cuCtxCreate"),
            (3020, b"cuCtxCreate_v2"),
            (11040, b"cuCtxCreate_v3"),
            (12050, b"cuCtxCreate_v4"),
        ],
    ),
    e(
        b"cuCtxDestroy",
        &[(2000, b"cuCtxDestroy"), (4000, b"cuCtxDestroy_v2")],
    ),
    pt(
        b"cuLaunchKernel",
        &[(4000, b"cuLaunchKernel")],
        &[(7000, b"cuLaunchKernel_ptsz")],
    ),
    pt(
        b"cuLaunchKernelEx",
        &[(11060, b"cuLaunchKernelEx")],
        &[(11060, b"cuLaunchKernelEx_ptsz")],
    ),
    pt(
        b"cuLaunchCooperativeKernel",
        &[(9000, b"cuLaunchCooperativeKernel")],
        &[(9000, b"cuLaunchCooperativeKernel_ptsz")],
    ),
    pt(
        b"cuGraphLaunch",
        &[(10000, b"cuGraphLaunch")],
        &[(10000, b"cuGraphLaunch_ptsz")],
    ),
    // The legacy launch API (deprecated, still exported): one ABI each, no per-thread variant.
    // `cuLaunchHostFunc` is deliberately absent: it runs a host function, not a kernel.
    // Stream capture: a launch into a capturing stream only records a graph node, so the gate
    // must skip it; the limiter counts the captures in flight (see `hooks`).
    pt(
        b"cuStreamBeginCapture",
        &[
            (10000, b"cuStreamBeginCapture"),
            (10010, b"cuStreamBeginCapture_v2"),
        ],
        &[
            (10000, b"cuStreamBeginCapture_ptsz"),
            (10010, b"cuStreamBeginCapture_v2_ptsz"),
        ],
    ),
    pt(
        b"cuStreamBeginCaptureToGraph",
        &[(12030, b"cuStreamBeginCaptureToGraph")],
        &[(12030, b"cuStreamBeginCaptureToGraph_ptsz")],
    ),
    pt(
        b"cuStreamEndCapture",
        &[(10000, b"cuStreamEndCapture")],
        &[(10000, b"cuStreamEndCapture_ptsz")],
    ),
    e(b"cuLaunch", &[(2000, b"cuLaunch")]),
    e(b"cuLaunchGrid", &[(2000, b"cuLaunchGrid")]),
    e(b"cuLaunchGridAsync", &[(2000, b"cuLaunchGridAsync")]),
    e(
        b"cuLaunchCooperativeKernelMultiDevice",
        &[(9000, b"cuLaunchCooperativeKernelMultiDevice")],
    ),
];

/// The exported name of the entry the driver returns for this request, if it is one we hook.
/// `None` also when the requested version predates the symbol (the driver then fails the
/// request itself).
pub(crate) fn resolve(symbol: &[u8], cuda_version: i32, flags: u64) -> Option<&'static [u8]> {
    let entry = TABLE.iter().find(|e| e.symbol == symbol)?;
    let newest = |list: &'static [(i32, &'static [u8])]| {
        list.iter()
            .rev()
            .find(|(since, _)| cuda_version >= *since)
            .map(|(_, name)| *name)
    };
    if flags & PER_THREAD_DEFAULT_STREAM != 0 {
        if let Some(name) = newest(entry.per_thread) {
            return Some(name);
        }
    }
    newest(entry.versions)
}

/// Every exported name the table can produce (checked against the hook list in tests).
#[cfg(test)]
pub(crate) fn all_names() -> impl Iterator<Item = &'static [u8]> {
    TABLE.iter().flat_map(|e| {
        e.versions
            .iter()
            .chain(e.per_thread.iter())
            .map(|(_, n)| *n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_per_thread_variants() {
        assert_eq!(resolve(b"cuMemAlloc", 3000, 0), Some(&b"cuMemAlloc"[..]));
        assert_eq!(
            resolve(b"cuMemAlloc", 12040, 0),
            Some(&b"cuMemAlloc_v2"[..])
        );
        assert_eq!(
            resolve(b"cuMemAlloc", 13000, 2),
            Some(&b"cuMemAlloc_v2"[..])
        );
        assert_eq!(
            resolve(b"cuLaunchKernel", 11080, PER_THREAD_DEFAULT_STREAM),
            Some(&b"cuLaunchKernel_ptsz"[..])
        );
        assert_eq!(
            resolve(b"cuLaunchKernel", 12000, 1),
            Some(&b"cuLaunchKernel"[..])
        );
        assert_eq!(
            resolve(b"cuCtxCreate", 11080, 0),
            Some(&b"cuCtxCreate_v3"[..])
        );
        assert_eq!(
            resolve(b"cuCtxCreate", 13000, 0),
            Some(&b"cuCtxCreate_v4"[..])
        );
        assert_eq!(
            resolve(b"cuGetProcAddress", 12000, 0),
            Some(&b"cuGetProcAddress_v2"[..])
        );
        assert_eq!(resolve(b"cuMemCreate", 9000, 0), None);
        assert_eq!(resolve(b"cuMemRetainAllocationHandle", 10020, 0), None);
        assert_eq!(
            resolve(b"cuMemRetainAllocationHandle", 11000, 0),
            Some(&b"cuMemRetainAllocationHandle"[..])
        );
        assert_eq!(
            resolve(b"cuDevicePrimaryCtxRelease", 10020, 0),
            Some(&b"cuDevicePrimaryCtxRelease"[..])
        );
        assert_eq!(
            resolve(b"cuDevicePrimaryCtxReset", 12000, PER_THREAD_DEFAULT_STREAM),
            Some(&b"cuDevicePrimaryCtxReset_v2"[..])
        );
        assert_eq!(
            resolve(b"cuCtxDestroy", 3020, 0),
            Some(&b"cuCtxDestroy"[..])
        );
        assert_eq!(
            resolve(b"cuCtxDestroy", 12000, 0),
            Some(&b"cuCtxDestroy_v2"[..])
        );
        for legacy in [&b"cuLaunch"[..], b"cuLaunchGrid", b"cuLaunchGridAsync"] {
            for (ver, flags) in [(2000, 0), (11080, 0), (12000, PER_THREAD_DEFAULT_STREAM)] {
                // No `_v2` and no `_ptsz` exists: a per-thread request gets the one entry.
                assert_eq!(resolve(legacy, ver, flags), Some(legacy));
            }
            assert_eq!(resolve(legacy, 1000, 0), None);
        }
        assert_eq!(
            resolve(
                b"cuLaunchCooperativeKernelMultiDevice",
                13000,
                PER_THREAD_DEFAULT_STREAM
            ),
            Some(&b"cuLaunchCooperativeKernelMultiDevice"[..])
        );
        // A host function is not a kernel: never redirected to the gate.
        assert_eq!(resolve(b"cuLaunchHostFunc", 12000, 0), None);
        assert_eq!(
            resolve(b"cuLaunchHostFunc", 12000, PER_THREAD_DEFAULT_STREAM),
            None
        );
        assert_eq!(resolve(b"cuStreamSynchronize", 12000, 0), None);
        assert_eq!(
            resolve(b"cuStreamBeginCapture", 10000, PER_THREAD_DEFAULT_STREAM),
            Some(&b"cuStreamBeginCapture_ptsz"[..])
        );
        assert_eq!(
            resolve(b"cuStreamBeginCapture", 12080, PER_THREAD_DEFAULT_STREAM),
            Some(&b"cuStreamBeginCapture_v2_ptsz"[..])
        );
        assert_eq!(
            resolve(b"cuStreamBeginCapture", 13000, 0),
            Some(&b"cuStreamBeginCapture_v2"[..])
        );
        assert_eq!(resolve(b"cuStreamBeginCaptureToGraph", 12020, 0), None);
        // Never a guessed suffix.
        assert_eq!(resolve(b"cuMemAlloc_v2", 12000, 0), None);
    }
}
