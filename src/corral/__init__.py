"""corral: permission-scoped Linux sandboxes for AI agents.

Users import from here; everything else is private and may change.
"""

from corral._errors import (
    CorralError,
    ExecError,
    HostError,
    PolicyError,
    SandboxClosedError,
    SandboxError,
    SandboxStartError,
)
from corral.events import SCHEMA_VERSION, Deny, ExecExit, ExecStart, ProcessRef, SandboxStart, SandboxStop
from corral.policy import Policy
from corral.runtime import AsyncSandbox, ExecResult, Output, Sandbox

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "AsyncSandbox",
    "CorralError",
    "Deny",
    "ExecError",
    "ExecExit",
    "ExecResult",
    "ExecStart",
    "HostError",
    "Output",
    "Policy",
    "PolicyError",
    "ProcessRef",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxStart",
    "SandboxStartError",
    "SandboxStop",
    "__version__",
]
