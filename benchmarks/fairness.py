"""Fairness: a quiet sandbox's exec and DNS latency alone, then beside a sandbox that floods the
supervisor with work (execs to judge, refused calls, refused connections, DNS queries)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence

from benchmarks.harness import CATEGORIES, BenchError, Config, check_exec, progress, time_ms
from benchmarks.results import Measure, Result, Target
from corral import Deny, Policy, Sandbox

_FLOOD = r"""
import ctypes, os, random, resource, socket, struct, subprocess, sys, threading, time
seconds, holders, fds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + seconds
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
fds = min(fds, hard - 64)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for _ in range(holders):  # processes whose descriptors every exec's pipe check has to read
    if os.fork() == 0:
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(fds)]
        time.sleep(seconds + 5)
        os._exit(0)
libc = ctypes.CDLL(None)
resolver = open("/etc/resolv.conf").read().split("nameserver")[1].split()[0]

def execs():  # an interactive shell on pipes: the dearest exec for the tripwires to judge
    while time.monotonic() < end:
        subprocess.run(["sh"], input=b"true\n")

def denials():
    while time.monotonic() < end:
        libc.unshare(0x10000000)  # CLONE_NEWUSER, refused by seccomp

def connects():
    while time.monotonic() < end:
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("10.0.0.1", 80))  # an internal address: refused by the fence
        except OSError:
            pass
        s.close()

def dns():  # distinct names under an allowed wildcard, as fast as they can be sent
    q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    q.setblocking(False)
    n = 0
    while time.monotonic() < end:
        n += 1
        name = b"".join(bytes([len(p)]) + p for p in (b"n%d" % n, b"flood", b"bench", b"internal"))
        try:
            header = struct.pack(">HHHHHH", n & 0xFFFF, 0x100, 1, 0, 0, 0)
            q.sendto(header + name + b"\0" + struct.pack(">HH", 1, 1), (resolver, 53))
            while True:
                q.recv(512)
        except OSError:
            time.sleep(0.0005)

threads = [threading.Thread(target=f) for f in (execs, execs, denials, connects, dns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

_QUIET_DNS = r"""
import socket, sys, time
out = []
for i in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    socket.getaddrinfo("quiet.bench.internal", 443, socket.AF_INET, socket.SOCK_STREAM)
    out.append((time.perf_counter() - t0) * 1000)
print(" ".join(f"{x:.3f}" for x in out))
"""


_FLOOD_HOLDERS, _FLOOD_FDS = 20, 1000


def _p99(samples: Sequence[float]) -> float:
    s = sorted(samples)
    return round(s[max(0, math.ceil(0.99 * len(s)) - 1)], 3)


def bench_fairness(cfg: Config) -> list[Result]:
    """A quiet sandbox's exec and DNS latency alone, then while another floods execs (of shells on
    pipes, with 20 of its processes holding 1,000 descriptors each), refused calls,
    connections to refused addresses and DNS queries for distinct names."""
    runs = cfg.warm_runs
    progress(f"fairness: {runs} quiet execs and lookups, alone and beside a flooding sandbox")
    quiet = Sandbox(
        Policy.from_dict(
            {
                "version": 1,
                "network": {
                    "egress": [{"host": "quiet.bench.internal", "ports": [443]}],
                    "hosts": {"quiet.bench.internal": "127.0.0.1"},
                },
            }
        ),
        keep_workspace=False,
    )
    flood_policy = Policy.from_dict(
        {
            "version": 1,
            "resources": {"processes": 256},
            "network": {"egress": [{"host": "*.flood.bench.internal", "ports": [443]}]},
            # Judged (and recorded) like any sandbox's, but left running: the flood is the point.
            "tripwires": {"responses": dict.fromkeys(CATEGORIES, "log")},
        }
    )
    flooder: Sandbox | None = None
    flood: threading.Thread | None = None
    try:

        def measure() -> tuple[list[float], list[float]]:
            execs = time_ms(lambda: check_exec(quiet), runs, cfg.warmup)
            r = quiet.exec(["python3", "-c", _QUIET_DNS, str(runs)], text=True)
            if r.exit_code != 0:
                raise BenchError(f"quiet DNS lookups failed: {r.stderr!r}")
            return execs, [float(x) for x in str(r.stdout).split()]

        alone_exec, alone_dns = measure()
        flooder = Sandbox(flood_policy, keep_workspace=False)
        seconds = 600.0  # cut short by the close below
        flood = threading.Thread(
            target=flooder.exec,
            args=(["python3", "-c", _FLOOD, str(seconds), str(_FLOOD_HOLDERS), str(_FLOOD_FDS)],),
            kwargs={"timeout": seconds},
            daemon=True,
        )
        flood.start()
        time.sleep(2.0 if not cfg.quick else 1.0)  # the holders open their descriptors, the loops start
        flooded_exec, flooded_dns = measure()
        events = flooder.events()
        denied = sum(getattr(e, "count", 1) for e in events if isinstance(e, Deny))
        execs = sum(1 for e in events if e.type == "proc.exec")
        queries = sum(1 for e in events if e.type == "dns.query")
        kept = len(events)
        elided = getattr(flooder, "events_elided", 0)
    finally:
        if flooder is not None:
            flooder.close(wait=True)
        if flood is not None:
            flood.join(10)
        quiet.close(wait=True)
    notes: dict[str, float | int | str] = {
        "exec_p99_alone_ms": _p99(alone_exec),
        "exec_p99_flooded_ms": _p99(flooded_exec),
        "flood_denials_seen": denied,
        "flood_execs_seen": execs,
        "flood_queries_seen": queries,
        "flood_events_kept": kept,
        "flood_events_elided": elided,
    }
    return [
        Result(
            key="fairness_exec",
            what="quiet `true` beside a flood",
            unit="ms",
            corral=Measure.of(flooded_exec),
            baseline=Measure.of(alone_exec),
            baseline_name="quiet alone",
            target=Target("max_delta", 5.0, "<= +5 ms"),
            notes=notes,
        ),
        Result(
            key="fairness_dns",
            what="quiet DNS lookup beside a flood",
            unit="ms",
            corral=Measure.of(flooded_dns),
            baseline=Measure.of(alone_dns),
            baseline_name="quiet alone",
            target=Target("max_delta", 5.0, "<= +5 ms"),
            notes={"dns_p99_alone_ms": _p99(alone_dns), "dns_p99_flooded_ms": _p99(flooded_dns)},
        ),
    ]
