"""A sandbox's seccomp notifications: the calls its filter parks for the supervisor to answer.

Each runs on one of the supervisor's answering threads while its caller is parked in the kernel, so
what identifies the caller is read before it can exec anything else. An event is recorded before
the call is answered: the command can't then finish (and its result be built) without its own
denials. What this module sees of the sandbox is `NotificationContext`; a tripwire's verdict comes
back as actions, which the sandbox carries out (`act`).
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corral.egress.service import Fence
from corral.events import Deny, ProcessRef, ProcSeccomp
from corral.events.model import Event
from corral.isolation import seccomp
from corral.monitors import process as process_monitor
from corral.runtime import _tripwires
from corral.runtime._procs import process_ref

_SOCKADDR_UN_LEN = 110  # family and the longest path the kernel reads


@dataclass(frozen=True)
class NotificationContext:
    sandbox_id: str
    notify_fd: int
    syscalls: dict[int, str]  # number -> name, for this machine
    own_storage: tuple[str, ...]  # the sandbox's own writable storage, where its sockets live
    unix_sockets: tuple[str, ...]  # the policy's network.unix_sockets
    emit: Callable[[Event], None]
    current_exec: Callable[[], int | None]
    fence: Callable[[], Fence | None]
    tripwires: Callable[[], _tripwires.Tripwires | None]
    act: Callable[[Sequence[_tripwires.Action]], None]


class Notifications:
    def __init__(self, ctx: NotificationContext) -> None:
        self._ctx = ctx
        self._fd = ctx.notify_fd

    def handle(self, note: seccomp.Notification) -> None:
        name = self._ctx.syscalls.get(note.syscall_nr, f"syscall {note.syscall_nr}")
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
            tw = self._ctx.tripwires()
            verdict = (
                _tripwires.ExecVerdict("continue") if tw is None else tw.on_exec(note.pid, name, note.args)
            )
            self._ctx.act(verdict.actions)  # a kill before the answer: the caller never runs unjudged
            if verdict.action == "continue":
                seccomp.respond_continue(self._fd, note.id)
            elif verdict.action == "refuse":
                seccomp.respond_error(self._fd, note.id, verdict.error)
            # "hold": no answer; the caller stays parked until the freeze or the close reaches it
            return
        proc = process_ref(note.pid)
        detail = (
            f"args {note.args[0]:#x} {note.args[1]:#x}"
            if name in ("clone", "socket", "socketpair", "ioctl", "seccomp")
            else ""
        )
        if name in ("socket", "socketpair"):
            detail = f"{seccomp.family_name(note.args[0] & 0xFFFFFFFF)}, {detail}"
        self._ctx.emit(
            Deny(
                sandbox=self._ctx.sandbox_id,
                layer="seccomp",
                what=name,
                exec=self._ctx.current_exec(),
                process=proc,
                detail=detail,
            )
        )
        seccomp.respond_error(self._fd, note.id, errno.EPERM)

    def _on_socket_address(self, note: seccomp.Notification, name: str, pointer: int, length: int) -> None:
        """A connect or sendto whose address may name a UNIX socket by path: allowed only to sockets in
        the sandbox's own storage or named by `network.unix_sockets`. A read-only view of a host
        directory doesn't stop a connect, and a host service's socket there is the host's.

        Decided on what the caller's memory and filesystem hold now; the kernel reads both again after
        the answer, so another thread rewriting the address, or swapping a symlink in the sandbox's
        own storage, between the two can still reach a socket the sandbox can see (README: limits).
        """
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
            seccomp.respond_continue(self._fd, note.id)
            return
        try:
            target = process_monitor.socket_path(note.pid, path)
            why = "" if target is None or self._own_socket(note.pid, target) else "outside the sandbox"
        except process_monitor.Unfollowable as e:
            target, why = path, str(e)
        except OSError:
            target, why = None, ""  # the caller is gone
        if not why:
            seccomp.respond_continue(self._fd, note.id)
            return
        self._ctx.emit(
            Deny(
                sandbox=self._ctx.sandbox_id,
                layer="unix",
                what=target or path,
                exec=self._ctx.current_exec(),
                process=process_ref(note.pid),
                detail=f"{name} to a UNIX socket {why}, not in network.unix_sockets",
            )
        )
        seccomp.respond_error(self._fd, note.id, errno.EACCES)

    def _own_socket(self, pid: int, target: str) -> bool:
        if any(target == root or target.startswith(root + "/") for root in self._ctx.own_storage):
            return True
        named = self._ctx.unix_sockets
        return target in named or any(
            process_monitor.in_root_realpath(f"/proc/{pid}/root", entry) == target for entry in named
        )

    def _on_filter_install(self, note: seccomp.Notification, how: str) -> None:
        """Recorded, then let through: the calls the new filter refuses never reach corral."""
        try:
            self._ctx.emit(
                ProcSeccomp(
                    sandbox=self._ctx.sandbox_id,
                    process=process_ref(note.pid),
                    how=how,
                    exec=self._ctx.current_exec(),
                )
            )
        finally:
            seccomp.respond_continue(self._fd, note.id)

    def _note_connect(self, note: seccomp.Notification) -> None:
        """Tell the fence who is connecting where, read while the caller is parked in connect():
        the address, the program and its command line (a scanner may exit right after its last
        connect). The rest of the process's record is read once the caller has been let go."""
        fence = self._ctx.fence()
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
                    fence.refuse_connect(refusal, process_ref(note.pid))  # read while it is parked
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
                seccomp.respond_error(self._fd, note.id, errno.ECONNREFUSED)
            else:
                seccomp.respond_continue(self._fd, note.id)
        if reported is not None and fence is not None:
            full = process_ref(note.pid)
            if full.exe is not None and full.cmdline:  # still there, not yet a zombie
                fence.name_connect(reported, full)
