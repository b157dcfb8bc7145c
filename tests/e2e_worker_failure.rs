//! A worker that dies is not silent: the debug-only fault hook
//! (`SPOOKY_FAULT_INJECT`, `src/runtime/fault.rs`) makes worker 1 of 2
//! panic or fail; the failure is logged at once, `/ready` answers 503, and
//! the process drains the other worker and exits 1 (`io.on_worker_failure:
//! exit`, the default) or keeps serving on it with `/ready` held at 503
//! (`continue`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use crate::common::{http1_get, Backend, H3Client, Options, Spooky};

/// When the injected fault fires, after the worker starts: long enough for
/// the harness to see `/ready` 200 and to place a request first.
const FAULT_AFTER_MS: u64 = 2000;
/// How long the in-flight request takes at the backend: it spans the fault,
/// so the drain that follows must wait for it.
const SLOW_MS: u64 = 3000;
/// Exit code of a process whose worker failed.
const EXIT_WORKER_FAILED: i32 = 1;

fn start(fault: &str, policy: Option<&str>, backend: &Backend) -> Spooky {
    let mut o = Options::new(&[backend]);
    o.io_extra = match policy {
        Some(p) => format!("workers: 2, on_worker_failure: {p}"),
        None => "workers: 2".into(),
    };
    o.env = vec![(
        "SPOOKY_FAULT_INJECT".into(),
        format!("{fault}_worker:1:after_ms={FAULT_AFTER_MS}"),
    )];
    Spooky::start_with(o)
}

/// A client whose connection the surviving worker 0 owns: the server's
/// connection IDs name their worker in octet 3 (QUIC-LB layout).
fn client_on_worker_0(s: &Spooky) -> H3Client {
    for _ in 0..64 {
        let c = s.client();
        if c.quic().destination_id().get(3) == Some(&0) {
            return c;
        }
    }
    panic!("64 connections and none on worker 0:\n{}", s.log());
}

/// Polls `/ready` until it answers 503 (`Some(body)`) or `limit` passes.
fn ready_503_within(s: &Spooky, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some((503, body)) = http1_get(s.admin, "/ready") {
            return Some(body);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Default policy: the panic is logged, `/ready` turns 503 while the other
/// worker drains (its in-flight request still completes), then exit 1.
fn exits_after_failure(fault: &str, logged: &str) {
    let b = Backend::start("alpha");
    let mut s = start(fault, None, &b);
    let mut c = client_on_worker_0(&s);
    let slow = std::thread::spawn(move || c.get(&format!("/slow?ms={SLOW_MS}")));
    let body = ready_503_within(&s, Duration::from_millis(FAULT_AFTER_MS + 2000));
    assert_eq!(
        body.as_deref(),
        Some("not ready: 1 worker(s) failed\n"),
        "{}",
        s.log()
    );
    let code = s.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(EXIT_WORKER_FAILED), "{}", s.log());
    let log = s.log();
    assert!(log.contains("worker failed"), "{log}");
    assert!(log.contains(logged), "{log}");
    assert!(log.contains("io.on_worker_failure: exit"), "{log}");
    // The survivor drained gracefully: the request spanning the failure
    // got its whole answer.
    let r = slow.join().unwrap().expect("in-flight request on worker 0");
    assert_eq!(r.status, 200);
}

#[test]
fn worker_panic_makes_ready_503_and_exits_1() {
    exits_after_failure("panic", "panic: fault injected into worker 1");
}

#[test]
fn worker_error_makes_ready_503_and_exits_1() {
    exits_after_failure("error", "error: fault injected into worker 1");
}

/// `continue`: the survivor keeps serving new connections, `/ready` stays
/// 503 (a restart is due; balancers should move traffic away), and the
/// process exits 1 on SIGTERM because a worker failed.
#[test]
fn continue_keeps_serving_with_ready_503() {
    let b = Backend::start("alpha");
    let mut s = start("panic", Some("continue"), &b);
    let body = ready_503_within(&s, Duration::from_millis(FAULT_AFTER_MS + 2000));
    assert_eq!(
        body.as_deref(),
        Some("not ready: 1 worker(s) failed\n"),
        "{}",
        s.log()
    );
    assert!(
        s.log().contains("io.on_worker_failure: continue"),
        "{}",
        s.log()
    );
    // New connections land on the surviving socket (the dead worker's one
    // left the reuseport group) and are served.
    for i in 0..6 {
        let r = s
            .client()
            .get("/")
            .unwrap_or_else(|e| panic!("request {i} after the failure: {e}\n{}", s.log()));
        assert_eq!(r.status, 200);
    }
    assert_eq!(s.wait_exit(Duration::from_millis(500)), None, "it exited");
    assert_eq!(
        http1_get(s.admin, "/ready").map(|(st, _)| st),
        Some(503),
        "/ready must stay 503 until a restart"
    );
    assert_eq!(s.terminate(), Some(EXIT_WORKER_FAILED), "{}", s.log());
}
