"""Every message between corral's processes: one dataclass per message, and the framing they travel in.

Each message is a JSON object in one SOCK_SEQPACKET packet (`send`, `recv`), with an "op" naming its
class; file descriptors travel beside it by SCM_RIGHTS and arrive close-on-exec. These are all the
messages there are, by socket, with their direction and what comes attached:

    message     from -> to                     attached              meaning
    the zygote's socket (one per zygote):
    Launch      supervisor -> zygote           init's control end    build a sandbox from this plan
    a network maker's socket (one per network made ahead, `zygote._Networks`):
    Network     network maker -> zygote        netns, *fence         a fenced network namespace, unused
    SetupError  network maker -> zygote        -                     making it failed: the pool stops
    a sandbox's control socket, while it sets up (`Zygote.launch` reads these, in any order):
    Pid         intermediate child -> superv.  *fence                init's host pid, once in its cgroups
    Ready       init -> supervisor             seccomp listener, or  set-up done: init serves from now on
                                               nothing (degraded)
    SetupError  zygote, child or init -> sup.  -                     the set-up step `step` failed
    a sandbox's control socket, once it is ready:
    Exec        supervisor -> init             stdin, stdout, stderr run a command
    Kill        supervisor -> init             -                     SIGKILL the command's process group
    Started     init -> supervisor             -                     the command runs, as `pid`
    Failed      init -> supervisor             -                     the command never ran (not found...)
    Exit        init -> supervisor             -                     the command ended: its wait status

The fence sockets are `netns.FenceSockets` in order (transparent proxy, explicit proxy, DNS, NFLOG,
sock_diag). Each receiver decodes with the decoder for its own socket and direction (`decode_launch`,
`decode_network`, `decode_setup`, `decode_request`, `decode_reply`), so a message sent where it does not
belong is as malformed as garbage.

Every Exec carries a sequence `id` and an unpredictable `token`; init echoes both, so a reply is bound
to the one request it answers. Init is the only process meant to hold its end of the socket, but the
supervisor never assumes that: anything it did not ask for, or cannot parse, is a `ProtocolError`,
which the sandbox treats as tampering (it raises an alert and terminates the sandbox), never as a
`KeyError` halfway through reading a result. `Exchange` holds those rules. The other receivers fail
closed the same way: init exits on a request it cannot parse (ending its sandbox), the zygote refuses a
malformed Launch without forking, and the supervisor refuses a start whose set-up messages are wrong.
"""

from __future__ import annotations

import array
import json
import os
import secrets
import socket
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

MAX_MESSAGE = 1 << 20
MAX_FDS = 8  # the most descriptors one message carries (a network made ahead: namespace and fence)
_FD_SIZE = array.array("i").itemsize


class ProtocolError(Exception):
    """A message that is malformed, unknown, or not an answer to the outstanding request."""


# --- set-up: supervisor, zygote and the processes that build a sandbox --------------------------


@dataclass(frozen=True)
class Launch:
    """supervisor -> zygote: build a sandbox from `plan` (`Plan.to_dict`); init's control end attached.

    Init joins `join_files` (cgroup.procs files); with `commands_memory` (a cgroup v1 memory `tasks`
    file), init starts commands from a thread of its own in that group instead (`init.Server`)."""

    op: ClassVar[str] = "launch"
    plan: dict[str, Any]
    join_files: list[str]
    commands_memory: str | None
    state_dir: str
    landlock_abi: int
    notify: bool


@dataclass(frozen=True)
class Network:
    """network maker -> zygote: a fenced network namespace, made ahead; [netns, *fence] attached."""

    op: ClassVar[str] = "network"


@dataclass(frozen=True)
class Pid:
    """intermediate child -> supervisor: init's host pid, once it is in its cgroups; fence attached.

    `ahead`: the sandbox joined a network namespace the zygote had made ahead."""

    op: ClassVar[str] = "pid"
    pid: int
    ahead: bool


@dataclass(frozen=True)
class Ready:
    """init -> supervisor: set-up is done; init serves Exec from now on; its seccomp listener attached
    when it has one."""

    op: ClassVar[str] = "ready"


@dataclass(frozen=True)
class SetupError:
    """zygote, intermediate child, init or network maker -> whoever waits: the set-up step `step` failed."""

    op: ClassVar[str] = "error"
    step: str
    error: str


# --- serving: supervisor and a sandbox's init -----------------------------------------------------


@dataclass(frozen=True)
class Exec:
    """supervisor -> init: run `argv` (resolved on the sandbox's PATH) with `env`; stdio attached."""

    op: ClassVar[str] = "exec"
    id: int
    token: str
    argv: list[str]
    env: dict[str, str]
    cwd: str = ""  # "" keeps init's working directory (/workspace)
    tty: bool = False  # stdin is a pty: make it the controlling terminal


@dataclass(frozen=True)
class Kill:
    """supervisor -> init: kill the command `id` (its process group), at its timeout."""

    op: ClassVar[str] = "kill"
    id: int
    token: str


@dataclass(frozen=True)
class Started:
    """init -> supervisor: the command runs; its Exit follows."""

    op: ClassVar[str] = "started"
    id: int
    token: str
    pid: int


@dataclass(frozen=True)
class Failed:
    """init -> supervisor: the command never ran; `status` is a wait status like a shell's (127, 126)."""

    op: ClassVar[str] = "failed"
    id: int
    token: str
    status: int
    error: str


@dataclass(frozen=True)
class Exit:
    """init -> supervisor: the command's process ended; `cpu` is its rusage (itself and reaped children)."""

    op: ClassVar[str] = "exit"
    id: int
    token: str
    status: int
    cpu: float = field(default=0.0)


Request = Exec | Kill
Reply = Started | Failed | Exit
Setup = Pid | Ready | SetupError
Message = Launch | Network | Pid | Ready | SetupError | Exec | Kill | Started | Failed | Exit
_M = TypeVar("_M", bound=Message)


def _channel(*classes: type[_M]) -> dict[str, type[_M]]:
    return {c.op: c for c in classes}


# What each receiver accepts, by op: a message for another socket or direction is unknown there.
_LAUNCH = _channel(Launch)
_NETWORK: dict[str, type[Network | SetupError]] = _channel(Network, SetupError)
_SETUP: dict[str, type[Setup]] = _channel(Pid, Ready, SetupError)
_REQUESTS: dict[str, type[Request]] = _channel(Exec, Kill)
_REPLIES: dict[str, type[Reply]] = _channel(Started, Failed, Exit)
_NOT_EMPTY = {"argv"}  # list fields a message is meaningless without


def new_token() -> str:
    return secrets.token_hex(16)


_DECLARED: dict[str, dict[str, str]] = {}


def _declared(cls: type) -> dict[str, str]:
    """A message class's field names and their types, as written (read once: this runs per exec)."""
    declared = _DECLARED.get(cls.__name__)
    if declared is None:
        declared = _DECLARED[cls.__name__] = {f.name: str(f.type) for f in fields(cls)}
    return declared


def encode(msg: Message) -> bytes:
    # Not dataclasses.asdict: it deep-copies argv and env, a quarter of a millisecond per exec.
    body = {"op": msg.op, **{name: getattr(msg, name) for name in _declared(type(msg))}}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_launch(data: bytes) -> Launch:
    """A message the zygote received; ProtocolError unless it is exactly a `Launch`."""
    return _decode(data, _LAUNCH)


def decode_network(data: bytes) -> Network | SetupError:
    """A message from one of the zygote's network makers: `Network`, or `SetupError`."""
    return _decode(data, _NETWORK)


def decode_setup(data: bytes) -> Setup:
    """A message the supervisor received while a sandbox sets up: `Pid`, `Ready` or `SetupError`."""
    return _decode(data, _SETUP)


def decode_request(data: bytes) -> Request:
    """A message init received; ProtocolError unless it is exactly one of `Exec`, `Kill`."""
    return _decode(data, _REQUESTS)


def decode_reply(data: bytes) -> Reply:
    """A message the supervisor received; ProtocolError unless it is exactly one of the replies."""
    return _decode(data, _REPLIES)


def _decode(data: bytes, classes: dict[str, type[_M]]) -> _M:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"not JSON: {data[:64]!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"not a JSON object: {data[:64]!r}")
    op = obj.pop("op", None)
    cls = classes.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}; expected one of {', '.join(classes)}")
    declared = _declared(cls)
    extra = sorted(set(obj) - set(declared))
    if extra:
        raise ProtocolError(f"{op}: unexpected field(s) {', '.join(extra)}")
    for name, annotation in declared.items():
        if name not in obj:
            raise ProtocolError(f"{op}: missing field {name}")
        if not _has_type(obj[name], annotation):
            raise ProtocolError(f"{op}: field {name} is not {annotation}: {obj[name]!r:.64}")
        if name in _NOT_EMPTY and not obj[name]:
            raise ProtocolError(f"{op}: field {name} is empty")
    return cls(**obj)


def _has_type(value: Any, annotation: str) -> bool:
    # bool is an int to isinstance(); a JSON true where a number belongs is still malformed.
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "str | None":
        return value is None or isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if annotation == "dict[str, str]":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if annotation == "dict[str, Any]":  # checked field by field by its own reader (`Plan.from_dict`)
        return isinstance(value, dict)
    raise AssertionError(f"no check for field type {annotation}")


# --- framing ----------------------------------------------------------------------------------------


def send(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    """One message in one packet, with `fds` attached (SCM_RIGHTS)."""
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[bytes | None, list[int]]:
    """One packet and the fds that came with it, close-on-exec; (None, fds) when the other side is gone.

    Undecoded: the receiver decodes with the decoder for its socket. Without MSG_CMSG_CLOEXEC a
    received descriptor is inheritable: init's own control socket (which the zygote receives) and
    every command's stdio pipes would reach every later command, and a process the agent leaves
    running could then answer the supervisor in init's place.
    """
    # recvmsg, not socket.recv_fds: until Python 3.12, recv_fds drops its `flags` argument.
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
        )
    except OSError:  # ConnectionResetError included: the other side is gone
        return None, []
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
    if not data:
        return None, list(fds)
    return data, list(fds)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Exchange:
    """The replies one Exec may get, in order: Started then Exit, or Failed; nothing else, ever.

    A reply for another id, with another token, out of order, twice, after the last one, or with file
    descriptors attached is a ProtocolError: init never sends such a thing, so something else wrote it.
    """

    def __init__(self, request: Exec) -> None:
        self.request = request
        self.started = False
        self.done = False

    def accept(self, data: bytes, fds: int = 0) -> Reply:
        if fds:
            raise ProtocolError(f"a reply came with {fds} file descriptor(s); init never sends any")
        msg = decode_reply(data)
        if self.done:
            raise ProtocolError(f"{msg.op} for request {msg.id} after request {self.request.id} had ended")
        # compare_digest: how much of a guessed token matched must not show in the timing.
        if msg.id != self.request.id or not secrets.compare_digest(msg.token, self.request.token):
            raise ProtocolError(
                f"{msg.op} for request {msg.id} does not answer the outstanding request {self.request.id} "
                "(id or token differs)"
            )
        if isinstance(msg, Started):
            if self.started:
                raise ProtocolError(f"a second started for request {msg.id}")
            self.started = True
        elif isinstance(msg, Exit):
            if not self.started:
                raise ProtocolError(f"exit before started for request {msg.id}")
            self.done = True
        else:
            if self.started:
                raise ProtocolError(f"failed after started for request {msg.id}")
            self.done = True
        return msg
