//! Steering packets to the worker that owns their connection.
//!
//! Each worker has its own `SO_REUSEPORT` socket. By default the kernel
//! spreads datagrams by a hash of the 4-tuple, so a connection whose client
//! address changed (NAT rebinding, migration) lands on a random worker. A
//! classic BPF program attached to the reuseport group reads the worker id
//! from octet 3 of a short-header packet's destination connection ID
//! (spooky's QUIC-LB layout, see `spooky::edge::cid`) and picks that
//! worker's socket; long-header packets (handshakes, whose first DCID the
//! client chose) and anything else return an out-of-range index, which
//! makes the kernel fall back to its hash. Envoy steers QUIC the same way.

use std::io;
use std::os::fd::AsRawFd;

/// First octet of every spooky CID (QUIC-LB: rotation `000`, length 20).
const CID_FIRST_OCTET: u32 = 19;

/// The cBPF program for `workers` sockets. Offsets are relative to the UDP
/// payload (the kernel pulls the UDP header before running it).
fn program(workers: u32) -> [libc::sock_filter; 10] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LD_LEN: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_LEN) as u16;
    const LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    [
        op(LD_LEN, 0, 0, 0),            // 0: A = len
        op(JGE, 0, 7, 5),               // 1: len >= 5 ? next : fallback
        op(LDB_ABS, 0, 0, 0),           // 2: A = first octet
        op(JSET, 5, 0, 0x80),           // 3: long header ? fallback : next
        op(LDB_ABS, 0, 0, 1),           // 4: A = DCID[0]
        op(JEQ, 0, 3, CID_FIRST_OCTET), // 5: spooky CID ? next : fallback
        op(LDB_ABS, 0, 0, 4),           // 6: A = DCID[3] = worker id
        op(JGE, 1, 0, workers),         // 7: id >= workers ? fallback : next
        op(RET_A, 0, 0, 0),             // 8: socket index = worker id
        op(RET_K, 0, 0, u32::MAX),      // 9: out of range: kernel hash
    ]
}

/// Attaches the steering program to the reuseport group of `socket` (all
/// sockets bound to the same address, in bind order = worker order).
pub fn attach_cid_steering(socket: &impl AsRawFd, workers: usize) -> io::Result<()> {
    let workers =
        u32::try_from(workers).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut filter = program(workers);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program during setsockopt and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
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
    use crate::epoll::{bind_udp, SocketOptions};
    use std::time::Duration;

    fn short_header(worker: u8) -> Vec<u8> {
        let mut p = vec![0x40u8];
        let mut cid = [0u8; 20];
        cid[0] = 19;
        cid[1] = 0;
        cid[2] = 1;
        cid[3] = worker;
        p.extend_from_slice(&cid);
        p.extend_from_slice(&[0xaa; 40]);
        p
    }

    #[test]
    fn short_headers_reach_the_worker_named_in_the_cid() {
        let opts = SocketOptions {
            gro: false,
            gso: false,
            ..SocketOptions::default()
        };
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind_udp(addr, &opts).unwrap();
        attach_cid_steering(&a, 2).unwrap();
        for s in [&a, &b] {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..10 {
            client.send_to(&short_header(1), addr).unwrap();
            let (n, _) = b.recv_from(&mut buf).unwrap();
            assert_eq!(buf[4], 1, "worker 1's packet on socket 1 ({n} bytes)");
            client.send_to(&short_header(0), addr).unwrap();
            let (_, _) = a.recv_from(&mut buf).unwrap();
            assert_eq!(buf[4], 0);
        }
        // Out-of-range worker ids and long headers fall back to the hash:
        // they arrive on some socket, never get lost.
        client.send_to(&short_header(9), addr).unwrap();
        let mut long = vec![0xc0u8, 0, 0, 0, 1];
        long.extend_from_slice(&[0u8; 60]);
        client.send_to(&long, addr).unwrap();
        let mut got = 0;
        for s in [&a, &b] {
            while s.recv_from(&mut buf).is_ok() {
                got += 1;
            }
        }
        assert_eq!(got, 2);
    }
}
