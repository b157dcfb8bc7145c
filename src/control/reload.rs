//! Hot reload: parse and validate the whole file, then publish the new
//! config atomically, or keep the old one and say why.
//!
//! The config in effect is an [`ArcSwap`] of a [`Snapshot`] (config +
//! generation). Workers read it lock-free at the top of their loop when the
//! `watch` channel of [`ConfigStore::subscribe`] says the generation moved,
//! build a fresh `Gateway` for new requests and reconfigure their edge
//! (TLS and limits for new handshakes and requests). Reloads themselves are
//! serialised by a mutex, so SIGHUP, `POST /reload` and the file watcher
//! never interleave.
//!
//! Keys that need a restart ([`restart_required`]) are reported and keep
//! their old value in the published config: nothing is half-applied.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::telemetry::ReloadStats;

/// One published config.
#[derive(Debug)]
pub struct Snapshot {
    /// 1 for the config loaded at start, +1 per successful reload.
    pub generation: u64,
    pub config: Arc<Config>,
}

/// What a reload did, as `POST /reload` answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum ReloadOutcome {
    Applied {
        ok: bool,
        generation: u64,
        /// Changed keys that keep their old value until a restart.
        restart_required: Vec<String>,
    },
    Rejected {
        ok: bool,
        /// `file:line:col: key: problem`, one per problem.
        errors: Vec<String>,
    },
}

impl ReloadOutcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, ReloadOutcome::Applied { .. })
    }
}

/// The config in effect and the machinery to replace it.
#[derive(Debug)]
pub struct ConfigStore {
    path: PathBuf,
    current: ArcSwap<Snapshot>,
    /// Serialises reloads (admin thread, signal task, watcher).
    reloading: Mutex<()>,
    notify: watch::Sender<u64>,
    stats: Arc<ReloadStats>,
}

impl ConfigStore {
    /// Publishes `initial` as generation 1.
    pub fn new(path: &Path, initial: Config, stats: Arc<ReloadStats>) -> Arc<Self> {
        stats.generation.store(1, Ordering::Relaxed);
        let (notify, _) = watch::channel(1);
        Arc::new(Self {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(Snapshot {
                generation: 1,
                config: Arc::new(initial),
            }),
            reloading: Mutex::new(()),
            notify,
            stats,
        })
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot in effect (lock-free).
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that changes whenever a new generation is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Re-reads the file, validates it and publishes it, or keeps the old
    /// config. `trigger` names the cause in the log (sighup, admin, watch).
    pub fn reload(&self, trigger: &str) -> ReloadOutcome {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let new = match config::load(&self.path).and_then(|c| check_tls(&c, &self.path).map(|()| c))
        {
            Ok(c) => c,
            Err(errs) => {
                let errors: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
                self.stats.error.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::probes::config_reload(false, self.current.load().generation);
                tracing::error!(
                    trigger,
                    config = %self.path.display(),
                    errors = %errors.join("; "),
                    "config reload failed; keeping the config in effect"
                );
                return ReloadOutcome::Rejected { ok: false, errors };
            }
        };
        let old = self.current.load_full();
        let (effective, restart) = merge(&old.config, new);
        let generation = old.generation + 1;
        self.current.store(Arc::new(Snapshot {
            generation,
            config: Arc::new(effective),
        }));
        self.stats.generation.store(generation, Ordering::Relaxed);
        self.stats.ok.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::probes::config_reload(true, generation);
        self.notify.send_replace(generation);
        if restart.is_empty() {
            tracing::info!(trigger, generation, "config reloaded");
        } else {
            tracing::warn!(
                trigger,
                generation,
                restart_required = %restart.join(", "),
                "config reloaded; some changes need a restart and keep their old value"
            );
        }
        ReloadOutcome::Applied {
            ok: true,
            generation,
            restart_required: restart,
        }
    }
}

/// Loads the TLS pair the way new handshakes will, so that a reload with an
/// unusable certificate is rejected instead of half-applied.
fn check_tls(cfg: &Config, file: &Path) -> Result<(), config::ConfigErrors> {
    crate::edge::quic_config(cfg).map(drop).map_err(|e| {
        config::ConfigErrors(vec![config::ConfigError {
            file: file.to_path_buf(),
            line: 0,
            col: 0,
            key: "listen.tls".into(),
            problem: e.to_string(),
        }])
    })
}

/// Keys whose new value only takes effect after a restart, given the old
/// and new config. `listen.address` (the bound socket), `io.*` (workers,
/// driver, socket options, batch buffers), `admin.address` (the bound admin
/// socket), `telemetry.log` / `telemetry.log_format` (the global
/// subscriber) and `telemetry.access_log_path` (the access-log writer is
/// built once, at start; SIGUSR1 reopens the same path).
pub fn restart_required(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if old.listen.address != new.listen.address {
        keys.push("listen.address".to_string());
    }
    if old.io.backend != new.io.backend {
        keys.push("io.backend".to_string());
    }
    if old.io.workers != new.io.workers {
        keys.push("io.workers".to_string());
    }
    if old.io.batch != new.io.batch {
        keys.push("io.batch".to_string());
    }
    if old.io.gso != new.io.gso {
        keys.push("io.gso".to_string());
    }
    if old.io.zerocopy_send != new.io.zerocopy_send {
        keys.push("io.zerocopy_send".to_string());
    }
    if old.io.gro != new.io.gro {
        keys.push("io.gro".to_string());
    }
    if old.io.upstream_io != new.io.upstream_io {
        keys.push("io.upstream_io".to_string());
    }
    if old.io.on_worker_failure != new.io.on_worker_failure {
        keys.push("io.on_worker_failure".to_string());
    }
    if old.admin.address != new.admin.address {
        keys.push("admin.address".to_string());
    }
    if old.telemetry.log != new.telemetry.log {
        keys.push("telemetry.log".to_string());
    }
    if old.telemetry.log_format != new.telemetry.log_format {
        keys.push("telemetry.log_format".to_string());
    }
    if old.telemetry.access_log_path != new.telemetry.access_log_path {
        keys.push("telemetry.access_log_path".to_string());
    }
    keys
}

/// The config to publish: `new`, with every restart-only key kept at its
/// old value; and the list of those keys that changed.
pub fn merge(old: &Config, mut new: Config) -> (Config, Vec<String>) {
    let keys = restart_required(old, &new);
    new.listen.address = old.listen.address;
    new.io = old.io.clone();
    new.admin.address = old.admin.address;
    new.telemetry.log = old.telemetry.log.clone();
    new.telemetry.log_format = old.telemetry.log_format;
    new.telemetry.access_log_path = old.telemetry.access_log_path.clone();
    (new, keys)
}

/// Fingerprint of the file: modification time and a hash of its bytes.
/// `None` when unreadable.
fn fingerprint(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let bytes = std::fs::read(path).ok()?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some((mtime, h.finish()))
}

/// How often the watcher looks at the file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Polls the config file every [`WATCH_INTERVAL`] while the config in effect
/// says `watch: true`, and reloads when its content changes (mtime alone
/// is not trusted: editors and `cp` may keep it, and a touch changes it
/// without a change). Returns when `stop` turns true.
pub async fn watch_file(store: Arc<ConfigStore>, mut stop: watch::Receiver<bool>) {
    let mut last = fingerprint(store.path());
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
        let now = fingerprint(store.path());
        let changed = match (&last, &now) {
            (Some((_, a)), Some((_, b))) => a != b,
            // Unreadable (mid-rename): wait for it to come back.
            (_, None) => false,
            (None, Some(_)) => true,
        };
        if now.is_some() {
            last = now;
        }
        if changed && store.current().config.watch {
            let store = Arc::clone(&store);
            // Parsing and loading TLS files block: keep them off the runtime.
            let _ = tokio::task::spawn_blocking(move || store.reload("watch")).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::minimal(vec![config::Upstream::new(
            "app",
            vec![config::Backend::new("127.0.0.1:9001".parse().unwrap())],
        )])
    }

    #[test]
    fn restart_keys_are_reported_and_kept() {
        let old = base();
        let mut new = base();
        new.listen.address = "127.0.0.1:1".parse().unwrap();
        new.io.workers = config::Workers::Count(4);
        new.admin.address = "127.0.0.1:2".parse().unwrap();
        new.limits.max_connections = 7;
        let (eff, keys) = merge(&old, new);
        assert_eq!(keys, vec!["listen.address", "io.workers", "admin.address"]);
        assert_eq!(eff.listen.address, old.listen.address);
        assert_eq!(eff.io, old.io);
        assert_eq!(eff.admin.address, old.admin.address);
        // Everything else applies.
        assert_eq!(eff.limits.max_connections, 7);
    }

    #[test]
    fn nothing_to_restart_when_only_live_keys_change() {
        let old = base();
        let mut new = base();
        new.upstreams[0].backends[0].weight = 5;
        new.telemetry.access_log = false;
        assert!(restart_required(&old, &new).is_empty());
    }

    #[test]
    fn a_new_access_log_path_waits_for_a_restart() {
        let old = base();
        let mut new = base();
        new.telemetry.access_log_path = Some("/tmp/elsewhere.log".into());
        let (eff, keys) = merge(&old, new);
        assert_eq!(keys, vec!["telemetry.access_log_path"]);
        assert_eq!(eff.telemetry.access_log_path, old.telemetry.access_log_path);
    }

    #[test]
    fn reload_keeps_old_config_on_error_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let good = "upstreams:\n  - name: app\n    backends:\n      - { address: \"127.0.0.1:9001\" }\nlisten: { tls: { cert: c.pem, key: k.pem } }\n";
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("c.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(&path, good).unwrap();
        let stats = Arc::new(ReloadStats::default());
        let store = ConfigStore::new(&path, config::load(&path).unwrap(), stats.clone());
        let mut rx = store.subscribe();

        std::fs::write(
            &path,
            format!("{good}limits: {{ max_connections: oops }}\n"),
        )
        .unwrap();
        let out = store.reload("test");
        let ReloadOutcome::Rejected { errors, .. } = &out else {
            panic!("{out:?}")
        };
        assert!(errors[0].contains("config.yaml:6:"), "{errors:?}");
        assert_eq!(store.current().generation, 1);
        assert_eq!(stats.error.load(Ordering::Relaxed), 1);
        assert!(!rx.has_changed().unwrap());

        std::fs::write(&path, good.replace("9001\" }", "9001\", weight: 3 }")).unwrap();
        let out = store.reload("test");
        assert_eq!(
            out,
            ReloadOutcome::Applied {
                ok: true,
                generation: 2,
                restart_required: vec![]
            }
        );
        assert_eq!(store.current().config.upstreams[0].backends[0].weight, 3);
        assert_eq!(stats.ok.load(Ordering::Relaxed), 1);
        assert_eq!(stats.generation.load(Ordering::Relaxed), 2);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 2);

        // A certificate that does not load is rejected, not half-applied.
        std::fs::write(dir.path().join("k.pem"), "not a key").unwrap();
        let out = store.reload("test");
        assert!(!out.is_ok(), "{out:?}");
        assert_eq!(store.current().generation, 2);
    }
}
