"""Atomic Red Team's Linux tests, run in corral sandboxes: contained, and seen by the tripwires.

`atomics.load()` reads the attack commands from the corpus (see tests/atomics.py for the tables of
overrides, reasons and expected alert categories). Each runnable test gets a fresh sandbox with a
strict policy: no egress except the local stand-in it needs, if any. It runs the test's own
prerequisite checks (they must pass: that is what makes it runnable), then its command, then its
cleanup, and asserts:

- **contained**: every connection the sandbox opened was refused or went to an allowed stand-in, and
  the proxy dialed nothing else; nothing the command names on the host (files it writes, /etc/passwd)
  changed; no process outlived it; plus checks per technique (a discovery command saw nothing of the
  host's network, a CPU hog stayed within its quota, a listener was unreachable from outside);
- **detected**: each expected category is among `sb.alerts()`, and where none is expected, nothing
  fired (that would be a false alert on what the test does here).

The unit tests at the top need no root: the loader finds every technique file, every Linux test is
runnable or says why, the tools runnable tests need are here, and docs/atomics.md is up to date.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

import atomics
from atomics import (
    CASES_DOC_COMMAND,
    INTERNAL_ADDRESS,
    OUTSIDE_ADDRESS,
    PROXY_NAME,
    PROXY_PORT,
    SANDBOX_PATH,
    AtomicCase,
    CorpusMissing,
    load,
    prerequisite_tools,
    render_doc,
)
from corral import Deny, ExecResult, Policy, Sandbox
from corral.events import DnsQuery, NetConnect
from helpers import wait_until
from servers import LocalUpstream, TcpListener, tcp_listener

# Collected at import. A fresh clone has no corpus beside it: outside CI the module then reports that it
# did not run and why, and the rest of the suite runs. In CI the corpus is part of the test bed, so its
# absence fails the run with CorpusMissing's message (as any skip there would).
try:
    CASES = load()
except CorpusMissing as missing:
    if os.environ.get("CI"):
        raise
    pytest.skip(
        f"not run: {missing}; set CORRAL_ATOMICS_CORPUS to the corpus's directory", allow_module_level=True
    )
RUNNABLE = [c for c in CASES if c.runnable]
BY_GUID = {c.guid: c for c in CASES}


def _id(case: AtomicCase) -> str:
    return f"{case.id}-{re.sub(r'[^a-z0-9]+', '-', case.name.lower()).strip('-')}"


# --------------------------------------------------------------------------------------------------
# Unit tests (no root)


def test_loader_finds_every_technique_file_and_all_its_linux_tests() -> None:
    for technique in atomics.TECHNIQUES:
        path = atomics.technique_file(technique)
        assert path.is_file(), f"{path} missing from the corpus"
        data = yaml.safe_load(path.read_text())
        linux = [
            t["auto_generated_guid"] for t in data["atomic_tests"] if "linux" in t["supported_platforms"]
        ]
        loaded = [c.guid for c in CASES if c.technique == technique]
        assert loaded == linux, f"{technique}: loaded {loaded}, the file's Linux tests are {linux}"
        assert loaded, f"{technique}: no Linux test"


def test_every_linux_test_is_runnable_or_says_why() -> None:
    for c in CASES:
        assert c.runnable != bool(c.reason), f"{c.id}: runnable={c.runnable} but reason={c.reason!r}"
        assert c.guid in atomics.EXPECTED, f"{c.id} ({c.name}): no entry in EXPECTED"
        assert c.why_expected, f"{c.id}: expected categories without a reason"
        assert set(c.expected) <= atomics.CATEGORIES, f"{c.id}: unknown categories {c.expected}"
        if c.runnable:
            assert c.executor in atomics.RUNNABLE_EXECUTORS
            assert c.guid in atomics.TOOLS, f"{c.id}: runnable but its tools are not listed in TOOLS"
            for text in (c.command, c.cleanup, *c.prereqs):
                assert not re.search(r"#\{\w+\}", text), f"{c.id}: placeholder left in {text!r}"
                assert "PathToAtomicsFolder" not in text, f"{c.id}: needs the upstream atomics folder"
        else:
            assert c.guid not in atomics.TOOLS, f"{c.id}: not runnable but listed in TOOLS"
    # Tables keyed by a GUID the corpus no longer has are stale: an upstream change to look at.
    guids = set(BY_GUID)
    for table in (
        "OVERRIDES",
        "NOT_RUNNABLE",
        "EXPECTED",
        "TOOLS",
        "TIMEOUTS",
        "NOTES",
        "PREREQ_SHORT_CIRCUIT",
    ):
        stale = set(getattr(atomics, table)) - guids
        assert not stale, f"atomics.{table} names tests the corpus doesn't have: {sorted(stale)}"


def test_runnable_tests_find_their_tools_here() -> None:
    for c in RUNNABLE:
        unchecked = prerequisite_tools(c) - set(c.tools)
        assert not unchecked, f"{c.id}: its prereq_command checks for {sorted(unchecked)}, missing from TOOLS"
        for tool in c.tools:
            assert shutil.which(tool, path=SANDBOX_PATH), (
                f"{c.id} ({c.name}) needs {tool}, not found on {SANDBOX_PATH}: install it (arp and netstat "
                "come with net-tools, cpan with perl) or move the test to NOT_RUNNABLE with that reason"
            )


_REAL_NAME = re.compile(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|ms|dev|co)\b", re.IGNORECASE)
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_SAFE_NETWORKS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "203.0.113.0/24")]
# Kept as the corpus has it: the fence refuses the metadata address, which is what T1552.005 tests.
_METADATA = ipaddress.ip_address("169.254.169.254")


def test_runnable_commands_target_only_stand_ins() -> None:
    """No runnable command names a real domain or dials an address outside loopback, the private range
    and documentation space the suite uses (besides the metadata address the fence must refuse)."""
    for c in RUNNABLE:
        for text in (c.command, c.cleanup, *c.prereqs):
            assert not _REAL_NAME.search(text), f"{c.id}: real domain in {text!r}; override its argument"
            for literal in _IPV4.findall(text):
                address = ipaddress.ip_address(literal)
                assert address == _METADATA or any(address in n for n in _SAFE_NETWORKS), (
                    f"{c.id}: {literal} in {text!r} is not a stand-in address"
                )


def test_categories_are_the_event_models() -> None:
    from corral.events import Alert

    assert frozenset(typing.get_args(Alert.model_fields["category"].annotation)) == atomics.CATEGORIES


# Any quick test of another module: it must still run when this one can't.
OTHER_TEST = "tests/test_policy.py::test_defaults_are_not_shared_between_policies"


def _pytest_this_module(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, OTHER_TEST],
        capture_output=True,
        text=True,
        env=env,
        cwd=atomics.REPO_ROOT,
        timeout=120,
    )


def test_fresh_clone_without_corpus_skips_this_module_outside_ci_and_fails_in_ci(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CORRAL_ATOMICS_CORPUS"] = str(tmp_path / "absent")
    r = _pytest_this_module(env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    assert f"not run: Atomic Red Team corpus not found at {tmp_path / 'absent'}" in r.stdout
    r = _pytest_this_module({**env, "CI": "true"})
    assert r.returncode != 0
    assert "CorpusMissing: Atomic Red Team corpus not found" in r.stdout


def test_missing_corpus_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(CorpusMissing, match=r"Atomic Red Team corpus not found at .*SOURCE\.md"):
        load(tmp_path / "atomic-red-team")
    (tmp_path / "partial").mkdir()
    with pytest.raises(CorpusMissing, match=r"T1018\.yaml: technique file missing"):
        load(tmp_path / "partial")


def test_doc_is_up_to_date() -> None:
    assert atomics.DOC.read_text() == render_doc(CASES), f"docs/atomics.md is stale: run {CASES_DOC_COMMAND}"


# --------------------------------------------------------------------------------------------------
# The world each test sees


@dataclass
class World:
    """What the sandbox may reach, and the stand-ins behind it."""

    egress: list[dict[str, Any]] = field(default_factory=list)
    hosts: dict[str, str] = field(default_factory=dict)
    upstream: LocalUpstream = field(default_factory=lambda: LocalUpstream({}))
    allowed: set[tuple[str, int]] = field(default_factory=set)  # (name, port) the policy allows
    listener: TcpListener | None = None


T1090_CONNECTION_PROXY = "0ac21132-4485-4212-a681-349e8a6637cd"


@contextlib.contextmanager
def world_for(case: AtomicCase) -> Iterator[World]:
    if case.guid == T1090_CONNECTION_PROXY:
        # An internal proxy the policy allows for HTTP, backed by a listener that records what reaches it.
        with tcp_listener() as proxy:
            yield World(
                egress=[{"host": PROXY_NAME, "ports": [PROXY_PORT], "protocols": ["http"]}],
                hosts={PROXY_NAME: "127.0.0.1"},
                upstream=LocalUpstream({PROXY_PORT: proxy.port}),
                allowed={(PROXY_NAME, PROXY_PORT)},
                listener=proxy,
            )
        return
    # Everything else gets no egress at all; the upstream still records anything the proxy tried.
    yield World()


T1496_YES = "904a5a0e-fb02-490d-9f8d-0e256eb37549"
HOG_CPU = 0.5  # T1496 runs under half a core, so the quota, not the workload's shape, bounds it


def policy_for(case: AtomicCase, world: World) -> Policy:
    resources: dict[str, Any] = {"cpu": HOG_CPU} if case.guid == T1496_YES else {}
    return Policy.from_dict(
        {
            "version": 1,
            "network": {"egress": world.egress, "hosts": world.hosts},
            "resources": resources,
            "env": {"PATH": SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"},
        }
    )


# --------------------------------------------------------------------------------------------------
# Host state the command must not touch

# Absolute paths in a command, not parts of URLs (a preceding ':' or '/' or word character means URL or
# relative path) and not shell expansions.
_PATH = re.compile(r"(?<![\w:/$.~-])(/[\w.@%+-]+(?:/[\w.@%+-]+)*)")


def paths_named(case: AtomicCase) -> list[str]:
    return sorted({m.group(1) for text in (case.command, case.cleanup) for m in _PATH.finditer(text)})


def _fingerprint(path: str) -> str | None:
    """None: absent. Directories and devices count as present and unchanged (host /tmp changes all the
    time for reasons of its own); regular files by content."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "present"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(paths: list[str]) -> dict[str, str | None]:
    return {p: _fingerprint(p) for p in paths}


def host_interfaces() -> set[str]:
    """The host's network interfaces other than lo, read from init's network namespace (the test itself
    runs in a loopback-only one)."""
    try:
        lines = Path("/proc/1/net/dev").read_text().splitlines()[2:]
    except OSError:
        return set()
    return {line.split(":", 1)[0].strip() for line in lines} - {"lo"}


# --------------------------------------------------------------------------------------------------
# Running one test


@dataclass
class Run:
    case: AtomicCase
    world: World
    result: ExecResult
    cleanup: ExecResult | None
    events: list[Any]
    during: list[str] = field(default_factory=list)  # what host-side probes saw while the command ran
    cpu_seconds: float | None = None  # the sandbox cgroup's CPU time, read on the host

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def stopped_by_tripwire(self) -> bool:
        return any(
            getattr(e, "type", "") == "alert" and getattr(e, "action", "") in ("kill", "terminate")
            for e in self.events
        )


def show(run: Run) -> str:
    r = run.result
    return (
        f"{run.case.id} {run.case.name}\ncommand: {run.case.command!r}\nexit {r.exit_code} "
        f"timed_out={r.timed_out} terminated={r.terminated}\nstdout: {str(r.stdout)[-1500:]!r}\n"
        f"stderr: {str(r.stderr)[-1500:]!r}"
    )


def _settle(sb: Sandbox) -> None:
    """Connections are recorded when they end and alerts follow their trigger: wait until the event
    stream has been quiet for 0.2 s (at most 3 s) before judging it."""
    seen = [-1, time.monotonic()]

    def quiet() -> bool:
        n = len(sb.events())
        if n != seen[0]:
            seen[:] = [n, time.monotonic()]
        return time.monotonic() - seen[1] >= 0.2

    wait_until(quiet, timeout=3.0)


def _probe_listener_from_host(port: int, found: list[str], stop: threading.Event) -> None:
    # The sandbox's listener lives in its own network namespace: from outside, the port must refuse.
    while not stop.wait(0.5):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                found.append(f"connected to 127.0.0.1:{port} from outside the sandbox")
        except OSError as e:
            found.append(type(e).__name__)


T1048_003_HTTP_SERVER = "3ea1f938-f80a-4305-9aa8-431bc4867313"
HTTP_SERVER_PORT = 9090  # written into that test's command


def cgroup_cpu_seconds(directories: list[str]) -> float | None:
    """CPU time the sandbox's cgroup has used, from the host: cpuacct.usage (v1, ns) or cpu.stat (v2, us).
    ExecResult.cpu_seconds counts only children the shell waited for, which a command killed at its
    timeout never is."""
    for d in directories:
        v1, v2 = Path(d, "cpuacct.usage"), Path(d, "cpu.stat")
        if v1.is_file():
            return int(v1.read_text()) / 1e9
        if v2.is_file():
            fields = dict(line.split() for line in v2.read_text().splitlines())
            return int(fields["usage_usec"]) / 1e6
    return None


def run_case(case: AtomicCase, sb: Sandbox, world: World, cgroup_dirs: Callable[[str], list[str]]) -> Run:
    for prereq in case.prereqs:
        # The test's own prerequisite check, in the sandbox, as Atomic Red Team runs it before the test.
        r = sb.exec([case.prereq_executor, "-c", prereq], text=True, timeout=30)
        assert r.exit_code == 0, f"{case.id}: prerequisite failed in the sandbox: {prereq!r}\n{r.stderr!r}"
    during: list[str] = []
    if case.guid == T1048_003_HTTP_SERVER:
        stop = threading.Event()
        prober = threading.Thread(target=_probe_listener_from_host, args=(HTTP_SERVER_PORT, during, stop))
        prober.start()
        try:
            result = sb.exec(case.argv(), text=True, timeout=case.timeout)
        finally:
            stop.set()
            prober.join()
    else:
        result = sb.exec(case.argv(), text=True, timeout=case.timeout)
    cleanup = None
    if case.cleanup and not sb.closed:  # a tripwire may have ended the sandbox
        cleanup = sb.exec(case.argv(case.cleanup), text=True, timeout=30)
    _settle(sb)
    cpu = None if sb.closed else cgroup_cpu_seconds(cgroup_dirs(sb.id))
    return Run(case, world, result, cleanup, sb.events(), during, cpu)


# --------------------------------------------------------------------------------------------------
# Containment


# Tests whose command goes for the network; the fence must have seen it try (unless a tripwire stopped it
# before its first connection), or the run proved nothing about the fence.
REACHES_FENCE = {
    "68e907da-2539-48f6-9fc9-257a78c05540",  # T1046 #1 /dev/tcp scan
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97",  # T1046 #12 nmap
    "f6786cc8-beda-4915-a4d6-ac2f193bb988",  # T1048 #1 ssh
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268",  # T1048 #2 ssh
    "fca246a8-a585-4f28-a2df-6495973976a1",  # T1059.004 #12 curl | bash
    T1090_CONNECTION_PROXY,
    "c9aa1ca4-04df-4623-adac-1f199ca5ce42",  # T1552.005 #3 metadata
}


def assert_contained(run: Run, before: dict[str, str | None]) -> None:
    case, world = run.case, run.world
    connects: list[NetConnect] = run.of(NetConnect)
    for c in connects:
        if c.decision == "allow":
            assert (c.name, c.port) in world.allowed, f"{case.id}: connection allowed out of policy: {c}"
        else:
            # A refused connection is cut before a byte is relayed: nothing came back from outside.
            assert c.bytes_in == 0 and c.address is None, f"{case.id}: refused connection carried data: {c}"
    allowed_names = {name for name, _ in world.allowed}
    for q in run.of(DnsQuery):
        assert q.decision == "deny" or q.name in allowed_names, f"{case.id}: lookup allowed: {q}"
    stand_ins = set(world.upstream.ports)
    assert all(a == "127.0.0.1" and p in stand_ins for a, p in world.upstream.dialed), (
        f"{case.id}: the proxy dialed beyond the stand-ins: {world.upstream.dialed}"
    )
    assert set(world.upstream.resolved) <= allowed_names, f"{case.id}: resolved {world.upstream.resolved}"
    if case.guid in REACHES_FENCE and not run.stopped_by_tripwire():
        assert connects or run.of(DnsQuery), f"{case.id}: never reached the fence\n{show(run)}"
    for d in run.of(Deny):
        if d.layer == "seccomp":  # a refused privileged call is recorded with the process that made it
            assert d.process is not None, f"{case.id}: seccomp refusal without its process: {d}"
    assert not run.result.leftover, f"{case.id}: processes outlived the command: {run.result.leftover}"
    after = snapshot(list(before))
    changed = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    assert not changed, f"{case.id}: host paths the command names changed (before, after): {changed}"
    CHECKS.get(case.guid, _no_extra_check)(run)


def _no_extra_check(run: Run) -> None:
    pass


def _saw_nothing_of_the_host(run: Run) -> None:
    """T1018: the discovery command read its own namespace's tables (loopback only), never the host's."""
    words = set(re.findall(r"[\w.-]+", str(run.result.stdout)))
    leaked = words & host_interfaces()
    assert not leaked, f"{run.case.id}: the host's interfaces {leaked} showed in the sandbox\n{show(run)}"


def _cpu_within_quota(run: Run) -> None:
    """T1496: the hog ran until the command timeout and never used more than its CPU quota."""
    r = run.result
    assert r.timed_out, show(run)
    assert any(d.layer == "timeout" for d in run.of(Deny)), "the timeout is recorded as a denial"
    assert run.cpu_seconds is not None, "the sandbox's cgroup CPU accounting was not found"
    # The sandbox ran little else (prerequisites: none), so nearly all of it is the hog's. It must have
    # burnt CPU (or the check proves nothing) and no more than the quota over the command's run; CFS
    # periods are 100 ms, hence one period of slack on top of 20 %.
    assert run.cpu_seconds >= HOG_CPU * r.duration * 0.5, f"the hog used only {run.cpu_seconds:.2f} CPU s"
    assert run.cpu_seconds <= HOG_CPU * r.duration * 1.2 + 0.1, (
        f"used {run.cpu_seconds:.2f} CPU s in {r.duration:.2f} s under a {HOG_CPU}-core quota"
    )


def _listener_unreachable(run: Run) -> None:
    assert run.during, "the host-side probe never ran"
    assert all(seen == "ConnectionRefusedError" for seen in run.during), run.during


def _account_database_untouched(run: Run) -> None:
    """T1059.004 #10: useradd can't lock /etc/passwd (read-only, and not root); the path snapshot holds
    /etc/passwd itself unchanged."""
    assert run.result.exit_code != 0, show(run)
    assert "/etc/passwd" in paths_named(run.case)
    assert re.search(r"Permission denied|cannot lock", str(run.result.stderr)), show(run)


def _no_credentials(run: Run) -> None:
    """T1552.005: every metadata request was refused; the script says it found nothing."""
    assert "No IAM credentials returned" in str(run.result.stdout), show(run)
    metadata = [c for c in run.of(NetConnect) if c.destination == "169.254.169.254"]
    assert metadata and all(c.decision == "deny" for c in metadata), metadata


def _proxy_relayed_nothing(run: Run) -> None:
    """T1090.001: the fence read the forward-proxy request, saw it was for another host, and cut it
    before the proxy received a byte."""
    assert run.world.listener is not None
    assert run.world.listener.received == b""
    assert all(c.decision == "deny" for c in run.of(NetConnect)), run.of(NetConnect)


def _refused_at_the_address(address: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        tried = [c for c in run.of(NetConnect) if c.destination == address]
        assert tried or run.stopped_by_tripwire(), f"no connection to {address}\n{show(run)}"
        assert all(c.decision == "deny" for c in tried)

    return check


CHECKS: dict[str, Callable[[Run], None]] = {
    **{
        guid: _saw_nothing_of_the_host
        for guid in (
            "acb6b1ff-e2ad-4d64-806c-6c35fe73b951",
            "158bd4dd-6359-40ab-b13c-285b9ef6fa25",
            "1a4ebe70-31d0-417b-ade2-ef4cb3e7d0e1",
            "d2791d72-b67f-4615-814f-ec824a91f514",
            "6c2da894-0b57-43cb-87af-46ea3b501388",
        )
    },
    T1496_YES: _cpu_within_quota,
    T1048_003_HTTP_SERVER: _listener_unreachable,
    "c7ac59cb-13cc-4622-81dc-6d2fee9bfac7": _account_database_untouched,
    "c9aa1ca4-04df-4623-adac-1f199ca5ce42": _no_credentials,
    T1090_CONNECTION_PROXY: _proxy_relayed_nothing,
    "68e907da-2539-48f6-9fc9-257a78c05540": _refused_at_the_address(INTERNAL_ADDRESS),
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97": _refused_at_the_address(INTERNAL_ADDRESS),
    "f6786cc8-beda-4915-a4d6-ac2f193bb988": _refused_at_the_address(OUTSIDE_ADDRESS),
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268": _refused_at_the_address(OUTSIDE_ADDRESS),
}


def _fake_run(case: AtomicCase, events: list[Any], world: World | None = None) -> Run:
    result = ExecResult(exit_code=0, stdout="", stderr="", duration=0.1, cpu_seconds=0.0, peak_memory=0)
    return Run(case, world or World(), result, None, events)


def _connect(decision: Literal["allow", "deny"], name: str, port: int, bytes_in: int = 0) -> NetConnect:
    return NetConnect(
        sandbox="fake",
        destination="198.18.0.1",
        port=port,
        name=name,
        address="127.0.0.1" if decision == "allow" else None,
        protocol="unknown",
        decision=decision,
        reason="test",
        via="transparent",
        bytes_in=bytes_in,
    )


def test_containment_check_rejects_what_escaped(tmp_path: Path) -> None:
    """The checker on fakes: a connection allowed out of policy, a refused one that carried data, a
    network test that never reached the fence, and a host file the command named that changed."""
    ssh = BY_GUID["f6786cc8-beda-4915-a4d6-ac2f193bb988"]
    uname = BY_GUID["3a53734a-9e26-4f4b-ad15-059e767f5f14"]
    with pytest.raises(AssertionError, match="allowed out of policy"):
        assert_contained(_fake_run(uname, [_connect("allow", "evil.example.internal", 443)]), {})
    with pytest.raises(AssertionError, match="refused connection carried data"):
        assert_contained(_fake_run(uname, [_connect("deny", "evil.example.internal", 443, bytes_in=5)]), {})
    with pytest.raises(AssertionError, match="never reached the fence"):
        assert_contained(_fake_run(ssh, []), {})
    named = tmp_path / "art.sh"
    before = snapshot([str(named)])
    named.write_text("written outside the sandbox")
    with pytest.raises(AssertionError, match="host paths the command names changed"):
        assert_contained(_fake_run(uname, []), before)
    # Allowed to a stand-in the policy names: contained.
    world = World(allowed={("proxy.example.internal", 3128)})
    assert_contained(_fake_run(uname, [_connect("allow", "proxy.example.internal", 3128)], world), {})


# --------------------------------------------------------------------------------------------------
# Detection


def assert_detected(sb: Sandbox, case: AtomicCase) -> None:
    """Each expected category fired; where none is expected, nothing did (a false alert)."""
    alerts = sb.alerts()
    fired = {a.category for a in alerts}
    summary = [(a.category, a.rule, a.action) for a in alerts]
    missing = set(case.expected) - fired
    assert not missing, (
        f"{case.id} {case.name}: no {sorted(missing)} alert ({case.why_expected}); fired: {summary}"
    )
    if not case.expected:
        assert not alerts, (
            f"{case.id} {case.name}: nothing should fire ({case.why_expected}); fired: {summary}"
        )


@pytest.mark.root
@pytest.mark.parametrize("case", RUNNABLE, ids=_id)
def test_atomic_is_contained_and_detected(case: AtomicCase, cgroup_dirs: Callable[[str], list[str]]) -> None:
    before = snapshot(paths_named(case))
    with (
        world_for(case) as world,
        Sandbox(policy_for(case, world), keep_workspace=False, upstream=world.upstream) as sb,
    ):
        run = run_case(case, sb, world, cgroup_dirs)
        assert_contained(run, before)
        assert_detected(sb, case)
