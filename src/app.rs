//! Building and running the server. `main` and the tests start it the same
//! way: [`App::build`] then [`App::run`] (or [`spawn`] for tests, which binds
//! port 0 and hands back the address).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use poem::listener::{
    Acceptor, AcceptorExt, Listener, RustlsCertificate, RustlsConfig, TcpListener,
};

use crate::config::{self, ConfigErrors};
use crate::net::GuardedAcceptor;
use crate::settings::Settings;
pub use crate::state::AppState;
use crate::store::Store;

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
        let conn = crate::net::ConnLimits {
            trusted: settings.trusted_proxies.clone(),
            ..settings.conn.clone()
        };
        let bind_err = |e| StartError::Bind(settings.listen.clone(), e);
        let acceptor = match &settings.tls {
            None => {
                GuardedAcceptor::new(tcp.into_acceptor().await.map_err(bind_err)?, conn).boxed()
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
                GuardedAcceptor::new(tls.into_acceptor().await.map_err(bind_err)?, conn).boxed()
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
        tokio::spawn(crate::retention::run(Arc::downgrade(&self.state)));
        tokio::spawn(crate::window::run(Arc::downgrade(&self.state)));
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
