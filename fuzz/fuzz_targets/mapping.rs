//! Decode, map and score (rhai rules) with the shipped config: every source
//! gets the arbitrary bytes as JSON, and as a form where it takes forms.
//!
//! Property: `prepare` never panics (nor hangs: run with -timeout).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use chrono::Utc;
use libfuzzer_sys::fuzz_target;
use rocket_rewards::config::{self, Config};
use rocket_rewards::pipeline::{limits::DEFAULT_SOURCE, prepare};
use rocket_rewards::settings::SecretEnv;

const FORM: &str = "application/x-www-form-urlencoded";

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        match config::load(root, &SecretEnv::default(), DEFAULT_SOURCE) {
            Ok(c) => c,
            Err(e) => panic!("the shipped config does not load: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let config = config();
    let body = Bytes::copy_from_slice(data);
    let now = Utc::now();
    for name in config.source_names() {
        let source = config.source(name).expect("listed source");
        let _ = prepare(config, source, Some("application/json"), &body, now);
        if source.accepts(Some(FORM)) {
            let _ = prepare(config, source, Some(FORM), &body, now);
        }
    }
});
