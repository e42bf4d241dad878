//! `[pricing]`: what an hour of each resource costs (the engine's [`Pricing`]). Only in the
//! file: prices are the operator's business, not a flag's.
//!
//! ```toml
//! [pricing]
//! currency = "USD"
//! vcpu_hour = 0.01
//! memory_gib_hour = 0.005
//! disk_gib_hour = 0.0001
//! volume_gib_hour = 0.0001
//! gpu_default = { on_demand = 1.0, interruptible = 0.5 }
//! [pricing.gpu."A100-80GB"]
//! on_demand = 1.64
//! interruptible = 0.82
//! ```

use gpuvisor_control::engine::pricing::{GpuPrice, Pricing};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PricingFile {
    currency: Option<String>,
    vcpu_hour: Option<f64>,
    memory_gib_hour: Option<f64>,
    disk_gib_hour: Option<f64>,
    volume_gib_hour: Option<f64>,
    gpu_default: Option<GpuPriceFile>,
    /// By model; merged over the defaults (a model named here replaces its default price).
    #[serde(default)]
    gpu: BTreeMap<String, GpuPriceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuPriceFile {
    on_demand: f64,
    interruptible: f64,
}

impl From<GpuPriceFile> for GpuPrice {
    fn from(f: GpuPriceFile) -> Self {
        GpuPrice {
            on_demand: f.on_demand,
            interruptible: f.interruptible,
        }
    }
}

/// Applies the file's `[pricing]` over `p` and checks the result.
pub(super) fn apply(p: &mut Pricing, f: PricingFile) -> anyhow::Result<()> {
    let set = |slot: &mut f64, v: Option<f64>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    if let Some(c) = f.currency {
        p.currency = c;
    }
    set(&mut p.vcpu_hour, f.vcpu_hour);
    set(&mut p.memory_gib_hour, f.memory_gib_hour);
    set(&mut p.disk_gib_hour, f.disk_gib_hour);
    set(&mut p.volume_gib_hour, f.volume_gib_hour);
    if let Some(d) = f.gpu_default {
        p.gpu_default = d.into();
    }
    for (model, price) in f.gpu {
        p.gpus.insert(model, price.into());
    }
    p.validate().map_err(anyhow::Error::msg)
}
