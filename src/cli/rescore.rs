//! `rescore`: replay stored events through the current rules and rewrite
//! the ledger and totals where the points changed; safe while the server
//! serves (each rewrite is guarded by the values it read).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::pipeline::limits::DEFAULT_SOURCE;
use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::Award;
use crate::scoring;
use crate::settings::{SecretEnv, DEFAULT_DATABASE_URL};
use crate::store::rescore::{Selection, Stored};
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

/// What a rescore did (or, dry, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub checked: u64,
    pub changed: u64,
    pub skipped: u64,
    /// Points added to the totals (negative: taken away).
    pub delta: i64,
}

/// A once-award's identity: namespace, user, rule, key.
type OnceClaim = (String, String, String, String);

/// Rescores the events in `selection`, oldest first, writing one line per
/// changed or skipped event to `out`; with `dry_run`, writes nothing to
/// the store.
pub async fn rescore(
    config: &Config,
    store: &Store,
    selection: &Selection,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Summary> {
    let mut sum = Summary::default();
    // Once-awards claimed earlier in this run (a dry run writes none).
    let mut claimed: HashMap<OnceClaim, String> = HashMap::new();
    let mut after = (i64::MIN, String::new());
    loop {
        let page = store
            .rescore_page(selection, (after.0, &after.1), 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = (last.occurred_at, last.id.clone());
        for ev in page {
            sum.checked += 1;
            let awards = match scored(config, store, &ev, &mut claimed).await? {
                Ok(a) => a,
                Err(why) => {
                    writeln!(out, "{} {}: {why}; left as is", ev.id, ev.source)?;
                    sum.skipped += 1;
                    continue;
                }
            };
            // The once keys count: a ledger written before they existed is
            // rewritten with them.
            let old = store.awards_of(&ev).await?;
            let new: Vec<(String, i64, Option<String>)> = awards
                .iter()
                .map(|a| (a.rule.to_string(), a.points, a.once.clone()))
                .collect();
            if old == new && ev.status == "processed" {
                continue;
            }
            let points: i64 = awards.iter().map(|a| a.points).sum();
            let listed: Vec<String> = new.iter().map(|(r, p, _)| format!("{r} {p}")).collect();
            writeln!(
                out,
                "{} {} {}/{}: {} {} -> {points} ({})",
                ev.id,
                ev.source,
                ev.namespace,
                ev.user_id.as_deref().unwrap_or("-"),
                ev.status,
                ev.points,
                listed.join(", ")
            )?;
            if dry_run || store.rewrite_awards(&ev, &awards).await? {
                sum.changed += 1;
                sum.delta += points
                    - if ev.status == "processed" {
                        ev.points
                    } else {
                        0
                    };
            } else {
                writeln!(
                    out,
                    "{}: changed while rescoring; left to the server",
                    ev.id
                )?;
                sum.skipped += 1;
            }
        }
    }
    Ok(sum)
}

/// An event's awards under the current rules, as ingestion would give them
/// now: a once-award whose key another event holds (in the ledger, or
/// earlier in this run) is dropped. `Ok(Err(why))`: the event is left as
/// is (its source is gone, its canonical form unreadable, a rule failed).
async fn scored(
    config: &Config,
    store: &Store,
    ev: &Stored,
    claimed: &mut HashMap<OnceClaim, String>,
) -> anyhow::Result<Result<Vec<Award>, String>> {
    let Some(src) = config.source(&ev.source) else {
        return Ok(Err("source no longer configured".into()));
    };
    let canonical: CanonicalEvent = match serde_json::from_str(&ev.canonical) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("canonical form unreadable ({e})"))),
    };
    let history = scoring::history(store, src, &canonical).await?;
    let scored = match scoring::score(config, src, &canonical, &history) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut awards = Vec::with_capacity(scored.len());
    for a in scored {
        if let (Some(user), Some(key)) = (&ev.user_id, &a.once) {
            let claim = (
                ev.namespace.clone(),
                user.clone(),
                a.rule.to_string(),
                key.clone(),
            );
            let holder = match claimed.get(&claim) {
                Some(id) => Some(id.clone()),
                None => store.once_holder(ev, &a).await?,
            };
            if holder.as_ref().is_some_and(|h| *h != ev.id) {
                continue;
            }
            claimed.insert(claim, ev.id.clone());
        }
        awards.push(a);
    }
    Ok(Ok(awards))
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
