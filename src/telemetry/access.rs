//! The access log: one JSON object per request, one line each, formatted
//! on the worker and written by a thread of its own.
//!
//! A worker formats the line into its [`AccessSink`]'s reusable buffer and
//! hands a copy (the line's one allocation) to `tracing-appender`'s
//! non-blocking writer: a bounded channel to the `spooky-access` thread,
//! which does the `write(2)`s. The channel is lossy: when the thread falls
//! behind (a slow disk, a stalled stderr pipe), a line that does not fit is
//! dropped and counted in `spooky_access_log_dropped_total`; a worker never
//! waits for the disk and the queue never holds more than
//! [`BUFFERED_LINES`] lines.
//!
//! To a file (`telemetry.access_log_path`), lines are gathered into one
//! write per [`FILE_WRITE_CHUNK`] or per burst, and the file is reopened by
//! path when [`AccessLog::reopen`] is called (SIGUSR1), so logrotate can
//! move it away. To stderr, each line is its own `write(2)`, so that lines
//! of the main log (written to the same stderr by other threads) never land
//! inside one of ours. The format is documented in docs/operations.md
//! ("Access log"); keep the two in step.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines that may wait for the writer thread; beyond, lines are dropped.
/// About 6 MiB at a typical 400 bytes a line, and a few seconds of a busy
/// node's lines, enough to ride out a slow fsync or a log shipper pause.
pub const BUFFERED_LINES: usize = 16_384;

/// Bytes the writer thread gathers before one `write(2)` to a file.
pub const FILE_WRITE_CHUNK: usize = 64 * 1024;

/// Name of the writer thread (15 bytes at most: the kernel's limit).
const THREAD_NAME: &str = "spooky-access";

/// One request as the access log tells it. Strings are borrowed from the
/// request being finished: building a record copies nothing.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    /// The client's address and port, as the connection's active path saw
    /// them when the request arrived.
    pub client_ip: Option<IpAddr>,
    pub client_port: Option<u16>,
    /// The connection's serial on its worker (the `conn` of other log lines).
    pub conn: u64,
    /// The connection ID spooky chose for the connection (its first source
    /// CID, QUIC-LB layout), hex; what a packet capture shows as DCID.
    #[serde(serialize_with = "hex_or_null")]
    pub conn_id: Option<&'a [u8]>,
    pub request_id: u64,
    /// W3C trace id (32 hex digits), the client's or spooky's own.
    pub trace_id: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// The upstream and backend that served it, when one was picked.
    pub upstream: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    /// Status sent to the client (0: none, e.g. reset before a response).
    pub status: u16,
    /// Request and response body bytes.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From the request head to the end of the response (or its reset).
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    /// From sending the request to the backend until its response head
    /// (the attempt whose response was forwarded); null without one.
    #[serde(rename = "upstream_ms", serialize_with = "millis_or_null")]
    pub upstream_duration: Option<Duration>,
    /// `ok`, `reset`, `client_cancelled`, `connection_closed`.
    pub outcome: &'a str,
    pub error: Option<&'a str>,
}

/// A record with its time stamp and type, as written.
#[derive(Serialize)]
struct Line<'r, 'a> {
    #[serde(serialize_with = "rfc3339")]
    ts: SystemTime,
    /// Tells access lines from main-log lines sharing stderr.
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    rec: &'r AccessRecord<'a>,
}

/// Formats one line (JSON and `\n`) into `out`, replacing its content.
pub fn format_line(rec: &AccessRecord<'_>, ts: SystemTime, out: &mut Vec<u8>) {
    out.clear();
    let line = Line {
        ts,
        kind: "access",
        rec,
    };
    // Serialising plain fields into a Vec cannot fail; if it ever did, an
    // empty buffer means the line is skipped rather than half-written.
    if serde_json::to_writer(&mut *out, &line).is_err() {
        out.clear();
        return;
    }
    out.push(b'\n');
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    // Microsecond resolution: `1234 µs` prints as `1.234`.
    s.serialize_f64(d.as_micros() as f64 / 1000.0)
}

fn millis_or_null<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

fn hex_or_null<S: Serializer>(b: &Option<&[u8]>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.collect_str(&Hex(b)),
        None => s.serialize_none(),
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Rfc3339(*t))
}

/// Lower-case hex of a byte string, written without an intermediate String.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// UTC time as `2025-01-31T23:59:59.123Z` (RFC 3339, milliseconds).
struct Rfc3339(SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = time::OffsetDateTime::from(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

/// Lines the access log lost, for `spooky_access_log_dropped_total`.
#[derive(Debug)]
pub struct AccessLogStats {
    /// Lines refused because the queue to the writer thread was full.
    queue_full: ErrorCounter,
    /// Lines the writer thread could not write (disk full, I/O error).
    write_failed: Arc<AtomicU64>,
}

impl AccessLogStats {
    /// Lines dropped so far, either way.
    pub fn dropped(&self) -> u64 {
        (self.queue_full.dropped_lines() as u64)
            .saturating_add(self.write_failed.load(Ordering::Relaxed))
    }
}

/// The process's access log: cheap to clone, one [`AccessSink`] per worker.
#[derive(Debug, Clone)]
pub struct AccessLog {
    writer: NonBlocking,
    reopen: Arc<AtomicBool>,
    stats: Arc<AccessLogStats>,
}

impl AccessLog {
    /// Starts the writer thread, writing to the file at `path` (created if
    /// missing, appended to) or to stderr. Keep the guard until exit: its
    /// drop flushes what is queued.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn start(path: Option<&Path>) -> io::Result<(AccessLog, WorkerGuard)> {
        let out = match path {
            Some(p) => Output::File {
                file: open_append(p)?,
                path: p.to_path_buf(),
            },
            None => Output::Stderr(io::stderr()),
        };
        Ok(Self::start_with(out, BUFFERED_LINES))
    }

    fn start_with(out: Output, lines: usize) -> (AccessLog, WorkerGuard) {
        let reopen = Arc::new(AtomicBool::new(false));
        let write_failed = Arc::new(AtomicU64::new(0));
        let target = Target {
            out,
            pending: Vec::new(),
            pending_lines: 0,
            reopen: reopen.clone(),
            failed: write_failed.clone(),
            failing: false,
        };
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(lines.max(1))
            .thread_name(THREAD_NAME)
            .finish(target);
        let stats = Arc::new(AccessLogStats {
            queue_full: writer.error_counter(),
            write_failed,
        });
        (
            AccessLog {
                writer,
                reopen,
                stats,
            },
            guard,
        )
    }

    /// The drop counters, for `/metrics`.
    pub fn stats(&self) -> Arc<AccessLogStats> {
        self.stats.clone()
    }

    /// A worker's handle.
    pub fn sink(&self) -> AccessSink {
        AccessSink {
            writer: self.writer.clone(),
            buf: Vec::with_capacity(512),
        }
    }

    /// Asks the writer thread to reopen the file by its path (after
    /// logrotate moved it), before it writes anything more. An empty
    /// message wakes the thread, so the new file appears at once, not only
    /// with the next request. No-op for stderr.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        let mut w = self.writer.clone();
        let _ = w.write(&[]);
    }
}

/// One worker's end of the access log: a clone of the queue's sender and a
/// buffer the worker formats lines into.
#[derive(Debug)]
pub struct AccessSink {
    writer: NonBlocking,
    buf: Vec<u8>,
}

impl AccessSink {
    /// Queues one line for `rec`, stamped now; never blocks (a full queue
    /// drops the line and counts it).
    pub fn write(&mut self, rec: &AccessRecord<'_>) {
        format_line(rec, SystemTime::now(), &mut self.buf);
        if !self.buf.is_empty() {
            let _ = self.writer.write(&self.buf);
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Where the writer thread puts lines.
enum Output {
    Stderr(io::Stderr),
    File {
        path: PathBuf,
        file: File,
    },
    /// Tests: any writer, lines unbatched, reopen ignored.
    #[cfg(test)]
    Test(Box<dyn Write + Send>),
}

/// The writer thread's side: gathers lines, writes them, reopens the file
/// when asked, and counts lines it could not write.
struct Target {
    out: Output,
    pending: Vec<u8>,
    pending_lines: u64,
    reopen: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    /// The last write failed (so only the first failure of a run is logged).
    failing: bool,
}

impl Target {
    fn chunk(&self) -> usize {
        match self.out {
            Output::File { .. } => FILE_WRITE_CHUNK,
            _ => 0,
        }
    }

    /// Writes what is gathered; on error, counts its lines as dropped.
    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let res = match &mut self.out {
            Output::Stderr(e) => e.write_all(&self.pending),
            Output::File { file, .. } => file.write_all(&self.pending),
            #[cfg(test)]
            Output::Test(w) => w.write_all(&self.pending),
        };
        match res {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log: writing again");
            }
            Ok(()) => {}
            Err(e) => {
                self.failed.fetch_add(self.pending_lines, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(error = %e, "access log: write failed; lines are dropped and counted");
                }
            }
        }
        self.pending.clear();
        self.pending_lines = 0;
    }

    /// Reopens the file by path if [`AccessLog::reopen`] asked for it;
    /// lines gathered before go to the old file. On error the old file is
    /// kept.
    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, Ordering::Acquire) {
            return;
        }
        self.write_pending();
        if let Output::File { path, file } = &mut self.out {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "access log: cannot reopen; still writing to the old file"
                ),
            }
        }
    }
}

impl Write for Target {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.reopen_if_asked();
        self.pending.extend_from_slice(buf);
        self.pending_lines += 1;
        if self.pending.len() >= self.chunk() {
            self.write_pending();
        }
        // Errors are counted, never returned: the appender's thread would
        // drop the rest of its batch with it.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_pending();
        self.reopen_if_asked();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Mutex};

    fn record<'a>() -> AccessRecord<'a> {
        AccessRecord {
            client_ip: Some("192.0.2.7".parse().unwrap()),
            client_port: Some(50123),
            conn: 3,
            conn_id: Some(&[0x14, 0x00, 0x01, 0xab]),
            request_id: 42,
            trace_id: "0af7651916cd43dd8448eb211c80319c",
            method: "GET",
            authority: "example.com",
            path: "/a \"quoted\"\npath",
            upstream: Some("app"),
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            status: 200,
            bytes_in: 0,
            bytes_out: 1234,
            duration: Duration::from_micros(2_345),
            upstream_duration: Some(Duration::from_micros(1_500)),
            outcome: "ok",
            error: None,
        }
    }

    fn line(rec: &AccessRecord<'_>) -> String {
        let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let mut out = Vec::new();
        format_line(rec, ts, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let text = line(&record());
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        assert!(
            text.starts_with(r#"{"ts":"2023-11-14T22:13:20.123Z","type":"access","client_ip":"192.0.2.7","client_port":50123,"conn":3,"conn_id":"140001ab","request_id":42,"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/a \"quoted\"\npath");
        assert_eq!(v["backend"], "127.0.0.1:9001");
        assert_eq!(v["upstream"], "app");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 1234);
        assert_eq!(v["duration_ms"], 2.345);
        assert_eq!(v["upstream_ms"], 1.5);
        assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["outcome"], "ok");
        assert!(v["error"].is_null());
    }

    #[test]
    fn what_is_unknown_is_null() {
        let rec = AccessRecord {
            client_ip: None,
            client_port: None,
            conn_id: None,
            upstream: None,
            backend: None,
            upstream_duration: None,
            status: 0,
            outcome: "reset",
            error: Some("malformed"),
            ..record()
        };
        let v: serde_json::Value = serde_json::from_str(&line(&rec)).unwrap();
        for k in [
            "client_ip",
            "client_port",
            "conn_id",
            "upstream",
            "backend",
            "upstream_ms",
        ] {
            assert!(v[k].is_null(), "{k}: {v}");
        }
        assert_eq!(v["error"], "malformed");
    }

    /// A writer that blocks until the test lets it go, and keeps what it got.
    struct Gate {
        open: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_without_blocking() {
        let (tx, rx) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            open: rx,
            got: got.clone(),
        };
        let (log, guard) = AccessLog::start_with(Output::Test(Box::new(gate)), 4);
        let mut sink = log.sink();
        let started = std::time::Instant::now();
        for _ in 0..100 {
            sink.write(&record());
        }
        assert!(started.elapsed() < Duration::from_secs(1), "writes blocked");
        // The thread holds at most one line, the queue four.
        let dropped = log.stats().dropped();
        assert!((95..=100).contains(&dropped), "dropped {dropped}");
        for _ in 0..100 {
            let _ = tx.send(());
        }
        drop(guard);
        let written = got.lock().unwrap().iter().filter(|b| **b == b'\n').count() as u64;
        assert_eq!(written + dropped, 100);
    }

    #[test]
    fn reopen_moves_new_lines_to_a_fresh_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let (log, guard) = AccessLog::start(Some(&path)).unwrap();
        let mut sink = log.sink();
        sink.write(&record());
        let wait_for = |p: &Path, lines: usize| {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < until {
                let n = std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
                if n >= lines {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("{} never had {lines} lines", p.display());
        };
        wait_for(&path, 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        // The wake-up alone creates the new file.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !path.exists() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(path.exists(), "reopen did not create a new file");
        sink.write(&record());
        sink.write(&record());
        assert_eq!(wait_for(&path, 2), 2);
        drop(guard);
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
        assert_eq!(log.stats().dropped(), 0);
    }
}
