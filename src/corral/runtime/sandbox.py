"""`Sandbox`: one isolated environment, many commands (an agent episode).

    with Sandbox(Policy.load("examples/policies/offline.yaml")) as sb:
        r = sb.exec("echo hi > notes.txt && cat notes.txt")
        r.exit_code, r.stdout        # 0, b"hi\n"

Threading: one command at a time per sandbox (calls from several threads queue on a lock); many
sandboxes may run in parallel. `close()` may be called from any thread, also while a command runs.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import psutil

from corral._errors import ExecError, HostError, PolicyError, SandboxClosedError, SandboxStartError
from corral.detect import rules as detect_rules
from corral.egress.service import Fence, FenceContext, Upstream
from corral.events import (
    Alert,
    Deny,
    Evidence,
    ExecExit,
    ExecStart,
    JsonlSink,
    ProcessRef,
    ProcSeccomp,
    SandboxStart,
    SandboxStop,
)
from corral.events.aggregate import DenyRepeats
from corral.events.model import Event
from corral.isolation import cgroups, landlock, launcher, mounts, netns, protocol, seccomp
from corral.isolation import plan as planning
from corral.monitors import process as process_monitor
from corral.policy import Policy
from corral.runtime import _fscopy, _supervisor, _tripwires

STATE_ROOT = "/run/corral"
WORKSPACE_ROOT = "/var/lib/corral/workspaces"
_PROXY = f"http://127.0.0.1:{netns.PROXY_PORT}"
# Programs that honour proxy variables name their destination to the proxy (CONNECT host:port);
# everything else is caught in flight anyway. The policy's env may override these.
_PROXY_ENV = {
    **{
        k: _PROXY
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    },
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "no_proxy": "localhost,127.0.0.1,::1",
}
_UID_BASE = 1_300_000  # far above any distribution's range; one uid per sandbox
_DRAIN_GRACE = 0.05  # after the command exits, read what its leftovers still write for this long
_KILL_GRACE = 5.0
_SOCKADDR_UN_LEN = 110  # family and the longest path the kernel reads
_STOP_WAIT = 5.0  # how long a command cut short by the sandbox's end waits for it to be recorded
# The alert raised when the control channel carries something init did not send (see `protocol`).
CONTROL_TAMPER_RULE = "control-channel-tamper"
_OWNER_FILE = "owner"  # in the state directory: the supervisor that created the sandbox
# Events a sandbox keeps in memory for `events()`; past it the oldest (but sandbox.start) are dropped
# a tenth at a time and counted in `events_elided`. The JSONL file, when there is one, has every event.
# Repeated denials are aggregated first (see `DenyRepeats`), so ordinary work never comes near it.
_EVENTS_KEPT = 10_000

log = logging.getLogger("corral")

_hierarchy: cgroups.Hierarchy | None = None
_hierarchy_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _cgroup_hierarchy() -> cgroups.Hierarchy:
    global _hierarchy
    with _hierarchy_lock:
        if _hierarchy is None:
            _hierarchy = cgroups.detect()
            _sweep_stale(_hierarchy)
        return _hierarchy


def _sweep_stale(hierarchy: cgroups.Hierarchy, min_age: float = 60.0) -> None:
    """Remove what sandboxes whose supervisor died left behind: their processes, cgroups, state
    directories and uid claims.

    When its supervisor dies, a sandbox's init exits (its socket closes) and the kernel kills the
    rest, leaving empty directories. A frozen sandbox cannot notice, so its processes stay, stopped,
    until someone kills them: here, any sandbox whose recorded owner (see `_owner_record`) is gone.
    One whose owner runs is never touched. One without an owner record is left alone while it is
    younger than `min_age` (another supervisor may be creating it right now) or has processes.
    """
    now = time.time()
    groups = hierarchy.existing()
    try:
        states = {n for n in os.listdir(STATE_ROOT) if not n.startswith("uid-")}
    except FileNotFoundError:
        states = set()
    owners = {n: _owner_alive(f"{STATE_ROOT}/{n}") for n in states}
    orphaned = {n for n, alive in owners.items() if alive is False}
    for name in orphaned & set(groups):
        with contextlib.suppress(OSError):
            groups[name].kill()  # all first, so they die while the others are being killed
    for name in states | set(groups):
        state = f"{STATE_ROOT}/{name}"
        try:
            cg = groups.get(name)
            if owners.get(name):
                continue
            if name not in orphaned:
                if now - os.stat(state if name in states else groups[name].path).st_mtime < min_age:
                    continue
                if cg is not None and not cg.empty():
                    continue
            if cg is not None:
                cg.remove(timeout=2.0 if name in orphaned else 0)
            shutil.rmtree(state, ignore_errors=True)
        except OSError:
            continue  # in use, or removed by someone else meanwhile
    try:
        links = [n for n in os.listdir(STATE_ROOT) if n.startswith("uid-")]
    except FileNotFoundError:
        links = []
    for name in links:
        link = f"{STATE_ROOT}/{name}"
        try:
            target = os.readlink(link)
            if (target in orphaned or now - os.lstat(link).st_mtime >= min_age) and not os.path.exists(
                f"{STATE_ROOT}/{target}"
            ):
                os.unlink(link)
        except OSError:
            continue


def _owner_record(pid: int) -> str:
    """The supervisor process `pid` as "pid start-time": the pid alone may be reused by the time
    someone reads it."""
    return f"{pid} {psutil.Process(pid).create_time()!r}"


@functools.cache
def _own_record(pid: int) -> str:
    """This supervisor's `_owner_record`, read once (keyed by pid, so a forked child has its own)."""
    return _owner_record(pid)


def _owner_alive(state_dir: str) -> bool | None:
    """Whether the supervisor recorded in `state_dir` still runs; None when it recorded none."""
    try:
        recorded = Path(f"{state_dir}/{_OWNER_FILE}").read_text()
        pid = int(recorded.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        return _owner_record(pid) == recorded
    except psutil.NoSuchProcess:
        return False


def _allocate_uid(sandbox_id: str) -> int:
    """A uid no other sandbox on this host uses, from any supervisor process.

    The claim is a symlink /run/corral/uid-N -> <sandbox id>, created atomically; two supervisors
    (say, Ray workers on one node) can't both win it. Sandboxes of one uid could signal each other
    and would share per-user kernel limits.
    """
    os.makedirs(STATE_ROOT, mode=0o700, exist_ok=True)
    with _hierarchy_lock:
        while True:
            uid = _UID_BASE + secrets.randbelow(1_000_000)
            if uid in _uids_in_use:
                continue
            try:
                os.symlink(sandbox_id, f"{STATE_ROOT}/uid-{uid}")
            except FileExistsError:
                continue
            _uids_in_use.add(uid)
            return uid


def _release_uid(uid: int) -> None:
    with _hierarchy_lock:
        _uids_in_use.discard(uid)
    try:
        os.unlink(f"{STATE_ROOT}/uid-{uid}")
    except FileNotFoundError:
        pass


_rulesets: dict[tuple[object, ...], detect_rules.Ruleset] = {}
_rulesets_lock = threading.Lock()


def rule_files(policy: Policy) -> list[str]:
    """The policy's extra rule files, relative paths taken from the policy file's directory."""
    base = os.path.dirname(os.path.abspath(policy.source)) if os.path.isfile(policy.source) else os.getcwd()
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in policy.tripwires.rules]


def tripwire_ruleset(policy: Policy) -> detect_rules.Ruleset:
    """corral's rules plus the policy's, compiled once per set of file versions (a sandbox start
    must not pay for parsing YAML)."""
    # corral's own files are part of the installed package: they change with an upgrade, which
    # restarts the process. The policy's files are checked at every start.
    key: list[object] = ["builtin"]
    for f in rule_files(policy):
        try:
            st = os.stat(f)
            key.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            key.append((f, None))  # the loader reports it, naming the file
    k = tuple(key)
    with _rulesets_lock:
        ruleset = _rulesets.get(k)
    if ruleset is None:
        ruleset = detect_rules.load(rule_files(policy))
        with _rulesets_lock:
            _rulesets[k] = ruleset
    bad = [
        k for k in policy.tripwires.responses if k not in ruleset.names and k not in detect_rules.CATEGORIES
    ]
    if bad:
        raise PolicyError(
            [
                f"{policy.source}: tripwires.responses.{k}: no rule or category of that name; use a category "
                f"({', '.join(detect_rules.CATEGORIES)}) or a rule name (`corral rules list`)"
                for k in bad
            ]
        )
    return ruleset


@dataclass(frozen=True)
class ExecResult:
    """What a command did. stdout/stderr are bytes, or str when `exec(..., text=True)`."""

    exit_code: int
    stdout: bytes | str
    stderr: bytes | str
    duration: float
    cpu_seconds: float
    peak_memory: int
    signal: int | None = None
    timed_out: bool = False
    # "lifetime", "closed" or "tripwire" when the sandbox ended under the command; "frozen" when a
    # tripwire froze the sandbox (the command's processes are kept, stopped, for inspection)
    terminated: str | None = None
    leftover: list[ProcessRef] = field(default_factory=list)
    denials: list[Deny] = field(default_factory=list)
    # stdout/stderr stop at the policy's `resources.output`; the rest was read and discarded
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Output:
    """A chunk of a streaming command's output."""

    stream: Literal["stdout", "stderr"]
    data: bytes


def _live_processes(pids: list[int]) -> list[ProcessRef]:
    """ProcessRefs of those pids that are still running: not exited, not a zombie awaiting init, and
    not killed (a command killed at its timeout takes its process group with it, and under load some
    of it may not yet have run to die)."""
    refs = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or process_monitor.killed(pid):
                continue
        except psutil.NoSuchProcess:
            continue
        ref = _process_ref(pid)
        if ref.cmdline or ref.exe:
            refs.append(ref)
    return refs


def _process_ref(pid: int) -> ProcessRef:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            _, ns_pid = process_monitor.status_ids(pid)
            try:
                exe = p.exe()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                exe = None
            return ProcessRef(
                pid=pid,
                ns_pid=ns_pid,
                exe=exe or None,
                cmdline=p.cmdline(),
                started=datetime.fromtimestamp(p.create_time(), UTC),
            )
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return ProcessRef(pid=pid)


class _Reaper:
    """Finishes sandbox teardown off the caller's path: waiting out namespace destruction, removing
    cgroups and state directories. One thread for all sandboxes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="corral-reaper", daemon=True)
                self._thread.start()
        self._queue.put(fn)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every teardown submitted so far has finished."""
        done = threading.Event()
        self.submit(done.set)
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                fn()
            except Exception as e:  # a failed cleanup must not stop the others
                print(f"corral: sandbox cleanup failed: {e}", file=sys.stderr)


_reaper = _Reaper()
_open: set[Sandbox] = set()
_open_lock = threading.Lock()


@atexit.register
def _close_all_at_exit() -> None:
    # The reaper is a daemon thread: without this, an interpreter that exits right after close()
    # would leave cgroups and state directories behind.
    with _open_lock:
        leftover = list(_open)
    for sb in leftover:
        sb.close()
    _reaper.drain()


class Sandbox:
    """A running sandbox. Creating one starts it; `close()` (or leaving the `with`) destroys it.

    policy: a Policy, a path to a policy file, or None for the default (offline) policy.
    workspace: a host directory copied into /workspace at start and written back at close. Without
        it, the workspace is saved to /var/lib/corral/workspaces/<id> at close (unless
        keep_workspace=False).
    events: a path; every event is appended to it as a JSON line the moment it happens.
    upstream: how the egress proxy resolves names and connects on the host
        (`corral.egress.service.Upstream`); tests map names and ports to local servers with it.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str] | None = None,
        *,
        workspace: str | os.PathLike[str] | None = None,
        events: str | os.PathLike[str] | None = None,
        keep_workspace: bool = True,
        upstream: Upstream | None = None,
    ) -> None:
        if policy is None:
            policy = Policy.default()
        elif not isinstance(policy, Policy):
            policy = Policy.load(policy)
        self.policy = policy
        self.id = secrets.token_hex(6)
        self._events: list[Event] = []
        self._events_lock = threading.Lock()
        self._repeats = DenyRepeats()
        self.events_elided = 0  # events dropped from `events()` (not from the JSONL file) to bound memory
        self._sink = JsonlSink(events) if events is not None else None
        self._exec_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._exec_seq = 0
        self._current_exec: int | None = None
        self._closed: str | None = None
        self._started = time.monotonic()
        self._workspace_src = os.fspath(workspace) if workspace is not None else None
        if self._workspace_src is not None and not os.path.isdir(self._workspace_src):
            raise SandboxStartError(f"workspace: {self._workspace_src} is not a directory")
        self.workspace = self._workspace_src or f"{WORKSPACE_ROOT}/{self.id}"
        self._keep_workspace = keep_workspace or workspace is not None
        self._upstream = upstream
        self._fence: Fence | None = None
        self._cgroup: cgroups.SandboxCgroup | None = None
        self._launched: launcher.Launched | None = None
        self._workspace_fd: int | None = None  # the sandbox's /workspace, held from its start
        self._state_dir = f"{STATE_ROOT}/{self.id}"
        self._lifetime_timer: int | None = None
        self._syscalls: dict[int, str] = {}
        self._writable: tuple[str, ...] = ()  # the sandbox's own storage, where its sockets live
        self._reaped = threading.Event()
        self._tripwires: _tripwires.Tripwires | None = None
        self._frozen: str | None = None  # the rule that froze the sandbox
        self._exec_wake: int | None = None  # write end of the running command's wake-up pipe
        self._exec_thread: int | None = None  # the thread running a command, while one runs
        self._exit_recorded = threading.Event()  # clear while a command's exec.exit is not yet written
        self._exit_recorded.set()
        self._stopped = threading.Event()  # set once sandbox.stop is written
        self._start()

    # --- lifecycle -----------------------------------------------------------------------

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise HostError("corral must run as root to create sandboxes (namespaces, cgroups, mounts)")
        degraded: list[str] = []
        abi = landlock.abi_version()
        if abi == 0:
            if "landlock" not in self.policy.degrade:
                raise HostError(
                    "landlock: this kernel has no Landlock (or it is disabled); enable it, or allow running "
                    "without it with `degrade: [landlock]` in the policy"
                )
            degraded.append("landlock")
        hierarchy = _cgroup_hierarchy()
        self.uid = _allocate_uid(self.id)
        step = "plan"
        try:
            plan = planning.build(self.policy, uid=self.uid, gid=self.uid, sandbox_id=self.id)
            self._writable = (*plan.writable, "/dev/shm")
            step = "state directory"
            os.makedirs(STATE_ROOT, mode=0o700, exist_ok=True)
            mounts.prepare_host(self._state_dir, self.uid, self.uid, plan.hostname)
            # Before the cgroup exists: whoever finds it after this process died knows it is orphaned.
            Path(f"{self._state_dir}/{_OWNER_FILE}").write_text(_own_record(os.getpid()))
            step = "cgroup"
            self._cgroup = hierarchy.create(
                f"{self.id}",
                cgroups.Limits(plan.memory_bytes, plan.cpu_cores, plan.max_processes),
            )
            step = "launch"
            self._syscalls = seccomp.syscall_numbers()
            self._launched = launcher.launch(
                plan,
                join_files=self._cgroup.init_join_files,
                commands_memory=self._cgroup.commands_memory,
                state_dir=self._state_dir,
                landlock_abi=abi,
                notify="seccomp_notify" not in self.policy.degrade,
            )
            # Held open, the workspace outlives the sandbox's mount namespace: it can be saved even
            # if init dies first (and with it every path into the sandbox). Opened before any
            # command has run, so nothing in the sandbox chose what it names.
            self._workspace_fd = os.open(
                self._sandbox_path(planning.WORKSPACE), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
            if self._launched.notify_fd is None:
                degraded.append("seccomp_notify")
            else:
                _supervisor.get().watch_notifications(self._launched.notify_fd, self._on_seccomp)
            step = "egress"
            self._fence = Fence(
                FenceContext(self.id, self._emit, lambda: self._current_exec, self._find_process),
                self.policy,
                netns.FenceSockets.adopt(self._launched.fence_fds),
                self._upstream,
            )
            self._launched.fence_fds = []  # the fence owns them now and closes them
            if self.policy.tripwires.enabled:
                step = "tripwires"
                self._start_tripwires(degraded)
            if self._workspace_src is not None:
                step = "workspace"
                self._copy_in(self._workspace_src)
        except BaseException as e:
            if self._launched is not None:
                signal.pidfd_send_signal(self._launched.pidfd, signal.SIGKILL)
            self._teardown()
            if isinstance(e, HostError | PolicyError):
                raise
            raise SandboxStartError(f"sandbox {self.id}: {step}: {e}") from e
        with _open_lock:
            _open.add(self)
        sup = _supervisor.get()
        self._lifetime_timer = sup.call_at(time.monotonic() + self.policy.resources.lifetime, self._expire)
        r = self.policy.resources
        self._emit(
            SandboxStart(
                sandbox=self.id,
                policy=self.policy.source,
                cgroup_version=hierarchy.version,
                uid=self.uid,
                limits={
                    "memory": r.memory,
                    "cpu": r.cpu,
                    "processes": r.processes,
                    "disk": r.disk,
                    "timeout": r.timeout,
                    "lifetime": r.lifetime,
                    "output": r.output,
                },
                degraded=degraded,
                workspace=self.workspace,
            )
        )

    def _start_tripwires(self, degraded: list[str]) -> None:
        assert self._launched is not None and self._cgroup is not None
        ruleset = tripwire_ruleset(self.policy)
        tw = _tripwires.Tripwires(
            self.id,
            ruleset,
            dict(self.policy.tripwires.responses),
            init_pid=self._launched.init_pid,
            cgroup=self._cgroup,
            current_exec=lambda: self._current_exec,
            emit=self._emit,
            responder=self,
            gpu_granted=bool(self.policy.gpu),
            cpu_budget=self.policy.resources.cpu,
            interval=self.policy.tripwires.sample_interval,
        )
        tw.start()
        if tw.connector_error is not None:
            if "process_events" not in self.policy.degrade:
                tw.close()
                raise HostError(
                    f"tripwires: {tw.connector_error}; allow running without it (exits are then noticed "
                    "at the next sample) with `degrade: [process_events]` in the policy"
                )
            degraded.append("process_events")
        self._tripwires = tw

    # --- responses (called by the tripwires) ------------------------------------------------------

    def kill_processes(self, pids: list[int]) -> int:
        """SIGKILL those of `pids` that are still in this sandbox; how many were. Never init."""
        if self._cgroup is None or self._launched is None:
            return 0
        try:
            mine = set(self._cgroup.pids())
        except OSError:
            return 0
        killed = 0
        for pid in pids:
            # The cgroup check rules out a pid reused by another process since the rule fired.
            if pid in mine and pid != self._launched.init_pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def freeze_for(self, rule: str) -> None:
        # Off the caller's thread: it may be the supervisor, which a parked execve in this very
        # sandbox waits on, and freezing waits for every task to stop.
        threading.Thread(target=self._freeze, args=(rule,), name=f"corral-freeze-{self.id}").start()

    def _freeze(self, rule: str) -> None:
        with self._state_lock:
            if self._closed is not None or self._frozen is not None or self._cgroup is None:
                return
            self._frozen = rule
        self._cgroup.freeze()
        self._wake_exec()

    def monitor_failed(self, reason: str) -> None:
        # Fail closed: a monitor the tripwires depend on is gone, so the sandbox stops.
        threading.Thread(
            target=self._terminate, args=("failed", f"tripwires: {reason}"), name=f"corral-fail-{self.id}"
        ).start()

    def _control_violation(self, exec_id: int, reason: str) -> None:
        """Something other than init wrote to the supervisor's control socket (or init misbehaved):
        nothing this sandbox reports can be trusted any more, so it is recorded and ended here."""
        self._emit(
            Alert(
                sandbox=self.id,
                rule=CONTROL_TAMPER_RULE,
                category="tamper",
                severity="critical",
                action="terminate",
                outcome="sandbox terminating",
                message=f"a message on init's control socket was not init's answer to the command: {reason}",
                exec=exec_id,
                evidence=Evidence(trigger={"reason": reason}),
            )
        )
        self._terminate("tripwire", f"control channel: {reason}")

    def terminate_for(self, rule: str) -> None:
        threading.Thread(target=self._terminate, args=("tripwire",), name=f"corral-trip-{self.id}").start()

    def _wake_exec(self) -> None:
        with self._state_lock:  # the running command closes the pipe under this lock
            if self._exec_wake is not None:
                try:
                    os.write(self._exec_wake, b"x")
                except OSError:
                    pass

    def alerts(self) -> list[Alert]:
        """The alerts raised so far (rules that fired with a response other than `log`), oldest first."""
        return [e for e in self.events() if isinstance(e, Alert) and e.action != "log"]

    @property
    def frozen(self) -> str | None:
        """The rule that froze the sandbox, or None. A frozen sandbox runs no more commands; inspect
        it (its processes are stopped, not killed), then close it."""
        return self._frozen

    def close(self, wait: bool = False) -> None:
        """Destroy the sandbox. Idempotent, callable from any thread.

        Before it returns, the workspace is saved (with every process frozen) and every process in
        the sandbox has been sent SIGKILL, which no process survives or can act after. Removing the
        cgroup and state directory waits for the kernel to finish tearing the namespaces down (an RCU
        grace period or two); that happens in the background unless `wait=True`.
        """
        self._terminate("closed")
        if wait:
            self._reaped.wait()

    def _expire(self) -> None:
        # Saving a large workspace takes a while; the supervisor thread serves every sandbox's
        # refused calls, so the close runs on a thread of its own.
        threading.Thread(target=self._terminate, args=("lifetime",), name=f"corral-expire-{self.id}").start()

    def _terminate(self, reason: Literal["closed", "lifetime", "failed", "tripwire"], why: str = "") -> None:
        with self._state_lock:
            if self._closed is not None:
                return
            self._closed = reason
        with _open_lock:
            _open.discard(self)
        if reason == "lifetime":
            self._emit(
                Deny(
                    sandbox=self.id,
                    layer="lifetime",
                    what="lifetime",
                    exec=self._current_exec,
                    detail=f"sandbox lifetime of {self.policy.resources.lifetime:g}s reached",
                )
            )
        if self._lifetime_timer is not None:
            _supervisor.get().cancel(self._lifetime_timer)
        if self._tripwires is not None:
            self._tripwires.close()  # the kill below must not read as alerts
        self._wake_exec()
        leftover: list[ProcessRef] = []
        error = ""
        if self._launched is not None and self._cgroup is not None:
            init = self._launched.init_pid
            frozen = False
            try:
                if self._keep_workspace:
                    # Set before the call: a freeze that times out leaves tasks frozen all the same,
                    # and a frozen task never acts on the SIGKILL below until it is thawed.
                    frozen = True
                    self._cgroup.freeze()  # nothing may change the workspace while we save it
                leftover = _live_processes([p for p in self._cgroup.pids() if p != init])
                if self._keep_workspace:
                    self._copy_out()
            except OSError as e:
                # A failed save must not stop the kill and the cleanup; the stop event says what failed.
                error = f"saving the workspace to {self.workspace} failed: {e}"
            finally:
                # Init's death makes the kernel kill every other process in its PID namespace.
                try:
                    signal.pidfd_send_signal(self._launched.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if frozen or self._frozen is not None:
                    self._cgroup.thaw()  # frozen tasks only act on SIGKILL once thawed
        fence, self._fence = self._fence, None
        if fence is not None:
            # Once nothing in the sandbox can connect any more: its last connections and queries are
            # recorded before the stop event, and `events()` has them as soon as this returns.
            fence.close()
        if threading.get_ident() != self._exec_thread:
            # So is the running command's exit: its thread woke when the processes died. (A stream
            # its consumer stopped reading is not waited for long.)
            self._exit_recorded.wait(1.0)
        self._flush_repeats()
        self._emit(
            SandboxStop(
                sandbox=self.id,
                reason=reason,
                duration=time.monotonic() - self._started,
                leftover=leftover,
                error="; ".join(e for e in (why, error) if e),
            )
        )
        self._stopped.set()
        _reaper.submit(self._teardown)

    def _teardown(self) -> None:
        """Release whatever `_start` created, in reverse order; safe on a half-started sandbox."""
        try:
            if self._launched is not None:
                if self._launched.notify_fd is not None:
                    _supervisor.get().unwatch(self._launched.notify_fd)
                    os.close(self._launched.notify_fd)
                    self._launched.notify_fd = None
                if self._exec_lock.acquire(blocking=False):
                    try:
                        self._launched.control.close()
                    finally:
                        self._exec_lock.release()
                sel = selectors.DefaultSelector()
                sel.register(self._launched.pidfd, selectors.EVENT_READ)
                sel.select(_KILL_GRACE)
                sel.close()
                os.close(self._launched.pidfd)
            if self._workspace_fd is not None:
                os.close(self._workspace_fd)
                self._workspace_fd = None
            if self._cgroup is not None:
                self._cgroup.kill()  # only matters if init never started
                self._cgroup.remove()
                self._cgroup = None
            if self._fence is not None:
                self._fence.close()
                self._fence = None
            elif self._launched is not None:
                for fd in self._launched.fence_fds:
                    os.close(fd)
            shutil.rmtree(self._state_dir, ignore_errors=True)
            if hasattr(self, "uid"):
                _release_uid(self.uid)
            if self._sink is not None and self._exec_lock.acquire(blocking=False):
                try:
                    self._sink.close()
                finally:
                    self._exec_lock.release()
        finally:
            self._reaped.set()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # --- workspace ---------------------------------------------------------------------------

    def _sandbox_path(self, path: str) -> str:
        assert self._launched is not None
        return f"/proc/{self._launched.init_pid}/root{path}"

    def _copy_in(self, src: str) -> None:
        dst = self._sandbox_path(planning.WORKSPACE)
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        for root, dirs, files in os.walk(dst):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), self.uid, self.uid)

    def _copy_out(self) -> None:
        """Save /workspace to the host; runs with every sandbox process frozen (see `_fscopy`).

        Read through the descriptor held since the start, so a dead init doesn't lose it. At most
        `resources.disk` bytes of data reach the host: the sandbox's own storage holds no more, and
        holes and hard links are kept as such. Files that would go over are left out and recorded.
        """
        assert self._workspace_fd is not None
        saved = _fscopy.mirror(
            f"/proc/self/fd/{self._workspace_fd}", self.workspace, limit=self.policy.resources.disk
        )
        if saved.refused:
            self._emit(Deny(sandbox=self.id, layer="storage", what="disk", detail=saved.describe()))

    # --- events ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        # Events come from several threads (the command's, the supervisor's, the egress loop's, the
        # monitors'); the file gets them in the same order as `events()`.
        with self._events_lock:
            if isinstance(event, Deny):
                recorded: list[Event] = [*self._repeats.add(event)]
            else:
                recorded = [*self._repeats.expired(), event]
            self._record(recorded)
        if self._tripwires is not None:
            for e in recorded:
                self._tripwires.observe_event(e)

    def _flush_repeats(self) -> None:
        """Record the denials still being counted (at a command's end, so its result lists them, and
        at the sandbox's stop)."""
        with self._events_lock:
            recorded: list[Event] = [*self._repeats.flush()]
            self._record(recorded)
        if self._tripwires is not None:
            for e in recorded:
                self._tripwires.observe_event(e)

    def _record(self, recorded: list[Event]) -> None:
        for event in recorded:
            self._events.append(event)
            if self._sink is not None:
                self._sink.write(event)
        if len(self._events) > _EVENTS_KEPT:
            drop = _EVENTS_KEPT // 10
            del self._events[1 : 1 + drop]  # [0] is sandbox.start, which says what the sandbox was
            if not self.events_elided:
                log.warning(
                    "sandbox %s: over %d events; the oldest are dropped from events() (the event file "
                    "keeps them)",
                    self.id,
                    _EVENTS_KEPT,
                )
            self.events_elided += drop

    def events(self) -> list[Event]:
        """This sandbox's events so far, oldest first. At most `_EVENTS_KEPT` are kept in memory:
        `events_elided` counts those dropped (the event file, if any, has them all)."""
        with self._events_lock:
            return list(self._events)

    def _event_mark(self) -> int:
        """A position in the event stream, for `_events_since`."""
        with self._events_lock:
            return self.events_elided + len(self._events)

    def _events_since(self, mark: int) -> list[Event]:
        with self._events_lock:
            if mark == 0:
                return list(self._events)
            return self._events[max(1, mark - self.events_elided) :]

    def _find_process(self, inode: int) -> ProcessRef | None:
        """Which of the sandbox's processes holds the socket with this inode (the fence finds the
        inode), read on the host. The scan is bounded (`FdScan`): past it the owner stays unknown
        (a TCP connection is still named by the connect its seccomp filter reported)."""
        if self._cgroup is None:
            return None
        target = f"socket:[{inode}]"
        try:
            pids = self._cgroup.pids()
        except OSError:
            return None
        scan = process_monitor.FdScan()
        for pid in pids:
            if target in scan.links(pid):
                return _process_ref(pid)
            if scan.left <= 0:
                break
        return None

    def _on_seccomp(self, note: seccomp.Notification) -> None:
        # Runs on the supervisor thread while the caller is parked in the kernel, so its identity is
        # read before it can exec anything else. The event is recorded before the call is answered:
        # the command can't then finish (and its result be built) without its own denials.
        assert self._launched is not None and self._launched.notify_fd is not None
        name = self._syscalls.get(note.syscall_nr, f"syscall {note.syscall_nr}")
        address = seccomp.address_of(name, note.args)
        if address is not None:
            self._on_socket_address(note, name, *address)
            return
        install = seccomp.filter_install(name, note.args)
        if install is not None and install != "listener":
            self._on_filter_install(note, install)
            return
        if name == "connect":
            self._note_connect(note)
            return
        if name in seccomp.WATCHED:
            tw = self._tripwires
            verdict = (
                _tripwires.ExecVerdict("continue") if tw is None else tw.on_exec(note.pid, name, note.args)
            )
            if verdict.action == "continue":
                seccomp.respond_continue(self._launched.notify_fd, note.id)
            elif verdict.action == "refuse":
                seccomp.respond_error(self._launched.notify_fd, note.id, verdict.error)
            # "hold": no answer; the caller stays parked until the freeze or the close reaches it
            return
        proc = _process_ref(note.pid)
        detail = (
            f"args {note.args[0]:#x} {note.args[1]:#x}"
            if name in ("clone", "socket", "socketpair", "ioctl", "seccomp")
            else ""
        )
        if name in ("socket", "socketpair"):
            detail = f"{seccomp.family_name(note.args[0] & 0xFFFFFFFF)}, {detail}"
        self._emit(
            Deny(
                sandbox=self.id,
                layer="seccomp",
                what=name,
                exec=self._current_exec,
                process=proc,
                detail=detail,
            )
        )
        seccomp.respond_error(self._launched.notify_fd, note.id, errno.EPERM)

    def _on_socket_address(self, note: seccomp.Notification, name: str, pointer: int, length: int) -> None:
        """A connect or sendto whose address may name a UNIX socket by path: allowed only to sockets in
        the sandbox's own storage or named by `network.unix_sockets`. A read-only view of a host
        directory doesn't stop a connect, and a host service's socket there is the host's.

        Decided on what the caller's memory and filesystem hold now; the kernel reads both again after
        the answer, so another thread rewriting the address, or swapping a symlink in the sandbox's
        own storage, between the two can still reach a socket the sandbox can see (README: limits).
        """
        assert self._launched is not None and self._launched.notify_fd is not None
        try:
            raw = process_monitor.read_memory(note.pid, pointer, min(length, _SOCKADDR_UN_LEN))
        except OSError:
            raw = b""  # gone, or an address it can't read: the kernel fails the call the same way
        family = int.from_bytes(raw[:2], sys.byteorder) if len(raw) >= 2 else -1
        if family == socket.AF_INET and name == "connect":
            self._note_connect(note)  # an IPv4 address with a padded length: still the fence's to name
            return
        path = raw[2:].split(b"\0", 1)[0].decode(errors="surrogateescape")
        if family != socket.AF_UNIX or not path:
            # Not a pathname socket: abstract ones (leading NUL) are confined by Landlock's scope.
            seccomp.respond_continue(self._launched.notify_fd, note.id)
            return
        try:
            target = process_monitor.socket_path(note.pid, path)
            why = "" if target is None or self._own_socket(note.pid, target) else "outside the sandbox"
        except process_monitor.Unfollowable as e:
            target, why = path, str(e)
        except OSError:
            target, why = None, ""  # the caller is gone
        if not why:
            seccomp.respond_continue(self._launched.notify_fd, note.id)
            return
        self._emit(
            Deny(
                sandbox=self.id,
                layer="unix",
                what=target or path,
                exec=self._current_exec,
                process=_process_ref(note.pid),
                detail=f"{name} to a UNIX socket {why}, not in network.unix_sockets",
            )
        )
        seccomp.respond_error(self._launched.notify_fd, note.id, errno.EACCES)

    def _own_socket(self, pid: int, target: str) -> bool:
        if any(target == root or target.startswith(root + "/") for root in self._writable):
            return True
        named = self.policy.network.unix_sockets
        return target in named or any(
            process_monitor.in_root_realpath(f"/proc/{pid}/root", entry) == target for entry in named
        )

    def _on_filter_install(self, note: seccomp.Notification, how: str) -> None:
        """Recorded, then let through: the calls the new filter refuses never reach corral."""
        assert self._launched is not None and self._launched.notify_fd is not None
        try:
            self._emit(
                ProcSeccomp(sandbox=self.id, process=_process_ref(note.pid), how=how, exec=self._current_exec)
            )
        finally:
            seccomp.respond_continue(self._launched.notify_fd, note.id)

    def _note_connect(self, note: seccomp.Notification) -> None:
        """Tell the fence who is connecting where, read while the caller is parked in connect():
        the address, the program and its command line (a scanner may exit right after its last
        connect). The rest of the process's record is read once the caller has been let go."""
        assert self._launched is not None and self._launched.notify_fd is not None
        fence = self._fence
        reported = None
        refused = False
        try:
            target = process_monitor.read_ipv4_sockaddr(note.pid, note.args[1])
            # The kernel connects 0.0.0.0 to this host, which in the sandbox is its own loopback.
            local = target is not None and (target[0].is_loopback or target[0].is_unspecified)
            if fence is not None and target is not None and not local:
                refusal = fence.judge_connect(target[0], target[1])
                # Refused here, the connect fails at once with ECONNREFUSED, as a closed port's does,
                # instead of opening to the proxy and then closing. Safe against a second thread
                # rewriting the address or the descriptor meanwhile: an error can only cost the
                # caller its own connect; the proxy still decides every connect let through.
                if refusal is not None and process_monitor.is_tcp_socket(note.pid, int(note.args[0])):
                    fence.refuse_connect(refusal, _process_ref(note.pid))  # read while it is parked
                    refused = True
                else:
                    brief = ProcessRef(
                        pid=note.pid,
                        exe=process_monitor.exe(note.pid),
                        cmdline=process_monitor.cmdline(note.pid),
                    )
                    reported = fence.note_connect(target[0], target[1], brief)
        except OSError:
            pass  # gone, or an address it can't read: the connect fails or goes on unnamed
        finally:
            if refused:
                seccomp.respond_error(self._launched.notify_fd, note.id, errno.ECONNREFUSED)
            else:
                seccomp.respond_continue(self._launched.notify_fd, note.id)
        if reported is not None and fence is not None:
            full = _process_ref(note.pid)
            if full.exe is not None and full.cmdline:  # still there, not yet a zombie
                fence.name_connect(reported, full)

    # --- commands ----------------------------------------------------------------------------

    def exec(
        self,
        command: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        text: bool = False,
    ) -> ExecResult:
        """Run a command to completion. A string runs under /bin/sh -c; a list runs as is.

        The command's environment is the policy's `env` plus `env` here. `timeout` defaults to the
        policy's `resources.timeout`; on expiry the command's process group is killed and the result
        has `timed_out=True` and exit code 137.
        """
        run = self.stream(command, input=input, timeout=timeout, env=env, cwd=cwd)
        out: list[bytes] = []
        err: list[bytes] = []
        for chunk in run:
            (out if chunk.stream == "stdout" else err).append(chunk.data)
        result = run.result
        assert result is not None
        if text:
            return _replace_output(
                result, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
            )
        return _replace_output(result, b"".join(out), b"".join(err))

    def stream(
        self,
        command: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdio: tuple[int, int, int] | None = None,
        tty: bool = False,
    ) -> _Run:
        """Start a command and iterate over its output as it arrives; `.result` is set at the end.

        `stdio` passes three host file descriptors straight through (the CLI hands over its
        terminal this way); the iterator then yields nothing. `tty=True` makes stdin (a pty the
        caller opened) the command's controlling terminal, for interactive shells.
        """
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("command: empty")
        data = input.encode() if isinstance(input, str) else input
        full_env = {**_PROXY_ENV, **self.policy.env}
        if env:
            full_env.update(env)
        return _Run(
            self,
            argv,
            data,
            self.policy.resources.timeout if timeout is None else timeout,
            full_env,
            cwd,
            stdio,
            tty,
        )

    def write_file(self, path: str, data: bytes | str) -> None:
        """Write a file in the sandbox (relative paths are under /workspace), as the agent would."""
        r = self.exec(["/bin/sh", "-c", 'cat > "$1"', "sh", path], input=data)
        if r.exit_code != 0:
            raise OSError(errno.EIO, f"write_file {path}: {_text(r.stderr)}")

    def read_file(self, path: str) -> bytes:
        """Read a file from the sandbox, with the agent's permissions (so hidden paths stay hidden)."""
        r = self.exec(["/bin/cat", "--", path])
        if r.exit_code != 0:
            raise OSError(errno.ENOENT, f"read_file {path}: {_text(r.stderr)}")
        assert isinstance(r.stdout, bytes)
        return r.stdout


def _text(data: bytes | str) -> str:
    return data.strip() if isinstance(data, str) else data.decode(errors="replace").strip()


def _replace_output(r: ExecResult, out: bytes | str, err: bytes | str) -> ExecResult:
    return ExecResult(
        exit_code=r.exit_code,
        stdout=out,
        stderr=err,
        duration=r.duration,
        cpu_seconds=r.cpu_seconds,
        peak_memory=r.peak_memory,
        signal=r.signal,
        timed_out=r.timed_out,
        terminated=r.terminated,
        leftover=r.leftover,
        denials=r.denials,
        output_truncated=r.output_truncated,
    )


class _Run:
    """One command's life: request, output pumping, timeout, exit, and the accounting around it."""

    def __init__(
        self,
        sb: Sandbox,
        argv: list[str],
        data: bytes | None,
        timeout: float,
        env: dict[str, str],
        cwd: str | None,
        stdio: tuple[int, int, int] | None,
        tty: bool = False,
    ) -> None:
        self.sb, self.argv, self.data, self.timeout = sb, argv, data, timeout
        self.env, self.cwd, self.stdio, self.tty = env, cwd, stdio, tty
        self.result: ExecResult | None = None

    def __iter__(self) -> Iterator[Output]:
        sb = self.sb
        with sb._exec_lock:
            if sb._closed is not None or sb._launched is None or sb._cgroup is None:
                raise SandboxClosedError(f"sandbox {sb.id} is closed ({sb._closed})")
            if sb._frozen is not None:
                raise SandboxClosedError(
                    f"sandbox {sb.id} was frozen by tripwire {sb._frozen!r}; inspect it, then close() it"
                )
            sb._exec_thread = threading.get_ident()
            sb._exit_recorded.clear()
            try:
                yield from self._run(sb._launched, sb._cgroup)
            finally:
                sb._current_exec = None
                sb._exec_thread = None
                sb._exit_recorded.set()
                if sb._closed is not None:
                    sb._launched.control.close()
                    # Cut short by the sandbox's end: return once that is recorded as well.
                    sb._stopped.wait(_STOP_WAIT)

    def _run(self, launched: launcher.Launched, cgroup: cgroups.SandboxCgroup) -> Iterator[Output]:
        sb = self.sb
        sb._exec_seq += 1
        exec_id = sb._exec_seq
        sb._current_exec = exec_id
        denials_before = sb._event_mark()
        cgroup.reset_peak()
        before = cgroup.usage()
        # Leftovers are told apart by pid, not start time: /proc start times are only as precise as
        # the boot time they are relative to (whole seconds).
        pids_before = set(cgroup.pids())
        start = time.monotonic()
        sel = selectors.DefaultSelector()
        to_close: list[int] = []
        pending_input = memoryview(self.data or b"")
        if self.stdio is not None:
            child_fds = list(self.stdio)
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            child_fds = [in_r, out_w, err_w]
            for fd in child_fds:
                # The agent's uid must own its pipes, or `echo x > /dev/stderr` (a reopen through
                # /proc/self/fd) is refused.
                os.fchown(fd, sb.uid, sb.uid)
            to_close += [in_r, out_w, err_w]
            sel.register(out_r, selectors.EVENT_READ, "stdout")
            sel.register(err_r, selectors.EVENT_READ, "stderr")
            if pending_input:
                os.set_blocking(in_w, False)
                sel.register(in_w, selectors.EVENT_WRITE, "stdin")
            else:
                os.close(in_w)
        sel.register(launched.control, selectors.EVENT_READ, "control")
        # A tripwire that freezes the sandbox wakes this loop: the command will not finish.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        with sb._state_lock:
            sb._exec_wake = wake_w
        sb._emit(ExecStart(sandbox=sb.id, exec=exec_id, command=self.argv))
        request = protocol.Exec(
            id=exec_id,
            token=protocol.new_token(),
            argv=self.argv,
            env=self.env,
            cwd=self.cwd or "",
            tty=self.tty,
        )
        exchange = protocol.Exchange(request)
        try:
            launcher.send_message(launched.control, request, child_fds)
        except OSError as e:
            for fd in to_close:
                os.close(fd)
            for key in list(sel.get_map().values()):
                if key.data != "control":
                    os.close(key.fd)
            sel.close()
            with sb._state_lock:
                sb._exec_wake = None
                os.close(wake_w)
            raise ExecError(f"sandbox {sb.id}: cannot start {self.argv[0]}: its init is gone ({e})") from None
        for fd in to_close:
            os.close(fd)

        status: int | None = None
        output_left = sb.policy.resources.output  # what may still be kept of stdout and stderr
        truncated = False
        cpu = 0.0
        error = ""
        timed_out = False
        terminated: str | None = None
        deadline = start + self.timeout
        drain_until: float | None = None
        try:
            while True:
                streams_open = any(k.data in ("stdout", "stderr") for k in sel.get_map().values())
                if status is not None and (not streams_open or time.monotonic() >= (drain_until or 0)):
                    break
                now = time.monotonic()
                wait = (drain_until if status is not None else deadline) - now  # type: ignore[operator]
                if wait <= 0 and status is None:
                    if timed_out:  # killed and still no exit: init is wedged, the sandbox is unusable
                        sb._terminate("failed")
                        terminated = "failed"
                        break
                    timed_out = True
                    launcher.send_message(launched.control, protocol.Kill(id=exec_id, token=request.token))
                    deadline = now + _KILL_GRACE
                    continue
                if sb._frozen is not None and status is None:
                    terminated = "frozen"
                    status = signal.SIGSTOP
                    break
                for key, _ in sel.select(max(wait, 0)):
                    if key.data == "wake":
                        os.read(key.fd, 64)
                    elif key.data == "control":
                        data, fds = launcher.recv_bytes(launched.control)
                        for fd in fds:
                            os.close(fd)
                        if data is None:  # init is gone: the sandbox was closed under us
                            if sb._closed is None and not exchange.started:
                                # Gone before it took the request (its last thread may still have
                                # held the socket when the request went out): nothing was started.
                                raise ExecError(
                                    f"sandbox {sb.id}: cannot start {self.argv[0]}: its init is gone"
                                )
                            sel.unregister(launched.control)
                            terminated = sb._closed or "failed"
                            status = signal.SIGKILL
                            drain_until = time.monotonic()
                            continue
                        try:
                            reply = exchange.accept(data, len(fds))
                        except protocol.ProtocolError as e:
                            sb._control_violation(exec_id, str(e))
                            raise ExecError(
                                f"sandbox {sb.id}: {self.argv[0]}: the reply on init's control socket was "
                                f"not init's ({e}); the sandbox was terminated as tampered with"
                            ) from None
                        if isinstance(reply, protocol.Exit):
                            status, cpu = reply.status, reply.cpu
                            drain_until = time.monotonic() + _DRAIN_GRACE
                        elif isinstance(reply, protocol.Failed):
                            status, error = reply.status, reply.error
                            drain_until = time.monotonic() + _DRAIN_GRACE
                    elif key.data == "stdin":
                        try:
                            n = os.write(key.fd, pending_input[:65536])
                            pending_input = pending_input[n:]
                        except BrokenPipeError:
                            pending_input = pending_input[:0]
                        if not pending_input:
                            sel.unregister(key.fd)
                            os.close(key.fd)
                    else:
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            # Past the budget the pipe is still drained, so the command runs on as it
                            # would have (not blocked, not killed); only what corral keeps is bounded.
                            if len(chunk) > output_left and not truncated:
                                truncated = True
                                self._output_denial(exec_id)
                            kept = chunk[:output_left]
                            output_left -= len(kept)
                            if kept:
                                yield Output(key.data, kept)
                        else:
                            sel.unregister(key.fd)
                            os.close(key.fd)
        finally:
            for key in list(sel.get_map().values()):
                if key.data != "control":
                    os.close(key.fd)
            sel.close()
            with sb._state_lock:
                sb._exec_wake = None
                os.close(wake_w)
        if error:
            message = f"corral: {error}\n".encode()
            if self.stdio is not None:
                os.write(self.stdio[2], message)
            else:
                yield Output("stderr", message)

        if sb._fence is not None:
            sb._fence.settle(exec_id)
        duration = time.monotonic() - start
        assert status is not None
        if terminated is None:
            code = os.waitstatus_to_exitcode(status)
        else:
            code = -signal.SIGSTOP if terminated == "frozen" else -signal.SIGKILL
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig is not None else code
        peak = 0
        leftover: list[ProcessRef] = []
        if sb._closed is None and sb._frozen is None:
            after = cgroup.usage()
            peak = after.memory_peak_bytes
            self._budget_denials(exec_id, before, after, timed_out)
            if timed_out:
                # Killed at its timeout, a shell never reaps its children, so their CPU is missing
                # from its rusage; the cgroup charged it all (plus whatever else ran meanwhile).
                cpu = max(cpu, after.cpu_seconds - before.cpu_seconds)
            leftover = _live_processes([p for p in cgroup.pids() if p not in pids_before])
        sb._flush_repeats()
        sb._emit(
            ExecExit(
                sandbox=sb.id,
                exec=exec_id,
                exit_code=exit_code,
                signal=sig,
                duration=duration,
                cpu_seconds=cpu,
                peak_memory=peak,
                timed_out=timed_out,
                leftover=leftover,
            )
        )
        denials = [e for e in sb._events_since(denials_before) if isinstance(e, Deny)]
        self.result = ExecResult(
            exit_code=exit_code,
            stdout=b"",
            stderr=b"",
            duration=duration,
            cpu_seconds=cpu,
            peak_memory=peak,
            signal=sig,
            timed_out=timed_out,
            terminated=terminated,
            leftover=leftover,
            denials=denials,
            output_truncated=truncated,
        )

    def _output_denial(self, exec_id: int) -> None:
        self.sb._emit(
            Deny(
                sandbox=self.sb.id,
                layer="output",
                what="output",
                exec=exec_id,
                detail=f"output budget of {self.sb.policy.resources.output} bytes reached; the rest of "
                "stdout and stderr was read and discarded",
            )
        )

    def _budget_denials(
        self, exec_id: int, before: cgroups.Usage, after: cgroups.Usage, timed_out: bool
    ) -> None:
        sb = self.sb
        r = sb.policy.resources
        if after.oom_kills > before.oom_kills:
            sb._emit(
                Deny(
                    sandbox=sb.id,
                    layer="cgroup",
                    what="memory",
                    exec=exec_id,
                    detail=f"memory budget of {r.memory} bytes exhausted; the kernel killed "
                    f"{after.oom_kills - before.oom_kills} process(es)",
                )
            )
        if after.pids_refused > before.pids_refused:
            sb._emit(
                Deny(
                    sandbox=sb.id,
                    layer="cgroup",
                    what="processes",
                    exec=exec_id,
                    detail=f"process budget of {r.processes} reached; "
                    f"{after.pids_refused - before.pids_refused} fork(s) refused",
                )
            )
        try:
            vfs = os.statvfs(sb._sandbox_path(planning.WORKSPACE))
            if vfs.f_bavail == 0:
                sb._emit(
                    Deny(
                        sandbox=sb.id,
                        layer="storage",
                        what="disk",
                        exec=exec_id,
                        detail=f"disk budget of {r.disk} bytes is full",
                    )
                )
        except OSError:
            pass
        if timed_out:
            sb._emit(
                Deny(
                    sandbox=sb.id,
                    layer="timeout",
                    what="timeout",
                    exec=exec_id,
                    detail=f"command ran past its {self.timeout:g}s timeout and was killed",
                )
            )
