//! Semantic validation of a parsed configuration.
//!
//! Type-correct values can still be unusable (port 0, a route to a missing
//! upstream, a certificate that is not there). Every rule runs and every
//! problem is collected, each located at its key, so one `spooky check` run
//! shows the operator everything to fix.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use super::error::ConfigError;
use super::locate::KeyLocations;
use super::schema::{Config, HashKey, Policy, RetryOn, Upstream, Workers};

/// Highest stream count QUIC can express (RFC 9000 §4.6).
const MAX_STREAMS_LIMIT: u64 = 1 << 60;
/// Upper bound on worker threads; more is a typo rather than a plan.
const MAX_WORKERS: usize = 1024;
/// Upper bound on datagrams per batch, the size of the I/O rings.
const MAX_BATCH: usize = 1024;
/// Smallest header budget that still fits ordinary browser requests.
const MIN_HEADER_BYTES: usize = 1024;
/// Levels accepted by a bare `tracing` EnvFilter directive.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Runs every rule over `config`; the errors come back sorted by position.
pub(crate) fn validate(config: &Config, file: &Path, locations: &KeyLocations) -> Vec<ConfigError> {
    let mut v = Validator {
        file,
        locations,
        errors: Vec::new(),
    };
    v.listen(config);
    v.quic(config);
    v.io(config);
    v.upstreams(config);
    v.routes(config);
    v.limits(config);
    v.admin(config);
    v.telemetry(config);
    let mut errors = v.errors;
    errors.sort_by_key(|e| (e.line, e.col));
    errors
}

struct Validator<'a> {
    file: &'a Path,
    locations: &'a KeyLocations,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    /// Records a problem at `key`, located at the key or its nearest
    /// ancestor present in the file.
    fn report(&mut self, key: &str, problem: impl Into<String>) {
        let position = self.locations.locate(key);
        self.errors
            .push(ConfigError::at(self.file, position, key, problem));
    }

    /// Reports `problem` at `key` unless `ok`.
    fn check(&mut self, ok: bool, key: &str, problem: &str) {
        if !ok {
            self.report(key, problem);
        }
    }

    /// Checks that `path` is a regular file this process can open.
    fn readable_file(&mut self, key: &str, path: &Path) {
        match File::open(path).and_then(|f| f.metadata()) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => self.report(key, format!("{} is not a regular file", path.display())),
            Err(e) => self.report(key, format!("cannot open {}: {e}", path.display())),
        }
    }

    fn listen(&mut self, config: &Config) {
        let listen = &config.listen;
        self.check(
            listen.address.port() != 0,
            "listen.address",
            "port must not be 0",
        );
        self.readable_file("listen.tls.cert", &listen.tls.cert);
        self.readable_file("listen.tls.key", &listen.tls.key);
        self.check(
            !listen.alpn.is_empty(),
            "listen.alpn",
            "at least one ALPN protocol id is required",
        );
        for (i, id) in listen.alpn.iter().enumerate() {
            // RFC 7301: protocol ids are 1 to 255 bytes.
            self.check(
                !id.is_empty() && id.len() <= 255,
                &format!("listen.alpn[{i}]"),
                "ALPN protocol id must be 1 to 255 bytes",
            );
        }
    }

    fn quic(&mut self, config: &Config) {
        let quic = &config.quic;
        self.check(
            quic.idle_timeout_ms > 0,
            "quic.idle_timeout_ms",
            "must be greater than 0",
        );
        self.check(
            (1..=MAX_STREAMS_LIMIT).contains(&quic.max_streams_bidi),
            "quic.max_streams_bidi",
            "must be between 1 and 2^60",
        );
        if quic.initial_max_stream_data == 0 {
            self.report("quic.initial_max_stream_data", "must be greater than 0");
        } else if quic.initial_max_stream_data > quic.initial_max_data {
            self.report(
                "quic.initial_max_stream_data",
                format!(
                    "must not exceed quic.initial_max_data ({})",
                    quic.initial_max_data
                ),
            );
        }
        self.check(
            quic.server_id >= 1,
            "quic.server_id",
            "must be between 1 and 65535",
        );
        self.check(
            quic.retry_threshold >= 1,
            "quic.retry_threshold",
            "must be greater than 0",
        );
        self.check(
            quic.handshake_timeout_ms > 0,
            "quic.handshake_timeout_ms",
            "must be greater than 0",
        );
    }

    fn io(&mut self, config: &Config) {
        let io = &config.io;
        self.check(
            (1..=MAX_BATCH).contains(&io.batch),
            "io.batch",
            "must be between 1 and 1024",
        );
        if let Workers::Count(n) = io.workers {
            self.check(
                (1..=MAX_WORKERS).contains(&n),
                "io.workers",
                "must be `auto` or between 1 and 1024",
            );
        }
    }

    fn upstreams(&mut self, config: &Config) {
        if config.upstreams.is_empty() {
            self.report("upstreams", "at least one upstream is required");
        }
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let at = format!("upstreams[{i}]");
            self.upstream_name(&at, &upstream.name);
            if let Some(first) = first_index.get(upstream.name.as_str()) {
                self.report(
                    &format!("{at}.name"),
                    format!(
                        "duplicate upstream name `{}` (first defined at upstreams[{first}])",
                        upstream.name
                    ),
                );
            } else {
                first_index.insert(&upstream.name, i);
            }
            self.upstream(&at, upstream);
        }
    }

    fn upstream_name(&mut self, at: &str, name: &str) {
        let key = format!("{at}.name");
        if name.is_empty() {
            self.report(&key, "must not be empty");
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            self.report(
                &key,
                format!("`{name}` may only contain A-Z, a-z, 0-9, `_`, `.` and `-`"),
            );
        }
    }

    fn health_check(&mut self, at: &str, hc: &crate::config::HealthCheck) {
        let positive = "must be at least 1";
        self.check(
            hc.path.starts_with('/'),
            &format!("{at}.health_check.path"),
            "must start with `/`",
        );
        self.check(
            hc.interval_ms > 0,
            &format!("{at}.health_check.interval_ms"),
            "must be greater than 0",
        );
        if hc.timeout_ms == 0 {
            self.report(
                &format!("{at}.health_check.timeout_ms"),
                "must be greater than 0",
            );
        } else if hc.timeout_ms > hc.interval_ms {
            self.report(
                &format!("{at}.health_check.timeout_ms"),
                format!(
                    "must not exceed health_check.interval_ms ({})",
                    hc.interval_ms
                ),
            );
        }
        self.check(
            hc.healthy_threshold >= 1,
            &format!("{at}.health_check.healthy_threshold"),
            positive,
        );
        self.check(
            hc.unhealthy_threshold >= 1,
            &format!("{at}.health_check.unhealthy_threshold"),
            positive,
        );
    }

    fn upstream(&mut self, at: &str, u: &Upstream) {
        self.check(
            !u.backends.is_empty(),
            &format!("{at}.backends"),
            "at least one backend is required",
        );
        let mut seen = HashSet::new();
        for (j, backend) in u.backends.iter().enumerate() {
            if !seen.insert(backend.address) {
                self.report(
                    &format!("{at}.backends[{j}].address"),
                    format!("duplicate backend address {}", backend.address),
                );
            }
            self.check(
                backend.weight > 0,
                &format!("{at}.backends[{j}].weight"),
                "must be greater than 0",
            );
        }

        if u.hash_key != HashKey::ClientIp && u.policy != Policy::ConsistentHash {
            self.report(
                &format!("{at}.hash_key"),
                "hash_key only applies to consistent_hash",
            );
        }

        let positive = "must be at least 1";
        self.check(
            u.pool.connections_per_backend >= 1,
            &format!("{at}.pool.connections_per_backend"),
            positive,
        );
        self.check(
            u.pool.max_concurrent_streams >= 1,
            &format!("{at}.pool.max_concurrent_streams"),
            positive,
        );
        self.check(
            u.pool.max_connections_per_backend >= u.pool.connections_per_backend,
            &format!("{at}.pool.max_connections_per_backend"),
            "must be at least connections_per_backend",
        );

        for (name, value) in [
            ("connect_ms", u.timeouts.connect_ms),
            ("request_ms", u.timeouts.request_ms),
            ("idle_ms", u.timeouts.idle_ms),
        ] {
            self.check(
                value > 0,
                &format!("{at}.timeouts.{name}"),
                "must be greater than 0",
            );
        }

        self.health_check(at, &u.health_check);

        self.check(
            u.outlier.consecutive_failures >= 1,
            &format!("{at}.outlier.consecutive_failures"),
            positive,
        );
        self.check(
            u.outlier.max_ejection_percent <= 100,
            &format!("{at}.outlier.max_ejection_percent"),
            "must be between 0 and 100",
        );

        self.check(
            u.retries.budget_percent <= 100,
            &format!("{at}.retries.budget_percent"),
            "must be between 0 and 100",
        );
        for (k, on) in u.retries.on.iter().enumerate() {
            if let RetryOn::Status(status) = on {
                self.check(
                    (500..=599).contains(status),
                    &format!("{at}.retries.on[{k}]"),
                    "only 5xx status codes (500..=599) can be retried",
                );
            }
        }

        self.check(
            u.circuit.max_in_flight_per_backend >= 1,
            &format!("{at}.circuit.max_in_flight_per_backend"),
            positive,
        );
        self.check(
            u.circuit.max_pending >= 1,
            &format!("{at}.circuit.max_pending"),
            positive,
        );
    }

    fn routes(&mut self, config: &Config) {
        let names: HashSet<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        for (i, route) in config.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if !names.contains(route.upstream.as_str()) {
                self.report(
                    &format!("{at}.upstream"),
                    format!("unknown upstream `{}`", route.upstream),
                );
            }
            self.check(
                route.path_prefix.starts_with('/'),
                &format!("{at}.path_prefix"),
                "must start with `/`",
            );
            if let Some(host) = &route.host {
                if let Err(problem) = check_route_host(host) {
                    self.report(&format!("{at}.host"), problem);
                }
            }
        }
    }

    fn limits(&mut self, config: &Config) {
        let limits = &config.limits;
        self.check(
            limits.max_connections > 0,
            "limits.max_connections",
            "must be greater than 0",
        );
        self.check(
            limits.max_request_header_bytes >= MIN_HEADER_BYTES,
            "limits.max_request_header_bytes",
            "must be at least 1024",
        );
        self.check(
            limits.max_body_buffer_bytes > 0,
            "limits.max_body_buffer_bytes",
            "must be greater than 0",
        );
        self.check(
            limits.initial_body_buffer_bytes > 0,
            "limits.initial_body_buffer_bytes",
            "must be greater than 0 (a value above max_body_buffer_bytes is capped to it)",
        );
        self.check(
            limits.max_abandoned_streams_per_connection > 0,
            "limits.max_abandoned_streams_per_connection",
            "must be greater than 0",
        );
        self.check(
            limits.max_abandoned_streams_per_source > 0,
            "limits.max_abandoned_streams_per_source",
            "must be greater than 0",
        );
    }

    fn admin(&mut self, config: &Config) {
        let admin = &config.admin;
        match &admin.token_file {
            Some(path) => self.readable_file("admin.token_file", path),
            None => self.check(
                admin.address.ip().is_loopback(),
                "admin.address",
                "token_file required when admin is not on loopback",
            ),
        }
    }

    fn telemetry(&mut self, config: &Config) {
        let log = config.telemetry.log.trim();
        if !(LOG_LEVELS.contains(&log.to_ascii_lowercase().as_str()) || log.contains('=')) {
            self.report(
                "telemetry.log",
                format!(
                    "`{log}` is not a log filter: use one of {} or `target=level` directives",
                    LOG_LEVELS.join("|")
                ),
            );
        }
        if let Some(path) = &config.telemetry.access_log_path {
            if let Err(problem) = check_log_path(path) {
                self.report("telemetry.access_log_path", problem);
            }
        }
    }
}

/// An access-log path must name a file (existing or not) in a directory
/// that exists: spooky creates the file, never directories, so a typo in
/// the directory is caught by `spooky check` rather than at the first
/// request. Whether the file can be opened for writing is checked at start.
fn check_log_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory, not a file", path.display()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(e) => Err(format!("directory {} does not exist: {e}", dir.display())),
    }
}

/// A route host is compared with the request's `:authority` host, already
/// lowercased and without port, so it must be a bare, ASCII host name or a
/// bracketed IPv6 literal.
fn check_route_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty (omit `host` to match any host)".to_string());
    }
    if !host.is_ascii() {
        return Err(format!(
            "`{host}` is not ASCII; write internationalised names in punycode"
        ));
    }
    if host
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!("`{host}` must not contain spaces"));
    }
    let bracketed_v6 = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed_v6 {
        return Err(format!("`{host}` must not include a port"));
    }
    if host.contains('/') {
        return Err(format!("`{host}` must be a host name, not a URL"));
    }
    Ok(())
}
