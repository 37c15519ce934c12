//! Connection-level defences against slow and hostile clients, wrapped
//! around poem's acceptor: a limit on open connections (a new one waits in
//! the kernel backlog until one closes), a cap on the connections one
//! address may hold (more are closed at once; trusted proxies are exempt),
//! a deadline for a new connection's first request to arrive and for a
//! request's headers once they have started, and a cap on their size.
//! Bodies have their own read deadline in the hook handler.

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
    limits: ConnLimits,
}

impl<A> GuardedAcceptor<A> {
    pub fn new(inner: A, limits: ConnLimits) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_address: Default::default(),
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
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("connection limiter closed"))?;
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
            return Ok((
                GuardedIo::new(io, permit, slot, &self.limits),
                local,
                remote,
                scheme,
            ));
        }
    }
}

/// Where a connection is in its request cycle, as seen from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepted, nothing read yet: the first request must arrive within the
    /// head deadline.
    Fresh,
    /// Between requests: waiting is the idle timeout's business.
    Idle,
    /// A request head has started: it must end within the deadline.
    Head { read: usize, tail: [u8; 3] },
    /// The head is complete; the body and response follow.
    Rest,
    /// HTTP/2: framing is binary, the h2 settings apply instead.
    H2,
}

/// A connection's stream with its permit, its place in its address's
/// count, and its head deadline.
pub struct GuardedIo<T> {
    inner: T,
    deadline: Pin<Box<Sleep>>,
    phase: Phase,
    header_timeout: Duration,
    max_header_bytes: usize,
    _permit: OwnedSemaphorePermit,
    _slot: Option<AddressSlot>,
}

impl<T> GuardedIo<T> {
    fn new(
        inner: T,
        permit: OwnedSemaphorePermit,
        slot: Option<AddressSlot>,
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
            _permit: permit,
            _slot: slot,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Feeds newly read bytes to the head tracker; `Err` when the head is too large.
fn advance(phase: Phase, bytes: &[u8], max: usize) -> Result<Phase, ()> {
    let Phase::Head { mut read, mut tail } = phase else {
        return Ok(phase);
    };
    for b in bytes {
        if tail == [b'\r', b'\n', b'\r'] && *b == b'\n' {
            return Ok(Phase::Rest);
        }
        tail = [tail[1], tail[2], *b];
        read += 1;
        if read > max {
            return Err(());
        }
    }
    Ok(Phase::Head { read, tail })
}

/// The answer to a request head over the limit, written on the raw stream
/// before the connection closes: a 431 in the one error body.
const HEADERS_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-type: application/json; charset=utf-8\r\nconnection: close\r\ncontent-length: 159\r\n\r\n\
{\"status\":\"error\",\"error\":\"HEADERS_TOO_LARGE\",\"error_code\":\"HEADERS_TOO_LARGE\",\
\"message\":\"the request headers are larger than the server accepts\",\"details\":{}}";

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Head { .. } | Phase::Fresh)
            && this.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request headers too slow",
            )));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                return res;
            }
            if this.phase == Phase::Fresh {
                if new.starts_with(H2_PREFACE) {
                    this.phase = Phase::H2;
                } else {
                    // The deadline set at accept keeps running.
                    this.phase = Phase::Head {
                        read: 0,
                        tail: [0; 3],
                    };
                }
            }
            if this.phase == Phase::Idle {
                this.phase = Phase::Head {
                    read: 0,
                    tail: [0; 3],
                };
                let at = Instant::now() + this.header_timeout;
                this.deadline.as_mut().reset(at);
                // Register the timer with this task.
                let _ = this.deadline.as_mut().poll(cx);
            }
            match advance(this.phase, new, this.max_header_bytes) {
                Ok(p) => this.phase = p,
                Err(()) => {
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
        }
        res
    }
}

/// A response head being written ends the request: the next bytes read
/// start another head. An interim `100 Continue` does not: the body follows.
fn end_of_request(phase: &mut Phase, written: &[u8]) {
    if *phase == Phase::Rest && !written.starts_with(b"HTTP/1.1 1") {
        *phase = Phase::Idle;
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        end_of_request(&mut this.phase, buf);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            end_of_request(&mut this.phase, first);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Phase {
        Phase::Head {
            read: 0,
            tail: [0; 3],
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let p = advance(head(), b"GET / HTTP/1.1\r\nHost: x\r", 1000).unwrap();
        assert!(matches!(p, Phase::Head { .. }));
        let p = advance(p, b"\n\r", 1000).unwrap();
        assert!(matches!(p, Phase::Head { .. }));
        assert_eq!(advance(p, b"\nbody", 1000), Ok(Phase::Rest));
    }

    #[test]
    fn the_431_body_is_the_one_error_body_with_its_length() {
        let text = std::str::from_utf8(HEADERS_TOO_LARGE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "HEADERS_TOO_LARGE");
    }

    #[test]
    fn an_oversized_head_is_refused() {
        assert!(advance(head(), &[b'a'; 100], 50).is_err());
        assert!(advance(head(), &[b'a'; 40], 50).is_ok());
    }
}
