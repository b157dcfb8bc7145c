//! Allocations per request, counted exactly (issue 9): a counting global
//! allocator over `System` that counts only on spooky's worker thread.
//!
//! Everything runs in this one process: three demo h2c backends (one thread,
//! `spooky::demo_backend`), one spooky worker (`spooky::runtime::run_worker`
//! on its own thread, named `spooky-w0`, io_uring or epoll driver, as
//! `spooky` runs it), and the blocking quiche client of the end-to-end tests
//! (`tests/common/h3client.rs`) on client threads. Only the worker thread
//! sets the thread-local flag the allocator checks, so the client's and the
//! backends' allocations are not in the figures. BoringSSL calls libc
//! `malloc` directly and is not counted either (per request it allocates
//! nothing; handshakes are outside the measured window anyway).
//!
//! Per cell: `C` connections are opened and warmed (`--warmup` requests
//! each round-robin), the counters are read, `N` GETs of `/` are sent as
//! rounds of `M` concurrent streams per connection, the counters are read
//! again. Every answer must be a 200, else the bench exits 1.
//!
//! ```sh
//! cargo bench --bench allocs                      # uring and epoll, N 1000/10000 x M 1/16
//! cargo bench --bench allocs -- --drivers epoll --requests 1000 --streams 16
//! ```

#[path = "../tests/common/h3client.rs"]
#[allow(clippy::unwrap_used)]
mod h3client;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use h3client::{Body, H3Client, Request};
use spooky::control::reload::ConfigStore;
use spooky::runtime::{Handoff, WorkerContext};
use spooky::telemetry::backends::BackendBoard;
use spooky::telemetry::MetricsRegistry;

// ------------------------------------------------------------ the allocator

thread_local! {
    /// Set on the spooky worker thread only.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// atomics and the flag a const-initialised thread-local without a
// destructor, so nothing here allocates or can re-enter the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(
                new_size.saturating_sub(layout.size()) as u64,
                Ordering::Relaxed,
            );
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy, Debug)]
struct Counts {
    allocs: u64,
    reallocs: u64,
    frees: u64,
    bytes: u64,
}

fn counts() -> Counts {
    Counts {
        allocs: ALLOCS.load(Ordering::Relaxed),
        reallocs: REALLOCS.load(Ordering::Relaxed),
        frees: FREES.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

// ------------------------------------------------------------- the setup

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("allocs: FAILED: {msg}");
    std::process::exit(1);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(format!("free port: {e}")))
}

/// Three demo h2c backends on one thread (not counted).
fn start_backends() -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| die(format!("backend bind: {e}")));
            l.set_nonblocking(true)
                .unwrap_or_else(|e| die(format!("backend nonblocking: {e}")));
            l
        })
        .collect();
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().unwrap_or_else(|e| die(e)))
        .collect();
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| die(format!("backend runtime: {e}")));
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (i, l) in listeners.into_iter().enumerate() {
                    let l = tokio::net::TcpListener::from_std(l).unwrap_or_else(|e| die(e));
                    tasks.push(tokio::spawn(spooky::demo_backend::serve_with_options(
                        l,
                        format!("backend-{}", i + 1),
                        spooky::demo_backend::DemoOptions::default(),
                        std::future::pending(),
                    )));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
        .unwrap_or_else(|e| die(format!("backend thread: {e}")));
    addrs
}

fn write_config(
    dir: &std::path::Path,
    driver: &str,
    backends: &[SocketAddr],
) -> std::path::PathBuf {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap_or_else(|e| die(format!("rcgen: {e}")));
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap_or_else(|e| die(e));
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap_or_else(|e| die(e));
    let port = free_port();
    let admin = free_port();
    let backends: String = backends
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\", weight: 1 }}\n"))
        .collect();
    // The settings of `make perf-io` (perf/io_compare.py CONFIG), one worker.
    let yaml = format!(
        r#"listen:
  address: "127.0.0.1:{port}"
  tls: {{ cert: "{cert}", key: "{key}" }}
  alpn: ["h3"]
quic: {{ idle_timeout_ms: 30000, retry: false }}
io: {{ backend: {driver}, workers: 1, batch: 64, gso: true, gro: true }}
upstreams:
  - name: app
    policy: round_robin
    backends:
{backends}    pool: {{ connections_per_backend: 32, max_connections_per_backend: 32, max_concurrent_streams: 100 }}
    timeouts: {{ connect_ms: 1000, request_ms: 30000, idle_ms: 60000 }}
routes:
  - {{ path_prefix: "/", upstream: app }}
admin: {{ address: "127.0.0.1:{admin}" }}
watch: false
telemetry: {{ log: warn, log_format: text, access_log: false }}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.join(format!("spooky-{driver}.yaml"));
    std::fs::write(&path, yaml).unwrap_or_else(|e| die(e));
    path
}

struct Worker {
    addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

/// One spooky worker, set up as `spooky`'s `main` does (no admin server).
fn start_worker(config: &std::path::Path, driver: &str) -> Worker {
    let cfg = spooky::config::load(config).unwrap_or_else(|e| die(format!("config: {e}")));
    let registry = MetricsRegistry::new();
    let store = ConfigStore::new(config, cfg.clone(), registry.reload_stats());
    let opts = spooky_uring::epoll::SocketOptions {
        gso: cfg.io.gso,
        gro: cfg.io.gro,
        ..spooky_uring::epoll::SocketOptions::default()
    };
    let sock = spooky_uring::epoll::bind_udp(cfg.listen.address, &opts)
        .unwrap_or_else(|e| die(format!("bind: {e}")));
    let addr = sock.local_addr().unwrap_or_else(|e| die(e));
    let handoff = Handoff::mesh(1).pop().unwrap_or_else(|| die("no handoff"));
    let ctx = WorkerContext {
        id: 0,
        handoff,
        config: store,
        metrics: registry.add_worker(),
        board: Arc::new(BackendBoard::default()),
        // `telemetry.access_log: false` above: no access lines to write.
        access: None,
    };
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let (gso, gro) = (cfg.io.gso, cfg.io.gro);
    let uring = driver == "uring";
    let thread = std::thread::Builder::new()
        .name("spooky-w0".into())
        .spawn(move || {
            COUNTED.with(|c| c.set(true));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| die(format!("worker runtime: {e}")));
            let local = tokio::task::LocalSet::new();
            let r = local.block_on(&rt, async move {
                if uring {
                    let io = spooky_uring::uring::UringUdp::new(sock, gso, gro)
                        .unwrap_or_else(|e| die(format!("io_uring unavailable: {e}")));
                    spooky::runtime::run_worker(ctx, io, rx).await
                } else {
                    let io = spooky_uring::epoll::EpollUdp::new(sock, gso, gro)
                        .unwrap_or_else(|e| die(format!("epoll: {e}")));
                    spooky::runtime::run_worker(ctx, io, rx).await
                }
            });
            if let Err(e) = r {
                die(format!("worker: {e}"));
            }
        })
        .unwrap_or_else(|e| die(format!("worker thread: {e}")));
    Worker {
        addr,
        shutdown,
        thread,
    }
}

// ------------------------------------------------------------- the load

/// `n` GETs of `/` on `c`, `m` at a time; every answer must be a 200.
fn load(c: &mut H3Client, n: usize, m: usize) -> Result<(), String> {
    let mut left = n;
    while left > 0 {
        let k = left.min(m);
        let reqs = (0..k)
            .map(|_| Request {
                method: "GET".into(),
                path: "/".into(),
                headers: vec![],
                body: Body::Empty,
            })
            .collect();
        for r in c.send_many(reqs) {
            match r {
                Ok(resp) if resp.status == 200 => {}
                Ok(resp) => return Err(format!("non-2xx answer: {}", resp.status)),
                Err(e) => return Err(format!("request failed: {e}")),
            }
        }
        left -= k;
    }
    Ok(())
}

struct Row {
    driver: String,
    conns: usize,
    streams: usize,
    requests: usize,
    delta: Counts,
    secs: f64,
}

fn run_cell(addr: SocketAddr, driver: &str, c: usize, m: usize, n: usize, warmup: usize) -> Row {
    let mut clients: Vec<H3Client> = (0..c)
        .map(|i| {
            H3Client::connect(addr, "localhost")
                .unwrap_or_else(|e| die(format!("connection {i}: {e}")))
        })
        .collect();
    // Warm-up: pool connections, h2 windows, slabs and maps reach their
    // steady size before anything is counted.
    std::thread::scope(|s| {
        for cl in clients.iter_mut() {
            s.spawn(move || load(cl, warmup, m).unwrap_or_else(|e| die(format!("warm-up: {e}"))));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let per = n.div_ceil(c);
    let before = counts();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for cl in clients.iter_mut() {
            s.spawn(move || load(cl, per, m).unwrap_or_else(|e| die(e)));
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    // The last responses' ACKs and stream collection happen just after.
    std::thread::sleep(Duration::from_millis(200));
    let after = counts();
    for cl in clients {
        let _ = cl.close();
    }
    Row {
        driver: driver.into(),
        conns: c,
        streams: m,
        requests: per * c,
        delta: Counts {
            allocs: after.allocs - before.allocs,
            reallocs: after.reallocs - before.reallocs,
            frees: after.frees - before.frees,
            bytes: after.bytes - before.bytes,
        },
        secs,
    }
}

fn list_arg(args: &[String], name: &str, default: &str) -> Vec<String> {
    let v = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, String::as_str);
    v.split(',').map(|s| s.trim().to_string()).collect()
}

fn num_list(args: &[String], name: &str, default: &str) -> Vec<usize> {
    list_arg(args, name, default)
        .iter()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| die(format!("{name}: not a number: {s}")))
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let drivers = list_arg(&args, "--drivers", "uring,epoll");
    let requests = num_list(&args, "--requests", "1000,10000");
    let streams = num_list(&args, "--streams", "1,16");
    let conns = num_list(&args, "--connections", "4")[0];
    let warmup = num_list(&args, "--warmup", "200")[0];

    let dir = tempfile::tempdir().unwrap_or_else(|e| die(e));
    let backends = start_backends();
    let mut cells = Vec::new();
    for driver in &drivers {
        let cfg = write_config(dir.path(), driver, &backends);
        let w = start_worker(&cfg, driver);
        // Wait for the worker to answer (and its pools to warm).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = H3Client::connect(w.addr, "localhost")
                .and_then(|mut c| c.get("/"))
                .map(|r| r.status);
            match status {
                Ok(200) => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => die(format!("spooky ({driver}) not answering: {other:?}")),
            }
        }
        for &m in &streams {
            for &n in &requests {
                eprintln!("allocs: {driver}: {conns} connections x {m} streams, {n} requests");
                let cell = run_cell(w.addr, driver, conns, m, n, warmup);
                let r = cell.requests as f64;
                eprintln!(
                    "allocs: {driver}: {:.1} allocations, {:.1} frees, {:.0} bytes per request ({:.0} req/s)",
                    (cell.delta.allocs + cell.delta.reallocs) as f64 / r,
                    cell.delta.frees as f64 / r,
                    cell.delta.bytes as f64 / r,
                    r / cell.secs
                );
                cells.push(cell);
            }
        }
        let _ = w.shutdown.send(true);
        let _ = w.thread.join();
    }

    println!("| driver | connections x streams | requests | allocs/req (alloc+realloc) | of which realloc | frees/req | bytes allocated/req |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for c in &cells {
        let r = c.requests as f64;
        println!(
            "| {} | {} x {} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            c.driver,
            c.conns,
            c.streams,
            c.requests,
            (c.delta.allocs + c.delta.reallocs) as f64 / r,
            c.delta.reallocs as f64 / r,
            c.delta.frees as f64 / r,
            c.delta.bytes as f64 / r,
        );
    }
}
