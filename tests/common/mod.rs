//! Shared helpers for the end-to-end tests: real processes (spooky, demo
//! backends), real sockets, real files. Everything is torn down on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod h3client;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use h3client::H3Client;

pub const SPOOKY: &str = env!("CARGO_BIN_EXE_spooky");

/// A free TCP port on loopback (bound then released).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a self-signed localhost certificate pair into `dir`.
pub fn write_certs(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// A `spooky demo-backend` process.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    child: Child,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], free_tcp_port())))
    }

    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        Self::start_full(name, addr, 0)
    }

    /// A backend that delays every response by `delay_ms`.
    pub fn start_slow(name: &str, delay_ms: u64) -> Backend {
        Self::start_full(
            name,
            SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            delay_ms,
        )
    }

    pub fn start_full(name: &str, addr: SocketAddr, delay_ms: u64) -> Backend {
        Self::start_args(name, addr, &["--delay-ms", &delay_ms.to_string()])
    }

    /// A backend announcing SETTINGS_MAX_CONCURRENT_STREAMS = `n`.
    pub fn start_max_streams(name: &str, n: u32) -> Backend {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        Self::start_args(name, addr, &["--max-concurrent-streams", &n.to_string()])
    }

    /// A backend started with extra `spooky demo-backend` arguments.
    pub fn start_args(name: &str, addr: SocketAddr, extra: &[&str]) -> Backend {
        let mut child = Command::new(SPOOKY)
            .args([
                "demo-backend",
                "--listen",
                &addr.to_string(),
                "--name",
                name,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn demo backend");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.contains("listening"),
            "backend {name} did not start: {line:?}"
        );
        Backend {
            addr,
            name: name.into(),
            child,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET on the backend directly over h2c; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        h2_get(self.addr, path)
    }

    /// The backend's `/stats` counter `key`.
    pub fn stat(&self, key: &str) -> u64 {
        let (_, body) = self.get("/stats");
        let needle = format!("\"{key}\":");
        let start = body
            .find(&needle)
            .unwrap_or_else(|| panic!("no {key} in {body}"))
            + needle.len();
        body[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain h2c GET with the `h2` crate (test-side only).
pub fn h2_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        (status, String::from_utf8_lossy(&out).into_owned())
    })
}

/// A running spooky with its own config, certs and log file in a temp dir.
pub struct Spooky {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// The `io.upstream_io` it was started with (empty = default).
    pub upstream_io: String,
    child: Option<Child>,
}

/// Knobs for [`Spooky::start_with`].
#[derive(Clone)]
pub struct Options {
    pub backends: Vec<SocketAddr>,
    pub connect_ms: u64,
    pub request_ms: u64,
    pub idle_ms: u64,
    pub max_body_buffer_bytes: usize,
    pub max_request_header_bytes: usize,
    pub retry: bool,
    /// Extra YAML appended at top level (e.g. routes).
    pub extra: String,
    /// Replaces the whole `upstreams:` section when set.
    pub upstreams_yaml: Option<String>,
    /// `io.backend`: from `SPOOKY_TEST_IO_BACKEND` (uring | epoll), default
    /// `auto`. `make test` runs the suite once per driver.
    pub io_backend: String,
    /// More `io:` keys, e.g. `workers: 3`.
    pub io_extra: String,
    /// `io.upstream_io` (ring | tokio | auto): from `SPOOKY_TEST_UPSTREAM_IO`;
    /// empty = not written (the default, `auto`).
    pub upstream_io: String,
    /// More `quic:` keys, each line indented by two spaces; when one of
    /// them is `retry:` the `retry` flag above is not written, and when one
    /// is `idle_timeout_ms:` it replaces the tests' 10 s.
    pub quic_extra: String,
    /// Extra environment for the spooky process (e.g. `SPOOKY_FAULT_INJECT`).
    pub env: Vec<(String, String)>,
    /// More `limits:` keys, e.g. `max_connection_buffer_bytes: 1048576`.
    pub limits_extra: String,
    /// More `telemetry:` keys, e.g. `access_log_path: access.log`.
    pub telemetry_extra: String,
}

/// The I/O driver the suite runs on (`SPOOKY_TEST_IO_BACKEND`).
pub fn test_io_backend() -> String {
    std::env::var("SPOOKY_TEST_IO_BACKEND").unwrap_or_else(|_| "auto".into())
}

/// The upstream TCP transport the suite asks for (`SPOOKY_TEST_UPSTREAM_IO`:
/// ring | tokio | auto); empty when unset.
pub fn test_upstream_io() -> String {
    std::env::var("SPOOKY_TEST_UPSTREAM_IO").unwrap_or_default()
}

/// The `upstream_io` a worker must report for `driver` (uring | epoll) and
/// the `io.upstream_io` setting (empty = default).
pub fn expected_upstream_io(driver: &str, setting: &str) -> &'static str {
    match (driver, setting) {
        ("uring", "ring") => "ring",
        ("uring", "tokio") | ("epoll", _) => "tokio",
        // `auto` on the io_uring driver: whichever measured faster.
        _ => match spooky::upstream::transport::AUTO_ON_URING {
            spooky::config::UpstreamIo::Tokio => "tokio",
            _ => "ring",
        },
    }
}

impl Options {
    pub fn new(backends: &[&Backend]) -> Self {
        Self {
            backends: backends.iter().map(|b| b.addr).collect(),
            connect_ms: 1000,
            request_ms: 10_000,
            idle_ms: 30_000,
            max_body_buffer_bytes: 256 * 1024,
            max_request_header_bytes: 16 * 1024,
            retry: false,
            extra: String::new(),
            upstreams_yaml: None,
            io_backend: test_io_backend(),
            // One worker unless a test asks for more: balancing state is
            // per worker, and several tests assert exact sequences.
            io_extra: "workers: 1".into(),
            upstream_io: test_upstream_io(),
            quic_extra: String::new(),
            env: Vec::new(),
            limits_extra: String::new(),
            telemetry_extra: String::new(),
        }
    }
}

impl Spooky {
    pub fn start(backends: &[&Backend]) -> Spooky {
        Self::start_with(Options::new(backends))
    }

    pub fn config_yaml(o: &Options, port: u16, admin: u16) -> String {
        let backends: String = o
            .backends
            .iter()
            .map(|b| format!("      - {{ address: \"{b}\", weight: 1 }}\n"))
            .collect();
        let upstreams = o.upstreams_yaml.clone().unwrap_or_else(|| {
            format!(
                "upstreams:\n  - name: app\n    backends:\n{backends}    pool: {{ connections_per_backend: 2, max_concurrent_streams: 100 }}\n    timeouts: {{ connect_ms: {}, request_ms: {}, idle_ms: {} }}\n",
                o.connect_ms, o.request_ms, o.idle_ms
            )
        });
        let mut io_keys = vec![format!("backend: {}", o.io_backend)];
        if !o.io_extra.is_empty() {
            io_keys.push(o.io_extra.clone());
        }
        if !o.upstream_io.is_empty() {
            io_keys.push(format!("upstream_io: {}", o.upstream_io));
        }
        let io = format!("io: {{ {} }}\n", io_keys.join(", "));
        let limits_extra = if o.limits_extra.is_empty() {
            String::new()
        } else {
            format!(", {}", o.limits_extra)
        };
        let telemetry_extra = if o.telemetry_extra.is_empty() {
            String::new()
        } else {
            format!(", {}", o.telemetry_extra)
        };
        let mut quic = if o.quic_extra.contains("retry:") {
            o.quic_extra.clone()
        } else {
            format!("  retry: {}\n{}", o.retry, o.quic_extra)
        };
        if !quic.contains("idle_timeout_ms:") {
            quic.push_str("  idle_timeout_ms: 10000\n");
        }
        format!(
            "listen:\n  address: \"127.0.0.1:{port}\"\n  tls: {{ cert: cert.pem, key: key.pem }}\nquic:\n{quic}{io}{upstreams}limits: {{ max_body_buffer_bytes: {}, max_request_header_bytes: {}{limits_extra} }}\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\ntelemetry: {{ log: \"info\", log_format: text, access_log: true{telemetry_extra} }}\n{}",
            o.max_body_buffer_bytes, o.max_request_header_bytes, o.extra
        )
    }

    pub fn start_with(o: Options) -> Spooky {
        let dir = tempfile::tempdir().unwrap();
        write_certs(dir.path());
        let port = free_udp_port();
        let admin = free_tcp_port();
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, Self::config_yaml(&o, port, admin)).unwrap();
        let log = std::fs::File::create(dir.path().join("spooky.log")).unwrap();
        let child = Command::new(SPOOKY)
            .arg("--config")
            .arg(&config_path)
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spooky");
        let s = Spooky {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            dir,
            config_path,
            upstream_io: o.upstream_io.clone(),
            child: Some(child),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some((200, _)) = http1_get(self.admin, "/ready") {
                // The suite must really run on the driver it asked for.
                let want = test_io_backend();
                if want != "auto" {
                    let until = Instant::now() + Duration::from_secs(5);
                    while !self.log().contains("worker listening") && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let needle = format!("driver=\"{want}\"");
                    assert!(
                        self.log().contains(&needle),
                        "asked for the {want} driver but spooky runs another:\n{}",
                        self.log()
                    );
                    // ...and on the upstream transport it asked for.
                    let upstream = expected_upstream_io(&want, &self.upstream_io);
                    let needle = format!("upstream_io=\"{upstream}\"");
                    assert!(
                        self.log().contains(&needle),
                        "expected upstream_io={upstream}:\n{}",
                        self.log()
                    );
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("spooky did not become ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("spooky.log")).unwrap_or_default()
    }

    pub fn client(&self) -> H3Client {
        H3Client::connect(self.addr, "localhost")
            .unwrap_or_else(|e| panic!("connect to spooky failed: {e}; log:\n{}", self.log()))
    }

    /// Sum of all samples of an OpenMetrics family (any labels) whose
    /// line starts with `name` and contains every string in `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) = http1_get(self.admin, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.starts_with(name)
                    && (l.as_bytes().get(name.len()) == Some(&b' ')
                        || l.as_bytes().get(name.len()) == Some(&b'{'))
            })
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Sends SIGTERM and waits for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        unsafe_kill(child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident set size in KiB (`VmRSS` in /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("spooky running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Waits up to `limit` for the process to exit on its own; its exit
    /// code, or `None` while it still runs (or was killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Spooky {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- spooky log ----\n{}", self.log());
        }
    }
}

/// Minimal HTTP/1.1 GET for the admin API; `None` when unreachable.
pub fn http1_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http1_request(addr, "GET", path, &[], "")
}

/// Runs `spooky check` on a config text; returns (exit code, stdout, stderr).
pub fn spooky_check(dir: &Path, yaml: &str) -> (i32, String, String) {
    let path = dir.join("check.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(SPOOKY)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One HTTP/1.1 request to the admin API with extra headers and a body;
/// `None` when unreachable.
pub fn http1_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Established TCP connections (IPv4, this network namespace) whose remote
/// end is `port` on loopback: a proxy's connections to a backend.
pub fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

impl Spooky {
    /// Sends signal `sig` (e.g. 1 = SIGHUP) to spooky.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            unsafe_kill(pid, sig);
        }
    }

    /// Replaces the config file with `o` rendered on the same ports.
    pub fn rewrite_config(&self, o: &Options) {
        self.write_config_text(&Self::config_yaml(o, self.addr.port(), self.admin.port()));
    }

    /// Replaces the config file with `text` (written to a temp file and
    /// renamed, as editors and config managers do).
    pub fn write_config_text(&self, text: &str) {
        let tmp = self.dir.path().join("config.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }
}

/// Runs `promtool check metrics` on `text` (what `/metrics` serves a scraper
/// that does not ask for OpenMetrics: Prometheus text 0.0.4). `false` when
/// promtool is not installed (the caller skips, saying so); panics when it
/// reports anything, lint included.
pub fn promtool_check(text: &str) -> bool {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics {:?}:\n{}{}\n{text}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
