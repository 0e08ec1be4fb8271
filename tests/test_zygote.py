"""The zygote as an object: several side by side, each closed on its own, none leaving a process
behind, and a zygote that refuses, without forking, whatever on its socket is not corral's Launch.

These start sandboxes below the runtime (no cgroups, no fence served, no seccomp listener) and talk
to their init directly, over the protocol.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral import Policy
from corral.isolation import mounts, protocol
from corral.isolation import plan as planning
from corral.isolation.zygote import Launched, LaunchError, Zygote
from helpers import wait_until

pytestmark = pytest.mark.root

_NOBODY = 65534


@pytest.fixture
def start(tmp_path: Path) -> Iterator[types.SimpleNamespace]:
    """`start(zygote, name)` launches a sandbox on `zygote`; every sandbox started is ended afterwards."""
    started: list[Launched] = []

    def launch(zygote: Zygote, name: str) -> Launched:
        plan = planning.build(Policy.from_dict({"version": 1}), uid=_NOBODY, gid=_NOBODY, sandbox_id=name)
        state = str(tmp_path / name)
        mounts.prepare_host(state)
        launched = zygote.launch(plan, join_files=[], state_dir=state, landlock_abi=0, notify=False)
        started.append(launched)
        return launched

    yield types.SimpleNamespace(launch=launch)
    for launched in started:
        _end(launched)


def _end(launched: Launched) -> None:
    """Close the control socket (init exits, and with it the sandbox) and wait for init to be gone."""
    if launched.control.fileno() != -1:
        launched.control.close()
        select.select([launched.pidfd], [], [], 10)
        os.close(launched.pidfd)
        protocol.close_all(launched.fence_fds)


def _run(launched: Launched, *argv: str) -> tuple[int, bytes]:
    """Run `argv` through init; its wait status and output."""
    r, w = os.pipe()
    stdin = os.open("/dev/null", os.O_RDONLY)
    request = protocol.Exec(id=1, token=protocol.new_token(), argv=list(argv), env={"PATH": "/usr/bin:/bin"})
    try:
        protocol.send(launched.control, request, [stdin, w, w])
    finally:
        os.close(stdin)
        os.close(w)
    exchange = protocol.Exchange(request)
    reply: protocol.Reply | None = None
    while not exchange.done:
        data, fds = protocol.recv(launched.control)
        assert data is not None, "init went away"
        reply = exchange.accept(data, len(fds))
    with os.fdopen(r, "rb") as out:
        output = out.read()
    assert isinstance(reply, protocol.Exit), reply
    return reply.status, output


def test_two_zygotes_side_by_side_start_sandboxes_and_close_on_their_own(
    start: types.SimpleNamespace,
) -> None:
    with Zygote(networks_ahead=0) as first, Zygote(networks_ahead=1) as second:
        assert first.alive and second.alive and first.pid != second.pid
        one, two = start.launch(first, "zygote-one"), start.launch(second, "zygote-two")
        assert _run(one, "echo", "one") == (0, b"one\n")
        assert _run(two, "echo", "two") == (0, b"two\n")
        first.close()
        assert not first.alive and second.alive
        # Sandboxes don't depend on their zygote once started; the other zygote still starts more.
        assert _run(one, "hostname") == (0, b"corral-zygote-o\n")
        assert _run(start.launch(second, "zygote-three"), "true") == (0, b"")


def test_close_leaves_no_process_behind(start: types.SimpleNamespace) -> None:
    zygote = Zygote(networks_ahead=2)
    launched = start.launch(zygote, "zygote-close")  # after it, the zygote makes two networks ahead
    process = psutil.Process(zygote.pid)
    descendants = {p.pid for p in process.children(recursive=True)} - {launched.init_pid}
    zygote.close()
    zygote.close()  # twice is harmless
    assert not zygote.alive
    assert not psutil.pid_exists(process.pid), "the zygote was not reaped"

    def none_left() -> bool:
        return not [pid for pid in descendants if _running(pid)]

    assert wait_until(none_left, 5), [pid for pid in descendants if _running(pid)]
    assert _run(launched, "true") == (0, b""), "a sandbox outlives the zygote that started it"
    _end(launched)
    assert wait_until(lambda: not _running(launched.init_pid), 5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_launching_on_a_closed_zygote_is_a_clear_error(start: types.SimpleNamespace) -> None:
    zygote = Zygote(networks_ahead=0)
    zygote.close()
    with pytest.raises(LaunchError, match=r"^zygote: this zygote is closed; make a new one") as info:
        start.launch(zygote, "zygote-closed")
    assert info.value.step == "zygote"


def _launch_message(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "plan": {},
        "join_files": [],
        "commands_memory": None,
        "state_dir": "/nonexistent",
        "landlock_abi": 0,
        "notify": False,
    }
    return protocol.encode(protocol.Launch(**{**fields, **changes}))  # type: ignore[arg-type]


def _settled(zygote: Zygote) -> int:
    """How many descriptors the zygote holds once it serves (a refused message answered proves it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        socket.send_fds(zygote._sock, [b"{}"], [theirs.fileno()])
        theirs.close()
        _answer(ours)
        assert ours.recv(1) == b""  # the zygote has closed what came
    return _fds_of(zygote)


def _fds_of(zygote: Zygote) -> int:
    return len(os.listdir(f"/proc/{zygote.pid}/fd"))


def _answer(sock: socket.socket) -> protocol.SetupError:
    sock.settimeout(10)
    data, fds = protocol.recv(sock)
    assert data is not None and fds == [], "no answer"
    answer = protocol.decode_setup(data)
    assert isinstance(answer, protocol.SetupError), answer
    return answer


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (b"\xff garbage", "refused: not JSON"),
        (b'{"op": "exec", "id": 1}', "refused: unknown op 'exec'; expected one of launch"),
        (_launch_message()[:-1] + b',"extra":1}', "refused: launch: unexpected field(s) extra"),
        (_launch_message(notify="yes"), "refused: launch: field notify is not bool"),
    ],
)
def test_the_zygote_refuses_a_message_that_is_not_corrals_launch(
    data: bytes, refusal: str, start: types.SimpleNamespace
) -> None:
    # Only the supervisor holds the zygote's socket, so this stands in for a supervisor gone wrong
    # or a descriptor that leaked: the zygote, root on the host, forks nothing for it, answers the
    # socket that came attached, closes everything that came, and serves on.
    with Zygote(networks_ahead=0) as zygote:
        before = _settled(zygote)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            socket.send_fds(zygote._sock, [data], [theirs.fileno()])
            theirs.close()
            answer = _answer(ours)
            assert (answer.step, answer.error[: len(refusal)]) == ("request", refusal)
            assert ours.recv(1) == b"", "the zygote kept the socket that came with the message"
        assert zygote.alive and wait_until(lambda: _fds_of(zygote) == before, 5)
        assert psutil.Process(zygote.pid).children() == [], "the zygote forked for it"
        assert _run(start.launch(zygote, "zygote-after"), "true") == (0, b"")


def test_the_zygote_refuses_a_launch_with_the_wrong_descriptors(start: types.SimpleNamespace) -> None:
    with Zygote(networks_ahead=0) as zygote:
        before = _settled(zygote)
        zygote._sock.send(_launch_message())  # nothing attached: nobody to answer
        r, w = os.pipe()
        socket.send_fds(zygote._sock, [_launch_message()], [w])  # not a socket
        os.close(w)
        assert os.read(r, 1) == b"", "the zygote kept the pipe"
        os.close(r)
        stream, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with stream:
            socket.send_fds(zygote._sock, [_launch_message()], [other.fileno()])
            other.close()
            assert "not an AF_UNIX SOCK_SEQPACKET socket" in stream.recv(4096).decode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            socket.send_fds(zygote._sock, [_launch_message()], [theirs.fileno(), theirs.fileno()])
            theirs.close()
            assert _answer(ours).error == "refused: launch: 2 descriptor(s) attached, expected 1"
        # Well-formed, with a plan that isn't one: refused at the step that reads it, nothing forked.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            socket.send_fds(zygote._sock, [_launch_message(plan={"hostname": 1})], [theirs.fileno()])
            theirs.close()
            assert _answer(ours).step == "fork"
        assert wait_until(lambda: _fds_of(zygote) == before, 5)
        assert zygote.alive and psutil.Process(zygote.pid).children() == []
        assert _run(start.launch(zygote, "zygote-fds"), "true") == (0, b"")


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        (
            [protocol.Started(id=1, token="t", pid=1)],
            "setup: a set-up message corral did not send: unknown op",
        ),
        ([protocol.Ready()], "setup: an unexpected ready message with 0 descriptor(s)"),
        ([protocol.Pid(pid=1, ahead=False)], "setup: an unexpected pid message with 0 descriptor(s)"),
        ([protocol.SetupError(step="mounts", error="no /proc")], "mounts: no /proc"),
    ],
)
def test_a_start_whose_set_up_messages_are_wrong_fails_and_closes_what_came(
    answers: list[protocol.Message], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The zygote and its children are other processes; a stand-in answers on the set-up socket here.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(
        Zygote, "_start", lambda self: (ours, types.SimpleNamespace(poll=lambda: None, pid=0))
    )
    plan = planning.build(Policy.from_dict({"version": 1}), uid=_NOBODY, gid=_NOBODY, sandbox_id="stand-in")
    sent: list[int] = []  # the write ends of pipes sent along: EOF on their read ends once closed

    def stand_in() -> None:
        data, fds = protocol.recv(theirs)
        assert data is not None and len(fds) == 1
        with socket.socket(fileno=fds[0]) as setup:
            r, w = os.pipe()
            sent.append(r)
            protocol.send(setup, protocol.Ready(), [w])  # carries a descriptor the start must close
            os.close(w)
            for answer in answers:
                protocol.send(setup, answer)

    answering = threading.Thread(target=stand_in)
    answering.start()
    try:
        with pytest.raises(LaunchError) as info:
            Zygote().launch(plan, join_files=[], state_dir="/nonexistent", landlock_abi=0, notify=False)
        assert str(info.value).startswith(error), info.value
    finally:
        answering.join()
        ours.close()
        theirs.close()
    # The read end's write end was received by the start, which closed it when the start failed.
    assert os.read(sent[0], 1) == b""
    os.close(sent[0])


def test_a_zygote_whose_process_died_starts_another_at_the_next_launch(start: types.SimpleNamespace) -> None:
    with Zygote(networks_ahead=0) as zygote:
        first = zygote.pid
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not zygote.alive, 5)
        assert _run(start.launch(zygote, "zygote-again"), "true") == (0, b"")
        assert zygote.alive and zygote.pid != first
