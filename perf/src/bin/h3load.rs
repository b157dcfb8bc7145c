//! `h3load`: an HTTP/3 load generator in the spirit of h2load (Debian's
//! h2load has no HTTP/3). N connections, each on its own thread, keep M
//! requests in flight for a fixed duration or request count, then print
//! h2load-style counts, throughput and round latencies.
//!
//! Example: `h3load -c 4 -m 16 -d 10 https://127.0.0.1:8443/`

#[path = "../../../tests/common/h3client.rs"]
#[allow(clippy::unwrap_used)]
mod h3client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use h3client::{Body, H3Client, Request};

#[derive(Parser)]
#[command(about = "HTTP/3 load generator (h2load-style report)")]
struct Args {
    /// Connections (one thread each).
    #[arg(short = 'c', long, default_value_t = 4)]
    clients: usize,
    /// Concurrent streams per connection.
    #[arg(short = 'm', long, default_value_t = 16)]
    streams: usize,
    /// Duration in seconds (ignored when -n is given).
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Total requests (split across connections).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Server address (ip:port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// Authority sent in `:authority`.
    #[arg(long, default_value = "localhost")]
    authority: String,
    /// Deadline in seconds for each round of requests on a connection
    /// (raise it for large downloads such as `/bytes/1073741824`).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Path to request.
    #[arg(default_value = "/")]
    path: String,
}

#[derive(Default)]
struct Tally {
    done: u64,
    ok: u64,
    failed: u64,
    errored: u64,
    bytes: u64,
    status: [u64; 6],
    rounds: Vec<Duration>,
}

fn main() {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let per_client = args.requests.map(|n| n.div_ceil(args.clients as u64));
    let started = Instant::now();
    let handles: Vec<_> = (0..args.clients)
        .map(|_| {
            let stop = stop.clone();
            let (addr, authority, path, m) = (
                args.addr,
                args.authority.clone(),
                args.path.clone(),
                args.streams,
            );
            let timeout = Duration::from_secs(args.timeout.max(1));
            std::thread::spawn(move || {
                run_client(addr, &authority, &path, m, per_client, timeout, &stop)
            })
        })
        .collect();
    if args.requests.is_none() {
        let total = Duration::from_secs(args.duration);
        while started.elapsed() < total {
            std::thread::sleep(Duration::from_millis(200));
            eprint!(
                "\rh3load: {:>4.1}s / {}s",
                started.elapsed().as_secs_f64(),
                args.duration
            );
        }
        eprintln!();
        stop.store(true, Ordering::Relaxed);
    }
    let mut all = Tally::default();
    for h in handles {
        match h.join() {
            Ok(t) => {
                all.done += t.done;
                all.ok += t.ok;
                all.failed += t.failed;
                all.errored += t.errored;
                all.bytes += t.bytes;
                for i in 0..6 {
                    all.status[i] += t.status[i];
                }
                all.rounds.extend(t.rounds);
            }
            Err(_) => all.errored += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    all.rounds.sort();
    let pct = |p: f64| -> f64 {
        if all.rounds.is_empty() {
            return 0.0;
        }
        let i = ((all.rounds.len() as f64 - 1.0) * p).round() as usize;
        all.rounds[i].as_secs_f64() * 1000.0
    };
    println!(
        "finished in {secs:.2}s, {:.2} req/s, {:.2} MiB/s",
        all.done as f64 / secs,
        all.bytes as f64 / secs / 1048576.0
    );
    println!(
        "requests: {} total, {} done, {} succeeded, {} failed, {} errored",
        all.done + all.errored,
        all.done,
        all.ok,
        all.failed,
        all.errored
    );
    println!(
        "status codes: {} 2xx, {} 3xx, {} 4xx, {} 5xx",
        all.status[2], all.status[3], all.status[4], all.status[5]
    );
    println!("body bytes: {}", all.bytes);
    println!(
        "round latency (all {} streams of a connection): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.streams,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    if all.errored > 0 || all.failed > 0 {
        std::process::exit(1);
    }
}

fn run_client(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    m: usize,
    limit: Option<u64>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Tally {
    let mut t = Tally::default();
    let mut c = match H3Client::connect(addr, authority) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("h3load: connect failed: {e}");
            t.errored += 1;
            return t;
        }
    };
    c.timeout = timeout;
    loop {
        if stop.load(Ordering::Relaxed) || limit.is_some_and(|l| t.done + t.errored >= l) {
            break;
        }
        let n = limit.map_or(m as u64, |l| (l - t.done - t.errored).min(m as u64)) as usize;
        let reqs = (0..n)
            .map(|_| Request {
                method: "GET".into(),
                path: path.into(),
                headers: vec![],
                body: Body::Empty,
            })
            .collect();
        let round = Instant::now();
        for r in c.send_many(reqs) {
            match r {
                Ok(resp) => {
                    t.done += 1;
                    t.bytes += resp.body.len() as u64;
                    let class = (resp.status / 100) as usize;
                    if class < 6 {
                        t.status[class] += 1;
                    }
                    if resp.status < 400 {
                        t.ok += 1;
                    } else {
                        t.failed += 1;
                    }
                }
                Err(e) => {
                    if t.errored == 0 {
                        eprintln!("h3load: request failed: {e}");
                    }
                    t.errored += 1;
                }
            }
        }
        t.rounds.push(round.elapsed());
    }
    let _ = c.close();
    t
}
