//! Tests of loading, validation and error locations. `unwrap` keeps
//! fixtures short; a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

/// The documented example, every value spelled out.
const FULL_EXAMPLE: &str = r#"listen:
  address: "0.0.0.0:8443"
  tls: { cert: certs/cert.pem, key: certs/key.pem }
  alpn: ["h3"]
quic:
  idle_timeout_ms: 30000
  max_streams_bidi: 256
  initial_max_data: 16777216
  initial_max_stream_data: 1048576
  retry: auto
  cc: cubic
  server_id: 1
io:
  backend: auto
  workers: auto
  batch: 64
  gso: true
  gro: true
  upstream_io: auto
upstreams:
  - name: app
    policy: round_robin
    hash_key: client_ip
    backends:
      - { address: "127.0.0.1:9001", weight: 1 }
    pool: { connections_per_backend: 2, max_concurrent_streams: 100 }
    timeouts: { connect_ms: 1000, request_ms: 30000, idle_ms: 60000 }
    health_check: { path: /health, interval_ms: 1000, timeout_ms: 500, healthy_threshold: 2, unhealthy_threshold: 3 }
    outlier: { consecutive_failures: 5, base_ejection_ms: 10000, max_ejection_percent: 50 }
    retries: { attempts: 2, budget_percent: 20, on: [connect_failure, refused_stream, reset, 503] }
    circuit: { max_in_flight_per_backend: 1000, max_pending: 1000 }
    on_all_unhealthy: fail
routes:
  - { host: "api.example.com", path_prefix: "/", upstream: app }
limits: { max_connections: 100000, max_request_header_bytes: 65536, max_body_buffer_bytes: 1048576 }
admin: { address: "127.0.0.1:9901", token_file: null }
watch: false
telemetry: { log: info, log_format: json, access_log: true }
"#;

const MINIMAL: &str = r#"upstreams: [{name: a, backends: [{address: "127.0.0.1:1"}]}]"#;

/// A config directory holding `certs/cert.pem` and `certs/key.pem`, so that
/// the default TLS paths validate.
struct Fixture {
    dir: TempDir,
    file: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("certs")).unwrap();
        fs::write(dir.path().join("certs/cert.pem"), "cert").unwrap();
        fs::write(dir.path().join("certs/key.pem"), "key").unwrap();
        let file = dir.path().join("spooky.yaml");
        Fixture { dir, file }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn parse(&self, yaml: &str) -> Result<Config, ConfigErrors> {
        parse_str(yaml, &self.file)
    }

    fn ok(&self, yaml: &str) -> Config {
        match self.parse(yaml) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors:\n{errors}"),
        }
    }

    fn errors(&self, yaml: &str) -> Vec<ConfigError> {
        match self.parse(yaml) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(errors) => errors.0,
        }
    }

    /// The only error `yaml` produces.
    fn error(&self, yaml: &str) -> ConfigError {
        let errors = self.errors(yaml);
        assert_eq!(errors.len(), 1, "expected one error: {errors:#?}");
        errors.into_iter().next().unwrap()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Asserts the error's line, column and key.
fn assert_at(error: &ConfigError, line: usize, col: usize, key: &str) {
    assert_eq!(
        (error.line, error.col, error.key.as_str()),
        (line, col, key),
        "{error}"
    );
}

#[test]
fn full_example_parses_with_every_value() {
    let fx = Fixture::new();
    let config = fx.ok(FULL_EXAMPLE);
    let expected = Config {
        listen: Listen {
            address: addr("0.0.0.0:8443"),
            tls: Tls {
                cert: fx.path("certs/cert.pem"),
                key: fx.path("certs/key.pem"),
            },
            alpn: vec!["h3".to_string()],
        },
        quic: Quic {
            idle_timeout_ms: 30_000,
            max_streams_bidi: 256,
            initial_max_data: 16_777_216,
            initial_max_stream_data: 1_048_576,
            retry: RetryMode::Auto,
            cc: CongestionControl::Cubic,
            server_id: 1,
            pacing: true,
            max_pacing_rate_mbps: 0,
            retry_threshold: 100,
            handshake_timeout_ms: 5_000,
            new_connections_per_source: 0,
        },
        io: Io {
            backend: IoBackend::Auto,
            workers: Workers::Auto,
            batch: 64,
            gso: true,
            gro: true,
            upstream_io: UpstreamIo::Auto,
            zerocopy_send: false,
            on_worker_failure: crate::config::OnWorkerFailure::Exit,
        },
        upstreams: vec![Upstream {
            name: "app".to_string(),
            policy: Policy::RoundRobin,
            hash_key: HashKey::ClientIp,
            backends: vec![Backend {
                address: addr("127.0.0.1:9001"),
                weight: 1,
            }],
            pool: Pool {
                connections_per_backend: 2,
                max_concurrent_streams: 100,
                max_connections_per_backend: 16,
            },
            timeouts: Timeouts {
                connect_ms: 1_000,
                request_ms: 30_000,
                idle_ms: 60_000,
            },
            health_check: HealthCheck {
                path: "/health".to_string(),
                interval_ms: 1_000,
                timeout_ms: 500,
                healthy_threshold: 2,
                unhealthy_threshold: 3,
            },
            outlier: Outlier {
                consecutive_failures: 5,
                base_ejection_ms: 10_000,
                max_ejection_percent: 50,
            },
            retries: Retries {
                attempts: 2,
                budget_percent: 20,
                on: vec![
                    RetryOn::ConnectFailure,
                    RetryOn::RefusedStream,
                    RetryOn::Reset,
                    RetryOn::Status(503),
                ],
            },
            circuit: Circuit {
                max_in_flight_per_backend: 1_000,
                max_pending: 1_000,
            },
            on_all_unhealthy: OnAllUnhealthy::Fail,
        }],
        routes: vec![Route {
            host: Some("api.example.com".to_string()),
            path_prefix: "/".to_string(),
            upstream: "app".to_string(),
        }],
        limits: Limits {
            max_connections: 100_000,
            max_request_header_bytes: 65_536,
            max_body_buffer_bytes: 1_048_576,
            ..Limits::default()
        },
        admin: Admin {
            address: addr("127.0.0.1:9901"),
            token_file: None,
        },
        watch: false,
        telemetry: Telemetry {
            log: "info".to_string(),
            log_format: LogFormat::Json,
            access_log: true,
            access_log_path: None,
        },
    };
    assert_eq!(config, expected);
}

#[test]
fn minimal_config_gets_all_defaults() {
    let fx = Fixture::new();
    let config = fx.ok(MINIMAL);
    let mut expected = Config::minimal(vec![Upstream::new(
        "a",
        vec![Backend::new(addr("127.0.0.1:1"))],
    )]);
    expected.listen.tls.cert = fx.path("certs/cert.pem");
    expected.listen.tls.key = fx.path("certs/key.pem");
    assert_eq!(config, expected);

    // The documented example only restates the defaults.
    let mut example = fx.ok(FULL_EXAMPLE);
    example.routes.clear();
    example.upstreams[0].name = "a".to_string();
    example.upstreams[0].backends[0].address = addr("127.0.0.1:1");
    assert_eq!(example, expected);
}

#[test]
fn non_default_values_parse_and_normalise() {
    let fx = Fixture::new();
    let config = fx.ok(r#"
listen:
  address: "[::]:443"
  alpn: [h3, h3-29]
quic: { cc: bbr2, server_id: 65535, retry: true }
io: { backend: uring, workers: 4, batch: 1024, upstream_io: tokio }
upstreams:
  - name: api.v2_x-1
    policy: consistent_hash
    hash_key: "header:X-User"
    backends:
      - address: "[::1]:9000"
        weight: 3
      - address: "localhost:9001"
    retries: { on: [reset, 502, "599"] }
    on_all_unhealthy: use_all
  - name: b
    policy: consistent_hash
    hash_key: "cookie:SID"
    backends: [{ address: "10.0.0.1:80" }]
routes:
  - { host: "API.Example.COM", upstream: b }
  - { path_prefix: /api, upstream: api.v2_x-1 }
telemetry: { log: "info,spooky=debug", log_format: text }
"#);
    assert_eq!(config.listen.address, addr("[::]:443"));
    assert_eq!(config.quic.cc, CongestionControl::Bbr2);
    assert_eq!(config.quic.server_id, 65535);
    assert_eq!(config.io.backend, IoBackend::Uring);
    assert_eq!(config.io.workers, Workers::Count(4));
    assert_eq!(config.io.upstream_io, UpstreamIo::Tokio);
    let api = &config.upstreams[0];
    assert_eq!(api.hash_key, HashKey::Header("x-user".to_string()));
    assert_eq!(api.backends[0].address, addr("[::1]:9000"));
    assert_eq!(api.backends[0].weight, 3);
    assert!(api.backends[1].address.ip().is_loopback());
    assert_eq!(api.backends[1].address.port(), 9001);
    assert_eq!(api.backends[1].weight, 1);
    assert_eq!(
        api.retries.on,
        vec![RetryOn::Reset, RetryOn::Status(502), RetryOn::Status(599)]
    );
    assert_eq!(api.on_all_unhealthy, OnAllUnhealthy::UseAll);
    assert_eq!(
        config.upstreams[1].hash_key,
        HashKey::Cookie("SID".to_string())
    );
    assert_eq!(config.routes[0].host.as_deref(), Some("api.example.com"));
    assert_eq!(config.routes[1].host, None);
    assert_eq!(config.routes[1].path_prefix, "/api");
    assert_eq!(config.telemetry.log_format, LogFormat::Text);
}

#[test]
fn to_yaml_round_trips() {
    let fx = Fixture::new();
    for yaml in [
        FULL_EXAMPLE,
        MINIMAL,
        r#"
io: { workers: 8 }
upstreams:
  - name: a
    policy: consistent_hash
    hash_key: "header:x-user"
    backends: [{ address: "[::1]:1", weight: 7 }]
    retries: { on: [connect_failure, 500] }
  - name: b
    policy: consistent_hash
    hash_key: path
    backends: [{ address: "127.0.0.1:2" }]
admin: { address: "0.0.0.0:9901", token_file: certs/key.pem }
watch: true
"#,
    ] {
        let config = fx.ok(yaml);
        let printed = config.to_yaml();
        assert_eq!(fx.ok(&printed), config, "printed:\n{printed}");
    }
    let printed = fx
        .ok("io: {workers: 8}\nupstreams: [{name: a, policy: consistent_hash, hash_key: \"cookie:s\", backends: [{address: \"127.0.0.1:1\"}]}]")
        .to_yaml();
    assert!(printed.contains("workers: 8\n"), "{printed}");
    assert!(printed.contains("hash_key: cookie:s\n"), "{printed}");
    assert!(printed.contains("- 503\n"), "{printed}");
    assert!(fx.ok(MINIMAL).to_yaml().contains("workers: auto\n"));
}

#[test]
fn relative_paths_resolve_against_config_dir() {
    let fx = Fixture::new();
    fs::create_dir(fx.path("tls")).unwrap();
    fs::write(fx.path("tls/c.pem"), "c").unwrap();
    fs::write(fx.path("token"), "t").unwrap();
    let absolute_key = fx.path("certs/key.pem");
    let yaml = format!(
        "listen: {{tls: {{cert: ./tls/c.pem, key: {}}}}}\nadmin: {{token_file: token}}\n{MINIMAL}",
        absolute_key.display()
    );
    let config = fx.ok(&yaml);
    assert_eq!(config.listen.tls.cert, fx.path("tls/c.pem"));
    assert_eq!(config.listen.tls.key, absolute_key);
    assert_eq!(config.admin.token_file, Some(fx.path("token")));
}

#[test]
fn load_reads_file_and_reports_missing_file() {
    let fx = Fixture::new();
    fs::write(&fx.file, MINIMAL).unwrap();
    assert_eq!(load(&fx.file).unwrap().upstreams[0].name, "a");

    let missing = fx.path("nope.yaml");
    let errors = load(&missing).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_at(&errors.0[0], 0, 0, "-");
    assert!(errors.to_string().starts_with(&format!(
        "{}:0:0: -: cannot read config file: ",
        missing.display()
    )));
}

#[test]
fn display_is_file_line_col_key_problem() {
    let error = ConfigError {
        file: PathBuf::from("conf/spooky.yaml"),
        line: 3,
        col: 7,
        key: "upstreams[0].backends[1].weight".to_string(),
        problem: "must be greater than 0".to_string(),
    };
    assert_eq!(
        error.to_string(),
        "conf/spooky.yaml:3:7: upstreams[0].backends[1].weight: must be greater than 0"
    );
    let errors = ConfigErrors(vec![error.clone(), error]);
    assert_eq!(errors.to_string().lines().count(), 2);
}

#[test]
fn unknown_key_at_top_level() {
    let fx = Fixture::new();
    let e = fx.error(&format!("{MINIMAL}\nlisten_address: x\n"));
    assert_at(&e, 2, 1, "listen_address");
    assert!(e.problem.starts_with("unknown key `listen_address`"), "{e}");
    assert!(
        e.problem.contains("`listen`") && e.problem.contains("`telemetry`"),
        "{e}"
    );
}

#[test]
fn unknown_key_nested() {
    let fx = Fixture::new();
    let e = fx.error(
        "upstreams:\n  - name: a\n    backends:\n      - address: \"127.0.0.1:1\"\n        wieght: 2\n",
    );
    assert_at(&e, 5, 9, "upstreams[0].backends[0].wieght");
    assert_eq!(
        e.problem,
        "unknown key `wieght`, allowed keys: `address`, `weight`"
    );
    assert_eq!(e.file, fx.file, "errors name the file they were found in");
}

#[test]
fn bad_type() {
    let fx = Fixture::new();
    let e = fx.error(&format!("{MINIMAL}\nquic:\n  idle_timeout_ms: soon\n"));
    assert_at(&e, 3, 20, "quic.idle_timeout_ms");
    assert!(e.problem.contains("invalid type"), "{e}");
}

#[test]
fn bad_address() {
    let fx = Fixture::new();
    let e = fx.error(&format!("{MINIMAL}\nlisten:\n  address: \"0.0.0.0\"\n"));
    assert_at(&e, 3, 12, "listen.address");

    let e = fx.error("upstreams:\n  - name: a\n    backends:\n      - address: nowhere\n");
    assert_at(&e, 4, 18, "upstreams[0].backends[0].address");
    assert!(
        e.problem.contains("invalid backend address `nowhere`"),
        "{e}"
    );
}

#[test]
fn weight_zero() {
    let fx = Fixture::new();
    let e = fx.error(
        "upstreams:\n  - name: a\n    backends:\n      - address: \"127.0.0.1:1\"\n      - address: \"127.0.0.1:2\"\n        weight: 0\n",
    );
    assert_at(&e, 6, 9, "upstreams[0].backends[1].weight");
    assert_eq!(e.problem, "must be greater than 0");
}

#[test]
fn unknown_upstream_io() {
    let fx = Fixture::new();
    let e = fx.error(
        "io:\n  upstream_io: uring\nupstreams:\n  - name: a\n    backends: [{address: \"127.0.0.1:1\"}]\n",
    );
    assert_at(&e, 2, 16, "io.upstream_io");
    assert!(e.problem.contains("unknown variant `uring`"), "{e}");
    assert!(e.problem.contains("`ring`"), "{e}");
}

#[test]
fn ring_upstream_io_on_epoll_is_a_warning_not_an_error() {
    let fx = Fixture::new();
    let ups = "upstreams: [{name: a, backends: [{address: \"127.0.0.1:1\"}]}]\n";
    let config = fx.ok(&format!(
        "io: {{ backend: epoll, upstream_io: ring }}\n{ups}"
    ));
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].starts_with("io.upstream_io: "), "{warnings:#?}");
    assert!(warnings[0].contains("tokio"), "{warnings:#?}");
    for io in [
        "{ backend: uring, upstream_io: ring }",
        "{ backend: auto, upstream_io: ring }",
        "{ backend: epoll, upstream_io: auto }",
        "{ backend: epoll, upstream_io: tokio }",
    ] {
        let config = fx.ok(&format!("io: {io}\n{ups}"));
        assert!(config.warnings().is_empty(), "{io}");
    }
}

#[test]
fn unknown_policy() {
    let fx = Fixture::new();
    let e = fx.error(
        "upstreams:\n  - name: a\n    policy: random\n    backends: [{address: \"127.0.0.1:1\"}]\n",
    );
    assert_at(&e, 3, 13, "upstreams[0].policy");
    assert!(e.problem.contains("unknown variant `random`"), "{e}");
    assert!(e.problem.contains("`least_request`"), "{e}");
}

#[test]
fn empty_backends() {
    let fx = Fixture::new();
    let e = fx.error("upstreams:\n  - name: a\n    backends: []\n");
    assert_at(&e, 3, 5, "upstreams[0].backends");
}

#[test]
fn missing_required_key() {
    let fx = Fixture::new();
    let e = fx.error("upstreams:\n  - name: a\n    policy: weighted\n");
    assert_at(&e, 2, 5, "upstreams[0].backends");
    assert_eq!(e.problem, "required key is missing");

    let e = fx.error("watch: true\n");
    assert_at(&e, 1, 1, "upstreams");
}

#[test]
fn duplicate_upstream_names_reported_at_duplicate() {
    let fx = Fixture::new();
    let e = fx.error(
        "upstreams:\n  - name: a\n    backends: [{address: \"127.0.0.1:1\"}]\n  - name: b\n    backends: [{address: \"127.0.0.1:1\"}]\n  - name: a\n    backends: [{address: \"127.0.0.1:2\"}]\n",
    );
    assert_at(&e, 6, 5, "upstreams[2].name");
    assert!(e.problem.contains("duplicate upstream name `a`"), "{e}");
}

#[test]
fn route_to_missing_upstream() {
    let fx = Fixture::new();
    let e = fx.error(&format!(
        "{MINIMAL}\nroutes:\n  - host: example.com\n    upstream: a\n  - path_prefix: /x\n    upstream: nope\n"
    ));
    assert_at(&e, 6, 5, "routes[1].upstream");
    assert_eq!(e.problem, "unknown upstream `nope`");
}

#[test]
fn missing_cert_file() {
    let fx = Fixture::new();
    let e = fx.error(&format!(
        "{MINIMAL}\nlisten:\n  tls:\n    cert: missing.pem\n"
    ));
    assert_at(&e, 4, 5, "listen.tls.cert");
    assert!(
        e.problem
            .contains(&fx.path("missing.pem").display().to_string()),
        "{e}"
    );

    // Defaulted paths fall back to the nearest key present in the file.
    let fx_without_certs = Fixture::new();
    fs::remove_file(fx_without_certs.path("certs/key.pem")).unwrap();
    let e = fx_without_certs.error(&format!("{MINIMAL}\nlisten:\n  alpn: [h3]\n"));
    assert_at(&e, 2, 1, "listen.tls.key");
    let e = fx_without_certs.error(MINIMAL);
    assert_at(&e, 1, 1, "listen.tls.key");
}

#[test]
fn syntax_error() {
    let fx = Fixture::new();
    let e = fx
        .error("upstreams:\n  - name: a\n    backends: [{address: \"127.0.0.1:1\"}\nwatch: true\n");
    assert_at(&e, 4, 1, "upstreams[0].backends");
    assert!(e.problem.contains("did not find expected"), "{e}");
    assert!(
        !e.problem.contains("line "),
        "position is not repeated: {e}"
    );

    let e = fx.error("@oops\n");
    assert_at(&e, 1, 1, "-");
}

#[test]
fn all_semantic_errors_are_collected_in_file_order() {
    let fx = Fixture::new();
    let errors = fx.errors(
        r#"listen:
  address: "0.0.0.0:0"
  alpn: []
quic:
  idle_timeout_ms: 0
  initial_max_data: 10
  initial_max_stream_data: 20
  server_id: 0
io: { batch: 0, workers: 2000 }
upstreams:
  - name: "bad name"
    policy: ip_hash
    hash_key: path
    backends:
      - address: "127.0.0.1:1"
      - address: "127.0.0.1:1"
    pool: { connections_per_backend: 0 }
    timeouts: { idle_ms: 0 }
    health_check: { path: health, interval_ms: 100, timeout_ms: 200, healthy_threshold: 0 }
    outlier: { consecutive_failures: 0, max_ejection_percent: 101 }
    retries: { budget_percent: 101, on: [reset, 404] }
    circuit: { max_pending: 0 }
routes:
  - { host: "a.com:443", path_prefix: api, upstream: "bad name" }
  - { host: "a b", upstream: "bad name" }
limits: { max_request_header_bytes: 512, max_connections: 0 }
admin: { address: "0.0.0.0:9901" }
telemetry: { log: loud }
"#,
    );
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (2, "listen.address"),
            (3, "listen.alpn"),
            (5, "quic.idle_timeout_ms"),
            (7, "quic.initial_max_stream_data"),
            (8, "quic.server_id"),
            (9, "io.batch"),
            (9, "io.workers"),
            (11, "upstreams[0].name"),
            (13, "upstreams[0].hash_key"),
            (16, "upstreams[0].backends[1].address"),
            (17, "upstreams[0].pool.connections_per_backend"),
            (18, "upstreams[0].timeouts.idle_ms"),
            (19, "upstreams[0].health_check.path"),
            (19, "upstreams[0].health_check.timeout_ms"),
            (19, "upstreams[0].health_check.healthy_threshold"),
            (20, "upstreams[0].outlier.consecutive_failures"),
            (20, "upstreams[0].outlier.max_ejection_percent"),
            (21, "upstreams[0].retries.budget_percent"),
            (21, "upstreams[0].retries.on[1]"),
            (22, "upstreams[0].circuit.max_pending"),
            (24, "routes[0].host"),
            (24, "routes[0].path_prefix"),
            (25, "routes[1].host"),
            (26, "limits.max_request_header_bytes"),
            (26, "limits.max_connections"),
            (27, "admin.address"),
            (28, "telemetry.log"),
        ],
        "{}",
        ConfigErrors(errors.clone())
    );
    let hash_key = errors.iter().find(|e| e.key.ends_with("hash_key")).unwrap();
    assert_eq!(hash_key.problem, "hash_key only applies to consistent_hash");
    let admin = errors.iter().find(|e| e.key == "admin.address").unwrap();
    assert_eq!(
        admin.problem,
        "token_file required when admin is not on loopback"
    );
}

#[test]
fn admin_off_loopback_accepts_token_file() {
    let fx = Fixture::new();
    fs::write(fx.path("token"), "secret").unwrap();
    let config = fx.ok(&format!(
        "{MINIMAL}\nadmin: {{address: \"0.0.0.0:9901\", token_file: token}}\n"
    ));
    assert_eq!(config.admin.token_file, Some(fx.path("token")));
    let e = fx.error(&format!(
        "{MINIMAL}\nadmin: {{address: \"0.0.0.0:9901\", token_file: missing}}\n"
    ));
    assert_at(&e, 2, 34, "admin.token_file");
}

#[test]
fn access_log_path_is_resolved_and_its_directory_must_exist() {
    let fx = Fixture::new();
    let config = fx.ok(&format!(
        "{MINIMAL}\ntelemetry: {{access_log_path: access.log}}\n"
    ));
    assert_eq!(
        config.telemetry.access_log_path,
        Some(fx.path("access.log"))
    );
    let e = fx.error(&format!(
        "{MINIMAL}\ntelemetry: {{access_log_path: no/such/dir/access.log}}\n"
    ));
    assert_at(&e, 2, 13, "telemetry.access_log_path");
    assert!(e.problem.contains("does not exist"), "{e}");
    fs::create_dir(fx.path("logs")).unwrap();
    let e = fx.error(&format!(
        "{MINIMAL}\ntelemetry: {{access_log_path: logs}}\n"
    ));
    assert!(e.problem.contains("is a directory"), "{e}");
}

#[test]
fn scalar_forms_of_custom_types() {
    let fx = Fixture::new();
    let with_io = |io: &str| fx.parse(&format!("io: {{workers: {io}}}\n{MINIMAL}"));
    assert_eq!(with_io("auto").unwrap().io.workers, Workers::Auto);
    assert_eq!(with_io("1").unwrap().io.workers, Workers::Count(1));
    assert_eq!(with_io("0").unwrap_err().0[0].key, "io.workers");
    assert_eq!(with_io("many").unwrap_err().0[0].key, "io.workers");

    for (text, expected) in [
        ("client_ip", HashKey::ClientIp),
        ("path", HashKey::Path),
        (
            "\"header:X-Forwarded-For\"",
            HashKey::Header("x-forwarded-for".to_string()),
        ),
        ("\"cookie:Session\"", HashKey::Cookie("Session".to_string())),
    ] {
        let config = fx.ok(&format!(
            "upstreams: [{{name: a, policy: consistent_hash, hash_key: {text}, backends: [{{address: \"127.0.0.1:1\"}}]}}]"
        ));
        assert_eq!(config.upstreams[0].hash_key, expected);
    }
    for bad in ["\"header:\"", "\"cookie:a;b\"", "ip", "\"header:a:b\""] {
        let e = fx.error(&format!(
            "upstreams: [{{name: a, policy: consistent_hash, hash_key: {bad}, backends: [{{address: \"127.0.0.1:1\"}}]}}]"
        ));
        assert_eq!(e.key, "upstreams[0].hash_key", "{e}");
    }

    let e = fx.error(
        "upstreams: [{name: a, retries: {on: [reset, timeout]}, backends: [{address: \"127.0.0.1:1\"}]}]",
    );
    assert_eq!(e.key, "upstreams[0].retries.on[1]", "{e}");
}

#[test]
fn not_yet_active_lists_inactive_settings() {
    let fx = Fixture::new();
    let lines = fx.ok(MINIMAL).not_yet_active();
    let keys: Vec<&str> = lines
        .iter()
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    assert!(!keys.contains(&"io.backend"), "{lines:#?}");
    assert!(!keys.contains(&"io.workers"), "{lines:#?}");
    assert!(!keys.contains(&"watch"), "{lines:#?}");
    assert!(!keys.contains(&"admin.token_file"), "{lines:#?}");
    assert!(!keys.contains(&"upstreams[].policy"), "{lines:#?}");
    assert!(!keys.contains(&"upstreams[].health_check"), "{lines:#?}");
    assert!(!keys.contains(&"quic.server_id"), "{lines:#?}");
    assert!(
        !keys.contains(&"upstreams[].timeouts.idle_ms"),
        "{lines:#?}"
    );

    fs::write(fx.path("token"), "t").unwrap();
    let config = fx.ok(
        "io: {backend: uring, workers: 4}\nwatch: true\nadmin: {token_file: token}\nupstreams:\n  - {name: a, policy: ewma, backends: [{address: \"127.0.0.1:1\"}]}\n  - {name: b, backends: [{address: \"127.0.0.1:1\"}]}\n",
    );
    let lines = config.not_yet_active();
    let text = lines.join("\n");
    assert!(!text.contains("io.backend"), "{text}");
    assert!(!text.contains("io.workers"), "{text}");
    assert!(!text.contains("upstreams[].policy"), "{text}");
    assert!(!text.contains("upstreams[].health_check"), "{text}");
    assert!(!text.contains("watch: "), "{text}");
    assert!(!text.contains("admin.token_file: "), "{text}");
}

#[test]
fn key_locations_cover_block_and_flow_styles() {
    let locations = locate::KeyLocations::scan(
        "# comment\na:\n  b: 1\n  c: [x, {d: 2}]\nl:\n  - m: 1\n    n: 2\n  - {m: 3}\n  - []\n",
    );
    let get = |p: &str| locations.get(p);
    assert_eq!(get(""), Some((2, 1)));
    assert_eq!(get("a"), Some((2, 1)));
    assert_eq!(get("a.b"), Some((3, 3)));
    assert_eq!(get("a.c[0]"), Some((4, 7)));
    assert_eq!(get("a.c[1].d"), Some((4, 11)));
    assert_eq!(get("l[0]"), Some((6, 5)));
    assert_eq!(get("l[0].n"), Some((7, 5)));
    assert_eq!(get("l[1].m"), Some((8, 6)));
    assert_eq!(get("l[2]"), Some((9, 5)));
    assert_eq!(locations.locate("l[0].x.y"), (6, 5));
    assert_eq!(locations.locate("zzz"), (2, 1));
    assert_eq!(locate::parent_path("a.b[3]"), "a.b");
    assert_eq!(locate::parent_path("a.b"), "a");
    assert_eq!(locate::parent_path("a"), "");
}

#[test]
fn errors_name_the_given_file() {
    let e = parse_str("watch: 1\n", Path::new("rel/spooky.yaml")).unwrap_err();
    assert!(
        e.to_string().starts_with("rel/spooky.yaml:1:8: watch: "),
        "{e}"
    );
}

#[test]
fn retry_is_auto_true_or_false() {
    let fx = Fixture::new();
    let up = "upstreams: [{ name: a, backends: [{ address: \"127.0.0.1:1\" }] }]\n";
    assert_eq!(fx.ok(up).quic.retry, RetryMode::Auto, "the default");
    for (text, mode) in [
        ("auto", RetryMode::Auto),
        ("true", RetryMode::Always),
        ("false", RetryMode::Never),
    ] {
        let c = fx.ok(&format!("quic: {{ retry: {text} }}\n{up}"));
        assert_eq!(c.quic.retry, mode, "{text}");
    }
    assert!(!fx
        .errors(&format!("quic: {{ retry: sometimes }}\n{up}"))
        .is_empty());
    let keys: Vec<String> = fx
        .errors(&format!(
            "quic: {{ retry_threshold: 0, handshake_timeout_ms: 0 }}\n{up}"
        ))
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["quic.retry_threshold", "quic.handshake_timeout_ms"]);
}
