//! The YAML schema of a source file, as written by an admin. Every struct
//! refuses unknown keys, so a typo is an error naming file, line and key.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IntoDeserializer};
use serde::Deserialize;

use crate::pipeline::limits::{ProxyHeader, RateSpec};
use crate::pipeline::mapping::{FieldType, TimeFormat};
use crate::pipeline::verify::SigEncoding;

/// One value or a list of them.
#[derive(Debug, Clone)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

// `OneOrMany` and `RawField` choose their variant by the YAML value's
// shape (scalar, list or map) and hand it to that variant's own
// deserializer, so its errors keep their words: `#[serde(untagged)]` would
// answer a mistyped key inside `auth:` with "did not match any variant",
// naming no key.

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Shape<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("one value or a list of them")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                scalar(T::deserialize(v.into_deserializer()), v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                scalar(T::deserialize(v.into_deserializer()), v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                scalar(T::deserialize(v.into_deserializer()), v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                scalar(T::deserialize(v.into_deserializer()), v.to_string())
            }
        }
        d.deserialize_any(Shape(PhantomData))
    }
}

/// A plain scalar as one value: as its own type, else as its text (so
/// `vendor: 5` reads as a list element `[5]` does, the name "5"); the
/// typed error when neither fits.
fn scalar<'de, T: Deserialize<'de>, E: de::Error>(
    typed: Result<T, E>,
    text: String,
) -> Result<OneOrMany<T>, E> {
    typed
        .or_else(|e| T::deserialize(text.into_deserializer()).map_err(|_: E| e))
        .map(OneOrMany::One)
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A source file: `sources.d/<name>.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// The endpoint name (`/api/public/hook/{name}/event`); defaults to the file stem.
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Users are identified within this namespace; defaults to the name.
    /// Sources that share one share their users.
    pub namespace: Option<String>,
    /// `sync` (scored before the answer, 200 after the commit) or `async`
    /// (stored and answered 202; the queue workers score it).
    #[serde(default)]
    pub processing: Processing,
    /// One scheme or a list; any one that verifies accepts the request.
    pub auth: OneOrMany<RawAuth>,
    /// Content types accepted; defaults to `application/json`.
    pub content_types: Option<Vec<String>>,
    /// The formats to try, in order, when a request has no `Content-Type`
    /// or says form data (Moodle's Event Trigger plugin sends none; its
    /// local_webhooks plugin may label JSON as a form). Default: none, so a
    /// request without one is decoded as the first content type.
    #[serde(default)]
    pub fallback_formats: Vec<crate::pipeline::decode::BodyFormat>,
    /// Accept a JSON array of documents, each its own event (xAPI batches).
    #[serde(default)]
    pub batch: bool,
    /// The source takes xAPI statements: served at
    /// `/api/public/xapi/{name}/statements` too, context activities given as
    /// one object become arrays, and a statement without an `id` gets one
    /// derived from its content. Implies `batch`.
    #[serde(default)]
    pub xapi: bool,
    /// Largest accepted body in bytes (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    /// This source's rate (default: the server's per-source setting, 500/min, burst 1000).
    pub rate_limit: Option<RateSpec>,
    /// Rates per canonical event type, checked after mapping.
    #[serde(default)]
    pub event_type_rate_limits: BTreeMap<String, RateSpec>,
    /// Client addresses allowed (CIDR, IPv4 or IPv6); empty allows all.
    #[serde(default)]
    pub allow_ips: Vec<String>,
    /// How long this source's data is kept (default: the server's
    /// `ROCKET_RETAIN_*` settings; unset there too: forever).
    #[serde(default)]
    pub retention: crate::settings::Retention,
    /// Proxy headers that name the client when the peer is a trusted proxy
    /// (default both `x-forwarded-for` and `forwarded`).
    pub proxy_headers: Option<Vec<ProxyHeader>>,
    /// Where the vendor's event name is and how it maps to canonical types.
    pub event_type: RawEventType,
    /// Canonical fields, each a JSONPath, a list of fallbacks, or a full spec.
    #[serde(default)]
    pub fields: RawFields,
    /// Extra mapped values, passed to rules as `event.attributes`.
    #[serde(default)]
    pub attributes: BTreeMap<String, RawField>,
    /// A path (or fallbacks) to an object whose every key becomes an
    /// attribute too, as sent; the `attributes` above win on a clash, and
    /// anything but an object adds nothing.
    pub attributes_from: Option<RawField>,
    /// A value that is a template placeholder left unfilled (`{name}`, as
    /// Moodle's Event Trigger plugin sends for a field its event lacks)
    /// counts as absent.
    #[serde(default)]
    pub unfilled_placeholders_absent: bool,
    /// Canonical fields that must be present (default `[user_id, event_type]`).
    pub required: Option<Vec<String>>,
    /// Rule names (files `rules/<name>.rhai`) applied to this source's events; `"*"` for all.
    #[serde(default)]
    pub rules: Vec<String>,
    /// The source only serves dry runs (the `test` source).
    #[serde(default)]
    pub dry_run: bool,
    /// Embedded test cases, run by `rocket-rewards check`.
    #[serde(default)]
    pub tests: Vec<TestCase>,
}

/// A sample delivery and what the source must make of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    /// The payload as YAML/JSON (sent as JSON) ...
    pub payload: Option<serde_json::Value>,
    /// ... or the raw body, for form-encoded or exact bytes.
    pub body: Option<String>,
    /// Default: the source's first content type.
    pub content_type: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Authenticate with a test secret (default true) ...
    #[serde(default = "yes")]
    pub sign: bool,
    /// ... using this auth scheme of the source's list (1-based, default 1).
    pub auth_scheme: Option<usize>,
    pub expect: Expect,
}

fn yes() -> bool {
    true
}

/// The expected outcome: canonical fields and points, or an error code.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Canonical fields that must have these values (`attributes` compares as a map subset).
    #[serde(default)]
    pub event: serde_json::Map<String, serde_json::Value>,
    pub points: Option<i64>,
    /// An error code such as `VALIDATION_ERROR` or `AUTHENTICATION_FAILED`.
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Processing {
    #[default]
    Sync,
    Async,
}

/// The kinds of auth scheme a source may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// HMAC-SHA256 of the raw body in `header` after `prefix`.
    Hmac,
    /// A pre-shared value in `header`, after an optional `prefix`: the value
    /// itself is compared, not a signature of the body (LearnWorlds'
    /// `Learnworlds-Webhook-Signature: v1=<value>`).
    Header,
    /// HTTP Basic, as LRS clients send it: values are `user:password`
    /// pairs (a value without a colon is a password for any user name).
    Basic,
    /// A token in a body `field` (`$.token`, `$.auth.key`: member names
    /// only), for plugins that cannot set headers; removed before the
    /// payload is mapped or stored.
    BodyToken,
    /// A token in a query parameter (`param`, default `token`), for
    /// platforms whose webhook form takes only a URL. Never logged; but
    /// proxies may log URLs, so prefer a header where the platform allows one.
    QueryToken,
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`), secrets `whsec_<base64>`.
    StandardWebhooks,
}

impl AuthKind {
    /// The keys besides `type` and the secret's that this kind takes.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            AuthKind::Bearer | AuthKind::Basic => &[],
            AuthKind::Hmac => &[
                "header",
                "prefix",
                "encoding",
                "algorithm",
                "timestamp_header",
                "tolerance_seconds",
            ],
            AuthKind::Header => &["header", "prefix"],
            AuthKind::BodyToken => &["field"],
            AuthKind::QueryToken => &["param"],
            AuthKind::StandardWebhooks => &["tolerance_seconds"],
        }
    }
}

/// Declares [`RawAuth`] with its kind-specific keys listed once: each is an
/// optional field, and `keys_set` names those a file set.
macro_rules! raw_auth {
    (
        $(#[$meta:meta])*
        pub struct RawAuth { $($common:tt)* }
        kind_keys { $( $(#[doc = $doc:expr])* $key:ident: $ty:ty, )* }
    ) => {
        $(#[$meta])*
        pub struct RawAuth {
            $($common)*
            $( $(#[doc = $doc])* pub $key: Option<$ty>, )*
        }

        impl RawAuth {
            /// The kind-specific keys set (those [`AuthKind::keys`] allows
            /// or not).
            pub fn keys_set(&self) -> Vec<&'static str> {
                let mut set = Vec::new();
                $( if self.$key.is_some() { set.push(stringify!($key)); } )*
                set
            }
        }
    };
}

raw_auth! {
    /// One auth scheme of a source: its kind, where its secret is (exactly
    /// one of `secret_env`, `secret_file`, `secret`; several values
    /// rotate), and the keys of its kind. A key that does not apply to the
    /// kind is an error.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawAuth {
        #[serde(rename = "type")]
        pub kind: AuthKind,
        /// An environment variable (comma-separated values), or the file its
        /// `<NAME>_FILE` variable names. A `ROCKET_*` name with `TOKEN`,
        /// `SECRET`, `KEY` or `PASSWORD` in it, not the server's own settings or
        /// operator tokens.
        pub secret_env: Option<String>,
        /// Takes a `secret_env` name without `TOKEN`, `SECRET`, `KEY` or
        /// `PASSWORD` in it.
        #[serde(default)]
        pub any_secret_name: bool,
        /// A file, one value per line; relative to the config directory.
        pub secret_file: Option<std::path::PathBuf>,
        /// A file of this name in `ROCKET_SECRETS_DIR` (a mounted `/run/secrets`).
        pub secret: Option<String>,
    }
    kind_keys {
        /// The header (hmac: default `X-Signature`; header: required).
        header: String,
        /// Before the value in the header (hmac: default `sha256=`).
        prefix: String,
        /// How an HMAC signature is written (default hex).
        encoding: SigEncoding,
        /// The HMAC's hash: only `sha256`.
        algorithm: String,
        /// An HMAC header carrying Unix seconds; when set, the signed content is
        /// `<timestamp>.<body>` and the timestamp must be within the tolerance.
        timestamp_header: String,
        /// Seconds a timestamp may be off, past or future (default 300).
        tolerance_seconds: i64,
        /// body_token: the field, `$.token`.
        field: String,
        /// query_token: the parameter (default `token`).
        param: String,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEventType {
    /// JSONPaths to the vendor's event name, first non-null wins.
    pub paths: OneOrMany<String>,
    /// Vendor name -> canonical type.
    #[serde(default)]
    pub map: BTreeMap<String, String>,
    /// Use the vendor name as the canonical type when the table has no entry.
    #[serde(default)]
    pub passthrough: bool,
    /// When no path matches: the values of these paths joined with `.`
    /// (Thinkific's `resource` and `action` make `lesson.completed`).
    #[serde(default)]
    pub compose: Vec<String>,
    /// Conditional mappings, tried in order before `map`: the first case
    /// whose vendor name and conditions match names the canonical type. A
    /// vendor name with cases and no `map` entry maps to nothing (stored,
    /// 0 points) when no case matches.
    #[serde(default)]
    pub cases: Vec<RawCase>,
}

/// One conditional mapping of a vendor event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCase {
    /// The vendor event name(s) this case is for.
    pub vendor: OneOrMany<String>,
    /// Conditions that must all hold. A key names a mapped attribute, a
    /// canonical field (`user_id`, `course_id`, `object_id`) or a JSONPath
    /// (`$.…`); the value is a literal to equal (numbers and numeric
    /// strings compare as numbers), a list of literals (any of them), or
    /// one test: `{gte|gt|lte|lt: <number or attribute/field/path>}`,
    /// `{ne: <literal>}`, `{present: true|false}`.
    #[serde(default)]
    pub when: BTreeMap<String, serde_json::Value>,
    /// The canonical type when the case matches.
    #[serde(rename = "type")]
    pub canonical: String,
    /// Attributes the case sets on the event (they win over mapped ones).
    #[serde(default)]
    pub set: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFields {
    pub event_id: Option<RawField>,
    pub user_id: Option<RawField>,
    pub course_id: Option<RawField>,
    pub object_id: Option<RawField>,
    pub occurred_at: Option<RawField>,
}

/// A mapped field: `$.path`, `[$.a, $.b]`, or `{paths, type, format, default}`.
#[derive(Debug, Clone)]
pub enum RawField {
    Path(String),
    Paths(Vec<String>),
    Full(RawFieldSpec),
}

impl<'de> Deserialize<'de> for RawField {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> de::Visitor<'de> for Shape {
            type Value = RawField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSONPath, a list of them, or {paths, type, format, default}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawField::Path(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(RawField::Paths)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                RawFieldSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawField::Full)
            }
        }
        d.deserialize_any(Shape)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFieldSpec {
    #[serde(alias = "path")]
    pub paths: OneOrMany<String>,
    #[serde(rename = "type")]
    pub ty: Option<FieldType>,
    pub format: Option<TimeFormat>,
    pub default: Option<serde_json::Value>,
}

/// One case of a rule's test file, `rules/<rule>.tests.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleCase {
    pub name: String,
    /// The canonical event (`event_type`, `user_id`, `course_id`, `object_id`,
    /// `occurred_at` RFC 3339, `attributes`).
    pub event: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub history: RawHistory,
    /// The points this rule alone awards (0: none).
    pub points: i64,
}

/// The user's past as a rule test states it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHistory {
    #[serde(default)]
    pub total: i64,
    #[serde(default = "yes")]
    pub first: bool,
    #[serde(default)]
    pub recent: Vec<RawPast>,
    /// Many earlier events at a regular interval.
    pub recent_repeat: Option<RawRepeat>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPast {
    pub event_type: String,
    pub seconds_ago: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRepeat {
    pub event_type: String,
    pub count: usize,
    pub every_seconds: i64,
    pub first_seconds_ago: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scalar reads the same alone as in a list: `5` is the name "5"
    /// either way; a map where a scalar is due names what was expected.
    #[test]
    fn one_or_many_reads_scalars_alone_as_in_a_list() {
        let read = |yaml: &str| {
            serde_yaml_ng::from_str::<OneOrMany<String>>(yaml).map(OneOrMany::into_vec)
        };
        assert_eq!(read("5").unwrap(), ["5"]);
        assert_eq!(read("[5, a, true]").unwrap(), ["5", "a", "true"]);
        assert_eq!(read("a").unwrap(), ["a"]);
        let e = read("{a: 1}").unwrap_err().to_string();
        assert!(e.contains("expected a string"), "{e}");
        let e = serde_yaml_ng::from_str::<OneOrMany<RawAuth>>("5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type: integer `5`"), "{e}");
    }
}
