//! The state every request and worker shares: settings, the loaded config
//! (swapped whole on reload), the store, metrics, rate buckets. Free of
//! HTTP: the HTTP layer adds its own helpers in `http::context`.

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::{self, Config, ConfigErrors};
use crate::levels::LevelCurve;
use crate::metrics::Metrics;
use crate::pipeline::limits::ServerLimits;
use crate::settings::Settings;
use crate::store::Store;

/// Shared by every request.
pub struct AppState {
    pub settings: Settings,
    pub config: ArcSwap<Config>,
    pub store: Store,
    pub metrics: Metrics,
    pub levels: LevelCurve,
    /// The all-hooks and per-address buckets (per-source ones live in the config).
    pub limits: ServerLimits,
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
            draining: AtomicBool::new(false),
            queue_ready: tokio::sync::Notify::new(),
        })
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
