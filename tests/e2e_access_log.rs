//! The access log to a file (`telemetry.access_log_path`): one JSON line
//! per request with the fields docs/operations.md lists, and the reopen on
//! SIGUSR1 that logrotate relies on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::h3client::{Body, Request};
use crate::common::{Backend, Options, Spooky};

/// The lines of `path` as JSON, once it has at least `n` (lines are
/// written by spooky's access-log thread, a little after the response).
fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = text.ends_with('\n') || text.is_empty();
        if complete && text.lines().count() >= n {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, expected {n}:\n{text}",
            path.display(),
            text.lines().count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hex_len(v: &serde_json::Value) -> usize {
    let s = v.as_str().unwrap_or_default();
    assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "not hex: {s}");
    s.len()
}

#[test]
fn access_log_file_has_one_line_per_request_and_reopens_on_sigusr1() {
    let backend = Backend::start("alpha");
    let mut o = Options::new(&[&backend]);
    o.telemetry_extra = "access_log_path: access.log".into();
    let spooky = Spooky::start_with(o);
    let path = spooky.dir.path().join("access.log");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";

    let mut client = spooky.client();
    let port = client.local_addr().port();
    let cid = hex::encode(client.quic().destination_id().as_ref());
    let r = client
        .send(
            Request::get("/bytes/1000")
                .header("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(client.get("/bytes/1000").unwrap().status, 200);
    let r = client
        .send(Request::post("/echo", Body::Pattern(500)))
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(client.get("/status/404").unwrap().status, 404);

    let lines = wait_lines(&path, 4);
    let text = std::fs::read_to_string(&path).unwrap();
    eprintln!(
        "first access line: {}",
        text.lines().next().unwrap_or_default()
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let backend_addr = backend.addr.to_string();
    for l in &lines {
        assert_eq!(l["type"], "access", "{l}");
        assert_eq!(l["client_ip"], "127.0.0.1", "{l}");
        assert_eq!(l["client_port"], port, "{l}");
        assert_eq!(l["conn_id"], cid.as_str(), "{l}");
        assert_eq!(hex_len(&l["conn_id"]), 40, "{l}");
        assert_eq!(l["upstream"], "app", "{l}");
        assert_eq!(l["backend"], backend_addr.as_str(), "{l}");
        assert_eq!(l["outcome"], "ok", "{l}");
        assert_eq!(hex_len(&l["trace_id"]), 32, "{l}");
        assert!(l["request_id"].as_u64().unwrap() > 0, "{l}");
        let total = l["duration_ms"].as_f64().unwrap();
        let upstream = l["upstream_ms"].as_f64().unwrap();
        assert!(upstream > 0.0 && upstream <= total, "{l}");
        assert!(l["ts"].as_str().unwrap().ends_with('Z'), "{l}");
    }
    let ids: std::collections::HashSet<u64> = lines
        .iter()
        .map(|l| l["request_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "request ids not distinct");
    assert_eq!(lines[0]["trace_id"], trace);
    assert_eq!(lines[0]["path"], "/bytes/1000");
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["bytes_out"], 1000);
    assert_eq!(lines[0]["bytes_in"], 0);
    assert_eq!(lines[2]["method"], "POST");
    assert_eq!(lines[2]["bytes_in"], 500);
    assert_eq!(lines[3]["status"], 404);
    // Not on stderr as well.
    assert!(!spooky.log().contains(trace), "{}", spooky.log());

    // logrotate: move the file, then SIGUSR1.
    let rotated = spooky.dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    spooky.signal(10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "no new access.log after SIGUSR1");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3 {
        assert_eq!(client.get("/").unwrap().status, 200);
    }
    let fresh = wait_lines(&path, 3);
    assert_eq!(fresh.len(), 3, "{fresh:#?}");
    assert!(fresh.iter().all(|l| l["path"] == "/"), "{fresh:#?}");
    assert_eq!(wait_lines(&rotated, 4).len(), 4, "old file changed");
    assert_eq!(spooky.metric("spooky_access_log_dropped_total", &[]), 0.0);
    assert!(spooky.log().contains("SIGUSR1"), "{}", spooky.log());
}
