"""The zygote: the process that forks every sandbox, and the client the supervisor holds (`Zygote`).

    supervisor -Launch-> zygote -fork-> intermediate child -fork-> init      (`child`, then `init`)
    supervisor <-Pid---- intermediate child: init's host pid, the fence's sockets
    supervisor <-Ready-- init: set up, its seccomp listener attached; serving from now on

Forking the supervisor itself would copy a large, multi-threaded interpreter: each sandbox's init would
then dirty ~4 MiB of copied pages, and fork time would grow with the supervisor's heap. The zygote
imports only this package's isolation modules, so an idle init costs far less, and it never has
threads, so fork is safe. It loads libseccomp and libnftables once and builds each kind of seccomp
filter once, before any fork, so no sandbox's process dlopens or compiles anything. It exits when the
supervisor's end of its socket closes. Sandboxes don't depend on it once started: each talks to the
supervisor over its own control socket (`protocol` lists every message on every socket).

A `Zygote` is one such process; a process may hold several side by side. The module-level `launch` is
the one function the runtime calls today, on a default zygote made at first use.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import resource  # also what os.wait4 loads when it first returns: about 1 ms of each init's first command
import select
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

from corral.isolation import _linux as L
from corral.isolation import child, netns, protocol, seccomp
from corral.isolation.plan import Plan

_FENCE_SOCKETS = len(dataclasses.fields(netns.FenceSockets))
_CLOSE_TIMEOUT = 5.0  # seconds `Zygote.close` waits for the process before it kills it


@dataclass
class Launched:
    init_pid: int  # host pid of the sandbox's PID 1
    pidfd: int
    control: socket.socket
    notify_fd: int | None
    fence_fds: list[int]  # transparent proxy, explicit proxy, DNS, NFLOG, sock_diag (isolation.netns)
    network_made_ahead: bool = False  # joined a fenced network namespace the zygote had ready


class LaunchError(Exception):
    """A sandbox could not be started; `step` names the set-up step that failed (`zygote` when the
    zygote itself could not be asked, `setup` when set-up ended without saying why)."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(f"{step}: {message}")


# The zygote runs the very corral this process imported, wherever that is (a checkout on PYTHONPATH,
# say): the two speak `protocol` and share `Plan`, so they must be the same code. `-I` keeps the
# environment's PYTHONPATH and user site out, so `-m corral.isolation.zygote` would find whichever
# corral the interpreter has installed instead (a checkout's tests then ran another tree's zygote).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from corral.isolation.zygote import main; main()"

# Fenced network namespaces a zygote keeps made ahead by default; a process that starts a single
# sandbox asks for 0.
NETWORKS_AHEAD = 2


class Zygote:
    """One zygote process and the socket to it: `launch` starts sandboxes, `close` ends the process.

    Started when made. Should the process die (it never does on its own), the next `launch` starts
    another; after `close`, `launch` raises `LaunchError`. `networks_ahead` is how many fenced network
    namespaces it keeps made ahead of demand (`_Networks`); 0 for a process that starts one sandbox.
    Safe to use from several threads: requests are sent one at a time, each start's set-up is read on
    a socket of its own.
    """

    def __init__(self, networks_ahead: int = NETWORKS_AHEAD, *, fd_limit: int | None = None) -> None:
        self.networks_ahead = networks_ahead
        # The soft RLIMIT_NOFILE sandboxes get: a supervisor raises its own for its many descriptors.
        self.fd_limit = fd_limit
        self._lock = threading.Lock()
        self._closed = False
        self._sock, self._proc = self._start()

    def _start(self) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    *("-I", "-c", _BOOT, _PACKAGE_ROOT),
                    *(str(theirs.fileno()), str(self.networks_ahead)),
                    str(-1 if self.fd_limit is None else self.fd_limit),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours, proc

    @property
    def alive(self) -> bool:
        """Whether the process runs (False once closed)."""
        return not self._closed and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The zygote process's pid (of the one now running, should it have been restarted)."""
        return self._proc.pid

    def launch(
        self,
        plan: Plan,
        *,
        join_files: list[str],
        state_dir: str,
        landlock_abi: int,
        notify: bool,
        commands_memory: str | None = None,
        setup_timeout: float = 10.0,
    ) -> Launched:
        """Start a sandbox: init joins `join_files` (cgroup.procs files); with `commands_memory` (a
        cgroup v1 memory `tasks` file), init starts commands from a thread of its own in that group
        instead (see `init.Server`). Raises `LaunchError` naming the step that failed."""
        request = protocol.Launch(
            plan=plan.to_dict(),
            join_files=join_files,
            commands_memory=commands_memory,
            state_dir=state_dir,
            landlock_abi=landlock_abi,
            notify=notify,
        )
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        received: list[int] = []  # every descriptor set-up sent, closed should the start fail
        try:
            with self._lock:
                if self._closed:
                    raise LaunchError("zygote", "this zygote is closed; make a new one to start sandboxes")
                if self._proc.poll() is not None:
                    self._sock.close()
                    self._sock, self._proc = self._start()
                try:
                    protocol.send(self._sock, request, [child_sock.fileno()])
                except OSError as e:
                    raise LaunchError("zygote", f"cannot reach corral's zygote process ({e})") from None
            child_sock.close()
            launched = _read_setup(parent_sock, setup_timeout, received)
            parent_sock.settimeout(None)
            return launched
        except BaseException:
            parent_sock.close()
            child_sock.close()
            protocol.close_all(received)
            raise

    def close(self) -> None:
        """End the zygote process and wait for it (it ends its network makers first). Sandboxes it
        started run on. Closing twice is a no-op."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()  # the zygote exits when it reads the end of its socket
            try:
                self._proc.wait(timeout=_CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _read_setup(sock: socket.socket, timeout: float, received: list[int]) -> Launched:
    """The set-up reports of one start, in whichever order they come: Pid from the intermediate child,
    Ready from init. Anything else (an error, a message corral does not send there, the wrong
    descriptors) ends the start; `received` collects every descriptor that came, for the caller to
    close should it."""
    sock.settimeout(timeout)
    init_pid: int | None = None
    notify_fd: int | None = None
    fence_fds: list[int] = []
    made_ahead = False
    ready = False
    while init_pid is None or not ready:
        try:
            data, fds = protocol.recv(sock)
        except TimeoutError:
            raise LaunchError("setup", f"the sandbox did not finish setting up in {timeout:g}s") from None
        received.extend(fds)
        if data is None:
            raise LaunchError("setup", "the sandbox's init exited during setup")
        try:
            msg = protocol.decode_setup(data)
        except protocol.ProtocolError as e:
            raise LaunchError("setup", f"a set-up message corral did not send: {e}") from None
        if isinstance(msg, protocol.SetupError):
            raise LaunchError(msg.step, msg.error)
        if isinstance(msg, protocol.Pid) and init_pid is None and len(fds) == _FENCE_SOCKETS:
            init_pid = msg.pid
            fence_fds = fds
            made_ahead = msg.ahead
        elif isinstance(msg, protocol.Ready) and not ready and len(fds) <= 1:
            ready = True
            notify_fd = fds[0] if fds else None
        else:
            raise LaunchError("setup", f"an unexpected {msg.op} message with {len(fds)} descriptor(s)")
    return Launched(init_pid, os.pidfd_open(init_pid), sock, notify_fd, fence_fds, made_ahead)


# --- the zygote process ---------------------------------------------------------------------------


def _serve(fd: int, networks_ahead: int, fd_limit: int) -> NoReturn:
    sock = socket.socket(fileno=fd)
    if fd_limit >= 0:
        # Sandboxes get the limit their supervisor had before it raised its own (see `Zygote`).
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(fd_limit, hard), hard))
    # Each sandbox's init is orphaned when its parent (A) exits. As a subreaper the zygote inherits
    # and reaps them, instead of relying on the host's PID 1 to (a container's PID 1 often doesn't).
    L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGCHLD, _reap_all)
    seccomp._lib()  # load libseccomp and libnftables once, before any fork: children must not dlopen
    netns.preload()
    rules = seccomp.default_rules()
    programs: dict[tuple[bool, bool, bool], bytes] = {}  # seccomp filters built, by (notify, exec, connect)
    gc.freeze()
    # Made after each sandbox's fork, not before the first: a process that starts one sandbox would
    # pay for making networks it never uses, in the middle of its one start.
    networks = _Networks(networks_ahead, sock)
    while True:
        # poll, not select: select refuses descriptors past 1,024, and nothing here should depend on
        # how many the zygote happens to hold.
        poller = select.poll()
        by_fd = {s.fileno(): s for s in (sock, *networks.making)}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        readable = [by_fd[fd] for fd, _ in poller.poll()]  # a hang-up counts, as with select
        for helper in readable:
            if helper is not sock:
                networks.collect(helper)
        if sock not in readable:
            continue
        data, fds = protocol.recv(sock)
        if data is None:  # the supervisor is gone
            networks.close()
            os._exit(0)
        try:
            msg = protocol.decode_launch(data)
            control = _control_socket(fds)
        except protocol.ProtocolError as e:
            _refuse(fds, e)
            continue
        network = None
        step = "fork"
        try:
            plan = Plan.from_dict(msg.plan)
            kind = (msg.notify, plan.watch_exec, plan.watch_connect)
            if kind not in programs:
                step = "seccomp"
                programs[kind] = seccomp.compile_program(rules, notify=kind[0], watch=_watched(plan))
                step = "fork"
            network = networks.take() if plan.namespaces & L.CLONE_NEWNET else None
            pid = os.fork()
        except BaseException as e:
            protocol.close_all(network or [])
            protocol.send(control, protocol.SetupError(step=step, error=str(e)))
            control.close()
            continue
        if pid == 0:  # pragma: no cover - runs in the child, reported over the socket
            sock.close()
            child.intermediate(
                plan,
                control,
                msg.join_files,
                msg.commands_memory,
                msg.state_dir,
                msg.landlock_abi,
                msg.notify,
                programs[kind],
                network,
            )
        protocol.close_all(network or [])  # the sandbox has them now
        control.close()
        networks.refill()


def _control_socket(fds: list[int]) -> socket.socket:
    """The one descriptor a Launch carries: init's end of a new control socket (AF_UNIX, SEQPACKET)."""
    if len(fds) != 1:
        raise protocol.ProtocolError(f"launch: {len(fds)} descriptor(s) attached, expected 1")
    try:
        control = socket.socket(fileno=fds[0])
    except OSError as e:
        raise protocol.ProtocolError(
            f"launch: the attached descriptor is not a socket ({e.strerror})"
        ) from None
    if control.family != socket.AF_UNIX or control.type != socket.SOCK_SEQPACKET:
        control.detach()  # closed by the refusal, with whatever else came
        raise protocol.ProtocolError("launch: the attached socket is not an AF_UNIX SOCK_SEQPACKET socket")
    return control


def _refuse(fds: list[int], error: protocol.ProtocolError) -> None:
    """A message on the zygote's socket that is not a well-formed Launch: nothing is forked for it.

    Only the supervisor holds the other end, so this is not corral's message; what came attached is
    closed, and an attached socket (where a sandbox's start would wait) is told why."""
    try:
        answer = socket.socket(fileno=fds[0]) if fds else None
    except OSError:
        answer = None  # not a socket: closing it is answer enough
    if answer is not None:
        try:
            protocol.send(answer, protocol.SetupError(step="request", error=f"refused: {error}"))
        except OSError:
            pass
        answer.detach()  # closed below, with the rest
    protocol.close_all(fds)


class _Networks:
    """Fenced network namespaces made ahead of demand, so that a sandbox's start does not pay for
    making its namespace and fence (about 4 ms of CPU on a 2-vCPU VM, in the middle of the start).

    Each is made by a short-lived child of the zygote and kept as descriptors: the namespace and the
    fence's sockets. Nothing has run in one before its sandbox, and none is used twice. Should making
    one fail, the zygote stops making them, and each sandbox then makes its own, where the failure
    is reported (and its start refused) like any other.
    """

    def __init__(self, ahead: int, supervisor: socket.socket) -> None:
        self.ahead = ahead
        self._supervisor = supervisor
        self._ready: list[list[int]] = []  # [namespace, *fence sockets]
        self.making: list[socket.socket] = []
        # The makers not known to be reaped, by pidfd: safe against pid reuse, since waitid on a
        # pidfd only ever reaps a child of this process.
        self._makers: list[int] = []

    def take(self) -> list[int] | None:
        return self._ready.pop(0) if self._ready else None

    def refill(self) -> None:
        while len(self._ready) + len(self.making) < self.ahead:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                pid = os.fork()
            except OSError:
                ours.close()
                theirs.close()
                self.ahead = 0
                return
            if pid == 0:  # pragma: no cover - runs in the child, reported over the socket
                self._supervisor.close()
                ours.close()
                child.make_network(theirs)
            theirs.close()
            self.making.append(ours)
            try:
                self._makers.append(os.pidfd_open(pid))
            except ProcessLookupError:
                pass  # done and reaped (`_reap_all`) already

    def collect(self, helper: socket.socket) -> None:
        self.making.remove(helper)
        data, fds = protocol.recv(helper)
        helper.close()
        try:
            made = protocol.decode_network(data) if data is not None else None
        except protocol.ProtocolError:
            made = None
        self._reap(os.WNOHANG)
        if isinstance(made, protocol.Network) and len(fds) == 1 + _FENCE_SOCKETS:
            self._ready.append(fds)
            return
        protocol.close_all(fds)
        self.ahead = 0

    def close(self) -> None:
        """At the zygote's exit: wait for the makers still at work and drop every network made, so
        that the zygote leaves no process of its own behind."""
        # `_reap_all` stays on: a sandbox's init that exits meanwhile is reaped here, as ever. A maker it
        # reaps first is no child any more, which `_reap` takes for done.
        for helper in self.making:
            helper.close()  # a maker's report then fails, and it exits all the same
        self._reap(0)
        for fds in self._ready:
            protocol.close_all(fds)

    def _reap(self, options: int) -> None:
        for pidfd in list(self._makers):
            try:
                if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | options) is None:
                    continue  # still at work (WNOHANG)
            except ChildProcessError:
                pass  # reaped by `_reap_all`
            os.close(pidfd)
            self._makers.remove(pidfd)


def _reap_all(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _watched(plan: Plan) -> list[seccomp.Rule]:
    """The calls a sandbox's filter reports to the supervisor, who answers them."""
    watch = [seccomp.Rule(name) for name in seccomp.WATCHED] if plan.watch_exec else []
    if plan.watch_connect:
        watch.append(seccomp.WATCHED_CONNECT)
    # Without a listener these can't be decided or recorded; `degrade: [seccomp_notify]` says so.
    return [*watch, *seccomp.WATCHED_ADDRESS, *seccomp.WATCHED_FILTER_INSTALL]


def main() -> NoReturn:
    """The zygote process: `argv` is its socket's descriptor, the networks to make ahead and the
    sandboxes' soft RLIMIT_NOFILE (-1: as inherited)."""
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


if __name__ == "__main__":
    main()
