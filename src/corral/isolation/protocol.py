"""The control protocol between the supervisor and a sandbox's init, one dataclass per message.

Messages are JSON objects on a SOCK_SEQPACKET socketpair (one message per packet), each with an
"op" naming its class below. Direction and meaning:

    supervisor -> init   Exec      run a command; [stdin, stdout, stderr] come attached (SCM_RIGHTS)
    supervisor -> init   Kill      SIGKILL the process group of the command `id`
    init -> supervisor   Started   the command `id` runs as `pid` (in the sandbox's PID namespace)
    init -> supervisor   Failed    the command `id` could not be started (not found, not executable)
    init -> supervisor   Exit      the command `id`, once Started, ended with wait status `status`

Every request carries a sequence `id` and an unpredictable `token`; init echoes both, so a reply is
bound to the one request it answers. Init is the only process meant to hold its end of the socket,
but the supervisor never assumes that: anything it did not ask for, or cannot parse, is a
`ProtocolError`, which the sandbox treats as tampering (it raises an alert and terminates the
sandbox), never as a `KeyError` halfway through reading a result. `Exchange` holds those rules.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar


class ProtocolError(Exception):
    """A control message that is malformed, unknown, or not an answer to the outstanding request."""


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
_REQUESTS: dict[str, type[Request]] = {c.op: c for c in (Exec, Kill)}
_REPLIES: dict[str, type[Reply]] = {c.op: c for c in (Started, Failed, Exit)}
_T = TypeVar("_T", bound=Exec | Kill | Started | Failed | Exit)


def new_token() -> str:
    return secrets.token_hex(16)


_DECLARED: dict[str, dict[str, str]] = {}


def _declared(cls: type) -> dict[str, str]:
    """A message class's field names and their types, as written (read once: this runs per exec)."""
    declared = _DECLARED.get(cls.__name__)
    if declared is None:
        declared = _DECLARED[cls.__name__] = {f.name: str(f.type) for f in fields(cls)}
    return declared


def encode(msg: Request | Reply) -> bytes:
    # Not dataclasses.asdict: it deep-copies argv and env, a quarter of a millisecond per exec.
    body = {"op": msg.op, **{name: getattr(msg, name) for name in _declared(type(msg))}}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_request(data: bytes) -> Request:
    """A message init received; ProtocolError unless it is exactly one of `Exec`, `Kill`."""
    return _decode(data, _REQUESTS)


def decode_reply(data: bytes) -> Reply:
    """A message the supervisor received; ProtocolError unless it is exactly one of the replies."""
    return _decode(data, _REPLIES)


def _decode(data: bytes, classes: dict[str, type[_T]]) -> _T:
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
    return cls(**obj)


def _has_type(value: Any, annotation: str) -> bool:
    # bool is an int to isinstance(); a JSON true where a number belongs is still malformed.
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "list[str]":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    if annotation == "dict[str, str]":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    raise AssertionError(f"no check for field type {annotation}")


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
