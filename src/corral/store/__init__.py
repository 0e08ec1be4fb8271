"""The audit store: every event of every sandbox, hash-chained, on the host (see `chain` for what
it proves, `writer` for when events are committed, `verify` for the check)."""

from corral.store._store import Filters, Store
from corral.store.records import SEVERITIES, SandboxInfo, StoredEvent
from corral.store.verify import Finding, Verification, verify

__all__ = [
    "SEVERITIES",
    "Filters",
    "Finding",
    "SandboxInfo",
    "Store",
    "StoredEvent",
    "Verification",
    "verify",
]
