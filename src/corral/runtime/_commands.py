"""Running one command in a sandbox: the request to init, output pumping, timeout, exit, and the
accounting around it.

A `Run` sees the sandbox through an `ExecContext` (fixed once the sandbox has started) and its
`CommandSlot` (one command at a time, which one, and the pipe that wakes it); it never reaches into
the `Sandbox` itself. Its life is in phases, each a method: `_prepare` (stdio and the selector),
`_send` (the request), `_pump` (output until the exit, the timeout, a freeze or the sandbox's end),
and `_finish` (usage, denials, `exec.exit`, the result).
"""

from __future__ import annotations

import os
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from corral._errors import ExecError, SandboxClosedError
from corral.events import Deny, ExecExit, ExecStart, ProcessRef
from corral.events.model import Event
from corral.isolation import cgroups, protocol, zygote
from corral.policy import Policy
from corral.runtime import _procs
from corral.runtime._eventlog import EventLog
from corral.runtime.lifecycle import Lifecycle, State, StopReason
from corral.runtime.results import ExecResult, Output

_DRAIN_GRACE = 0.05  # after the command exits, read what its leftovers still write for this long
KILL_GRACE = 5.0
_STOP_WAIT = 5.0  # how long a command cut short by the sandbox's end waits for it to be recorded
_CHUNK = 65536


class CommandSlot:
    """One command at a time per sandbox (calls from several threads queue on `lock`): which one runs
    (`current`, its id, read by the fence and the tripwires), on which thread, and the pipe that wakes
    it when a tripwire freezes the sandbox or the sandbox ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.current: int | None = None
        self.thread: int | None = None
        self._wake_lock = threading.Lock()  # the running command closes its pipe under it
        self._wake: int | None = None

    def wake(self) -> None:
        with self._wake_lock:
            if self._wake is not None:
                try:
                    os.write(self._wake, b"x")
                except OSError:
                    pass

    def set_wake(self, fd: int | None) -> None:
        with self._wake_lock:
            if fd is None and self._wake is not None:
                os.close(self._wake)
            self._wake = fd


@dataclass(frozen=True)
class ExecContext:
    """What a command uses of its sandbox."""

    sandbox_id: str
    uid: int
    policy: Policy
    launched: zygote.Launched
    cgroup: cgroups.SandboxCgroup
    workspace: str  # the sandbox's /workspace, seen from the host
    life: Lifecycle
    log: EventLog
    emit: Callable[[Event], None]
    flush: Callable[[], None]  # record the denials still being counted
    settle: Callable[[int], None]  # wait until the fence has recorded this command's attempts
    end: Callable[[StopReason, str], None]  # end the sandbox, and why (init wedged or gone)
    tampered: Callable[[int, str], None]  # the control channel carried something init did not send


@dataclass
class _Progress:
    """What the pump has learnt so far."""

    output_left: int  # what may still be kept of stdout and stderr
    deadline: float
    status: int | None = None
    cpu: float = 0.0
    error: str = ""
    timed_out: bool = False
    truncated: bool = False
    terminated: str | None = None
    drain_until: float | None = None


@dataclass
class _Stdio:
    sel: selectors.DefaultSelector
    child_fds: list[int]
    to_close: list[int]
    pending_input: memoryview


class Run:
    """One command's life; iterate over it for its output, then read `result`."""

    def __init__(
        self,
        slot: CommandSlot,
        ctx: ExecContext,
        argv: list[str],
        data: bytes | None,
        timeout: float,
        env: dict[str, str],
        cwd: str | None,
        stdio: tuple[int, int, int] | None,
        tty: bool = False,
    ) -> None:
        self.slot, self.ctx = slot, ctx
        self.argv, self.data, self.timeout = argv, data, timeout
        self.env, self.cwd, self.stdio, self.tty = env, cwd, stdio, tty
        self.result: ExecResult | None = None

    def __iter__(self) -> Iterator[Output]:
        slot, ctx, life = self.slot, self.ctx, self.ctx.life
        with slot.lock:
            if life.ending:
                raise SandboxClosedError(f"sandbox {ctx.sandbox_id} is closed ({life.stop_reason})")
            if life.state is State.FROZEN:
                raise SandboxClosedError(
                    f"sandbox {ctx.sandbox_id} was frozen by tripwire {life.frozen_by!r}; inspect it, "
                    "then close() it"
                )
            slot.thread = threading.get_ident()
            life.command_started()
            try:
                yield from self._run()
            finally:
                slot.current = None
                slot.thread = None
                life.command_recorded()
                if life.ending:
                    ctx.launched.control.close()
                    # Cut short by the sandbox's end: return once that is recorded as well.
                    life.wait_for(State.STOPPED, _STOP_WAIT)

    def _run(self) -> Iterator[Output]:
        ctx, slot = self.ctx, self.slot
        slot.seq += 1
        exec_id = slot.current = slot.seq
        denials_before = ctx.log.mark()
        ctx.cgroup.reset_peak()
        before = ctx.cgroup.usage()
        # Leftovers are told apart by pid, not start time: /proc start times are only as precise as
        # the boot time they are relative to (whole seconds).
        pids_before = set(ctx.cgroup.pids())
        start = time.monotonic()
        io = self._prepare()
        ctx.emit(ExecStart(sandbox=ctx.sandbox_id, exec=exec_id, command=self.argv))
        request = protocol.Exec(
            id=exec_id,
            token=protocol.new_token(),
            argv=self.argv,
            env=self.env,
            cwd=self.cwd or "",
            tty=self.tty,
        )
        progress = _Progress(output_left=ctx.policy.resources.output, deadline=start + self.timeout)
        try:
            self._send(request, io)
            yield from self._pump(request, protocol.Exchange(request), io, progress)
        finally:
            for key in list(io.sel.get_map().values()):
                if key.data != "control":
                    os.close(key.fd)
            io.sel.close()
            slot.set_wake(None)
        if progress.error:
            message = f"corral: {progress.error}\n".encode()
            if self.stdio is not None:
                os.write(self.stdio[2], message)
            else:
                yield Output("stderr", message)
        self.result = self._finish(exec_id, start, before, pids_before, denials_before, progress)

    def _prepare(self) -> _Stdio:
        """The command's stdio (pipes, or the caller's descriptors) and the selector the pump waits on."""
        ctx = self.ctx
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
                os.fchown(fd, ctx.uid, ctx.uid)
            to_close += [in_r, out_w, err_w]
            sel.register(out_r, selectors.EVENT_READ, "stdout")
            sel.register(err_r, selectors.EVENT_READ, "stderr")
            if pending_input:
                os.set_blocking(in_w, False)
                sel.register(in_w, selectors.EVENT_WRITE, "stdin")
            else:
                os.close(in_w)
        sel.register(ctx.launched.control, selectors.EVENT_READ, "control")
        # A tripwire that freezes the sandbox wakes the pump: the command will not finish.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.slot.set_wake(wake_w)
        return _Stdio(sel, child_fds, to_close, pending_input)

    def _send(self, request: protocol.Exec, io: _Stdio) -> None:
        """The request, with the command's ends of its stdio, which are closed here either way (the
        caller closes the selector's)."""
        try:
            protocol.send(self.ctx.launched.control, request, io.child_fds)
        except OSError as e:
            self.ctx.end("failed", f"init is gone ({e})")
            raise ExecError(
                f"sandbox {self.ctx.sandbox_id}: cannot start {self.argv[0]}: its init is gone ({e})"
            ) from None
        finally:
            for fd in io.to_close:
                os.close(fd)

    def _pump(
        self, request: protocol.Exec, exchange: protocol.Exchange, io: _Stdio, p: _Progress
    ) -> Iterator[Output]:
        """Output as it comes, until the command's exit (and what its leftovers write just after),
        its timeout, a freeze, or the sandbox's end."""
        ctx, sel = self.ctx, io.sel
        while True:
            streams_open = any(k.data in ("stdout", "stderr") for k in sel.get_map().values())
            if p.status is not None and (not streams_open or time.monotonic() >= (p.drain_until or 0)):
                return
            now = time.monotonic()
            wait = (p.drain_until if p.status is not None else p.deadline) - now  # type: ignore[operator]
            if wait <= 0 and p.status is None:
                if p.timed_out:  # killed and still no exit: init is wedged, the sandbox is unusable
                    ctx.end("failed", f"init did not end command {request.id} {KILL_GRACE:g}s after its kill")
                    p.terminated = "failed"
                    return
                p.timed_out = True
                protocol.send(ctx.launched.control, protocol.Kill(id=request.id, token=request.token))
                p.deadline = now + KILL_GRACE
                continue
            if ctx.life.state is State.FROZEN and p.status is None:
                p.terminated = "frozen"
                p.status = signal.SIGSTOP
                return
            for key, _ in sel.select(max(wait, 0)):
                if key.data == "wake":
                    os.read(key.fd, 64)
                elif key.data == "control":
                    self._on_control(request, exchange, sel, p)
                elif key.data == "stdin":
                    try:
                        n = os.write(key.fd, io.pending_input[:_CHUNK])
                        io.pending_input = io.pending_input[n:]
                    except BrokenPipeError:
                        io.pending_input = io.pending_input[:0]
                    if not io.pending_input:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                else:
                    chunk = os.read(key.fd, _CHUNK)
                    if chunk:
                        # Past the budget the pipe is still drained, so the command runs on as it
                        # would have (not blocked, not killed); only what corral keeps is bounded.
                        if len(chunk) > p.output_left and not p.truncated:
                            p.truncated = True
                            self._output_denial(request.id)
                        kept = chunk[: p.output_left]
                        p.output_left -= len(kept)
                        if kept:
                            yield Output(key.data, kept)
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)

    def _on_control(
        self,
        request: protocol.Exec,
        exchange: protocol.Exchange,
        sel: selectors.DefaultSelector,
        p: _Progress,
    ) -> None:
        """A message from init on the control socket, or its end."""
        ctx = self.ctx
        data, fds = protocol.recv(ctx.launched.control)
        for fd in fds:
            os.close(fd)
        if data is None:  # init is gone: the sandbox was closed under us, or init died
            if not ctx.life.ending:
                # Nothing closed it: init died (corral's or the host's failure: nothing in the
                # sandbox can signal its PID 1). The sandbox is ended as failed, so its verdict and
                # the store's say so, and never read as the agent's doing.
                ctx.end("failed", f"init is gone (while command {request.id} ran)")
                if not exchange.started:
                    # Gone before it took the request (its last thread may still have held the
                    # socket when the request went out): nothing was started.
                    raise ExecError(
                        f"sandbox {ctx.sandbox_id}: cannot start {self.argv[0]}: its init is gone"
                    )
            sel.unregister(ctx.launched.control)
            p.terminated = ctx.life.stop_reason or "failed"
            p.status = signal.SIGKILL
            p.drain_until = time.monotonic()
            return
        try:
            reply = exchange.accept(data, len(fds))
        except protocol.ProtocolError as e:
            ctx.tampered(request.id, str(e))
            raise ExecError(
                f"sandbox {ctx.sandbox_id}: {self.argv[0]}: the reply on init's control socket was "
                f"not init's ({e}); the sandbox was terminated as tampered with"
            ) from None
        if isinstance(reply, protocol.Exit):
            p.status, p.cpu = reply.status, reply.cpu
            p.drain_until = time.monotonic() + _DRAIN_GRACE
        elif isinstance(reply, protocol.Failed):
            p.status, p.error = reply.status, reply.error
            p.drain_until = time.monotonic() + _DRAIN_GRACE

    def _finish(
        self,
        exec_id: int,
        start: float,
        before: cgroups.Usage,
        pids_before: set[int],
        denials_before: int,
        p: _Progress,
    ) -> ExecResult:
        ctx = self.ctx
        ctx.settle(exec_id)
        duration = time.monotonic() - start
        assert p.status is not None
        if p.terminated is None:
            code = os.waitstatus_to_exitcode(p.status)
        else:
            code = -signal.SIGSTOP if p.terminated == "frozen" else -signal.SIGKILL
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig is not None else code
        cpu = p.cpu
        peak = 0
        leftover: list[ProcessRef] = []
        if ctx.life.state is State.RUNNING:
            after = ctx.cgroup.usage()
            peak = after.memory_peak_bytes
            self._budget_denials(exec_id, before, after, p.timed_out)
            if p.timed_out:
                # Killed at its timeout, a shell never reaps its children, so their CPU is missing
                # from its rusage; the cgroup charged it all (plus whatever else ran meanwhile).
                cpu = max(cpu, after.cpu_seconds - before.cpu_seconds)
            leftover = _procs.live_processes([pid for pid in ctx.cgroup.pids() if pid not in pids_before])
        ctx.flush()
        ctx.emit(
            ExecExit(
                sandbox=ctx.sandbox_id,
                exec=exec_id,
                exit_code=exit_code,
                signal=sig,
                duration=duration,
                cpu_seconds=cpu,
                peak_memory=peak,
                timed_out=p.timed_out,
                leftover=leftover,
            )
        )
        denials = [e for e in ctx.log.since(denials_before) if isinstance(e, Deny)]
        return ExecResult(
            exit_code=exit_code,
            stdout=b"",
            stderr=b"",
            duration=duration,
            cpu_seconds=cpu,
            peak_memory=peak,
            signal=sig,
            timed_out=p.timed_out,
            terminated=p.terminated,
            leftover=leftover,
            denials=denials,
            output_truncated=p.truncated,
        )

    def _deny(self, exec_id: int, layer: str, what: str, detail: str) -> None:
        self.ctx.emit(Deny(sandbox=self.ctx.sandbox_id, layer=layer, what=what, exec=exec_id, detail=detail))

    def _output_denial(self, exec_id: int) -> None:
        self._deny(
            exec_id,
            "output",
            "output",
            f"output budget of {self.ctx.policy.resources.output} bytes reached; the rest of stdout and "
            "stderr was read and discarded",
        )

    def _budget_denials(
        self, exec_id: int, before: cgroups.Usage, after: cgroups.Usage, timed_out: bool
    ) -> None:
        r = self.ctx.policy.resources
        if after.oom_kills > before.oom_kills:
            self._deny(
                exec_id,
                "cgroup",
                "memory",
                f"memory budget of {r.memory} bytes exhausted; the kernel killed "
                f"{after.oom_kills - before.oom_kills} process(es)",
            )
        if after.pids_refused > before.pids_refused:
            self._deny(
                exec_id,
                "cgroup",
                "processes",
                f"process budget of {r.processes} reached; {after.pids_refused - before.pids_refused} "
                "fork(s) refused",
            )
        try:
            if os.statvfs(self.ctx.workspace).f_bavail == 0:
                self._deny(exec_id, "storage", "disk", f"disk budget of {r.disk} bytes is full")
        except OSError:
            pass
        if timed_out:
            self._deny(
                exec_id,
                "timeout",
                "timeout",
                f"command ran past its {self.timeout:g}s timeout and was killed",
            )
