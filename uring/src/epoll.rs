//! The epoll driver: tokio's reactor for readiness, `recvmmsg` for batched
//! receives and `sendmmsg` for batched sends.
//!
//! * **Receive**: `quinn-udp` does the `recvmmsg` and reads the `UDP_GRO` and
//!   `IP_PKTINFO` cmsgs, so one receive can carry a whole GRO train.
//! * **Send**: [`DatagramIo::try_send`] only copies the transmit into a fixed
//!   pool of [`SEND_BATCH`] send buffers (allocated once, 64 KiB each) together
//!   with its sockaddr and cmsgs (`UDP_SEGMENT` for a GSO train,
//!   `IP_PKTINFO`/`IPV6_PKTINFO` for a source IP, built by the same code as the
//!   io_uring driver). [`DatagramIo::flush`] hands the whole batch to the
//!   kernel with one `sendmmsg`, so the worker loop makes one send syscall per
//!   iteration, as the io_uring driver makes one `io_uring_enter`: small
//!   responses (one datagram per connection) no longer cost a syscall each.
//!   `try_send` sends the batch itself only when the pool is full.
//! * **Back-pressure**: when the socket's send buffer is full, `sendmmsg`
//!   sends a prefix and the next call fails with `EAGAIN`; that goes through
//!   tokio's `try_io`, which clears the write readiness, and `flush` returns
//!   `WouldBlock` with the rest still queued, in order. The caller awaits
//!   [`DatagramIo::writable`] (real `EPOLLOUT`) and flushes again.
//! * **Errors**: `sendmmsg` stops at the first message that fails and reports
//!   the messages before it; the next call then starts with the failing
//!   message and gets its error. A GSO message refused with `EIO`/`EINVAL`
//!   (NIC or kernel without segmentation offload) turns GSO off for this
//!   socket, and it and every queued train go out as single datagrams. Any
//!   other error drops just that message (counted in `send_errors`; QUIC
//!   retransmits) and the batch goes on with the next one.
//!
//! # Counters
//!
//! `send_syscalls` counts `sendmmsg` calls, `send_datagrams` the datagrams
//! (GSO segments) they carried and `send_bytes` their payload bytes;
//! `recv_syscalls` counts `recvmmsg` calls.

use std::io::{self, IoSliceMut};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use quinn_udp::{UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::cmsg::{write_send_cmsgs, write_sockaddr, MAX_UDP_PAYLOAD, SEND_CONTROL_WORDS};
use crate::{
    Capabilities, DatagramIo, IoCounters, RecvMeta, SendMeta, Transmit, MAX_GSO_SEGMENTS,
    MAX_RECV_BUF,
};

/// Transmits (GSO trains or datagrams) one flush may queue, and messages one
/// `sendmmsg` carries.
pub const SEND_BATCH: usize = 64;
/// Capacity of each pooled send buffer: a full GSO train.
const SEND_BUF_LEN: usize = MAX_RECV_BUF;

/// Options for opening a UDP socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    /// Let several workers (or a restarted process) bind the same port.
    pub reuse_port: bool,
    /// Kernel buffer sizes; large enough for bursts of a few thousand packets.
    pub recv_buffer: usize,
    pub send_buffer: usize,
    /// Try to enable GSO on sends.
    pub gso: bool,
    /// Try to enable GRO on receives.
    pub gro: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            reuse_port: true,
            recv_buffer: 8 * 1024 * 1024,
            send_buffer: 8 * 1024 * 1024,
            gso: true,
            gro: true,
        }
    }
}

/// Opens a non-blocking UDP socket bound to `addr` with the given options.
pub fn bind_udp(addr: SocketAddr, opts: &SocketOptions) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept v4-mapped traffic only when bound to the v6 wildcard.
        sock.set_only_v6(false).ok();
    }
    if opts.reuse_port {
        sock.set_reuse_port(true)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    sock.set_recv_buffer_size(opts.recv_buffer).ok();
    sock.set_send_buffer_size(opts.send_buffer).ok();
    sock.set_nonblocking(true)?;
    // ICMP errors about datagrams sent to clients are queued on the socket
    // (the edge closes a connection whose client port is gone). Best
    // effort: without it the connection ends at its idle timeout instead.
    if let Err(e) = crate::errqueue::enable(sock.as_raw_fd(), addr.is_ipv6()) {
        eprintln!("spooky-uring: IP_RECVERR not set on {addr}: {e}");
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// One queued send: a copy of the payload plus everything its `msghdr`
/// points at, so that `sendmmsg` can run after the caller's buffer is gone.
struct Queued {
    /// [`SEND_BUF_LEN`] bytes once first used (calloc'd, so untouched pages
    /// cost nothing) and reused; the message is `payload[..len]`.
    payload: Vec<u8>,
    len: usize,
    name: libc::sockaddr_in6,
    name_len: libc::socklen_t,
    control: [u64; SEND_CONTROL_WORDS],
    control_len: usize,
    /// Datagram size of a train; 0 for a single datagram.
    segment: usize,
    /// The train goes out as one message with `UDP_SEGMENT` (GSO); otherwise
    /// as one message per `segment` bytes.
    gso: bool,
    /// Bytes of an unsegmented train already sent (or dropped).
    sent: usize,
    destination: SocketAddr,
    src_ip: Option<IpAddr>,
}

impl Queued {
    fn new() -> Self {
        Self {
            payload: Vec::new(),
            len: 0,
            // SAFETY: sockaddr_in6 is a plain C struct; all-zero is valid.
            name: unsafe { mem::zeroed() },
            name_len: 0,
            control: [0; SEND_CONTROL_WORDS],
            control_len: 0,
            segment: 0,
            gso: false,
            sent: 0,
            destination: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            src_ip: None,
        }
    }

    /// The entry's buffer, allocated on first use.
    fn buffer(&mut self) -> &mut [u8] {
        if self.payload.len() < SEND_BUF_LEN {
            self.payload = vec![0; SEND_BUF_LEN];
        }
        &mut self.payload
    }

    /// Sends the rest of this train without `UDP_SEGMENT`.
    fn drop_gso(&mut self) {
        if self.gso {
            self.gso = false;
            self.control_len = write_send_cmsgs(&mut self.control, 0, self.src_ip);
        }
    }
}

/// One message of a `sendmmsg` call, as planned.
#[derive(Debug, Clone, Copy, Default)]
struct Planned {
    len: usize,
    /// Datagrams it carries (segments of a GSO message, else 1).
    datagrams: usize,
    /// It carries a `UDP_SEGMENT` cmsg.
    gso: bool,
    /// It is the last message of its queued entry.
    last: bool,
}

/// The send batch: entries `head..tail` of a fixed pool, oldest first.
struct SendQueue {
    entries: Box<[Queued]>,
    head: usize,
    tail: usize,
}

impl SendQueue {
    fn new() -> Self {
        Self {
            entries: (0..SEND_BATCH).map(|_| Queued::new()).collect(),
            head: 0,
            tail: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    fn free(&self) -> usize {
        self.entries.len() - (self.tail - self.head)
    }

    /// The next free entry, moving the queued ones to the front if needed;
    /// [`Self::push`] queues it. The caller must have checked [`Self::free`].
    fn next_free(&mut self) -> &mut Queued {
        if self.tail == self.entries.len() && self.head > 0 {
            // Entries own their buffers: rotating moves ~200-byte structs,
            // not payloads; the sent ones become the free tail.
            self.entries.rotate_left(self.head);
            self.tail -= self.head;
            self.head = 0;
        }
        &mut self.entries[self.tail]
    }

    /// Queues the next free entry and returns it for filling in.
    fn push(&mut self) -> &mut Queued {
        self.next_free();
        let i = self.tail;
        self.tail += 1;
        &mut self.entries[i]
    }

    /// Moves past message `m` of the head entry (sent or dropped).
    fn advance(&mut self, m: &Planned) {
        if m.last {
            self.head += 1;
            if self.head == self.tail {
                self.head = 0;
                self.tail = 0;
            }
        } else {
            self.entries[self.head].sent += m.len;
        }
    }

    /// Fills `hdrs`/`iovs` with up to [`SEND_BATCH`] messages from the head
    /// of the queue; returns how many. The headers point into `self` and
    /// `iovs`, which must not change until the `sendmmsg` returns.
    fn plan(
        &mut self,
        hdrs: &mut [libc::mmsghdr; SEND_BATCH],
        iovs: &mut [libc::iovec; SEND_BATCH],
        plan: &mut [Planned; SEND_BATCH],
    ) -> usize {
        let mut n = 0;
        'entries: for q in self.entries[self.head..self.tail].iter_mut() {
            let total = q.len;
            let step = if q.gso || q.segment == 0 {
                total
            } else {
                q.segment
            };
            let name = (&raw mut q.name).cast::<libc::c_void>();
            let control = if q.control_len == 0 {
                std::ptr::null_mut()
            } else {
                q.control.as_mut_ptr().cast::<libc::c_void>()
            };
            let mut off = q.sent;
            loop {
                if n == SEND_BATCH {
                    break 'entries;
                }
                let len = step.min(total - off);
                let chunk = &mut q.payload[off..off + len];
                iovs[n] = libc::iovec {
                    iov_base: chunk.as_mut_ptr().cast(),
                    iov_len: len,
                };
                let h = &mut hdrs[n].msg_hdr;
                h.msg_name = name;
                h.msg_namelen = q.name_len;
                h.msg_iov = &raw mut iovs[n];
                h.msg_iovlen = 1;
                h.msg_control = control;
                h.msg_controllen = q.control_len as _;
                h.msg_flags = 0;
                hdrs[n].msg_len = 0;
                off += len;
                let gso = q.gso && q.segment > 0;
                plan[n] = Planned {
                    len,
                    datagrams: if gso { len.div_ceil(q.segment) } else { 1 },
                    gso,
                    last: off >= total,
                };
                n += 1;
                if off >= total {
                    break;
                }
            }
        }
        n
    }
}

/// The epoll (tokio reactor) datagram driver. See the module docs.
pub struct EpollUdp {
    socket: UdpSocket,
    state: UdpSocketState,
    v6: bool,
    gso: bool,
    gro: bool,
    queue: SendQueue,
    counters: IoCounters,
    /// `send_buf` lent the next free entry's buffer; `commit_send` consumes it.
    lent: bool,
    /// Receive buffers for `recv_with` (up to [`RECV_BATCH`], made on demand).
    recv_bufs: Vec<Vec<u8>>,
    recv_metas: Vec<RecvMeta>,
    /// Unreachable reports read from the socket's error queue after a
    /// failed receive or send, for [`DatagramIo::take_unreachable`].
    reported: Vec<crate::errqueue::Unreachable>,
}

/// Retries of a send that failed with the socket's pending ICMP error
/// (about some earlier datagram) per [`EpollUdp::send_queued`] call; past
/// them such a failure drops the message like any other.
const ICMP_SEND_RETRIES: usize = 8;

/// Most datagrams/trains one `recv_with` takes (one `recvmmsg`).
const RECV_BATCH: usize = 64;

impl EpollUdp {
    /// Wraps a bound non-blocking socket. Must be called inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket, gso: bool, gro: bool) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // quinn-udp enables GRO, PKTINFO and ECN reporting on the socket here,
        // and probes whether the kernel takes `UDP_SEGMENT`.
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let v6 = socket.local_addr()?.is_ipv6();
        let gso = gso && state.max_gso_segments() > 1;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Self {
            socket,
            state,
            v6,
            gso,
            gro,
            queue: SendQueue::new(),
            counters: IoCounters::default(),
            lent: false,
            recv_bufs: Vec::new(),
            recv_metas: Vec::new(),
            reported: Vec::new(),
        })
    }

    /// Binds `addr` and wraps it.
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Self> {
        Self::new(bind_udp(addr, opts)?, opts.gso, opts.gro)
    }

    fn max_gso_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments().min(MAX_GSO_SEGMENTS)
        } else {
            1
        }
    }

    /// Sends everything queued, one `sendmmsg` per [`SEND_BATCH`] messages.
    /// `Err(WouldBlock)` (write readiness cleared) leaves the rest queued;
    /// no other error is returned: failed messages are counted and dropped.
    fn send_queued(&mut self) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        let mut icmp_retries = 0;
        while !self.queue.is_empty() {
            // SAFETY: mmsghdr and iovec are plain C structs; all-zero is valid.
            let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
            // SAFETY: as above.
            let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { mem::zeroed() };
            let mut plan = [Planned::default(); SEND_BATCH];
            let n = self.queue.plan(&mut hdrs, &mut iovs, &mut plan);
            let mut calls = 0;
            let res = loop {
                let r = self.socket.try_io(Interest::WRITABLE, || {
                    calls += 1;
                    // SAFETY: the first `n` headers are initialised and point
                    // at `iovs` and at queued entries' names, cmsgs and
                    // payloads; neither is touched until this synchronous
                    // call returns, and the kernel only reads them (plus
                    // writes `msg_len` inside `hdrs`).
                    let rc = unsafe {
                        libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
                    };
                    if rc < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(rc as usize)
                    }
                });
                match r {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            self.counters.send_syscalls += calls;
            match res {
                Ok(sent) if sent > 0 => {
                    for m in &plan[..sent.min(n)] {
                        self.counters.send_datagrams += m.datagrams as u64;
                        self.counters.send_bytes += m.len as u64;
                        self.queue.advance(m);
                    }
                }
                // Only with n == 0, which a non-empty queue never plans.
                Ok(_) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(_)
                    if icmp_retries < ICMP_SEND_RETRIES
                        && crate::errqueue::drain(fd, &mut self.reported) > 0 =>
                {
                    // The error queue held something, so the failure was
                    // the socket's pending ICMP error (about some earlier
                    // datagram), returned once instead of sending: the
                    // message was not sent; send it again.
                    icmp_retries += 1;
                }
                Err(e) => {
                    // The first planned message failed: the others were not tried.
                    let first = plan[0];
                    if first.gso && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
                        self.gso_refused(&e);
                    } else {
                        let dst = self.queue.entries[self.queue.head].destination;
                        self.count_send_error(dst, &e);
                        self.queue.advance(&first);
                    }
                }
            }
        }
        Ok(())
    }

    /// The kernel or NIC refused segmentation: GSO off for this socket, and
    /// every queued train (the refused one first) goes out unsegmented.
    fn gso_refused(&mut self, e: &io::Error) {
        if self.gso {
            eprintln!("spooky-uring: GSO send failed ({e}); disabling GSO on this socket");
        }
        self.gso = false;
        self.counters.gso_fallbacks += 1;
        let (head, tail) = (self.queue.head, self.queue.tail);
        for q in &mut self.queue.entries[head..tail] {
            q.drop_gso();
        }
    }

    fn count_send_error(&mut self, dst: SocketAddr, e: &io::Error) {
        // UDP is unreliable anyway; QUIC retransmits. Count and move on
        // rather than failing every connection on this socket.
        self.counters.send_errors += 1;
        if self.counters.send_errors.is_power_of_two() {
            eprintln!(
                "spooky-uring: sendmmsg to {dst} failed: {e} ({} send errors so far)",
                self.counters.send_errors
            );
        }
    }
}

impl AsRawFd for EpollUdp {
    /// The UDP socket's fd (for socket options; do not read or write it).
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl DatagramIo for EpollUdp {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_gso_segments: self.max_gso_segments(),
            gro_segments: if self.gro {
                self.state.gro_segments()
            } else {
                1
            },
            driver: "epoll",
        }
    }

    fn counters(&self) -> IoCounters {
        self.counters
    }

    async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Waits for `EPOLLOUT`: tokio's write readiness, which `send_queued`
    /// clears (through `try_io`) whenever the kernel says `EAGAIN`.
    async fn writable(&self) -> io::Result<()> {
        self.socket.writable().await
    }

    fn recv_with<F: FnMut(&RecvMeta, &mut [u8])>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> io::Result<usize> {
        // recvmmsg writes into buffers the driver keeps (allocated on first
        // use, calloc'd); `f` reads them where the kernel put the bytes.
        let n = max.min(RECV_BATCH);
        if self.recv_bufs.len() < n {
            self.recv_bufs.resize_with(n, || vec![0; MAX_RECV_BUF]);
            self.recv_metas.resize(
                n,
                RecvMeta {
                    peer: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
                    local_ip: None,
                    len: 0,
                    stride: 0,
                },
            );
        }
        let mut bufs = mem::take(&mut self.recv_bufs);
        let mut metas = mem::take(&mut self.recv_metas);
        let r = self.try_recv_batch(&mut bufs[..n], &mut metas[..n]);
        if let Ok(got) = r {
            for (m, b) in metas.iter().zip(bufs.iter_mut()).take(got) {
                f(m, &mut b[..m.len]);
            }
        }
        self.recv_bufs = bufs;
        self.recv_metas = metas;
        r
    }

    fn try_recv_batch(
        &mut self,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = bufs.len().min(metas.len());
        if n == 0 {
            return Ok(0);
        }
        let mut slices: Vec<IoSliceMut<'_>> = bufs[..n]
            .iter_mut()
            .map(|b| IoSliceMut::new(b.as_mut_slice()))
            .collect();
        let mut qmeta = vec![quinn_udp::RecvMeta::default(); n];
        let state = &self.state;
        let socket = &self.socket;
        let got = socket
            .try_io(Interest::READABLE, || {
                state.recv(UdpSockRef::from(socket), &mut slices, &mut qmeta)
            })
            .inspect_err(|e| {
                // Any real failure may be the socket's pending ICMP error.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    crate::errqueue::drain(socket.as_raw_fd(), &mut self.reported);
                }
            })?;
        self.counters.recv_syscalls += 1;
        for (i, m) in qmeta.iter().take(got).enumerate() {
            let meta = RecvMeta {
                peer: m.addr,
                local_ip: m.dst_ip,
                len: m.len,
                stride: if m.stride == 0 { m.len } else { m.stride },
            };
            self.counters.recv_datagrams += meta.segments() as u64;
            self.counters.recv_bytes += m.len as u64;
            metas[i] = meta;
        }
        Ok(got)
    }

    /// Copies the transmit into the send batch (GSO trains of at most
    /// [`MAX_GSO_SEGMENTS`] segments and 65507 bytes per entry, as the io_uring
    /// driver splits them). Sends the batch first when it is full;
    /// `WouldBlock` when it is still full after that.
    fn try_send(&mut self, t: &Transmit<'_>) -> io::Result<()> {
        // A lent buffer is no longer the next free entry once this queues.
        self.lent = false;
        let len = t.contents.len();
        let seg = t.segment_size.filter(|&s| s > 0 && s < len);
        let max_gso = self.max_gso_segments();
        let (chunk, gso) = match seg {
            Some(s) if max_gso > 1 => (s * max_gso.min(MAX_UDP_PAYLOAD / s).max(1), true),
            // Without GSO a train is sent one message per segment; an entry
            // holds as many segments as fit its buffer.
            Some(s) => (s * (SEND_BUF_LEN / s).max(1), false),
            None => (len.max(1), false),
        };
        let needed = len.div_ceil(chunk).max(1);
        if needed > SEND_BATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "transmit needs more sends than the driver batches",
            ));
        }
        if self.queue.free() < needed {
            match self.send_queued() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.queue.free() < needed {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let v6 = self.v6;
        let parts = t.contents.chunks(chunk);
        // `chunks` yields nothing for an empty transmit: queue one empty datagram.
        let parts = parts.chain((len == 0).then_some(&t.contents[..0]));
        for part in parts {
            let segment = match seg {
                Some(s) if part.len() > s => s,
                _ => 0,
            };
            let q = self.queue.push();
            q.buffer()[..part.len()].copy_from_slice(part);
            q.len = part.len();
            q.name_len = write_sockaddr(&mut q.name, t.destination, v6);
            q.gso = gso && segment > 0;
            q.control_len =
                write_send_cmsgs(&mut q.control, if q.gso { segment } else { 0 }, t.src_ip);
            q.segment = segment;
            q.sent = 0;
            q.destination = t.destination;
            q.src_ip = t.src_ip;
        }
        Ok(())
    }

    fn send_buf(&mut self) -> Option<&mut [u8]> {
        if self.queue.free() == 0 {
            match self.send_queued() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
            if self.queue.free() == 0 {
                return None;
            }
        }
        self.lent = true;
        Some(&mut self.queue.next_free().buffer()[..MAX_UDP_PAYLOAD])
    }

    fn commit_send(&mut self, meta: &SendMeta) -> io::Result<()> {
        let lent = mem::take(&mut self.lent) && self.queue.free() > 0;
        if !lent {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no send buffer lent",
            ));
        }
        let len = meta.len.min(MAX_UDP_PAYLOAD);
        let seg = meta.segment_size.filter(|&s| s > 0 && s < len);
        let max_gso = self.max_gso_segments();
        // A train that one GSO message cannot carry goes out one message
        // per datagram, still from this buffer.
        let gso = seg.is_some_and(|s| max_gso > 1 && len.div_ceil(s) <= max_gso);
        let v6 = self.v6;
        let q = self.queue.push();
        q.len = len;
        q.name_len = write_sockaddr(&mut q.name, meta.destination, v6);
        let segment = seg.unwrap_or(0);
        q.gso = gso;
        q.control_len =
            write_send_cmsgs(&mut q.control, if gso { segment } else { 0 }, meta.src_ip);
        q.segment = segment;
        q.sent = 0;
        q.destination = meta.destination;
        q.src_ip = meta.src_ip;
        Ok(())
    }

    /// Sends the batch with `sendmmsg`; see the module docs.
    fn flush(&mut self) -> io::Result<()> {
        self.send_queued()
    }

    fn take_unreachable(&mut self, out: &mut Vec<crate::errqueue::Unreachable>) {
        out.append(&mut self.reported);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;
    use std::time::Duration;

    use crate::cmsg::setsockopt_int;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn epoll_on(addr: &str) -> EpollUdp {
        EpollUdp::bind(addr.parse().unwrap(), &SocketOptions::default()).unwrap()
    }

    /// A plain receiving socket with room for a few MiB and a read timeout.
    fn receiver() -> StdUdp {
        let rx = StdUdp::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        rx
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed * 7) % 251) as u8).collect()
    }

    fn lone<'a>(destination: SocketAddr, contents: &'a [u8]) -> Transmit<'a> {
        Transmit {
            destination,
            src_ip: None,
            contents,
            segment_size: None,
        }
    }

    fn train<'a>(destination: SocketAddr, contents: &'a [u8], segment: usize) -> Transmit<'a> {
        Transmit {
            destination,
            src_ip: None,
            contents,
            segment_size: Some(segment),
        }
    }

    /// What the worker does: retry a transmit after `writable()`.
    async fn send_until_queued(tx: &mut EpollUdp, t: &Transmit<'_>) {
        loop {
            match tx.try_send(t) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(tx).await,
                Err(e) => panic!("send: {e}"),
            }
        }
    }

    /// What the worker does after a batch: flush until everything is out.
    /// Returns how often the flush said `WouldBlock`.
    async fn flush_all(tx: &mut EpollUdp) -> usize {
        let mut blocked = 0;
        loop {
            match tx.flush() {
                Ok(()) => return blocked,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    assert!(blocked < 10_000, "flush spins: writable() does not wait");
                    wait_writable(tx).await;
                }
                Err(e) => panic!("flush: {e}"),
            }
        }
    }

    /// `writable()`, failing the test instead of hanging if POLLOUT never comes.
    async fn wait_writable(tx: &EpollUdp) {
        tokio::time::timeout(Duration::from_secs(5), tx.writable())
            .await
            .expect("no POLLOUT within 5 s")
            .unwrap();
    }

    /// Reads `count` datagrams (fails after 3 s without one).
    fn recv_n(rx: &StdUdp, count: usize) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        (0..count)
            .map(|_| {
                let n = rx.recv(&mut buf).unwrap();
                buf[..n].to_vec()
            })
            .collect()
    }

    fn sizes(got: &[Vec<u8>]) -> Vec<usize> {
        got.iter().map(Vec::len).collect()
    }

    #[test]
    fn gso_train_arrives_as_separate_datagrams() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
            let rx = receiver();
            let payload = pattern(1200 * 3 + 500, 1);
            send_until_queued(&mut tx, &train(rx.local_addr().unwrap(), &payload, 1200)).await;
            flush_all(&mut tx).await;
            let got = recv_n(&rx, 4);
            assert_eq!(sizes(&got), vec![1200, 1200, 1200, 500]);
            assert_eq!(got.concat(), payload);
            let c = tx.counters();
            assert_eq!((c.send_datagrams, c.send_bytes), (4, payload.len() as u64));
        });
    }

    /// 50 one-datagram transmits (the small-response case) go out in one
    /// `sendmmsg`, in order.
    #[test]
    fn small_sends_are_batched_into_one_sendmmsg() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
            let rx = receiver();
            let dst = rx.local_addr().unwrap();
            let msgs: Vec<Vec<u8>> = (0..50).map(|i| pattern(60 + i * 13, i)).collect();
            for m in &msgs {
                // 50 < SEND_BATCH: queueing never needs the kernel.
                tx.try_send(&lone(dst, m)).unwrap();
            }
            assert_eq!(tx.counters().send_syscalls, 0, "try_send only queues");
            flush_all(&mut tx).await;
            let got = recv_n(&rx, msgs.len());
            assert_eq!(sizes(&got), sizes(&msgs));
            assert_eq!(got, msgs);
            let c = tx.counters();
            eprintln!("50 small transmits, one flush: {c:?}");
            assert!(c.send_syscalls <= 2, "{c:?}");
            assert_eq!(c.send_datagrams, 50);
            assert_eq!(
                c.send_bytes,
                msgs.iter().map(Vec::len).sum::<usize>() as u64
            );
            assert_eq!((c.send_errors, c.gso_fallbacks), (0, 0));
        });
    }

    /// GSO trains and lone datagrams to two peers, interleaved in one batch.
    #[test]
    fn mixed_trains_and_datagrams_reach_both_peers() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
            let (a, b) = (receiver(), receiver());
            let (da, db) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            let a1 = pattern(1200 * 3 + 500, 1);
            let b1 = pattern(700, 2);
            let b2 = pattern(1000 * 5, 3);
            let a2 = pattern(300, 4);
            let a3 = pattern(1300 * 2 + 1, 5);
            let b3 = pattern(1, 6);
            for t in [
                train(da, &a1, 1200),
                lone(db, &b1),
                train(db, &b2, 1000),
                lone(da, &a2),
                train(da, &a3, 1300),
                lone(db, &b3),
            ] {
                send_until_queued(&mut tx, &t).await;
            }
            flush_all(&mut tx).await;
            let got_a = recv_n(&a, 8);
            let got_b = recv_n(&b, 7);
            assert_eq!(
                sizes(&got_a),
                vec![1200, 1200, 1200, 500, 300, 1300, 1300, 1]
            );
            assert_eq!(got_a.concat(), [a1, a2, a3].concat());
            assert_eq!(sizes(&got_b), vec![700, 1000, 1000, 1000, 1000, 1000, 1]);
            assert_eq!(got_b.concat(), [b1, b2, b3].concat());
            let c = tx.counters();
            assert_eq!(c.send_datagrams, 15);
            assert!(c.send_syscalls <= 2, "{c:?}");
            assert_eq!((c.send_errors, c.gso_fallbacks), (0, 0));
            if tx.capabilities().max_gso_segments > 1 {
                assert_eq!(tx.capabilities().max_gso_segments, crate::MAX_GSO_SEGMENTS);
            }
        });
    }

    /// More transmits than the batch holds: `try_send` sends the full batch
    /// itself and reuses its entries; order is kept.
    #[test]
    fn more_transmits_than_the_batch_all_arrive_in_order() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
            let rx = receiver();
            let dst = rx.local_addr().unwrap();
            let n = SEND_BATCH * 3 + 5;
            let msgs: Vec<Vec<u8>> = (0..n).map(|i| pattern(100 + i % 50, i)).collect();
            for m in &msgs {
                send_until_queued(&mut tx, &lone(dst, m)).await;
            }
            flush_all(&mut tx).await;
            assert_eq!(recv_n(&rx, n), msgs);
            let c = tx.counters();
            assert_eq!(c.send_datagrams, n as u64);
            assert!(c.send_syscalls as usize <= n / SEND_BATCH + 2, "{c:?}");
        });
    }

    /// Moves this thread into a fresh network namespace whose loopback is
    /// shaped by a token bucket, so sent packets wait in a qdisc, charged to
    /// the socket's send buffer, and a small buffer fills: plain loopback
    /// never returns `EAGAIN` for UDP (it frees every packet as it sends it).
    /// Needs CAP_SYS_ADMIN and the `ip` and `tc` tools.
    fn enter_shaped_netns() -> Result<(), String> {
        // SAFETY: takes no pointers; CLONE_NEWNET moves only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        let tbf = "qdisc add dev lo root tbf rate 50mbit burst 16kb latency 1s";
        for (tool, args) in [("ip", "link set lo up"), ("tc", tbf)] {
            let out = std::process::Command::new(tool)
                .args(args.split(' '))
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} {args}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// A burst far larger than a tiny send buffer: `flush` returns
    /// `WouldBlock` with the rest queued, `writable()` waits for POLLOUT,
    /// and the next flush goes on; every datagram arrives, in order.
    #[test]
    fn full_send_buffer_blocks_flush_and_loses_nothing() {
        std::thread::spawn(|| {
            if let Err(why) = enter_shaped_netns() {
                eprintln!("skipping: no shaped network namespace here ({why})");
                return;
            }
            rt().block_on(async {
                let opts = SocketOptions {
                    send_buffer: 4096,
                    ..SocketOptions::default()
                };
                let mut tx = EpollUdp::bind("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
                let rx = receiver();
                let dst = rx.local_addr().unwrap();
                const ROUNDS: usize = 40;
                const LONE: usize = 24;
                const TRAIN: usize = 8;
                const TOTAL: usize = ROUNDS * (LONE + TRAIN);
                let numbered = |seq: usize| {
                    let mut p = pattern(1200, seq);
                    p[..4].copy_from_slice(&(seq as u32).to_be_bytes());
                    p
                };
                let drain = std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    let mut seqs = Vec::new();
                    while seqs.len() < TOTAL {
                        let Ok(n) = rx.recv(&mut buf) else { break };
                        assert_eq!(n, 1200);
                        let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        assert_eq!(buf[4..n], numbered(seq)[4..]);
                        seqs.push(seq);
                    }
                    seqs
                });
                let mut seq = 0;
                let mut blocked = 0;
                for _ in 0..ROUNDS {
                    for _ in 0..LONE {
                        let p = numbered(seq);
                        seq += 1;
                        send_until_queued(&mut tx, &lone(dst, &p)).await;
                    }
                    let t: Vec<u8> = (seq..seq + TRAIN).flat_map(numbered).collect();
                    seq += TRAIN;
                    send_until_queued(&mut tx, &train(dst, &t, 1200)).await;
                    blocked += flush_all(&mut tx).await;
                }
                let seqs = drain.join().unwrap();
                assert_eq!(seqs.len(), TOTAL, "datagrams lost");
                assert!(seqs.iter().copied().eq(0..TOTAL), "datagrams reordered");
                let c = tx.counters();
                eprintln!("tiny send buffer: flush blocked {blocked} times; {c:?}");
                assert!(blocked > 0, "the send buffer never filled");
                assert_eq!(c.send_datagrams, TOTAL as u64);
                assert_eq!((c.send_errors, c.gso_fallbacks), (0, 0));
            });
        })
        .join()
        .unwrap();
    }

    /// Messages the kernel rejects (a v6 destination on a v4 socket:
    /// EAFNOSUPPORT; port 0: EINVAL) are counted and dropped one by one;
    /// the rest of the batch still goes out, in order, and GSO stays on.
    #[test]
    fn rejected_messages_are_dropped_and_the_batch_goes_on() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
            let gso = tx.capabilities().max_gso_segments;
            let rx = receiver();
            let dst = rx.local_addr().unwrap();
            let v6: SocketAddr = "[::1]:9".parse().unwrap();
            let port0: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let p: Vec<Vec<u8>> = (0..4).map(|i| pattern(200 + i, i)).collect();
            let bad_train = pattern(1200 * 2, 9);
            let good_train = pattern(1200 * 2 + 100, 10);
            for t in [
                lone(dst, &p[0]),
                lone(v6, &p[1]),
                lone(dst, &p[1]),
                lone(port0, &p[2]),
                lone(dst, &p[2]),
                train(v6, &bad_train, 1200),
                lone(dst, &p[3]),
                train(dst, &good_train, 1200),
            ] {
                send_until_queued(&mut tx, &t).await;
            }
            flush_all(&mut tx).await;
            let got = recv_n(&rx, 7);
            assert_eq!(sizes(&got), vec![200, 201, 202, 203, 1200, 1200, 100]);
            assert_eq!(got.concat(), [p.concat(), good_train].concat());
            let c = tx.counters();
            assert_eq!(c.send_errors, 3, "{c:?}");
            assert_eq!(c.gso_fallbacks, 0);
            assert_eq!(c.send_datagrams, 7);
            // At most: each failure ends one call and is the whole next one.
            assert!(c.send_syscalls <= 7, "{c:?}");
            assert_eq!(tx.capabilities().max_gso_segments, gso);
        });
    }

    /// `SO_NO_CHECK` makes the kernel refuse GSO with EINVAL (UDP GSO needs
    /// checksum offload): GSO goes off for the socket, the refused train and
    /// the trains queued behind it go out as single datagrams, in order.
    #[test]
    fn gso_refusal_falls_back_to_single_datagrams() {
        rt().block_on(async {
            let mut tx = epoll_on("127.0.0.1:0");
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
            let rx = receiver();
            let dst = rx.local_addr().unwrap();
            let t1 = pattern(1200 * 3 + 500, 1);
            let l = pattern(333, 2);
            let t2 = pattern(1000 * 2, 3);
            for t in [train(dst, &t1, 1200), lone(dst, &l), train(dst, &t2, 1000)] {
                send_until_queued(&mut tx, &t).await;
            }
            flush_all(&mut tx).await;
            let got = recv_n(&rx, 7);
            assert_eq!(sizes(&got), vec![1200, 1200, 1200, 500, 333, 1000, 1000]);
            assert_eq!(got.concat(), [&t1[..], &l, &t2].concat());
            let c = tx.counters();
            assert_eq!(
                (c.gso_fallbacks, c.send_errors, c.send_datagrams),
                (1, 0, 7)
            );
            assert_eq!(tx.capabilities().max_gso_segments, 1);
            // Later trains are queued unsegmented from the start.
            send_until_queued(&mut tx, &train(dst, &t1, 1200)).await;
            flush_all(&mut tx).await;
            assert_eq!(sizes(&recv_n(&rx, 4)), vec![1200, 1200, 1200, 500]);
            assert_eq!(tx.counters().gso_fallbacks, 1);
        });
    }

    /// A wildcard-bound socket sends from the transmit's `src_ip` (IP_PKTINFO).
    #[test]
    fn send_with_src_ip_uses_pktinfo() {
        rt().block_on(async {
            let mut tx = epoll_on("0.0.0.0:0");
            let rx = receiver();
            let p = pattern(700, 5);
            let t = Transmit {
                src_ip: Some("127.0.0.1".parse().unwrap()),
                ..lone(rx.local_addr().unwrap(), &p)
            };
            send_until_queued(&mut tx, &t).await;
            flush_all(&mut tx).await;
            let mut buf = [0u8; 2000];
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &p[..]);
            assert_eq!(from.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
            assert_eq!(from.port(), tx.local_addr().unwrap().port());
        });
    }

    /// A dual-stack v6 socket reaches a v4 peer (sent as v4-mapped).
    #[test]
    fn dual_stack_socket_sends_to_v4_peer() {
        rt().block_on(async {
            let Ok(mut tx) = EpollUdp::bind("[::]:0".parse().unwrap(), &SocketOptions::default())
            else {
                eprintln!("skipping: no IPv6");
                return;
            };
            let rx = receiver();
            let p = pattern(1200 * 2, 6);
            send_until_queued(&mut tx, &train(rx.local_addr().unwrap(), &p, 1200)).await;
            flush_all(&mut tx).await;
            assert_eq!(recv_n(&rx, 2).concat(), p);
            assert_eq!(tx.counters().send_errors, 0);
        });
    }

    #[test]
    fn batch_receive_reports_peers_and_lengths() {
        rt().block_on(async {
            let mut rx =
                EpollUdp::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
            let dst = rx.local_addr().unwrap();
            let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for i in 0..5u8 {
                a.send_to(&[i; 100], dst).unwrap();
                b.send_to(&[i; 300], dst).unwrap();
            }
            let mut bufs = vec![vec![0u8; MAX_RECV_BUF]; 16];
            let mut metas = vec![
                RecvMeta {
                    peer: dst,
                    local_ip: None,
                    len: 0,
                    stride: 0
                };
                16
            ];
            let mut from_a = 0;
            let mut from_b = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while from_a + from_b < 500 + 1500 && std::time::Instant::now() < deadline {
                rx.readable().await.unwrap();
                match rx.try_recv_batch(&mut bufs, &mut metas) {
                    Ok(n) => {
                        for m in &metas[..n] {
                            if m.peer == a.local_addr().unwrap() {
                                assert_eq!(m.stride, 100);
                                from_a += m.len;
                            } else if m.peer == b.local_addr().unwrap() {
                                assert_eq!(m.stride, 300);
                                from_b += m.len;
                            } else {
                                panic!("unexpected peer {}", m.peer);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!((from_a, from_b), (500, 1500));
            assert!(rx.counters().recv_datagrams >= 10);
        });
    }
}
