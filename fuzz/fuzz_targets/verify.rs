//! Signature verification on raw bytes.
//!
//! Properties:
//! 1. No scheme (bearer, HMAC hex/base64 with or without a timestamp,
//!    Standard Webhooks) panics on any headers, body, secrets, tolerance or
//!    clock, nor does `verify_any` over all of them.
//! 2. A body signed the way a sender signs it (`sign_hex`) always verifies,
//!    under its own scheme and under `verify_any` of every scheme; and a
//!    single changed byte of the body (an appended byte for an empty body)
//!    never does, and fails as a `Mismatch`.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use poem::http::{HeaderMap, HeaderName, HeaderValue};
use rocket_rewards::pipeline::verify::{sign_hex, verify_any, AuthError, AuthScheme, SigEncoding};
use rocket_rewards::settings::Secret;

/// Header names the schemes read, plus one they do not.
const NAMES: [&str; 7] = [
    "authorization",
    "x-signature",
    "x-timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-other",
];

#[derive(Arbitrary, Debug)]
struct Input {
    // Part 1: arbitrary everything.
    secrets: Vec<String>,
    sw_secrets: Vec<String>,
    prefix: String,
    tolerance: i64,
    now: i64,
    headers: Vec<(u8, Vec<u8>)>,
    body: Vec<u8>,
    // Part 2: a correctly signed request.
    keys: Vec<Vec<u8>>,
    signer: u8,
    sign_prefix: Vec<u8>,
    token: Vec<u8>,
    webhook_id: Vec<u8>,
    sign_tolerance: u32,
    ts_offset: i64,
    sign_now: i64,
    flip_at: usize,
    flip_xor: u8,
}

fn header_map(pairs: &[(u8, Vec<u8>)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs.iter().take(16) {
        let name = HeaderName::from_static(NAMES[*n as usize % NAMES.len()]);
        if let Ok(value) = HeaderValue::from_bytes(v) {
            h.append(name, value);
        }
    }
    h
}

fn schemes(secrets: &[Secret], sw: &[Secret], prefix: &str, tolerance: i64) -> Vec<AuthScheme> {
    let sig = || HeaderName::from_static("x-signature");
    let ts = || HeaderName::from_static("x-timestamp");
    let mut out = vec![
        AuthScheme::bearer("ROCKET_FUZZ_TOKEN", secrets),
        AuthScheme::hmac("ROCKET_FUZZ_HEX", sig(), prefix.to_string(), SigEncoding::Hex, secrets),
        AuthScheme::hmac("ROCKET_FUZZ_B64", sig(), prefix.to_string(), SigEncoding::Base64, secrets),
        AuthScheme::hmac("ROCKET_FUZZ_TSHEX", sig(), prefix.to_string(), SigEncoding::Hex, secrets)
            .with_timestamp(ts(), tolerance),
        AuthScheme::hmac("ROCKET_FUZZ_TSB64", sig(), prefix.to_string(), SigEncoding::Base64, secrets)
            .with_timestamp(ts(), tolerance),
    ];
    if let Ok(s) = AuthScheme::standard_webhooks("ROCKET_FUZZ_SW", sw, tolerance) {
        out.push(s);
    }
    out
}

/// Printable ASCII without spaces: what survives a header's trim intact.
fn graphic(bytes: &[u8], fallback: &str) -> String {
    let s: String = bytes
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .map(|&b| b as char)
        .take(64)
        .collect();
    if s.is_empty() {
        fallback.to_string()
    } else {
        s
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tampered(body: &[u8], at: usize, xor: u8) -> Vec<u8> {
    let mut out = body.to_vec();
    if out.is_empty() {
        out.push(xor);
    } else {
        let i = at % out.len();
        out[i] ^= if xor == 0 { 1 } else { xor };
    }
    out
}

fn must_verify(scheme: &AuthScheme, all: &[AuthScheme], h: &HeaderMap, body: &[u8], now: i64, bad: &[u8]) {
    assert_eq!(scheme.verify(h, body, now), Ok(()), "{scheme:?}: a signed body must verify");
    assert_eq!(verify_any(all, h, body, now), Ok(()), "verify_any must accept a signed body");
    assert_eq!(
        scheme.verify(h, bad, now),
        Err(AuthError::Mismatch),
        "{scheme:?}: a changed byte must not verify"
    );
}

fuzz_target!(|input: Input| {
    // 1. Arbitrary input: never panics.
    let secrets: Vec<Secret> = input.secrets.iter().take(4).map(Secret::new).collect();
    let sw: Vec<Secret> = input.sw_secrets.iter().take(4).map(Secret::new).collect();
    let all = schemes(&secrets, &sw, &input.prefix, input.tolerance);
    let h = header_map(&input.headers);
    for s in &all {
        let _ = s.verify(&h, &input.body, input.now);
        let _ = s.is_configured();
        let _ = format!("{s:?}");
    }
    let _ = verify_any(&all, &h, &input.body, input.now);

    // 2. A correctly signed body verifies; a changed one does not.
    let mut keys: Vec<Vec<u8>> = input.keys.iter().take(4).cloned().collect();
    if keys.is_empty() {
        keys.push(b"fuzz-secret".to_vec());
    }
    let k = &keys[input.signer as usize % keys.len()];
    // Secrets are env strings: use a UTF-8 form of each key.
    let key_texts: Vec<String> = keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    let key_text = &key_texts[input.signer as usize % keys.len()];
    let hmac_secrets: Vec<Secret> = key_texts.iter().map(Secret::new).collect();
    let sw_secrets: Vec<Secret> = keys.iter().map(|k| Secret::new(format!("whsec_{}", b64(k)))).collect();
    let prefix = String::from_utf8_lossy(&input.sign_prefix)
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(16)
        .collect::<String>();
    let tolerance = i64::from(input.sign_tolerance % 86_400);
    let now = input.sign_now.clamp(-(1 << 40), 1 << 40);
    let ts = now + input.ts_offset.rem_euclid(2 * tolerance + 1) - tolerance;
    let body = &input.body;
    let bad = tampered(body, input.flip_at, input.flip_xor);

    let token = graphic(&input.token, "fuzz-token");
    let mut signed_schemes = schemes(&hmac_secrets, &sw_secrets, &prefix, tolerance);
    // Bearer's own token list is separate from the HMAC keys.
    signed_schemes[0] = AuthScheme::bearer("ROCKET_FUZZ_TOKEN", &[Secret::new(token.clone())]);
    let all = signed_schemes;

    // Bearer: the token verifies whatever the body.
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    assert_eq!(all[0].verify(&h, body, now), Ok(()), "bearer token must verify");
    assert_eq!(all[0].verify(&h, &bad, now), Ok(()), "bearer ignores the body");

    let digest = hex::decode(sign_hex(key_text.as_bytes(), body)).unwrap();
    // HMAC, hex.
    let mut h = HeaderMap::new();
    h.insert(
        "x-signature",
        HeaderValue::from_str(&format!("{prefix}{}", hex::encode(&digest))).unwrap(),
    );
    must_verify(&all[1], &all, &h, body, now, &bad);
    // HMAC, base64.
    let mut h = HeaderMap::new();
    h.insert("x-signature", HeaderValue::from_str(&format!("{prefix}{}", b64(&digest))).unwrap());
    must_verify(&all[2], &all, &h, body, now, &bad);

    // Timestamped HMAC over `<ts>.<body>`.
    let mut content = format!("{ts}.").into_bytes();
    content.extend_from_slice(body);
    let ts_digest = hex::decode(sign_hex(key_text.as_bytes(), &content)).unwrap();
    for (scheme, sig) in [
        (&all[3], hex::encode(&ts_digest)),
        (&all[4], b64(&ts_digest)),
    ] {
        let mut h = HeaderMap::new();
        h.insert("x-signature", HeaderValue::from_str(&format!("{prefix}{sig}")).unwrap());
        h.insert("x-timestamp", HeaderValue::from_str(&ts.to_string()).unwrap());
        must_verify(scheme, &all, &h, body, now, &bad);
    }

    // Standard Webhooks over `<id>.<ts>.<body>`, raw key bytes.
    let id = graphic(&input.webhook_id, "msg_fuzz");
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(body);
    let sw_sig = b64(&hex::decode(sign_hex(k, &content)).unwrap());
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(&id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from_str(&ts.to_string()).unwrap());
    h.insert("webhook-signature", HeaderValue::from_str(&format!("v1,{sw_sig}")).unwrap());
    let sw_scheme = all
        .iter()
        .find(|s| s.kind() == "standard_webhooks")
        .expect("whsec_<base64> secrets always build");
    must_verify(sw_scheme, &all, &h, body, now, &bad);
});
