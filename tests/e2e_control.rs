//! Control plane and observability: metrics (promtool, a real Prometheus),
//! hot reload under load, broken reloads, trace context in the access log,
//! SIGTERM during a large download.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::h3client::{pattern_sha256, Body, ClientOptions, Request};
use crate::common::{
    established_to, free_tcp_port, http1_get, http1_request, Backend, H3Client, Options, Spooky,
};

/// True when a missing external tool must fail the test (CI) rather than
/// skip it.
fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Skips (returns false) when `tool` is missing outside CI; panics in CI.
fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    assert!(
        !in_ci(),
        "{tool} is required in CI (Debian package `prometheus`, see scripts/bootstrap.sh)"
    );
    eprintln!(
        "SKIPPED: {tool} not installed (apt install prometheus); set CI=1 to make this fatal"
    );
    false
}

fn admin_metrics(spooky: &Spooky) -> String {
    let (status, body) = http1_get(spooky.admin, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    body
}

/// A Prometheus server scraping `target` every second, in a temp dir.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: spooky\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            addr,
            child,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The scalar value of an instant query, if it has exactly one sample.
    fn query(&self, q: &str) -> Option<f64> {
        let (status, body) = http1_get(self.addr, &format!("/api/v1/query?query={q}"))?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v.get("data")?.get("result")?.as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0].get("value")?.get(1)?.as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn counters_match_requests_and_prometheus_reads_them_back() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let spooky = Spooky::start(&[&a, &b]);
    const N: usize = 25;
    let mut c = spooky.client();
    for _ in 0..N {
        assert_eq!(c.get("/id").unwrap().status, 200);
    }
    drop(c);
    assert_eq!(spooky.metric("spooky_requests_total", &[]), N as f64);
    assert_eq!(
        spooky.metric("spooky_requests_total", &["class=\"2xx\""]),
        N as f64
    );
    assert_eq!(spooky.metric("spooky_balancer_picks_total", &[]), N as f64);
    assert_eq!(
        spooky.metric("spooky_request_duration_seconds_count", &[]),
        N as f64
    );
    assert_eq!(
        spooky.metric("spooky_request_duration_seconds_bucket", &["le=\"+Inf\""]),
        N as f64
    );
    assert!(
        spooky.metric(
            "spooky_io_datagrams_per_syscall_count",
            &["direction=\"in\""]
        ) > 0.0
    );
    assert_eq!(spooky.metric("spooky_config_generation", &[]), 1.0);

    if !require("promtool") || !require("prometheus") {
        return;
    }
    let text = admin_metrics(&spooky);
    for family in [
        "spooky_request_duration_seconds histogram",
        "spooky_quic_rtt_seconds histogram",
        "spooky_io_datagrams_per_syscall histogram",
        "spooky_config_reloads_total counter",
        "spooky_config_generation gauge",
    ] {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family}")),
            "no {family}"
        );
    }
    assert!(
        crate::common::promtool_check(&text),
        "promtool is installed"
    );

    let prom = Prometheus::start(spooky.admin);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        last = prom.query("sum(spooky_requests_total)");
        if last == Some(N as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        last,
        Some(N as f64),
        "Prometheus did not read spooky_requests_total back; prometheus log:\n{}",
        prom.log()
    );
    assert_eq!(
        prom.query("sum(spooky_balancer_picks_total)"),
        Some(N as f64)
    );
}

/// Counts of a steady request stream.
#[derive(Default)]
struct LoadStats {
    sent: u64,
    failed: u64,
    failures: Vec<String>,
    /// Backend name per response, in order.
    answers: Vec<String>,
}

/// Sends GET /id back to back on one connection until `stop`, reconnecting
/// only if the connection dies (which would count failures).
fn steady_load(addr: SocketAddr, stop: Arc<AtomicBool>, stats: Arc<Mutex<LoadStats>>) {
    let mut c = H3Client::connect(addr, "localhost").unwrap();
    while !stop.load(Ordering::Relaxed) {
        let r = c.get("/id");
        let mut s = stats.lock().unwrap();
        s.sent += 1;
        match r {
            Ok(r) if r.status == 200 => s.answers.push(r.text()),
            Ok(r) => {
                s.failed += 1;
                s.failures
                    .push(format!("status {}: {}", r.status, r.text()));
            }
            Err(e) => {
                s.failed += 1;
                s.failures.push(e.to_string());
                drop(s);
                match H3Client::connect(addr, "localhost") {
                    Ok(n) => c = n,
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

fn weighted(backends: &[(&Backend, u32)]) -> String {
    let list: String = backends
        .iter()
        .map(|(b, w)| format!("      - {{ address: \"{}\", weight: {w} }}\n", b.addr))
        .collect();
    format!(
        "upstreams:\n  - name: app\n    backends:\n{list}    pool: {{ connections_per_backend: 2, max_concurrent_streams: 100 }}\n    timeouts: {{ connect_ms: 1000, request_ms: 10000, idle_ms: 30000 }}\n"
    )
}

fn wait_generation(spooky: &Spooky, g: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while spooky.metric("spooky_config_generation", &[]) < g {
        assert!(
            Instant::now() < deadline,
            "generation {g} never published; log:\n{}",
            spooky.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_under_load_loses_no_request_and_shifts_traffic() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let c = Backend::start("gamma");
    let mut o = Options::new(&[&a, &b]);
    let spooky = Spooky::start_with(o.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(LoadStats::default()));
    let load = {
        let (stop, stats, addr) = (stop.clone(), stats.clone(), spooky.addr);
        std::thread::spawn(move || steady_load(addr, stop, stats))
    };
    std::thread::sleep(Duration::from_millis(700));

    // 1. POST /reload: add gamma, change weights.
    o.upstreams_yaml = Some(weighted(&[(&a, 1), (&b, 2), (&c, 3)]));
    spooky.rewrite_config(&o);
    let (status, body) = http1_request(spooky.admin, "POST", "/reload", &[], "").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ok"], true, "{body}");
    assert_eq!(v["generation"], 2, "{body}");
    assert_eq!(v["restart_required"], serde_json::json!([]), "{body}");
    let mark1 = stats.lock().unwrap().answers.len();
    std::thread::sleep(Duration::from_millis(1500));

    // 2. SIGHUP: remove alpha.
    o.upstreams_yaml = Some(weighted(&[(&b, 1), (&c, 1)]));
    spooky.rewrite_config(&o);
    spooky.signal(1);
    wait_generation(&spooky, 3.0);
    let mark2 = stats.lock().unwrap().answers.len();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let s = stats.lock().unwrap();
    eprintln!(
        "reload under load: {} requests sent, {} failed",
        s.sent, s.failed
    );
    assert_eq!(s.failed, 0, "failed requests: {:?}", s.failures);
    assert!(s.sent > 50, "too little load to mean anything: {}", s.sent);
    let after1 = &s.answers[mark1..mark2];
    assert!(
        after1.iter().any(|n| n == "gamma"),
        "gamma got no traffic after POST /reload: {after1:?}"
    );
    // Some requests may have started on the old gateway just before the
    // switch; allow a few before alpha disappears.
    let after2 = &s.answers[mark2..];
    let alpha_late = after2.iter().skip(4).filter(|n| *n == "alpha").count();
    assert_eq!(alpha_late, 0, "alpha still picked after SIGHUP removed it");
    assert!(after2.iter().any(|n| n == "gamma") && after2.iter().any(|n| n == "beta"));
    assert_eq!(
        spooky.metric("spooky_config_reloads_total", &["result=\"ok\""]),
        2.0
    );

    // /config shows the new backends.
    let (status, cfg) = http1_get(spooky.admin, "/config").unwrap();
    assert_eq!(status, 200);
    assert!(
        cfg.contains(&c.addr.to_string()) && !cfg.contains(&a.addr.to_string()),
        "{cfg}"
    );
}

/// A reload that removes a backend closes spooky's h2 connections to it once
/// the requests that started on the old config are done.
#[test]
fn removed_backend_connections_close_after_reload() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let mut o = Options::new(&[&a, &b]);
    let spooky = Spooky::start_with(o.clone());
    let mut c = spooky.client();
    for _ in 0..4 {
        assert_eq!(c.get("/id").unwrap().status, 200);
    }
    assert!(established_to(a.addr.port()) > 0);
    o.upstreams_yaml = Some(weighted(&[(&b, 1)]));
    spooky.rewrite_config(&o);
    let (status, body) = http1_request(spooky.admin, "POST", "/reload", &[], "").unwrap();
    assert_eq!(status, 200, "{body}");
    for _ in 0..4 {
        assert_eq!(c.get("/id").unwrap().text(), "beta");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while established_to(a.addr.port()) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections to removed backend alpha still open",
            established_to(a.addr.port())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn broken_reload_keeps_old_config_and_traffic() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let mut o = Options::new(&[&a]);
    let spooky = Spooky::start_with(o.clone());
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().text(), "alpha");

    // Valid YAML, invalid value: weight must be a number.
    o.upstreams_yaml = Some(format!(
        "upstreams:\n  - name: app\n    backends:\n      - {{ address: \"{}\", weight: heavy }}\n",
        b.addr
    ));
    spooky.rewrite_config(&o);
    let text = std::fs::read_to_string(&spooky.config_path).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("weight: heavy"))
        .unwrap()
        + 1;
    let (status, body) = http1_request(spooky.admin, "POST", "/reload", &[], "").unwrap();
    assert!((400..600).contains(&status), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ok"], false, "{body}");
    let errors = v["errors"].as_array().unwrap();
    let needle = format!("config.yaml:{line}:");
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap_or("").contains(&needle)),
        "no {needle} in {body}"
    );
    // SIGHUP with the same broken file: also refused and counted.
    spooky.signal(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while spooky.metric("spooky_config_reloads_total", &["result=\"error\""]) < 2.0 {
        assert!(Instant::now() < deadline, "SIGHUP reload error not counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Traffic unaffected, old config still in effect and shown.
    for _ in 0..5 {
        assert_eq!(c.get("/id").unwrap().text(), "alpha");
    }
    let (status, cfg) = http1_get(spooky.admin, "/config").unwrap();
    assert_eq!(status, 200);
    assert!(cfg.contains(&a.addr.to_string()), "{cfg}");
    assert!(!cfg.contains(&b.addr.to_string()), "{cfg}");
    assert!(cfg.starts_with("# generation 1\n"), "{cfg}");
    assert_eq!(spooky.metric("spooky_config_generation", &[]), 1.0);
    assert_eq!(
        spooky.metric("spooky_config_reloads_total", &["result=\"ok\""]),
        0.0
    );
    assert!(spooky.log().contains("config reload failed"));
}

#[test]
fn restart_only_changes_are_reported_not_applied() {
    let a = Backend::start("alpha");
    let mut o = Options::new(&[&a]);
    let spooky = Spooky::start_with(o.clone());
    let new_admin = free_tcp_port();
    o.io_extra = "workers: 3".into();
    let text = Spooky::config_yaml(&o, spooky.addr.port(), spooky.admin.port()).replace(
        &format!("127.0.0.1:{}", spooky.admin.port()),
        &format!("127.0.0.1:{new_admin}"),
    );
    spooky.write_config_text(&text);
    let (status, body) = http1_request(spooky.admin, "POST", "/reload", &[], "").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["restart_required"],
        serde_json::json!(["io.workers", "admin.address"]),
        "{body}"
    );
    // Still served on the old admin address; the old values are in effect.
    let (_, cfg) = http1_get(spooky.admin, "/config").unwrap();
    assert!(
        cfg.contains(&format!("127.0.0.1:{}", spooky.admin.port())),
        "{cfg}"
    );
    assert!(cfg.contains("workers: 1"), "{cfg}");
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().status, 200);
}

#[test]
fn backends_endpoint_lists_configured_backends() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http1_get(spooky.admin, "/backends").unwrap();
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let list = v.as_array().unwrap();
        if list
            .iter()
            .any(|b| b["address"] == a.addr.to_string() && b["upstream"] == "app")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha never on /backends: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn traceparent_reaches_backend_and_access_log() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let r = c
        .send(Request {
            method: "GET".into(),
            path: "/headers".into(),
            headers: vec![(
                "traceparent".into(),
                format!("00-{trace_id}-b7ad6b7169203331-01"),
            )],
            body: Body::Empty,
        })
        .unwrap();
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(
        body.contains(&format!("\"traceparent\":\"00-{trace_id}-")),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = spooky.log();
        if log
            .lines()
            .any(|l| l.contains("access") && l.contains(trace_id) && l.contains("/headers"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line with trace id {trace_id}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_during_64mib_download_completes_then_exits_zero() {
    let a = Backend::start("alpha");
    let mut spooky = Spooky::start(&[&a]);
    let addr = spooky.addr;
    const N: u64 = 64 * 1024 * 1024;
    let download = std::thread::spawn(move || {
        let mut c = H3Client::connect(addr, "localhost").unwrap();
        c.send_digest(Request {
            method: "GET".into(),
            path: format!("/bytes/{N}"),
            headers: vec![],
            body: Body::Empty,
        })
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stat("active") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.stat("active"), 1, "the download should be in flight");
    spooky.signal(15);
    std::thread::sleep(Duration::from_millis(200));
    let opts = ClientOptions {
        idle_timeout_ms: 500,
        ..Default::default()
    };
    assert!(
        H3Client::connect_with(addr, "localhost", opts).is_err(),
        "a draining spooky must refuse new connections"
    );
    let r = download.join().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.len, N);
    assert_eq!(r.sha256, pattern_sha256(N));
    assert_eq!(spooky.terminate(), Some(0), "log:\n{}", spooky.log());
}

#[test]
fn watch_true_reloads_when_the_file_changes() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let mut o = Options::new(&[&a]);
    o.extra = "watch: true\n".into();
    let spooky = Spooky::start_with(o.clone());
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().text(), "alpha");
    o.upstreams_yaml = Some(weighted(&[(&b, 1)]));
    spooky.rewrite_config(&o);
    wait_generation(&spooky, 2.0);
    assert_eq!(c.get("/id").unwrap().text(), "beta");
    assert!(
        spooky.log().contains("trigger=\"watch\""),
        "{}",
        spooky.log()
    );
}
