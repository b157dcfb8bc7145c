//! Balancing policies, health, outlier ejection, retries and circuit
//! breaking, end to end with real backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::h3client::{Body, ClientError, Request};
use crate::common::{Backend, H3Client, Options, Spooky};

fn upstream_yaml(backends: &[(&Backend, u32)], extra: &str) -> String {
    let list: String = backends
        .iter()
        .map(|(b, w)| format!("      - {{ address: \"{}\", weight: {w} }}\n", b.addr))
        .collect();
    format!("upstreams:\n  - name: app\n{extra}    backends:\n{list}")
}

fn spooky_with(upstreams: String) -> Spooky {
    let mut o = Options::new(&[]);
    o.upstreams_yaml = Some(upstreams);
    Spooky::start_with(o)
}

fn tally(c: &mut H3Client, n: usize, path: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        *seen
            .entry(r.header("x-backend").unwrap_or("-").to_string())
            .or_default() += 1;
    }
    seen
}

#[test]
fn weighted_policy_follows_weights_exactly() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let spooky = spooky_with(upstream_yaml(&[(&a, 3), (&b, 1)], "    policy: weighted\n"));
    let mut c = spooky.client();
    let seen = tally(&mut c, 40, "/id");
    assert_eq!(seen.get("alpha"), Some(&30), "{seen:?}");
    assert_eq!(seen.get("beta"), Some(&10), "{seen:?}");
}

#[test]
fn consistent_hash_on_a_header_is_sticky() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let d = Backend::start("delta");
    let spooky = spooky_with(upstream_yaml(
        &[(&a, 1), (&b, 1), (&d, 1)],
        "    policy: consistent_hash\n    hash_key: \"header:x-user\"\n",
    ));
    let mut c = spooky.client();
    let mut owners = HashMap::new();
    for user in 0..30 {
        for _ in 0..3 {
            let r = c
                .send(Request {
                    method: "GET".into(),
                    path: "/id".into(),
                    headers: vec![("x-user".into(), format!("user-{user}"))],
                    body: Body::Empty,
                })
                .unwrap();
            let owner = owners.entry(user).or_insert_with(|| r.text());
            assert_eq!(*owner, r.text(), "user-{user} moved between backends");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "30 keys should spread: {owners:?}");
}

#[test]
fn ewma_steers_away_from_a_slow_backend() {
    let fast = Backend::start("fast");
    let slow = Backend::start_slow("slow", 150);
    let spooky = spooky_with(upstream_yaml(
        &[(&fast, 1), (&slow, 1)],
        "    policy: ewma\n",
    ));
    let mut c = spooky.client();
    let seen = tally(&mut c, 40, "/id");
    let to_slow = seen.get("slow").copied().unwrap_or(0);
    assert!(
        to_slow <= 8,
        "EWMA sent {to_slow}/40 requests to the slow backend: {seen:?}"
    );
}

#[test]
fn saturated_backend_sheds_load_with_503_and_retry_after() {
    let a = Backend::start_slow("alpha", 1000);
    let spooky = spooky_with(upstream_yaml(
        &[(&a, 1)],
        "    circuit: { max_in_flight_per_backend: 2, max_pending: 2 }\n",
    ));
    let mut c = spooky.client();
    let reqs = (0..10)
        .map(|_| Request {
            method: "GET".into(),
            path: "/id".into(),
            headers: vec![],
            body: Body::Empty,
        })
        .collect();
    let results: Vec<_> = c.send_many(reqs).into_iter().map(|r| r.unwrap()).collect();
    let ok = results.iter().filter(|r| r.status == 200).count();
    let shed: Vec<_> = results.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + shed.len(), 10);
    assert_eq!(ok, 4, "2 in flight + 2 pending should be served");
    for r in &shed {
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert!(spooky.metric("spooky_upstream_circuit_rejections_total", &[]) >= 6.0);
    assert!(a.stat("requests") >= 4);
}

#[test]
fn killed_backend_is_ejected_and_rejoins_when_restarted() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let mut d = Backend::start("delta");
    let d_addr = d.addr;
    let spooky = spooky_with(upstream_yaml(
        &[(&a, 1), (&b, 1), (&d, 1)],
        "    health_check: { path: /health, interval_ms: 200, timeout_ms: 150, healthy_threshold: 2, unhealthy_threshold: 2 }\n    outlier: { consecutive_failures: 3, base_ejection_ms: 1000, max_ejection_percent: 50 }\n",
    ));
    let addr = spooky.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let seen: Arc<std::sync::Mutex<Vec<(Instant, String)>>> = Arc::default();
    let load = {
        let (stop, sent, failed, seen) = (stop.clone(), sent.clone(), failed.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut c = H3Client::connect(addr, "localhost").unwrap();
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                match c.get("/id") {
                    Ok(r) if r.status == 200 => {
                        seen.lock().unwrap().push((Instant::now(), r.text()))
                    }
                    Ok(_) | Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    d.kill();
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    // After the first second, nothing reaches the dead backend.
    let late_to_d = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, n)| *t > killed_at + Duration::from_millis(500) && n == "delta")
        .count();
    assert_eq!(late_to_d, 0);
    let d2 = Backend::start_on("delta", d_addr);
    let restarted_at = Instant::now();
    let deadline = restarted_at + Duration::from_secs(10);
    let mut rejoined = false;
    while Instant::now() < deadline && !rejoined {
        std::thread::sleep(Duration::from_millis(100));
        rejoined = seen
            .lock()
            .unwrap()
            .iter()
            .any(|(t, n)| *t > restarted_at && n == "delta");
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    eprintln!("kill test: {sent} requests, {failed} failed");
    assert!(rejoined, "restarted backend never got traffic again");
    assert!(
        failed <= 3,
        "{failed} of {sent} requests failed while a backend died"
    );
    assert!(
        spooky.metric("spooky_upstream_health_transitions_total", &[]) >= 1.0
            || spooky.metric("spooky_upstream_ejections_total", &[]) >= 1.0
    );
    drop(d2);
}

#[test]
fn post_is_never_replayed_when_its_backend_dies_mid_request() {
    let mut a = Backend::start("alpha");
    let mut b = Backend::start("beta");
    let spooky = spooky_with(upstream_yaml(&[(&a, 1), (&b, 1)], ""));
    let addr = spooky.addr;
    let upload = std::thread::spawn(move || {
        let mut c = H3Client::connect(addr, "localhost").unwrap();
        c.timeout = Duration::from_secs(60);
        let n: u64 = 4 << 30;
        c.send(Request {
            method: "POST".into(),
            path: "/echo".into(),
            headers: vec![("content-length".into(), n.to_string())],
            body: Body::Pattern(n),
        })
    });
    // Wait until one backend has the POST, then kill it mid-upload.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (victim_is_a, other_posts_before) = loop {
        assert!(Instant::now() < deadline, "POST never reached a backend");
        if a.stat("posts") == 1 {
            break (true, b.stat("posts"));
        }
        if b.stat("posts") == 1 {
            break (false, a.stat("posts"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(other_posts_before, 0);
    std::thread::sleep(Duration::from_millis(100));
    if victim_is_a {
        a.kill();
    } else {
        b.kill();
    }
    match upload.join().unwrap() {
        Ok(r) => assert_eq!(
            r.status,
            502,
            "a POST whose backend died must fail: {}",
            r.text()
        ),
        Err(ClientError::StreamReset { .. }) => {}
        Err(e) => panic!("unexpected client error: {e}"),
    }
    let survivor_posts = if victim_is_a {
        b.stat("posts")
    } else {
        a.stat("posts")
    };
    assert_eq!(
        survivor_posts, 0,
        "the POST was replayed on the other backend"
    );
}
