//! Server settings: where to listen, which store, which config directory, and
//! the secrets the environment provides. Secrets live in [`Secret`], whose
//! `Debug` prints `[redacted]`, so a settings dump never leaks one.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::net::ConnLimits;
use crate::pipeline::limits::{RateSpec, DEFAULT_GLOBAL, DEFAULT_IP, DEFAULT_SOURCE};

/// A secret value from the environment. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret's bytes, for keying a MAC or comparing a token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The environment variables that may hold secrets, read once at startup.
///
/// Config loading resolves `secret_env:` names through this map rather than
/// the live process environment, so that tests can run several servers with
/// different secrets in one process, and a reload sees the same values.
#[derive(Clone, Default)]
pub struct SecretEnv {
    vars: HashMap<String, String>,
    /// A value for every name not set (used by `check` to run test cases).
    fallback: Option<String>,
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("SecretEnv").field("names", &names).finish()
    }
}

impl SecretEnv {
    /// Every `ROCKET_*` variable of the process environment.
    pub fn from_process() -> Self {
        let vars = std::env::vars()
            .filter(|(k, _)| k.starts_with("ROCKET_"))
            .collect();
        Self {
            vars,
            fallback: None,
        }
    }

    /// Every name resolves to `value`: the test secret of `check`.
    pub fn everything(value: &str) -> Self {
        Self {
            vars: HashMap::new(),
            fallback: Some(value.to_string()),
        }
    }

    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            fallback: None,
        }
    }

    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(name.into(), value.into());
    }

    /// The comma-separated list held by `name`; empty when unset or blank.
    /// Several values let a token rotate without downtime.
    pub fn list(&self, name: &str) -> Vec<Secret> {
        self.vars
            .get(name)
            .or(self.fallback.as_ref())
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every secret value held, for scrubbing logs in tests.
    pub fn all_values(&self) -> Vec<Secret> {
        self.vars.keys().flat_map(|k| self.list(k)).collect()
    }
}

/// How log lines are written under `serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
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
    /// All hooks together (seed: 1000/min, burst 2000).
    pub rate_global: RateSpec,
    /// Each source, unless its file says otherwise (seed: 500/min, burst 1000).
    pub rate_source: RateSpec,
    /// Each client address (seed: 100/min, burst 200).
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
}

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
        }
    }

    pub fn admin_tokens(&self) -> Vec<Secret> {
        self.secrets.list("ROCKET_ADMIN_TOKEN")
    }

    pub fn test_tokens(&self) -> Vec<Secret> {
        self.secrets.list("ROCKET_TEST_TOKEN")
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
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let env = SecretEnv::from_pairs([("ROCKET_X", "hunter2")]);
        assert!(!format!("{env:?}").contains("hunter2"));
    }

    #[test]
    fn a_secret_list_is_comma_separated_and_trimmed() {
        let env = SecretEnv::from_pairs([("A", " one, two ,,"), ("B", "")]);
        let got: Vec<_> = env
            .list("A")
            .iter()
            .map(|s| s.expose().to_string())
            .collect();
        assert_eq!(got, ["one", "two"]);
        assert!(env.list("B").is_empty());
        assert!(env.list("C").is_empty());
    }

    #[test]
    fn switches_parse() {
        assert_eq!(parse_switch("off"), Ok(false));
        assert_eq!(parse_switch("ON"), Ok(true));
        assert!(parse_switch("maybe").is_err());
    }
}
