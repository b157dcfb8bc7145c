//! ICMP "unreachable" reports about datagrams the socket sent.
//!
//! An unconnected UDP socket hears nothing of ICMP errors unless
//! `IP_RECVERR` (and `IPV6_RECVERR`) is set; then the kernel queues each
//! one on the socket's error queue, with the original destination (the
//! client the datagram was for) and the quoted start of the datagram, and
//! sets the socket's pending error, which the next receive or send on the
//! socket returns once (`ECONNREFUSED`, `EHOSTUNREACH`, `EMSGSIZE` for a
//! "fragmentation needed", ...) instead of doing its work. So whenever a
//! receive or send fails, the drivers read the queue ([`drain`]); when it
//! held anything, the failure was that pending error and a failed send is
//! sent again.
//!
//! What the edge does with a report (a client whose path is gone) is its
//! business; this module only reads and filters them.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::cmsg::{parse_sockaddr, setsockopt_int};

/// Bytes of the offending datagram kept: a QUIC header's first byte,
/// version, connection id length and a 20-byte connection id fit.
pub const QUOTED_MAX: usize = 32;

/// Reports one [`drain`] call reads at most: bounds the work a burst of
/// (possibly forged) ICMP messages can cause per loop turn; the rest waits
/// in the kernel's queue, which the socket's receive buffer bounds.
pub const DRAIN_MAX: usize = 64;

/// A destination-unreachable report about a datagram this socket sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    /// Where the datagram was going: the peer that cannot be reached.
    pub peer: SocketAddr,
    /// What the kernel made of the ICMP message: `ECONNREFUSED` (port
    /// unreachable), `EHOSTUNREACH` or `ENETUNREACH`.
    pub errno: i32,
    quoted: [u8; QUOTED_MAX],
    quoted_len: u8,
}

impl Unreachable {
    /// Builds a report (for tests and for handing reports between workers).
    pub fn new(peer: SocketAddr, errno: i32, quoted: &[u8]) -> Self {
        let n = quoted.len().min(QUOTED_MAX);
        let mut q = [0u8; QUOTED_MAX];
        q[..n].copy_from_slice(&quoted[..n]);
        Self {
            peer,
            errno,
            quoted: q,
            quoted_len: n as u8,
        }
    }

    /// The start of the UDP payload the ICMP message quoted (may be empty:
    /// routers need quote only 8 bytes past the IP header).
    pub fn quoted(&self) -> &[u8] {
        &self.quoted[..usize::from(self.quoted_len)]
    }
}

/// Whether an error-queue entry's errno means the destination cannot be
/// reached (port, host or network unreachable).
pub fn is_unreachable_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN
    )
}

/// Asks the kernel to queue ICMP errors on the socket (`IP_RECVERR`, and
/// `IPV6_RECVERR` on an IPv6 socket, whose v4-mapped peers report through
/// the IPv4 option).
pub fn enable(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
        // A v6-only socket refuses the v4 option; it has no v4 peers.
        let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        Ok(())
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// Reads up to [`DRAIN_MAX`] queued errors without blocking and appends
/// the destination-unreachable ones that came from ICMP (not local
/// errors, not "fragmentation needed") to `out`. Returns how many errors
/// were read, kept or not.
pub fn drain(fd: RawFd, out: &mut Vec<Unreachable>) -> usize {
    let mut read = 0;
    while read < DRAIN_MAX {
        match recv_one(fd) {
            Some(Some(u)) => out.push(u),
            Some(None) => {}
            None => break,
        }
        read += 1;
    }
    read
}

/// One `recvmsg(MSG_ERRQUEUE)`: `None` when the queue is empty (or the
/// call failed), `Some(None)` for an error that is not an unreachable.
fn recv_one(fd: RawFd) -> Option<Option<Unreachable>> {
    let mut data = [0u8; QUOTED_MAX];
    let mut name = [0u8; mem::size_of::<libc::sockaddr_in6>()];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = name.len() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control);
    // SAFETY: `msg` points at live, correctly sized buffers.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let quoted = &data[..(n as usize).min(data.len())];
    let name = &name[..(msg.msg_namelen as usize).min(name.len())];
    // SAFETY: the kernel wrote `msg_controllen` bytes of the buffer.
    let control: &[u8] = unsafe {
        std::slice::from_raw_parts(
            control.as_ptr().cast(),
            msg.msg_controllen.min(mem::size_of_val(&control)),
        )
    };
    Some(parse(name, quoted, control))
}

/// Makes a report of one error queue entry, if it is an ICMP
/// destination-unreachable.
fn parse(name: &[u8], quoted: &[u8], control: &[u8]) -> Option<Unreachable> {
    let peer = parse_sockaddr(name)?;
    let ee = crate::cmsg::find_extended_err(control)?;
    let from_icmp = matches!(
        ee.ee_origin,
        libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
    );
    let errno = ee.ee_errno as i32;
    (from_icmp && is_unreachable_errno(errno)).then(|| Unreachable::new(peer, errno, quoted))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    /// A datagram to a loopback port nobody listens on draws an ICMP port
    /// unreachable, which comes back as a report naming that port and
    /// quoting the datagram.
    #[test]
    fn a_closed_port_comes_back_as_a_report() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable(s.as_raw_fd(), false).unwrap();
        let payload = [0x40u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        s.send_to(&payload, gone).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.is_empty() && Instant::now() < deadline {
            drain(s.as_raw_fd(), &mut got);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len(), 1, "one report");
        assert_eq!(got[0].peer, gone);
        assert_eq!(got[0].errno, libc::ECONNREFUSED);
        assert_eq!(got[0].quoted(), &payload[..]);
        // Drained: the pending error is gone too, the socket works.
        assert_eq!(drain(s.as_raw_fd(), &mut got), 0);
        s.send_to(&payload, s.local_addr().unwrap()).unwrap();
    }

    #[test]
    fn without_the_option_nothing_is_queued() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"x", gone).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        assert_eq!(drain(s.as_raw_fd(), &mut got), 0);
        s.send_to(b"x", gone).unwrap();
    }
}
