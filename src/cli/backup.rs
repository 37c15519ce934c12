//! `backup FILE`: a consistent copy of the SQLite store taken while the
//! server serves (see `store::backup`). To restore: stop the server, put
//! the file at the database path (removing any `-wal` and `-shm` beside
//! it), start the server.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::settings::DEFAULT_DATABASE_URL;
use crate::store::Store;

#[derive(clap::Args)]
pub struct BackupArgs {
    /// The file to write (must not exist).
    pub file: PathBuf,
    #[arg(long, env = "ROCKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect_existing(&args.database_url).await?;
    let size = store.backup(&args.file).await;
    store.close().await;
    println!("backed up to {} ({} bytes)", args.file.display(), size?);
    Ok(ExitCode::SUCCESS)
}
