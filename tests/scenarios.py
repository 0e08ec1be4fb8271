"""The tripwire scenario corpus (`scenarios/`): loading, validating and running one scenario.

A scenario is a directory holding `scenario.yaml` (format: scenarios/README.md) and the files its steps
use. Running one starts the local stand-in servers it names (tests/servers.py), maps the fixed name and
port the sandbox dials for each onto the server's real loopback port, opens a sandbox whose workspace is a
copy of the scenario's files, runs the steps one after another, closes the sandbox and stops the servers.
The result keeps everything a test asserts on: the events, the exec results, what each server received
and, through `ScenarioResult.alerts`, the alerts the tripwires raised.

    scenario = load(SCENARIOS / "attack-bash-dev-tcp")
    result = run(scenario, tmp_path)
    problems = check_evidence(result, scenario.expect)

Nothing here reaches beyond loopback: every name a scenario uses is answered by the sandbox's resolver,
and the proxy's upstream (`LocalUpstream`) connects only to the local servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from corral import ExecResult, Host, Policy, PolicyError, Sandbox, SandboxClosedError
from corral.events import Deny, DnsQuery, NetConnect, SandboxStop
from corral.events.model import AlertCategory
from servers import (
    HOST,
    HOST_KEY_ALIAS,
    HttpServer,
    LocalUpstream,
    PackageIndex,
    SshServer,
    StratumPool,
    TcpListener,
    TlsServer,
    http_server,
    package_index,
    ssh_server,
    stratum_pool,
    tcp_listener,
    tls_server,
)

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
SCENARIO_FILE = "scenario.yaml"
# Responses that stop something (see `stopped`).
STOPPING_ACTIONS = frozenset({"kill", "freeze", "terminate"})
# Where the runner puts what a scenario needs to talk to its servers (ssh keys, CA certificates).
STANDIN_DIR = ".standin"
# Every scenario's policy is merged into this one; the scenario says only what differs.
BASE_POLICY: dict[str, Any] = {"version": 1}

# Alert categories: the event schema's own.
Category = AlertCategory
CATEGORIES: tuple[str, ...] = get_args(Category)
ServerType = Literal[
    "stratum_pool", "ssh_server", "tcp_listener", "http_server", "package_index", "tls_server"
]

_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class ScenarioError(ValueError):
    """A scenario file is wrong; one line per problem, each ``FILE: KEY: what is wrong``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _size(value: Any) -> int:
    """A byte count: an int, or a string such as "8MiB" (the policy's binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a size; use e.g. 4096 or 8MiB")


# --------------------------------------------------------------------------------------------------
# The format (documented in scenarios/README.md)


class _Model(BaseModel):
    # A misspelt key must be an error, not a silently ignored expectation.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSpec(_Model):
    type: ServerType
    host: str = Field(description="the name the sandbox dials, e.g. pool.example.internal")
    port: int = Field(ge=1, le=65535, description="the port the sandbox dials")
    greeting: str = Field("", description="tcp_listener only: sent to each client on accept")

    @field_validator("host")
    @classmethod
    def _example_name(cls, host: str) -> str:
        # The test-safety rule, enforced: a scenario can only name hosts that never exist outside tests.
        if not host.endswith(".example.internal"):
            raise ValueError(f"{host!r} is not under example.internal")
        return host


class Step(_Model):
    run: str = Field(description="shell command, run with /bin/sh -c in /workspace")
    timeout: float = Field(60.0, gt=0, description="seconds before the command is killed")
    wait: float = Field(0.0, ge=0, description="seconds to wait after the command returned")
    exit: int | None = Field(None, description="expected exit code; None: any")
    contains: tuple[str, ...] = Field((), description="text the output (stdout + stderr) must contain")
    leftover: bool | None = Field(None, description="whether the command must leave processes running")


class ConnectMatch(_Model):
    """Matches a net.connect event whose given fields all equal these (exe: the process's executable)."""

    name: str | None = None
    destination: str | None = None
    port: int | None = None
    protocol: str | None = None
    decision: Literal["allow", "deny"] | None = None
    via: Literal["transparent", "proxy"] | None = None
    exe: str | None = None


class DnsCount(_Model):
    suffix: str = Field(description="counts queries for this name or names under it")
    qtype: str | None = Field(None, description="only queries of this type (A, TXT, ...)")
    min: int = Field(1, ge=1, description="at least this many such queries")


class Received(_Model):
    """What a stand-in server got (stratum: lines; listener: bytes; HTTP: request lines and bodies; ssh:
    sshd's log)."""

    contains: tuple[str, ...] = ()
    min_bytes: Annotated[int, Field(ge=0)] | None = None
    max_bytes: Annotated[int, Field(ge=0)] | None = None

    @field_validator("min_bytes", "max_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return None if value is None else _size(value)


class OutputMatch(_Model):
    step: int = Field(ge=0, description="index of the step, from 0")
    contains: tuple[str, ...]


class Evidence(_Model):
    connects: tuple[ConnectMatch, ...] = ()
    denied: tuple[str, ...] = Field((), description="the `what` of deny events (any layer)")
    dns: tuple[DnsCount, ...] = ()
    received: dict[str, Received] = {}
    output: tuple[OutputMatch, ...] = ()


class Verdict(_Model):
    fire: tuple[Category, ...] = ()
    quiet: tuple[Category, ...] | Literal["all"] = ()

    @property
    def quiet_categories(self) -> tuple[str, ...]:
        return CATEGORIES if self.quiet == "all" else self.quiet


class Scenario(_Model):
    name: str = Field(description="the directory's name (set by `load`, not written in the file)")
    directory: Path = Field(description="set by `load`")
    description: str
    kind: Literal["attack", "benign"]
    policy: dict[str, Any] = {}
    servers: dict[str, ServerSpec] = {}
    include: tuple[str, ...] = Field((), description="paths under scenarios/ also copied into /workspace")
    steps: tuple[Step, ...] = Field(min_length=1)
    expect: Evidence = Evidence()
    verdict: Verdict

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        v = self.verdict
        if self.kind == "benign" and (v.fire or v.quiet != "all"):
            raise ValueError("verdict: a benign scenario must have no fire and quiet: all")
        if self.kind == "attack" and not v.fire:
            raise ValueError("verdict.fire: an attack must name the categories it fires")
        if both := sorted(set(v.fire) & set(v.quiet_categories)):
            raise ValueError(f"verdict: {', '.join(both)} both in fire and quiet")
        ports = [s.port for s in self.servers.values()]
        # LocalUpstream maps by port alone, so two servers on one port would be ambiguous.
        if len(ports) != len(set(ports)):
            raise ValueError("servers: two servers use the same port")
        for key in self.expect.received:
            if key not in self.servers:
                raise ValueError(f"expect.received.{key}: no such server")
        for o in self.expect.output:
            if o.step >= len(self.steps):
                raise ValueError(f"expect.output: step {o.step} does not exist")
        return self


# --------------------------------------------------------------------------------------------------
# Loading


def _location(loc: tuple[int | str, ...]) -> str:
    """steps[0].wait, as the policy's own errors spell keys."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return f"{text}: " if text else ""  # a check across keys names its keys in the message


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key; see scenarios/README.md"
    if err["type"] == "missing":
        return "missing"
    return err["msg"].removeprefix("Value error, ")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys: plain YAML lets the last one win, which would silently drop an
    expectation written twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(directory: Path) -> Scenario:
    """The scenario in `directory`; ScenarioError naming the file and key of every problem."""
    path = directory / SCENARIO_FILE
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        line = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ScenarioError([f"{path}: {line}{e.problem or e.context}"]) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ScenarioError([f"{path}: cannot read: {e}"]) from None
    if not isinstance(data, dict):
        raise ScenarioError([f"{path}: expected a mapping of keys, got {type(data).__name__}"])
    for key in ("name", "directory"):
        if key in data:
            raise ScenarioError([f"{path}: {key}: set from the directory; remove it"])
    try:
        scenario = Scenario.model_validate({**data, "name": directory.name, "directory": directory})
    except ValidationError as e:
        raise ScenarioError(
            [f"{path}: {_location(err['loc'])}{_message(err)}" for err in e.errors(include_url=False)]
        ) from None
    problems = [
        f"{path}: include: {inc} does not exist under {SCENARIOS}"
        for inc in scenario.include
        if not (SCENARIOS / inc).exists() or ".." in Path(inc).parts
    ]
    try:
        build_policy(scenario)
    except PolicyError as e:
        problems.extend(e.problems)
    if problems:
        raise ScenarioError(problems)
    return scenario


def scenario_dirs(root: Path = SCENARIOS) -> list[Path]:
    """Every scenario directory (those starting with _ hold shared files, not scenarios)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def load_all(root: Path = SCENARIOS) -> list[Scenario]:
    return [load(d) for d in scenario_dirs(root)]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base`, mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_policy(scenario: Scenario, *, alert_only: bool = False) -> Policy:
    """BASE_POLICY, the scenario's policy over it, and its servers' names answered with 127.0.0.1.

    `resources.cpu: host` means every core of this host (a benign all-cores job must not be throttled, and
    the core count differs between machines). `alert_only` sets every category's response to `alert`:
    the tripwires still raise their alerts but stop nothing, so the attack runs its course."""
    data = _merge(BASE_POLICY, scenario.policy)
    if alert_only:
        data = _merge(data, {"tripwires": {"responses": dict.fromkeys(CATEGORIES, "alert")}})
    hosts = {spec.host: HOST for spec in scenario.servers.values()}
    data = _merge(data, {"network": {"hosts": {**hosts, **data.get("network", {}).get("hosts", {})}}})
    if data.get("resources", {}).get("cpu") == "host":
        data = _merge(data, {"resources": {"cpu": float(os.cpu_count() or 1)}})
    return Policy.from_dict(data, source=f"{scenario.directory / SCENARIO_FILE}: policy")


# --------------------------------------------------------------------------------------------------
# Running

Server = StratumPool | SshServer | TcpListener | HttpServer | PackageIndex | TlsServer


@dataclass
class ScenarioResult:
    scenario: Scenario
    sandbox: Sandbox  # closed by the time the result is returned; its events stay readable
    execs: list[ExecResult]  # one per step that ran, in order (fewer when the sandbox was closed under them)
    events: list[Any]  # the sandbox's events, taken after it closed
    received: dict[str, bytes]  # server key -> what it received (see `Received`)
    duration: float  # wall seconds, from starting the servers to stopping them

    @property
    def alerts(self) -> list[Any]:
        """The `alert` events the tripwires raised (each with category, rule, action, severity)."""
        return list(self.sandbox.alerts())

    def output(self, step: int) -> str:
        """The step's stdout and stderr; empty when it never ran."""
        if step >= len(self.execs):
            return ""
        r = self.execs[step]
        # Steps run with text=True; the decode keeps the type checker honest about ExecResult's bytes | str.
        return "".join(x if isinstance(x, str) else x.decode(errors="replace") for x in (r.stdout, r.stderr))

    @property
    def stop_reason(self) -> str | None:
        """Why the sandbox stopped (closed, lifetime, failed, tripwire), from its sandbox.stop event."""
        stops = [e.reason for e in self.events if isinstance(e, SandboxStop)]
        return stops[-1] if stops else None


def _start(spec: ServerSpec, key: str, stack: contextlib.ExitStack, tmp: Path) -> Server:
    if spec.type == "stratum_pool":
        return stack.enter_context(stratum_pool())
    if spec.type == "ssh_server":
        return stack.enter_context(ssh_server(tmp / f"sshd-{key}"))
    if spec.type == "tcp_listener":
        return stack.enter_context(tcp_listener(spec.greeting.encode()))
    if spec.type == "http_server":
        return stack.enter_context(http_server())
    if spec.type == "package_index":
        return stack.enter_context(package_index(tmp / f"index-{key}"))
    return stack.enter_context(tls_server(spec.host))


def _client_files(spec: ServerSpec, server: Server, into: Path) -> None:
    """What a client in the sandbox needs to trust and log in to `server`, under `into`."""
    if isinstance(server, SshServer):
        into.mkdir(parents=True)
        key = into / "key"
        shutil.copyfile(server.client_key, key)
        key.chmod(0o600)  # ssh refuses a private key others can read
        shutil.copyfile(server.known_hosts, into / "known_hosts")
        workspace_dir = f"/workspace/{into.relative_to(into.parent.parent)}"
        # `ssh -F .standin/<key>/config <host>` then needs no other option.
        (into / "config").write_text(
            f"Host {spec.host}\n"
            f"  Port {spec.port}\n"
            f"  User {server.user}\n"
            f"  IdentityFile {workspace_dir}/key\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {workspace_dir}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n"
            f"  HostKeyAlias {HOST_KEY_ALIAS}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 10\n"
        )
    elif isinstance(server, TlsServer):
        into.mkdir(parents=True)
        shutil.copyfile(server.cafile, into / "ca.pem")


def _received(server: Server) -> bytes:
    if isinstance(server, StratumPool):
        return "".join(line + "\n" for line in server.lines).encode()
    if isinstance(server, TcpListener):
        return server.received
    if isinstance(server, SshServer):
        return "".join(line + "\n" for line in server.log).encode()
    return b"".join(f"{r.method} {r.path}\n".encode() + r.body for r in server.requests)


def _workspace(scenario: Scenario, into: Path) -> None:
    """The scenario's files (not scenario.yaml: it names what is being tested, which no agent's workspace
    would hold and which a content scan must not trip over) plus its includes."""
    shutil.copytree(scenario.directory, into, ignore=shutil.ignore_patterns(SCENARIO_FILE, "__pycache__"))
    for inc in scenario.include:
        src = SCENARIOS / inc
        if src.is_dir():
            shutil.copytree(src, into / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, into / src.name)


def run(
    scenario: Scenario,
    tmp: Path,
    *,
    alert_only: bool = False,
    host: Host | None = None,
    labels: dict[str, str] | None = None,
) -> ScenarioResult:
    """Run `scenario` with its servers; `tmp` is an empty scratch directory the caller removes.

    `alert_only`: the tripwires raise alerts but take no other action (see `build_policy`). `host`,
    `labels`: the Host to run on (default: the process's) and the sandbox's labels (the dashboard's
    tests record scenarios into a store of their own, by run and episode)."""
    started = time.monotonic()
    workspace = tmp / "workspace"
    _workspace(scenario, workspace)
    execs: list[ExecResult] = []
    servers: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:
        for key, spec in scenario.servers.items():
            servers[key] = _start(spec, key, stack, tmp)
            _client_files(spec, servers[key], workspace / STANDIN_DIR / key)
        upstream = LocalUpstream({spec.port: servers[key].port for key, spec in scenario.servers.items()})
        # The workspace copy is written back at close, which is why the scenario directory itself is
        # never handed to the sandbox.
        sb = Sandbox(
            build_policy(scenario, alert_only=alert_only),
            workspace=workspace,
            upstream=upstream,
            host=host,
            labels=labels,
        )
        try:
            for step in scenario.steps:
                try:
                    execs.append(sb.exec(step.run, timeout=step.timeout, text=True))
                except SandboxClosedError:
                    break  # a `terminate` response closed the sandbox: the remaining steps cannot run
                if step.wait:
                    time.sleep(step.wait)  # for detectors of what outlives a command
        finally:
            sb.close()
    # The servers are stopped and their threads joined: what they recorded is complete.
    return ScenarioResult(
        scenario=scenario,
        sandbox=sb,
        execs=execs,
        events=sb.events(),
        received={key: _received(server) for key, server in servers.items()},
        duration=time.monotonic() - started,
    )


# --------------------------------------------------------------------------------------------------
# Checking


def _connect_matches(event: NetConnect, m: ConnectMatch) -> bool:
    wanted = m.model_dump(exclude_none=True)
    exe = wanted.pop("exe", None)
    if exe is not None and (event.process is None or event.process.exe != exe):
        return False
    return all(getattr(event, field) == value for field, value in wanted.items())


def _in_zone(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def check_steps(result: ScenarioResult) -> list[str]:
    """Problems with the steps' own expectations (exit code, output, leftover processes)."""
    problems: list[str] = []
    steps = result.scenario.steps
    if len(result.execs) < len(steps) and result.stop_reason != "tripwire":
        problems.append(
            f"only {len(result.execs)} of {len(steps)} steps ran; the sandbox stopped: {result.stop_reason}"
        )
    for i, (step, r) in enumerate(zip(steps, result.execs, strict=False)):
        shown = f"step {i} ({step.run[:60]!r}): exit {r.exit_code}, output {result.output(i)[-2000:]!r}"
        if step.exit is not None and r.exit_code != step.exit:
            problems.append(f"expected exit {step.exit}; {shown}")
        problems += [
            f"output lacks {text!r}; {shown}" for text in step.contains if text not in result.output(i)
        ]
        if step.leftover is not None and bool(r.leftover) != step.leftover:
            left = [p.cmdline for p in r.leftover]
            problems.append(f"expected leftover={step.leftover}, got {left}; {shown}")
    return problems


def check_evidence(result: ScenarioResult, evidence: Evidence) -> list[str]:
    """Problems: each item of `evidence` that the result does not show."""
    problems: list[str] = []
    connects = [e for e in result.events if isinstance(e, NetConnect)]
    for m in evidence.connects:
        if not any(_connect_matches(e, m) for e in connects):
            seen = [(e.name, e.destination, e.port, e.protocol, e.decision) for e in connects]
            problems.append(f"no net.connect matching {m.model_dump(exclude_none=True)}; saw {seen}")
    denied = {e.what for e in result.events if isinstance(e, Deny)}
    problems += [
        f"no deny event for {what!r}; saw {sorted(denied)}" for what in evidence.denied if what not in denied
    ]
    queries = [e for e in result.events if isinstance(e, DnsQuery)]
    for d in evidence.dns:
        n = sum(1 for q in queries if _in_zone(q.name, d.suffix) and d.qtype in (None, q.qtype))
        if n < d.min:
            problems.append(f"{n} {d.qtype or ''} queries under {d.suffix}, expected at least {d.min}")
    for key, want in evidence.received.items():
        got = result.received[key]
        problems += [f"server {key} never received {t!r}" for t in want.contains if t.encode() not in got]
        if want.min_bytes is not None and len(got) < want.min_bytes:
            problems.append(f"server {key} received {len(got)} bytes, expected at least {want.min_bytes}")
        if want.max_bytes is not None and len(got) > want.max_bytes:
            problems.append(f"server {key} received {len(got)} bytes, expected at most {want.max_bytes}")
    for o in evidence.output:
        text = result.output(o.step)
        problems += [
            f"step {o.step} output lacks {t!r}: {text[-2000:]!r}" for t in o.contains if t not in text
        ]
    return problems


def stopped(result: ScenarioResult) -> list[str]:
    """The stopping responses (kill, freeze, terminate) the tripwires took, as "rule: action"."""
    return [f"{a.rule}: {a.action}" for a in result.alerts if a.action in STOPPING_ACTIONS]
