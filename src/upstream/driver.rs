//! The request path of one worker, driven by the worker loop: requests in
//! a table keyed by the front's [`RequestKey`], each one's progress a future
//! polled here (no spawned task, no channel, semaphore or cancellation token
//! per request). The front's [`RequestEvent`]s go in with
//! [`RequestPath::handle`]; [`RequestPath::run`] polls the requests that
//! can move; the [`ToEdge`] events they produce come out of
//! [`RequestPath::take_output`]. An h2 connection keeps its own driver task.
//!
//! Call protocol, per loop turn: hand over every front event, `run`, hand
//! the output back to the front, repeat while anything moved; wait on
//! [`RequestPath::ready`] with the loop's other inputs.
//!
//! A request's future is woken by h2, timers and pools through a waker per
//! table slot that queues the slot in a ready list and wakes the worker;
//! events from the front queue it directly. Dropping a future (on `Cancel`)
//! ends the request: its h2 stream is reset with CANCEL, its pending-queue
//! place and in-flight count are given back by their guards.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tracing::Instrument;

use super::Gateway;
use crate::router::bridge::{RequestEvent, RequestKey, ToEdge, ToUpstream};
use crate::telemetry::WorkerMetrics;

/// Response events waiting for the front, in order.
pub(crate) type Output = Rc<RefCell<VecDeque<(RequestKey, ToEdge)>>>;

/// One request's side of the seam, shared by its table entry (which
/// delivers the front's events) and its future (which consumes them).
pub struct Link {
    key: RequestKey,
    state: RefCell<LinkState>,
    out: Output,
}

struct LinkState {
    /// Request body events not yet taken by the body pump.
    body: VecDeque<ToUpstream>,
    /// Response bytes the request path may still forward.
    resp_credit: usize,
    /// The response grant (pieces are cut to half of it).
    resp_grant: usize,
    /// `Starved` was sent and no credit taken since.
    starved: bool,
    /// Request body credit earned during this poll, sent as one event when
    /// the poll ends: the front sees everything a poll gave back at once
    /// (which is what tells it the grant, not the backend, is the limit).
    credit_owed: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("key", &self.key).finish()
    }
}

impl Link {
    /// A link for `key` whose response direction starts with `grant` bytes.
    pub fn new(key: RequestKey, grant: usize, out: Output) -> Rc<Self> {
        let grant = grant.max(1);
        Rc::new(Self {
            key,
            state: RefCell::new(LinkState {
                body: VecDeque::new(),
                resp_credit: grant,
                resp_grant: grant,
                starved: false,
                credit_owed: 0,
            }),
            out,
        })
    }

    /// Sends a response event to the front.
    pub fn send(&self, msg: ToEdge) {
        self.out.borrow_mut().push_back((self.key, msg));
    }

    /// The next request body event from the front (pending until one is
    /// there; the request path polls again when one arrives).
    pub async fn next_body(&self) -> ToUpstream {
        poll_fn(|_| match self.state.borrow_mut().body.pop_front() {
            Some(ev) => Poll::Ready(ev),
            None => Poll::Pending,
        })
        .await
    }

    /// Takes `n` bytes of response credit, waiting for the front to give
    /// it; tells the front once when the wait begins ([`ToEdge::Starved`]),
    /// so it may grow the grant.
    pub async fn take_response_credit(&self, n: usize) {
        poll_fn(|_| {
            let mut s = self.state.borrow_mut();
            if s.resp_credit >= n {
                s.resp_credit -= n;
                s.starved = false;
                return Poll::Ready(());
            }
            if !s.starved {
                s.starved = true;
                drop(s);
                self.send(ToEdge::Starved);
            }
            Poll::Pending
        })
        .await
    }

    /// Largest response piece forwarded at once: half the grant, so the
    /// front can write one piece while the next is on its way.
    pub fn response_piece(&self) -> usize {
        (self.state.borrow().resp_grant / 2).max(1)
    }

    /// Gives the front `n` bytes of request body credit back (sent when
    /// the current poll ends, summed with the rest of that poll's).
    pub fn request_credit(&self, n: usize) {
        let mut s = self.state.borrow_mut();
        s.credit_owed = s.credit_owed.saturating_add(n);
    }

    /// Sends the credit this poll earned.
    pub(super) fn send_credit(&self) {
        let owed = std::mem::take(&mut self.state.borrow_mut().credit_owed);
        if owed > 0 {
            self.send(ToEdge::RequestCredit(owed));
        }
    }

    pub(super) fn deliver(&self, ev: RequestEvent) {
        let mut s = self.state.borrow_mut();
        match ev {
            RequestEvent::Body(b) => s.body.push_back(b),
            RequestEvent::ResponseCredit(n) => s.resp_credit = s.resp_credit.saturating_add(n),
            RequestEvent::ResponseGrant(n) => {
                s.resp_credit = s.resp_credit.saturating_add(n);
                s.resp_grant = s.resp_grant.saturating_add(n);
            }
            RequestEvent::Head { .. } | RequestEvent::Cancel => {}
        }
    }
}

/// Table slots whose requests can move, and the worker loop's waker.
#[derive(Default)]
struct ReadyList {
    inner: Mutex<ReadyInner>,
}

#[derive(Default)]
struct ReadyInner {
    slots: Vec<usize>,
    queued: Vec<bool>,
    waker: Option<Waker>,
}

impl ReadyList {
    fn push(&self, slot: usize) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.queued.len() <= slot {
            g.queued.resize(slot + 1, false);
        }
        if !g.queued[slot] {
            g.queued[slot] = true;
            g.slots.push(slot);
            if let Some(w) = g.waker.take() {
                w.wake();
            }
        }
    }

    fn take(&self, into: &mut Vec<usize>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut g.slots, into);
        for &s in into.iter() {
            if let Some(q) = g.queued.get_mut(s) {
                *q = false;
            }
        }
    }

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.slots.is_empty() {
            g.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// The waker of one table slot.
struct SlotWaker {
    slot: usize,
    ready: Arc<ReadyList>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.slot);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.slot);
    }
}

struct Entry {
    serial: u64,
    link: Rc<Link>,
    task: Pin<Box<dyn Future<Output = ()>>>,
    /// Polled at least once (a request cancelled before is counted as
    /// cancelled before dispatch: it never reached a backend).
    polled: bool,
}

/// The request path of one worker (see the module docs).
pub struct RequestPath {
    entries: Vec<Option<Entry>>,
    /// One waker per slot, made once and reused by every request there.
    wakers: Vec<Waker>,
    ready: Arc<ReadyList>,
    out: Output,
    scratch: Vec<usize>,
    metrics: Arc<WorkerMetrics>,
    /// Initial response grant of each request (`limits.initial_body_buffer_bytes`).
    initial_grant: usize,
    /// Largest response piece (`limits.max_body_buffer_bytes`).
    budget: usize,
}

impl std::fmt::Debug for RequestPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPath")
            .field("requests", &self.len())
            .finish()
    }
}

impl RequestPath {
    pub fn new(metrics: Arc<WorkerMetrics>, initial_grant: usize, budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            wakers: Vec::new(),
            ready: Arc::default(),
            out: Rc::default(),
            scratch: Vec::new(),
            metrics,
            initial_grant,
            budget: budget.max(1),
        }
    }

    /// New limits for requests that start from now on.
    pub fn set_limits(&mut self, initial_grant: usize, budget: usize) {
        self.initial_grant = initial_grant;
        self.budget = budget.max(1);
    }

    /// Requests in the table.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(Option::is_none)
    }

    /// Takes one front event; a new request is served by `gateway`.
    pub fn handle(&mut self, key: RequestKey, ev: RequestEvent, gateway: &Rc<Gateway>) {
        match ev {
            RequestEvent::Head {
                envelope,
                conn_span,
            } => self.start(key, envelope, conn_span, gateway),
            RequestEvent::Cancel => {
                if let Some(e) = self.entry(key) {
                    let polled = e.polled;
                    self.entries[key.slot] = None;
                    if !polled {
                        WorkerMetrics::inc(&self.metrics.cancelled_before_dispatch);
                    }
                }
            }
            other => {
                if let Some(e) = self.entry(key) {
                    e.link.deliver(other);
                    self.ready.push(key.slot);
                }
            }
        }
    }

    fn entry(&mut self, key: RequestKey) -> Option<&mut Entry> {
        self.entries
            .get_mut(key.slot)?
            .as_mut()
            .filter(|e| e.serial == key.serial)
    }

    fn start(
        &mut self,
        key: RequestKey,
        envelope: Box<crate::router::Envelope>,
        conn_span: tracing::Span,
        gateway: &Rc<Gateway>,
    ) {
        // Debug level: at the default `info` an enabled span per request
        // (registry slot, formatted trace id, enter/exit on every poll) cost
        // more than the logs it labels; the request's own log lines carry
        // `request_id`.
        let span = tracing::debug_span!(
            parent: &conn_span,
            "request",
            request_id = envelope.request_id,
            trace_id = %envelope.trace.trace_id_hex(),
        );
        let link = Link::new(key, self.initial_grant, self.out.clone());
        let fut = super::proxy(
            gateway.clone(),
            envelope,
            link.clone(),
            self.metrics.clone(),
            self.budget,
        );
        let task: Pin<Box<dyn Future<Output = ()>>> = if span.is_disabled() {
            Box::pin(fut)
        } else {
            Box::pin(fut.instrument(span))
        };
        if self.entries.len() <= key.slot {
            self.entries.resize_with(key.slot + 1, || None);
        }
        while self.wakers.len() <= key.slot {
            let slot = self.wakers.len();
            self.wakers.push(Waker::from(Arc::new(SlotWaker {
                slot,
                ready: self.ready.clone(),
            })));
        }
        self.entries[key.slot] = Some(Entry {
            serial: key.serial,
            link,
            task,
            polled: false,
        });
        self.ready.push(key.slot);
    }

    /// Polls every request that can move (a few rounds, so requests that
    /// wake each other are served without starving the loop's other
    /// inputs); returns how many polls it made.
    pub fn run(&mut self) -> usize {
        let mut polls = 0;
        for _ in 0..4 {
            let mut slots = std::mem::take(&mut self.scratch);
            slots.clear();
            self.ready.take(&mut slots);
            if slots.is_empty() {
                self.scratch = slots;
                break;
            }
            for &slot in &slots {
                let Some(Some(e)) = self.entries.get_mut(slot) else {
                    continue;
                };
                e.polled = true;
                polls += 1;
                let mut cx = Context::from_waker(&self.wakers[slot]);
                let done = e.task.as_mut().poll(&mut cx).is_ready();
                e.link.send_credit();
                if done {
                    self.entries[slot] = None;
                }
            }
            self.scratch = slots;
        }
        polls
    }

    /// The response events produced since the last call.
    pub fn take_output(&mut self, into: &mut VecDeque<(RequestKey, ToEdge)>) {
        std::mem::swap(&mut *self.out.borrow_mut(), into);
    }

    /// Ready when a request can move (for the worker loop's `select!`).
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| self.ready.poll_ready(cx))
    }
}
