//! Mapping a decoded document to the canonical event with the source's
//! compiled JSONPaths: fallbacks (first non-null of several paths), type
//! coercion (ids arrive as numbers or strings) and time formats.
//!
//! Paths are parsed once by `jsonpath-rust` at config load. Plain member and
//! index chains (`$.a.b[0]`, nearly every mapping) are lowered to a list of
//! steps walked without allocation; anything richer (filters, wildcards,
//! descendants) runs through the library's evaluator.

use std::cmp::Ordering;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A JSONPath compiled at load time.
#[derive(Clone, Debug)]
pub struct CompiledPath {
    text: String,
    plan: Plan,
}

#[derive(Clone, Debug)]
enum Plan {
    Steps(Vec<Step>),
    Query(Box<JpQuery>),
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(i64),
}

impl CompiledPath {
    /// Parses a JSONPath; the error text is the parser's.
    pub fn parse(text: &str) -> Result<Self, String> {
        let query = jsonpath_rust::parser::parse_json_path(text).map_err(|e| e.to_string())?;
        let steps: Option<Vec<Step>> = query
            .segments
            .iter()
            .map(|seg| match seg {
                Segment::Selector(Selector::Name(n)) => Some(Step::Key(unquote(n))),
                Segment::Selector(Selector::Index(i)) => Some(Step::Index(*i)),
                _ => None,
            })
            .collect();
        let plan = match steps {
            Some(steps) => Plan::Steps(steps),
            None => Plan::Query(Box::new(query)),
        };
        Ok(Self {
            text: text.to_string(),
            plan,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first value the path selects, if any (null counts as none).
    pub fn first<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let found = match &self.plan {
            Plan::Steps(steps) => {
                let mut cur = doc;
                for step in steps {
                    cur = match (step, cur) {
                        (Step::Key(k), Value::Object(m)) => m.get(k)?,
                        (Step::Index(i), Value::Array(a)) => {
                            let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                            a.get(usize::try_from(idx).ok()?)?
                        }
                        _ => return None,
                    };
                }
                Some(cur)
            }
            Plan::Query(q) => jsonpath_rust::query::js_path_process(q, doc)
                .ok()
                .and_then(|refs| refs.into_iter().map(|r| r.val).find(|v| !v.is_null())),
        };
        found.filter(|v| !v.is_null())
    }
}

/// The parser keeps quotes of bracketed names in some versions; strip them.
fn unquote(name: &str) -> String {
    let b = name.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        name[1..name.len() - 1].to_string()
    } else {
        name.to_string()
    }
}

/// What a mapped value is coerced to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Strings as they are; integers and integral floats as their digits.
    String,
    Integer,
    Number,
    Boolean,
    /// A point in time, see [`TimeFormat`].
    Timestamp,
    /// The JSON value as it is.
    Any,
}

/// How a timestamp is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Numbers below 10^11 are seconds, larger ones milliseconds; strings of
    /// digits likewise; other strings RFC 3339 or `YYYY-MM-DD HH:MM:SS` (UTC).
    Auto,
    Unix,
    UnixMs,
    Rfc3339,
}

/// One mapped field: its paths in order of preference and its type.
#[derive(Clone, Debug)]
pub struct FieldSpec {
    pub paths: Vec<CompiledPath>,
    pub ty: FieldType,
    pub format: TimeFormat,
    pub default: Option<Value>,
}

impl FieldSpec {
    /// The first present value: null and blank strings count as absent, so
    /// a form's empty `relateduserid=` falls back to the next path; with
    /// `placeholders`, so does a template placeholder left unfilled.
    fn resolve(&self, doc: &Value, placeholders: bool) -> Option<Value> {
        self.paths
            .iter()
            .find_map(|p| {
                p.first(doc).filter(|v| match v {
                    Value::String(s) => !(s.trim().is_empty() || placeholders && is_placeholder(s)),
                    _ => true,
                })
            })
            .cloned()
            .or_else(|| self.default.clone())
    }
}

/// `{name}` (letters, digits, `-`, `_`): what Moodle's Event Trigger plugin
/// sends for a placeholder its event has no value for.
fn is_placeholder(s: &str) -> bool {
    s.len() > 2
        && s.starts_with('{')
        && s.ends_with('}')
        && s[1..s.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Canonical fields a source can map and require.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    EventId,
    EventType,
    UserId,
    CourseId,
    ObjectId,
    OccurredAt,
}

impl Field {
    pub const ALL: [Field; 6] = [
        Field::EventId,
        Field::EventType,
        Field::UserId,
        Field::CourseId,
        Field::ObjectId,
        Field::OccurredAt,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::EventType => "event_type",
            Field::UserId => "user_id",
            Field::CourseId => "course_id",
            Field::ObjectId => "object_id",
            Field::OccurredAt => "occurred_at",
        }
    }
    pub fn parse(s: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// The vendor-to-canonical event type table.
#[derive(Clone, Debug)]
pub struct EventTypeSpec {
    pub paths: Vec<CompiledPath>,
    pub table: std::collections::HashMap<String, Arc<str>>,
    /// With no table entry, use the vendor name itself as the canonical type
    /// (for sources that send canonical events, like `custom`).
    pub passthrough: bool,
    /// Paths whose values, joined with `.`, name the event when no path does.
    pub compose: Vec<CompiledPath>,
    /// Conditional mappings, tried in order before the table.
    pub cases: Vec<EventCase>,
}

/// A vendor event mapped to a canonical type only when its conditions hold.
#[derive(Clone, Debug)]
pub struct EventCase {
    pub vendors: Vec<String>,
    pub when: Vec<(Operand, Test)>,
    pub canonical: Arc<str>,
    /// Attributes set on the event when the case matches.
    pub set: Map<String, Value>,
}

/// A value a condition reads from the event.
#[derive(Clone, Debug)]
pub enum Operand {
    /// A mapped attribute, by name.
    Attribute(String),
    /// A canonical field.
    Field(Field),
    /// A JSONPath into the document.
    Path(CompiledPath),
}

/// What a condition checks of its operand.
#[derive(Clone, Debug)]
pub enum Test {
    /// Equals one of these literals.
    AnyOf(Vec<Value>),
    NotEqual(Value),
    /// A numeric comparison with a literal or another operand.
    Compare(Ordering, bool, Bound),
    Present(bool),
}

/// The right-hand side of a numeric comparison.
#[derive(Clone, Debug)]
pub enum Bound {
    Number(f64),
    Operand(Operand),
}

impl EventCase {
    fn matches(&self, vendor: &str, view: &View) -> bool {
        self.vendors.iter().any(|v| v == vendor)
            && self.when.iter().all(|(operand, test)| {
                let value = view.get(operand);
                match test {
                    Test::Present(want) => value.is_some() == *want,
                    Test::AnyOf(options) => {
                        value.is_some_and(|v| options.iter().any(|o| loosely_equal(&v, o)))
                    }
                    Test::NotEqual(other) => value.is_none_or(|v| !loosely_equal(&v, other)),
                    Test::Compare(ord, or_equal, bound) => {
                        let right = match bound {
                            Bound::Number(n) => Some(*n),
                            Bound::Operand(o) => view.get(o).as_ref().and_then(as_number),
                        };
                        match (value.as_ref().and_then(as_number), right) {
                            (Some(l), Some(r)) => l
                                .partial_cmp(&r)
                                .is_some_and(|c| c == *ord || (*or_equal && c.is_eq())),
                            _ => false,
                        }
                    }
                }
            })
    }
}

/// What a condition can read: the document, the canonical fields and the
/// mapped attributes.
struct View<'a> {
    doc: &'a Value,
    attributes: &'a Map<String, Value>,
    fields: [(Field, Option<&'a str>); 3],
}

impl View<'_> {
    fn get(&self, operand: &Operand) -> Option<Value> {
        match operand {
            Operand::Attribute(name) => self.attributes.get(name).cloned(),
            Operand::Field(f) => self
                .fields
                .iter()
                .find(|(k, _)| k == f)
                .and_then(|(_, v)| v.map(|s| Value::String(s.to_string()))),
            Operand::Path(p) => p.first(self.doc).cloned(),
        }
    }
}

/// A number, or a string that parses as one.
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

/// Equality across the ways a payload writes a value: `2`, `2.0` and `"2"`
/// are equal; `true` and `"true"` too.
fn loosely_equal(a: &Value, b: &Value) -> bool {
    if a == b {
        return true;
    }
    match (as_number(a), as_number(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (a, b) {
            (Value::Bool(x), Value::String(s)) | (Value::String(s), Value::Bool(x)) => s
                .trim()
                .eq_ignore_ascii_case(if *x { "true" } else { "false" }),
            _ => false,
        },
    }
}

impl EventTypeSpec {
    /// A metric label for a canonical type: the type itself when the table
    /// names it (a closed set), else `other` (a passthrough name from a payload).
    pub fn label<'a>(&'a self, canonical: &'a str) -> &'a str {
        if self.table.values().any(|t| &**t == canonical)
            || self.cases.iter().any(|c| &*c.canonical == canonical)
        {
            canonical
        } else {
            "other"
        }
    }
}

/// A source's compiled mapping.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub event_type: EventTypeSpec,
    pub event_id: Option<FieldSpec>,
    pub user_id: Option<FieldSpec>,
    pub course_id: Option<FieldSpec>,
    pub object_id: Option<FieldSpec>,
    pub occurred_at: Option<FieldSpec>,
    pub attributes: Vec<(String, FieldSpec)>,
    /// An object in the payload whose keys are all attributes (the declared
    /// ones win on a clash; anything but an object adds nothing).
    pub attributes_from: Option<FieldSpec>,
    pub required: Vec<Field>,
    /// A value that is a template placeholder (`{other_completionstate}`)
    /// counts as absent.
    pub unfilled_placeholders_absent: bool,
}

/// The canonical event every source's payload is mapped to.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct CanonicalEvent {
    pub source: String,
    /// The dedupe key: the mapped id, else `sha256:<hex>` of the raw bytes.
    /// Named `event_id` on the wire and to rules, as the canonical event's
    /// contract says; the stored event's own id is the `evt_…` one.
    #[serde(rename = "event_id")]
    pub dedupe_key: String,
    /// The canonical type, or `None` when the vendor's name has no mapping.
    pub event_type: Option<String>,
    /// The vendor's own event name, as sent.
    pub vendor_event_type: Option<String>,
    pub user_id: Option<String>,
    pub course_id: Option<String>,
    pub object_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub attributes: Map<String, Value>,
}

/// Why a document does not map: lists every missing and invalid field.
#[derive(Debug, Default, Clone, PartialEq, thiserror::Error)]
#[error("the payload does not satisfy the source's mapping")]
pub struct MappingError {
    pub missing_fields: Vec<String>,
    pub invalid_fields: Vec<String>,
}

impl MappingError {
    pub fn message(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing_fields.is_empty() {
            parts.push(format!(
                "missing required fields: {}",
                self.missing_fields.join(", ")
            ));
        }
        if !self.invalid_fields.is_empty() {
            parts.push(format!(
                "invalid fields: {}",
                self.invalid_fields.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Longest id or type string accepted.
pub const MAX_ID_LEN: usize = 512;

/// Maps one document. `raw` is the bytes the document came from (hashed for
/// the dedupe key when the payload carries no id); `now` is the default time.
pub fn map_event(
    source: &str,
    mapping: &Mapping,
    doc: &Value,
    raw: &[u8],
    now: DateTime<Utc>,
) -> Result<CanonicalEvent, MappingError> {
    let mut err = MappingError::default();

    let vendor = match mapping.event_type.paths.iter().find_map(|p| p.first(doc)) {
        Some(v) => id_string(v, Field::EventType.name(), &mut err),
        None => compose(&mapping.event_type.compose, doc, &mut err),
    };

    let id = |spec: &Option<FieldSpec>, field: Field, err: &mut MappingError| {
        spec.as_ref()
            .and_then(|s| s.resolve(doc, mapping.unfilled_placeholders_absent))
            .and_then(|v| id_string(&v, field.name(), err))
    };
    let mapped_id = id(&mapping.event_id, Field::EventId, &mut err);
    let user_id = id(&mapping.user_id, Field::UserId, &mut err);
    let course_id = id(&mapping.course_id, Field::CourseId, &mut err);
    let object_id = id(&mapping.object_id, Field::ObjectId, &mut err);

    let occurred = occurred_at(mapping, doc, &mut err);

    let mut attributes = map_attributes(mapping, doc, &mut err);

    let fields = [
        (Field::UserId, user_id.as_deref()),
        (Field::CourseId, course_id.as_deref()),
        (Field::ObjectId, object_id.as_deref()),
    ];
    let event_type = vendor.as_deref().and_then(|v| {
        let view = View {
            doc,
            attributes: &attributes,
            fields,
        };
        canonical_type(&mapping.event_type, v, &view)
    });
    let event_type = event_type.map(|(t, set)| {
        for (k, v) in set.into_iter().flatten() {
            attributes.insert(k.clone(), v.clone());
        }
        t
    });

    let present = |field: Field| match field {
        Field::EventId => mapped_id.is_some(),
        Field::EventType => vendor.is_some(),
        Field::UserId => user_id.is_some(),
        Field::CourseId => course_id.is_some(),
        Field::ObjectId => object_id.is_some(),
        Field::OccurredAt => occurred.is_some(),
    };
    check_required(
        &mapping.required,
        vendor.is_some() && event_type.is_none(),
        present,
        &mut err,
    );
    if !err.missing_fields.is_empty() || !err.invalid_fields.is_empty() {
        return Err(err);
    }

    let dedupe_key =
        mapped_id.unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(raw))));
    Ok(CanonicalEvent {
        source: source.to_string(),
        dedupe_key,
        event_type,
        vendor_event_type: vendor,
        user_id,
        course_id,
        object_id,
        occurred_at: occurred.unwrap_or(now),
        attributes,
    })
}

/// When the event occurred, if the payload says (invalid when it says so in
/// no format the field takes).
fn occurred_at(mapping: &Mapping, doc: &Value, err: &mut MappingError) -> Option<DateTime<Utc>> {
    let spec = mapping.occurred_at.as_ref()?;
    let v = spec.resolve(doc, mapping.unfilled_placeholders_absent)?;
    let t = parse_time(&v, spec.format);
    if t.is_none() {
        err.invalid_fields
            .push(Field::OccurredAt.name().to_string());
    }
    t
}

/// The mapped attributes, each coerced to its type, then every key of the
/// `attributes_from` object that they do not name.
fn map_attributes(mapping: &Mapping, doc: &Value, err: &mut MappingError) -> Map<String, Value> {
    let mut attributes = Map::new();
    for (name, spec) in &mapping.attributes {
        if let Some(v) = spec.resolve(doc, mapping.unfilled_placeholders_absent) {
            match coerce(&v, spec) {
                Some(v) => {
                    attributes.insert(name.clone(), v);
                }
                None => err.invalid_fields.push(name.clone()),
            }
        }
    }
    // `[]` is how PHP encodes an empty object: anything but an object adds
    // nothing, and is no error.
    if let Some(Value::Object(extra)) = mapping
        .attributes_from
        .as_ref()
        .and_then(|spec| spec.resolve(doc, mapping.unfilled_placeholders_absent))
    {
        for (k, v) in extra {
            if !v.is_null() {
                attributes.entry(k).or_insert(v);
            }
        }
    }
    attributes
}

/// A vendor event's canonical type, with the attributes its case sets:
/// the first case that matches, else the table, else (with passthrough,
/// for a name no case is about) the vendor's name itself.
fn canonical_type<'a>(
    spec: &'a EventTypeSpec,
    vendor: &str,
    view: &View,
) -> Option<(String, Option<&'a Map<String, Value>>)> {
    if let Some(case) = spec.cases.iter().find(|c| c.matches(vendor, view)) {
        return Some((case.canonical.to_string(), Some(&case.set)));
    }
    let has_cases = spec
        .cases
        .iter()
        .any(|c| c.vendors.iter().any(|n| n == vendor));
    match spec.table.get(vendor) {
        Some(t) => Some((t.to_string(), None)),
        None if spec.passthrough && !has_cases => Some((vendor.to_string(), None)),
        None => None,
    }
}

/// Lists the required fields that are missing (not those already invalid).
/// A vendor event with no canonical type (`unmapped`) earns nothing: it is
/// stored whatever else it lacks (a platform's user or tag events may name
/// no learner), rather than refused and retried by the platform forever.
fn check_required(
    required: &[Field],
    unmapped: bool,
    present: impl Fn(Field) -> bool,
    err: &mut MappingError,
) {
    for field in required
        .iter()
        .filter(|f| !unmapped || **f == Field::EventType)
    {
        if !present(*field) && !err.invalid_fields.iter().any(|f| f == field.name()) {
            err.missing_fields.push(field.name().to_string());
        }
    }
}

/// The values of every path, joined with `.`; `None` unless all are
/// strings. Over-long or NUL-bearing names are invalid, as an id is.
fn compose(paths: &[CompiledPath], doc: &Value, err: &mut MappingError) -> Option<String> {
    if paths.is_empty() {
        return None;
    }
    let parts: Option<Vec<&str>> = paths
        .iter()
        .map(|p| p.first(doc).and_then(Value::as_str))
        .collect();
    let name = parts?.join(".");
    if name.len() > MAX_ID_LEN || name.contains('\0') {
        err.invalid_fields.push(Field::EventType.name().to_string());
        return None;
    }
    Some(name)
}

/// An id as a string: strings as they are (trimmed), integers as digits.
/// Empty, over-long, NUL-bearing or structured values are invalid.
fn id_string(v: &Value, field: &str, err: &mut MappingError) -> Option<String> {
    let s = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => match number_digits(n) {
            Some(d) => d,
            None => {
                // Beyond 2^53 a JSON number has lost digits: not an id.
                err.invalid_fields.push(field.to_string());
                return None;
            }
        },
        Value::Bool(_) | Value::Array(_) | Value::Object(_) | Value::Null => {
            err.invalid_fields.push(field.to_string());
            return None;
        }
    };
    if s.is_empty() {
        return None;
    }
    if s.len() > MAX_ID_LEN || s.contains('\0') {
        err.invalid_fields.push(field.to_string());
        return None;
    }
    Some(s)
}

/// Integers (and integral floats within 2^53) as their digits; smaller
/// fractional numbers as written; `None` for floats too large to be exact.
fn number_digits(n: &serde_json::Number) -> Option<String> {
    if let Some(i) = n.as_i64() {
        return Some(i.to_string());
    }
    if let Some(u) = n.as_u64() {
        return Some(u.to_string());
    }
    let f = n.as_f64()?;
    if f.abs() >= 9_007_199_254_740_992.0 {
        None
    } else if f.fract() == 0.0 {
        Some((f as i64).to_string())
    } else {
        Some(n.to_string())
    }
}

/// Coerces an attribute value to its declared type; `None` when it cannot be.
pub fn coerce(v: &Value, spec: &FieldSpec) -> Option<Value> {
    match spec.ty {
        FieldType::Any => Some(v.clone()),
        FieldType::String => match v {
            Value::String(s) if !s.contains('\0') => Some(Value::String(s.clone())),
            Value::Number(n) => number_digits(n).map(Value::String),
            Value::Bool(b) => Some(Value::String(b.to_string())),
            _ => None,
        },
        FieldType::Integer => match v {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                        .map(|f| f as i64)
                })
                .map(Value::from),
            Value::String(s) => s.trim().parse::<i64>().ok().map(Value::from),
            _ => None,
        },
        FieldType::Number => match v {
            Value::Number(_) => Some(v.clone()),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number),
            _ => None,
        },
        FieldType::Boolean => match v {
            Value::Bool(_) => Some(v.clone()),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Some(Value::Bool(true)),
                "false" | "0" | "no" => Some(Value::Bool(false)),
                _ => None,
            },
            Value::Number(n) => n
                .as_i64()
                .filter(|i| *i == 0 || *i == 1)
                .map(|i| Value::Bool(i == 1)),
            _ => None,
        },
        FieldType::Timestamp => parse_time(v, spec.format).map(|t| Value::String(t.to_rfc3339())),
    }
}

/// Parses a time value in the given format.
pub fn parse_time(v: &Value, format: TimeFormat) -> Option<DateTime<Utc>> {
    let from_number = |x: f64, ms: bool| -> Option<DateTime<Utc>> {
        if !x.is_finite() || x < 0.0 {
            return None;
        }
        let millis = if ms { x } else { x * 1000.0 };
        if millis > 253_402_300_799_000.0 {
            return None; // after 9999-12-31
        }
        Utc.timestamp_millis_opt(millis as i64).single()
    };
    let number = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<f64>().ok()
        }
        _ => None,
    };
    match (format, number, v) {
        (TimeFormat::Unix, Some(x), _) => from_number(x, false),
        (TimeFormat::UnixMs, Some(x), _) => from_number(x, true),
        (TimeFormat::Auto, Some(x), _) => from_number(x, x >= 1e11),
        (TimeFormat::Rfc3339 | TimeFormat::Auto, None, Value::String(s)) => {
            let s = s.trim();
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| {
                    if format == TimeFormat::Auto {
                        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                            .ok()
                            .map(|n| n.and_utc())
                    } else {
                        None
                    }
                })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(paths: &[&str], ty: FieldType) -> FieldSpec {
        FieldSpec {
            paths: paths
                .iter()
                .map(|p| CompiledPath::parse(p).unwrap())
                .collect(),
            ty,
            format: TimeFormat::Auto,
            default: None,
        }
    }

    fn moodle() -> Mapping {
        Mapping {
            event_type: EventTypeSpec {
                paths: vec![CompiledPath::parse("$.eventname").unwrap()],
                table: [(
                    "\\core\\event\\course_completed".to_string(),
                    Arc::from("course.completed"),
                )]
                .into_iter()
                .collect(),
                passthrough: false,
                cases: Vec::new(),
                compose: vec![
                    CompiledPath::parse("$.resource").unwrap(),
                    CompiledPath::parse("$.action").unwrap(),
                ],
            },
            event_id: Some(field(&["$.id"], FieldType::String)),
            user_id: Some(field(&["$.relateduserid", "$.userid"], FieldType::String)),
            course_id: Some(field(&["$.courseid"], FieldType::String)),
            object_id: Some(field(&["$.objectid"], FieldType::String)),
            occurred_at: Some(field(&["$.timecreated"], FieldType::Timestamp)),
            attributes: vec![(
                "completion".into(),
                field(&["$.other.completiontime"], FieldType::Integer),
            )],
            attributes_from: None,
            required: vec![Field::UserId, Field::EventType],
            unfilled_placeholders_absent: false,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000, 0).unwrap()
    }

    #[test]
    fn paths_compile_to_steps_or_queries() {
        let doc = json!({"a": {"b": [10, 20, {"c": "x"}]}, "k e": 1, "list": [{"t": "q", "v": 5}, {"t": "p", "v": 6}]});
        let cases = [
            ("$.a.b[1]", Some(json!(20))),
            ("$.a.b[-1].c", Some(json!("x"))),
            ("$['k e']", Some(json!(1))),
            ("$.a.missing", None),
            ("$.a.b[9]", None),
            ("$.list[?@.t == 'p'].v", Some(json!(6))),
            ("$..c", Some(json!("x"))),
        ];
        for (path, want) in cases {
            let p = CompiledPath::parse(path).unwrap();
            assert_eq!(p.first(&doc).cloned(), want, "{path}");
        }
        assert!(CompiledPath::parse("$.a[").is_err());
        assert!(CompiledPath::parse("no dollar").is_err());
    }

    #[test]
    fn attributes_from_adds_every_key_and_declared_attributes_win() {
        let mut m = moodle();
        m.attributes_from = Some(field(&["$.other"], FieldType::Any));
        let doc = json!({"id": 1, "eventname": "x", "userid": 2, "timecreated": 1662013333,
            "other": {"completiontime": "5", "grade": 0.8, "gone": null}});
        let ev = map_event("moodle", &m, &doc, b"raw", now()).unwrap();
        assert_eq!(
            Value::Object(ev.attributes),
            json!({"completion": 5, "completiontime": "5", "grade": 0.8})
        );
        for other in [json!([]), json!("text")] {
            let doc = json!({"id": 1, "eventname": "x", "userid": 2, "other": other});
            let ev = map_event("moodle", &m, &doc, b"raw", now()).unwrap();
            assert!(ev.attributes.is_empty(), "{other}");
        }
    }

    #[test]
    fn ids_arrive_as_numbers_or_strings() {
        let m = moodle();
        for doc in [
            json!({"id": 9194694, "eventname": "\\core\\event\\course_completed", "userid": 8774, "courseid": 987, "timecreated": 1662013333}),
            json!({"id": "9194694", "eventname": "\\core\\event\\course_completed", "userid": "8774", "courseid": "987", "timecreated": "1662013333"}),
            json!({"id": 9194694.0, "eventname": "\\core\\event\\course_completed", "userid": 8774.0, "courseid": 987, "timecreated": 1662013333}),
        ] {
            let ev = map_event("moodle", &m, &doc, b"raw", now()).unwrap();
            assert_eq!(ev.dedupe_key, "9194694");
            assert_eq!(ev.user_id.as_deref(), Some("8774"));
            assert_eq!(ev.course_id.as_deref(), Some("987"));
            assert_eq!(ev.event_type.as_deref(), Some("course.completed"));
            assert_eq!(ev.occurred_at.timestamp(), 1662013333);
        }
    }

    #[test]
    fn the_first_non_null_path_wins() {
        let m = moodle();
        let doc = json!({"eventname": "x", "relateduserid": 42, "userid": 2});
        assert_eq!(
            map_event("moodle", &m, &doc, b"", now())
                .unwrap()
                .user_id
                .as_deref(),
            Some("42")
        );
        let doc = json!({"eventname": "x", "relateduserid": null, "userid": 2});
        assert_eq!(
            map_event("moodle", &m, &doc, b"", now())
                .unwrap()
                .user_id
                .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn unmapped_vendor_types_keep_their_name_and_no_canonical_type() {
        let ev = map_event(
            "moodle",
            &moodle(),
            &json!({"eventname": "\\mod_forum\\event\\post_created", "userid": 1}),
            b"",
            now(),
        )
        .unwrap();
        assert_eq!(ev.event_type, None);
        assert_eq!(
            ev.vendor_event_type.as_deref(),
            Some("\\mod_forum\\event\\post_created")
        );
    }

    #[test]
    fn a_composed_vendor_name_is_used_when_no_path_names_the_event() {
        let doc = json!({"resource": "course", "action": "completed", "userid": 1});
        let mut m = moodle();
        m.event_type
            .table
            .insert("course.completed".into(), Arc::from("course.completed"));
        let ev = map_event("x", &m, &doc, b"", now()).unwrap();
        assert_eq!(ev.vendor_event_type.as_deref(), Some("course.completed"));
        assert_eq!(ev.event_type.as_deref(), Some("course.completed"));
        // A NUL would reach the store (PostgreSQL refuses it in text): invalid.
        let doc = json!({"resource": "course\u{0}", "action": "completed", "userid": 1});
        let err = map_event("x", &m, &doc, b"", now()).unwrap_err();
        assert_eq!(err.invalid_fields, vec!["event_type"]);
    }

    #[test]
    fn cases_map_a_vendor_event_by_its_values() {
        let mut m = moodle();
        m.attributes = vec![
            ("state".into(), field(&["$.state"], FieldType::Integer)),
            ("grade".into(), field(&["$.grade"], FieldType::Number)),
            ("pass".into(), field(&["$.pass"], FieldType::Number)),
        ];
        let case = |when: Vec<(Operand, Test)>, canonical: &str, set: Value| EventCase {
            vendors: vec!["done".into()],
            when,
            canonical: Arc::from(canonical),
            set: set.as_object().cloned().unwrap_or_default(),
        };
        let attr = |n: &str| Operand::Attribute(n.into());
        m.event_type.cases = vec![
            case(
                vec![(attr("state"), Test::AnyOf(vec![json!(1)]))],
                "lesson.completed",
                json!({}),
            ),
            case(
                vec![(attr("state"), Test::AnyOf(vec![json!(2)]))],
                "lesson.completed",
                json!({"passed": true}),
            ),
            case(
                vec![(
                    attr("grade"),
                    Test::Compare(Ordering::Greater, true, Bound::Operand(attr("pass"))),
                )],
                "quiz.passed",
                json!({}),
            ),
            case(
                vec![
                    (
                        Operand::Path(CompiledPath::parse("$.x").unwrap()),
                        Test::Present(true),
                    ),
                    (Operand::Field(Field::CourseId), Test::NotEqual(json!("c9"))),
                ],
                "x.present",
                json!({}),
            ),
        ];
        let map = |doc: Value| {
            let ev = map_event("s", &m, &doc, b"", now()).unwrap();
            (ev.event_type, ev.attributes.get("passed").cloned())
        };
        let base = |extra: Value| {
            let mut d = json!({"eventname": "done", "userid": 1});
            d.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            d
        };
        assert_eq!(
            map(base(json!({"state": "1"}))),
            (Some("lesson.completed".into()), None)
        );
        assert_eq!(
            map(base(json!({"state": 2}))),
            (Some("lesson.completed".into()), Some(json!(true)))
        );
        assert_eq!(
            map(base(json!({"state": 0}))),
            (None, None),
            "no case, no table entry"
        );
        assert_eq!(
            map(base(json!({"grade": 80, "pass": "80"}))),
            (Some("quiz.passed".into()), None)
        );
        assert_eq!(map(base(json!({"grade": 79.5, "pass": 80}))), (None, None));
        assert_eq!(
            map(base(json!({"grade": 90}))),
            (None, None),
            "no bound, no pass"
        );
        assert_eq!(
            map(base(json!({"x": 0, "courseid": "c1"}))),
            (Some("x.present".into()), None)
        );
        assert_eq!(map(base(json!({"x": 0, "courseid": "c9"}))), (None, None));
        assert_eq!(map(base(json!({"courseid": "c1"}))), (None, None));
    }

    #[test]
    fn unfilled_placeholders_count_as_absent_when_the_source_says_so() {
        let mut m = moodle();
        let doc = json!({"eventname": "x", "relateduserid": "{relateduserid}", "userid": "5",
            "other": {"completiontime": "{other_completiontime}"}});
        let err = map_event("s", &m, &doc, b"", now()).unwrap_err();
        assert_eq!(err.invalid_fields, vec!["completion"]);
        m.unfilled_placeholders_absent = true;
        let ev = map_event("s", &m, &doc, b"", now()).unwrap();
        assert_eq!(ev.user_id.as_deref(), Some("5"));
        assert!(ev.attributes.get("completion").is_none());
        assert!(!is_placeholder("{}"));
        assert!(!is_placeholder("{a b}"));
        assert!(is_placeholder("{other_x-1}"));
    }

    #[test]
    fn loose_equality_spans_the_ways_payloads_write_values() {
        assert!(loosely_equal(&json!(2), &json!("2")));
        assert!(loosely_equal(&json!(2.0), &json!(2)));
        assert!(loosely_equal(&json!("true"), &json!(true)));
        assert!(!loosely_equal(&json!("2x"), &json!(2)));
        assert!(!loosely_equal(&json!(null), &json!(0)));
    }

    #[test]
    fn without_an_id_the_dedupe_key_is_the_body_hash() {
        let ev = map_event(
            "moodle",
            &moodle(),
            &json!({"eventname": "x", "userid": 1}),
            b"abc",
            now(),
        )
        .unwrap();
        assert_eq!(
            ev.dedupe_key,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ev.occurred_at, now());
    }

    #[test]
    fn missing_and_invalid_fields_are_all_listed() {
        let doc = json!({"userid": {"nested": true}, "timecreated": "yesterday", "other": {"completiontime": "soon"}});
        let err = map_event("moodle", &moodle(), &doc, b"", now()).unwrap_err();
        assert_eq!(err.missing_fields, vec!["event_type"]);
        let mut invalid = err.invalid_fields.clone();
        invalid.sort();
        assert_eq!(invalid, vec!["completion", "occurred_at", "user_id"]);
    }

    #[test]
    fn nul_bytes_and_huge_ids_are_invalid() {
        for user in [json!("a\u{0}b"), json!("x".repeat(MAX_ID_LEN + 1))] {
            let err = map_event(
                "moodle",
                &moodle(),
                &json!({"eventname": "x", "userid": user}),
                b"",
                now(),
            )
            .unwrap_err();
            assert_eq!(err.invalid_fields, vec!["user_id"]);
        }
    }

    #[test]
    fn times_parse_in_every_format() {
        let t = |v: Value, f| parse_time(&v, f).map(|t| t.timestamp_millis());
        assert_eq!(t(json!(1662013333), TimeFormat::Auto), Some(1662013333000));
        assert_eq!(
            t(json!(1662013333123u64), TimeFormat::Auto),
            Some(1662013333123)
        );
        assert_eq!(
            t(json!("1662013333"), TimeFormat::Unix),
            Some(1662013333000)
        );
        assert_eq!(
            t(json!(1662013333123u64), TimeFormat::UnixMs),
            Some(1662013333123)
        );
        assert_eq!(
            t(json!("2025-08-21T10:15:30Z"), TimeFormat::Auto),
            Some(1755771330000)
        );
        assert_eq!(
            t(json!("2025-08-21T12:15:30+02:00"), TimeFormat::Rfc3339),
            Some(1755771330000)
        );
        assert_eq!(
            t(json!("2025-08-21 10:15:30"), TimeFormat::Auto),
            Some(1755771330000)
        );
        assert_eq!(t(json!("2025-08-21 10:15:30"), TimeFormat::Rfc3339), None);
        assert_eq!(t(json!(-5), TimeFormat::Auto), None);
        assert_eq!(t(json!(1e300), TimeFormat::Auto), None);
        assert_eq!(t(json!(true), TimeFormat::Auto), None);
    }

    #[test]
    fn coercions() {
        let s = |ty| field(&["$.x"], ty);
        assert_eq!(
            coerce(&json!("12"), &s(FieldType::Integer)),
            Some(json!(12))
        );
        assert_eq!(
            coerce(&json!(12.0), &s(FieldType::Integer)),
            Some(json!(12))
        );
        assert_eq!(coerce(&json!(12.5), &s(FieldType::Integer)), None);
        assert_eq!(
            coerce(&json!("0.75"), &s(FieldType::Number)),
            Some(json!(0.75))
        );
        assert_eq!(coerce(&json!("NaN"), &s(FieldType::Number)), None);
        assert_eq!(
            coerce(&json!("yes"), &s(FieldType::Boolean)),
            Some(json!(true))
        );
        assert_eq!(coerce(&json!(7), &s(FieldType::String)), Some(json!("7")));
        assert_eq!(
            coerce(&json!({"a": 1}), &s(FieldType::Any)),
            Some(json!({"a": 1}))
        );
        assert_eq!(coerce(&json!([1]), &s(FieldType::String)), None);
    }
}
