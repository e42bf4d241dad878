//! Bounded metric history of one entity (a GPU or an instance): 1 s samples for the last hour
//! and 1 min aggregates (mean and maximum) for 7 days, in fixed-capacity rings.
//!
//! Key decisions: all series of an entity share one timestamp ring (they are sampled together),
//! values are `f32` (a graph needs no more; bytes keep 24 significant bits) and missing values
//! are NaN, skipped by aggregation. Rings grow up to their capacity and never beyond, so one
//! entity costs at most `3600·(8 + 4·m) + 10080·(8 + 8·m)` bytes for `m` metrics (about 1 MiB
//! for 8 metrics) however long the daemon runs.
//!
//! Persistence: every closed minute is also queued ([`History::take_unsaved`], at most
//! [`UNSAVED_KEPT`] held) for the engine to write to the store, and [`History::restore`] puts
//! stored minutes back after a restart, so the 7-day view survives it; the 1 s samples are
//! memory only (an hour of them is lost on restart, and queries then answer from the minutes).

use gpuvisor_wire::MetricPoint;

/// 1 s samples kept: one hour.
pub const SECONDS_KEPT: usize = 3600;
/// 1 min aggregates kept: seven days.
pub const MINUTES_KEPT: usize = 7 * 24 * 60;

/// Closed minutes waiting to be written out, at most (older ones are dropped if nobody drains).
pub const UNSAVED_KEPT: usize = 120;

/// One closed minute: start (ms), then per metric its mean and maximum (NaN where missing).
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRecord {
    pub start: i64,
    pub avg: Vec<f32>,
    pub max: Vec<f32>,
}

/// A ring of at most `cap` items, oldest first on iteration.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    buf: Vec<T>,
    cap: usize,
    /// Index of the oldest item once full.
    head: usize,
}

impl<T: Copy> Ring<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap: cap.max(1),
            head: 0,
        }
    }

    pub fn push(&mut self, v: T) {
        if self.buf.len() < self.cap {
            self.buf.push(v);
        } else {
            self.buf[self.head] = v;
            self.head = (self.head + 1) % self.cap;
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The `i`-th oldest item.
    pub fn get(&self, i: usize) -> Option<T> {
        if i >= self.buf.len() {
            return None;
        }
        self.buf.get((self.head + i) % self.buf.len()).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.iter_from(0)
    }

    /// The items from the `from`-th oldest on.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = T> + '_ {
        (from..self.buf.len()).filter_map(|i| self.get(i))
    }

    /// How many of the oldest items are `before` (the ring must be ordered by it: times).
    pub fn count_before(&self, mut before: impl FnMut(T) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.buf.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid) {
                Some(v) if before(v) => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo
    }

    pub fn last(&self) -> Option<T> {
        self.buf.len().checked_sub(1).and_then(|i| self.get(i))
    }
}

/// The minute being accumulated.
#[derive(Debug, Clone)]
struct Minute {
    start: i64,
    sum: Vec<f64>,
    n: Vec<u32>,
    max: Vec<f32>,
}

/// History of `m` metrics sampled together.
#[derive(Debug, Clone)]
pub struct History {
    secs_t: Ring<i64>,
    secs: Vec<Ring<f32>>,
    mins_t: Ring<i64>,
    mins_avg: Vec<Ring<f32>>,
    mins_max: Vec<Ring<f32>>,
    cur: Option<Minute>,
    unsaved: Vec<MinuteRecord>,
}

const MINUTE_MS: i64 = 60_000;

impl History {
    pub fn new(metrics: usize) -> Self {
        Self::with_capacity(metrics, SECONDS_KEPT, MINUTES_KEPT)
    }

    pub fn with_capacity(metrics: usize, seconds: usize, minutes: usize) -> Self {
        Self {
            secs_t: Ring::new(seconds),
            secs: (0..metrics).map(|_| Ring::new(seconds)).collect(),
            mins_t: Ring::new(minutes),
            mins_avg: (0..metrics).map(|_| Ring::new(minutes)).collect(),
            mins_max: (0..metrics).map(|_| Ring::new(minutes)).collect(),
            cur: None,
            unsaved: Vec::new(),
        }
    }

    /// Bytes this history can ever hold (its bound), for the docs and a test.
    pub fn max_bytes(&self) -> usize {
        let m = self.secs.len();
        self.secs_t.capacity() * (8 + 4 * m) + self.mins_t.capacity() * (8 + 8 * m)
    }

    /// Records one sample at `t` (ms). `values` has one entry per metric, NaN where missing;
    /// samples older than the newest one are ignored (clock steps back).
    pub fn push(&mut self, t: i64, values: &[f32]) {
        if self.secs_t.last().is_some_and(|last| t <= last) {
            return;
        }
        self.secs_t.push(t);
        for (ring, v) in self.secs.iter_mut().zip(values) {
            ring.push(*v);
        }
        let start = t - t.rem_euclid(MINUTE_MS);
        if self.cur.as_ref().is_some_and(|c| c.start != start) {
            self.close_minute();
        }
        let m = self.secs.len();
        let cur = self.cur.get_or_insert_with(|| Minute {
            start,
            sum: vec![0.0; m],
            n: vec![0; m],
            max: vec![f32::NAN; m],
        });
        for (i, v) in values.iter().enumerate().take(m) {
            if v.is_finite() {
                cur.sum[i] += f64::from(*v);
                cur.n[i] += 1;
                cur.max[i] = if cur.max[i].is_nan() {
                    *v
                } else {
                    cur.max[i].max(*v)
                };
            }
        }
    }

    fn close_minute(&mut self) {
        let Some(c) = self.cur.take() else {
            return;
        };
        let avg: Vec<f32> = (0..self.mins_avg.len())
            .map(|i| {
                if c.n[i] > 0 {
                    (c.sum[i] / f64::from(c.n[i])) as f32
                } else {
                    f32::NAN
                }
            })
            .collect();
        let rec = MinuteRecord {
            start: c.start,
            avg,
            max: c.max,
        };
        self.push_minute(&rec);
        if self.unsaved.len() >= UNSAVED_KEPT {
            self.unsaved.remove(0);
        }
        self.unsaved.push(rec);
    }

    fn push_minute(&mut self, rec: &MinuteRecord) {
        self.mins_t.push(rec.start);
        for (i, (a, x)) in self.mins_avg.iter_mut().zip(&mut self.mins_max).enumerate() {
            a.push(rec.avg.get(i).copied().unwrap_or(f32::NAN));
            x.push(rec.max.get(i).copied().unwrap_or(f32::NAN));
        }
    }

    /// Closed minutes not yet handed out for saving, oldest first.
    pub fn take_unsaved(&mut self) -> Vec<MinuteRecord> {
        std::mem::take(&mut self.unsaved)
    }

    /// Puts saved minutes back (after a restart): those older than everything held, in time
    /// order; the rest are ignored (already here). Records with another metric count are padded
    /// or cut, so a daemon that gained a metric still restores the others.
    pub fn restore(&mut self, mut records: Vec<MinuteRecord>) {
        let first = self
            .mins_t
            .get(0)
            .into_iter()
            .chain(self.cur.as_ref().map(|c| c.start))
            .chain(self.secs_t.get(0).map(|t| t - t.rem_euclid(MINUTE_MS)))
            .min()
            .unwrap_or(i64::MAX);
        records.retain(|r| r.start < first);
        records.sort_by_key(|r| r.start);
        records.dedup_by_key(|r| r.start);
        let held: Vec<MinuteRecord> = (0..self.mins_t.len())
            .filter_map(|k| {
                Some(MinuteRecord {
                    start: self.mins_t.get(k)?,
                    avg: self
                        .mins_avg
                        .iter()
                        .map(|r| r.get(k).unwrap_or(f32::NAN))
                        .collect(),
                    max: self
                        .mins_max
                        .iter()
                        .map(|r| r.get(k).unwrap_or(f32::NAN))
                        .collect(),
                })
            })
            .collect();
        let (m, cap) = (self.mins_avg.len(), self.mins_t.capacity());
        self.mins_t = Ring::new(cap);
        self.mins_avg = (0..m).map(|_| Ring::new(cap)).collect();
        self.mins_max = (0..m).map(|_| Ring::new(cap)).collect();
        for r in records.iter().chain(&held) {
            self.push_minute(r);
        }
    }

    /// Points of every metric from `since` (ms) on, in buckets of `step` ms. Steps under a
    /// minute come from the 1 s samples when `since` is within the hour they cover; otherwise
    /// from the minute aggregates, with the step rounded up to whole minutes. Returns the step
    /// used and, per metric, its points (buckets where the metric had no value are left out).
    pub fn query(&self, since: i64, step: i64) -> (i64, Vec<Vec<MetricPoint>>) {
        let step = step.max(1000);
        let oldest_sec = self.secs_t.get(0).unwrap_or(i64::MAX);
        let m = self.secs.len();
        // The 1 s ring answers when it reaches back to `since`, or when it has never dropped a
        // sample and no minute lies wholly before it (only restored minutes do).
        let restored_older = self
            .mins_t
            .get(0)
            .is_some_and(|m| m + MINUTE_MS <= oldest_sec);
        let complete = self.secs_t.len() < self.secs_t.capacity() && !restored_older;
        if step < MINUTE_MS && (complete || since >= oldest_sec.saturating_sub(1000)) {
            // Times are in order: the samples before `since` are skipped, not walked (a live
            // stream asks for the last second or two of an hour's ring).
            let from = self.secs_t.count_before(|t| t < since);
            let out = (0..m)
                .map(|i| {
                    bucket(
                        self.secs_t
                            .iter_from(from)
                            .zip(self.secs[i].iter_from(from))
                            .map(|(t, v)| (t, v, v)),
                        since,
                        step,
                    )
                })
                .collect();
            return (step, out);
        }
        let step = ((step + MINUTE_MS - 1) / MINUTE_MS) * MINUTE_MS;
        let cur = self.cur.as_ref();
        let first = since - since.rem_euclid(MINUTE_MS);
        let from = self.mins_t.count_before(|t| t < first);
        let out = (0..m)
            .map(|i| {
                let closed = self
                    .mins_t
                    .iter_from(from)
                    .zip(
                        self.mins_avg[i]
                            .iter_from(from)
                            .zip(self.mins_max[i].iter_from(from)),
                    )
                    .map(|(t, (a, x))| (t, a, x));
                let open = cur.into_iter().map(move |c| {
                    let a = if c.n[i] > 0 {
                        (c.sum[i] / f64::from(c.n[i])) as f32
                    } else {
                        f32::NAN
                    };
                    (c.start, a, c.max[i])
                });
                bucket(closed.chain(open), first, step)
            })
            .collect();
        (step, out)
    }

    /// As [`History::query`] for a live stream: a step under a minute is answered from the
    /// 1 s samples alone, `since` raised to the oldest of them (after a restart the restored
    /// minutes would otherwise answer, a minute apart, until the 1 s ring reaches back).
    pub fn query_recent(&self, since: i64, step: i64) -> (i64, Vec<Vec<MetricPoint>>) {
        let since = match self.secs_t.get(0) {
            Some(oldest) if step < MINUTE_MS => since.max(oldest),
            _ => since,
        };
        self.query(since, step)
    }

    /// Number of 1 s samples and minute aggregates held.
    pub fn lens(&self) -> (usize, usize) {
        (self.secs_t.len(), self.mins_t.len())
    }
}

/// Groups time-ordered (t, avg, max) into buckets of `step` from `since`: mean of the means,
/// max of the maxima; NaN values are skipped.
fn bucket(items: impl Iterator<Item = (i64, f32, f32)>, since: i64, step: i64) -> Vec<MetricPoint> {
    let mut out = Vec::new();
    let mut cur: Option<(i64, f64, u32, f64)> = None;
    for (t, avg, max) in items {
        if t < since || !avg.is_finite() {
            continue;
        }
        let key = t - (t - since).rem_euclid(step);
        match &mut cur {
            Some((k, sum, n, mx)) if *k == key => {
                *sum += f64::from(avg);
                *n += 1;
                *mx = mx.max(f64::from(if max.is_finite() { max } else { avg }));
            }
            _ => {
                if let Some((k, sum, n, mx)) = cur.take() {
                    out.push(MetricPoint {
                        t: k,
                        avg: sum / f64::from(n),
                        max: mx,
                    });
                }
                let mx = if max.is_finite() { max } else { avg };
                cur = Some((key, f64::from(avg), 1, f64::from(mx)));
            }
        }
    }
    if let Some((k, sum, n, mx)) = cur {
        out.push(MetricPoint {
            t: k,
            avg: sum / f64::from(n),
            max: mx,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ring_skips_what_is_before_by_bisection() {
        let mut r = Ring::new(5);
        assert_eq!(r.count_before(|t: i64| t < 10), 0);
        // Wrapped: holds 30..=70 with the head in the middle of the buffer.
        for t in 1..=7 {
            r.push(t * 10);
        }
        assert_eq!(r.iter().collect::<Vec<_>>(), [30, 40, 50, 60, 70]);
        for (since, n) in [(0, 0), (30, 0), (31, 1), (50, 2), (55, 3), (70, 4), (71, 5)] {
            assert_eq!(r.count_before(|t| t < since), n, "since {since}");
            assert_eq!(r.iter_from(n).next(), r.get(n), "since {since}");
        }
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let mut r = Ring::new(3);
        for i in 0..10 {
            r.push(i);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![7, 8, 9]);
        assert_eq!(r.last(), Some(9));
    }

    #[test]
    fn history_stays_bounded_over_eight_days() {
        let mut h = History::new(2);
        let t0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000;
        for s in 0..(8 * 24 * 3600) {
            h.push(t0 + s * 1000, &[s as f32, f32::NAN]);
        }
        assert_eq!(h.lens(), (SECONDS_KEPT, MINUTES_KEPT));
        assert!(h.max_bytes() < 300_000, "{}", h.max_bytes());
    }

    #[test]
    fn seconds_are_bucketed_by_step() {
        let mut h = History::new(1);
        let t0 = 1_000_000_020_000;
        for s in 0..10 {
            h.push(t0 + s * 1000, &[s as f32]);
        }
        let (step, pts) = h.query(t0, 5000);
        assert_eq!(step, 5000);
        assert_eq!(pts[0].len(), 2);
        assert_eq!((pts[0][0].avg, pts[0][0].max), (2.0, 4.0));
        assert_eq!((pts[0][1].avg, pts[0][1].max), (7.0, 9.0));
        let (_, pts) = h.query(t0 + 8000, 1000);
        assert_eq!(pts[0].len(), 2);
        // Asking further back than the daemon has run still gets 1 s points.
        let (step, pts) = h.query(t0 - 3_000_000, 1000);
        assert_eq!((step, pts[0].len()), (1000, 10));
    }

    #[test]
    fn minutes_aggregate_mean_and_max() {
        let mut h = History::with_capacity(1, 60, 100);
        let t0 = 6_000_000_000_000;
        for s in 0..180 {
            h.push(t0 + s * 1000, &[(s % 60) as f32]);
        }
        // The 1 s ring only covers the last minute, so older queries use the aggregates.
        let (step, pts) = h.query(t0, 1000);
        assert_eq!(step, 60_000);
        assert_eq!(pts[0].len(), 3, "two closed minutes and the open one");
        assert_eq!((pts[0][0].avg, pts[0][0].max), (29.5, 59.0));
        let (step, pts) = h.query(t0, 120_000);
        assert_eq!(step, 120_000);
        assert_eq!(pts[0].len(), 2);
    }

    #[test]
    fn missing_values_are_skipped_and_old_samples_ignored() {
        let mut h = History::new(1);
        h.push(10_000, &[f32::NAN]);
        h.push(11_000, &[4.0]);
        h.push(10_500, &[100.0]);
        let (_, pts) = h.query(0, 1000);
        assert_eq!(pts[0].len(), 1);
        assert_eq!(pts[0][0].avg, 4.0);
    }

    /// Closed minutes are handed out once for saving; restored into a fresh history (a daemon
    /// restart) they answer the minute queries as before, and 1 s queries reaching back past
    /// the new 1 s samples answer from them.
    #[test]
    fn minutes_survive_a_restart_through_save_and_restore() {
        let t0 = 6_000_000_000_000;
        let mut h = History::with_capacity(2, 3600, 100);
        for s in 0..180 {
            h.push(t0 + s * 1000, &[(s % 60) as f32, f32::NAN]);
        }
        let saved = h.take_unsaved();
        assert_eq!(saved.len(), 2, "two closed minutes");
        assert!(h.take_unsaved().is_empty(), "handed out once");
        assert_eq!(saved[0].start, t0);
        assert_eq!((saved[0].avg[0], saved[0].max[0]), (29.5, 59.0));
        assert!(saved[0].avg[1].is_nan());
        let before = h.query(t0, 60_000);

        // The restarted daemon samples again from minute 5 and gets the saved minutes back.
        let mut r = History::with_capacity(2, 3600, 100);
        for s in 300..310 {
            r.push(t0 + s * 1000, &[1.0, 2.0]);
        }
        let mut again = saved.clone();
        again.push(saved[0].clone()); // duplicates are ignored
        r.restore(again);
        assert_eq!(r.lens(), (10, 2));
        let (step, pts) = r.query(t0, 60_000);
        assert_eq!(step, 60_000);
        assert_eq!(pts[0][..2], before.1[0][..2]);
        assert_eq!(pts[0].len(), 3, "two restored minutes and the open one");
        // A 1 s query from before the restart falls back to the minutes.
        let (step, _) = r.query(t0, 1000);
        assert_eq!(step, 60_000);
        // From after the restart, 1 s points.
        let (step, pts) = r.query(t0 + 300_000, 1000);
        assert_eq!((step, pts[0].len()), (1000, 10));
        // Minutes newer than what is held are not restored over it.
        r.restore(vec![MinuteRecord {
            start: t0 + 300_000,
            avg: vec![99.0, 99.0],
            max: vec![99.0, 99.0],
        }]);
        assert_eq!(r.lens(), (10, 2));
    }
}
