"""The control channel between the supervisor and a sandbox's init.

No descriptor of corral's reaches a command or what it leaves running; and should anything but init
ever write to the supervisor's control socket (here: the test itself, holding init's end, as an agent
that got hold of it would), the exec raises ExecError, a `tamper` alert is recorded and the sandbox
is terminated, instead of the forged reply being taken for the command's result.
"""

from __future__ import annotations

import os
import socket
import threading
import typing
from collections.abc import Callable

import psutil
import pytest

from corral import ExecError, ExecResult, Sandbox
from corral.events import Alert, ExecStart
from corral.isolation import _linux as L
from corral.isolation import protocol
from helpers import wait_until

# --- the protocol, on bytes (no root) ------------------------------------------------------------


def _exec(id: int = 1, token: str = "t" * 32) -> protocol.Exec:
    return protocol.Exec(id=id, token=token, argv=["/bin/true"], env={"PATH": "/bin"}, cwd="", tty=False)


def test_every_message_round_trips_through_the_decoder_of_its_socket() -> None:
    decoders: list[tuple[Callable[[bytes], protocol.Message], list[protocol.Message]]] = [
        (
            protocol.decode_launch,
            [
                protocol.Launch(
                    plan={"hostname": "h"},
                    join_files=[],
                    commands_memory=None,
                    state_dir="/s",
                    landlock_abi=3,
                    notify=True,
                )
            ],
        ),
        (protocol.decode_network, [protocol.Network(), protocol.SetupError(step="network fence", error="e")]),
        (
            protocol.decode_setup,
            [protocol.Pid(pid=7, ahead=True), protocol.Ready(), protocol.SetupError(step="mount", error="e")],
        ),
        (protocol.decode_request, [_exec(), protocol.Kill(id=1, token="t")]),
        (
            protocol.decode_reply,
            [
                protocol.Started(id=1, token="t", pid=7),
                protocol.Failed(id=1, token="t", status=127 << 8, error="x: command not found"),
                protocol.Exit(id=1, token="t", status=0, cpu=0.25),
            ],
        ),
    ]
    for decode, messages in decoders:
        for msg in messages:
            assert decode(protocol.encode(msg)) == msg
            for other, _ in decoders:  # on any other socket, or the other way, it is unknown
                if other is not decode and not isinstance(msg, protocol.SetupError):
                    with pytest.raises(protocol.ProtocolError, match="unknown op"):
                        other(protocol.encode(msg))
    every = {type(m) for _, messages in decoders for m in messages}
    assert every == set(typing.get_args(protocol.Message))


def test_the_protocol_module_documents_every_message() -> None:
    table = (protocol.__doc__ or "").split("\n")
    for cls in typing.get_args(protocol.Message):
        assert any(line.strip().startswith(cls.__name__ + " ") for line in table), cls.__name__


def test_a_launch_with_a_malformed_field_is_a_protocol_error() -> None:
    with pytest.raises(protocol.ProtocolError, match=r"launch: field commands_memory is not str \| None"):
        protocol.decode_launch(
            b'{"op":"launch","plan":{},"join_files":[],"commands_memory":3,"state_dir":"/","landlock_abi":0,'
            b'"notify":false}'
        )
    with pytest.raises(protocol.ProtocolError, match="launch: field plan is not dict"):
        protocol.decode_launch(
            b'{"op":"launch","plan":[],"join_files":[],"commands_memory":null,"state_dir":"/",'
            b'"landlock_abi":0,"notify":false}'
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\x00junk", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"op": "exec", "id": 1}', "unknown op 'exec'"),  # a request is no reply
        (b'{"id": 1}', "unknown op None"),
        (b'{"op": "started", "id": 1, "token": "t"}', "started: missing field pid"),
        (b'{"op": "started", "id": 1, "token": "t", "pid": 2, "x": 0}', "started: unexpected field(s) x"),
        (b'{"op": "started", "id": true, "token": "t", "pid": 2}', "started: field id is not int"),
        (b'{"op": "exit", "id": 1, "token": 5, "status": 0, "cpu": 0}', "exit: field token is not str"),
        (b'{"op": "exit", "id": 1, "token": "t", "status": "0", "cpu": 0}', "exit: field status is not int"),
    ],
)
def test_malformed_replies_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(protocol.ProtocolError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        protocol.decode_reply(data)


def test_an_exec_without_a_command_is_malformed() -> None:
    data = protocol.encode(_exec()).replace(b'["/bin/true"]', b"[]")
    with pytest.raises(protocol.ProtocolError, match="exec: field argv is empty"):
        protocol.decode_request(data)


def test_an_exchange_takes_started_then_exit_or_failed() -> None:
    request = _exec(id=3, token="secret")
    ex = protocol.Exchange(request)
    assert ex.accept(protocol.encode(protocol.Started(id=3, token="secret", pid=9))) == protocol.Started(
        id=3, token="secret", pid=9
    )
    assert isinstance(
        ex.accept(protocol.encode(protocol.Exit(id=3, token="secret", status=0))), protocol.Exit
    )
    failed = protocol.Exchange(request)
    reply = failed.accept(protocol.encode(protocol.Failed(id=3, token="secret", status=127 << 8, error="e")))
    assert isinstance(reply, protocol.Failed) and failed.done


def _violation(sequence: list[protocol.Reply], fds: int = 0) -> str:
    ex = protocol.Exchange(_exec(id=3, token="secret"))
    with pytest.raises(protocol.ProtocolError) as info:
        for i, msg in enumerate(sequence):
            ex.accept(protocol.encode(msg), fds if i == len(sequence) - 1 else 0)
    return str(info.value)


def test_replies_that_do_not_answer_the_request_are_protocol_errors() -> None:
    started = protocol.Started(id=3, token="secret", pid=9)
    ended = protocol.Exit(id=3, token="secret", status=0)
    assert "does not answer the outstanding request 3" in _violation(
        [protocol.Started(id=2, token="secret", pid=9)]
    )
    assert "does not answer" in _violation([started, protocol.Exit(id=3, token="guess", status=0)])
    assert _violation([ended]) == "exit before started for request 3"
    assert _violation([started, started]) == "a second started for request 3"
    assert _violation([started, ended, ended]) == "exit for request 3 after request 3 had ended"
    assert _violation([started, protocol.Failed(id=3, token="secret", status=0, error="")]) == (
        "failed after started for request 3"
    )
    assert "file descriptor" in _violation([started], fds=1)


def test_init_marks_every_descriptor_above_stdio_close_on_exec_before_a_command() -> None:
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)
        os.set_inheritable(w, True)
        L.cloexec_from(3)
        assert not os.get_inheritable(r) and not os.get_inheritable(w)
    finally:
        os.close(r)
        os.close(w)


# --- real sandboxes (root) -----------------------------------------------------------------------


def _fds(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _init_pid(sb: Sandbox) -> int:
    assert sb.init_pid is not None
    return sb.init_pid


def _command_pids(sb: Sandbox) -> list[int]:
    return [p.pid for p in psutil.Process(_init_pid(sb)).children(recursive=True)]


@pytest.mark.root
def test_commands_and_what_they_leave_running_hold_only_their_stdio() -> None:
    with Sandbox(keep_workspace=False) as sb:
        sb.exec("true")  # an earlier command's pipes, in init, were among what leaked
        r = sb.exec("sleep 1000 & echo started")
        assert r.stdout == b"started\n" and len(r.leftover) == 1
        assert wait_until(lambda: _exe(r.leftover[0].pid) == "/usr/bin/sleep")
        assert _fds(r.leftover[0].pid) == [0, 1, 2]

        seen: dict[int, list[int]] = {}

        def look() -> bool:
            for pid in _command_pids(sb):
                # After its execve: before it, a spawned child still shares init's table.
                if pid != r.leftover[0].pid and _exe(pid) == "/usr/bin/sleep":
                    seen[pid] = _fds(pid)
                    os.kill(pid, 9)
                    return True
            return False

        result: list[ExecResult] = []
        t = threading.Thread(target=lambda: result.append(sb.exec(["sleep", "1000"], timeout=30)))
        t.start()
        try:
            assert wait_until(look, 10), "the command never started"
        finally:
            t.join(30)
        assert list(seen.values()) == [[0, 1, 2]]
        assert result[0].signal == 9


def _take_control_socket(sb: Sandbox) -> socket.socket:
    """A copy of init's end of the control socket, taken from the host as an agent holding it would
    have it (pidfd_getfd; root on the host may, though init is not dumpable)."""
    init = _init_pid(sb)
    sockets = [
        fd for fd in _fds(init) if fd > 2 and os.readlink(f"/proc/{init}/fd/{fd}").startswith("socket:")
    ]
    assert len(sockets) == 1, f"init's sockets: {sockets}"
    return socket.socket(fileno=L.pidfd_getfd(init, sockets[0]))


Forge = Callable[[Sandbox, int, bytes], bytes]


def _forged_during_exec(forge: Forge) -> tuple[Sandbox, BaseException | None]:
    """Run a command, and while it runs send what `forge(sb, exec id, an earlier exit)` makes on
    init's end of the control socket; what exec() raised."""
    replies: list[bytes] = []
    original = protocol.recv

    def recording(sock: socket.socket) -> tuple[bytes | None, list[int]]:
        data, fds = original(sock)
        if data is not None:
            replies.append(data)
        return data, fds

    sb = Sandbox(keep_workspace=False)
    try:
        protocol.recv = recording  # type: ignore[assignment]
        try:
            assert sb.exec("true").exit_code == 0
        finally:
            protocol.recv = original  # type: ignore[assignment]
        earlier_exit = next(d for d in replies if b'"exit"' in d)
        raised: list[BaseException] = []
        result: list[ExecResult] = []

        def run() -> None:
            try:
                result.append(sb.exec("sleep 5; echo REAL OUTPUT; exit 3", timeout=30))
            except BaseException as e:
                raised.append(e)

        ctl = _take_control_socket(sb)
        try:
            t = threading.Thread(target=run)
            t.start()
            assert wait_until(lambda: bool(_command_pids(sb)), 10), "the command never started"
            exec_id = [e for e in sb.events() if isinstance(e, ExecStart)][-1].exec
            ctl.send(forge(sb, exec_id, earlier_exit))
            t.join(30)
        finally:
            ctl.close()
        assert not result, f"exec() returned {result}"
        return sb, (raised[0] if raised else None)
    except BaseException:
        sb.close()
        raise


@pytest.mark.root
@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda sb, i, _: protocol.encode(protocol.Started(id=i + 7, token="x", pid=1)), id="unsolicited"
        ),
        pytest.param(lambda sb, i, _: b"\xff\x00{junk", id="junk"),
        pytest.param(lambda sb, i, earlier: earlier, id="replayed-exit"),
        pytest.param(
            lambda sb, i, _: protocol.encode(protocol.Exit(id=i, token="0" * 32, status=0, cpu=0.0)),
            id="wrong-token",
        ),
    ],
)
def test_a_reply_init_did_not_send_ends_the_sandbox(forge: Forge) -> None:
    sb, raised = _forged_during_exec(forge)
    try:
        assert isinstance(raised, ExecError), f"exec() raised {raised!r}"
        assert "not init's" in str(raised) and "terminated as tampered with" in str(raised)
        alerts = [a for a in sb.alerts() if isinstance(a, Alert)]
        assert [(a.category, a.severity, a.action) for a in alerts] == [("tamper", "critical", "terminate")]
        assert alerts[0].exec == 2
        assert sb.closed
    finally:
        sb.close()
