//! Point rules: one `rules/*.rhai` file is one rule, compiled once at load
//! and run in a sandboxed engine (operation, depth, size limits; no modules,
//! files or network). A rule sees `event` and returns an integer, nothing
//! (`()`), or a map `#{ points: N, reason: "…" }`.

use std::sync::Arc;

use rhai::{Dynamic, Engine, Map as RhaiMap, Scope, AST};
use serde::Serialize;
use serde_json::Value;

use super::mapping::CanonicalEvent;

/// Sandbox limits; generous for scoring, tight for a runaway script.
pub mod limits {
    pub const MAX_OPERATIONS: u64 = 100_000;
    pub const MAX_CALL_LEVELS: usize = 32;
    pub const MAX_EXPR_DEPTH: usize = 64;
    pub const MAX_FN_EXPR_DEPTH: usize = 32;
    pub const MAX_STRING_SIZE: usize = 64 * 1024;
    pub const MAX_ARRAY_SIZE: usize = 10_000;
    pub const MAX_MAP_SIZE: usize = 10_000;
    /// Largest award (in absolute value) one rule may give one event.
    pub const MAX_POINTS: i64 = 1_000_000;
    /// Memory all of a source's rules may hold at once for one event (all
    /// strings, arrays and maps together), measured by the allocator.
    pub const MAX_MEMORY: usize = 32 * 1024 * 1024;
    /// Wall-clock time all of a source's rules may take for one event.
    pub const MAX_TIME: std::time::Duration = std::time::Duration::from_millis(100);
}

thread_local! {
    /// When the rules running on this thread must stop (see [`score`]).
    static DEADLINE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// What a rule may know of the user's past, as `history` in its scope:
/// `history.total` (points so far), `history.first` (no earlier processed
/// event of this type for this object, else course), `history.count(type,
/// seconds)` (earlier events of `type` within `seconds` before this one) and
/// `history.streak()` (consecutive UTC days with an event, up to this one's
/// day, this one included). Bounded: the store reads at most
/// [`HISTORY_DAYS`] days and [`HISTORY_EVENTS`] events, by index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    pub total: i64,
    pub first: bool,
    /// Earlier events (canonical type, occurred at in ms), newest first.
    pub recent: Vec<(String, i64)>,
    /// This event's time (ms).
    pub at: i64,
}

/// How far back `history` looks.
pub const HISTORY_DAYS: i64 = 31;
/// Most earlier events `history` holds.
pub const HISTORY_EVENTS: i64 = 1000;

impl History {
    pub fn count(&self, kind: &str, seconds: i64) -> i64 {
        let from = self.at.saturating_sub(seconds.saturating_mul(1000));
        self.recent
            .iter()
            .filter(|(t, at)| t == kind && *at >= from && *at <= self.at)
            .count() as i64
    }

    pub fn streak(&self) -> i64 {
        const DAY: i64 = 86_400_000;
        let today = self.at.div_euclid(DAY);
        let mut days: Vec<i64> = self
            .recent
            .iter()
            .map(|(_, at)| at.div_euclid(DAY))
            .filter(|d| *d <= today)
            .collect();
        days.push(today);
        days.sort_unstable_by(|a, b| b.cmp(a));
        days.dedup();
        days.iter()
            .enumerate()
            .take_while(|(i, d)| **d == today - *i as i64)
            .count() as i64
    }
}

/// The token a run stopped for its memory carries (one stopped for time
/// carries `()`).
const STOPPED_FOR_MEMORY: &str = "memory";

/// Builds the sandboxed engine shared by every rule.
pub fn engine() -> Engine {
    let mut e = Engine::new();
    e.register_type_with_name::<History>("History")
        .register_get("total", |h: &mut History| h.total)
        .register_get("first", |h: &mut History| h.first)
        .register_fn("count", |h: &mut History, kind: &str, seconds: i64| {
            h.count(kind, seconds)
        })
        .register_fn("streak", |h: &mut History| h.streak());
    e.set_max_operations(limits::MAX_OPERATIONS);
    // Memory held, after every operation (a thread-local read), and the
    // wall clock every 256: an operation can be slow (a replace in a long
    // string), so counting them does not bound time.
    e.on_progress(|ops| {
        if crate::meter::live() > limits::MAX_MEMORY {
            return Some(Dynamic::from(STOPPED_FOR_MEMORY));
        }
        if ops % 256 != 0 {
            return None;
        }
        let late = DEADLINE.with(|d| d.get().is_some_and(|at| std::time::Instant::now() > at));
        late.then_some(Dynamic::UNIT)
    });
    e.set_max_call_levels(limits::MAX_CALL_LEVELS);
    e.set_max_expr_depths(limits::MAX_EXPR_DEPTH, limits::MAX_FN_EXPR_DEPTH);
    e.set_max_string_size(limits::MAX_STRING_SIZE);
    e.set_max_array_size(limits::MAX_ARRAY_SIZE);
    e.set_max_map_size(limits::MAX_MAP_SIZE);
    e.disable_symbol("eval");
    e.on_print(|s| tracing::debug!(target: "rules", "{s}"));
    e.on_debug(|s, _, _| tracing::debug!(target: "rules", "{s}"));
    e
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub file: std::path::PathBuf,
    pub ast: AST,
    /// The script reads `history`: the store is asked before it runs.
    pub uses_history: bool,
    /// A moving average of its recent run times (ns): slow rules are run
    /// off the async runtime's threads (see `crate::scoring::score`).
    recent_nanos: std::sync::atomic::AtomicU64,
}

/// Run time above which a rule counts as slow.
pub const SLOW_RULE: std::time::Duration = std::time::Duration::from_millis(1);

impl Rule {
    /// Whether the rule has lately taken more than [`SLOW_RULE`] a run.
    pub fn is_slow(&self) -> bool {
        self.recent_nanos.load(std::sync::atomic::Ordering::Relaxed) > SLOW_RULE.as_nanos() as u64
    }

    fn note_run(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.recent_nanos.load(Relaxed);
        self.recent_nanos.store(old - old / 8 + sample / 8, Relaxed);
    }
}

/// One rule's award for one event.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Award {
    pub rule: Arc<str>,
    pub points: i64,
    pub reason: Option<String>,
    /// Awarded at most once per (namespace, user, rule, key), whatever the
    /// event ids: the store drops the award when the ledger holds the key.
    /// A rule asks for it with `once: true` (the key is the event's
    /// `object_id`; an event without one is not restricted) or
    /// `once: <string>` (`once: event.course_id`; `()` restricts nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub once: Option<String>,
}

/// A rule failed: nothing of this event is awarded.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("rule {rule} failed: {message}")]
pub struct RuleError {
    pub rule: Arc<str>,
    pub message: String,
}

/// Runs every rule on the event; all or nothing. All of them together may
/// take [`limits::MAX_TIME`] of wall-clock time.
pub fn score(
    engine: &Engine,
    rules: &[Arc<Rule>],
    ev: &CanonicalEvent,
    history: &History,
) -> Result<Vec<Award>, RuleError> {
    if rules.is_empty() || ev.event_type.is_none() {
        return Ok(Vec::new());
    }
    DEADLINE.with(|d| d.set(Some(std::time::Instant::now() + limits::MAX_TIME)));
    let result = crate::meter::metered(|| score_all(engine, rules, ev, history));
    DEADLINE.with(|d| d.set(None));
    result
}

fn score_all(
    engine: &Engine,
    rules: &[Arc<Rule>],
    ev: &CanonicalEvent,
    history: &History,
) -> Result<Vec<Award>, RuleError> {
    // One scope for all the rules: the event map is built once, and each
    // rule's own variables are dropped (rewind) before the next rule runs.
    let mut scope = Scope::new();
    scope.push_constant("event", Dynamic::from_map(event_map(ev)));
    let base = scope.len();
    let mut awards = Vec::new();
    for rule in rules {
        scope.rewind(base);
        if rule.uses_history {
            scope.push_constant("history", history.clone());
        }
        let started = std::time::Instant::now();
        let out = engine.eval_ast_with_scope::<Dynamic>(&mut scope, &rule.ast);
        rule.note_run(started.elapsed());
        let out = out.map_err(|e| RuleError {
            rule: rule.name.clone(),
            message: match *e {
                rhai::EvalAltResult::ErrorTerminated(token, _) if token.is_string() => {
                    format!("the rules held more than {} MiB", limits::MAX_MEMORY >> 20)
                }
                rhai::EvalAltResult::ErrorTerminated(..) => {
                    format!("the rules ran over {} ms", limits::MAX_TIME.as_millis())
                }
                other => other.to_string(),
            },
        })?;
        if let Some(award) = award_of(&rule.name, ev, out)? {
            awards.push(award);
        }
    }
    Ok(awards)
}

fn award_of(
    rule: &Arc<str>,
    ev: &CanonicalEvent,
    out: Dynamic,
) -> Result<Option<Award>, RuleError> {
    let fail = |message: String| RuleError {
        rule: rule.clone(),
        message,
    };
    let (points, reason, once) = if out.is_unit() {
        return Ok(None);
    } else if let Some(p) = out.clone().try_cast::<i64>() {
        (p, None, None)
    } else if let Some(map) = out.clone().try_cast::<RhaiMap>() {
        let points = match map.get("points") {
            None => return Ok(None),
            Some(p) if p.is_unit() => return Ok(None),
            Some(p) => p
                .as_int()
                .map_err(|t| fail(format!("`points` must be an integer, got {t}")))?,
        };
        let reason = match map.get("reason") {
            None => None,
            Some(r) if r.is_unit() => None,
            Some(r) => Some(
                r.clone()
                    .into_string()
                    .map_err(|t| fail(format!("`reason` must be a string, got {t}")))?,
            ),
        };
        let once = match map.get("once") {
            None => None,
            Some(o) if o.is_unit() => None,
            Some(o) if o.is_bool() => o
                .as_bool()
                .unwrap_or(false)
                .then(|| ev.object_id.clone())
                .flatten(),
            Some(o) => Some(
                o.clone()
                    .into_string()
                    .map_err(|t| fail(format!("`once` must be true or a string key, got {t}")))?,
            ),
        };
        if once
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > super::mapping::MAX_ID_LEN)
        {
            return Err(fail(format!(
                "a `once` key must hold 1 to {} bytes",
                super::mapping::MAX_ID_LEN
            )));
        }
        (points, reason, once)
    } else {
        return Err(fail(format!(
            "a rule returns an integer, () or #{{points, reason}}, not {}",
            out.type_name()
        )));
    };
    if points.abs() > limits::MAX_POINTS {
        return Err(fail(format!(
            "{points} points exceed the limit of {}",
            limits::MAX_POINTS
        )));
    }
    if points == 0 {
        return Ok(None);
    }
    Ok(Some(Award {
        rule: rule.clone(),
        points,
        reason,
        once,
    }))
}

/// The event as the script sees it.
fn event_map(ev: &CanonicalEvent) -> RhaiMap {
    let mut m = RhaiMap::new();
    let opt = |s: &Option<String>| s.clone().map(Dynamic::from).unwrap_or(Dynamic::UNIT);
    m.insert("source".into(), ev.source.clone().into());
    m.insert("event_id".into(), ev.dedupe_key.clone().into());
    m.insert("event_type".into(), opt(&ev.event_type));
    m.insert("vendor_event_type".into(), opt(&ev.vendor_event_type));
    m.insert("user_id".into(), opt(&ev.user_id));
    m.insert("course_id".into(), opt(&ev.course_id));
    m.insert("object_id".into(), opt(&ev.object_id));
    m.insert("occurred_at".into(), ev.occurred_at.to_rfc3339().into());
    m.insert("timestamp".into(), ev.occurred_at.timestamp().into());
    let attrs: RhaiMap = ev
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
        .collect();
    m.insert("attributes".into(), attrs.into());
    m
}

fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(0.0).into(),
        },
        Value::String(s) => s.clone().into(),
        Value::Array(a) => a.iter().map(to_dynamic).collect::<Vec<_>>().into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
            .collect::<RhaiMap>()
            .into(),
    }
}

/// Compiles one rule's source text.
pub fn compile(
    engine: &Engine,
    name: &str,
    file: &std::path::Path,
    text: &str,
) -> Result<Rule, rhai::ParseError> {
    let ast = engine.compile(text)?;
    // Whether the script names `history` (a mention in a comment only costs
    // a store read per event).
    let uses_history = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w == "history");
    Ok(Rule {
        name: Arc::from(name),
        file: file.to_path_buf(),
        ast,
        uses_history,
        recent_nanos: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn ev(kind: &str) -> CanonicalEvent {
        CanonicalEvent {
            source: "moodle".into(),
            dedupe_key: "1".into(),
            event_type: Some(kind.into()),
            vendor_event_type: None,
            user_id: Some("u1".into()),
            course_id: Some("c1".into()),
            object_id: None,
            occurred_at: Utc::now(),
            attributes: [("score".to_string(), serde_json::json!(0.9))]
                .into_iter()
                .collect(),
        }
    }

    fn rule(e: &Engine, name: &str, text: &str) -> Arc<Rule> {
        Arc::new(compile(e, name, std::path::Path::new("x.rhai"), text).unwrap())
    }

    #[test]
    fn rules_return_points_nothing_or_a_map() {
        let e = engine();
        let rules = vec![
            rule(
                &e,
                "int",
                r#"if event.event_type == "course.completed" { 50 }"#,
            ),
            rule(
                &e,
                "map",
                r#"#{ points: 5, reason: "bonus for " + event.course_id }"#,
            ),
            rule(&e, "none", "()"),
            rule(&e, "attr", "if event.attributes.score > 0.5 { 1 }"),
        ];
        let awards = score(&e, &rules, &ev("course.completed"), &History::default()).unwrap();
        let got: Vec<_> = awards
            .iter()
            .map(|a| (a.rule.to_string(), a.points, a.reason.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("int".into(), 50, None),
                ("map".into(), 5, Some("bonus for c1".into())),
                ("attr".into(), 1, None)
            ]
        );
        assert_eq!(
            score(&e, &rules, &ev("lesson.completed"), &History::default())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn sandbox_limits_stop_runaway_rules() {
        let e = engine();
        let cases = [
            ("loop", "loop { }"),
            ("recursion", "fn f(x) { f(x + 1) } f(0)"),
            ("string", r#"let s = "x"; loop { s += s; }"#),
            ("array", "let a = []; loop { a.push(1); }"),
            ("eval", r#"eval("1")"#),
            ("bad type", r#""fifty""#),
            ("huge", "2000000"),
            ("bad points", r#"#{ points: "ten" }"#),
            ("throw", r#"throw "no""#),
        ];
        for (name, text) in cases {
            let Ok(r) = compile(&e, name, std::path::Path::new("x"), text) else {
                continue; // refused at compile time is as good
            };
            let err = score(
                &e,
                &[Arc::new(r)],
                &ev("course.completed"),
                &History::default(),
            )
            .unwrap_err();
            assert_eq!(&*err.rule, name);
        }
    }

    #[test]
    fn a_failing_rule_awards_nothing_at_all() {
        let e = engine();
        let rules = vec![rule(&e, "good", "10"), rule(&e, "bad", "1 / 0")];
        assert!(score(&e, &rules, &ev("course.completed"), &History::default()).is_err());
    }

    #[test]
    fn a_rule_sees_nothing_of_the_rules_before_it() {
        let e = engine();
        let rules = vec![
            rule(&e, "first", "let bonus = 7; let event = 1; bonus"),
            rule(
                &e,
                "second",
                r#"if event.event_type == "course.completed" { 3 }"#,
            ),
            rule(&e, "third", "bonus"),
        ];
        let err = score(&e, &rules, &ev("course.completed"), &History::default()).unwrap_err();
        assert_eq!(&*err.rule, "third");
        let awards = score(
            &e,
            &rules[..2],
            &ev("course.completed"),
            &History::default(),
        )
        .unwrap();
        assert_eq!(
            awards.iter().map(|a| a.points).collect::<Vec<_>>(),
            vec![7, 3]
        );
    }

    #[test]
    fn unmapped_events_are_not_scored() {
        let e = engine();
        let mut event = ev("x");
        event.event_type = None;
        assert!(
            score(&e, &[rule(&e, "r", "10")], &event, &History::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn rules_see_bounded_history() {
        let e = engine();
        let day = 86_400_000;
        let at = 100 * day + 3_600_000;
        let h = History {
            total: 480,
            first: false,
            recent: vec![
                ("lesson.completed".into(), at - 30_000),
                ("lesson.completed".into(), at - 2 * 3_600_000),
                ("course.completed".into(), at - day),
                ("lesson.completed".into(), at - 2 * day),
                ("lesson.completed".into(), at - 5 * day),
            ],
            at,
        };
        assert_eq!(h.count("lesson.completed", 60), 1);
        assert_eq!(h.count("lesson.completed", 86_400), 2);
        assert_eq!(h.count("quiz.passed", 86_400), 0);
        assert_eq!(h.streak(), 3);
        let r = rule(
            &e,
            "h",
            r#"history.total + history.count("lesson.completed", 86400) * 1000 + history.streak() * 100 + if history.first { 7 } else { 0 }"#,
        );
        assert!(r.uses_history);
        let awards = score(&e, &[r], &ev("lesson.completed"), &h).unwrap();
        assert_eq!(awards[0].points, 480 + 2000 + 300);
        assert!(!rule(&e, "plain", "10").uses_history);
    }

    #[test]
    fn once_keys_name_the_object_or_what_the_rule_says() {
        let e = engine();
        let mut event = ev("lesson.completed");
        event.object_id = Some("cm-45".into());
        let once = |text: &str, event: &CanonicalEvent| {
            score(&e, &[rule(&e, "r", text)], event, &History::default())
                .map(|a| a.first().and_then(|a| a.once.clone()))
        };
        assert_eq!(
            once("#{ points: 10, once: true }", &event),
            Ok(Some("cm-45".into()))
        );
        assert_eq!(
            once("#{ points: 10, once: event.course_id }", &event),
            Ok(Some("c1".into()))
        );
        assert_eq!(once("#{ points: 10, once: false }", &event), Ok(None));
        assert_eq!(once("#{ points: 10 }", &event), Ok(None));
        assert_eq!(once("10", &event), Ok(None));
        event.object_id = None;
        assert_eq!(
            once("#{ points: 10, once: true }", &event),
            Ok(None),
            "no object, no restriction"
        );
        assert_eq!(
            once("#{ points: 10, once: event.object_id }", &event),
            Ok(None)
        );
        assert!(once("#{ points: 10, once: 5 }", &event).is_err());
        assert!(once(r#"#{ points: 10, once: "" }"#, &event).is_err());
    }

    /// A rule within its operation budget whose operations are slow stops
    /// at the wall-clock limit.
    #[test]
    fn a_slow_rule_stops_at_the_time_limit() {
        let e = engine();
        let slow = rule(
            &e,
            "slow",
            r#"let s = "x"; for i in 0..16 { s += s; } for i in 0..20000 { s.replace("y", "z"); s.replace("x", "x"); } 1"#,
        );
        let started = std::time::Instant::now();
        let err = score(
            &e,
            std::slice::from_ref(&slow),
            &ev("course.completed"),
            &History::default(),
        )
        .unwrap_err();
        assert!(
            err.message.contains("ran over"),
            "{err:?} after {:?}",
            started.elapsed()
        );
        assert!(slow.is_slow());
        let quick = rule(&e, "quick", "1");
        score(
            &e,
            std::slice::from_ref(&quick),
            &ev("course.completed"),
            &History::default(),
        )
        .unwrap();
        assert!(!quick.is_slow());
    }

    /// Containers within rhai's size limits that hold far more memory than
    /// those count (a map's keys are not counted): the run stops at the
    /// memory budget.
    #[test]
    fn rules_that_grow_many_containers_stop_at_the_memory_budget() {
        let e = engine();
        let greedy = rule(
            &e,
            "greedy",
            r#"let big = "0123456789abcdef"; while big.len < 30000 { big += big; }
               let all = #{};
               for i in 0..5000 { all["" + i + big] = i; }
               1"#,
        );
        // Metered as `score` runs rules, but without its deadline: on a busy
        // machine the unoptimised test build could reach 100 ms first.
        let err = crate::meter::metered(|| {
            score_all(
                &e,
                std::slice::from_ref(&greedy),
                &ev("course.completed"),
                &History::default(),
            )
        })
        .unwrap_err();
        assert!(err.message.contains("MiB"), "{err:?}");
        assert_eq!(crate::meter::live(), 0, "the meter is off after the run");
    }

    #[test]
    fn modules_cannot_be_imported() {
        let e = engine();
        assert!(e.compile(r#"import "std" as s;"#).is_err());
    }
}
