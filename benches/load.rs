//! Load harness for the `rocket-rewards` server (issue 7, item 1).
//!
//! ```text
//! cargo bench --bench load -- [--seconds 10] [--connections 64 | 1,8,64,256]
//!                             [--warmup 1] [--prefill N] [--bulk N] [--db FILE] [--sources N]
//!                             [--log warn] [--server-log FILE] [--no-build]
//!                             [--client-threads 2] [--server-env KEY=VALUE]...
//! ```
//!
//! Builds the release binary, starts it on a free port with a fresh SQLite
//! ledger in a temp dir and rate limits off, waits for `/health/ready`, then
//! for each connection count drives `GET /health/live` (the bare route) and
//! `POST /api/public/hook/learnworlds/event` (unique ids, correct HMAC) for a
//! fixed time after a warm-up. Reports req/s, p50/p99, non-2xx and errors,
//! the server's CPU µs per request (utime+stime from /proc; in all and by
//! thread: tokio workers, SQLite writer, sync and checkpoint), its peak RSS
//! (VmHWM), the disks' writes, and the hook/bare throughput ratio. Any
//! non-2xx answer or error on the hook route makes the run exit non-zero.
//!
//! The same signed request then goes to the peer (Debian's `webhook`) and
//! to two reference servers of `load/floor.rs` (HMAC and JSON alone; the
//! same storing one SQLite row per event, durably), and the run prints the
//! hook's CPU against theirs. Last, what refusals cost: the hook with a
//! wrong signature (401); on a second server with the default rate limits,
//! one address over its limit, and a new address at every request (429).
//!
//! The client is a lean HTTP/1.1 keep-alive client over tokio `TcpStream`
//! (one task per connection, request bytes prebuilt, HMAC from a pre-keyed
//! clone) so that it takes as little as possible of the CPU it shares with
//! the server.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "load/bulk.rs"]
mod bulk;
#[path = "load/floor.rs"]
mod floor;
#[path = "load/postgres.rs"]
mod postgres;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type HmacSha256 = Hmac<Sha256>;

const HOOK_PATH: &str = "/api/public/hook/learnworlds/event";
const BARE_PATH: &str = "/health/live";
const READY_PATH: &str = "/health/ready";
const SECRET: &str = "bench-learnworlds-secret-0123456789abcdef";
/// The peer's hook: the same request, signed with the same secret.
const PEER_PATH: &str = "/hooks/learnworlds";

/// A single request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- arguments

struct Args {
    seconds: f64,
    warmup: f64,
    connections: Vec<usize>,
    prefill: u64,
    prefill_connections: usize,
    /// Events filled with SQL before the server starts.
    bulk: u64,
    /// The database file to use (and keep) instead of a temp one.
    db: Option<PathBuf>,
    sources: usize,
    log: String,
    server_log: Option<PathBuf>,
    build: bool,
    client_threads: usize,
    server_env: Vec<(String, String)>,
    /// Measure the peer (`webhook`) too.
    peer: bool,
    /// Measure the two reference servers of `floor` too.
    floor: bool,
    /// Measure what refused requests cost: a wrong signature (401), one
    /// address over its rate limit and a new address at every request (429).
    refusals: bool,
    /// A PostgreSQL server (URL of a database to connect to): the hook is
    /// measured again on a fresh database there, after SQLite's run.
    postgres: Option<String>,
}

const USAGE: &str = "\
usage: cargo bench --bench load -- [options]
  --seconds S            measured duration per route and connection count (default 10)
  --warmup S             warm-up before each measurement (default 1)
  --connections LIST     concurrent keep-alive connections, e.g. 64 or 1,8,64,256 (default 64)
  --prefill N            insert N events through the hook route before measuring (default 0)
  --prefill-connections C  connections used for the prefill (default 64)
  --bulk N               fill the ledger to N events with SQL before the server starts (not the route);
                         with --postgres, the PostgreSQL database too, and its analytics reads are timed
  --db FILE              use this SQLite file (kept, and only topped up by --bulk) instead of a temp one
  --sources N            load N sources: the shipped ones plus generated copies of learnworlds.yaml
  --log LEVEL            the server's ROCKET_LOG (default warn)
  --server-log FILE      also keep the server's stderr in FILE (default: temp dir, tail shown on failure)
  --server-env K=V       extra environment variable for the server (repeatable)
  --client-threads T     tokio worker threads of the load generator (default 2)
  --no-build             do not run `cargo build --release --bin rocket-rewards` first
  --no-peer              do not measure the peer (Debian's `webhook`, one HMAC-verified hook)
  --no-floor             do not measure the two reference servers (a poem route that checks the HMAC
                         and parses the JSON; the same storing one SQLite row per event, durably)
  --no-refusals          do not measure refused requests (a wrong signature: 401; on a second server
                         with the default limits, one address over its rate limit, and a new address
                         at every request through a trusted proxy: 429)
  --postgres URL         then measure the hook again on PostgreSQL, on a database the harness creates
                         (and drops) on the server of URL, e.g. postgres://postgres@127.0.0.1:5432/postgres";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 10.0,
        warmup: 1.0,
        connections: vec![64],
        prefill: 0,
        prefill_connections: 64,
        bulk: 0,
        db: None,
        sources: 0,
        log: "warn".into(),
        server_log: None,
        build: true,
        client_threads: 2,
        server_env: Vec::new(),
        peer: true,
        floor: true,
        refusals: true,
        postgres: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.trim()
                .parse()
                .map_err(|_| format!("{name}: {v:?} is not a valid number"))
        }
        match key.as_str() {
            // `cargo bench` passes `--bench` to harness-less targets.
            "--bench" => {}
            "--seconds" => a.seconds = num("--seconds", value("--seconds")?)?,
            "--warmup" => a.warmup = num("--warmup", value("--warmup")?)?,
            "--connections" => {
                a.connections = value("--connections")?
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| num("--connections", s.to_string()))
                    .collect::<Result<_, _>>()?;
                if a.connections.is_empty() || a.connections.contains(&0) {
                    return Err("--connections: give positive counts".into());
                }
            }
            "--prefill" => a.prefill = num("--prefill", value("--prefill")?)?,
            "--bulk" => a.bulk = num("--bulk", value("--bulk")?)?,
            "--db" => a.db = Some(PathBuf::from(value("--db")?)),
            "--prefill-connections" => {
                a.prefill_connections =
                    num("--prefill-connections", value("--prefill-connections")?)?
            }
            "--sources" => a.sources = num("--sources", value("--sources")?)?,
            "--log" => a.log = value("--log")?,
            "--server-log" => a.server_log = Some(PathBuf::from(value("--server-log")?)),
            "--server-env" => {
                let kv = value("--server-env")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--server-env: {kv:?} is not KEY=VALUE"))?;
                a.server_env.push((k.to_string(), v.to_string()));
            }
            "--client-threads" => {
                a.client_threads = num("--client-threads", value("--client-threads")?)?
            }
            "--no-build" => a.build = false,
            "--no-peer" => a.peer = false,
            "--no-floor" => a.floor = false,
            "--no-refusals" => a.refusals = false,
            "--postgres" => a.postgres = Some(value("--postgres")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.seconds.is_nan() || a.seconds <= 0.0 || a.warmup.is_nan() || a.warmup < 0.0 {
        return Err("--seconds must be > 0 and --warmup >= 0".into());
    }
    a.client_threads = a.client_threads.max(1);
    a.prefill_connections = a.prefill_connections.max(1);
    Ok(a)
}

// ------------------------------------------------------------------- client

/// One keep-alive HTTP/1.1 connection with a reusable read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct Response {
    status: u16,
    /// Body bytes (chunked bodies are left undecoded; only used for messages).
    body: std::ops::Range<usize>,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(())
    }

    /// Sends one request and reads its whole response. The response stays in
    /// `self.buf` until the next call.
    async fn roundtrip(&mut self, req: &[u8]) -> std::io::Result<Response> {
        self.buf.clear();
        self.stream.write_all(req).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 256 * 1024 {
                return Err(bad("response head too large"));
            }
            self.fill().await?;
        };
        let head = &self.buf[..head_end];
        if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
            return Err(bad("not an HTTP/1.x response"));
        }
        let status: u16 = std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut content_length = None;
        let mut chunked = false;
        let mut close = head.starts_with(b"HTTP/1.0");
        for line in head[..head_end - 4].split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = &line[..colon];
            let value = std::str::from_utf8(&line[colon + 1..]).unwrap_or("").trim();
            if name.eq_ignore_ascii_case(b"content-length") {
                content_length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| bad("bad content-length"))?,
                );
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    close = true;
                } else if v.contains("keep-alive") {
                    close = false;
                }
            }
        }
        let no_body = status / 100 == 1 || status == 204 || status == 304;
        let end = if no_body {
            head_end
        } else if chunked {
            let mut pos = head_end;
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf[pos..], b"\r\n") {
                        break pos + i;
                    }
                    self.fill().await?;
                };
                let size_str = std::str::from_utf8(&self.buf[pos..line_end])
                    .map_err(|_| bad("bad chunk size"))?;
                let size_str = size_str.split(';').next().unwrap_or("").trim();
                let size =
                    usize::from_str_radix(size_str, 16).map_err(|_| bad("bad chunk size"))?;
                pos = line_end + 2;
                if size == 0 {
                    // Trailers (none expected) end with an empty line.
                    loop {
                        if let Some(i) = find(&self.buf[pos..], b"\r\n") {
                            let empty = i == 0;
                            pos += i + 2;
                            if empty {
                                break;
                            }
                        } else {
                            self.fill().await?;
                        }
                    }
                    break pos;
                }
                while self.buf.len() < pos + size + 2 {
                    self.fill().await?;
                }
                pos += size + 2;
            }
        } else if let Some(len) = content_length {
            while self.buf.len() < head_end + len {
                self.fill().await?;
            }
            head_end + len
        } else {
            // Body delimited by the connection closing.
            close = true;
            loop {
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            self.buf.len()
        };
        Ok(Response {
            status,
            body: head_end..end,
            close,
        })
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// What the connections send (two of these per run, shared through `Arc`).
#[allow(clippy::large_enum_variant)]
enum Target {
    /// A fixed request.
    Bare { req: Vec<u8> },
    /// A LearnWorlds webhook with a unique id and its signature.
    Hook {
        head_prefix: Vec<u8>,
        key: HmacSha256,
        run: String,
        /// `occurred_at` of every event: when the harness started.
        at: String,
        next_id: Arc<AtomicU64>,
        /// Each request names a client address of its own in
        /// `X-Forwarded-For` (10.0.0.0/8, by request number).
        spread: bool,
    },
}

impl Target {
    fn bare(host: &str) -> Target {
        Target::Bare {
            req: format!("GET {BARE_PATH} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n")
                .into_bytes(),
        }
    }

    fn hook(host: &str, path: &str, run: &str, next_id: Arc<AtomicU64>) -> Target {
        Target::hook_signed(host, path, run, next_id, SECRET)
    }

    /// [`Target::hook`] signed with `secret` (a wrong one for refusals).
    fn hook_signed(
        host: &str,
        path: &str,
        run: &str,
        next_id: Arc<AtomicU64>,
        secret: &str,
    ) -> Target {
        Target::Hook {
            head_prefix: format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\
                 Content-Type: application/json\r\nX-Signature: sha256="
            )
            .into_bytes(),
            key: HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length"),
            run: run.to_string(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            next_id,
            spread: false,
        }
    }

    /// [`Target::hook`] from a new client address at every request, as a
    /// trusted proxy forwards them.
    fn hook_spread(host: &str, path: &str, run: &str, next_id: Arc<AtomicU64>) -> Target {
        let mut target = Target::hook(host, path, run, next_id);
        if let Target::Hook { spread, .. } = &mut target {
            *spread = true;
        }
        target
    }

    /// Writes the next request into `out` (the body goes through `body`).
    fn build<'a>(&'a self, out: &'a mut Vec<u8>, body: &mut Vec<u8>) -> &'a [u8] {
        match self {
            Target::Bare { req } => req,
            Target::Hook {
                head_prefix,
                key,
                run,
                at,
                next_id,
                spread,
            } => {
                let n = next_id.fetch_add(1, Ordering::Relaxed);
                body.clear();
                // 10,000 learners completing the run's 500 courses, each
                // course once per learner (for the first 5M events), so
                // every event earns its points, as a real stream mostly
                // does; happening now, so the last seven days' summary is
                // written too.
                write!(
                    body,
                    r#"{{"id":"bench-{run}-{n}","topic":"course.completed","occurred_at":"{at}","data":{{"user_id":"U-{}","course_id":"C-{run}-{}","progress":100}}}}"#,
                    n % 10_000,
                    (n / 10_000) % 500,
                )
                .expect("write to a Vec");
                let mut mac = key.clone();
                mac.update(body);
                let tag = mac.finalize().into_bytes();
                let mut hex_tag = [0u8; 64];
                hex::encode_to_slice(tag, &mut hex_tag).expect("64 bytes of hex");
                out.clear();
                out.extend_from_slice(head_prefix);
                out.extend_from_slice(&hex_tag);
                if *spread {
                    let [_, b, c, d] = (n as u32).to_be_bytes();
                    write!(out, "\r\nX-Forwarded-For: 10.{b}.{c}.{d}").expect("write to a Vec");
                }
                write!(out, "\r\nContent-Length: {}\r\n\r\n", body.len()).expect("write to a Vec");
                out.extend_from_slice(body);
                out
            }
        }
    }
}

/// When a phase's connections stop sending.
#[derive(Clone)]
enum Stop {
    At(Instant),
    /// Stop once this many requests have been started.
    Count(Arc<AtomicU64>, u64),
}

#[derive(Default)]
struct Stats {
    /// Responses received (any status).
    responses: u64,
    non_2xx: u64,
    errors: u64,
    duplicates: u64,
    /// Latency of every response, in microseconds.
    latencies: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    /// A few examples of what went wrong.
    samples: Vec<String>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.responses += o.responses;
        self.non_2xx += o.non_2xx;
        self.errors += o.errors;
        self.duplicates += o.duplicates;
        self.latencies.extend(o.latencies);
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for s in o.samples {
            if self.samples.len() < 5 {
                self.samples.push(s);
            }
        }
    }

    fn sample(&mut self, s: String) {
        if self.samples.len() < 5 {
            self.samples.push(s);
        }
    }
}

async fn connection_task(
    addr: Arc<String>,
    target: Arc<Target>,
    stop: Stop,
    expect: usize,
) -> Stats {
    let mut st = Stats {
        latencies: Vec::with_capacity(expect),
        ..Stats::default()
    };
    let mut out = Vec::with_capacity(1024);
    let mut body = Vec::with_capacity(512);
    let mut conn: Option<Conn> = None;
    let check_dup = matches!(*target, Target::Hook { .. });
    loop {
        match &stop {
            Stop::At(end) => {
                if Instant::now() >= *end {
                    break;
                }
            }
            Stop::Count(started, limit) => {
                if started.fetch_add(1, Ordering::Relaxed) >= *limit {
                    break;
                }
            }
        }
        if conn.is_none() {
            match Conn::open(&addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    st.errors += 1;
                    st.sample(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let req = target.build(&mut out, &mut body);
        let t0 = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, c.roundtrip(req)).await {
            Ok(Ok(resp)) => {
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                st.latencies.push(us);
                st.responses += 1;
                if resp.status / 100 != 2 {
                    st.non_2xx += 1;
                    *st.statuses.entry(resp.status).or_default() += 1;
                    let text = String::from_utf8_lossy(&c.buf[resp.body.clone()]);
                    st.sample(format!(
                        "HTTP {}: {}",
                        resp.status,
                        text.chars().take(300).collect::<String>()
                    ));
                } else if check_dup
                    && find(&c.buf[resp.body.clone()], b"\"duplicate\":true").is_some()
                {
                    st.duplicates += 1;
                }
                if resp.close {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                st.errors += 1;
                st.sample(format!("i/o: {e}"));
                conn = None;
            }
            Err(_) => {
                st.errors += 1;
                st.sample(format!("no answer within {REQUEST_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    st
}

struct PhaseResult {
    stats: Stats,
    elapsed: Duration,
}

/// Runs `conns` connections against `target` until `stop`.
async fn run_phase(
    addr: &Arc<String>,
    target: &Arc<Target>,
    conns: usize,
    stop: Stop,
    expect_total: usize,
) -> PhaseResult {
    let per_task = (expect_total / conns.max(1)).clamp(16, 1 << 22);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(connection_task(
                addr.clone(),
                target.clone(),
                stop.clone(),
                per_task,
            ))
        })
        .collect();
    let mut stats = Stats::default();
    for t in tasks {
        stats.merge(t.await.expect("connection task panicked"));
    }
    PhaseResult {
        stats,
        elapsed: t0.elapsed(),
    }
}

// ------------------------------------------------------------------- server

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// The name and utime + stime (clock ticks) in a `/proc/.../stat` line.
fn stat_ticks(stat: &str) -> Option<(&str, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((&stat[open + 1..close], utime + stime))
}

/// utime + stime of a process, in clock ticks (all threads).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_ticks(&stat).map(|(_, ticks)| ticks)
}

/// utime + stime of each of a process's threads, in clock ticks, summed by
/// thread name (the kernel keeps 15 bytes of it: `rocket-sqlite-w`).
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, ticks)) = stat_ticks(&stat) {
            *by_name.entry(name.to_string()).or_insert(0) += ticks;
        }
    }
    by_name
}

/// Busy and total clock ticks of all CPUs (the first line of `/proc/stat`):
/// busy is everything but idle and iowait.
fn box_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// Writes completed and sectors (512 bytes) written by the machine's whole
/// disks (`/proc/diskstats`, devices listed in /sys/block, loop and zram
/// devices left out): what reached the devices, checkpoints and fsyncs
/// included.
fn disk_writes() -> Option<(u64, u64)> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    let mut total = (0, 0);
    for line in stats.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = f.get(2) else { continue };
        if name.starts_with("loop") || name.starts_with("zram") || name.starts_with("ram") {
            continue;
        }
        if !Path::new("/sys/block").join(name).exists() {
            continue;
        }
        total.0 += f.get(7)?.parse::<u64>().ok()?;
        total.1 += f.get(9)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Bytes the process has passed to write calls (`wchar` of /proc/PID/io):
/// the WAL, checkpoints, and (a few hundred bytes each) the responses.
fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A `/proc/<pid>/status` field in kB (VmHWM, VmRSS).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn mib(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

struct Server {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Server {
    fn terminate(&mut self) -> Option<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            println!("(the server had already exited before SIGTERM: {status})");
            return Some((status, Duration::ZERO));
        }
        let t0 = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = t0 + Duration::from_secs(40);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, t0.elapsed())),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    eprintln!("server did not stop within 40 s of SIGTERM; killing it");
                    let _ = child.kill();
                    return child.wait().ok().map(|s| (s, t0.elapsed()));
                }
            }
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The peer a user would otherwise pick: adnanh/webhook (Debian's
/// `webhook`) with one hook that verifies the same HMAC-SHA256 signature
/// header and answers a static body. Its command is never found, so it
/// runs nothing and stores nothing: the measurement is its HTTP and HMAC.
struct Peer {
    server: Server,
    addr: String,
}

impl Peer {
    /// Starts `cmd` (which listens on 127.0.0.1:`port`) with its output in
    /// `log`, and waits until it accepts connections.
    fn spawn(
        mut cmd: Command,
        log: &Path,
        port: u16,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Peer, String> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
        let pid = child.id();
        let mut peer = Peer {
            server: Server {
                child: Some(child),
                pid,
                log: log.to_path_buf(),
            },
            addr: format!("127.0.0.1:{port}"),
        };
        let addr = peer.addr.clone();
        let listening = rt.block_on(async {
            for _ in 0..500 {
                if Conn::open(&addr).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        });
        if !listening {
            peer.server.terminate();
            return Err(format!(
                "{:?} did not listen on {addr}: {}",
                cmd.get_program(),
                peer.server.log_tail(5)
            ));
        }
        Ok(peer)
    }

    /// Starts this harness's own binary as one of the reference servers of
    /// [`floor`] (`hmac-json` or `durable`, the latter storing in a new
    /// file in `dir`).
    fn floor(kind: &str, dir: &Path, rt: &tokio::runtime::Runtime) -> Result<Peer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("the harness's own path: {e}"))?;
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["--serve-floor", kind, &format!("127.0.0.1:{port}")]);
        if kind == "durable" {
            cmd.arg(dir.join("floor.db"));
        }
        Peer::spawn(cmd, &dir.join(format!("floor-{kind}.log")), port, rt)
    }

    /// Starts it if `webhook` is installed (`benches/run.sh` installs it).
    fn start(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> Result<Option<Peer>, String> {
        let Ok(out) = Command::new("sh")
            .args(["-c", "command -v webhook"])
            .output()
        else {
            return Ok(None);
        };
        if !out.status.success() {
            println!("peer: `webhook` is not installed (apt-get install webhook); not measured");
            return Ok(None);
        }
        let hooks = dir.join("peer-hooks.json");
        let config = serde_json::json!([{
            "id": "learnworlds",
            "execute-command": "/nonexistent/rocket-bench-noop",
            "response-message": "{\"status\":\"success\"}",
            "trigger-rule": {"match": {
                "type": "payload-hmac-sha256",
                "secret": SECRET,
                "parameter": {"source": "header", "name": "X-Signature"}
            }}
        }]);
        std::fs::write(&hooks, config.to_string())
            .map_err(|e| format!("{}: {e}", hooks.display()))?;
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        let mut cmd = Command::new("webhook");
        cmd.arg("-hooks")
            .arg(&hooks)
            .args(["-ip", "127.0.0.1", "-port", &port.to_string()]);
        let peer = Peer::spawn(cmd, &dir.join("peer.log"), port, rt)?;
        let pid = peer.server.pid;
        let version = Command::new("webhook").arg("-version").output().ok();
        println!(
            "peer: {} (pid {pid}) on {}{PEER_PATH}, one HMAC-SHA256 rule, nothing executed or stored",
            version.map(|v| String::from_utf8_lossy(&v.stdout).trim().to_string()).unwrap_or_default(),
            peer.addr
        );
        Ok(Some(peer))
    }
}

/// Reports (and returns true) if the server has exited on its own.
fn server_gone(server: &mut Server, during: &str) -> bool {
    match server.exited() {
        Some(status) => {
            println!(
                "ABORTED: the server exited on its own ({status}) during {during}; \
                 exit status 0 means it got SIGTERM/SIGINT from someone else (see its log)"
            );
            true
        }
        None => false,
    }
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The status of one GET on a fresh connection.
async fn get_status(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut c = Conn::open(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    Ok(c.roundtrip(req.as_bytes()).await?.status)
}

/// Requests per transaction between two readings of [`group_commit`].
fn print_group_commit(before: Option<(f64, f64)>, after: Option<(f64, f64)>) {
    if let (Some((s0, n0)), Some((s1, n1))) = (before, after) {
        if n1 > n0 {
            println!(
                "group commit: {:.1} requests per transaction ({:.0} transactions)",
                (s1 - s0) / (n1 - n0),
                n1 - n0
            );
        }
    }
}

/// The text of `/metrics`.
async fn metrics_text(addr: &str) -> Option<String> {
    let mut c = Conn::open(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let resp = c.roundtrip(req.as_bytes()).await.ok()?;
    Some(String::from_utf8_lossy(&c.buf[resp.body]).into_owned())
}

/// The value of the series `name` (with its labels, if any) in `text`.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// `rocket_store_group_commit_requests` (sum, count) from `/metrics`.
async fn group_commit(addr: &str) -> Option<(f64, f64)> {
    let text = metrics_text(addr).await?;
    Some((
        metric_value(&text, "rocket_store_group_commit_requests_sum")?,
        metric_value(&text, "rocket_store_group_commit_requests_count")?,
    ))
}

/// A config dir with the shipped sources and rules plus generated copies of
/// learnworlds.yaml, `total` sources in all.
fn make_config_dir(repo: &Path, dir: &Path, total: usize) -> Result<usize, String> {
    let copy_dir = |name: &str| -> Result<Vec<PathBuf>, String> {
        let from = repo.join(name);
        let to = dir.join(name);
        std::fs::create_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        let mut copied = Vec::new();
        for entry in std::fs::read_dir(&from).map_err(|e| format!("{}: {e}", from.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            if entry.file_type().map_err(|e| e.to_string())?.is_file() {
                let dest = to.join(entry.file_name());
                std::fs::copy(entry.path(), &dest)
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
                copied.push(dest);
            }
        }
        Ok(copied)
    };
    copy_dir("rules")?;
    let shipped = copy_dir("sources.d")?
        .iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .count();
    let template = std::fs::read_to_string(repo.join("sources.d/learnworlds.yaml"))
        .map_err(|e| format!("sources.d/learnworlds.yaml: {e}"))?;
    // Top-level `name:` lines (if any) are replaced; the file stem names the rest.
    let body: String = template
        .lines()
        .filter(|l| !l.starts_with("name:") && !l.starts_with("namespace:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let generated = total.saturating_sub(shipped);
    for i in 1..=generated {
        let name = format!("gen_{i:04}");
        let text = format!("name: {name}\n{body}");
        let path = dir.join("sources.d").join(format!("{name}.yaml"));
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(shipped + generated)
}

// ------------------------------------------------------------------ reports

struct RouteReport {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    responses: u64,
    non_2xx: u64,
    errors: u64,
    duplicates: u64,
    cpu_us_per_req: Option<f64>,
    /// Server CPU µs per request by thread name, largest first.
    threads: Vec<(String, f64)>,
    /// The load generator's own CPU µs per request.
    client_us_per_req: Option<f64>,
    /// Share of all CPUs' time busy during the measurement, in percent.
    box_busy: Option<f64>,
    /// The disks' writes per second and MiB written per second.
    disk: Option<(f64, f64)>,
    statuses: BTreeMap<u16, u64>,
    samples: Vec<String>,
}

impl RouteReport {
    /// The server's CPU µs per request, as printed.
    fn cpu(&self) -> String {
        self.cpu_us_per_req
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "n/a".into())
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

struct Ctx {
    addr: Arc<String>,
    pid: u32,
    ticks: f64,
    run: String,
    next_id: Arc<AtomicU64>,
    warmup: Duration,
    measure: Duration,
}

impl Ctx {
    /// The same run and ids, against another server.
    fn on(&self, p: &Peer) -> Ctx {
        Ctx {
            addr: Arc::new(p.addr.clone()),
            pid: p.server.pid,
            ticks: self.ticks,
            run: self.run.clone(),
            next_id: self.next_id.clone(),
            warmup: self.warmup,
            measure: self.measure,
        }
    }
}

/// What refused requests cost the server, against a stored event (`hook`):
/// the hook with a wrong signature (401) on the server measured above; on a
/// second server started with the default limits, one address over its
/// rate limit (429: after its burst, every request is refused), and a new
/// address at every request (through a trusted proxy: each makes and
/// passes its address's bucket, and the source's bucket refuses it).
async fn measure_refusals(
    ctx: &Ctx,
    args: &Args,
    bin: &Path,
    config_dir: &Path,
    dir: &Path,
    conns: usize,
    hook: &RouteReport,
) -> Result<(), String> {
    println!();
    println!(
        "== refused requests, {conns} connection(s), {} s per route ==",
        args.seconds
    );
    print_header();
    let wrong = Target::hook_signed(
        &ctx.addr,
        HOOK_PATH,
        &ctx.run,
        ctx.next_id.clone(),
        "not-the-secret",
    );
    let what = "a wrong signature (401)";
    measure_refused(ctx, wrong, conns, "wrong signature", what, hook).await;

    let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join("limited-server.log");
    let db_url = format!("sqlite://{}", dir.join("limited.db").display());
    let mut cmd = server_command(bin, &addr, &db_url, config_dir, args, &log)?;
    cmd.env("ROCKET_RATE_LIMITS", "on")
        .env("ROCKET_TRUSTED_PROXIES", "127.0.0.1/32");
    let (server, _) = start_server(cmd, bin, &log, &addr).await?;
    let limited = Peer { server, addr };
    println!(
        "second server (pid {}) on {}: the default rate limits (ROCKET_RATE_LIMITS=on), \
         127.0.0.1 a trusted proxy",
        limited.server.pid, limited.addr
    );
    let on = ctx.on(&limited);
    let one = Target::hook(&limited.addr, HOOK_PATH, &ctx.run, ctx.next_id.clone());
    let what = "one address over its rate limit (429)";
    measure_refused(&on, one, conns, "over the rate limit", what, hook).await;
    // Every request from an address not seen before: each makes that
    // address's bucket, passes it, and is refused by the source's bucket.
    let spread = Target::hook_spread(&limited.addr, HOOK_PATH, &ctx.run, ctx.next_id.clone());
    let what = "a new address each, over the source's limit (429)";
    measure_refused(&on, spread, conns, "new address each", what, hook).await;
    Ok(())
}

/// Measures one refused route and prints its row and its cost per refusal.
async fn measure_refused(
    ctx: &Ctx,
    target: Target,
    conns: usize,
    route: &str,
    what: &str,
    hook: &RouteReport,
) {
    let r = measure_route(ctx, &Arc::new(target), conns).await;
    print_row(&format!("POST {HOOK_PATH} ({route})"), &r);
    print_refused(what, &r, hook);
}

fn print_refused(what: &str, r: &RouteReport, hook: &RouteReport) {
    println!(
        "    refused: {} of {} answers; server cpu µs per request refused for {what}: {} (a stored event: {})",
        r.non_2xx,
        r.responses,
        r.cpu(),
        hook.cpu()
    );
}

/// Server CPU µs per request of the threads whose names start with one of
/// `prefixes` (Linux cuts thread names to 15 bytes).
fn threads_us(r: &RouteReport, prefixes: &[&str]) -> f64 {
    r.threads
        .iter()
        .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
        .map(|(_, us)| us)
        .sum()
}

/// Where the hook's CPU goes, against the two reference servers: the
/// request path (tokio threads) against `plain`'s (HTTP, HMAC, JSON) and
/// `durable`'s (the same, handing the row over and waiting for it), and
/// the store's threads against `durable`'s one-row writer.
fn print_budget(h: &RouteReport, plain: &RouteReport, durable: &RouteReport) {
    let path = threads_us(h, &["tokio-"]);
    let store = threads_us(h, &["rocket-sqlite"]);
    println!(
        "where the hook's cpu goes (µs/req): request path {path:.1} (HTTP, HMAC and JSON alone {:.1}; \
         with a durable hand-off {:.1}); store threads {store:.1} (one row alone {:.1})",
        threads_us(plain, &["tokio-"]),
        threads_us(durable, &["tokio-"]),
        threads_us(durable, &["floor-writer"]),
    );
}

/// One line comparing the hook (`h`) with another server's run (`other`).
fn print_against(what: &str, h: &RouteReport, other: &RouteReport) {
    println!(
        "{what}: {:.2}× its req/s ({:.0} against {:.0}), p99 {:.3} against {:.3} ms, \
         cpu µs/req {} against {}",
        h.rps / other.rps,
        h.rps,
        other.rps,
        h.p99_ms,
        other.p99_ms,
        h.cpu(),
        other.cpu()
    );
}

async fn measure_route(ctx: &Ctx, target: &Arc<Target>, conns: usize) -> RouteReport {
    if !ctx.warmup.is_zero() {
        run_phase(
            &ctx.addr,
            target,
            conns,
            Stop::At(Instant::now() + ctx.warmup),
            1024,
        )
        .await;
    }
    let before = cpu_ticks(ctx.pid);
    let threads_before = thread_ticks(ctx.pid);
    let client_before = cpu_ticks(std::process::id());
    let box_before = box_ticks();
    let disk_before = disk_writes();
    let expect = (ctx.measure.as_secs_f64() * 20_000.0) as usize;
    let r = run_phase(
        &ctx.addr,
        target,
        conns,
        Stop::At(Instant::now() + ctx.measure),
        expect,
    )
    .await;
    let after = cpu_ticks(ctx.pid);
    let threads_after = thread_ticks(ctx.pid);
    let client_after = cpu_ticks(std::process::id());
    let box_after = box_ticks();
    let disk_after = disk_writes();
    let mut st = r.stats;
    st.latencies.sort_unstable();
    // CPU µs per answered request, from clock ticks before and after.
    let per_request = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) if st.responses > 0 => {
            Some(a.saturating_sub(b) as f64 / ctx.ticks * 1e6 / st.responses as f64)
        }
        _ => None,
    };
    let cpu_us_per_req = per_request(before, after);
    let mut threads: Vec<(String, f64)> = threads_after
        .into_iter()
        .filter_map(|(name, a)| {
            let us = per_request(threads_before.get(&name).copied().or(Some(0)), Some(a))?;
            (us >= 0.05).then_some((name, us))
        })
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let client_us_per_req = per_request(client_before, client_after);
    let box_busy = match (box_before, box_after) {
        (Some((b_busy, b_all)), Some((a_busy, a_all))) if a_all > b_all => {
            Some(100.0 * (a_busy - b_busy) as f64 / (a_all - b_all) as f64)
        }
        _ => None,
    };
    let seconds = r.elapsed.as_secs_f64();
    let disk = match (disk_before, disk_after) {
        (Some((w0, s0)), Some((w1, s1))) if seconds > 0.0 => Some((
            w1.saturating_sub(w0) as f64 / seconds,
            s1.saturating_sub(s0) as f64 * 512.0 / (1024.0 * 1024.0) / seconds,
        )),
        _ => None,
    };
    RouteReport {
        rps: st.responses as f64 / r.elapsed.as_secs_f64(),
        p50_ms: percentile(&st.latencies, 50.0),
        p99_ms: percentile(&st.latencies, 99.0),
        responses: st.responses,
        non_2xx: st.non_2xx,
        errors: st.errors,
        duplicates: st.duplicates,
        cpu_us_per_req,
        threads,
        client_us_per_req,
        box_busy,
        disk,
        statuses: st.statuses,
        samples: st.samples,
    }
}

fn print_header() {
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>11}",
        "route", "req/s", "p50 ms", "p99 ms", "requests", "non-2xx", "errors", "cpu µs/req"
    );
}

fn print_row(name: &str, r: &RouteReport) {
    println!(
        "{:<44} {:>10.1} {:>9.3} {:>9.3} {:>9} {:>8} {:>7} {:>11}",
        name,
        r.rps,
        r.p50_ms,
        r.p99_ms,
        r.responses,
        r.non_2xx,
        r.errors,
        r.cpu_us_per_req
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "n/a".into())
    );
    if !r.threads.is_empty() {
        let t: Vec<String> = r
            .threads
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        println!("    server cpu µs/req by thread: {}", t.join(", "));
    }
    if let (Some(client), Some(busy)) = (r.client_us_per_req, r.box_busy) {
        println!(
            "    load generator cpu µs/req: {client:.1}; all CPUs busy: {busy:.0}% (the rest idle or waiting on the disk)"
        );
    }
    if let Some((writes, mib)) = r.disk {
        if writes >= 1.0 {
            println!("    disks: {writes:.0} writes/s, {mib:.1} MiB/s written");
        }
    }
    if !r.statuses.is_empty() {
        let s: Vec<String> = r.statuses.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        println!("    statuses: {}", s.join(", "));
    }
    if r.duplicates > 0 {
        println!("    answered as duplicates: {}", r.duplicates);
    }
    for s in &r.samples {
        println!("    e.g. {s}");
    }
}

// --------------------------------------------------------------------- main

/// The server's command line: `serve` on `addr` and `db_url`, with the
/// harness's environment (and no other `ROCKET_` variable of the caller's).
fn server_command(
    bin: &Path,
    addr: &str,
    db_url: &str,
    config_dir: &Path,
    args: &Args,
    log_path: &Path,
) -> Result<Command, String> {
    let log =
        std::fs::File::create(log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ROCKET_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ROCKET_RATE_LIMITS", "off")
        .env("ROCKET_LISTEN", addr)
        .env("ROCKET_DATABASE_URL", db_url)
        .env("ROCKET_CONFIG_DIR", config_dir)
        .env("ROCKET_LOG", &args.log)
        .env("ROCKET_LEARNWORLDS_SECRET", SECRET)
        .env("ROCKET_ADMIN_TOKEN", bulk::ADMIN_TOKEN)
        .envs(args.server_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    Ok(cmd)
}

/// Spawns the server and waits (up to 300 s) for readiness; the time from
/// spawn to ready.
async fn start_server(
    mut cmd: Command,
    bin: &Path,
    log_path: &Path,
    addr: &str,
) -> Result<(Server, Duration), String> {
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut server = Server {
        pid: child.id(),
        child: Some(child),
        log: log_path.to_path_buf(),
    };
    let deadline = spawned + Duration::from_secs(300);
    loop {
        if let Some(status) = server.exited() {
            return Err(format!(
                "the server exited during startup ({status}):\n{}",
                server.log_tail(40)
            ));
        }
        if let Ok(200) = get_status(addr, READY_PATH).await {
            return Ok((server, spawned.elapsed()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{READY_PATH} not 200 after 300 s:\n{}",
                server.log_tail(40)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() -> ExitCode {
    // The harness started as one of its own reference servers.
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--serve-floor") {
        let (Some(kind), Some(addr)) = (argv.get(i + 1), argv.get(i + 2)) else {
            eprintln!("usage: load --serve-floor hmac-json|durable ADDR [DB]");
            return ExitCode::from(2);
        };
        let db = argv.get(i + 3).map(PathBuf::from);
        return match floor::serve(kind, addr, db.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<bool, String> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    if args.build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        println!("$ cargo build --release --bin rocket-rewards");
        let status = Command::new(&cargo)
            .args(["build", "--release", "--bin", "rocket-rewards"])
            .current_dir(&repo)
            .status()
            .map_err(|e| format!("running {cargo}: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build failed: {status}"));
        }
    }
    let bin = repo.join("target/release/rocket-rewards");
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| PathBuf::from(d).join("release/rocket-rewards"))
        .filter(|p| p.exists())
        .unwrap_or(bin);
    if !bin.exists() {
        return Err(format!("{} does not exist", bin.display()));
    }

    let tmp = tempfile::Builder::new()
        .prefix("rocket-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let config_dir = if args.sources > 0 {
        let dir = tmp.path().join("config");
        let n = make_config_dir(&repo, &dir, args.sources)?;
        println!(
            "config dir: {} sources (shipped + generated) in {}",
            n,
            dir.display()
        );
        dir
    } else {
        repo.clone()
    };
    let log_path = args
        .server_log
        .clone()
        .unwrap_or_else(|| tmp.path().join("server.log"));
    let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| tmp.path().join("bench.db"));

    let db_url = format!("sqlite://{}", db.display());
    let cmd = server_command(&bin, &addr, &db_url, &config_dir, &args, &log_path)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;

    if args.bulk > 0 {
        bulk::fill(&db, args.bulk, &rt)?;
        bulk::read_into_page_cache(&db)?;
    }
    let (mut server, startup) = rt.block_on(start_server(cmd, &bin, &log_path, &addr))?;
    let pid = server.pid;

    let ticks = clock_ticks_per_second();
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let ctx = Ctx {
        addr: Arc::new(addr.clone()),
        pid,
        ticks,
        run: run_id.clone(),
        next_id: Arc::new(AtomicU64::new(0)),
        warmup: Duration::from_secs_f64(args.warmup),
        measure: Duration::from_secs_f64(args.seconds),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "server: {} (pid {pid}) on {addr}; db {}; config {}; ROCKET_LOG={}",
        bin.display(),
        db.display(),
        config_dir.display(),
        args.log
    );
    println!(
        "startup: {:.1} ms from spawn to {READY_PATH} = 200; RSS after startup {}",
        startup.as_secs_f64() * 1e3,
        mib(status_kb(pid, "VmRSS"))
    );
    println!(
        "client: {} tokio worker thread(s), {cores} CPU(s) shared with the server; run id {run_id}; \
         {} s per route after {} s warm-up",
        args.client_threads, args.seconds, args.warmup
    );

    let bare = Arc::new(Target::bare(&addr));
    let hook = Arc::new(Target::hook(
        &addr,
        HOOK_PATH,
        &ctx.run,
        ctx.next_id.clone(),
    ));
    let peer = if args.peer {
        Peer::start(tmp.path(), &rt)?
    } else {
        None
    };
    let peer_target = peer.as_ref().map(|p| {
        Arc::new(Target::hook(
            &p.addr,
            PEER_PATH,
            &ctx.run,
            ctx.next_id.clone(),
        ))
    });
    let floors = if args.floor {
        ["hmac-json", "durable"]
            .into_iter()
            .map(|kind| {
                let p = Peer::floor(kind, tmp.path(), &rt)?;
                let t = Arc::new(Target::hook(
                    &p.addr,
                    HOOK_PATH,
                    &ctx.run,
                    ctx.next_id.clone(),
                ));
                println!(
                    "reference server {kind} (pid {}) on {}{HOOK_PATH} (benches/load/floor.rs)",
                    p.server.pid, p.addr
                );
                Ok((kind, p, t))
            })
            .collect::<Result<Vec<_>, String>>()?
    } else {
        Vec::new()
    };
    let mut ok = true;

    rt.block_on(async {
        if args.bulk > 0 && !bulk::wait_for_window(&addr).await {
            ok = false;
            return;
        }
        if args.prefill > 0 {
            let cpu0 = cpu_ticks(pid);
            let started = Arc::new(AtomicU64::new(0));
            let r = run_phase(
                &ctx.addr,
                &hook,
                args.prefill_connections,
                Stop::Count(started, args.prefill),
                args.prefill as usize,
            )
            .await;
            let cpu1 = cpu_ticks(pid);
            let mut lat = r.stats.latencies.clone();
            lat.sort_unstable();
            println!(
                "prefill: {} events through the hook route in {:.1} s ({:.1} req/s, p50 {:.3} ms, p99 {:.3} ms, \
                 {:.1} server cpu µs/req, {} connections): {} non-2xx, {} errors, {} duplicates; peak RSS {}",
                r.stats.responses,
                r.elapsed.as_secs_f64(),
                r.stats.responses as f64 / r.elapsed.as_secs_f64(),
                percentile(&lat, 50.0),
                percentile(&lat, 99.0),
                match (cpu0, cpu1) {
                    (Some(a), Some(b)) if r.stats.responses > 0 =>
                        (b - a) as f64 / ticks * 1e6 / r.stats.responses as f64,
                    _ => f64::NAN,
                },
                args.prefill_connections,
                r.stats.non_2xx,
                r.stats.errors,
                r.stats.duplicates,
                mib(status_kb(pid, "VmHWM")),
            );
            for s in &r.stats.samples {
                println!("    e.g. {s}");
            }
            if r.stats.non_2xx > 0 || r.stats.errors > 0 {
                ok = false;
            }
            if let Ok(meta) = std::fs::metadata(&db) {
                println!("ledger file: {:.1} MiB", meta.len() as f64 / (1024.0 * 1024.0));
            }
        }

        if server_gone(&mut server, "the prefill") {
            ok = false;
            return;
        }
        let mut summary = Vec::new();
        for &conns in &args.connections {
            println!();
            println!(
                "== {conns} connection(s), {} s per route ==",
                args.seconds
            );
            print_header();
            let b = measure_route(&ctx, &bare, conns).await;
            print_row(&format!("GET  {BARE_PATH}"), &b);
            if server_gone(&mut server, "the bare route") {
                ok = false;
                break;
            }
            let before = group_commit(&addr).await;
            let written = written_bytes(pid);
            let h = measure_route(&ctx, &hook, conns).await;
            print_row(&format!("POST {HOOK_PATH}"), &h);
            if let (Some(w0), Some(w1)) = (written, written_bytes(pid)) {
                // Warm-up requests included: an estimate, per request.
                let sent = h.responses.max(1) as f64 * (1.0 + ctx.warmup.as_secs_f64() / ctx.measure.as_secs_f64());
                println!(
                    "written by the server (WAL, checkpoints, responses): about {:.1} KiB per request",
                    (w1 - w0) as f64 / 1024.0 / sent
                );
            }
            print_group_commit(before, group_commit(&addr).await);
            if server_gone(&mut server, "the hook route") {
                ok = false;
                break;
            }
            let ratio = h.rps / b.rps;
            let hook_ok = h.non_2xx == 0 && h.errors == 0 && h.responses > 0 && h.duplicates == 0;
            if !hook_ok {
                ok = false;
            }
            println!(
                "hook/bare req/s ratio: {ratio:.3}{}; hook route: {}; \
                 server peak RSS (VmHWM) so far: {}",
                if hook_ok { "" } else { " (not meaningful: the hook route failed)" },
                if hook_ok { "ok" } else { "FAILURES" },
                mib(status_kb(pid, "VmHWM"))
            );
            if let (Some(p), Some(t)) = (&peer, &peer_target) {
                let pr = measure_route(&ctx.on(p), t, conns).await;
                print_row(&format!("POST {PEER_PATH} (peer: webhook)"), &pr);
                if pr.non_2xx > 0 || pr.errors > 0 {
                    println!("    the peer failed requests: its figures are not comparable");
                }
                print_against("durable hook vs peer", &h, &pr);
            }
            let mut references = Vec::new();
            for (kind, p, t) in &floors {
                let fr = measure_route(&ctx.on(p), t, conns).await;
                print_row(&format!("POST {HOOK_PATH} (reference: {kind})"), &fr);
                if fr.non_2xx > 0 || fr.errors > 0 {
                    println!("    the reference server failed requests: its figures are not comparable");
                }
                print_against(&format!("durable hook vs reference {kind}"), &h, &fr);
                references.push(fr);
            }
            if let [plain, durable] = references.as_slice() {
                print_budget(&h, plain, durable);
            }
            summary.push((conns, b, h, ratio));
        }

        if let (true, Some((conns, _, h, _))) = (args.refusals, summary.first()) {
            let dir = tmp.path();
            if let Err(e) = measure_refusals(&ctx, &args, &bin, &config_dir, dir, *conns, h).await {
                println!("refused requests not measured: {e}");
                ok = false;
            }
        }

        if let Some(url) = &args.postgres {
            let sqlite: Vec<(usize, f64)> = summary.iter().map(|(c, _, h, _)| (*c, h.rps)).collect();
            match postgres::compare(url, &args, &bin, &config_dir, tmp.path(), &ctx, &sqlite).await {
                Ok(true) => {}
                Ok(false) => ok = false,
                Err(e) => {
                    println!("PostgreSQL not measured: {e}");
                    ok = false;
                }
            }
        }

        println!();
        if args.bulk > 0 && args.postgres.is_some() {
            if let Err(e) = bulk::read_into_page_cache(&db) {
                println!("{e}");
            }
        }
        if !bulk::time_reads(&addr).await {
            ok = false;
        }

        if summary.len() > 1 {
            println!();
            println!("== summary ==");
            println!(
                "{:>6} {:>11} {:>9} {:>9} {:>8} {:>11} {:>9} {:>9} {:>8} {:>8} {:>7}",
                "conns", "bare req/s", "p50 ms", "p99 ms", "µs/req", "hook req/s", "p50 ms", "p99 ms", "µs/req", "failed", "ratio"
            );
            for (c, b, h, ratio) in &summary {
                let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
                println!(
                    "{:>6} {:>11.1} {:>9.3} {:>9.3} {:>8} {:>11.1} {:>9.3} {:>9.3} {:>8} {:>8} {:>7.3}",
                    c,
                    b.rps,
                    b.p50_ms,
                    b.p99_ms,
                    f(b.cpu_us_per_req),
                    h.rps,
                    h.p50_ms,
                    h.p99_ms,
                    f(h.cpu_us_per_req),
                    h.non_2xx + h.errors,
                    ratio
                );
            }
        }
    });

    let hwm = status_kb(pid, "VmHWM");
    let total_ids = ctx.next_id.load(Ordering::Relaxed);
    drop(rt);
    println!();
    println!("server peak RSS (VmHWM): {}", mib(hwm));
    println!("hook requests sent in total (prefill + warm-up + measured): {total_ids}");
    match server.terminate() {
        Some((status, took)) => {
            println!(
                "server stopped by SIGTERM in {:.0} ms: {status}",
                took.as_secs_f64() * 1e3
            );
            if !status.success() {
                ok = false;
            }
        }
        None => println!("server already stopped"),
    }
    if !ok {
        println!("FAILED: non-2xx answers or errors on the hook route (or an unclean stop)");
        println!(
            "server log tail ({}):\n{}",
            log_path.display(),
            server.log_tail(30)
        );
    }
    if let Some(p) = &args.server_log {
        println!("server log kept in {}", p.display());
    }
    drop(tmp);
    Ok(ok)
}
