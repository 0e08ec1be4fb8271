"""`Sandbox`: one isolated environment, many commands (an agent episode).

    with Sandbox(Policy.load("examples/policies/offline.yaml")) as sb:
        r = sb.exec("echo hi > notes.txt && cat notes.txt")
        r.exit_code, r.stdout        # 0, b"hi\n"

Threading: one command at a time per sandbox (calls from several threads queue on a lock); many
sandboxes may run in parallel. `close()` may be called from any thread, also while a command runs.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import selectors
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from corral._errors import ExecError, HostError, PolicyError, SandboxClosedError, SandboxStartError
from corral.egress.service import Fence, Upstream
from corral.events import (
    Alert,
    Deny,
    Evidence,
    ExecExit,
    ExecStart,
    ProcessRef,
    SandboxStart,
    SandboxStop,
)
from corral.events.model import Event
from corral.isolation import cgroups, landlock, launcher, mounts, netns, protocol, seccomp
from corral.isolation import plan as planning
from corral.monitors import process as process_monitor
from corral.policy import Policy
from corral.runtime import _eventlog, _hostfiles, _notifications, _procs, _tripwires, _workspace
from corral.runtime.host import Host, default_host
from corral.runtime.lifecycle import Lifecycle, State, StopReason

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
_DRAIN_GRACE = 0.05  # after the command exits, read what its leftovers still write for this long
_KILL_GRACE = 5.0
_SOCKADDR_UN_LEN = 110  # family and the longest path the kernel reads
_STOP_WAIT = 5.0  # how long a command cut short by the sandbox's end waits for it to be recorded
# The alert raised when the control channel carries something init did not send (see `protocol`).
CONTROL_TAMPER_RULE = "control-channel-tamper"

log = logging.getLogger("corral")


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


class Sandbox:
    """A running sandbox. Creating one starts it; `close()` (or leaving the `with`) destroys it.

    policy: a Policy, a path to a policy file, or None for the default (offline) policy.
    workspace: a host directory copied into /workspace at start and written back at close. Without
        it, the workspace is saved to /var/lib/corral/workspaces/<id> at close (unless
        keep_workspace=False).
    events: a path; every event is appended to it as a JSON line the moment it happens.
    upstream: how the egress proxy resolves names and connects on the host
        (`corral.egress.service.Upstream`); tests map names and ports to local servers with it.
    host: the `Host` that runs the sandbox; without it, the process's default host.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str] | None = None,
        *,
        workspace: str | os.PathLike[str] | None = None,
        events: str | os.PathLike[str] | None = None,
        keep_workspace: bool = True,
        upstream: Upstream | None = None,
        host: Host | None = None,
    ) -> None:
        self.host = host if host is not None else default_host()
        if policy is None:
            policy = Policy.default()
        elif not isinstance(policy, Policy):
            policy = Policy.load(policy)
        self.policy = policy
        self.id = secrets.token_hex(6)
        self._log = _eventlog.EventLog(self.id, events)
        self._exec_lock = threading.Lock()
        self._wake_lock = threading.Lock()  # guards `_exec_wake`
        self._life = Lifecycle()
        self.uid: int | None = None  # claimed at the start
        self._exec_seq = 0
        self._current_exec: int | None = None
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
        self._state_dir = f"{_hostfiles.STATE_ROOT}/{self.id}"
        self._lifetime_timer: int | None = None
        self._tripwires: _tripwires.Tripwires | None = None
        self._exec_wake: int | None = None  # write end of the running command's wake-up pipe
        self._exec_thread: int | None = None  # the thread running a command, while one runs
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
        host = self.host.start()
        hierarchy = host.hierarchy
        self.uid = uid = host.claim_uid(self.id)
        step = "plan"
        try:
            plan = planning.build(self.policy, uid=uid, gid=uid, sandbox_id=self.id)
            step = "state directory"
            os.makedirs(_hostfiles.STATE_ROOT, mode=0o700, exist_ok=True)
            mounts.prepare_host(self._state_dir, uid, uid, plan.hostname)
            # Before the cgroup exists: whoever finds it after this process died knows it is orphaned.
            _hostfiles.write_owner(self._state_dir)
            step = "cgroup"
            self._cgroup = hierarchy.create(
                f"{self.id}",
                cgroups.Limits(plan.memory_bytes, plan.cpu_cores, plan.max_processes),
            )
            step = "launch"
            self._launched = host.launch(
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
                notes = _notifications.Notifications(
                    _notifications.NotificationContext(
                        sandbox_id=self.id,
                        notify_fd=self._launched.notify_fd,
                        syscalls=seccomp.syscall_numbers(),
                        own_storage=(*plan.writable, "/dev/shm"),
                        unix_sockets=self.policy.network.unix_sockets,
                        emit=self._emit,
                        current_exec=lambda: self._current_exec,
                        fence=lambda: self._fence,
                        tripwires=lambda: self._tripwires,
                        act=self._act,
                    )
                )
                host.supervisor.watch_notifications(self._launched.notify_fd, notes.handle)
            step = "egress"
            self._fence = Fence(
                self.id,
                self.policy,
                self._launched.fence_fds,
                self._emit,
                self._find_process,
                lambda: self._current_exec,
                self._upstream,
            )
            self._launched.fence_fds = []  # the fence owns them now and closes them
            if self.policy.tripwires.enabled:
                step = "tripwires"
                self._start_tripwires(degraded)
            if self._workspace_src is not None:
                step = "workspace"
                _workspace.copy_in(self._workspace_src, self._sandbox_path(planning.WORKSPACE), uid)
        except BaseException as e:
            if self._launched is not None:
                signal.pidfd_send_signal(self._launched.pidfd, signal.SIGKILL)
            self._stop_tripwires()
            self._life.move(State.STOPPED)
            self._teardown()
            if isinstance(e, HostError | PolicyError):
                raise
            raise SandboxStartError(f"sandbox {self.id}: {step}: {e}") from e
        self._life.move(State.RUNNING)  # (or FROZEN already, by a rule that fired during the start)
        try:
            host.opened(self)
        except HostError:
            self._terminate("closed")
            raise
        self._lifetime_timer = host.supervisor.call_at(
            time.monotonic() + self.policy.resources.lifetime, self._expire
        )
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
        ruleset = self.host.rulesets.load(self.policy)
        connector = self.host.connector
        if not connector.start():
            if "process_events" not in self.policy.degrade:
                raise HostError(
                    f"tripwires: {connector.error}; allow running without it (exits are then noticed "
                    "at the next sample) with `degrade: [process_events]` in the policy"
                )
            degraded.append("process_events")
        tw = _tripwires.Tripwires(
            self.id,
            ruleset,
            dict(self.policy.tripwires.responses),
            init_pid=self._launched.init_pid,
            cgroup=self._cgroup,
            current_exec=lambda: self._current_exec,
            emit=self._emit,
            connector_error=None if "process_events" not in degraded else connector.error,
            gpu_granted=bool(self.policy.gpu),
            cpu_budget=self.policy.resources.cpu,
        )
        # The monitors report to the sandbox, which asks the tripwires and does what they say.
        tw.table.on_monitor_failure = self._monitor_failed
        tw.table.on_exit_reported = tw.record_exit
        if "process_events" not in degraded:
            connector.watch(tw.table.init_pid, tw.table)
        self.host.sampler.watch(
            tw,
            self.policy.tripwires.sample_interval,
            lambda gpu: self._act(tw.sample(gpu)),
            self._monitor_failed,
        )
        self._tripwires = tw

    def _stop_tripwires(self) -> None:
        tw = self._tripwires
        if tw is not None:
            self.host.sampler.unwatch(tw)
            self.host.connector.forget(tw.table)
            tw.close()

    # --- what the tripwires ask for ----------------------------------------------------------------

    def _act(self, actions: Sequence[_tripwires.Action]) -> None:
        """Carry out the tripwires' actions, in order. Freezing and terminating block (on every task
        stopping, on the workspace being saved), and the caller may be the supervisor, which a parked
        execve in this very sandbox waits on: they run on a thread of their own."""
        for action in actions:
            if isinstance(action, _tripwires.Record):
                self._emit(action.alert)
            elif isinstance(action, _tripwires.Kill):
                self._emit(action.alert_after(self._kill(action.pids)))
            elif isinstance(action, _tripwires.Freeze):
                threading.Thread(
                    target=self._freeze, args=(action.rule,), name=f"corral-freeze-{self.id}"
                ).start()
            elif isinstance(action, _tripwires.Terminate):
                threading.Thread(
                    target=self._terminate, args=("tripwire",), name=f"corral-trip-{self.id}"
                ).start()
            else:
                self._monitor_failed(action.reason)

    def _kill(self, pids: Sequence[int]) -> int:
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

    def _freeze(self, rule: str) -> None:
        cgroup = self._cgroup
        if cgroup is None or not self._life.freeze(rule):
            return  # closed (or closing), or frozen already
        cgroup.freeze()
        self._wake_exec()

    def _monitor_failed(self, reason: str) -> None:
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

    def _wake_exec(self) -> None:
        with self._wake_lock:  # the running command closes the pipe under this lock
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
        return self._life.frozen_by

    @property
    def state(self) -> State:
        """Where the sandbox is in its life (see `State`)."""
        return self._life.state

    @property
    def init_pid(self) -> int | None:
        """The host pid of the sandbox's init (its PID 1); None before it started."""
        return self._launched.init_pid if self._launched is not None else None

    def pids(self) -> list[int]:
        """Host pids of every process in the sandbox (init included); [] once it is torn down."""
        cgroup = self._cgroup
        if cgroup is None:
            return []
        try:
            return cgroup.pids()
        except OSError:
            return []

    def usage(self) -> cgroups.Usage:
        """What the sandbox's processes use now (its cgroup's counters). SandboxClosedError once the
        sandbox is torn down."""
        cgroup = self._cgroup
        if cgroup is None:
            raise SandboxClosedError(f"sandbox {self.id} is torn down: it has no usage to read")
        return cgroup.usage()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the sandbox is closed and everything it held on the host is released (state
        REAPED); False if `timeout` passed first."""
        return self._life.wait_for(State.REAPED, timeout)

    def close(self, wait: bool = False) -> None:
        """Destroy the sandbox. Idempotent, callable from any thread.

        Before it returns, the workspace is saved (with every process frozen) and every process in
        the sandbox has been sent SIGKILL, which no process survives or can act after. Removing the
        cgroup and state directory waits for the kernel to finish tearing the namespaces down (an RCU
        grace period or two); that happens in the background unless `wait=True`.
        """
        self._terminate("closed")
        if wait:
            self._life.wait_for(State.REAPED)

    def _expire(self) -> None:
        # Saving a large workspace takes a while; the supervisor thread serves every sandbox's
        # refused calls, so the close runs on a thread of its own.
        threading.Thread(target=self._terminate, args=("lifetime",), name=f"corral-expire-{self.id}").start()

    def _terminate(self, reason: StopReason, why: str = "") -> None:
        if not self._life.stop(reason):
            return
        self.host.closed(self)
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
            self.host.supervisor.cancel(self._lifetime_timer)
        self._stop_tripwires()  # the kill below must not read as alerts
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
                leftover = _procs.live_processes([p for p in self._cgroup.pids() if p != init])
                if self._keep_workspace:
                    self._save_workspace()
            except OSError as e:
                # A failed save must not stop the kill and the cleanup; the stop event says what failed.
                error = f"saving the workspace to {self.workspace} failed: {e}"
            finally:
                # Init's death makes the kernel kill every other process in its PID namespace.
                try:
                    signal.pidfd_send_signal(self._launched.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if frozen or self._life.frozen_by is not None:
                    self._cgroup.thaw()  # frozen tasks only act on SIGKILL once thawed
        fence, self._fence = self._fence, None
        if fence is not None:
            # Once nothing in the sandbox can connect any more: its last connections and queries are
            # recorded before the stop event, and `events()` has them as soon as this returns.
            fence.close()
        if threading.get_ident() != self._exec_thread:
            # So is the running command's exit: its thread woke when the processes died. (A stream
            # its consumer stopped reading is not waited for long.)
            self._life.wait_command_recorded(1.0)
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
        self._life.move(State.STOPPED)
        self.host.tear_down(self._teardown)

    def _teardown(self) -> None:
        """Release whatever `_start` created, in reverse order; safe on a half-started sandbox."""
        try:
            if self._launched is not None:
                if self._launched.notify_fd is not None:
                    self.host.supervisor.unwatch(self._launched.notify_fd)
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
            if self.uid is not None:
                self.host.release_uid(self.uid)
            if self._exec_lock.acquire(blocking=False):
                try:
                    self._log.close()
                finally:
                    self._exec_lock.release()
        finally:
            self._life.move(State.REAPED)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._life.ending

    # --- workspace ---------------------------------------------------------------------------

    def _sandbox_path(self, path: str) -> str:
        assert self._launched is not None
        return f"/proc/{self._launched.init_pid}/root{path}"

    def _save_workspace(self) -> None:
        assert self._workspace_fd is not None
        refused = _workspace.copy_out(self._workspace_fd, self.workspace, self.policy.resources.disk)
        if refused is not None:
            self._emit(Deny(sandbox=self.id, layer="storage", what="disk", detail=refused))

    # --- events ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._observe(self._log.add(event))

    def _flush_repeats(self) -> None:
        self._observe(self._log.flush())

    def _observe(self, recorded: list[Event]) -> None:
        tw = self._tripwires
        if tw is not None:
            for e in recorded:
                self._act(tw.observe_event(e))

    def events(self) -> list[Event]:
        """This sandbox's events so far, oldest first. At most `EVENTS_KEPT` (10,000) are kept in
        memory: `events_elided` counts those dropped (the event file, if any, has them all)."""
        return self._log.events()

    @property
    def events_elided(self) -> int:
        """Events dropped from `events()` (not from the event file) to bound memory."""
        return self._log.elided

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
                return _procs.process_ref(pid)
            if scan.left <= 0:
                break
        return None

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
            life = sb._life
            if life.ending or sb._launched is None or sb._cgroup is None:
                raise SandboxClosedError(f"sandbox {sb.id} is closed ({life.stop_reason})")
            if life.state is State.FROZEN:
                raise SandboxClosedError(
                    f"sandbox {sb.id} was frozen by tripwire {life.frozen_by!r}; inspect it, then close() it"
                )
            sb._exec_thread = threading.get_ident()
            life.command_started()
            try:
                yield from self._run(sb._launched, sb._cgroup)
            finally:
                sb._current_exec = None
                sb._exec_thread = None
                life.command_recorded()
                if life.ending:
                    sb._launched.control.close()
                    # Cut short by the sandbox's end: return once that is recorded as well.
                    life.wait_for(State.STOPPED, _STOP_WAIT)

    def _run(self, launched: launcher.Launched, cgroup: cgroups.SandboxCgroup) -> Iterator[Output]:
        sb = self.sb
        sb._exec_seq += 1
        exec_id = sb._exec_seq
        sb._current_exec = exec_id
        denials_before = sb._log.mark()
        cgroup.reset_peak()
        before = cgroup.usage()
        # Leftovers are told apart by pid, not start time: /proc start times are only as precise as
        # the boot time they are relative to (whole seconds).
        pids_before = set(cgroup.pids())
        start = time.monotonic()
        sel = selectors.DefaultSelector()
        to_close: list[int] = []
        pending_input = memoryview(self.data or b"")
        uid = sb.uid
        assert uid is not None
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
                os.fchown(fd, uid, uid)
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
        with sb._wake_lock:
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
            with sb._wake_lock:
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
                if sb._life.state is State.FROZEN and status is None:
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
                            if not sb._life.ending and not exchange.started:
                                # Gone before it took the request (its last thread may still have
                                # held the socket when the request went out): nothing was started.
                                raise ExecError(
                                    f"sandbox {sb.id}: cannot start {self.argv[0]}: its init is gone"
                                )
                            sel.unregister(launched.control)
                            terminated = sb._life.stop_reason or "failed"
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
            with sb._wake_lock:
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
        if sb._life.state is State.RUNNING:
            after = cgroup.usage()
            peak = after.memory_peak_bytes
            self._budget_denials(exec_id, before, after, timed_out)
            if timed_out:
                # Killed at its timeout, a shell never reaps its children, so their CPU is missing
                # from its rusage; the cgroup charged it all (plus whatever else ran meanwhile).
                cpu = max(cpu, after.cpu_seconds - before.cpu_seconds)
            leftover = _procs.live_processes([p for p in cgroup.pids() if p not in pids_before])
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
        denials = [e for e in sb._log.since(denials_before) if isinstance(e, Deny)]
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
