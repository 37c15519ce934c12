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
    match rocket_rewards::config::load(dir, &SecretEnv::from_process(), DEFAULT_SOURCE) {
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
