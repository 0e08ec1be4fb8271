"""corral: permission-scoped Linux sandboxes for AI agents.

Users import from here; everything else is private and may change. Names are loaded on first use,
so corral's small helper processes (the zygote that forks sandboxes) can import the isolation code
without pulling in pydantic and the rest of the library.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from corral._errors import (
        CorralError,
        ExecError,
        HostError,
        PolicyError,
        PoolError,
        SandboxClosedError,
        SandboxError,
        SandboxStartError,
        StoreError,
        TrajectoryError,
    )
    from corral.events import (
        SCHEMA_VERSION,
        Alert,
        Deny,
        ExecExit,
        ExecStart,
        PhaseChange,
        ProcessRef,
        ProcExec,
        ProcExit,
        ProcSeccomp,
        ResourceSample,
        SandboxLabel,
        SandboxStart,
        SandboxStop,
    )
    from corral.policy import Policy
    from corral.rl import Verdict
    from corral.runtime import AsyncSandbox, ExecResult, Host, HostState, Output, Pool, Sandbox, State
    from corral.store import Filters, SandboxInfo, Store, StoredEvent

__version__ = "0.1.0"

_HOME = {
    "corral._errors": [
        "CorralError",
        "ExecError",
        "HostError",
        "PolicyError",
        "PoolError",
        "SandboxClosedError",
        "SandboxError",
        "SandboxStartError",
        "StoreError",
        "TrajectoryError",
    ],
    "corral.events": [
        "SCHEMA_VERSION",
        "Alert",
        "Deny",
        "ExecExit",
        "ExecStart",
        "PhaseChange",
        "ProcExec",
        "ProcExit",
        "ProcSeccomp",
        "ProcessRef",
        "ResourceSample",
        "SandboxLabel",
        "SandboxStart",
        "SandboxStop",
    ],
    "corral.policy": ["Policy"],
    "corral.rl": ["Verdict"],
    "corral.runtime": [
        "AsyncSandbox",
        "ExecResult",
        "Host",
        "HostState",
        "Output",
        "Pool",
        "Sandbox",
        "State",
    ],
    "corral.store": ["Filters", "SandboxInfo", "Store", "StoredEvent"],
}
_WHERE = {name: module for module, names in _HOME.items() for name in names}

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "AsyncSandbox",
    "CorralError",
    "Deny",
    "ExecError",
    "ExecExit",
    "ExecResult",
    "ExecStart",
    "Filters",
    "Host",
    "HostError",
    "HostState",
    "Output",
    "PhaseChange",
    "Policy",
    "PolicyError",
    "Pool",
    "PoolError",
    "ProcExec",
    "ProcExit",
    "ProcSeccomp",
    "ProcessRef",
    "ResourceSample",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxInfo",
    "SandboxLabel",
    "SandboxStart",
    "SandboxStartError",
    "SandboxStop",
    "State",
    "Store",
    "StoreError",
    "StoredEvent",
    "TrajectoryError",
    "Verdict",
    "__version__",
]


def __getattr__(name: str) -> _typing.Any:
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
