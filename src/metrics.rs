//! The Prometheus registry and typed metric handles. Names carry the
//! `rocket_` prefix and their unit; label values come only from closed sets
//! (configured source names, canonical types, rule names, fixed reasons),
//! never from a payload, a user or an event id.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub events: IntCounterVec,
    pub points: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub rule_errors: IntCounterVec,
    pub store_errors: IntCounter,
    pub config_loads: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_utilization: GaugeVec,
    pub ip_refusals: IntCounterVec,
    pub sources_loaded: IntGauge,
    /// Read from the store at each scrape.
    pub events_failed: IntGauge,
    pub retention_pruned: IntCounterVec,
    pub queue_oldest_age: prometheus::Gauge,
    /// Read from the store at each scrape.
    pub window_lag: prometheus::Gauge,
}

fn gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    reg.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    reg.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

impl Metrics {
    /// Builds the registry. Names and labels are constants, so a failure
    /// here is a programming error caught by every test run.
    // long: a declaration table, one stanza per metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = counter(
            &registry,
            "rocket_http_requests_total",
            "Hook requests by source and HTTP status code.",
            &["source", "status"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "rocket_http_request_duration_seconds",
                "Hook request latency by source.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["source"],
        )
        .unwrap_or_else(|e| panic!("histogram: {e}"));
        registry
            .register(Box::new(request_duration.clone()))
            .unwrap_or_else(|e| panic!("histogram: {e}"));
        let events = counter(
            &registry,
            "rocket_events_processed_total",
            "Events stored, by source and canonical type (`unmapped`, `other`).",
            &["source", "event_type"],
        );
        let points = counter(
            &registry,
            "rocket_points_awarded_total",
            "Points awarded, by source.",
            &["source"],
        );
        let duplicates = counter(
            &registry,
            "rocket_duplicates_total",
            "Redeliveries of stored events.",
            &["source"],
        );
        let auth_failures = counter(
            &registry,
            "rocket_auth_failures_total",
            "Authentication failures by source and reason.",
            &["source", "reason"],
        );
        let rule_errors = counter(
            &registry,
            "rocket_rule_errors_total",
            "Rule evaluation errors by rule.",
            &["rule"],
        );
        let store_errors = IntCounter::new("rocket_store_errors_total", "Store (database) errors.")
            .unwrap_or_else(|e| panic!("counter: {e}"));
        registry
            .register(Box::new(store_errors.clone()))
            .unwrap_or_else(|e| panic!("counter: {e}"));
        let config_loads = counter(
            &registry,
            "rocket_config_loads_total",
            "Config loads and reloads by outcome.",
            &["kind", "outcome"],
        );
        let rate_limited = counter(
            &registry,
            "rocket_rate_limited_total",
            "Requests refused by a rate limit, by scope.",
            &["scope"],
        );
        let rate_utilization = GaugeVec::new(
            Opts::new(
                "rocket_rate_limit_utilization",
                "Share of the burst in use (0-1) at the last check, by scope.",
            ),
            &["scope"],
        )
        .unwrap_or_else(|e| panic!("gauge: {e}"));
        registry
            .register(Box::new(rate_utilization.clone()))
            .unwrap_or_else(|e| panic!("gauge: {e}"));
        let ip_refusals = counter(
            &registry,
            "rocket_ip_refusals_total",
            "Requests refused by a source's IP allowlist.",
            &["source"],
        );
        let sources_loaded =
            IntGauge::new("rocket_sources_loaded", "Sources in the running config.")
                .unwrap_or_else(|e| panic!("gauge: {e}"));
        registry
            .register(Box::new(sources_loaded.clone()))
            .unwrap_or_else(|e| panic!("gauge: {e}"));
        let retention_pruned = counter(
            &registry,
            "rocket_retention_pruned_total",
            "What retention pruned: raw bodies (what=raw) and zero-point events (what=events).",
            &["what"],
        );
        let events_failed = IntGauge::new(
            "rocket_events_failed",
            "Events stored as failed, waiting for a fix and a replay (read from the store at each scrape).",
        )
        .unwrap_or_else(|e| panic!("gauge: {e}"));
        registry
            .register(Box::new(events_failed.clone()))
            .unwrap_or_else(|e| panic!("gauge: {e}"));
        let queue_oldest_age = gauge(
            &registry,
            "rocket_queue_oldest_age_seconds",
            "Age of the oldest queued event of async sources; 0 when none is queued (read at each scrape).",
        );
        let window_lag = gauge(
            &registry,
            "rocket_leaderboard_window_lag_seconds",
            "How far the seven-day leaderboard window's start is from seven days before now \
             (read at each scrape; +Inf before its first step, or when the store cannot be read). \
             Up to a minute or two is normal; \
             beyond an hour the last-7-days leaderboard aggregates the ledger instead.",
        );
        // Unknown until a scrape reads the store: never "current" by default.
        window_lag.set(f64::INFINITY);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "rocket".to_string(),
            );
            let _ = registry.register(Box::new(pc));
        }
        Metrics {
            registry,
            requests,
            request_duration,
            events,
            points,
            duplicates,
            auth_failures,
            rule_errors,
            store_errors,
            config_loads,
            rate_limited,
            rate_utilization,
            ip_refusals,
            sources_loaded,
            events_failed,
            retention_pruned,
            queue_oldest_age,
            window_lag,
        }
    }

    /// Creates the known series at zero, so that `rate()` and `increase()`
    /// see the first event of each (a counter born at 1 is invisible to them).
    pub fn init_series(&self, config: &crate::config::Config) {
        const STATUSES: [&str; 11] = [
            "200", "400", "401", "403", "404", "408", "413", "415", "429", "500", "503",
        ];
        const REASONS: [&str; 5] = [
            "not_configured",
            "missing_header",
            "malformed",
            "mismatch",
            "stale_timestamp",
        ];
        for name in config.source_names() {
            for status in STATUSES {
                self.requests.with_label_values(&[name, status]);
            }
            for reason in REASONS {
                self.auth_failures.with_label_values(&[name, reason]);
            }
            self.points.with_label_values(&[name]);
            self.duplicates.with_label_values(&[name]);
            self.ip_refusals.with_label_values(&[name]);
        }
        for status in STATUSES {
            self.requests.with_label_values(&["unknown", status]);
        }
        for scope in crate::pipeline::limits::Scope::ALL {
            self.rate_limited.with_label_values(&[scope.label()]);
        }
        for what in ["raw", "events"] {
            self.retention_pruned.with_label_values(&[what]);
        }
        for rule in config.rules.keys() {
            self.rule_errors.with_label_values(&[rule]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
