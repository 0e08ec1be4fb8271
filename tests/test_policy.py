"""Policy loading, its error messages (the contract), units and the schema (docs/policy.md's reference is
generated from it by scripts/gen-docs; tests/test_docs.py checks it is current)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import corral.policy
from corral._errors import PolicyError
from corral.policy import Policy, format_duration, format_size, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))

EGRESS = "version: 1\nnetwork:\n  egress:\n    - "
GiB = 2**30
MiB = 2**20


def problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, name: str = "p.yaml") -> list[str]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError) as caught:
        Policy.load(name)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- examples and defaults ---


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"offline.yaml", "strict.yaml", "package-index.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_round_trips(path: Path) -> None:
    policy = Policy.load(path)
    assert policy.source == str(path)
    again = Policy.from_dict(policy.model_dump(mode="json"))
    assert again == policy
    assert again.source == "<policy>"


def test_offline_example_spells_out_the_defaults() -> None:
    assert Policy.load(ROOT / "examples/policies/offline.yaml") == Policy.default()


def test_strict_example() -> None:
    resources = Policy.load(ROOT / "examples/policies/strict.yaml").resources
    assert (resources.cpu, resources.memory, resources.processes, resources.disk) == (
        0.5,
        256 * MiB,
        64,
        256 * MiB,
    )
    assert (resources.timeout, resources.lifetime) == (120.0, 1800.0)


def test_package_index_example_names_no_real_host() -> None:
    egress = Policy.load(ROOT / "examples/policies/package-index.yaml").network.egress
    assert [rule.host for rule in egress] == ["pypi.example.internal", "*.files.example.internal"]
    assert all(rule.ports == (443,) for rule in egress)


def test_defaults_are_the_documented_ones() -> None:
    policy = Policy.default()
    assert policy.source == "<policy>"
    assert policy.version == 1
    assert policy.filesystem.writable == () and policy.filesystem.hidden == ()
    assert policy.network.egress == () and policy.network.hosts == {}
    assert policy.network.limits.connections_per_minute == 120
    assert policy.network.limits.bytes_out_per_minute == 50 * MiB
    resources = policy.resources
    assert (resources.cpu, resources.memory, resources.processes, resources.disk) == (
        1.0,
        512 * MiB,
        128,
        GiB,
    )
    assert (resources.timeout, resources.lifetime) == (600.0, 7200.0)
    assert policy.gpu == ()
    assert policy.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    assert policy.degrade == frozenset()
    assert Policy.from_dict({"version": 1}) == policy


def test_defaults_are_not_shared_between_policies() -> None:
    assert Policy.default().env is not Policy.default().env


def test_values_are_normalised() -> None:
    policy = Policy.from_dict(
        {
            "version": 1,
            "filesystem": {"writable": ["/workspace/out/", "//data//x"]},
            "network": {
                "egress": [
                    {"host": "PyPI.Example.Internal.", "ports": [443]},
                    {"cidr": "10.0.0.5", "ports": [22]},
                ],
                "hosts": {"db.example.internal": "10.20.0.5"},
            },
            "resources": {"memory": "1.5GiB", "timeout": "1h30m", "cpu": 2},
            "degrade": ["landlock", "landlock"],
        }
    )
    assert policy.filesystem.writable == ("/workspace/out", "/data/x")
    assert policy.network.egress[0].host == "pypi.example.internal"
    assert policy.network.egress[0].protocols == ("tls", "http")
    assert str(policy.network.egress[1].cidr) == "10.0.0.5/32"
    assert str(policy.network.hosts["db.example.internal"]) == "10.20.0.5"
    assert policy.resources.memory == 3 * GiB // 2
    assert policy.resources.timeout == 5400.0
    assert policy.resources.cpu == 2.0
    assert policy.degrade == frozenset({"landlock"})


def test_policy_is_frozen() -> None:
    with pytest.raises(ValueError):
        Policy.default().resources.cpu = 2  # type: ignore[misc]


# --- error messages: the contract ---


def test_bad_size_names_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 1\nresources:\n  memory: lots\n"
    assert problems(tmp_path, monkeypatch, text, "offline.yaml") == [
        'offline.yaml: resources.memory: "lots" is not a size; use e.g. 512MiB'
    ]


def test_file_part_is_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ncolour: red\n")
    with pytest.raises(PolicyError, match=f"^{path}: colour: unknown key"):
        Policy.load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nresources:\n  timeout: soon\n",
            'p.yaml: resources.timeout: "soon" is not a duration; use e.g. 30s, 10m or 2h',
        ),
        (
            "version: 1\nresources:\n  cpu: 0\n",
            "p.yaml: resources.cpu: must be greater than 0; use e.g. 0.5 or 2",
        ),
        (
            "version: 1\nfilesystem:\n  hiden: [/srv]\n",
            "p.yaml: filesystem.hiden: unknown key; allowed keys: hidden, readable, writable",
        ),
        ("resources: {}\n", "p.yaml: version: missing; use version: 1"),
        ("version: 2\n", "p.yaml: version: 2 is not accepted; use version: 1"),
        (
            "version: 1\nfilesystem:\n  readable: [srv/data]\n",
            'p.yaml: filesystem.readable[0]: "srv/data" is not an absolute path; use e.g. /srv/datasets',
        ),
        (
            "version: 1\nfilesystem:\n  readable: [/srv, /proc/1/root]\n",
            'p.yaml: filesystem.readable[1]: "/proc/1/root" is under /proc, which is the sandbox\'s own '
            "(a fresh mount); list a host path outside /proc, /sys, /dev, /run, /tmp, /workspace",
        ),
        (
            "version: 1\nfilesystem:\n  readable: [/srv/data]\n  hidden: [/srv/data/]\n",
            "p.yaml: filesystem: /srv/data is listed in both readable and hidden; keep it in one of them",
        ),
        (
            "version: 1\nfilesystem:\n  writable: [tmp/x]\n",
            'p.yaml: filesystem.writable[0]: "tmp/x" is not an absolute path; use e.g. /workspace/out',
        ),
        (
            EGRESS + "ports: [443]\n",
            "p.yaml: network.egress[0]: set exactly one of host or cidr",
        ),
        (
            EGRESS + "{host: a.example.internal, cidr: 10.0.0.0/8, ports: [443]}\n",
            "p.yaml: network.egress[0]: set exactly one of host or cidr",
        ),
        ("version: 1\ngpu: [0, 0]\n", "p.yaml: gpu[1]: duplicate GPU index 0"),
        (
            "version: 1\nresources:\n  processes: many\n",
            'p.yaml: resources.processes: "many" is not an integer; use e.g. 128',
        ),
        (
            "version: 1\nresources:\n  memory: 8MiB\n",
            "p.yaml: resources.memory: must be at least 16MiB; use e.g. 512MiB",
        ),
        (
            "version: 1\nresources:\n  timeout: 0\n",
            "p.yaml: resources.timeout: must be greater than 0s; use e.g. 30s, 10m or 2h",
        ),
        (
            "version: 1\nresources:\n  processes: 4\n",
            "p.yaml: resources.processes: must be at least 8; use e.g. 128",
        ),
        (
            EGRESS + "{host: a.example.internal, ports: [0]}\n",
            "p.yaml: network.egress[0].ports[0]: must be at least 1; use e.g. [443]",
        ),
        (
            EGRESS + "{host: a.example.internal}\n",
            "p.yaml: network.egress[0].ports: missing; use ports: [443]",
        ),
        (
            EGRESS + "{host: a.example.internal, ports: []}\n",
            "p.yaml: network.egress[0].ports: must list at least 1; use e.g. [443]",
        ),
        (
            EGRESS + "{host: a.example.internal, ports: [22], protocols: [ftp]}\n",
            'p.yaml: network.egress[0].protocols[0]: "ftp" is not accepted; use one of tls, http, ssh or any',
        ),
        (
            EGRESS + "{cidr: 10.1.2.3/8, ports: [443]}\n",
            'p.yaml: network.egress[0].cidr: "10.1.2.3/8" has host bits set; use 10.0.0.0/8',
        ),
        (
            EGRESS + "{host: 10.0.0.1, ports: [443]}\n",
            'p.yaml: network.egress[0].host: "10.0.0.1" is an IP address, not a host name; '
            "use cidr: 10.0.0.1",
        ),
        (
            EGRESS + '{host: "*", ports: [443]}\n',
            'p.yaml: network.egress[0].host: "*" would allow every host; '
            "name a domain, e.g. *.example.internal",
        ),
        (
            "version: 1\nnetwork:\n  hosts:\n    db.example.internal: nowhere\n",
            'p.yaml: network.hosts["db.example.internal"]: "nowhere" is not an IP address; '
            "use e.g. 10.0.0.5 or fd00::5",
        ),
        ("version: 1\nenv:\n  DEBUG: 1\n", 'p.yaml: env.DEBUG: 1 is not a string; quote it: "1"'),
        (
            "version: 1\nenv:\n  1X: a\n",
            'p.yaml: env.1X: "1X" is not an environment variable name; use e.g. MY_VAR',
        ),
        (
            "version: 1\ndegrade: [landlok]\n",
            'p.yaml: degrade[0]: "landlok" is not accepted; '
            "use one of landlock, seccomp_notify, cgroup_cpu or process_events",
        ),
        (
            "version: 1\nnetwork: []\n",
            "p.yaml: network: a list is not a mapping; use e.g. {egress: []}",
        ),
        ("version: 1\ngpu: [true]\n", "p.yaml: gpu[0]: true is not an integer; use e.g. [0]"),
        (
            "version: 1\nresources:\n  cpu: .inf\n",
            "p.yaml: resources.cpu: inf is not a finite number; use e.g. 0.5 or 2",
        ),
        (
            EGRESS + "{cidr: somewhere, ports: [443]}\n",
            'p.yaml: network.egress[0].cidr: "somewhere" is not a network; use e.g. 10.0.0.0/8 or fd00::/8',
        ),
        (
            "version: 1\nnetwork:\n  hosts:\n    db_1: 10.0.0.5\n",
            'p.yaml: network.hosts.db_1: "db_1" is not a host name (dot-separated labels of a-z, 0-9 and -, '
            "up to 63 characters each and 253 in all); use e.g. db.example.internal",
        ),
        (
            "version: 1\nnetwork:\n  phases:\n    Set-Up: {}\n",
            'p.yaml: network.phases.Set-Up: "Set-Up" is not a phase name (a-z, 0-9, _ and -, starting with '
            "a letter, up to 32 characters); use e.g. setup",
        ),
        (
            "version: 1\nnetwork:\n  phases:\n    setup: {egres: []}\n",
            "p.yaml: network.phases.setup.egres: unknown key; allowed keys: egress",
        ),
        (
            "version: 1\nnetwork:\n  phases:\n    setup:\n      egress: [{host: a.example.internal}]\n",
            "p.yaml: network.phases.setup.egress[0].ports: missing; use ports: [443]",
        ),
        (
            "version: 1\nnetwork:\n  phases: {setup: {}, agent: {}}\n  start_phase: agnet\n",
            'p.yaml: network.start_phase: "agnet" is not one of network.phases; use one of setup, agent',
        ),
        (
            "version: 1\nnetwork:\n  start_phase: setup\n",
            'p.yaml: network.start_phase: "setup" names a phase, but network.phases lists none; add it there',
        ),
        (
            "version: 1\nnetwork:\n  phases: [setup, agent]\n",
            "p.yaml: network.phases: a list is not a mapping; use e.g. "
            "{setup: {egress: [{host: pypi.example.internal, ports: [443]}]}, agent: {}}",
        ),
        (
            "version: 1\nfilesystem:\n  hidden: [/srv/../etc]\n",
            'p.yaml: filesystem.hidden[0]: "/srv/../etc" contains ".."; use e.g. /srv/secrets',
        ),
    ],
)
def test_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str) -> None:
    assert problems(tmp_path, monkeypatch, text) == [expected]


PHASES = """version: 1
network:
  egress: [{host: git.example.internal, ports: [22], protocols: [ssh]}]
  phases:
    setup:
      egress: [{host: pypi.example.internal, ports: [443]}]
    agent: {}
    verify: {}
"""


def test_phases_keep_their_order_and_add_to_the_base_rules(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PHASES)
    network = Policy.load(path).network
    assert list(network.phases) == ["setup", "agent", "verify"]
    assert network.initial_phase == "setup"  # the first listed, when start_phase is not set
    assert [r.host for r in network.egress_in("setup")] == ["git.example.internal", "pypi.example.internal"]
    assert [r.host for r in network.egress_in("agent")] == ["git.example.internal"]
    assert network.egress_in(None) == network.egress
    path.write_text(PHASES + "  start_phase: agent\n")
    assert Policy.load(path).network.initial_phase == "agent"
    assert Policy.default().network.initial_phase is None


def test_a_phase_named_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The later one would silently replace the first: a setup phase written twice could undo a fix.
    text = "version: 1\nnetwork:\n  phases:\n    setup: {}\n    agent: {}\n    setup: {}\n"
    assert problems(tmp_path, monkeypatch, text) == ['p.yaml: line 6: duplicate key "setup"']


def test_every_problem_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "resources:\n  memory: lots\n  timeout: soon\nfilesystem:\n  hiden: []\n"
    assert problems(tmp_path, monkeypatch, text) == [
        "p.yaml: version: missing; use version: 1",
        "p.yaml: filesystem.hiden: unknown key; allowed keys: hidden, readable, writable",
        'p.yaml: resources.memory: "lots" is not a size; use e.g. 512MiB',
        'p.yaml: resources.timeout: "soon" is not a duration; use e.g. 30s, 10m or 2h',
    ]


def test_unknown_top_level_key_lists_allowed_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert problems(tmp_path, monkeypatch, "version: 1\npolcy: {}\n") == [
        "p.yaml: polcy: unknown key; allowed keys: "
        "degrade, env, filesystem, gpu, network, resources, tripwires, version"
    ]


def test_yaml_syntax_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 1\nresources:\n    cpu: 1\n  memory: 1GiB\n"
    assert problems(tmp_path, monkeypatch, text) == [
        "p.yaml: line 4, column 3: not valid YAML (expected <block end>, but found '<block mapping start>')"
    ]


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        Policy.load("p.yaml")
    assert caught.value.problems == ["p.yaml: cannot read policy file (No such file or directory)"]


def test_file_that_is_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_bytes(b"version: 1\nenv: {A: \xff}\n")
    with pytest.raises(PolicyError) as caught:
        Policy.load("p.yaml")
    assert caught.value.problems == ["p.yaml: cannot read policy file (not UTF-8: byte 20)"]


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- version: 1\n", "a list"), ("just words\n", "a string"), ("", "nothing"), ("3\n", "a number")],
)
def test_top_level_must_be_a_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, kind: str
) -> None:
    assert problems(tmp_path, monkeypatch, text) == [
        f"p.yaml: the policy must be a YAML mapping of keys, got {kind}"
    ]


def test_duplicate_and_non_string_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 1\nresources:\n  memory: 1GiB\n  memory: 16GiB\nyes: 1\n1: 2\n[a]: 3\n"
    assert problems(tmp_path, monkeypatch, text) == [
        'p.yaml: line 4: duplicate key "memory"',
        'p.yaml: line 5: key yes is not a string; quote it: "yes"',
        'p.yaml: line 6: key 1 is not a string; quote it: "1"',
        "p.yaml: line 7: key (not a scalar) is not a string; keys must be strings",
    ]


def test_from_dict_names_its_source() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"version": 1, "resources": {"memory": "lots"}}, source="agent-42")
    assert caught.value.problems == ['agent-42: resources.memory: "lots" is not a size; use e.g. 512MiB']
    with pytest.raises(
        PolicyError, match=r"^<policy>: the policy must be a YAML mapping of keys, got a list$"
    ):
        Policy.from_dict([])  # type: ignore[arg-type]


# --- units ---


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("64KiB", 64 * 2**10),
        ("512MiB", 512 * MiB),
        ("1GiB", GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("100MB", 100 * 10**6),
        (" 2 TiB ", 2 * 2**40),
        ("10B", 10),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", '"lots" is not a size; use e.g. 512MiB'),
        ("", '"" is not a size; use e.g. 512MiB'),
        ("-1MiB", '"-1MiB" is not a size; use e.g. 512MiB'),
        (-1, "-1 is negative; use e.g. 512MiB"),
        (True, "true is not a size; use e.g. 512MiB"),
        (1.5, "1.5 is not a size; use e.g. 512MiB"),
        ("512M", '"512M" has an unknown unit "M"; use one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB'),
        ("1.5B", '"1.5B" is not a whole number of bytes; use e.g. 512MiB'),
    ],
)
def test_parse_size_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512 * MiB, "512MiB"),
        (GiB, "1GiB"),
        (3 * GiB // 2, "1536MiB"),
        (100 * 10**6, "100MB"),
        (1000, "1KB"),
        (7, "7B"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 4097, 10**9 + 1, 5 * 2**40, 5120000])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600.0),
        ("2h", 7200.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("45", 45.0),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", '"soon" is not a duration; use e.g. 30s, 10m or 2h'),
        ("10 minutes", '"10 minutes" is not a duration; use e.g. 30s, 10m or 2h'),
        ("m", '"m" is not a duration; use e.g. 30s, 10m or 2h'),
        (-1, "-1 is negative; use e.g. 30s, 10m or 2h"),
        (float("inf"), "inf is not a duration; use e.g. 30s, 10m or 2h"),
        (False, "false is not a duration; use e.g. 30s, 10m or 2h"),
    ],
)
def test_parse_duration_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (600, "10m"),
        (7200, "2h"),
        (5400, "1h30m"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (0, "0s"),
        (90061, "25h1m1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# --- schema and docs ---


def test_json_schema_lists_every_top_level_key() -> None:
    schema = Policy.json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) == set(Policy.model_fields)
    assert schema["required"] == ["version"]
    assert schema["additionalProperties"] is False
    memory = schema["$defs"]["Resources"]["properties"]["memory"]
    assert memory["default"] == "512MiB"
    assert {"type": "integer", "minimum": 0} in memory["anyOf"]


def models() -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    for name in corral.policy.__all__:
        value = getattr(corral.policy, name)
        if isinstance(value, type) and issubclass(value, BaseModel):
            found.append(value)
    return found


@pytest.mark.parametrize("model", models(), ids=lambda m: m.__name__)
def test_every_field_documents_default_and_examples(model: type[BaseModel]) -> None:
    assert model.__doc__
    for name, field in model.model_fields.items():
        assert field.description, name
        assert "Default: " in field.description or "Required" in field.description, name
        assert field.examples, name


def test_public_names_are_exported() -> None:
    public = {name for name in vars(corral.policy) if not name.startswith("_")}
    assert set(corral.policy.__all__) == public
