//! Decoding the verified raw body into JSON documents: a JSON object, a
//! form-encoded body (flat string values), or, for xAPI sources, one
//! statement or an array of statements (each becomes its own event).

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Body formats a request may arrive in; chosen from its `Content-Type`,
/// or from a source's `fallback_formats` when it has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    Json,
    Form,
}

impl BodyFormat {
    pub fn name(self) -> &'static str {
        match self {
            BodyFormat::Json => "JSON",
            BodyFormat::Form => "form data",
        }
    }
}

/// Format names for a message: "JSON nor form data".
pub fn names(formats: &[BodyFormat]) -> String {
    formats
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(" nor ")
}

/// A document encoded back in its format: JSON, or a form of its top-level
/// string values (what a form body decodes to).
pub fn encode(format: BodyFormat, doc: &Value) -> Vec<u8> {
    match (format, doc) {
        (BodyFormat::Form, Value::Object(map)) => {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (k, v) in map {
                form.append_pair(k, v.as_str().unwrap_or_default());
            }
            form.finish().into_bytes()
        }
        _ => serde_json::to_vec(doc).unwrap_or_default(),
    }
}

/// xAPI IRIs of the context activities a statement may carry.
const CONTEXT_ACTIVITIES: [&str; 4] = ["parent", "grouping", "category", "other"];

/// Brings an xAPI statement to the shape an LRS stores (xAPI 1.0.3,
/// Data 2.4.6.2: a context activity given as one object is returned as an
/// array of one).
pub fn normalise_statement(statement: &mut Value) {
    if let Some(activities) = statement
        .pointer_mut("/context/contextActivities")
        .and_then(Value::as_object_mut)
    {
        for key in CONTEXT_ACTIVITIES {
            if let Some(v) = activities.get_mut(key) {
                if v.is_object() {
                    *v = Value::Array(vec![v.take()]);
                }
            }
        }
    }
}

/// Gives a statement without an `id` one derived from its content (see
/// [`statement_id`]), as an LRS assigns ids, so that a re-sent statement
/// gets the same one; returns the statement's id.
pub fn assign_statement_id(statement: &mut Value) -> Option<String> {
    match statement.as_object()?.get("id") {
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => None,
        None => {
            let id = statement_id(statement);
            let map = statement.as_object_mut()?;
            map.insert("id".into(), Value::String(id.clone()));
            Some(id)
        }
    }
}

/// A name-based UUID (version 5, SHA-1, in a namespace of our own) of the
/// statement's canonical JSON (object keys sorted, no whitespace): equal
/// statements get equal ids however their keys were ordered.
pub fn statement_id(statement: &Value) -> String {
    /// `uuid5(NAMESPACE_URL, "urn:rocket-rewards:xapi-statement")`.
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_4f5e_1f5a_5b7e_9d3c_2a1e_8b4d_7c60);
    let mut canonical = Vec::new();
    write_canonical(statement, &mut canonical);
    uuid::Uuid::new_v5(&NAMESPACE, &canonical).to_string()
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

/// Why a body could not be decoded. Always the sender's fault: a 400.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the request body is empty")]
    Empty,
    #[error("the request body is not valid JSON: {0}")]
    Json(String),
    #[error("the request body must be a JSON object{0}")]
    NotAnObject(&'static str),
    #[error("the request body is not valid form data: {0}")]
    Form(String),
    #[error("the request body is neither {0}")]
    Untyped(String),
    #[error("a batch holds {0} statements; at most {1} are accepted")]
    BatchTooLarge(usize, usize),
    #[error("a batch must hold at least one statement")]
    EmptyBatch,
}

/// Most statements one xAPI batch may carry.
pub const MAX_BATCH: usize = 1000;

/// Picks the decoder for a `Content-Type` value (parameters ignored), or
/// `None` when the type is neither JSON nor a form.
pub fn format_of(content_type: &str) -> Option<BodyFormat> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .as_bytes();
    // Bytes, not chars: a slice of a str could land inside a multi-byte character.
    let structured_json = essence.len() > 5
        && essence[..essence.len() - 5].contains(&b'/')
        && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json");
    if essence.eq_ignore_ascii_case(b"application/json") || structured_json {
        Some(BodyFormat::Json)
    } else if essence.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
        Some(BodyFormat::Form)
    } else {
        None
    }
}

/// Decodes a body into the documents to map: one, or several for a batch
/// source given an array.
pub fn decode(format: BodyFormat, body: &[u8], batch: bool) -> Result<Vec<Value>, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    match format {
        BodyFormat::Json => {
            let value = parse_strict(body)?;
            match value {
                Value::Object(_) => Ok(vec![value]),
                Value::Array(items) if batch => {
                    if items.is_empty() {
                        return Err(DecodeError::EmptyBatch);
                    }
                    if items.len() > MAX_BATCH {
                        return Err(DecodeError::BatchTooLarge(items.len(), MAX_BATCH));
                    }
                    if items.iter().any(|v| !v.is_object()) {
                        return Err(DecodeError::NotAnObject(" (every statement of the array)"));
                    }
                    Ok(items)
                }
                _ if batch => Err(DecodeError::NotAnObject(" or an array of objects")),
                _ => Err(DecodeError::NotAnObject("")),
            }
        }
        BodyFormat::Form => Ok(vec![Value::Object(decode_form(body)?)]),
    }
}

/// A form body as a flat map of strings. As strict as JSON: every field is
/// `key=value` with a non-empty key, values percent-decode to valid UTF-8
/// (`%ff` is refused, not replaced, so different bytes never name one
/// user), and a repeated key is refused (which one would count?).
pub fn decode_form(body: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    let text = std::str::from_utf8(body).map_err(|_| DecodeError::Form("not UTF-8".into()))?;
    let decode = |part: &str, what: &str| -> Result<String, DecodeError> {
        let spaced = part.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| DecodeError::Form(format!("a {what} is not UTF-8 once percent-decoded")))
    };
    let mut map = Map::new();
    for field in text
        .trim_end_matches(['\r', '\n'])
        .split('&')
        .filter(|f| !f.is_empty())
    {
        let Some((k, v)) = field.split_once('=') else {
            return Err(DecodeError::Form("a field has no `=`".into()));
        };
        let key = decode(k, "key")?;
        if key.is_empty() {
            return Err(DecodeError::Form("a field has an empty name".into()));
        }
        let value = decode(v, "value")?;
        if map.contains_key(&key) {
            let shown: String = key.chars().take(64).collect();
            return Err(DecodeError::Form(format!(
                "the field {shown:?} is repeated"
            )));
        }
        map.insert(key, Value::String(value));
    }
    if map.is_empty() {
        return Err(DecodeError::Form("no fields".into()));
    }
    Ok(map)
}

/// The string (or number) at `field` (member names from the top) of a body,
/// read without building the document: what a body token is checked with
/// before the request is authenticated, so that a stranger's body costs a
/// scan, not a parse into memory. A form body has flat keys: `field` is one
/// name there. `None` when absent, not a string or number, or the body is
/// not of `format`.
pub fn find_token(format: BodyFormat, body: &[u8], field: &[String]) -> Option<String> {
    match format {
        BodyFormat::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            serde::de::DeserializeSeed::deserialize(Seek(field), &mut de)
                .ok()
                .flatten()
        }
        BodyFormat::Form => {
            let [name] = field else { return None };
            form_urlencoded::parse(body)
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        }
    }
}

/// Walks to a path in a JSON document, skipping everything else.
struct Seek<'a>(&'a [String]);

impl<'de> serde::de::DeserializeSeed<'de> for Seek<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            return Ok(None);
        };
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if found.is_none() && key == first.as_str() {
                found = map.next_value_seed(Seek(rest))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Parses JSON, refusing duplicate object keys (which parsers disagree
/// on: one would read the first, another the last). serde_json's own
/// recursion limit (128) refuses deep nesting.
pub fn parse_strict(body: &[u8]) -> Result<Value, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = StrictValue::deserialize(&mut de).map_err(|e| DecodeError::Json(e.to_string()))?;
    de.end().map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok(v.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {shown:?}"
                )));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_choose_the_decoder() {
        assert_eq!(format_of("application/json"), Some(BodyFormat::Json));
        assert_eq!(
            format_of("Application/JSON; charset=utf-8"),
            Some(BodyFormat::Json)
        );
        assert_eq!(format_of("application/vnd.x+json"), Some(BodyFormat::Json));
        assert_eq!(
            format_of("application/x-www-form-urlencoded"),
            Some(BodyFormat::Form)
        );
        assert_eq!(format_of("text/plain"), None);
        assert_eq!(format_of("+json"), None);
        assert_eq!(format_of(""), None);
        // Found by the fuzzer: multi-byte characters near the end.
        assert_eq!(format_of("\u{fffd}\u{fffd}"), None);
        assert_eq!(format_of("a/\u{e9}json"), None);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let cases: &[(&[u8], bool)] = &[
            (b"", false),
            (b"  \n", false),
            (b"[1,2]", false),
            (b"\"text\"", false),
            (b"{\"a\":", false),
            (b"\xff\xfe{}", false),
            (b"[]", true),
            (b"[1]", true),
            (b"42", true),
            (b"1e999999", false),
        ];
        for (body, batch) in cases {
            assert!(
                decode(BodyFormat::Json, body, *batch).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for body in [
            &br#"{"a":1,"a":2}"#[..],
            br#"{"x":{"b":1,"b":1}}"#,
            br#"[{"k":1},{"k":1,"k":2}]"#,
        ] {
            let err = decode(BodyFormat::Json, body, true).unwrap_err();
            assert!(err.to_string().contains("duplicate key"), "{err}");
        }
        assert!(decode(BodyFormat::Json, br#"{"a":{"a":1}}"#, false).is_ok());
    }

    #[test]
    fn trailing_garbage_and_nul_bytes_are_refused() {
        assert!(decode(BodyFormat::Json, b"{} {}", false).is_err());
        assert!(decode(BodyFormat::Json, b"{\"a\":\"\x00\"}", false).is_err());
        // An escaped NUL is valid JSON; mapping refuses it in ids.
        assert!(decode(BodyFormat::Json, br#"{"a":"\u0000"}"#, false).is_ok());
    }

    #[test]
    fn nesting_up_to_127_levels_is_taken_and_deeper_is_refused() {
        // Every object and array counts as a level (serde_json's limit).
        let nested = |depth: usize| {
            format!(
                "{{\"a\":{}1{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        let max = (1..200)
            .take_while(|d| decode(BodyFormat::Json, nested(*d).as_bytes(), false).is_ok())
            .last();
        assert_eq!(max, Some(127));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = "[".repeat(100_000);
        assert!(matches!(
            decode(BodyFormat::Json, body.as_bytes(), true),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn a_batch_becomes_several_documents() {
        let docs = decode(BodyFormat::Json, br#"[{"id":"a"},{"id":"b"}]"#, true).unwrap();
        assert_eq!(docs, vec![json!({"id":"a"}), json!({"id":"b"})]);
        let one = decode(BodyFormat::Json, br#"{"id":"a"}"#, true).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn forms_are_as_strict_as_json() {
        let cases: &[(&[u8], &str)] = &[
            (b"userid=%ff", "not UTF-8"),
            (b"userid=1&userid=2", "repeated"),
            (b"hello", "no `=`"),
            (b"=1", "empty name"),
            (b"a=1&&b=2&", ""),
            (b"a=%C3%A9&b=x+y", ""),
        ];
        for (body, want) in cases {
            let got = decode(BodyFormat::Form, body, false);
            if want.is_empty() {
                assert!(got.is_ok(), "{:?}: {got:?}", String::from_utf8_lossy(body));
            } else {
                let err = got.unwrap_err().to_string();
                assert!(
                    err.contains(want),
                    "{:?}: {err}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        let doc = decode(BodyFormat::Form, b"a=%C3%A9&b=x+y", false).unwrap();
        assert_eq!(doc[0], json!({"a": "\u{e9}", "b": "x y"}));
    }

    #[test]
    fn a_token_is_found_without_building_the_document() {
        let f = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let body = br#"{"big":[1,2,{"token":"inner"}],"auth":{"token":"tok","x":1},"token":42}"#;
        assert_eq!(
            find_token(BodyFormat::Json, body, &f(&["token"])).as_deref(),
            Some("42")
        );
        assert_eq!(
            find_token(BodyFormat::Json, body, &f(&["auth", "token"])).as_deref(),
            Some("tok")
        );
        assert_eq!(
            find_token(BodyFormat::Json, body, &f(&["auth", "x", "y"])),
            None
        );
        assert_eq!(find_token(BodyFormat::Json, body, &f(&["big"])), None);
        assert_eq!(
            find_token(BodyFormat::Json, b"{\"token\":", &f(&["token"])),
            None
        );
        assert_eq!(find_token(BodyFormat::Json, b"[1]", &f(&["token"])), None);
        assert_eq!(
            find_token(BodyFormat::Form, b"a=1&token=t+1", &f(&["token"])).as_deref(),
            Some("t 1")
        );
        assert_eq!(find_token(BodyFormat::Form, b"a=1", &f(&["token"])), None);
    }

    #[test]
    fn documents_encode_back_in_their_format() {
        let doc = json!({"b": "x y", "a": "\\core"});
        let form = encode(BodyFormat::Form, &doc);
        assert_eq!(decode(BodyFormat::Form, &form, false).unwrap()[0], doc);
        let js = encode(BodyFormat::Json, &doc);
        assert_eq!(decode(BodyFormat::Json, &js, false).unwrap()[0], doc);
    }

    #[test]
    fn statements_are_normalised_and_get_ids_from_their_content() {
        let mut st = json!({
            "actor": {"mbox": "mailto:a@b.c"},
            "verb": {"id": "http://adlnet.gov/expapi/verbs/completed"},
            "object": {"id": "http://x/1"},
            "context": {"contextActivities": {"grouping": {"id": "http://x/course"}, "parent": [{"id": "p"}]}}
        });
        normalise_statement(&mut st);
        assert_eq!(
            st["context"]["contextActivities"]["grouping"],
            json!([{"id": "http://x/course"}])
        );
        assert_eq!(
            st["context"]["contextActivities"]["parent"],
            json!([{"id": "p"}])
        );
        let mut copy = st.clone();
        let id = assign_statement_id(&mut st).unwrap();
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(
            assign_statement_id(&mut copy).as_deref(),
            Some(id.as_str()),
            "same content, same id"
        );
        assert_eq!(st["id"], json!(id));
        let mut other = json!({"actor": {"mbox": "mailto:a@b.c"}, "verb": {"id": "v"}, "object": {"id": "http://x/2"}});
        assert_ne!(assign_statement_id(&mut other).unwrap(), id);
        let mut own = json!({"id": "given", "verb": {"id": "v"}});
        assert_eq!(assign_statement_id(&mut own).as_deref(), Some("given"));
        // Key order does not change the id.
        let a: Value =
            serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":[1,{"e":3,"f":4}]}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"b":{"d":[1,{"f":4,"e":3}],"c":2},"a":1}"#).unwrap();
        assert_eq!(statement_id(&a), statement_id(&b));
    }

    #[test]
    fn forms_become_flat_string_maps() {
        let docs = decode(
            BodyFormat::Form,
            b"eventname=%5Ccore%5Cevent%5Ccourse_completed&userid=7&other_x=1",
            false,
        )
        .unwrap();
        assert_eq!(
            docs[0]["eventname"],
            json!("\\core\\event\\course_completed")
        );
        assert_eq!(docs[0]["userid"], json!("7"));
    }
}
