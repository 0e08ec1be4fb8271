"""The report's records: frozen pydantic models, so a report is typed, can't be edited once built, and
`model_dump_json` is its JSON form. Every string that came from an event is kept as the event had it
(clipped in length, never rewritten): the renderers make it safe for the screen or the browser."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Frozen):
    """How much of a large event stream a report keeps, so building one from a run's million events
    takes bounded memory. What is left out is counted, never silently dropped."""

    timeline: int = Field(2000, ge=0, description="timeline entries kept (the first ones)")
    points: int = Field(500, ge=2, description="resource points kept per sandbox (downsampled)")
    processes: int = Field(5000, ge=0, description="process tree nodes kept in the whole report")
    connections_per_process: int = Field(20, ge=0, description="connections listed under one process")
    destinations: int = Field(10000, ge=0, description="distinct destinations counted")
    top_destinations: int = Field(20, ge=0, description="destinations listed, busiest first")
    messages: int = Field(5, ge=0, description="alert messages and outcomes quoted per category")
    text: int = Field(300, ge=16, description="characters kept of one string from an event")


class AlertGroup(_Frozen):
    """The alerts of one category: how many, how bad, which rules, and what was done about them."""

    category: str
    count: int
    worst: str = Field(description="the worst severity among them")
    rules: dict[str, int] = Field(description="rule name -> alerts it raised")
    actions: dict[str, int] = Field(description="response taken (log, alert, kill, ...) -> how often")
    outcomes: list[str] = Field(description="what the responses achieved (distinct, the first few)")
    messages: list[str] = Field(description="the first few alert messages")
    first: datetime | None = None
    last: datetime | None = None


class TimelineEntry(_Frozen):
    time: datetime
    sandbox: str
    kind: str = Field(description="the event's type: exec.start, net.connect, deny, alert, ...")
    summary: str = Field(description="one line; agent-controlled text in it is not yet escaped")
    exec: int | None = Field(None, description="the command it belongs to")
    denied: bool = Field(False, description="something was refused (a deny, a refused connection or query)")
    severity: str | None = Field(None, description="an alert's severity")


class Timeline(_Frozen):
    entries: list[TimelineEntry]
    omitted: dict[str, int] = Field(default_factory=dict, description="kind -> entries left out past the cap")

    @property
    def omitted_total(self) -> int:
        return sum(self.omitted.values())


class ProcessConnection(_Frozen):
    time: datetime
    destination: str = Field(description="the name asked for, or the address, with the port")
    decision: str
    protocol: str
    bytes_out: int = 0
    bytes_in: int = 0


class ProcessNode(_Frozen):
    """One process (one pid's life in one sandbox). A process that execs again keeps its node: `exe`
    and `cmdline` are its last image, `images` counts them."""

    sandbox: str
    pid: int = Field(description="host pid")
    ppid: int | None = Field(None, description="the parent's host pid")
    ns_pid: int | None = None
    exe: str | None = None
    cmdline: list[str] = Field(default_factory=list)
    exec: int | None = Field(None, description="the command it was born in")
    started: datetime | None = None
    exited: datetime | None = None
    exit_code: int | None = None
    images: int = Field(1, description="programs it ran (1 + execs after the first)")
    seen_exec: bool = Field(True, description="its proc.exec was seen (else known only from another event)")
    connections: list[ProcessConnection] = Field(default_factory=list)
    connections_omitted: int = 0
    alerts: list[str] = Field(default_factory=list, description="rules that fired on it")
    children: list[ProcessNode] = Field(default_factory=list)


class Destination(_Frozen):
    destination: str = Field(description="the name asked for, else the address")
    port: int
    count: int
    allowed: int
    denied: int
    bytes_out: int
    bytes_in: int
    protocols: list[str] = Field(description="protocols seen, first few")
    reason: str = Field("", description="why the first refused connection was refused")


class ResourcePoint(_Frozen):
    """Resource samples merged into one point: `cpu` the mean, the others their peak."""

    time: datetime = Field(description="the first sample's time")
    samples: int
    cpu: float = Field(description="cores, mean over the samples")
    cpu_peak: float = Field(description="cores, the highest sample")
    memory: int = Field(description="bytes, the highest sample")
    processes: int = Field(description="the highest sample")
    gpu_memory: int = Field(0, description="bytes of GPU memory held, summed over GPUs, the highest sample")
    gpu_sm: float = Field(0.0, description="percent of a GPU's multiprocessors busy, the highest")


class SandboxReport(_Frozen):
    id: str
    labels: dict[str, str] = Field(default_factory=dict)
    policy: str = ""
    started: datetime | None = None
    stopped: datetime | None = None
    stop_reason: str | None = None
    stop_error: str = ""
    limits: dict[str, float] = Field(default_factory=dict)
    degraded: list[str] = Field(default_factory=list)
    verdict: str = Field(description="'clean', or the worst alert severity")
    alerts: list[AlertGroup] = Field(default_factory=list)
    events: int = Field(0, description="events read for this sandbox")
    commands: int = 0
    failed_commands: int = Field(0, description="commands that exited non-zero")
    timed_out_commands: int = 0
    denials: dict[str, int] = Field(default_factory=dict, description="layer -> denials (repeats counted)")
    connections: int = 0
    connections_denied: int = 0
    dns_queries: int = 0
    dns_denied: int = 0
    processes: list[ProcessNode] = Field(default_factory=list, description="the process tree's roots")
    destinations: list[Destination] = Field(default_factory=list, description="busiest first")
    resources: list[ResourcePoint] = Field(default_factory=list)


class Report(_Frozen):
    title: str
    generated: datetime
    verdict: str = Field(description="'clean', or the worst alert severity of all sandboxes")
    verdicts: dict[str, int] = Field(description="verdict -> sandboxes with it")
    alerts: list[AlertGroup] = Field(description="all sandboxes' alerts by category")
    sandboxes: list[SandboxReport]
    timeline: Timeline
    destinations: list[Destination] = Field(description="all sandboxes' destinations, busiest first")
    events: int = Field(description="events read")
    processes_omitted: int = Field(0, description="processes left out of the trees past the cap")
    destinations_omitted: int = Field(0, description="connections to destinations past the cap, uncounted")
    limits: Limits = Limits()
