//! Helpers the fuzz targets share: an in-process, sans-IO [`Edge`] with a
//! self-signed certificate, and the addresses the targets send from.
//!
//! The certificate pair is written once per fuzz process into a temporary
//! directory (quiche loads PEM files by path); every input then builds its
//! own fresh `Edge`, so a crash reproduces from its input alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use spooky::config::Config;
use spooky::edge::Edge;
use spooky::telemetry::WorkerMetrics;

/// The address the edge listens on in every target.
pub const SERVER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4433);

/// Largest buffer `Edge::poll_transmit` is given: one full GSO train of
/// 64 segments of 1350 bytes, as the drivers hand it.
pub const TRANSMIT_BUF: usize = 64 * 1350;

/// Most segments one transmit may carry (the drivers' GSO ceiling).
pub const MAX_SEGMENTS: usize = 64;

/// The certificate pair, written once per process.
struct Fixture {
    /// Keeps the certificate files alive for the process.
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A fuzz process that cannot write its own temp files has nothing to
        // fuzz; failing loudly at start-up is the only useful outcome.
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("fuzz fixture: temp dir");
        #[allow(clippy::expect_used)]
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("fuzz fixture: self-signed certificate");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        #[allow(clippy::expect_used)]
        {
            std::fs::write(&cert, pair.cert.pem()).expect("fuzz fixture: write cert");
            std::fs::write(&key, pair.key_pair.serialize_pem()).expect("fuzz fixture: write key");
        }
        Fixture {
            _dir: dir,
            cert,
            key,
        }
    })
}

/// Knobs of the edge config a target may turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EdgeKnobs {
    /// `quic.retry: true` (every Initial without a token gets a Retry).
    pub retry: bool,
    /// `quic.server_id`, carried in every connection ID.
    pub server_id: u16,
    /// `limits.max_connections`.
    pub max_connections: u32,
}

/// The config an edge target runs with, built from `config.yaml` text the
/// way an operator writes it (so it follows schema changes, such as
/// `quic.retry` gaining values, without touching the targets).
/// Parsed once per distinct knobs and process: loading is not what these
/// targets fuzz, and it costs more than an execution should.
pub fn config(knobs: EdgeKnobs) -> Config {
    static CACHE: OnceLock<Mutex<HashMap<EdgeKnobs, Config>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(knobs)
        .or_insert_with(|| load_config(knobs))
        .clone()
}

fn load_config(knobs: EdgeKnobs) -> Config {
    let f = fixture();
    let text = format!(
        "listen:\n  address: \"{SERVER_ADDR}\"\n  tls: {{ cert: {:?}, key: {:?} }}\n\
         quic: {{ retry: {}, server_id: {} }}\n\
         limits: {{ max_connections: {} }}\n\
         upstreams:\n  - name: app\n    backends: [{{ address: \"127.0.0.1:9\" }}]\n",
        f.cert.display().to_string(),
        f.key.display().to_string(),
        knobs.retry,
        knobs.server_id.max(1),
        knobs.max_connections.max(1),
    );
    match spooky::config::parse_str(&text, std::path::Path::new("/fuzz/edge.yaml")) {
        Ok(c) => c,
        // The text is ours: an error here is a bug in this helper or a
        // schema change, and every input would hit it.
        Err(errs) => panic!("fuzz edge config does not load:\n{text}\n{errs}"),
    }
}

/// A fresh edge for worker `worker` and its metrics.
pub struct EdgeUnderTest {
    pub edge: Edge,
    pub metrics: Arc<WorkerMetrics>,
}

/// Builds an edge from `config` as a worker would (`runtime::run_worker`).
pub fn edge(config: &Config, worker: u8) -> EdgeUnderTest {
    let metrics = Arc::new(WorkerMetrics::default());
    // The fixture's certificate always loads; if it does not, every input
    // would fail the same way, so stop at once.
    #[allow(clippy::expect_used)]
    // A fixed seed and wall clock: a crash replays the same CIDs and tokens.
    let source = spooky::source::FakeSource::new(
        u64::from(worker),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
    );
    let edge = Edge::new(
        config,
        worker,
        metrics.clone(),
        Box::new(source),
        std::time::Instant::now(),
    )
    .expect("edge from fixture config");
    EdgeUnderTest { edge, metrics }
}

/// A client address from fuzzer bytes; port 0 included on purpose (the
/// edge must drop it, never answer it).
pub fn client_addr(v6: bool, host: u8, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(host)], port))
    } else {
        SocketAddr::from(([10, 0, 0, host], port))
    }
}
