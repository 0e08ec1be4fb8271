"""The audit store's rows: events committed per second while sandboxes run (none lost, memory
bounded), one sandbox's events read back from among 1,000,000, and `verify`'s speed; each against
plain SQLite (or plain hashing) doing the same work on the same machine in the same run."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import psutil

from benchmarks.harness import MIB, BenchError, Config, progress, time_ms
from benchmarks.results import Measure, Result, Target
from corral import ExecStart, Filters, Host, ResourceSample, Sandbox, SandboxStart, SandboxStop, Store

_BATCH = 2_000  # the plain baseline commits this many rows at a time, as corral's writer may


def _start(sid: str, labels: dict[str, str]) -> SandboxStart:
    return SandboxStart(
        sandbox=sid, policy="bench", cgroup_version=1, uid=0, limits={}, workspace="/tmp", labels=labels
    )


def _synthetic(host: Host, sid: str, events: int, labels: dict[str, str]) -> int:
    """Record `events` events for a made-up sandbox through the host's writer, as a busy sandbox's
    monitors would: a start, commands and resource samples, a stop."""
    chain = host.audit.sandbox(sid, labels)
    chain.record(_start(sid, labels))
    for n in range(1, events - 1):
        if n % 10:
            chain.record(
                ExecStart(sandbox=sid, exec=n, command=["python3", "-m", "pytest", f"tests/t{n}.py"])
            )
        else:
            chain.record(ResourceSample(sandbox=sid, cpu=0.5, memory=200 * MIB, processes=3))
    chain.record(SandboxStop(sandbox=sid, reason="closed", duration=1.0))
    return chain.seq


def _plain_rate(bodies: list[str], rows: int) -> float:
    """Rows per second into a plain SQLite table (WAL, synchronous NORMAL, one index), committed in
    batches: what storing events costs without chains, signatures or a writer thread."""
    directory = tempfile.mkdtemp(prefix="corral-bench-plain-")
    try:
        conn = sqlite3.connect(f"{directory}/plain.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE events (n INTEGER PRIMARY KEY, sandbox TEXT, seq INTEGER, body TEXT)")
        conn.execute("CREATE UNIQUE INDEX events_sandbox ON events (sandbox, seq)")
        t0 = time.perf_counter()
        for start in range(0, rows, _BATCH):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO events (sandbox, seq, body) VALUES (?, ?, ?)",
                [
                    (f"s{i // 1000}", i, bodies[i % len(bodies)])
                    for i in range(start, min(rows, start + _BATCH))
                ],
            )
            conn.execute("COMMIT")
        rate = rows / (time.perf_counter() - t0)
        conn.close()
        return rate
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_store(cfg: Config) -> list[Result]:
    directory = tempfile.mkdtemp(prefix="corral-bench-store-")
    try:
        return [*_ingest(cfg, directory), *_read_back(cfg, directory)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _ingest(cfg: Config, directory: str) -> list[Result]:
    where = f"{directory}/ingest.db"
    seconds = 2.0 if cfg.quick else 10.0
    producers = 2
    progress(f"store: events into the store for {seconds:g}s while sandboxes run")
    process = psutil.Process()
    with Host(networks_ahead=0, store=where) as host:
        stop = threading.Event()
        produced = [0] * producers
        real: list[Sandbox] = [
            Sandbox(keep_workspace=False, host=host, labels={"run": "bench"}) for _ in range(2)
        ]
        peak_pending = 0
        rss_before = process.memory_info().rss

        def produce(i: int) -> None:
            n = 0
            while not stop.is_set():
                produced[i] += _synthetic(host, f"p{i}s{n:06d}", 1_000, {"run": "bench-ingest"})
                n += 1

        def busy(sb: Sandbox) -> None:
            while not stop.is_set():
                sb.exec(["true"])

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
        threads += [threading.Thread(target=busy, args=(sb,)) for sb in real]
        committed0 = host.audit.written
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        peak_rss = rss_before
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.05)
            peak_pending = max(peak_pending, host.audit.pending())
            peak_rss = max(peak_rss, process.memory_info().rss)
        committed = host.audit.written - committed0
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        for sb in real:
            sb.close()
        real_events = sum(sb.events_elided + len(sb.events()) for sb in real)
        ids = [sb.id for sb in real]
    rate = committed / elapsed
    with Store.open(where) as store:
        stored = store.counts()["events"]
        stored_real = sum(info.events for info in store.sandboxes(labels={"run": "bench"}))
    lost = sum(produced) + real_events - stored
    if lost != 0 or stored_real != real_events:
        raise BenchError(f"store: {lost} events produced were not stored")
    bodies = [
        ExecStart(
            sandbox="0123456789ab", exec=n, command=["python3", "-m", "pytest", f"tests/t{n}.py"]
        ).model_dump_json()
        for n in range(100)
    ]
    plain = _plain_rate(bodies, max(50_000, int(rate * 2)))
    return [
        Result(
            key="store_ingest",
            what="events committed to the store while sandboxes run",
            unit="events/s",
            corral=Measure.single(rate),
            baseline=Measure.single(plain),
            baseline_name="plain SQLite insert",
            target=Target("min", 10_000, ">= 10,000/s, none lost"),
            notes={
                "lost": lost,
                "peak_pending": peak_pending,
                "rss_growth_mib": round((peak_rss - rss_before) / MIB, 1),
                "sandboxes_running": len(ids),
            },
        )
    ]


def _read_back(cfg: Config, directory: str) -> list[Result]:
    where = f"{directory}/million.db"
    # Most sandboxes with 1,000 events, and one long one (a tenth of the store) whose dashboard page
    # is the heaviest to render.
    sandboxes, per = (90, 1_000) if cfg.quick else (900, 1_000)
    big = sandboxes * per // 9
    total = sandboxes * per + big
    progress(f"store: filling a store with {total:,} events")
    t0 = time.perf_counter()
    with Host(networks_ahead=0, store=where) as host:
        ids = []
        for i in range(sandboxes):
            sid = f"m{i:011d}"
            _synthetic(host, sid, per, {"run": f"r{i // 100}", "episode": str(i)})
            ids.append(sid)
        _synthetic(host, "longsandbox0", big, {"run": "r0", "episode": "long"})
    progress(f"store: filled in {time.perf_counter() - t0:.1f}s")
    rng = random.Random(7)
    with Store.open(where) as store:

        def one_sandbox() -> object:
            return list(store.events(Filters(sandbox=rng.choice(ids))))

        corral_query = time_ms(one_sandbox, 10 if cfg.quick else 50, 2)
        conn = sqlite3.connect(where)

        def plain_query() -> object:
            return conn.execute(
                "SELECT body FROM events WHERE sandbox = ? ORDER BY seq", (rng.choice(ids),)
            ).fetchall()

        base_query = time_ms(plain_query, 10 if cfg.quick else 50, 2)
        t0 = time.perf_counter()
        verification = store.verify()
        verify_rate = verification.events / (time.perf_counter() - t0)
        if not verification.ok:
            raise BenchError(
                f"store: a store the benchmark filled does not verify: {verification.findings[:3]}"
            )
        t0 = time.perf_counter()
        hashed = 0
        for (body,) in conn.execute("SELECT body FROM events"):
            hashlib.sha256(body.encode()).hexdigest()
            hashed += 1
        hash_rate = hashed / (time.perf_counter() - t0)
        conn.close()
    pages = _dashboard(cfg, where, "longsandbox0")
    return [
        Result(
            key="store_query",
            what=f"one sandbox's {per:,} events among {total:,}",
            unit="ms",
            corral=Measure.of(corral_query),
            baseline=Measure.of(base_query),
            baseline_name="plain SQLite select",
            target=Target("max", 100.0, "< 100 ms"),
            notes={"events_in_store": total},
        ),
        Result(
            key="store_verify",
            what=f"audit verify over {total:,} events",
            unit="events/s",
            corral=Measure.single(verify_rate),
            baseline=Measure.single(hash_rate),
            baseline_name="sha256 of each event",
            target=Target("min", 100_000, ">= 100,000/s"),
            notes={"db_mib": round(os.path.getsize(where) / MIB, 1)},
        ),
        Result(
            key="dashboard_page",
            what=f"dashboard: a sandbox's page ({big:,} events of its own, {total:,} in the store)",
            unit="ms",
            corral=Measure.of(pages["sandbox"]),
            baseline=Measure.of(pages["static"]),
            baseline_name="a static file from the same server",
            target=Target("max", 500.0, "< 500 ms"),
            notes={
                "runs_page_ms": round(Measure.of(pages["runs"]).median, 1),
                "run_page_ms": round(Measure.of(pages["run"]).median, 1),
            },
        ),
    ]


def _dashboard(cfg: Config, where: str, sandbox: str) -> dict[str, list[float]]:
    """`corral ui` over the store, as a user starts it; each page fetched over HTTP, whole."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "ui", "--store", where, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    err = server.stderr.read().decode() if server.stderr else ""
                    raise BenchError(f"corral ui did not start: {err.strip()}") from None
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def fetch(path: str) -> Callable[[], object]:
            def get() -> object:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise BenchError(f"corral ui: GET {path}: {response.status}")
                return body

            return get

        runs = 5 if cfg.quick else 20
        try:
            return {
                name: time_ms(fetch(path), runs, 2)
                for name, path in (
                    ("static", "/static/corral.css"),
                    ("runs", "/"),
                    ("run", "/runs/r0"),
                    ("sandbox", f"/sandboxes/{sandbox}"),
                )
            }
        finally:
            conn.close()
    finally:
        server.terminate()
        server.wait(10)
        if server.stderr:
            server.stderr.close()
