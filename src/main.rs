//! The `spooky` command: run the load balancer, check a config, or run the
//! bundled demo backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use spooky::config::{self, Config};
use spooky::config::{IoBackend, OnWorkerFailure, UpstreamIo};
use spooky::control::admin::{self, AdminState};
use spooky::control::reload::{self as reload, ConfigStore};
use spooky::runtime::WorkerContext;
use spooky::telemetry::access::AccessLog;
use spooky::telemetry::backends::BackendBoard;
use spooky::telemetry::{self, MetricsRegistry};
use spooky_uring::epoll::{EpollUdp, SocketOptions};
use spooky_uring::uring::UringUdp;

#[derive(Parser)]
#[command(
    name = "spooky",
    version,
    about = "HTTP/3 load balancer: QUIC in front, HTTP/2 backends behind"
)]
struct Cli {
    /// Config file to run with.
    #[arg(long, short, global = true, default_value = "config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the effective config, or the errors.
    Check,
    /// Run the bundled h2c demo backend.
    DemoBackend {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        name: String,
        /// Delay every response by this many milliseconds (a slow backend).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// SETTINGS_MAX_CONCURRENT_STREAMS to announce (a backend with a low
        /// stream limit).
        #[arg(long, default_value_t = spooky::demo_backend::MAX_CONCURRENT_STREAMS)]
        max_concurrent_streams: u32,
    },
}

/// jemalloc, chosen by measurement: see `tikv-jemallocator` in Cargo.toml.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::DemoBackend {
            listen,
            name,
            delay_ms,
            max_concurrent_streams,
        }) => demo_backend(
            listen,
            name,
            spooky::demo_backend::DemoOptions {
                delay: std::time::Duration::from_millis(delay_ms),
                max_concurrent_streams,
            },
        ),
        None => run(&cli.config),
    }
}

fn load_or_report(path: &std::path::Path) -> Option<Config> {
    match config::load(path) {
        Ok(c) => Some(c),
        Err(errs) => {
            eprintln!("{errs}");
            eprintln!("spooky: {} error(s) in {}", errs.0.len(), path.display());
            None
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::from(2);
    };
    print!("{}", cfg.to_yaml());
    for line in cfg.warnings() {
        println!("# warning: {line}");
        eprintln!("spooky: warning: {line}");
    }
    let inactive = cfg.not_yet_active();
    if !inactive.is_empty() {
        println!("# parsed and validated, not yet active:");
        for line in inactive {
            println!("#   {line}");
        }
    }
    eprintln!("spooky: {} is valid", path.display());
    ExitCode::SUCCESS
}

fn demo_backend(
    listen: std::net::SocketAddr,
    name: String,
    opts: spooky::demo_backend::DemoOptions,
) -> ExitCode {
    init_plain_logging();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spooky demo-backend: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(spooky::demo_backend::run_with_options(listen, name, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spooky demo-backend: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_plain_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(cfg) = load_or_report(path) else {
        return ExitCode::from(2);
    };
    telemetry::init_logging(&cfg.telemetry);
    for line in cfg.not_yet_active() {
        tracing::warn!(setting = %line, "parsed but not yet active");
    }
    for line in cfg.warnings() {
        tracing::warn!(setting = %line, "config warning");
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "spooky starting");

    // SIGHUP means reload and SIGUSR1 reopen the access log; until their
    // handlers are installed (on the admin thread) neither may take the
    // default action, which is to terminate.
    // SAFETY: `signal` with SIG_IGN installs no Rust code as a handler, and
    // no other thread is installing handlers yet.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    // Kept until `run` returns: dropping the guard flushes queued lines.
    let Some((access_log, _access_guard)) = start_access_log(&cfg) else {
        return ExitCode::FAILURE;
    };
    let registry = MetricsRegistry::new();
    registry.attach_access_log(access_log.stats());
    let board = Arc::new(BackendBoard::default());
    let store = ConfigStore::new(path, cfg.clone(), registry.reload_stats());
    let admin_state = AdminState::with_control(registry.clone(), board.clone(), store.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    // The admin server outlives the workers' drain, so `/ready` answers 503
    // (and `/metrics` stays scrapable) until the last worker is joined.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);

    // Admin server on its own thread: the data plane never waits on it.
    let admin_thread = match start_admin_thread(
        cfg.admin.address,
        admin_state.clone(),
        store.clone(),
        access_log.clone(),
        shutdown_rx.clone(),
        admin_stop_rx,
    ) {
        Some(t) => t,
        None => return ExitCode::FAILURE,
    };

    let opts = SocketOptions {
        gso: cfg.io.gso,
        gro: cfg.io.gro,
        ..SocketOptions::default()
    };
    let workers = worker_count(&cfg);
    let use_uring = choose_uring(&cfg);
    if !use_uring && cfg.io.upstream_io == UpstreamIo::Ring && cfg.io.backend != IoBackend::Epoll {
        tracing::warn!(
            "io.upstream_io: `ring` needs the io_uring driver, which is not running; \
             upstream TCP uses tokio"
        );
    }
    // Bind every worker's SO_REUSEPORT socket up front, so a bind error
    // stops startup with one clear line (and port 0 resolves once).
    let Some(sockets) = bind_sockets(cfg.listen.address, workers, &opts) else {
        return ExitCode::FAILURE;
    };
    tracing::info!(
        workers,
        driver = if use_uring { "uring" } else { "epoll" },
        "starting workers"
    );

    // Each worker thread reports here the moment it ends, however it ends.
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel::<WorkerExit>();
    let ctxs = (0..workers)
        .zip(spooky::runtime::Handoff::mesh(workers))
        .map(|(id, handoff)| WorkerContext {
            id,
            handoff,
            config: store.clone(),
            metrics: registry.add_worker(),
            board: board.clone(),
            access: Some(access_log.sink()),
        });
    let launch = WorkerLaunch {
        use_uring,
        gso: cfg.io.gso,
        gro: cfg.io.gro,
        zerocopy: cfg.io.zerocopy_send,
        shutdown: shutdown_rx.clone(),
        exits: exit_tx.clone(),
    };
    let Some(threads) = spawn_workers(sockets.into_iter().zip(ctxs), &launch) else {
        let _ = shutdown_tx.send(true);
        return ExitCode::FAILURE;
    };
    drop(launch);
    let running = Running {
        admin_state,
        shutdown_tx,
        admin_stop_tx,
        admin_thread,
        threads,
        policy: cfg.io.on_worker_failure,
        workers,
    };
    drop(exit_tx);
    running.until_stopped(&mut exit_rx)
}

/// A started spooky: what [`run`] waits on and takes down.
struct Running {
    admin_state: Arc<AdminState>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    admin_stop_tx: tokio::sync::watch::Sender<bool>,
    admin_thread: std::io::Result<std::thread::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    policy: spooky::config::OnWorkerFailure,
    workers: usize,
}

impl Running {
    /// Marks the process ready, waits for SIGTERM/SIGINT or a worker
    /// failure (per `io.on_worker_failure`), then drains the workers and
    /// stops the admin API last, so `/ready` answers 503 meanwhile.
    fn until_stopped(
        self,
        exit_rx: &mut tokio::sync::mpsc::UnboundedReceiver<WorkerExit>,
    ) -> ExitCode {
        let Running {
            admin_state,
            shutdown_tx,
            admin_stop_tx,
            admin_thread,
            threads,
            policy,
            workers,
        } = self;
        admin_state
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);

        // The main thread waits for SIGTERM/SIGINT, or for a worker to fail.
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "runtime");
                let _ = shutdown_tx.send(true);
                return ExitCode::FAILURE;
            }
        };
        let mut failed = rt.block_on(supervise(exit_rx, workers, policy, &admin_state));
        // Draining: no longer ready for new traffic.
        admin_state
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = shutdown_tx.send(true);
        for t in threads {
            // Every outcome, panics included, came through `exit_rx`.
            let _ = t.join();
        }
        let _ = admin_stop_tx.send(true);
        // Workers that failed while draining count too.
        while let Ok(exit) = exit_rx.try_recv() {
            if exit.outcome.is_err() {
                failed += 1;
            }
        }
        let ok = failed == 0;
        if let Ok(t) = admin_thread {
            let _ = t.join();
        }
        if ok {
            tracing::info!("spooky stopped");
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// Starts the admin API on its own thread (with the reload triggers other
/// than `POST /reload`); `None` when its address cannot be bound.
fn start_admin_thread(
    admin_addr: std::net::SocketAddr,
    state: Arc<AdminState>,
    store: Arc<ConfigStore>,
    access_log: AccessLog,
    rx: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<std::io::Result<std::thread::JoinHandle<()>>> {
    let admin_listener = match std::net::TcpListener::bind(admin_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %admin_addr, error = %e, "cannot bind admin address");
            return None;
        }
    };
    let _ = admin_listener.set_nonblocking(true);
    let thread = std::thread::Builder::new()
        .name("spooky-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(admin_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener");
                        return;
                    }
                };
                tracing::info!(address = %admin_addr, "admin listening");
                // Reload triggers other than `POST /reload` live here too,
                // off the data plane.
                tokio::spawn(reload::watch_file(store.clone(), rx.clone()));
                tokio::spawn(reload_on_sighup(store));
                tokio::spawn(reopen_on_sigusr1(access_log));
                admin::serve(listener, state, async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await;
            });
        });
    Some(thread)
}

/// One SO_REUSEPORT UDP socket per worker, all on the address the first
/// one got; `None` (logged) when one cannot be bound.
fn bind_sockets(
    mut addr: std::net::SocketAddr,
    workers: usize,
    opts: &SocketOptions,
) -> Option<Vec<std::net::UdpSocket>> {
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        match spooky_uring::epoll::bind_udp(addr, opts) {
            Ok(sock) => {
                if let Ok(local) = sock.local_addr() {
                    addr = local;
                }
                sockets.push(sock);
            }
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot bind UDP listener");
                return None;
            }
        }
    }
    if workers > 1 {
        match spooky_uring::steering::attach_cid_steering(&sockets[0], workers) {
            Ok(()) => tracing::info!(workers, "reuseport steering by connection ID attached"),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot attach the reuseport steering program; the kernel's 4-tuple hash \
                 spreads packets and migrated connections are handed over between workers"
            ),
        }
    }
    Some(sockets)
}

/// What every worker thread is started with.
struct WorkerLaunch {
    use_uring: bool,
    gso: bool,
    gro: bool,
    zerocopy: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
    exits: tokio::sync::mpsc::UnboundedSender<WorkerExit>,
}

/// Starts one thread per (socket, worker context); `None` (logged) when a
/// thread cannot be started.
fn spawn_workers(
    workers: impl Iterator<Item = (std::net::UdpSocket, WorkerContext)>,
    launch: &WorkerLaunch,
) -> Option<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (sock, ctx) in workers {
        let id = ctx.id;
        let shutdown = launch.shutdown.clone();
        let exits = launch.exits.clone();
        let WorkerLaunch {
            use_uring,
            gso,
            gro,
            zerocopy,
            ..
        } = *launch;
        let spawned = std::thread::Builder::new()
            .name(format!("spooky-w{id}"))
            .spawn(move || {
                let outcome = guarded(id, || {
                    run_worker_thread(ctx, sock, use_uring, gso, gro, zerocopy, shutdown)
                });
                let _ = exits.send(WorkerExit { id, outcome });
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start worker thread");
                return None;
            }
        }
    }
    Some(threads)
}

/// How one worker thread ended: `Err` carries the error or panic message.
struct WorkerExit {
    id: usize,
    outcome: Result<(), String>,
}

/// Runs a worker's body, turning a panic into an error, and logs a failure
/// the moment it happens (the main thread may be busy draining others).
fn guarded(
    id: usize,
    body: impl FnOnce() -> Result<(), spooky::runtime::RuntimeError>,
) -> Result<(), String> {
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            Err(format!("panic: {msg}"))
        }
    };
    if let Err(reason) = &outcome {
        tracing::error!(worker = id, %reason, "worker failed");
    }
    outcome
}

/// Waits for SIGTERM/SIGINT or for workers to end, and returns how many
/// failed. Any worker that ends before a signal has failed (a worker only
/// returns `Ok` after a shutdown): `/ready` turns 503 at once and stays so;
/// with `io.on_worker_failure: exit` the first failure ends the wait (the
/// caller drains the rest and exits non-zero), with `continue` the wait
/// goes on while any worker is left.
async fn supervise(
    exits: &mut tokio::sync::mpsc::UnboundedReceiver<WorkerExit>,
    workers: usize,
    policy: OnWorkerFailure,
    admin: &AdminState,
) -> usize {
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut alive = workers;
    let mut failed = 0;
    loop {
        tokio::select! {
            _ = &mut signal => return failed,
            exit = exits.recv() => {
                let Some(exit) = exit else { return failed };
                alive = alive.saturating_sub(1);
                failed += 1;
                admin.ready.store(false, std::sync::atomic::Ordering::Relaxed);
                admin.failed_workers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if exit.outcome.is_ok() {
                    tracing::error!(worker = exit.id, "worker stopped without a shutdown");
                }
                match policy {
                    OnWorkerFailure::Exit => {
                        tracing::error!(
                            worker = exit.id,
                            "io.on_worker_failure: exit; draining the other workers, then exiting 1"
                        );
                        return failed;
                    }
                    OnWorkerFailure::Continue if alive == 0 => {
                        tracing::error!("no worker left; exiting 1");
                        return failed;
                    }
                    OnWorkerFailure::Continue => tracing::warn!(
                        worker = exit.id,
                        alive,
                        "io.on_worker_failure: continue; serving on the remaining workers, \
                         /ready answers 503 until a restart"
                    ),
                }
            }
        }
    }
}

/// `io.workers`: `auto` = one per core.
fn worker_count(cfg: &Config) -> usize {
    let n = match cfg.io.workers {
        config::Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        config::Workers::Count(n) => n,
    };
    // The worker id is one octet of the connection ID.
    n.clamp(1, 256)
}

/// Whether to run the io_uring driver: `auto` and `uring` use it where the
/// kernel allows; otherwise one line says what was missing.
fn choose_uring(cfg: &Config) -> bool {
    if cfg.io.backend == IoBackend::Epoll {
        return false;
    }
    match spooky_uring::uring::probe() {
        Ok(_) => true,
        Err(reason) => {
            tracing::warn!(
                requested = ?cfg.io.backend,
                %reason,
                "io_uring unavailable; using the epoll driver"
            );
            false
        }
    }
}

/// One worker thread: its own current-thread runtime, socket and driver.
fn run_worker_thread(
    ctx: WorkerContext,
    sock: std::net::UdpSocket,
    use_uring: bool,
    gso: bool,
    gro: bool,
    zerocopy: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), spooky::runtime::RuntimeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // Both drivers run the very same worker code, monomorphised.
        if use_uring {
            match UringUdp::new(sock.try_clone()?, gso, gro) {
                Ok(mut io) => {
                    if zerocopy {
                        match io.enable_zerocopy() {
                            Ok(()) => tracing::info!("io.zerocopy_send: sends use SENDMSG_ZC"),
                            Err(why) => tracing::warn!(
                                reason = %why,
                                "io.zerocopy_send unavailable; sends copy as usual"
                            ),
                        }
                    }
                    return spooky::runtime::run_worker(ctx, io, shutdown).await;
                }
                Err(e) => tracing::warn!(error = %e, "io_uring setup failed; using epoll"),
            }
        }
        let io = EpollUdp::new(sock, gso, gro)?;
        spooky::runtime::run_worker(ctx, io, shutdown).await
    })
}

/// Starts the access-log writer (`telemetry.access_log_path`, else stderr);
/// `None` after logging why the file cannot be opened.
fn start_access_log(
    cfg: &Config,
) -> Option<(AccessLog, tracing_appender::non_blocking::WorkerGuard)> {
    let path = cfg.telemetry.access_log_path.as_deref();
    match AccessLog::start(path) {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::error!(
                path = %path.map_or_else(|| "stderr".into(), |p| p.display().to_string()),
                error = %e,
                "cannot open the access log (telemetry.access_log_path)"
            );
            None
        }
    }
}

/// Reopens the access log file by its path on every SIGUSR1 (logrotate:
/// move the file, then signal; new lines go to a new file at the path).
async fn reopen_on_sigusr1(log: AccessLog) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGUSR1 handler; the access log is not reopened");
            return;
        }
    };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: reopening the access log");
        log.reopen();
    }
}

/// Reloads the config on every SIGHUP.
async fn reload_on_sighup(store: Arc<ConfigStore>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGHUP handler; reload with POST /reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading config");
        let store = store.clone();
        // The outcome is logged and counted by `reload` itself.
        let _ = tokio::task::spawn_blocking(move || store.reload("sighup")).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(_) => {
            term.recv().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
