"""A sandbox's init once it is set up: spawn commands, reap every process, report exits.

Init (PID 1 of the sandbox's PID namespace, started by `child.become_init`) is corral code, not agent
code, and is hardened against the agent that shares its uid: as PID 1 it ignores every signal sent from
inside its namespace, it is not dumpable (so /proc/1/mem and /proc/1/fd are closed to the agent),
ptrace is refused by seccomp, and its control socket is close-on-exec so no command inherits it. Every
descriptor it receives arrives close-on-exec (`protocol.recv`): a command gets its stdio as 0-2 and
nothing else, and before each command init marks every descriptor above 2 close-on-exec again
(`_spawn`). When the supervisor dies, the control socket closes, init exits, and the kernel kills every
process in the PID namespace: a sandbox never outlives its guard. Anything on the control socket that
is not a well-formed request ends the sandbox the same way (fail closed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import shutil
import signal
import socket
import termios
import threading
from typing import NoReturn

from corral.isolation import _linux as L
from corral.isolation import protocol

# Init's exit status when it ends the sandbox itself: set-up failed, or its control socket carried
# something the supervisor did not send.
SETUP_FAILED = 125


_SIGNALS_TO_RESET = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


class Server:
    """The init loop: spawn commands, reap every child (orphans too), report exits.

    Where it runs matters for the memory budget. The budget's OOM killer picks the biggest process
    in the group. Files the agent writes to the workspace (tmpfs) are charged to the group but
    belong to no process, so once they fill it, the biggest process is init (a Python interpreter)
    and killing it ends the sandbox: the agent could stop its sandbox at will. Lowering init's
    oom_score_adj is no cure: it needs CAP_SYS_RESOURCE, which hosts often withhold even from root,
    and commands would inherit the exemption. Instead, with cgroup v1, init's own process sits in
    corral's parent memory group (the intermediate child puts it there) and the loop runs on a thread of its
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
        # Found but not runnable is 126, like a shell; anything else is 127.
        failed(126 if e.errno in (errno.EACCES, errno.ENOEXEC) else 127, f"{argv[0]}: {e.strerror}")
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
