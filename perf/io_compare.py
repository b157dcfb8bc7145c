#!/usr/bin/env python3
"""io_uring vs epoll: the first I/O comparison of spooky's perf suite.

Starts three demo backends once, then for each variant -- an I/O driver
(`io.backend: uring | epoll`) and an upstream TCP transport
(`io.upstream_io: ring | tokio`), by default `uring+ring`, `uring+tokio` and
`epoll` (which always uses tokio) -- starts spooky on the same config and
runs the same load with `h3load`:

  1. small GETs at fixed concurrency (h3load -c 4 -m 16 -d N)  -> req/s,
     spooky CPU-seconds per 100k requests (/proc/<pid>/stat),
     UDP syscalls per request and datagrams per syscall (spooky's /metrics)
  2. one bulk download through one connection (/bytes/SIZE)     -> MiB/s
  3. optionally a short small-GET run under `strace -c -f -p`   -> all
     syscalls per request, as the kernel sees them
  4. peak RSS (VmHWM from /proc/<pid>/status)

and prints a Markdown table with one column per variant and the ratios
ring/tokio (upstream TCP on the ring vs tokio, both on the io_uring driver)
and uring/epoll (the UDP drivers, both with tokio TCP), also written to perf/out/io-<timestamp>.md with the raw numbers in
perf/out/io-<timestamp>.json (and a PNG of the ratios when matplotlib is
importable). Python 3 standard library only. See docs/perf.md.

Every child process is stopped on exit, Ctrl-C and SIGTERM included (and
gets SIGTERM from the kernel should this script die without cleaning up).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

CHILDREN: list[subprocess.Popen] = []


# ---------------------------------------------------------------- utilities


def log(msg: str) -> None:
    print(f"[perf-io] {msg}", file=sys.stderr, flush=True)


def env_default(name: str, default):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return type(default)(v) if default is not None else v


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM the child if we die first."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


def spawn(cmd: list[str], cpus: set[int] | None = None, **kw) -> subprocess.Popen:
    def pre() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    p = subprocess.Popen(cmd, preexec_fn=pre, **kw)
    CHILDREN.append(p)
    return p


def stop(p: subprocess.Popen, sig=signal.SIGTERM, grace: float = 10.0) -> None:
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass
    if p in CHILDREN:
        CHILDREN.remove(p)


def cleanup() -> None:
    for p in reversed(list(CHILDREN)):
        stop(p, grace=5.0)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, what: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def io_uring_fds(pid: int) -> int:
    """How many io_uring instances the process holds (proof the driver runs)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "io_uring" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = METRIC_RE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def io_counters(m: dict[str, float]) -> dict[str, float]:
    def get(name: str, **labels) -> float:
        want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        return m.get(want, 0.0)

    requests = sum(v for k, v in m.items() if k.startswith("spooky_requests_total{"))
    return {
        "requests": requests,
        "syscalls_in": get("spooky_io_syscalls_total", direction="in"),
        "syscalls_out": get("spooky_io_syscalls_total", direction="out"),
        "datagrams_in": get("spooky_io_datagrams_total", direction="in"),
        "datagrams_out": get("spooky_io_datagrams_total", direction="out"),
        "bytes_in": get("spooky_io_bytes_total", direction="in"),
        "bytes_out": get("spooky_io_bytes_total", direction="out"),
        "gso_fallbacks": m.get("spooky_io_gso_fallbacks_total", 0.0),
        "ring_ops": m.get("spooky_upstream_ring_ops_total", 0.0),
        "ring_workers": m.get("spooky_upstream_ring_workers", 0.0),
        "send_errors": m.get("spooky_io_send_errors_total", 0.0),
    }


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b}


def div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    r = a / b
    return None if r != r else r  # inf/inf: no ratio


def per_syscall(datagrams: float, syscalls: float) -> float | None:
    """Datagrams per syscall; infinite when datagrams moved with no syscall at
    all (io_uring multishot receives complete without entering the kernel)."""
    if syscalls == 0:
        return float("inf") if datagrams > 0 else None
    return datagrams / syscalls


def finite(v):
    """JSON has no Infinity: write it as the string "inf"."""
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


H3_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s, ([\d.]+) MiB/s")
H3_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
H3_BYTES = re.compile(r"body bytes: (\d+)")
H3_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def h3load(bin_: str, port: int, args: list[str], timeout: float) -> dict:
    cmd = [bin_, "--addr", f"127.0.0.1:{port}", *args]
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, signal.SIGKILL)
        raise RuntimeError(f"h3load did not finish in {timeout:.0f}s: {' '.join(cmd)}")
    finally:
        if p in CHILDREN:
            CHILDREN.remove(p)
    r: dict = {"cmd": " ".join(cmd), "rc": p.returncode, "stdout": out}
    m = H3_FINISHED.search(out)
    if not m:
        raise RuntimeError(
            f"h3load printed no result (rc {p.returncode}): {err.strip()[-500:]}"
        )
    r["secs"], r["req_s"], r["mib_s"] = (float(x) for x in m.groups())
    m = H3_REQUESTS.search(out)
    if m:
        r["total"], r["done"], r["ok"], r["failed"], r["errored"] = (int(x) for x in m.groups())
    m = H3_BYTES.search(out)
    r["body_bytes"] = int(m.group(1)) if m else None
    m = H3_STATUS.search(out)
    if m:
        r["s2xx"], r["s3xx"], r["s4xx"], r["s5xx"] = (int(x) for x in m.groups())
    # Every answer that is not a 2xx, plus requests that got no answer at all.
    r["non_2xx"] = r.get("done", 0) - r.get("s2xx", 0) + r.get("errored", 0)
    r["stderr_tail"] = "\n".join(l for l in err.splitlines() if "failed" in l)[-500:]
    return r


# ---------------------------------------------------------------- clients
#
# The sweep drives every target with each HTTP/3 client found, not only our
# own h3load: at 4 x 100 independent clients (ngtcp2, quinn) read spooky
# against HAProxy differently from h3load (docs/perf.md, "Clients"). Each
# client maps a sweep point C x M (connections x streams per connection) onto
# its own options and returns the same fields: ok (2xx answers), non_2xx
# (other answers plus requests with no answer or a failed connection), secs
# (wall time of the run), req_s, cmd, and client-specific detail.


class LoadClient:
    name = "?"
    # How C x M maps onto this client, printed under its table.
    note = ""

    def run(self, port: int, c: int, m: int, duration: float) -> dict:
        raise NotImplementedError


class H3loadClient(LoadClient):
    """Our own quiche-based h3load (perf/src/bin/h3load.rs): C threads, each
    sending M requests at once and waiting for all M before the next round."""
    name = "h3load"
    note = ("h3load `-c C -m M -d S`: C connections, each sends M requests at once and waits "
            "for all M answers before the next round of M (lockstep rounds).")

    def __init__(self, bin_: str):
        self.bin = bin_

    def run(self, port: int, c: int, m: int, duration: float) -> dict:
        r = h3load(self.bin, port, ["-c", str(c), "-m", str(m), "-d", str(int(duration)), "/"],
                   duration + 120)
        return {"ok": r.get("s2xx", 0), "non_2xx": r["non_2xx"], "secs": r["secs"],
                "req_s": r["req_s"], "cmd": r["cmd"], "detail": r}


GTLS_SUBMIT = "submit request headers"
GTLS_STATUS = re.compile(r"http: stream (0x[0-9a-f]+) \[:status: (\d{3})\]")


class GtlsClient(LoadClient):
    """Debian's ngtcp2 example client (`gtlsclient`, package ngtcp2-client).
    It has no in-flight cap of its own: `-n N` opens all N request streams as
    fast as the server's MAX_STREAMS allows. So C x M runs C lanes in
    parallel; each lane runs `gtlsclient -n M*R` (R = --gtls-rounds) one
    process after another until the duration is over. Statuses come from its
    verbose header dump (`http: stream 0x.. [:status: NNN]`): every request
    submitted must get exactly one :status line and the process must exit 0."""
    name = "gtlsclient"

    def __init__(self, bin_: str, rounds: int, max_streams: int, path: str = "/"):
        self.bin, self.rounds, self.path = bin_, max(1, rounds), path
        self.note = (f"ngtcp2 `gtlsclient -n M×{self.rounds}` (C processes at a time, one after "
                     "another per lane until the duration is over): up to min(M×"
                     f"{self.rounds}, server MAX_STREAMS = {max_streams}) streams in flight per "
                     "connection, rolling (a stream opens as soon as one closes), and a new "
                     f"connection (handshake) every M×{self.rounds} requests. Only where M×"
                     f"{self.rounds} ≥ {max_streams} and M = {max_streams} (4x100) is the "
                     "concurrency that of h3load.")

    def one(self, port: int, n: int) -> dict:
        cmd = [self.bin, "--no-quic-dump", "--no-http-dump", "--exit-on-all-streams-close",
               "--timeout=30s", "-n", str(n), "127.0.0.1", str(port),
               f"https://localhost:{port}{self.path}"]
        p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sent = ok = other = 0
        statuses: dict[str, int] = {}
        try:
            for line in p.stdout:  # bytes: its dump is not always UTF-8
                if b"http: stream" not in line:
                    continue
                if GTLS_SUBMIT.encode() in line:
                    sent += 1
                    continue
                mm = GTLS_STATUS.search(line.decode("latin-1"))
                if mm:
                    code = mm.group(2)
                    statuses[code] = statuses.get(code, 0) + 1
                    if code.startswith("2"):
                        ok += 1
                    else:
                        other += 1
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(p, signal.SIGKILL)
            rc = -9
        finally:
            if p in CHILDREN:
                CHILDREN.remove(p)
        # Non-2xx: other answers, plus requests asked for (-n) and never answered.
        missing = max(0, n - ok - other)
        return {"rc": rc, "sent": sent, "ok": ok, "other": other, "missing": missing,
                "statuses": statuses, "cmd": " ".join(cmd)}

    def run(self, port: int, c: int, m: int, duration: float) -> dict:
        import threading
        n = m * self.rounds
        deadline = time.monotonic() + duration
        procs: list[dict] = []
        lock = threading.Lock()

        def lane() -> None:
            while time.monotonic() < deadline:
                r = self.one(port, n)
                with lock:
                    procs.append(r)

        t0 = time.monotonic()
        lanes = [threading.Thread(target=lane, daemon=True) for _ in range(c)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join(duration + 180)
        secs = time.monotonic() - t0
        ok = sum(r["ok"] for r in procs)
        failed_procs = [r for r in procs if r["rc"] != 0]
        non = sum(r["other"] + r["missing"] for r in procs)
        # A process that failed but somehow answered everything still counts once.
        non += sum(1 for r in failed_procs if r["other"] + r["missing"] == 0)
        statuses: dict[str, int] = {}
        for r in procs:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        return {"ok": ok, "non_2xx": non, "secs": secs, "req_s": div(ok + non, secs),
                "cmd": f"{c} lanes of: {procs[0]['cmd'] if procs else self.bin}",
                "detail": {"processes": len(procs), "failed_processes": len(failed_procs),
                           "failed_rc": sorted({r['rc'] for r in failed_procs}),
                           "sent": sum(r["sent"] for r in procs), "statuses": statuses}}


class OhaClient(LoadClient):
    """`oha` (crates.io, hatoo/oha) built with its `http3` feature: quinn +
    h3 + h3-quinn. `-c C -p M --http-version 3`: C QUIC connections, M tasks
    per connection each sending its next request as soon as its last one
    is answered (rolling, exactly M in flight)."""
    name = "oha"
    note = ("oha (quinn + h3) `--http-version 3 -c C -p M -z S -w`: C connections, M "
            "requests in flight per connection, rolling (a task sends its next request as "
            "soon as its answer is in).")

    def __init__(self, bin_: str, path: str = "/"):
        self.bin, self.path = bin_, path

    def run(self, port: int, c: int, m: int, duration: float) -> dict:
        cmd = [self.bin, "--http-version", "3", "--insecure", "--no-tui", "--output-format", "json",
               "-c", str(c), "-p", str(m), "-z", f"{int(duration)}s", "-w",
               f"https://127.0.0.1:{port}{self.path}"]
        p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=duration + 120)
        except subprocess.TimeoutExpired:
            stop(p, signal.SIGKILL)
            raise RuntimeError(f"oha did not finish in {duration + 120:.0f}s: {' '.join(cmd)}")
        finally:
            if p in CHILDREN:
                CHILDREN.remove(p)
        try:
            j = json.loads(out)
        except ValueError:
            raise RuntimeError(f"oha printed no JSON (rc {p.returncode}): {err.strip()[-500:]}")
        st = {str(k): int(v) for k, v in (j.get("statusCodeDistribution") or {}).items()}
        errs = {str(k): int(v) for k, v in (j.get("errorDistribution") or {}).items()}
        ok = sum(v for k, v in st.items() if k.startswith("2"))
        non = sum(v for k, v in st.items() if not k.startswith("2")) + sum(errs.values())
        if p.returncode != 0:
            non = max(non, 1)
        # oha stops sending at -z (with -w it waits for the answers in flight),
        # then sends GOAWAY and waits for the server to close the connection,
        # which a server does at its idle timeout (the sweep's targets use
        # --sweep-idle-timeout): its "total" includes that wait, so the wall
        # time reported is -z.
        total = float((j.get("summary") or {}).get("total") or 0.0)
        secs = float(duration)
        return {"ok": ok, "non_2xx": non, "secs": secs, "req_s": div(ok + non, secs),
                "cmd": " ".join(cmd),
                "detail": {"statuses": st, "errors": errs, "rc": p.returncode, "oha_total_s": total}}


def find_clients(a, bins: dict) -> list[LoadClient]:
    """Every client of `--sweep-clients` that is found; a missing optional one
    is skipped with a note, a missing h3load is an error."""
    out: list[LoadClient] = []
    for name in a.sweep_clients:
        if name == "h3load":
            out.append(H3loadClient(bins["h3load"]))
        elif name == "gtlsclient":
            path = shutil.which(a.gtlsclient) or (a.gtlsclient if os.access(a.gtlsclient, os.X_OK) else None)
            if path:
                out.append(GtlsClient(path, a.gtls_rounds, a.sweep_max_streams))
            else:
                log(f"sweep: no gtlsclient ({a.gtlsclient}); apt-get install ngtcp2-client")
        elif name == "oha":
            path = shutil.which(a.oha) or (a.oha if os.access(a.oha, os.X_OK) else None)
            if path:
                out.append(OhaClient(path))
            else:
                log(f"sweep: no oha ({a.oha}); cargo install --locked oha --features http3 "
                    "--root perf/out/bin")
        else:
            raise RuntimeError(f"unknown sweep client {name!r} (h3load, gtlsclient, oha)")
    return out


STRACE_ROW = re.compile(r"^\s*([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(?:(\d+)\s+)?(\S+)\s*$")


def parse_strace(path: str) -> tuple[int | None, list[tuple[str, int]]]:
    total, rows = None, []
    try:
        with open(path) as f:
            for line in f:
                m = STRACE_ROW.match(line)
                if not m:
                    continue
                name, calls = m.group(6), int(m.group(4))
                if name == "total":
                    total = calls
                else:
                    rows.append((name, calls))
    except OSError:
        pass
    rows.sort(key=lambda x: -x[1])
    return total, rows


# ----------------------------------------------------------------- the run


def variant(name: str) -> tuple[str, str]:
    """`uring+ring` -> ("uring", "ring"); a bare driver keeps the default
    upstream transport (`auto`; epoll always runs tokio). A `+zc` part
    (see `zerocopy`) is not an upstream transport."""
    backend, *rest = name.split("+")
    upstream = [r for r in rest if r != "zc"]
    return backend, upstream[0] if upstream else "auto"


def zerocopy(name: str) -> bool:
    """`uring+tokio+zc`: `io.zerocopy_send: true` (io_uring SENDMSG_ZC)."""
    return "zc" in name.split("+")[1:]


# Ratio columns: (numerator, denominator, heading), shown when both ran.
RATIOS = [
    ("uring+ring", "uring+tokio", "ring/tokio"),
    ("uring+tokio", "epoll", "uring/epoll"),
    ("uring", "epoll", "uring/epoll"),
    ("uring+tokio+zc", "uring+tokio", "zc/copy"),
]


def ratio_pairs(drivers: list[str]) -> list[tuple[str, str, str]]:
    return [(n, d, h) for n, d, h in RATIOS if n in drivers and d in drivers]


CONFIG = """\
# Written by perf/io_compare.py for the {driver} run.
listen:
  address: "127.0.0.1:{port}"
  tls: {{ cert: "{certs}/cert.pem", key: "{certs}/key.pem" }}
  alpn: ["h3"]
quic:
  idle_timeout_ms: {idle_timeout_ms}
  max_streams_bidi: {max_streams}
  initial_max_data: 16777216
  initial_max_stream_data: 1048576
  retry: false
  cc: cubic
  server_id: 1
io:
  backend: {backend}
  upstream_io: {upstream_io}
  zerocopy_send: {zerocopy}
  workers: {workers}
  batch: {batch}
  gso: true
  gro: true
upstreams:
  - name: app
    policy: round_robin
    backends:
{backends}
    pool: {{ connections_per_backend: {pool_conns}, max_connections_per_backend: {pool_max}, max_concurrent_streams: 100 }}
    timeouts: {{ connect_ms: 1000, request_ms: 30000, idle_ms: 60000 }}
routes:
  - {{ path_prefix: "/", upstream: app }}
limits: {{ max_connections: 100000, max_request_header_bytes: 65536, max_body_buffer_bytes: 1048576 }}
admin: {{ address: "127.0.0.1:{admin}" }}
watch: false
telemetry: {{ log: warn, log_format: text, access_log: false }}
"""


def run_driver(a, driver: str, bins: dict, work: str, backend_ports: list[int]) -> dict:
    port = free_port(socket.SOCK_DGRAM)
    admin_port = free_port()
    admin = f"127.0.0.1:{admin_port}"
    backend, upstream_io = variant(driver)
    cfg_path = os.path.join(work, f"spooky-{driver}.yaml")
    with open(cfg_path, "w") as f:
        f.write(
            CONFIG.format(
                driver=driver,
                idle_timeout_ms=30000,
                max_streams=256,
                backend=backend,
                upstream_io=upstream_io,
                zerocopy="true" if zerocopy(driver) else "false",
                port=port,
                certs=os.path.join(work, "certs"),
                workers=a.workers,
                batch=a.batch,
                pool_conns=a.pool_connections,
                pool_max=max(a.pool_connections, 16),
                backends="\n".join(
                    f'      - {{ address: "127.0.0.1:{p}", weight: 1 }}' for p in backend_ports
                ),
                admin=admin_port,
            )
        )
    chk = subprocess.run(
        [bins["spooky"], "check", "--config", cfg_path], capture_output=True, text=True
    )
    if chk.returncode != 0:
        raise RuntimeError(f"spooky check rejected {cfg_path}:\n{chk.stdout}{chk.stderr}")
    log_path = os.path.join(work, f"spooky-{driver}.log")
    logf = open(log_path, "w")
    proc = spawn(
        [bins["spooky"], "--config", cfg_path],
        cpus=a.spooky_cpus,
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    res: dict = {"driver": driver, "config": cfg_path, "log": log_path}
    try:
        wait_tcp(admin_port, f"spooky ({driver})", proc)
        pid = proc.pid
        c, m = str(a.clients), str(a.streams)
        small_args = ["-c", c, "-m", m]

        if a.warmup > 0:
            log(f"{driver}: warm-up {a.warmup}s")
            h3load(bins["h3load"], port, [*small_args, "-d", str(a.warmup), "/"], a.warmup + 60)
        res["io_uring_fds"] = io_uring_fds(pid)
        with open(log_path) as f:
            fell_back = "io_uring unavailable" in f.read()
        res["fell_back_to_epoll"] = fell_back
        if backend == "uring" and (fell_back or res["io_uring_fds"] == 0):
            log(f"{driver}: WARNING: no io_uring in use (see {log_path}); figures are epoll's")
        res["ring_workers"] = io_counters(scrape(admin))["ring_workers"]
        if upstream_io == "ring" and not res["ring_workers"]:
            log(f"{driver}: WARNING: upstream TCP is not on the ring (see {log_path})")

        # 1. small GETs at fixed concurrency
        log(f"{driver}: small-GET  h3load -c {c} -m {m} -d {a.duration} /")
        m0, t0 = io_counters(scrape(admin)), cpu_seconds(pid)
        r = h3load(bins["h3load"], port, [*small_args, "-d", str(a.duration), "/"], a.duration + 60)
        t1, m1 = cpu_seconds(pid), io_counters(scrape(admin))
        d = delta(m0, m1)
        cpu = t1 - t0
        reqs = d["requests"] or float(r.get("done", 0))
        res["small"] = {
            "h3load": r,
            "req_s": r["req_s"],
            "errors": r["non_2xx"],
            "cpu_s": cpu,
            "metrics_delta": d,
            "cpu_s_per_100k": div(cpu * 100_000, reqs),
            "req_per_cpu_s": div(reqs, cpu),
            "syscalls_per_req": div(d["syscalls_in"] + d["syscalls_out"], reqs),
            "ring_ops_per_req": div(d["ring_ops"], reqs),
            "dgrams_per_syscall_in": per_syscall(d["datagrams_in"], d["syscalls_in"]),
            "dgrams_per_syscall_out": per_syscall(d["datagrams_out"], d["syscalls_out"]),
            "dgrams_per_syscall_all": per_syscall(
                d["datagrams_in"] + d["datagrams_out"], d["syscalls_in"] + d["syscalls_out"]
            ),
        }
        s = res["small"]
        log(
            f"{driver}: small-GET  {s['req_s']:.0f} req/s, "
            f"{fmt(s['cpu_s_per_100k'])} CPU-s/100k, {fmt(s['syscalls_per_req'])} syscalls/req"
            + (f", {s['errors']} errors" if s["errors"] else "")
        )

        # 2. bulk download through one connection
        size, n = a.bulk_bytes, a.bulk_requests
        log(f"{driver}: bulk       h3load -c 1 -m 1 -n {n} /bytes/{size}")
        m0, t0 = io_counters(scrape(admin)), cpu_seconds(pid)
        r = h3load(
            bins["h3load"],
            port,
            ["-c", "1", "-m", "1", "-n", str(n), "--timeout", str(a.bulk_timeout), f"/bytes/{size}"],
            a.bulk_timeout * n + 60,
        )
        t1, m1 = cpu_seconds(pid), io_counters(scrape(admin))
        d = delta(m0, m1)
        cpu = t1 - t0
        complete = r.get("body_bytes") == size * n and r.get("ok") == n
        res["bulk"] = {
            "h3load": r,
            "mib_s": r["mib_s"],
            "complete": complete,
            "cpu_s": cpu,
            "cpu_s_per_gib": div(cpu * 1024 * MIB, r.get("body_bytes") or 0),
            "ring_ops_per_mib": div(d["ring_ops"] * MIB, r.get("body_bytes") or 0),
            "metrics_delta": d,
            "dgrams_per_syscall_in": per_syscall(d["datagrams_in"], d["syscalls_in"]),
            "dgrams_per_syscall_out": per_syscall(d["datagrams_out"], d["syscalls_out"]),
            "dgrams_per_syscall_all": per_syscall(
                d["datagrams_in"] + d["datagrams_out"], d["syscalls_in"] + d["syscalls_out"]
            ),
        }
        b = res["bulk"]
        log(
            f"{driver}: bulk       {b['mib_s']:.1f} MiB/s, "
            f"{fmt(b['dgrams_per_syscall_out'])} datagrams/send syscall"
            + ("" if complete else f" (INCOMPLETE: {r.get('body_bytes')} of {size * n} bytes)")
        )

        # 3. all syscalls under strace (slows spooky down; its own short run)
        strace = shutil.which("strace")
        if a.strace_duration > 0 and strace:
            log(f"{driver}: strace     strace -c -f -p {pid} over h3load -d {a.strace_duration}")
            out = os.path.join(work, f"strace-{driver}.txt")
            st = spawn(
                [strace, "-c", "-f", "-p", str(pid), "-o", out],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attach to every thread before the load starts
            m0 = io_counters(scrape(admin))
            r = h3load(
                bins["h3load"], port, [*small_args, "-d", str(a.strace_duration), "/"],
                a.strace_duration + 120,
            )
            m1 = io_counters(scrape(admin))
            stop(st, signal.SIGINT, grace=30)
            total, rows = parse_strace(out)
            reqs = m1["requests"] - m0["requests"]
            res["strace"] = {
                "requests": reqs,
                "req_s_under_strace": r["req_s"],
                "total_syscalls": total,
                "syscalls_per_req": div(total, reqs),
                "top": rows[:12],
                "per_req": {name: calls / reqs for name, calls in rows[:12]} if reqs else {},
            }
            log(f"{driver}: strace     {fmt(res['strace']['syscalls_per_req'])} syscalls/req (all)")
        elif a.strace_duration > 0:
            log(f"{driver}: strace     not installed; skipped")

        res["vm_hwm_kib"] = vm_hwm_kib(pid)
        res["io_uring_fds_end"] = io_uring_fds(pid)
        if proc.poll() is not None:
            raise RuntimeError(f"spooky ({driver}) exited with {proc.returncode}; see {log_path}")
    finally:
        stop(proc)
        logf.close()
    return res


# ------------------------------------------------------------------ sweep
#
# Small GETs at several concurrencies, the same load for each spooky driver
# and for HAProxy (when given), every target started once and idle while the
# others run, so each point compares them minutes apart at most. The figure
# is answers per CPU-second of the proxy process (utime+stime, all threads):
# on a shared host it moves far less than req/s does.

HAPROXY_CONFIG = """\
# Written by perf/io_compare.py: HAProxy as the reference peer of the sweep.
global
    nbthread 1
    maxconn 4096
    tune.quic.fe.max-idle-timeout {client_timeout}
{limited_quic}
defaults
    mode http
    timeout connect 1s
    timeout client {client_timeout}
    timeout server 30s
    http-reuse always
frontend h3
    bind quic4@127.0.0.1:{port} ssl crt {pem} alpn h3
    default_backend app
frontend ready
    bind 127.0.0.1:{ready}
    http-request return status 200
backend app
    balance roundrobin
{servers}
"""


def parse_points(spec: str) -> list[tuple[int, int]]:
    """`4x1,4x16` -> [(4, 1), (4, 16)]: connections x streams per connection."""
    pts = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        c, _, m = part.partition("x")
        pts.append((int(c), int(m)))
    return pts


def find_haproxy(a) -> tuple[str | None, bool]:
    """(path, uses the OpenSSL compatibility layer) of a HAProxy with QUIC:
    `--haproxy`/`HAPROXY`, else `haproxy` on PATH if `haproxy -vv` lists
    QUIC. An explicit binary without QUIC is an error; one on PATH is
    skipped with a note."""
    explicit = bool(a.haproxy)
    path = a.haproxy or shutil.which("haproxy")
    if not path:
        return None, False
    try:
        vv = subprocess.run([path, "-vv"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        if explicit:
            raise RuntimeError(f"cannot run HAProxy {path}: {e}")
        return None, False
    if "+QUIC" not in vv:
        if explicit:
            raise RuntimeError(f"{path} has no QUIC support (haproxy -vv); see perf/build-haproxy.sh")
        log(f"sweep: {path} has no QUIC (haproxy -vv); no HAProxy column "
            "(perf/build-haproxy.sh builds one)")
        return None, False
    return path, "+QUIC_OPENSSL_COMPAT" in vv


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def median_row(rows: list[dict]) -> dict:
    """One sweep cell from its repeats: the median ok/CPU-s (the mean of the
    middle two for an even count) and its inverse, the other fields from the
    lower middle run, every repeat's non-2xx summed, the highest peak RSS,
    and the repeats' ok/CPU-s listed."""
    by = sorted(rows, key=lambda r: r.get("ok_per_cpu_s") or 0.0)
    mid = dict(by[(len(by) - 1) // 2])
    if len(rows) > 1:
        med = statistics.median(r.get("ok_per_cpu_s") or 0.0 for r in rows)
        mid["ok_per_cpu_s"] = med or None
        mid["cpu_us_per_req"] = 1e6 / med if med else None
        mid["non_2xx"] = sum(r.get("non_2xx") or 0 for r in rows)
        mid["vm_hwm_kib"] = max((r.get("vm_hwm_kib") or 0) for r in rows) or None
        mid["repeats_ok_per_cpu_s"] = [r.get("ok_per_cpu_s") for r in rows]
    return mid


def reset_hwm(pid: int) -> None:
    """Resets VmHWM to the current RSS (clear_refs 5), so each point's peak is its own."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


PRELOADS = {"mimalloc": "libmimalloc.so.2", "jemalloc": "libjemalloc.so.2"}


def preload_path(name: str) -> str:
    """`mimalloc`/`jemalloc` (the distribution's shared library) or a path."""
    if "/" in name:
        if not os.path.exists(name):
            raise RuntimeError(f"allocator library {name} not found")
        return name
    lib = PRELOADS.get(name)
    if not lib:
        raise RuntimeError(f"unknown allocator {name!r} (mimalloc, jemalloc or a path to a .so)")
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
              "/usr/local/lib"):
        if os.path.exists(os.path.join(d, lib)):
            return os.path.join(d, lib)
    raise RuntimeError(f"{lib} not found: install it (Debian: libmimalloc2.0 / libjemalloc2)")


def start_spooky_target(a, driver: str, bins: dict, work: str, backend_ports: list[int],
                        idle_timeout_ms: int = 30000, tag: str = "sweep") -> dict:
    """`driver` is a variant (see `variant`), optionally `@mimalloc`, `@jemalloc` or
    `@/path/lib.so`: that allocator LD_PRELOADed over glibc's malloc, to compare
    allocators on the very same binary; and optionally `%/path/to/spooky`: another
    spooky build (A/B against a baseline)."""
    port = free_port(socket.SOCK_DGRAM)
    admin_port = free_port()
    driver_, _, other_bin = driver.partition("%")
    spooky_bin = other_bin or bins["spooky"]
    if not os.access(spooky_bin, os.X_OK):
        raise RuntimeError(f"{spooky_bin} is not an executable spooky binary")
    base, _, alloc = driver_.partition("@")
    env = dict(os.environ)
    if alloc:
        env["LD_PRELOAD"] = preload_path(alloc)
    backend, upstream_io = variant(base)
    cfg_path = os.path.join(work, f"{tag}-spooky-{driver.replace('/', '_')}.yaml")
    with open(cfg_path, "w") as f:
        f.write(
            CONFIG.format(
                driver=f"{tag} {driver}",
                idle_timeout_ms=idle_timeout_ms,
                max_streams=a.sweep_max_streams,
                backend=backend,
                upstream_io=upstream_io,
                zerocopy="true" if zerocopy(driver) else "false",
                port=port,
                certs=os.path.join(work, "certs"),
                workers=a.sweep_workers,
                batch=a.batch,
                pool_conns=a.pool_connections,
                pool_max=max(a.pool_connections, 16),
                backends="\n".join(
                    f'      - {{ address: "127.0.0.1:{p}", weight: 1 }}' for p in backend_ports
                ),
                admin=admin_port,
            )
        )
    chk = subprocess.run([spooky_bin, "check", "--config", cfg_path], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"spooky check rejected {cfg_path}:\n{chk.stdout}{chk.stderr}")
    log_path = os.path.join(work, f"{tag}-spooky-{driver.replace('/', '_')}.log")
    logf = open(log_path, "w")
    proc = spawn([spooky_bin, "--config", cfg_path], cpus=a.spooky_cpus,
                 stdout=logf, stderr=subprocess.STDOUT, env=env)
    wait_tcp(admin_port, f"spooky ({driver})", proc)
    name = f"spooky {driver_}" + (f" ({os.path.basename(other_bin)})" if other_bin else "")
    return {"name": name, "key": driver, "proc": proc, "port": port,
            "admin": f"127.0.0.1:{admin_port}",
            "log": log_path, "logf": logf, "backend": backend}


def start_haproxy(a, path: str, compat: bool, work: str, backend_ports: list[int],
                  client_timeout: str = "30s") -> dict:
    certs = os.path.join(work, "certs")
    pem = os.path.join(work, "haproxy.pem")
    with open(pem, "w") as out:
        for n in ("cert.pem", "key.pem"):
            with open(os.path.join(certs, n)) as f:
                out.write(f.read())
    port, ready = free_port(socket.SOCK_DGRAM), free_port()
    cfg_path = os.path.join(work, "haproxy.cfg")
    with open(cfg_path, "w") as f:
        f.write(HAPROXY_CONFIG.format(
            limited_quic="    limited-quic" if compat else "",
            client_timeout=client_timeout,
            port=port, pem=pem, ready=ready,
            servers="\n".join(f"    server s{i} 127.0.0.1:{p} proto h2"
                              for i, p in enumerate(backend_ports, 1)),
        ))
    chk = subprocess.run([path, "-c", "-f", cfg_path], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy -c rejected {cfg_path}:\n{chk.stdout}{chk.stderr}")
    log_path = os.path.join(work, "haproxy.log")
    logf = open(log_path, "w")
    proc = spawn([path, "-db", "-f", cfg_path], cpus=a.spooky_cpus,
                 stdout=logf, stderr=subprocess.STDOUT)
    wait_tcp(ready, "haproxy", proc)
    return {"name": "HAProxy", "key": "haproxy", "proc": proc, "port": port,
            "log": log_path, "logf": logf, "backend": None}


def run_sweep(a, bins: dict, work: str, backend_ports: list[int]) -> dict:
    hap, compat = find_haproxy(a)
    targets: list[dict] = []
    out: dict = {"points": [f"{c}x{m}" for c, m in a.sweep_points], "targets": [], "runs": {}}
    try:
        for drv in a.sweep_drivers:
            log(f"sweep: starting spooky {drv} (io.workers: {a.sweep_workers}, "
                f"connections_per_backend: {a.pool_connections})")
            targets.append(start_spooky_target(a, drv, bins, work, backend_ports,
                                               idle_timeout_ms=a.sweep_idle_timeout * 1000))
        if hap:
            log(f"sweep: starting HAProxy {hap} (nbthread 1{', limited-quic' if compat else ''})")
            targets.append(start_haproxy(a, hap, compat, work, backend_ports,
                                         client_timeout=f"{a.sweep_idle_timeout}s"))
            out["haproxy"] = hap
            try:
                out["haproxy_version"] = subprocess.run(
                    [hap, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
            except (OSError, IndexError):
                pass
        out["targets"] = [t["key"] for t in targets]
        for t in targets:
            t["rss_start_kib"] = vm_rss_kib(t["proc"].pid)
            if a.warmup > 0:
                log(f"sweep: {t['name']}: warm-up {a.warmup}s")
                h3load(bins["h3load"], t["port"], ["-c", "4", "-m", "16", "-d", str(a.warmup), "/"],
                       a.warmup + 60)
            if t["backend"] == "uring":
                t["io_uring_fds"] = io_uring_fds(t["proc"].pid)
        clients = find_clients(a, bins)
        if not clients:
            raise RuntimeError("sweep: no HTTP/3 client found")
        out["clients"] = [cl.name for cl in clients]
        out["client_notes"] = {cl.name: cl.note for cl in clients}
        out["by_client"] = {cl.name: {} for cl in clients}
        log("sweep: clients " + ", ".join(out["clients"]))
        n = len(a.sweep_points) * len(clients) * len(targets) * a.sweep_repeat
        i = 0
        for c, m in a.sweep_points:
            point = f"{c}x{m}"
            for cl in clients:
                runs = out["by_client"][cl.name].setdefault(point, {})
                reps: dict[str, list[dict]] = {t["key"]: [] for t in targets}
                for t in (t_ for _ in range(a.sweep_repeat) for t_ in targets):
                    i += 1
                    pid = t["proc"].pid
                    reset_hwm(pid)
                    m0 = io_counters(scrape(t["admin"])) if t.get("admin") else None
                    t0 = cpu_seconds(pid)
                    r = cl.run(t["port"], c, m, a.sweep_duration)
                    cpu = cpu_seconds(pid) - t0
                    d = delta(m0, io_counters(scrape(t["admin"]))) if m0 is not None else None
                    if t["proc"].poll() is not None:
                        raise RuntimeError(f"{t['name']} exited with {t['proc'].returncode}; see {t['log']}")
                    ok = r["ok"]
                    row = {
                        "client": r,
                        "ok": ok,
                        "non_2xx": r["non_2xx"],
                        "req_s": r["req_s"],
                        "wall_s": r["secs"],
                        "cpu_s": cpu,
                        "ok_per_cpu_s": div(ok, cpu),
                        "cpu_us_per_req": div(cpu * 1e6, ok),
                        "vm_hwm_kib": vm_hwm_kib(pid),
                        # spooky's own counters: datagrams and syscalls per request.
                        "dgrams_in_per_req": div(d["datagrams_in"], d["requests"]) if d else None,
                        "dgrams_out_per_req": div(d["datagrams_out"], d["requests"]) if d else None,
                        "syscalls_per_req": div(d["syscalls_in"] + d["syscalls_out"], d["requests"]) if d else None,
                    }
                    reps[t["key"]].append(row)
                    runs[t["key"]] = median_row(reps[t["key"]])
                    log(f"sweep [{i}/{n}] {point:>6} {cl.name:<10} {t['name']:<18} {ok:>8} ok in "
                        f"{r['secs']:.1f}s, {fmt(cpu)} CPU-s, {fmt(row['ok_per_cpu_s'])} ok per CPU-s"
                        + (f", {fmt(row['dgrams_in_per_req'])}/{fmt(row['dgrams_out_per_req'])} "
                           "datagrams in/out per req" if d else "")
                        + (f", {row['non_2xx']} NON-2XX" if row["non_2xx"] else ""))
        # The h3load view keeps its old place for the rest of the report.
        out["runs"] = out["by_client"].get("h3load") or out["by_client"][clients[0].name]
        if a.rss_downloads:
            out["rss_downloads"] = run_rss_downloads(a, bins, targets)
        if a.alloc_requests > 0:
            for t in targets:
                if t["key"] == "haproxy" or "@" in t["key"].partition("%")[0]:
                    continue  # HAProxy's pools and a preloaded allocator bypass libc malloc
                log(f"sweep: {t['name']}: counting allocations (bpftrace) over h3load -c 4 -m 16 "
                    f"-n {a.alloc_requests}")
                ac = count_allocs(a, bins, t, 4, 16)
                out.setdefault("allocs", {})[t["key"]] = ac
                if ac:
                    log(f"sweep: {t['name']}: {fmt(ac['allocs_per_req'])} allocations and "
                        f"{fmt(ac['frees_per_req'])} frees per request")
                else:
                    log(f"sweep: {t['name']}: allocation count skipped (needs root, bpftrace, libc malloc)")
        if a.settle_rss > 0:
            log(f"sweep: every target idle; RSS again in {a.settle_rss}s "
                "(does it return to its baseline after the load?)")
            time.sleep(a.settle_rss)
        for t in targets:
            out.setdefault("rss", {})[t["key"]] = {
                "start_kib": t.get("rss_start_kib"),
                "peak_kib": max([(out["runs"][p].get(t["key"], {}).get("vm_hwm_kib") or 0)
                                 for p in out["runs"]] + [0]) or None,
                "settled_kib": vm_rss_kib(t["proc"].pid) if a.settle_rss > 0 else None,
                "settle_s": a.settle_rss,
            }
        for t in targets:
            if t["backend"] == "uring" and not t.get("io_uring_fds"):
                out.setdefault("warnings", []).append(f"{t['name']}: no io_uring instance open (fell back to epoll?)")
    finally:
        for t in targets:
            stop(t["proc"])
            t["logf"].close()
    return out


# ------------------------------------------------ RSS under downloads (issue 9)
#
# The issue's memory load: "peak RSS <= HAProxy's over the sweep plus
# 2 x 50 x 1 MiB downloads at 100 streams per connection". For each target in
# turn (the sweep's own processes, after its points; interleaved over
# --sweep-repeat rounds): VmHWM reset (clear_refs 5), then at the same time
# one small-GET load, h3load -c 4 -m 100 -d D, and two clients each fetching
# N x /bytes/SIZE as N concurrent streams on one connection (h3load -c 1 -m N
# -n N). Peak = VmHWM after all three finish; "after" = VmRSS then.


def run_rss_downloads(a, bins: dict, targets: list[dict]) -> dict:
    import threading

    n, size = a.rss_download_streams, a.rss_download_bytes
    c, m = a.rss_small_point
    path = f"/bytes/{size}"
    out: dict = {"small": f"{c}x{m}", "duration_s": a.rss_duration, "downloads": a.rss_download_clients,
                 "streams": n, "bytes": size, "repeat": a.sweep_repeat,
                 "targets": [t["key"] for t in targets], "runs": {t["key"]: [] for t in targets},
                 "failures": []}
    rounds = [t for _ in range(a.sweep_repeat) for t in targets]
    for i, t in enumerate(rounds, 1):
        pid = t["proc"].pid
        reset_hwm(pid)
        rss0 = vm_rss_kib(pid)
        jobs = {"small": ["-c", str(c), "-m", str(m), "-d", str(a.rss_duration), "/"]}
        for j in range(a.rss_download_clients):
            jobs[f"dl{j + 1}"] = ["-c", "1", "-m", str(n), "-n", str(n),
                                  "--timeout", str(a.bulk_timeout), path]
        res: dict = {}
        errs: dict = {}
        t_start = time.monotonic()

        def go(name: str, args: list[str]) -> None:
            try:
                r = h3load(bins["h3load"], t["port"], args, a.bulk_timeout + a.rss_duration + 60)
                r["ended_s"] = time.monotonic() - t_start
                res[name] = r
            except RuntimeError as e:
                errs[name] = str(e)

        log(f"rss-downloads [{i}/{len(rounds)}] {t['name']}: h3load -c {c} -m {m} -d {a.rss_duration} / "
            f"with {a.rss_download_clients} x h3load -c 1 -m {n} -n {n} {path}")
        ths = [threading.Thread(target=go, args=(k, v)) for k, v in jobs.items()]
        peak_seen = 0
        for th in ths:
            th.start()
        while any(th.is_alive() for th in ths):
            # VmHWM is the kernel's own peak; the samples are a cross-check only.
            peak_seen = max(peak_seen, vm_rss_kib(pid) or 0)
            time.sleep(0.05)
        for th in ths:
            th.join()
        if t["proc"].poll() is not None:
            raise RuntimeError(f"{t['name']} exited with {t['proc'].returncode}; see {t['log']}")
        row = {
            "rss_before_kib": rss0,
            "vm_hwm_kib": vm_hwm_kib(pid),
            "rss_after_kib": vm_rss_kib(pid),
            "rss_sampled_max_kib": peak_seen or None,
            "errors": errs,
            "clients": {k: {f: r.get(f) for f in ("cmd", "ok", "s2xx", "non_2xx", "body_bytes", "secs",
                                                    "mib_s", "ended_s", "stderr_tail")}
                        for k, r in res.items()},
        }
        row["small_2xx"] = (res.get("small") or {}).get("s2xx")
        row["dl_2xx"] = [(res.get(f"dl{j + 1}") or {}).get("s2xx") for j in range(a.rss_download_clients)]
        row["dl_end_s"] = max((r.get("ended_s") or 0) for k, r in res.items() if k != "small") if len(res) > 1 else None
        for k, e in errs.items():
            out["failures"].append(f"rss-downloads {t['name']} round {i}: {k}: {e}")
        for k, r in res.items():
            want = n if k != "small" else None
            if r.get("non_2xx") or (want is not None and (r.get("s2xx") or 0) != want):
                out["failures"].append(f"rss-downloads {t['name']} round {i}: {k}: {r.get('s2xx')} 2xx, "
                                       f"{r.get('non_2xx')} non-2xx/unanswered ({r['cmd']})")
            if k != "small" and (r.get("body_bytes") or 0) != n * size:
                out["failures"].append(f"rss-downloads {t['name']} round {i}: {k}: {r.get('body_bytes')} "
                                       f"body bytes, expected {n * size}")
        if "small" in res and row["dl_end_s"] and row["dl_end_s"] > res["small"]["ended_s"]:
            log(f"rss-downloads: note: the downloads outlasted the small-GET load "
                f"({row['dl_end_s']:.1f}s > {res['small']['ended_s']:.1f}s); raise --rss-duration")
        out["runs"][t["key"]].append(row)
        log(f"rss-downloads [{i}/{len(rounds)}] {t['name']}: peak {fmt((row['vm_hwm_kib'] or 0) / 1024)} MiB, "
            f"after {fmt((row['rss_after_kib'] or 0) / 1024)} MiB, small {row['small_2xx']} 2xx, "
            f"downloads {row['dl_2xx']} 2xx (done at {fmt(row['dl_end_s'], 1)}s)"
            + (f"; FAILED: {'; '.join(out['failures'][-3:])}" if out["failures"] else ""))
    return out


def rss_downloads_markdown(a, sw: dict) -> str:
    rd = sw["rss_downloads"]
    keys = rd["targets"]
    names = {k: ("HAProxy" if k == "haproxy" else k) for k in keys}

    def med(k: str, f: str):
        v = [r[f] for r in rd["runs"][k] if r.get(f) is not None]
        return statistics.median(v) if v else None

    def mib(v):
        return fmt(v / 1024, 1) if v is not None else "–"

    hap_peak = med("haproxy", "vm_hwm_kib") if "haproxy" in keys else None
    hap_after = med("haproxy", "rss_after_kib") if "haproxy" in keys else None
    sweep_peak = {k: (sw.get("rss") or {}).get(k, {}).get("peak_kib") for k in keys}
    lines = [
        f"## Peak RSS under the issue's memory load ({rd['small']} small GETs for {rd['duration_s']} s "
        f"plus {rd['downloads']} × {rd['streams']} × {fmt(rd['bytes'] / MIB, 0)} MiB downloads, "
        f"{rd['streams']} streams on one connection each; median of {rd['repeat']} interleaved rounds)",
        "",
        "| target | peak RSS MiB (VmHWM) | RSS after MiB | RSS before MiB | 2xx small / downloads | "
        "download done s | peak ÷ HAProxy | after ÷ HAProxy | peak per round MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    met = []
    for k in keys:
        runs = rd["runs"][k]
        pk, af = med(k, "vm_hwm_kib"), med(k, "rss_after_kib")
        small = statistics.median([r["small_2xx"] or 0 for r in runs]) if runs else None
        dls = [sum(x or 0 for x in r["dl_2xx"]) for r in runs]
        cells = [names[k], f"**{mib(pk)}**", mib(af), mib(med(k, "rss_before_kib")),
                 f"{fmt(small, 0)} / {' , '.join(str(x) for x in dls)}",
                 fmt(med(k, "dl_end_s"), 1)]
        if k != "haproxy" and hap_peak:
            r1, r2 = div(pk, hap_peak), div(af, hap_after)
            cells += [f"**{r1:.2f}×**" if r1 is not None else "–", f"{r2:.2f}×" if r2 is not None else "–"]
            # The issue: peak over the sweep plus the downloads.
            whole = max(pk or 0, sweep_peak.get(k) or 0)
            whole_h = max(hap_peak or 0, sweep_peak.get("haproxy") or 0)
            met.append((names[k], whole, whole_h))
        else:
            cells += ["–", "–"]
        cells.append(" / ".join(mib(r.get("vm_hwm_kib")) for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Peak: VmHWM after clear_refs 5 before each round (the round's own peak, with "
              "whatever the process kept from earlier load). After: VmRSS once all clients are done. "
              "2xx downloads: per round, both download clients together "
              f"({rd['downloads'] * rd['streams']} expected, each with all its body bytes)."]
    for name, whole, whole_h in met:
        lines.append(f"- {name}: peak over sweep and downloads {fmt(whole / 1024, 1)} MiB vs HAProxy "
                     f"{fmt(whole_h / 1024, 1)} MiB: target (≤ HAProxy) "
                     + ("**met**" if whole <= whole_h else "**not met**"))
    if rd["failures"]:
        lines.append("- **FAILURES**: " + "; ".join(rd["failures"]))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ idle connections
#
# RSS per idle connection (issue 9: <= 30 KiB at 1,000 connections): each
# target alone, with an idle timeout longer than the run, then
# `idle_conns` opens N connections (one GET each), holds them, and reads
# VmRSS/RssAnon before, with N idle, and after closing them.

IDLE_RE = re.compile(r"^(\w+): ([\d.]+)$", re.M)


def run_idle(a, bins: dict, work: str, backend_ports: list[int]) -> dict:
    hap, compat = find_haproxy(a)
    keys = list(a.idle_drivers) + (["haproxy"] if hap else [])
    out: dict = {"connections": a.idle_conns, "targets": keys, "runs": {k: [] for k in keys},
                 "failures": []}
    total = len(keys) * a.idle_repeat
    i = 0
    for _ in range(a.idle_repeat):
        for k in keys:
            i += 1
            if k == "haproxy":
                t = start_haproxy(a, hap, compat, work, backend_ports, client_timeout="600s")
            else:
                t = start_spooky_target(a, k, bins, work, backend_ports,
                                        idle_timeout_ms=600_000, tag="idle")
            try:
                log(f"idle [{i}/{total}] {t['name']}: idle_conns -n {a.idle_conns} "
                    f"(each: handshake, one GET /, then held idle)")
                cmd = [bins["idle_conns"], "--pid", str(t["proc"].pid), "-n", str(a.idle_conns),
                       "--addr", f"127.0.0.1:{t['port']}", "--settle", str(a.idle_settle)]
                p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                try:
                    so, se = p.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    stop(p, signal.SIGKILL)
                    so, se = "", "timed out after 600 s"
                finally:
                    if p in CHILDREN:
                        CHILDREN.remove(p)
                for line in se.splitlines():
                    log(f"idle [{i}/{total}]   {line}")
                if p.returncode != 0:
                    why = (se.strip().splitlines() or ["?"])[-1]
                    out["failures"].append(f"idle {t['name']}: {why}")
                    log(f"idle [{i}/{total}] {t['name']}: FAILED: {why}")
                    continue
                r = {m.group(1): float(m.group(2)) for m in IDLE_RE.finditer(so)}
                if t["proc"].poll() is not None:
                    raise RuntimeError(f"{t['name']} exited with {t['proc'].returncode}; see {t['log']}")
                out["runs"][k].append(r)
                log(f"idle [{i}/{total}] {t['name']}: {fmt(r.get('rss_per_connection_kib'))} KiB "
                    f"per idle connection (RssAnon {fmt(r.get('rss_anon_per_connection_kib'))}); "
                    f"VmRSS {fmt(r.get('rss_before_kib', 0) / 1024)} -> "
                    f"{fmt(r.get('rss_idle_kib', 0) / 1024)} MiB, "
                    f"{fmt(r.get('rss_after_close_kib', 0) / 1024)} MiB after closing them")
            finally:
                stop(t["proc"])
                t["logf"].close()
    return out


def idle_markdown(a, idle: dict) -> str:
    def med(k: str, field: str):
        v = [r[field] for r in idle["runs"].get(k, []) if field in r]
        return statistics.median(v) if v else None

    def show(k: str) -> str:
        return "HAProxy" if k == "haproxy" else f"spooky {k}"

    n = idle["connections"]
    reps = a.idle_repeat
    lines = [
        f"## Idle connections: RSS per idle HTTP/3 connection at {n:,} connections"
        + (f" (median of {reps} runs)" if reps > 1 else ""),
        "",
        "| target | KiB per idle connection (VmRSS) | (RssAnon) | baseline MiB | with "
        f"{n:,} idle MiB | after closing them MiB | ≤ {a.idle_goal_kib:g} KiB |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for k in idle["targets"]:
        per = med(k, "rss_per_connection_kib")
        lines.append(
            f"| {show(k)} | {fmt(per)} | {fmt(med(k, 'rss_anon_per_connection_kib'))} | "
            f"{fmt((med(k, 'rss_before_kib') or 0) / 1024 or None)} | "
            f"{fmt((med(k, 'rss_idle_kib') or 0) / 1024 or None)} | "
            f"{fmt((med(k, 'rss_after_close_kib') or 0) / 1024 or None)} | "
            + ("–" if per is None or k == "haproxy" else ("yes" if per <= a.idle_goal_kib else "**no**"))
            + " |")
    lines += [
        "",
        f"`perf/src/bin/idle_conns.rs`: after {20} warm-up connections (opened, used, closed), "
        f"the baseline; then {n:,} connections, each a handshake and one `GET /`, held idle "
        "and polled (ACKs, timers) from one thread; (VmRSS with them − baseline) ÷ "
        f"{n:,}. Each target runs alone, spooky with `io.workers: {a.sweep_workers}` and "
        "`quic.idle_timeout_ms: 600000`, HAProxy with `nbthread 1` and "
        "`tune.quic.fe.max-idle-timeout 600s` (HAProxy opens one UDP socket per "
        "connection, whose kernel buffers are not in its RSS).",
    ]
    for f_ in idle.get("failures", []):
        lines.append(f"- **FAILED**: {f_}")
    return "\n".join(lines) + "\n"


ALLOC_BT = """
uprobe:{libc}:malloc /pid == {pid}/ {{ @calls["malloc"] = count(); }}
uprobe:{libc}:calloc /pid == {pid}/ {{ @calls["calloc"] = count(); }}
uprobe:{libc}:realloc /pid == {pid}/ {{ @calls["realloc"] = count(); }}
uprobe:{libc}:free /pid == {pid}/ {{ @calls["free"] = count(); }}
"""
# jemalloc's own entry points, which its Rust binding calls besides malloc.
JEMALLOC_BT = """
uprobe:{libc}:mallocx /pid == {pid}/ {{ @calls["malloc"] = count(); }}
uprobe:{libc}:rallocx /pid == {pid}/ {{ @calls["realloc"] = count(); }}
uprobe:{libc}:sdallocx /pid == {pid}/ {{ @calls["free"] = count(); }}
"""
BT_ROW = re.compile(r'^@calls\[(\w+)\]: (\d+)')


def libc_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if re.search(r"/libc\.so\.6$|/libc-[\d.]+\.so$", path):
                    return path
    except OSError:
        pass
    return None


def malloc_home(pid: int) -> str | None:
    """The object whose malloc the process calls: its own executable when
    that exports one (spooky's default build links jemalloc as the process
    malloc), else the libc it mapped."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    try:
        syms = subprocess.run(["nm", "-D", "--defined-only", exe], capture_output=True,
                              text=True, timeout=30).stdout
        if re.search(r" T malloc$", syms, re.M):
            return exe
    except (OSError, subprocess.TimeoutExpired):
        pass
    return libc_of(pid)


def count_allocs(a, bins: dict, t: dict, c: int, m: int) -> dict | None:
    """malloc/calloc/realloc/free calls of the proxy process per 2xx
    answer, counted exactly by bpftrace uprobes over a short run of its own
    (uprobes slow the process down, so no other figure comes from it). None
    when bpftrace or root is missing. The probes go on whichever object
    provides the process's malloc (`malloc_home`)."""
    bt = shutil.which("bpftrace")
    pid = t["proc"].pid
    libc = malloc_home(pid)
    if not bt or os.geteuid() != 0 or not libc:
        return None
    script = ALLOC_BT.format(libc=libc, pid=pid)
    if libc == os.path.realpath(f"/proc/{pid}/exe"):
        script += JEMALLOC_BT.format(libc=libc, pid=pid)
    p = spawn([bt, "-e", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line or line.startswith("Attaching"):
            break
    if not line.startswith("Attaching"):
        stop(p, signal.SIGKILL)
        log(f"alloc count: bpftrace did not attach ({line.strip()}); skipped")
        return None
    time.sleep(0.5)
    # A request count, not a duration: the probes slow the proxy many-fold.
    r = h3load(bins["h3load"], t["port"],
               ["-c", str(c), "-m", str(m), "-n", str(a.alloc_requests), "--timeout", "120", "/"], 300)
    p.send_signal(signal.SIGINT)
    try:
        out, _ = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stop(p, signal.SIGKILL)
        return None
    finally:
        if p in CHILDREN:
            CHILDREN.remove(p)
    calls = {mm.group(1): int(mm.group(2)) for mm in map(BT_ROW.match, out.splitlines()) if mm}
    ok = r.get("s2xx", 0)
    allocs = calls.get("malloc", 0) + calls.get("calloc", 0) + calls.get("realloc", 0)
    return {"load": f"{c}x{m}", "ok": ok, "non_2xx": r["non_2xx"], "calls": calls,
            "allocs_per_req": div(allocs, ok), "frees_per_req": div(calls.get("free", 0), ok)}


def sweep_markdown(a, sw: dict, client: str | None = None, extras: bool = True) -> str:
    """One table per client (`client`; None: the h3load view in sw["runs"]);
    `extras` adds the allocation, RSS and warning lines under it."""
    keys = sw["targets"]
    client = client or "h3load"
    runs_of = (sw.get("by_client") or {}).get(client) or sw["runs"]
    def show(k: str) -> str:
        if k == "haproxy":
            return "HAProxy"
        drv, _, other = k.partition("%")
        return f"{drv} ({os.path.basename(other)})" if other else drv

    names = {k: show(k) for k in keys}
    spooky = [k for k in keys if k != "haproxy"]
    have_hap = "haproxy" in keys
    plain = [k for k in spooky if "@" not in k.partition("%")[0]]
    uring = next((k for k in plain if variant(k)[0] == "uring"), None)
    epoll = next((k for k in plain if variant(k)[0] == "epoll"), None)
    head = [f"load ({client})"] + [f"{names[k]} ok/CPU-s" for k in keys]
    head += [f"{names[k]}/HAProxy" for k in spooky] if have_hap else []
    head += [f"{uring}/{epoll}"] if uring and epoll else []
    head += ["µs CPU/req (" + ", ".join(names[k] for k in keys) + ")"]
    head += ["2xx (" + ", ".join(names[k] for k in keys) + ")"]
    head += ["wall s / CPU-s (" + ", ".join(names[k] for k in keys) + ")"]
    head += ["datagrams in/out per req (" + ", ".join(names[k] for k in spooky) + ")"] if spooky else []
    head += ["non-2xx (" + ", ".join(names[k] for k in keys) + ")"]
    head += ["peak RSS MiB (" + ", ".join(names[k] for k in keys) + ")"]
    lines = [
        f"## Sweep, client {client}: small GETs, answers per proxy CPU-second "
        f"({a.sweep_duration} s per point"
        + (f", median of {a.sweep_repeat} runs" if a.sweep_repeat > 1 else "")
        + f"; spooky io.workers={a.sweep_workers}, "
        f"connections_per_backend={a.pool_connections}"
        + (f"; {sw.get('haproxy_version', 'HAProxy')} nbthread 1" if have_hap else "; no HAProxy given")
        + ")",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    below, slower, failed = [], [], []
    for point in sw["points"]:
        runs = runs_of.get(point, {})
        c, _, m = point.partition("x")
        cells = [f"`-c {c} -m {m}`"]
        cells += [fmt(runs.get(k, {}).get("ok_per_cpu_s")) for k in keys]
        if have_hap:
            for k in spooky:
                r = div(runs.get(k, {}).get("ok_per_cpu_s"), runs.get("haproxy", {}).get("ok_per_cpu_s"))
                cells.append(f"**{r:.2f}×**" if r is not None else "–")
                if r is not None and r < a.goal_vs_haproxy:
                    below.append(f"{names[k]} at {point}: {r:.2f}×")
        if uring and epoll:
            r = div(runs.get(uring, {}).get("ok_per_cpu_s"), runs.get(epoll, {}).get("ok_per_cpu_s"))
            cells.append(f"**{r:.2f}×**" if r is not None else "–")
            if r is not None and r < 1.0:
                slower.append(f"{point}: {r:.2f}×")
        cells.append(" / ".join(fmt(runs.get(k, {}).get("cpu_us_per_req")) for k in keys))
        cells.append(" / ".join(fmt(runs.get(k, {}).get("ok"), 0) for k in keys))
        cells.append(" / ".join(f"{fmt(runs.get(k, {}).get('wall_s'), 1)}s {fmt(runs.get(k, {}).get('cpu_s'), 2)}"
                                for k in keys))
        if spooky:
            cells.append(" / ".join(f"{fmt(runs.get(k, {}).get('dgrams_in_per_req'), 2)}/"
                                    f"{fmt(runs.get(k, {}).get('dgrams_out_per_req'), 2)}" for k in spooky))
        nn = [runs.get(k, {}).get("non_2xx") for k in keys]
        for k, v in zip(keys, nn):
            if v:
                failed.append(f"{names[k]} at {point}: {v}")
        cells.append(" / ".join("**%d**" % v if v else "0" for v in (x or 0 for x in nn)))
        cells.append(" / ".join(
            fmt((runs.get(k, {}).get("vm_hwm_kib") or 0) / 1024 or None) for k in keys))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = (sw.get("client_notes") or {}).get(client)
    if note:
        lines += [f"Client: {note}", ""]
    lines.append(
        f"ok/CPU-s: 2xx answers {client} received ÷ utime+stime of the proxy process over the "
        "same run (higher is better). µs CPU/req is its inverse: flat across the rows means "
        "no growth of CPU per request with streams in flight. Peak RSS is VmHWM over the "
        "point (reset with clear_refs before each). Every target serves the same demo "
        "backends; idle targets wait while another is measured.")
    if have_hap:
        lines.append("")
        lines.append(f"- goal ≥ {a.goal_vs_haproxy:.1f}× HAProxy at every point: "
                     + ("**met**" if not below else "**not met**: " + "; ".join(below)))
    if uring and epoll:
        lines.append(f"- io_uring never slower than epoll: "
                     + ("**met**" if not slower else "**not met** (uring/epoll): " + "; ".join(slower)))
    if not extras:
        if failed:
            lines.append(f"- **NON-2XX ANSWERS**: " + "; ".join(failed))
        return "\n".join(lines) + "\n"
    for k, ac in (sw.get("allocs") or {}).items():
        if ac:
            lines.append(f"- {names.get(k, k)}: **{fmt(ac['allocs_per_req'])} allocations** "
                         f"(malloc+calloc+realloc) and {fmt(ac['frees_per_req'])} frees per request "
                         f"(bpftrace uprobes, h3load -c 4 -m 16, {ac['ok']} answers)")
    rss = sw.get("rss") or {}
    if rss:
        settle = next((v.get("settle_s") for v in rss.values()), 0)
        lines += ["", "| RSS MiB | " + " | ".join(names[k] for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        lines.append("| at start (before any load) | "
                     + " | ".join(fmt((rss.get(k, {}).get("start_kib") or 0) / 1024 or None) for k in keys) + " |")
        lines.append("| peak (highest VmHWM of the points) | "
                     + " | ".join(fmt((rss.get(k, {}).get("peak_kib") or 0) / 1024 or None) for k in keys) + " |")
        if settle:
            lines.append(f"| {settle} s after the last load | "
                         + " | ".join(fmt((rss.get(k, {}).get("settled_kib") or 0) / 1024 or None)
                                      for k in keys) + " |")
        lines.append("")
    for w in sw.get("warnings", []):
        lines.append(f"- **{w}**")
    if failed:
        lines.append(f"- **NON-2XX ANSWERS**: " + "; ".join(failed))
    return "\n".join(lines) + "\n"


def sweep_markdown_all(a, sw: dict) -> str:
    """A table per client, the extras (allocations, RSS) under the last; then the
    RSS-under-downloads table when that step ran."""
    clients = sw.get("clients") or ["h3load"]
    md = ""
    if sw["points"]:
        md = "\n".join(sweep_markdown(a, sw, cl, extras=(i == len(clients) - 1))
                       for i, cl in enumerate(clients))
    if sw.get("rss_downloads"):
        md += ("\n" if md else "") + rss_downloads_markdown(a, sw)
    return md


def sweep_failures(sw: dict | None) -> list[str]:
    if not sw:
        return []
    by = sw.get("by_client") or {"h3load": sw["runs"]}
    return [f"{cl}: {k} at {p}: {r['non_2xx']} non-2xx"
            for cl, pts in by.items() for p, runs in pts.items() for k, r in runs.items()
            if r.get("non_2xx")] + list((sw.get("rss_downloads") or {}).get("failures", []))


# ----------------------------------------------------------------- report


def fmt(v, digits=None) -> str:
    if v is None:
        return "–"
    if v == float("inf"):
        return "∞"
    if digits is None:
        av = abs(v)
        digits = 0 if av >= 1000 else 1 if av >= 100 else 2 if av >= 1 else 3
    return f"{v:,.{digits}f}"


def rows_for(a, res: dict) -> list[tuple[str, str, str, list]]:
    """(key, label, better, [value per driver])"""

    def get(drv, *path):
        v = res.get(drv)
        for p in path:
            if not isinstance(v, dict):
                return None
            v = v.get(p)
        return v

    size = a.bulk_bytes
    size_s = f"{size // (1024 * MIB)} GiB" if size % (1024 * MIB) == 0 else f"{size / MIB:g} MiB"
    specs = [
        ("req_s", f"small-GET req/s (c={a.clients}, m={a.streams}, {a.duration} s)", "↑", ("small", "req_s")),
        ("req_per_cpu_s", "small-GET requests per spooky CPU-second", "↑", ("small", "req_per_cpu_s")),
        ("cpu_s_per_100k", "spooky CPU-seconds per 100k requests", "↓", ("small", "cpu_s_per_100k")),
        ("bulk_mib_s", f"bulk download MiB/s ({size_s}, 1 connection)", "↑", ("bulk", "mib_s")),
        ("bulk_cpu_s_per_gib", "bulk: spooky CPU-seconds per GiB", "↓", ("bulk", "cpu_s_per_gib")),
        ("syscalls_per_req", "UDP syscalls per request (spooky /metrics)", "↓", ("small", "syscalls_per_req")),
        ("strace_syscalls_per_req", "all syscalls per request (strace -c -f)", "↓", ("strace", "syscalls_per_req")),
        ("ring_ops_per_req", "upstream TCP ring operations per request", "", ("small", "ring_ops_per_req")),
        ("bulk_ring_ops_per_mib", "bulk: upstream TCP ring operations per MiB", "", ("bulk", "ring_ops_per_mib")),
        ("dps_all", "small-GET datagrams per UDP syscall, in+out", "↑", ("small", "dgrams_per_syscall_all")),
        ("dps_in", "small-GET datagrams per syscall, in", "↑", ("small", "dgrams_per_syscall_in")),
        ("dps_out", "small-GET datagrams per syscall, out", "↑", ("small", "dgrams_per_syscall_out")),
        ("bulk_dps_all", "bulk datagrams per UDP syscall, in+out", "↑", ("bulk", "dgrams_per_syscall_all")),
        ("bulk_dps_in", "bulk datagrams per syscall, in", "↑", ("bulk", "dgrams_per_syscall_in")),
        ("bulk_dps_out", "bulk datagrams per syscall, out", "↑", ("bulk", "dgrams_per_syscall_out")),
        ("rss_mib", "peak RSS MiB (VmHWM)", "↓", None),
    ]
    out = []
    for key, label, better, path in specs:
        if path is None:
            vals = [
                (res[d]["vm_hwm_kib"] / 1024 if res.get(d, {}).get("vm_hwm_kib") else None)
                for d in a.drivers
            ]
        else:
            vals = [get(d, *path) for d in a.drivers]
        out.append((key, label, better, vals))
    return out


def markdown(a, res: dict, meta: dict) -> str:
    drivers = a.drivers
    pairs = ratio_pairs(drivers)
    head = ["figure", *drivers] + [h for _n, _d, h in pairs] + ["better"]
    lines = [
        f"## spooky I/O: io_uring vs epoll, upstream TCP on the ring vs tokio ({meta['when']})",
        "",
        f"host: {meta['cpus']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}, "
        f"spooky {meta['git']} ({meta.get('profile', 'release')}); io.workers={a.workers}, "
        f"io.batch={a.batch}; "
        + (f"spooky pinned to CPU {sorted(a.spooky_cpus)}, load generator and backends on the others."
           if a.spooky_cpus else "load generator, demo backends and spooky share the same CPUs."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|",
    ]
    for _key, label, better, vals in rows_for(a, res):
        cells = [label, *(fmt(v) for v in vals)]
        for n, d, _h in pairs:
            r = div(vals[drivers.index(n)], vals[drivers.index(d)]) if better else None
            cells.append(f"**{r:.2f}×**" if r is not None and r != float("inf") else fmt(r))
        cells.append(better)
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for d in drivers:
        r = res.get(d, {})
        bits = []
        backend, upstream_io = variant(d)
        if backend == "uring":
            if r.get("fell_back_to_epoll") or not r.get("io_uring_fds"):
                bits.append("**io_uring was NOT in use** (fallback to epoll; see the log)")
            else:
                bits.append(f"{r.get('io_uring_fds')} io_uring instance(s) open in the process")
        if r.get("ring_workers"):
            bits.append(f"upstream TCP on the ring in {r['ring_workers']:.0f} worker(s)")
        elif upstream_io == "ring":
            bits.append("**upstream TCP was NOT on the ring**")
        errs = r.get("small", {}).get("errors")
        if errs:
            bits.append(f"{errs} small-GET requests failed")
        if r.get("bulk") and not r["bulk"].get("complete"):
            bits.append("bulk download incomplete")
        for ph in ("small", "bulk"):
            md = r.get(ph, {}).get("metrics_delta", {})
            if md.get("gso_fallbacks"):
                bits.append(f"{md['gso_fallbacks']:.0f} GSO fallbacks ({ph})")
            if md.get("send_errors"):
                bits.append(f"{md['send_errors']:.0f} send errors ({ph})")
        st = r.get("strace")
        if st and st.get("top"):
            top = ", ".join(f"{n} {c / st['requests']:.2f}" for n, c in st["top"][:6] if st["requests"])
            bits.append(f"strace per request: {top}")
        if bits:
            notes.append(f"- **{d}**: " + "; ".join(bits))
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "↑/↓: higher/lower is better. ring/tokio compares upstream TCP on the worker's "
        "io_uring with tokio's TCP, both on the io_uring UDP driver; uring/epoll compares the "
        "UDP drivers, both with tokio's TCP. CPU is utime+stime of the "
        "spooky process (all threads); UDP syscalls count receive/send calls (epoll) or "
        "io_uring_enter calls (uring) as spooky's counters report them — ∞ means datagrams "
        "arrived with no syscall at all (multishot receive on a provided buffer ring); strace "
        "counts every "
        "syscall of every spooky thread during a separate, slowed-down run.",
    ]
    return "\n".join(lines) + "\n"


def maybe_png(a, res: dict, path: str) -> bool:
    pairs = ratio_pairs(a.drivers)
    if not pairs:
        return False
    try:
        import matplotlib  # type: ignore

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore
    except Exception:  # noqa: BLE001 - no matplotlib: skip quietly
        return False
    num, den, heading = pairs[0]
    iu, ie = a.drivers.index(num), a.drivers.index(den)
    labels, ratios, colors = [], [], []
    for _k, label, better, vals in rows_for(a, res):
        r = div(vals[iu], vals[ie])
        if r is None or r == float("inf") or not better:
            continue
        labels.append(f"{label} {better}")
        ratios.append(r)
        good = r >= 1 if better == "↑" else r <= 1
        colors.append("tab:green" if good else "tab:red")
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    ax.barh(range(len(labels)), ratios, color=colors)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{num} / {den}")
    ax.set_title(f"spooky: {heading} (green = {num} better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def host_meta() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        git = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        git = "?"
    return {
        "when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "git": git,
    }


# ------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(
        description="spooky io_uring vs epoll comparison (make perf-io). "
        "Every option also reads an env var PERF_IO_<NAME>.",
    )
    p.add_argument("--duration", type=int, default=env_default("PERF_IO_DURATION", 10),
                   help="small-GET run length in seconds (default 10)")
    p.add_argument("--clients", type=int, default=env_default("PERF_IO_CLIENTS", 4),
                   help="h3load -c for the small-GET run (default 4)")
    p.add_argument("--streams", type=int, default=env_default("PERF_IO_STREAMS", 16),
                   help="h3load -m for the small-GET run (default 16)")
    p.add_argument("--bulk-bytes", type=int, default=env_default("PERF_IO_BULK_BYTES", 1 << 30),
                   help="size of the bulk download in bytes (default 1073741824 = 1 GiB)")
    p.add_argument("--bulk-requests", type=int, default=env_default("PERF_IO_BULK_REQUESTS", 1),
                   help="bulk downloads, one after the other on one connection (default 1)")
    p.add_argument("--bulk-timeout", type=int, default=env_default("PERF_IO_BULK_TIMEOUT", 600),
                   help="seconds allowed per bulk download (default 600)")
    p.add_argument("--strace-duration", type=int, default=env_default("PERF_IO_STRACE_DURATION", 3),
                   help="seconds of the small-GET run under strace -c -f; 0 skips (default 3)")
    p.add_argument("--warmup", type=int, default=env_default("PERF_IO_WARMUP", 1),
                   help="seconds of unmeasured small-GET load first (default 1)")
    p.add_argument("--workers", default=env_default("PERF_IO_WORKERS", "auto"),
                   help="io.workers for spooky (default auto = one per core)")
    p.add_argument("--batch", type=int, default=env_default("PERF_IO_BATCH", 64),
                   help="io.batch for spooky (default 64)")
    p.add_argument("--drivers", default=env_default("PERF_IO_DRIVERS", "uring+ring,uring+tokio,epoll"),
                   help="comma-separated variants in run order: io.backend[+io.upstream_io][+zc] "
                   "(default uring+ring,uring+tokio,epoll)")
    p.add_argument("--out-dir", default=env_default("PERF_IO_OUT", os.path.join(ROOT, "perf", "out")),
                   help="where the .md/.json/.png reports go (default perf/out)")
    p.add_argument("--no-build", action="store_true", default=bool(os.environ.get("PERF_IO_NO_BUILD")),
                   help="use the binaries already built")
    p.add_argument("--profile", default=env_default("PERF_IO_PROFILE", "release"),
                   help="how the binaries were built, for the report header (default release: "
                   "fat LTO; say e.g. 'release, thin LTO' when CARGO_PROFILE_RELEASE_LTO=thin)")
    p.add_argument("--cargo-profile", default=env_default("PERF_IO_CARGO_PROFILE", "release"),
                   help="cargo profile to build and run (default release; `perf` = thin LTO, "
                   "quicker to build, see Cargo.toml)")
    p.add_argument("--pin", action="store_true", default=bool(os.environ.get("PERF_IO_PIN")),
                   help="spooky on the last CPU (io.workers 1 unless --workers is given), the "
                   "load generator and backends on the others: less scheduler noise on small hosts")
    p.add_argument("--pool-connections", type=int, default=env_default("PERF_IO_POOL_CONNECTIONS", 32),
                   help="upstream pool.connections_per_backend for every spooky run (default 32)")
    p.add_argument("--sweep-points", default=env_default("PERF_IO_SWEEP_POINTS", "4x1,4x16,4x100,64x1"),
                   help="sweep loads, CONNECTIONSxSTREAMS, comma-separated (default 4x1,4x16,4x100,64x1)")
    p.add_argument("--sweep-duration", type=int, default=env_default("PERF_IO_SWEEP_DURATION", 5),
                   help="seconds per sweep point and target (default 5)")
    p.add_argument("--sweep-drivers", default=env_default("PERF_IO_SWEEP_DRIVERS", "uring,epoll"),
                   help="spooky variants in the sweep (default uring,epoll)")
    p.add_argument("--sweep-workers", default=env_default("PERF_IO_SWEEP_WORKERS", "1"),
                   help="io.workers for spooky in the sweep (default 1, as HAProxy's nbthread 1)")
    p.add_argument("--haproxy", default=env_default("HAPROXY", None),
                   help="HAProxy binary with QUIC for the sweep's peer column (env HAPROXY; "
                   "default: haproxy on PATH if haproxy -vv lists QUIC)")
    p.add_argument("--goal-vs-haproxy", type=float, default=env_default("PERF_IO_GOAL_VS_HAPROXY", 1.5),
                   help="spooky/HAProxy ratio the sweep reports as met (default 1.5)")
    p.add_argument("--alloc-requests", type=int, default=env_default("PERF_IO_ALLOC_REQUESTS", 2000),
                   help="requests of the sweep's allocation count (bpftrace uprobes on libc malloc, "
                   "root only); 0 skips (default 2000)")
    p.add_argument("--sweep-repeat", type=int, default=env_default("PERF_IO_SWEEP_REPEAT", 1),
                   help="runs of every sweep point per target, interleaved; the table shows the "
                   "median (default 1)")
    p.add_argument("--settle-rss", type=int, default=env_default("PERF_IO_SETTLE_RSS", 30),
                   help="after the sweep, seconds every target stays idle before its RSS is read "
                   "again (does RSS return to its baseline?); 0 skips (default 30)")
    p.add_argument("--idle-conns", type=int, default=env_default("PERF_IO_IDLE_CONNS", 1000),
                   help="RSS per idle connection at this many connections (perf/src/bin/"
                   "idle_conns.rs), each target alone; 0 skips (default 1000)")
    p.add_argument("--idle-drivers", default=env_default("PERF_IO_IDLE_DRIVERS", "uring,epoll"),
                   help="spooky variants of the idle-connection step (default uring,epoll; "
                   "HAProxy joins when found, as in the sweep)")
    p.add_argument("--idle-repeat", type=int, default=env_default("PERF_IO_IDLE_REPEAT", 1),
                   help="runs of the idle-connection step per target; the table shows the median")
    p.add_argument("--idle-settle", type=int, default=env_default("PERF_IO_IDLE_SETTLE", 3),
                   help="seconds idle_conns holds the connections before reading RSS (default 3)")
    p.add_argument("--idle-goal-kib", type=float, default=env_default("PERF_IO_IDLE_GOAL_KIB", 30.0),
                   help="KiB per idle connection the table checks spooky against (default 30)")
    p.add_argument("--idle-only", action="store_true", default=bool(os.environ.get("PERF_IO_IDLE_ONLY")),
                   help="run only the idle-connection step (make perf-idle)")
    p.add_argument("--no-sweep", action="store_true", default=bool(os.environ.get("PERF_IO_NO_SWEEP")),
                   help="skip the sweep")
    p.add_argument("--sweep-only", action="store_true", default=bool(os.environ.get("PERF_IO_SWEEP_ONLY")),
                   help="run only the sweep (no per-driver small-GET/bulk/strace table)")
    p.add_argument("--sweep-clients", default=env_default("PERF_IO_SWEEP_CLIENTS", "h3load,gtlsclient,oha"),
                   help="HTTP/3 clients of the sweep, each found one drives every point and target "
                        "(h3load; gtlsclient: Debian ngtcp2-client; oha: quinn+h3, "
                        "cargo install --locked oha --features http3 --root perf/out/bin)")
    p.add_argument("--gtlsclient", default=env_default("PERF_IO_GTLSCLIENT", "gtlsclient"),
                   help="the ngtcp2 client binary")
    p.add_argument("--gtls-rounds", type=int, default=env_default("PERF_IO_GTLS_ROUNDS", 20),
                   help="gtlsclient sends M x this many requests per connection (process)")
    p.add_argument("--oha", default=env_default("PERF_IO_OHA", os.path.join(ROOT, "perf", "out", "bin", "bin", "oha")),
                   help="oha built with --features http3 (quinn + h3)")
    p.add_argument("--sweep-idle-timeout", type=int, default=env_default("PERF_IO_SWEEP_IDLE_TIMEOUT", 3),
                   help="seconds: the sweep targets' QUIC idle timeout (oha waits for the server "
                        "to close after its GOAWAY, so this is its tail at every run)")
    p.add_argument("--sweep-max-streams", type=int, default=env_default("PERF_IO_SWEEP_MAX_STREAMS", 100),
                   help="spooky's quic.max_streams_bidi in the sweep (HAProxy's default "
                        "tune.quic.fe.stream.max-concurrent is 100): the in-flight cap of clients "
                        "without one of their own (gtlsclient)")
    p.add_argument("--rss-downloads", action="store_true", default=bool(os.environ.get("PERF_IO_RSS_DOWNLOADS")),
                   help="after the sweep points (none with --sweep-points ''), per target and "
                        "--sweep-repeat round: VmHWM reset, then a small-GET load (--rss-small-point) "
                        "and --rss-download-clients clients each downloading --rss-download-streams x "
                        "/bytes/--rss-download-bytes as concurrent streams on one connection, at once; "
                        "peak RSS and RSS after (issue 9's memory load; default off)")
    p.add_argument("--rss-small-point", default=env_default("PERF_IO_RSS_SMALL_POINT", "4x100"),
                   help="CONNECTIONSxSTREAMS of the small-GET load beside the downloads (default 4x100)")
    p.add_argument("--rss-duration", type=int, default=env_default("PERF_IO_RSS_DURATION", 10),
                   help="seconds of the small-GET load beside the downloads (default 10)")
    p.add_argument("--rss-download-clients", type=int, default=env_default("PERF_IO_RSS_DOWNLOAD_CLIENTS", 2),
                   help="download clients, one connection each (default 2)")
    p.add_argument("--rss-download-streams", type=int, default=env_default("PERF_IO_RSS_DOWNLOAD_STREAMS", 50),
                   help="downloads per client, all at once on its connection (default 50)")
    p.add_argument("--rss-download-bytes", type=int, default=env_default("PERF_IO_RSS_DOWNLOAD_BYTES", MIB),
                   help="size of each download (default 1048576)")
    p.add_argument("--quick", action="store_true",
                   help="short run: 5 s small-GET, 256 MiB bulk, 2 s strace, 3 s per sweep point")
    a = p.parse_args()
    if a.quick:
        a.duration, a.bulk_bytes, a.strace_duration = 5, 256 * MIB, 2
        a.sweep_duration = 3
    a.sweep_points = parse_points(a.sweep_points)
    a.rss_small_point = parse_points(a.rss_small_point)[0]
    a.sweep_drivers = [d.strip() for d in a.sweep_drivers.split(",") if d.strip()]
    a.sweep_clients = [d.strip() for d in a.sweep_clients.split(",") if d.strip()]
    a.idle_drivers = [d.strip() for d in a.idle_drivers.split(",") if d.strip()]
    a.sweep_repeat = max(1, a.sweep_repeat)
    a.idle_repeat = max(1, a.idle_repeat)
    if a.idle_only:
        a.sweep_only, a.no_sweep = False, True
        a.idle_conns = a.idle_conns or 1000
    if a.no_sweep and a.sweep_only:
        p.error("--no-sweep and --sweep-only exclude each other")
    a.drivers = [d.strip() for d in a.drivers.split(",") if d.strip()]
    a.spooky_cpus = None
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--pin needs at least 2 CPUs")
        a.spooky_cpus = {cpus[-1]}
        # This script and every other child (h3load, backends) stay off it.
        os.sched_setaffinity(0, set(cpus[:-1]))
        if a.workers == "auto":
            a.workers = "1"
    return a


def main() -> int:
    a = parse_args()
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    # Even when started with SIGINT ignored (a background job), Ctrl-C/SIGINT stops the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    target = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
    bins = {n: os.path.join(target, a.cargo_profile, n) for n in ("spooky", "h3load", "idle_conns")}
    work = None
    try:
        if not a.no_build:
            log(f"build: cargo build --profile {a.cargo_profile} --locked -p spooky -p spooky-perf")
            subprocess.run(
                [os.environ.get("CARGO", "cargo"), "build", "--profile", a.cargo_profile, "--locked",
                 "-p", "spooky", "-p", "spooky-perf"],
                cwd=ROOT, check=True,
            )
        for n, b in bins.items():
            if not os.access(b, os.X_OK):
                log(f"missing {b}: build it (or unset --no-build)")
                return 2
        work = tempfile.mkdtemp(prefix="spooky-perf-io-")
        subprocess.run([os.path.join(ROOT, "scripts", "gen-cert.sh"), os.path.join(work, "certs")],
                       check=True, stdout=subprocess.DEVNULL)
        backend_ports = [free_port() for _ in range(3)]
        log(f"backends: 3 demo backends on 127.0.0.1:{','.join(map(str, backend_ports))} (work dir {work})")
        for i, bp in enumerate(backend_ports, 1):
            b = spawn([bins["spooky"], "demo-backend", "--listen", f"127.0.0.1:{bp}",
                       "--name", f"backend-{i}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_tcp(bp, f"demo backend {i}", b)

        meta = host_meta()
        meta["loadavg_1m_at_start"] = os.getloadavg()[0]
        if meta["loadavg_1m_at_start"] > 0.5 * (os.cpu_count() or 1):
            log(f"note: 1-minute load average is {meta['loadavg_1m_at_start']:.2f}; "
                "other work on this host makes the figures noisy")
        meta["profile"] = a.profile
        res: dict = {}
        if not a.sweep_only and not a.idle_only:
            for drv in a.drivers:
                backend, upstream_io = variant(drv)
                log(f"{drv}: starting spooky (io.backend: {backend}, io.upstream_io: {upstream_io}, "
                    f"io.workers: {a.workers})")
                res[drv] = run_driver(a, drv, bins, work, backend_ports)
        sw = None if a.no_sweep else run_sweep(a, bins, work, backend_ports)
        idle = run_idle(a, bins, work, backend_ports) if a.idle_conns > 0 else None

        md = "" if a.sweep_only or a.idle_only else markdown(a, res, meta)
        if a.idle_only:
            md += (f"host: {meta['cpus']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}, "
                   f"spooky {meta['git']} ({meta.get('profile', 'release')})\n\n")
        if sw:
            if a.sweep_only:
                md += (f"host: {meta['cpus']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}, "
                       f"spooky {meta['git']} ({meta.get('profile', 'release')})\n\n")
            else:
                md += "\n"
            md += sweep_markdown_all(a, sw)
        if idle:
            md += "\n" + idle_markdown(a, idle)
        os.makedirs(a.out_dir, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = os.path.join(a.out_dir, f"io-{stamp}")
        with open(base + ".md", "w") as f:
            f.write(md)
        raw = {
            "meta": meta,
            "params": {k: v for k, v in vars(a).items()},
            "table": {
                key: {
                    "label": label,
                    "better": {"↑": "higher", "↓": "lower"}.get(better, "n/a"),
                    **dict(zip(a.drivers, vals)),
                    **{
                        f"ratio_{n}_vs_{d}": div(vals[a.drivers.index(n)], vals[a.drivers.index(d)])
                        for n, d, _h in ratio_pairs(a.drivers)
                    },
                }
                for key, label, better, vals in rows_for(a, res)
            },
            "runs": res,
            "sweep": sw,
            "idle": idle,
        }
        with open(base + ".json", "w") as f:
            json.dump(finite(raw), f, indent=2, default=str)
        png = maybe_png(a, res, base + ".png")
        print(md)
        log(f"wrote {base}.md, {base}.json" + (f", {base}.png" if png else ""))
        failures = sweep_failures(sw) + (idle or {}).get("failures", []) + [
            f"{d} {ph}: {r[ph]['errors']} non-2xx"
            for d, r in res.items() for ph in ("small",) if r.get(ph, {}).get("errors")
        ] + [f"{d} bulk: incomplete" for d, r in res.items()
             if r.get("bulk") and not r["bulk"].get("complete")]
        if failures:
            log("FAILED: requests answered other than 2xx (or not at all):")
            for f_ in failures:
                log(f"  {f_}")
            return 1
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        log(f"error: {e}")
        if work:
            log(f"configs and spooky logs kept in {work}")
            work = None
        return 1
    finally:
        cleanup()
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
