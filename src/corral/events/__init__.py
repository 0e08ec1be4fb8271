"""corral's event stream: one schema (versioned), JSON lines on disk."""

from corral.events.model import (
    SCHEMA_VERSION,
    Deny,
    DnsQuery,
    Event,
    ExecExit,
    ExecStart,
    NetConnect,
    ProcessRef,
    SandboxStart,
    SandboxStop,
    event_json_schema,
    parse_event,
)
from corral.events.sink import JsonlSink

__all__ = [
    "SCHEMA_VERSION",
    "Deny",
    "DnsQuery",
    "Event",
    "ExecExit",
    "ExecStart",
    "JsonlSink",
    "NetConnect",
    "ProcessRef",
    "SandboxStart",
    "SandboxStop",
    "event_json_schema",
    "parse_event",
]
