//! `serve`: the server, with SIGHUP reloading the config and SIGTERM or
//! Ctrl-C draining it. Every setting left out keeps [`Settings::new`]'s
//! default: the binary and the tests start from the same defaults.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;

use crate::app::{App, StartError};
use crate::pipeline::limits::RateSpec;
use crate::settings::{parse_network, parse_switch, LogFormat, SecretEnv, Settings, TlsFiles};

#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "ROCKET_LISTEN")]
    pub listen: Option<String>,
    /// sqlite://PATH (created on first run) or postgres://… (default
    /// sqlite://data/rocket.db).
    #[arg(long, env = "ROCKET_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The folder holding sources.d/ and rules/ (default .).
    #[arg(long, env = "ROCKET_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Rate limits: on (default) or off (load tests).
    #[arg(long, env = "ROCKET_RATE_LIMITS", value_parser = parse_switch)]
    pub rate_limits: Option<bool>,
    /// Log format: json (default) or text.
    #[arg(long, env = "ROCKET_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// All hooks together: PER_MINUTE[:BURST] (default 1000:2000).
    #[arg(long, env = "ROCKET_RATE_LIMIT_GLOBAL", value_parser = RateSpec::parse)]
    pub rate_limit_global: Option<RateSpec>,
    /// Each source, unless its file sets `rate_limit`: PER_MINUTE[:BURST]
    /// (default 500:1000).
    #[arg(long, env = "ROCKET_RATE_LIMIT_SOURCE", value_parser = RateSpec::parse)]
    pub rate_limit_source: Option<RateSpec>,
    /// Each client address: PER_MINUTE[:BURST] (default 100:200).
    #[arg(long, env = "ROCKET_RATE_LIMIT_IP", value_parser = RateSpec::parse)]
    pub rate_limit_ip: Option<RateSpec>,
    /// Proxies (CIDR list) whose X-Forwarded-For/Forwarded headers name the client.
    #[arg(long, env = "ROCKET_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_network)]
    pub trusted_proxies: Vec<IpNet>,
    /// PEM certificate chain: serve HTTPS (with HSTS).
    #[arg(long, env = "ROCKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ROCKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Most open connections; more wait to be accepted (default 10000).
    #[arg(long, env = "ROCKET_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections one client address may hold open (default 256; trusted
    /// proxies are exempt).
    #[arg(long, env = "ROCKET_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds allowed for a new connection's first request, and for a
    /// request's headers once they start (default 10).
    #[arg(long, env = "ROCKET_HEADER_TIMEOUT")]
    pub header_timeout: Option<u64>,
    /// Largest request head in bytes (default 65536).
    #[arg(long, env = "ROCKET_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Seconds allowed to read a hook's body (default 30).
    #[arg(long, env = "ROCKET_BODY_TIMEOUT")]
    pub body_timeout: Option<u64>,
    /// Reload by itself when a config or secret file changes: on or off
    /// (default off).
    #[arg(long, env = "ROCKET_WATCH_CONFIG", value_parser = parse_switch)]
    pub watch_config: Option<bool>,
    /// Workers processing async sources' queued events; 0: none on this
    /// instance (default 2).
    #[arg(long, env = "ROCKET_WORKERS")]
    pub workers: Option<usize>,
    /// Level curve: points of the first level step (default 120, Level Up XP's).
    #[arg(long, env = "ROCKET_LEVEL_BASE")]
    pub level_base: Option<f64>,
    /// Level curve: each step is the previous one times this (default 1.3).
    #[arg(long, env = "ROCKET_LEVEL_COEFFICIENT")]
    pub level_coefficient: Option<f64>,
    /// Seconds an idle keep-alive connection stays open (default 120).
    #[arg(long, env = "ROCKET_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,
    /// Days after which events' raw bodies and request headers are dropped,
    /// where a source's `retention` does not say (default: kept forever).
    #[arg(long, env = "ROCKET_RETAIN_RAW_DAYS")]
    pub retain_raw_days: Option<u32>,
    /// Days after which processed events of zero points (no ledger entry)
    /// are deleted, where a source's `retention` does not say (default:
    /// kept forever).
    #[arg(long, env = "ROCKET_RETAIN_ZERO_POINT_EVENTS_DAYS")]
    pub retain_zero_point_events_days: Option<u32>,
}

impl ServeArgs {
    /// [`Settings::new`] with what was given on the command line or in the
    /// environment.
    pub fn settings(self, secrets: SecretEnv) -> Settings {
        let mut s = Settings::new(secrets);
        let secs = |v: u64| Duration::from_secs(v.max(1));
        if let Some(v) = self.listen {
            s.listen = v;
        }
        if let Some(v) = self.database_url {
            s.database_url = v;
        }
        if let Some(v) = self.config_dir {
            s.config_dir = v;
        }
        if let Some(v) = self.rate_limits {
            s.rate_limits = v;
        }
        s.rate_global = self.rate_limit_global.unwrap_or(s.rate_global);
        s.rate_source = self.rate_limit_source.unwrap_or(s.rate_source);
        s.rate_ip = self.rate_limit_ip.unwrap_or(s.rate_ip);
        s.trusted_proxies = self.trusted_proxies;
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            s.tls = Some(TlsFiles { cert, key });
        }
        s.conn.max_connections = self.max_connections.unwrap_or(s.conn.max_connections);
        s.conn.max_connections_per_ip = self
            .max_connections_per_ip
            .unwrap_or(s.conn.max_connections_per_ip);
        s.conn.header_timeout = self
            .header_timeout
            .map(secs)
            .unwrap_or(s.conn.header_timeout);
        s.conn.max_header_bytes = self.max_header_bytes.unwrap_or(s.conn.max_header_bytes);
        s.body_timeout = self.body_timeout.map(secs).unwrap_or(s.body_timeout);
        s.idle_timeout = self.idle_timeout.map(secs).unwrap_or(s.idle_timeout);
        s.watch_config = self.watch_config.unwrap_or(s.watch_config);
        s.workers = self.workers.unwrap_or(s.workers);
        s.level_base = self.level_base.unwrap_or(s.level_base);
        s.level_coefficient = self.level_coefficient.unwrap_or(s.level_coefficient);
        s.retention.raw_days = self.retain_raw_days.or(s.retention.raw_days);
        s.retention.zero_point_events_days = self
            .retain_zero_point_events_days
            .or(s.retention.zero_point_events_days);
        s
    }
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

/// Runs the server until SIGTERM or Ctrl-C; exit code 2 for a config it
/// refuses to start on.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logs(args.log_format);
    let settings = args.settings(SecretEnv::from_process());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults `--help` states are `Settings::new`'s.
    #[test]
    fn the_defaults_in_help_are_the_shared_ones() {
        use clap::CommandFactory;
        let s = Settings::new(SecretEnv::default());
        let rate = |r: RateSpec| format!("{}:{}", r.per_minute, r.burst);
        let stated = [
            ("listen", s.listen.clone()),
            ("database_url", s.database_url.clone()),
            ("config_dir", s.config_dir.display().to_string()),
            ("rate_limit_global", rate(s.rate_global)),
            ("rate_limit_source", rate(s.rate_source)),
            ("rate_limit_ip", rate(s.rate_ip)),
            ("max_connections", s.conn.max_connections.to_string()),
            (
                "max_connections_per_ip",
                s.conn.max_connections_per_ip.to_string(),
            ),
            (
                "header_timeout",
                s.conn.header_timeout.as_secs().to_string(),
            ),
            ("max_header_bytes", s.conn.max_header_bytes.to_string()),
            ("body_timeout", s.body_timeout.as_secs().to_string()),
            ("idle_timeout", s.idle_timeout.as_secs().to_string()),
            ("workers", s.workers.to_string()),
            ("level_base", s.level_base.to_string()),
            ("level_coefficient", s.level_coefficient.to_string()),
            (
                "watch_config",
                if s.watch_config { "on" } else { "off" }.into(),
            ),
        ];
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ServeArgs,
        }
        let cmd = Wrapper::command();
        for (id, value) in stated {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                help.contains(&format!("default {value}")),
                "--{id}: {help:?} does not state the default {value}"
            );
        }
    }

    #[test]
    fn left_out_settings_keep_the_shared_defaults() {
        let defaults = Settings::new(SecretEnv::default());
        let got = ServeArgs::default().settings(SecretEnv::default());
        assert_eq!(format!("{got:?}"), format!("{defaults:?}"));
        let args = ServeArgs {
            listen: Some("0.0.0.0:9".into()),
            workers: Some(0),
            ..ServeArgs::default()
        };
        let s = args.settings(SecretEnv::default());
        assert_eq!((s.listen.as_str(), s.workers), ("0.0.0.0:9", 0));
        assert_eq!(s.rate_global, defaults.rate_global);
    }
}
