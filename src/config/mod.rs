//! spooky's configuration: schema, loading and validation.
//!
//! Loading goes through three stages so that every problem an operator can
//! fix is reported with `file:line:col: key: problem`:
//! 1. YAML syntax and types (serde_yaml_ng, with serde_path_to_error for the
//!    key path) — stops at the first problem, since nothing after it can be
//!    trusted;
//! 2. path resolution and normalisation (relative cert/key/token paths are
//!    taken relative to the config file, route hosts are lowercased);
//! 3. semantic validation — collects every problem, each located at its key
//!    through a yaml-rust2 scan of the source.

mod error;
mod locate;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, ConfigErrors};
pub use schema::OnWorkerFailure;
pub use schema::RetryMode;
pub use schema::{
    Admin, Backend, Circuit, Config, CongestionControl, HashKey, HealthCheck, Io, IoBackend,
    Limits, Listen, LogFormat, OnAllUnhealthy, Outlier, Policy, Pool, Quic, Retries, RetryOn,
    Route, Telemetry, Timeouts, Tls, Upstream, UpstreamIo, Workers,
};

use locate::KeyLocations;

/// Reads and validates the configuration file at `path`.
///
/// # Errors
/// Every problem found, located in the file; an unreadable file is one error
/// at line 0, column 0, key `-`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::one(ConfigError::at(
            path,
            (0, 0),
            "-",
            format!("cannot read config file: {e}"),
        ))
    })?;
    parse_str(&text, path)
}

/// Parses and validates configuration text as if read from `file`.
///
/// `file` names the source in messages and anchors relative `listen.tls`,
/// `admin.token_file` and `telemetry.access_log_path` paths: they are resolved against its directory and
/// the resolved paths are what the returned `Config` holds.
///
/// # Errors
/// The first syntax or type error, or else every semantic problem.
pub fn parse_str(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let locations = KeyLocations::scan(text);
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let mut config: Config = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| ConfigErrors::one(deserialize_error(&e, file, &locations)))?;
    resolve_paths(&mut config, file);
    normalize(&mut config);
    let errors = validate::validate(&config, file, &locations);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

impl Config {
    /// The effective configuration (defaults filled in, paths resolved) as
    /// YAML, for `spooky check --print` and the admin endpoint. Parsing the
    /// output yields an equal `Config`.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self)
            .unwrap_or_else(|e| format!("# cannot serialize configuration: {e}\n"))
    }

    /// Settings that are parsed and validated but not acted on yet, one
    /// human-readable line each, so `spooky check` can tell the operator
    /// which parts of the file have no effect; the list lives in `NOT_YET_ACTIVE`.
    pub fn not_yet_active(&self) -> Vec<String> {
        NOT_YET_ACTIVE
            .iter()
            .filter_map(|(key, describe)| describe(self).map(|what| format!("{key}: {what}")))
            .collect()
    }

    /// Valid combinations that will not do what they say, one line each
    /// (`key: what happens instead`): printed by `spooky check` and logged
    /// once at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.io.upstream_io == UpstreamIo::Ring && self.io.backend == IoBackend::Epoll {
            lines.push(
                "io.upstream_io: `ring` needs the io_uring driver and io.backend is `epoll`; \
                 upstream TCP uses tokio"
                    .to_string(),
            );
        }
        if self.io.zerocopy_send && self.io.backend == IoBackend::Epoll {
            lines.push(
                "io.zerocopy_send: needs the io_uring driver and io.backend is `epoll`; \
                 sends copy as usual"
                    .to_string(),
            );
        }
        lines
    }
}

/// Describes, if it applies to a config, one setting that is not acted on.
type InactiveCheck = fn(&Config) -> Option<String>;

/// Settings accepted but not yet implemented. Remove an entry when the
/// feature lands; nothing else needs to change.
/// (`upstreams[].timeouts.idle_ms` left it when idle pool connections began
/// to close.)
const NOT_YET_ACTIVE: &[(&str, InactiveCheck)] = &[];

/// Comma-separated names of the upstreams matching `pred`, `None` if none:
/// for `NOT_YET_ACTIVE` entries that apply per upstream.
#[allow(dead_code)]
fn names(config: &Config, pred: impl Fn(&Upstream) -> bool) -> Option<String> {
    let list: Vec<&str> = config
        .upstreams
        .iter()
        .filter(|u| pred(u))
        .map(|u| u.name.as_str())
        .collect();
    (!list.is_empty()).then(|| format!("upstream {}", list.join(", ")))
}

/// Resolves the file paths in `config` against the config file's directory,
/// made absolute so the result does not depend on later working-directory
/// changes and re-parsing `to_yaml` output is stable.
fn resolve_paths(config: &mut Config, file: &Path) {
    let dir = file.parent().unwrap_or_else(|| Path::new(""));
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            let joined = dir.join(&*path);
            *path = std::path::absolute(&joined).unwrap_or(joined);
        }
    };
    resolve(&mut config.listen.tls.cert);
    resolve(&mut config.listen.tls.key);
    if let Some(token_file) = &mut config.admin.token_file {
        resolve(token_file);
    }
    if let Some(access_log) = &mut config.telemetry.access_log_path {
        resolve(access_log);
    }
}

/// Puts values into the form the data path compares against.
fn normalize(config: &mut Config) {
    for route in &mut config.routes {
        if let Some(host) = &mut route.host {
            host.make_ascii_lowercase();
        }
    }
}

/// Turns a serde failure into a located error: serde_yaml_ng knows the
/// position, serde_path_to_error the key path.
fn deserialize_error(
    error: &serde_path_to_error::Error<serde_yaml_ng::Error>,
    file: &Path,
    locations: &KeyLocations,
) -> ConfigError {
    let path = error.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = error.inner();
    let message = strip_positions(&inner.to_string());
    let message = strip_path_prefix(&message, &path).to_string();

    let (key, problem) = if let Some((field, rest)) = split_backticked(&message, "unknown field ") {
        // serde words the list as "expected `a`", "expected `a` or `b`" or
        // "expected one of `a`, `b`, `c`"; key names never contain " or ".
        let allowed = rest
            .trim_start_matches(", ")
            .trim_start_matches("expected one of ")
            .trim_start_matches("expected ")
            .replace(" or ", ", ");
        (
            join_path(&path, field),
            format!("unknown key `{field}`, allowed keys: {allowed}"),
        )
    } else if let Some((field, _)) = split_backticked(&message, "missing field ") {
        (
            join_path(&path, field),
            "required key is missing".to_string(),
        )
    } else {
        (path.clone(), message)
    };

    let position = match inner.location() {
        Some(location) => (location.line(), location.column()),
        None => locations.locate(&path),
    };
    let key = if key.is_empty() { "-".to_string() } else { key };
    ConfigError::at(file, position, key, problem)
}

/// serde_yaml_ng prefixes messages with the path of the value or mapping
/// being read (`listen: unknown field ...`); the key column already says it.
fn strip_path_prefix<'m>(message: &'m str, path: &str) -> &'m str {
    let mut candidate = path;
    while !candidate.is_empty() {
        if let Some(rest) = message
            .strip_prefix(candidate)
            .and_then(|r| r.strip_prefix(": "))
        {
            return rest;
        }
        candidate = locate::parent_path(candidate);
    }
    message
}

/// For `"unknown field `x`, expected ..."`, returns `("x", ", expected ...")`
/// when `message` starts with `prefix`.
fn split_backticked<'m>(message: &'m str, prefix: &str) -> Option<(&'m str, &'m str)> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// `parent.child`, or `child` at the root. serde_path_to_error may already
/// end the path with the unknown key; then it is not repeated.
fn join_path(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else if parent == child || parent.ends_with(&format!(".{child}")) {
        parent.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// Removes serde_yaml_ng's ` at line N column M` / ` at position N` notes:
/// the position is already in the `file:line:col` prefix.
fn strip_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        match position_note_len(after) {
            Some(len) => rest = &after[len..],
            None => {
                out.push_str(" at ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Length of a `line N column M` or `position N` note at the start of `s`.
fn position_note_len(s: &str) -> Option<usize> {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    if let Some(r) = s.strip_prefix("line ") {
        let n = digits(r);
        let r2 = r[n..].strip_prefix(" column ")?;
        let m = digits(r2);
        (n > 0 && m > 0).then_some("line ".len() + n + " column ".len() + m)
    } else if let Some(r) = s.strip_prefix("position ") {
        let n = digits(r);
        (n > 0).then_some("position ".len() + n)
    } else {
        None
    }
}
