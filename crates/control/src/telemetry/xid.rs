//! The one table of XID errors gpuvisor decodes: meaning, suggested action, and whether the GPU
//! must be cordoned (no new placements) until an operator resets it.
//!
//! Which XIDs cordon: those after which NVIDIA's XID guide says the GPU needs a reset before it
//! can be trusted with new work — an uncorrectable memory error that was *not* contained (48
//! DBE, 95 uncontained ECC), a failure to record a retired page or remapped row (64), an
//! internal micro-controller or GSP halt (62, 119, 120), an NVLink fatal error (74) and a GPU
//! that fell off the bus (79). Application faults (13, 31, 43, 45) and contained or merely
//! informational memory events (63, 92, 94) leave the GPU usable: the affected process dies or
//! a reset is wanted at the next convenient moment, so they raise an event but place on.

/// One decoded XID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xid {
    pub code: u32,
    pub meaning: &'static str,
    pub action: &'static str,
    /// The GPU is cordoned when this XID is seen.
    pub fatal: bool,
}

pub const XIDS: &[Xid] = &[
    Xid {
        code: 13,
        meaning: "graphics engine exception (usually an out-of-bounds access in a kernel)",
        action: "application error: check the workload (cuda-memcheck / compute-sanitizer); the GPU stays usable",
        fatal: false,
    },
    Xid {
        code: 31,
        meaning: "GPU memory page fault (illegal address)",
        action: "application error: debug the workload's memory accesses; the GPU stays usable",
        fatal: false,
    },
    Xid {
        code: 43,
        meaning: "GPU stopped processing (a channel was reset after a fault)",
        action: "application error: the faulting process was stopped; restart it",
        fatal: false,
    },
    Xid {
        code: 45,
        meaning: "preemptive cleanup after a previous error or a killed process",
        action: "follow-on event: look at the XID before it",
        fatal: false,
    },
    Xid {
        code: 48,
        meaning: "double-bit (uncorrectable) ECC error",
        action: "drain the GPU and reset it (nvidia-smi -r); if it repeats, replace the board",
        fatal: true,
    },
    Xid {
        code: 62,
        meaning: "internal micro-controller halt",
        action: "drain the GPU and reset it; update the driver if it recurs",
        fatal: true,
    },
    Xid {
        code: 63,
        meaning: "ECC page retirement or row remapping recorded",
        action: "informational: reset the GPU at the next maintenance window to apply it",
        fatal: false,
    },
    Xid {
        code: 64,
        meaning: "ECC page retirement or row remapping could not be recorded",
        action: "drain the GPU and reset it; if it repeats, replace the board",
        fatal: true,
    },
    Xid {
        code: 74,
        meaning: "NVLink error",
        action: "drain the GPU, reset it, check the NVLink/NVSwitch fabric (fabric manager logs)",
        fatal: true,
    },
    Xid {
        code: 79,
        meaning: "GPU has fallen off the bus",
        action: "drain the host and reboot or power-cycle it; check PCIe seating, power and cooling",
        fatal: true,
    },
    Xid {
        code: 92,
        meaning: "high single-bit ECC error rate",
        action: "monitor: plan a reset; replace the board if the rate keeps rising",
        fatal: false,
    },
    Xid {
        code: 94,
        meaning: "contained ECC error (only the affected process was stopped)",
        action: "restart the affected workload; reset the GPU at the next convenient moment",
        fatal: false,
    },
    Xid {
        code: 95,
        meaning: "uncontained ECC error (every process on the GPU is affected)",
        action: "drain the GPU and reset it; if it repeats, replace the board",
        fatal: true,
    },
    Xid {
        code: 119,
        meaning: "GSP RPC timeout",
        action: "drain the GPU and reset it; update the driver if it recurs",
        fatal: true,
    },
    Xid {
        code: 120,
        meaning: "GSP error",
        action: "drain the GPU and reset it; update the driver if it recurs",
        fatal: true,
    },
];

/// The table entry of `code`, if gpuvisor knows it.
pub fn decode(code: u32) -> Option<&'static Xid> {
    XIDS.iter().find(|x| x.code == code)
}

/// One line for an event: `XID 79: GPU has fallen off the bus; action: ...`.
pub fn describe(code: u32) -> String {
    match decode(code) {
        Some(x) => format!("XID {}: {}; action: {}", x.code, x.meaning, x.action),
        None => format!("XID {code}: not in gpuvisor's table; see NVIDIA's XID errors guide"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn decodes_the_required_xids() {
        for code in [13, 31, 43, 45, 48, 62, 63, 64, 74, 79, 92, 94, 95] {
            let x = decode(code).unwrap();
            assert!(!x.meaning.is_empty() && !x.action.is_empty(), "{code}");
        }
        let fatal: Vec<u32> = XIDS.iter().filter(|x| x.fatal).map(|x| x.code).collect();
        assert_eq!(fatal, vec![48, 62, 64, 74, 79, 95, 119, 120]);
        assert!(describe(79).contains("fallen off the bus"));
        assert!(describe(999).contains("not in gpuvisor's table"));
        let mut codes: Vec<u32> = XIDS.iter().map(|x| x.code).collect();
        codes.dedup();
        assert_eq!(codes.len(), XIDS.len(), "one entry per code");
    }
}
