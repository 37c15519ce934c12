//! `erase`: a learner's events, raw bodies, ledger entries and total
//! removed in one transaction, as `DELETE /api/admin/users/{namespace}/{user_id}`
//! does; safe while the server serves.

use std::process::ExitCode;

use crate::settings::DEFAULT_DATABASE_URL;
use crate::store::Store;

#[derive(clap::Args)]
pub struct EraseArgs {
    /// The namespace (a source's name unless its file sets another).
    #[arg(long)]
    pub namespace: String,
    /// The learner's id in that namespace.
    #[arg(long)]
    pub user: String,
    #[arg(long, env = "ROCKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

pub async fn run(args: EraseArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect_existing(&args.database_url).await?;
    let erased = store.erase_user(&args.namespace, &args.user).await?;
    println!(
        "erased in {}: {} events, {} ledger entries, {} points",
        args.namespace, erased.events, erased.ledger_entries, erased.points
    );
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
