//! Rate limits, IP allowlists and the client's address.
//!
//! Limits are GCRA buckets from `governor`, checked before the body is read
//! (all hooks, per source, per client IP) and, where a source says so, per
//! canonical event type after mapping. Per-IP buckets live in a bounded
//! `moka` cache with a time-to-idle, so a flood from a million addresses
//! costs a bounded amount of memory (an evicted address starts afresh, and
//! the global and per-source buckets still hold).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use poem::http::HeaderMap;
use serde::Deserialize;

/// A rate: sustained requests per minute and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    pub per_minute: u32,
    pub burst: u32,
}

impl RateSpec {
    pub const fn new(per_minute: u32, burst: u32) -> Self {
        Self { per_minute, burst }
    }

    /// Parses `PER_MINUTE` or `PER_MINUTE:BURST` (burst defaults to the rate).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (rate, burst) = match s.trim().split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s.trim(), None),
        };
        let per_minute: u32 = rate
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected PER_MINUTE[:BURST]"))?;
        let burst: u32 = match burst {
            Some(b) => b
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: expected PER_MINUTE[:BURST]"))?,
            None => per_minute,
        };
        let spec = Self { per_minute, burst };
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.per_minute == 0 || self.burst == 0 {
            return Err("per_minute and burst must be at least 1".into());
        }
        if self.per_minute > 60_000_000 {
            return Err("per_minute may be at most 60000000".into());
        }
        Ok(())
    }

    fn quota(&self) -> Quota {
        let rate = NonZeroU32::new(self.per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::per_minute(rate).allow_burst(burst)
    }
}

/// The default rates: all hooks, each source, each client address.
pub const DEFAULT_GLOBAL: RateSpec = RateSpec::new(1000, 2000);
pub const DEFAULT_SOURCE: RateSpec = RateSpec::new(500, 1000);
pub const DEFAULT_IP: RateSpec = RateSpec::new(100, 200);

/// Which bucket decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Source,
    Ip,
    EventType,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Global, Scope::Source, Scope::Ip, Scope::EventType];
    pub fn label(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Source => "source",
            Scope::Ip => "ip",
            Scope::EventType => "event_type",
        }
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One GCRA bucket.
#[derive(Debug)]
pub struct Bucket {
    limiter: Limiter,
    spec: RateSpec,
    /// Address buckets only: cells left after the last check, and when,
    /// which [`Bucket::peek`] refills from (governor cannot be read without
    /// taking a cell). `None` inside while never checked.
    last: Option<std::sync::Mutex<Option<(u32, std::time::Instant)>>>,
}

/// A bucket's state after a request passed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    pub scope: Scope,
    /// The sustained limit per minute.
    pub limit: u32,
    pub remaining: u32,
    pub burst: u32,
    /// Unix seconds when the bucket is full again.
    pub reset: u64,
}

impl Standing {
    /// `X-RateLimit-Remaining`: what is left of the sustained per-minute
    /// limit (`X-RateLimit-Limit`), never more than it. The burst above the
    /// limit is headroom, not advertised: a client that paces itself by the
    /// headers keeps to the sustained rate.
    pub fn advertised_remaining(&self) -> u32 {
        self.remaining
            .saturating_sub(self.burst.saturating_sub(self.limit))
            .min(self.limit)
    }

    /// How much of the burst is in use, 0 to 1.
    pub fn utilization(&self) -> f64 {
        1.0 - f64::from(self.remaining) / f64::from(self.burst.max(1))
    }
}

/// A request refused by a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub limit: u32,
    pub burst: u32,
    /// Whole seconds until a request may pass (at least 1).
    pub retry_after: u64,
    pub reset: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl RateSpec {
    /// A bucket of this spec holding `remaining` cells.
    fn standing(self, scope: Scope, remaining: u32) -> Standing {
        let missing = self.burst.saturating_sub(remaining);
        Standing {
            scope,
            limit: self.per_minute,
            remaining,
            burst: self.burst,
            reset: unix_now() + ceil_secs(self.quota().replenish_interval() * missing),
        }
    }
}

/// The clock every bucket reads. A `DefaultClock` (quanta's) calibrates
/// the TSC when it is made, with CPUID, a trap under a hypervisor: about
/// 40 µs on this project's 2-core VM, paid by every new client address's
/// bucket and every refusal when each made its own. Made once, clones share
/// the calibration (a bucket then takes 0.4 µs to make).
fn shared_clock() -> DefaultClock {
    static CLOCK: std::sync::OnceLock<DefaultClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default).clone()
}

impl Bucket {
    pub fn new(spec: RateSpec) -> Self {
        Self {
            limiter: RateLimiter::direct_with_clock(spec.quota(), shared_clock())
                .with_middleware::<StateInformationMiddleware>(),
            spec,
            last: None,
        }
    }

    /// A bucket that [`Bucket::peek`] can read: it notes each check.
    fn peekable(spec: RateSpec) -> Self {
        Self {
            last: Some(std::sync::Mutex::new(None)),
            ..Self::new(spec)
        }
    }

    fn remember(&self, remaining: u32) {
        if let Some(Ok(mut last)) = self.last.as_ref().map(|l| l.lock()) {
            *last = Some((remaining, std::time::Instant::now()));
        }
    }

    /// The bucket's standing without taking a cell: the last check's
    /// remaining cells plus what has refilled since (full if never checked,
    /// or if the bucket is not [`Bucket::peekable`]).
    fn peek(&self, scope: Scope) -> Standing {
        let burst = self.spec.burst;
        let last = self
            .last
            .as_ref()
            .and_then(|l| l.lock().ok().and_then(|l| *l));
        let remaining = match last {
            None => burst,
            Some((left, at)) => {
                let per_cell = self.spec.quota().replenish_interval();
                let refilled = at.elapsed().as_nanos() / per_cell.as_nanos().max(1);
                u32::try_from(u128::from(left) + refilled)
                    .unwrap_or(burst)
                    .min(burst)
            }
        };
        self.spec.standing(scope, remaining)
    }

    pub fn spec(&self) -> RateSpec {
        self.spec
    }

    /// Takes one request's cell, or says when to come back.
    pub fn check(&self, scope: Scope) -> Result<Standing, Refusal> {
        self.check_n(scope, 1)
    }

    /// Takes `n` cells at once (a batch of `n` statements), or says when to
    /// come back; more than the burst can never pass, and says so with the
    /// time a full bucket takes.
    pub fn check_n(&self, scope: Scope, n: u32) -> Result<Standing, Refusal> {
        let per_cell = self.spec.quota().replenish_interval();
        let refuse = |retry_after: u64| Refusal {
            scope,
            limit: self.spec.per_minute,
            burst: self.spec.burst,
            retry_after: retry_after.max(1),
            reset: unix_now() + ceil_secs(per_cell * self.spec.burst),
        };
        let Some(cells) = std::num::NonZeroU32::new(n) else {
            return Ok(self.peek(scope));
        };
        match self.limiter.check_n(cells) {
            Ok(Ok(snap)) => {
                let remaining = snap.remaining_burst_capacity();
                self.remember(remaining);
                Ok(self.spec.standing(scope, remaining))
            }
            Ok(Err(not_until)) => {
                self.remember(0);
                // The limiter's own clock (see `shared_clock`).
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Err(refuse(ceil_secs(wait)))
            }
            Err(_) => Err(refuse(ceil_secs(per_cell * self.spec.burst))),
        }
    }
}

/// Most client addresses whose buckets are kept at once.
pub const MAX_TRACKED_IPS: u64 = 100_000;

/// The server's buckets: all hooks, one per client address, one per source
/// and one per (source, event type). Source buckets are keyed by name and
/// outlive the config: a reload keeps their state, and only a changed rate
/// starts a bucket afresh.
pub struct ServerLimits {
    pub global: Bucket,
    ip_spec: RateSpec,
    ips: moka::sync::Cache<IpAddr, Arc<Bucket>>,
    keyed: std::sync::RwLock<std::collections::HashMap<(String, String), Arc<Bucket>>>,
    /// Failed operator logins (admin and test tokens) per address.
    login_failures: moka::sync::Cache<IpAddr, Arc<Bucket>>,
}

/// Failed admin or test logins an address may make: 10 a minute, 20 at once.
pub const LOGIN_FAILURES: RateSpec = RateSpec {
    per_minute: 10,
    burst: 20,
};

impl ServerLimits {
    pub fn new(global: RateSpec, per_ip: RateSpec) -> Self {
        // An idle address's bucket is full again after burst/rate minutes;
        // forgetting it then loses nothing.
        let refill = Duration::from_secs_f64(
            60.0 * f64::from(per_ip.burst) / f64::from(per_ip.per_minute.max(1)),
        );
        Self {
            global: Bucket::new(global),
            ip_spec: per_ip,
            ips: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED_IPS)
                .time_to_idle(refill.max(Duration::from_secs(1)))
                .build(),
            keyed: Default::default(),
            login_failures: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED_IPS)
                .time_to_idle(Duration::from_secs(120))
                .build(),
        }
    }

    /// Whether an address may try an operator token now: `Err` once its
    /// failures have used up [`LOGIN_FAILURES`], until they refill.
    pub fn login_allowed(&self, ip: IpAddr) -> Result<(), Refusal> {
        match self.login_failures.get(&ip) {
            Some(b) if b.peek(Scope::Ip).remaining == 0 => Err(Refusal {
                scope: Scope::Ip,
                limit: LOGIN_FAILURES.per_minute,
                burst: LOGIN_FAILURES.burst,
                retry_after: ceil_secs(LOGIN_FAILURES.quota().replenish_interval()).max(1),
                reset: unix_now() + ceil_secs(LOGIN_FAILURES.quota().replenish_interval()),
            }),
            _ => Ok(()),
        }
    }

    /// Counts a failed operator login of an address.
    pub fn login_failed(&self, ip: IpAddr) {
        let bucket = self
            .login_failures
            .get_with(ip, || Arc::new(Bucket::peekable(LOGIN_FAILURES)));
        let _ = bucket.check(Scope::Ip);
    }

    /// The bucket of a source (`event_type` empty) or of one of its event
    /// types, at `spec`: the one it had, unless its rate changed.
    pub fn source_bucket(&self, source: &str, event_type: &str, spec: RateSpec) -> Arc<Bucket> {
        let key = (source.to_string(), event_type.to_string());
        if let Ok(map) = self.keyed.read() {
            if let Some(b) = map.get(&key).filter(|b| b.spec() == spec) {
                return b.clone();
            }
        }
        let mut map = self.keyed.write().unwrap_or_else(|e| e.into_inner());
        map.entry(key)
            .and_modify(|b| {
                if b.spec() != spec {
                    *b = Arc::new(Bucket::new(spec));
                }
            })
            .or_insert_with(|| Arc::new(Bucket::new(spec)))
            .clone()
    }

    pub fn ip_bucket(&self, ip: IpAddr) -> Arc<Bucket> {
        self.ips
            .get_with(ip, || Arc::new(Bucket::peekable(self.ip_spec)))
    }

    /// An address's standing without taking a cell (a full bucket for an
    /// address not tracked, which is not added).
    pub fn peek_ip(&self, ip: IpAddr) -> Standing {
        match self.ips.get(&ip) {
            Some(b) => b.peek(Scope::Ip),
            None => self.ip_spec.standing(Scope::Ip, self.ip_spec.burst),
        }
    }

    /// Addresses tracked now (approximate), for tests and metrics.
    pub fn tracked_ips(&self) -> u64 {
        self.ips.run_pending_tasks();
        self.ips.entry_count()
    }
}

/// Checks buckets in order and returns the tightest standing (fewest
/// advertised remaining), or the first refusal.
pub fn check_all<'a>(
    buckets: impl IntoIterator<Item = (Scope, &'a Bucket)>,
) -> Result<Option<Standing>, Refusal> {
    check_all_n(buckets, 1)
}

/// [`check_all`] for `n` cells each (a batch).
pub fn check_all_n<'a>(
    buckets: impl IntoIterator<Item = (Scope, &'a Bucket)>,
    n: u32,
) -> Result<Option<Standing>, Refusal> {
    let mut tightest: Option<Standing> = None;
    for (scope, bucket) in buckets {
        let s = bucket.check_n(scope, n)?;
        if tightest.is_none_or(|t| s.advertised_remaining() < t.advertised_remaining()) {
            tightest = Some(s);
        }
    }
    Ok(tightest)
}

/// The tighter of two standings (fewer advertised cells left).
pub fn tighter(a: Option<Standing>, b: Option<Standing>) -> Option<Standing> {
    match (a, b) {
        (Some(x), Some(y)) if y.advertised_remaining() < x.advertised_remaining() => Some(y),
        (Some(x), _) => Some(x),
        (None, y) => y,
    }
}

/// Proxy headers a source may take the client address from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyHeader {
    XForwardedFor,
    Forwarded,
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in
/// which case the nearest address in the proxy header that is not itself a
/// trusted proxy (the header's entries right to left).
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    accept: &[ProxyHeader],
) -> IpAddr {
    if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer)) {
        return peer;
    }
    for h in accept {
        let chain: Vec<IpAddr> = match h {
            ProxyHeader::XForwardedFor => headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(parse_addr)
                .collect(),
            ProxyHeader::Forwarded => headers
                .get_all("forwarded")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|elem| {
                    elem.split(';').find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        k.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| parse_addr(v))
                            .flatten()
                    })
                })
                .collect(),
        };
        if chain.is_empty() {
            continue;
        }
        let nearest_untrusted = chain
            .iter()
            .rev()
            .find(|ip| !trusted.iter().any(|n| n.contains(*ip)));
        return *nearest_untrusted.unwrap_or(&chain[0]);
    }
    peer
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`, optionally quoted.
fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    s.rsplit_once(':').and_then(|(host, _)| host.parse().ok())
}

/// Whether an address is allowed by a list (an empty list allows all).
pub fn allowed(ip: IpAddr, allow: &[IpNet]) -> bool {
    allow.is_empty() || allow.iter().any(|n| n.contains(&ip)) || {
        // An IPv4 client seen as an IPv4-mapped IPv6 address.
        match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| allow.iter().any(|n| n.contains(&IpAddr::V4(v4)))),
            IpAddr::V4(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn specs_parse() {
        assert_eq!(RateSpec::parse("100:200"), Ok(RateSpec::new(100, 200)));
        assert_eq!(RateSpec::parse("60"), Ok(RateSpec::new(60, 60)));
        assert!(RateSpec::parse("0:1").is_err());
        assert!(RateSpec::parse("x").is_err());
    }

    #[test]
    fn a_bucket_passes_its_burst_then_refuses_with_a_retry_time() {
        let b = Bucket::new(RateSpec::new(60, 5));
        for i in 0..5 {
            let s = b.check(Scope::Ip).unwrap();
            assert_eq!(s.remaining, 4 - i);
        }
        let r = b.check(Scope::Ip).unwrap_err();
        assert_eq!(r.scope, Scope::Ip);
        assert!((1..=1).contains(&r.retry_after), "{r:?}");
    }

    #[test]
    fn a_peek_takes_no_cell_and_advertises_the_sustained_limit() {
        // One cell a minute: nothing refills while the test runs.
        let b = Bucket::peekable(RateSpec::new(1, 3));
        assert_eq!(b.peek(Scope::Ip).remaining, 3);
        b.check(Scope::Ip).unwrap();
        for _ in 0..3 {
            assert_eq!(b.peek(Scope::Ip).remaining, 2);
        }
        assert_eq!(b.check(Scope::Ip).unwrap().remaining, 1);
        b.check(Scope::Ip).unwrap();
        b.check(Scope::Ip).unwrap_err();
        let s = b.peek(Scope::Ip);
        assert_eq!((s.remaining, s.advertised_remaining()), (0, 0));
        // 100/min with a burst of 200: 99 advertised after the first cell.
        let seed = Bucket::new(RateSpec::new(100, 200));
        let first = seed.check(Scope::Ip).unwrap();
        assert_eq!((first.limit, first.advertised_remaining()), (100, 99));
    }

    #[test]
    fn the_tightest_standing_is_reported() {
        let wide = Bucket::new(RateSpec::new(1000, 1000));
        let narrow = Bucket::new(RateSpec::new(10, 3));
        let s = check_all([(Scope::Global, &wide), (Scope::Ip, &narrow)])
            .unwrap()
            .unwrap();
        assert_eq!((s.scope, s.remaining, s.limit), (Scope::Ip, 2, 10));
    }

    #[test]
    fn proxy_headers_count_only_from_trusted_peers() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let both = [ProxyHeader::XForwardedFor, ProxyHeader::Forwarded];
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let h = hdrs(&[("x-forwarded-for", "198.51.100.7, 10.1.1.1")]);
        assert_eq!(
            client_ip(peer, &h, &trusted, &both),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &h, &trusted, &both), stranger);
        assert_eq!(client_ip(peer, &h, &[], &both), peer);
        let f = hdrs(&[(
            "forwarded",
            "for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.2",
        )]);
        assert_eq!(
            client_ip(peer, &f, &trusted, &both),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, &f, &trusted, &[ProxyHeader::XForwardedFor]),
            peer
        );
        let junk = hdrs(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(peer, &junk, &trusted, &both), peer);
    }

    #[test]
    fn allowlists_take_v4_and_v6() {
        let allow = nets(&["192.0.2.0/24", "2001:db8::/32"]);
        assert!(allowed("192.0.2.9".parse().unwrap(), &allow));
        assert!(allowed("2001:db8::1".parse().unwrap(), &allow));
        assert!(allowed("::ffff:192.0.2.9".parse().unwrap(), &allow));
        assert!(!allowed("127.0.0.1".parse().unwrap(), &allow));
        assert!(allowed("127.0.0.1".parse().unwrap(), &[]));
    }

    #[test]
    fn per_ip_state_is_bounded() {
        let limits = ServerLimits::new(DEFAULT_GLOBAL, DEFAULT_IP);
        for i in 0..(MAX_TRACKED_IPS as u32 + 20_000) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = limits.ip_bucket(ip).check(Scope::Ip);
        }
        assert!(
            limits.tracked_ips() <= MAX_TRACKED_IPS,
            "{}",
            limits.tracked_ips()
        );
    }
}
