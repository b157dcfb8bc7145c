//! One request's journey: route, pick, acquire an h2 stream, then stream the
//! request body up and the response down with both flow controls coupled
//! (see `router::bridge` for the budgets). Retries are decided here and only
//! here, from the envelope's idempotency tag and what the backend proved.

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::time::timeout;

use super::driver::Link;
use super::{Cause, Gateway, Outcome, PickError, UpstreamError, UpstreamGroup};
use crate::balancer::{hash_bytes, PickContext};
use crate::config::{HashKey, RetryOn};
use crate::router::bridge::{ToEdge, ToUpstream};
use crate::router::{self, Envelope};
use crate::telemetry::WorkerMetrics;

/// Carries one request to a backend and its response back to the front.
/// The request path drops this future when the front cancels the request,
/// which resets the h2 stream with CANCEL and gives every place and count
/// back through their guards.
pub async fn proxy(
    gw: Rc<Gateway>,
    env: Box<Envelope>,
    link: Rc<Link>,
    metrics: Arc<WorkerMetrics>,
    budget: usize,
) {
    let mut head_sent = false;
    let res = run(&gw, &env, &link, &metrics, &mut head_sent, budget).await;
    // Every failure is reported: the front may be waiting for it (a
    // request the front cancelled is dropped, never reaches here).
    if let Err(e) = res {
        report_failure(&e, env.request_id, &link, &metrics, head_sent);
    }
}

/// Tells the edge how a request failed: a status while no response head
/// went out, a stream reset after one did (never a truncated 200). A
/// malformed request the h2 library refused is always reset with
/// H3_MESSAGE_ERROR, as HAProxy answers malformed requests.
fn report_failure(
    e: &UpstreamError,
    request_id: u64,
    edge: &Link,
    metrics: &WorkerMetrics,
    head_sent: bool,
) {
    match e {
        UpstreamError::Timeout(_) | UpstreamError::Idle(_) => {
            WorkerMetrics::inc(&metrics.upstream_timeouts)
        }
        UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
            WorkerMetrics::inc(&metrics.upstream_connect_failures)
        }
        UpstreamError::PoolFull { .. } => WorkerMetrics::inc(&metrics.pool_rejected_queue_full),
        UpstreamError::PoolTimeout { .. } => WorkerMetrics::inc(&metrics.pool_rejected_deadline),
        UpstreamError::RefusedLocally(why) => {
            metrics.malformed(crate::router::MalformedReason::RefusedLocally);
            tracing::info!(request_id, %why, "malformed request refused before sending: stream reset with H3_MESSAGE_ERROR");
        }
        _ => {}
    }
    let reset = head_sent
        || matches!(
            e,
            UpstreamError::RefusedLocally(_) | UpstreamError::ClientStalled(_)
        );
    tracing::debug!(request_id, error = %e, side = ?e.side(), head_sent, "upstream request failed");
    if reset {
        edge.send(ToEdge::Reset {
            code: e.h3_reset_code(),
        });
    } else {
        edge.send(ToEdge::Fail {
            status: e.status(),
            reason: e.to_string(),
            retry_after: e.retry_after(),
        });
    }
}

/// Request body bytes kept so an idempotent request can be replayed on
/// another backend; dropped (and replay refused) past the body budget.
struct Replay {
    chunks: Vec<Bytes>,
    bytes: usize,
    limit: usize,
    overflowed: bool,
    /// The client's body ended (End or trailers seen).
    ended: bool,
    trailers: Option<http::HeaderMap>,
}

impl Replay {
    fn new(limit: usize) -> Self {
        Self {
            chunks: Vec::new(),
            bytes: 0,
            limit,
            overflowed: false,
            ended: false,
            trailers: None,
        }
    }

    fn keep(&mut self, b: &Bytes) {
        if self.overflowed {
            return;
        }
        if self.bytes + b.len() > self.limit {
            self.overflowed = true;
            self.chunks.clear();
            return;
        }
        self.bytes += b.len();
        self.chunks.push(b.clone());
    }

    /// Whether everything sent so far can be sent again.
    fn replayable(&self) -> bool {
        !self.overflowed
    }
}

fn key_hash(group: &UpstreamGroup, env: &Envelope) -> Option<u64> {
    match &group.cfg.hash_key {
        HashKey::ClientIp => None,
        HashKey::Path => Some(hash_bytes(env.path.as_bytes())),
        HashKey::Header(name) => env.headers.get(name).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => env
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name.as_str())
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}

async fn run(
    gw: &Gateway,
    env: &Envelope,
    link: &Link,
    metrics: &WorkerMetrics,
    head_sent: &mut bool,
    budget: usize,
) -> Result<(), UpstreamError> {
    let group = upstream_for(gw, env)?;
    group.budget.on_request();
    let ctx = PickContext {
        client: env.client,
        path: &env.path,
        key_hash: key_hash(group, env),
    };
    let mut replay = Replay::new(gw.max_body_buffer_bytes);
    let mut tried: Vec<usize> = Vec::new();
    let max_attempts = 1 + group.cfg.retries.attempts;
    loop {
        let idx = pick_or_wait(group, &ctx, &tried, env, metrics).await?;
        tried.push(idx);
        let backend = group.backends[idx].clone();
        WorkerMetrics::inc(&metrics.upstream_picks);
        metrics.obs.routed(
            env.request_id,
            &group.name,
            backend.address,
            group.cfg.policy,
        );
        link.send(ToEdge::Backend {
            upstream: group.name.clone(),
            backend: backend.address,
        });
        let started = Instant::now();
        let is_last = tried.len() as u32 >= max_attempts;
        let res = attempt(
            group,
            idx,
            env,
            link,
            &mut replay,
            head_sent,
            is_last,
            budget,
        )
        .await;
        let latency = started.elapsed();
        let seen = match &res {
            Ok(s) | Err(UpstreamError::Status(s)) => Some(*s),
            Err(_) => None,
        };
        metrics.obs.backends.attempt_done(
            &group.name,
            backend.address,
            group.cfg.policy,
            seen,
            latency,
        );
        match res {
            Ok(status) => {
                let outcome = if status >= 500 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                group.record(idx, outcome, latency, metrics);
                return Ok(());
            }
            Err(e) => {
                if e.counts_against_backend() {
                    group.record(idx, Outcome::Failure, latency, metrics);
                }
                let last = tried.len() as u32 >= max_attempts;
                if *head_sent || last || !may_retry(group, env, &e, &replay, metrics) {
                    return Err(e);
                }
                WorkerMetrics::inc(&metrics.retries);
                metrics.obs.retried(
                    env.request_id,
                    &group.name,
                    backend.address,
                    group.cfg.policy,
                    tried.len(),
                );
                tracing::info!(
                    request_id = env.request_id,
                    upstream = %group.name,
                    backend = %backend.address,
                    error = %e,
                    attempt = tried.len(),
                    "retrying on another backend"
                );
            }
        }
    }
}

/// The upstream the request's route names.
fn upstream_for<'g>(gw: &'g Gateway, env: &Envelope) -> Result<&'g UpstreamGroup, UpstreamError> {
    let up_idx = gw
        .routes
        .route(env.host(), &env.path)
        .ok_or_else(|| UpstreamError::NoRoute {
            host: env.host().to_string(),
            path: env.path.clone(),
        })?;
    gw.upstreams
        .get(up_idx)
        .ok_or_else(|| UpstreamError::NoBackend {
            upstream: format!("#{up_idx}"),
        })
}

/// Whether a failed attempt (no head forwarded, attempts left) is tried
/// again: its error matches `retries.on`, the request is safe to send again
/// (the backend did not process it, or it is idempotent, and its body is
/// still all in the replay copy), and the retry budget has a token (spent
/// here).
fn may_retry(
    group: &UpstreamGroup,
    env: &Envelope,
    e: &UpstreamError,
    replay: &Replay,
    metrics: &WorkerMetrics,
) -> bool {
    let allowed = e
        .retry_on()
        .is_some_and(|r| group.cfg.retries.on.contains(&r));
    let safe = (e.unprocessed() || env.idempotent) && replay.replayable();
    if !allowed || !safe {
        return false;
    }
    if !group.budget.try_spend() {
        WorkerMetrics::inc(&metrics.retry_budget_exhausted);
        tracing::debug!(request_id = env.request_id, "retry budget exhausted");
        return false;
    }
    true
}

/// A request's place in its upstream's pending queue: counted in
/// `UpstreamGroup::pending` and `spooky_balancer_pending` for exactly as long
/// as it lives. Dropping it (the request got a backend, gave up, or its
/// client went away and the waiting future was dropped) gives the place back.
struct PendingPlace<'a> {
    group: &'a UpstreamGroup,
    metrics: &'a WorkerMetrics,
}

impl<'a> PendingPlace<'a> {
    /// Takes a place, or `None` when `circuit.max_pending` are already taken.
    fn take(group: &'a UpstreamGroup, metrics: &'a WorkerMetrics) -> Option<Self> {
        if group.pending.get() >= group.cfg.circuit.max_pending {
            return None;
        }
        group.pending.set(group.pending.get() + 1);
        metrics
            .pending
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Self { group, metrics })
    }
}

impl Drop for PendingPlace<'_> {
    fn drop(&mut self) {
        self.group
            .pending
            .set(self.group.pending.get().saturating_sub(1));
        self.metrics
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Picks a backend; when all are at their in-flight cap, waits in the
/// upstream's bounded pending queue until one frees up. The queue place is
/// a guard, so a request whose client goes away while it waits (this
/// future is dropped) leaves the queue as well.
async fn pick_or_wait(
    group: &UpstreamGroup,
    ctx: &PickContext<'_>,
    tried: &[usize],
    env: &Envelope,
    metrics: &WorkerMetrics,
) -> Result<usize, UpstreamError> {
    let deadline = env.received_at + group.timeouts.request;
    let mut place: Option<PendingPlace<'_>> = None;
    loop {
        let freed = group.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match group.pick(ctx, tried) {
            Ok(i) => return Ok(i),
            Err(PickError::NoHealthy) => {
                WorkerMetrics::inc(&metrics.no_healthy_backend);
                return Err(UpstreamError::NoBackend {
                    upstream: group.name.clone(),
                });
            }
            Err(PickError::AtCapacity) => {
                if place.is_none() {
                    place = PendingPlace::take(group, metrics);
                    if place.is_none() {
                        WorkerMetrics::inc(&metrics.circuit_rejections);
                        return Err(UpstreamError::Saturated {
                            upstream: group.name.clone(),
                        });
                    }
                }
                // A freed slot wakes us; re-check now and then regardless
                // (an ejection may end, a backend may recover).
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100));
                if wait.is_zero() {
                    WorkerMetrics::inc(&metrics.circuit_rejections);
                    return Err(UpstreamError::Saturated {
                        upstream: group.name.clone(),
                    });
                }
                let _ = timeout(wait, freed).await;
            }
        }
    }
}

/// Wakes requests queued for a slot when this attempt ends.
struct SlotRelease(Rc<tokio::sync::Notify>);

impl Drop for SlotRelease {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

/// One try against one backend. Returns the response status once the whole
/// response was forwarded.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    group: &UpstreamGroup,
    idx: usize,
    env: &Envelope,
    link: &Link,
    replay: &mut Replay,
    head_sent: &mut bool,
    is_last: bool,
    budget: usize,
) -> Result<u16, UpstreamError> {
    let backend = group.backends[idx].clone();
    // Declared first so it drops last: waiters wake after the count fell.
    let _release = SlotRelease(group.slot_freed.clone());
    let _reserved = backend.reserve();
    let t = group.timeouts;
    let head_deadline = env.received_at + t.request;
    // A busy pool makes the request wait up to its own deadline (each
    // connect the pool makes is bounded by `connect_ms` on its own).
    let (mut sr, _guard) = backend.acquire(head_deadline).await?;
    // Rapid reset: a client that reset the stream while we waited for a
    // connection had this future dropped; it never reaches `send_request`.
    let req = h2_request(env)?;

    let sent_at = Instant::now();
    let (resp_fut, send) = sr
        .send_request(req, !env.has_body)
        .map_err(classify_before)?;

    let body_wait = Cell::new(BodyWait::Done);
    let pump = pump_request_body(
        send,
        BodySide {
            link,
            wait: &body_wait,
        },
        replay,
        env.has_body,
        t.idle,
    );
    tokio::pin!(pump);
    let mut pump_done = !env.has_body;

    let response = async {
        let wait = head_deadline.saturating_duration_since(Instant::now());
        match timeout(wait, resp_fut).await {
            Err(_) => Err(UpstreamError::Timeout(t.request)),
            Ok(r) => r.map_err(classify_before),
        }
    };
    tokio::pin!(response);

    // Pump the request body while waiting for the response head.
    let resp = loop {
        tokio::select! {
            r = &mut response => break r.map_err(|e| blame_stalled_upload(e, body_wait.get()))?,
            p = &mut pump, if !pump_done => {
                pump_done = true;
                // The backend may still answer (e.g. 413); the response
                // future reports the stream's fate.
                body_not_sent(env, p);
            }
        }
    };

    let (mut parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let head_after = sent_at.elapsed();
    crate::telemetry::probes::upstream_response(
        env.request_id,
        status,
        head_after,
        &backend.address,
    );
    if !is_last && group.cfg.retries.on.contains(&RetryOn::Status(status)) {
        // Candidate for a retry: do not forward this answer (the h2 stream
        // is reset with CANCEL when `body` drops).
        return Err(UpstreamError::Status(status));
    }
    link.send(ToEdge::Headers {
        head: router::ResponseHead::from_h2(parts.status, std::mem::take(&mut parts.headers)),
        head_after,
    });
    *head_sent = true;

    // Stream the response down while any remaining request body goes up.
    let down = pump_response_body(body, link, budget, t.idle);
    tokio::pin!(down);
    loop {
        tokio::select! {
            r = &mut down => return r.map(|()| status),
            p = &mut pump, if !pump_done => {
                pump_done = true;
                body_not_sent(env, p);
            }
        }
    }
}

/// Logs a request body that did not reach the backend whole; the response
/// side decides what that means for the request.
fn body_not_sent(env: &Envelope, pumped: Result<(), UpstreamError>) {
    if let Err(e) = pumped {
        tracing::debug!(request_id = env.request_id, error = %e, "request body not fully sent");
    }
}

/// The HTTP/2 request for an envelope. The router validated `:authority`
/// and `:path`, so a failure here is a request the mapping let through: the
/// client's.
fn h2_request(env: &Envelope) -> Result<http::Request<()>, UpstreamError> {
    let refused = |e: http::Error| UpstreamError::RefusedLocally(Cause::Http(e));
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(env.authority.as_str())
        .path_and_query(env.path.as_str())
        .build()
        .map_err(refused)?;
    let mut req = http::Request::builder()
        .method(env.method.clone())
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(())
        .map_err(refused)?;
    *req.headers_mut() = env.headers.clone();
    Ok(req)
}

/// Whether h2 refused a call itself, before anything was sent (its
/// `Kind::User`: malformed headers and other misuse). `h2::Error` has no
/// public accessor for that kind, but it is the only kind with neither a
/// reason (reset, GOAWAY, protocol error) nor an I/O error.
fn refused_locally(e: &h2::Error) -> bool {
    e.reason().is_none() && !e.is_io()
}

/// Classifies an h2 error seen before the response head: a local refusal is
/// the client's (never retried or counted); REFUSED_STREAM and GOAWAY prove
/// the backend did nothing (retried, not counted: load shedding and graceful
/// shutdown are not sickness); anything else is a backend failure. What
/// each means for retries and outlier detection is [`UpstreamError`]'s.
fn classify_before(e: h2::Error) -> UpstreamError {
    if refused_locally(&e) {
        return UpstreamError::RefusedLocally(Cause::H2(e));
    }
    // GOAWAY from the backend: our stream was above its last-stream-id.
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote()) {
        return UpstreamError::Refused(e);
    }
    UpstreamError::BeforeResponse(e)
}

/// What the request-body pump of an attempt waits for, so a late response
/// head is blamed on the side that held things up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyWait {
    /// Nothing: the body was sent, or there is none.
    Done,
    /// The client's next body bytes (still waiting, or gave up waiting
    /// after `timeouts.idle_ms`).
    Client,
    /// h2 send capacity: the backend is not reading.
    Backend,
}

/// A response head that is late while the client still owes body bytes is
/// the client's doing: the backend may well wait for the whole body before
/// answering. Never counted against the backend, never retried.
fn blame_stalled_upload(e: UpstreamError, wait: BodyWait) -> UpstreamError {
    match e {
        UpstreamError::Timeout(d) if wait == BodyWait::Client => {
            UpstreamError::ClientBodyStalled(d)
        }
        _ => e,
    }
}

/// The front's half of the request body, as the pump sees it.
struct BodySide<'a> {
    link: &'a Link,
    wait: &'a Cell<BodyWait>,
}

/// Request-body permits of one chunk the pump took from the edge, given
/// back when the chunk is done with: h2 took it, sending it failed, or the
/// attempt ended while the chunk waited for capacity (the pump future is
/// dropped). Its bytes are in the replay copy, so a retry still has them;
/// without this the edge would stop reading the client's body for good.
struct ChunkCredit<'a> {
    link: &'a Link,
    bytes: usize,
}

impl Drop for ChunkCredit<'_> {
    fn drop(&mut self) {
        self.link.request_credit(self.bytes);
    }
}

/// Moves request body chunks from the edge into the h2 stream, sending only
/// what h2 granted capacity for, and returning budget to the edge as it goes.
/// On a retry, first replays what earlier attempts sent.
async fn pump_request_body(
    mut send: SendStream<Bytes>,
    mut body: BodySide<'_>,
    replay: &mut Replay,
    has_body: bool,
    idle: Duration,
) -> Result<(), UpstreamError> {
    if !has_body {
        return Ok(());
    }
    let res = pump_request_body_inner(&mut send, &mut body, replay, idle).await;
    if res.is_err() {
        // h2 only resets a stream once every handle is gone, and the
        // response side is still alive: reset the request side explicitly
        // so the backend never waits on a half-sent body.
        send.send_reset(h2::Reason::CANCEL);
    }
    res
}

async fn send_chunk(
    send: &mut SendStream<Bytes>,
    mut b: Bytes,
    idle: Duration,
) -> Result<(), UpstreamError> {
    while !b.is_empty() {
        send.reserve_capacity(b.len());
        if send.capacity() == 0 {
            loop {
                match timeout(idle, poll_fn(|cx| send.poll_capacity(cx))).await {
                    Err(_) => return Err(UpstreamError::Idle(idle)),
                    Ok(None) => {
                        return Err(UpstreamError::ResponseReset(Cause::Closed(
                            "request stream closed",
                        )))
                    }
                    Ok(Some(Err(e))) => return Err(UpstreamError::ResponseReset(Cause::H2(e))),
                    Ok(Some(Ok(0))) => continue,
                    Ok(Some(Ok(_))) => break,
                }
            }
        }
        let cap = send.capacity().min(b.len()).max(1);
        let piece = b.split_to(cap);
        send.send_data(piece, false)
            .map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?;
    }
    Ok(())
}

async fn pump_request_body_inner(
    send: &mut SendStream<Bytes>,
    body: &mut BodySide<'_>,
    replay: &mut Replay,
    idle: Duration,
) -> Result<(), UpstreamError> {
    // Replay what an earlier attempt already consumed from the client.
    body.wait.set(BodyWait::Backend);
    for chunk in replay.chunks.clone() {
        send_chunk(send, chunk, idle).await?;
    }
    if replay.ended {
        body.wait.set(BodyWait::Done);
        match replay.trailers.clone() {
            Some(t) => send.send_trailers(t),
            None => send.send_data(Bytes::new(), true),
        }
        .map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?;
        return Ok(());
    }
    loop {
        body.wait.set(BodyWait::Client);
        let Ok(msg) = timeout(idle, body.link.next_body()).await else {
            return Err(UpstreamError::ClientBodyStalled(idle));
        };
        body.wait.set(BodyWait::Backend);
        match msg {
            ToUpstream::Data(b) => {
                let _credit = ChunkCredit {
                    link: body.link,
                    bytes: b.len(),
                };
                replay.keep(&b);
                send_chunk(send, b, idle).await?;
            }
            ToUpstream::Trailers(t) => {
                body.wait.set(BodyWait::Done);
                replay.ended = true;
                replay.trailers = Some(t.clone());
                send.send_trailers(t)
                    .map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?;
                return Ok(());
            }
            ToUpstream::End => {
                body.wait.set(BodyWait::Done);
                replay.ended = true;
                send.send_data(Bytes::new(), true)
                    .map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?;
                return Ok(());
            }
        }
    }
}

/// Takes `n` bytes of response credit. When they are not there at once,
/// the front learns the stream is starved (and may grow the grant); a
/// client that stops reading must not pin this h2 stream (and its share of
/// the connection window) forever, so the wait ends after `idle` with
/// [`UpstreamError::ClientStalled`]: the client's doing, never the backend's.
async fn take_response_credit(link: &Link, n: usize, idle: Duration) -> Result<(), UpstreamError> {
    timeout(idle, link.take_response_credit(n))
        .await
        .map_err(|_| UpstreamError::ClientStalled(idle))
}

/// Moves response body chunks from h2 to the front, taking credit first and
/// only then releasing h2 flow-control capacity.
async fn pump_response_body(
    mut body: RecvStream,
    link: &Link,
    budget: usize,
    idle: Duration,
) -> Result<(), UpstreamError> {
    loop {
        let next = match timeout(idle, body.data()).await {
            Err(_) => return Err(UpstreamError::Idle(idle)),
            Ok(n) => n,
        };
        let Some(chunk) = next else { break };
        let mut chunk = chunk.map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?;
        let len = chunk.len();
        while !chunk.is_empty() {
            let n = chunk.len().min(link.response_piece()).min(budget.max(1));
            take_response_credit(link, n, idle).await?;
            link.send(ToEdge::Data(chunk.split_to(n)));
        }
        let _ = body.flow_control().release_capacity(len);
    }
    let trailers = match timeout(idle, body.trailers()).await {
        Err(_) => return Err(UpstreamError::Idle(idle)),
        Ok(t) => t.map_err(|e| UpstreamError::ResponseReset(Cause::H2(e)))?,
    };
    if let Some(t) = trailers {
        link.send(ToEdge::Trailers(router::trailers_to_h3(&t)));
    }
    link.send(ToEdge::End);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Instant;

    use quiche::h3::Header;

    use super::*;
    use crate::upstream::ErrorSide;

    /// A real h2 backend over an in-memory pipe: `/refuse` is reset with
    /// REFUSED_STREAM, `/fail` with INTERNAL_ERROR, anything else answers
    /// 200 echoing the `te` it received in `x-te`.
    async fn backend() -> h2::client::SendRequest<Bytes> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                match req.uri().path() {
                    "/refuse" => respond.send_reset(h2::Reason::REFUSED_STREAM),
                    "/fail" => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                    _ => {
                        let te = req.headers().get("te").cloned();
                        let mut resp = http::Response::builder().status(200);
                        if let Some(te) = te {
                            resp = resp.header("x-te", te);
                        }
                        let _ = respond.send_response(resp.body(()).expect("response"), true);
                    }
                }
            }
        });
        let (sr, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sr.ready().await.expect("ready")
    }

    fn envelope(path: &str, extra: &[(&str, &str)]) -> Envelope {
        let mut list = vec![
            Header::new(b":method", b"GET"),
            Header::new(b":scheme", b"https"),
            Header::new(b":authority", b"app.example"),
            Header::new(b":path", path.as_bytes()),
        ];
        for (n, v) in extra {
            list.push(Header::new(n.as_bytes(), v.as_bytes()));
        }
        let client = std::net::SocketAddr::from(([192, 0, 2, 1], 4000));
        router::build_envelope(
            &list,
            false,
            client,
            1,
            65536,
            Instant::now(),
            &mut crate::source::SystemSource,
        )
        .expect("valid")
    }

    /// Sends `req` and classifies how it failed before the response head.
    async fn fail_before(
        sr: &mut h2::client::SendRequest<Bytes>,
        req: http::Request<()>,
    ) -> UpstreamError {
        let resp = match sr.send_request(req, true) {
            Err(e) => return classify_before(e),
            Ok((resp, _send)) => resp,
        };
        match resp.await {
            Err(e) => classify_before(e),
            Ok(r) => panic!("expected a failure, got {}", r.status()),
        }
    }

    fn assert_invariant(a: &UpstreamError) {
        assert!(
            !a.counts_against_backend() || a.side() == ErrorSide::Backend,
            "{:?} counted against a backend",
            a
        );
    }

    #[tokio::test]
    async fn a_header_h2_refuses_locally_is_the_clients_error() {
        let mut sr = backend().await;
        for (n, v) in [("te", "Trailers"), ("te", "gzip"), ("connection", "close")] {
            let mut req = h2_request(&envelope("/", &[])).expect("request");
            req.headers_mut()
                .insert(n, http::HeaderValue::from_static(v));
            let a = fail_before(&mut sr, req).await;
            assert!(
                matches!(a, UpstreamError::RefusedLocally(_)),
                "{n}: {v} gave {:?}",
                a
            );
            assert_eq!(a.side(), ErrorSide::Client);
            assert!(
                !a.counts_against_backend(),
                "never counted against the backend"
            );
            assert_eq!(a.retry_on(), None, "never retried");
            assert_invariant(&a);
        }
    }

    #[tokio::test]
    async fn the_mapping_forwards_te_trailers_in_a_form_h2_sends() {
        let mut sr = backend().await;
        let env = envelope("/", &[("te", "Trailers")]);
        let req = h2_request(&env).expect("request");
        let (resp, _send) = sr.send_request(req, true).expect("h2 accepts the mapping");
        let resp = resp.await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-te"], "trailers");
    }

    #[tokio::test]
    async fn refused_stream_is_retried_but_not_counted() {
        let mut sr = backend().await;
        let a = fail_before(&mut sr, h2_request(&envelope("/refuse", &[])).unwrap()).await;
        assert!(matches!(a, UpstreamError::Refused(_)), "{:?}", a);
        assert_eq!(a.retry_on(), Some(RetryOn::RefusedStream));
        assert!(a.unprocessed());
        assert!(!a.counts_against_backend());
        assert_eq!(a.side(), ErrorSide::Backend);
    }

    #[tokio::test]
    async fn a_backend_reset_counts_against_the_backend() {
        let mut sr = backend().await;
        let a = fail_before(&mut sr, h2_request(&envelope("/fail", &[])).unwrap()).await;
        assert!(matches!(a, UpstreamError::BeforeResponse(_)), "{:?}", a);
        assert_eq!(a.retry_on(), Some(RetryOn::Reset));
        assert!(a.counts_against_backend());
        assert_invariant(&a);
    }

    /// An h2 backend over an in-memory pipe that grants `window` bytes per
    /// stream and never reads request bodies; `/refuse` is refused
    /// (REFUSED_STREAM) once its first body bytes arrive.
    async fn holding_backend(window: u32) -> h2::client::SendRequest<Bytes> {
        let (c, s) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(window)
                .handshake::<_, Bytes>(s)
                .await
                .expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let refuse = req.uri().path() == "/refuse";
                let mut body = req.into_body();
                tokio::spawn(async move {
                    if refuse {
                        let _ = body.data().await;
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        std::future::pending::<()>().await;
                    }
                    drop(body);
                });
            }
        });
        let (sr, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sr.ready().await.expect("ready")
    }

    /// The front's end of a request: its link, and what the link sent.
    fn front() -> (Rc<Link>, crate::upstream::driver::Output) {
        let out = Rc::default();
        let key = crate::router::bridge::RequestKey { slot: 0, serial: 1 };
        (Link::new(key, 1000, Rc::clone(&out)), out)
    }

    /// The front reads `n` body bytes from the client (spending `n` of its
    /// credit) and hands them over.
    fn front_reads(link: &Link, n: usize) {
        link.deliver(crate::router::bridge::RequestEvent::Body(ToUpstream::Data(
            Bytes::from(vec![7u8; n]),
        )));
    }

    /// Request body credit the front got back (the request path sends what
    /// a poll earned when the poll ends).
    fn credited(link: &Link, out: &crate::upstream::driver::Output) -> usize {
        link.send_credit();
        out.borrow_mut()
            .drain(..)
            .map(|(_, m)| match m {
                ToEdge::RequestCredit(n) => n,
                _ => 0,
            })
            .sum()
    }

    #[tokio::test]
    async fn a_chunk_the_refused_stream_could_not_take_gives_its_credit_back() {
        let mut sr = holding_backend(65_535).await;
        let req = h2_request(&envelope("/refuse", &[])).unwrap();
        let (resp, send) = sr.send_request(req, false).unwrap();
        let (link, out) = front();
        let wait = Cell::new(BodyWait::Done);
        let mut replay = Replay::new(1 << 20);
        let side = BodySide {
            link: &link,
            wait: &wait,
        };
        // Its first bytes go out; the backend refuses the stream.
        front_reads(&link, 5);
        {
            let pump = pump_request_body(send, side, &mut replay, true, Duration::from_secs(5));
            tokio::pin!(pump);
            tokio::select! {
                _ = &mut pump => panic!("the pump ended before the refusal"),
                r = resp => assert!(r.is_err(), "refused"),
            }
            // The front then reads a chunk as large as the whole grant.
            front_reads(&link, 1000);
            assert!(
                (&mut pump).await.is_err(),
                "sending on a refused stream fails"
            );
        }
        assert_eq!(
            credited(&link, &out),
            1005,
            "the failed chunk's credit came back too: a retry can read the rest"
        );
        assert_eq!(replay.bytes, 1005, "both chunks kept for the retry");
    }

    #[tokio::test]
    async fn a_chunk_waiting_for_capacity_when_its_attempt_ends_gives_its_credit_back() {
        let mut sr = holding_backend(100).await;
        let req = h2_request(&envelope("/hold", &[])).unwrap();
        let (_resp, send) = sr.send_request(req, false).unwrap();
        let (link, out) = front();
        let wait = Cell::new(BodyWait::Done);
        let mut replay = Replay::new(1 << 20);
        front_reads(&link, 1000);
        {
            let side = BodySide {
                link: &link,
                wait: &wait,
            };
            let pump = pump_request_body(send, side, &mut replay, true, Duration::from_secs(5));
            tokio::pin!(pump);
            let polled = timeout(Duration::from_millis(50), &mut pump).await;
            assert!(polled.is_err(), "stuck on the backend's 100-byte window");
            assert_eq!(wait.get(), BodyWait::Backend);
            assert_eq!(credited(&link, &out), 0, "nothing given back yet");
            // The attempt ends (say, a 503 head came): the pump is dropped.
        }
        assert_eq!(credited(&link, &out), 1000);
        assert_eq!(replay.bytes, 1000, "the chunk is kept for the retry");
    }

    /// A gateway whose one backend admits one request in flight and whose
    /// pending queue holds two.
    fn saturable_gateway() -> Gateway {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let mut up = crate::config::Upstream::new("app", vec![crate::config::Backend::new(addr)]);
        up.circuit.max_in_flight_per_backend = 1;
        up.circuit.max_pending = 2;
        let cfg = crate::config::Config::minimal(vec![up]);
        Gateway::new(&cfg, &crate::upstream::Connector::Tokio)
    }

    #[tokio::test]
    async fn a_request_cancelled_while_queued_gives_its_place_back() {
        let gw = saturable_gateway();
        let group = &gw.upstreams[0];
        let metrics = WorkerMetrics::default();
        let env = envelope("/", &[]);
        let ctx = PickContext {
            client: env.client,
            path: &env.path,
            key_hash: None,
        };
        let busy = group.backends[0].reserve();
        // max_pending requests queue, then their clients go away: the
        // waiting futures are dropped mid-wait.
        for _ in 0..2 {
            let wait = pick_or_wait(group, &ctx, &[], &env, &metrics);
            tokio::pin!(wait);
            let polled = timeout(Duration::from_millis(20), &mut wait).await;
            assert!(polled.is_err(), "queued while the backend is full");
            assert_eq!(group.pending.get(), 1);
        }
        assert_eq!(group.pending.get(), 0, "cancelled waiters left the queue");
        assert_eq!(
            metrics.pending.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "spooky_balancer_pending back at 0"
        );
        // The circuit still admits: the next request waits, and gets the
        // backend once it frees up, instead of an instant 503.
        let freed = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(busy);
            group.slot_freed.notify_waiters();
        };
        let (picked, ()) = tokio::join!(pick_or_wait(group, &ctx, &[], &env, &metrics), freed);
        assert_eq!(picked.expect("admitted once a slot frees"), 0);
        assert_eq!(group.pending.get(), 0);
    }

    #[test]
    fn a_late_head_while_the_client_owes_body_bytes_is_the_clients_fault() {
        let late = || UpstreamError::Timeout(Duration::from_secs(1));
        let a = blame_stalled_upload(late(), BodyWait::Client);
        assert!(matches!(a, UpstreamError::ClientBodyStalled(_)), "{:?}", a);
        assert!(
            !a.counts_against_backend(),
            "never counted against the backend"
        );
        assert_eq!(a.retry_on(), None, "never retried");
        assert_eq!(a.status(), 408);
        assert_eq!(a.side(), ErrorSide::Client);
        // The backend not reading, or not answering a complete body, is its own.
        for wait in [BodyWait::Backend, BodyWait::Done] {
            let a = blame_stalled_upload(late(), wait);
            assert!(matches!(a, UpstreamError::Timeout(_)));
            assert!(a.counts_against_backend());
        }
    }

    #[test]
    fn errors_know_their_side() {
        let backend = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let cases = [
            (
                UpstreamError::RefusedLocally(Cause::Closed("x")),
                ErrorSide::Client,
                400,
            ),
            (UpstreamError::Cancelled, ErrorSide::Client, 499),
            (
                UpstreamError::NoBackend {
                    upstream: "app".into(),
                },
                ErrorSide::Spooky,
                503,
            ),
            (UpstreamError::Status(503), ErrorSide::Backend, 503),
            (
                UpstreamError::ConnectTimeout { backend },
                ErrorSide::Backend,
                502,
            ),
            (
                UpstreamError::Timeout(Duration::from_secs(1)),
                ErrorSide::Backend,
                504,
            ),
        ];
        for (e, side, status) in cases {
            assert_eq!(e.side(), side, "{e}");
            assert_eq!(e.status(), status, "{e}");
        }
    }
}
