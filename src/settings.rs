//! Server settings: where to listen, which store, which config directory, and
//! the secrets the environment provides. Secrets live in [`Secret`], whose
//! `Debug` prints `[redacted]`, so a settings dump never leaks one.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

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
        Self { vars }
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
