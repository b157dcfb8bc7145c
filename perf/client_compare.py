#!/usr/bin/env python3
"""Why do HTTP/3 clients read a proxy differently? (docs/perf.md, "Clients")

At one sweep point (default 4x100) drives each target (spooky variants and,
with --haproxy, HAProxy) with every client io_compare.py knows (h3load,
gtlsclient, oha), twice per client and target:

  1. plain: answers per proxy CPU-second; for spooky also, from its
     /metrics, datagrams in/out per request, datagrams per UDP syscall,
     packets lost and retransmitted, and spooky_requests_in_flight sampled
     every 5 ms in a separate run (its scrapes cost spooky CPU) (mean and max: how many streams the client really keeps open
     at the proxy and how bursty its flights are);
  2. under `strace -c -f -p PID`: every syscall per request, by name (use an
     epoll variant: io_uring's multishot receives and ring sends are not
     syscalls, so strace undercounts the uring driver).

Prints one Markdown table per target and writes perf/out/clients-<ts>.{md,json}.
Python 3 standard library only, plus the clients themselves.

  python3 perf/client_compare.py --point 4x100 --targets epoll,uring \\
      --haproxy perf/out/haproxy-src/haproxy --duration 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import io_compare as ic  # noqa: E402

log = ic.log


def sample_in_flight(admin: str, stop_ev: threading.Event, out: list[float]) -> None:
    while not stop_ev.is_set():
        try:
            out.append(ic.scrape(admin).get("spooky_requests_in_flight", 0.0))
        except OSError:
            pass
        time.sleep(0.005)


def quic_counters(m: dict[str, float]) -> dict[str, float]:
    return {
        "lost": m.get("spooky_quic_packets_lost_total", 0.0),
        "retransmitted": m.get("spooky_quic_packets_retransmitted_total", 0.0),
        "paced": m.get("spooky_quic_paced_packets_total", 0.0),
        "sent_pkts": m.get("spooky_quic_packets_sent_total", 0.0),
    }


def one_run(a, cl, t: dict, c: int, m: int, strace_out: str | None, sample: bool = False) -> dict:
    pid = t["proc"].pid
    st = None
    if strace_out:
        st = ic.spawn([shutil.which("strace"), "-c", "-f", "-p", str(pid), "-o", strace_out],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attach to every thread first
    admin = t.get("admin")
    m0 = ic.scrape(admin) if admin else None
    samples: list[float] = []
    ev = threading.Event()
    th = None
    if admin and sample:
        th = threading.Thread(target=sample_in_flight, args=(admin, ev, samples), daemon=True)
        th.start()
    cpu0 = ic.cpu_seconds(pid)
    r = cl.run(t["port"], c, m, a.duration)
    cpu = ic.cpu_seconds(pid) - cpu0
    ev.set()
    if th:
        th.join()
    m1 = ic.scrape(admin) if admin else None
    row: dict = {"ok": r["ok"], "non_2xx": r["non_2xx"], "wall_s": r["secs"], "cpu_s": cpu,
                 "ok_per_cpu_s": ic.div(r["ok"], cpu), "cmd": r["cmd"]}
    if st:
        ic.stop(st, signal.SIGINT, grace=30)
        total, rows = ic.parse_strace(strace_out)
        row["syscalls_per_req"] = ic.div(total, r["ok"])
        row["syscalls_top"] = {n: calls / r["ok"] for n, calls in rows[:8]} if r["ok"] else {}
    if m0 is not None:
        d = ic.delta(ic.io_counters(m0), ic.io_counters(m1))
        q = ic.delta(quic_counters(m0), quic_counters(m1))
        reqs = d["requests"] or None
        row.update({
            "dgrams_in_per_req": ic.div(d["datagrams_in"], reqs),
            "dgrams_out_per_req": ic.div(d["datagrams_out"], reqs),
            "dgrams_per_syscall_in": ic.per_syscall(d["datagrams_in"], d["syscalls_in"]),
            "dgrams_per_syscall_out": ic.per_syscall(d["datagrams_out"], d["syscalls_out"]),
            "lost": q["lost"], "retransmitted": q["retransmitted"], "paced": q["paced"],
        })
        if samples:
            busy = [s for s in samples if s > 0] or [0.0]
            row["in_flight_mean"] = statistics.mean(busy)
            row["in_flight_max"] = max(samples)
            row["in_flight_p10"] = sorted(busy)[len(busy) // 10]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--point", default="4x100", help="connections x streams per connection")
    p.add_argument("--targets", default="epoll,uring", help="spooky variants (io_compare.py names)")
    p.add_argument("--haproxy", default=os.environ.get("HAPROXY"), help="HAProxy with QUIC")
    p.add_argument("--clients", default="h3load,gtlsclient,oha")
    p.add_argument("--duration", type=int, default=3)
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--cargo-profile", default="release")
    p.add_argument("--gtlsclient", default="gtlsclient")
    p.add_argument("--gtls-rounds", type=int, default=20)
    p.add_argument("--oha", default=os.path.join(ic.ROOT, "perf", "out", "bin", "bin", "oha"))
    p.add_argument("--max-streams", type=int, default=100)
    p.add_argument("--idle-timeout", type=int, default=3,
                   help="targets' idle timeout, s (oha's exit waits for it)")
    p.add_argument("--out-dir", default=os.path.join(ic.ROOT, "perf", "out"))
    a = p.parse_args()
    (c, m), = ic.parse_points(a.point)
    # What io_compare's helpers read from its own arguments.
    a.sweep_workers, a.batch, a.pool_connections = "1", 64, 32
    a.sweep_max_streams, a.spooky_cpus = a.max_streams, None
    a.sweep_clients = [x.strip() for x in a.clients.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, ic._on_signal)
    target_dir = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ic.ROOT, "target"))
    bins = {n: os.path.join(target_dir, a.cargo_profile, n) for n in ("spooky", "h3load")}
    work = tempfile.mkdtemp(prefix="spooky-clients-")
    res: dict = {"point": a.point, "duration": a.duration, "targets": {}}
    try:
        subprocess.run([os.path.join(ic.ROOT, "scripts", "gen-cert.sh"), os.path.join(work, "certs")],
                       check=True, stdout=subprocess.DEVNULL)
        ports = [ic.free_port() for _ in range(3)]
        for i, bp in enumerate(ports, 1):
            b = ic.spawn([bins["spooky"], "demo-backend", "--listen", f"127.0.0.1:{bp}",
                          "--name", f"backend-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ic.wait_tcp(bp, f"demo backend {i}", b)
        targets = [ic.start_spooky_target(a, d.strip(), bins, work, ports, tag="clients",
                                          idle_timeout_ms=a.idle_timeout * 1000)
                   for d in a.targets.split(",") if d.strip()]
        if a.haproxy:
            path, compat = ic.find_haproxy(argparse.Namespace(haproxy=a.haproxy))
            targets.append(ic.start_haproxy(a, path, compat, work, ports,
                                            client_timeout=f"{a.idle_timeout}s"))
        clients = ic.find_clients(a, bins)
        strace = shutil.which("strace") and not a.no_strace
        for t in targets:
            ic.h3load(bins["h3load"], t["port"], ["-c", "4", "-m", "16", "-d", "1", "/"], 60)
        for cl in clients:
            for t in targets:
                rows = {}
                rows["plain"] = one_run(a, cl, t, c, m, None)
                if t.get("admin"):
                    smp = one_run(a, cl, t, c, m, None, sample=True)
                    for k in ("in_flight_mean", "in_flight_p10", "in_flight_max"):
                        rows["plain"][k] = smp.get(k)
                log(f"{a.point} {cl.name:<10} {t['name']:<14} plain  {json.dumps(ic.finite({k: round(v, 3) if isinstance(v, float) else v for k, v in rows['plain'].items() if k != 'cmd'}))}")
                if strace:
                    rows["strace"] = one_run(a, cl, t, c, m,
                                             os.path.join(work, f"strace-{cl.name}-{t['key']}.txt"))
                    log(f"{a.point} {cl.name:<10} {t['name']:<14} strace {ic.fmt(rows['strace'].get('syscalls_per_req'))} "
                        f"syscalls/req: " + ", ".join(f"{n} {v:.3f}" for n, v in rows["strace"].get("syscalls_top", {}).items()))
                res["targets"].setdefault(t["key"], {})[cl.name] = rows
        lines = [f"## Clients at {a.point} ({a.duration} s per run; spooky io.workers=1, max_streams_bidi {a.max_streams})", ""]
        head = ["target", "client", "ok/CPU-s", "µs CPU/req", "datagrams in/out per req",
                "datagrams per recv/send syscall", "in flight mean/p10/max", "lost/retx",
                "syscalls/req (strace)", "top syscalls per req", "non-2xx"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        bad = []
        for tk, per in res["targets"].items():
            for cn, rows in per.items():
                pl, s = rows["plain"], rows.get("strace", {})
                non = pl["non_2xx"] + s.get("non_2xx", 0)
                if non:
                    bad.append(f"{cn} on {tk}: {non}")
                lines.append("| " + " | ".join([
                    tk, cn, ic.fmt(pl["ok_per_cpu_s"]), ic.fmt(ic.div(pl["cpu_s"] * 1e6, pl["ok"])),
                    f"{ic.fmt(pl.get('dgrams_in_per_req'), 3)}/{ic.fmt(pl.get('dgrams_out_per_req'), 3)}",
                    f"{ic.fmt(pl.get('dgrams_per_syscall_in'))}/{ic.fmt(pl.get('dgrams_per_syscall_out'))}",
                    f"{ic.fmt(pl.get('in_flight_mean'))}/{ic.fmt(pl.get('in_flight_p10'))}/{ic.fmt(pl.get('in_flight_max'))}",
                    f"{ic.fmt(pl.get('lost'), 0)}/{ic.fmt(pl.get('retransmitted'), 0)}",
                    ic.fmt(s.get("syscalls_per_req")),
                    ", ".join(f"{n} {v:.2f}" for n, v in list(s.get("syscalls_top", {}).items())[:5]) or "–",
                    str(non),
                ]) + " |")
        md = "\n".join(lines) + "\n"
        print(md)
        os.makedirs(a.out_dir, exist_ok=True)
        base = os.path.join(a.out_dir, "clients-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        with open(base + ".md", "w") as f:
            f.write(md)
        with open(base + ".json", "w") as f:
            json.dump(ic.finite(res), f, indent=2, default=str)
        log(f"wrote {base}.md, {base}.json")
        if bad:
            log("FAILED: non-2xx answers or failed requests: " + "; ".join(bad))
            return 1
        return 0
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        log(f"error: {e} (work dir {work} kept)")
        work = None
        return 1
    finally:
        ic.cleanup()
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
