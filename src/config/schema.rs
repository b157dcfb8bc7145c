//! The typed configuration schema and its defaults.
//!
//! Every struct denies unknown keys so that a typo (`idle_timout_ms`) is an
//! error instead of a silently ignored setting. Every section except
//! `upstreams` has a default, so a minimal file only lists the upstreams.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The whole effective configuration of one spooky instance.
///
/// Has no `Default` because at least one upstream must be named; see
/// [`Config::minimal`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect (QUIC over UDP).
    #[serde(default)]
    pub listen: Listen,
    /// QUIC transport parameters.
    #[serde(default)]
    pub quic: Quic,
    /// Datagram I/O driver settings.
    #[serde(default)]
    pub io: Io,
    /// Backend groups requests are balanced over; required, non-empty.
    pub upstreams: Vec<Upstream>,
    /// Host/path routing; first match wins, empty sends everything to the
    /// first upstream.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Resource limits protecting the process.
    #[serde(default)]
    pub limits: Limits,
    /// Admin (metrics, health) endpoint.
    #[serde(default)]
    pub admin: Admin,
    /// Reload the file when it changes.
    #[serde(default)]
    pub watch: bool,
    /// Logging.
    #[serde(default)]
    pub telemetry: Telemetry,
}

impl Config {
    /// A configuration with every section at its default and the given
    /// upstreams, so tests and tools need not spell out a whole file.
    pub fn minimal(upstreams: Vec<Upstream>) -> Self {
        Config {
            listen: Listen::default(),
            quic: Quic::default(),
            io: Io::default(),
            upstreams,
            routes: Vec::new(),
            limits: Limits::default(),
            admin: Admin::default(),
            watch: false,
            telemetry: Telemetry::default(),
        }
    }
}

/// The client-facing QUIC listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// UDP address to bind; IPv4 or IPv6.
    pub address: SocketAddr,
    /// Certificate and key presented to clients.
    pub tls: Tls,
    /// ALPN protocol ids offered, in preference order.
    pub alpn: Vec<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls: Tls::default(),
            alpn: vec!["h3".to_string()],
        }
    }
}

/// PEM certificate chain and private key.
///
/// Relative paths in the file are resolved against the config file's
/// directory at load time, so the process's working directory does not matter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: PathBuf::from("certs/cert.pem"),
            key: PathBuf::from("certs/key.pem"),
        }
    }
}

/// QUIC transport parameters advertised to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quic {
    /// Idle timeout after which a silent connection is closed.
    pub idle_timeout_ms: u64,
    /// Concurrent bidirectional streams a client may open.
    pub max_streams_bidi: u64,
    /// Connection-level flow-control window in bytes.
    pub initial_max_data: u64,
    /// Per-stream flow-control window in bytes.
    pub initial_max_stream_data: u64,
    /// When to answer a new connection's Initial with a stateless Retry
    /// (address validation before any connection state is allocated).
    pub retry: RetryMode,
    /// Congestion controller.
    pub cc: CongestionControl,
    /// QUIC-LB server id encoded into connection ids (1..=65535).
    pub server_id: u16,
    /// Spread each connection's packets over time as its congestion
    /// controller asks (quiche's `SendInfo.at`), instead of sending whole
    /// windows as line-rate bursts that overflow shallow router queues.
    /// Packets due within 1 ms go out at once (timer granularity).
    pub pacing: bool,
    /// Per-connection cap on the pacing rate in Mbit/s; 0 = none. Needs
    /// `cc: bbr2` (quiche 0.30 paces only in its BBR2 recovery).
    pub max_pacing_rate_mbps: u64,
    /// `retry: auto`: half-open connections (handshake not complete) per
    /// worker past which new connections must first answer a Retry.
    pub retry_threshold: usize,
    /// A connection whose handshake has not completed this long after its
    /// first Initial is discarded (quiche has no handshake timeout).
    pub handshake_timeout_ms: u64,
    /// New connections accepted per second from one client IP address,
    /// per worker; 0 = no limit. Past it, Initials are dropped and counted.
    pub new_connections_per_source: u32,
}

impl Default for Quic {
    fn default() -> Self {
        Quic {
            idle_timeout_ms: 30_000,
            max_streams_bidi: 256,
            initial_max_data: 16_777_216,
            initial_max_stream_data: 1_048_576,
            retry: RetryMode::Auto,
            cc: CongestionControl::default(),
            server_id: 1,
            pacing: true,
            max_pacing_rate_mbps: 0,
            retry_threshold: DEFAULT_RETRY_THRESHOLD,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            new_connections_per_source: 0,
        }
    }
}

/// Half-open connections per worker before `retry: auto` sends Retry
/// (HAProxy's `tune.quic.retry-threshold` default is 100 as well).
pub const DEFAULT_RETRY_THRESHOLD: usize = 100;

/// Default handshake timeout: long enough for a few lost flights on a slow
/// path (PTOs at about 1, 2 and 4 s), short enough that an unanswered
/// Initial does not hold state for the 30 s idle timeout.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// `quic.retry`: `auto`, `true` (always) or `false` (never).
///
/// Written in YAML as a boolean or `auto`, hence the hand-written serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// Retry only while this worker's half-open connections exceed
    /// `quic.retry_threshold`.
    #[default]
    Auto,
    /// Every new connection must answer a Retry first.
    Always,
    /// Never send Retry.
    Never,
}

impl Serialize for RetryMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryMode::Auto => serializer.serialize_str("auto"),
            RetryMode::Always => serializer.serialize_bool(true),
            RetryMode::Never => serializer.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for RetryMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RetryModeVisitor;

        impl Visitor<'_> for RetryModeVisitor {
            type Value = RetryMode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto`, `true` or `false`")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RetryMode, E> {
                Ok(if v {
                    RetryMode::Always
                } else {
                    RetryMode::Never
                })
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryMode, E> {
                match v {
                    "auto" => Ok(RetryMode::Auto),
                    "true" => Ok(RetryMode::Always),
                    "false" => Ok(RetryMode::Never),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }

        deserializer.deserialize_any(RetryModeVisitor)
    }
}

/// Congestion control algorithm for client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CongestionControl {
    /// CUBIC (RFC 9438).
    #[default]
    Cubic,
    /// NewReno (RFC 9002).
    Reno,
    /// BBRv2.
    Bbr2,
}

/// Datagram I/O driver settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Io {
    /// Which kernel interface moves datagrams.
    pub backend: IoBackend,
    /// Number of worker threads.
    pub workers: Workers,
    /// Datagrams per submit/receive batch (1..=1024).
    pub batch: usize,
    /// UDP generic segmentation offload on send.
    pub gso: bool,
    /// UDP generic receive offload.
    pub gro: bool,
    /// What carries the upstream TCP connections (h2 pools, health checks).
    pub upstream_io: UpstreamIo,
    /// io_uring only: send with `SendMsgZc` (the kernel sends from spooky's
    /// buffers instead of copying them). Off by default: on loopback the
    /// kernel copies anyway, and `make perf-io` has not shown a gain.
    pub zerocopy_send: bool,
    /// What the process does when one worker thread panics or fails.
    pub on_worker_failure: OnWorkerFailure,
}

impl Default for Io {
    fn default() -> Self {
        Io {
            backend: IoBackend::default(),
            workers: Workers::default(),
            batch: 64,
            gso: true,
            gro: true,
            upstream_io: UpstreamIo::default(),
            zerocopy_send: false,
            on_worker_failure: OnWorkerFailure::default(),
        }
    }
}

/// Kernel I/O interface for datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring when the kernel supports it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring.
    Uring,
    /// epoll with recvmmsg/sendmmsg.
    Epoll,
}

/// Transport of the upstream TCP connections (h2 pools and health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamIo {
    /// On the io_uring driver, whichever of `ring` and `tokio` measured
    /// faster (docs/perf.md); `tokio` on the epoll driver.
    #[default]
    Auto,
    /// io_uring operations on the worker's own ring (io_uring driver only;
    /// with the epoll driver this falls back to `tokio` with a warning).
    Ring,
    /// tokio's `TcpStream` (epoll readiness and read/write syscalls).
    Tokio,
}

/// `io.on_worker_failure`: a worker that panics or fails is logged at once
/// and `/ready` answers 503 either way; this says whether the process goes
/// with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnWorkerFailure {
    /// Drain the other workers and exit non-zero, so a supervisor restarts
    /// the whole process (the failed worker's connections are gone anyway).
    #[default]
    Exit,
    /// Keep serving on the remaining workers; `/ready` stays 503 until a
    /// restart, so a health-checking balancer still moves traffic away.
    Continue,
}

/// Worker thread count: `auto` (one per core) or an explicit positive count.
///
/// Written in YAML as `auto` or an integer, hence the hand-written serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One worker per available core.
    #[default]
    Auto,
    /// Exactly this many workers (validated to 1..=1024).
    Count(usize),
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => serializer.serialize_str("auto"),
            Workers::Count(n) => serializer.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WorkersVisitor;

        impl Visitor<'_> for WorkersVisitor {
            type Value = Workers;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto` or a positive integer")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Workers, E> {
                usize::try_from(v)
                    .map(Workers::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                if v == "auto" {
                    return Ok(Workers::Auto);
                }
                v.parse::<u64>()
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
        }

        deserializer.deserialize_any(WorkersVisitor)
    }
}

/// A named group of backends with its balancing and resilience policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Name routes refer to; `[A-Za-z0-9_.-]+`, unique.
    pub name: String,
    /// Load-balancing policy.
    #[serde(default)]
    pub policy: Policy,
    /// Request attribute hashed by `consistent_hash`.
    #[serde(default)]
    pub hash_key: HashKey,
    /// The backend servers; required, non-empty.
    pub backends: Vec<Backend>,
    /// Connection pooling towards each backend.
    #[serde(default)]
    pub pool: Pool,
    /// Per-request timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Active health checking.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: Outlier,
    /// Retry policy.
    #[serde(default)]
    pub retries: Retries,
    /// Circuit breaking limits.
    #[serde(default)]
    pub circuit: Circuit,
    /// What to do when every backend is unhealthy.
    #[serde(default)]
    pub on_all_unhealthy: OnAllUnhealthy,
}

impl Upstream {
    /// An upstream with the given name and backends and every other setting
    /// at its default.
    pub fn new(name: impl Into<String>, backends: Vec<Backend>) -> Self {
        Upstream {
            name: name.into(),
            policy: Policy::default(),
            hash_key: HashKey::default(),
            backends,
            pool: Pool::default(),
            timeouts: Timeouts::default(),
            health_check: HealthCheck::default(),
            outlier: Outlier::default(),
            retries: Retries::default(),
            circuit: Circuit::default(),
            on_all_unhealthy: OnAllUnhealthy::default(),
        }
    }
}

/// Load-balancing policy of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin by `weight`.
    Weighted,
    /// Hash of the client IP.
    IpHash,
    /// Consistent hashing of `hash_key`.
    ConsistentHash,
    /// Lowest exponentially weighted moving-average latency.
    Ewma,
    /// Fewest requests in flight.
    LeastRequest,
}

/// What `consistent_hash` hashes.
///
/// Written as `client_ip`, `path`, `header:<name>` or `cookie:<name>`, hence
/// the hand-written serde. Header names are lowercased (HTTP/3 field names
/// are lowercase on the wire); both names must be HTTP tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// A request header, by lowercase name.
    Header(String),
    /// A cookie, by (case-sensitive) name.
    Cookie(String),
    /// The request path.
    Path,
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Path => f.write_str("path"),
        }
    }
}

impl FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "client_ip" => return Ok(HashKey::ClientIp),
            "path" => return Ok(HashKey::Path),
            _ => {}
        }
        if let Some(name) = s.strip_prefix("header:") {
            check_token(name, "header")?;
            return Ok(HashKey::Header(name.to_ascii_lowercase()));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            check_token(name, "cookie")?;
            return Ok(HashKey::Cookie(name.to_string()));
        }
        Err(format!(
            "unknown hash_key `{s}`, expected `client_ip`, `header:<name>`, `cookie:<name>` or `path`"
        ))
    }
}

/// Checks that `name` is an HTTP token (RFC 9110 §5.6.2), the syntax of
/// header and cookie names.
fn check_token(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    match name.chars().find(|&c| !is_tchar(c)) {
        Some(bad) => Err(format!(
            "{what} name `{name}` is not a valid token (character {bad:?})"
        )),
        None => Ok(()),
    }
}

impl Serialize for HashKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HashKeyVisitor;

        impl Visitor<'_> for HashKeyVisitor {
            type Value = HashKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`client_ip`, `header:<name>`, `cookie:<name>` or `path`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HashKey, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(HashKeyVisitor)
    }
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `ip:port`, `[v6]:port`, or `hostname:port` resolved once at load.
    #[serde(deserialize_with = "deserialize_backend_address")]
    pub address: SocketAddr,
    /// Relative share for `weighted` (> 0).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl Backend {
    /// A backend at `address` with the default weight of 1.
    pub fn new(address: SocketAddr) -> Self {
        Backend {
            address,
            weight: default_weight(),
        }
    }
}

fn default_weight() -> u32 {
    1
}

/// Accepts a socket address literal or a `hostname:port` pair, resolving the
/// latter once (first result) so that backends can be named in the file
/// while the balancer keeps plain addresses.
fn deserialize_backend_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    struct BackendAddressVisitor;

    impl Visitor<'_> for BackendAddressVisitor {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("ip:port, [v6]:port or host:port")
        }

        // Failing inside the visitor (not after it) lets serde_yaml_ng
        // locate the error at the value itself.
        fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddr, E> {
            if let Ok(address) = text.parse::<SocketAddr>() {
                return Ok(address);
            }
            let mut resolved = text.to_socket_addrs().map_err(|e| {
                E::custom(format!(
                    "invalid backend address `{text}` (expected ip:port, [v6]:port or host:port): {e}"
                ))
            })?;
            resolved
                .next()
                .ok_or_else(|| E::custom(format!("backend address `{text}` resolved to nothing")))
        }
    }

    deserializer.deserialize_str(BackendAddressVisitor)
}

/// Connection pooling towards each backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pool {
    /// HTTP/2 connections kept per backend.
    pub connections_per_backend: usize,
    /// Streams multiplexed on one backend connection.
    pub max_concurrent_streams: u32,
    /// Connections the pool may grow to per backend when every connection is
    /// at its stream limit (`connections_per_backend` is the warm minimum).
    pub max_connections_per_backend: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            connections_per_backend: 2,
            max_concurrent_streams: 100,
            max_connections_per_backend: 16,
        }
    }
}

/// Timeouts towards the backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing a backend connection.
    pub connect_ms: u64,
    /// A whole request, first byte sent to last byte received.
    pub request_ms: u64,
    /// An unused pooled backend connection.
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 1_000,
            request_ms: 30_000,
            idle_ms: 60_000,
        }
    }
}

/// Active health checking of each backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    /// Path requested (starts with `/`).
    pub path: String,
    /// Time between probes.
    pub interval_ms: u64,
    /// Probe timeout (≤ interval).
    pub timeout_ms: u64,
    /// Consecutive successes to mark a backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to mark a backend unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/health".to_string(),
            interval_ms: 1_000,
            timeout_ms: 500,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive outlier ejection from observed failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive failures that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection duration (grows with repeated ejections).
    pub base_ejection_ms: u64,
    /// Upper bound on the share of backends ejected at once (0..=100).
    pub max_ejection_percent: u8,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_percent: 50,
        }
    }
}

/// Retry policy for failed requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Retries allowed as a share of requests (0..=100), against storms.
    pub budget_percent: u8,
    /// Conditions that trigger a retry.
    pub on: Vec<RetryOn>,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            budget_percent: 20,
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::Status(503),
            ],
        }
    }
}

/// A condition under which a request is retried.
///
/// Written as `connect_failure`, `refused_stream`, `reset` or a 5xx status
/// integer, hence the hand-written serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The backend connection could not be established.
    ConnectFailure,
    /// The backend refused the stream before processing it.
    RefusedStream,
    /// The backend reset the stream.
    Reset,
    /// The backend answered with this status (validated to 500..=599).
    Status(u16),
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::ConnectFailure => serializer.serialize_str("connect_failure"),
            RetryOn::RefusedStream => serializer.serialize_str("refused_stream"),
            RetryOn::Reset => serializer.serialize_str("reset"),
            RetryOn::Status(status) => serializer.serialize_u16(*status),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RetryOnVisitor;

        impl Visitor<'_> for RetryOnVisitor {
            type Value = RetryOn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`connect_failure`, `refused_stream`, `reset` or a 5xx status code")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                u16::try_from(v)
                    .map(RetryOn::Status)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RetryOn, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryOn, E> {
                match v {
                    "connect_failure" => Ok(RetryOn::ConnectFailure),
                    "refused_stream" => Ok(RetryOn::RefusedStream),
                    "reset" => Ok(RetryOn::Reset),
                    _ => v
                        .parse::<u64>()
                        .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
                        .and_then(|v| self.visit_u64(v)),
                }
            }
        }

        deserializer.deserialize_any(RetryOnVisitor)
    }
}

/// Circuit-breaking limits that shed load instead of queueing unboundedly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Circuit {
    /// Requests in flight to one backend.
    pub max_in_flight_per_backend: u32,
    /// Requests waiting for a backend slot.
    pub max_pending: u32,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            max_in_flight_per_backend: 1_000,
            max_pending: 1_000,
        }
    }
}

/// Behaviour when no backend of an upstream is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAllUnhealthy {
    /// Answer 503 without trying a backend.
    #[default]
    Fail,
    /// Ignore health and balance over every backend (panic mode).
    UseAll,
}

/// A routing rule; the first matching rule picks the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Exact host (lowercased at load, no port); `None` matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix matched against the request path.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Name of the upstream serving matching requests.
    pub upstream: String,
}

fn default_path_prefix() -> String {
    "/".to_string()
}

/// Resource limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent client connections per process, enforced as an equal
    /// share per worker (`max_connections / workers`, at least 1).
    pub max_connections: usize,
    /// Total size of one request's header section (≥ 1024).
    pub max_request_header_bytes: usize,
    /// Request body bytes buffered for retries before streaming.
    pub max_body_buffer_bytes: usize,
    /// What each stream may buffer per direction from the start; it grows
    /// (doubling, up to `max_body_buffer_bytes`) only when it holds the
    /// stream back.
    pub initial_body_buffer_bytes: usize,
    /// Growth above the initial grants, summed over one connection's streams.
    pub max_connection_buffer_bytes: usize,
    /// Growth above the initial grants, summed over one worker's streams.
    pub max_worker_buffer_bytes: usize,
    /// Streams one connection may abandon (reset by the client, or ended
    /// with the request unread) before it is closed with H3_EXCESSIVE_LOAD.
    pub max_abandoned_streams_per_connection: u32,
    /// Abandoned streams one client IP may accumulate per worker per 10 s
    /// window over all its connections; past it, its connections are closed
    /// and its new ones refused until the window ends.
    pub max_abandoned_streams_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_request_header_bytes: 65_536,
            max_body_buffer_bytes: 1_048_576,
            initial_body_buffer_bytes: 16_384,
            max_connection_buffer_bytes: 4_194_304,
            max_worker_buffer_bytes: 67_108_864,
            max_abandoned_streams_per_connection: 10_000,
            max_abandoned_streams_per_source: 20_000,
        }
    }
}

/// The admin HTTP endpoint (metrics, health, config dump).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// TCP address; a token is required unless it is a loopback address.
    pub address: SocketAddr,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token_file: None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    /// `tracing` EnvFilter directive, e.g. `info` or `info,spooky=debug`.
    pub log: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Emit one access-log line per request.
    pub access_log: bool,
    /// Where access-log lines go: a file (appended to, reopened on
    /// SIGUSR1 for logrotate), or stderr when absent. Relative paths are
    /// resolved against the config file's directory.
    pub access_log_path: Option<PathBuf>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            log: "info".to_string(),
            log_format: LogFormat::default(),
            access_log: true,
            access_log_path: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}
