"""One TCP connection's record, from its accept to its `net.connect` event, and how it is recorded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from corral.egress.rules import IPAddress
from corral.events import Deny, NetConnect, ProcessRef

if TYPE_CHECKING:
    from corral.egress.service import FenceContext

Via = Literal["transparent", "proxy"]


@dataclass(slots=True, eq=False)
class Connection:
    """What the fence knows about one connection. Filled in as it is judged and relayed, on the loop's
    thread and then by the relay's threads; read once, for its event, when it ends."""

    sandbox: str
    destination: IPAddress  # what the program connected to (a synthetic address for a name)
    port: int
    name: str | None  # the name the destination stands for, or the proxy request's
    via: Via
    exec: int | None  # the command running when it was accepted
    process: ProcessRef | None = None  # who opened it, once found (`Fence` settles it before relaying)
    protocol: str = "unknown"
    sni: str | None = None
    address: IPAddress | None = None  # the checked address corral dialled, once chosen
    decision: Literal["allow", "deny"] | None = None  # None: not decided yet
    reason: str = ""
    bytes_out: int = 0
    bytes_in: int = 0

    def event(self, duration: float = 0.0) -> NetConnect:
        assert self.decision is not None, "recorded before it was decided"
        return NetConnect(
            sandbox=self.sandbox,
            destination=str(self.destination),
            port=self.port,
            name=self.name,
            address=None if self.address is None else str(self.address),
            protocol=self.protocol,
            sni=self.sni,
            decision=self.decision,
            reason=self.reason,
            via=self.via,
            bytes_out=self.bytes_out,
            bytes_in=self.bytes_in,
            duration=duration,
            exec=self.exec,
            process=self.process,
        )

    def deny(self, what: str, detail: str) -> Deny:
        return Deny(
            sandbox=self.sandbox,
            layer="egress",
            what=what,
            exec=self.exec,
            process=self.process,
            detail=detail,
        )


class Recorder:
    """Emits a sandbox's connection events. Called from the loop's thread and the relays'."""

    def __init__(self, context: FenceContext) -> None:
        self._emit = context.emit

    def allowed(self, record: Connection, duration: float) -> None:
        self._emit(record.event(duration))

    def refused(self, record: Connection, reason: str, deny: bool = True) -> None:
        """The `net.connect` event of a refused connection, and (`deny`) its `deny` event; a failure
        that is no decision of the policy's (an unreachable upstream) is not a deny."""
        record.decision, record.reason = "deny", reason
        self._emit(record.event())
        if deny:
            self._emit(record.deny(f"{record.name or record.destination} port {record.port}", reason))

    def cut(self, record: Connection, why: str) -> None:
        """The `deny` of an allowed connection cut by a switch of network phases (its `net.connect`,
        recorded first, stays allowed: it was, while its phase lasted)."""
        self._emit(record.deny(f"{record.name or record.destination} port {record.port}", why))

    def over_budget(self, record: Connection, limit: int) -> None:
        """The bytes-out budget cut `record` (its process is settled before any bytes are relayed)."""
        self._emit(
            record.deny("bytes_out", f"bytes-out budget of {limit} per minute reached; connection cut")
        )
