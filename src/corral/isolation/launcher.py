"""The only module that forks: builds a sandbox from a Plan and runs its init.

    supervisor -(request)-> zygote -fork-> A: join cgroup, unshare(mount,pid,ipc,uts,net,cgroup)
                                           A: fork B (PID 1), report B's pid, exit
                                                              B: mounts, hostname, loopback,
                                                                 drop privileges, no_new_privs,
                                                                 Landlock, seccomp -> "ready"
                                                                 then serves exec requests

B, the sandbox's init, is corral code, not agent code, and is hardened against the agent that shares
its uid: as PID 1 of its namespace it ignores every signal sent from inside it, it is not dumpable (so
/proc/1/mem and /proc/1/fd are closed to the agent), ptrace is refused by seccomp, and its control
socket is close-on-exec so no command inherits it. Evidence the supervisor records (CPU, memory,
leftover processes, refused syscalls) comes from the host side (cgroups, seccomp notifications), not
from init. When the supervisor dies, the control socket closes, init exits, and the kernel kills every
process in the PID namespace: a sandbox never outlives its guard.

Control protocol: `corral.isolation.protocol` (typed messages, one per SOCK_SEQPACKET packet, file
descriptors by SCM_RIGHTS). Every descriptor this module receives arrives close-on-exec
(MSG_CMSG_CLOEXEC): a command gets its stdio as 0-2 and nothing else, and before each command init
marks every descriptor above 2 close-on-exec again (`_spawn`).
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import gc
import importlib
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass
from typing import NoReturn

from corral.isolation import _linux as L
from corral.isolation import landlock, mounts, netns, protocol, seccomp
from corral.isolation.plan import Plan

# Fenced network namespaces the zygote keeps made ahead of demand (see `_Networks`); read when the
# zygote starts. A process that starts a single sandbox sets it to 0.
NETWORKS_AHEAD = 2
SETUP_FAILED = 125
_FENCE_SOCKETS = len(dataclasses.fields(netns.FenceSockets))


@dataclass
class Launched:
    init_pid: int  # host pid of the sandbox's PID 1
    pidfd: int
    control: socket.socket
    notify_fd: int | None
    fence_fds: list[int]  # transparent proxy, explicit proxy, DNS, NFLOG, sock_diag (isolation.netns)
    network_made_ahead: bool = False  # joined a fenced network namespace the zygote had ready


class LaunchError(Exception):
    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(f"{step}: {message}")


class _Zygote:
    """A small helper process that forks every sandbox.

    Forking the supervisor itself would copy a large, multi-threaded interpreter: each sandbox's init
    would then dirty ~4 MiB of copied pages, and fork time would grow with the supervisor's heap. The
    zygote imports only this package's isolation modules, so an idle init costs far less, and it
    never has threads, so fork is safe. It exits when the supervisor's end of its socket closes.
    Sandboxes don't depend on it once started: each talks to the supervisor over its own socket.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-I", "-m", "corral.isolation.launcher"),
                *(str(theirs.fileno()), str(NETWORKS_AHEAD)),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
        )
        theirs.close()

    def alive(self) -> bool:
        return self.proc.poll() is None


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


@atexit.register
def _stop_zygote() -> None:
    # Closing our end makes the zygote exit; wait for it so no process outlives the interpreter.
    with _zygote_lock:
        if _zygote is not None:
            _zygote.sock.close()
            try:
                _zygote.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _zygote.proc.kill()
                _zygote.proc.wait()


def _get_zygote() -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = _Zygote()
        return _zygote


def launch(
    plan: Plan,
    *,
    join_files: list[str],
    state_dir: str,
    landlock_abi: int,
    notify: bool,
    commands_memory: str | None = None,
    setup_timeout: float = 10.0,
) -> Launched:
    """Start a sandbox: init joins `join_files` (cgroup.procs files); with `commands_memory` (a cgroup
    v1 memory `tasks` file), init starts commands from a thread of its own in that group instead
    (see `_Server`)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        request = protocol.Launch(
            plan=plan.to_dict(),
            join_files=join_files,
            commands_memory=commands_memory,
            state_dir=state_dir,
            landlock_abi=landlock_abi,
            notify=notify,
        )
        try:
            protocol.send(_get_zygote().sock, request, [child_sock.fileno()])
        except OSError as e:
            raise LaunchError("zygote", f"cannot reach corral's zygote process ({e})") from None
        child_sock.close()
        parent_sock.settimeout(setup_timeout)
        init_pid: int | None = None
        notify_fd: int | None = None
        fence_fds: list[int] = []
        made_ahead = False
        ready = False
        received: list[int] = []  # every descriptor set-up sent, closed should the start fail
        # "pid" comes from the intermediate child and "ready" from init: either may arrive first.
        while init_pid is None or not ready:
            try:
                data, fds = protocol.recv(parent_sock)
            except TimeoutError:
                raise LaunchError(
                    "setup", f"the sandbox did not finish setting up in {setup_timeout:g}s"
                ) from None
            if data is None:
                protocol.close_all(fds)
                raise LaunchError("setup", "the sandbox's init exited during setup")
            received.extend(fds)
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
        parent_sock.settimeout(None)
        return Launched(init_pid, os.pidfd_open(init_pid), parent_sock, notify_fd, fence_fds, made_ahead)
    except BaseException:
        parent_sock.close()
        child_sock.close()
        protocol.close_all(received)
        raise


def _zygote_main(fd: int, networks_ahead: int) -> NoReturn:
    sock = socket.socket(fileno=fd)
    # Each sandbox's init is orphaned when its parent (A) exits. As a subreaper the zygote inherits
    # and reaps them, instead of relying on the host's PID 1 to (a container's PID 1 often doesn't).
    L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGCHLD, _reap_all)
    seccomp._lib()  # load libseccomp and libnftables once, before any fork: children must not dlopen
    netns.preload()
    # os.wait4 loads this C extension the first time it returns; loaded in init, it cost about 1 ms of
    # every sandbox's first command.
    importlib.import_module("resource")
    rules = seccomp.default_rules()
    programs: dict[tuple[bool, bool, bool], bytes] = {}  # seccomp filters built, by (notify, exec, connect)
    gc.freeze()
    # Made after each sandbox's fork, not before the first: a process that starts one sandbox would
    # pay for making networks it never uses, in the middle of its one start.
    networks = _Networks(networks_ahead, sock)
    while True:
        readable, _, _ = select.select([sock, *networks.making], [], [])
        for helper in readable:
            if helper is not sock:
                networks.collect(helper)
        if sock not in readable:
            continue
        data, fds = protocol.recv(sock)
        if data is None:
            os._exit(0)  # the supervisor is gone
        try:
            msg = protocol.decode_launch(data)
            if len(fds) != 1:
                raise protocol.ProtocolError(f"launch: {len(fds)} descriptor(s) attached, expected 1")
        except protocol.ProtocolError as e:
            _refuse(fds, e)
            continue
        child = socket.socket(fileno=fds[0])
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
            protocol.send(child, protocol.SetupError(step=step, error=str(e)))
            child.close()
            continue
        if pid == 0:  # pragma: no cover - runs in the child, reported over the socket
            sock.close()
            _child_a(
                plan,
                child,
                msg.join_files,
                msg.commands_memory,
                msg.state_dir,
                msg.landlock_abi,
                msg.notify,
                programs[kind],
                network,
            )
        protocol.close_all(network or [])  # the sandbox has them now
        child.close()
        networks.refill()


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
                _make_network(theirs)
            theirs.close()
            self.making.append(ours)

    def collect(self, helper: socket.socket) -> None:
        self.making.remove(helper)
        data, fds = protocol.recv(helper)
        helper.close()
        try:
            made = protocol.decode_network(data) if data is not None else None
        except protocol.ProtocolError:
            made = None
        if isinstance(made, protocol.Network) and len(fds) == 1 + _FENCE_SOCKETS:
            self._ready.append(fds)
            return
        protocol.close_all(fds)
        self.ahead = 0


def _make_network(sock: socket.socket) -> NoReturn:
    step = "network fence"
    try:
        L.unshare(L.CLONE_NEWNET)
        fence = _fence_here(os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        namespace = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        protocol.send(sock, protocol.Network(), [namespace, *fence.fds()])
    except BaseException as e:
        _fail(sock, step, e)
    os._exit(0)


def _fence_here(proc: int) -> netns.FenceSockets:
    """Raise lo and set up the fence in this process's (new) network namespace."""
    _loopback_up()
    return netns.apply_in_child(proc)


def _reap_all(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- the children (everything below runs after fork, in the sandbox's new namespaces) -----------


def _fail(sock: socket.socket, step: str, err: BaseException) -> NoReturn:
    try:
        protocol.send(sock, protocol.SetupError(step=step, error=str(err) or type(err).__name__))
    finally:
        os._exit(SETUP_FAILED)


def _child_a(
    plan: Plan,
    sock: socket.socket,
    join_files: list[str],
    commands_memory: str | None,
    state_dir: str,
    landlock_abi: int,
    notify: bool,
    program: bytes,
    network: list[int] | None,
) -> NoReturn:
    gc.freeze()  # keep the collector off the pages shared with the supervisor (copy-on-write)
    step = "namespaces"
    try:
        # The cgroup namespace comes later, from init, once it is in its own cgroup (its root). A
        # network made ahead is joined; without one, this child makes the sandbox's own below.
        flags = plan.namespaces & ~L.CLONE_NEWCGROUP
        if network is not None:
            flags &= ~L.CLONE_NEWNET
        L.unshare(flags)
        if network is not None:
            L.setns(network[0], L.CLONE_NEWNET)
        # Before init exists: once it pivots into the sandbox's root (in the mount namespace this
        # process shares), the host's "/proc" and cgroup files are out of reach by path.
        proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        step = "cgroup"
        joins = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in join_files]
        # Opened here, as root on the host, for init to move its spawning thread in (see `_Server`).
        spawner_join = os.open(commands_memory, os.O_WRONLY | os.O_CLOEXEC) if commands_memory else None
        step = "namespaces"
        joined_r, joined_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(joined_w)
            _child_b(plan, sock, state_dir, landlock_abi, notify, program, joined_r, spawner_join)
        os.close(joined_r)
        # Moving a process into a cgroup waits for an RCU grace period (about 5 ms on a small VM, a
        # fifth of a cold start), so it is done here while init builds the sandbox's root; init goes
        # no further than that until it is in (see `_child_b`).
        step = "cgroup"
        for fd in joins:
            os.write(fd, str(pid).encode())
            os.close(fd)
        os.write(joined_w, b"j")
        # Without a network made ahead, the fence is set up here, in the short-lived intermediate
        # child, while init builds the mounts: libnftables' allocations then die with this process
        # instead of staying in every idle sandbox's init.
        step = "network fence"
        if network is None:
            made = _fence_here(proc)  # referenced until sent: its sockets close with it
            fence = made.fds()
        else:
            fence = network[1:]
        protocol.send(sock, protocol.Pid(pid=pid, ahead=network is not None), fence)
    except BaseException as e:
        _fail(sock, step, e)
    os._exit(0)


def _child_b(
    plan: Plan,
    sock: socket.socket,
    state_dir: str,
    landlock_abi: int,
    notify: bool,
    program: bytes,
    joined: int,
    spawner_join: int | None,
) -> NoReturn:
    step = "fds"
    try:
        # Received close-on-exec already (`protocol.recv`); said again here because this is the one
        # descriptor that must never reach a command.
        os.set_inheritable(sock.fileno(), False)
        # Nothing the supervisor holds (other sandboxes' sockets, files) may reach this sandbox.
        keep = sorted({sock.fileno(), joined} | ({spawner_join} if spawner_join is not None else set()))
        for low, high in zip([2, *keep], [*keep, 1 << 20], strict=True):
            os.closerange(low + 1, high)
        step = "mounts"
        mounts.apply_in_child(plan, state_dir)
        step = "cgroup"
        # Until the intermediate child has moved it into the sandbox's cgroups (no limits apply
        # before); its exit without a word means it failed, and said why.
        if os.read(joined, 1) != b"j":
            os._exit(SETUP_FAILED)
        os.close(joined)
        if plan.namespaces & L.CLONE_NEWCGROUP:
            L.unshare(L.CLONE_NEWCGROUP)  # rooted at the sandbox's own cgroup
        step = "cmdline"
        L.set_cmdline("corral-init")
        step = "hostname"
        socket.sethostname(plan.hostname)
        step = "privileges"
        L.drop_capability_bounding_set()
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        L.prctl(L.PR_SET_DUMPABLE, 0)  # after setresuid, which may reset it
        if landlock_abi > 0:
            step = "landlock"
            landlock.apply_in_child(list(plan.writable), landlock_abi)
        step = "seccomp"
        notify_fd = seccomp.load_program(program, notify=notify)  # built by the zygote (`_watched`)
        step = "cgroup"
        server = _Server(sock, plan.env, spawner_join)  # after seccomp and Landlock: its thread has both
        step = "ready"
        protocol.send(sock, protocol.Ready(), [notify_fd] if notify_fd is not None else None)
        if notify_fd is not None:
            os.close(notify_fd)
    except BaseException as e:
        _fail(sock, step, e)
    server.run()


def _watched(plan: Plan) -> list[seccomp.Rule]:
    """The calls a sandbox's filter reports to the supervisor, who answers them."""
    watch = [seccomp.Rule(name) for name in seccomp.WATCHED] if plan.watch_exec else []
    if plan.watch_connect:
        watch.append(seccomp.WATCHED_CONNECT)
    # Without a listener these can't be decided or recorded; `degrade: [seccomp_notify]` says so.
    return [*watch, *seccomp.WATCHED_ADDRESS, *seccomp.WATCHED_FILTER_INSTALL]


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = bytearray(struct.pack("16sH", b"lo", 0).ljust(40, b"\0"))
        fcntl.ioctl(s.fileno(), siocgifflags, ifr, True)
        flags = struct.unpack_from("H", ifr, 16)[0] | iff_up
        struct.pack_into("H", ifr, 16, flags)
        fcntl.ioctl(s.fileno(), siocsifflags, ifr, True)


_SIGNALS_TO_RESET = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


class _Server:
    """The init loop: spawn commands, reap every child (orphans too), report exits.

    Where it runs matters for the memory budget. The budget's OOM killer picks the biggest process
    in the group. Files the agent writes to the workspace (tmpfs) are charged to the group but
    belong to no process, so once they fill it, the biggest process is init (a Python interpreter)
    and killing it ends the sandbox: the agent could stop its sandbox at will. Lowering init's
    oom_score_adj is no cure: it needs CAP_SYS_RESOURCE, which hosts often withhold even from root,
    and commands would inherit the exemption. Instead, with cgroup v1, init's own process sits in
    corral's parent memory group (the launcher puts it there) and the loop runs on a thread of its
    own that sits in the sandbox's: a child belongs to the cgroups of the thread that forked it, so
    every command starts inside the budget, while the OOM killer, which considers whole processes
    by their leading thread, and the memory init allocates (charged by the process's leader) stay
    outside it. The leading thread only waits. cgroup v2 does not let one process's threads sit in
    different memory groups; there the loop runs on the leading thread (and init can still be the
    OOM killer's victim).
    """

    def __init__(self, sock: socket.socket, default_env: dict[str, str], join: int | None) -> None:
        self.sock, self.default_env = sock, default_env
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)  # PID 1 ignores default-action signals from its namespace
        # Python runs signal handlers on the leading thread, but the wake-up byte is written by the C
        # handler, whichever thread the signal lands on: the loop needs only that.
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._thread: threading.Thread | None = None
        if join is None:
            return
        joined: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._go = threading.Event()

        def loop() -> None:
            try:
                os.write(join, str(threading.get_native_id()).encode())
            except BaseException as e:
                joined.put(e)
                return
            joined.put(None)
            self._go.wait()
            self._loop()

        self._thread = threading.Thread(target=loop, name="corral-init", daemon=True)
        self._thread.start()
        error = joined.get()
        os.close(join)
        if error is not None:
            raise error

    def run(self) -> NoReturn:
        if self._thread is None:
            self._loop()
        self._go.set()
        while True:  # the loop ends the process itself (os._exit)
            self._thread.join()

    def _loop(self) -> NoReturn:
        sock, wake_r = self.sock, self.wake_r
        running: dict[int, protocol.Exec] = {}  # pid -> the request it answers
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(sock, running)
                    continue
                data, fds = protocol.recv(sock)
                if data is None:
                    # The supervisor is gone: exiting as PID 1 makes the kernel kill everything here.
                    os._exit(0)
                try:
                    msg = protocol.decode_request(data)
                except protocol.ProtocolError:
                    # Only the supervisor writes to this end; garbage means it is not the supervisor's
                    # any more. Fail closed: init's exit ends the sandbox, and the supervisor sees it.
                    os._exit(SETUP_FAILED)
                if isinstance(msg, protocol.Exec):
                    _spawn(sock, msg, fds, self.default_env, running)
                else:
                    for pid, request in running.items():
                        if request.id == msg.id:
                            for target in (-pid, pid):
                                try:
                                    os.kill(target, signal.SIGKILL)
                                except ProcessLookupError:
                                    pass
                for fd_ in fds:
                    os.close(fd_)


def _spawn(
    sock: socket.socket,
    msg: protocol.Exec,
    fds: list[int],
    default_env: dict[str, str],
    running: dict[int, protocol.Exec],
) -> None:
    def failed(code: int, error: str) -> None:
        protocol.send(sock, protocol.Failed(id=msg.id, token=msg.token, status=code << 8, error=error))

    env = msg.env or default_env
    argv = msg.argv
    if len(fds) != 3:
        failed(126, f"{argv[0]}: expected 3 stdio descriptors, got {len(fds)}")
        return
    # Whatever opened them, no descriptor of init's but the stdio (dup'ed onto 0-2, which clears the
    # flag there) may reach a command: an inheritable one, the control socket above all, would hand
    # the agent a channel to the supervisor. One call, not a scan of init's table per command.
    L.cloexec_from(3)
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", ""))
    if path is None:
        failed(127, f"{argv[0]}: command not found")
        return
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
    try:
        if msg.cwd or msg.tty:
            pid = _fork_exec(path, argv, env, fds, msg.cwd, msg.tty)
        else:
            pid = os.posix_spawn(
                path, argv, env, file_actions=actions, setsid=True, setsigdef=_SIGNALS_TO_RESET, setsigmask=[]
            )
    except OSError as e:
        failed(
            126 if e.errno in (13, 8) else 127, f"{argv[0]}: {e.strerror}"
        )  # EACCES / ENOEXEC, like a shell
        return
    running[pid] = msg
    protocol.send(sock, protocol.Started(id=msg.id, token=msg.token, pid=pid))


def _fork_exec(path: str, argv: list[str], env: dict[str, str], fds: list[int], cwd: str, tty: bool) -> int:
    """The slow path for what posix_spawn can't do: another cwd, or a controlling terminal."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        try:
            os.close(r)
            if cwd:
                os.chdir(cwd)
            for i, fd in enumerate(fds[:3]):
                os.dup2(fd, i)
            os.setsid()
            if tty:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            for sig in _SIGNALS_TO_RESET:
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(path, argv, env)
        except OSError as e:
            os.write(w, str(e.errno).encode())
        os._exit(127)
    os.close(w)
    err = os.read(r, 16)
    os.close(r)
    if err:
        os.waitpid(pid, 0)
        raise OSError(int(err), os.strerror(int(err)))
    return pid


def _reap(sock: socket.socket, running: dict[int, protocol.Exec]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        request = running.pop(pid, None)
        if request is not None:
            cpu = usage.ru_utime + usage.ru_stime
            protocol.send(sock, protocol.Exit(id=request.id, token=request.token, status=status, cpu=cpu))


if __name__ == "__main__":
    _zygote_main(int(sys.argv[1]), int(sys.argv[2]))
