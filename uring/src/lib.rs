//! Datagram batch I/O for spooky.
//!
//! Everything above this crate (the QUIC edge, the router) talks to the network
//! only through [`DatagramIo`]: receive a batch of datagrams (each possibly a
//! GRO train of equal-size segments), send a batch of transmits (each possibly a
//! GSO train). The drivers are small and swappable: [`epoll::EpollUdp`] and
//! [`uring::UringUdp`]. Callers are generic over the trait, so the choice
//! costs no dynamic dispatch on the hot path.

#![deny(unsafe_op_in_unsafe_fn)]

mod cmsg;
pub mod epoll;
pub mod errqueue;
pub mod steering;
pub mod tcp;
pub mod uring;

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Largest UDP payload a single receive can carry: a full GRO train.
///
/// Receive buffers must be this large or the kernel truncates coalesced
/// trains (Envoy lost packets with 24 KiB buffers).
pub const MAX_RECV_BUF: usize = 64 * 1024;

/// Largest number of segments one GSO send may carry (kernel `UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// One received datagram or GRO train.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// Who sent it.
    pub peer: SocketAddr,
    /// The local address it arrived on, when the kernel told us (IP_PKTINFO).
    pub local_ip: Option<IpAddr>,
    /// Bytes written into the buffer.
    pub len: usize,
    /// Size of each segment in a GRO train; equals `len` for a lone datagram.
    pub stride: usize,
}

impl RecvMeta {
    /// Number of datagrams this receive carried.
    pub fn segments(&self) -> usize {
        if self.stride == 0 {
            1
        } else {
            self.len.div_ceil(self.stride)
        }
    }
}

/// One send: a single datagram, or a GSO train of `segment_size` datagrams
/// (all equal except possibly the last, which may be shorter).
#[derive(Debug, Clone, Copy)]
pub struct Transmit<'a> {
    pub destination: SocketAddr,
    /// Source IP to send from (for sockets bound to a wildcard address).
    pub src_ip: Option<IpAddr>,
    pub contents: &'a [u8],
    /// `Some(n)` makes this a GSO send of `contents.len().div_ceil(n)` datagrams.
    pub segment_size: Option<usize>,
}

/// A transmit built in place, in the buffer [`DatagramIo::send_buf`] lent.
#[derive(Debug, Clone, Copy)]
pub struct SendMeta {
    pub destination: SocketAddr,
    /// Source IP to send from (for sockets bound to a wildcard address).
    pub src_ip: Option<IpAddr>,
    /// Bytes written at the start of the lent buffer.
    pub len: usize,
    /// `Some(n)` makes this a GSO train of `len.div_ceil(n)` datagrams.
    pub segment_size: Option<usize>,
}

/// Largest payload of one UDP send (a whole GSO train included).
pub const MAX_SEND: usize = 65_507;

/// What a driver could enable on its socket; logged once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Segments one send may carry (1 = no GSO).
    pub max_gso_segments: usize,
    /// Segments one receive may carry (1 = no GRO).
    pub gro_segments: usize,
    /// Name of the driver, for logs and metrics labels.
    pub driver: &'static str,
}

/// Counters a driver keeps about its own syscalls; read by telemetry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounters {
    pub recv_syscalls: u64,
    pub recv_datagrams: u64,
    pub recv_bytes: u64,
    pub send_syscalls: u64,
    pub send_datagrams: u64,
    pub send_bytes: u64,
    /// Sends that failed for a reason other than "would block" (dropped; QUIC retransmits).
    pub send_errors: u64,
    /// Sends that had to drop from GSO to one datagram per syscall.
    pub gso_fallbacks: u64,
    /// io_uring only (0 for epoll): `io_uring_enter` calls that submitted work,
    pub ring_submits: u64,
    /// completions reaped,
    pub ring_completions: u64,
    /// times the provided receive buffers ran out (`-ENOBUFS`; the kernel
    /// drops datagrams until they are returned),
    pub recv_buffers_exhausted: u64,
    /// and receives cut short (`MSG_TRUNC`; must stay 0 with 64 KiB buffers).
    pub recv_truncated: u64,
}

/// Batched datagram I/O for one socket, owned by one worker.
///
/// Call protocol: `readable().await`, then `try_recv_batch` until it returns
/// `WouldBlock`; queue transmits with `try_send`, and on `WouldBlock` wait on
/// `writable().await` and retry the same transmit; then `flush`, and on
/// `WouldBlock` wait on `writable().await` and flush again. Nothing blocks
/// the thread.
#[allow(async_fn_in_trait)]
pub trait DatagramIo {
    /// The address the socket is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// What GSO/GRO this driver could enable.
    fn capabilities(&self) -> Capabilities;
    /// Counters so far.
    fn counters(&self) -> IoCounters;
    /// Waits until a receive may make progress.
    async fn readable(&self) -> io::Result<()>;
    /// Waits until a send may make progress.
    async fn writable(&self) -> io::Result<()>;
    /// Receives up to `bufs.len()` datagrams/trains; `metas[i]` describes `bufs[i]`.
    /// Each buffer should be [`MAX_RECV_BUF`] bytes. Returns `WouldBlock` when empty.
    fn try_recv_batch(&mut self, bufs: &mut [Vec<u8>], metas: &mut [RecvMeta])
        -> io::Result<usize>;
    /// Receives up to `max` datagrams/trains and hands each to `f` in the
    /// driver's own buffer, which `f` may modify (quiche decrypts in place):
    /// with io_uring that is the provided-buffer ring itself, returned to the
    /// kernel after `f`, so received bytes are never copied in user space.
    /// Returns how many; `WouldBlock` when none is waiting.
    fn recv_with<F: FnMut(&RecvMeta, &mut [u8])>(&mut self, max: usize, f: F) -> io::Result<usize>;
    /// Queues one transmit (copied: the slice need not outlive the call) for
    /// the next [`Self::flush`]; may send earlier when the driver's batch is
    /// full. `WouldBlock` when it cannot be queued yet. The hot path uses
    /// `send_buf`/`commit_send` instead, which spare the copy.
    fn try_send(&mut self, transmit: &Transmit<'_>) -> io::Result<()>;
    /// Lends the buffer of the next send ([`MAX_SEND`] bytes), so a packet
    /// train is written once, by quiche's encryption, and reaches the kernel
    /// from there without another copy. `None` while every send buffer is in
    /// flight: `flush`, await `writable()`, ask again.
    fn send_buf(&mut self) -> Option<&mut [u8]>;
    /// Queues the transmit built at the start of the buffer the last
    /// `send_buf` lent (sent at the next `flush`). Fails with `InvalidInput`
    /// when no buffer was lent.
    fn commit_send(&mut self, meta: &SendMeta) -> io::Result<()>;
    /// Hands queued sends to the kernel in as few syscalls as the driver can
    /// (io_uring: one `io_uring_enter`; epoll: one `sendmmsg` per 64
    /// messages). The caller calls it once after each batch of `try_send`s.
    /// `WouldBlock` means the socket's send buffer is full and some sends are
    /// still queued, in order: wait on `writable()` and call it again.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The driver's io_uring, for upstream TCP streams on the same ring
    /// ([`tcp::UringTcpStream`]); `None` for drivers without one.
    fn tcp_ring(&self) -> Option<tcp::RingHandle> {
        None
    }
    /// Appends the ICMP destination-unreachable reports queued on the
    /// socket ([`errqueue`]) to `out`. The queue is read only after a
    /// receive or send failed (the socket's pending ICMP error makes the
    /// next one fail), so this costs nothing while none fails.
    fn take_unreachable(&mut self, _out: &mut Vec<errqueue::Unreachable>) {}
}

/// Splits a received GRO train into its datagrams.
pub fn split_segments(buf: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    let stride = if stride == 0 {
        buf.len().max(1)
    } else {
        stride
    };
    buf.chunks(stride)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_short_tail_and_lone_datagrams() {
        let buf: Vec<u8> = (0..250u8).collect();
        let parts: Vec<_> = split_segments(&buf, 100).map(|s| s.len()).collect();
        assert_eq!(parts, vec![100, 100, 50]);
        let parts: Vec<_> = split_segments(&buf, 0).map(|s| s.len()).collect();
        assert_eq!(parts, vec![250]);
        let meta = RecvMeta {
            peer: "127.0.0.1:1".parse().unwrap(),
            local_ip: None,
            len: 250,
            stride: 100,
        };
        assert_eq!(meta.segments(), 3);
    }
}
