"""The tripwires: what monitoring costs an all-core job, how fast a miner dies, how many attempts an
attack makes before its alert, and whether benign work raises any. The attacks and the benign work are
the scenario corpus's (`scenarios/`)."""

from __future__ import annotations

import os
import shlex
import time

from benchmarks import _corpus
from benchmarks.harness import BenchError, Config, progress
from benchmarks.results import Measure, Result, Target
from corral import Alert, Policy, Sandbox

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


def _tripwire_policy(enabled: bool) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "resources": {"cpu": float(os.cpu_count() or 1)},
            "tripwires": {"enabled": enabled},
        }
    )


def _host_pid(sb: Sandbox, ns_pid: int) -> int | None:
    for pid in sb.pids():
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
    pids = sb.pids
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in pids():
            return True
        time.sleep(0.005)
    return False


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
    progress(f"tripwires: monitoring overhead ({runs} x 2 runs of an all-core job)")
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
    progress(f"tripwires: miner after the command ({runs} runs)")
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
    # A miner its content gives away (the corpus's C miner, compiled in the sandbox and renamed): killed
    # at its execve, before it runs an instruction.
    progress(f"tripwires: miner recognised at exec ({runs} runs)")
    scenario = _corpus.load(_MINER_BY_CONTENT)
    *build, miner = scenario.steps
    exec_kill: list[float] = []
    with _corpus.opened(scenario) as sb:
        for step in build:
            r = sb.exec(step.run, timeout=step.timeout)
            if r.exit_code != 0:
                raise BenchError(f"{scenario.name}: {step.run!r} exited {r.exit_code}: {r.stderr!r}")
        # Started directly, not through /bin/sh -c as the scenario runs it: the shell's own start
        # would be timed too.
        argv = shlex.split(miner.run)
        for _ in range(runs):
            t0 = time.monotonic()
            r = sb.exec(argv, timeout=miner.timeout)
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


# Row name, the category whose first alert ends the count, and the corpus scenario that attacks.
_ATTACKS: list[tuple[str, str, str]] = [
    ("probe", "probe", "attack-python-scan"),  # a scanner no rule knows by name: the network rules see it
    ("tunnel", "tunnel", "attack-ssh-reverse-tunnel"),
    ("reverse shell", "reverse_shell", "attack-bash-dev-tcp"),
    ("metadata probe", "probe", "attack-metadata-probe"),
]
# The miner its content gives away, and the benign work that must raise nothing.
_MINER_BY_CONTENT = "attack-miner-c-disguised"
_BENIGN = ("benign-make-c-project", "benign-python-unittest", "benign-git-workflow")


def _bench_first_attempt() -> list[Result]:
    """How many connection attempts each attack made before its alert (0: caught at its start)."""
    progress("tripwires: first-attempt detection (probe, tunnel, reverse shell)")
    out: list[Result] = []
    for name, category, directory in _ATTACKS:
        # Alert-only: nothing is stopped, so the attack makes every attempt it would make unwatched.
        scenario = _corpus.load(directory)
        events = _corpus.run(scenario, alert_only=True).events
        first = next((e for e in events if isinstance(e, Alert) and e.category == category), None)
        if first is None:
            raise BenchError(f"{name}: no {category} alert for {scenario.name}")
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
    progress(f"tripwires: benign work ({', '.join(_BENIGN)})")
    alerts: list[str] = []
    programs = 0
    for directory in _BENIGN:
        result = _corpus.run(_corpus.load(directory))
        problems = _corpus.check_steps(result)
        if problems:
            raise BenchError(f"benign work failed: {directory}: {problems[0]}")
        alerts += [f"{directory}: {a.rule}: {a.message}" for a in result.alerts]
        programs += sum(1 for e in result.events if e.type == "proc.exec")
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
