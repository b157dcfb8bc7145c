//! The `spooky` command: run the load balancer, check a config, or run the
//! bundled demo backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use spooky::config::IoBackend;
use spooky::config::{self, Config};
use spooky::control::admin::{self, AdminState};
use spooky::control::reload::{self as reload, ConfigStore};
use spooky::runtime::WorkerContext;
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::DemoBackend {
            listen,
            name,
            delay_ms,
        }) => demo_backend(listen, name, std::time::Duration::from_millis(delay_ms)),
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
    delay: std::time::Duration,
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
    match rt.block_on(spooky::demo_backend::run_with_delay(listen, name, delay)) {
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
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "spooky starting");

    // SIGHUP means reload; until its handler is installed (on the admin
    // thread) it must not take the default action, which is to terminate.
    // SAFETY: `signal` with SIG_IGN installs no Rust code as a handler, and
    // no other thread is installing handlers yet.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let registry = MetricsRegistry::new();
    let board = Arc::new(BackendBoard::default());
    let store = ConfigStore::new(path, cfg.clone(), registry.reload_stats());
    let admin_state = AdminState::with_control(registry.clone(), board.clone(), store.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    // Admin server on its own thread: the data plane never waits on it.
    let admin_addr = cfg.admin.address;
    let admin_listener = match std::net::TcpListener::bind(admin_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %admin_addr, error = %e, "cannot bind admin address");
            return ExitCode::FAILURE;
        }
    };
    let _ = admin_listener.set_nonblocking(true);
    let admin_thread = {
        let state = admin_state.clone();
        let store = store.clone();
        let mut rx = shutdown_rx.clone();
        std::thread::Builder::new()
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
                    admin::serve(listener, state, async move {
                        let _ = rx.wait_for(|v| *v).await;
                    })
                    .await;
                });
            })
    };

    let opts = SocketOptions {
        gso: cfg.io.gso,
        gro: cfg.io.gro,
        ..SocketOptions::default()
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "runtime");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let ctx = WorkerContext {
        id: 0,
        config: store.clone(),
        metrics: registry.add_worker(),
        board: board.clone(),
    };
    let result = local.block_on(&rt, async {
        let io = match bind_io(&cfg, &opts) {
            Ok(io) => io,
            Err(e) => {
                tracing::error!(address = %cfg.listen.address, error = %e, "cannot bind UDP listener");
                return Err(e.into());
            }
        };
        admin_state
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_local(async move {
            wait_for_signal().await;
            let _ = shutdown_tx.send(true);
        });
        // Both drivers run the very same worker code, monomorphised.
        match io {
            Driver::Uring(io) => spooky::runtime::run_worker(ctx, *io, shutdown_rx).await,
            Driver::Epoll(io) => spooky::runtime::run_worker(ctx, io, shutdown_rx).await,
        }
    });
    // Dropping the local set drops the signal task and its shutdown sender,
    // which stops the admin server even when the worker failed early.
    drop(local);
    if let Ok(t) = admin_thread {
        let _ = t.join();
    }
    match result {
        Ok(()) => {
            tracing::info!("spooky stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "spooky failed");
            ExitCode::FAILURE
        }
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

/// The I/O driver chosen for the listener.
enum Driver {
    Uring(Box<UringUdp>),
    Epoll(EpollUdp),
}

/// Binds the listener with the driver `io.backend` asks for. `auto` and
/// `uring` use io_uring where the kernel allows and otherwise log one line
/// saying what was missing and fall back to epoll.
fn bind_io(cfg: &Config, opts: &SocketOptions) -> std::io::Result<Driver> {
    if cfg.io.backend != IoBackend::Epoll {
        match UringUdp::bind(cfg.listen.address, opts) {
            Ok(io) => return Ok(Driver::Uring(Box::new(io))),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    requested = ?cfg.io.backend,
                    reason = %e,
                    "io_uring unavailable; using the epoll driver"
                );
            }
            Err(e) => return Err(e),
        }
    }
    EpollUdp::bind(cfg.listen.address, opts).map(Driver::Epoll)
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
