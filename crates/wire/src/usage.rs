//! Prices, metered usage and what an instance costs: `GET /v1/gpu-types`, `GET /v1/usage`,
//! `cost` in `instance get`. Prices are per hour in the config's currency; usage is measured
//! in unit-seconds (GPU-seconds, vCPU-seconds, GiB-seconds) and costed at the price an
//! interval was opened at, so a later price change never rewrites history.

use serde::{Deserialize, Serialize};

/// One GPU model as a renter sees it: what it is, how many are free, what an hour costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuType {
    /// Short model name (`A100-80GB`), what `--gpu-model` takes.
    pub model: String,
    /// VRAM of one GPU, bytes.
    pub vram: u64,
    /// GPUs of this model that take instances (not cordoned).
    pub total: u32,
    /// Of those, how many have nothing allocated.
    pub free: u32,
    /// On-demand price per GPU-hour.
    pub on_demand_price: f64,
    /// The interruptible floor price per GPU-hour (the config's).
    pub interruptible_floor: f64,
    /// What an interruptible bid must reach now: the floor while a GPU of this model is free,
    /// else more than the lowest bid holding one (the bid that would be outbid).
    pub interruptible_price: f64,
    pub currency: String,
}

/// `GET /v1/usage` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsageQuery {
    /// Admins: one tenant (default: all); others always see their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Start: a duration back (`2h`, `30d`), unix ms or RFC 3339 (default: 30 days back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// End, same forms (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only this instance (id or name) or volume (name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// One metered line of a report: one resource of one instance or volume at one price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsageLine {
    pub tenant: String,
    /// `instance` or `volume`.
    pub subject: String,
    /// Instance id, or the volume's name.
    pub id: String,
    pub name: String,
    /// `gpu`, `vcpu`, `memory`, `disk` (an instance's container disk) or `volume`.
    pub resource: String,
    /// GPU lines: the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// GPU lines: the share of each GPU, thousandths (1000 = whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milli: Option<u32>,
    /// GPU lines: billed at the interruptible price (or the bid).
    #[serde(default)]
    pub interruptible: bool,
    /// Seconds metered in the range.
    pub seconds: f64,
    /// Units × seconds: GPU-seconds (fractions count their share), vCPU-seconds, GiB-seconds.
    pub unit_seconds: f64,
    /// Price per unit-hour.
    pub unit_price: f64,
    pub cost: f64,
}

/// `GET /v1/usage`: what was metered in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsageReport {
    /// Unix ms.
    pub from: i64,
    pub to: i64,
    pub currency: String,
    pub lines: Vec<UsageLine>,
    pub total_cost: f64,
}

/// What an instance costs: now per hour, and since it was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstanceCost {
    pub currency: String,
    /// What an hour costs in the instance's current state (0 for compute while stopped).
    pub per_hour: f64,
    /// Metered since creation.
    pub total: f64,
}
