//! The epoll driver: tokio's reactor for readiness, `recvmmsg` for batched
//! receives and `sendmsg` with a `UDP_SEGMENT` cmsg for GSO sends (both via
//! `quinn-udp`, which also reads the `UDP_GRO` cmsg and falls back to plain
//! sends when the kernel or NIC rejects GSO with EIO).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::{Capabilities, DatagramIo, IoCounters, RecvMeta, Transmit};

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
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The epoll (tokio reactor) datagram driver.
pub struct EpollUdp {
    socket: UdpSocket,
    state: UdpSocketState,
    gso: bool,
    gro: bool,
    counters: IoCounters,
}

impl EpollUdp {
    /// Wraps a bound non-blocking socket. Must be called inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket, gso: bool, gro: bool) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // quinn-udp enables GRO, PKTINFO and ECN reporting on the socket here.
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Self {
            socket,
            state,
            gso,
            gro,
            counters: IoCounters::default(),
        })
    }

    /// Binds `addr` and wraps it.
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Self> {
        Self::new(bind_udp(addr, opts)?, opts.gso, opts.gro)
    }
}

impl DatagramIo for EpollUdp {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_gso_segments: if self.gso {
                self.state.max_gso_segments().min(crate::MAX_GSO_SEGMENTS)
            } else {
                1
            },
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

    async fn writable(&self) -> io::Result<()> {
        self.socket.writable().await
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
        let got = socket.try_io(Interest::READABLE, || {
            state.recv(UdpSockRef::from(socket), &mut slices, &mut qmeta)
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

    fn try_send(&mut self, t: &Transmit<'_>) -> io::Result<()> {
        let max_seg = self.capabilities().max_gso_segments;
        let segment_size = match t.segment_size {
            Some(s) if max_seg > 1 && s < t.contents.len() => Some(s),
            _ => None,
        };
        if segment_size.is_none() && t.segment_size.is_some_and(|s| s < t.contents.len()) {
            // GSO off or unavailable: one syscall per datagram.
            let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
            for chunk in t.contents.chunks(seg) {
                self.send_one(&Transmit {
                    destination: t.destination,
                    src_ip: t.src_ip,
                    contents: chunk,
                    segment_size: None,
                })?;
            }
            return Ok(());
        }
        self.send_one(&Transmit { segment_size, ..*t })
    }
}

impl EpollUdp {
    fn send_one(&mut self, t: &Transmit<'_>) -> io::Result<()> {
        let before = self.state.max_gso_segments();
        let qt = quinn_udp::Transmit {
            destination: t.destination,
            ecn: None,
            contents: t.contents,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        let state = &self.state;
        let socket = &self.socket;
        let res = socket.try_io(Interest::WRITABLE, || {
            state.try_send(UdpSockRef::from(socket), &qt)
        });
        self.counters.send_syscalls += 1;
        if self.state.max_gso_segments() < before {
            self.counters.gso_fallbacks += 1;
        }
        match res {
            Ok(()) => {
                let segs = t
                    .segment_size
                    .map(|s| t.contents.len().div_ceil(s.max(1)))
                    .unwrap_or(1);
                self.counters.send_datagrams += segs as u64;
                self.counters.send_bytes += t.contents.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                // UDP is unreliable anyway; QUIC retransmits. Count and move on
                // rather than failing every connection on this socket.
                self.counters.send_errors += 1;
                if self.counters.send_errors.is_power_of_two() {
                    eprintln!(
                        "spooky-uring: sendmsg to {} failed: {e} ({} send errors so far)",
                        t.destination, self.counters.send_errors
                    );
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::MAX_RECV_BUF;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn gso_train_arrives_as_separate_datagrams() {
        rt().block_on(async {
            let mut tx =
                EpollUdp::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
            let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let payload: Vec<u8> = (0..(1200 * 3 + 500)).map(|i| (i % 251) as u8).collect();
            tx.writable().await.unwrap();
            tx.try_send(&Transmit {
                destination: rx.local_addr().unwrap(),
                src_ip: None,
                contents: &payload,
                segment_size: Some(1200),
            })
            .unwrap();
            let mut sizes = Vec::new();
            let mut got = Vec::new();
            let mut buf = [0u8; 2000];
            for _ in 0..4 {
                let (n, _) = rx.recv_from(&mut buf).unwrap();
                sizes.push(n);
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(sizes, vec![1200, 1200, 1200, 500]);
            assert_eq!(got, payload);
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
