//! Minimal admin HTTP/1.1 server: `/metrics`, `/health`, `/ready`.
//!
//! Plain hyper 1 with one task per connection. On shutdown it stops accepting,
//! asks open connections to finish their current request and close, and waits
//! for them for at most [`DRAIN_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::telemetry::MetricsRegistry;

/// `Content-Type` of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `serve` waits for open connections after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<MetricsRegistry>,
    /// `/ready` answers 200 while set, 503 otherwise.
    pub ready: AtomicBool,
}

impl AdminState {
    /// Not ready until [`AdminState::ready`] is set.
    pub fn new(metrics: Arc<MetricsRegistry>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            ready: AtomicBool::new(false),
        })
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("admin: listening on http://{addr}");
    }
    // Every connection task holds a receiver: `send` asks them to wind down,
    // and `closed` resolves once the last one has finished.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            res = listener.accept() => match res {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!("admin: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(stream, Arc::clone(&state), stop_rx.clone()));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("admin: connections still open after {DRAIN_TIMEOUT:?}; leaving them");
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) {
    let svc = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(route(&req, &state)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        // Only ever set to `true`; an error means `serve` is gone: stop too.
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!("admin: connection error: {e}");
    }
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/health" | "/ready") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match path {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            );
            r
        }
        "/ready" if state.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::OK, "ok\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::telemetry::WorkerMetrics;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    async fn fetch(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("read timed out")
            .unwrap();
        let raw = String::from_utf8(buf).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("no header end");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("bad status line");
        Reply {
            status,
            head: head.replace("\r\n", "\n"),
            body: body.to_string(),
        }
    }

    #[tokio::test]
    async fn routes() {
        let metrics = MetricsRegistry::new();
        let w = metrics.add_worker();
        WorkerMetrics::add(&w.conns_opened, 42);
        let state = AdminState::new(Arc::clone(&metrics));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&state), async {
            let _ = stop_rx.await;
        }));

        let r = fetch(addr, "GET", "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(r
            .body
            .lines()
            .any(|l| l == "spooky_quic_connections_opened_total 42"));
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);

        let r = fetch(addr, "GET", "/health").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

        let r = fetch(addr, "GET", "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        state.ready.store(true, Ordering::Relaxed);
        let r = fetch(addr, "GET", "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

        let r = fetch(addr, "GET", "/nope").await;
        assert_eq!(r.status, 404);
        let r = fetch(addr, "POST", "/nope").await;
        assert_eq!(r.status, 404);

        let r = fetch(addr, "POST", "/metrics").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET"));
        let r = fetch(addr, "DELETE", "/ready").await;
        assert_eq!(r.status, 405);

        // Query strings do not change the route.
        let r = fetch(addr, "GET", "/health?x=1").await;
        assert_eq!(r.status, 200);

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
    }

    /// An idle keep-alive connection does not hold shutdown up.
    #[tokio::test]
    async fn shutdown_closes_idle_keepalive() {
        let state = AdminState::new(MetricsRegistry::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stop_rx.await;
        }));

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve waited on an idle connection")
            .unwrap();
        // The server closed its side.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest))
            .await
            .expect("connection left open")
            .unwrap();
        assert_eq!(n, 0);
    }
}
