//! Authentication on the raw request bytes, before anything is parsed.
//!
//! Bearer tokens are compared as SHA-256 digests in constant time (so neither
//! content nor length leaks); HMAC signatures are decoded from the header and
//! checked with the MAC's own constant-time `verify_slice`. Keyed MAC states
//! are built once at config load and cloned per request.

use hmac::{Hmac, Mac};
use poem::http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secrets::{Origin, Secret, SecretRef};

/// Where a scheme's secret is (as the config says), and where its values
/// were found at the last load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSource {
    pub reference: SecretRef,
    pub origin: Origin,
}

impl From<&str> for SecretSource {
    /// An environment variable's.
    fn from(name: &str) -> Self {
        SecretSource {
            reference: SecretRef::Env(name.to_string()),
            origin: Origin::Env(name.to_string()),
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// How a signature is written in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigEncoding {
    Hex,
    Base64,
}

/// What a request offers as proof: its headers, query string and raw body,
/// and the token found in its body for a source that takes one there.
#[derive(Clone, Copy)]
pub struct Presented<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub body_token: Option<&'a str>,
}

impl<'a> Presented<'a> {
    /// Headers and body only (no query string, no body token).
    pub fn new(headers: &'a HeaderMap, body: &'a [u8]) -> Self {
        Presented {
            headers,
            query: None,
            body,
            body_token: None,
        }
    }
}

/// One way a source may prove a request is its own. A source may accept
/// several; the first that verifies wins.
#[derive(Clone)]
pub enum AuthScheme {
    /// `Authorization: Bearer <token>`; any token of the list.
    Bearer {
        secret: SecretSource,
        digests: Vec<[u8; 32]>,
    },
    /// A pre-shared value in `header`, after `prefix` (LearnWorlds'
    /// `Learnworlds-Webhook-Signature: v1=<value>`).
    Header {
        secret: SecretSource,
        header: HeaderName,
        prefix: String,
        digests: Vec<[u8; 32]>,
    },
    /// `Authorization: Basic <base64(user:password)>` (LRS clients): a
    /// secret value `user:password` must match whole; a value without a
    /// colon is a password that any user name may present.
    Basic {
        secret: SecretSource,
        pairs: Vec<[u8; 32]>,
        passwords: Vec<[u8; 32]>,
    },
    /// A token in a body field (plugins that cannot set headers); the field
    /// is removed before the event is mapped or stored.
    BodyField {
        secret: SecretSource,
        /// The field's path as member names from the top (`$.a.b`: a, b).
        field: Vec<String>,
        digests: Vec<[u8; 32]>,
    },
    /// A token in a query parameter (platforms whose webhook form takes only
    /// a URL); never logged.
    Query {
        secret: SecretSource,
        param: String,
        digests: Vec<[u8; 32]>,
    },
    /// HMAC-SHA256 over the raw body in `header`, after `prefix`. With a
    /// timestamp header, the signed content is `<timestamp>.<body>` and the
    /// timestamp must be within the tolerance of now (replay protection).
    Hmac {
        secret: SecretSource,
        header: HeaderName,
        prefix: String,
        encoding: SigEncoding,
        keys: Vec<HmacSha256>,
        timestamp: Option<(HeaderName, i64)>,
    },
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` (Unix seconds,
    /// within the tolerance, past or future) and `webhook-signature`
    /// (space-separated `v1,<base64>`) over `<id>.<timestamp>.<body>`.
    StandardWebhooks {
        secret: SecretSource,
        keys: Vec<HmacSha256>,
        tolerance: i64,
    },
}

impl AuthScheme {
    /// The request header that carries this scheme's credential, if any.
    pub fn credential_header(&self) -> Option<&str> {
        match self {
            AuthScheme::Bearer { .. } | AuthScheme::Basic { .. } => Some("authorization"),
            AuthScheme::Header { header, .. } | AuthScheme::Hmac { header, .. } => {
                Some(header.as_str())
            }
            AuthScheme::StandardWebhooks { .. } => Some("webhook-signature"),
            AuthScheme::BodyField { .. } | AuthScheme::Query { .. } => None,
        }
    }

    /// The query parameter that carries this scheme's credential, if any.
    pub fn query_param(&self) -> Option<&str> {
        match self {
            AuthScheme::Query { param, .. } => Some(param),
            _ => None,
        }
    }
}

impl std::fmt::Debug for AuthScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthScheme::Bearer { secret, digests } => f
                .debug_struct("Bearer")
                .field("secret", &secret.origin)
                .field("tokens", &digests.len())
                .finish(),
            AuthScheme::Basic {
                secret,
                pairs,
                passwords,
            } => f
                .debug_struct("Basic")
                .field("secret", &secret.origin)
                .field("pairs", &pairs.len())
                .field("passwords", &passwords.len())
                .finish(),
            AuthScheme::Header {
                secret,
                header,
                prefix,
                digests,
            } => f
                .debug_struct("Header")
                .field("secret", &secret.origin)
                .field("header", header)
                .field("prefix", prefix)
                .field("values", &digests.len())
                .finish(),
            AuthScheme::BodyField {
                secret,
                field,
                digests,
            } => f
                .debug_struct("BodyField")
                .field("secret", &secret.origin)
                .field("field", &field.join("."))
                .field("tokens", &digests.len())
                .finish(),
            AuthScheme::Query {
                secret,
                param,
                digests,
            } => f
                .debug_struct("Query")
                .field("secret", &secret.origin)
                .field("param", param)
                .field("tokens", &digests.len())
                .finish(),
            AuthScheme::Hmac {
                secret,
                header,
                prefix,
                encoding,
                keys,
                timestamp,
            } => f
                .debug_struct("Hmac")
                .field("secret", &secret.origin)
                .field("header", header)
                .field("prefix", prefix)
                .field("encoding", encoding)
                .field("secrets", &keys.len())
                .field("timestamp", timestamp)
                .finish(),
            AuthScheme::StandardWebhooks {
                secret,
                keys,
                tolerance,
            } => f
                .debug_struct("StandardWebhooks")
                .field("secret", &secret.origin)
                .field("secrets", &keys.len())
                .field("tolerance", tolerance)
                .finish(),
        }
    }
}

/// Why a request failed authentication. The variant name is the metric and
/// log reason; none of them carries a secret or a computed signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials are configured for this source")]
    NotConfigured,
    #[error("the credentials are missing")]
    MissingHeader,
    #[error("the authentication header is malformed")]
    Malformed,
    #[error("the credentials do not match")]
    Mismatch,
    #[error("the timestamp is outside the accepted window")]
    Stale,
}

impl AuthError {
    /// A closed set of reasons, safe as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::NotConfigured => "not_configured",
            AuthError::MissingHeader => "missing_header",
            AuthError::Malformed => "malformed",
            AuthError::Mismatch => "mismatch",
            AuthError::Stale => "stale_timestamp",
        }
    }
}

pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The digests of a secret's values, compared in constant time.
pub fn digests(values: &[Secret]) -> Vec<[u8; 32]> {
    values
        .iter()
        .map(|t| token_digest(t.expose().as_bytes()))
        .collect()
}

impl AuthScheme {
    /// HTTP Basic: values with a colon are `user:password` pairs, others
    /// passwords for any user name.
    pub fn basic(secret: impl Into<SecretSource>, values: &[Secret]) -> Self {
        let (pairs, passwords): (Vec<Secret>, Vec<Secret>) = values
            .iter()
            .cloned()
            .partition(|v| v.expose().contains(':'));
        AuthScheme::Basic {
            secret: secret.into(),
            pairs: digests(&pairs),
            passwords: digests(&passwords),
        }
    }

    pub fn bearer(secret: impl Into<SecretSource>, tokens: &[Secret]) -> Self {
        AuthScheme::Bearer {
            secret: secret.into(),
            digests: digests(tokens),
        }
    }

    pub fn hmac(
        secret: impl Into<SecretSource>,
        header: HeaderName,
        prefix: String,
        encoding: SigEncoding,
        secrets: &[Secret],
    ) -> Self {
        let keys = secrets
            .iter()
            .filter_map(|s| HmacSha256::new_from_slice(s.expose().as_bytes()).ok())
            .collect();
        AuthScheme::Hmac {
            secret: secret.into(),
            header,
            prefix,
            encoding,
            keys,
            timestamp: None,
        }
    }

    /// Requires a timestamp header within `tolerance` seconds; the signed
    /// content becomes `<timestamp>.<body>`.
    pub fn with_timestamp(mut self, name: HeaderName, tolerance: i64) -> Self {
        if let AuthScheme::Hmac { timestamp, .. } = &mut self {
            *timestamp = Some((name, tolerance));
        }
        self
    }

    /// A Standard Webhooks scheme. Secrets are `whsec_<base64>` (or plain
    /// base64); `Err` names the index of a secret that does not decode.
    pub fn standard_webhooks(
        secret: impl Into<SecretSource>,
        secrets: &[Secret],
        tolerance: i64,
    ) -> Result<Self, usize> {
        use base64::Engine as _;
        let mut keys = Vec::with_capacity(secrets.len());
        for (i, s) in secrets.iter().enumerate() {
            let text = s.expose();
            let b64 = text.strip_prefix("whsec_").unwrap_or(text);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| i)?;
            keys.push(HmacSha256::new_from_slice(&raw).map_err(|_| i)?);
        }
        Ok(AuthScheme::StandardWebhooks {
            secret: secret.into(),
            keys,
            tolerance,
        })
    }

    /// Where this scheme's secret is, and where its values were found.
    pub fn secret(&self) -> &SecretSource {
        match self {
            AuthScheme::Bearer { secret, .. }
            | AuthScheme::Header { secret, .. }
            | AuthScheme::Basic { secret, .. }
            | AuthScheme::BodyField { secret, .. }
            | AuthScheme::Query { secret, .. }
            | AuthScheme::Hmac { secret, .. }
            | AuthScheme::StandardWebhooks { secret, .. } => secret,
        }
    }

    /// How many values the secret holds (rotation), never what they are.
    pub fn values(&self) -> usize {
        match self {
            AuthScheme::Basic {
                pairs, passwords, ..
            } => pairs.len() + passwords.len(),
            AuthScheme::Bearer { digests, .. }
            | AuthScheme::Header { digests, .. }
            | AuthScheme::BodyField { digests, .. }
            | AuthScheme::Query { digests, .. } => digests.len(),
            AuthScheme::Hmac { keys, .. } | AuthScheme::StandardWebhooks { keys, .. } => keys.len(),
        }
    }

    pub fn is_configured(&self) -> bool {
        match self {
            AuthScheme::Basic {
                pairs, passwords, ..
            } => !pairs.is_empty() || !passwords.is_empty(),
            AuthScheme::Bearer { digests, .. }
            | AuthScheme::Header { digests, .. }
            | AuthScheme::BodyField { digests, .. }
            | AuthScheme::Query { digests, .. } => !digests.is_empty(),
            AuthScheme::Hmac { keys, .. } | AuthScheme::StandardWebhooks { keys, .. } => {
                !keys.is_empty()
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AuthScheme::Bearer { .. } => "bearer",
            AuthScheme::Header { .. } => "header",
            AuthScheme::Basic { .. } => "basic",
            AuthScheme::BodyField { .. } => "body_token",
            AuthScheme::Query { .. } => "query_token",
            AuthScheme::Hmac { .. } => "hmac",
            AuthScheme::StandardWebhooks { .. } => "standard_webhooks",
        }
    }

    /// Checks headers and body against this scheme; `now` is Unix seconds.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
        self.verify_request(&Presented::new(headers, body), now)
    }

    /// Checks one request against this scheme; `now` is Unix seconds.
    pub fn verify_request(&self, p: &Presented<'_>, now: i64) -> Result<(), AuthError> {
        if !self.is_configured() {
            return Err(AuthError::NotConfigured);
        }
        let (headers, body) = (p.headers, p.body);
        match self {
            AuthScheme::Bearer { digests, .. } => {
                let token = bearer_token(headers)?;
                check_bearer(digests, token.as_bytes())
            }
            AuthScheme::Header {
                header,
                prefix,
                digests,
                ..
            } => {
                let value = header_str(headers, header)?;
                check_bearer(digests, strip_prefix(value, prefix)?.as_bytes())
            }
            AuthScheme::Basic {
                pairs, passwords, ..
            } => check_basic(pairs, passwords, &basic_credentials(headers)?),
            AuthScheme::BodyField { digests, .. } => {
                let token = p.body_token.ok_or(AuthError::MissingHeader)?;
                check_bearer(digests, token.as_bytes())
            }
            AuthScheme::Query { param, digests, .. } => {
                let token = query_param(p.query, param)?;
                check_bearer(digests, token.as_bytes())
            }
            AuthScheme::Hmac {
                header,
                prefix,
                encoding,
                keys,
                timestamp,
                ..
            } => {
                let value = header_str(headers, header)?;
                let sig = decode_signature(value, prefix, *encoding)?;
                match timestamp {
                    None => check_hmac(keys, &[body], &sig),
                    Some((name, tolerance)) => {
                        let ts = header_str(headers, name)?;
                        check_time(ts, now, *tolerance)?;
                        check_hmac(keys, &[ts.as_bytes(), b".", body], &sig)
                    }
                }
            }
            AuthScheme::StandardWebhooks {
                keys, tolerance, ..
            } => check_standard_webhooks(keys, *tolerance, headers, body, now),
        }
    }
}

/// `user:password` against whole pairs and bare passwords; both lists are
/// checked, so timing does not tell which kind matched.
fn check_basic(pairs: &[[u8; 32]], passwords: &[[u8; 32]], pair: &[u8]) -> Result<(), AuthError> {
    let colon = pair.iter().position(|b| *b == b':').unwrap_or(0);
    let whole = check_bearer(pairs, pair).is_ok();
    let password = check_bearer(passwords, &pair[colon + 1..]).is_ok();
    if whole | password {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// Standard Webhooks: any `v1,<base64>` signature of
/// `<id>.<timestamp>.<body>`, the timestamp within the tolerance.
fn check_standard_webhooks(
    keys: &[HmacSha256],
    tolerance: i64,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), AuthError> {
    let id = header_str(headers, &HeaderName::from_static("webhook-id"))?;
    let ts = header_str(headers, &HeaderName::from_static("webhook-timestamp"))?;
    let sigs = header_str(headers, &HeaderName::from_static("webhook-signature"))?;
    check_time(ts, now, tolerance)?;
    let mut candidates = Vec::new();
    for part in sigs.split(' ').filter(|p| !p.is_empty()) {
        if let Some(b64) = part.strip_prefix("v1,") {
            use base64::Engine as _;
            if let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) {
                if sig.len() == 32 {
                    candidates.push(sig);
                }
            }
        }
    }
    if candidates.is_empty() {
        return Err(AuthError::Malformed);
    }
    let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
    let mut ok = false;
    for sig in &candidates {
        ok |= check_hmac(keys, &parts, sig).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// A request as a sender makes it for one scheme: the body (with a body
/// token put in), the query string, and the headers.
#[derive(Debug)]
pub struct Signed {
    pub body: Vec<u8>,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl AuthScheme {
    /// Authenticates `body` as a sender would: a body token goes into the
    /// JSON document (or is appended to a form), a query token into the
    /// query string, anything else into headers (see [`AuthScheme::sign`]).
    /// Used by `send` and by `check`'s test cases.
    pub fn present(&self, secret: &str, body: &[u8], now: i64) -> Signed {
        let mut signed = Signed {
            body: body.to_vec(),
            query: None,
            headers: Vec::new(),
        };
        match self {
            AuthScheme::BodyField { field, .. } => {
                signed.body = match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(mut doc) if doc.is_object() => {
                        put_field(&mut doc, field, secret);
                        serde_json::to_vec(&doc).unwrap_or_default()
                    }
                    _ => {
                        let name = field.last().map(String::as_str).unwrap_or("token");
                        let mut form = form_urlencoded::Serializer::new(String::new());
                        form.append_pair(name, secret);
                        let sep = if body.is_empty() { "" } else { "&" };
                        [body, sep.as_bytes(), form.finish().as_bytes()].concat()
                    }
                }
            }
            AuthScheme::Query { param, .. } => {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair(param, secret);
                signed.query = Some(q.finish());
            }
            _ => signed.headers = self.sign(secret, body, now),
        }
        signed
    }

    /// The headers a sender adds to authenticate `body`: `secret` is written
    /// as in the env var (a token, an HMAC secret, or a `whsec_` key); `now`
    /// is Unix seconds. Body and query tokens are not headers: see
    /// [`AuthScheme::present`].
    pub fn sign(&self, secret: &str, body: &[u8], now: i64) -> Vec<(String, String)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mac = |key: &[u8], parts: &[&[u8]]| -> Vec<u8> {
            // A MAC accepts keys of any length, so this cannot fail.
            let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        };
        match self {
            AuthScheme::Bearer { .. } => vec![("authorization".into(), format!("Bearer {secret}"))],
            AuthScheme::Header { header, prefix, .. } => {
                vec![(header.as_str().to_string(), format!("{prefix}{secret}"))]
            }
            AuthScheme::Basic { .. } => {
                let pair = if secret.contains(':') {
                    secret.to_string()
                } else {
                    format!("rocket:{secret}")
                };
                vec![(
                    "authorization".into(),
                    format!("Basic {}", b64.encode(pair)),
                )]
            }
            // Carried in the body or the URL, not in a header: see `present`.
            AuthScheme::BodyField { .. } | AuthScheme::Query { .. } => Vec::new(),
            AuthScheme::Hmac {
                header,
                prefix,
                encoding,
                timestamp,
                ..
            } => {
                let ts = now.to_string();
                let raw = match timestamp {
                    None => mac(secret.as_bytes(), &[body]),
                    Some(_) => mac(secret.as_bytes(), &[ts.as_bytes(), b".", body]),
                };
                let sig = match encoding {
                    SigEncoding::Hex => hex::encode(raw),
                    SigEncoding::Base64 => b64.encode(raw),
                };
                let mut out = vec![(header.as_str().to_string(), format!("{prefix}{sig}"))];
                if let Some((name, _)) = timestamp {
                    out.push((name.as_str().to_string(), ts));
                }
                out
            }
            AuthScheme::StandardWebhooks { .. } => {
                let key = b64
                    .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
                    .unwrap_or_default();
                let id = format!("msg_{}", ulid::Ulid::new());
                let ts = now.to_string();
                let raw = mac(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
                vec![
                    ("webhook-id".into(), id),
                    ("webhook-timestamp".into(), ts),
                    (
                        "webhook-signature".into(),
                        format!("v1,{}", b64.encode(raw)),
                    ),
                ]
            }
        }
    }
}

/// Verifies against a list of schemes: the first that passes wins; otherwise
/// the most telling failure is reported (a mismatch beats a missing header,
/// so a sender using the wrong scheme's header still learns it was wrong).
pub fn verify_any(
    schemes: &[AuthScheme],
    presented: &Presented<'_>,
    now: i64,
) -> Result<(), AuthError> {
    let mut worst = AuthError::NotConfigured;
    for scheme in schemes {
        match scheme.verify_request(presented, now) {
            Ok(()) => return Ok(()),
            Err(e) => worst = rank(worst, e),
        }
    }
    Err(worst)
}

/// The more telling of two failures.
pub fn rank(a: AuthError, b: AuthError) -> AuthError {
    fn weight(e: AuthError) -> u8 {
        match e {
            AuthError::NotConfigured => 0,
            AuthError::MissingHeader => 1,
            AuthError::Malformed => 2,
            AuthError::Stale => 3,
            AuthError::Mismatch => 4,
        }
    }
    if weight(b) > weight(a) {
        b
    } else {
        a
    }
}

/// The token of an `Authorization: Bearer …` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(poem::http::header::AUTHORIZATION)
        .ok_or(AuthError::MissingHeader)?
        .to_str()
        .map_err(|_| AuthError::Malformed)?
        .trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Constant-time check of a presented token against the digests of the
/// configured ones. Every digest is compared, match or not.
pub fn check_bearer(digests: &[[u8; 32]], presented: &[u8]) -> Result<(), AuthError> {
    let d = token_digest(presented);
    let mut ok = subtle::Choice::from(0u8);
    for known in digests {
        ok |= known.ct_eq(&d);
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// Sets `field` (member names from the top) in a JSON document, creating
/// objects on the way.
fn put_field(doc: &mut serde_json::Value, field: &[String], value: &str) {
    let Some((last, parents)) = field.split_last() else {
        return;
    };
    let mut cur = doc;
    for key in parents {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        cur = map
            .entry(key.clone())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    if let Some(map) = cur.as_object_mut() {
        map.insert(last.clone(), serde_json::Value::String(value.into()));
    }
}

/// Takes a body token out of a decoded document: the string (or integer)
/// at `field`, removed from the document so that nothing downstream (the
/// mapping, the stored event) sees it. `None` when absent.
pub fn take_body_token(doc: &mut serde_json::Value, field: &[String]) -> Option<String> {
    let (last, parents) = field.split_last()?;
    let mut cur = doc;
    for key in parents {
        cur = cur.get_mut(key.as_str())?;
    }
    match cur.as_object_mut()?.remove(last.as_str())? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => Some(String::new()),
    }
}

/// A header value after its prefix (compared case-insensitively).
fn strip_prefix<'a>(value: &'a str, prefix: &str) -> Result<&'a str, AuthError> {
    if prefix.is_empty() {
        return Ok(value);
    }
    match value.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => Ok(&value[prefix.len()..]),
        _ => Err(AuthError::Malformed),
    }
}

/// The `user:password` bytes of an `Authorization: Basic …` header.
fn basic_credentials(headers: &HeaderMap) -> Result<Vec<u8>, AuthError> {
    use base64::Engine as _;
    let value = header_str(headers, &poem::http::header::AUTHORIZATION)?;
    let (scheme, encoded) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let pair = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| AuthError::Malformed)?;
    if !pair.contains(&b':') {
        return Err(AuthError::Malformed);
    }
    Ok(pair)
}

/// The value of a query parameter, percent-decoded; a repeated parameter is
/// malformed (which one would count?).
fn query_param(query: Option<&str>, name: &str) -> Result<String, AuthError> {
    let mut found = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k == name {
            if found.is_some() {
                return Err(AuthError::Malformed);
            }
            found = Some(v.into_owned());
        }
    }
    found
        .filter(|v| !v.is_empty())
        .ok_or(AuthError::MissingHeader)
}

fn decode_signature(
    value: &str,
    prefix: &str,
    encoding: SigEncoding,
) -> Result<Vec<u8>, AuthError> {
    let raw = strip_prefix(value, prefix)?;
    let sig = match encoding {
        SigEncoding::Hex => hex::decode(raw).map_err(|_| AuthError::Malformed)?,
        SigEncoding::Base64 => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|_| AuthError::Malformed)?
        }
    };
    if sig.len() != 32 {
        return Err(AuthError::Malformed);
    }
    Ok(sig)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<&'a str, AuthError> {
    Ok(headers
        .get(name)
        .ok_or(AuthError::MissingHeader)?
        .to_str()
        .map_err(|_| AuthError::Malformed)?
        .trim())
}

/// A Unix-seconds timestamp within `tolerance` of `now`, past or future.
fn check_time(ts: &str, now: i64, tolerance: i64) -> Result<(), AuthError> {
    let t: i64 = ts.parse().map_err(|_| AuthError::Malformed)?;
    if now.abs_diff(t) > tolerance.unsigned_abs() {
        return Err(AuthError::Stale);
    }
    Ok(())
}

/// Checks a signature over the concatenated parts against every key
/// (every key is tried, so timing does not tell which matched).
fn check_hmac(keys: &[HmacSha256], parts: &[&[u8]], sig: &[u8]) -> Result<(), AuthError> {
    let mut ok = false;
    for key in keys {
        let mut mac = key.clone();
        for p in parts {
            mac.update(p);
        }
        ok |= mac.verify_slice(sig).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// The signature a sender would put in the header: used by `send`, the
/// examples and the tests.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    // A MAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::http::HeaderValue;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn hmac_scheme(secrets: &[&str], encoding: SigEncoding) -> AuthScheme {
        let secrets: Vec<_> = secrets.iter().map(|s| Secret::new(*s)).collect();
        AuthScheme::hmac(
            "ROCKET_X_SECRET",
            HeaderName::from_static("x-signature"),
            "sha256=".into(),
            encoding,
            &secrets,
        )
    }

    #[test]
    fn every_malformed_signature_is_refused_with_its_reason() {
        let body = br#"{"topic":"course.completed"}"#;
        let good = sign_hex(b"s3cret", body);
        let other = sign_hex(b"another-source", body);
        let last = if good.ends_with('0') { "1" } else { "0" };
        let flipped = format!("{}{last}", &good[..63]);
        let scheme = hmac_scheme(&["s3cret"], SigEncoding::Hex);
        type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, Result<(), AuthError>);
        let cases: Vec<Case> = vec![
            (
                "valid",
                vec![("x-signature", format!("sha256={good}").into_bytes())],
                Ok(()),
            ),
            (
                "prefix in capitals",
                vec![("x-signature", format!("SHA256={good}").into_bytes())],
                Ok(()),
            ),
            ("missing header", vec![], Err(AuthError::MissingHeader)),
            (
                "empty header",
                vec![("x-signature", b"".to_vec())],
                Err(AuthError::Malformed),
            ),
            (
                "no prefix",
                vec![("x-signature", good.clone().into_bytes())],
                Err(AuthError::Malformed),
            ),
            (
                "bad hex",
                vec![("x-signature", b"sha256=zz".to_vec())],
                Err(AuthError::Malformed),
            ),
            (
                "odd-length hex",
                vec![("x-signature", format!("sha256={}", &good[1..]).into_bytes())],
                Err(AuthError::Malformed),
            ),
            (
                "too short",
                vec![(
                    "x-signature",
                    format!("sha256={}", &good[..62]).into_bytes(),
                )],
                Err(AuthError::Malformed),
            ),
            (
                "too long",
                vec![("x-signature", format!("sha256={good}00").into_bytes())],
                Err(AuthError::Malformed),
            ),
            (
                "non-ascii",
                vec![("x-signature", "sha256=é".as_bytes().to_vec())],
                Err(AuthError::Malformed),
            ),
            (
                "another source's secret",
                vec![("x-signature", format!("sha256={other}").into_bytes())],
                Err(AuthError::Mismatch),
            ),
            (
                "flipped digit",
                vec![("x-signature", format!("sha256={flipped}").into_bytes())],
                Err(AuthError::Mismatch),
            ),
        ];
        for (name, hs, want) in cases {
            let hs: Vec<(&str, &[u8])> = hs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let got = scheme.verify(&headers(&hs), body, 0);
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn a_tampered_body_fails_the_signature() {
        let scheme = hmac_scheme(&["s3cret"], SigEncoding::Hex);
        let sig = format!("sha256={}", sign_hex(b"s3cret", b"{\"a\":1}"));
        let h = headers(&[("x-signature", sig.as_bytes())]);
        assert_eq!(scheme.verify(&h, b"{\"a\":2}", 0), Err(AuthError::Mismatch));
        assert_eq!(scheme.verify(&h, b"{\"a\":1}", 0), Ok(()));
    }

    #[test]
    fn any_secret_of_a_rotating_list_verifies() {
        let scheme = hmac_scheme(&["old", "new"], SigEncoding::Hex);
        for secret in ["old", "new"] {
            let sig = format!("sha256={}", sign_hex(secret.as_bytes(), b"x"));
            assert_eq!(
                scheme.verify(&headers(&[("x-signature", sig.as_bytes())]), b"x", 0),
                Ok(())
            );
        }
    }

    #[test]
    fn base64_signatures_verify() {
        use base64::Engine as _;
        let scheme = hmac_scheme(&["k"], SigEncoding::Base64);
        let raw = hex::decode(sign_hex(b"k", b"body")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let sig = format!("sha256={b64}");
        assert_eq!(
            scheme.verify(&headers(&[("x-signature", sig.as_bytes())]), b"body", 0),
            Ok(())
        );
        let bad = headers(&[("x-signature", b"sha256=!!!notbase64")]);
        assert_eq!(scheme.verify(&bad, b"body", 0), Err(AuthError::Malformed));
    }

    #[test]
    fn bearer_cases() {
        let scheme = AuthScheme::bearer("ROCKET_T", &[Secret::new("tok-a"), Secret::new("tok-b")]);
        let cases: &[(&[u8], Result<(), AuthError>)] = &[
            (b"Bearer tok-a", Ok(())),
            (b"bearer tok-b", Ok(())),
            (b"Bearer  tok-a ", Ok(())),
            (b"Bearer tok-c", Err(AuthError::Mismatch)),
            (b"Bearer tok-a-longer", Err(AuthError::Mismatch)),
            (b"Bearer ", Err(AuthError::Malformed)),
            (b"Basic dG9rLWE=", Err(AuthError::Malformed)),
            (b"tok-a", Err(AuthError::Malformed)),
        ];
        for (value, want) in cases {
            let got = scheme.verify(&headers(&[("authorization", value)]), b"", 0);
            assert_eq!(got, *want, "header {:?}", String::from_utf8_lossy(value));
        }
        assert_eq!(
            scheme.verify(&HeaderMap::new(), b"", 0),
            Err(AuthError::MissingHeader)
        );
    }

    #[test]
    fn an_unset_secret_fails_closed() {
        let bearer = AuthScheme::bearer("ROCKET_T", &[]);
        let h = headers(&[("authorization", b"Bearer anything")]);
        assert_eq!(bearer.verify(&h, b"", 0), Err(AuthError::NotConfigured));
        let hmac = hmac_scheme(&[], SigEncoding::Hex);
        assert_eq!(hmac.verify(&h, b"", 0), Err(AuthError::NotConfigured));
        assert_eq!(
            verify_any(&[bearer, hmac], &Presented::new(&h, b""), 0),
            Err(AuthError::NotConfigured)
        );
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn standard_webhooks_signatures_verify_within_the_tolerance() {
        let key = b"0123456789abcdef0123456789abcdef";
        let secret = Secret::new(format!("whsec_{}", b64(key)));
        let scheme = AuthScheme::standard_webhooks("ROCKET_SW", &[secret], 300).unwrap();
        let body = br#"{"type":"course.completed"}"#;
        let sign = |id: &str, ts: i64| {
            let content = format!("{id}.{ts}.{}", std::str::from_utf8(body).unwrap());
            b64(&hex::decode(sign_hex(key, content.as_bytes())).unwrap())
        };
        let now = 1_700_000_000;
        let ok_sig = format!("v1,{}", sign("msg_1", now - 100));
        let h = |id: &str, ts: i64, sig: &str| {
            headers(&[
                ("webhook-id", id.as_bytes()),
                ("webhook-timestamp", ts.to_string().as_bytes()),
                ("webhook-signature", sig.as_bytes()),
            ])
        };
        assert_eq!(
            scheme.verify(&h("msg_1", now - 100, &ok_sig), body, now),
            Ok(())
        );
        // Several signatures: any one that matches.
        let several = format!("v1,{} {ok_sig}", b64(&[0u8; 32]));
        assert_eq!(
            scheme.verify(&h("msg_1", now - 100, &several), body, now),
            Ok(())
        );
        // Replayed outside the window, past or future.
        let old = format!("v1,{}", sign("msg_1", now - 301));
        assert_eq!(
            scheme.verify(&h("msg_1", now - 301, &old), body, now),
            Err(AuthError::Stale)
        );
        let future = format!("v1,{}", sign("msg_1", now + 301));
        assert_eq!(
            scheme.verify(&h("msg_1", now + 301, &future), body, now),
            Err(AuthError::Stale)
        );
        // The id and timestamp are signed.
        assert_eq!(
            scheme.verify(&h("msg_2", now - 100, &ok_sig), body, now),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            scheme.verify(&h("msg_1", now - 99, &ok_sig), body, now),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            scheme.verify(&h("msg_1", now, "v2,abc"), body, now),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            scheme.verify(&h("msg_1", now, &ok_sig), b"{}", now),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            scheme.verify(&headers(&[]), body, now),
            Err(AuthError::MissingHeader)
        );
        let bad_ts = headers(&[
            ("webhook-id", b"m"),
            ("webhook-timestamp", b"soon"),
            ("webhook-signature", ok_sig.as_bytes()),
        ]);
        assert_eq!(scheme.verify(&bad_ts, body, now), Err(AuthError::Malformed));
        assert!(AuthScheme::standard_webhooks("X", &[Secret::new("whsec_!!")], 300).is_err());
    }

    #[test]
    fn an_hmac_timestamp_is_signed_and_checked() {
        let scheme = hmac_scheme(&["k"], SigEncoding::Hex)
            .with_timestamp(HeaderName::from_static("x-timestamp"), 300);
        let now = 1_700_000_000i64;
        let sig = |ts: i64| format!("sha256={}", sign_hex(b"k", format!("{ts}.body").as_bytes()));
        let h = |ts: i64, s: &str| {
            headers(&[
                ("x-timestamp", ts.to_string().as_bytes()),
                ("x-signature", s.as_bytes()),
            ])
        };
        assert_eq!(scheme.verify(&h(now, &sig(now)), b"body", now), Ok(()));
        assert_eq!(
            scheme.verify(&h(now - 1000, &sig(now - 1000)), b"body", now),
            Err(AuthError::Stale)
        );
        assert_eq!(
            scheme.verify(&h(now + 1, &sig(now)), b"body", now),
            Err(AuthError::Mismatch)
        );
        let no_ts = headers(&[("x-signature", sig(now).as_bytes())]);
        assert_eq!(
            scheme.verify(&no_ts, b"body", now),
            Err(AuthError::MissingHeader)
        );
    }

    #[test]
    fn what_present_writes_verifies() {
        let secret = "c2lnbi10ZXN0LXNlY3JldA==";
        let one = [Secret::new(secret)];
        let schemes = [
            AuthScheme::bearer("E", &one),
            hmac_scheme(&[secret], SigEncoding::Hex),
            hmac_scheme(&[secret], SigEncoding::Base64),
            hmac_scheme(&[secret], SigEncoding::Hex)
                .with_timestamp(HeaderName::from_static("x-ts"), 60),
            AuthScheme::standard_webhooks("E", &one, 60).unwrap(),
            AuthScheme::Header {
                secret: "E".into(),
                header: HeaderName::from_static("x-token"),
                prefix: "v1=".into(),
                digests: digests(&one),
            },
            AuthScheme::basic("E", &one),
            AuthScheme::basic("E", &[Secret::new(format!("key:{secret}"))]),
            AuthScheme::Query {
                secret: "E".into(),
                param: "token".into(),
                digests: digests(&one),
            },
            AuthScheme::BodyField {
                secret: "E".into(),
                field: vec!["auth".into(), "token".into()],
                digests: digests(&one),
            },
        ];
        let basic_pair = format!("key:{secret}");
        for (i, s) in schemes.iter().enumerate() {
            let secret = if i == 7 { basic_pair.as_str() } else { secret };
            let body = br#"{"a":1}"#;
            let signed = s.present(secret, body, 1_000);
            let pairs: Vec<(&str, &[u8])> = signed
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_bytes()))
                .collect();
            let h = headers(&pairs);
            let mut doc: serde_json::Value = serde_json::from_slice(&signed.body).unwrap();
            let token = match s {
                AuthScheme::BodyField { field, .. } => take_body_token(&mut doc, field),
                _ => None,
            };
            let presented = |body: &'static [u8]| Presented {
                headers: &h,
                query: signed.query.as_deref(),
                body,
                body_token: token.as_deref(),
            };
            assert_eq!(
                s.verify_request(&presented(br#"{"a":1}"#), 1_010),
                Ok(()),
                "{s:?}"
            );
            if s.kind() == "hmac" || s.kind() == "standard_webhooks" {
                // Signatures cover the body; tokens do not.
                assert!(
                    s.verify_request(&presented(br#"{"a":2}"#), 1_010).is_err(),
                    "{s:?}"
                );
            }
        }
        // A body token for a form body is appended as a field.
        let form = AuthScheme::BodyField {
            secret: "E".into(),
            field: vec!["token".into()],
            digests: Vec::new(),
        };
        assert_eq!(form.present("a b", b"x=1", 0).body, b"x=1&token=a+b");
    }

    #[test]
    fn pre_shared_header_values_compare_whole_after_their_prefix() {
        let scheme = AuthScheme::Header {
            secret: "E".into(),
            header: HeaderName::from_static("learnworlds-webhook-signature"),
            prefix: "v1=".into(),
            digests: digests(&[Secret::new("old-value"), Secret::new("new-value")]),
        };
        let cases: &[(&[u8], Result<(), AuthError>)] = &[
            (b"v1=old-value", Ok(())),
            (b"V1=new-value", Ok(())),
            (b"v1=new-valu", Err(AuthError::Mismatch)),
            (b"v1=", Err(AuthError::Mismatch)),
            (b"new-value", Err(AuthError::Malformed)),
            (b"v2=new-value", Err(AuthError::Malformed)),
        ];
        for (value, want) in cases {
            let h = headers(&[("learnworlds-webhook-signature", value)]);
            assert_eq!(scheme.verify(&h, b"", 0), *want, "{value:?}");
        }
        assert_eq!(
            scheme.verify(&HeaderMap::new(), b"", 0),
            Err(AuthError::MissingHeader)
        );
    }

    #[test]
    fn basic_takes_whole_pairs_or_a_password_for_any_user() {
        let scheme = AuthScheme::basic(
            "E",
            &[Secret::new("moodle:s3cret"), Secret::new("just-a-password")],
        );
        let basic = |pair: &str| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        let cases = [
            (basic("moodle:s3cret"), Ok(())),
            (basic("other:s3cret"), Err(AuthError::Mismatch)),
            (basic("anyone:just-a-password"), Ok(())),
            (basic(":just-a-password"), Ok(())),
            (basic("moodle:wrong"), Err(AuthError::Mismatch)),
            (basic("no-colon"), Err(AuthError::Malformed)),
            ("Basic !!!".to_string(), Err(AuthError::Malformed)),
            (
                "Bearer moodle:s3cret".to_string(),
                Err(AuthError::Malformed),
            ),
        ];
        for (value, want) in cases {
            let h = headers(&[("authorization", value.as_bytes())]);
            assert_eq!(scheme.verify(&h, b"", 0), want, "{value}");
        }
    }

    #[test]
    fn tokens_in_the_query_or_the_body() {
        let query = AuthScheme::Query {
            secret: "E".into(),
            param: "token".into(),
            digests: digests(&[Secret::new("t0k en")]),
        };
        let h = HeaderMap::new();
        let with_query = |q: Option<&'static str>| Presented {
            query: q,
            ..Presented::new(&h, b"")
        };
        let cases = [
            (Some("token=t0k%20en"), Ok(())),
            (Some("a=1&token=t0k+en"), Ok(())),
            (Some("token=nope"), Err(AuthError::Mismatch)),
            (
                Some("token=t0k%20en&token=t0k%20en"),
                Err(AuthError::Malformed),
            ),
            (Some("token="), Err(AuthError::MissingHeader)),
            (None, Err(AuthError::MissingHeader)),
        ];
        for (q, want) in cases {
            assert_eq!(query.verify_request(&with_query(q), 0), want, "{q:?}");
        }
        let body = AuthScheme::BodyField {
            secret: "E".into(),
            field: vec!["token".into()],
            digests: digests(&[Secret::new("abc")]),
        };
        let with_token = |t: Option<&'static str>| Presented {
            body_token: t,
            ..Presented::new(&h, b"")
        };
        assert_eq!(body.verify_request(&with_token(Some("abc")), 0), Ok(()));
        assert_eq!(
            body.verify_request(&with_token(Some("abd")), 0),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            body.verify_request(&with_token(None), 0),
            Err(AuthError::MissingHeader)
        );
    }

    #[test]
    fn a_body_token_is_taken_out_of_the_document() {
        let mut doc = serde_json::json!({"token": "abc", "a": {"key": 42}, "b": 1});
        assert_eq!(
            take_body_token(&mut doc, &["token".into()]).as_deref(),
            Some("abc")
        );
        assert_eq!(doc, serde_json::json!({"a": {"key": 42}, "b": 1}));
        assert_eq!(
            take_body_token(&mut doc, &["a".into(), "key".into()]).as_deref(),
            Some("42")
        );
        assert_eq!(take_body_token(&mut doc, &["missing".into()]), None);
        let mut not_a_string = serde_json::json!({"token": {"x": 1}});
        assert_eq!(
            take_body_token(&mut not_a_string, &["token".into()]).as_deref(),
            Some(""),
            "an object is no token, and is still taken out"
        );
        assert_eq!(not_a_string, serde_json::json!({}));
    }

    #[test]
    fn debug_output_names_no_secret() {
        let s = format!("{:?}", hmac_scheme(&["topsecret"], SigEncoding::Hex));
        assert!(!s.contains("topsecret"));
    }
}
