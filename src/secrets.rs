//! Secrets: where a source's (or the server's) secret comes from, and its
//! values, read anew at every config load so that a reload picks up a
//! changed file. Three places, as the config names them:
//!
//! - `secret_env: NAME`: the environment variable (comma-separated values),
//!   or, when only `NAME_FILE` is set, the file it names (the Docker
//!   convention);
//! - `secret_file: PATH`: a file (relative paths from the config directory);
//! - `secret: NAME`: the file `NAME` in `ROCKET_SECRETS_DIR` (a mounted
//!   `/run/secrets`).
//!
//! A file holds one value per line (blank lines and surrounding whitespace
//! ignored), so that several values coexist while a secret rotates. A file
//! that is missing, empty, unreadable, or readable by others than its owner
//! (unless `ROCKET_SECRETS_ALLOW_SHARED=on`) is an error naming the file,
//! never its contents. Values live in [`Secret`], whose `Debug` prints
//! `[redacted]`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A secret value. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret's bytes, for keying a MAC or comparing a token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where the config says a secret is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable, or the file its `<NAME>_FILE` names.
    Env(String),
    /// A file; relative to the config directory.
    File(PathBuf),
    /// A file of this name in `ROCKET_SECRETS_DIR`.
    Dir(String),
}

/// Where a secret's values were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The environment variable (set, or not: then no values).
    Env(String),
    /// A file: named by `secret_file`, or by `<NAME>_FILE`.
    File(PathBuf),
    /// A file in the secrets directory.
    SecretsDir(PathBuf),
}

impl Origin {
    /// `env`, `file` or `secrets_dir`.
    pub fn kind(&self) -> &'static str {
        match self {
            Origin::Env(_) => "env",
            Origin::File(_) => "file",
            Origin::SecretsDir(_) => "secrets_dir",
        }
    }

    /// The variable's name or the file's path.
    pub fn name(&self) -> String {
        match self {
            Origin::Env(n) => n.clone(),
            Origin::File(p) | Origin::SecretsDir(p) => p.display().to_string(),
        }
    }

    /// The file to watch for changes, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Origin::Env(_) => None,
            Origin::File(p) | Origin::SecretsDir(p) => Some(p),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(n) => write!(f, "{n}"),
            Origin::File(p) | Origin::SecretsDir(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A secret's values and where they came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub values: Vec<Secret>,
    pub origin: Origin,
}

/// The environment secrets are resolved in: the `ROCKET_*` variables read
/// once at startup (config loading never reads the live environment, so
/// tests run several servers with different secrets in one process), and
/// the files they and the config point to, read at every load.
#[derive(Clone, Default)]
pub struct SecretEnv {
    vars: HashMap<String, String>,
    /// A value for every reference (used by `check` to run test cases).
    fallback: Option<String>,
    /// A problem with a secret file is a warning, not an error (`check`
    /// validates a config away from the machine that holds its secrets).
    lenient: bool,
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("SecretEnv").field("names", &names).finish()
    }
}

/// The folder `secret: NAME` reads from.
pub const SECRETS_DIR: &str = "ROCKET_SECRETS_DIR";
/// `on`: secret files readable by others than their owner are allowed.
pub const ALLOW_SHARED: &str = "ROCKET_SECRETS_ALLOW_SHARED";

impl SecretEnv {
    /// Every `ROCKET_*` variable of the process environment.
    pub fn from_process() -> Self {
        let vars = std::env::vars()
            .filter(|(k, _)| k.starts_with("ROCKET_"))
            .collect();
        Self {
            vars,
            fallback: None,
            lenient: false,
        }
    }

    /// Problems with secret files become warnings (see [`Self::is_lenient`]).
    pub fn lenient(mut self) -> Self {
        self.lenient = true;
        self
    }

    /// Whether a problem with a secret file is only a warning.
    pub fn is_lenient(&self) -> bool {
        self.lenient
    }

    /// Every reference resolves to `value`, no file is read: the test
    /// secret of `check`.
    pub fn everything(value: &str) -> Self {
        Self {
            vars: HashMap::new(),
            fallback: Some(value.to_string()),
            lenient: false,
        }
    }

    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            fallback: None,
            lenient: false,
        }
    }

    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(name.into(), value.into());
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// A secret's values, from where `reference` says; `base` is the config
    /// directory (for relative `secret_file` paths). `Err` is a message
    /// naming the variable or file, never a value.
    pub fn resolve(&self, reference: &SecretRef, base: &Path) -> Result<Resolved, String> {
        let origin = self.origin(reference, base)?;
        if let Some(value) = &self.fallback {
            return Ok(Resolved {
                values: vec![Secret::new(value.clone())],
                origin,
            });
        }
        let values = match &origin {
            Origin::Env(name) => self.var(name).map(split_list).unwrap_or_default(),
            Origin::File(path) | Origin::SecretsDir(path) => {
                read_secret_file(path, self.allow_shared())?
            }
        };
        Ok(Resolved { values, origin })
    }

    /// Where `reference` says a secret lives (the variable, or the file it
    /// or the secrets directory names), without reading it.
    pub fn origin(&self, reference: &SecretRef, base: &Path) -> Result<Origin, String> {
        Ok(match reference {
            SecretRef::Env(name) => {
                let file_var = format!("{name}_FILE");
                match (self.var(name), self.var(&file_var)) {
                    (Some(_), Some(_)) => {
                        return Err(format!("both {name} and {file_var} are set; keep one"))
                    }
                    (_, Some(path)) => Origin::File(PathBuf::from(path)),
                    _ => Origin::Env(name.clone()),
                }
            }
            SecretRef::File(path) => Origin::File(base.join(path)),
            SecretRef::Dir(name) => {
                if !is_file_name(name) {
                    return Err(format!(
                        "secret {name:?} must be a file name in {SECRETS_DIR} (letters, digits, '.', '-', '_')"
                    ));
                }
                match self.var(SECRETS_DIR) {
                    Some(dir) => Origin::SecretsDir(Path::new(dir).join(name)),
                    None if self.fallback.is_some() => {
                        Origin::SecretsDir(Path::new(SECRETS_DIR).join(name))
                    }
                    None => return Err(format!("secret {name:?} needs {SECRETS_DIR} to be set")),
                }
            }
        })
    }

    fn allow_shared(&self) -> bool {
        self.var(ALLOW_SHARED).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "on" | "true" | "1" | "yes"
            )
        })
    }
}

fn split_list(list: &str) -> Vec<Secret> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect()
}

fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// One value per line. The errors name the file and what is wrong with it.
fn read_secret_file(path: &Path, allow_shared: bool) -> Result<Vec<Secret>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("secret file {shown} does not exist"),
        _ => format!("secret file {shown} cannot be read: {}", e.kind()),
    })?;
    if !meta.is_file() {
        return Err(format!("secret file {shown} is not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 && !allow_shared {
            return Err(format!(
                "secret file {shown} is readable by others than its owner (mode {mode:04o}): \
                 chmod 600 it, or set {ALLOW_SHARED}=on where modes cannot be set"
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = allow_shared;
    let bytes = std::fs::read(path)
        .map_err(|e| format!("secret file {shown} cannot be read: {}", e.kind()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("secret file {shown} is not UTF-8 text"))?;
    let values: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(Secret::new)
        .collect();
    if values.is_empty() {
        return Err(format!("secret file {shown} holds no value"));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let env = SecretEnv::from_pairs([("ROCKET_X", "hunter2")]);
        assert!(!format!("{env:?}").contains("hunter2"));
    }

    #[test]
    fn a_secret_list_is_comma_separated_and_trimmed() {
        let env = SecretEnv::from_pairs([("A", " one, two ,,"), ("B", "")]);
        let list = |name: &str| {
            let r = env
                .resolve(&SecretRef::Env(name.into()), Path::new("."))
                .unwrap();
            r.values
                .iter()
                .map(|s| s.expose().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(list("A"), ["one", "two"]);
        assert!(list("B").is_empty());
        assert!(list("C").is_empty());
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        p
    }

    fn values(r: &Resolved) -> Vec<&str> {
        r.values.iter().map(Secret::expose).collect()
    }

    #[test]
    fn secrets_resolve_from_env_files_and_the_secrets_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = write(dir, "token", "\n  old-value \n\nnew-value\n", 0o600);
        let mut env = SecretEnv::from_pairs([
            ("ROCKET_A", "x,y"),
            ("ROCKET_B_FILE", file.to_str().unwrap()),
        ]);
        env.set(SECRETS_DIR, dir.to_str().unwrap());
        let a = env
            .resolve(&SecretRef::Env("ROCKET_A".into()), dir)
            .unwrap();
        assert_eq!((values(&a), a.origin.kind()), (vec!["x", "y"], "env"));
        let b = env
            .resolve(&SecretRef::Env("ROCKET_B".into()), dir)
            .unwrap();
        assert_eq!(values(&b), ["old-value", "new-value"]);
        assert_eq!(b.origin, Origin::File(file.clone()));
        let f = env.resolve(&SecretRef::File("token".into()), dir).unwrap();
        assert_eq!(values(&f), ["old-value", "new-value"]);
        let d = env.resolve(&SecretRef::Dir("token".into()), dir).unwrap();
        assert_eq!(d.origin, Origin::SecretsDir(file));
        let unset = env
            .resolve(&SecretRef::Env("ROCKET_C".into()), dir)
            .unwrap();
        assert!(unset.values.is_empty());
    }

    #[test]
    fn bad_secret_files_are_errors_that_name_the_file_not_its_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "empty", " \n\n", 0o600);
        write(dir, "shared", "s3cret-shared", 0o644);
        write(dir, "binary", "\u{0}", 0o600);
        std::fs::write(dir.join("binary"), [0xff, 0xfe]).unwrap();
        let mut env = SecretEnv::from_pairs([(SECRETS_DIR, dir.to_str().unwrap())]);
        env.set("ROCKET_BOTH", "x");
        env.set("ROCKET_BOTH_FILE", "/nonexistent");
        let cases = [
            (SecretRef::Dir("missing".into()), "does not exist"),
            (SecretRef::Dir("empty".into()), "holds no value"),
            (SecretRef::Dir("binary".into()), "not UTF-8"),
            (
                SecretRef::Dir("../etc/passwd".into()),
                "must be a file name",
            ),
            (SecretRef::File(".".into()), "not a regular file"),
            (SecretRef::Env("ROCKET_BOTH".into()), "keep one"),
        ];
        #[cfg(unix)]
        let cases = [
            &cases[..],
            &[(SecretRef::Dir("shared".into()), "readable by others")],
        ]
        .concat();
        for (r, want) in cases {
            let err = env.resolve(&r, dir).unwrap_err();
            assert!(err.contains(want), "{r:?}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        env.set(ALLOW_SHARED, "on");
        assert!(env.resolve(&SecretRef::Dir("shared".into()), dir).is_ok());
        let no_dir = SecretEnv::default();
        let err = no_dir
            .resolve(&SecretRef::Dir("x".into()), dir)
            .unwrap_err();
        assert!(err.contains(SECRETS_DIR), "{err}");
    }

    #[test]
    fn check_resolves_every_reference_to_its_test_secret_without_reading_files() {
        let env = SecretEnv::everything("t");
        for r in [
            SecretRef::Env("ROCKET_X".into()),
            SecretRef::File("/nonexistent".into()),
            SecretRef::Dir("x".into()),
        ] {
            let got = env.resolve(&r, Path::new(".")).unwrap();
            assert_eq!(values(&got), ["t"]);
        }
    }
}
