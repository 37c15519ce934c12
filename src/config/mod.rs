//! The config directory: `sources.d/*.yaml` and `rules/*.rhai`, loaded and
//! compiled once into a [`Config`] (JSONPaths parsed, rhai ASTs built,
//! secrets resolved and keyed). Every problem is collected, each naming
//! file, line and key; a config with any error is refused whole.

pub mod raw;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use poem::http::HeaderName;
use rhai::Engine;

use crate::pipeline::limits::{ProxyHeader, RateSpec};
use crate::pipeline::mapping::{
    CompiledPath, EventCase, EventTypeSpec, Field, FieldSpec, FieldType, Mapping, TimeFormat,
};
use crate::pipeline::rules::{self, Rule};
use crate::pipeline::verify::{digests, AuthScheme, SecretSource, SigEncoding};
use crate::secrets::{Origin, SecretEnv, SecretRef};
use raw::{Processing, RawField, RawSource};

/// Default body limit: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Hard ceiling a source may raise its body limit to.
pub const MAX_MAX_BODY: usize = 64 * 1024 * 1024;

/// One problem in the config directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} config error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A compiled source.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub description: String,
    pub namespace: String,
    pub processing: Processing,
    pub auth: Vec<AuthScheme>,
    /// Accepted content types, lower-case, without parameters.
    pub content_types: Vec<String>,
    /// Formats tried in order when a request has no content type or says form.
    pub fallback_formats: Vec<crate::pipeline::decode::BodyFormat>,
    pub batch: bool,
    /// Takes xAPI statements (see `raw::RawSource::xapi`).
    pub xapi: bool,
    pub max_body_bytes: usize,
    /// This source's rate (all its hooks); the bucket lives in the server's
    /// limits, keyed by the source's name, so a reload keeps its state.
    pub rate: RateSpec,
    /// Rates per canonical event type.
    pub event_type_rates: HashMap<String, RateSpec>,
    pub allow_ips: Vec<IpNet>,
    pub proxy_headers: Vec<ProxyHeader>,
    /// What the file says; the server's settings fill the rest.
    pub retention: crate::settings::Retention,
    pub mapping: Mapping,
    pub rules: Vec<Arc<Rule>>,
    pub dry_run: bool,
    pub file: PathBuf,
    pub tests: Vec<raw::TestCase>,
}

impl Source {
    /// Whether a request's content type is one this source takes. A request
    /// without one is taken as the source's first type.
    pub fn accepts(&self, content_type: Option<&str>) -> bool {
        match content_type {
            None => true,
            Some(ct) => {
                let essence = ct.split(';').next().unwrap_or("").trim();
                self.content_types
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(essence))
            }
        }
    }

    /// The effective content type of a request.
    pub fn content_type_of<'a>(&'a self, content_type: Option<&'a str>) -> &'a str {
        content_type.unwrap_or_else(|| {
            self.content_types
                .first()
                .map(String::as_str)
                .unwrap_or("application/json")
        })
    }
}

/// The loaded config directory.
pub struct Config {
    pub sources: HashMap<String, Arc<Source>>,
    pub rules: BTreeMap<String, Arc<Rule>>,
    pub engine: Arc<Engine>,
    /// Not errors, but an operator should know (an unset secret).
    pub warnings: Vec<String>,
    /// Test cases of rules, from `rules/<rule>.tests.yaml`.
    pub rule_tests: Vec<(Arc<Rule>, Vec<raw::RuleCase>)>,
    /// The admin token (`ROCKET_ADMIN_TOKEN` or its `_FILE`), read with
    /// the rest of the config so that it rotates with a reload.
    pub admin_token: OperatorToken,
    /// The test token (`ROCKET_TEST_TOKEN` or its `_FILE`).
    pub test_token: OperatorToken,
    /// Every secret file this config read: watched for changes with the
    /// config files.
    pub secret_files: Vec<PathBuf>,
}

/// An operator token's digests (several while it rotates) and origin.
#[derive(Debug, Clone)]
pub struct OperatorToken {
    pub digests: Vec<[u8; 32]>,
    pub origin: Origin,
}

/// The environment variables of the operator tokens.
pub const ADMIN_TOKEN: &str = "ROCKET_ADMIN_TOKEN";
pub const TEST_TOKEN: &str = "ROCKET_TEST_TOKEN";

/// Resolves an operator token; a problem with its file is a config error,
/// or a warning when the environment is lenient (`check`), as a source's is.
fn operator_token(
    name: &str,
    dir: &Path,
    secrets: &SecretEnv,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> OperatorToken {
    let reference = SecretRef::Env(name.to_string());
    match secrets.resolve(&reference, dir) {
        Ok(r) => {
            if r.values.is_empty() {
                let refused = if name == ADMIN_TOKEN {
                    "the admin API and console refuse every request (401)"
                } else {
                    "dry runs take the admin token only"
                };
                warnings.push(format!("{} is unset; {refused}", r.origin));
            }
            OperatorToken {
                digests: digests(&r.values),
                origin: r.origin,
            }
        }
        Err(message) => {
            if secrets.is_lenient() {
                warnings.push(format!("{name}: {message}"));
            } else {
                errors.push(err(Path::new(name), None, "", &message));
            }
            OperatorToken {
                digests: Vec::new(),
                origin: secrets
                    .origin(&reference, dir)
                    .unwrap_or_else(|_| Origin::Env(name.to_string())),
            }
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .field("rules", &self.rules.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Config {
    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.get(name)
    }

    /// Source names, sorted.
    pub fn source_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Files of a folder with one of the extensions, sorted; a missing folder is empty.
fn files_with(dir: &Path, exts: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for entry in rd {
                let path = entry?.path();
                if path.is_file()
                    && path
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| exts.contains(&e))
                {
                    out.push(path);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

/// A fingerprint of the config files (names, sizes, modification times)
/// and of the secret files a config read (also their inodes: a mounted
/// secret is replaced by a new file): it changes when a file in `sources.d/`
/// or `rules/` is added, removed or written, or a secret file changes. The
/// watcher compares it to decide when to reload.
pub fn fingerprint(dir: &Path, secret_files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for file in secret_files {
        let meta = std::fs::metadata(file).ok();
        #[cfg(unix)]
        let inode = meta.as_ref().map(std::os::unix::fs::MetadataExt::ino);
        #[cfg(not(unix))]
        let inode: Option<u64> = None;
        (
            file,
            meta.as_ref().map(|m| (m.len(), m.modified().ok())),
            inode,
        )
            .hash(&mut h);
    }
    for sub in ["sources.d", "rules"] {
        let Ok(rd) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        let mut entries: Vec<_> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.file_name(), m.len(), m.modified().ok()))
            })
            .collect();
        entries.sort();
        entries.hash(&mut h);
    }
    h.finish()
}

/// Loads and compiles the config directory.
pub fn load(
    dir: &Path,
    secrets: &SecretEnv,
    source_rate: RateSpec,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let engine = rules::engine();

    let rules = load_rules(dir, &engine, &mut errors);
    let rule_tests = load_rule_tests(dir, &rules, &mut errors);
    let sources = load_sources(
        dir,
        &rules,
        secrets,
        source_rate,
        &mut errors,
        &mut warnings,
    );
    let admin_token = operator_token(ADMIN_TOKEN, dir, secrets, &mut errors, &mut warnings);
    let test_token = operator_token(TEST_TOKEN, dir, secrets, &mut errors, &mut warnings);
    let mut secret_files: Vec<PathBuf> = sources
        .values()
        .flat_map(|s| s.auth.iter())
        .map(|a| &a.secret().origin)
        .chain([&admin_token.origin, &test_token.origin])
        .filter_map(|o| o.file().map(Path::to_path_buf))
        .collect();
    secret_files.sort();
    secret_files.dedup();
    // A source with two schemes on one secret would warn twice.
    let mut seen = std::collections::HashSet::new();
    warnings.retain(|w| seen.insert(w.clone()));
    if errors.is_empty() {
        Ok(Config {
            sources,
            rules,
            engine: Arc::new(engine),
            warnings,
            rule_tests,
            admin_token,
            test_token,
            secret_files,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A config file's text, and whether it is a symlink. A symlink to a file
/// outside the config folder is refused (a config file must not be a way
/// to read, and echo, any file the server can read).
fn read_config_file(dir: &Path, file: &Path) -> Result<(String, bool), String> {
    let linked = std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink());
    if linked {
        let inside = match (std::fs::canonicalize(dir), std::fs::canonicalize(file)) {
            (Ok(d), Ok(f)) => f.starts_with(d),
            _ => false,
        };
        if !inside {
            return Err("a symlink to a file outside the config folder; refused".into());
        }
    }
    std::fs::read_to_string(file)
        .map(|t| (t, linked))
        .map_err(|e| format!("cannot read: {}", e.kind()))
}

/// Errors of a symlinked file quote nothing of it: a parser's quoted
/// excerpts become `"…"`.
fn redact_quotes(errors: &mut [ConfigError]) {
    for e in errors {
        let mut out = String::with_capacity(e.message.len());
        let mut quoted = false;
        for c in e.message.chars() {
            match (c, quoted) {
                ('"' | '`', false) => {
                    quoted = true;
                    out.push_str("\"…");
                }
                ('"' | '`', true) => {
                    quoted = false;
                    out.push('"');
                }
                (_, false) => out.push(c),
                (_, true) => {}
            }
        }
        e.message = out;
    }
}

/// Compiles `rules/*.rhai`, one rule a file.
fn load_rules(
    dir: &Path,
    engine: &Engine,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, Arc<Rule>> {
    let rules_dir = dir.join("rules");
    let mut rules = BTreeMap::new();
    match files_with(&rules_dir, &["rhai"]) {
        Ok(files) => {
            for file in files {
                let name = file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                if !is_valid_name(&name) {
                    errors.push(err(
                        &file,
                        None,
                        "",
                        "a rule's file name must be lower-case letters, digits, - or _",
                    ));
                    continue;
                }
                let before = errors.len();
                match read_config_file(dir, &file) {
                    Ok((text, linked)) => match rules::compile(engine, &name, &file, &text) {
                        Ok(rule) => {
                            rules.insert(name, Arc::new(rule));
                        }
                        Err(e) => {
                            let pos = e.1;
                            errors.push(ConfigError {
                                file: file.clone(),
                                line: pos.line(),
                                column: pos.position(),
                                key: String::new(),
                                message: e.0.to_string(),
                            });
                            if linked {
                                redact_quotes(&mut errors[before..]);
                            }
                        }
                    },
                    Err(e) => errors.push(err(&file, None, "", &e)),
                }
            }
        }
        Err(e) => errors.push(err(
            &rules_dir,
            None,
            "",
            &format!("cannot read the folder: {e}"),
        )),
    }

    rules
}

/// Reads `rules/<rule>.tests.yaml`, the test cases of each rule.
fn load_rule_tests(
    dir: &Path,
    rules: &BTreeMap<String, Arc<Rule>>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(Arc<Rule>, Vec<raw::RuleCase>)> {
    let rules_dir = dir.join("rules");
    let mut rule_tests = Vec::new();
    match files_with(&rules_dir, &["yaml", "yml"]) {
        Ok(files) => {
            for file in files {
                let fname = file.file_name().and_then(|s| s.to_str()).unwrap_or("");
                let Some(rule_name) = fname
                    .strip_suffix(".tests.yaml")
                    .or_else(|| fname.strip_suffix(".tests.yml"))
                else {
                    errors.push(err(
                        &file,
                        None,
                        "",
                        "a YAML file in rules/ must be named <rule>.tests.yaml",
                    ));
                    continue;
                };
                let Some(rule) = rules.get(rule_name).cloned() else {
                    errors.push(err(
                        &file,
                        None,
                        "",
                        &format!("no rule named {rule_name:?} to test"),
                    ));
                    continue;
                };
                let before = errors.len();
                let (text, linked) = match read_config_file(dir, &file) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(err(&file, None, "", &e));
                        continue;
                    }
                };
                match serde_yaml_ng::from_str::<Vec<raw::RuleCase>>(&text) {
                    Ok(cases) => rule_tests.push((rule, cases)),
                    Err(e) => {
                        let loc = e.location();
                        errors.push(ConfigError {
                            file: file.clone(),
                            line: loc.as_ref().map(|l| l.line()),
                            column: loc.as_ref().map(|l| l.column()),
                            key: String::new(),
                            message: e.to_string(),
                        });
                    }
                }
                if linked {
                    redact_quotes(&mut errors[before..]);
                }
            }
        }
        Err(e) => errors.push(err(
            &rules_dir,
            None,
            "",
            &format!("cannot read the folder: {e}"),
        )),
    }

    rule_tests
}

/// Compiles `sources.d/*.yaml`; a name defined twice is an error.
fn load_sources(
    dir: &Path,
    rules: &BTreeMap<String, Arc<Rule>>,
    secrets: &SecretEnv,
    source_rate: RateSpec,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> HashMap<String, Arc<Source>> {
    let sources_dir = dir.join("sources.d");
    let mut sources: HashMap<String, Arc<Source>> = HashMap::new();
    match files_with(&sources_dir, &["yaml", "yml"]) {
        Ok(files) => {
            if files.is_empty() {
                errors.push(err(
                    &sources_dir,
                    None,
                    "",
                    "no source files (*.yaml) found",
                ));
            }
            for file in files {
                let (text, linked) = match read_config_file(dir, &file) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(err(&file, None, "", &e));
                        continue;
                    }
                };
                let before = errors.len();
                match compile_source(&file, &text, rules, secrets, source_rate, warnings) {
                    Ok(src) => {
                        if let Some(prev) = sources.get(&src.name) {
                            errors.push(err(
                                &file,
                                locate(&text, &["name"]),
                                "name",
                                &format!(
                                    "source {:?} is already defined by {}",
                                    src.name,
                                    prev.file.display()
                                ),
                            ));
                        } else {
                            sources.insert(src.name.clone(), Arc::new(src));
                        }
                    }
                    Err(mut es) => errors.append(&mut es),
                }
                if linked {
                    redact_quotes(&mut errors[before..]);
                }
            }
        }
        Err(e) => errors.push(err(
            &sources_dir,
            None,
            "",
            &format!("cannot read the folder: {e}"),
        )),
    }

    sources
}

fn err(file: &Path, line: Option<usize>, key: &str, message: &str) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line,
        column: None,
        key: key.to_string(),
        message: message.to_string(),
    }
}

/// Compiles one source file, collecting every error it has.
// long: one call per section, then the Source literal that names every field.
pub fn compile_source(
    file: &Path,
    text: &str,
    rules: &BTreeMap<String, Arc<Rule>>,
    secrets: &SecretEnv,
    source_rate: RateSpec,
    warnings: &mut Vec<String>,
) -> Result<Source, Vec<ConfigError>> {
    let raw: RawSource = serde_yaml_ng::from_str(text).map_err(|e| {
        let loc = e.location();
        vec![ConfigError {
            file: file.to_path_buf(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            key: String::new(),
            message: e.to_string(),
        }]
    })?;
    let base = file
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let mut errors = Vec::new();
    let mut fail = |keys: &[&str], message: String| {
        let at = locate_at(text, keys);
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: at.map(|(l, _)| l),
            column: at.map(|(_, c)| c),
            key: keys.join("."),
            message,
        });
    };

    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let name = raw.name.clone().unwrap_or_else(|| stem.to_string());
    if !is_valid_name(&name) {
        fail(&["name"], format!("{name:?} is not a valid source name (lower-case letters, digits, - or _; at most 64)"));
    }
    let namespace = raw.namespace.clone().unwrap_or_else(|| name.clone());
    if raw.namespace.is_some() && !is_valid_name(&namespace) {
        fail(
            &["namespace"],
            format!("{namespace:?} is not a valid namespace"),
        );
    }
    let kind = SourceKind {
        batch: raw.batch || raw.xapi,
        dry_run: raw.dry_run,
    };
    let auth = compile_auths(
        raw.auth.into_vec(),
        &name,
        kind,
        base,
        secrets,
        warnings,
        &mut fail,
    );
    let limits = compile_limits(
        raw.rate_limit.unwrap_or(source_rate),
        &raw.event_type_rate_limits,
        &raw.allow_ips,
        &mut fail,
    );
    let content_types = compile_content_types(raw.content_types, &mut fail);
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
    if max_body_bytes == 0 || max_body_bytes > MAX_MAX_BODY {
        fail(
            &["max_body_bytes"],
            format!("must be between 1 and {MAX_MAX_BODY}"),
        );
    }
    let known_attribute =
        |name: &str| raw.attributes.contains_key(name) || raw.attributes_from.is_some();
    let event_type = compile_event_type(raw.event_type, &known_attribute, &mut fail);
    let mapping = compile_mapping(
        event_type,
        raw.fields,
        raw.attributes,
        raw.attributes_from,
        raw.required,
        raw.unfilled_placeholders_absent,
        &mut fail,
    );
    let source_rules = rules_named(&raw.rules, rules, &mut fail);

    if !errors.is_empty() {
        return Err(errors);
    }
    if let Some(days) = raw
        .retention
        .zero_point_events_days
        .filter(|d| i64::from(*d) < crate::pipeline::rules::HISTORY_DAYS)
    {
        warnings.push(format!(
            "source {name}: retention deletes zero-point events after {days} days, sooner than the {} days rules' history reaches back (caps, streaks and first completions then see fewer events)",
            crate::pipeline::rules::HISTORY_DAYS
        ));
    }
    Ok(Source {
        name,
        description: raw.description,
        namespace,
        processing: raw.processing,
        auth,
        content_types,
        fallback_formats: raw.fallback_formats,
        batch: raw.batch || raw.xapi,
        xapi: raw.xapi,
        max_body_bytes,
        rate: limits.rate,
        event_type_rates: limits.event_type_rates,
        allow_ips: limits.allow_ips,
        proxy_headers: raw
            .proxy_headers
            .unwrap_or_else(|| vec![ProxyHeader::XForwardedFor, ProxyHeader::Forwarded]),
        retention: raw.retention,
        mapping,
        rules: source_rules,
        dry_run: raw.dry_run,
        file: file.to_path_buf(),
        tests: raw.tests,
    })
}

/// Reports a config error at a key path.
type Fail<'a> = dyn FnMut(&[&str], String) + 'a;

/// A source's auth schemes: at least one, at most one body token.
fn compile_auths(
    raw_auth: Vec<raw::RawAuth>,
    name: &str,
    kind: SourceKind,
    base: &Path,
    secrets: &SecretEnv,
    warnings: &mut Vec<String>,
    fail: &mut Fail<'_>,
) -> Vec<AuthScheme> {
    let declared = raw_auth.len();
    if declared == 0 {
        fail(&["auth"], "at least one auth scheme is required".into());
    }
    let mut auth = Vec::new();
    let mut unset = Vec::new();
    for (n, a) in raw_auth.into_iter().enumerate() {
        match compile_auth(a, name, kind, base, secrets, warnings, &mut unset) {
            Ok(scheme) => auth.push(scheme),
            Err(problems) => {
                for (key, message) in problems {
                    let message = if declared > 1 {
                        format!("scheme {}: {message}", n + 1)
                    } else {
                        message
                    };
                    fail(&["auth", key], message);
                }
            }
        }
    }
    let body_tokens = auth
        .iter()
        .filter(|a| matches!(a, AuthScheme::BodyField { .. }))
        .count();
    if body_tokens > 1 {
        fail(&["auth"], "at most one body_token scheme per source".into());
    }
    // A source refuses everything only when none of its schemes has a
    // secret; with one set, an unset other is worth a warning, not alarm.
    // The dry-run source's secret is the test token, which warns itself.
    let refused = if !auth.iter().any(AuthScheme::is_configured) {
        "every request to it is refused (401)"
    } else {
        "that scheme refuses every request; the source's other schemes still verify"
    };
    if !kind.dry_run {
        for origin in unset {
            warnings.push(format!("source {name}: {origin} is unset; {refused}"));
        }
    }
    auth
}

/// A source's rates and allowlist.
struct SourceLimits {
    rate: RateSpec,
    event_type_rates: HashMap<String, RateSpec>,
    allow_ips: Vec<IpNet>,
}

fn compile_limits(
    rate: RateSpec,
    per_type: &BTreeMap<String, RateSpec>,
    allow: &[String],
    fail: &mut Fail<'_>,
) -> SourceLimits {
    if let Err(e) = rate.validate() {
        fail(&["rate_limit"], e);
    }
    let mut event_type_rates = HashMap::new();
    for (kind, spec) in per_type {
        match spec.validate() {
            Ok(()) => {
                event_type_rates.insert(kind.clone(), *spec);
            }
            Err(e) => fail(&["event_type_rate_limits", kind], e),
        }
    }
    let mut allow_ips = Vec::new();
    for cidr in allow {
        match crate::settings::parse_network(cidr) {
            Ok(n) => allow_ips.push(n),
            Err(e) => fail(&["allow_ips"], e),
        }
    }
    SourceLimits {
        rate,
        event_type_rates,
        allow_ips,
    }
}

/// The content types a source takes (default JSON), each one it can decode.
fn compile_content_types(raw: Option<Vec<String>>, fail: &mut Fail<'_>) -> Vec<String> {
    let content_types: Vec<String> = raw
        .unwrap_or_else(|| vec!["application/json".into()])
        .into_iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for ct in &content_types {
        if crate::pipeline::decode::format_of(ct).is_none() {
            fail(&["content_types"], format!("{ct:?} cannot be decoded; use application/json or application/x-www-form-urlencoded"));
        }
    }
    if content_types.is_empty() {
        fail(
            &["content_types"],
            "at least one content type is required".into(),
        );
    }
    content_types
}

/// JSONPaths, at least one, each parsed.
fn compile_paths(keys: &[&str], list: Vec<String>, fail: &mut Fail<'_>) -> Vec<CompiledPath> {
    if list.is_empty() {
        fail(keys, "at least one JSONPath is required".into());
    }
    list.iter()
        .filter_map(|p| match CompiledPath::parse(p) {
            Ok(c) => Some(c),
            Err(e) => {
                fail(keys, format!("bad JSONPath {p:?}: {e}"));
                None
            }
        })
        .collect()
}

/// A mapped field: its paths, type (default `default_ty`) and time format.
fn compile_field(
    keys: &[&str],
    raw: Option<RawField>,
    default_ty: FieldType,
    fail: &mut Fail<'_>,
) -> Option<FieldSpec> {
    raw.map(|raw| {
        let (list, ty, format, default) = match raw {
            RawField::Path(p) => (vec![p], None, None, None),
            RawField::Paths(v) => (v, None, None, None),
            RawField::Full(s) => (s.paths.into_vec(), s.ty, s.format, s.default),
        };
        FieldSpec {
            paths: compile_paths(keys, list, fail),
            ty: ty.unwrap_or(default_ty),
            format: format.unwrap_or(TimeFormat::Auto),
            default,
        }
    })
}

/// Where the vendor's event name is, its table, and its cases.
fn compile_event_type(
    raw: raw::RawEventType,
    known_attribute: &dyn Fn(&str) -> bool,
    fail: &mut Fail<'_>,
) -> EventTypeSpec {
    EventTypeSpec {
        paths: compile_paths(&["event_type", "paths"], raw.paths.into_vec(), fail),
        table: raw
            .map
            .into_iter()
            .map(|(k, v)| (k, Arc::<str>::from(v.as_str())))
            .collect(),
        passthrough: raw.passthrough,
        compose: if raw.compose.is_empty() {
            Vec::new()
        } else {
            compile_paths(&["event_type", "compose"], raw.compose, fail)
        },
        cases: raw
            .cases
            .into_iter()
            .map(|c| compile_case(c, known_attribute, fail))
            .collect(),
    }
}

/// The canonical fields, attributes and required fields of a source.
fn compile_mapping(
    event_type: EventTypeSpec,
    f: raw::RawFields,
    raw_attributes: BTreeMap<String, RawField>,
    attributes_from: Option<RawField>,
    required: Option<Vec<String>>,
    placeholders: bool,
    fail: &mut Fail<'_>,
) -> Mapping {
    let mut field = |key: &str, raw, ty| compile_field(&["fields", key], raw, ty, fail);
    let event_id = field("event_id", f.event_id, FieldType::String);
    let user_id = field("user_id", f.user_id, FieldType::String);
    let course_id = field("course_id", f.course_id, FieldType::String);
    let object_id = field("object_id", f.object_id, FieldType::String);
    let occurred_at = field("occurred_at", f.occurred_at, FieldType::Timestamp);
    let mut attributes = Vec::new();
    for (key, rf) in raw_attributes {
        if let Some(spec) = compile_field(&["attributes", &key], Some(rf), FieldType::Any, fail) {
            attributes.push((key, spec));
        }
    }
    let attributes_from = attributes_from
        .and_then(|rf| compile_field(&["attributes_from"], Some(rf), FieldType::Any, fail));
    let mut required_fields = Vec::new();
    for r in required.unwrap_or_else(|| vec!["user_id".into(), "event_type".into()]) {
        match Field::parse(&r) {
            Some(f) => required_fields.push(f),
            None => fail(&["required"], format!("unknown field {r:?}; one of event_id, event_type, user_id, course_id, object_id, occurred_at")),
        }
    }
    Mapping {
        event_type,
        event_id,
        user_id,
        course_id,
        object_id,
        occurred_at,
        attributes,
        attributes_from,
        required: required_fields,
        unfilled_placeholders_absent: placeholders,
    }
}

/// The rules a source names (`*` for all), each one that exists.
fn rules_named(
    names: &[String],
    rules: &BTreeMap<String, Arc<Rule>>,
    fail: &mut Fail<'_>,
) -> Vec<Arc<Rule>> {
    let mut out = Vec::new();
    for r in names {
        if r == "*" {
            out.extend(rules.values().cloned());
        } else if let Some(rule) = rules.get(r) {
            out.push(rule.clone());
        } else {
            fail(
                &["rules"],
                format!("no rule named {r:?} (expected rules/{r}.rhai)"),
            );
        }
    }
    out
}

/// What an auth scheme needs to know of its source.
#[derive(Clone, Copy)]
struct SourceKind {
    /// Takes arrays of documents (no body token then).
    batch: bool,
    /// Serves dry runs (its secret is the test token).
    dry_run: bool,
}

/// Compiles one auth scheme: its secret resolved (an unset one is added to
/// `unset`, for the caller to warn of; a problem with a file is an error),
/// its keys checked against its kind. Errors are `(key, message)`.
fn compile_auth(
    a: raw::RawAuth,
    source: &str,
    kind: SourceKind,
    base: &Path,
    secrets: &SecretEnv,
    warnings: &mut Vec<String>,
    unset: &mut Vec<String>,
) -> Result<AuthScheme, Vec<(&'static str, String)>> {
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    for key in a.keys_set() {
        if !a.kind.keys().contains(&key) {
            problems.push((key, format!("{key} does not apply to type {:?}", a.kind)));
        }
    }
    let reference = match secret_reference(&a, kind) {
        Ok(r) => r,
        Err(problem) => {
            problems.push(problem);
            return Err(problems);
        }
    };
    let key_of_ref = match reference {
        SecretRef::Env(_) => "secret_env",
        SecretRef::File(_) => "secret_file",
        SecretRef::Dir(_) => "secret",
    };
    let (values, origin) = match resolve_secret(&reference, source, base, secrets, warnings, unset)
    {
        Ok(found) => found,
        Err(message) => {
            problems.push((key_of_ref, message));
            return Err(problems);
        }
    };
    let secret = SecretSource { reference, origin };
    let scheme = build_scheme(a, kind, secret, &values, key_of_ref, &mut problems);
    match scheme {
        Some(s) if problems.is_empty() => Ok(s),
        _ => Err(problems),
    }
}

/// Where a scheme's secret is: exactly one of its three keys.
fn secret_reference(
    a: &raw::RawAuth,
    kind: SourceKind,
) -> Result<SecretRef, (&'static str, String)> {
    match (&a.secret_env, &a.secret_file, &a.secret) {
        (Some(env), None, None) => match secret_name_check(env, a.any_secret_name, kind.dry_run) {
            Ok(()) => Ok(SecretRef::Env(env.clone())),
            Err(why) => Err(("secret_env", format!("{env}: {why}"))),
        },
        (None, Some(file), None) => Ok(SecretRef::File(file.clone())),
        (None, None, Some(name)) => Ok(SecretRef::Dir(name.clone())),
        _ => Err((
            "secret_env",
            "give exactly one of secret_env, secret_file and secret".into(),
        )),
    }
}

/// A secret's values and origin (an unset one is added to `unset`); a
/// problem with a file is an error, or a warning when the environment is
/// lenient (`check`), and then no values.
fn resolve_secret(
    reference: &SecretRef,
    source: &str,
    base: &Path,
    secrets: &SecretEnv,
    warnings: &mut Vec<String>,
    unset: &mut Vec<String>,
) -> Result<(Vec<crate::secrets::Secret>, Origin), String> {
    match secrets.resolve(reference, base) {
        Ok(r) => {
            if r.values.is_empty() {
                unset.push(r.origin.to_string());
            }
            Ok((r.values, r.origin))
        }
        Err(message) if secrets.is_lenient() => {
            warnings.push(format!("source {source}: {message}"));
            // Where it was looked for; a name with nowhere to look names itself.
            let origin = secrets
                .origin(reference, base)
                .unwrap_or_else(|_| match reference {
                    SecretRef::Env(name) => Origin::Env(name.clone()),
                    SecretRef::File(path) => Origin::File(base.join(path)),
                    SecretRef::Dir(name) => Origin::SecretsDir(PathBuf::from(name)),
                });
            Ok((Vec::new(), origin))
        }
        Err(message) => Err(format!("source {source}: {message}")),
    }
}

/// The header name in `key`'s value; `None` with the problem noted.
fn header_name(
    key: &'static str,
    h: &str,
    problems: &mut Vec<(&'static str, String)>,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(h.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            problems.push((key, format!("{h:?} is not a valid header name")));
            None
        }
    }
}

/// The scheme of a kind, from its keys; `None` with the problems noted.
fn build_scheme(
    a: raw::RawAuth,
    kind: SourceKind,
    secret: SecretSource,
    values: &[crate::secrets::Secret],
    key_of_ref: &'static str,
    problems: &mut Vec<(&'static str, String)>,
) -> Option<AuthScheme> {
    use raw::AuthKind;
    let tolerance = a.tolerance_seconds.unwrap_or(300);
    if tolerance <= 0 {
        problems.push(("tolerance_seconds", "must be at least 1".into()));
    }
    match a.kind {
        AuthKind::Bearer => Some(AuthScheme::bearer(secret, values)),
        AuthKind::Basic => Some(AuthScheme::basic(secret, values)),
        AuthKind::Header => match a.header.as_deref() {
            None => {
                problems.push(("header", "a header scheme names its header".into()));
                None
            }
            Some(h) => header_name("header", h, problems).map(|header| AuthScheme::Header {
                secret,
                header,
                prefix: a.prefix.unwrap_or_default(),
                digests: digests(values),
            }),
        },
        AuthKind::BodyToken => {
            body_token_scheme(a.field.as_deref(), kind, secret, values, problems)
        }
        AuthKind::QueryToken => {
            let param = a.param.unwrap_or_else(|| "token".into());
            if param.is_empty() {
                problems.push(("param", "must not be empty".into()));
            }
            Some(AuthScheme::Query {
                secret,
                param,
                digests: digests(values),
            })
        }
        AuthKind::Hmac => hmac_scheme(a, secret, values, tolerance, problems),
        AuthKind::StandardWebhooks => {
            match AuthScheme::standard_webhooks(secret, values, tolerance) {
                Ok(s) => Some(s),
                Err(i) => {
                    problems.push((
                        key_of_ref,
                        format!(
                            "value {} of the secret is not a whsec_<base64> secret",
                            i + 1
                        ),
                    ));
                    None
                }
            }
        }
    }
}

fn body_token_scheme(
    field: Option<&str>,
    kind: SourceKind,
    secret: SecretSource,
    values: &[crate::secrets::Secret],
    problems: &mut Vec<(&'static str, String)>,
) -> Option<AuthScheme> {
    match field.map(|f| (f, member_path(f))) {
        None => {
            problems.push(("field", "a body_token scheme names its field".into()));
            None
        }
        Some((_, Some(_))) if kind.batch => {
            problems.push((
                "field",
                "a body token cannot authenticate a batch source".into(),
            ));
            None
        }
        Some((_, Some(field))) => Some(AuthScheme::BodyField {
            secret,
            field,
            digests: digests(values),
        }),
        Some((f, None)) => {
            problems.push((
                "field",
                format!("{f:?} must be a path of member names, such as $.token"),
            ));
            None
        }
    }
}

fn hmac_scheme(
    a: raw::RawAuth,
    secret: SecretSource,
    values: &[crate::secrets::Secret],
    tolerance: i64,
    problems: &mut Vec<(&'static str, String)>,
) -> Option<AuthScheme> {
    let algorithm = a.algorithm.unwrap_or_else(|| "sha256".into());
    if !algorithm.eq_ignore_ascii_case("sha256") {
        problems.push((
            "algorithm",
            format!("unsupported algorithm {algorithm:?}; only sha256"),
        ));
    }
    let header = header_name(
        "header",
        a.header.as_deref().unwrap_or("X-Signature"),
        problems,
    );
    let timestamp = a
        .timestamp_header
        .as_deref()
        .and_then(|ts| header_name("timestamp_header", ts, problems));
    header.map(|header| {
        let scheme = AuthScheme::hmac(
            secret,
            header,
            a.prefix.unwrap_or_else(|| "sha256=".into()),
            a.encoding.unwrap_or(SigEncoding::Hex),
            values,
        );
        match timestamp {
            Some(ts) => scheme.with_timestamp(ts, tolerance),
            None => scheme,
        }
    })
}

/// Whether a variable may hold a source's secret: the server reads only
/// `ROCKET_*` variables, its own settings and the operator tokens are never
/// one (the dry-run source takes the test token), and the name must say it is a secret (unless the source file takes
/// any name, `any_secret_name: true`), so that a slip such as
/// `secret_env: ROCKET_LOG_FORMAT` cannot make `Bearer json` valid.
fn secret_name_check(name: &str, any_name: bool, dry_run: bool) -> Result<(), &'static str> {
    if !name.starts_with("ROCKET_") {
        return Err("the server reads secrets only from ROCKET_* variables");
    }
    // The dry-run source is the test token's own.
    if name == ADMIN_TOKEN || (name == TEST_TOKEN && !dry_run) {
        return Err("the admin and test tokens cannot be a source's secret");
    }
    if crate::settings::SETTING_VARS.contains(&name) {
        return Err("a server setting cannot be a source's secret");
    }
    let says_secret = ["TOKEN", "SECRET", "KEY", "PASSWORD"]
        .iter()
        .any(|w| name.contains(w));
    if !says_secret && !any_name {
        return Err("a secret's variable has TOKEN, SECRET, KEY or PASSWORD in its name (or set any_secret_name: true)");
    }
    Ok(())
}

/// `$.a.b` as its member names; `None` for anything richer.
fn member_path(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix("$.")?;
    let keys: Vec<String> = rest.split('.').map(str::to_string).collect();
    keys.iter()
        .all(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .then_some(keys)
}

/// Compiles one conditional mapping; `known` says whether a name is a
/// mapped attribute.
fn compile_case(
    raw: raw::RawCase,
    known: &dyn Fn(&str) -> bool,
    fail: &mut dyn FnMut(&[&str], String),
) -> EventCase {
    use crate::pipeline::mapping::Operand;
    let operand = |name: &str| -> Result<Operand, String> {
        if name.starts_with('$') {
            return CompiledPath::parse(name)
                .map(Operand::Path)
                .map_err(|e| format!("bad JSONPath {name:?}: {e}"));
        }
        match Field::parse(name) {
            Some(f @ (Field::UserId | Field::CourseId | Field::ObjectId)) => Ok(Operand::Field(f)),
            _ if known(name) => Ok(Operand::Attribute(name.to_string())),
            _ => Err(format!("condition on {name:?}: not a mapped attribute, user_id, course_id, object_id or a JSONPath ($.…)")),
        }
    };
    let mut when = Vec::new();
    for (name, value) in raw.when {
        let compiled =
            operand(&name).and_then(|subject| Ok((subject, case_test(&name, value, &operand)?)));
        match compiled {
            Ok(condition) => when.push(condition),
            Err(message) => fail(&["event_type", "cases"], message),
        }
    }
    EventCase {
        vendors: raw.vendor.into_vec(),
        when,
        canonical: Arc::from(raw.canonical.as_str()),
        set: raw.set,
    }
}

/// The test a condition on `name` writes: a literal, a list of literals,
/// or one of `gt`, `gte`, `lt`, `lte` (a number or another operand), `ne`
/// and `present`.
fn case_test(
    name: &str,
    value: serde_json::Value,
    operand: &dyn Fn(&str) -> Result<crate::pipeline::mapping::Operand, String>,
) -> Result<crate::pipeline::mapping::Test, String> {
    use crate::pipeline::mapping::{Bound, Test};
    use serde_json::Value;
    let m = match value {
        Value::Array(options) => return Ok(Test::AnyOf(options)),
        Value::Object(m) if m.len() == 1 => m,
        Value::Object(_) | Value::Null => {
            return Err(format!("condition on {name:?}: give a literal, a list of literals or one test such as {{gte: 0.8}}"));
        }
        literal => return Ok(Test::AnyOf(vec![literal])),
    };
    let (op, arg) = m.into_iter().next().unwrap_or_default();
    let ordering = match op.as_str() {
        "gt" => Some((std::cmp::Ordering::Greater, false)),
        "gte" => Some((std::cmp::Ordering::Greater, true)),
        "lt" => Some((std::cmp::Ordering::Less, false)),
        "lte" => Some((std::cmp::Ordering::Less, true)),
        _ => None,
    };
    match (op.as_str(), ordering, arg) {
        (_, Some((ord, eq)), Value::Number(n)) => Ok(Test::Compare(
            ord,
            eq,
            Bound::Number(n.as_f64().unwrap_or(0.0)),
        )),
        (_, Some((ord, eq)), Value::String(r)) => {
            Ok(Test::Compare(ord, eq, Bound::Operand(operand(&r)?)))
        }
        (op, Some(_), _) => Err(format!(
            "condition on {name:?}: {op:?} takes a number or a name"
        )),
        ("ne", _, v) => Ok(Test::NotEqual(v)),
        ("present", _, Value::Bool(b)) => Ok(Test::Present(b)),
        ("present", _, _) => Err(format!(
            "condition on {name:?}: present takes true or false"
        )),
        (op, _, _) => Err(format!("condition on {name:?}: {op:?} is not a test; use gte, gt, lte, lt (with a number or a name), ne, or present: true|false")),
    }
}

/// The 1-based line where a key path is written in a YAML text: each key is
/// searched below the previous one, at a deeper indentation. Good enough for
/// block-style YAML, which is what config files are; `None` if not found.
pub fn locate(text: &str, keys: &[&str]) -> Option<usize> {
    locate_at(text, keys).map(|(line, _)| line)
}

/// Like [`locate`], with the 1-based column where the key starts.
pub fn locate_at(text: &str, keys: &[&str]) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut min_indent = 0usize;
    let mut found = None;
    for (depth, key) in keys.iter().enumerate() {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if depth > 0
                && i > start
                && !trimmed.is_empty()
                && !trimmed.starts_with('#')
                && indent < min_indent
            {
                break; // left the parent block
            }
            let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
            let matches = [
                format!("{key}:"),
                format!("\"{key}\":"),
                format!("'{key}':"),
            ]
            .iter()
            .any(|k| body.starts_with(k.as_str()));
            if matches && (depth == 0 || indent >= min_indent) {
                hit = Some((i, indent + 1));
                break;
            }
        }
        match hit {
            Some((i, next_indent)) => {
                let line = lines[i];
                let col = line.len() - line.trim_start().trim_start_matches("- ").len() + 1;
                found = Some((i + 1, col));
                start = i + 1;
                min_indent = next_indent;
            }
            None => return found,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_located_under_their_parents() {
        let text =
            "name: x\nfields:\n  user_id: $.a\n  course_id: $.b\nattributes:\n  user_id: $.z\n";
        assert_eq!(locate(text, &["fields", "course_id"]), Some(4));
        assert_eq!(locate(text, &["attributes", "user_id"]), Some(6));
        assert_eq!(locate(text, &["fields"]), Some(2));
        assert_eq!(locate(text, &["nope"]), None);
        assert_eq!(locate(text, &["fields", "nope"]), Some(2));
    }

    fn compile(text: &str) -> Result<Source, Vec<ConfigError>> {
        let rules = BTreeMap::new();
        compile_source(
            Path::new("sources.d/x.yaml"),
            text,
            &rules,
            &SecretEnv::default(),
            crate::pipeline::limits::DEFAULT_SOURCE,
            &mut Vec::new(),
        )
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let text = "auth: {type: bearer, secret_env: ROCKET_X_TOKEN}\nevent_type: {paths: $.t}\nfields:\n  user_id: $.u\n  colour: $.c\n";
        let errs = compile(text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let e = errs[0].to_string();
        assert!(e.starts_with("sources.d/x.yaml:5:"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn an_unknown_key_inside_a_scheme_or_a_field_spec_is_named_too() {
        let cases = [
            (
                "auth:\n  - type: bearer\n    secret_evn: ROCKET_X_TOKEN\nevent_type: {paths: $.t}\n",
                "sources.d/x.yaml:3:",
                "secret_evn",
            ),
            (
                "auth: {type: bearer, secret_env: ROCKET_X_TOKEN}\nevent_type: {paths: $.t}\nfields:\n  occurred_at:\n    paths: $.at\n    tpye: timestamp\n",
                "sources.d/x.yaml:6:",
                "tpye",
            ),
            (
                "auth: {type: bearer, secret_env: ROCKET_X_TOKEN}\nevent_type: {paths: $.t}\nattributes:\n  grade: {path: $.g, formt: x}\n",
                "sources.d/x.yaml:4:",
                "formt",
            ),
        ];
        for (text, at, key) in cases {
            let errs = compile(text).unwrap_err();
            let e = errs[0].to_string();
            assert!(e.starts_with(at), "{e}");
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
        }
    }

    #[test]
    fn an_unset_secret_warns_by_whether_the_source_still_verifies() {
        let text = "auth:\n  - {type: bearer, secret_env: ROCKET_X_TOKEN}\n  - {type: hmac, header: X-Sig, secret_env: ROCKET_X_SECRET}\nevent_type: {paths: $.t}\n";
        let warned = |secrets: SecretEnv| {
            let mut warnings = Vec::new();
            compile_source(
                Path::new("sources.d/x.yaml"),
                text,
                &BTreeMap::new(),
                &secrets,
                crate::pipeline::limits::DEFAULT_SOURCE,
                &mut warnings,
            )
            .unwrap();
            warnings
        };
        assert_eq!(
            warned(SecretEnv::from_pairs([("ROCKET_X_TOKEN", "t")])),
            [
                "source x: ROCKET_X_SECRET is unset; that scheme refuses every request; \
              the source's other schemes still verify"
            ]
        );
        assert_eq!(
            warned(SecretEnv::default()),
            [
                "source x: ROCKET_X_TOKEN is unset; every request to it is refused (401)",
                "source x: ROCKET_X_SECRET is unset; every request to it is refused (401)",
            ]
        );
    }

    #[test]
    fn a_secret_file_problem_in_check_warns_once_and_the_dry_run_source_not_at_all() {
        let warned = |text: &str| {
            let mut warnings = Vec::new();
            let _ = compile_source(
                Path::new("sources.d/x.yaml"),
                text,
                &BTreeMap::new(),
                &SecretEnv::default().lenient(),
                crate::pipeline::limits::DEFAULT_SOURCE,
                &mut warnings,
            );
            warnings
        };
        let missing = warned(
            "auth: {type: bearer, secret_file: /nonexistent/x-token}\nevent_type: {paths: $.t}\n",
        );
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(!missing[0].contains("is unset"), "{missing:?}");
        let test = warned("auth: {type: bearer, secret_env: ROCKET_TEST_TOKEN}\nevent_type: {paths: $.t}\ndry_run: true\n");
        assert_eq!(test, Vec::<String>::new());
    }

    #[test]
    fn auth_keys_must_apply_to_their_kind_and_name_one_secret() {
        let text = "auth:\n  - type: bearer\n    secret_env: ROCKET_X_TOKEN\n    header: X-Nope\n  - type: body_token\n    secret_env: ROCKET_X_TOKEN\n    secret: y\n    field: $.t\n  - type: header\n    secret_env: ROCKET_X_TOKEN\n  - type: bearer\n    secret_env: ROCKET_LOG_FORMAT\n  - type: bearer\n    secret_env: ROCKET_ADMIN_TOKEN\n  - type: bearer\n    secret_env: HOME\n  - type: bearer\n    secret_env: ROCKET_MYLMS\n  - type: bearer\n    secret_env: ROCKET_MYLMS\n    any_secret_name: true\nevent_type: {paths: $.t}\n";
        let errs = compile(text).unwrap_err();
        let got: Vec<_> = errs
            .iter()
            .map(|e| (e.key.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "auth.header",
                    "scheme 1: header does not apply to type Bearer"
                ),
                (
                    "auth.secret_env",
                    "scheme 2: give exactly one of secret_env, secret_file and secret"
                ),
                ("auth.header", "scheme 3: a header scheme names its header"),
                ("auth.secret_env", "scheme 4: ROCKET_LOG_FORMAT: a server setting cannot be a source's secret"),
                ("auth.secret_env", "scheme 5: ROCKET_ADMIN_TOKEN: the admin and test tokens cannot be a source's secret"),
                ("auth.secret_env", "scheme 6: HOME: the server reads secrets only from ROCKET_* variables"),
                ("auth.secret_env", "scheme 7: ROCKET_MYLMS: a secret's variable has TOKEN, SECRET, KEY or PASSWORD in its name (or set any_secret_name: true)"),
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn a_case_test_with_the_wrong_argument_says_what_it_takes() {
        let text = "auth: {type: bearer, secret_env: ROCKET_X_TOKEN}\nevent_type:\n  paths: $.t\n  cases:\n    - vendor: done\n      when: {grade: {gte: true}, user_id: {present: yes}, course_id: {near: 1}}\n      type: lesson.completed\nfields:\n  user_id: $.u\n  course_id: $.c\nattributes:\n  grade: {path: $.g, type: number}\n";
        let errs = compile(text).unwrap_err();
        let messages: Vec<_> = errs.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages.len(), 3, "{errs:#?}");
        // In the order of the condition's keys.
        assert!(messages[0].contains("\"near\" is not a test"), "{errs:#?}");
        assert!(
            messages[1].ends_with("\"gte\" takes a number or a name"),
            "{errs:#?}"
        );
        assert!(
            messages[2].ends_with("present takes true or false"),
            "{errs:#?}"
        );
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = "name: Bad Name\nauth: {type: hmac, secret_env: ROCKET_X_SECRET, header: \"bad header\"}\nevent_type: {paths: \"$.[\"}\nfields:\n  user_id: [\"$.ok\", \"nope\"]\nrequired: [user_id, colour]\nrules: [missing]\n";
        let errs = compile(text).unwrap_err();
        let keys: Vec<_> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            vec![
                ("name", Some(1)),
                ("auth.header", Some(2)),
                ("event_type.paths", Some(3)),
                ("fields.user_id", Some(5)),
                ("required", Some(6)),
                ("rules", Some(7)),
            ],
            "{errs:#?}"
        );
    }
}
