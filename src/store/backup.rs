//! An online backup of the SQLite store: `VACUUM INTO` copies one
//! consistent snapshot (a read transaction, so the server keeps writing
//! meanwhile) into a new, compact database file. Every event acknowledged
//! before the backup began is in it: an answer is sent only after its
//! commit, and a snapshot holds every commit before it. PostgreSQL is
//! backed up with its own tools (`pg_dump`).

use std::path::{Path, PathBuf};

use super::{Pool, Store, StoreError};

impl Store {
    /// Writes a consistent copy of the store to `dest` (a new file: an
    /// existing one is never overwritten); returns its size in bytes. The
    /// copy is written beside `dest` and linked into place once synced, so
    /// `dest` is either absent or whole.
    pub async fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Err(StoreError::Refused(
                "this is a PostgreSQL store: back it up with pg_dump (see docs/storage.md)".into(),
            ));
        };
        if dest.exists() {
            return Err(StoreError::Refused(format!(
                "{} exists; a backup never overwrites a file",
                dest.display()
            )));
        }
        let partial = partial_path(dest);
        let _ = std::fs::remove_file(&partial);
        let target = partial
            .to_str()
            .ok_or_else(|| StoreError::Refused(format!("{} is not UTF-8", partial.display())))?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(pool)
            .await?;
        let io = |what: &str, e: std::io::Error| {
            let _ = std::fs::remove_file(&partial);
            StoreError::Refused(format!("{what} {}: {e}", partial.display()))
        };
        let file = std::fs::File::open(&partial).map_err(|e| io("cannot open", e))?;
        file.sync_all().map_err(|e| io("cannot sync", e))?;
        let size = file.metadata().map_err(|e| io("cannot read", e))?.len();
        // A hard link fails if `dest` appeared meanwhile: never overwritten.
        // Where the filesystem has no hard links (FAT, many SMB shares), a
        // rename after checking again.
        match std::fs::hard_link(&partial, dest) {
            Ok(()) => {
                let _ = std::fs::remove_file(&partial);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists || dest.exists() => {
                return Err(io("cannot move into place", e));
            }
            Err(_) => {
                std::fs::rename(&partial, dest).map_err(|e| io("cannot move into place", e))?
            }
        }
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself must survive a power cut.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(size)
    }
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}
