//! `gpuvisor serve`: the daemon. (stub; the lead fills it in)

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "GPUVISOR_CONFIG")]
    pub config: Option<PathBuf>,
}

pub async fn serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
