//! The `rocket-rewards` binary: parses the command line and runs it (see
//! `rocket_rewards::cli`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    rocket_rewards::cli::run(rocket_rewards::cli::Cli::parse())
}
