//! `check`: compile the config directory (every error with file, line and
//! key) and run the embedded test cases of its sources and rules.

use std::process::ExitCode;

use crate::config;
use crate::ingest::selftest;
use crate::pipeline::limits::DEFAULT_SOURCE;
use crate::settings::SecretEnv;

/// Prints each warning, each case's outcome and a summary line; exit 0 only
/// when the config compiles and every case passes.
pub fn run(dir: &std::path::Path) -> ExitCode {
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
