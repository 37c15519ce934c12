//! `send`: post a payload file to a source as its LMS would (signed, or
//! its token placed, by one of the source's schemes), retrying a 429, a
//! 5xx or a connection error with exponential backoff that honours
//! `Retry-After`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::pipeline::limits::DEFAULT_SOURCE;
use crate::pipeline::verify::AuthScheme;
use crate::secrets::Secret;
use crate::settings::SecretEnv;

#[derive(clap::Args)]
pub struct SendArgs {
    /// The source to post to.
    #[arg(long)]
    pub source: String,
    /// The payload file, sent byte for byte.
    #[arg(long)]
    pub file: PathBuf,
    /// The server's base URL.
    #[arg(long, env = "ROCKET_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The folder holding sources.d/ and rules/ (to find the source's auth).
    #[arg(long, env = "ROCKET_CONFIG_DIR", default_value = ".")]
    pub config_dir: PathBuf,
    /// Content type; default the source's first.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Which of the source's auth schemes to sign with (1-based).
    #[arg(long, default_value_t = 1)]
    pub auth_scheme: usize,
    /// Retries after a 429, a 5xx or a connection error.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
}

/// One delivery to make.
pub struct Delivery<'a> {
    /// The hook's URL.
    pub url: String,
    pub scheme: &'a AuthScheme,
    pub secret: Secret,
    pub body: Vec<u8>,
    pub content_type: String,
    pub max_retries: u32,
    /// The longest wait between attempts (a `Retry-After` above it is cut).
    pub max_wait: Duration,
}

/// The server's last answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// Attempts made, the first included.
    pub attempts: u32,
}

/// Posts the delivery until it is answered with neither a 429 nor a 5xx,
/// or the retries run out (then the last answer, or the connection error).
/// Each attempt is signed afresh: a timestamped scheme must not go stale.
/// `answered` sees every answer; waits are noted on stderr.
pub async fn deliver(
    d: &Delivery<'_>,
    answered: &mut dyn FnMut(&Answer),
) -> anyhow::Result<Answer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let signed = d
            .scheme
            .present(d.secret.expose(), &d.body, chrono::Utc::now().timestamp());
        let target = match &signed.query {
            Some(q) => format!("{}?{q}", d.url),
            None => d.url.clone(),
        };
        let mut req = client
            .post(&target)
            .header("content-type", &d.content_type)
            .body(signed.body);
        for (k, v) in signed.headers {
            req = req.header(k, v);
        }
        let backoff = Duration::from_millis(500u64.saturating_mul(1 << (attempt - 1).min(6)));
        let (wait, last) = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let answer = Answer {
                    status: status.as_u16(),
                    body: resp.text().await.unwrap_or_default(),
                    attempts: attempt,
                };
                answered(&answer);
                if status.as_u16() != 429 && !status.is_server_error() {
                    return Ok(answer);
                }
                // Retry-After wins over our own backoff.
                let wait = retry_after.map(Duration::from_secs).unwrap_or(backoff);
                (wait, Ok(answer))
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                (backoff, Err(anyhow::Error::new(e)))
            }
        };
        if attempt > d.max_retries {
            eprintln!("giving up after {attempt} attempts");
            return last;
        }
        let wait = wait.min(d.max_wait);
        eprintln!(
            "retrying in {:.1} s (attempt {} of {})",
            wait.as_secs_f64(),
            attempt + 1,
            d.max_retries + 1
        );
        tokio::time::sleep(wait).await;
    }
}

/// The subcommand: finds the source's scheme and its newest secret value
/// (during a rotation, the last listed), delivers the file, prints the
/// answer; exit 0 on a 2xx.
pub async fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let secrets = SecretEnv::from_process();
    let config = crate::config::load(&args.config_dir, &secrets, DEFAULT_SOURCE)
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
    let content_type = source
        .content_type_of(args.content_type.as_deref())
        .to_string();
    let print = &mut |a: &Answer| println!("HTTP {}\n{}", a.status, a.body);
    let answer = deliver(
        &Delivery {
            url: format!(
                "{}/api/public/hook/{}/event",
                args.url.trim_end_matches('/'),
                source.name
            ),
            scheme,
            secret,
            body,
            content_type,
            max_retries: args.max_retries,
            max_wait: Duration::from_secs(300),
        },
        print,
    )
    .await?;
    Ok(if (200..300).contains(&answer.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
