"""Scale on one machine: N episodes live at once, each a start, a handful of short commands and a
close, on one `Host`; against the same commands each run by its own bwrap, N at once, in the same run.

    sudo .venv/bin/python -m benchmarks --only scale               # 1,000 concurrent
    sudo .venv/bin/python -m benchmarks.scale 300                  # one size, corral and bwrap

Every worker runs its episodes back to back, so N stay live the whole time: the start rate measured is
sustained, not one burst. Episodes come from an `Opener` (today a fresh `AsyncSandbox` each; a warm
`corral.Pool`'s `episode()` fits the same slot, and its acquire latency has its place below).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from benchmarks.harness import (
    MIB,
    BenchError,
    Config,
    bwrap_argv,
    ensure_fds,
    ensure_pids,
    mem_available,
    progress,
)
from benchmarks.results import Measure, Result, Target
from corral import AsyncSandbox, Host, Pool

# Short commands an agent's episode runs: shells and small programs, each judged at its exec.
COMMANDS: tuple[str, ...] = (
    "true",
    "echo hi > notes.txt",
    "cat notes.txt",
    "ls -la /workspace",
    "grep -c hi notes.txt",
)
FULL = 1000
QUICK = 50


class Episode(Protocol):
    """What a benchmark episode needs of a sandbox: run a command, get its exit code."""

    async def exec(self, command: str) -> _HasExitCode: ...


class _HasExitCode(Protocol):
    @property
    def exit_code(self) -> int: ...


# Gives the i-th episode, entered with `async with`. Today: a fresh AsyncSandbox. With the warm pool:
# `lambda i: pool.episode(labels=...)` (then acquire time is what `Stats.starts` measures).
Opener = Callable[[int], AbstractAsyncContextManager[Episode]]


@dataclass
class Stats:
    """What one run measured: times in ms, the wall time, the most episodes live at once."""

    starts: list[float] = field(default_factory=list)  # request -> episode usable
    execs: list[float] = field(default_factory=list)
    closes: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    started_span: float = 0.0  # first start requested -> last start done, seconds
    episodes: int = 0
    live_max: int = 0
    mem_drop_max: int = 0  # bytes: MemAvailable before the run minus its lowest during it

    def starts_per_s(self) -> float:
        return len(self.starts) / self.started_span if self.started_span > 0 else 0.0

    def episodes_per_s(self) -> float:
        return self.episodes / self.wall if self.wall > 0 else 0.0


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(samples)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


class _Live:
    """Counts live episodes and samples MemAvailable a few times a second, on a thread."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.now = 0
        self.base = mem_available()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, name="bench-mem", daemon=True)
        self.thread.start()

    def enter(self) -> None:
        self.now += 1
        self.stats.live_max = max(self.stats.live_max, self.now)

    def leave(self) -> None:
        self.now -= 1

    def sample(self) -> None:
        while not self.done.wait(0.2):
            self.stats.mem_drop_max = max(self.stats.mem_drop_max, self.base - mem_available())

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


async def _episodes(open_episode: Opener, workers: int, rounds: int, commands: Sequence[str]) -> Stats:
    stats = Stats()
    live = _Live(stats)
    first_request = math.inf
    last_started = 0.0

    async def one(i: int) -> None:
        nonlocal first_request, last_started
        t0 = time.perf_counter()
        first_request = min(first_request, t0)
        try:
            async with open_episode(i) as ep:
                t1 = time.perf_counter()
                last_started = max(last_started, t1)
                stats.starts.append((t1 - t0) * 1e3)
                live.enter()
                try:
                    for cmd in commands:
                        c0 = time.perf_counter()
                        r = await ep.exec(cmd)
                        stats.execs.append((time.perf_counter() - c0) * 1e3)
                        if r.exit_code != 0:
                            stats.errors.append(f"episode {i}: {cmd!r} exited {r.exit_code}")
                finally:
                    live.leave()
                    t2 = time.perf_counter()
            stats.closes.append((time.perf_counter() - t2) * 1e3)
            stats.episodes += 1
        except Exception as e:
            stats.errors.append(f"episode {i}: {type(e).__name__}: {e}")

    async def worker(w: int) -> None:
        for r in range(rounds):
            await one(r * workers + w)

    t = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(workers)))
    finally:
        live.stop()
    stats.wall = time.perf_counter() - t
    stats.started_span = max(0.0, last_started - first_request)
    return stats


def run_corral(host: Host, workers: int, rounds: int, commands: Sequence[str] = COMMANDS) -> Stats:
    """`workers` episodes live at once, `rounds` each back to back, each a fresh AsyncSandbox."""

    def opener(i: int) -> AbstractAsyncContextManager[Episode]:
        return AsyncSandbox(host=host, keep_workspace=False, labels={"bench": "scale", "episode": str(i)})

    return asyncio.run(_episodes(opener, workers, rounds, commands))


class _BwrapEpisode:
    """The same commands without corral: each its own bwrap (all namespaces, read-only /usr), run by
    /bin/sh in a throwaway /workspace, so state between commands is lost, as bwrap per command has it."""

    def __init__(self) -> None:
        argv = bwrap_argv(["/bin/sh", "-c"])
        if argv is None:
            raise BenchError("bwrap not installed")
        self.argv = argv[:-2]
        self.tail = argv[-2:]

    async def __aenter__(self) -> _BwrapEpisode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def exec(self, command: str) -> _Exit:
        argv = [*self.argv, "--tmpfs", "/workspace", "--chdir", "/workspace", *self.tail, f"{command}; :"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await proc.communicate()
        return _Exit(proc.returncode if proc.returncode is not None else -1)


@dataclass(frozen=True)
class _Exit:
    exit_code: int


def run_bwrap(workers: int, rounds: int, commands: Sequence[str] = COMMANDS) -> Stats:
    return asyncio.run(_episodes(lambda i: _BwrapEpisode(), workers, rounds, commands))


def _notes(s: Stats) -> dict[str, float | int | str]:
    notes: dict[str, float | int | str] = {
        "episodes": s.episodes,
        "errors": len(s.errors),
        "live_max": s.live_max,
        "wall_s": round(s.wall, 2),
        "episodes_per_s": round(s.episodes_per_s(), 1),
    }
    if s.errors:
        notes["first_error"] = s.errors[0]
    return notes


def bench_scale(cfg: Config) -> list[Result]:
    n = QUICK if cfg.quick else FULL
    rounds = 2  # the second round's starts come as episodes end: the rate is sustained, not a burst
    # A warm pool of an eighth of n beside the n episodes live (a process holds about 16 descriptors
    # a sandbox, and about 1,200 sandboxes is what this machine's hard limit of 20,000 holds).
    warm = max(1, n // 8)
    ensure_fds(16 * (n + warm) + 1024)
    ensure_pids(4 * (n + warm) + 64)
    progress(f"scale: bwrap per command, {n} episodes at once, {rounds} each")
    base = run_bwrap(n, rounds)
    progress(f"scale: corral, {n} episodes at once, {rounds} each")
    with (
        tempfile.TemporaryDirectory(prefix="corral-scale-") as store,
        Host(store=f"{store}/audit.db") as host,
    ):
        # One episode first: the first sandbox loads what every later one shares.
        run_corral(host, 1, 1)
        gc.collect()
        ours = run_corral(host, n, rounds)
        gc.collect()
        progress(f"scale: corral through a warm pool of {warm}, {n} episodes at once, {rounds} each")
        pooled = run_pool(host, n, rounds, warm)
    if not ours.starts or not ours.execs:
        raise BenchError(f"no episode started: {ours.errors[:1]}")
    notes = _notes(ours)
    base_notes = {f"bwrap_{k}": v for k, v in _notes(base).items()}
    rows = [
        Result(
            key="scale_starts",
            # Each worker starts its next episode as its last one closes: in steady state starts/s
            # is episodes/s. The first round's burst rate is in the notes.
            what=f"episode starts/s sustained, {n} live (each: start, {len(COMMANDS)} commands, close)",
            unit="/s",
            corral=Measure.single(ours.episodes_per_s()),
            baseline=Measure.single(base.episodes_per_s()),
            baseline_name="bwrap episodes/s",
            target=Target("min", 50.0, ">= 50/s"),
            notes={
                **notes,
                "starts_per_s_from_first_to_last": round(ours.starts_per_s(), 1),
                "start_ms_p50": round(percentile(ours.starts, 50), 1),
                "start_ms_p99": round(percentile(ours.starts, 99), 1),
                "close_ms_p50": round(percentile(ours.closes, 50), 1) if ours.closes else -1,
                **base_notes,
            },
        ),
        Result(
            key="scale_exec",
            what=f"exec of a short command, {n} episodes live",
            unit="ms",
            corral=Measure.of(ours.execs),
            baseline=Measure.of(base.execs) if base.execs else None,
            baseline_name="bwrap per command",
            target=Target("max_ratio", 1.0, "<= bwrap's"),
            notes={"p99_ms": round(percentile(ours.execs, 99), 1)},
        ),
        Result(
            key="scale_exec_p99",
            what=f"exec P99, {n} episodes live",
            unit="ms",
            corral=Measure.single(percentile(ours.execs, 99)),
            baseline=Measure.single(percentile(base.execs, 99)) if base.execs else None,
            baseline_name="bwrap per command",
            target=Target("max_ratio", 1.0, "<= bwrap's"),
        ),
        Result(
            key="scale_memory",
            what=f"host memory per live episode ({ours.live_max} live at most)",
            unit="MiB",
            corral=Measure.single(ours.mem_drop_max / MIB / max(1, ours.live_max)),
            # bwrap holds nothing between commands: its drop is often within the noise (0 or less).
            baseline=(
                Measure.single(base.mem_drop_max / MIB / base.live_max) if base.mem_drop_max > 0 else None
            ),
            baseline_name="bwrap",
            target=Target("max", 4.0, "< 4 MiB"),
            notes={"mem_drop_max_mib": round(ours.mem_drop_max / MIB, 1)},
        ),
    ]
    rows += _pool_rows(n, warm, rounds, pooled, ours)
    return rows


def run_pool(host: Host, workers: int, rounds: int, warm: int, commands: Sequence[str] = COMMANDS) -> Stats:
    """As `run_corral`, each episode handed out by a `corral.Pool` of `warm` sandboxes, filled
    before the clock starts; its `starts` are the hand-outs (a warm one, or one started on demand
    when the refiller is behind)."""
    with Pool(size=warm, host=host, labels={"bench": "scale-pool"}) as pool:
        if not pool.wait_ready(timeout=600):
            raise BenchError(f"scale: the pool of {warm} did not fill ({pool.failure or 'timeout'})")

        def opener(i: int) -> AbstractAsyncContextManager[Episode]:
            return pool.episode(labels={"episode": str(i)})

        return asyncio.run(_episodes(opener, workers, rounds, commands))


def _pool_rows(n: int, warm: int, rounds: int, pooled: Stats, plain: Stats) -> list[Result]:
    if pooled.errors or not pooled.starts:
        raise BenchError(f"scale: pool episodes failed: {pooled.errors[:1]}")
    what = f"acquire an episode from a pool of {warm} kept warm, {n} live"
    return [
        Result(
            key="scale_acquire",
            what=what,
            unit="ms",
            corral=Measure.of(pooled.starts),
            baseline=Measure.of(plain.starts),
            baseline_name="AsyncSandbox start, same load",
            target=Target("max", 2.0, "P50 < 2 ms"),
            notes={"episodes_per_s": round(pooled.episodes_per_s(), 1), "rounds": rounds},
        ),
        Result(
            key="scale_acquire_p99",
            what=f"{what}, P99",
            unit="ms",
            corral=Measure.single(percentile(pooled.starts, 99)),
            baseline=Measure.single(percentile(plain.starts, 99)),
            baseline_name="AsyncSandbox start P99",
            target=Target("max", 50.0, "P99 < 50 ms"),
        ),
    ]


def main(argv: Sequence[str]) -> int:
    """`python -m benchmarks.scale N [ROUNDS] [--no-bwrap]`: one size, printed plainly (for profiling)."""
    args = [a for a in argv if not a.startswith("--")]
    n = int(args[0]) if args else 100
    rounds = int(args[1]) if len(args) > 1 else 1
    # A warm pool of an eighth of n beside the n episodes live (a process holds about 16 descriptors
    # a sandbox, and about 1,200 sandboxes is what this machine's hard limit of 20,000 holds).
    warm = max(1, n // 8)
    ensure_fds(16 * (n + warm) + 1024)
    ensure_pids(4 * (n + warm) + 64)
    runs: list[tuple[str, Callable[[], Stats]]] = []
    if "--no-bwrap" not in argv:
        runs.append(("bwrap", lambda: run_bwrap(n, rounds)))
    store = tempfile.mkdtemp(prefix="corral-scale-")
    host = Host(store=f"{store}/audit.db")
    runs.append(("corral", lambda: run_corral(host, n, rounds)))
    with host:
        run_corral(host, 1, 1)
        for name, run in runs:
            s = run()
            if not s.starts or not s.execs:
                print(f"{name}: nothing ran: {s.errors[:3]}", flush=True)
                continue
            print(
                f"{name}: n={n} rounds={rounds} episodes={s.episodes} errors={len(s.errors)} "
                f"wall={s.wall:.1f}s episodes/s={s.episodes_per_s():.1f} starts/s={s.starts_per_s():.1f} "
                f"start p50={percentile(s.starts, 50):.0f} p99={percentile(s.starts, 99):.0f} ms "
                f"exec p50={percentile(s.execs, 50):.1f} p99={percentile(s.execs, 99):.1f} ms "
                f"close p50={percentile(s.closes, 50) if s.closes else -1:.0f} ms "
                f"live_max={s.live_max} mem/live={s.mem_drop_max / MIB / max(1, s.live_max):.2f} MiB",
                flush=True,
            )
            for e in s.errors[:3]:
                print(f"  {e}", flush=True)
            with contextlib.suppress(Exception):
                gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
