//! Failures are explicit: the right status or stream error, never a hang,
//! never a truncated 200, never a crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::h3client::{raw_socket_send, Body, ClientError, Request};
use crate::common::{free_tcp_port, Backend, Options, Spooky};

#[test]
fn backend_down_gives_502_within_connect_timeout() {
    let dead = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let mut o = Options::new(&[]);
    o.backends = vec![dead];
    o.connect_ms = 500;
    let spooky = Spooky::start_with(o);
    let mut c = spooky.client();
    for _ in 0..3 {
        let started = Instant::now();
        let r = c.get("/").unwrap();
        assert!(
            r.status == 502 || r.status == 503,
            "status {} body {}",
            r.status,
            r.text()
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(spooky.metric("spooky_requests_total", &["5xx"]) >= 3.0);
}

#[test]
fn slow_backend_beyond_request_timeout_gives_504() {
    let a = Backend::start("alpha");
    let mut o = Options::new(&[&a]);
    o.request_ms = 300;
    let spooky = Spooky::start_with(o);
    let mut c = spooky.client();
    let started = Instant::now();
    let r = c.get("/slow?ms=3000").unwrap();
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_millis(2000));
    // The backend saw its stream cancelled.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stat("resets") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.stat("resets") >= 1);
    // A fast request on the same connection still works.
    assert_eq!(c.get("/slow?ms=10").unwrap().status, 200);
}

#[test]
fn client_cancel_mid_download_resets_the_backend_stream() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    let before = a.stat("resets");
    let got = c.get_and_cancel("/bytes/1073741824", 1024 * 1024).unwrap();
    assert!(got >= 1024 * 1024);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stat("resets") <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.stat("resets") > before, "backend never saw RST_STREAM");
    assert_eq!(a.stat("active"), 0);
    // The connection is still usable.
    assert_eq!(c.get("/id").unwrap().text(), "alpha");
}

#[test]
fn upstream_reset_mid_body_resets_the_client_stream() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    match c.get("/reset") {
        Err(ClientError::StreamReset { .. }) => {}
        Ok(r) => panic!(
            "expected a stream reset, got status {} with {} bytes",
            r.status,
            r.body.len()
        ),
        Err(e) => panic!("expected a stream reset, got {e}"),
    }
    let r = c.get("/reset-before-headers").unwrap();
    assert_eq!(r.status, 502);
    let r = c.get("/refuse").unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(c.get("/id").unwrap().status, 200);
}

#[test]
fn oversize_headers_get_431() {
    let a = Backend::start("alpha");
    let mut o = Options::new(&[&a]);
    // Small enough that the oversize header block still fits the client's
    // initial congestion window (quiche sends a header block in one go).
    o.max_request_header_bytes = 4096;
    let spooky = Spooky::start_with(o);
    let mut c = spooky.client();
    let r = c
        .send(Request {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("x-big".into(), "a".repeat(8 * 1024))],
            body: Body::Empty,
        })
        .unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(c.get("/id").unwrap().status, 200);
}

#[test]
fn malformed_request_gets_h3_message_error() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    let res = c.send(Request {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![("connection".into(), "close".into())],
        body: Body::Empty,
    });
    match res {
        Err(ClientError::StreamReset { code, .. }) => assert_eq!(code, 0x10e),
        other => panic!("expected H3_MESSAGE_ERROR, got {other:?}"),
    }
    assert!(spooky.metric("spooky_requests_malformed_total", &[]) >= 1.0);
    assert_eq!(c.get("/id").unwrap().status, 200);
}

#[test]
fn unknown_route_gets_404() {
    let a = Backend::start("alpha");
    let mut o = Options::new(&[&a]);
    o.extra =
        "routes:\n  - { host: \"api.example.com\", path_prefix: \"/\", upstream: app }\n".into();
    let spooky = Spooky::start_with(o);
    let mut c = spooky.client();
    assert_eq!(c.get("/").unwrap().status, 404);
}

#[test]
fn garbage_datagrams_are_dropped_and_counted() {
    let a = Backend::start("alpha");
    let spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().status, 200);
    // Pure garbage, empty, a truncated long header, a short header for an
    // unknown connection, and an undersized Initial.
    raw_socket_send(spooky.addr, b"").unwrap();
    raw_socket_send(spooky.addr, b"\xff\xff\xff").unwrap();
    raw_socket_send(spooky.addr, &[0xc0, 0, 0, 0, 1, 20]).unwrap();
    raw_socket_send(spooky.addr, &[0x40; 64]).unwrap();
    let mut initial = vec![
        0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x40, 0x10,
    ];
    initial.resize(300, 0);
    raw_socket_send(spooky.addr, &initial).unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1400)).map(|j| (j * 31 + i) as u8).collect();
        raw_socket_send(spooky.addr, &junk).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let dropped = spooky.metric("spooky_quic_datagrams_dropped_total", &[]);
    assert!(dropped >= 100.0, "dropped {dropped}");
    // Still serving, on the old connection and on a new one.
    assert_eq!(c.get("/id").unwrap().status, 200);
    let mut c2 = spooky.client();
    assert_eq!(c2.get("/id").unwrap().status, 200);
}

#[test]
fn sigterm_closes_connections_with_h3_no_error_and_exits_zero() {
    let a = Backend::start("alpha");
    let mut spooky = Spooky::start(&[&a]);
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().status, 200);
    let code = spooky.terminate();
    assert_eq!(code, Some(0), "spooky must exit 0 on SIGTERM");
    let _ = c.drive_for(Duration::from_millis(300));
    let q = c.quic();
    let err = q
        .peer_error()
        .expect("the client must see spooky's CONNECTION_CLOSE");
    assert!(err.is_app, "{err:?}");
    assert_eq!(err.error_code, 0x100, "H3_NO_ERROR expected: {err:?}");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let a = Backend::start("alpha");
    let mut spooky = Spooky::start(&[&a]);
    let addr = spooky.addr;
    let slow = std::thread::spawn(move || {
        let mut c = crate::common::H3Client::connect(addr, "localhost").unwrap();
        c.get("/slow?ms=1500")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stat("active") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.stat("active"), 1, "the slow request should be in flight");
    let pid = spooky.pid().unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-15")
        .arg(pid.to_string())
        .status();
    std::thread::sleep(Duration::from_millis(200));
    // Draining: new connections are refused...
    let opts = crate::common::h3client::ClientOptions {
        idle_timeout_ms: 500,
        ..Default::default()
    };
    assert!(
        crate::common::H3Client::connect_with(addr, "localhost", opts).is_err(),
        "a draining spooky must not accept new connections"
    );
    // ...while the in-flight request completes.
    let r = slow.join().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow 1500\n");
    assert_eq!(spooky.terminate(), Some(0));
}
