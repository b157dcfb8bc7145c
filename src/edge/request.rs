//! Request streams on the edge: reading request heads and bodies out of
//! quiche's HTTP/3 layer, and writing responses back with partial-write
//! handling (the remainder waits until quiche reports the stream writable).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, Bytes};
use quiche::h3::{self, NameValue};

use super::{h3_code, Edge, EdgeEvent};

use crate::router::bridge::{growth, RequestEvent, RequestKey, ToUpstream};
use crate::router::{self, MalformedReason, RequestError};
use crate::telemetry::access::{AccessRecord, AccessSink};
use crate::telemetry::WorkerMetrics;

/// Length at which a connection's list of finished-but-unacked responses
/// is pruned; on a busy connection most entries are long acked by then.
const UNACKED_PRUNE_AT: usize = 64;

/// What the access log line says about a request. The strings are filled
/// only while `telemetry.access_log` is on.
#[derive(Debug, Default)]
pub(super) struct AccessInfo {
    pub request_id: u64,
    /// The client's address when the request arrived.
    pub client: Option<SocketAddr>,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub trace_id: String,
    pub status: u16,
    pub upstream: Option<String>,
    pub backend: Option<SocketAddr>,
    pub error: Option<String>,
    pub started: Option<Instant>,
    /// Request sent to the backend → its response head (the forwarded
    /// attempt), from the upstream task.
    pub upstream_time: Option<std::time::Duration>,
}

/// The connection a request came on, as its access-log line names it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnTag<'a> {
    pub serial: u64,
    pub scid: &'a [u8],
}

/// The response half of a stream.
#[derive(Debug, Default)]
pub(super) struct RespSide {
    /// Head waiting for stream capacity.
    head: Option<router::ResponseHead>,
    head_sent: bool,
    /// Bytes not yet taken by quiche; `bool` = counted against the budget.
    chunks: VecDeque<(Bytes, bool)>,
    pub trailers: Option<Vec<h3::Header>>,
    /// The upstream finished the response (after chunks and trailers).
    pub end: bool,
    /// The request path waits for response credit with bytes in hand
    /// ([`ToEdge::Starved`](crate::router::bridge::ToEdge::Starved)).
    pub starved: bool,
    fin_sent: bool,
}

impl RespSide {
    pub fn head_started(&self) -> bool {
        self.head.is_some() || self.head_sent
    }

    pub fn push_chunk(&mut self, b: Bytes, budgeted: bool) {
        if !b.is_empty() {
            self.chunks.push_back((b, budgeted));
        }
    }
}

/// One request stream on one connection.
pub(super) struct Request {
    pub serial: u64,
    pub conn: usize,
    pub stream_id: u64,
    /// The head became an envelope ([`Edge::dispatch`]); until then the
    /// body stays in quiche and a FIN is only noted.
    pub dispatched: bool,
    /// The request path has this request (its `Head` went out) and has not
    /// finished it: body events and, at the end, `Cancel` go to it.
    pub upstream_open: bool,
    /// Request body bytes this stream may still read from the client
    /// (credit comes back as the backend takes them).
    pub req_credit: usize,
    /// The request body grant: credit when all of it is back.
    pub req_grant: usize,
    /// The response grant (the request path holds its credit).
    pub resp_grant: usize,
    /// Body byte counts for the access log and probes.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The HTTP/3 error code the client used, for logs (0 = none).
    pub cancel_code: u64,
    /// quiche has body bytes we did not read for lack of budget.
    pub req_data_pending: bool,
    /// The client's side of the stream ended (FIN read).
    pub req_finished: bool,
    /// Trailers that arrived before the head was mapped (HEADERS, then
    /// trailers, no DATA): forwarded by [`Edge::dispatch`].
    pub pending_trailers: Option<http::HeaderMap>,
    pub resp: RespSide,
    pub log: AccessInfo,
    /// Request body bytes seen, checked against content-length.
    pub body_seen: u64,
    pub content_length: Option<u64>,
    /// Growth of this stream's grants (both directions) above the initial
    /// ones, charged to its connection and worker until it finishes.
    pub buffer_grown: usize,
}

/// A request head not yet mapped to an envelope (see `Edge::new_request`).
pub(super) struct PendingHead {
    pub key: RequestKey,
    pub list: Vec<h3::Header>,
    pub more_frames: bool,
    pub started: Instant,
}

impl Request {
    /// This request's key, given its slot.
    pub fn key(&self, slot: usize) -> RequestKey {
        RequestKey {
            slot,
            serial: self.serial,
        }
    }

    pub fn set_head(&mut self, h: router::ResponseHead) {
        self.log.status = h.status.as_u16();
        self.resp.head = Some(h);
    }

    /// Replaces the response with a short error from spooky itself.
    pub fn synthesize(&mut self, status: u16, retry_after: Option<u32>) {
        let body = Bytes::from(format!("{}\n", status_text(status)));
        let mut head = router::ResponseHead::synthetic(status, body.len());
        if let Some(secs) = retry_after {
            head.headers
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        self.set_head(head);
        self.resp.chunks.clear();
        self.resp.push_chunk(body, false);
        self.resp.trailers = None;
        self.resp.end = true;
    }

    /// Fires the `request_done` probe (status 0: reset or aborted).
    pub fn probe_done(&self, status: u16, took: Option<std::time::Duration>) {
        crate::telemetry::probes::request_done(
            self.log.request_id,
            status,
            self.bytes_down,
            took.unwrap_or_default(),
            self.bytes_up,
        );
    }

    /// Writes the request's access-log line to `sink` (none: no line).
    pub fn log_access(
        &self,
        sink: Option<&mut AccessSink>,
        conn: Option<ConnTag<'_>>,
        outcome: &str,
        took: Option<std::time::Duration>,
    ) {
        let Some(sink) = sink else {
            return;
        };
        let l = &self.log;
        sink.write(&AccessRecord {
            client_ip: l.client.map(|c| c.ip()),
            client_port: l.client.map(|c| c.port()),
            conn: conn.map_or(0, |c| c.serial),
            conn_id: conn.map(|c| c.scid),
            request_id: l.request_id,
            trace_id: &l.trace_id,
            method: &l.method,
            authority: &l.authority,
            path: &l.path,
            upstream: l.upstream.as_deref(),
            backend: l.backend,
            status: l.status,
            bytes_in: self.bytes_up,
            bytes_out: self.bytes_down,
            duration: took.unwrap_or_default(),
            upstream_duration: l.upstream_time,
            outcome,
            error: l.error.as_deref(),
        });
    }
}

pub(super) fn status_text(status: u16) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("{status} {reason}")
}

fn is_stream_gone(e: &h3::Error) -> Option<u64> {
    match e {
        h3::Error::TransportError(quiche::Error::StreamStopped(c))
        | h3::Error::TransportError(quiche::Error::StreamReset(c)) => Some(*c),
        h3::Error::TransportError(quiche::Error::InvalidStreamState(_)) => Some(0),
        _ => None,
    }
}

impl Edge {
    /// Drains HTTP/3 events of one connection.
    pub(super) fn poll_h3(&mut self, ci: usize, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            let Some(h3c) = conn.h3.as_mut() else {
                return;
            };
            let (sid, ev) = match h3c.poll(&mut conn.quic) {
                Ok(x) => x,
                Err(h3::Error::Done) => return,
                Err(e) => {
                    // quiche already closed the connection with the right code.
                    tracing::debug!(error = %e, "HTTP/3 connection error");
                    return;
                }
            };
            let slot = conn.streams.get(&sid).copied();
            match ev {
                h3::Event::Headers { list, more_frames } => match slot {
                    None => self.new_request(ci, sid, list, more_frames, now),
                    Some(slot) => self.request_trailers(slot, &list),
                },
                h3::Event::Data => match slot {
                    Some(slot) => self.read_request_body(slot),
                    None => self.discard_body(ci, sid),
                },
                h3::Event::Finished => {
                    if let Some(slot) = slot {
                        self.request_finished(slot);
                    }
                }
                h3::Event::Reset(code) => {
                    if let Some(slot) = slot {
                        self.client_cancelled(slot, code);
                    }
                }
                h3::Event::PriorityUpdate => {
                    if let Some(h) = conn.h3.as_mut() {
                        let _ = h.take_last_priority_update(sid);
                    }
                }
                h3::Event::GoAway => {}
            }
        }
    }

    /// A request head arrived: the request gets its slot and cancellation
    /// token now (a reset later in this batch needs them), while mapping
    /// the head to an envelope waits for [`Edge::poll_event`], after the
    /// whole receive batch: a stream the client resets in the same batch
    /// (rapid reset) then costs no header work at all.
    fn new_request(
        &mut self,
        ci: usize,
        sid: u64,
        list: Vec<h3::Header>,
        more_frames: bool,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        if conn.closing {
            // After GOAWAY: refuse, the client may retry elsewhere.
            let _ =
                conn.quic
                    .stream_shutdown(sid, quiche::Shutdown::Read, h3_code::REQUEST_REJECTED);
            let _ =
                conn.quic
                    .stream_shutdown(sid, quiche::Shutdown::Write, h3_code::REQUEST_REJECTED);
            return;
        }
        conn.max_stream_id = Some(conn.max_stream_id.map_or(sid, |m| m.max(sid)));
        conn.hold_ack(now);
        let serial = self.next_request_serial;
        self.next_request_serial += 1;
        let access_log = self.settings.access_log;
        let peer = access_log
            .then(|| conn.quic.path_stats().next().map(|p| p.peer_addr))
            .flatten();
        let mut log = AccessInfo {
            request_id: serial,
            client: peer,
            started: Some(now),
            ..Default::default()
        };
        // Only the access log reads these: no copies when it is off.
        for h in list.iter().filter(|_| self.settings.access_log) {
            match h.name() {
                b":method" => log.method = String::from_utf8_lossy(h.value()).into_owned(),
                b":authority" => log.authority = String::from_utf8_lossy(h.value()).into_owned(),
                b":path" => log.path = String::from_utf8_lossy(h.value()).into_owned(),
                _ => {}
            }
        }
        let req = Request {
            serial,
            conn: ci,
            stream_id: sid,
            dispatched: false,
            upstream_open: false,
            req_credit: self.settings.initial_body_buffer_bytes.max(1),
            req_grant: self.settings.initial_body_buffer_bytes.max(1),
            resp_grant: self.settings.initial_body_buffer_bytes.max(1),
            bytes_up: 0,
            bytes_down: 0,
            cancel_code: 0,
            req_data_pending: false,
            req_finished: !more_frames,
            pending_trailers: None,
            resp: RespSide::default(),
            log,
            body_seen: 0,
            content_length: None,
            buffer_grown: 0,
        };
        self.metrics
            .requests_in_flight
            .fetch_add(1, Ordering::Relaxed);
        crate::telemetry::probes::request_start(serial, conn.serial, sid);
        let slot = self.requests.insert(req);
        conn.streams.insert(sid, slot);
        conn.shrink_at = None;
        self.heads.push_back(PendingHead {
            key: RequestKey { slot, serial },
            list,
            more_frames,
            started: now,
        });
    }

    /// Maps a pending head to an envelope: the request's `Head` event (and
    /// any body that came with it) for the request path, or the error
    /// answer for a malformed, rejected or refused one.
    pub(super) fn dispatch(&mut self, head: PendingHead) {
        let slot = head.key.slot;
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        let Some(conn) = self.conns.get(req.conn) else {
            return;
        };
        let client = conn
            .quic
            .path_stats()
            .next()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.peer_addr);
        let conn_span = conn.span.clone();
        let (sid, ci) = (req.stream_id, req.conn);
        let built = router::build_envelope(
            &head.list,
            head.more_frames,
            client,
            req.serial,
            self.settings.max_request_header_bytes,
            head.started,
            &mut *self.source,
        );
        req.dispatched = true;
        match built {
            Ok(env) => {
                if self.settings.access_log {
                    req.log.trace_id = env.trace.trace_id_hex();
                }
                req.content_length = env.content_length;
                req.upstream_open = true;
                // Trailers seen before this point had no DATA before them
                // (quiche parses trailers only once every DATA frame was
                // read, and nothing reads the body before dispatch): they
                // go first, the end (below) after them.
                let trailers = req.pending_trailers.take();
                let data_pending = std::mem::take(&mut req.req_data_pending);
                self.events.push_back(EdgeEvent {
                    key: head.key,
                    event: RequestEvent::Head {
                        envelope: Box::new(env),
                        conn_span,
                    },
                });
                if let Some(t) = trailers {
                    self.emit(head.key, RequestEvent::Body(ToUpstream::Trailers(t)));
                }
                if !head.more_frames {
                    self.emit(head.key, RequestEvent::Body(ToUpstream::End));
                } else if self.requests.get(slot).is_some_and(|r| r.req_finished) {
                    // An empty body's FIN came in the head's batch.
                    self.request_finished(slot);
                } else if data_pending {
                    // Body frames that came in the head's batch. Draining
                    // the last of them queues quiche's Finished event:
                    // deliver it now, not at a next packet that may never
                    // come while the client waits.
                    self.read_request_body(slot);
                    self.poll_h3(ci, self.now);
                }
            }
            Err(RequestError::Malformed(m)) => {
                tracing::info!(stream = sid, reason = m.reason.as_str(), detail = %m.detail, "malformed request: stream reset with H3_MESSAGE_ERROR");
                self.metrics.malformed(m.reason);
                req.log.error = Some(m.to_string());
                self.reset_stream(slot, h3_code::MESSAGE_ERROR);
            }
            Err(RequestError::Rejected(why)) => {
                tracing::info!(stream = sid, %why, "request rejected: stream reset with H3_REQUEST_REJECTED");
                req.log.error = Some(why.to_string());
                self.reset_stream(slot, h3_code::REQUEST_REJECTED);
            }
            Err(RequestError::Refused { status, reason }) => {
                tracing::debug!(stream = sid, status, %reason, "request refused");
                req.log.error = Some(reason);
                req.synthesize(status, None);
                self.flush_response(slot);
            }
        }
        // Whatever happened wants packets out (answers, resets, credit).
        self.mark_dirty(ci);
        self.update_timer(ci);
    }

    fn request_trailers(&mut self, slot: usize, list: &[h3::Header]) {
        match router::headers::trailers_from_h3(list) {
            Ok(map) => {
                if let Some(req) = self.requests.get_mut(slot) {
                    let key = req.key(slot);
                    if req.upstream_open {
                        self.emit(key, RequestEvent::Body(ToUpstream::Trailers(map)));
                    } else if !req.dispatched {
                        // Before the head is mapped there is no request
                        // upstream yet: keep them for `dispatch` instead of
                        // dropping them.
                        req.pending_trailers = Some(map);
                    }
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "malformed trailers: stream reset with H3_MESSAGE_ERROR");
                self.metrics.malformed(MalformedReason::Trailers);
                self.reset_stream(slot, h3_code::MESSAGE_ERROR);
            }
        }
    }

    /// Reads request body bytes while the request budget allows.
    pub(super) fn read_request_body(&mut self, slot: usize) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        if !req.dispatched {
            req.req_data_pending = true; // read once the head is mapped
            return;
        }
        let Some(conn) = self.conns.get_mut(req.conn) else {
            return;
        };
        let Some(h3c) = conn.h3.as_mut() else {
            return;
        };
        let mut malformed = false;
        let mut gone = None;
        let key = RequestKey {
            slot,
            serial: req.serial,
        };
        loop {
            // Without a request upstream (answered here) the bytes are
            // read and discarded, budget or not.
            let avail = if req.upstream_open {
                req.req_credit
            } else {
                self.scratch.len()
            };
            if avail == 0 {
                tracing::trace!(
                    stream = req.stream_id,
                    seen = req.body_seen,
                    "request body paused: budget exhausted"
                );
                req.req_data_pending = true;
                break;
            }
            let n = avail.min(self.scratch.len());
            match h3c.recv_body(&mut conn.quic, req.stream_id, &mut self.scratch[..n]) {
                Ok(got) => {
                    req.body_seen += got as u64;
                    if req.content_length.is_some_and(|cl| req.body_seen > cl) {
                        malformed = true;
                        break;
                    }
                    if req.upstream_open {
                        let chunk = Bytes::copy_from_slice(&self.scratch[..got]);
                        req.req_credit = req.req_credit.saturating_sub(got);
                        req.bytes_up += got as u64;
                        self.events.push_back(EdgeEvent {
                            key,
                            event: RequestEvent::Body(ToUpstream::Data(chunk)),
                        });
                    }
                }
                Err(h3::Error::Done) => {
                    tracing::trace!(
                        stream = req.stream_id,
                        seen = req.body_seen,
                        avail,
                        "request body drained"
                    );
                    req.req_data_pending = false;
                    break;
                }
                Err(e) => {
                    gone = Some(is_stream_gone(&e).unwrap_or(h3_code::INTERNAL_ERROR));
                    break;
                }
            }
        }
        if malformed {
            tracing::info!(
                stream = req.stream_id,
                "request body longer than content-length: stream reset with H3_MESSAGE_ERROR"
            );
            self.metrics.malformed(MalformedReason::BodyLength);
            self.reset_stream(slot, h3_code::MESSAGE_ERROR);
        } else if let Some(code) = gone {
            self.client_cancelled(slot, code);
        }
    }

    fn discard_body(&mut self, ci: usize, sid: u64) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let Some(h3c) = conn.h3.as_mut() else {
            return;
        };
        while let Ok(n) = h3c.recv_body(&mut conn.quic, sid, &mut self.scratch) {
            if n == 0 {
                break;
            }
        }
    }

    fn request_finished(&mut self, slot: usize) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        req.req_finished = true;
        if !req.dispatched {
            return; // checked and forwarded by `dispatch`
        }
        if req.content_length.is_some_and(|cl| cl != req.body_seen) {
            tracing::info!(
                stream = req.stream_id,
                "request body shorter than content-length: stream reset with H3_MESSAGE_ERROR"
            );
            self.metrics.malformed(MalformedReason::BodyLength);
            req.log.error = Some("body length differs from content-length".into());
            self.reset_stream(slot, h3_code::MESSAGE_ERROR);
            return;
        }
        if req.upstream_open {
            let key = req.key(slot);
            self.emit(key, RequestEvent::Body(ToUpstream::End));
        }
        if self.requests.get(slot).is_some_and(|r| r.resp.fin_sent) {
            self.finish_request(slot, "ok");
        }
    }

    /// The client reset its stream or stopped reading: cancel upstream.
    pub(super) fn client_cancelled(&mut self, slot: usize, code: u64) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        req.cancel_code = code;
        WorkerMetrics::inc(&self.metrics.client_cancels);
        if let Some(conn) = self.conns.get_mut(req.conn) {
            let _ = conn.quic.stream_shutdown(
                req.stream_id,
                quiche::Shutdown::Write,
                h3_code::REQUEST_CANCELLED,
            );
            let _ = conn.quic.stream_shutdown(
                req.stream_id,
                quiche::Shutdown::Read,
                h3_code::REQUEST_CANCELLED,
            );
        }
        if self.settings.access_log {
            req.log.error = Some(format!("client cancelled (0x{code:x})"));
        }
        self.finish_request(slot, "client_cancelled");
    }

    /// Resets the client stream both ways with an HTTP/3 error code and
    /// cancels the upstream side.
    pub(super) fn reset_stream(&mut self, slot: usize, code: u64) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        req.cancel_code = code;
        if let Some(conn) = self.conns.get_mut(req.conn) {
            let _ = conn
                .quic
                .stream_shutdown(req.stream_id, quiche::Shutdown::Write, code);
            if !req.req_finished {
                let _ = conn
                    .quic
                    .stream_shutdown(req.stream_id, quiche::Shutdown::Read, code);
            }
        }
        self.finish_request(slot, "reset");
    }

    /// Writes as much of the pending response as quiche accepts.
    pub(super) fn flush_response(&mut self, slot: usize) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(req.conn) else {
            return;
        };
        let Some(h3c) = conn.h3.as_mut() else {
            return;
        };
        let sid = req.stream_id;
        let resp = &mut req.resp;
        let mut gone = None;
        // Response credit to give back: budgeted bytes quiche took.
        let mut credit = 0;
        'write: {
            if let Some(head) = resp.head.take() {
                let fin = resp.end && resp.chunks.is_empty() && resp.trailers.is_none();
                match h3c.send_response(&mut conn.quic, sid, &head.h3_fields(), fin) {
                    Ok(()) => {
                        // The ACK owed rides with this head
                        // (`Conn::release_ack`, field by field: `h3c`
                        // borrows `conn.h3`).
                        if conn.ack_hold.take().is_some() {
                            conn.quic.hold_ack(None);
                        }
                        resp.head_sent = true;
                        resp.fin_sent = fin;
                        self.body_writes += 1;
                    }
                    Err(h3::Error::StreamBlocked) | Err(h3::Error::Done) => {
                        resp.head = Some(head);
                        break 'write;
                    }
                    Err(e) => {
                        gone = Some(is_stream_gone(&e).unwrap_or(h3_code::INTERNAL_ERROR));
                        break 'write;
                    }
                }
            }
            if !resp.head_sent || resp.fin_sent {
                break 'write;
            }
            while let Some((chunk, budgeted)) = resp.chunks.front_mut() {
                match h3c.send_body(&mut conn.quic, sid, chunk, false) {
                    Ok(n) => {
                        self.body_writes += 1;
                        if *budgeted {
                            credit += n;
                        }
                        req.bytes_down += n as u64;
                        chunk.advance(n);
                        if chunk.is_empty() {
                            resp.chunks.pop_front();
                        } else {
                            break 'write; // partial write: wait for writable
                        }
                    }
                    Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => break 'write,
                    Err(e) => {
                        gone = Some(is_stream_gone(&e).unwrap_or(h3_code::INTERNAL_ERROR));
                        break 'write;
                    }
                }
            }
            if resp.end {
                let res = match resp.trailers.take() {
                    Some(t) => {
                        let r = h3c.send_additional_headers(&mut conn.quic, sid, &t, true, true);
                        if matches!(r, Err(h3::Error::StreamBlocked) | Err(h3::Error::Done)) {
                            resp.trailers = Some(t);
                        }
                        r
                    }
                    None => h3c.send_body(&mut conn.quic, sid, &[], true).map(|_| ()),
                };
                match res {
                    Ok(()) => {
                        resp.fin_sent = true;
                        self.body_writes += 1;
                    }
                    Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => {}
                    Err(e) => gone = Some(is_stream_gone(&e).unwrap_or(h3_code::INTERNAL_ERROR)),
                }
            }
        }
        self.after_response_write(slot, credit, gone);
    }

    /// What follows a write of `slot`'s response: the credit quiche's intake
    /// earned goes back to the request path; a stream the client gave up
    /// ends; a starved stream whose buffer quiche drained grows its grant;
    /// a finished response ends the request.
    fn after_response_write(&mut self, slot: usize, credit: usize, gone: Option<u64>) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        let key = req.key(slot);
        if credit > 0 && req.upstream_open {
            self.events.push_back(EdgeEvent {
                key,
                event: RequestEvent::ResponseCredit(credit),
            });
        }
        if let Some(code) = gone {
            self.client_cancelled(slot, code);
            return;
        }
        // quiche took everything buffered while the request path waits for
        // credit with bytes in hand: the grant is the bottleneck.
        if req.resp.head_sent
            && req.resp.chunks.is_empty()
            && !req.resp.end
            && std::mem::take(&mut req.resp.starved)
        {
            self.grow_response_buffer(slot);
            return;
        }
        if req.resp.fin_sent {
            if !req.req_finished {
                // Complete response before the full request: ask the client to
                // stop sending (RFC 9114 §4.1, H3_NO_ERROR).
                if let Some(conn) = self.conns.get_mut(req.conn) {
                    let _ = conn.quic.stream_shutdown(
                        req.stream_id,
                        quiche::Shutdown::Read,
                        h3_code::NO_ERROR,
                    );
                }
            }
            self.finish_request(slot, "ok");
        }
    }

    /// Counts a stream that ended by reset or with its request unread,
    /// against its connection and its source address; past either limit
    /// the connection is closed with H3_EXCESSIVE_LOAD (see `abandon`).
    fn count_abandoned(&mut self, ci: usize) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        conn.abandoned += 1;
        let source = conn.quic.path_stats().next().map(|p| p.peer_addr.ip());
        let source_over = source.is_some_and(|ip| self.abandoned_by_source.record(ip, now));
        let conn_over = conn.abandoned >= self.settings.max_abandoned_per_connection;
        if (conn_over || source_over) && conn.quic.local_error().is_none() {
            tracing::warn!(
                conn = ci,
                source = ?source,
                abandoned = conn.abandoned,
                per_source = source_over,
                "too many abandoned streams; closing connection with H3_EXCESSIVE_LOAD"
            );
            WorkerMetrics::inc(&self.metrics.abandoned_stream_closes);
            let _ = conn
                .quic
                .close(true, h3_code::EXCESSIVE_LOAD, b"too many abandoned streams");
            self.mark_dirty(ci);
        }
    }

    /// Removes a request from the tables, counting and logging it once.
    pub(super) fn finish_request(&mut self, slot: usize, outcome: &str) {
        let Some(req) = self.requests.try_remove(slot) else {
            return;
        };
        self.buffer_grown = self.buffer_grown.saturating_sub(req.buffer_grown);
        if let Some(conn) = self.conns.get_mut(req.conn) {
            conn.buffer_grown = conn.buffer_grown.saturating_sub(req.buffer_grown);
            conn.streams.remove(&req.stream_id);
            if outcome != "ok" || !req.req_finished {
                self.count_abandoned(req.conn);
            } else {
                if conn.unacked.len() >= UNACKED_PRUNE_AT {
                    super::responses_unacked(conn);
                }
                conn.unacked.push(req.stream_id);
            }
        }
        if let Some(conn) = self.conns.get_mut(req.conn) {
            if conn.closing && conn.streams.is_empty() && conn.close_at.is_none() {
                conn.close_at = Some(self.now + super::close_delay(&conn.quic));
            }
            if conn.streams.is_empty() {
                conn.shrink_at = Some(self.now + super::IDLE_SHRINK);
                self.update_timer(req.conn);
            }
        }
        // The request path stops (and resets the backend stream with CANCEL
        // if it is still open); outstanding credit dies with the request.
        if req.upstream_open {
            self.events.push_back(EdgeEvent {
                key: req.key(slot),
                event: RequestEvent::Cancel,
            });
        }
        self.metrics
            .requests_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        let status = if outcome == "ok" { req.log.status } else { 0 };
        let took = req
            .log
            .started
            .map(|t| self.now.saturating_duration_since(t));
        self.metrics.request_finished(status, took);
        req.probe_done(status, took);
        if self.settings.access_log {
            let conn = self.conns.get(req.conn).map(|c| ConnTag {
                serial: c.serial,
                scid: &c.scid,
            });
            req.log_access(self.access.as_mut(), conn, outcome, took);
        }
    }
}

impl Edge {
    /// What the connection and worker budgets still allow a stream of
    /// connection `ci` to grow by.
    fn buffer_room(&self, ci: usize) -> usize {
        let conn = self
            .conns
            .get(ci)
            .map_or(0, |c| c.buffer_grown)
            .min(self.settings.max_connection_buffer_bytes);
        (self.settings.max_connection_buffer_bytes - conn).min(
            self.settings
                .max_worker_buffer_bytes
                .saturating_sub(self.buffer_grown),
        )
    }

    /// Charges `extra` bytes of growth to request `slot`, its connection and
    /// the worker.
    fn charge_growth(&mut self, slot: usize, extra: usize) {
        let Some(req) = self.requests.get_mut(slot) else {
            return;
        };
        req.buffer_grown += extra;
        self.buffer_grown += extra;
        if let Some(conn) = self.conns.get_mut(req.conn) {
            conn.buffer_grown += extra;
        }
    }

    /// Doubles the response grant of `slot` within the budgets.
    pub(super) fn grow_response_buffer(&mut self, slot: usize) {
        self.grow_buffer(slot, false);
    }

    /// Doubles the request grant of `slot` within the budgets, when the
    /// upstream side has returned every permit (it drained the buffer)
    /// while the client still had bytes waiting.
    pub(super) fn grow_request_buffer(&mut self, slot: usize) {
        self.grow_buffer(slot, true);
    }

    /// Doubles one direction's grant of `slot` (`request`: the request
    /// body's, else the response's) within the connection and worker budgets.
    fn grow_buffer(&mut self, slot: usize, request: bool) {
        let Some(req) = self.requests.get(slot) else {
            return;
        };
        let grant = if request {
            req.req_grant
        } else {
            req.resp_grant
        };
        if request && req.req_credit < grant {
            return;
        }
        let room = self.buffer_room(req.conn);
        let added = growth(grant, self.settings.max_body_buffer_bytes, room);
        let (key, stream) = (req.key(slot), req.stream_id);
        if added > 0 {
            if let Some(req) = self.requests.get_mut(slot) {
                if request {
                    req.req_grant += added;
                    req.req_credit += added;
                } else {
                    req.resp_grant += added;
                }
            }
            if !request {
                self.emit(key, RequestEvent::ResponseGrant(added));
            }
            tracing::trace!(stream, request, grant = grant + added, "body buffer grown");
            self.charge_growth(slot, added);
        }
    }

    /// Cancels every request of a connection the client has closed
    /// (CONNECTION_CLOSE received: quiche is draining and will never send
    /// again), so their backend streams are reset now rather than when the
    /// draining period ends.
    pub(super) fn cancel_if_draining(&mut self, ci: usize) {
        let slots: Vec<usize> = match self.conns.get(ci) {
            Some(c) if c.quic.is_draining() && !c.streams.is_empty() => {
                c.streams.values().copied().collect()
            }
            _ => return,
        };
        for slot in slots {
            if let Some(req) = self.requests.get_mut(slot) {
                req.cancel_code = h3_code::REQUEST_CANCELLED;
                req.log.error = Some("client closed the connection".into());
                WorkerMetrics::inc(&self.metrics.client_cancels);
            }
            self.finish_request(slot, "connection_closed");
        }
    }
}
