//! Hostile requests (issue 10): what a client's request causes is the
//! client's error, never a backend's (no 502, no retry, no ejection), and a
//! request the client resets before it is dispatched never reaches a backend.
//! Real spooky process, real HTTP/3 client over UDP, real h2 demo backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::h3client::{ClientError, Request, Response};
use crate::common::{Backend, Spooky};

const H3_MESSAGE_ERROR: u64 = 0x10e;
const H3_REQUEST_REJECTED: u64 = 0x10b;

fn assert_reset(res: Result<Response, ClientError>, code: u64, what: &str) {
    match res {
        Err(ClientError::StreamReset { code: got, .. }) => {
            assert_eq!(got, code, "{what}: reset with {got:#x}, expected {code:#x}")
        }
        Ok(r) => panic!("{what}: expected a reset with {code:#x}, got {}", r.status),
        Err(e) => panic!("{what}: expected a reset with {code:#x}, got {e}"),
    }
}

/// A POST with an empty body: the demo backend counts POSTs apart from the
/// health checker's GETs, so `posts` says exactly what reached it.
fn post(path: &str) -> Request {
    Request::new("POST", path)
}

#[test]
fn malformed_requests_are_the_clients_and_never_reach_or_blame_a_backend() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let spooky = Spooky::start(&[&a, &b]);
    let mut c = spooky.client();
    let mut cases: Vec<(&str, Request, &str)> = Vec::new();
    for _ in 0..10 {
        cases.push(("te: gzip", post("/echo").header("te", "gzip"), "te"));
        cases.push((
            "content-length: +0",
            post("/echo").header("content-length", "+0"),
            "content_length",
        ));
    }
    cases.push(("path with a space", post("/a b"), "path"));
    cases.push(("path with a control byte", post("/a\x01b"), "path"));
    cases.push(("path with a DEL byte", post("/a\x7fb"), "path"));
    for (what, req, _) in &cases {
        assert_reset(c.send(req.clone()), H3_MESSAGE_ERROR, what);
    }
    for reason in ["te", "content_length", "path"] {
        let want = cases.iter().filter(|(_, _, r)| *r == reason).count() as f64;
        let label = format!("reason=\"{reason}\"");
        assert_eq!(
            spooky.metric("spooky_requests_malformed_total", &[&label]),
            want,
            "{reason}"
        );
    }
    assert_eq!(spooky.metric("spooky_balancer_picks_total", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_ejections_total", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_retries_total", &[]), 0.0);
    assert_eq!(
        a.stat("posts") + b.stat("posts"),
        0,
        "a malformed request reached a backend"
    );
    // The connection and both backends are still fine.
    for _ in 0..4 {
        assert_eq!(c.get("/id").expect("GET /id").status, 200);
    }
}

#[test]
fn te_trailers_in_any_case_is_forwarded_lowercase() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    for v in ["trailers", "Trailers", "TRAILERS"] {
        let r = c
            .send(Request::get("/headers").header("te", v))
            .expect("GET /headers");
        assert_eq!(r.status, 200, "te: {v}");
        let body = r.text();
        assert!(
            body.contains("\"te\":\"trailers\""),
            "te: {v} forwarded as {body}"
        );
    }
    assert_eq!(spooky.metric("spooky_upstream_ejections_total", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_requests_malformed_total", &[]), 0.0);
}

#[test]
fn connect_is_rejected_with_h3_request_rejected() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    let res = c.send_header_list(&[
        (b":method", b"CONNECT"),
        (b":authority", b"example.com:443"),
    ]);
    assert_reset(res, H3_REQUEST_REJECTED, "CONNECT");
    assert_eq!(spooky.metric("spooky_balancer_picks_total", &[]), 0.0);
    assert_eq!(c.get("/id").expect("GET /id").status, 200);
}

#[test]
fn streams_reset_before_dispatch_never_reach_the_backend() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    const STREAMS: usize = 300;
    let opened = c
        .open_and_reset(&post("/echo"), STREAMS)
        .expect("open and reset");
    assert_eq!(opened, STREAMS);
    // A request after the resets: once it is answered, spooky has handled
    // every earlier stream of this connection.
    assert_eq!(c.get("/id").expect("GET /id").status, 200);
    let skipped = spooky.metric("spooky_requests_cancelled_before_dispatch_total", &[]);
    let reached = a.stat("posts") as f64;
    eprintln!("{STREAMS} reset streams: {skipped} never dispatched, {reached} reached the backend");
    assert!(skipped >= 1.0, "no stream was reset before its dispatch");
    assert!(
        reached + skipped <= STREAMS as f64,
        "a stream counted as reset before dispatch reached the backend \
         ({reached} reached + {skipped} skipped > {STREAMS})"
    );
    assert_eq!(spooky.metric("spooky_upstream_ejections_total", &[]), 0.0);
}
