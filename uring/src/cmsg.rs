//! Socket-address and control-message helpers shared by the io_uring and
//! epoll drivers: both build the same `msghdr` for a send (destination,
//! `UDP_SEGMENT` for GSO, `IP_PKTINFO`/`IPV6_PKTINFO` for the source IP), so
//! they build it with the same code.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

pub(crate) const SOL_UDP: libc::c_int = 17;
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Send control buffer: UDP_SEGMENT (24) + IPV6_PKTINFO (40) fits in 128.
pub(crate) const SEND_CONTROL_WORDS: usize = 16;

/// Largest UDP payload over IPv4 (65535 - IP and UDP headers): a GSO train
/// must fit in one UDP "super-datagram".
pub(crate) const MAX_UDP_PAYLOAD: usize = crate::MAX_SEND;

const fn cmsg_align(n: usize) -> usize {
    let a = mem::size_of::<usize>();
    (n + a - 1) & !(a - 1)
}
const CMSG_HDR: usize = cmsg_align(mem::size_of::<libc::cmsghdr>());
const fn cmsg_len(n: usize) -> usize {
    CMSG_HDR + n
}
const fn cmsg_space(n: usize) -> usize {
    CMSG_HDR + cmsg_align(n)
}

/// Writes `addr` as a sockaddr for a socket of the given family (v4 peers of
/// a v6 socket become v4-mapped, v4-mapped peers of a v4 socket become v4).
pub(crate) fn write_sockaddr(
    out: &mut libc::sockaddr_in6,
    addr: SocketAddr,
    v6_socket: bool,
) -> libc::socklen_t {
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(a), true) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        (SocketAddr::V6(a), false) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => SocketAddr::V6(a),
        },
        (a, _) => a,
    };
    // SAFETY: zeroed sockaddr_in6 is valid.
    *out = unsafe { mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: zeroed sockaddr_in is valid.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes);
            // both are plain C structs.
            unsafe {
                std::ptr::write(
                    (out as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr.s6_addr = a.ip().octets();
            out.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Writes one cmsg at byte offset `off` of `buf`; returns the next offset.
fn put_cmsg<T: Copy>(
    buf: &mut [u64],
    off: usize,
    level: libc::c_int,
    ty: libc::c_int,
    data: T,
) -> usize {
    let space = cmsg_space(mem::size_of::<T>());
    assert!(
        off + space <= mem::size_of_val(buf),
        "send cmsg buffer too small"
    );
    // SAFETY: cmsghdr is a plain C struct; all-zero is valid.
    let mut h: libc::cmsghdr = unsafe { mem::zeroed() };
    h.cmsg_len = cmsg_len(mem::size_of::<T>()) as _;
    h.cmsg_level = level;
    h.cmsg_type = ty;
    let base = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: bounds checked by the assert above; unaligned writes need no
    // alignment (though `off` is a multiple of 8 and `buf` is u64-aligned).
    unsafe {
        std::ptr::write_unaligned(base.add(off).cast::<libc::cmsghdr>(), h);
        std::ptr::write_unaligned(base.add(off + CMSG_HDR).cast::<T>(), data);
    }
    off + space
}

/// Fills the send control buffer; returns its length in bytes (0 for none).
pub(crate) fn write_send_cmsgs(
    buf: &mut [u64; SEND_CONTROL_WORDS],
    segment: usize,
    src_ip: Option<IpAddr>,
) -> usize {
    *buf = [0; SEND_CONTROL_WORDS];
    let mut off = 0;
    if segment > 0 {
        off = put_cmsg(buf, off, SOL_UDP, UDP_SEGMENT, segment as u16);
    }
    match src_ip {
        Some(IpAddr::V4(ip)) => {
            // SAFETY: in_pktinfo is a plain C struct; all-zero is valid.
            let mut pi: libc::in_pktinfo = unsafe { mem::zeroed() };
            pi.ipi_spec_dst.s_addr = u32::from_ne_bytes(ip.octets());
            off = put_cmsg(buf, off, libc::IPPROTO_IP, libc::IP_PKTINFO, pi);
        }
        Some(IpAddr::V6(ip)) => {
            // SAFETY: in6_pktinfo is a plain C struct; all-zero is valid.
            let mut pi: libc::in6_pktinfo = unsafe { mem::zeroed() };
            pi.ipi6_addr.s6_addr = ip.octets();
            off = put_cmsg(buf, off, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, pi);
        }
        None => {}
    }
    off
}

/// Parses a peer address from the kernel's `msg_name` bytes.
pub(crate) fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < 2 {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes([name[0], name[1]]);
    match libc::c_int::from(family) {
        libc::AF_INET if name.len() >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: length checked; read_unaligned tolerates any alignment.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(name.as_ptr().cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if name.len() >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: length checked; read_unaligned tolerates any alignment.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read_unaligned(name.as_ptr().cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The control messages in `control`, as (level, type, data); stops at
/// the first malformed header.
fn cmsgs(control: &[u8]) -> impl Iterator<Item = (libc::c_int, libc::c_int, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + CMSG_HDR > control.len() {
            return None;
        }
        // SAFETY: at least a header's worth of bytes remain; unaligned read.
        let h: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control.as_ptr().add(off).cast()) };
        let len = h.cmsg_len as usize;
        if len < CMSG_HDR || off + len > control.len() {
            return None;
        }
        let data = &control[off + CMSG_HDR..off + len];
        off += cmsg_align(len);
        Some((h.cmsg_level, h.cmsg_type, data))
    })
}

/// What the receive cmsgs said: GRO segment size and the local address.
pub(crate) fn parse_recv_cmsgs(control: &[u8]) -> (Option<usize>, Option<IpAddr>) {
    let mut gro = None;
    let mut local = None;
    for (level, ty, data) in cmsgs(control) {
        match (level, ty) {
            (SOL_UDP, UDP_GRO) if data.len() >= 4 => {
                let v = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                if v > 0 {
                    gro = Some(v as usize);
                }
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
                if data.len() >= mem::size_of::<libc::in_pktinfo>() =>
            {
                // SAFETY: length checked; unaligned read of a plain C struct.
                let pi: libc::in_pktinfo =
                    unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                local = Some(IpAddr::V4(Ipv4Addr::from(pi.ipi_addr.s_addr.to_ne_bytes())));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                if data.len() >= mem::size_of::<libc::in6_pktinfo>() =>
            {
                // SAFETY: length checked; unaligned read of a plain C struct.
                let pi: libc::in6_pktinfo =
                    unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
                local = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    (gro, local)
}

/// The `sock_extended_err` of an error-queue message (`IP_RECVERR` or
/// `IPV6_RECVERR` cmsg), if it has one.
pub(crate) fn find_extended_err(control: &[u8]) -> Option<libc::sock_extended_err> {
    cmsgs(control).find_map(|(level, ty, data)| {
        let recverr = matches!(
            (level, ty),
            (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        );
        (recverr && data.len() >= mem::size_of::<libc::sock_extended_err>())
            // SAFETY: length checked; unaligned read of a plain C struct.
            .then(|| unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) })
    })
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cmsg_round_trip() {
        let mut buf = [0u64; SEND_CONTROL_WORDS];
        let n = write_send_cmsgs(&mut buf, 1200, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            n,
            cmsg_space(2) + cmsg_space(mem::size_of::<libc::in_pktinfo>())
        );
        let n6 = write_send_cmsgs(&mut buf, 1200, Some("::1".parse().unwrap()));
        assert!(n6 <= SEND_CONTROL_WORDS * 8);
        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut name: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let a: SocketAddr = "10.1.2.3:4433".parse().unwrap();
        let len = write_sockaddr(&mut name, a, false) as usize;
        // SAFETY: `len` ≤ size_of::<sockaddr_in6>() and `name` outlives `bytes`.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts((&raw const name).cast(), len) };
        assert_eq!(parse_sockaddr(bytes), Some(a));
        let len = write_sockaddr(&mut name, a, true) as usize;
        // SAFETY: `len` ≤ size_of::<sockaddr_in6>() and `name` outlives `bytes`.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts((&raw const name).cast(), len) };
        assert_eq!(
            parse_sockaddr(bytes),
            Some("[::ffff:10.1.2.3]:4433".parse().unwrap())
        );
    }
}
