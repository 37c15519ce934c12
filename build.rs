//! `sqlx::migrate!` embeds `migrations/` at compile time, but on stable Rust
//! the macro cannot tell Cargo to watch the folder: a new migration file
//! alone would leave a binary built without it. This makes any change under
//! `migrations/` rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
