//! The seam between the edge and the backends, end to end: queued requests
//! whose clients leave, uploads that stall or are refused mid-body, and
//! backend state across reloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::h3client::{pattern_sha256, Body, Request};
use crate::common::{http1_get, Backend, Options, Spooky};

fn upstream_yaml(backends: &[&Backend], extra: &str) -> String {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    upstream_yaml_at(&addrs, extra)
}

fn upstream_yaml_at(addrs: &[SocketAddr], extra: &str) -> String {
    let list: String = addrs
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\", weight: 1 }}\n"))
        .collect();
    format!("upstreams:\n  - name: app\n{extra}    backends:\n{list}")
}

/// A backend that accepts TCP connections and never says a word: its
/// health checks time out, and a request sent to it hangs until a timeout.
fn mute_backend() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

fn spooky_with(upstreams: String) -> (Spooky, Options) {
    let mut o = Options::new(&[]);
    o.upstreams_yaml = Some(upstreams);
    (Spooky::start_with(o.clone()), o)
}

/// Waits up to 10 s for `cond`, then fails with `what` and the log.
fn wait_until(spooky: &Spooky, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; log:\n{}",
            spooky.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn queued_requests_whose_clients_leave_give_their_places_back() {
    let a = Backend::start("alpha");
    let (spooky, _) = spooky_with(upstream_yaml(
        &[&a],
        "    circuit: { max_in_flight_per_backend: 1, max_pending: 3 }\n",
    ));
    // One slow request takes the backend's only slot for 3 s.
    let addr = spooky.addr;
    let occupier = std::thread::spawn(move || {
        let mut c = crate::common::H3Client::connect(addr, "localhost").unwrap();
        c.get("/slow?ms=3000").unwrap().status
    });
    wait_until(&spooky, "the slow request in flight", || {
        a.stat("active") >= 1
    });
    // max_pending requests queue behind it, then their client resets them.
    let mut leaver = spooky.client();
    let ids = leaver.open_and_go_silent("/id", 3).unwrap();
    wait_until(&spooky, "three requests pending", || {
        spooky.metric("spooky_balancer_pending", &[]) == 3.0
    });
    leaver.cancel_streams(&ids).unwrap();
    leaver.drive_for(Duration::from_millis(200)).unwrap();
    wait_until(&spooky, "the pending gauge back at 0", || {
        spooky.metric("spooky_balancer_pending", &[]) == 0.0
    });
    // The circuit still admits: with the slot still taken, a new request
    // waits for it instead of getting an instant 503.
    let r = spooky.client().get("/id").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(occupier.join().unwrap(), 200);
    assert_eq!(
        spooky.metric("spooky_upstream_circuit_rejections_total", &[]),
        0.0
    );
}

#[test]
fn a_stalled_upload_is_the_clients_fault_and_ejects_no_backend() {
    let a = Backend::start("alpha");
    let (spooky, _) = spooky_with(upstream_yaml(
        &[&a],
        "    timeouts: { connect_ms: 1000, request_ms: 400, idle_ms: 30000 }\n    outlier: { consecutive_failures: 2, base_ejection_ms: 30000, max_ejection_percent: 100 }\n",
    ));
    let mut c = spooky.client();
    for _ in 0..4 {
        // content-length says 4000, the client sends 1000 and stops.
        let req = Request::new("POST", "/echo")
            .header("content-length", "4000")
            .body(Body::Stalled(1000));
        let r = c.send(req).unwrap();
        assert_eq!(r.status, 408, "{}", r.text());
    }
    assert_eq!(
        spooky.metric("spooky_upstream_ejections_total", &[]),
        0.0,
        "a client's stall counted against the backend; log:\n{}",
        spooky.log()
    );
    assert_eq!(spooky.metric("spooky_upstream_timeouts_total", &[]), 0.0);
    let r = c.get("/id").unwrap();
    assert_eq!(r.status, 200, "backend still in rotation: {}", r.text());
}

#[test]
fn a_put_refused_mid_body_completes_on_the_retry() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let (spooky, _) = spooky_with(upstream_yaml(
        &[&a, &b],
        "    retries: { attempts: 1, budget_percent: 100, on: [refused_stream] }\n",
    ));
    let mut c = spooky.client();
    // More than the stream's initial 16 KiB body grant, less than the
    // 256 KiB replay copy the tests allow.
    let n = 200_000u64;
    for _ in 0..4 {
        let req = Request::new("PUT", "/echo?refuse=alpha")
            .header("content-length", &n.to_string())
            .body(Body::Pattern(n));
        let r = c.send(req).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-backend"), Some("beta"));
        let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(v["length"], n);
        assert_eq!(v["sha256"], pattern_sha256(n));
    }
    assert!(
        spooky.metric("spooky_upstream_retries_total", &[]) >= 1.0,
        "alpha never refused one: the test proved nothing"
    );
}

/// `/backends` entry for `addr`: (health, ejected_on_workers).
fn backend_state(spooky: &Spooky, addr: std::net::SocketAddr) -> Option<(String, u64)> {
    let (status, body) = http1_get(spooky.admin, "/backends")?;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .map(|b| {
            (
                b["health"].as_str().unwrap_or("").to_string(),
                b["ejected_on_workers"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn a_reload_keeps_what_was_learnt_about_backends() {
    let a = Backend::start("alpha");
    let mute = mute_backend();
    // No retries: a reload that forgot the mute backend is down would send
    // it requests (which fail) until a check timed out again.
    let health = "    health_check: { path: /health, interval_ms: 1000, timeout_ms: 300, healthy_threshold: 1, unhealthy_threshold: 1 }\n    retries: { attempts: 0 }\n    timeouts: { connect_ms: 300, request_ms: 1000, idle_ms: 30000 }\n";
    let (spooky, mut o) = spooky_with(upstream_yaml_at(&[a.addr, mute], health));
    wait_until(&spooky, "the mute backend marked unhealthy", || {
        backend_state(&spooky, mute).is_some_and(|(h, _)| h == "unhealthy")
    });

    // SIGHUP with the same file: a new generation, the same knowledge.
    spooky.signal(1);
    wait_until(&spooky, "generation 2", || {
        spooky.metric("spooky_config_generation", &[]) >= 2.0
    });
    assert_eq!(
        backend_state(&spooky, mute).map(|(h, _)| h),
        Some("unhealthy".to_string()),
        "the mute backend forgotten by the reload"
    );
    let mut c = spooky.client();
    for _ in 0..6 {
        let r = c.get("/id").unwrap();
        assert_eq!(
            r.status,
            200,
            "a dead backend back in rotation: {}",
            r.text()
        );
        assert_eq!(r.text(), "alpha");
    }

    // A backend the reload adds starts fresh and takes traffic.
    let g = Backend::start("gamma");
    o.upstreams_yaml = Some(upstream_yaml_at(&[a.addr, mute, g.addr], health));
    spooky.rewrite_config(&o);
    spooky.signal(1);
    wait_until(&spooky, "generation 3", || {
        spooky.metric("spooky_config_generation", &[]) >= 3.0
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = c.get("/id").unwrap();
        assert_eq!(r.status, 200);
        seen.insert(r.text());
    }
    assert!(seen.contains("gamma"), "gamma got no traffic: {seen:?}");
    assert!(
        seen.iter().all(|n| n == "alpha" || n == "gamma"),
        "{seen:?}"
    );
    assert_eq!(
        backend_state(&spooky, mute).map(|(h, _)| h),
        Some("unhealthy".to_string())
    );
}

#[test]
fn a_reload_keeps_an_ejection() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let (spooky, _) = spooky_with(upstream_yaml(
        &[&a, &b],
        "    outlier: { consecutive_failures: 2, base_ejection_ms: 60000, max_ejection_percent: 50 }\n    retries: { attempts: 0 }\n",
    ));
    let mut c = spooky.client();
    // Both fail (a reset before headers) until one is ejected; at most
    // half the pool may be, so the other stays.
    let ejected = |spooky: &Spooky| {
        [(&a, "alpha"), (&b, "beta")]
            .into_iter()
            .find(|(x, _)| backend_state(spooky, x.addr).is_some_and(|(_, e)| e > 0))
            .map(|(_, name)| name)
    };
    wait_until(&spooky, "a backend ejected", || {
        let _ = c.get("/reset-before-headers");
        ejected(&spooky).is_some()
    });
    let out = ejected(&spooky).unwrap();
    let other = if out == "alpha" { "beta" } else { "alpha" };
    spooky.signal(1);
    wait_until(&spooky, "generation 2", || {
        spooky.metric("spooky_config_generation", &[]) >= 2.0
    });
    for _ in 0..6 {
        let r = c.get("/id").unwrap();
        assert_eq!(
            r.text(),
            other,
            "the ejection of {out} did not survive the reload"
        );
    }
    assert_eq!(ejected(&spooky), Some(out));
}
