//! The bundled demo backend: a small HTTP/2 (h2c, prior knowledge) server
//! that spooky forwards to in the demo setup and in the end-to-end tests.
//!
//! Every response carries `x-backend: NAME` and echoes the request's
//! `traceparent`. Endpoints:
//!
//! | request                     | response                                          |
//! |-----------------------------|---------------------------------------------------|
//! | `GET /`                     | `hello from NAME\n`                               |
//! | `GET /id`                   | `NAME`                                            |
//! | `GET /bytes/N`              | N pattern bytes, byte i = `i % 251`, streamed     |
//! | `POST`/`PUT /echo`          | `{"length":N,"sha256":"…"}` of the request body   |
//! | `POST`/`PUT /echo?refuse=NAME` | on backend NAME: RST_STREAM(REFUSED_STREAM) once body bytes arrive; elsewhere as `/echo` |
//! | `GET /slow?ms=N`            | `slow N\n` after N ms                             |
//! | `GET /status/N`             | status N, `status N\n` (1xx and junk: 400)        |
//! | `GET /health`               | `ok`                                              |
//! | `GET /headers`              | the request headers (and pseudo-headers) as JSON  |
//! | `GET /trailers`             | `with trailers\n` + trailer `x-checksum: abc`     |
//! | `GET /stats`                | `{"requests":N,"posts":N,"resets":N,"active":N,"peak_active":N}` |
//! | `GET /reset`                | headers, 1000 bytes, then RST_STREAM(INTERNAL_ERROR) |
//! | `GET /reset-before-headers` | RST_STREAM(INTERNAL_ERROR), no headers            |
//! | `GET /refuse`               | RST_STREAM(REFUSED_STREAM), no headers            |
//! | anything else               | 404 `not found\n`                                 |
//!
//! Bodies are sent under real h2 flow control (reserve capacity, wait for
//! it, send only what was granted) and received bodies release their
//! capacity as they are consumed, so multi-GiB transfers run in constant
//! memory. A stream the client resets is noticed (through `poll_reset` or a
//! stream error) and counted in `/stats` as `resets`. `peak_active` is the
//! most streams ever open at once (health checks and `/stats` included), so
//! a test can check that a client kept to the announced
//! SETTINGS_MAX_CONCURRENT_STREAMS ([`DemoOptions::max_concurrent_streams`],
//! `--max-concurrent-streams`).

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

#[cfg(test)]
mod tests;

/// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients by default.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE).
const STREAM_WINDOW: u32 = 1 << 20;
/// Connection-level receive window.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest piece handed to `send_data` at once.
const CHUNK: usize = 64 * 1024;
/// Period of the `/bytes` pattern: byte i is `(i % 251) as u8`.
const PATTERN_PERIOD: u64 = 251;
/// Bytes `/reset` sends before resetting its stream.
const RESET_AFTER_BYTES: u64 = 1000;
/// How long `/reset` leaves its queued frames to reach the wire before the
/// reset (h2 drops still-queued frames of a stream when it is reset).
const RESET_FLUSH_DELAY: Duration = Duration::from_millis(50);
/// A client that connects but never completes the h2 preface is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The listen backlog.
const BACKLOG: u32 = 1024;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const BINARY: &str = "application/octet-stream";

/// Binds `listen` (SO_REUSEADDR), prints `demo-backend NAME listening on
/// ADDR` to stdout (flushed) once bound, then serves h2c forever.
pub async fn run(listen: SocketAddr, name: String) -> io::Result<()> {
    run_with_delay(listen, name, Duration::ZERO).await
}

/// Like [`run`], but every response (other than `/health` and `/stats`)
/// waits `delay` first: a slow backend for latency-aware balancing tests.
pub async fn run_with_delay(listen: SocketAddr, name: String, delay: Duration) -> io::Result<()> {
    let opts = DemoOptions {
        delay,
        ..DemoOptions::default()
    };
    run_with_options(listen, name, opts).await
}

/// How a demo backend behaves beyond its endpoints.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// Added before every response except `/health` and `/stats`.
    pub delay: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced on every connection; h2
    /// refuses streams beyond it with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
        }
    }
}

/// Like [`run`], with [`DemoOptions`].
pub async fn run_with_options(
    listen: SocketAddr,
    name: String,
    opts: DemoOptions,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(name, opts)?);
    let listener = bind(listen)?;
    let local = listener.local_addr()?;
    // A closed stdout must not keep the backend from serving.
    let announced = {
        let mut out = io::stdout().lock();
        writeln!(out, "demo-backend {} listening on {}", shared.name, local)
            .and_then(|()| out.flush())
    };
    if let Err(e) = announced {
        tracing::debug!(error = %e, "demo-backend: cannot print the listening line");
    }
    serve(listener, shared, std::future::pending()).await
}

/// Serves h2c on an already bound `listener` until `shutdown` completes;
/// then stops accepting and asks every open connection to finish gracefully
/// (GOAWAY; streams in flight run on while the runtime lives). Prints
/// nothing (unlike [`run`]). Fails only if `name` is not a valid header
/// value.
pub async fn run_with_shutdown(
    listener: TcpListener,
    name: String,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with_options(listener, name, DemoOptions::default(), shutdown).await
}

/// Like [`run_with_shutdown`], with [`DemoOptions`].
pub async fn serve_with_options(
    listener: TcpListener,
    name: String,
    opts: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve(listener, Arc::new(Shared::new(name, opts)?), shutdown).await
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "demo-backend: TCP_NODELAY failed");
                    }
                    tokio::spawn(serve_connection(shared.clone(), tcp, peer, stop_rx.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::debug!(error = %e, "demo-backend: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    // Connections see the flag (or the sender going away) and send GOAWAY.
    let _ = stop_tx.send(true);
    Ok(())
}

fn bind(listen: SocketAddr) -> io::Result<TcpListener> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(BACKLOG)
}

/// State shared by every connection and stream of one backend.
struct Shared {
    name: String,
    /// `name` as the `x-backend` header value.
    name_value: HeaderValue,
    stats: Stats,
    /// `CHUNK + PATTERN_PERIOD` pattern bytes: any chunk of the `/bytes`
    /// body is a zero-copy slice of it.
    pattern: Bytes,
    /// Added before every response except `/health` and `/stats`.
    delay: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced.
    max_concurrent_streams: u32,
}

impl Shared {
    fn new(name: String, opts: DemoOptions) -> io::Result<Shared> {
        let name_value = HeaderValue::from_str(&name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backend name {name:?} is not a valid header value"),
            )
        })?;
        let pattern: Vec<u8> = (0..CHUNK as u64 + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect();
        Ok(Shared {
            name,
            name_value,
            stats: Stats::default(),
            pattern: Bytes::from(pattern),
            delay: opts.delay,
            max_concurrent_streams: opts.max_concurrent_streams,
        })
    }

    /// `len` pattern bytes starting at body offset `offset`.
    fn pattern_at(&self, offset: u64, len: usize) -> Bytes {
        let start = (offset % PATTERN_PERIOD) as usize;
        self.pattern.slice(start..start + len.min(CHUNK))
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    posts: AtomicU64,
    resets: AtomicU64,
    active: AtomicU64,
    /// The most streams `active` ever reached.
    peak_active: AtomicU64,
}

/// Counts one stream as active for as long as it lives.
struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    fn new(stats: &'a Stats) -> Self {
        let now = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_active.fetch_max(now, Ordering::Relaxed);
        ActiveGuard(&stats.active)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a stream ended early.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    /// The peer reset the stream (RST_STREAM, or GOAWAY excluding it).
    #[error("reset by peer: {0:?}")]
    PeerReset(Reason),
    /// Any other h2 failure (connection lost, protocol error, …).
    #[error(transparent)]
    H2(h2::Error),
    /// The stream can no longer send, for no reason h2 reports.
    #[error("stream closed")]
    Closed,
}

impl From<h2::Error> for StreamEnd {
    fn from(e: h2::Error) -> Self {
        match e.reason() {
            Some(reason) if e.is_remote() => StreamEnd::PeerReset(reason),
            _ => StreamEnd::H2(e),
        }
    }
}

impl StreamEnd {
    fn from_reset(r: Result<Reason, h2::Error>) -> Self {
        match r {
            Ok(reason) => StreamEnd::PeerReset(reason),
            Err(e) => e.into(),
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(shared.max_concurrent_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "demo-backend: h2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "demo-backend: h2 handshake timed out");
            return;
        }
    };
    let mut stopping = *stop.borrow();
    if stopping {
        conn.graceful_shutdown();
    }
    // `accept` also drives the connection's I/O, so it must be polled for as
    // long as any stream is alive; it yields `None` once the connection is
    // done.
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tokio::spawn(handle_stream(shared.clone(), req, respond));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "demo-backend: h2 connection error");
                    break;
                }
                None => break,
            },
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
        }
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let stats = &shared.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if req.method() == Method::POST {
        stats.posts.fetch_add(1, Ordering::Relaxed);
    }
    let _active = ActiveGuard::new(stats);
    let path = req.uri().path().to_owned();
    if !shared.delay.is_zero() && path != "/health" && path != "/stats" {
        tokio::time::sleep(shared.delay).await;
    }
    match route(&shared, req, &mut respond).await {
        Ok(()) => {}
        Err(StreamEnd::PeerReset(reason)) => {
            // Counted before `_active` drops, with no await in between: a
            // `/stats` reader never sees the reset without the stream gone.
            stats.resets.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%path, ?reason, "demo-backend: stream reset by peer");
        }
        Err(e) => tracing::debug!(%path, error = %e, "demo-backend: stream failed"),
    }
}

/// Per-request response context: the headers every response carries.
struct Ctx<'a> {
    shared: &'a Shared,
    traceparent: Option<HeaderValue>,
}

impl Ctx<'_> {
    fn head(
        &self,
        status: StatusCode,
        content_type: &'static str,
        len: Option<u64>,
    ) -> Response<()> {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            HeaderName::from_static("x-backend"),
            self.shared.name_value.clone(),
        );
        if let Some(tp) = &self.traceparent {
            headers.insert(HeaderName::from_static("traceparent"), tp.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(len) = len {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        resp
    }

    /// Sends a complete response with a small in-memory body.
    async fn full(
        &self,
        respond: &mut SendResponse<Bytes>,
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) -> Result<(), StreamEnd> {
        let body: Bytes = body.into();
        // 204 and 304 never carry content (nor a content-length).
        let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let len = (!bodiless).then_some(body.len() as u64);
        let end = bodiless || body.is_empty();
        let mut send = send_headers(respond, self.head(status, content_type, len), end).await?;
        if !end {
            send_bytes(&mut send, body, true).await?;
        }
        Ok(())
    }

    async fn text(
        &self,
        respond: &mut SendResponse<Bytes>,
        status: StatusCode,
        body: impl Into<Bytes>,
    ) -> Result<(), StreamEnd> {
        self.full(respond, status, TEXT, body).await
    }
}

async fn route(
    shared: &Shared,
    req: Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
) -> Result<(), StreamEnd> {
    let ctx = Ctx {
        shared,
        traceparent: req.headers().get("traceparent").cloned(),
    };
    let get = req.method() == Method::GET;
    let upload = req.method() == Method::POST || req.method() == Method::PUT;
    let path = req.uri().path();
    match path {
        "/" if get => {
            let body = format!("hello from {}\n", shared.name);
            ctx.text(respond, StatusCode::OK, body).await
        }
        "/id" if get => ctx.text(respond, StatusCode::OK, shared.name.clone()).await,
        "/health" if get => ctx.text(respond, StatusCode::OK, "ok").await,
        "/echo"
            if upload && query_param(req.uri().query(), "refuse") == Some(shared.name.as_str()) =>
        {
            refuse_upload(req.into_body(), respond).await
        }
        "/echo" if upload => echo(&ctx, req.into_body(), respond).await,
        "/slow" if get => match query_param(req.uri().query(), "ms").and_then(|v| v.parse().ok()) {
            Some(ms) => slow(&ctx, respond, ms).await,
            None => ctx.text(respond, StatusCode::BAD_REQUEST, "bad ms\n").await,
        },
        "/headers" if get => {
            let body = headers_json(&req);
            ctx.full(respond, StatusCode::OK, JSON, body).await
        }
        "/trailers" if get => trailers(&ctx, respond).await,
        "/stats" if get => {
            let stats = &shared.stats;
            let body = format!(
                "{{\"requests\":{},\"posts\":{},\"resets\":{},\"active\":{},\"peak_active\":{}}}",
                stats.requests.load(Ordering::Relaxed),
                stats.posts.load(Ordering::Relaxed),
                stats.resets.load(Ordering::Relaxed),
                // Not counting this `/stats` stream itself.
                stats.active.load(Ordering::Relaxed).saturating_sub(1),
                stats.peak_active.load(Ordering::Relaxed),
            );
            ctx.full(respond, StatusCode::OK, JSON, body).await
        }
        "/reset" if get => reset_mid_body(&ctx, respond).await,
        "/reset-before-headers" if get => {
            respond.send_reset(Reason::INTERNAL_ERROR);
            Ok(())
        }
        "/refuse" if get => {
            respond.send_reset(Reason::REFUSED_STREAM);
            Ok(())
        }
        _ if get && path.starts_with("/bytes/") => match path["/bytes/".len()..].parse::<u64>() {
            Ok(n) => bytes(&ctx, respond, n).await,
            Err(_) => {
                ctx.text(respond, StatusCode::BAD_REQUEST, "bad length\n")
                    .await
            }
        },
        _ if get && path.starts_with("/status/") => {
            let status = path["/status/".len()..]
                .parse::<u16>()
                .ok()
                .filter(|n| (200..=599).contains(n))
                .and_then(|n| StatusCode::from_u16(n).ok());
            match status {
                Some(s) => {
                    ctx.text(respond, s, format!("status {}\n", s.as_u16()))
                        .await
                }
                None => {
                    ctx.text(respond, StatusCode::BAD_REQUEST, "bad status\n")
                        .await
                }
            }
        }
        _ => {
            ctx.text(respond, StatusCode::NOT_FOUND, "not found\n")
                .await
        }
    }
}

/// `GET /bytes/N`: N pattern bytes under flow control.
async fn bytes(ctx: &Ctx<'_>, respond: &mut SendResponse<Bytes>, n: u64) -> Result<(), StreamEnd> {
    let mut send = send_headers(respond, ctx.head(StatusCode::OK, BINARY, Some(n)), n == 0).await?;
    send_pattern(ctx.shared, &mut send, n, true).await
}

/// `GET /reset`: headers, 1000 body bytes, then RST_STREAM(INTERNAL_ERROR).
async fn reset_mid_body(ctx: &Ctx<'_>, respond: &mut SendResponse<Bytes>) -> Result<(), StreamEnd> {
    let mut send = send_headers(respond, ctx.head(StatusCode::OK, BINARY, None), false).await?;
    send_pattern(ctx.shared, &mut send, RESET_AFTER_BYTES, false).await?;
    // h2 has no "flushed" signal, and `send_reset` discards the stream's
    // queued frames (the HEADERS too, once the stream is open). Give the
    // connection task time to write them out first.
    tokio::select! {
        () = tokio::time::sleep(RESET_FLUSH_DELAY) => {}
        r = poll_fn(|cx| send.poll_reset(cx)) => return Err(StreamEnd::from_reset(r)),
    }
    send.send_reset(Reason::INTERNAL_ERROR);
    Ok(())
}

/// `GET /slow?ms=N`: sleeps (noticing a client reset), then answers.
async fn slow(ctx: &Ctx<'_>, respond: &mut SendResponse<Bytes>, ms: u64) -> Result<(), StreamEnd> {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => {}
        r = poll_fn(|cx| respond.poll_reset(cx)) => return Err(StreamEnd::from_reset(r)),
    }
    ctx.text(respond, StatusCode::OK, format!("slow {ms}\n"))
        .await
}

/// `GET /trailers`: a body, then trailers.
async fn trailers(ctx: &Ctx<'_>, respond: &mut SendResponse<Bytes>) -> Result<(), StreamEnd> {
    let body = Bytes::from_static(b"with trailers\n");
    let head = ctx.head(StatusCode::OK, TEXT, Some(body.len() as u64));
    let mut send = send_headers(respond, head, false).await?;
    send_bytes(&mut send, body, false).await?;
    let mut trailers = HeaderMap::new();
    trailers.insert(
        HeaderName::from_static("x-checksum"),
        HeaderValue::from_static("abc"),
    );
    if let Err(e) = send.send_trailers(trailers) {
        return Err(send_error(&mut send, e).await);
    }
    Ok(())
}

/// `POST /echo?refuse=NAME` on the backend named NAME: waits for the first
/// body bytes, then refuses the stream (RST_STREAM(REFUSED_STREAM)) without
/// consuming them: a backend shedding an upload it never processed.
async fn refuse_upload(
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
) -> Result<(), StreamEnd> {
    if let Some(chunk) = body.data().await {
        chunk?;
    }
    respond.send_reset(Reason::REFUSED_STREAM);
    Ok(())
}

/// `POST /echo`: digests the request body as it streams in.
async fn echo(
    ctx: &Ctx<'_>,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
) -> Result<(), StreamEnd> {
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        length += chunk.len() as u64;
        // Re-open the window by what was consumed, or a large upload stalls.
        body.flow_control().release_capacity(chunk.len())?;
    }
    // Request trailers, if any, are read and ignored.
    let _ = body.trailers().await?;
    let digest = hex::encode(hasher.finalize());
    let json = format!("{{\"length\":{length},\"sha256\":\"{digest}\"}}");
    ctx.full(respond, StatusCode::OK, JSON, json).await
}

/// `GET /headers`: the request head as one flat JSON object.
fn headers_json(req: &Request<RecvStream>) -> String {
    let mut out = String::from("{");
    let mut field = |name: &str, value: &str| {
        if out.len() > 1 {
            out.push(',');
        }
        json_string(&mut out, name);
        out.push(':');
        json_string(&mut out, value);
    };
    let uri = req.uri();
    field(":method", req.method().as_str());
    field(
        ":path",
        uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()),
    );
    if let Some(authority) = uri.authority() {
        field(":authority", authority.as_str());
    }
    if let Some(scheme) = uri.scheme_str() {
        field(":scheme", scheme);
    }
    let headers = req.headers();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect::<Vec<_>>()
            .join(", ");
        field(name.as_str(), &joined);
    }
    out.push('}');
    out
}

/// Appends `s` to `out` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The first value of `key` in a query string (no percent-decoding).
fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// Sends the response head; a failure is classified through `poll_reset`.
async fn send_headers(
    respond: &mut SendResponse<Bytes>,
    head: Response<()>,
    end_of_stream: bool,
) -> Result<SendStream<Bytes>, StreamEnd> {
    match respond.send_response(head, end_of_stream) {
        Ok(send) => Ok(send),
        Err(e) => {
            // A stream the peer already reset fails with a plain user error;
            // the reset reason is only visible through `poll_reset`.
            let reset = poll_fn(|cx| Poll::Ready(respond.poll_reset(cx))).await;
            Err(match reset {
                Poll::Ready(Ok(reason)) => StreamEnd::PeerReset(reason),
                _ => e.into(),
            })
        }
    }
}

/// Classifies a `send_data`/`send_trailers` failure: a peer reset shows
/// only through `poll_reset`.
async fn send_error(send: &mut SendStream<Bytes>, e: h2::Error) -> StreamEnd {
    match poll_fn(|cx| Poll::Ready(send.poll_reset(cx))).await {
        Poll::Ready(Ok(reason)) => StreamEnd::PeerReset(reason),
        _ => e.into(),
    }
}

/// Waits until the stream may send at least one byte and returns how many
/// (at most `want`) — or how the stream ended. Capacity requests are
/// explicit, so a slow reader holds the sender back instead of making h2
/// buffer without bound.
async fn wait_capacity(send: &mut SendStream<Bytes>, want: usize) -> Result<usize, StreamEnd> {
    send.reserve_capacity(want);
    poll_fn(|cx| loop {
        if let Poll::Ready(r) = send.poll_reset(cx) {
            return Poll::Ready(Err(StreamEnd::from_reset(r)));
        }
        // `poll_capacity` only reports *increases*: capacity assigned
        // earlier must be picked up here or it would wait forever.
        let have = send.capacity();
        if have > 0 {
            return Poll::Ready(Ok(have.min(want)));
        }
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(0))) => continue,
            Poll::Ready(Some(Ok(n))) => return Poll::Ready(Ok(n.min(want))),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
            Poll::Ready(None) => return Poll::Ready(Err(StreamEnd::Closed)),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

async fn send_chunk(
    send: &mut SendStream<Bytes>,
    chunk: Bytes,
    end: bool,
) -> Result<(), StreamEnd> {
    match send.send_data(chunk, end) {
        Ok(()) => Ok(()),
        Err(e) => Err(send_error(send, e).await),
    }
}

/// Sends `body` under flow control; `end` closes the stream with the last
/// piece (`body` must then be non-empty).
async fn send_bytes(
    send: &mut SendStream<Bytes>,
    mut body: Bytes,
    end: bool,
) -> Result<(), StreamEnd> {
    while !body.is_empty() {
        let n = wait_capacity(send, body.len().min(CHUNK)).await?;
        let piece = body.split_to(n.min(body.len()));
        send_chunk(send, piece, end && body.is_empty()).await?;
    }
    Ok(())
}

/// Sends `total` pattern bytes under flow control, never holding more than
/// one chunk; `end` closes the stream with the last piece.
async fn send_pattern(
    shared: &Shared,
    send: &mut SendStream<Bytes>,
    total: u64,
    end: bool,
) -> Result<(), StreamEnd> {
    let mut offset = 0u64;
    while offset < total {
        let want = (total - offset).min(CHUNK as u64) as usize;
        let n = wait_capacity(send, want).await?;
        let piece = shared.pattern_at(offset, n);
        offset += piece.len() as u64;
        send_chunk(send, piece, end && offset == total).await?;
    }
    Ok(())
}
