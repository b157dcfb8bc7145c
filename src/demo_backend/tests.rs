#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Request, StatusCode};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{run_with_shutdown, wait_capacity, PATTERN_PERIOD};

/// A backend on 127.0.0.1:0, stopped when dropped.
struct Backend {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let name = name.to_owned();
    tokio::spawn(async move {
        run_with_shutdown(listener, name, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Backend { addr, _stop: stop }
}

async fn connect(addr: SocketAddr) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

fn get_req(addr: SocketAddr, path: &str) -> Request<()> {
    Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn read_all(mut body: RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        out.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    Ok((out, trailers))
}

async fn send(client: &mut SendRequest<Bytes>, req: Request<()>) -> Got {
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    let (parts, body) = resp.into_parts();
    let (body, trailers) = read_all(body).await.unwrap();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    }
}

async fn get(client: &mut SendRequest<Bytes>, addr: SocketAddr, path: &str) -> Got {
    send(client, get_req(addr, path)).await
}

/// The `/stats` counter `key`.
async fn stat(client: &mut SendRequest<Bytes>, addr: SocketAddr, key: &str) -> u64 {
    let body = get(client, addr, "/stats").await.text();
    let needle = format!("\"{key}\":");
    let start = body.find(&needle).unwrap() + needle.len();
    body[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Polls `/stats` until `key` reaches `min` (up to 2 s).
async fn await_stat(client: &mut SendRequest<Bytes>, addr: SocketAddr, key: &str, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v = stat(client, addr, key).await;
        if v >= min || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn id_root_health_and_backend_header() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let r = get(&mut c, b.addr, "/id").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "alpha");
    assert_eq!(r.headers["x-backend"], "alpha");
    assert_eq!(r.headers["content-length"], "5");
    assert_eq!(get(&mut c, b.addr, "/").await.text(), "hello from alpha\n");
    assert_eq!(get(&mut c, b.addr, "/health").await.text(), "ok");
    let r = get(&mut c, b.addr, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.text(), "not found\n");
    assert_eq!(r.headers["x-backend"], "alpha");
    let r = get(&mut c, b.addr, "/bytes/xyz").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bytes_ten_million_follow_the_pattern() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let n: u64 = 10_000_000;
    let (resp, _) = c
        .send_request(get_req(b.addr, &format!("/bytes/{n}")), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], n.to_string().as_str());
    let mut body = resp.into_body();
    let mut offset = 0u64;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        for (k, &byte) in chunk.iter().enumerate() {
            let i = offset + k as u64;
            assert_eq!(byte, (i % PATTERN_PERIOD) as u8, "byte {i}");
        }
        offset += chunk.len() as u64;
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert_eq!(offset, n);
    assert_eq!(get(&mut c, b.addr, "/bytes/0").await.body.len(), 0);
}

#[tokio::test]
async fn echo_twenty_mib_streamed() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let total: usize = 20 * 1024 * 1024;
    let req = Request::post(format!("http://{}/echo", b.addr))
        .body(())
        .unwrap();
    let (resp, mut up) = c.send_request(req, false).unwrap();
    // A 64 KiB block of a different pattern, sent repeatedly under flow
    // control (the client side of the same capacity dance).
    let block: Bytes = (0..64 * 1024u32)
        .map(|i| (i % 199) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut expect = Sha256::new();
    let mut sent = 0usize;
    while sent < total {
        let want = (total - sent).min(block.len());
        let n = wait_capacity(&mut up, want).await.unwrap();
        let piece = block.slice(0..n);
        expect.update(&piece);
        sent += n;
        up.send_data(piece, sent == total).unwrap();
    }
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let (body, _) = read_all(resp.into_body()).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    let want = format!(
        "{{\"length\":{total},\"sha256\":\"{}\"}}",
        hex::encode(expect.finalize())
    );
    assert_eq!(body, want);
    assert_eq!(stat(&mut c, b.addr, "posts").await, 1);
}

#[tokio::test]
async fn echo_with_request_trailers() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let req = Request::put(format!("http://{}/echo", b.addr))
        .body(())
        .unwrap();
    let (resp, mut up) = c.send_request(req, false).unwrap();
    up.send_data(Bytes::from_static(b"abc"), false).unwrap();
    let mut t = HeaderMap::new();
    t.insert("x-sum", "1".parse().unwrap());
    up.send_trailers(t).unwrap();
    let (body, _) = read_all(resp.await.unwrap().into_body()).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(
        body,
        "{\"length\":3,\"sha256\":\"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"}"
    );
}

#[tokio::test]
async fn status_codes() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let r = get(&mut c, b.addr, "/status/503").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text(), "status 503\n");
    assert_eq!(r.headers["x-backend"], "alpha");
    assert_eq!(
        get(&mut c, b.addr, "/status/101").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&mut c, b.addr, "/status/600").await.status,
        StatusCode::BAD_REQUEST
    );
    let r = get(&mut c, b.addr, "/status/204").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn headers_as_json_with_traceparent_echo() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::get(format!("http://{}/headers?x=1", b.addr))
        .header("traceparent", trace)
        .header("X-Forwarded-For", "127.0.0.1")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("x-quote", "say \"hi\"\\")
        .body(())
        .unwrap();
    let r = send(&mut c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["traceparent"], trace);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.text();
    assert!(
        body.starts_with("{\":method\":\"GET\",\":path\":\"/headers?x=1\""),
        "{body}"
    );
    assert!(
        body.contains(&format!("\":authority\":\"{}\"", b.addr)),
        "{body}"
    );
    assert!(body.contains("\":scheme\":\"http\""), "{body}");
    assert!(body.contains("\"x-forwarded-for\":\"127.0.0.1\""), "{body}");
    assert!(body.contains("\"x-multi\":\"a, b\""), "{body}");
    assert!(body.contains(r#""x-quote":"say \"hi\"\\""#), "{body}");
    assert!(
        body.contains(&format!("\"traceparent\":\"{trace}\"")),
        "{body}"
    );
    assert!(body.ends_with('}'), "{body}");
}

#[tokio::test]
async fn trailers_arrive() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let r = get(&mut c, b.addr, "/trailers").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "with trailers\n");
    let trailers = r.trailers.expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc");
}

#[tokio::test]
async fn client_reset_mid_download_is_counted() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let (resp, mut req_stream) = c
        .send_request(get_req(b.addr, "/bytes/1000000000"), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(first[1], 1);
    req_stream.send_reset(Reason::CANCEL);
    drop(body);
    let resets = await_stat(&mut c, b.addr, "resets", 1).await;
    assert!(resets >= 1, "backend never saw the RST_STREAM");
    assert_eq!(stat(&mut c, b.addr, "active").await, 0);
    // The connection still serves.
    assert_eq!(get(&mut c, b.addr, "/id").await.text(), "alpha");
}

#[tokio::test]
async fn client_reset_during_slow_is_counted() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;
    let started = Instant::now();
    let (resp, mut req_stream) = c
        .send_request(get_req(b.addr, "/slow?ms=30000"), true)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    req_stream.send_reset(Reason::CANCEL);
    drop(resp);
    assert!(await_stat(&mut c, b.addr, "resets", 1).await >= 1);
    assert_eq!(stat(&mut c, b.addr, "active").await, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = get(&mut c, b.addr, "/slow?ms=10").await;
    assert_eq!(r.text(), "slow 10\n");
}

#[tokio::test]
async fn upstream_resets() {
    let b = start("alpha").await;
    let mut c = connect(b.addr).await;

    // Headers and 1000 bytes, then RST_STREAM(INTERNAL_ERROR).
    let (resp, _) = c.send_request(get_req(b.addr, "/reset"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let err = loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                got += chunk.len();
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            Some(Err(e)) => break e,
            None => panic!("stream ended cleanly after {got} bytes"),
        }
    };
    assert_eq!(got, 1000);
    assert_eq!(err.reason(), Some(Reason::INTERNAL_ERROR));

    let (resp, _) = c
        .send_request(get_req(b.addr, "/reset-before-headers"), true)
        .unwrap();
    let err = resp.await.unwrap_err();
    assert_eq!(err.reason(), Some(Reason::INTERNAL_ERROR));

    let (resp, _) = c.send_request(get_req(b.addr, "/refuse"), true).unwrap();
    let err = resp.await.unwrap_err();
    assert_eq!(err.reason(), Some(Reason::REFUSED_STREAM));

    // None of those were client resets.
    assert_eq!(stat(&mut c, b.addr, "resets").await, 0);
    assert_eq!(get(&mut c, b.addr, "/id").await.text(), "alpha");
}

#[tokio::test]
async fn concurrent_streams_on_one_connection() {
    let b = start("alpha").await;
    let c = connect(b.addr).await;
    let tasks: Vec<_> = (0..200usize)
        .map(|i| {
            let c = c.clone();
            let addr = b.addr;
            tokio::spawn(async move {
                let mut c = c.ready().await.unwrap_or_else(|e| panic!("{e}"));
                let r = get(&mut c, addr, &format!("/bytes/{}", 1000 + i)).await;
                assert_eq!(r.body.len(), 1000 + i);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c;
    assert_eq!(stat(&mut c, b.addr, "requests").await, 201);
}

#[test]
fn entry_points_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    assert_send(&super::run(addr, "x".into()));
    let std = std::net::TcpListener::bind(addr).unwrap();
    std.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let listener = TcpListener::from_std(std).unwrap();
    assert_send(&run_with_shutdown(
        listener,
        "x".into(),
        std::future::pending(),
    ));
}
