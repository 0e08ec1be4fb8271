"""The event schema. Every event has `v` (schema version), `time` (RFC 3339, UTC), `sandbox` and
`type`; the other fields depend on the type. Adding a field is backwards compatible; renaming or
removing one bumps SCHEMA_VERSION. docs/events.md describes each type; `corral events schema` prints
the JSON Schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1


def now() -> datetime:
    return datetime.now(UTC)


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = SCHEMA_VERSION
    time: datetime = Field(default_factory=now, description="when it happened, RFC 3339 UTC")
    sandbox: str = Field(description="the sandbox's id")


class ProcessRef(BaseModel):
    """A process, as seen from the host (the agent can't forge these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(description="pid on the host")
    ns_pid: int | None = Field(None, description="pid inside the sandbox")
    exe: str | None = Field(None, description="executable path inside the sandbox")
    cmdline: list[str] = Field(default_factory=list)
    started: datetime | None = None
    ppid: int | None = Field(None, description="parent's pid on the host")
    exec: int | None = Field(None, description="the command whose process tree it was born in")


class SandboxStart(_Base):
    type: Literal["sandbox.start"] = "sandbox.start"
    policy: str = Field(description="the policy's source file, or <policy>")
    cgroup_version: int
    uid: int = Field(description="the agent's uid (same inside and on the host)")
    limits: dict[str, float] = Field(
        description="memory/disk bytes, cpu cores, processes, timeout/lifetime s"
    )
    degraded: list[str] = Field(default_factory=list, description="protections the host could not apply")
    workspace: str = Field(description="host directory the workspace is saved to when the sandbox closes")
    labels: dict[str, str] = Field(
        default_factory=dict, description="what the caller labelled the sandbox with (run, episode, ...)"
    )
    phase: str | None = Field(None, description="the network phase it started in, if its policy has phases")


class SandboxStop(_Base):
    type: Literal["sandbox.stop"] = "sandbox.stop"
    reason: Literal["closed", "lifetime", "failed", "tripwire"]
    duration: float = Field(description="seconds since start")
    leftover: list[ProcessRef] = Field(default_factory=list, description="processes killed by the close")
    error: str = Field(
        "", description="what went wrong while closing (e.g. saving the workspace), if anything"
    )
    chain: str = Field(
        "",
        description="the hash of the sandbox's event chain up to this event: with this event's own "
        "hash, the sandbox's final hash in the audit store",
    )


class PhaseChange(_Base):
    """The caller switched the sandbox's network phase (`Sandbox.phase`): the egress rules of `phase`
    are in force from this event on. Connections the new phase does not allow follow it, cut."""

    type: Literal["phase"] = "phase"
    previous: str | None = Field(description="the phase left")
    phase: str = Field(description="the phase entered")
    exec: int | None = Field(None, description="the command running at the switch, if any")


class SandboxLabel(_Base):
    """Labels given to a running sandbox after its start (a pool hands out a sandbox it started
    ahead, and its episode's labels arrive then). Labels are only ever added: a key once set keeps
    its value, so a sandbox is never filed under two episodes."""

    type: Literal["sandbox.label"] = "sandbox.label"
    labels: dict[str, str] = Field(description="the labels added (the sandbox's labels are now all of them)")


class ExecStart(_Base):
    type: Literal["exec.start"] = "exec.start"
    exec: int = Field(description="command number within the sandbox")
    command: list[str]


class ExecExit(_Base):
    type: Literal["exec.exit"] = "exec.exit"
    exec: int
    exit_code: int = Field(description="the command's status; 128+N when killed by signal N")
    signal: int | None = None
    duration: float = Field(description="wall seconds")
    cpu_seconds: float = Field(description="user+system CPU of the command and the children it waited for")
    peak_memory: int = Field(description="bytes: the sandbox's peak memory while the command ran")
    timed_out: bool = False
    leftover: list[ProcessRef] = Field(
        default_factory=list,
        description="processes the command started that were still running when it returned",
    )


class Deny(_Base):
    type: Literal["deny"] = "deny"
    layer: Literal[
        "seccomp", "landlock", "unix", "cgroup", "storage", "timeout", "lifetime", "egress", "dns", "output"
    ]
    what: str = Field(
        description="the refused syscall, the UNIX socket's path, the destination (name or address and "
        "port), or the budget: memory, processes, disk, timeout, lifetime, output, bytes_out, names"
    )
    exec: int | None = Field(None, description="the command running when it happened, if any")
    process: ProcessRef | None = None
    detail: str = ""
    count: int = Field(
        1, ge=1, description="how many identical denials this event stands for (repeats are aggregated)"
    )
    first: datetime | None = Field(None, description="when the first of `count` repeats happened")
    last: datetime | None = Field(None, description="when the last of `count` repeats happened")


class NetConnect(_Base):
    """A TCP connection the sandbox opened, as the egress proxy saw it (emitted when it ends)."""

    type: Literal["net.connect"] = "net.connect"
    destination: str = Field(description="the address the program connected to (a synthetic one for names)")
    port: int
    name: str | None = Field(None, description="the DNS name it asked for, or the CONNECT target")
    address: str | None = Field(None, description="the checked address corral connected to, if it did")
    protocol: str = Field(description="tls, http, ssh, stratum or unknown, from the first bytes")
    sni: str | None = Field(None, description="TLS server name or HTTP Host the client sent")
    decision: Literal["allow", "deny"]
    reason: str
    via: Literal["transparent", "proxy"] = Field(description="caught in flight, or through HTTP(S)_PROXY")
    bytes_out: int = 0
    bytes_in: int = 0
    duration: float = 0.0
    exec: int | None = None
    process: ProcessRef | None = None


class DnsQuery(_Base):
    type: Literal["dns.query"] = "dns.query"
    name: str
    qtype: str = Field(description="A, AAAA, TXT, ...")
    decision: Literal["allow", "deny"]
    answer: list[str] = Field(default_factory=list, description="addresses returned (synthetic, see docs)")
    exec: int | None = None
    process: ProcessRef | None = None


class ProcExec(_Base):
    """A program started in the sandbox, seen on the host at execve before it ran (every one, however
    short-lived)."""

    type: Literal["proc.exec"] = "proc.exec"
    process: ProcessRef
    cwd: str | None = Field(None, description="working directory inside the sandbox")
    stdio: list[str] = Field(
        default_factory=list, description="what fds 0-2 were: socket, pipe, tty, file, null or other"
    )
    exec: int | None = Field(None, description="the command it belongs to")
    loader: list[str] | None = Field(
        None,
        description="started through the dynamic loader (ld.so PROGRAM): the loader's path and the "
        "options before PROGRAM; `process` is then PROGRAM",
    )


class ProcSeccomp(_Base):
    """A program installed a seccomp filter of its own (let through; one asking for a listener is
    refused and a `deny`). Calls that filter refuses fail without reaching corral, unrecorded."""

    type: Literal["proc.seccomp"] = "proc.seccomp"
    process: ProcessRef | None = None
    how: str = Field(description="prctl, or the seccomp(2) flags, e.g. flags 0x0")
    exec: int | None = Field(None, description="the command it belongs to")


class ProcExit(_Base):
    type: Literal["proc.exit"] = "proc.exit"
    pid: int = Field(description="host pid")
    exit_code: int | None = Field(None, description="its status, when known; 128+N when killed by signal N")
    duration: float | None = Field(None, description="seconds it ran, when known")
    exec: int | None = None
    cmdline: list[str] = Field(default_factory=list)


class ProcessUsage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int
    cmdline: list[str] = Field(default_factory=list)
    cpu: float = Field(description="cores used over the interval")
    rss: int = Field(description="resident bytes")
    exec: int | None = None


class GpuUsage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    pid: int
    memory: int | None = Field(None, description="bytes of GPU memory held")
    sm: float | None = Field(None, description="percent of the GPU's multiprocessors kept busy")


class ResourceSample(_Base):
    """The sandbox's use of CPU, memory and GPUs, recorded every few seconds while processes run."""

    type: Literal["resource.sample"] = "resource.sample"
    cpu: float = Field(description="cores used by the whole sandbox over the last interval")
    memory: int = Field(description="bytes charged to the sandbox")
    processes: int
    top: list[ProcessUsage] = Field(default_factory=list, description="the busiest processes")
    gpu: list[GpuUsage] = Field(default_factory=list)
    exec: int | None = None


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    processes: list[ProcessRef] = Field(
        default_factory=list, description="the process, its ancestors (oldest last) and its children"
    )
    connections: list[dict[str, Any]] = Field(
        default_factory=list, description="its recent connections (net.connect fields)"
    )
    trigger: dict[str, Any] = Field(default_factory=dict, description="what the rule fired on")
    related: list[dict[str, Any]] = Field(
        default_factory=list, description="for rate and window rules, the other observations counted"
    )


class AlertTags(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mitre: list[str] = Field(default_factory=list, description="MITRE ATT&CK technique ids")
    owasp: list[str] = Field(default_factory=list, description="OWASP Top 10 for Agentic Applications ids")


AlertCategory = Literal[
    "mining",
    "tunnel",
    "reverse_shell",
    "probe",
    "exfiltration",
    "lingering",
    "tamper",
    "privilege",
    "resource",
]
Severity = Literal["critical", "high", "medium", "low", "info"]
Response = Literal["log", "alert", "kill", "freeze", "terminate"]


class Alert(_Base):
    """A rule fired. `action` is the response taken, `outcome` what it achieved."""

    type: Literal["alert"] = "alert"
    rule: str
    category: AlertCategory
    severity: Severity
    action: Response
    outcome: str = Field(description="what the action did, e.g. 'killed 2 processes'")
    message: str
    exec: int | None = None
    process: ProcessRef | None = None
    evidence: Evidence = Evidence()
    tags: AlertTags = AlertTags()


Event = Annotated[
    SandboxStart
    | SandboxStop
    | PhaseChange
    | SandboxLabel
    | ExecStart
    | ExecExit
    | Deny
    | NetConnect
    | DnsQuery
    | ProcExec
    | ProcSeccomp
    | ProcExit
    | ResourceSample
    | Alert,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(Event)


def parse_event(data: dict[str, Any] | str) -> Any:
    return _adapter.validate_json(data) if isinstance(data, str) else _adapter.validate_python(data)


def event_json_schema() -> dict[str, Any]:
    schema: dict[str, Any] = _adapter.json_schema()
    schema["title"] = f"corral event (schema version {SCHEMA_VERSION})"
    return schema
