//! `--postgres URL`: after SQLite's run, the same hook on PostgreSQL, in
//! the same process and with the same client, so every such run prints
//! PostgreSQL's throughput as a share of SQLite's. The harness creates a
//! fresh database on the server of `URL` and drops it afterwards.

use std::path::Path;
use std::sync::Arc;

use sqlx::Connection;

use super::{
    free_port, group_commit, measure_route, print_group_commit, print_header, print_row,
    server_command, start_server, Args, Ctx, Target, HOOK_PATH,
};

/// `url` with its database replaced by `name` (its query string, such as
/// `sslmode`, kept).
fn with_database(url: &str, name: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let base = match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    };
    format!("{base}/{name}{query}")
}

/// Starts a server on a new database and measures the hook there at each
/// connection count of `sqlite` (connections, SQLite's req/s), printing
/// the ratio; false when a request failed.
pub(super) async fn compare(
    url: &str,
    args: &Args,
    bin: &Path,
    config_dir: &Path,
    tmp: &Path,
    ctx: &Ctx,
    sqlite: &[(usize, f64)],
) -> Result<bool, String> {
    let name = format!("rocket_bench_{}", ctx.run);
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("--postgres: connecting: {e}"))?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .map_err(|e| format!("creating database {name}: {e}"))?;
    // The database is dropped however the measurement ends.
    let db_url = with_database(url, &name);
    let result = async {
        if args.bulk > 0 {
            super::bulk::fill_postgres(&db_url, args.bulk).await?;
        }
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        let log_path = tmp.join("server-postgres.log");
        let cmd = server_command(bin, &addr, &db_url, config_dir, args, &log_path)?;
        let (mut server, _) = start_server(cmd, bin, &log_path, &addr).await?;
        println!();
        // The database's name only: the URL may hold a password.
        println!(
            "== PostgreSQL (database {name}), {} s per route ==",
            args.seconds
        );
        if args.bulk > 0 && !super::bulk::wait_for_window(&addr).await {
            server.terminate();
            return Ok(false);
        }
        let mut ok = measure_hook(&addr, server.pid, ctx, sqlite).await;
        if args.bulk > 0 {
            println!();
            ok &= super::bulk::time_reads(&addr).await;
        }
        if server.exited().is_some() {
            println!("the PostgreSQL server exited:\n{}", server.log_tail(30));
            ok = false;
        }
        server.terminate();
        Ok(ok)
    }
    .await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .map_err(|e| format!("dropping database {name}: {e}"))?;
    result
}

/// The hook on the PostgreSQL server at `addr` (process `pid`), at each
/// connection count of `sqlite`, with PostgreSQL ÷ SQLite; false when a
/// request failed.
async fn measure_hook(addr: &str, pid: u32, ctx: &Ctx, sqlite: &[(usize, f64)]) -> bool {
    let pg = Ctx {
        addr: Arc::new(addr.to_string()),
        pid,
        ticks: ctx.ticks,
        run: ctx.run.clone(),
        next_id: ctx.next_id.clone(),
        warmup: ctx.warmup,
        measure: ctx.measure,
    };
    let hook = Arc::new(Target::hook(addr, HOOK_PATH, &ctx.run, ctx.next_id.clone()));
    print_header();
    let mut ok = true;
    for &(conns, sqlite_rps) in sqlite {
        let before = group_commit(addr).await;
        let h = measure_route(&pg, &hook, conns).await;
        print_row(&format!("POST {HOOK_PATH} ({conns} conns)"), &h);
        print_group_commit(before, group_commit(addr).await);
        let hook_ok = h.non_2xx == 0 && h.errors == 0 && h.responses > 0 && h.duplicates == 0;
        ok &= hook_ok;
        println!(
            "PostgreSQL ÷ SQLite at {conns} connections: {:.2} ({:.0} against {:.0} req/s){}",
            h.rps / sqlite_rps,
            h.rps,
            sqlite_rps,
            if hook_ok {
                ""
            } else {
                "; FAILURES on PostgreSQL"
            }
        );
    }
    ok
}
