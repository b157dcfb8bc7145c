//! The io_uring driver: one ring per socket (per worker), driven directly
//! through the `io-uring` crate.
//!
//! * **Receive**: one multishot `RecvMsgMulti` over a provided buffer ring of
//!   [`RECV_BUFS`] buffers, each large enough for a full 64 KiB GRO train plus
//!   the `io_uring_recvmsg_out` header, the peer address and the control data.
//!   `UDP_GRO` is enabled on the socket and the segment size is read from its
//!   cmsg, so one completion carries a whole train. The multishot request is
//!   re-armed whenever a completion arrives without `IORING_CQE_F_MORE`
//!   (buffer ring exhausted → `-ENOBUFS`, or any other end).
//! * **Send**: `SendMsg` with a `UDP_SEGMENT` cmsg (GSO) and, when the transmit
//!   names a source IP, an `IP_PKTINFO`/`IPV6_PKTINFO` cmsg. Every in-flight
//!   send owns one [`SendSlot`] (msghdr, iovec, address, cmsg and payload) that
//!   is not touched again until its completion has been reaped.
//! * **Readiness**: the ring fd itself is registered with tokio through
//!   [`AsyncFd`]; it polls readable while the completion queue is non-empty.
//! * **Upstream TCP**: the same ring carries the worker's upstream TCP
//!   streams ([`crate::tcp::UringTcpStream`], opened through
//!   [`UringUdp::tcp_handle`]). Their operations wait in a shared queue until
//!   this driver's next submit, and their completions (user data tagged
//!   `UD_TCP` in [`crate::tcp`]) go back to the op table, waking the
//!   stream's task. A stream queuing an operation wakes the task parked in
//!   [`DatagramIo::readable`]/[`DatagramIo::writable`], which submits it;
//!   TCP completions are handed over inside those waits (and by every
//!   reap), so they do not make the worker loop go round.
//!
//! # Submission policy
//!
//! `try_send` only queues an SQE. Queued SQEs (sends and the receive re-arm)
//! are handed to the kernel by one `io_uring_enter` at the next of:
//! [`DatagramIo::readable`], [`DatagramIo::writable`], [`UringUdp::flush`],
//! [`DatagramIo::try_recv_batch`], or `try_send` finding the SQ full. The
//! worker loop (queue all transmits, then await `readable()`) therefore makes
//! one submit per loop iteration for the whole batch. Callers that send
//! outside that loop must call [`UringUdp::flush`].
//!
//! # Copies
//!
//! The [`DatagramIo`] trait hands the driver owned `Vec` buffers, so each
//! received datagram is copied once from the ring's provided buffer into the
//! caller's buffer (after which the ring buffer is re-provided at once), and
//! each transmit is copied once into a pooled send slot (the caller's slice
//! does not outlive `try_send`, while the kernel reads it later).
//!
//! # Counters
//!
//! `send_syscalls` counts `io_uring_enter` calls that carried at least one
//! send; `recv_syscalls` counts the other `io_uring_enter` calls (receive
//! re-arms). With multishot receive, no syscall is made per received batch:
//! datagrams per `recv_syscalls` is therefore very large by design. Finer
//! counts (completions reaped, buffer-ring exhaustion, truncation, re-arms)
//! are in [`UringStats`].

use std::alloc::{self, Layout};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cmsg::{
    parse_recv_cmsgs, parse_sockaddr, setsockopt_int, write_send_cmsgs, write_sockaddr,
    MAX_UDP_PAYLOAD, SEND_CONTROL_WORDS, SOL_UDP, UDP_GRO, UDP_SEGMENT,
};
use crate::epoll::{bind_udp, SocketOptions};
use crate::tcp::{self, RingHandle};
use crate::{
    Capabilities, DatagramIo, IoCounters, RecvMeta, SendMeta, Transmit, MAX_GSO_SEGMENTS,
    MAX_RECV_BUF,
};

/// Environment variable that makes [`probe`] report io_uring as unsupported.
pub const FORCE_FALLBACK_ENV: &str = "SPOOKY_IO_FORCE_FALLBACK";

/// Provided receive buffers per ring (a power of two, as buffer rings require).
pub const RECV_BUFS: u16 = 64;
/// Send slots per ring: transmits that may be in flight at once.
pub const SEND_SLOTS: usize = 128;

const SQ_ENTRIES: u32 = 256;
/// Completions outstanding are bounded by receive buffers + send slots +
/// the cancel/re-arm ops + the upstream TCP streams' operations (at most a
/// receive, a send and a shutdown per stream, plus cancels); keep the CQ well
/// above that. Beyond it (hundreds of upstream connections per worker) the
/// kernel holds the overflow (`IORING_FEAT_NODROP`) and a submit answers
/// `EBUSY` until the next reap: slower, never lost.
const CQ_ENTRIES: u32 = 1024;
/// Buffer group id of the provided receive buffers.
const BGID: u16 = 0;

/// Size of `struct io_uring_recvmsg_out`, which prefixes every multishot buffer.
const RECVMSG_OUT_LEN: usize = 16;
const NAME_LEN: usize = mem::size_of::<libc::sockaddr_storage>();
/// Room for UDP_GRO (24) + IP_PKTINFO (32) + IPV6_PKTINFO (40) with slack.
const RECV_CONTROL_LEN: usize = 128;
/// Each provided buffer holds the header, name, control and a full 64 KiB train.
const RECV_BUF_LEN: usize = MAX_RECV_BUF + RECVMSG_OUT_LEN + NAME_LEN + RECV_CONTROL_LEN;
const PAGE: usize = 4096;

/// `IORING_SEND_ZC_REPORT_USAGE` (linux/io_uring.h), for `SendMsgZc`.
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const UD_RECV: u64 = u64::MAX - 1;
const UD_CANCEL: u64 = u64::MAX - 2;

/// What [`probe`] found usable on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringSupport {
    /// `SendZc` is available (kernel ≥ 6.0); unused by the UDP driver so far.
    pub send_zc: bool,
    /// The ring exposes `IORING_FEAT_EXT_ARG` (timed waits).
    pub ext_arg: bool,
}

/// Checks that io_uring can run the UDP driver: a ring can be created (not
/// disabled by `kernel.io_uring_disabled` or seccomp), `RECVMSG`/`SENDMSG` are
/// supported, a provided buffer ring can be registered and a multishot
/// `recvmsg` can be armed. Returns `Err` with one readable sentence otherwise,
/// and when `SPOOKY_IO_FORCE_FALLBACK=1` is set.
pub fn probe() -> Result<UringSupport, String> {
    let force = std::env::var(FORCE_FALLBACK_ENV).is_ok_and(|v| v == "1");
    probe_with(force)
}

/// [`probe`] with the environment override passed explicitly.
pub fn probe_with(force_fallback: bool) -> Result<UringSupport, String> {
    if force_fallback {
        return Err(format!("io_uring forced off by {FORCE_FALLBACK_ENV}=1"));
    }
    let ring: IoUring = IoUring::builder().build(8).map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        match e.raw_os_error() {
            Some(libc::ENOSYS) => format!(
                "io_uring_setup is not available (ENOSYS: kernel without io_uring, or seccomp); \
                 kernel.io_uring_disabled={sysctl}"
            ),
            Some(libc::EPERM) => format!(
                "io_uring_setup was refused (EPERM: kernel.io_uring_disabled={sysctl}, \
                 or a seccomp/LSM policy)"
            ),
            _ => format!("io_uring_setup failed: {e}"),
        }
    })?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("io_uring opcode probe failed (kernel < 5.6?): {e}"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("io_uring lacks the {name} opcode"));
        }
    }
    let support = UringSupport {
        send_zc: p.is_supported(opcode::SendZc::CODE),
        ext_arg: ring.params().is_feature_ext_arg(),
    };
    drop(ring);
    // Register a one-entry buffer ring and arm a multishot recvmsg on a
    // throwaway socket, then cancel it: kernels without multishot recvmsg
    // (< 6.0) fail the request with EINVAL, without buffer rings (< 5.19)
    // the registration fails.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot open a UDP socket to probe io_uring: {e}"))?;
    let mut ring = Ring::new(&sock, 1, PAGE)
        .map_err(|e| format!("io_uring ring setup for UDP failed: {e}"))?;
    ring.probe_multishot()?;
    Ok(support)
}

/// A page-aligned heap allocation shared with the kernel.
struct PageBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    leaked: bool,
}

impl PageBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(PAGE), PAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self {
            ptr,
            layout,
            leaked: false,
        })
    }

    fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Never free this memory: the kernel may still write to it.
    fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: allocated in `new` with this layout and freed only here.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

/// The ring, its provided-buffer pool and the receive request's msghdr.
///
/// Shared by the driver and by [`probe_with`].
struct Ring {
    ring: IoUring,
    fd: RawFd,
    /// `nbufs` provided buffers of `buf_len` bytes each.
    recv_mem: PageBuf,
    /// The buffer ring (`nbufs` entries of `io_uring_buf`), registered as `BGID`.
    bufring_mem: PageBuf,
    nbufs: u16,
    buf_len: usize,
    /// Local copy of the buffer ring's tail (published with a release store).
    buf_tail: u16,
    /// Template for multishot recvmsg: only `msg_namelen`/`msg_controllen` matter.
    recv_hdr: Box<libc::msghdr>,
    bufring_registered: bool,
}

impl Ring {
    fn new(sock: &impl AsRawFd, nbufs: u16, buf_len: usize) -> io::Result<Self> {
        let ring: IoUring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            // Without it every datagram that arrives while the worker runs
            // in user space interrupts it with an IPI so the kernel can run
            // the multishot receive's task work at once; under load that
            // is one interrupt per datagram (a VM exit each on a guest).
            // Cooperative: the work runs at the worker's next syscall (it
            // makes one per loop), and a worker asleep in `epoll_wait` is
            // still woken. Rapid reset, 1 worker: 14.6 → 9.1 µs of CPU per
            // reset stream (docs/perf.md).
            .setup_coop_taskrun()
            .build(SQ_ENTRIES)?;
        let recv_mem = PageBuf::new(usize::from(nbufs) * buf_len)?;
        let bufring_mem = PageBuf::new(usize::from(nbufs) * mem::size_of::<types::BufRingEntry>())?;
        // SAFETY: `bufring_mem` is page aligned, zeroed, holds `nbufs` entries
        // and lives in the returned `Ring`; it is unregistered in `Drop`
        // before it is freed (or leaked if the kernel may still use it).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(bufring_mem.addr() as u64, nbufs, BGID, 0)
        }
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot register a provided buffer ring (kernel < 5.19?): {e}"),
            )
        })?;
        // SAFETY: msghdr is a plain C struct for which all-zero is valid.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = RECV_CONTROL_LEN as _;
        let mut r = Self {
            ring,
            fd: sock.as_raw_fd(),
            recv_mem,
            bufring_mem,
            nbufs,
            buf_len,
            buf_tail: 0,
            recv_hdr,
            bufring_registered: true,
        };
        for bid in 0..nbufs {
            r.stage_buffer(bid);
        }
        r.publish_buffers();
        Ok(r)
    }

    /// Writes buffer `bid` into the next buffer-ring slot (not yet visible to
    /// the kernel until [`Self::publish_buffers`]).
    fn stage_buffer(&mut self, bid: u16) {
        let mask = self.nbufs - 1;
        let idx = usize::from(self.buf_tail & mask);
        // SAFETY: `bid < nbufs`, so the offset stays inside `recv_mem`.
        let addr = unsafe { self.recv_mem.addr().add(usize::from(bid) * self.buf_len) };
        // `struct io_uring_buf { u64 addr; u32 len; u16 bid; u16 resv; }`: the
        // three fields are written through raw pointers, never through a
        // reference, because entry 0's `resv` is the ring tail the kernel
        // reads concurrently.
        const _: () = assert!(mem::size_of::<types::BufRingEntry>() == 16);
        // SAFETY: `idx < nbufs` and the page-aligned ring memory holds `nbufs`
        // 16-byte entries, so every write is in bounds and aligned. The kernel
        // never reads entries at or beyond the published tail, and only
        // buffers the kernel handed back are staged (at most `nbufs` in the
        // ring), so no unconsumed entry is overwritten.
        unsafe {
            let entry = self.bufring_mem.addr().add(idx * 16);
            entry.cast::<u64>().write(addr as u64);
            entry.add(8).cast::<u32>().write(self.buf_len as u32);
            entry.add(12).cast::<u16>().write(bid);
        }
        self.buf_tail = self.buf_tail.wrapping_add(1);
    }

    /// Makes staged buffers visible to the kernel.
    fn publish_buffers(&mut self) {
        let base = self.bufring_mem.addr().cast::<types::BufRingEntry>();
        // SAFETY: `base` points to the registered ring; the tail overlays the
        // `resv` field of entry 0, a u16 at a 2-aligned offset the kernel
        // reads with acquire semantics. The release store orders the entry
        // writes above before it.
        unsafe {
            let tail = types::BufRingEntry::tail(base).cast_mut();
            AtomicU16::from_ptr(tail).store(self.buf_tail, Ordering::Release);
        }
    }

    /// The provided buffer `bid`, truncated to `len` bytes.
    fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.buf_len);
        let bid = bid.min(self.nbufs - 1);
        // SAFETY: in bounds of `recv_mem`; the kernel has handed this buffer
        // back (its CQE was reaped) and does not write to it until re-provided.
        unsafe {
            std::slice::from_raw_parts(
                self.recv_mem.addr().add(usize::from(bid) * self.buf_len),
                len,
            )
        }
    }

    /// Like [`Self::buffer`], writable: for handing a completed receive to
    /// the caller in place.
    fn buffer_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let len = len.min(self.buf_len);
        let bid = bid.min(self.nbufs - 1);
        // SAFETY: as in `buffer`; `&mut self` makes this the only view of the
        // buffer until it is staged back to the kernel.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.recv_mem.addr().add(usize::from(bid) * self.buf_len),
                len,
            )
        }
    }

    fn recv_entry(&self) -> io_uring::squeue::Entry {
        opcode::RecvMsgMulti::new(types::Fd(self.fd), &*self.recv_hdr, BGID)
            .build()
            .user_data(UD_RECV)
    }

    /// Arms a multishot recvmsg then cancels it; see [`probe_with`].
    fn probe_multishot(&mut self) -> Result<(), String> {
        let recv = self.recv_entry();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(UD_RECV))
            .build()
            .user_data(UD_CANCEL);
        // SAFETY: the msghdr behind `recv` lives in `self`; the request is
        // cancelled and its final completion reaped below before return
        // (or the memory is leaked by `Drop` if that does not happen).
        unsafe {
            let mut sq = self.ring.submission();
            sq.push(&recv)
                .map_err(|_| "io_uring SQ full while probing".to_string())?;
            sq.push(&cancel)
                .map_err(|_| "io_uring SQ full while probing".to_string())?;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut recv_res = None;
        let mut cancelled = false;
        while (recv_res.is_none() || !cancelled) && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => return Err(format!("io_uring_enter failed while probing: {e}")),
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    UD_RECV if !cqueue::more(cqe.flags()) => recv_res = Some(cqe.result()),
                    UD_CANCEL => cancelled = true,
                    _ => {}
                }
            }
        }
        match recv_res {
            Some(r) if r == -libc::ECANCELED || r >= 0 || r == -libc::ENOBUFS => Ok(()),
            Some(r) if r == -libc::EINVAL => {
                Err("io_uring lacks multishot recvmsg (kernel < 6.0)".into())
            }
            Some(r) => Err(format!(
                "io_uring multishot recvmsg failed: {}",
                io::Error::from_raw_os_error(-r)
            )),
            None => {
                // The kernel may still hold the request: never free its memory.
                self.recv_mem.leak();
                self.bufring_mem.leak();
                self.bufring_registered = false;
                Err("io_uring multishot recvmsg probe timed out".into())
            }
        }
    }

    /// Cancels every request and waits (bounded) until the kernel has
    /// completed them all. Returns false if some may still be in flight.
    fn cancel_all_and_drain(
        &mut self,
        mut in_flight: impl FnMut(Option<&cqueue::Entry>) -> bool,
    ) -> bool {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(UD_CANCEL);
        // SAFETY: the cancel op references no user memory.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&cancel) }.is_err() {
                return false;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut cancel_done = false;
        let mut busy = true;
        while (busy || !cancel_done) && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(20_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(_) => return false,
            }
            for cqe in self.ring.completion() {
                if cqe.user_data() == UD_CANCEL {
                    cancel_done = true;
                }
                busy = in_flight(Some(&cqe));
            }
            if !busy && cancel_done {
                return true;
            }
            // Re-evaluate with no new completion (e.g. nothing was in flight).
            busy = in_flight(None);
        }
        !busy && cancel_done
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.bufring_registered && self.ring.submitter().unregister_buf_ring(BGID).is_err() {
            // The kernel may still write received data into the pool.
            self.recv_mem.leak();
            self.bufring_mem.leak();
        }
        // `ring` (the fd) closes after this body; the memory is freed after
        // it, in field order.
    }
}

/// One pooled send: everything the kernel reads for a `SendMsg`, kept at a
/// stable heap address until the completion is reaped.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_in6,
    control: [u64; SEND_CONTROL_WORDS],
    /// [`MAX_UDP_PAYLOAD`] bytes once first used (calloc'd, so untouched
    /// pages cost nothing); the send is `payload[..len]`.
    payload: Vec<u8>,
    len: usize,
    /// GSO segment size of the queued send, 0 for a single datagram.
    segment: usize,
    src_ip: Option<IpAddr>,
    destination: SocketAddr,
}

impl SendSlot {
    fn new() -> Self {
        Self {
            // SAFETY: plain C structs for which all-zero is a valid value.
            hdr: unsafe { mem::zeroed() },
            // SAFETY: as above.
            iov: unsafe { mem::zeroed() },
            // SAFETY: as above.
            name: unsafe { mem::zeroed() },
            control: [0; SEND_CONTROL_WORDS],
            payload: Vec::new(),
            len: 0,
            segment: 0,
            src_ip: None,
            destination: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        }
    }

    /// Fills the slot and points its msghdr at its own fields. The slot must
    /// not move afterwards (slots live in a boxed slice that is never resized).
    fn prepare(
        &mut self,
        v6_socket: bool,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
        contents: &[u8],
        segment: usize,
    ) {
        self.buffer()[..contents.len()].copy_from_slice(contents);
        self.prepare_in_place(v6_socket, dst, src_ip, contents.len(), segment);
    }

    /// The slot's payload buffer, allocated on first use.
    fn buffer(&mut self) -> &mut [u8] {
        if self.payload.len() < MAX_UDP_PAYLOAD {
            self.payload = vec![0; MAX_UDP_PAYLOAD];
        }
        &mut self.payload
    }

    /// Sets the msghdr up for the first `len` bytes already in the buffer.
    fn prepare_in_place(
        &mut self,
        v6_socket: bool,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
        len: usize,
        segment: usize,
    ) {
        self.len = len;
        self.segment = segment;
        self.src_ip = src_ip;
        self.destination = dst;
        let name_len = write_sockaddr(&mut self.name, dst, v6_socket);
        let control_len = write_send_cmsgs(&mut self.control, segment, src_ip);
        self.iov = libc::iovec {
            iov_base: self.payload.as_mut_ptr().cast(),
            iov_len: len,
        };
        self.hdr.msg_name = (&raw mut self.name).cast();
        self.hdr.msg_namelen = name_len;
        self.hdr.msg_iov = &raw mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = if control_len == 0 {
            std::ptr::null_mut()
        } else {
            self.control.as_mut_ptr().cast()
        };
        self.hdr.msg_controllen = control_len as _;
        self.hdr.msg_flags = 0;
    }
}

/// Whether the kernel accepts `UDP_SEGMENT` on a socket of this family
/// (tested on a throwaway socket, as `quinn-udp` does).
fn gso_supported(v6: bool) -> bool {
    let sock = if v6 {
        std::net::UdpSocket::bind("[::1]:0")
    } else {
        std::net::UdpSocket::bind("127.0.0.1:0")
    };
    match sock {
        Ok(s) => setsockopt_int(s.as_raw_fd(), SOL_UDP, UDP_SEGMENT, 1500).is_ok(),
        Err(_) => false,
    }
}

/// io_uring-specific counters, beyond [`IoCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UringStats {
    /// All `io_uring_enter` calls that submitted something.
    pub submits: u64,
    /// Completions reaped (receive and send).
    pub completions: u64,
    /// Receive completions that carried data (one datagram or GRO train each).
    pub recv_completions: u64,
    /// Times the multishot receive was (re-)armed, the first arm included.
    pub recv_arms: u64,
    /// Multishot ends with `-ENOBUFS`: the provided-buffer pool ran dry.
    pub buf_exhausted: u64,
    /// Receives whose payload was cut (`MSG_TRUNC`) — must stay 0 with 64 KiB buffers.
    pub truncated: u64,
    /// Receive completions with an error other than `ENOBUFS`.
    pub recv_errors: u64,
    /// Zero-copy sends the kernel copied after all (loopback always does).
    pub zc_copied: u64,
    /// `io_uring_enter` calls that carried upstream TCP operations but no
    /// UDP send (counted in neither `IoCounters` syscall field).
    pub tcp_submits: u64,
}

/// A receive completion waiting for `try_recv_batch`: buffer id and byte count.
#[derive(Debug, Clone, Copy)]
struct Completed {
    bid: u16,
    len: usize,
}

/// Wrapper so tokio can poll the ring fd (owned by `Ring`).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The io_uring datagram driver. See the module docs.
///
/// Must be created and used inside a tokio runtime with IO enabled (a
/// current-thread runtime per worker). It is neither `Send` nor `Sync`: it
/// shares its ring with the TCP streams of its thread through an `Rc`.
pub struct UringUdp {
    // Field order is drop order: deregister from tokio, then tear down the
    // ring (in `Drop` the requests are cancelled and drained first), then
    // close the socket.
    afd: AsyncFd<RingFd>,
    ring: Ring,
    socket: std::net::UdpSocket,
    v6: bool,
    gso: bool,
    gro: bool,
    slots: Box<[SendSlot]>,
    free: Vec<u16>,
    completed: VecDeque<Completed>,
    recv_armed: bool,
    /// Unreachable reports read from the socket's error queue after a
    /// failed receive or send, for [`DatagramIo::take_unreachable`].
    reported: Vec<crate::errqueue::Unreachable>,
    /// SQEs pushed but not yet submitted, and how many of them are UDP
    /// sends and upstream TCP operations.
    unsubmitted: Cell<usize>,
    unsubmitted_sends: Cell<usize>,
    unsubmitted_tcp: Cell<usize>,
    /// `io_uring_enter` calls: all, with sends, TCP only, others.
    enters: Cell<u64>,
    send_enters: Cell<u64>,
    tcp_enters: Cell<u64>,
    other_enters: Cell<u64>,
    counters: IoCounters,
    stats: UringStats,
    cqe_scratch: Vec<(u64, i32, u32)>,
    /// `send_buf` lent the top free slot's buffer; `commit_send` consumes it.
    lent: bool,
    /// Sends go out as `SendMsgZc` (see [`UringUdp::enable_zerocopy`]).
    zerocopy: bool,
    /// The op table and queue shared with this ring's TCP streams.
    tcp: Rc<tcp::Core>,
    /// UDP completions taken off the CQ by `drain_tcp_cqes` (which runs
    /// from `&self`), handled first by the next `reap`.
    deferred: RefCell<Vec<(u64, i32, u32)>>,
    /// TCP completions handled by `drain_tcp_cqes`.
    tcp_reaped: Cell<u64>,
}

impl UringUdp {
    /// Binds `addr` and sets up the ring. Fails with `ErrorKind::Unsupported`
    /// and a one-sentence reason when io_uring cannot run this driver (the
    /// caller then falls back to [`crate::epoll::EpollUdp`] and logs the reason).
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Self> {
        probe().map_err(|why| io::Error::new(io::ErrorKind::Unsupported, why))?;
        Self::new(bind_udp(addr, opts)?, opts.gso, opts.gro)
    }

    /// Wraps a bound UDP socket (skips [`probe`]; `bind` runs it).
    pub fn new(socket: std::net::UdpSocket, gso: bool, gro: bool) -> io::Result<Self> {
        let fd = socket.as_raw_fd();
        let v6 = socket.local_addr()?.is_ipv6();
        // Every I/O on this socket goes through the ring, which waits for
        // readiness itself; a blocking socket makes the kernel park a send
        // that would block instead of failing it with EAGAIN. The only direct
        // syscalls (GSO fallback resends) pass MSG_DONTWAIT.
        socket.set_nonblocking(false)?;
        let gro = gro && setsockopt_int(fd, SOL_UDP, UDP_GRO, 1).is_ok();
        let gso = gso && gso_supported(v6);
        if v6 {
            setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
            // Dual-stack sockets also report v4 destinations (best effort).
            let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        } else {
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        }
        let ring = Ring::new(&socket, RECV_BUFS, RECV_BUF_LEN)?;
        // SAFETY: the ring fd stays open for the AsyncFd's whole life: `afd`
        // is declared before `ring` in `UringUdp`, so it is dropped (and
        // deregistered) first, and `RingFd` always returns the same fd.
        let afd = unsafe {
            AsyncFd::register_with_interest(RingFd(ring.ring.as_raw_fd()), Interest::READABLE)
        }?;
        let slots: Box<[SendSlot]> = (0..SEND_SLOTS).map(|_| SendSlot::new()).collect();
        let mut me = Self {
            afd,
            ring,
            socket,
            v6,
            gso,
            gro,
            slots,
            free: (0..SEND_SLOTS as u16).rev().collect(),
            completed: VecDeque::with_capacity(usize::from(RECV_BUFS) + 1),
            recv_armed: false,
            reported: Vec::new(),
            unsubmitted: Cell::new(0),
            unsubmitted_sends: Cell::new(0),
            unsubmitted_tcp: Cell::new(0),
            enters: Cell::new(0),
            send_enters: Cell::new(0),
            tcp_enters: Cell::new(0),
            other_enters: Cell::new(0),
            counters: IoCounters::default(),
            stats: UringStats::default(),
            cqe_scratch: Vec::with_capacity(CQ_ENTRIES as usize),
            lent: false,
            zerocopy: false,
            tcp: Rc::new(tcp::Core::new()),
            deferred: RefCell::new(Vec::new()),
            tcp_reaped: Cell::new(0),
        };
        me.arm_recv()?;
        me.submit_pending()?;
        Ok(me)
    }

    /// Sends with `SendMsgZc` from now on: the kernel sends from the slot's
    /// pages instead of copying them, and the slot stays busy until its
    /// notification. Pays off only where the NIC path can use it (not on
    /// loopback, which copies anyway: see `UringStats::zc_copied`).
    pub fn enable_zerocopy(&mut self) -> Result<(), String> {
        let mut p = Probe::new();
        self.ring
            .ring
            .submitter()
            .register_probe(&mut p)
            .map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
        if !p.is_supported(opcode::SendMsgZc::CODE) {
            return Err("io_uring lacks SENDMSG_ZC (kernel < 6.1)".into());
        }
        self.zerocopy = true;
        Ok(())
    }

    /// io_uring-specific counters.
    pub fn stats(&self) -> UringStats {
        UringStats {
            submits: self.enters.get(),
            tcp_submits: self.tcp_enters.get(),
            completions: self.stats.completions + self.tcp_reaped.get(),
            ..self.stats
        }
    }

    /// A handle for opening upstream TCP streams on this ring
    /// ([`crate::tcp::UringTcpStream`]). Their operations are submitted by
    /// this driver, so the streams make progress only while the worker loop
    /// keeps calling `readable()`/`flush()`/`try_recv_batch()` as usual.
    pub fn tcp_handle(&self) -> RingHandle {
        RingHandle::new(self.tcp.clone())
    }

    /// Submits every queued SQE (sends, receive re-arm) in one `io_uring_enter`
    /// and reaps completions. See the module docs for when this happens by itself.
    pub fn flush(&mut self) -> io::Result<()> {
        self.submit_pending()?;
        self.reap();
        Ok(())
    }

    /// Pushes one SQE, submitting first if the SQ is full.
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` must stay valid until its final completion.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry, is_send: bool) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            let pushed = unsafe { self.ring.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                if is_send {
                    self.unsubmitted_sends.set(self.unsubmitted_sends.get() + 1);
                }
                return Ok(());
            }
            self.submit_pending()?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring SQ full",
        ))
    }

    /// Moves the TCP streams' queued operations into the SQ, submitting
    /// first whenever it is full.
    fn push_tcp_queued(&self) -> io::Result<()> {
        while self.tcp.has_queued() {
            let n = {
                // SAFETY: no other `SubmissionQueue` of this ring exists
                // now: the `&mut self` ones (`push`) are dropped before
                // their methods return and this type is !Sync, so nothing
                // runs concurrently with this `&self` method.
                let mut sq = unsafe { self.ring.ring.submission_shared() };
                self.tcp.drain_into(|entry| {
                    // SAFETY: a queued TCP entry points only into a buffer
                    // owned by the op table, which keeps it (and the fd)
                    // until the operation's final completion is reaped, or
                    // leaks it if `Drop` cannot drain the ring.
                    unsafe { sq.push(entry) }.is_ok()
                })
            };
            self.unsubmitted.set(self.unsubmitted.get() + n);
            self.unsubmitted_tcp.set(self.unsubmitted_tcp.get() + n);
            if self.tcp.has_queued() {
                // SQ full: hand what is there to the kernel and go on.
                let before = self.unsubmitted.get();
                self.submit_queued()?;
                if self.unsubmitted.get() == before {
                    break; // the kernel took nothing (EBUSY); retry later
                }
            }
        }
        Ok(())
    }

    /// One `io_uring_enter` for everything queued (the TCP streams' queue
    /// included); no-op when nothing is.
    fn submit_pending(&self) -> io::Result<()> {
        self.push_tcp_queued()?;
        self.submit_queued()
    }

    fn submit_queued(&self) -> io::Result<()> {
        while self.unsubmitted.get() > 0 {
            match self.ring.ring.submit() {
                Ok(n) => {
                    self.stats_submit();
                    let left = self.unsubmitted.get().saturating_sub(n);
                    self.unsubmitted.set(left);
                    if left == 0 {
                        self.unsubmitted_sends.set(0);
                        self.unsubmitted_tcp.set(0);
                    }
                    if n == 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // CQ backlog (EBUSY) or transient shortage (EAGAIN): the
                // queued SQEs stay queued; the next reap makes room.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn stats_submit(&self) {
        self.enters.set(self.enters.get() + 1);
        if self.unsubmitted_sends.get() > 0 {
            self.send_enters.set(self.send_enters.get() + 1);
        } else if self.unsubmitted_tcp.get() > 0 {
            self.tcp_enters.set(self.tcp_enters.get() + 1);
        } else {
            self.other_enters.set(self.other_enters.get() + 1);
        }
    }

    /// Submits everything queued, then is `Ready` when `ready(self)` or UDP
    /// completions are waiting; otherwise parks on the ring fd with `cx`
    /// registered both there and as the TCP streams' submitter, so an
    /// operation queued by a stream wakes this task to submit it. TCP
    /// completions are handed to their streams on the way, without making
    /// the worker loop go round for them.
    fn poll_ring(
        &self,
        cx: &mut Context<'_>,
        ready: impl Fn(&Self) -> bool,
    ) -> Poll<io::Result<()>> {
        loop {
            self.submit_pending()?;
            if ready(self) || self.drain_tcp_cqes() {
                return Poll::Ready(Ok(()));
            }
            self.tcp.set_submitter(cx.waker());
            let mut guard = match self.afd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(guard)) => guard,
            };
            if self.drain_tcp_cqes() {
                return Poll::Ready(Ok(()));
            }
            // The CQ is empty now: new completions make the fd ready again.
            guard.clear_ready();
        }
    }

    /// Takes every completion off the CQ: TCP ones go to their streams
    /// (waking their tasks), the others wait in `deferred` for `reap`.
    /// True when UDP completions are waiting.
    fn drain_tcp_cqes(&self) -> bool {
        let mut deferred = self.deferred.borrow_mut();
        // SAFETY: the only other CompletionQueue borrows are made in `&mut
        // self` methods and dropped before they return, and the type is !Sync,
        // so none exists while this `&self` method runs.
        let cq = unsafe { self.ring.ring.completion_shared() };
        for cqe in cq {
            let ud = cqe.user_data();
            if tcp::is_tcp(ud) {
                self.tcp_reaped.set(self.tcp_reaped.get() + 1);
                self.tcp.complete(ud, cqe.result());
            } else {
                deferred.push((ud, cqe.result(), cqe.flags()));
            }
        }
        !deferred.is_empty()
    }

    /// Arms the multishot receive if it is not running and buffers are free.
    fn arm_recv(&mut self) -> io::Result<()> {
        let in_kernel = usize::from(self.ring.nbufs) - self.completed.len();
        if self.recv_armed || in_kernel == 0 {
            return Ok(());
        }
        let entry = self.ring.recv_entry();
        // SAFETY: the msghdr lives in `self.ring` (boxed) and the buffer pool
        // stays registered until `Drop` has cancelled and drained the request.
        unsafe { self.push(&entry, false)? };
        self.recv_armed = true;
        self.stats.recv_arms += 1;
        Ok(())
    }

    /// Moves every posted completion out of the CQ and handles it.
    fn reap(&mut self) {
        let mut scratch = mem::take(&mut self.cqe_scratch);
        scratch.clear();
        scratch.append(self.deferred.get_mut());
        scratch.extend(
            self.ring
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &scratch {
            self.stats.completions += 1;
            self.handle_cqe(ud, res, flags);
        }
        self.cqe_scratch = scratch;
        // A multishot that ended is re-armed as soon as buffers are free.
        let _ = self.arm_recv();
    }

    fn handle_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        match ud {
            UD_RECV => {
                if !cqueue::more(flags) {
                    self.recv_armed = false;
                }
                if res >= 0 {
                    match cqueue::buffer_select(flags) {
                        Some(bid) => {
                            self.stats.recv_completions += 1;
                            self.completed.push_back(Completed {
                                bid,
                                len: res as usize,
                            });
                        }
                        None => self.stats.recv_errors += 1,
                    }
                } else if res == -libc::ENOBUFS {
                    self.stats.buf_exhausted += 1;
                } else if res != -libc::ECANCELED {
                    // Perhaps the socket's pending ICMP error (the multishot
                    // is re-armed like after any other end): its report
                    // waits in the error queue.
                    if crate::errqueue::drain(self.socket.as_raw_fd(), &mut self.reported) == 0 {
                        self.stats.recv_errors += 1;
                    }
                }
            }
            UD_CANCEL => {}
            ud if tcp::is_tcp(ud) => self.tcp.complete(ud, res),
            i if (i as usize) < self.slots.len() && cqueue::notif(flags) => {
                // Zero-copy send: the kernel is done with the slot's pages.
                // IORING_NOTIF_USAGE_ZC_COPIED: it copied after all.
                if res as u32 & (1 << 31) != 0 {
                    self.stats.zc_copied += 1;
                }
                self.free.push(i as u16);
            }
            i if (i as usize) < self.slots.len() => {
                self.send_done(i as usize, res, cqueue::more(flags))
            }
            _ => {}
        }
    }

    /// A send's result. `notif_follows`: a zero-copy send whose buffer the
    /// kernel still holds until its notification (which frees the slot).
    fn send_done(&mut self, i: usize, res: i32, notif_follows: bool) {
        let slot = &self.slots[i];
        if res >= 0 {
            let segs = if slot.segment > 0 {
                slot.len.div_ceil(slot.segment)
            } else {
                1
            };
            self.counters.send_datagrams += segs as u64;
            self.counters.send_bytes += res as u64;
        } else if slot.segment > 0 && (res == -libc::EIO || res == -libc::EINVAL) {
            // The kernel/NIC refused segmentation: stop using GSO on this
            // socket and resend this train one datagram per syscall.
            if self.gso {
                eprintln!(
                    "spooky-uring: GSO send failed ({}); disabling GSO on this socket",
                    io::Error::from_raw_os_error(-res)
                );
            }
            self.gso = false;
            self.counters.gso_fallbacks += 1;
            self.resend_unsegmented(i);
        } else if res != -libc::ECANCELED
            && !notif_follows
            && crate::errqueue::drain(self.socket.as_raw_fd(), &mut self.reported) > 0
        {
            // The error queue held something, so the failure was the
            // socket's pending ICMP error (about some earlier datagram),
            // returned once instead of sending this one: send it again
            // (direct `sendmsg`, the rare path).
            self.resend_unsegmented(i);
        } else if res != -libc::ECANCELED {
            self.count_send_error(
                self.slots[i].destination,
                io::Error::from_raw_os_error(-res),
            );
        }
        if !notif_follows {
            self.free.push(i as u16);
        }
    }

    fn count_send_error(&mut self, dst: SocketAddr, e: io::Error) {
        // UDP is unreliable anyway; QUIC retransmits. Count and move on.
        self.counters.send_errors += 1;
        if self.counters.send_errors.is_power_of_two() {
            eprintln!(
                "spooky-uring: sendmsg to {dst} failed: {e} ({} send errors so far)",
                self.counters.send_errors
            );
        }
    }

    /// Sends slot `i`'s train as single datagrams with direct, non-blocking
    /// `sendmsg` calls (the rare paths after a GSO refusal, or after the
    /// socket's pending ICMP error stopped the send).
    fn resend_unsegmented(&mut self, i: usize) {
        let v6 = self.v6;
        let fd = self.socket.as_raw_fd();
        let seg = self.slots[i].segment.max(1);
        let (dst, src_ip) = (self.slots[i].destination, self.slots[i].src_ip);
        let payload = mem::take(&mut self.slots[i].payload);
        let len = self.slots[i].len.min(payload.len());
        // SAFETY: zeroed sockaddr_in6 is valid.
        let mut name: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let name_len = write_sockaddr(&mut name, dst, v6);
        let mut control = [0u64; SEND_CONTROL_WORDS];
        let control_len = write_send_cmsgs(&mut control, 0, src_ip);
        for chunk in payload[..len].chunks(seg) {
            let mut iov = libc::iovec {
                iov_base: chunk.as_ptr().cast_mut().cast(),
                iov_len: chunk.len(),
            };
            // SAFETY: zeroed msghdr is valid.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_name = (&raw mut name).cast();
            hdr.msg_namelen = name_len;
            hdr.msg_iov = &raw mut iov;
            hdr.msg_iovlen = 1;
            if control_len > 0 {
                hdr.msg_control = control.as_mut_ptr().cast();
                hdr.msg_controllen = control_len as _;
            }
            // SAFETY: every pointer in `hdr` refers to locals alive for the
            // duration of this synchronous call; the kernel reads `chunk`.
            let rc = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT) };
            self.send_enters.set(self.send_enters.get() + 1);
            if rc < 0 {
                self.count_send_error(dst, io::Error::last_os_error());
            } else {
                self.counters.send_datagrams += 1;
                self.counters.send_bytes += rc as u64;
            }
        }
        self.slots[i].payload = payload;
    }

    /// Queues one `SendMsg` for `contents` in a free slot.
    fn queue_send(&mut self, t: &Transmit<'_>, contents: &[u8], segment: usize) -> io::Result<()> {
        // A lent buffer is no longer the top free slot's once this pops it.
        self.lent = false;
        let Some(i) = self.free.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let i = usize::from(i);
        let v6 = self.v6;
        self.slots[i].prepare(v6, t.destination, t.src_ip, contents, segment);
        self.submit_slot(i)
    }

    /// Pushes the `SendMsg` of slot `i`, which is off the free list and
    /// prepared; the slot goes back to the free list if that fails.
    fn submit_slot(&mut self, i: usize) -> io::Result<()> {
        let slot = &self.slots[i];
        let entry = if self.zerocopy {
            // ioprio carries the zero-copy flags: IORING_SEND_ZC_REPORT_USAGE
            // makes the notification say whether the kernel copied after all.
            opcode::SendMsgZc::new(types::Fd(self.ring.fd), &raw const slot.hdr)
                .ioprio(IORING_SEND_ZC_REPORT_USAGE)
                .build()
                .user_data(i as u64)
        } else {
            opcode::SendMsg::new(types::Fd(self.ring.fd), &raw const slot.hdr)
                .build()
                .user_data(i as u64)
        };
        // SAFETY: the msghdr, iovec, address, cmsg and payload live in slot
        // `i` of a boxed slice that never moves or resizes; the slot is off
        // the free list until its completion is reaped in `send_done`, and
        // `Drop` cancels and drains before freeing (or leaks the slots).
        match unsafe { self.push(&entry, true) } {
            Ok(()) => Ok(()),
            Err(e) => {
                self.free.push(i as u16);
                Err(e)
            }
        }
    }
}

impl AsRawFd for UringUdp {
    /// The UDP socket's fd (for socket options; do not read or write it).
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl DatagramIo for UringUdp {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn flush(&mut self) -> io::Result<()> {
        UringUdp::flush(self)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_gso_segments: if self.gso { MAX_GSO_SEGMENTS } else { 1 },
            gro_segments: if self.gro { MAX_GSO_SEGMENTS } else { 1 },
            driver: "uring",
        }
    }

    fn counters(&self) -> IoCounters {
        IoCounters {
            recv_syscalls: self.other_enters.get(),
            send_syscalls: self.send_enters.get(),
            ring_submits: self.enters.get(),
            ring_completions: self.stats.completions,
            recv_buffers_exhausted: self.stats.buf_exhausted,
            recv_truncated: self.stats.truncated,
            ..self.counters
        }
    }

    /// TCP completions that arrive meanwhile are handed to their streams
    /// without returning; `Ready` means datagrams (or other UDP
    /// completions) are waiting.
    async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ring(cx, |me| !me.completed.is_empty())).await
    }

    async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_ring(cx, |me| !me.free.is_empty())).await
    }

    fn tcp_ring(&self) -> Option<RingHandle> {
        Some(self.tcp_handle())
    }

    fn take_unreachable(&mut self, out: &mut Vec<crate::errqueue::Unreachable>) {
        out.append(&mut self.reported);
    }

    fn recv_with<F: FnMut(&RecvMeta, &mut [u8])>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        self.submit_pending()?;
        self.reap();
        if max == 0 {
            return Ok(0);
        }
        let mut got = 0;
        let mut returned = 0;
        while got < max {
            let Some(c) = self.completed.pop_front() else {
                break;
            };
            // Where the payload sits in the buffer, and what it came with.
            let buf = self.ring.buffer(c.bid, c.len);
            let base = buf.as_ptr() as usize;
            let parsed = types::RecvMsgOut::parse(buf, &self.ring.recv_hdr)
                .ok()
                .and_then(|out| {
                    let peer = parse_sockaddr(out.name_data())?;
                    let (gro, local_ip) = parse_recv_cmsgs(out.control_data());
                    let payload = out.payload_data();
                    let off = payload.as_ptr() as usize - base;
                    Some((
                        out.is_payload_truncated(),
                        peer,
                        gro,
                        local_ip,
                        off,
                        payload.len(),
                    ))
                });
            if let Some((truncated, peer, gro, local_ip, off, len)) = parsed {
                if truncated {
                    self.stats.truncated += 1;
                }
                let meta = RecvMeta {
                    peer,
                    local_ip,
                    len,
                    stride: gro.unwrap_or(len),
                };
                self.counters.recv_datagrams += meta.segments() as u64;
                self.counters.recv_bytes += len as u64;
                let buf = self.ring.buffer_mut(c.bid, c.len);
                f(&meta, &mut buf[off..off + len]);
                got += 1;
            } else {
                self.stats.recv_errors += 1;
            }
            self.ring.stage_buffer(c.bid);
            returned += 1;
        }
        if returned > 0 {
            self.ring.publish_buffers();
            self.arm_recv()?;
        }
        if got == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    }

    /// Copies each completed datagram/train out of its ring buffer into
    /// `bufs[i]` (which grows if shorter than the train); `recv_with` is the
    /// copy-free way and what the worker uses.
    fn try_recv_batch(
        &mut self,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = bufs.len().min(metas.len());
        let mut got = 0;
        self.recv_with(n, |meta, payload| {
            let dst = &mut bufs[got];
            if dst.len() < payload.len() {
                dst.resize(payload.len(), 0);
            }
            dst[..payload.len()].copy_from_slice(payload);
            metas[got] = *meta;
            got += 1;
        })
    }

    fn send_buf(&mut self) -> Option<&mut [u8]> {
        if self.free.is_empty() {
            // Completions may be waiting to free a slot.
            let _ = self.submit_pending();
            self.reap();
        }
        let i = usize::from(*self.free.last()?);
        self.lent = true;
        Some(self.slots[i].buffer())
    }

    fn commit_send(&mut self, meta: &SendMeta) -> io::Result<()> {
        let lent = self
            .free
            .last()
            .map(|&i| usize::from(i))
            .filter(|_| mem::take(&mut self.lent));
        let Some(i) = lent else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no send buffer lent",
            ));
        };
        let len = meta.len.min(MAX_UDP_PAYLOAD);
        let seg = meta.segment_size.filter(|&s| s > 0 && s < len);
        match seg {
            // The whole train fits one GSO send: it leaves from the buffer
            // quiche wrote it into.
            Some(s) if self.gso && len.div_ceil(s) <= MAX_GSO_SEGMENTS => {}
            None => {}
            // Without GSO (or with more segments than one send may carry)
            // the copying path splits it over several slots.
            Some(_) => {
                // Slot `i` stays off the free list while its bytes are
                // copied out, so `try_send` cannot pick it.
                self.free.pop();
                let payload = mem::take(&mut self.slots[i].payload);
                let r = self.try_send(&Transmit {
                    destination: meta.destination,
                    src_ip: meta.src_ip,
                    contents: &payload[..len],
                    segment_size: seg,
                });
                self.slots[i].payload = payload;
                self.free.push(i as u16);
                return r;
            }
        }
        self.free.pop();
        let v6 = self.v6;
        self.slots[i].prepare_in_place(v6, meta.destination, meta.src_ip, len, seg.unwrap_or(0));
        self.submit_slot(i)
    }

    /// Queues the transmit (copied into pooled send slots) for the next
    /// submit; `WouldBlock` when not enough slots are free.
    fn try_send(&mut self, t: &Transmit<'_>) -> io::Result<()> {
        self.reap();
        let len = t.contents.len();
        let seg = t.segment_size.filter(|&s| s > 0 && s < len);
        // Plan the sends: GSO trains of at most MAX_GSO_SEGMENTS, or one
        // datagram per send without GSO.
        let (chunk, segment) = match seg {
            Some(s) if self.gso => (s * MAX_GSO_SEGMENTS.min(MAX_UDP_PAYLOAD / s).max(1), s),
            Some(s) => (s, 0),
            None => (len.max(1), 0),
        };
        let needed = len.div_ceil(chunk).max(1);
        if needed > self.free.len() {
            // Submit what is queued so completions can free slots.
            self.submit_pending()?;
            self.reap();
            if needed > self.free.len() {
                if needed > self.slots.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "transmit needs more sends than the driver has slots",
                    ));
                }
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        if len == 0 {
            return self.queue_send(t, &[], 0);
        }
        for part in t.contents.chunks(chunk) {
            let segment = if segment > 0 && part.len() > segment {
                segment
            } else {
                0
            };
            self.queue_send(t, part, segment)?;
        }
        Ok(())
    }
}

impl Drop for UringUdp {
    fn drop(&mut self) {
        // Completions already taken off the CQ are accounted for first.
        self.reap();
        // TCP operations still queued never reach the kernel: fail them
        // (their streams may outlive the ring) and refuse new ones.
        self.tcp.close();
        let _ = self.submit_pending();
        let total = self.slots.len();
        let mut busy_slots = total - self.free.len();
        let mut armed = self.recv_armed;
        let tcp = &self.tcp;
        let drained = self.ring.cancel_all_and_drain(|cqe| {
            if let Some(cqe) = cqe {
                match cqe.user_data() {
                    UD_RECV if !cqueue::more(cqe.flags()) => armed = false,
                    UD_RECV => {}
                    UD_CANCEL => {}
                    ud if tcp::is_tcp(ud) => tcp.complete(ud, cqe.result()),
                    // A zero-copy send's slot is busy until its notification.
                    ud if (ud as usize) < total && !cqueue::more(cqe.flags()) => {
                        busy_slots = busy_slots.saturating_sub(1)
                    }
                    _ => {}
                }
            }
            armed || busy_slots > 0 || tcp.in_kernel() > 0
        });
        if !drained {
            eprintln!(
                "spooky-uring: io_uring requests still in flight at close; leaking their buffers"
            );
            self.tcp.leak_in_kernel();
            self.ring.recv_mem.leak();
            self.ring.bufring_mem.leak();
            self.ring.bufring_registered = false;
            mem::forget(mem::take(&mut self.slots));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::epoll::EpollUdp;
    use crate::split_segments;
    use std::net::UdpSocket as StdUdp;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// The uring driver, or `None` (test skipped) where the kernel refuses it.
    fn uring() -> Option<UringUdp> {
        if let Err(why) = probe_with(false) {
            eprintln!("skipping io_uring test: {why}");
            return None;
        }
        Some(UringUdp::bind(local(), &SocketOptions::default()).unwrap())
    }

    fn epoll() -> EpollUdp {
        EpollUdp::bind(local(), &SocketOptions::default()).unwrap()
    }

    fn blank(peer: SocketAddr) -> RecvMeta {
        RecvMeta {
            peer,
            local_ip: None,
            len: 0,
            stride: 0,
        }
    }

    /// Receives until `want` payload bytes arrived or `secs` passed.
    async fn recv_bytes<D: DatagramIo>(
        io: &mut D,
        want: usize,
        secs: u64,
    ) -> Vec<(RecvMeta, Vec<u8>)> {
        recv_bytes_via(io, want, secs, false).await
    }

    /// `recv_bytes` through `recv_with` (in place) or `try_recv_batch`.
    async fn recv_bytes_via<D: DatagramIo>(
        io: &mut D,
        want: usize,
        secs: u64,
        in_place: bool,
    ) -> Vec<(RecvMeta, Vec<u8>)> {
        let me = io.local_addr().unwrap();
        let mut bufs = vec![vec![0u8; MAX_RECV_BUF]; 8];
        let mut metas = vec![blank(me); 8];
        let mut out = Vec::new();
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while total < want {
            match tokio::time::timeout_at(deadline, io.readable()).await {
                Err(_) => break,
                Ok(r) => r.unwrap(),
            }
            loop {
                if in_place {
                    match io.recv_with(8, |m, b| {
                        total += m.len;
                        out.push((*m, b.to_vec()));
                    }) {
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("recv: {e}"),
                    }
                }
                match io.try_recv_batch(&mut bufs, &mut metas) {
                    Ok(n) => {
                        for (m, b) in metas.iter().zip(&bufs).take(n) {
                            total += m.len;
                            out.push((*m, b[..m.len].to_vec()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        out
    }

    /// Checks that every multi-segment receive has a consistent stride.
    fn assert_strides(got: &[(RecvMeta, Vec<u8>)], stride: usize) {
        for (m, b) in got {
            assert_eq!(m.len, b.len());
            if m.segments() > 1 {
                assert_eq!(m.stride, stride, "GRO stride");
                for seg in split_segments(b, m.stride).take(m.segments() - 1) {
                    assert_eq!(seg.len(), stride);
                }
            } else {
                assert_eq!(m.stride, m.len);
            }
        }
    }

    /// One datagram from a plain socket, retrying when a signal interrupts.
    fn recv_one(rx: &StdUdp, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rx.recv_from(buf) {
                Ok((n, _)) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed * 7) % 251) as u8).collect()
    }

    /// One `#[test]` per driver for an async check generic over
    /// `DatagramIo` (the io_uring one skips where the kernel refuses it).
    macro_rules! per_driver {
        ($uring:ident, $epoll:ident, $check:ident) => {
            #[test]
            fn $uring() {
                rt().block_on(async {
                    if let Some(io) = uring() {
                        $check(io).await;
                    }
                });
            }

            #[test]
            fn $epoll() {
                rt().block_on(async { $check(epoll()).await });
            }
        };
    }

    // ---- GRO / plain receive -------------------------------------------

    async fn plain_datagrams_arrive_with_peer<D: DatagramIo>(mut rx: D) {
        let dst = rx.local_addr().unwrap();
        let tx = StdUdp::bind("127.0.0.1:0").unwrap();
        let mut expect = Vec::new();
        for i in 0..10 {
            let p = pattern(1200, i);
            tx.send_to(&p, dst).unwrap();
            expect.extend_from_slice(&p);
        }
        let tail = pattern(500, 99);
        tx.send_to(&tail, dst).unwrap();
        expect.extend_from_slice(&tail);
        let got = recv_bytes(&mut rx, expect.len(), 5).await;
        assert!(got.iter().all(|(m, _)| m.peer == tx.local_addr().unwrap()));
        assert!(got
            .iter()
            .all(|(m, _)| m.local_ip == Some("127.0.0.1".parse().unwrap())));
        assert_strides(&got, 1200);
        let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(all, expect);
        assert_eq!(rx.counters().recv_datagrams, 11);
        assert_eq!(rx.counters().recv_bytes, expect.len() as u64);
    }

    per_driver!(
        uring_plain_datagrams_arrive_with_peer,
        epoll_plain_datagrams_arrive_with_peer,
        plain_datagrams_arrive_with_peer
    );

    /// A GSO train sent over loopback reaches a `UDP_GRO` socket as one
    /// coalesced receive: the stride must come from the GRO cmsg.
    async fn gro_train_is_split_by_stride<D: DatagramIo>(mut rx: D) {
        let dst = rx.local_addr().unwrap();
        let mut tx = epoll();
        let payload = pattern(1200 * 10 + 500, 3);
        tx.writable().await.unwrap();
        tx.try_send(&Transmit {
            destination: dst,
            src_ip: None,
            contents: &payload,
            segment_size: Some(1200),
        })
        .unwrap();
        // The epoll driver queues until the flush; writable() was awaited.
        tx.flush().unwrap();
        let got = recv_bytes(&mut rx, payload.len(), 5).await;
        assert!(got.iter().all(|(m, _)| m.peer == tx.local_addr().unwrap()));
        assert_strides(&got, 1200);
        let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(all, payload);
        let segs: usize = got.iter().map(|(m, _)| m.segments()).sum();
        assert_eq!(segs, 11);
        if rx.capabilities().gro_segments > 1 {
            assert!(
                got.iter().any(|(m, _)| m.segments() > 1),
                "GRO enabled but nothing coalesced: {:?}",
                got.iter()
                    .map(|(m, _)| (m.len, m.stride))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(rx.counters().recv_datagrams, 11);
    }

    // ---- sends built in the driver's own buffer ---------------------------

    /// Trains and lone datagrams written into `send_buf` leave from there:
    /// a plain socket gets each datagram with the right size and bytes, and
    /// committing without a lent buffer is refused.
    async fn lent_buffers_carry_trains_and_datagrams<D: DatagramIo>(mut tx: D) {
        lent_buffers_carry_trains_and_datagrams_ref(&mut tx).await;
    }

    async fn lent_buffers_carry_trains_and_datagrams_ref<D: DatagramIo>(tx: &mut D) {
        let rx = StdUdp::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let dst = rx.local_addr().unwrap();
        let no_lend = SendMeta {
            destination: dst,
            src_ip: None,
            len: 10,
            segment_size: None,
        };
        let err = tx.commit_send(&no_lend).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A 10-datagram train (last one short), then a lone datagram, then
        // a train of 100 tiny segments (more than one GSO send may carry).
        let sends = [
            (1200 * 9 + 700, Some(1200)),
            (333, None),
            (100 * 20, Some(20)),
        ];
        let mut expect: Vec<Vec<u8>> = Vec::new();
        for (k, &(len, seg)) in sends.iter().enumerate() {
            let p = pattern(len, k + 1);
            let buf = tx.send_buf().expect("a free send buffer");
            assert!(buf.len() >= crate::MAX_SEND);
            buf[..len].copy_from_slice(&p);
            tx.commit_send(&SendMeta {
                destination: dst,
                src_ip: None,
                len,
                segment_size: seg,
            })
            .unwrap();
            let step = seg.unwrap_or(len);
            expect.extend(p.chunks(step).map(<[u8]>::to_vec));
        }
        // epoll sends only once the socket reported writable.
        loop {
            tx.writable().await.unwrap();
            match tx.flush() {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("flush: {e}"),
            }
        }
        let mut buf = vec![0u8; 65536];
        for (i, want) in expect.iter().enumerate() {
            let n = recv_one(&rx, &mut buf).unwrap_or_else(|e| panic!("recv: {e}"));
            assert_eq!(&buf[..n], &want[..], "datagram {i}");
        }
        let c = tx.counters();
        assert_eq!(c.send_datagrams, expect.len() as u64);
        assert_eq!(c.send_errors, 0);
    }

    per_driver!(
        uring_lent_buffers_carry_trains_and_datagrams,
        epoll_lent_buffers_carry_trains_and_datagrams,
        lent_buffers_carry_trains_and_datagrams
    );

    /// Zero-copy sends deliver the same datagrams; every slot comes back
    /// (after its notification), and loopback reports the copy it made.
    #[test]
    fn uring_zerocopy_sends_arrive_and_free_their_slots() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            if let Err(why) = tx.enable_zerocopy() {
                eprintln!("skipping: {why}");
                return;
            }
            lent_buffers_carry_trains_and_datagrams_ref(&mut tx).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tx.free.len() < SEND_SLOTS && tokio::time::Instant::now() < deadline {
                tx.flush().unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                tx.free.len(),
                SEND_SLOTS,
                "slots still held: {:?}",
                tx.stats()
            );
            assert!(tx.stats().zc_copied > 0, "{:?}", tx.stats());
        });
    }

    /// More lent sends than the driver has slots, with no flush in between:
    /// `send_buf` submits and reaps to get slots back (never lending one the
    /// kernel may still read), and every datagram arrives, in order.
    #[test]
    fn uring_lent_buffers_recycle_through_the_pool() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let dst = rx.local_addr().unwrap();
            // (The receiver's default buffer holds about 256 such datagrams.)
            let total = SEND_SLOTS + SEND_SLOTS / 2;
            for i in 0..total {
                let buf = loop {
                    if tx.send_buf().is_some() {
                        break tx.send_buf().unwrap();
                    }
                    tokio::time::timeout(Duration::from_secs(5), tx.writable())
                        .await
                        .unwrap()
                        .unwrap();
                };
                buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let meta = SendMeta {
                    destination: dst,
                    src_ip: None,
                    len: 8,
                    segment_size: None,
                };
                tx.commit_send(&meta).unwrap();
            }
            tx.flush().unwrap();
            let mut buf = [0u8; 64];
            for i in 0..total {
                let n = recv_one(&rx, &mut buf).unwrap_or_else(|e| {
                    panic!(
                        "recv {i} of {total}: {e}; {:?} {:?}",
                        tx.counters(),
                        tx.stats()
                    )
                });
                assert_eq!(&buf[..n], &(i as u64).to_le_bytes(), "datagram {i}");
            }
            assert!(tx.stats().submits > 1, "slots came back through submits");
        });
    }

    /// `recv_with` hands each datagram/train to the callback in the
    /// driver's own buffer, writable, with its peer and GRO stride.
    async fn received_in_place<D: DatagramIo>(mut rx: D) {
        let dst = rx.local_addr().unwrap();
        let mut tx = epoll();
        let train = pattern(1200 * 6 + 100, 8);
        let lone = pattern(700, 9);
        tx.writable().await.unwrap();
        tx.try_send(&Transmit {
            destination: dst,
            src_ip: None,
            contents: &train,
            segment_size: Some(1200),
        })
        .unwrap();
        tx.try_send(&Transmit {
            destination: dst,
            src_ip: None,
            contents: &lone,
            segment_size: None,
        })
        .unwrap();
        tx.flush().unwrap();
        let want = train.len() + lone.len();
        let mut got: Vec<u8> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            match tokio::time::timeout_at(deadline, rx.readable()).await {
                Err(_) => break,
                Ok(r) => r.unwrap(),
            }
            loop {
                let r = rx.recv_with(8, |meta, buf| {
                    assert_eq!(meta.peer, tx.local_addr().unwrap());
                    assert_eq!(buf.len(), meta.len);
                    assert!(meta.segments() == 1 || meta.stride == 1200);
                    got.extend_from_slice(buf);
                    // The buffer is ours until the callback returns.
                    buf.fill(0);
                });
                match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv_with: {e}"),
                }
            }
        }
        let mut expect = train.clone();
        expect.extend_from_slice(&lone);
        assert_eq!(got, expect);
        assert_eq!(rx.counters().recv_datagrams, 8);
    }

    per_driver!(
        uring_received_in_place,
        epoll_received_in_place,
        received_in_place
    );

    per_driver!(
        uring_gro_train_is_split_by_stride,
        epoll_gro_train_is_split_by_stride,
        gro_train_is_split_by_stride
    );

    // ---- GSO send ----------------------------------------------------------

    async fn send_until_queued<D: DatagramIo>(tx: &mut D, t: &Transmit<'_>) {
        loop {
            match tx.try_send(t) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tx.writable().await.unwrap(),
                Err(e) => panic!("send: {e}"),
            }
        }
    }

    fn recv_sizes(rx: &StdUdp, count: usize) -> (Vec<usize>, Vec<u8>) {
        rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        let mut buf = [0u8; 2000];
        for _ in 0..count {
            let (n, _) = rx.recv_from(&mut buf).unwrap();
            sizes.push(n);
            got.extend_from_slice(&buf[..n]);
        }
        (sizes, got)
    }

    #[test]
    fn uring_gso_train_arrives_as_separate_datagrams() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            assert_eq!(tx.capabilities().driver, "uring");
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            let payload = pattern(1200 * 3 + 500, 1);
            send_until_queued(
                &mut tx,
                &Transmit {
                    destination: rx.local_addr().unwrap(),
                    src_ip: None,
                    contents: &payload,
                    segment_size: Some(1200),
                },
            )
            .await;
            tx.flush().unwrap();
            let (sizes, got) = recv_sizes(&rx, 4);
            assert_eq!(sizes, vec![1200, 1200, 1200, 500]);
            assert_eq!(got, payload);
            // The completion is reaped by the next flush.
            let deadline = Instant::now() + Duration::from_secs(2);
            while tx.counters().send_datagrams < 4 && Instant::now() < deadline {
                tx.writable().await.unwrap();
                tx.flush().unwrap();
            }
            let c = tx.counters();
            assert_eq!((c.send_datagrams, c.send_bytes), (4, payload.len() as u64));
            assert_eq!(c.send_syscalls, 1, "one io_uring_enter for the whole train");
            assert_eq!((c.send_errors, c.gso_fallbacks), (0, 0));
        });
    }

    #[test]
    fn uring_send_with_src_ip_uses_pktinfo() {
        rt().block_on(async {
            if probe_with(false).is_err() {
                return;
            }
            let mut tx =
                UringUdp::bind("0.0.0.0:0".parse().unwrap(), &SocketOptions::default()).unwrap();
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            let payload = pattern(700, 5);
            send_until_queued(
                &mut tx,
                &Transmit {
                    destination: rx.local_addr().unwrap(),
                    src_ip: Some("127.0.0.1".parse().unwrap()),
                    contents: &payload,
                    segment_size: None,
                },
            )
            .await;
            tx.flush().unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 2000];
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &payload[..]);
            assert_eq!(from.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
            assert_eq!(from.port(), tx.local_addr().unwrap().port());
        });
    }

    /// `SO_NO_CHECK` makes the kernel refuse GSO with EINVAL (UDP GSO needs
    /// checksum offload): a genuine refusal on loopback. The driver must
    /// drop to unsegmented sends and still deliver the train.
    #[test]
    fn uring_gso_refusal_falls_back_to_single_datagrams() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            if tx.capabilities().max_gso_segments == 1 {
                eprintln!("skipping: no GSO on this kernel");
                return;
            }
            setsockopt_int(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                11, /* SO_NO_CHECK */
                1,
            )
            .unwrap();
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            let payload = pattern(1200 * 3 + 500, 2);
            let t = Transmit {
                destination: rx.local_addr().unwrap(),
                src_ip: None,
                contents: &payload,
                segment_size: Some(1200),
            };
            send_until_queued(&mut tx, &t).await;
            tx.flush().unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            while tx.counters().gso_fallbacks == 0 && Instant::now() < deadline {
                tx.writable().await.unwrap();
                tx.flush().unwrap();
            }
            let (sizes, got) = recv_sizes(&rx, 4);
            assert_eq!(sizes, vec![1200, 1200, 1200, 500]);
            assert_eq!(got, payload);
            let c = tx.counters();
            assert_eq!(c.gso_fallbacks, 1);
            assert_eq!(c.send_errors, 0);
            assert_eq!(tx.capabilities().max_gso_segments, 1);
            // Later trains go out unsegmented from the start.
            send_until_queued(&mut tx, &t).await;
            tx.flush().unwrap();
            let (sizes, got) = recv_sizes(&rx, 4);
            assert_eq!(sizes, vec![1200, 1200, 1200, 500]);
            assert_eq!(got, payload);
            assert_eq!(tx.counters().gso_fallbacks, 1);
        });
    }

    /// More transmits than send slots: when the slots run out, `try_send`
    /// submits the queued batch and reuses the slots their completions free
    /// (UDP sends over loopback complete inline, so `WouldBlock` is rare
    /// here); nothing is lost and one `io_uring_enter` carries a whole batch.
    #[test]
    fn uring_more_sends_than_slots_all_arrive() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            socket2::SockRef::from(&rx)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
            let n = SEND_SLOTS * 3;
            let mut would_block = 0;
            for i in 0..n {
                let p = pattern(100, i);
                let t = Transmit {
                    destination: rx.local_addr().unwrap(),
                    src_ip: None,
                    contents: &p,
                    segment_size: None,
                };
                loop {
                    match tx.try_send(&t) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            would_block += 1;
                            tx.writable().await.unwrap();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            tx.flush().unwrap();
            let (sizes, got) = recv_sizes(&rx, n);
            assert_eq!(sizes.len(), n);
            let expect: Vec<u8> = (0..n).flat_map(|i| pattern(100, i)).collect();
            assert_eq!(got, expect);
            let c = tx.counters();
            assert!(
                c.send_syscalls as usize <= n / SEND_SLOTS + 1 + would_block,
                "{c:?}"
            );
        });
    }

    /// A train longer than one UDP datagram may carry (60 × 1200 > 65507)
    /// is split into several GSO sends; every segment arrives.
    #[test]
    fn uring_oversized_train_is_split() {
        rt().block_on(async {
            let Some(mut tx) = uring() else { return };
            let rx = StdUdp::bind("127.0.0.1:0").unwrap();
            socket2::SockRef::from(&rx)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
            let payload = pattern(1200 * 60, 4);
            send_until_queued(
                &mut tx,
                &Transmit {
                    destination: rx.local_addr().unwrap(),
                    src_ip: None,
                    contents: &payload,
                    segment_size: Some(1200),
                },
            )
            .await;
            tx.flush().unwrap();
            let (sizes, got) = recv_sizes(&rx, 60);
            assert!(sizes.iter().all(|&n| n == 1200));
            assert_eq!(got, payload);
            tx.flush().unwrap();
            assert_eq!(tx.counters().send_errors, 0);
        });
    }

    #[test]
    fn uring_ipv6_receive_reports_peer_and_local_ip() {
        rt().block_on(async {
            if probe_with(false).is_err() {
                return;
            }
            let Ok(tx) = StdUdp::bind("[::1]:0") else {
                eprintln!("skipping: no IPv6 loopback");
                return;
            };
            let mut rx =
                UringUdp::bind("[::1]:0".parse().unwrap(), &SocketOptions::default()).unwrap();
            let p = pattern(900, 8);
            tx.send_to(&p, rx.local_addr().unwrap()).unwrap();
            let got = recv_bytes(&mut rx, p.len(), 5).await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].0.peer, tx.local_addr().unwrap());
            assert_eq!(got[0].0.local_ip, Some("::1".parse().unwrap()));
            assert_eq!(got[0].1, p);
        });
    }

    // ---- burst larger than the buffer ring --------------------------------

    async fn paced_burst_all_received<D: DatagramIo>(rx: &mut D, in_place: bool) {
        let dst = rx.local_addr().unwrap();
        const N: usize = 1000;
        let sender = std::thread::spawn(move || {
            let tx = StdUdp::bind("127.0.0.1:0").unwrap();
            for i in 0..N {
                let mut p = pattern(1200, i);
                p[..4].copy_from_slice(&(i as u32).to_be_bytes());
                tx.send_to(&p, dst).unwrap();
                if i % 16 == 15 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
        });
        let got = recv_bytes_via(rx, N * 1200, 20, in_place).await;
        sender.join().unwrap();
        let mut seen = vec![false; N];
        for (m, b) in &got {
            for seg in split_segments(b, m.stride) {
                assert_eq!(seg.len(), 1200);
                let i = u32::from_be_bytes([seg[0], seg[1], seg[2], seg[3]]) as usize;
                assert_eq!(seg[4..], pattern(1200, i)[4..]);
                assert!(!seen[i], "duplicate {i}");
                seen[i] = true;
            }
        }
        let missing = seen.iter().filter(|s| !**s).count();
        assert_eq!(missing, 0, "{missing} of {N} datagrams lost");
    }

    #[test]
    fn uring_burst_larger_than_buffer_ring() {
        for in_place in [false, true] {
            rt().block_on(async {
                let Some(mut rx) = uring() else { return };
                paced_burst_all_received(&mut rx, in_place).await;
                let s = rx.stats();
                assert!(s.recv_completions > u64::from(RECV_BUFS), "{s:?}");
                assert_eq!(s.truncated, 0);
            });
        }
    }

    #[test]
    fn epoll_burst_larger_than_buffer_ring() {
        for in_place in [false, true] {
            rt().block_on(async {
                let mut rx = epoll();
                paced_burst_all_received(&mut rx, in_place).await;
            });
        }
    }

    /// Datagrams arrive while nobody reads: the ring runs dry (`-ENOBUFS`
    /// ends the multishot), and reading re-provides buffers and re-arms it.
    #[test]
    fn uring_rearms_after_buffer_ring_exhaustion() {
        rt().block_on(async {
            let Some(mut rx) = uring() else { return };
            let dst = rx.local_addr().unwrap();
            let tx = StdUdp::bind("127.0.0.1:0").unwrap();
            const N: usize = 300;
            for i in 0..N {
                tx.send_to(&pattern(100, i), dst).unwrap();
            }
            // Let the kernel fill every provided buffer before reading.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let got = recv_bytes(&mut rx, N * 100, 5).await;
            let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
            let expect: Vec<u8> = (0..N).flat_map(|i| pattern(100, i)).collect();
            assert_eq!(all.len(), expect.len());
            assert_eq!(all, expect);
            let s = rx.stats();
            assert!(s.buf_exhausted >= 1, "{s:?}");
            assert!(s.recv_arms >= 2, "{s:?}");
        });
    }

    // ---- feature detection / fallback ---------------------------------------

    #[test]
    fn probe_forced_off_reports_why() {
        let err = probe_with(true).unwrap_err();
        assert!(err.contains(FORCE_FALLBACK_ENV), "{err}");
    }

    #[test]
    fn probe_accepts_this_kernel_unless_disabled() {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() != "0")
            .unwrap_or(false);
        match probe_with(false) {
            Ok(_) => {}
            Err(why) if disabled => eprintln!("io_uring disabled here: {why}"),
            Err(why) => panic!("probe failed on an enabled kernel: {why}"),
        }
    }

    /// Runs in a child process with `SPOOKY_IO_FORCE_FALLBACK=1` (see
    /// `env_var_forces_fallback`); ignored in the normal run so the
    /// environment of this process is never changed.
    #[test]
    #[ignore]
    fn child_bind_refuses_when_forced() {
        assert!(std::env::var(FORCE_FALLBACK_ENV).is_ok_and(|v| v == "1"));
        assert!(probe().is_err());
        rt().block_on(async {
            let err = match UringUdp::bind(local(), &SocketOptions::default()) {
                Ok(_) => panic!("bind must refuse when forced off"),
                Err(e) => e,
            };
            assert_eq!(err.kind(), io::ErrorKind::Unsupported);
            assert!(err.to_string().contains(FORCE_FALLBACK_ENV), "{err}");
            // What the caller does next: the epoll driver still works.
            assert_eq!(epoll().capabilities().driver, "epoll");
        });
    }

    #[test]
    fn env_var_forces_fallback() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "uring::tests::child_bind_refuses_when_forced",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(FORCE_FALLBACK_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "{text}");
    }

    /// A datagram to a port nobody listens on draws an ICMP port
    /// unreachable, and the socket's pending error then fails the next
    /// receive or send once. That must cost no datagram: the sends to a
    /// live peer that follow all arrive, in order, and the report comes out
    /// of `take_unreachable` naming the closed port and quoting the
    /// datagram.
    async fn pending_icmp_error_costs_no_datagram<D: DatagramIo>(tx: &mut D) {
        let closed = StdUdp::bind(local()).unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let rx = StdUdp::bind(local()).unwrap();
        rx.set_nonblocking(true).unwrap();
        let live = rx.local_addr().unwrap();
        let to_gone = [0x41u8; 40];
        let lone = |destination, contents| Transmit {
            destination,
            src_ip: None,
            contents,
            segment_size: None,
        };
        tx.try_send(&lone(gone, &to_gone[..])).unwrap();
        while let Err(e) = tx.flush() {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            tx.writable().await.unwrap();
        }
        // Loopback answers within the send's softirq; leave it a moment.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let payloads: Vec<[u8; 100]> = (0..3u8).map(|i| [i; 100]).collect();
        for p in &payloads {
            tx.try_send(&lone(live, &p[..])).unwrap();
        }
        let (mut got, mut reports) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = [0u8; 200];
        while (got.len() < payloads.len() || reports.is_empty())
            && std::time::Instant::now() < deadline
        {
            let _ = tx.flush();
            // Reaps the ring's completions (failed sends are sent again there).
            let _ = tokio::time::timeout(std::time::Duration::from_millis(10), tx.readable()).await;
            tx.take_unreachable(&mut reports);
            while let Ok(n) = rx.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        let want: Vec<Vec<u8>> = payloads.iter().map(|p| p.to_vec()).collect();
        assert_eq!(got, want, "every datagram to the live peer, in order");
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].peer, gone);
        assert_eq!(reports[0].errno, libc::ECONNREFUSED);
        assert_eq!(reports[0].quoted(), &to_gone[..crate::errqueue::QUOTED_MAX]);
        assert_eq!(tx.counters().send_errors, 0);
    }

    #[test]
    fn pending_icmp_error_costs_no_datagram_uring() {
        rt().block_on(async {
            if let Some(mut tx) = uring() {
                pending_icmp_error_costs_no_datagram(&mut tx).await;
            }
        });
    }

    #[test]
    fn pending_icmp_error_costs_no_datagram_epoll() {
        rt().block_on(async {
            pending_icmp_error_costs_no_datagram(&mut epoll()).await;
        });
    }
}
