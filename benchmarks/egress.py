"""The egress fence: a download's throughput and a connection's set-up through corral's proxy, against
the same client dialling loopback directly."""

from __future__ import annotations

import os
import statistics
import subprocess

from benchmarks.harness import Config, progress
from benchmarks.results import Measure, Result, Target
from corral import Policy, Sandbox

_EGRESS_NAME = "bench.example.internal"
# Run the same way on the host (baseline) and in the sandbox (through corral's proxy): the time is
# measured by the client itself, so both sides pay the same interpreter start-up.
_THROUGHPUT_CLIENT = """
import socket, sys, time
t = time.perf_counter(); s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); n = 0
s.sendall(b"GET /blob HTTP/1.1\\r\\nHost: " + sys.argv[1].encode() + b"\\r\\n\\r\\n")
while chunk := s.recv(1 << 20):
    n += len(chunk)
print(n / (time.perf_counter() - t) / 2**20)
"""
_CONNECT_CLIENT = """
import socket, sys, time
ts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.recv(1); s.close()
    ts.append((time.perf_counter() - t) * 1000)
print(" ".join(f"{x:.4f}" for x in ts))
"""


_SERVER = """
import socket, sys
size = int(sys.argv[1]); srv = socket.create_server(("127.0.0.1", 0), backlog=256)
print(srv.getsockname()[1], flush=True)
block = bytes(1 << 20)
while True:
    conn, _ = srv.accept()
    with conn:
        if size > 1:
            conn.recv(4096)  # a download is asked for (an HTTP request), then streamed
        left = size
        try:
            while left > 0:
                left -= conn.send(block[: min(left, len(block))])
        except OSError:
            pass
"""


class _LocalServer:
    """A loopback server, in its own process so it competes with neither side for the GIL, that
    sends `size` bytes to each client (1 byte for latency runs)."""

    def __init__(self, size: int) -> None:
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", _SERVER, str(size)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _host_python(script: str, *args: str) -> str:
    out = subprocess.run(
        ["/usr/bin/python3", "-c", script, *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def bench_egress(cfg: Config) -> list[Result]:

    runs = 3 if cfg.quick else 11
    size = (16 if cfg.quick else 256) << 20
    progress(f"egress: throughput ({runs} x {size >> 20} MiB) and connection set-up")
    bulk, tiny = _LocalServer(size), _LocalServer(1)
    policy = Policy.from_dict(
        {
            "version": 1,
            # The baseline client runs without a CPU quota; so does this one.
            "resources": {"cpu": float(os.cpu_count() or 1)},
            "network": {
                "egress": [
                    {"host": _EGRESS_NAME, "ports": [bulk.port], "protocols": ["http"]},
                    {"host": _EGRESS_NAME, "ports": [tiny.port], "protocols": ["any"]},
                ],
                "hosts": {_EGRESS_NAME: "127.0.0.1"},
                "limits": {"connections_per_minute": 100000, "bytes_out_per_minute": "1GiB"},
            },
        }
    )
    sb = Sandbox(policy, keep_workspace=False)
    try:
        # Interleaved, so that whatever else the machine is doing weighs on both sides alike.
        direct: list[float] = []
        proxied: list[float] = []
        for _ in range(runs):
            direct.append(float(_host_python(_THROUGHPUT_CLIENT, "127.0.0.1", str(bulk.port))))
            r = sb.exec(["python3", "-c", _THROUGHPUT_CLIENT, _EGRESS_NAME, str(bulk.port)], text=True)
            proxied.append(float(str(r.stdout)))
        n = "20" if cfg.quick else "200"
        base_conn = [float(x) for x in _host_python(_CONNECT_CLIENT, "127.0.0.1", str(tiny.port), n).split()]
        r = sb.exec(["python3", "-c", _CONNECT_CLIENT, _EGRESS_NAME, str(tiny.port), n], text=True)
        ours_conn = [float(x) for x in str(r.stdout).split()]
    finally:
        sb.close(wait=True)
        bulk.close()
        tiny.close()
    pairs = [p / d for p, d in zip(proxied, direct, strict=True) if d > 0]
    return [
        Result(
            key="proxy_throughput",
            what="TCP download through the proxy",
            unit="MiB/s",
            corral=Measure.of(proxied),
            baseline=Measure.of(direct),
            baseline_name="direct loopback",
            target=Target("min_ratio", 0.5, ">= 50 %"),
            # The direct baseline swings most between runs on a shared machine; each proxied run's
            # ratio to the direct run just before it shows how much of the spread is the baseline's.
            notes={
                "pair_ratio_median": round(statistics.median(pairs), 3),
                "pair_ratio_min": round(min(pairs), 3),
                "pair_ratio_max": round(max(pairs), 3),
            },
        ),
        Result(
            key="proxy_connect",
            what="connect + first byte",
            unit="ms",
            corral=Measure.of(ours_conn),
            baseline=Measure.of(base_conn),
            baseline_name="direct loopback",
            target=Target("max_delta", 5.0, "<= +5 ms"),
            notes={
                "includes": "the name's two DNS queries (A, AAAA) to corral's resolver, attribution, "
                "policy check, upstream dial; the baseline dials 127.0.0.1"
            },
        ),
    ]
