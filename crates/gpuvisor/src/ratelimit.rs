//! Request rates: per key, token buckets (GCRA, `governor`) for reads and for mutations apart,
//! so a client polling hard cannot starve its own creates and a create storm cannot starve its
//! reads; per client address (an IPv6 /64 counts as one), failed authentications (a wrong key
//! guessed at): past the allowance the address's *failed* attempts are answered 429 instead of
//! 401 until its bucket refills — a valid key from the same address is never refused for it,
//! so nobody is locked out by a neighbour behind the same address. Answers carry
//! `Retry-After`. Memory is bounded: keys are the store's (known keys only), and addresses
//! beyond [`MAX_ADDRESSES`] share one bucket, which then only slows the guessing of the
//! addresses that fail; idle entries are swept every minute.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked one by one; more share [`OVERFLOW`]'s bucket.
pub const MAX_ADDRESSES: usize = 65_536;

/// The client `ip` counts as: itself, or for IPv6 its /64 (which one host usually holds whole).
pub fn address_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}
/// The shared bucket of addresses past [`MAX_ADDRESSES`].
const OVERFLOW: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// `[limits]` rates; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub reads_per_second: u32,
    pub read_burst: u32,
    pub mutations_per_second: u32,
    pub mutation_burst: u32,
    pub auth_failures_per_minute: u32,
    pub auth_failure_burst: u32,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            reads_per_second: 200,
            read_burst: 400,
            mutations_per_second: 50,
            mutation_burst: 100,
            auth_failures_per_minute: 10,
            auth_failure_burst: 20,
        }
    }
}

/// A refusal: what ran out, and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub what: &'static str,
    pub retry_after: Duration,
}

pub struct Limiter {
    reads: Option<DefaultKeyedRateLimiter<String>>,
    mutations: Option<DefaultKeyedRateLimiter<String>>,
    auth: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Addresses whose failed authentications ran out, until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
}

fn quota(per: Duration, rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst.max(1))?;
    Quota::with_period(per / rate.get()).map(|q| q.allow_burst(burst))
}

impl Limiter {
    pub fn new(r: Rates) -> Self {
        let second = Duration::from_secs(1);
        Self {
            reads: quota(second, r.reads_per_second, r.read_burst)
                .map(DefaultKeyedRateLimiter::dashmap),
            mutations: quota(second, r.mutations_per_second, r.mutation_burst)
                .map(DefaultKeyedRateLimiter::dashmap),
            auth: quota(
                Duration::from_secs(60),
                r.auth_failures_per_minute,
                r.auth_failure_burst,
            )
            .map(DefaultKeyedRateLimiter::dashmap),
            blocked: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    /// Takes a token of `key`'s bucket for a read or a mutation.
    pub fn check_key(&self, key: &str, mutating: bool) -> Result<(), Limited> {
        let (limiter, what) = if mutating {
            (
                &self.mutations,
                "mutations per key (limits.mutations_per_second)",
            )
        } else {
            (&self.reads, "reads per key (limits.reads_per_second)")
        };
        let Some(l) = limiter else {
            return Ok(());
        };
        l.check_key(&key.to_string()).map_err(|not_until| Limited {
            what,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// The bucket of `ip`: its own ([`address_of`]), or the shared one past
    /// [`MAX_ADDRESSES`].
    fn address_key(&self, ip: IpAddr) -> IpAddr {
        let ip = address_of(ip);
        match &self.auth {
            Some(l) if l.len() >= MAX_ADDRESSES => OVERFLOW,
            _ => ip,
        }
    }

    /// Whether the failed authentications of `ip` are refused for now (asked only once an
    /// attempt from it has failed: a valid key is never refused for its address).
    pub fn blocked(&self, ip: IpAddr) -> Option<Limited> {
        let own = self.address_key(ip);
        // The shared bucket only stands for addresses while they are not tracked one by one.
        let keys = [Some(own), (own == OVERFLOW).then_some(OVERFLOW)];
        let mut b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for k in keys.into_iter().flatten() {
            match b.get(&k) {
                Some(until) if *until > now => return Some(Limited {
                    what:
                        "failed authentications from this address (limits.auth_failures_per_minute)",
                    retry_after: *until - now,
                }),
                Some(_) => {
                    b.remove(&k);
                }
                None => {}
            }
        }
        None
    }

    /// Counts a failed authentication from `ip`; when its allowance has run out, the address
    /// is refused until its bucket has a token again.
    pub fn auth_failed(&self, ip: IpAddr) {
        let Some(l) = &self.auth else {
            return;
        };
        let key = self.address_key(ip);
        if let Err(not_until) = l.check_key(&key) {
            let wait = not_until.wait_time_from(self.clock.now());
            let mut b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            if b.len() < MAX_ADDRESSES || b.contains_key(&key) {
                b.insert(key, Instant::now() + wait);
            }
        }
    }

    /// Forgets buckets that are full again and blocks that ended (every minute).
    pub fn sweep(&self) {
        for l in [&self.reads, &self.mutations].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.auth {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
    }

    /// Entries held now: (key buckets, address buckets, blocked addresses).
    #[cfg(test)]
    pub fn tracked(&self) -> (usize, usize, usize) {
        let keys = [&self.reads, &self.mutations]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum();
        let addrs = self.auth.as_ref().map_or(0, |l| l.len());
        let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner()).len();
        (keys, addrs, blocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates() -> Rates {
        Rates {
            reads_per_second: 1,
            read_burst: 3,
            mutations_per_second: 1,
            mutation_burst: 2,
            auth_failures_per_minute: 1,
            auth_failure_burst: 2,
        }
    }

    #[test]
    fn reads_and_mutations_have_their_own_buckets_per_key() {
        let l = Limiter::new(rates());
        assert!(l.check_key("k1", true).is_ok());
        assert!(l.check_key("k1", true).is_ok());
        let e = l.check_key("k1", true).unwrap_err();
        assert!(
            e.what.contains("mutations") && e.retry_after <= Duration::from_secs(1),
            "{e:?}"
        );
        // Reads of the same key, and another key's mutations, go on.
        for _ in 0..3 {
            assert!(l.check_key("k1", false).is_ok());
        }
        assert!(l.check_key("k1", false).is_err());
        assert!(l.check_key("k2", true).is_ok());
    }

    #[test]
    fn failed_authentications_block_the_address_only() {
        let l = Limiter::new(rates());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        l.auth_failed(a);
        l.auth_failed(a);
        assert!(l.blocked(a).is_none(), "blocked within its allowance");
        l.auth_failed(a);
        let e = l.blocked(a).expect("a third failure in a minute blocks");
        assert!(e.retry_after > Duration::from_secs(1) && e.retry_after <= Duration::from_secs(60));
        assert!(l.blocked(b).is_none());
        // An IPv6 /64 is one address.
        let (v6a, v6b): (IpAddr, IpAddr) = (
            "2001:db8:1:2::1".parse().unwrap(),
            "2001:db8:1:2:ffff::9".parse().unwrap(),
        );
        for _ in 0..3 {
            l.auth_failed(v6a);
        }
        assert!(
            l.blocked(v6b).is_some(),
            "another address of the same /64 is not held"
        );
        assert!(l.blocked("2001:db8:1:3::1".parse().unwrap()).is_none());
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let l = Limiter::new(Rates {
            mutations_per_second: 0,
            auth_failures_per_minute: 0,
            ..rates()
        });
        for _ in 0..1000 {
            assert!(l.check_key("k", true).is_ok());
        }
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            l.auth_failed(a);
        }
        assert!(l.blocked(a).is_none());
    }

    #[test]
    fn memory_stays_bounded_under_many_addresses() {
        let l = Limiter::new(rates());
        for i in 0..(MAX_ADDRESSES as u32 + 5000) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.auth_failed(ip);
        }
        let (_, addrs, blocked) = l.tracked();
        assert!(addrs <= MAX_ADDRESSES + 1, "{addrs} address buckets");
        assert!(blocked <= MAX_ADDRESSES, "{blocked} blocked entries");
        // The overflow bucket ran out: new addresses are refused together.
        l.auth_failed(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
        l.auth_failed(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
        assert!(l
            .blocked(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 9)))
            .is_some());
    }
}
