"""The policy's word on one sandbox's connections: the destination, the protocol, and the budgets.

Judged in this order, by the proxy for every connection it accepts and (the first part) by the
seccomp handler for a connect it has parked: the connection budget, an address the resolver never
gave out, the destination (a name against the rules, resolved on the host only when a rule could
allow it; an address against the rules), then, once the first bytes are in, the protocol. The
bytes-out budget is taken by the relay (`relay`) as the bytes pass.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from corral.egress import sniff
from corral.egress.rules import SYNTHETIC, IPAddress, Rules, Verdict
from corral.egress.upstream import Upstream


class Budget:
    """A sliding one-minute window, taken from several threads (the loop, relays, the supervisor)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0
        self._lock = threading.Lock()

    def take(self, amount: int = 1) -> bool:
        with self._lock:
            if not self._fits(amount):
                return False
            self.events.append((time.monotonic(), amount))
            self.total += amount
            return True

    def spent(self) -> bool:
        """Whether the next `take(1)` would fail, without taking."""
        with self._lock:
            return not self._fits(1)

    def _fits(self, amount: int) -> bool:
        now = time.monotonic()
        while self.events and now - self.events[0][0] > 60:
            self.total -= self.events.popleft()[1]
        return self.total + amount <= self.limit


@dataclass(frozen=True)
class Refusal:
    """A reported connect that the destination alone refuses (see `Decision.at_connect`): refused at
    connect(), before the connection opens, instead of looking open and then closing."""

    destination: IPAddress
    port: int
    name: str | None  # the name a synthetic address stands for
    reason: str


class Decision:
    """One sandbox's rules and budgets, and the judgements made with them."""

    def __init__(self, rules: Rules, upstream: Upstream) -> None:
        self.rules = rules
        self.upstream = upstream
        self.connections = Budget(rules.limits.connections_per_minute)
        self.bytes_out = Budget(rules.limits.bytes_out_per_minute)

    def admit(self, name: str | None, dest: IPAddress, *, take: bool) -> str | None:
        """Why a connection to `dest` (standing for `name`, if a synthetic address does) is refused
        before its destination is even judged, or None. `take` counts it against the connection
        budget; without, the budget is only looked at (a parked connect, counted once refused)."""
        spent = not self.connections.take() if take else self.connections.spent()
        if spent:
            return f"over {self.connections.limit} connections per minute"
        if name is None and dest in SYNTHETIC:
            return f"{dest} is not an address corral's resolver gave out"
        return None

    def resolves_here(self, name: str, port: int) -> bool:
        """Whether `name` port `port` is decided without asking any resolver: a name in the policy's
        `hosts`, or one no rule allows on that port (refused without a lookup, so nothing about it
        leaves the host)."""
        return name in self.rules.hosts or self.rules.rule_for_name(name, port) is None

    def _without_lookup(self, name: str | None, dest: IPAddress, port: int) -> Verdict | None:
        """The verdict on the destination when no resolver is asked (an address, or a name decided
        here); None when the name must be resolved first."""
        if name is None:
            return self.rules.check_address(dest, port)
        if self.resolves_here(name, port):
            return self.rules.check_name(name, port, [])
        return None

    async def destination(self, name: str | None, dest: IPAddress, port: int) -> Verdict:
        """The verdict on the destination, before anything is read from the client."""
        verdict = self._without_lookup(name, dest, port)
        if verdict is not None:
            return verdict
        assert name is not None
        return self.rules.check_name(name, port, await self.upstream.resolve(name))

    def at_connect(self, name: str | None, dest: IPAddress, port: int) -> Refusal | None:
        """A connect the sandbox's seccomp filter reported, judged while the caller is parked: a
        `Refusal` when the destination alone decides against it, None when the proxy must decide
        (a name to resolve, the protocol to read). The same checks, in the same order, as the proxy's
        first ones (`admit`, `destination`), and nothing taken from any budget."""
        reason = self.admit(name, dest, take=False)
        if reason is None:
            verdict = self._without_lookup(name, dest, port)
            if verdict is None or verdict.allowed:
                return None
            reason = verdict.reason
        return Refusal(dest, port, name, reason)

    def recheck(
        self, name: str | None, dest: IPAddress, address: IPAddress | None, port: int, protocol: str
    ) -> str | None:
        """Why the rules in force now refuse a connection judged under earlier ones (another network
        phase), or None: the same destination checks, on the address that was checked and dialled (no
        new lookup), and its protocol as far as it is known (one still unknown under a rule for any
        protocol counts as unknown, so a stricter rule cuts it)."""
        if name is not None:
            verdict = self.rules.check_name(name, port, [] if address is None else [address])
        else:
            verdict = self.rules.check_address(address or dest, port)
        if not verdict.allowed:
            return verdict.reason
        assert verdict.rule is not None
        allowed = verdict.rule.protocols
        if "any" not in allowed and protocol not in allowed:
            return f"{protocol} to {name or dest} port {port} is not allowed (allowed: {', '.join(allowed)})"
        return None

    def protocol(
        self, verdict: Verdict, name: str | None, dest: IPAddress, port: int, seen: sniff.Sniffed
    ) -> Verdict:
        """The verdict once the first bytes are in: the rule's protocols, Stratum never, and SNI or
        Host against the name connected to."""
        if verdict.rule is None:
            return verdict
        allowed = verdict.rule.protocols
        where = name or str(dest)
        if seen.protocol == "stratum":
            return Verdict(False, f"mining protocol (Stratum) to {where}", verdict.rule)
        if "any" not in allowed and seen.protocol not in allowed:
            listed = ", ".join(allowed)
            return Verdict(
                False,
                f"{seen.protocol} to {where} port {port} is not allowed (allowed: {listed})",
                verdict.rule,
            )
        if name is not None and seen.protocol in ("tls", "http") and seen.name != name:
            what = "TLS server name" if seen.protocol == "tls" else "HTTP Host"
            return Verdict(
                False, f"{what} {seen.name!r} does not match the name connected to, {name}", verdict.rule
            )
        return verdict
