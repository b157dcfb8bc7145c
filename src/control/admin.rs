//! Admin HTTP/1.1 server: `GET /metrics`, `/health`, `/ready`, `/config`,
//! `/backends` and `POST /reload`.
//!
//! When the admin address is not loopback, `/config` and `/reload` require
//! `Authorization: Bearer <token>`, the token being the (trimmed) content of
//! `admin.token_file`, read on each such request so that a rotated token
//! applies at once. The token is never logged nor shown.
//!
//! Plain hyper 1 with one task per connection. On shutdown it stops accepting,
//! asks open connections to finish their current request and close, and waits
//! for them for at most [`DRAIN_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, VARY, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::reload::{ConfigStore, ReloadOutcome};
use crate::telemetry::backends::BackendBoard;
use crate::telemetry::MetricsRegistry;

use crate::telemetry::exposition::Format;
/// `Content-Type` of `/metrics` for scrapers that accept OpenMetrics.
pub use crate::telemetry::exposition::OPENMETRICS_CONTENT_TYPE;
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const APPLICATION_JSON: &str = "application/json";
const APPLICATION_YAML: &str = "application/yaml; charset=utf-8";

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
    /// Worker threads that panicked or failed; any makes `/ready` 503 for
    /// good (the process exits, or runs on the rest with
    /// `io.on_worker_failure: continue`) and names the count in its body.
    pub failed_workers: AtomicUsize,
    /// Per-backend state the workers publish; `/backends` serves it.
    pub backends: Arc<BackendBoard>,
    /// The config in effect and reloads; `None` (no `/config`, `/reload`)
    /// only in unit tests of the other endpoints.
    pub config: Option<Arc<ConfigStore>>,
}

impl AdminState {
    /// Not ready until [`AdminState::ready`] is set; no config store.
    pub fn new(metrics: Arc<MetricsRegistry>) -> Arc<Self> {
        let backends = Arc::new(BackendBoard::default());
        metrics.attach_board(Arc::clone(&backends));
        Arc::new(Self {
            metrics,
            ready: AtomicBool::new(false),
            backends,
            failed_workers: AtomicUsize::new(0),
            config: None,
        })
    }

    /// The state `spooky` runs with.
    pub fn with_control(
        metrics: Arc<MetricsRegistry>,
        backends: Arc<BackendBoard>,
        config: Arc<ConfigStore>,
    ) -> Arc<Self> {
        metrics.attach_board(Arc::clone(&backends));
        Arc::new(Self {
            metrics,
            ready: AtomicBool::new(false),
            failed_workers: AtomicUsize::new(0),
            backends,
            config: Some(config),
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
        async move { Ok::<_, Infallible>(route(&req, &state).await) }
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

async fn route(req: &Request<Incoming>, state: &Arc<AdminState>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (allowed, allow_header) = match path {
        "/metrics" | "/health" | "/ready" | "/config" | "/backends" => (Method::GET, "GET"),
        "/reload" => (Method::POST, "POST"),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if req.method() != allowed {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow_header));
        return r;
    }
    if matches!(path, "/config" | "/reload") {
        let Some(store) = state.config.as_ref() else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        if let Err(r) = authorize(req, store) {
            return r;
        }
    }
    match path {
        "/metrics" => metrics(req, state),
        "/ready" => ready(state),
        "/backends" => json(StatusCode::OK, &state.backends.aggregated()),
        "/config" => match state.config.as_ref() {
            Some(store) => {
                let snap = store.current();
                let body = format!(
                    "# generation {}\n{}",
                    snap.generation,
                    redacted_yaml(&snap.config)
                );
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(APPLICATION_YAML));
                r
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        "/reload" => match state.config.as_ref() {
            Some(store) => {
                let store = Arc::clone(store);
                // Reading the file and loading TLS files block.
                match tokio::task::spawn_blocking(move || store.reload("admin")).await {
                    Ok(out) => {
                        let status = if out.is_ok() {
                            StatusCode::OK
                        } else {
                            StatusCode::UNPROCESSABLE_ENTITY
                        };
                        json(status, &out)
                    }
                    Err(e) => {
                        tracing::error!("admin: reload task failed: {e}");
                        json(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &ReloadOutcome::Rejected {
                                ok: false,
                                errors: vec!["internal error during reload".into()],
                            },
                        )
                    }
                }
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        _ => text(StatusCode::OK, "ok\n"),
    }
}

/// `/metrics` in the format the scraper's `Accept` asks for: OpenMetrics
/// when it lists `application/openmetrics-text`, else Prometheus text 0.0.4.
fn metrics(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    let mut r = Response::new(Full::new(Bytes::from(state.metrics.render_as(format))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r.headers_mut()
        .insert(VARY, HeaderValue::from_static("Accept"));
    r
}

/// The effective config as YAML with secrets left out. The config holds no
/// secret itself (the token lives in `admin.token_file`, whose path is
/// shown but never its content); this is the one place to redact should
/// one be added.
fn redacted_yaml(cfg: &crate::config::Config) -> String {
    cfg.to_yaml()
}

/// `Err(response)` unless the request may use `/config` and `/reload`:
/// always on a loopback admin address, else with the bearer token.
#[allow(clippy::result_large_err)]
fn authorize(req: &Request<Incoming>, store: &ConfigStore) -> Result<(), Response<Full<Bytes>>> {
    let cfg = store.current().config.clone();
    if cfg.admin.address.ip().is_loopback() {
        return Ok(());
    }
    let deny = |status, msg: &'static str| {
        let mut r = text(status, msg);
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let expected = cfg
        .admin
        .token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let Some(expected) = expected else {
        tracing::warn!(
            "admin: token file missing, unreadable or empty; refusing /config and /reload"
        );
        return Err(deny(StatusCode::FORBIDDEN, "no admin token configured\n"));
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(deny(StatusCode::UNAUTHORIZED, "unauthorized\n")),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"errors\":[\"cannot encode: {e}\"]}}").into_bytes()
    });
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
    r
}

/// `GET /ready`: 200 while serving; 503 before the listener is up, while
/// shutting down, and for good once a worker failed (the body says so, for
/// whoever reads the probe's output).
fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let failed = state.failed_workers.load(Ordering::Relaxed);
    if failed > 0 {
        let body = format!("not ready: {failed} worker(s) failed\n");
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
        return r;
    }
    if state.ready.load(Ordering::Relaxed) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
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
    use crate::telemetry::exposition::PROMETHEUS_TEXT_CONTENT_TYPE;
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
        fetch_with(addr, method, path, "").await
    }

    async fn fetch_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Reply {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\n{headers}Connection: close\r\n\r\n"
        );
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

        // A scraper that accepts OpenMetrics gets it.
        let r = fetch_with(
            addr,
            "GET",
            "/metrics",
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(r
            .body
            .lines()
            .any(|l| l == "spooky_quic_connections_opened_total 42"));
        assert!(r
            .body
            .lines()
            .any(|l| l == "# TYPE spooky_quic_connections_opened counter"));
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
        // Anyone else (curl, promtool) gets the Prometheus text format.
        let r = fetch(addr, "GET", "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(PROMETHEUS_TEXT_CONTENT_TYPE));
        assert_eq!(r.header("vary"), Some("Accept"));
        assert!(r
            .body
            .lines()
            .any(|l| l == "# TYPE spooky_quic_connections_opened_total counter"));
        assert!(r
            .body
            .lines()
            .any(|l| l == "spooky_quic_connections_opened_total 42"));
        assert!(!r.body.contains("# EOF"), "{}", r.body);

        let r = fetch(addr, "GET", "/health").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

        let r = fetch(addr, "GET", "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        state.ready.store(true, Ordering::Relaxed);
        let r = fetch(addr, "GET", "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        // A failed worker makes it 503 even with the ready flag still set.
        state.failed_workers.store(1, Ordering::Relaxed);
        let r = fetch(addr, "GET", "/ready").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (503, "not ready: 1 worker(s) failed\n")
        );
        state.failed_workers.store(0, Ordering::Relaxed);

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
