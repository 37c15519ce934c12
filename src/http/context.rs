//! What the HTTP layer adds to the shared state: operator tokens, the
//! client's address, rate-limit outcomes and their response headers, and
//! store failures as the opaque 500.

use std::net::IpAddr;

use poem::Request;

use super::error::ApiError;
use super::AdminToken;
use crate::config::Source;
use crate::pipeline::limits::{self, ProxyHeader};
use crate::pipeline::verify::{bearer_token, check_bearer};
use crate::state::AppState;

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

impl From<limits::Standing> for RateHeaders {
    /// A request's standing after it was let through: no `Retry-After`.
    fn from(s: limits::Standing) -> Self {
        RateHeaders {
            limit: s.limit,
            remaining: s.advertised_remaining(),
            reset: s.reset,
            retry_after: None,
        }
    }
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

impl AppState {
    /// Checks the admin token (the loaded config's: it rotates with a
    /// reload); unset means every call is refused. Failures are throttled
    /// per address (see [`Self::operator_login`]).
    pub fn require_admin(&self, req: &Request, auth: &AdminToken) -> Result<(), ApiError> {
        let ok = check_bearer(
            &self.config.load().admin_token.digests,
            auth.0.token.as_bytes(),
        )
        .is_ok();
        self.operator_login(req, ok, "invalid or missing admin token")
    }

    /// Checks for the test token (or, when `admin_too`, the admin token).
    pub fn require_test_or_admin(&self, req: &Request, admin_too: bool) -> Result<(), ApiError> {
        let config = self.config.load();
        let ok = bearer_token(req.headers()).is_ok_and(|token| {
            check_bearer(&config.test_token.digests, token.as_bytes()).is_ok()
                || (admin_too
                    && check_bearer(&config.admin_token.digests, token.as_bytes()).is_ok())
        });
        let refusal = if admin_too {
            "invalid or missing test or admin token"
        } else {
            "invalid or missing test token"
        };
        self.operator_login(req, ok, refusal)
    }

    /// An operator token's check, throttled per client address: an address
    /// whose failed logins used up their bucket (10 a minute, 20 at once) is
    /// answered 429 until it refills, so tokens cannot be guessed at speed.
    fn operator_login(&self, req: &Request, ok: bool, refusal: &str) -> Result<(), ApiError> {
        let ip = self.client_ip(req, None);
        if let Err(r) = self.limits.login_allowed(ip) {
            self.metrics
                .rate_limited
                .with_label_values(&["login"])
                .inc();
            tracing::warn!(client_ip = %ip, reason = "login_failures", "request refused");
            return Err(ApiError::rate_limited("login", r.retry_after));
        }
        if ok {
            return Ok(());
        }
        self.limits.login_failed(ip);
        tracing::warn!(client_ip = %ip, reason = "operator_token", "authentication failed");
        Err(ApiError::unauthorized(refusal))
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

    /// Rate-limit headers for a hook response whose handler answered before
    /// the rate check (unknown source, refused address, wrong method, a dry
    /// run): the client address's standing, read without charging it.
    pub fn address_rate_headers(&self, ip: IpAddr) -> RateHeaders {
        self.limits.peek_ip(ip).into()
    }

    /// A store failure as the client sees it: counted, logged with its
    /// cause, answered 503 with a short reason when the store cannot take
    /// writes for now (the sender retries; nothing was acknowledged), else
    /// as an opaque 500.
    pub fn store_failed(&self, e: &crate::store::StoreError, what: &str) -> ApiError {
        self.metrics.store_errors.inc();
        tracing::error!(error = %e, "{what} failed");
        if e.is_unavailable() {
            ApiError::store_unavailable(e.reason())
        } else {
            ApiError::internal(None)
        }
    }
}
