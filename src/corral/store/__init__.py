"""The audit store: every event of every sandbox, hash-chained, on the host."""

from corral.store.records import SEVERITIES, SandboxInfo, StoredEvent

__all__ = ["SEVERITIES", "SandboxInfo", "StoredEvent"]
