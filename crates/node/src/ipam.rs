//! The instance address plan: one IPv4 pool (`10.88.0.0/16` by default) cut into equal tenant
//! subnets (`/24` by default, down to `/29`), one per tenant *slot*. A slot is the tenant's index
//! in the pool; a deleted tenant's slot is reused by the next tenant. Inside a subnet, host
//! number 1 is the gateway (the tenant's bridge) and instances take 2 up to the last address
//! before the broadcast. Pure arithmetic, no host access.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// Shortest pool prefix accepted (a /8 holds 65,536 /24 tenants).
pub const MIN_POOL_LEN: u8 = 8;
/// Longest tenant prefix: a /29 has a gateway and five instance addresses.
pub const MAX_TENANT_LEN: u8 = 29;
/// Shortest tenant prefix: host numbers are one byte.
pub const MIN_TENANT_LEN: u8 = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// An IPv4 network `a.b.c.d/len` whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = PlanError;

    /// `a.b.c.d/len`; a bare `a.b.c.d` is a /16 (what `net_pool` meant before it took a length).
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| PlanError(format!("{s:?}: the prefix length must be 0-32")))?,
            ),
            None => (s, 16),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| PlanError(format!("{s:?} is not an IPv4 network like 10.88.0.0/16")))?;
        let base = u32::from(addr) & Self::mask(len);
        if base != u32::from(addr) {
            return Err(PlanError(format!(
                "{s:?} has host bits set: the network is {}/{len}",
                Ipv4Addr::from(base)
            )));
        }
        Ok(Self { addr, len })
    }
}

/// The pool and the size of each tenant's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPlan {
    pool: Cidr,
    tenant_len: u8,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self {
            pool: Cidr {
                addr: Ipv4Addr::new(10, 88, 0, 0),
                len: 16,
            },
            tenant_len: 24,
        }
    }
}

impl AddressPlan {
    pub fn new(pool: Cidr, tenant_len: u8) -> Result<Self, PlanError> {
        if !(MIN_POOL_LEN..=MAX_TENANT_LEN).contains(&pool.len) {
            return Err(PlanError(format!(
                "the instance pool {pool} must be a /{MIN_POOL_LEN} to /{MAX_TENANT_LEN}"
            )));
        }
        if !(MIN_TENANT_LEN..=MAX_TENANT_LEN).contains(&tenant_len) {
            return Err(PlanError(format!(
                "the tenant subnet size /{tenant_len} must be /{MIN_TENANT_LEN} to \
                 /{MAX_TENANT_LEN}"
            )));
        }
        if tenant_len < pool.len {
            return Err(PlanError(format!(
                "a tenant subnet (/{tenant_len}) cannot be larger than the pool {pool}"
            )));
        }
        Ok(Self { pool, tenant_len })
    }

    pub fn pool(&self) -> Cidr {
        self.pool
    }

    pub fn tenant_len(&self) -> u8 {
        self.tenant_len
    }

    /// How many tenant subnets the pool holds: valid slots are `0..tenants()`.
    pub fn tenants(&self) -> u32 {
        1 << (self.tenant_len - self.pool.len)
    }

    /// Host numbers instances may use in a tenant's subnet (`2..=254` in a /24).
    pub fn hosts(&self) -> RangeInclusive<u8> {
        let size = 1u32 << (32 - self.tenant_len);
        2..=u8::try_from(size - 2).unwrap_or(u8::MAX)
    }

    /// The slot's subnet, or an error naming the plan when the slot is outside it.
    pub fn subnet(&self, slot: u32) -> Result<Cidr, PlanError> {
        if slot >= self.tenants() {
            return Err(PlanError(format!(
                "tenant slot {slot} is outside the instance pool {} ({} tenant networks of \
                 /{}): delete tenants or give the daemon a larger --net-pool or a longer \
                 --net-tenant-prefix",
                self.pool,
                self.tenants(),
                self.tenant_len
            )));
        }
        let base = u32::from(self.pool.addr) + (slot << (32 - self.tenant_len));
        Ok(Cidr {
            addr: Ipv4Addr::from(base),
            len: self.tenant_len,
        })
    }

    /// Address of host number `host` in the slot's subnet (1 is the gateway).
    pub fn address(&self, slot: u32, host: u8) -> Result<Ipv4Addr, PlanError> {
        let net = self.subnet(slot)?;
        if host == 0 || host > *self.hosts().end() {
            return Err(PlanError(format!(
                "host number {host} is outside 1..={} of a /{}",
                self.hosts().end(),
                self.tenant_len
            )));
        }
        Ok(Ipv4Addr::from(u32::from(net.addr) + u32::from(host)))
    }

    /// A fixed MAC for the slot's bridge (locally administered, `02:67:76` + the slot).
    pub fn bridge_mac(&self, slot: u32) -> String {
        let [_, a, b, c] = slot.to_be_bytes();
        format!("02:67:76:{a:02x}:{b:02x}:{c:02x}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(pool: &str, len: u8) -> Result<AddressPlan, PlanError> {
        AddressPlan::new(pool.parse()?, len)
    }

    #[test]
    fn default_plan_is_256_slash_24s() {
        let p = AddressPlan::default();
        assert_eq!(p, plan("10.88.0.0/16", 24).unwrap());
        assert_eq!(p.tenants(), 256);
        assert_eq!(p.hosts(), 2..=254);
        assert_eq!(p.subnet(3).unwrap().to_string(), "10.88.3.0/24");
        assert_eq!(
            p.address(3, 7).unwrap(),
            "10.88.3.7".parse::<Ipv4Addr>().unwrap()
        );
        assert!(p.subnet(256).unwrap_err().0.contains("256 tenant networks"));
        assert!(p.address(3, 255).is_err());
        assert!(p.address(3, 0).is_err());
    }

    #[test]
    fn smaller_subnets_hold_more_tenants() {
        let p = plan("10.88.0.0/16", 26).unwrap();
        assert_eq!(p.tenants(), 1024);
        assert_eq!(p.hosts(), 2..=62);
        assert_eq!(p.subnet(299).unwrap().to_string(), "10.88.74.192/26");
        assert_eq!(
            p.address(299, 62).unwrap(),
            "10.88.74.254".parse::<Ipv4Addr>().unwrap()
        );
        assert!(p.address(299, 63).is_err(), "the broadcast is not a host");
        let p = plan("10.64.0.0/10", 24).unwrap();
        assert_eq!(p.tenants(), 16384);
        assert_eq!(p.subnet(16383).unwrap().to_string(), "10.127.255.0/24");
        let p = plan("10.88.0.0/16", 29).unwrap();
        assert_eq!(p.hosts(), 2..=6);
        assert_eq!(p.tenants(), 8192);
        // Subnets never overlap: consecutive slots are adjacent.
        let (a, b) = (p.subnet(5).unwrap(), p.subnet(6).unwrap());
        assert!(!a.contains(b.addr) && !b.contains(a.addr));
        assert_eq!(u32::from(b.addr) - u32::from(a.addr), 8);
    }

    #[test]
    fn bad_plans_say_what_is_wrong() {
        assert!(plan("10.88.1.0/16", 24)
            .unwrap_err()
            .0
            .contains("host bits"));
        assert!(plan("10.88.0.0/33", 24).is_err());
        assert!(plan("10.88.0.0/x", 24).is_err());
        assert!(plan("10.88.0/16", 24).is_err());
        assert!(plan("10.88.0.0/16", 30)
            .unwrap_err()
            .0
            .contains("/24 to /29"));
        assert!(plan("10.88.0.0/16", 23).is_err());
        assert!(plan("10.0.0.0/7", 24).is_err());
        assert!(plan("10.88.0.0/26", 24)
            .unwrap_err()
            .0
            .contains("cannot be larger"));
        // A bare address is a /16, as before the pool took a length.
        assert_eq!(plan("10.77.0.0", 24).unwrap().tenants(), 256);
    }

    #[test]
    fn bridge_macs_differ_per_slot() {
        let p = AddressPlan::default();
        assert_eq!(p.bridge_mac(0), "02:67:76:00:00:00");
        assert_eq!(p.bridge_mac(0x01_02_03), "02:67:76:01:02:03");
        assert_ne!(p.bridge_mac(256), p.bridge_mac(0));
    }
}
