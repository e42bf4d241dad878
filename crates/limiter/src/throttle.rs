//! The compute share: a launch gate (GCRA / virtual scheduling over the instance's shared
//! region) and the feedback controller that sets its spacing.
//!
//! Why this controller: HAMi-core adds or removes "tokens" in proportion to grid size times SM
//! count, so its loop gain grows with the GPU and a 30/70 split barely separates on a 188-SM
//! part. Here the controlled quantity is the instance's launch rate `r`, and each daemon sample
//! applies a multiplicative correction in log space:
//!
//! `r_next = a · (share / util)^K`, with `a` the launch rate actually achieved since the last
//! sample and `K = 0.5`.
//!
//! If utilisation is `c · a` for an unknown cost per launch `c` (kernel size, GPU size, clocks),
//! then `log r` moves by `K · (log share − log util)` independent of `c`: the loop gain is `K`
//! on every GPU and every workload, and the error halves each sample. Using the *achieved* rate
//! `a` rather than the previous budget is the anti-windup: an instance that was idle or CPU-bound
//! does not bank an unbounded budget. Each step is clamped to ×2 / ÷8.
//!
//! The controller runs in the daemon, at each utilisation sample (`Region::publish_sample`), and
//! writes the spacing into the instance's read-only limits file; the launch path only reads it.
//!
//! The gate itself is lock-free and shared by all processes of the instance: one CAS advances the
//! theoretical arrival time `tat`; a launch that would run ahead of it by more than the burst
//! allowance sleeps (absolute `clock_nanosleep`) until its turn. When the instance is not
//! throttled (`interval_ns == 0`) the gate is one relaxed load and one add.

use crate::shm::{DeviceUsageState, Layout, Priority, FULL_SHARE_BP, MIN_SHARE_BP};
use std::sync::atomic::Ordering;

/// Loop gain (exponent of the correction).
pub(crate) const GAIN: f64 = 0.5;
/// Largest increase of the launch rate per sample.
pub(crate) const MAX_UP: f64 = 2.0;
/// Largest decrease of the launch rate per sample.
pub(crate) const MAX_DOWN: f64 = 0.125;
/// How far launches may run ahead of their schedule (absorbs jitter, keeps bursts short).
pub(crate) const BURST_NS: u64 = 2_000_000;
/// Longest spacing between launches (10 launches/s), so a throttled instance still reaches
/// its next sample promptly.
pub(crate) const MAX_INTERVAL_NS: u64 = 100_000_000;

/// The share the instance may use now: its own, and for a low-priority instance no more than
/// what high-priority instances on the GPU leave idle (the daemon publishes their summed
/// utilisation per GPU). Placement never hands out more than a whole GPU in shares, so while
/// every instance keeps to its share a low-priority one never has to yield; it yields when
/// high-priority work runs above its own share: while that instance's controller settles, or
/// for work the limiter cannot pace.
pub(crate) fn effective_share(priority: Priority, share_bp: u32, high_util_bp: u32) -> u32 {
    let share = share_bp.min(FULL_SHARE_BP);
    match priority {
        Priority::High => share,
        Priority::Low if high_util_bp == 0 => share,
        Priority::Low => share.min(FULL_SHARE_BP.saturating_sub(high_util_bp).max(MIN_SHARE_BP)),
    }
}

/// Next launch spacing from what happened since the last sample, or `None` to keep the current
/// one (no launches: nothing was learnt).
pub(crate) fn next_interval(launches: u64, dt_ns: u64, util_bp: u32, share_bp: u32) -> Option<u64> {
    if launches == 0 || dt_ns == 0 {
        return None;
    }
    let achieved = launches as f64 * 1e9 / dt_ns as f64;
    let factor = if util_bp == 0 {
        MAX_UP
    } else {
        (f64::from(share_bp) / f64::from(util_bp))
            .powf(GAIN)
            .clamp(MAX_DOWN, MAX_UP)
    };
    let rate = achieved * factor;
    let interval = (1e9 / rate).clamp(1.0, MAX_INTERVAL_NS as f64);
    Some(interval as u64)
}

#[inline]
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists (vDSO, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// [`next_interval`] for the daemon, which cannot trust the launch counter (it lives in the
/// instance's writable usage file). While the measured utilisation is above the share, the
/// spacing never shrinks and grows at least as fast as an honest counter would make it grow
/// (`prev · (util / share)^K`, at most ×8 per sample): a forged counter can delay throttling by
/// a few samples, never prevent it. No launches through the library: nothing to space.
pub(crate) fn next_interval_guarded(
    launches: u64,
    dt_ns: u64,
    util_bp: u32,
    share_bp: u32,
    prev_ns: u64,
) -> Option<u64> {
    let iv = next_interval(launches, dt_ns, util_bp, share_bp)?;
    if util_bp <= share_bp || share_bp == 0 {
        return Some(iv);
    }
    let grow = (f64::from(util_bp) / f64::from(share_bp))
        .powf(GAIN)
        .min(1.0 / MAX_DOWN);
    let floor = ((prev_ns.max(1) as f64) * grow).min(MAX_INTERVAL_NS as f64) as u64;
    Some(iv.max(floor))
}

/// The launch gate for device `dev`: counts the launch and waits for its turn when throttled.
/// The spacing comes from the read-only limits (the daemon's controller sets it).
#[inline]
pub(crate) fn gate(l: Layout<'_>, dev: usize) {
    let u = &l.usage.devices[dev];
    u.launches.fetch_add(1, Ordering::Relaxed);
    let interval = l.lim.devices[dev].interval_ns.load(Ordering::Relaxed);
    if interval == 0 {
        return;
    }
    wait_turn(u, interval);
}

#[inline]
fn wait_turn(d: &DeviceUsageState, interval: u64) {
    let now = now_ns();
    let floor = now.saturating_sub(BURST_NS);
    let mut tat = d.tat_ns.load(Ordering::Relaxed);
    let start = loop {
        let start = tat.max(floor);
        match d.tat_ns.compare_exchange_weak(
            tat,
            start + interval,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => break start,
            Err(seen) => tat = seen,
        }
    };
    if start > now {
        sleep_until(start);
    }
}

#[cold]
fn sleep_until(t: u64) {
    let ts = libc::timespec {
        tv_sec: (t / 1_000_000_000) as libc::time_t,
        tv_nsec: (t % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; absolute sleep on CLOCK_MONOTONIC; EINTR just ends the wait early.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plant: utilisation = cost × rate, for very different costs (a small and a huge GPU).
    /// The controller must converge to the share at the same speed for both.
    #[test]
    fn gain_does_not_depend_on_cost_per_launch() {
        for cost_bp_per_launch_per_s in [0.01_f64, 10.0] {
            let share = 2500u32;
            let mut rate = 1e6_f64; // start unthrottled and far too fast
            let mut steps = 0;
            loop {
                let util = (cost_bp_per_launch_per_s * rate).min(10_000.0) as u32;
                let launches = (rate * 0.1) as u64; // one 100 ms sample
                let iv = next_interval(launches, 100_000_000, util, share).unwrap_or(0);
                rate = 1e9 / iv.max(1) as f64;
                steps += 1;
                let u = cost_bp_per_launch_per_s * rate;
                if (u - f64::from(share)).abs() < 50.0 || steps > 60 {
                    break;
                }
            }
            assert!(steps <= 25, "took {steps} samples to settle");
        }
    }

    #[test]
    fn priority_yields_only_for_low() {
        assert_eq!(effective_share(Priority::High, 7000, 9000), 7000);
        assert_eq!(effective_share(Priority::Low, 7000, 0), 7000);
        assert_eq!(effective_share(Priority::Low, 7000, 6000), 4000);
        assert_eq!(effective_share(Priority::Low, 7000, 10_000), MIN_SHARE_BP);
    }

    /// A launch counter forged upwards (to make the achieved rate look huge) cannot keep the
    /// spacing down while the measured utilisation is over the share.
    #[test]
    fn a_forged_launch_counter_cannot_hold_the_spacing_down() {
        let mut iv = 0;
        for _ in 0..40 {
            iv = next_interval_guarded(u64::MAX / 4, 250_000_000, 10_000, 2500, iv).unwrap();
        }
        assert_eq!(iv, MAX_INTERVAL_NS);
    }

    #[test]
    fn idle_keeps_interval() {
        assert_eq!(next_interval(0, 100, 0, 5000), None);
    }
}
