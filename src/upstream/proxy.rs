//! One request's journey: route, pick, acquire an h2 stream, then stream the
//! request body up and the response down with both flow controls coupled
//! (see `router::bridge` for the budgets).

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::time::timeout;

use super::{Gateway, UpstreamError};
use crate::balancer::PickContext;
use crate::edge::h3_code;
use crate::router::bridge::{EdgeSender, StreamShared, ToEdge, ToUpstream, UpstreamSide};
use crate::router::{self, Envelope};
use crate::telemetry::WorkerMetrics;
use tokio::sync::mpsc;

/// Carries one request to a backend and its response back to the edge.
/// Ends early, dropping (and so resetting with CANCEL) the h2 stream, when
/// the edge cancels the request.
pub async fn proxy(
    gw: Rc<Gateway>,
    env: Box<Envelope>,
    mut side: UpstreamSide,
    metrics: Arc<WorkerMetrics>,
) {
    let cancel = side.shared.cancel.clone();
    let mut head_sent = false;
    let res = tokio::select! {
        r = run(&gw, &env, &mut side, &metrics, &mut head_sent) => r,
        _ = cancel.cancelled() => Err(UpstreamError::Cancelled),
    };
    match res {
        Ok(()) | Err(UpstreamError::Cancelled) => {}
        Err(e) => {
            match &e {
                UpstreamError::Timeout(_) | UpstreamError::Idle(_) => {
                    WorkerMetrics::inc(&metrics.upstream_timeouts)
                }
                UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                    WorkerMetrics::inc(&metrics.upstream_connect_failures)
                }
                _ => {}
            }
            tracing::debug!(request_id = env.request_id, error = %e, head_sent, "upstream request failed");
            if head_sent {
                side.edge.send(ToEdge::Reset {
                    code: h3_code::INTERNAL_ERROR,
                });
            } else {
                side.edge.send(ToEdge::Fail {
                    status: e.status(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

async fn run(
    gw: &Gateway,
    env: &Envelope,
    side: &mut UpstreamSide,
    metrics: &WorkerMetrics,
    head_sent: &mut bool,
) -> Result<(), UpstreamError> {
    let up_idx = gw
        .routes
        .route(env.host(), &env.path)
        .ok_or_else(|| UpstreamError::NoRoute {
            host: env.host().to_string(),
            path: env.path.clone(),
        })?;
    let group = gw
        .upstreams
        .get(up_idx)
        .ok_or_else(|| UpstreamError::NoBackend {
            upstream: format!("#{up_idx}"),
        })?;
    let ctx = PickContext {
        client: env.client,
        path: &env.path,
    };
    let backend = group.pick(&ctx).ok_or_else(|| UpstreamError::NoBackend {
        upstream: group.name.clone(),
    })?;
    WorkerMetrics::inc(&metrics.upstream_picks);
    side.edge.send(ToEdge::Backend {
        upstream: group.name.clone(),
        backend: backend.address,
    });
    let t = group.timeouts;
    let head_deadline = env.received_at + t.request;
    let acquire_deadline = (Instant::now() + t.connect).min(head_deadline);
    let (mut sr, _guard) = backend.acquire(acquire_deadline).await?;

    let uri = http::Uri::builder()
        .scheme("http")
        .authority(env.authority.as_str())
        .path_and_query(env.path.as_str())
        .build()
        .map_err(|e| UpstreamError::BeforeResponse(format!("bad uri: {e}")))?;
    let mut req = http::Request::builder()
        .method(env.method.clone())
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(())
        .map_err(|e| UpstreamError::BeforeResponse(e.to_string()))?;
    *req.headers_mut() = env.headers.clone();

    let (resp_fut, send) = sr
        .send_request(req, !env.has_body)
        .map_err(|e| classify_before(&e))?;

    let UpstreamSide {
        shared,
        body: body_rx,
        edge,
        budget,
    } = side;
    let pump = pump_request_body(send, body_rx, shared, edge, env.has_body, t.idle);
    tokio::pin!(pump);
    let mut pump_done = !env.has_body;

    let response = async {
        let resp = match timeout(
            head_deadline.saturating_duration_since(Instant::now()),
            resp_fut,
        )
        .await
        {
            Err(_) => return Err(UpstreamError::Timeout(t.request)),
            Ok(Err(e)) => return Err(classify_before(&e)),
            Ok(Ok(r)) => r,
        };
        Ok(resp)
    };
    tokio::pin!(response);

    // Pump the request body while waiting for the response head.
    let resp = loop {
        tokio::select! {
            r = &mut response => break r?,
            p = &mut pump, if !pump_done => {
                pump_done = true;
                if let Err(e) = p {
                    // The backend may still answer (e.g. 413); the response
                    // future reports the stream's fate.
                    tracing::debug!(request_id = env.request_id, error = %e, "request body not fully sent");
                }
            }
        }
    };

    let (parts, body) = resp.into_parts();
    edge.send(ToEdge::Headers(router::response_headers(
        parts.status,
        &parts.headers,
    )));
    *head_sent = true;

    // Stream the response down while any remaining request body goes up.
    let down = pump_response_body(body, shared, edge, *budget, t.idle);
    tokio::pin!(down);
    loop {
        tokio::select! {
            r = &mut down => return r,
            p = &mut pump, if !pump_done => {
                pump_done = true;
                if let Err(e) = p {
                    tracing::debug!(request_id = env.request_id, error = %e, "request body not fully sent");
                }
            }
        }
    }
}

fn classify_before(e: &h2::Error) -> UpstreamError {
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => UpstreamError::Refused(e.to_string()),
        _ => UpstreamError::BeforeResponse(e.to_string()),
    }
}

/// Moves request body chunks from the edge into the h2 stream, sending only
/// what h2 granted capacity for, and returning budget to the edge as it goes.
async fn pump_request_body(
    mut send: SendStream<Bytes>,
    body: &mut mpsc::UnboundedReceiver<ToUpstream>,
    shared: &StreamShared,
    edge: &EdgeSender,
    has_body: bool,
    idle: Duration,
) -> Result<(), UpstreamError> {
    if !has_body {
        return Ok(());
    }
    let res = pump_request_body_inner(&mut send, body, shared, edge, idle).await;
    if res.is_err() {
        // h2 only resets a stream once every handle is gone, and the
        // response side is still alive: reset the request side explicitly
        // so the backend never waits on a half-sent body.
        send.send_reset(h2::Reason::CANCEL);
    }
    res
}

async fn pump_request_body_inner(
    send: &mut SendStream<Bytes>,
    body: &mut mpsc::UnboundedReceiver<ToUpstream>,
    shared: &StreamShared,
    edge: &EdgeSender,
    idle: Duration,
) -> Result<(), UpstreamError> {
    loop {
        let msg = match timeout(idle, body.recv()).await {
            Err(_) => return Err(UpstreamError::Idle(idle)),
            Ok(None) => return Err(UpstreamError::Cancelled),
            Ok(Some(m)) => m,
        };
        match msg {
            ToUpstream::Data(mut b) => {
                let total = b.len();
                while !b.is_empty() {
                    send.reserve_capacity(b.len());
                    if send.capacity() == 0 {
                        tracing::trace!(want = b.len(), "waiting for h2 send capacity");
                        loop {
                            match timeout(idle, poll_fn(|cx| send.poll_capacity(cx))).await {
                                Err(_) => return Err(UpstreamError::Idle(idle)),
                                Ok(None) => {
                                    return Err(UpstreamError::ResponseReset(
                                        "request stream closed".into(),
                                    ))
                                }
                                Ok(Some(Err(e))) => {
                                    return Err(UpstreamError::ResponseReset(e.to_string()))
                                }
                                Ok(Some(Ok(0))) => continue,
                                Ok(Some(Ok(_))) => break,
                            }
                        }
                    }
                    let cap = send.capacity().min(b.len()).max(1);
                    let piece = b.split_to(cap);
                    send.send_data(piece, false)
                        .map_err(|e| UpstreamError::ResponseReset(e.to_string()))?;
                }
                shared.req_budget.add_permits(total);
                tracing::trace!(total, "request chunk handed to h2");
                edge.send(ToEdge::RequestCredit);
            }
            ToUpstream::Trailers(t) => {
                send.send_trailers(t)
                    .map_err(|e| UpstreamError::ResponseReset(e.to_string()))?;
                return Ok(());
            }
            ToUpstream::End => {
                send.send_data(Bytes::new(), true)
                    .map_err(|e| UpstreamError::ResponseReset(e.to_string()))?;
                return Ok(());
            }
        }
    }
}

/// Moves response body chunks from h2 to the edge, taking budget first and
/// only then releasing h2 flow-control capacity.
async fn pump_response_body(
    mut body: RecvStream,
    shared: &StreamShared,
    edge: &EdgeSender,
    budget: usize,
    idle: Duration,
) -> Result<(), UpstreamError> {
    loop {
        let next = match timeout(idle, body.data()).await {
            Err(_) => return Err(UpstreamError::Idle(idle)),
            Ok(n) => n,
        };
        let Some(chunk) = next else { break };
        let mut chunk = chunk.map_err(|e| UpstreamError::ResponseReset(e.to_string()))?;
        let len = chunk.len();
        while !chunk.is_empty() {
            let n = chunk.len().min(budget);
            // A client that stops reading must not pin this h2 stream (and
            // its share of the connection window) forever.
            let permits = match timeout(idle, shared.resp_budget.acquire_many(n as u32)).await {
                Err(_) => return Err(UpstreamError::Idle(idle)),
                Ok(p) => p.map_err(|_| UpstreamError::Cancelled)?,
            };
            permits.forget();
            let piece = chunk.split_to(n);
            if !edge.send(ToEdge::Data(piece)) {
                return Err(UpstreamError::Cancelled);
            }
        }
        let _ = body.flow_control().release_capacity(len);
    }
    let trailers = match timeout(idle, body.trailers()).await {
        Err(_) => return Err(UpstreamError::Idle(idle)),
        Ok(t) => t.map_err(|e| UpstreamError::ResponseReset(e.to_string()))?,
    };
    if let Some(t) = trailers {
        edge.send(ToEdge::Trailers(router::trailers_to_h3(&t)));
    }
    edge.send(ToEdge::End);
    Ok(())
}
