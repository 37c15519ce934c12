//! Building and running the server. `main` and the tests start it the same
//! way: [`App::build`] then [`App::run`] (or [`spawn`] for tests, which binds
//! port 0 and hands back the address).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use poem::http::HeaderMap;
use poem::listener::{
    Acceptor, AcceptorExt, Listener, RustlsCertificate, RustlsConfig, TcpListener,
};
use poem::Request;

use crate::config::{self, Config, ConfigErrors, Source};
use crate::http::error::ApiError;
use crate::http::AdminToken;
use crate::levels::LevelCurve;
use crate::metrics::Metrics;
use crate::net::GuardedAcceptor;
use crate::pipeline::limits::{self, ProxyHeader, Refusal, ServerLimits, Standing};
use crate::pipeline::verify::{bearer_token, check_bearer};
use crate::settings::Settings;
use crate::store::Store;

const DEFAULT_PROXY_HEADERS: [ProxyHeader; 2] =
    [ProxyHeader::XForwardedFor, ProxyHeader::Forwarded];

/// The rate-limit standing of a hook request, for its response headers.
#[derive(Clone, Copy, Debug)]
pub struct RateHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
    pub retry_after: Option<u64>,
}

/// Filled by the hook handler, read by the middleware that writes the
/// `X-RateLimit-*` and `Retry-After` headers. The last record wins (an
/// event-type refusal after the request-level standing).
#[derive(Default, Debug)]
pub struct RateSlot(std::sync::Mutex<Option<RateHeaders>>);

impl RateSlot {
    pub fn record(&self, h: RateHeaders) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(h);
        }
    }
    pub fn get(&self) -> Option<RateHeaders> {
        self.0.lock().ok().and_then(|g| *g)
    }
}

/// Shared by every request.
pub struct AppState {
    pub settings: Settings,
    pub config: ArcSwap<Config>,
    pub store: Store,
    pub metrics: Metrics,
    pub levels: LevelCurve,
    /// The all-hooks and per-address buckets (per-source ones live in the config).
    pub limits: ServerLimits,
    /// Config loaded and store connected.
    pub ready: AtomicBool,
    /// Shutting down: readiness answers 503.
    pub draining: AtomicBool,
    /// Wakes the async workers when an event is queued.
    pub queue_ready: tokio::sync::Notify,
}

impl AppState {
    pub fn new(settings: Settings, config: Config, store: Store) -> Arc<AppState> {
        let levels = LevelCurve::new(settings.level_base, settings.level_coefficient);
        let metrics = Metrics::new();
        for collector in store.collectors() {
            metrics
                .registry
                .register(collector)
                .unwrap_or_else(|e| panic!("store metric: {e}"));
        }
        metrics.sources_loaded.set(config.sources.len() as i64);
        metrics.init_series(&config);
        metrics
            .config_loads
            .with_label_values(&["startup", "success"])
            .inc();
        Arc::new(AppState {
            limits: ServerLimits::new(settings.rate_global, settings.rate_ip),
            settings,
            config: ArcSwap::from_pointee(config),
            store,
            metrics,
            levels,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            queue_ready: tokio::sync::Notify::new(),
        })
    }

    /// Checks the admin token (the loaded config's: it rotates with a
    /// reload); unset means every call is refused.
    pub fn require_admin(&self, auth: &AdminToken) -> Result<(), ApiError> {
        check_bearer(
            &self.config.load().admin_token.digests,
            auth.0.token.as_bytes(),
        )
        .map_err(|_| ApiError::unauthorized("invalid or missing admin token"))
    }

    /// Checks for the test token (or, when `admin_too`, the admin token).
    pub fn require_test_or_admin(
        &self,
        headers: &HeaderMap,
        admin_too: bool,
    ) -> Result<(), ApiError> {
        let token = bearer_token(headers)
            .map_err(|_| ApiError::unauthorized("a bearer token is required"))?;
        let config = self.config.load();
        let ok = check_bearer(&config.test_token.digests, token.as_bytes()).is_ok()
            || (admin_too && check_bearer(&config.admin_token.digests, token.as_bytes()).is_ok());
        if ok {
            Ok(())
        } else {
            Err(ApiError::unauthorized(if admin_too {
                "invalid test or admin token"
            } else {
                "invalid test token"
            }))
        }
    }

    /// Rebuilds the config from disk; on any error the running one is kept.
    pub fn reload(&self, kind: &str) -> Result<Arc<Config>, ConfigErrors> {
        match config::load(
            &self.settings.config_dir,
            &self.settings.secrets,
            self.settings.rate_source,
        ) {
            Ok(c) => {
                let c = Arc::new(c);
                for w in &c.warnings {
                    tracing::warn!(kind, "{w}");
                }
                self.config.store(c.clone());
                self.metrics.sources_loaded.set(c.sources.len() as i64);
                self.metrics.init_series(&c);
                self.metrics
                    .config_loads
                    .with_label_values(&[kind, "success"])
                    .inc();
                tracing::info!(
                    kind,
                    sources = c.sources.len(),
                    rules = c.rules.len(),
                    "config reloaded"
                );
                Ok(c)
            }
            Err(e) => {
                self.metrics
                    .config_loads
                    .with_label_values(&[kind, "failure"])
                    .inc();
                tracing::error!(
                    kind,
                    errors = e.0.len(),
                    "config reload refused; keeping the running config"
                );
                for err in &e.0 {
                    tracing::error!(kind, "{err}");
                }
                Err(e)
            }
        }
    }

    /// The client's address for a request to `source`: the peer, or what a
    /// trusted proxy's header says.
    pub fn client_ip(&self, req: &Request, source: Option<&Source>) -> IpAddr {
        let peer = match req.remote_addr().as_socket_addr() {
            Some(a) => a.ip(),
            None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        };
        let headers = source
            .map(|s| s.proxy_headers.as_slice())
            .unwrap_or(&DEFAULT_PROXY_HEADERS);
        limits::client_ip(peer, req.headers(), &self.settings.trusted_proxies, headers)
    }

    /// Records a rate-limit check: headers for the response, metrics, and
    /// for a refusal the audit line and the 429.
    pub fn rate_outcome(
        &self,
        req: &Request,
        source: &str,
        ip: IpAddr,
        checked: Result<Option<Standing>, Refusal>,
    ) -> Result<(), ApiError> {
        let slot = req.extensions().get::<Arc<RateSlot>>();
        match checked {
            Ok(Some(s)) => {
                self.metrics
                    .rate_utilization
                    .with_label_values(&[s.scope.label()])
                    .set(s.utilization());
                if let Some(slot) = slot {
                    slot.record(RateHeaders {
                        limit: s.limit,
                        remaining: s.advertised_remaining(),
                        reset: s.reset,
                        retry_after: None,
                    });
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(r) => {
                let scope = r.scope.label();
                self.metrics.rate_limited.with_label_values(&[scope]).inc();
                self.metrics
                    .rate_utilization
                    .with_label_values(&[scope])
                    .set(1.0);
                tracing::warn!(source, client_ip = %ip, reason = "rate_limited", scope, "request refused");
                if let Some(slot) = slot {
                    slot.record(RateHeaders {
                        limit: r.limit,
                        remaining: 0,
                        reset: r.reset,
                        retry_after: Some(r.retry_after),
                    });
                }
                Err(ApiError::rate_limited(scope, r.retry_after))
            }
        }
    }

    /// Rate-limit headers for a hook response whose handler answered before
    /// the rate check (unknown source, refused address, wrong method, a dry
    /// run): the client address's standing, read without charging it.
    pub fn address_rate_headers(&self, ip: IpAddr) -> RateHeaders {
        let s = self.limits.peek_ip(ip);
        RateHeaders {
            limit: s.limit,
            remaining: s.advertised_remaining(),
            reset: s.reset,
            retry_after: None,
        }
    }

    /// A store failure as the client sees it: counted, logged with its
    /// cause, answered as an opaque 500.
    pub fn store_failed(&self, e: &crate::store::StoreError, what: &str) -> ApiError {
        self.metrics.store_errors.inc();
        tracing::error!(error = %e, "{what} failed");
        ApiError::internal(None)
    }

    /// Metrics and the one log line of a hook request.
    pub fn observe(
        &self,
        source: &str,
        ip: IpAddr,
        started: Instant,
        status: u16,
        outcome: &str,
        event_id: Option<&str>,
    ) {
        let elapsed = started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[source, &status.to_string()])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[source])
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            source,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            event_id,
            client_ip = %ip,
            outcome,
            "hook"
        );
    }
}

/// A built server: state plus the bound listener's address.
pub struct App {
    pub state: Arc<AppState>,
    acceptor: poem::listener::BoxAcceptor,
    pub addr: SocketAddr,
    /// The config files' fingerprint taken before they were loaded.
    fingerprint: u64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

impl App {
    /// Loads the config (refusing on any error), connects the store, binds.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let config = config::load(
            &settings.config_dir,
            &settings.secrets,
            settings.rate_source,
        )?;
        let fingerprint = config::fingerprint(&settings.config_dir, &config.secret_files);
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let store = Store::connect(&settings.database_url).await?;
        let tcp = TcpListener::bind(settings.listen.clone());
        let bind_err = |e| StartError::Bind(settings.listen.clone(), e);
        let acceptor = match &settings.tls {
            None => {
                GuardedAcceptor::new(tcp.into_acceptor().await.map_err(bind_err)?, settings.conn)
                    .boxed()
            }
            Some(files) => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p)
                        .map_err(|e| StartError::Tls(format!("cannot read {}: {e}", p.display())))
                };
                let cert = RustlsCertificate::new()
                    .cert(read(&files.cert)?)
                    .key(read(&files.key)?);
                let tls = tcp.rustls(RustlsConfig::new().fallback(cert));
                GuardedAcceptor::new(tls.into_acceptor().await.map_err(bind_err)?, settings.conn)
                    .boxed()
            }
        };
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or_else(|| {
                StartError::Bind(
                    settings.listen.clone(),
                    std::io::Error::other("no local address"),
                )
            })?;
        tracing::info!(
            %addr,
            store = store.backend(),
            sources = config.sources.len(),
            rules = config.rules.len(),
            "listening"
        );
        let state = AppState::new(settings, config, store);
        state.ready.store(true, Ordering::Relaxed);
        Ok(App {
            state,
            acceptor: acceptor.boxed(),
            addr,
            fingerprint,
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets requests
    /// in flight finish (up to 30 s) and returns.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        for _ in 0..self.state.settings.workers {
            tokio::spawn(crate::worker::run(Arc::downgrade(&self.state)));
        }
        if self.state.settings.watch_config {
            tokio::spawn(watch_config(Arc::downgrade(&self.state), self.fingerprint));
        }
        let state = self.state.clone();
        let endpoint = crate::http::endpoint(self.state.clone());
        let signal = async move {
            shutdown.await;
            state.draining.store(true, Ordering::Relaxed);
            tracing::info!("draining");
        };
        let result = poem::Server::new_with_acceptor(self.acceptor)
            .idle_timeout(self.state.settings.idle_timeout)
            .run_with_graceful_shutdown(endpoint, signal, Some(Duration::from_secs(30)))
            .await;
        self.state.store.close().await;
        result
    }
}

/// Polls the fingerprint of the config directory and of the secret files
/// the running config read, and reloads when it changes (a broken edit is
/// refused like any reload). Stops with the server.
async fn watch_config(state: std::sync::Weak<AppState>, mut last: u64) {
    let dir = match state.upgrade() {
        Some(s) => s.settings.config_dir.clone(),
        None => return,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        if state.draining.load(Ordering::Relaxed) {
            return;
        }
        let now = config::fingerprint(&dir, &state.config.load().secret_files);
        if now != last {
            last = now;
            let _ = state.reload("watch");
        }
    }
}

/// A server running in this process, for tests and tools.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful stop; waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Builds and starts a server in the background.
pub async fn spawn(settings: Settings) -> Result<Running, StartError> {
    let app = App::build(settings).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let addr = app.addr;
    let state = app.state.clone();
    let task = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        state,
        stop: Some(tx),
        task,
    })
}
