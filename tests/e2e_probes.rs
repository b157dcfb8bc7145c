//! USDT probes and the bpftrace scripts in `ebpf-probes/`, against a real
//! spooky. Needs root and `bpftrace` (scripts/bootstrap.sh installs it);
//! each test says why it skips otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spooky::telemetry::probes::PROBE_NAMES;

use crate::common::h3client::Request;
use crate::common::{Backend, Spooky};

const SPOOKY: &str = env!("CARGO_BIN_EXE_spooky");
/// How long bpftrace may take to compile and attach a script.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an attached script may take to print its maps and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// stderr lines bpftrace prints here that are not failures: the container
/// forbids raising RLIMIT_MEMLOCK (BPF memory is accounted by cgroup
/// anyway), and without a legacy `uprobe_events` file detaching USDT
/// probes at exit complains although the kernel drops them with the fd.
const BENIGN_STDERR: [&str; 3] = [
    "couldn't set RLIMIT_MEMLOCK",
    "uprobe_events",
    "failed to detach probe",
];

/// Why probe tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    let found = Command::new("bpftrace")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then_some("bpftrace not installed (scripts/bootstrap.sh)")
}

macro_rules! require_bpftrace {
    () => {
        if let Some(why) = skip_reason() {
            println!("skipping: {why}");
            return;
        }
    };
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ebpf-probes")
}

/// A bpftrace process whose output is collected in a file.
struct Trace {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Trace {
    /// Starts bpftrace on `script`; `-p pid` for USDT scripts, positional
    /// `pid port` arguments for the kernel one (which names `$1`).
    fn start(script: &str, pid: u32, port: u16) -> Trace {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("script.bt");
        std::fs::write(&file, script).unwrap();
        let out = dir.path().join("out");
        let log = std::fs::File::create(&out).unwrap();
        let mut cmd = Command::new("bpftrace");
        if script.contains("usdt:") {
            cmd.arg("-p").arg(pid.to_string());
        }
        cmd.arg(&file);
        if script.contains("$1") {
            cmd.arg(pid.to_string()).arg(port.to_string());
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn bpftrace");
        let mut t = Trace {
            child,
            out,
            _dir: dir,
        };
        t.wait_attached();
        t
    }

    fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.out) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// bpftrace prints "Attaching N probes..." before it attaches; the
    /// probes are live once the BEGIN probe ran, which this test script
    /// marks with a line of its own.
    fn wait_attached(&mut self) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while Instant::now() < deadline {
            if self.output().contains("ATTACHED") {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "bpftrace exited ({st}) before attaching:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("bpftrace did not attach:\n{}", self.output());
    }

    /// Waits for bpftrace to exit (after `exit()` or SIGINT); returns its
    /// exit code and output.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (st.code(), self.output());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bpftrace did not exit:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn interrupt(&self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `script` with a BEGIN line the harness waits for (the scripts have no
/// BEGIN of their own: bpftrace allows only one).
fn marked(script: &str) -> String {
    format!("BEGIN {{ printf(\"ATTACHED\\n\"); }}\n{script}\n")
}

/// Output lines that are errors, the known harmless ones left out.
fn errors(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains("ERROR") || l.contains("error:"))
        .filter(|l| !BENIGN_STDERR.iter().any(|b| l.contains(b)))
        .collect()
}

#[test]
fn bpftrace_lists_every_probe() {
    require_bpftrace!();
    let out = Command::new("bpftrace")
        .arg("-l")
        .arg(format!("usdt:{SPOOKY}:*"))
        .output()
        .expect("bpftrace -l");
    let listed = String::from_utf8_lossy(&out.stdout);
    for name in PROBE_NAMES {
        let want = format!(":spooky:{name}");
        assert!(
            listed.lines().any(|l| l.ends_with(&want)),
            "probe {name} not listed by bpftrace -l:\n{listed}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every request fires `request_done` exactly once, whatever its status.
#[test]
fn request_done_counts_every_request_once() {
    require_bpftrace!();
    const N: usize = 25;
    let b = Backend::start("b1");
    let s = Spooky::start(&[&b]);
    let pid = s.pid().unwrap();
    let trace = Trace::start(
        &marked(
            "usdt:*:spooky:request_done { @done = count(); @status[arg1] = count(); }\n\
             usdt:*:spooky:request_routed { @routed = count(); }\n\
             usdt:*:spooky:retry { @retried = count(); }",
        ),
        pid,
        s.addr.port(),
    );
    let mut c = s.client();
    for i in 0..N {
        // A mix of statuses: the probe counts requests, not successes.
        let path = if i % 5 == 0 { "/status/503" } else { "/" };
        let r = c.send(Request::get(path)).unwrap();
        assert!(r.status == 200 || r.status == 503, "status {}", r.status);
    }
    c.close().unwrap();
    trace.interrupt();
    let (code, out) = trace.wait();
    assert_eq!(code, Some(0), "bpftrace failed:\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == format!("@done: {N}")),
        "expected exactly {N} request_done:\n{out}"
    );
    // One `request_routed` per attempt: the first, plus one per retry
    // (503 is retried by default).
    let count = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("@routed:"),
        N + count("@retried:"),
        "request_routed must fire once per attempt:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim() == format!("@status[503]: {}", N / 5)),
        "{out}"
    );
}

/// Every script in ebpf-probes/ compiles, attaches to a running spooky
/// under a little load and exits cleanly, so none rots.
#[test]
fn every_script_attaches_and_exits() {
    require_bpftrace!();
    let tracefs = Path::new("/sys/kernel/tracing/events/skb").exists();
    let b = Backend::start("b1");
    let s = Spooky::start(&[&b]);
    let pid = s.pid().unwrap();
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(scripts_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bt"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 7, "scripts: {scripts:?}");
    for path in scripts {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            text.contains("Run:"),
            "{name}: header must say how to run it"
        );
        if text.contains("tracepoint:") && !tracefs {
            println!("skipping {name}: tracefs not mounted at /sys/kernel/tracing");
            continue;
        }
        let trace = Trace::start(
            &marked(&format!("{text}\ninterval:s:2 {{ exit(); }}")),
            pid,
            s.addr.port(),
        );
        let mut c = s.client();
        for _ in 0..5 {
            c.send(Request::get("/")).unwrap();
        }
        c.close().unwrap();
        let (code, out) = trace.wait();
        assert_eq!(code, Some(0), "{name} failed:\n{out}");
        let errs = errors(&out);
        assert!(errs.is_empty(), "{name} reported errors {errs:?}:\n{out}");
        println!("{name}: attached and exited cleanly");
    }
}

/// The real `/metrics` of a spooky with two backends and two workers:
/// promtool accepts it (exit 0), and every configured backend has its own
/// series, summed over workers; `/backends` has one entry per backend.
#[test]
fn metrics_have_per_backend_series_and_pass_promtool() {
    use crate::common::{http1_get, Options};
    const N: usize = 12;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let mut o = Options::new(&[&a, &b]);
    o.io_extra = "workers: 2".into();
    let s = Spooky::start_with(o);
    let mut c = s.client();
    for _ in 0..N {
        assert_eq!(c.send(Request::get("/")).unwrap().status, 200);
    }
    c.close().unwrap();
    for be in [&a, &b] {
        let backend = format!("backend=\"{}\"", be.addr);
        let picks = s.metric("spooky_balancer_backend_picks_total", &[&backend]);
        assert!(picks >= 1.0, "no picks for {backend}");
        let up = s.metric("spooky_upstream_backend_up", &[&backend]);
        assert_eq!(up, 1.0, "{backend} not up");
        let ok = s.metric(
            "spooky_upstream_backend_responses_total",
            &[&backend, "class=\"2xx\""],
        );
        assert_eq!(ok, picks, "{backend}: every pick answered 2xx");
    }
    let total = s.metric("spooky_balancer_backend_picks_total", &["upstream=\"app\""]);
    assert_eq!(total, N as f64);

    let (status, body) = http1_get(s.admin, "/backends").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    for e in list {
        assert_eq!(e["workers"].as_array().map(Vec::len), Some(2), "{body}");
    }

    let (status, text) = http1_get(s.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    if !crate::common::promtool_check(&text) {
        println!("skipping promtool: not installed (scripts/bootstrap.sh)");
    }
}

/// While a download is in flight (the client stalls mid-body, as a slow
/// reader does), the once-a-second samples of open connections move:
/// `spooky_quic_sampled_congestion_window_bytes` gains observations before
/// the connection closes, not only when it does.
#[test]
fn sampled_congestion_window_moves_during_a_download() {
    use crate::common::h3client::pattern_sha256;
    const N: u64 = 8 << 20;
    let count = "spooky_quic_sampled_congestion_window_bytes_count";
    let be = Backend::start("a");
    let s = Spooky::start(&[&be]);
    let mut c = s.client();
    let mut during = (0.0, 0.0);
    let r = c
        .send_digest_with(Request::get(&format!("/bytes/{N}")), 256 * 1024, |_| {
            let before = s.metric(count, &[]);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut after = before;
            while after <= before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                after = s.metric(count, &[]);
            }
            during = (before, after);
            Ok(())
        })
        .unwrap();
    assert_eq!((r.len, r.sha256.as_str()), (N, pattern_sha256(N).as_str()));
    assert!(
        during.1 > during.0,
        "no congestion-window sample while the download was in flight: {during:?}"
    );
    let sum = s.metric("spooky_quic_sampled_congestion_window_bytes_sum", &[]);
    assert!(sum > 0.0, "sampled windows sum to {sum}");
    assert!(s.metric("spooky_quic_sampled_rtt_seconds_count", &[]) >= during.1);
    // Bytes in flight are sampled with the window, path by path.
    assert!(s.metric("spooky_quic_sampled_in_flight_bytes_count", &[]) >= during.1);
}
