//! Two reference servers measured beside the hook, to show where its time
//! goes (issue 19, item 2): the least a poem server must do to answer a
//! signed webhook, and the least it must do to store one durably.
//!
//! - `hmac-json`: one poem route that checks the `X-Signature` HMAC-SHA256
//!   of the body (constant-time), parses the body as JSON, reads its `id`
//!   and answers 202 with a small JSON body. No middleware, no mapping, no
//!   rules, no store.
//! - `durable`: the same, then the event's id and body go to a writer
//!   thread that inserts them, as one row each, into a one-table SQLite
//!   file (WAL, `synchronous = FULL`: each commit is on disk before its
//!   answers) in group commits of everything waiting, and the answer waits
//!   for that commit. It is what one row costs alone: no second table, no
//!   index but the key, no counters.
//!
//! The harness runs its own binary as these servers (`--serve-floor KIND
//! ADDR [DB]`), so they are built by the same compiler with the same
//! allocator as the hook's server (the crate's, linked through `bulk`).

use std::path::Path;
use std::sync::Arc;

use hmac::Mac;
use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::web::Data;
use poem::{handler, post, EndpointExt, Request, Response, Route};
use tokio::sync::{mpsc, oneshot};

use super::{HmacSha256, HOOK_PATH, SECRET};

/// Most rows in one transaction of the `durable` server.
const MAX_GROUP: usize = 256;

/// A row for the writer thread and where its answer goes.
type Job = (String, Vec<u8>, oneshot::Sender<Result<(), String>>);

struct Floor {
    key: HmacSha256,
    writer: Option<mpsc::Sender<Job>>,
}

/// Runs a reference server until the process is killed.
pub fn serve(kind: &str, addr: &str, db: Option<&Path>) -> Result<(), String> {
    let writer = match (kind, db) {
        ("hmac-json", _) => None,
        ("durable", Some(db)) => Some(spawn_writer(db)?),
        ("durable", None) => return Err("--serve-floor durable needs a database file".into()),
        (other, _) => return Err(format!("--serve-floor: unknown kind {other:?}")),
    };
    let floor = Arc::new(Floor {
        key: HmacSha256::new_from_slice(SECRET.as_bytes()).expect("any key length"),
        writer,
    });
    let app = Route::new().at(HOOK_PATH, post(hook)).data(floor);
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(poem::Server::new(TcpListener::bind(addr)).run(app))
        .map_err(|e| format!("serving on {addr}: {e}"))
}

fn answer(status: StatusCode, body: &'static str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body)
}

#[handler]
async fn hook(req: &Request, body: Vec<u8>, floor: Data<&Arc<Floor>>) -> Response {
    let tag = req
        .headers()
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|hex_tag| hex::decode(hex_tag).ok());
    let mut mac = floor.key.clone();
    mac.update(&body);
    if tag.is_none_or(|t| mac.verify_slice(&t).is_err()) {
        return answer(StatusCode::UNAUTHORIZED, r#"{"error":"bad signature"}"#);
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return answer(StatusCode::BAD_REQUEST, r#"{"error":"not JSON"}"#);
    };
    let Some(id) = event.get("id").and_then(|v| v.as_str()) else {
        return answer(StatusCode::BAD_REQUEST, r#"{"error":"no id"}"#);
    };
    if let Some(writer) = &floor.writer {
        let (tx, rx) = oneshot::channel();
        if writer.send((id.to_string(), body, tx)).await.is_err() {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"writer gone"}"#,
            );
        }
        if !matches!(rx.await, Ok(Ok(()))) {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"not stored"}"#,
            );
        }
    }
    answer(StatusCode::ACCEPTED, r#"{"status":"accepted"}"#)
}

fn spawn_writer(db: &Path) -> Result<mpsc::Sender<Job>, String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
    conn.pragma_update(None, "journal_mode", "wal")
        .and_then(|_| conn.pragma_update(None, "synchronous", "full"))
        .and_then(|_| {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS hooks (id TEXT PRIMARY KEY, body BLOB NOT NULL)",
            )
        })
        .map_err(|e| format!("{}: {e}", db.display()))?;
    let (tx, rx) = mpsc::channel::<Job>(4096);
    std::thread::Builder::new()
        .name("floor-writer".into())
        .spawn(move || write_loop(conn, rx))
        .map_err(|e| format!("writer thread: {e}"))?;
    Ok(tx)
}

/// Takes everything waiting (up to [`MAX_GROUP`]), inserts it in one
/// transaction, and answers after the commit.
fn write_loop(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let outcome = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT OR IGNORE INTO hooks (id, body) VALUES (?1, ?2)")?;
                for (id, body, _) in &jobs {
                    insert.execute(rusqlite::params![id, body])?;
                }
            }
            tx.commit()
        })()
        .map_err(|e| e.to_string());
        for (_, _, reply) in jobs {
            let _ = reply.send(outcome.clone());
        }
    }
}
