//! The `rocket-rewards` binary: serve | check | openapi | token.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rocket_rewards::app::{App, StartError};
use rocket_rewards::settings::{
    parse_switch, LogFormat, SecretEnv, Settings, DEFAULT_DATABASE_URL, DEFAULT_LISTEN,
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
        Cmd::Serve(args) => match serve(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(dir: &std::path::Path) -> ExitCode {
    match rocket_rewards::config::load(dir, &SecretEnv::from_process()) {
        Ok(config) => {
            for w in &config.warnings {
                println!("warning: {w}");
            }
            println!(
                "ok: {} sources ({}), {} rules",
                config.sources.len(),
                config.source_names().join(", "),
                config.rules.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::FAILURE
        }
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
