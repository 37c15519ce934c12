//! Body decoding: arbitrary bytes as JSON and as a form, batch or not.
//!
//! Properties: nothing panics (`format_of` on the bytes as a content type
//! included); a decoded body is one object, or for a batch 1..=MAX_BATCH
//! objects; and `parse_strict` agrees with serde_json wherever it accepts
//! (it only ever refuses more: duplicate keys).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rocket_rewards::pipeline::decode::{decode, format_of, parse_strict, BodyFormat, MAX_BATCH};
use serde_json::Value;

/// `FUZZ_ASCII_CONTENT_TYPES=1` gives `format_of` only ASCII (what a
/// request header can carry), to fuzz past its non-ASCII slicing panic
/// while that is open. Unset, every string is tried.
fn ascii_only() -> bool {
    static ASCII: OnceLock<bool> = OnceLock::new();
    *ASCII.get_or_init(|| std::env::var_os("FUZZ_ASCII_CONTENT_TYPES").is_some_and(|v| v == "1"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if !ascii_only() || text.is_ascii() {
        let _ = format_of(&text);
    }

    if let Ok(strict) = parse_strict(data) {
        let loose: Value = serde_json::from_slice(data)
            .expect("parse_strict accepted a body serde_json refuses");
        assert_eq!(strict, loose, "parse_strict and serde_json disagree");
    }

    for format in [BodyFormat::Json, BodyFormat::Form] {
        for batch in [false, true] {
            if let Ok(docs) = decode(format, data, batch) {
                assert!(!docs.is_empty(), "decoded to no document");
                assert!(docs.iter().all(Value::is_object), "decoded a non-object");
                if !batch || format == BodyFormat::Form {
                    assert_eq!(docs.len(), 1, "only a JSON batch yields several");
                } else {
                    assert!(docs.len() <= MAX_BATCH, "batch over MAX_BATCH");
                }
            }
        }
    }
});
