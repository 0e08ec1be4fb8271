"""The policy file format. Each field's description gives its default, unit and meaning: it is the reference
that docs/policy.md is generated from."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import posixpath
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from corral._sandbox_paths import SANDBOX_OWN
from corral.events.model import Response

from ._load import read_yaml, validate
from ._units import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    Unit,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    show_value,
)

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}]}
    ),
    Unit(format_size),
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}]}
    ),
    Unit(format_duration),
]


def _size_field(default: str, minimum: str, meaning: str) -> Any:
    return Field(
        parse_size(default),
        ge=parse_size(minimum),
        description=f"{meaning} A size: bytes, or a number with a unit (KiB, MiB, GiB, TiB; KB, MB, GB, TB). "
        f"Default: {default}; at least {minimum}.",
        examples=[default],
        # Shown to people as written, not as a count of bytes.
        json_schema_extra={"default": default},
    )


def _duration_field(default: str, meaning: str) -> Any:
    return Field(
        parse_duration(default),
        gt=0,
        description=f"{meaning} A duration: seconds, or a number with a unit (ms, s, m, h, d), "
        f"combinable as in 1h30m. Default: {default}; greater than 0.",
        examples=["30s", "10m", "2h"],
        json_schema_extra={"default": default},
    )


def _absolute_path(example: str) -> AfterValidator:
    def check(path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"{show_value(path)} is not an absolute path; use e.g. {example}")
        if "\0" in path:
            raise ValueError(f"{show_value(path)} contains a NUL byte; use e.g. {example}")
        # Refused rather than resolved: what ".." means depends on symlinks that differ between the
        # host and the sandbox, and a path that reads as one place must not mean another.
        if ".." in path.split("/"):
            raise ValueError(f'{show_value(path)} contains ".."; use e.g. {example}')
        normal = "/" + posixpath.normpath(path).lstrip("/")
        if normal == "/":
            raise ValueError(f'"/" is the whole filesystem; use e.g. {example}')
        return normal

    return AfterValidator(check)


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_EXAMPLE = "pypi.example.internal or *.example.internal"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _dns_name(name: str, example: str = "db.example.internal") -> str:
    # DNS compares names case-insensitively and a trailing dot only marks a name absolute: keep one spelling.
    name = name.lower().removesuffix(".")
    if len(name) > 253 or _is_address(name) or not all(map(_LABEL.fullmatch, name.split("."))):
        raise ValueError(
            f"{show_value(name)} is not a host name (dot-separated labels of a-z, 0-9 and -, "
            f"up to 63 characters each and 253 in all); use e.g. {example}"
        )
    return name


def _host_pattern(pattern: str) -> str:
    if _is_address(pattern):
        raise ValueError(f"{show_value(pattern)} is an IP address, not a host name; use cidr: {pattern}")
    if pattern == "*":
        raise ValueError('"*" would allow every host; name a domain, e.g. *.example.internal')
    if pattern.startswith("*."):
        return "*." + _dns_name(pattern[2:], _HOST_EXAMPLE)
    return _dns_name(pattern, _HOST_EXAMPLE)


def _network(value: Any) -> Any:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value)
        except ValueError:
            pass
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
        else:
            # Refused, not truncated: 10.1.2.3/8 may mean one host or the whole /8; only the author knows.
            raise ValueError(f"{show_value(value)} has host bits set; use {network}")
    raise ValueError(f"{show_value(value)} is not a network; use e.g. 10.0.0.0/8 or fd00::/8")


def _address(value: Any) -> Any:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    # Only strings: ip_address() would also take an int, and a YAML `db: 1` is a mistake, not 0.0.0.1.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(value)
    raise ValueError(f"{show_value(value)} is not an IP address; use e.g. 10.0.0.5 or fd00::5")


def _env_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{show_value(name)} is not an environment variable name; use e.g. MY_VAR")
    return name


def _env_value(value: str) -> str:
    if "\0" in value:
        raise ValueError(f"{show_value(value)} contains a NUL byte, which no environment can hold")
    return value


def _unique_gpus(indices: tuple[int, ...]) -> tuple[int, ...]:
    for position, index in enumerate(indices):
        if index in indices[:position]:
            raise PydanticCustomError(
                "item_error", "duplicate GPU index {value}", {"index": position, "value": index}
            )
    return indices


_DEFAULT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Protocol = Literal["tls", "http", "ssh", "any"]
Feature = Literal["landlock", "seccomp_notify", "cgroup_cpu", "process_events"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_readable(path: str) -> str:
    for own in SANDBOX_OWN:
        if path == own or path.startswith(own + "/"):
            raise ValueError(
                f"{show_value(path)} is under {own}, which is the sandbox's own (a fresh mount); "
                "list a host path outside " + ", ".join(SANDBOX_OWN)
            )
    return path


class Filesystem(_Model):
    """What the sandbox sees of the filesystem: the system's programs, libraries and configuration, and
    the paths listed in readable, all read-only; nothing else of the host."""

    readable: tuple[Annotated[str, _absolute_path("/srv/datasets"), AfterValidator(_host_readable)], ...] = (
        Field(
            (),
            description="Absolute host paths (directories or files) the sandbox may read, at the same path, "
            "read-only, on top of what every program needs: /usr, /bin, /sbin, /lib*, and /etc with its "
            "secrets hidden. Everything else on the host (/home, /root, /opt, /srv, /mnt, /var, data and "
            "checkouts) is absent unless listed here. A listed path must exist on the host and contain no "
            "symlink; built-in hidden secrets at or above a listed path are shown, those below it stay "
            "hidden. Default: none.",
            examples=[["/srv/datasets"]],
        )
    )
    writable: tuple[Annotated[str, _absolute_path("/workspace/out")], ...] = Field(
        (),
        description="Absolute paths inside the sandbox that commands may write. /workspace and /tmp always "
        "are; every other path listed gets a private, initially empty writable directory mounted there, "
        "counted against resources.disk. Default: none beyond /workspace and /tmp.",
        examples=[["/workspace/out"]],
    )
    hidden: tuple[Annotated[str, _absolute_path("/srv/secrets")], ...] = Field(
        (),
        description="Absolute host paths hidden inside the sandbox, added to corral's "
        "built-in list of secret locations. Default: only the built-in list.",
        examples=[["/srv/secrets"]],
    )

    @model_validator(mode="after")
    def _readable_not_hidden(self) -> Filesystem:
        for path in self.readable:
            if path in self.hidden:
                raise ValueError(f"{path} is listed in both readable and hidden; keep it in one of them")
        return self


class EgressRule(_Model):
    """One destination the sandbox may connect to. Set exactly one of host or cidr."""

    host: Annotated[str, AfterValidator(_host_pattern)] | None = Field(
        None,
        description="DNS name the sandbox may reach, exact (pypi.example.internal) or a wildcard "
        "(*.example.internal covers its subdomains, not example.internal itself). Default: unset.",
        examples=["pypi.example.internal", "*.files.example.internal"],
    )
    cidr: Annotated[IPv4Network | IPv6Network, BeforeValidator(_network)] | None = Field(
        None,
        description="IPv4 or IPv6 network the sandbox may reach by address, e.g. 10.20.0.0/16; a single "
        "address means just that host. Default: unset.",
        examples=["10.20.0.0/16"],
    )
    ports: tuple[Port, ...] = Field(
        min_length=1,
        description="TCP ports (1 to 65535) allowed to the destination. Required; no default.",
        examples=[[443]],
    )
    protocols: tuple[Protocol, ...] = Field(
        ("tls", "http"),
        min_length=1,
        description="Protocols the egress proxy lets through, recognised from the first bytes of the "
        "connection: tls, http, ssh, or any (no check). Default: [tls, http].",
        examples=[["tls"]],
    )

    @model_validator(mode="after")
    def _one_destination(self) -> EgressRule:
        if (self.host is None) == (self.cidr is None):
            raise ValueError("set exactly one of host or cidr")
        return self


class Limits(_Model):
    """Rate limits on the sandbox's outgoing traffic, over all destinations together."""

    connections_per_minute: int = Field(
        120,
        strict=True,
        gt=0,
        description="New outgoing connections allowed per minute. Default: 120.",
        examples=[120],
    )
    bytes_out_per_minute: Size = _size_field(
        "50MiB", "1B", "Bytes the sandbox may send per minute, over all connections."
    )


_PHASE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def _phase_name(name: str) -> str:
    if not _PHASE_NAME.fullmatch(name):
        raise ValueError(
            f"{show_value(name)} is not a phase name (a-z, 0-9, _ and -, starting with a letter, up to 32 "
            "characters); use e.g. setup"
        )
    return name


class NetworkPhase(_Model):
    """One network phase: what the sandbox may reach, on top of network.egress, while the caller keeps
    it in this phase (`Sandbox.phase(name)` switches; nothing inside the sandbox can)."""

    egress: tuple[EgressRule, ...] = Field(
        (),
        description="Destinations the sandbox may connect to during this phase, on top of network.egress, "
        "each {host or cidr, ports, protocols} as in network.egress. When the sandbox leaves the phase, "
        "every open connection the next phase does not allow is cut. Default: none (network.egress only).",
        examples=[[{"host": "pypi.example.internal", "ports": [443]}]],
    )


class Network(_Model):
    """The network fence: nothing leaves the sandbox except what egress allows."""

    egress: tuple[EgressRule, ...] = Field(
        (),
        description="Destinations the sandbox may connect to, each {host or cidr, ports, protocols}. "
        "Everything else is refused and recorded. Default: none (no network access).",
        examples=[[{"host": "pypi.example.internal", "ports": [443]}]],
    )
    hosts: dict[
        Annotated[str, AfterValidator(_dns_name)],
        Annotated[IPv4Address | IPv6Address, BeforeValidator(_address)],
    ] = Field(
        {},
        description="Fixed name-to-address answers for the sandbox's resolver, like /etc/hosts; an egress "
        "rule is still needed to connect. Default: none.",
        examples=[{"db.example.internal": "10.20.0.5"}],
    )
    unix_sockets: tuple[Annotated[str, _absolute_path("/srv/build/agent.sock")], ...] = Field(
        (),
        description="Absolute paths of UNIX sockets outside the sandbox's own writable paths that "
        "programs may connect to (each the socket itself, as the sandbox sees it; it must also be "
        "visible there). Sockets under /workspace, /tmp, /dev/shm and filesystem.writable always are; "
        "connecting to any other is refused and recorded. Default: none.",
        examples=[["/srv/build/agent.sock"]],
    )
    limits: Limits = Field(
        Limits(),
        description="Rate limits on outgoing traffic. Default: 120 connections and 50MiB per minute.",
        examples=[{"connections_per_minute": 120, "bytes_out_per_minute": "50MiB"}],
    )
    phases: dict[Annotated[str, AfterValidator(_phase_name)], NetworkPhase] = Field(
        {},
        description="Named phases of the sandbox's life, in order, each with egress rules of its own that "
        "hold, on top of network.egress, only while the sandbox is in that phase: e.g. setup with the "
        "package index, then agent and verify with nothing more. The caller moves the sandbox from one to "
        "another (Sandbox.phase); each switch is a phase event, and connections the new phase does not "
        "allow are cut. Default: none (network.egress holds for the sandbox's whole life).",
        examples=[{"setup": {"egress": [{"host": "pypi.example.internal", "ports": [443]}]}, "agent": {}}],
    )
    start_phase: str | None = Field(
        None,
        description="The phase a sandbox starts in: one of phases. Default: the first phase listed, or "
        "none when there are no phases.",
        examples=["setup"],
    )

    @field_validator("start_phase")
    @classmethod
    def _known_phase(cls, name: str | None, info: ValidationInfo) -> str | None:
        phases = info.data.get("phases")
        if name is None or phases is None:  # phases invalid: reported on their own
            return name
        if not phases:
            raise ValueError(f"{show_value(name)} names a phase, but network.phases lists none; add it there")
        if name not in phases:
            listed = ", ".join(phases)
            raise ValueError(f"{show_value(name)} is not one of network.phases; use one of {listed}")
        return name

    @property
    def initial_phase(self) -> str | None:
        """The phase a sandbox starts in: start_phase, else the first listed; None without phases."""
        return self.start_phase or next(iter(self.phases), None)

    def egress_in(self, phase: str | None) -> tuple[EgressRule, ...]:
        """The rules in force in `phase` (None: no phase): network.egress, then the phase's own."""
        return self.egress if phase is None else self.egress + self.phases[phase].egress


class Resources(_Model):
    """Budgets enforced by the sandbox's cgroup and supervisor."""

    cpu: float = Field(
        1.0,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="CPU time, in cores: 0.5 is half of one core, 2 is two full cores. Default: 1.",
        examples=[0.5, 2],
    )
    memory: Size = _size_field(
        "512MiB",
        "16MiB",
        "Memory for the sandbox's processes plus the files they write to its tmpfs (/workspace, /tmp and "
        "the extra filesystem.writable paths); beyond it the kernel kills processes in the sandbox.",
    )
    processes: int = Field(
        128,
        strict=True,
        ge=8,
        description="Most tasks (processes and threads) alive in the sandbox at once (the pids cgroup). "
        "Default: 128; at least 8.",
        examples=[128],
    )
    disk: Size = _size_field(
        "1GiB",
        "1MiB",
        "Total the sandbox may write: /workspace, /tmp and the extra filesystem.writable paths together.",
    )
    timeout: Duration = _duration_field(
        "10m", "Wall-clock limit of one command, unless the command is given its own."
    )
    lifetime: Duration = _duration_field("2h", "Wall-clock limit of the whole sandbox, from start to stop.")
    output: Size = _size_field(
        "64MiB",
        "64KiB",
        "Most of one command's output (stdout and stderr together) that corral keeps for its result; the "
        "host holds it outside the sandbox's memory budget. Past it the rest is read and discarded (the "
        "command runs on, unblocked), the result says output_truncated, and a deny event records it.",
    )


def _rule_path(value: str) -> str:
    if not value or "\0" in value:
        raise PydanticCustomError("rule_path", "a rule file path must be non-empty")
    return value


class Tripwires(_Model):
    """Monitors and rules that detect mining, tunnels, reverse shells, probing, exfiltration and
    lingering processes, and respond to them."""

    enabled: bool = Field(
        True,
        strict=True,
        description="Watch this sandbox's processes, resources and network events with corral's rules. "
        "Default: true.",
        examples=[True],
    )
    rules: tuple[Annotated[str, AfterValidator(_rule_path)], ...] = Field(
        (),
        description="Extra rule files, loaded after corral's own (relative paths are relative to the "
        "policy file); they may add rules, override lists and change or disable rules. Default: none.",
        examples=[["rules/local.yaml"]],
    )
    responses: dict[str, Response] = Field(
        {},
        description="What to do when a rule fires, by rule name or by category (mining, tunnel, "
        "reverse_shell, probe, exfiltration, lingering, tamper, privilege, resource): log, alert, kill "
        "(the process and its children), freeze (the whole sandbox, for inspection) or terminate (close "
        "the sandbox). A rule name wins over its category. Default: each rule's own response.",
        examples=[{"mining": "kill", "probe": "alert"}],
    )
    sample_interval: Duration = Field(
        0.25,
        ge=0.05,
        le=5,
        description="How often CPU, memory and GPU use are sampled, in seconds (0.05 to 5). Default: 0.25s.",
        examples=["250ms"],
    )


class Policy(_Model):
    """What a sandbox may do. Load one with `Policy.load(path)`; every key but version is optional."""

    version: Literal[1] = Field(
        description="Version of the policy format. Required; must be 1.",
        examples=[1],
    )
    filesystem: Filesystem = Field(
        Filesystem(),
        description="Readable, writable and hidden paths. Default: the system's programs, libraries and /etc "
        "read-only, nothing else of the host; writable /workspace and /tmp.",
        examples=[{"writable": ["/workspace/out"]}],
    )
    network: Network = Field(
        Network(),
        description="Egress allowlist, fixed host names, traffic limits and network phases. "
        "Default: offline.",
        examples=[{"egress": []}],
    )
    resources: Resources = Field(
        Resources(),
        description="CPU, memory, process, disk and time budgets. Default: the defaults of each key.",
        examples=[{"memory": "512MiB"}],
    )
    gpu: Annotated[tuple[Annotated[int, Field(strict=True, ge=0)], ...], AfterValidator(_unique_gpus)] = (
        Field(
            (),
            description="Indices of the host GPUs the sandbox may use, each at most once. Default: none.",
            examples=[[0]],
        )
    )
    env: dict[Annotated[str, AfterValidator(_env_name)], Annotated[str, AfterValidator(_env_value)]] = Field(
        _DEFAULT_ENV,
        description="The whole environment of every command: nothing from the host leaks in, and listing "
        "env replaces this default, so keep PATH. "
        "Default: {PATH: /usr/local/bin:/usr/bin:/bin, HOME: /tmp, LANG: C.UTF-8}.",
        examples=[{"PATH": "/usr/bin:/bin", "HOME": "/tmp"}],
    )
    tripwires: Tripwires = Field(
        Tripwires(),
        description="Detection rules and responses. Default: corral's rules with their own responses.",
        examples=[{"responses": {"probe": "kill"}}],
    )
    degrade: frozenset[Feature] = Field(
        frozenset(),
        description="Features the sandbox may run without when the host cannot enforce them: landlock, "
        "seccomp_notify (also the tripwires' view of every execve), cgroup_cpu, process_events (the "
        "kernel's fork/exit connector: without it exits are noticed at the next sample). Default: none, "
        "so a missing feature stops the sandbox (fail closed).",
        examples=[["landlock"]],
    )

    _source: str = PrivateAttr("<policy>")

    @property
    def source(self) -> str:
        """Where the policy came from: the file path given to `load`, or ``<policy>``."""
        return self._source

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """The policy in YAML file `path`; PolicyError listing every problem, each naming file and key."""
        return cls._validated(read_yaml(path), os.fspath(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<policy>") -> Policy:
        """The policy in `data` (as read from YAML or JSON); PolicyError naming `source` on any problem."""
        return cls._validated(data, source)

    @classmethod
    def _validated(cls, data: object, source: str) -> Policy:
        policy = validate(cls, data, source)
        policy._source = source
        return policy

    @classmethod
    def default(cls) -> Policy:
        """Every key at its default: offline, read-only host, the documented budgets."""
        return cls(version=1)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON Schema of the policy file format."""
        return cls.model_json_schema()

    def __eq__(self, other: object) -> bool:
        # Two policies that say the same thing are equal wherever they were read from.
        if not isinstance(other, Policy):
            return NotImplemented
        return self.__dict__ == other.__dict__
