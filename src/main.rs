//! The `rocket-rewards` binary: serve | check | openapi | token.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use rocket_rewards::app::{App, StartError};
use rocket_rewards::net::ConnLimits;
use rocket_rewards::pipeline::limits::{RateSpec, DEFAULT_SOURCE};
use rocket_rewards::settings::{
    parse_network, parse_switch, LogFormat, SecretEnv, Settings, TlsFiles, DEFAULT_DATABASE_URL,
    DEFAULT_LISTEN,
};

#[derive(Parser)]
#[command(
    name = "rocket-rewards",
    version,
    about = "LMS webhooks in, learning rewards out."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// Load and compile the config directory; exit non-zero on any error.
    Check {
        /// The folder holding sources.d/ and rules/.
        #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
        config_dir: PathBuf,
    },
    /// Print the OpenAPI spec.
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
    /// Print a new random secret: 32 bytes as hex.
    Token,
    /// Replay stored events through the current rules and rewrite the ledger
    /// and totals where the points changed; safe while the server serves.
    Rescore(RescoreArgs),
    /// Sign a payload file with a source's scheme (secret from the env) and
    /// post it, retrying with exponential backoff that honours Retry-After.
    Send(SendArgs),
}

#[derive(clap::Args)]
struct RescoreArgs {
    /// Only events that occurred at or after this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Only this source's events.
    #[arg(long)]
    source: Option<String>,
    /// Print what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, env = "ROCKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
    config_dir: PathBuf,
}

#[derive(clap::Args)]
struct SendArgs {
    /// The source to post to.
    #[arg(long)]
    source: String,
    /// The payload file, sent byte for byte.
    #[arg(long)]
    file: PathBuf,
    /// The server's base URL.
    #[arg(long, env = "ROCKET_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The folder holding sources.d/ and rules/ (to find the source's auth).
    #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
    config_dir: PathBuf,
    /// Content type; default the source's first.
    #[arg(long)]
    content_type: Option<String>,
    /// Which of the source's auth schemes to sign with (1-based).
    #[arg(long, default_value_t = 1)]
    auth_scheme: usize,
    /// Retries after a 429, a 5xx or a connection error.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ROCKET_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: String,
    /// sqlite://PATH (created on first run) or postgres://…
    #[arg(long, env = "ROCKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// The folder holding sources.d/ and rules/.
    #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
    config_dir: PathBuf,
    /// Rate limits: on (default) or off (load tests).
    #[arg(long, env = "ROCKET_RATE_LIMITS", default_value = "on", value_parser = parse_switch)]
    rate_limits: bool,
    /// Log format.
    #[arg(long, env = "ROCKET_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// All hooks together: PER_MINUTE[:BURST].
    #[arg(long, env = "ROCKET_RATE_LIMIT_GLOBAL", default_value = "1000:2000", value_parser = RateSpec::parse)]
    rate_limit_global: RateSpec,
    /// Each source, unless its file sets `rate_limit`: PER_MINUTE[:BURST].
    #[arg(long, env = "ROCKET_RATE_LIMIT_SOURCE", default_value = "500:1000", value_parser = RateSpec::parse)]
    rate_limit_source: RateSpec,
    /// Each client address: PER_MINUTE[:BURST].
    #[arg(long, env = "ROCKET_RATE_LIMIT_IP", default_value = "100:200", value_parser = RateSpec::parse)]
    rate_limit_ip: RateSpec,
    /// Proxies (CIDR list) whose X-Forwarded-For/Forwarded headers name the client.
    #[arg(long, env = "ROCKET_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_network)]
    trusted_proxies: Vec<IpNet>,
    /// PEM certificate chain: serve HTTPS (with HSTS).
    #[arg(long, env = "ROCKET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ROCKET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most open connections; more wait to be accepted.
    #[arg(long, env = "ROCKET_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds allowed for a request's headers once they start.
    #[arg(long, env = "ROCKET_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Largest request head in bytes.
    #[arg(long, env = "ROCKET_MAX_HEADER_BYTES", default_value_t = 65_536)]
    max_header_bytes: usize,
    /// Seconds allowed to read a hook's body.
    #[arg(long, env = "ROCKET_BODY_TIMEOUT", default_value_t = 30)]
    body_timeout: u64,
    /// Reload by itself when a file in sources.d/ or rules/ changes: on or off.
    #[arg(long, env = "ROCKET_WATCH_CONFIG", default_value = "off", value_parser = parse_switch)]
    watch_config: bool,
    /// Workers processing async sources' queued events (0: none on this instance).
    #[arg(long, env = "ROCKET_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Level curve: points of the first level step (Level Up XP's default 120).
    #[arg(long, env = "ROCKET_LEVEL_BASE", default_value_t = 120.0)]
    level_base: f64,
    /// Level curve: each step is the previous one times this (default 1.3).
    #[arg(long, env = "ROCKET_LEVEL_COEFFICIENT", default_value_t = 1.3)]
    level_coefficient: f64,
    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, env = "ROCKET_IDLE_TIMEOUT", default_value_t = 120)]
    idle_timeout: u64,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROCKET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Token => {
            use rand::RngCore;
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            println!("{}", hex::encode(bytes));
            ExitCode::SUCCESS
        }
        Cmd::Openapi { yaml } => {
            let svc = rocket_rewards::http::service();
            println!("{}", if yaml { svc.spec_yaml() } else { svc.spec() });
            ExitCode::SUCCESS
        }
        Cmd::Check { config_dir } => check(&config_dir),
        Cmd::Rescore(args) => match tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(rescore(args)))
        {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", causes(&e));
                ExitCode::FAILURE
            }
        },
        Cmd::Send(args) => match tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(send(args)))
        {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", causes(&e));
                ExitCode::FAILURE
            }
        },
        Cmd::Serve(args) => match serve(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", causes(&e));
                ExitCode::FAILURE
            }
        },
    }
}

fn check(dir: &std::path::Path) -> ExitCode {
    use rocket_rewards::config::{self, selftest};
    // Secret files may live only where the server runs: their problems warn.
    let config = match config::load(dir, &SecretEnv::from_process().lenient(), DEFAULT_SOURCE) {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    for w in &config.warnings {
        println!("warning: {w}");
    }
    println!(
        "config ok: {} sources ({}), {} rules",
        config.sources.len(),
        config.source_names().join(", "),
        config.rules.len()
    );
    // Run the embedded cases with a test secret in every env var.
    let with_test_secret = match config::load(
        dir,
        &SecretEnv::everything(selftest::CHECK_SECRET),
        DEFAULT_SOURCE,
    ) {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let mut outcomes = selftest::run(&with_test_secret);
    outcomes.extend(selftest::run_rules(&with_test_secret));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.failures.is_empty()).collect();
    for o in &outcomes {
        if o.failures.is_empty() {
            println!("  pass  {} › {}", o.source, o.name);
        } else {
            for f in &o.failures {
                println!("  FAIL  {} › {}: {f}", o.source, o.name);
            }
        }
    }
    println!(
        "{} passed, {} failed",
        outcomes.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn rescore(args: RescoreArgs) -> anyhow::Result<ExitCode> {
    use rocket_rewards::pipeline::mapping::CanonicalEvent;
    use rocket_rewards::pipeline::rules;
    use rocket_rewards::store::rescore::Scope;
    let config =
        rocket_rewards::config::load(&args.config_dir, &SecretEnv::from_process(), DEFAULT_SOURCE)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = rocket_rewards::store::Store::connect(&args.database_url).await?;
    let since_ms = match &args.since {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .or_else(|_| s.parse::<i64>().map(|v| v * 1000))
                .map_err(|_| anyhow::anyhow!("--since takes an RFC 3339 time or Unix seconds"))?,
        ),
    };
    let scope = Scope {
        source: args.source.clone(),
        since_ms,
    };
    let (mut checked, mut changed, mut skipped, mut delta) = (0u64, 0u64, 0u64, 0i64);
    let mut claimed: std::collections::HashMap<(String, String, String, String), String> =
        std::collections::HashMap::new();
    let mut after = (i64::MIN, String::new());
    loop {
        let page = store.rescore_page(&scope, (after.0, &after.1), 500).await?;
        let Some(last) = page.last() else { break };
        after = (last.occurred_at, last.id.clone());
        for ev in page {
            checked += 1;
            let Some(src) = config.source(&ev.source) else {
                println!(
                    "{} {}: source no longer configured; left as is",
                    ev.id, ev.source
                );
                skipped += 1;
                continue;
            };
            let canonical: CanonicalEvent = match serde_json::from_str(&ev.canonical) {
                Ok(c) => c,
                Err(e) => {
                    println!(
                        "{} {}: canonical form unreadable ({e}); left as is",
                        ev.id, ev.source
                    );
                    skipped += 1;
                    continue;
                }
            };
            let history = if src.rules.iter().any(|r| r.uses_history) {
                store.history(&src.namespace, &canonical).await?
            } else {
                rules::History::default()
            };
            let scored = match rules::score(&config.engine, &src.rules, &canonical, &history) {
                Ok(a) => a,
                Err(e) => {
                    println!("{} {}: {e}; left as is", ev.id, ev.source);
                    skipped += 1;
                    continue;
                }
            };
            // A once-award whose key another event holds (in the ledger, or
            // earlier in this run) gives nothing, as at ingestion.
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
                        None => store.once_holder(&ev, &a).await?,
                    };
                    if holder.as_ref().is_some_and(|h| *h != ev.id) {
                        continue;
                    }
                    claimed.insert(claim, ev.id.clone());
                }
                awards.push(a);
            }
            let new_points: i64 = awards.iter().map(|a| a.points).sum();
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
            let user = ev.user_id.as_deref().unwrap_or("-");
            println!(
                "{} {} {}/{}: {} {} -> {} ({})",
                ev.id,
                ev.source,
                ev.namespace,
                user,
                ev.status,
                ev.points,
                new_points,
                new.iter()
                    .map(|(r, p, _)| format!("{r} {p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if args.dry_run || store.rewrite_awards(&ev, &awards).await? {
                changed += 1;
                delta += new_points
                    - if ev.status == "processed" {
                        ev.points
                    } else {
                        0
                    };
            } else {
                println!("{}: changed while rescoring; left to the server", ev.id);
                skipped += 1;
            }
        }
    }
    println!(
        "{checked} events checked, {changed} {}, {skipped} skipped, points {delta:+}",
        if args.dry_run {
            "would change"
        } else {
            "changed"
        }
    );
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let secrets = SecretEnv::from_process();
    let config = rocket_rewards::config::load(&args.config_dir, &secrets, DEFAULT_SOURCE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = config.source(&args.source).with_context(|| {
        format!(
            "no source named {:?} in {}",
            args.source,
            args.config_dir.display()
        )
    })?;
    let scheme = source
        .auth
        .get(args.auth_scheme.saturating_sub(1))
        .with_context(|| {
            format!(
                "source {} has no auth scheme number {}",
                source.name, args.auth_scheme
            )
        })?;
    // The newest value: during a rotation, the last one listed.
    let secret = secrets
        .resolve(&scheme.secret().reference, &args.config_dir)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .values
        .pop()
        .with_context(|| {
            format!(
                "{} is unset: set the source's secret first",
                scheme.secret().origin
            )
        })?;
    let body =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let content_type = args.content_type.clone().unwrap_or_else(|| {
        source
            .content_types
            .first()
            .cloned()
            .unwrap_or_else(|| "application/json".into())
    });
    let url = format!(
        "{}/api/public/hook/{}/event",
        args.url.trim_end_matches('/'),
        source.name
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut attempt = 0u32;
    loop {
        // Signed afresh each time: a timestamped scheme must not go stale.
        let signed = scheme.present(secret.expose(), &body, chrono::Utc::now().timestamp());
        let target = match &signed.query {
            Some(q) => format!("{url}?{q}"),
            None => url.clone(),
        };
        let mut req = client
            .post(&target)
            .header("content-type", &content_type)
            .body(signed.body);
        for (k, v) in signed.headers {
            req = req.header(k, v);
        }
        let backoff = Duration::from_millis(500u64.saturating_mul(1 << attempt.min(6)))
            .min(Duration::from_secs(30));
        let wait = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text = resp.text().await.unwrap_or_default();
                println!("HTTP {}", status.as_u16());
                println!("{text}");
                if status.as_u16() == 429 || status.is_server_error() {
                    // Retry-After wins over our own backoff (capped at 5 minutes).
                    retry_after
                        .map(|s| Duration::from_secs(s.min(300)))
                        .unwrap_or(backoff)
                } else {
                    return Ok(if status.is_success() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    });
                }
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                backoff
            }
        };
        if attempt >= args.max_retries {
            eprintln!("giving up after {} attempts", attempt + 1);
            return Ok(ExitCode::FAILURE);
        }
        attempt += 1;
        eprintln!(
            "retrying in {:.1} s (attempt {} of {})",
            wait.as_secs_f64(),
            attempt + 1,
            args.max_retries + 1
        );
        tokio::time::sleep(wait).await;
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logs(args.log_format);
    let settings = Settings {
        listen: args.listen,
        database_url: args.database_url,
        config_dir: args.config_dir,
        rate_limits: args.rate_limits,
        secrets: SecretEnv::from_process(),
        rate_global: args.rate_limit_global,
        rate_source: args.rate_limit_source,
        rate_ip: args.rate_limit_ip,
        trusted_proxies: args.trusted_proxies,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        conn: ConnLimits {
            max_connections: args.max_connections,
            header_timeout: Duration::from_secs(args.header_timeout.max(1)),
            max_header_bytes: args.max_header_bytes,
        },
        body_timeout: Duration::from_secs(args.body_timeout.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        watch_config: args.watch_config,
        workers: args.workers,
        level_base: args.level_base,
        level_coefficient: args.level_coefficient,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let app = match App::build(settings).await {
            Ok(app) => app,
            Err(StartError::Config(errors)) => {
                eprint!("refusing to start: {errors}");
                return Ok(ExitCode::from(2));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("starting the server")),
        };
        let state = app.state.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let _ = state.reload("sighup");
            }
        });
        app.run(shutdown_signal()).await.context("serving")?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// An error and its causes, `: `-separated, without repeating a cause that
/// the message before it already quotes (our errors' messages name their
/// source, and anyhow's `{:#}` would print it twice).
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
