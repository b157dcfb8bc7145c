//! TCP streams on the worker's io_uring, for the `h2` client pools.
//!
//! [`UringTcpStream`] implements tokio's [`AsyncRead`]/[`AsyncWrite`] (what
//! `h2` needs) with `Recv`, `Send` and `Shutdown` operations on the very ring
//! that carries the worker's UDP traffic ([`crate::uring::UringUdp`]). The
//! streams never enter the kernel themselves: an operation is queued in the
//! ring's shared [`Core`], and the UDP driver moves queued operations into the
//! submission queue at its next submit, so the upstream TCP operations of a
//! whole loop iteration ride the same `io_uring_enter` as the UDP sends.
//!
//! # Call protocol between the streams and the driver
//!
//! * A stream queues an operation with [`Core::start`]. If the driver has
//!   parked (its `readable()`/`writable()` returned `Pending`, having
//!   registered its waker with [`Core::set_submitter`]), that waker is woken,
//!   so the worker loop runs again and submits: no lost wake-up when the UDP
//!   side is idle, and no syscall per operation.
//! * Completions carry user data with the [`UD_TCP`] tag (bits 63..62 =
//!   `01`, a range the UDP driver never uses); the driver hands them to
//!   [`Core::complete`], which stores the result and wakes the stream's task.
//! * A stream polls its operation with [`Core::poll_op`] and gets its buffer
//!   back with the result.
//!
//! # Buffers and lifetimes
//!
//! Every operation owns its buffer (and a reference to the socket's fd) in
//! the op table from the moment it is queued until its completion has been
//! reaped, so the kernel never writes into freed memory and the fd number
//! cannot be reused under an operation. A stream dropped with operations in
//! flight orphans them: each gets an `AsyncCancel`, and its buffer and fd are
//! released by the final completion. When the ring closes, queued operations
//! that never reached the kernel fail with `ECANCELED`, and the driver
//! cancels and drains the rest (or leaks their memory if the kernel does not
//! give them back in time).
//!
//! # Copies
//!
//! The adapter copies once per direction: the kernel receives into the
//! stream's 64 KiB read buffer and `poll_read` copies into the caller's
//! `ReadBuf` (the caller's buffer does not outlive the poll, while the
//! operation does); `poll_write` copies the caller's bytes into the stream's
//! write buffer, from which the kernel sends. tokio's `TcpStream` makes no
//! copy of its own (its syscalls read and write the caller's buffers).
//!
//! # Backpressure
//!
//! At most [`WRITE_BUF`] bytes are accepted and not yet sent; past that,
//! `poll_write` returns `Pending` until a send completes. At most one
//! receive is in flight per stream, and none is issued while the read
//! buffer still holds data the caller has not taken.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one receive may bring in (the stream's read buffer).
pub const READ_BUF: usize = 64 * 1024;
/// Bytes a stream accepts from `poll_write` that the kernel has not yet
/// confirmed sent; beyond this `poll_write` returns `Pending`.
pub const WRITE_BUF: usize = 256 * 1024;

const UD_TAG_MASK: u64 = 0b11 << 62;
/// Tag of every TCP user data value (bits 63..62 = `01`).
pub(crate) const UD_TCP: u64 = 0b01 << 62;
/// The completions of the `AsyncCancel`s issued for orphaned operations.
const UD_TCP_CANCEL: u64 = UD_TCP | (1 << 61);
/// Slot generations fit between the index (bits 0..32) and the cancel bit.
const GEN_MASK: u32 = (1 << 29) - 1;

/// Whether a completion belongs to a TCP operation (or its cancel).
pub(crate) fn is_tcp(user_data: u64) -> bool {
    user_data & UD_TAG_MASK == UD_TCP
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the worker's io_uring is closed")
}

/// Counters of the TCP side of one ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpStats {
    /// Streams created on this ring.
    pub streams: u64,
    /// Operations queued (receive, send, shutdown; cancels not counted).
    pub ops: u64,
    /// Operation completions reaped (cancels not counted).
    pub completions: u64,
    /// Bytes received and sent.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Sends the kernel completed only in part (the rest was re-issued).
    pub short_writes: u64,
    /// Operations orphaned by a dropped stream and cancelled.
    pub cancels: u64,
}

/// One operation's slot index and generation; its user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpKey {
    idx: u32,
    generation: u32,
}

impl OpKey {
    fn user_data(self) -> u64 {
        UD_TCP | (u64::from(self.generation & GEN_MASK) << 32) | u64::from(self.idx)
    }

    fn from_user_data(ud: u64) -> Self {
        Self {
            idx: ud as u32,
            generation: ((ud >> 32) as u32) & GEN_MASK,
        }
    }
}

/// Lifecycle of an operation (after tokio's `runtime/driver/op.rs`).
enum OpState {
    /// Queued or in the kernel; the waker of whoever polled it last.
    Waiting(Option<Waker>),
    /// The completion arrived with this result; waiting for the stream.
    Done(i32),
    /// The stream is gone; freed by the final completion.
    Orphaned,
}

struct Op {
    state: OpState,
    /// The memory the kernel reads or writes; empty for shutdown.
    buf: Vec<u8>,
    /// Keeps the socket open while the operation may still use it.
    fd: Rc<OwnedFd>,
    /// Handed to the submission queue (so a completion will come).
    in_kernel: bool,
}

struct Slot {
    generation: u32,
    op: Option<Op>,
}

struct Inner {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Operations (and cancels, with no key) not yet in the submission queue.
    queue: VecDeque<(Option<OpKey>, squeue::Entry)>,
    in_kernel: usize,
    /// The driver's waker, taken (and woken) by the first operation queued
    /// after the driver parked.
    submitter: Option<Waker>,
    closed: bool,
    stats: TcpStats,
}

/// The op table and submission queue shared by one ring's driver and its
/// TCP streams. Single-threaded (`Rc`); see the module docs for the protocol.
pub(crate) struct Core {
    inner: RefCell<Inner>,
}

impl Core {
    pub(crate) fn new() -> Self {
        Self {
            inner: RefCell::new(Inner {
                slots: Vec::new(),
                free: Vec::new(),
                queue: VecDeque::new(),
                in_kernel: 0,
                submitter: None,
                closed: false,
                stats: TcpStats::default(),
            }),
        }
    }

    /// Queues an operation that owns `buf` and a reference to `fd`;
    /// `build` makes its SQE from the buffer at its final address and the
    /// user data. Wakes the driver if it is parked.
    fn start(
        &self,
        buf: Vec<u8>,
        fd: &Rc<OwnedFd>,
        build: impl FnOnce(&mut Vec<u8>, u64) -> squeue::Entry,
    ) -> io::Result<OpKey> {
        let (key, waker) = {
            let mut g = self.inner.borrow_mut();
            if g.closed {
                return Err(closed_error());
            }
            let idx = match g.free.pop() {
                Some(i) => i,
                None => {
                    let i = u32::try_from(g.slots.len())
                        .map_err(|_| io::Error::other("too many io_uring TCP operations"))?;
                    g.slots.push(Slot {
                        generation: 0,
                        op: None,
                    });
                    i
                }
            };
            let slot = &mut g.slots[idx as usize];
            slot.generation = slot.generation.wrapping_add(1) & GEN_MASK;
            let key = OpKey {
                idx,
                generation: slot.generation,
            };
            let op = slot.op.insert(Op {
                state: OpState::Waiting(None),
                buf,
                fd: fd.clone(),
                in_kernel: false,
            });
            // The Vec's heap memory does not move when the Vec itself moves
            // (into the slot, or when `slots` grows), and nothing touches it
            // until the completion hands it back.
            let entry = build(&mut op.buf, key.user_data());
            g.queue.push_back((Some(key), entry));
            g.stats.ops += 1;
            (key, g.submitter.take())
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(key)
    }

    /// The result and buffer of a completed operation (which is then
    /// freed), or `Pending` with `cx`'s waker registered.
    fn poll_op(&self, key: OpKey, cx: &mut Context<'_>) -> Poll<(i32, Vec<u8>)> {
        let freed = {
            let mut g = self.inner.borrow_mut();
            let Some(slot) = g.slots.get_mut(key.idx as usize) else {
                return Poll::Ready((-libc::EIO, Vec::new()));
            };
            if slot.generation != key.generation {
                return Poll::Ready((-libc::EIO, Vec::new()));
            }
            let Some(op) = slot.op.as_mut() else {
                return Poll::Ready((-libc::EIO, Vec::new()));
            };
            match &mut op.state {
                OpState::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                OpState::Orphaned => return Poll::Ready((-libc::ECANCELED, Vec::new())),
                OpState::Done(res) => {
                    let res = *res;
                    let op = slot.op.take();
                    g.free.push(key.idx);
                    (res, op)
                }
            }
        };
        let (res, op) = freed;
        Poll::Ready((res, op.map(|op| op.buf).unwrap_or_default()))
    }

    /// Gives up an operation whose stream is gone: frees it now if the
    /// kernel never saw it or it already completed, else cancels it and
    /// lets the final completion free it.
    fn orphan(&self, key: OpKey) {
        let mut dropped = None;
        let mut waker = None;
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            let Some(slot) = inner.slots.get_mut(key.idx as usize) else {
                return;
            };
            if slot.generation != key.generation {
                return;
            }
            let Some(op) = slot.op.as_mut() else {
                return;
            };
            let done = matches!(op.state, OpState::Done(_));
            if done || !op.in_kernel {
                if !done {
                    inner.queue.retain(|(k, _)| *k != Some(key));
                }
                dropped = slot.op.take();
                inner.free.push(key.idx);
            } else {
                op.state = OpState::Orphaned;
                if !inner.closed {
                    let cancel = opcode::AsyncCancel::new(key.user_data())
                        .build()
                        .user_data(UD_TCP_CANCEL);
                    inner.queue.push_back((None, cancel));
                    inner.stats.cancels += 1;
                    waker = inner.submitter.take();
                }
            }
        }
        drop(dropped);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Records a completion (called by the driver for [`is_tcp`] user data).
    pub(crate) fn complete(&self, user_data: u64, res: i32) {
        if user_data & UD_TCP_CANCEL == UD_TCP_CANCEL {
            return;
        }
        let key = OpKey::from_user_data(user_data);
        let mut waker = None;
        let mut dropped = None;
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            let Some(slot) = inner.slots.get_mut(key.idx as usize) else {
                return;
            };
            if slot.generation != key.generation {
                return;
            }
            let Some(op) = slot.op.as_mut() else {
                return;
            };
            inner.stats.completions += 1;
            if op.in_kernel {
                op.in_kernel = false;
                inner.in_kernel = inner.in_kernel.saturating_sub(1);
            }
            match &mut op.state {
                OpState::Waiting(w) => {
                    waker = w.take();
                    op.state = OpState::Done(res);
                }
                OpState::Orphaned => {
                    dropped = slot.op.take();
                    inner.free.push(key.idx);
                }
                OpState::Done(_) => {}
            }
        }
        drop(dropped);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Moves queued SQEs into the submission queue through `push` (which
    /// returns false when the SQ is full); returns how many went in.
    pub(crate) fn drain_into(&self, mut push: impl FnMut(&squeue::Entry) -> bool) -> usize {
        let mut g = self.inner.borrow_mut();
        let inner = &mut *g;
        let mut n = 0;
        while let Some((key, entry)) = inner.queue.front() {
            if !push(entry) {
                break;
            }
            if let Some(key) = *key {
                if let Some(op) = inner
                    .slots
                    .get_mut(key.idx as usize)
                    .and_then(|s| s.op.as_mut())
                {
                    op.in_kernel = true;
                    inner.in_kernel += 1;
                }
            }
            inner.queue.pop_front();
            n += 1;
        }
        n
    }

    /// Whether streams queued SQEs that the driver has not yet taken.
    pub(crate) fn has_queued(&self) -> bool {
        !self.inner.borrow().queue.is_empty()
    }

    /// Operations handed to the kernel whose completion has not arrived.
    pub(crate) fn in_kernel(&self) -> usize {
        self.inner.borrow().in_kernel
    }

    /// Registers the driver's waker: the next operation queued wakes it.
    pub(crate) fn set_submitter(&self, waker: &Waker) {
        let mut g = self.inner.borrow_mut();
        if !g.submitter.as_ref().is_some_and(|w| w.will_wake(waker)) {
            g.submitter = Some(waker.clone());
        }
    }

    /// The ring is going away: refuses new operations and fails the queued
    /// ones (the kernel never saw them, so their memory is freed). The
    /// driver then cancels and drains what is in the kernel.
    pub(crate) fn close(&self) {
        let mut wakers = Vec::new();
        let mut dropped = Vec::new();
        let submitter;
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            inner.closed = true;
            submitter = inner.submitter.take();
            for (key, _) in std::mem::take(&mut inner.queue) {
                let Some(key) = key else { continue };
                let Some(slot) = inner.slots.get_mut(key.idx as usize) else {
                    continue;
                };
                let Some(op) = slot.op.as_mut() else { continue };
                match &mut op.state {
                    OpState::Waiting(w) => {
                        wakers.extend(w.take());
                        op.state = OpState::Done(-libc::ECANCELED);
                    }
                    OpState::Orphaned => {
                        dropped.push(slot.op.take());
                        inner.free.push(key.idx);
                    }
                    OpState::Done(_) => {}
                }
            }
        }
        drop(dropped);
        drop(submitter);
        for w in wakers {
            w.wake();
        }
    }

    /// The kernel did not give back these operations in time: their memory
    /// and fds are leaked rather than freed under the kernel, and their
    /// streams see `ECANCELED`.
    pub(crate) fn leak_in_kernel(&self) {
        let mut wakers = Vec::new();
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            for (idx, slot) in inner.slots.iter_mut().enumerate() {
                let Some(op) = slot.op.as_mut() else { continue };
                if !op.in_kernel {
                    continue;
                }
                op.in_kernel = false;
                std::mem::forget(std::mem::take(&mut op.buf));
                std::mem::forget(op.fd.clone());
                match &mut op.state {
                    OpState::Waiting(w) => {
                        wakers.extend(w.take());
                        op.state = OpState::Done(-libc::ECANCELED);
                    }
                    OpState::Orphaned => {
                        slot.op = None;
                        inner.free.push(idx as u32);
                    }
                    OpState::Done(_) => {}
                }
            }
            inner.in_kernel = 0;
        }
        for w in wakers {
            w.wake();
        }
    }

    pub(crate) fn stats(&self) -> TcpStats {
        self.inner.borrow().stats
    }

    fn count(&self, f: impl FnOnce(&mut TcpStats)) {
        f(&mut self.inner.borrow_mut().stats);
    }
}

/// A handle on a worker's ring for opening [`UringTcpStream`]s. Cheap to
/// clone; `!Send`, like the ring it belongs to. Get one from
/// [`crate::uring::UringUdp::tcp_handle`].
#[derive(Clone)]
pub struct RingHandle {
    core: Rc<Core>,
}

impl std::fmt::Debug for RingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RingHandle {
    pub(crate) fn new(core: Rc<Core>) -> Self {
        Self { core }
    }

    /// Counters of this ring's TCP side.
    pub fn stats(&self) -> TcpStats {
        self.core.stats()
    }
}

/// Why writes stopped for good.
#[derive(Debug, Clone, Copy)]
enum WriteError {
    Os(i32),
    Closed,
    Zero,
}

impl WriteError {
    fn to_io(self) -> io::Error {
        match self {
            WriteError::Os(errno) => io::Error::from_raw_os_error(errno),
            WriteError::Closed => closed_error(),
            WriteError::Zero => io::ErrorKind::WriteZero.into(),
        }
    }
}

/// The send in flight: it sends `buf[off..]` of the buffer it owns.
#[derive(Debug, Clone, Copy)]
struct WriteOp {
    key: OpKey,
    off: usize,
}

/// A TCP stream whose reads and writes are io_uring operations on the
/// worker's ring. See the module docs.
///
/// Call protocol: the usual tokio one. Bytes accepted by `poll_write` are
/// on their way (a send is issued at once when none is in flight);
/// `poll_flush` is `Ready` once the kernel has accepted every one of them;
/// `poll_shutdown` flushes, then shuts the write side down. An operation's
/// error is returned by the next poll of that direction; write errors are
/// sticky. Must be used on the thread of the ring it was opened on.
/// Dropping it discards bytes not yet flushed, cancels the operations in
/// flight and closes the socket once the last of them has completed.
pub struct UringTcpStream {
    core: Rc<Core>,
    fd: Rc<OwnedFd>,
    raw: RawFd,
    peer: Option<SocketAddr>,
    /// Owned read buffer ([`READ_BUF`] long) holding `rbuf[rpos..rend]`
    /// undelivered; empty while a receive owns it.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    read_op: Option<OpKey>,
    /// Accepted bytes not yet handed to a send.
    wpend: Vec<u8>,
    /// A spare write buffer (the last send's, kept for its capacity).
    wspare: Vec<u8>,
    write_op: Option<WriteOp>,
    /// Bytes of the send in flight not yet confirmed.
    wflight: usize,
    werr: Option<WriteError>,
    shutdown_op: Option<OpKey>,
    shut: bool,
}

impl std::fmt::Debug for UringTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringTcpStream")
            .field("fd", &self.raw)
            .field("peer", &self.peer)
            .field("buffered_read", &(self.rend - self.rpos))
            .field("unsent", &(self.wpend.len() + self.wflight))
            .finish()
    }
}

impl UringTcpStream {
    /// Connects with tokio (so the connect timeout and errors are tokio's),
    /// sets `TCP_NODELAY`, and moves the socket onto the ring.
    pub async fn connect(ring: &RingHandle, addr: SocketAddr) -> io::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Self::from_std(ring, tcp.into_std()?)
    }

    /// Takes over a connected socket (it must not be registered with tokio).
    pub fn from_std(ring: &RingHandle, stream: std::net::TcpStream) -> io::Result<Self> {
        // Blocking mode, as for the UDP socket: the ring then waits for
        // readiness itself (its internal poll) instead of failing an
        // operation with EAGAIN. Nothing else reads or writes this fd.
        stream.set_nonblocking(false)?;
        let peer = stream.peer_addr().ok();
        let fd = OwnedFd::from(stream);
        let raw = fd.as_raw_fd();
        ring.core.count(|s| s.streams += 1);
        Ok(Self {
            core: ring.core.clone(),
            fd: Rc::new(fd),
            raw,
            peer,
            rbuf: vec![0; READ_BUF],
            rpos: 0,
            rend: 0,
            read_op: None,
            wpend: Vec::new(),
            wspare: Vec::new(),
            write_op: None,
            wflight: 0,
            werr: None,
            shutdown_op: None,
            shut: false,
        })
    }

    /// The peer's address, as it was at connect time.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn issue_write(&mut self, buf: Vec<u8>, off: usize) -> io::Result<()> {
        let fd = self.raw;
        let started = self.core.start(buf, &self.fd, |b, ud| {
            let rest = b.get(off..).unwrap_or_default();
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            // MSG_WAITALL: the kernel keeps sending until all is gone (fewer
            // short sends); MSG_NOSIGNAL: a reset peer is an error, not SIGPIPE.
            opcode::Send::new(types::Fd(fd), rest.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                .build()
                .user_data(ud)
        });
        match started {
            Ok(key) => {
                self.write_op = Some(WriteOp { key, off });
                Ok(())
            }
            Err(e) => {
                self.wflight = 0;
                self.werr = Some(WriteError::Closed);
                Err(e)
            }
        }
    }

    /// Reaps the send in flight (re-issuing the rest of a short one) and
    /// issues the pending bytes when no send is in flight. `Ok(true)` when
    /// everything accepted so far has been sent; `Ok(false)` with `cx`
    /// registered on the send in flight otherwise.
    fn drive_write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        if let Some(e) = self.werr {
            return Err(e.to_io());
        }
        loop {
            if let Some(op) = self.write_op {
                let (res, mut buf) = match self.core.poll_op(op.key, cx) {
                    Poll::Pending => return Ok(false),
                    Poll::Ready(done) => done,
                };
                self.write_op = None;
                if res < 0 {
                    self.wflight = 0;
                    let e = WriteError::Os(-res);
                    self.werr = Some(e);
                    return Err(e.to_io());
                }
                let sent = res as usize;
                let off = op.off + sent;
                self.core.count(|s| s.bytes_written += sent as u64);
                if off < buf.len() {
                    if sent == 0 {
                        self.wflight = 0;
                        self.werr = Some(WriteError::Zero);
                        return Err(WriteError::Zero.to_io());
                    }
                    self.core.count(|s| s.short_writes += 1);
                    self.wflight = buf.len() - off;
                    self.issue_write(buf, off)?;
                    continue;
                }
                self.wflight = 0;
                buf.clear();
                if buf.capacity() > self.wspare.capacity() {
                    self.wspare = buf;
                }
            }
            if self.wpend.is_empty() {
                return Ok(true);
            }
            let buf = std::mem::replace(&mut self.wpend, std::mem::take(&mut self.wspare));
            self.wflight = buf.len();
            self.issue_write(buf, 0)?;
        }
    }

    /// Copies what fits of `bufs` into the write buffer and starts sending.
    fn write_from(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if let Some(e) = self.werr {
            return Poll::Ready(Err(e.to_io()));
        }
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let idle = match self.drive_write(cx) {
            Ok(idle) => idle,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let room = WRITE_BUF.saturating_sub(self.wpend.len() + self.wflight);
        if room == 0 {
            // Full: a send is in flight and `cx` is registered on it.
            return Poll::Pending;
        }
        let mut left = room.min(total);
        let n = left;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = b.len().min(left);
            self.wpend.extend_from_slice(&b[..take]);
            left -= take;
        }
        if idle {
            if let Err(e) = self.drive_write(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for UringTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if me.rpos < me.rend {
                let n = (me.rend - me.rpos).min(out.remaining());
                out.put_slice(&me.rbuf[me.rpos..me.rpos + n]);
                me.rpos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(key) = me.read_op {
                let (res, buf) = match me.core.poll_op(key, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(done) => done,
                };
                me.read_op = None;
                me.rbuf = buf;
                me.rpos = 0;
                me.rend = 0;
                if res < 0 {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
                }
                if res == 0 {
                    return Poll::Ready(Ok(())); // EOF
                }
                me.rend = (res as usize).min(me.rbuf.len());
                me.core.count(|s| s.bytes_read += res as u64);
                continue;
            }
            let mut buf = std::mem::take(&mut me.rbuf);
            if buf.len() < READ_BUF {
                buf.resize(READ_BUF, 0);
            }
            let fd = me.raw;
            let key = me.core.start(buf, &me.fd, |b, ud| {
                opcode::Recv::new(types::Fd(fd), b.as_mut_ptr(), b.len() as u32)
                    .build()
                    .user_data(ud)
            });
            match key {
                Ok(key) => me.read_op = Some(key),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for UringTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_from(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_from(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().drive_write(cx) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match me.drive_write(cx) {
            Ok(true) => {}
            Ok(false) => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        }
        if me.shut {
            return Poll::Ready(Ok(()));
        }
        let key = match me.shutdown_op {
            Some(key) => key,
            None => {
                let fd = me.raw;
                let key = me.core.start(Vec::new(), &me.fd, |_, ud| {
                    opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
                        .build()
                        .user_data(ud)
                });
                match key {
                    Ok(key) => {
                        me.shutdown_op = Some(key);
                        key
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        };
        let (res, _) = match me.core.poll_op(key, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(done) => done,
        };
        me.shutdown_op = None;
        me.shut = true;
        if res < 0 && res != -libc::ENOTCONN {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for UringTcpStream {
    fn drop(&mut self) {
        // Operations in flight keep their buffer and the fd until their
        // final completion; the stream's own fd reference goes now.
        for key in [
            self.read_op.take(),
            self.write_op.take().map(|w| w.key),
            self.shutdown_op.take(),
        ]
        .into_iter()
        .flatten()
        {
            self.core.orphan(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::epoll::SocketOptions;
    use crate::uring::{probe_with, UringUdp};
    use crate::DatagramIo;
    use std::future::Future;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdTcp};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    /// The uring driver, or `None` (test skipped) where the kernel refuses it.
    fn ring() -> Option<UringUdp> {
        if let Err(why) = probe_with(false) {
            eprintln!("skipping io_uring TCP test: {why}");
            return None;
        }
        Some(UringUdp::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap())
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// What the worker loop does with the ring, minus the datagrams.
    async fn drive(mut io: UringUdp, mut stop: oneshot::Receiver<()>) -> UringUdp {
        loop {
            tokio::select! {
                r = io.readable() => {
                    r.unwrap();
                    io.flush().unwrap();
                }
                _ = &mut stop => return io,
            }
        }
    }

    /// Runs `f` on a current-thread runtime and LocalSet next to a task
    /// driving the ring (as the worker does); the ring is dropped after `f`.
    /// Returns false when io_uring is unavailable (test skipped).
    fn with_ring<F, Fut>(f: F) -> bool
    where
        F: FnOnce(RingHandle) -> Fut,
        Fut: Future<Output = ()>,
    {
        if let Err(why) = probe_with(false) {
            eprintln!("skipping io_uring TCP test: {why}");
            return false;
        }
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt(), async move {
            let io = ring().unwrap();
            let handle = io.tcp_handle();
            let (stop_tx, stop_rx) = oneshot::channel();
            let driver = tokio::task::spawn_local(drive(io, stop_rx));
            tokio::time::timeout(Duration::from_secs(60), f(handle))
                .await
                .expect("test timed out (lost wake-up?)");
            stop_tx.send(()).unwrap();
            drop(driver.await.unwrap());
        });
        true
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
        // SAFETY: `v` is a live c_int and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// Closes `s` with an RST (SO_LINGER 0).
    fn reset(s: StdTcp) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `linger` is live and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(s);
    }

    #[test]
    fn echo_one_mib_in_random_chunks() {
        let (l, addr) = listener();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0; 10_000];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let data = pattern(1 << 20, 7);
        let expect = data.clone();
        let ran = with_ring(|ring| async move {
            let stream = UringTcpStream::connect(&ring, addr).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(stream);
            let writer = async move {
                let mut sizes = pattern(4096, 3).into_iter();
                let mut off = 0;
                while off < data.len() {
                    let n = (usize::from(sizes.next().unwrap()) * 131 + 1).min(data.len() - off);
                    wr.write_all(&data[off..off + n]).await.unwrap();
                    if n % 3 == 0 {
                        wr.flush().await.unwrap();
                    }
                    off += n;
                }
                wr.shutdown().await.unwrap();
            };
            let reader = async move {
                let mut got = Vec::new();
                let mut buf = vec![0; 7000];
                loop {
                    let n = rd.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(got.len(), expect.len());
            assert!(got == expect, "echoed bytes differ");
            let stats = ring.stats();
            assert_eq!(stats.bytes_written, 1 << 20);
            assert_eq!(stats.bytes_read, 1 << 20);
        });
        if ran {
            echo.join().unwrap();
        }
    }

    #[test]
    fn slow_reader_gets_backpressure_and_every_byte_in_order() {
        const TOTAL: usize = 8 << 20;
        let (l, addr) = listener();
        // A small receive buffer (inherited by the accepted socket) so
        // the kernel cannot absorb the whole transfer.
        set_int_opt(l.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 64 * 1024);
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0; 32 * 1024];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                std::thread::sleep(Duration::from_micros(500));
            }
            got
        });
        let data = pattern(TOTAL, 11);
        let expect = data.clone();
        let ran = with_ring(|_ring| async move {
            let mut s = UringTcpStream::connect(&_ring, addr).await.unwrap();
            set_int_opt(s.raw, libc::SOL_SOCKET, libc::SO_SNDBUF, 64 * 1024);
            let mut off = 0;
            let mut pendings = 0;
            while off < data.len() {
                let chunk = &data[off..(off + 100_000).min(data.len())];
                let n = std::future::poll_fn(|cx| {
                    let r = Pin::new(&mut s).poll_write(cx, chunk);
                    // Memory stays bounded whatever the caller does.
                    assert!(s.wpend.len() + s.wflight <= WRITE_BUF);
                    if r.is_pending() {
                        pendings += 1;
                    }
                    r
                })
                .await
                .unwrap();
                off += n;
            }
            s.shutdown().await.unwrap();
            assert!(pendings > 0, "poll_write never pushed back");
        });
        if ran {
            let got = reader.join().unwrap();
            assert_eq!(got.len(), expect.len());
            assert!(got == expect, "bytes arrived out of order or corrupted");
        }
    }

    #[test]
    fn peer_reset_is_an_error_on_read() {
        let (l, addr) = listener();
        with_ring(|ring| async move {
            let mut s = UringTcpStream::connect(&ring, addr).await.unwrap();
            let (peer, _) = l.accept().unwrap();
            let mut buf = [0u8; 16];
            // A read in flight when the reset arrives.
            let read = s.read(&mut buf);
            tokio::pin!(read);
            assert!(futures_poll_once(read.as_mut()).await.is_none());
            reset(peer);
            let err = read.await.expect_err("read after reset must fail");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        });
    }

    #[test]
    fn peer_reset_is_an_error_on_write() {
        let (l, addr) = listener();
        with_ring(|ring| async move {
            let mut s = UringTcpStream::connect(&ring, addr).await.unwrap();
            let (peer, _) = l.accept().unwrap();
            reset(peer);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let chunk = vec![1u8; 64 * 1024];
            let mut failed = None;
            for _ in 0..64 {
                if let Err(e) = s.write_all(&chunk).await {
                    failed = Some(e);
                    break;
                }
                if let Err(e) = s.flush().await {
                    failed = Some(e);
                    break;
                }
            }
            let err = failed.expect("writes to a reset peer must fail");
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ),
                "{err}"
            );
            // Sticky: the next write fails too.
            assert!(s.write_all(b"x").await.is_err());
            assert!(s.flush().await.is_err());
        });
    }

    #[test]
    fn eof_is_a_zero_read_again_and_again() {
        let (l, addr) = listener();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello").unwrap();
        });
        with_ring(|ring| async move {
            let mut s = UringTcpStream::connect(&ring, addr).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            let mut buf = [0u8; 8];
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        });
        peer.join().unwrap();
    }

    #[test]
    fn flush_ready_means_the_peer_can_read_everything() {
        const N: usize = 200_000;
        let (l, addr) = listener();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Read only after the writer's flush returned.
            rx.recv().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0; N];
            s.read_exact(&mut got).unwrap();
            got
        });
        let data = pattern(N, 5);
        let expect = data.clone();
        with_ring(|ring| async move {
            let mut s = UringTcpStream::connect(&ring, addr).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.flush().await.unwrap();
            assert!(s.write_op.is_none() && s.wpend.is_empty() && s.wflight == 0);
            tx.send(()).unwrap();
            // The stream is not polled again until the peer has it all.
            let got = tokio::task::spawn_blocking(move || peer.join().unwrap())
                .await
                .unwrap();
            assert!(got == expect);
            drop(s);
        });
    }

    /// Polls `f` once: `Some(output)` if it finished.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Runs in a child process (see `drop_with_ops_in_flight_leaks_nothing`)
    /// so that no other test opens or closes fds while it counts them.
    #[test]
    #[ignore]
    fn child_drop_with_ops_in_flight() {
        if probe_with(false).is_err() {
            println!("SKIPPED");
            return;
        }
        let (l, addr) = listener();
        // The first runtime of a process may open process-wide fds that
        // stay (tokio's signal pipe when the feature is on, as it is in
        // workspace builds): count from after one.
        drop(rt());
        let before = open_fds();
        for order in ["stream_first", "queued_only", "ring_first"] {
            let mut peer = None;
            let mut cancels = 0;
            let rt = rt();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async {
                let io = ring().unwrap();
                let handle = io.tcp_handle();
                let (stop_tx, stop_rx) = oneshot::channel();
                let driver = tokio::task::spawn_local(drive(io, stop_rx));
                let mut s = UringTcpStream::connect(&handle, addr).await.unwrap();
                peer = Some(l.accept().unwrap().0);
                let mut buf = [0u8; 16];
                {
                    let read = s.read(&mut buf);
                    tokio::pin!(read);
                    assert!(futures_poll_once(read.as_mut()).await.is_none());
                }
                assert!(s.read_op.is_some());
                if order != "queued_only" {
                    // Let the driver submit the receive.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                match order {
                    "ring_first" => {
                        stop_tx.send(()).unwrap();
                        drop(driver.await.unwrap());
                        // The read was cancelled with the ring: an error,
                        // never a hang or a silent EOF.
                        let err = s.read(&mut buf).await.expect_err("ring is gone");
                        assert_eq!(err.raw_os_error(), Some(libc::ECANCELED), "{err}");
                        assert!(s.write_all(b"x").await.is_err());
                        drop(s);
                    }
                    _ => {
                        drop(s);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        cancels = handle.stats().cancels;
                        stop_tx.send(()).unwrap();
                        drop(driver.await.unwrap());
                    }
                }
            });
            drop(local);
            drop(rt);
            drop(peer);
            let expect_cancels = if order == "stream_first" { 1 } else { 0 };
            assert_eq!(cancels, expect_cancels, "{order}");
            assert_eq!(open_fds(), before, "fds leaked ({order})");
        }
        println!("CHILD OK");
    }

    #[test]
    fn drop_with_ops_in_flight_leaks_nothing() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "tcp::tests::child_drop_with_ops_in_flight",
                "--exact",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("CHILD OK") || text.contains("SKIPPED"),
            "{text}"
        );
    }
}
