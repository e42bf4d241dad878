//! What things cost: the price list (per GPU model, on-demand and interruptible, and per vCPU,
//! GiB of memory, GiB of disk, per hour) and the market rule that ranks interruptible bids.
//! The daemon's `[pricing]` section fills it; the defaults are an example list, not advice.

use crate::error::{EngineError, Result};
use gpuvisor_wire::PriorityClass;
use std::collections::BTreeMap;

/// Prices of one GPU model, per GPU-hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuPrice {
    pub on_demand: f64,
    pub interruptible: f64,
}

/// The price list, per hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub currency: String,
    pub vcpu_hour: f64,
    pub memory_gib_hour: f64,
    /// An instance's container disk, per GiB-hour, while the instance exists.
    pub disk_gib_hour: f64,
    /// A persistent volume, per GiB-hour, while it exists.
    pub volume_gib_hour: f64,
    /// By short model name (`A100-80GB`).
    pub gpus: BTreeMap<String, GpuPrice>,
    /// A model the list does not name.
    pub gpu_default: GpuPrice,
}

impl Default for Pricing {
    fn default() -> Self {
        let gpu = |on_demand, interruptible| GpuPrice {
            on_demand,
            interruptible,
        };
        Self {
            currency: "USD".into(),
            vcpu_hour: 0.01,
            memory_gib_hour: 0.005,
            disk_gib_hour: 0.0001,
            volume_gib_hour: 0.0001,
            gpus: [
                ("H200-141GB", gpu(3.59, 1.79)),
                ("H100-80GB", gpu(2.69, 1.35)),
                ("A100-80GB", gpu(1.64, 0.82)),
                ("A100-40GB", gpu(1.19, 0.60)),
                ("L40S", gpu(0.86, 0.43)),
                ("A10", gpu(0.50, 0.25)),
                ("T4", gpu(0.20, 0.10)),
            ]
            .into_iter()
            .map(|(m, p)| (m.to_string(), p))
            .collect(),
            gpu_default: gpu(1.00, 0.50),
        }
    }
}

impl Pricing {
    /// Refuses negative, non-finite or inverted (interruptible above on-demand) prices.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let plain = [
            ("vcpu_hour", self.vcpu_hour),
            ("memory_gib_hour", self.memory_gib_hour),
            ("disk_gib_hour", self.disk_gib_hour),
            ("volume_gib_hour", self.volume_gib_hour),
        ];
        for (name, v) in plain {
            price_ok(name, v)?;
        }
        let gpus = self
            .gpus
            .iter()
            .map(|(m, p)| (format!("gpu.{m:?}"), *p))
            .chain([("gpu_default".to_string(), self.gpu_default)]);
        for (name, p) in gpus {
            price_ok(&format!("{name}.on_demand"), p.on_demand)?;
            price_ok(&format!("{name}.interruptible"), p.interruptible)?;
            if p.interruptible > p.on_demand {
                return Err(format!(
                    "pricing {name}: interruptible {} is above on-demand {}",
                    p.interruptible, p.on_demand
                ));
            }
        }
        if self.currency.trim().is_empty() || self.currency.len() > 16 {
            return Err("pricing.currency must be 1 to 16 characters".into());
        }
        Ok(())
    }

    /// The prices of `model`: its own entry; for a MIG slice (`A100-80GB-3g.40gb`) its parent's
    /// times the slice's share of the 7 compute slices; else the default.
    pub fn gpu(&self, model: &str) -> GpuPrice {
        if let Some(p) = self.gpus.get(model) {
            return *p;
        }
        let slice = model.rsplit_once('-').and_then(|(parent, profile)| {
            let g: f64 = profile.split_once("g.")?.0.parse().ok()?;
            let p = self.gpus.get(parent)?;
            let share = (g / 7.0).clamp(0.0, 1.0);
            Some(GpuPrice {
                on_demand: p.on_demand * share,
                interruptible: p.interruptible * share,
            })
        });
        slice.unwrap_or(self.gpu_default)
    }

    /// What an interruptible instance on `model` pays per GPU-hour: its bid, else the floor.
    /// A bid under the floor is refused, and one over the on-demand price (an on-demand
    /// instance outranks every spot one and costs less).
    pub fn interruptible_rate(&self, model: &str, bid: Option<f64>) -> Result<f64> {
        let GpuPrice {
            on_demand,
            interruptible: floor,
        } = self.gpu(model);
        let cur = &self.currency;
        match bid {
            None => Ok(floor),
            Some(b) if b + 1e-9 < floor => Err(EngineError::InvalidArgument(format!(
                "a bid of {b} {cur}/GPU-hour is below the interruptible price of {model}, \
                 {floor} {cur}/GPU-hour (see `gpuvisor gpu types`)"
            ))),
            Some(b) if b > on_demand + 1e-9 => Err(EngineError::InvalidArgument(format!(
                "a bid of {b} {cur}/GPU-hour is above the on-demand price of {model}, \
                 {on_demand} {cur}/GPU-hour: rent it on demand (leave out --interruptible)"
            ))),
            Some(b) => Ok(b),
        }
    }
}

/// The highest price per hour the list takes (bids rank in thousandths below `BID_SPAN`).
const MAX_PRICE: f64 = 10_000.0;

fn price_ok(name: &str, v: f64) -> std::result::Result<(), String> {
    if v.is_finite() && (0.0..MAX_PRICE).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "pricing {name} = {v} is not a price (0 to {MAX_PRICE} per hour)"
        ))
    }
}

/// Checks a requested bid's form (before the model is known).
pub fn check_bid(interruptible: bool, bid: Option<f64>) -> Result<()> {
    match bid {
        Some(_) if !interruptible => Err(EngineError::InvalidArgument(
            "a bid is for interruptible instances: add --interruptible".into(),
        )),
        Some(b) if !(b.is_finite() && b > 0.0 && b < 1e6) => Err(EngineError::InvalidArgument(
            format!("a bid of {b} per GPU-hour is not a price (above 0, below 1000000)"),
        )),
        _ => Ok(()),
    }
}

/// Whether a request takes `victim`'s GPU by the market alone: the victim is interruptible and
/// the request is on demand or bids more (what another tenant may do without the right to
/// preempt by priority).
pub fn outbids(interruptible: bool, bid: Option<f64>, victim: &crate::store::InstanceSpec) -> bool {
    victim.interruptible
        && (!interruptible || bid.unwrap_or(0.0) > victim.bid_per_gpu_hour.unwrap_or(0.0))
}

/// [`market_rank`] of a stored instance.
pub fn spec_rank(spec: &crate::store::InstanceSpec) -> u32 {
    market_rank(spec.priority, spec.interruptible, spec.bid_per_gpu_hour)
}

/// Bids are ranked in thousandths of a currency unit per GPU-hour, below this.
const BID_SPAN: u32 = 1 << 24;

/// The placement rank of an instance: the priority class first; within a class an on-demand
/// instance above every interruptible one, and interruptible ones by their bid. Preemption
/// evicts interruptible instances of a strictly lower rank, so a higher class, an on-demand
/// request or a higher bid takes a GPU from an interruptible holder, and an equal bid does
/// not.
pub fn market_rank(class: PriorityClass, interruptible: bool, rate: Option<f64>) -> u32 {
    let within = if interruptible {
        let milli = (rate.unwrap_or(0.0) * 1000.0).round();
        (milli.max(0.0) as u32).min(BID_SPAN - 2)
    } else {
        BID_SPAN - 1
    };
    class.rank() * BID_SPAN + within
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_order_class_then_on_demand_then_bid() {
        use PriorityClass::*;
        let spot = |c, b| market_rank(c, true, Some(b));
        assert!(market_rank(Low, false, None) > spot(Low, 100.0));
        assert!(spot(Low, 1.5) > spot(Low, 1.4));
        assert_eq!(
            spot(Low, 1.5),
            spot(Low, 1.5),
            "an equal bid does not outbid"
        );
        assert!(spot(Normal, 0.1) > market_rank(Low, false, None));
        assert!(market_rank(High, false, None) > spot(Normal, 1e5));
        // Absurd bids stay inside their class.
        assert!(spot(Low, 1e9) < market_rank(Normal, true, Some(0.0)));
    }

    #[test]
    fn mig_slices_cost_their_share_and_unknown_models_the_default() {
        let p = Pricing::default();
        let a100 = p.gpu("A100-80GB");
        let slice = p.gpu("A100-80GB-3g.40gb");
        assert!((slice.on_demand - a100.on_demand * 3.0 / 7.0).abs() < 1e-12);
        assert_eq!(p.gpu("Z9000"), p.gpu_default);
        assert_eq!(p.gpu("A100-80GB-bogus"), p.gpu_default);
    }

    #[test]
    fn bids_below_the_floor_and_bad_prices_are_refused() {
        let p = Pricing::default();
        let floor = p.gpu("H100-80GB").interruptible;
        assert_eq!(p.interruptible_rate("H100-80GB", None).ok(), Some(floor));
        assert_eq!(
            p.interruptible_rate("H100-80GB", Some(floor + 1.0)).ok(),
            Some(floor + 1.0)
        );
        let e = p.interruptible_rate("H100-80GB", Some(floor / 2.0));
        assert!(matches!(e, Err(EngineError::InvalidArgument(m)) if m.contains("below")));
        let over = p.gpu("H100-80GB").on_demand + 0.5;
        let e = p.interruptible_rate("H100-80GB", Some(over));
        assert!(matches!(e, Err(EngineError::InvalidArgument(m)) if m.contains("on demand")));
        assert!(check_bid(false, Some(1.0)).is_err());
        assert!(check_bid(true, Some(f64::NAN)).is_err());
        assert!(check_bid(true, Some(-1.0)).is_err());
        assert!(check_bid(true, Some(1.0)).is_ok());
        let bad = Pricing {
            vcpu_hour: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let mut inverted = Pricing::default();
        inverted.gpu_default.interruptible = 5.0;
        assert!(inverted.validate().unwrap_err().contains("above on-demand"));
        assert!(Pricing::default().validate().is_ok());
    }
}
