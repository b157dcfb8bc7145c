//! `quic_flood`: the handshake attacks of issue 10, measured.
//!
//! * `single`: one client Initial (a quiche client's first datagram, 1200
//!   bytes) from a raw UDP socket, never answered; every byte that comes
//!   back within `--watch` seconds is counted (RFC 9000 §8.1 allows 3×).
//! * `flood`: `--initials` fresh Initials spread over `--duration` seconds
//!   from `--sources` source ports, never completed; counts replies and
//!   Retry packets, and reads the target's RSS and CPU from /proc before,
//!   right after, and `--settle` seconds after.
//!
//! Example: `quic_flood --mode flood --pid $(pidof spooky) --initials 30000`

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rand::RngCore;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Single,
    Flood,
}

#[derive(Parser)]
#[command(about = "QUIC handshake flood / amplification probe")]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Single)]
    mode: Mode,
    /// Server address (ip:port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// Target process id, for RSS and CPU from /proc (optional).
    #[arg(long)]
    pid: Option<u32>,
    /// `single`: seconds to count replies.
    #[arg(long, default_value_t = 10)]
    watch: u64,
    /// `flood`: Initials to send.
    #[arg(long, default_value_t = 30_000)]
    initials: usize,
    /// `flood`: source ports (one socket each).
    #[arg(long, default_value_t = 1_000)]
    sources: usize,
    /// `flood`: seconds to spread the Initials over.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// `flood`: seconds to wait after the flood before the last reading.
    #[arg(long, default_value_t = 30)]
    settle: u64,
}

/// First byte of a long header: form bit set; type in bits 4–5.
const LONG_HEADER: u8 = 0x80;
const TYPE_MASK: u8 = 0x30;
const TYPE_RETRY: u8 = 0x30;

/// Replies received: bytes, datagrams, Retry packets.
#[derive(Default)]
struct Replies {
    bytes: usize,
    datagrams: usize,
    retries: usize,
}

impl Replies {
    /// Reads everything waiting on a non-blocking socket.
    fn drain(&mut self, sock: &UdpSocket, buf: &mut [u8]) {
        while let Ok(n) = sock.recv(buf) {
            self.bytes += n;
            self.datagrams += 1;
            if n > 0 && buf[0] & LONG_HEADER != 0 && buf[0] & TYPE_MASK == TYPE_RETRY {
                self.retries += 1;
            }
        }
    }
}

/// A fresh client's first datagram to `server` from `local`.
fn client_initial(local: SocketAddr, server: SocketAddr) -> Result<Vec<u8>, quiche::Error> {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    cfg.verify_peer(false);
    cfg.set_application_protos(&[b"h3"])?;
    let mut scid = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut scid);
    let scid = quiche::ConnectionId::from_ref(&scid);
    let mut conn = quiche::connect(Some("localhost"), &scid, local, server, &mut cfg)?;
    let mut out = vec![0u8; 1500];
    let (n, _) = conn.send(&mut out)?;
    out.truncate(n);
    Ok(out)
}

/// (RSS KiB, CPU seconds) of `pid` from /proc.
fn usage(pid: Option<u32>) -> Option<(u64, f64)> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some((rss, ticks / 100.0))
}

fn print_usage(label: &str, u: Option<(u64, f64)>) {
    match u {
        Some((rss, cpu)) => println!(
            "{label:<14} rss {:>8.1} MiB  cpu {cpu:>7.2} s",
            rss as f64 / 1024.0
        ),
        None => println!("{label:<14} (no --pid or /proc unreadable)"),
    }
}

fn single(a: &Args) -> std::io::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(a.addr)?;
    let initial = client_initial(sock.local_addr()?, a.addr).map_err(std::io::Error::other)?;
    let start = Instant::now();
    sock.send(&initial)?;
    let mut r = Replies::default();
    let mut buf = vec![0u8; 65536];
    let mut times = Vec::new();
    let end = start + Duration::from_secs(a.watch);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        if let Ok(n) = sock.recv(&mut buf) {
            r.bytes += n;
            r.datagrams += 1;
            times.push(format!("{:.2}", start.elapsed().as_secs_f64()));
        }
    }
    println!(
        "single Initial: sent {} bytes, received {} bytes in {} datagrams = {:.2}x; at [{}] s",
        initial.len(),
        r.bytes,
        r.datagrams,
        r.bytes as f64 / initial.len() as f64,
        times.join(", ")
    );
    Ok(())
}

fn flood(a: &Args) -> std::io::Result<()> {
    let socks = (0..a.sources.max(1))
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let before = usage(a.pid);
    print_usage("before", before);
    let start = Instant::now();
    let spread = Duration::from_secs(a.duration);
    let (mut sent, mut sent_bytes) = (0usize, 0usize);
    let mut r = Replies::default();
    let mut buf = vec![0u8; 65536];
    for i in 0..a.initials {
        let due = spread.mul_f64(i as f64 / a.initials.max(1) as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let s = &socks[i % socks.len()];
        let pkt = client_initial(s.local_addr()?, a.addr).map_err(std::io::Error::other)?;
        if s.send_to(&pkt, a.addr).is_ok() {
            sent += 1;
            sent_bytes += pkt.len();
        }
        if i % 64 == 0 {
            socks.iter().for_each(|s| r.drain(s, &mut buf));
        }
    }
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    socks.iter().for_each(|s| r.drain(s, &mut buf));
    let after = usage(a.pid);
    println!(
        "flood: {sent} Initials ({sent_bytes} bytes) in {:.1} s from {} ports",
        took.as_secs_f64(),
        socks.len()
    );
    print_usage("after flood", after);
    let settle_end = Instant::now() + Duration::from_secs(a.settle);
    while Instant::now() < settle_end {
        socks.iter().for_each(|s| r.drain(s, &mut buf));
        std::thread::sleep(Duration::from_millis(100));
    }
    print_usage(&format!("after +{}s", a.settle), usage(a.pid));
    println!(
        "replies: {} bytes in {} datagrams ({:.2}x of sent), {} Retry, {} other (handshake flights)",
        r.bytes,
        r.datagrams,
        r.bytes as f64 / sent_bytes.max(1) as f64,
        r.retries,
        r.datagrams - r.retries
    );
    if let (Some((_, c0)), Some((_, c1))) = (before, after) {
        println!("target CPU during the flood: {:.2} s", c1 - c0);
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    match a.mode {
        Mode::Single => single(&a),
        Mode::Flood => flood(&a),
    }
}
