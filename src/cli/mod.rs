//! The `rocket-rewards` binary's subcommands, one file each; `main` parses
//! [`Cli`] and hands it to [`run`].

pub mod backup;
pub mod check;
pub mod erase;
pub mod rescore;
pub mod send;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rocket-rewards",
    version,
    about = "LMS webhooks in, learning rewards out."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the server.
    Serve(Box<serve::ServeArgs>),
    /// Load and compile the config directory, run its test cases; exit
    /// non-zero on any error or failure.
    Check {
        /// The folder holding sources.d/ and rules/.
        #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
        config_dir: PathBuf,
    },
    /// Print the OpenAPI spec.
    /// Print the OpenAPI document for a config directory: every operation,
    /// and one per source (what `/openapi.json` serves for that config).
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
        /// The folder holding sources.d/ and rules/.
        #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
        config_dir: PathBuf,
    },
    /// Print a new random secret: 32 bytes as hex.
    Token,
    /// Replay stored events through the current rules and rewrite the ledger
    /// and totals where the points changed; safe while the server serves.
    Rescore(rescore::RescoreArgs),
    /// Sign a payload file with a source's scheme (its secret as the server
    /// reads it) and post it, retrying with exponential backoff that
    /// honours Retry-After.
    Send(send::SendArgs),
    /// Erase a learner: their events, raw bodies, ledger entries and total,
    /// in one transaction (safe while the server serves).
    Erase(erase::EraseArgs),
    /// Write a consistent copy of the SQLite store to a new file while the
    /// server serves (PostgreSQL: use pg_dump).
    Backup(backup::BackupArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.cmd {
        Cmd::Token => {
            println!("{}", new_token());
            ExitCode::SUCCESS
        }
        Cmd::Openapi { yaml, config_dir } => match openapi_config(&config_dir) {
            Ok(config) => {
                let doc = if yaml {
                    crate::http::spec::yaml(&config)
                } else {
                    crate::http::spec::json(&config)
                };
                println!("{doc}");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check { config_dir } => check::run(&config_dir),
        Cmd::Rescore(args) => report(on_runtime(rescore::run(args))),
        Cmd::Send(args) => report(on_runtime(send::run(args))),
        Cmd::Erase(args) => report(on_runtime(erase::run(args))),
        Cmd::Backup(args) => report(on_runtime(backup::run(args))),
        Cmd::Serve(args) => report(serve::run(*args)),
    }
}

/// The config an OpenAPI document is generated from: no secret values are
/// read (the document names where secrets come from, never what they are),
/// so it is the same on every machine.
pub fn openapi_config(
    dir: &std::path::Path,
) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    crate::config::load(
        dir,
        &crate::settings::SecretEnv::default().lenient(),
        crate::pipeline::limits::DEFAULT_SOURCE,
    )
}

/// 32 random bytes as hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn on_runtime<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(f)
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", causes(&e));
        ExitCode::FAILURE
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variable a subcommand reads is a server setting, never
    /// acceptable as a source's secret (`settings::SETTING_VARS`).
    #[test]
    fn every_variable_the_binary_reads_is_a_listed_setting() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut seen = 0;
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if let Some(var) = arg.get_env() {
                    let var = var.to_string_lossy();
                    assert!(
                        crate::settings::SETTING_VARS.contains(&var.as_ref()),
                        "{var} is missing from SETTING_VARS"
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen > 20, "{seen}");
    }

    /// `rocket-rewards token`: 32 random bytes as 64 hex digits, a new value
    /// at every call.
    #[test]
    fn a_token_is_64_hex_digits_and_new_each_time() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64, "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
    }
}
