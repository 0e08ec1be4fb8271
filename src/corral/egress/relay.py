"""The relay: a decided connection's bytes, both ways, on two threads, with the bytes-out budget
taken as they pass. Every connection the fence allows, from either listener, goes through here.

Each thread copies one direction in blocking reads and writes. The threads copy, where splice(2)
would move pages: measured on 2 cores, copying ran about a third faster. Spliced pages stay
referenced until the far reader has copied them, so the sender keeps writing into pages that have
left its cache; a copy frees each page at once.

Three watches ride on the copy, each costing nothing once it is done: the client's first bytes when
the rule allows any protocol (the relay starts before the client speaks, so a server-first protocol
doesn't stall; Stratum is still cut when it shows), one HTTP request per connection (`framing`), and
the server's answer to that request, for a switch of protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable

from corral.egress import framing, sniff
from corral.egress.connection import Connection, Recorder
from corral.egress.decision import Budget

# A relay thread's read buffer starts small (most connections carry little) and doubles each time a
# read fills it, so a bulk transfer moves up to 4 MiB per wake-up.
_RELAY_FIRST = 64 << 10
_RELAY_MOST = 4 << 20


class Relay:
    """One decided connection's relay.

    `framer`: the client's direction passes one HTTP request, and the server's is watched for a
    switch of protocols. `decided`: the client's first bytes are inspected in flight (recorded in
    `record`, Stratum cut), and `decided` is called on the loop once the protocol is known."""

    def __init__(
        self,
        record: Connection,
        recorder: Recorder,
        bytes_out: Budget,
        framer: framing.OneRequest | None = None,
        decided: Callable[[], None] | None = None,
    ) -> None:
        self.record = record
        self._recorder = recorder
        self._bytes_out = bytes_out
        self._framer = framer
        self._decided = decided

    def _take(self, amount: int) -> bool:
        """The bytes-out budget, taken for `amount` bytes the client is sending: the one place it is
        checked. Past it, the cut is recorded (a `bytes_out` deny) and the caller stops."""
        if self._bytes_out.take(amount):
            return True
        self._recorder.over_budget(self.record, self._bytes_out.limit)
        return False

    async def run(self, client: socket.socket, upstream: socket.socket, first: bytes) -> None:
        """Relay until both directions end. `first`: what the client sent while it was judged, sent
        on first (already framed, with `framer`). Whatever the server sent first (an SSH banner
        arrives right after connect) still waits in its socket, and goes out first the other way."""
        if not self._take(len(first)):
            self._recorder.refused(self.record, "over the bytes-out budget", deny=False)
            return
        self.record.bytes_out = len(first)
        loop = asyncio.get_running_loop()
        a, b = os.dup(client.fileno()), os.dup(upstream.fileno())
        done: list[asyncio.Future[int]] = []
        for src, dst, outbound, head in ((a, b, True, first), (b, a, False, b"")):
            fut: asyncio.Future[int] = loop.create_future()
            done.append(fut)
            threading.Thread(
                target=self._one, args=(src, dst, outbound, head, loop, fut), name="corral-relay", daemon=True
            ).start()
        try:
            await asyncio.wait(done)  # not gather: a cancel must not cancel the threads' futures
        except asyncio.CancelledError:
            # The fence is closing. A close does not wake a thread blocked in a read; a shutdown
            # does, and the descriptors stay open until the threads are out of their calls.
            for fd in (a, b):
                with contextlib.suppress(OSError):
                    _shutdown(fd, socket.SHUT_RDWR)
            await asyncio.wait(done, timeout=1.0)
            raise
        finally:
            # A thread still stuck after that keeps its descriptors: leaked, never closed under it.
            if all(f.done() for f in done):
                self.record.bytes_out, self.record.bytes_in = (f.result() for f in done)
                os.close(a)
                os.close(b)

    def _one(
        self,
        src: int,
        dst: int,
        outbound: bool,
        head: bytes,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[int],
    ) -> None:
        framer = self._framer
        total = 0
        cut = False
        request = framer if outbound else None  # `head` is framed already
        watch = framer.response if framer is not None and framer.upgrade and not outbound else None
        inspect = outbound and self._decided is not None
        seen = b""
        try:
            for fd in (src, dst):
                os.set_blocking(fd, True)
            _write_all(dst, head)
            total += len(head)
            buf = bytearray(_RELAY_FIRST)
            view = memoryview(buf)
            while not (request is not None and request.after) and (n := os.readv(src, [buf])):
                if outbound:
                    if inspect:
                        seen += view[: min(n, sniff.MAX_SNIFF - len(seen))]
                        found = sniff.sniff_client(seen)
                        self.record.protocol, self.record.sni = found.protocol, found.name
                        if found.protocol == "stratum":
                            self._recorder.refused(self.record, "mining protocol (Stratum) seen in flight")
                            cut = True
                            break
                        if found.complete or len(seen) >= sniff.MAX_SNIFF:
                            inspect = False
                            self._decide(loop)
                    if not self._take(n):
                        cut = True
                        break
                if watch is not None and not watch(view[:n]):
                    watch = None
                if request is None:
                    _write_all(dst, view[:n])
                else:
                    for piece in request.feed(view[:n]):
                        _write_all(dst, piece)
                total += n
                if n == len(buf) and n < _RELAY_MOST:
                    buf = bytearray(2 * n)
                    view = memoryview(buf)
        except framing.Malformed as e:
            self._recorder.refused(self.record, e.reason)
            cut = True
        except OSError:
            pass
        finally:
            if outbound:
                self._decide(loop)
            with contextlib.suppress(OSError):
                # Normally the other side sees EOF, as it would without corral; a cut connection is
                # closed both ways, so no answer to the truncated request comes back either.
                _shutdown(dst, socket.SHUT_RDWR if cut else socket.SHUT_WR)
            if request is not None and request.after:
                self._refuse_later(src, request)
            loop.call_soon_threadsafe(fut.set_result, total)

    def _decide(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._decided is not None:
            loop.call_soon_threadsafe(self._decided)  # idempotent; counted on the loop's thread
            self._decided = None

    def _refuse_later(self, client: int, request: framing.OneRequest) -> None:
        """The client sent more after its one request, and the server's side has been shut. Record
        what that was (read on to its Host, when it is a request), then swallow the rest: the answer
        to the request that passed still reaches the client, and ends when the server closes."""
        with contextlib.suppress(OSError):
            while (
                len(request.after) < sniff.MAX_SNIFF and not sniff.sniff_client(bytes(request.after)).complete
            ):
                more = os.read(client, sniff.MAX_SNIFF - len(request.after))
                if not more:
                    break
                request.after += more
        reason, refused = request.refusal()
        if refused:
            self._recorder.refused(self.record, reason)
        else:
            # Not the policy's business: the request that passed was allowed, and the client asks
            # again on a new connection. A deny here would read as a refused destination to rules.
            self.record.reason = f"{self.record.reason}; {reason}"
        with contextlib.suppress(OSError):
            while os.read(client, _RELAY_FIRST):
                pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _shutdown(fd: int, how: int) -> None:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(how)
    finally:
        s.close()
