"""What the audit store gives back: a sandbox with its labels and chain head, and events as they
were stored (the JSON the sandbox emitted, parsed, with its place in the sandbox's chain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SEVERITIES = ("critical", "high", "medium", "low", "info")  # worst first


@dataclass(frozen=True)
class StoredEvent:
    sandbox: str
    seq: int  # 1, 2, ... within the sandbox; the chain's order
    time: datetime
    type: str
    body: dict[str, Any]  # the event's JSON (corral.events schema), as emitted
    hash: str = ""  # sha256 of the previous event's hash and this body, hex
    n: int = 0  # the store's cursor: larger for every later commit (for following the store)


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    started: datetime
    stopped: datetime | None = None  # None: still running, or its supervisor died (see `cut`)
    stop_reason: str | None = None  # sandbox.stop's reason: closed, lifetime, failed, tripwire
    policy: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    host: str = ""  # the writing host's id (its signing key's fingerprint)
    writer_pid: int = 0  # the process that wrote it
    events: int = 0  # events committed
    head: str = ""  # hash of the last committed event
    alerts: int = 0
    worst: str | None = None  # the worst alert severity, None when clean
    categories: dict[str, int] = field(default_factory=dict)  # alerts by category

    @property
    def verdict(self) -> str:
        """'clean', or the worst alert severity ('critical', 'high', ...)."""
        return self.worst or "clean"
