//! `rescore`: replay stored events through the current rules and rewrite
//! the ledger and totals where the points changed; safe while the server
//! serves (each rewrite is guarded by the values it read).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::pipeline::limits::DEFAULT_SOURCE;
pub use crate::replay::{rescore, Summary};
use crate::settings::{SecretEnv, DEFAULT_DATABASE_URL};
use crate::store::rescore::Selection;
use crate::store::Store;

#[derive(clap::Args)]
pub struct RescoreArgs {
    /// Only events that occurred at or after this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this source's events.
    #[arg(long)]
    pub source: Option<String>,
    /// Print what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, env = "ROCKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
    pub config_dir: PathBuf,
}

/// `--since`: RFC 3339, or Unix seconds.
pub fn parse_since(s: &str) -> anyhow::Result<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .or_else(|_| s.parse::<i64>().map(|v| v * 1000))
        .map_err(|_| anyhow::anyhow!("--since takes an RFC 3339 time or Unix seconds"))
}

/// The subcommand: loads the config and the store, rescores, prints the
/// changes and a summary line.
pub async fn run(args: RescoreArgs) -> anyhow::Result<ExitCode> {
    let config = crate::config::load(&args.config_dir, &SecretEnv::from_process(), DEFAULT_SOURCE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::connect(&args.database_url).await?;
    let selection = Selection {
        source: args.source.clone(),
        since_ms: args.since.as_deref().map(parse_since).transpose()?,
    };
    let mut stdout = std::io::stdout();
    let sum = rescore(&config, &store, &selection, args.dry_run, &mut stdout).await?;
    println!(
        "{} events checked, {} {}, {} skipped, points {:+}",
        sum.checked,
        sum.changed,
        if args.dry_run {
            "would change"
        } else {
            "changed"
        },
        sum.skipped,
        sum.delta
    );
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
