"""Starting and holding sandboxes: a warm exec, a cold create+exec+close, and what idle sandboxes cost."""

from __future__ import annotations

import gc
import time

import psutil

from benchmarks.harness import (
    MIB,
    BenchError,
    Config,
    bwrap_argv,
    check_exec,
    ensure_fds,
    ensure_pids,
    failure_notes,
    mem_available,
    open_sandbox,
    progress,
    run_ok,
    time_ms,
    wait_torn_down,
)
from benchmarks.results import Measure, Result, Target
from corral import Sandbox


def bench_warm_exec(cfg: Config) -> list[Result]:
    progress(f"warm exec: {cfg.warm_runs} runs each")
    base = time_ms(lambda: run_ok(["true"]), cfg.warm_runs, cfg.warmup)
    failures: list[str] = []
    sb = open_sandbox(failures, "warm sandbox")
    try:
        ours = time_ms(lambda: check_exec(sb), cfg.warm_runs, cfg.warmup)
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
            notes=failure_notes(failures),
        )
    ]


def bench_cold(cfg: Config) -> list[Result]:
    progress(f"cold start: {cfg.cold_runs} runs each")
    argv = bwrap_argv(["true"])
    base: Measure | None = None
    notes: dict[str, float | int | str] = {}
    if argv is None:
        notes["baseline"] = "bwrap not installed"
    else:
        try:
            base = Measure.of(time_ms(lambda: run_ok(argv), cfg.cold_runs, cfg.warmup))
        except BenchError as e:
            notes["baseline"] = f"bwrap failed: {e}"

    failures_wait: list[str] = []
    failures: list[str] = []

    def cycle_wait() -> None:
        sb = open_sandbox(failures_wait, "cold sandbox")
        try:
            check_exec(sb)
        finally:
            sb.close(wait=True)

    waited = time_ms(cycle_wait, cfg.cold_runs, cfg.warmup)

    # Default close: teardown continues on corral's reaper thread, overlapping the next runs, as it
    # would in an agent loop. The backlog left at the end is drained untimed and reported.
    closed: list[Sandbox] = []

    def cycle() -> None:
        sb = open_sandbox(failures, "cold sandbox")
        closed.append(sb)
        try:
            check_exec(sb)
        finally:
            sb.close()

    try:
        background = time_ms(cycle, cfg.cold_runs, cfg.warmup)
    finally:
        drain = wait_torn_down(closed)
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
            notes={**notes, "teardown_backlog_drain_s": round(drain, 4), **failure_notes(failures)},
        ),
        Result(
            key="cold_close_wait",
            what="cold create+exec+close(wait=True)",
            unit="ms",
            corral=Measure.of(waited),
            baseline=base,
            baseline_name=base_name,
            target=target,
            notes={**notes, **failure_notes(failures_wait)},
        ),
    ]


def bench_idle_memory(cfg: Config) -> list[Result]:
    n = cfg.idle
    if n <= 0:
        return []
    progress(f"idle memory: opening {n} sandboxes")
    ensure_fds(8 * n + 1024)  # pidfd, control socket, seccomp notify fd per sandbox, plus headroom
    ensure_pids(n + 64)
    failures: list[str] = []
    open_sandbox(failures, "warm-up sandbox").close(wait=True)  # load everything the first sandbox loads
    gc.collect()
    time.sleep(cfg.settle)
    before = mem_available()
    sandboxes: list[Sandbox] = []
    create_ms: list[float] = []
    try:
        for i in range(n):
            t0 = time.perf_counter_ns()
            sandboxes.append(open_sandbox(failures, f"idle sandbox {i + 1} of {n}"))
            create_ms.append((time.perf_counter_ns() - t0) / 1e6)
            if (i + 1) % 100 == 0:
                progress(f"idle memory: {i + 1}/{n} open")
        gc.collect()
        time.sleep(cfg.settle)
        after = mem_available()
        pss: list[float] = []
        uss: list[float] = []
        charged: list[float] = []
        for sb in sandboxes:
            assert sb.init_pid is not None
            info = psutil.Process(sb.init_pid).memory_full_info()
            pss.append(info.pss / MIB)
            uss.append(info.uss / MIB)
            charged.append(sb.usage().memory_bytes / MIB)
        alive = sum(1 for sb in sandboxes if sb.init_pid is not None and psutil.pid_exists(sb.init_pid))
    finally:
        t0 = time.perf_counter_ns()
        for sb in sandboxes:
            sb.close()
        close_s = (time.perf_counter_ns() - t0) / 1e9
        progress(f"idle memory: closed {len(sandboxes)}, waiting for teardown")
        reap_s = wait_torn_down(sandboxes, timeout=max(60.0, 0.5 * len(sandboxes)))
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
        **failure_notes(failures),
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
