//! `idle_conns`: resident memory per idle HTTP/3 connection of a running
//! proxy (spooky, or HAProxy as the peer). Opens `-n` connections
//! (handshake + SETTINGS, then one small request each so the HTTP/3 and
//! request paths have been used once), keeps them idle but alive from one
//! thread (every connection is polled: ACKs, timers, control streams), and
//! prints how much the target's resident memory grew per connection, read
//! from `/proc/<pid>/status` (`VmRSS`, and `RssAnon`: heap and anonymous
//! mappings only).
//!
//! First `--warmup` connections are opened, used and closed, so one-time
//! allocations (lazy statics, pools, allocator arenas) are in the baseline.
//! Then: baseline, open `-n`, settle `--settle` s, read; then close all,
//! settle, read again (does RSS return?). Any non-2xx answer or a
//! connection lost while held fails the run (exit 1).
//!
//! Run the target with an idle timeout longer than the run (spooky
//! `quic.idle_timeout_ms: 600000`, HAProxy `timeout client 600s`) and room
//! for `-n` connections (`limits.max_connections`, `maxconn`):
//! `idle_conns --pid $(pidof spooky) -n 1000 --addr 127.0.0.1:8443`

#[path = "../../../tests/common/h3client.rs"]
#[allow(clippy::unwrap_used)]
mod h3client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use h3client::{ClientOptions, H3Client};

#[derive(Parser)]
#[command(about = "RSS of a running HTTP/3 proxy per idle connection")]
struct Args {
    /// The target's process id.
    #[arg(long)]
    pid: u32,
    /// Connections to open and hold.
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
    /// Connections opened, used and closed before the baseline is read.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Seconds to keep polling every connection before reading RSS (lets
    /// the handshakes' transient buffers go and every ACK arrive).
    #[arg(long, default_value_t = 3)]
    settle: u64,
}

/// (`VmRSS`, `RssAnon`) of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} for pid {pid}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// Polls every connection once; errors name the connection.
fn poll_all(conns: &mut [H3Client]) -> Result<(), String> {
    for (i, c) in conns.iter_mut().enumerate() {
        c.poll()
            .map_err(|e| format!("connection {i} lost while idle: {e}"))?;
    }
    Ok(())
}

/// Keeps polling every connection for `secs` seconds, ~10 times a second.
fn hold(conns: &mut [H3Client], secs: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        poll_all(conns)?;
        if Instant::now() >= until {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn open(args: &Args, opts: &ClientOptions, i: usize) -> Result<H3Client, String> {
    let mut c = H3Client::connect_with(args.addr, &args.authority, opts.clone())
        .map_err(|e| format!("connection {i}: {e}"))?;
    if !args.path.is_empty() {
        let r = c
            .get(&args.path)
            .map_err(|e| format!("connection {i}: {e}"))?;
        if !(200..300).contains(&r.status) {
            return Err(format!(
                "connection {i}: GET {} answered {} (non-2xx)",
                args.path, r.status
            ));
        }
    }
    Ok(c)
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("idle_conns: FAILED: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let opts = ClientOptions {
        idle_timeout_ms: 600_000,
        // Small windows: the client's own memory is not measured, but 1,000
        // connections should not need gigabytes.
        initial_max_data: 1 << 20,
        initial_max_stream_data: 256 << 10,
        ..ClientOptions::default()
    };
    let mut warm = Vec::with_capacity(args.warmup);
    for i in 0..args.warmup {
        warm.push(open(args, &opts, i)?);
    }
    for c in warm {
        let _ = c.close();
    }
    std::thread::sleep(Duration::from_secs(args.settle));
    let (before, before_anon) = rss_kib(args.pid)?;
    eprintln!(
        "idle_conns: baseline VmRSS {before} KiB (RssAnon {before_anon} KiB); opening {}",
        args.connections
    );

    let started = Instant::now();
    let mut conns: Vec<H3Client> = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        conns.push(open(args, &opts, i)?);
        // The connections already open keep being answered while more open.
        if (i + 1) % 50 == 0 {
            poll_all(&mut conns)?;
        }
        if (i + 1) % 250 == 0 {
            let (rss, _) = rss_kib(args.pid)?;
            eprintln!(
                "idle_conns: {} open ({:.1}s), VmRSS {rss} KiB",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let took = started.elapsed();
    hold(&mut conns, args.settle)?;
    let (after, after_anon) = rss_kib(args.pid)?;
    let n = conns.len().max(1) as f64;

    for c in conns {
        let _ = c.close();
    }
    std::thread::sleep(Duration::from_secs(args.settle));
    let (closed, closed_anon) = rss_kib(args.pid)?;

    println!("connections: {}", n as u64);
    println!("rss_before_kib: {before}");
    println!("rss_idle_kib: {after}");
    println!("rss_after_close_kib: {closed}");
    println!("rss_anon_before_kib: {before_anon}");
    println!("rss_anon_idle_kib: {after_anon}");
    println!("rss_anon_after_close_kib: {closed_anon}");
    println!(
        "rss_per_connection_kib: {:.1}",
        after.saturating_sub(before) as f64 / n
    );
    println!(
        "rss_anon_per_connection_kib: {:.1}",
        after_anon.saturating_sub(before_anon) as f64 / n
    );
    println!("opened_in_s: {:.1}", took.as_secs_f64());
    Ok(())
}
