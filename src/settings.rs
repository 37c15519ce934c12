//! Server settings: where to listen, which store, which config directory, and
//! the environment secrets are resolved in (see [`crate::secrets`]).

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::net::ConnLimits;
use crate::pipeline::limits::{RateSpec, DEFAULT_GLOBAL, DEFAULT_IP, DEFAULT_SOURCE};

pub use crate::secrets::{Secret, SecretEnv};

/// How log lines are written under `serve`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// A certificate chain and key (PEM) for HTTPS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything `serve` needs; built from flags and env vars in `main`, and
/// directly by the tests.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address to bind, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    pub listen: String,
    /// `sqlite://path` or `postgres://…`.
    pub database_url: String,
    /// The folder holding `sources.d/` and `rules/`.
    pub config_dir: PathBuf,
    /// Rate limits on (default) or off (load tests).
    pub rate_limits: bool,
    /// Secrets by environment variable name.
    pub secrets: SecretEnv,
    /// All hooks together (default 1000/min, burst 2000).
    pub rate_global: RateSpec,
    /// Each source, unless its file says otherwise (default 500/min, burst 1000).
    pub rate_source: RateSpec,
    /// Each client address (default 100/min, burst 200).
    pub rate_ip: RateSpec,
    /// Peers whose `X-Forwarded-For`/`Forwarded` headers name the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Serve HTTPS with these files (HSTS on every response).
    pub tls: Option<TlsFiles>,
    /// Connection count, header deadline and header size.
    pub conn: ConnLimits,
    /// Time allowed to read a hook's body.
    pub body_timeout: Duration,
    /// A keep-alive connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Reload by itself when a config file changes (polled every second).
    pub watch_config: bool,
    /// Workers processing async sources' queued events (0: none here).
    pub workers: usize,
    /// The level curve: the points of the first step and the factor of each next one.
    pub level_base: f64,
    pub level_coefficient: f64,
    /// How long data is kept where a source's file does not say (default:
    /// forever).
    pub retention: Retention,
}

/// The server's own settings variables: never a source's secret.
pub const SETTING_VARS: &[&str] = &[
    "ROCKET_LISTEN",
    "ROCKET_DATABASE_URL",
    "ROCKET_CONFIG_DIR",
    "ROCKET_RATE_LIMITS",
    "ROCKET_LOG",
    "ROCKET_LOG_FORMAT",
    "ROCKET_RATE_LIMIT_GLOBAL",
    "ROCKET_RATE_LIMIT_SOURCE",
    "ROCKET_RATE_LIMIT_IP",
    "ROCKET_TRUSTED_PROXIES",
    "ROCKET_TLS_CERT",
    "ROCKET_TLS_KEY",
    "ROCKET_MAX_CONNECTIONS",
    "ROCKET_MAX_CONNECTIONS_PER_IP",
    "ROCKET_HEADER_TIMEOUT",
    "ROCKET_MAX_HEADER_BYTES",
    "ROCKET_BODY_TIMEOUT",
    "ROCKET_IDLE_TIMEOUT",
    "ROCKET_WATCH_CONFIG",
    "ROCKET_WORKERS",
    "ROCKET_LEVEL_BASE",
    "ROCKET_LEVEL_COEFFICIENT",
    "ROCKET_RETAIN_RAW_DAYS",
    "ROCKET_RETAIN_ZERO_POINT_EVENTS_DAYS",
    "ROCKET_SECRETS_DIR",
    "ROCKET_SECRETS_ALLOW_SHARED",
    "ROCKET_URL",
];

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/rocket.db";

impl Settings {
    /// Defaults with the given secrets: the embedded SQLite file and the
    /// current directory as config directory.
    pub fn new(secrets: SecretEnv) -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_string(),
            database_url: DEFAULT_DATABASE_URL.to_string(),
            config_dir: PathBuf::from("."),
            rate_limits: true,
            secrets,
            rate_global: DEFAULT_GLOBAL,
            rate_source: DEFAULT_SOURCE,
            rate_ip: DEFAULT_IP,
            trusted_proxies: Vec::new(),
            tls: None,
            conn: ConnLimits::default(),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            watch_config: false,
            workers: 2,
            level_base: 120.0,
            level_coefficient: 1.3,
            retention: Default::default(),
        }
    }
}

/// How long stored data is kept, in days; `None`: forever. Ledger entries
/// and totals are never pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// After this, an event's raw body and request headers are dropped (its
    /// canonical form, points and awards stay).
    pub raw_days: Option<u32>,
    /// After this, processed (or erased) events of zero points with no
    /// ledger entry are deleted whole.
    pub zero_point_events_days: Option<u32>,
}

impl Retention {
    /// This one's days where set, else `fallback`'s.
    pub fn or(self, fallback: Retention) -> Retention {
        Retention {
            raw_days: self.raw_days.or(fallback.raw_days),
            zero_point_events_days: self
                .zero_point_events_days
                .or(fallback.zero_point_events_days),
        }
    }
}

/// Parses `on`/`off` (and the usual boolean spellings) for `ROCKET_RATE_LIMITS`.
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// Parses a CIDR network, or a single address as a one-host network.
pub fn parse_network(s: &str) -> Result<IpNet, String> {
    let p = s.trim();
    p.parse::<IpNet>()
        .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{p:?} is not a CIDR network or address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_parse() {
        assert_eq!(parse_switch("off"), Ok(false));
        assert_eq!(parse_switch("ON"), Ok(true));
        assert!(parse_switch("maybe").is_err());
    }
}
