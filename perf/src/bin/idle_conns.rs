//! `idle_conns`: RSS per idle connection. Opens N HTTP/3 connections to a
//! running spooky (handshake + SETTINGS, one small request each so the
//! HTTP/3 and request paths have been used once), leaves them idle, and
//! prints how much spooky's resident memory grew per connection, read from
//! `/proc/<pid>/status` (`VmRSS`).
//!
//! Run spooky with a `quic.idle_timeout_ms` longer than the run (e.g.
//! 600000) so no connection times out while the others are opened:
//! `idle_conns --pid $(pidof spooky) -n 1000 --addr 127.0.0.1:8443`

#[path = "../../../tests/common/h3client.rs"]
#[allow(clippy::unwrap_used)]
mod h3client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use h3client::{ClientOptions, H3Client};

#[derive(Parser)]
#[command(about = "RSS of a running spooky per idle HTTP/3 connection")]
struct Args {
    /// spooky's process id.
    #[arg(long)]
    pid: u32,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    connections: usize,
    /// Server address (ip:port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// Authority sent in `:authority`.
    #[arg(long, default_value = "localhost")]
    authority: String,
    /// Path of the one request each connection makes (empty: none).
    #[arg(long, default_value = "/")]
    path: String,
    /// Seconds to wait after the last connection before reading RSS (lets
    /// the handshakes' transient buffers go).
    #[arg(long, default_value_t = 2)]
    settle: u64,
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let opts = ClientOptions {
        idle_timeout_ms: 600_000,
        ..ClientOptions::default()
    };
    let before = rss_kib(args.pid)?;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut c = H3Client::connect_with(args.addr, &args.authority, opts.clone())
            .map_err(|e| format!("connection {i}: {e}"))?;
        if !args.path.is_empty() {
            let r = c
                .get(&args.path)
                .map_err(|e| format!("connection {i}: {e}"))?;
            if r.status != 200 {
                return Err(format!("connection {i}: status {}", r.status));
            }
        }
        conns.push(c);
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(args.settle));
    let after = rss_kib(args.pid)?;
    let n = conns.len().max(1) as u64;
    println!(
        "connections: {n}\nrss_before_kib: {before}\nrss_after_kib: {after}\nrss_per_connection_kib: {:.1}\nopened_in_s: {:.1}",
        after.saturating_sub(before) as f64 / n as f64,
        took.as_secs_f64()
    );
    drop(conns);
    Ok(())
}
