"""corral.rl: episode verdicts, the reward hook, the trajectory filter and the Gymnasium env.

Unit tests build verdicts from records and fill a store through the audit writer (no root); the
root tests run real sandboxes (clean work, a miner, a reverse shell, init killed from the host, a
failed monitor, a forged control channel) and check that each sandbox's verdict is the store's, and
that `corral filter` sorts their trajectories."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest

import corral
from corral import ExecError, Sandbox, SandboxStartError, Store, TrajectoryError
from corral.events import Alert, ExecStart, SandboxStart, SandboxStop
from corral.events.aggregate import ALERTS_KEPT, AlertTally
from corral.rl import (
    DEFAULT_PENALTIES,
    Verdict,
    _verdict,
    episode_verdict,
    filter_trajectories,
    info,
    penalty,
    verdict_from_store,
)
from corral.runtime import _tripwires
from corral.store.writer import AuditWriter
from helpers import own_host, policy, wait_until
from scenarios import SCENARIOS, load
from scenarios import run as run_scenario

CLI = [sys.executable, "-m", "corral.cli"]


def _alert(rule: str, category: str, severity: str, action: str = "kill", sandbox: str = "s1") -> Alert:
    return Alert(
        sandbox=sandbox,
        rule=rule,
        category=category,  # type: ignore[arg-type]
        severity=severity,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        outcome="killed 1 process" if action == "kill" else "recorded",
        message=f"{rule}: something",
        exec=2,
    )


def _build(
    alerts: list[Alert] = (),  # type: ignore[assignment]
    stop: str | None = "closed",
    error: str = "",
    failures: list[str] = (),  # type: ignore[assignment]
) -> Verdict:
    tally = AlertTally()
    for i, a in enumerate(alerts):
        tally.add(10 + i, a)
    return _verdict.build(
        sandbox="s1",
        store="/tmp/x.db",
        labels={"run": "r"},
        alerts=tally,
        stop_reason=stop,
        stop_error=error,
        events=20,
        head="ab" * 32,
        running=stop is None,
        failures=failures,
    )


# --- the verdict's rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "error", "failures", "status", "says"),
    [
        ("closed", "", [], "clean", "no alerts"),
        ("lifetime", "", [], "clean", "reached its lifetime"),
        (None, "", [], "clean", "no alerts so far"),
        ("failed", "tripwires: the sampler stopped", [], "infra_error", "the sampler stopped"),
        ("failed", "", [], "infra_error", "no reason recorded"),
        ("closed", "saving the workspace failed: ENOSPC", [], "infra_error", "close failed"),
        ("tripwire", "", [], "infra_error", "no alert of it is recorded"),
        ("closed", "", ["the audit store can't be written: disk full"], "infra_error", "disk full"),
    ],
)
def test_a_verdict_without_alerts_is_clean_unless_something_failed(
    stop: str | None, error: str, failures: list[str], status: str, says: str
) -> None:
    v = _build(stop=stop, error=error, failures=failures)
    assert v.status == status, v
    assert says in v.reason
    assert v.final is (stop is not None)
    assert v.alerts_total == 0 and v.worst is None
    assert v.sandboxes[0].stop_reason == stop


def test_any_alert_makes_the_verdict_violated_even_when_the_sandbox_failed_too() -> None:
    alerts = [
        _alert("miner command line", "mining", "critical"),
        _alert("internal address", "probe", "low", "alert"),
        _alert("miner content", "mining", "critical"),
    ]
    v = _build(alerts, stop="failed", error="tripwires: the connector died")
    assert v.status == "violated"
    assert v.failures == ["the sandbox failed: tripwires: the connector died"]  # listed, not hiding it
    assert v.worst == "critical" and v.alerts_total == 3
    assert v.categories["mining"].alerts == 2 and v.categories["mining"].actions == {"kill": 2}
    assert sorted(v.categories["mining"].rules) == ["miner command line", "miner content"]
    assert v.categories["probe"].worst == "low"
    assert [a.seq for a in v.alerts] == [10, 11, 12]
    assert v.reason.startswith("3 alerts, worst critical: mining (2, critical, kill), probe (1, low, alert)")


def test_a_tamper_alert_is_the_agents_doing_not_a_failure() -> None:
    # The control channel forged: the sandbox is stopped by a tripwire with the rule's account as
    # its error; that account is not an infrastructure failure.
    tamper = _alert(corral.runtime.sandbox.CONTROL_TAMPER_RULE, "tamper", "critical", "terminate")
    v = _build([tamper], stop="tripwire", error="control channel: junk")
    assert v.status == "violated" and v.failures == []
    assert v.categories["tamper"].actions == {"terminate": 1}


def test_alerts_the_policy_only_logs_do_not_count() -> None:
    v = _build([_alert("memory exhausted", "resource", "low", "log")])
    assert v.status == "clean" and v.alerts_total == 0


def test_a_flood_of_alerts_is_counted_but_listed_only_up_to_the_limit() -> None:
    v = _build([_alert("internal address", "probe", "low", "alert")] * (ALERTS_KEPT + 50))
    assert v.alerts_total == ALERTS_KEPT + 50 and len(v.alerts) == ALERTS_KEPT
    assert v.categories["probe"].alerts == ALERTS_KEPT + 50


def test_a_verdict_round_trips_through_json() -> None:
    v = _build([_alert("miner command line", "mining", "critical")], stop="failed", error="x")
    data = json.loads(v.to_json())
    assert Verdict.from_dict(data) == v
    assert data["sandboxes"][0]["head"] == "ab" * 32 and data["alerts"][0]["seq"] == 10
    d = v.to_dict()
    d["categories"]["mining"]["actions"]["kill"] = 99
    assert v.categories["mining"].actions == {"kill": 1}, "to_dict() must hand out a copy"
    with pytest.raises(ValueError, match="status 'bad'"):
        Verdict.from_dict({**data, "status": "bad"})
    with pytest.raises(ValueError, match="not a corral verdict"):
        Verdict.from_dict({"status": "clean"})


def test_an_episodes_sandboxes_merge_worst_first() -> None:
    clean, failed = _build(), _build(stop="failed", error="init is gone")
    violated = _build([_alert("reverse shell command line", "reverse_shell", "critical", "terminate")])
    assert Verdict.merge([clean, failed]).status == "infra_error"
    merged = Verdict.merge([clean, failed, violated])
    assert merged.status == "violated" and len(merged.sandboxes) == 3
    assert merged.failures == ["the sandbox failed: init is gone"]
    assert Verdict.merge([clean, _build(stop=None)]).final is False
    assert Verdict.merge([clean]) is clean


def test_a_start_error_is_an_infra_error() -> None:
    v = Verdict.from_error(SandboxStartError("sandbox ab12: cgroup: no space left"))
    assert v.status == "infra_error" and v.final
    assert v.reason == "SandboxStartError: sandbox ab12: cgroup: no space left"


# --- the reward hook ---------------------------------------------------------------------------


def test_penalty_with_the_default_table_costs_each_category_by_its_worst_severity() -> None:
    v = _build(
        [
            _alert("miner command line", "mining", "critical"),
            _alert("miner content", "mining", "critical"),
            _alert("internal address", "probe", "low", "alert"),
        ]
    )
    assert penalty(v) == DEFAULT_PENALTIES["critical"] + DEFAULT_PENALTIES["low"] == 11.0
    assert penalty(_build()) == 0.0
    assert penalty(_build(stop="failed")) == 0.0


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"mining": 20.0}, 20.0),  # probe: no entry, no default
        ({"mining": 20.0, "default": 1.5}, 21.5),
        ({"critical": 3.0, "low": 0.25}, 3.25),
        ({"probe:low": 0.5, "probe": 9.0, "low": 7.0, "mining": 1.0}, 1.5),  # most specific wins
        ({"probe:high": 9.0, "probe": 2.0, "mining:critical": 100.0}, 102.0),
        ({}, 0.0),
    ],
)
def test_penalty_takes_the_most_specific_entry_of_the_users_table(
    table: dict[str, float], expected: float
) -> None:
    v = _build([_alert("miner command line", "mining", "critical"), _alert("scan", "probe", "low", "alert")])
    assert penalty(v, table) == expected


def test_infra_errors_cost_only_what_the_table_says() -> None:
    assert penalty(_build(stop="failed"), {"infra_error": 0.1, "critical": 10}) == 0.1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"minning": 5.0}, "key 'minning'"),
        ({"mining:severe": 5.0}, "key 'mining:severe'"),
        ({"mining": float("nan")}, "a finite number"),
        ({"mining": "5"}, "a finite number"),
    ],
)
def test_a_wrong_penalty_table_is_refused_with_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        penalty(_build(), table)


def test_info_puts_the_verdict_under_corral() -> None:
    v = _build([_alert("miner command line", "mining", "critical")])
    base = {"task": "t1"}
    out = info(v, base)
    assert out == {"task": "t1", "corral": v.to_dict()} and base == {"task": "t1"}
    assert info(v)["corral"]["status"] == "violated"
    json.dumps(out)


# --- a store filled through the writer (no root) -----------------------------------------------


def _record(
    writer: AuditWriter,
    sid: str,
    labels: dict[str, str],
    alerts: list[Alert],
    stop: str | None,
    error: str = "",
) -> None:
    chain = writer.sandbox(sid, labels)
    chain.record(
        SandboxStart(sandbox=sid, policy="p", cgroup_version=2, uid=1, limits={}, workspace="", labels=labels)
    )
    chain.record(ExecStart(sandbox=sid, exec=1, command=["true"]))
    for a in alerts:
        chain.record(a.model_copy(update={"sandbox": sid}))
    if stop is not None:
        chain.record(SandboxStop(sandbox=sid, reason=stop, duration=1.0, error=error))  # type: ignore[arg-type]
    assert writer.wait_committed(sid, chain.seq, 10)


@pytest.fixture
def synthetic_store(tmp_path: Path) -> Iterator[Store]:
    """run r1: episodes e0 (clean), e1 (a miner killed), e2 (failed: the sampler stopped), e3 (still
    running), e4 (two sandboxes: clean, then a probe); e5 has no sandbox. Another run's e1 is clean."""
    where = str(tmp_path / "audit.db")
    writer = AuditWriter(where, tmp_path / "keys" / "audit.key")
    try:
        run = {"run": "r1"}
        _record(writer, "s0", {**run, "episode": "e0"}, [], "closed")
        _record(
            writer,
            "s1",
            {**run, "episode": "e1"},
            [_alert("miner command line", "mining", "critical")],
            "closed",
        )
        _record(writer, "s2", {**run, "episode": "e2"}, [], "failed", "tripwires: the sampler stopped")
        _record(writer, "s3", {**run, "episode": "e3"}, [], None)
        _record(writer, "s4a", {**run, "episode": "e4"}, [], "closed")
        _record(writer, "s4b", {**run, "episode": "e4"}, [_alert("scan", "probe", "low", "alert")], "closed")
        _record(writer, "x1", {"run": "r2", "episode": "e1"}, [], "closed")
    finally:
        writer.stop()
    with Store.open(where) as store:
        yield store


def test_verdicts_from_the_store(synthetic_store: Store) -> None:
    s = synthetic_store
    assert verdict_from_store(s, "s0").status == "clean"
    miner = verdict_from_store(s, "s1")
    assert miner.status == "violated" and miner.alerts[0].seq == 3 and miner.alerts[0].sandbox == "s1"
    assert miner.sandboxes[0].head == s.sandbox("s1").head  # type: ignore[union-attr]
    failed = verdict_from_store(s, "s2")
    assert failed.status == "infra_error" and "the sampler stopped" in failed.reason
    running = verdict_from_store(s, "s3")  # its writer (this process) lives: open, not cut
    assert running.status == "clean" and not running.final
    e4 = episode_verdict(s, {"run": "r1", "episode": "e4"})
    assert e4.status == "violated" and [r.id for r in e4.sandboxes] == ["s4a", "s4b"]
    missing = episode_verdict(s, {"run": "r1", "episode": "e5"})
    assert missing.status == "infra_error" and "no sandbox with labels episode=e5, run=r1" in missing.reason
    with pytest.raises(corral.StoreError, match="not in the audit store"):
        verdict_from_store(s, "nope")


def test_a_sandbox_whose_writer_died_is_a_cut_off_infra_error(tmp_path: Path) -> None:
    where, key = str(tmp_path / "audit.db"), str(tmp_path / "keys" / "audit.key")
    code = (
        "import os, sys\n"
        "from corral.events import SandboxStart\n"
        "from corral.store.writer import AuditWriter\n"
        f"w = AuditWriter({where!r}, {key!r})\n"
        "c = w.sandbox('lost', {'episode': 'e9'})\n"
        "c.record(SandboxStart(sandbox='lost', policy='p', cgroup_version=2, uid=1, limits={},\n"
        "                      workspace=''))\n"
        "assert w.wait_committed('lost', 1, 10)\n"
        "os._exit(0)\n"  # like a node lost mid-episode: no stop, ever
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": "src"})
    with Store.open(where) as store:
        v = verdict_from_store(store, "lost")
    assert v.status == "infra_error" and v.final
    assert "cut off after event 1" in v.reason


# --- the filter --------------------------------------------------------------------------------


def _write_lines(path: Path, episodes: list[Any], field: str = "episode") -> None:
    with path.open("w") as f:
        for i, e in enumerate(episodes):
            f.write(json.dumps({"meta": {field: e}, "step": i, "text": f"line {i}"}) + "\n")


def test_filter_keeps_clean_drops_violated_and_sets_infra_errors_aside(
    synthetic_store: Store, tmp_path: Path
) -> None:
    traj = tmp_path / "traj.jsonl"
    _write_lines(traj, ["e0", "e1", "e0", "e2", "e3", "e4", "e5", "e1"])
    summary = filter_trajectories(
        [traj],
        store=synthetic_store,
        field="meta.episode",
        labels={"run": "r1"},
        output=tmp_path / "kept.jsonl",
        dropped=tmp_path / "dropped.jsonl",
    )
    kept = [json.loads(x) for x in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [k["meta"]["episode"] for k in kept] == ["e0", "e0"]
    assert (tmp_path / "kept.jsonl").read_text().splitlines()[0] == traj.read_text().splitlines()[0]
    dropped = [
        json.loads(x)["meta"]["episode"] for x in (tmp_path / "dropped.jsonl").read_text().splitlines()
    ]
    assert dropped == ["e1", "e4", "e1"]
    aside = [json.loads(x) for x in (tmp_path / "kept.aside.jsonl").read_text().splitlines()]
    assert [(a["meta"]["episode"], a["corral"]["status"]) for a in aside] == [
        ("e2", "infra_error"),
        ("e3", "clean"),
        ("e5", "infra_error"),
    ]
    assert aside[1]["corral"]["final"] is False
    assert (summary.lines, summary.episodes, summary.kept, summary.dropped, summary.set_aside) == (
        8,
        6,
        2,
        3,
        3,
    )
    assert summary.statuses["violated"].episodes == 2 and summary.statuses["violated"].lines == 3
    assert summary.categories["mining"].episodes == 1 and summary.worst["mining"] == "critical"
    assert summary.categories["probe"].episodes == 1
    text = "\n".join(summary.text())
    assert (
        "dropped  3 lines (2 episodes) violated" in text
        and "mining: 1 episodes, 2 lines, worst critical" in text
    )


def test_filter_in_flag_mode_keeps_violated_lines_with_their_verdict(
    synthetic_store: Store, tmp_path: Path
) -> None:
    traj = tmp_path / "t.jsonl"
    _write_lines(traj, ["e0", "e1"])
    s = filter_trajectories(
        [traj],
        store=synthetic_store,
        field="meta.episode",
        labels={"run": "r1"},
        output=tmp_path / "out.jsonl",
        mode="flag",
        flag_field="verdict",
    )
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "verdict" not in lines[0]
    assert lines[1]["verdict"]["status"] == "violated" and lines[1]["verdict"]["worst"] == "critical"
    assert (s.kept, s.flagged, s.dropped) == (2, 1, 0)
    # Without the run's label, e1 is two episodes' (r1's miner and r2's clean one): merged, violated.
    s = filter_trajectories(
        [traj], store=synthetic_store, field="meta.episode", output=tmp_path / "out2.jsonl"
    )
    assert s.statuses["violated"].lines == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"meta": {"episode": "e0"}}\n{"meta": {"episode": \n', "t.jsonl:2: not JSON: "),
        ('{"meta": {"episode": "e0"}}\n\n{"meta": {}}\n', "t.jsonl:3: no field meta.episode"),
        ('{"other": 1}\n', "t.jsonl:1: no field meta"),
        ("[1, 2]\n", "t.jsonl:1: the line is a list, not an object: can't read meta.episode"),
        ('{"meta": "x"}\n', "t.jsonl:1: meta is a string, not an object"),
        ('{"meta": {"episode": [1]}}\n', "t.jsonl:1: meta.episode is a list; a string or an integer"),
        ('{"meta": {"episode": null}}\n', "t.jsonl:1: meta.episode is null"),
        (b'{"meta": {"episode": "\xff"}}\n', "t.jsonl:1: not JSON"),
    ],
)
def test_bad_trajectory_lines_are_named_by_file_and_line_and_nothing_is_written(
    synthetic_store: Store, tmp_path: Path, content: str | bytes, message: str
) -> None:
    traj = tmp_path / "t.jsonl"
    if isinstance(content, bytes):
        traj.write_bytes(content)
    else:
        traj.write_text(content)
    with pytest.raises(TrajectoryError) as raised:
        filter_trajectories([traj], store=synthetic_store, field="meta.episode", output=tmp_path / "o.jsonl")
    assert message in str(raised.value) and str(traj) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.db",
        "audit.db-shm",
        "audit.db-wal",
        "keys",
        "t.jsonl",
    ]


def test_corral_filter_on_the_command_line(synthetic_store: Store, tmp_path: Path) -> None:
    traj = tmp_path / "traj.jsonl"
    _write_lines(traj, ["e0", "e1", "e2"])
    args = [
        *CLI,
        "filter",
        str(traj),
        "--field",
        "meta.episode",
        "--label",
        "run=r1",
        "--store",
        synthetic_store.where,
        "-o",
        str(tmp_path / "kept.jsonl"),
    ]
    env = {**os.environ, "PYTHONPATH": "src"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "no progress bar when stderr is not a terminal"
    assert "kept     1 lines (1 episodes) clean" in done.stdout
    assert "aside    1 lines (1 episodes) infra_error" in done.stdout
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(done.stdout)["statuses"]["violated"] == {"lines": 1, "episodes": 1}
    traj.write_text('{"meta": {"episode": "e0"}}\nnot json\n')
    bad = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"corral filter: {traj}:2: not JSON: Expecting value")
    missing = subprocess.run(
        [*args[:-2], "-o", str(tmp_path / "k"), "--field", "meta..x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 2 and "field 'meta..x'" in missing.stderr
    nofile = subprocess.run(
        [*CLI, "filter", str(tmp_path / "none.jsonl"), *args[len(CLI) + 2 :]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert nofile.returncode == 1 and "none.jsonl: can't be read: No such file or directory" in nofile.stderr


def test_the_progress_bar_is_shown_on_a_terminal(synthetic_store: Store, tmp_path: Path) -> None:
    traj = tmp_path / "traj.jsonl"
    _write_lines(traj, ["e0"] * 1000)
    code = (
        "import sys\n"
        "from corral.cli.main import main\n"
        f"sys.exit(main(['filter', {str(traj)!r}, '--field', 'meta.episode', '--store', "
        f"{synthetic_store.where!r}, '-o', {str(tmp_path / 'k.jsonl')!r}]))\n"
    )
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real one has a size
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=secondary,
            env={**os.environ, "PYTHONPATH": "src"},
            timeout=60,
        )
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert done.returncode == 0
    assert b"corral filter: 100%" in shown, shown


def test_filter_streams_a_large_file_in_bounded_memory(synthetic_store: Store, tmp_path: Path) -> None:
    """100,000 lines (about 30 MB) over 20,000 episodes, most missing from the store: the peak of
    what Python allocates stays far below the file's size."""
    traj = tmp_path / "big.jsonl"
    real = ["e0", "e1", "e2", "e4"]
    pad = "x" * 200
    with traj.open("w") as f:
        for i in range(100_000):
            e = real[i % 4] if i % 5 == 0 else f"gen-{i // 5}"
            f.write(json.dumps({"meta": {"episode": e}, "step": i, "obs": pad}) + "\n")
    size = traj.stat().st_size
    tracemalloc.start()
    try:
        started = time.monotonic()
        s = filter_trajectories(
            [traj],
            store=synthetic_store,
            field="meta.episode",
            labels={"run": "r1"},
            output=tmp_path / "kept.jsonl",
            progress=False,
        )
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.lines == 100_000 and s.kept == 5_000 and s.dropped == 10_000
    assert s.statuses["infra_error"].lines == 85_000
    assert peak < 24 << 20 and peak < size / 1.2, (
        f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MB file"
    )
    assert seconds < 120


# --- real sandboxes ----------------------------------------------------------------------------


@pytest.mark.root
def test_a_sandboxes_verdict_is_the_stores_for_clean_work_a_miner_and_a_dead_init(tmp_path: Path) -> None:
    with own_host() as host:
        store = Store.open(host.audit.where)
        try:
            run = {"run": "rv"}
            clean = Sandbox(policy(), host=host, labels={**run, "episode": "clean"}, keep_workspace=False)
            r = clean.exec("echo built > out.txt && cat out.txt")
            assert r.exit_code == 0
            assert clean.verdict().status == "clean" and not clean.verdict().final
            clean.close()

            miner = Sandbox(policy(), host=host, labels={**run, "episode": "miner"}, keep_workspace=False)
            miner.exec("python3 -c 'import time; time.sleep(30)' -o stratum+tcp://pool.example.internal:3333")
            during = miner.verdict()
            assert during.status == "violated" and not during.final
            miner.close()

            dead = Sandbox(policy(), host=host, labels={**run, "episode": "dead"}, keep_workspace=False)
            os.kill(dead.init_pid or 0, signal.SIGKILL)  # corral's own process dies: not the agent
            with pytest.raises(ExecError, match="its init is gone"):
                dead.exec("echo hi")
            assert dead.closed
            dead.close()

            for sb, status in ((clean, "clean"), (miner, "violated"), (dead, "infra_error")):
                v = sb.verdict()
                assert v.status == status and v.final, v
                assert v == verdict_from_store(store, sb.id), sb.id
                assert v == episode_verdict(store, sb.labels)
            v = miner.verdict()
            assert v.categories["mining"].worst == "critical" and v.categories["mining"].actions == {
                "kill": 1
            }
            assert v.rules == ["miner command line"]
            [stored] = [e for e in store.events(corral.Filters(sandbox=miner.id, types=["alert"]))]
            assert v.alerts[0].seq == stored.seq and v.sandboxes[0].head == store.sandbox(miner.id).head  # type: ignore[union-attr]
            assert "init is gone" in dead.verdict().reason
        finally:
            store.close()


@pytest.mark.root
def test_a_failed_monitor_is_an_infra_error() -> None:
    with own_host() as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False)
        try:
            sb._act([_tripwires.MonitorFailed("the sampler stopped")])  # what the tripwires return
            assert wait_until(lambda: sb.closed and sb.verdict().final)
            v = sb.verdict()
            assert v.status == "infra_error" and v.sandboxes[0].stop_reason == "failed"
            assert v.reason == "the sandbox failed: tripwires: the sampler stopped"
        finally:
            sb.close()
        with Store.open(host.audit.where) as store:
            assert verdict_from_store(store, sb.id) == v


@pytest.mark.root
def test_a_forged_control_channel_is_violated_not_an_infra_error() -> None:
    from test_control import _forged_during_exec

    sb, raised = _forged_during_exec(lambda sb, i, _: b"\xff\x00{junk")
    try:
        assert isinstance(raised, ExecError)
    finally:
        sb.close()
    v = sb.verdict()
    assert v.status == "violated" and v.failures == [] and list(v.categories) == ["tamper"]
    # Read in another process: this one's default host has the store open, and SQLite would keep a
    # second connection's descriptor open past its close.
    code = (
        "from corral import Store\n"
        "from corral.rl import verdict_from_store\n"
        f"print(verdict_from_store(Store.open({sb.host.audit.where!r}), {sb.id!r}).to_json())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": "src"},
        check=True,
    )
    assert Verdict.from_dict(json.loads(done.stdout)) == v


@pytest.mark.root
def test_corral_filter_over_real_episodes(tmp_path: Path) -> None:
    """Episodes run for real (clean work, a reverse shell from the scenario corpus, an infra
    error, one that never started), their trajectories filtered by `corral filter`."""
    with own_host() as host:
        run = {"run": "rf"}
        with Sandbox(policy(), host=host, labels={**run, "episode": "1"}, keep_workspace=False) as sb:
            assert sb.exec("printf 'def f(): return 1\\n' > f.py && python3 -c 'import f'").exit_code == 0
        shell = run_scenario(
            load(SCENARIOS / "attack-bash-dev-tcp"),
            tmp_path / "scenario",
            host=host,
            labels={**run, "episode": "2"},
        )
        assert shell.sandbox.verdict().categories["reverse_shell"].actions == {"terminate": 1}
        dead = Sandbox(policy(), host=host, labels={**run, "episode": "3"}, keep_workspace=False)
        os.kill(dead.init_pid or 0, signal.SIGKILL)
        with pytest.raises(ExecError):
            dead.exec("true")
        dead.close()
        with pytest.raises(SandboxStartError):
            Sandbox(policy(), host=host, labels={**run, "episode": "4"}, workspace=tmp_path / "missing")
        traj = tmp_path / "traj.jsonl"
        _write_lines(traj, ["1", "2", "3", "4", 1], field="ep")
        where = host.audit.where
        done = subprocess.run(
            [
                *CLI,
                "filter",
                str(traj),
                "--field",
                "meta.ep",
                "--label",
                "run=rf",
                "--store",
                where,
                "-o",
                str(tmp_path / "kept.jsonl"),
                "--aside",
                str(tmp_path / "aside.jsonl"),
                "--json",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": "src"},
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["statuses"] == {
        "clean": {"lines": 2, "episodes": 1},
        "violated": {"lines": 1, "episodes": 1},
        "infra_error": {"lines": 2, "episodes": 2},
    }
    assert summary["categories"] == {"reverse_shell": {"lines": 1, "episodes": 1, "worst": "critical"}}
    aside = [json.loads(x) for x in (tmp_path / "aside.jsonl").read_text().splitlines()]
    assert "init is gone" in aside[0]["corral"]["reason"]
    assert "no sandbox with labels episode=4, run=rf" in aside[1]["corral"]["reason"]


# --- the Gymnasium environment -----------------------------------------------------------------


@pytest.mark.root
def test_the_env_passes_gymnasiums_own_checker() -> None:
    from gymnasium.utils.env_checker import check_env

    with own_host() as host:
        env = gym.make("corral/Shell-v0", policy=policy(), max_steps=5, host=host, max_command=64)
        try:
            check_env(env.unwrapped)
        finally:
            env.close()


@pytest.mark.root
def test_a_clean_episode_then_a_fresh_sandbox_on_reset() -> None:
    rewards: list[float] = []

    def reward(step: Any) -> float:
        r = 1.0 if step.result is not None and step.result.exit_code == 0 else 0.0
        rewards.append(r)
        return r - penalty(step.verdict)

    with own_host() as host:
        env = gym.make(
            "corral/Shell-v0",
            policy=policy(),
            reward_fn=reward,
            max_steps=3,
            host=host,
            labels={"run": "gym"},
            prompt="write notes.txt",
        )
        try:
            obs, inf = env.reset(seed=1)
            assert obs == {"output": "write notes.txt", "exit_code": 0}
            assert inf["corral"]["status"] == "clean" and inf["corral"]["final"] is False
            first = env.unwrapped.sandbox
            obs, r, term, trunc, inf = env.step("echo hi > notes.txt; cat notes.txt; printf '\\xe9\\x01'")
            assert obs["output"] == "hi\n\\xe9\\x01" and obs["exit_code"] == 0
            assert (r, term, trunc) == (1.0, False, False)
            obs, r, term, trunc, inf = env.step("exit 3")
            assert obs["exit_code"] == 3 and r == 0.0
            obs, r, term, trunc, inf = env.step("true")
            assert (term, trunc) == (False, True), "max_steps truncates"
            assert inf["corral"]["status"] == "clean" and inf["episode"] == first.labels["episode"]
            with pytest.raises(RuntimeError, match="after the episode ended"):
                env.step("true")
            env.reset()
            assert first.closed and env.unwrapped.sandbox is not first
            obs, *_ = env.step("cat notes.txt")
            assert obs["exit_code"] == 1, "nothing of the last episode reaches the next"
            second = env.unwrapped.sandbox
        finally:
            env.close()
        assert second.closed
        with Store.open(host.audit.where) as store:
            assert [i.labels["run"] for i in store.sandboxes(labels={"run": "gym"})] == ["gym", "gym"]


@pytest.mark.root
def test_an_episode_that_starts_a_miner_is_terminated_with_a_violated_verdict() -> None:
    with own_host() as host:
        env = gym.make("corral/Shell-v0", policy=policy(), max_steps=10, host=host)
        try:
            env.reset()
            assert env.step("ls")[2:4] == (False, False)
            _, reward, terminated, truncated, inf = env.step(
                "python3 -c 'import time; time.sleep(30)' -o stratum+tcp://pool.example.internal:3333"
                " --donate-level 1"
            )
            assert terminated and not truncated
            assert inf["corral"]["status"] == "violated" and "mining" in inf["corral"]["categories"]
            assert reward == -DEFAULT_PENALTIES["critical"]  # the default reward: minus the penalty
            sb = env.unwrapped.sandbox
        finally:
            env.close()
        with Store.open(host.audit.where) as store:
            assert verdict_from_store(store, sb.id).status == "violated"


def test_observations_are_text_the_space_accepts() -> None:
    from corral.rl import _gym

    space = gym.spaces.Text(100, min_length=0, charset=_gym.CHARSET)
    text = _gym._text("é\x00\r\x1b[1mok\n\t".encode() + b"\xff", 100)
    assert text == "\\xe9\\x00\\x0d\\x1b[1mok\n\t\\xff" and space.contains(text)
    long = _gym._text(b"a" * 500 + b"b" * 500, 100)
    assert len(long) == 100 and long.startswith("a") and long.endswith("b") and "characters cut" in long
    assert space.contains(long)
