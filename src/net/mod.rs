//! Connection-level defences against slow and hostile clients, wrapped
//! around poem's acceptor: a limit on open connections (at the limit the
//! connection idle longest is closed to make room; with none idle a new
//! one waits until one closes), a cap on the connections one address may
//! hold (more are closed at once; trusted proxies are exempt), a deadline
//! for a new connection's first request to arrive and for a request's
//! headers once they have started (HTTP/1.1 heads and HTTP/2 header
//! blocks), and a cap on an HTTP/1.1 head's size. Bodies have their own
//! read deadline in the hook handler.

mod evict;
mod head;

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tokio::time::{Instant, Sleep};

use evict::{Idleness, Tracked};
use head::{end_of_request, Phase, HEADERS_TOO_LARGE};

/// Limits applied to every connection.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// Connections one client address may hold open at once.
    pub max_connections_per_ip: usize,
    /// Peers exempt from the per-address cap (a proxy carries many clients).
    pub trusted: Vec<ipnet::IpNet>,
    /// Time allowed from a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) accepted.
    pub max_header_bytes: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 256,
            trusted: Vec::new(),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Open connections per client address.
type PerAddress = Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>;

/// An acceptor that applies [`ConnLimits`].
pub struct GuardedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    per_address: PerAddress,
    idleness: Arc<Idleness>,
    limits: ConnLimits,
}

impl<A> GuardedAcceptor<A> {
    pub fn new(inner: A, limits: ConnLimits) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_address: Default::default(),
            idleness: Idleness::new(),
            limits,
        }
    }
}

/// A connection's place in its address's count, given back when it closes.
struct AddressSlot {
    ip: IpAddr,
    counts: PerAddress,
}

impl AddressSlot {
    /// Takes a place for `ip`, or `None` when it holds `max` already.
    fn take(counts: &PerAddress, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            ip,
            counts: counts.clone(),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl<A: Acceptor> Acceptor for GuardedAcceptor<A> {
    type Io = GuardedIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        loop {
            let (io, local, remote, scheme) = self.inner.accept().await?;
            let ip = remote.as_socket_addr().map(|a| a.ip());
            let slot = match ip {
                Some(ip) if !self.limits.trusted.iter().any(|n| n.contains(&ip)) => {
                    match AddressSlot::take(
                        &self.per_address,
                        ip,
                        self.limits.max_connections_per_ip,
                    ) {
                        Some(slot) => Some(slot),
                        None => {
                            // Over its share: closed at once (dropped here).
                            tracing::warn!(client_ip = %ip, reason = "too_many_connections", "connection refused");
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let permit = permit(self.permits.clone(), self.idleness.clone()).await?;
            let tracked = self.idleness.track();
            return Ok((
                GuardedIo::new(io, permit, slot, tracked, &self.limits),
                local,
                remote,
                scheme,
            ));
        }
    }
}

/// A place under the global cap for a connection just accepted: at the
/// cap, the connection idle longest is asked to close, and again every
/// 100 ms while the cap holds (one asked may have started a request, and
/// busy ones become idle).
async fn permit(
    permits: Arc<Semaphore>,
    idleness: Arc<Idleness>,
) -> io::Result<OwnedSemaphorePermit> {
    let closed = |_| io::Error::other("connection limiter closed");
    loop {
        match permits.clone().try_acquire_owned() {
            Ok(p) => return Ok(p),
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(io::Error::other("connection limiter closed"))
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        if idleness.evict_oldest() {
            tracing::debug!(
                reason = "connection_cap",
                "closing the connection idle longest"
            );
        }
        if let Ok(p) =
            tokio::time::timeout(Duration::from_millis(100), permits.clone().acquire_owned()).await
        {
            return p.map_err(closed);
        }
    }
}

/// A connection's stream with its permit, its place in its address's
/// count, its idleness mark, and its head deadline.
pub struct GuardedIo<T> {
    inner: T,
    deadline: Pin<Box<Sleep>>,
    phase: Phase,
    header_timeout: Duration,
    max_header_bytes: usize,
    tracked: Tracked,
    _permit: OwnedSemaphorePermit,
    _slot: Option<AddressSlot>,
}

impl<T> GuardedIo<T> {
    fn new(
        inner: T,
        permit: OwnedSemaphorePermit,
        slot: Option<AddressSlot>,
        tracked: Tracked,
        limits: &ConnLimits,
    ) -> Self {
        Self {
            inner,
            // A new connection's first request must start, and its head
            // end, within the deadline: a silent connection is closed.
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            phase: Phase::Fresh,
            header_timeout: limits.header_timeout,
            max_header_bytes: limits.max_header_bytes,
            tracked,
            _permit: permit,
            _slot: slot,
        }
    }

    /// Restarts the head deadline from now, registered with this task.
    fn restart_deadline(&mut self, cx: &mut Context<'_>) {
        let at = Instant::now() + self.header_timeout;
        self.deadline.as_mut().reset(at);
        let _ = self.deadline.as_mut().poll(cx);
    }

    /// Moves the phase on for bytes just read; `Err` for a head too large.
    fn saw(&mut self, cx: &mut Context<'_>, new: &[u8]) -> Result<(), ()> {
        match self.phase {
            Phase::Fresh | Phase::Sniff(_) => {
                self.tracked.busy();
                // The deadline set at accept keeps running.
                let matched = match self.phase {
                    Phase::Sniff(m) => m,
                    _ => 0,
                };
                self.phase = head::sniff(matched, new);
            }
            Phase::Idle => {
                self.tracked.busy();
                self.phase = Phase::head();
                self.restart_deadline(cx);
            }
            _ => {}
        }
        let before = self.phase;
        self.phase = self.phase.advance(new, self.max_header_bytes)?;
        if let (Phase::H2(was), Phase::H2(now)) = (before, self.phase) {
            // A header block opened after the first request: its own deadline.
            if was.seen_request && !was.open_block && now.open_block {
                self.restart_deadline(cx);
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Fresh | Phase::Idle) && this.tracked.evicted(cx) {
            // Closed to make room at the connection cap: an end of stream
            // between requests, which the client's keep-alive expects.
            return Poll::Ready(Ok(()));
        }
        if this.phase.waits_for_headers() && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request headers too slow",
            )));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let new = &buf.filled()[before..];
            if !new.is_empty() && this.saw(cx, new).is_err() {
                // Best effort: a fresh socket's buffer takes these few
                // bytes at once; the server has written nothing yet.
                let _ = Pin::new(&mut this.inner).poll_write(cx, HEADERS_TOO_LARGE);
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request headers too large",
                )));
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> GuardedIo<T> {
    fn wrote(&mut self, first: &[u8]) {
        if end_of_request(&mut self.phase, first) {
            self.tracked.idle();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote(buf);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.wrote(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
