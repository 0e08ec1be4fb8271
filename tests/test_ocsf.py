"""OCSF export: every corral event type, mapped and validated against the official OCSF schema of
its class, and the JSON-lines export around it. No root, no network.

The validator: the OCSF schema itself (the `export/schema` of OCSF_VERSION, Apache-2.0) as the
`ocsf-json-schema` package ships it, turned by that package into a JSON Schema (draft 2020-12) for
each class with corral's profiles applied, and checked with `jsonschema`. That schema is strict:
required attributes, types, enum ids (class_uid, activity_id, type_uid, severity_id, ...) and
regexes (IP addresses), and no attribute the class or object doesn't define (additionalProperties is
false everywhere but `unmapped`). The tests below that break records on purpose prove it bites.
"""

from __future__ import annotations

import copy
import functools
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from corral.detect import rules
from corral.detect.rules import CATEGORIES
from corral.events import (
    Alert,
    AlertTags,
    Deny,
    DnsQuery,
    Event,
    Evidence,
    ExecExit,
    ExecStart,
    GpuUsage,
    NetConnect,
    PhaseChange,
    ProcessRef,
    ProcessUsage,
    ProcExec,
    ProcExit,
    ProcSeccomp,
    ResourceSample,
    SandboxLabel,
    SandboxStart,
    SandboxStop,
)
from corral.store import SandboxInfo, StoredEvent, ocsf
from corral.store.ocsf import MAPPING, OCSF_VERSION, PROFILES, TACTICS, TECHNIQUES, export, to_ocsf

DOC = Path(__file__).resolve().parent.parent / "docs" / "ocsf.md"
SANDBOX = "392a225942c6"
T0 = datetime(2026, 11, 27, 3, 42, 46, 527629, tzinfo=UTC)
T0_MS = 1_795_750_966_527
INFO = SandboxInfo(
    id=SANDBOX,
    started=T0,
    policy="policy.yaml",
    labels={"run": "r-17", "episode": "412", "step": "3"},
    host="sha256:9f2c0a",
)
CURL = ProcessRef(
    pid=4213,
    ns_pid=3,
    exe="/usr/bin/curl",
    cmdline=["curl", "-s", "https://pypi.org/simple/"],
    started=T0 - timedelta(seconds=1),
    ppid=4200,
    exec=2,
)
SSH = ProcessRef(
    pid=4300, ns_pid=9, exe="/usr/bin/ssh", cmdline=["ssh", "-N", "-R", "9000:localhost:22", "u@h"]
)
MINER = ProcessRef(pid=4400, ns_pid=12, exe="/tmp/.x/xmrig", cmdline=["xmrig", "-o", "pool:3333"], exec=3)


# --- the validator --------------------------------------------------------------------------------


@functools.cache
def _schemas() -> OcsfJsonSchemaEmbedded:
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))


@functools.cache
def validator(class_uid: int) -> Draft202012Validator:
    """The JSON Schema of one OCSF class, with corral's profiles, its objects embedded."""
    schemas = _schemas()
    schema = schemas.get_class_schema(schemas.lookup_class_name_from_uid(class_uid), list(PROFILES))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(record: dict[str, Any], class_uid: int) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(class_uid).iter_errors(record)
    ]


def check(record: dict[str, Any] | None, class_uid: int) -> dict[str, Any]:
    """The record is valid OCSF of `class_uid` (the class the mapping names, not the record's own
    claim), and survives a trip through JSON."""
    assert record is not None
    record = json.loads(json.dumps(record))
    assert errors(record, class_uid) == []
    assert record["class_uid"] == class_uid
    # the schema takes any type_uid of the class (see the test below): that it matches, is checked here
    assert record["type_uid"] == class_uid * 100 + record["activity_id"]
    return record


# --- events ---------------------------------------------------------------------------------------

_seq = iter(range(1, 1_000_000))


def stored(event: Any) -> StoredEvent:
    body = event.model_dump(mode="json")
    return StoredEvent(SANDBOX, next(_seq), event.time, body["type"], body, hash="ab" * 32)


def common() -> dict[str, Any]:
    return {"sandbox": SANDBOX, "time": T0}


def alert(rule: rules.Rule) -> Alert:
    return Alert(
        **common(),
        rule=rule.name,
        category=rule.category,  # type: ignore[arg-type]
        severity=rule.severity,  # type: ignore[arg-type]
        action=rule.response,  # type: ignore[arg-type]
        outcome="killed 1 process" if rule.response == "kill" else "",
        message=f"{rule.name}: fired",
        exec=3,
        process=MINER,
        evidence=Evidence(
            processes=[MINER, SSH],
            connections=[{"destination": "198.18.0.7", "address": "203.0.113.9", "port": 3333}],
            trigger={"proc.name": "xmrig"},
        ),
        tags=AlertTags(mitre=list(rule.tags.mitre), owasp=list(rule.tags.owasp)),
    )


def net(protocol: str, decision: str, **kw: Any) -> NetConnect:
    fields: dict[str, Any] = {
        "destination": "198.18.0.7",
        "port": {"http": 80, "ssh": 22, "stratum": 3333}.get(protocol, 443),
        "name": "files.example.com",
        "address": "203.0.113.9" if decision == "allow" else None,
        "protocol": protocol,
        "sni": "files.example.com" if protocol in ("tls", "http") else None,
        "decision": decision,
        "reason": "allowed by egress rule 1" if decision == "allow" else "no egress rule allows it",
        "via": "transparent",
        "bytes_out": 517 if decision == "allow" else 0,
        "bytes_in": 40_960 if decision == "allow" else 0,
        "duration": 0.42,
        "exec": 2,
        "process": CURL,
    } | kw
    return NetConnect(**common(), **fields)


DENIALS = [
    Deny(**common(), layer="seccomp", what="unshare", exec=1, process=CURL),
    Deny(
        **common(),
        layer="seccomp",
        what="socket",
        process=CURL,
        detail="AF_VSOCK, args 0x28 0x1",
        count=7,
        first=T0 - timedelta(seconds=1),
        last=T0,
    ),
    Deny(**common(), layer="seccomp", what="execve", detail="./x: directory removed"),
    Deny(**common(), layer="landlock", what="/etc/shadow", process=CURL),
    Deny(
        **common(), layer="unix", what="/run/docker.sock", process=CURL, detail="connect: outside the sandbox"
    ),
    Deny(**common(), layer="cgroup", what="memory", exec=2),
    Deny(**common(), layer="cgroup", what="processes", exec=2, count=300),
    Deny(**common(), layer="storage", what="disk"),
    Deny(**common(), layer="timeout", what="timeout", exec=2),
    Deny(**common(), layer="lifetime", what="lifetime"),
    Deny(**common(), layer="output", what="output", exec=4),
    Deny(
        **common(),
        layer="egress",
        what="evil.example port 22",
        process=SSH,
        detail="no egress rule allows it",
    ),
    Deny(**common(), layer="egress", what="169.254.169.254 port 80", process=CURL, detail="metadata address"),
    Deny(**common(), layer="egress", what="udp 8.8.8.8 port 53", detail="datagram dropped"),
    Deny(**common(), layer="egress", what="2001:db8::1 port 443", detail="no egress rule allows it"),
    Deny(**common(), layer="egress", what="bytes_out", detail="over the sandbox's outbound budget"),
    Deny(**common(), layer="dns", what="pool.minexmr.com", process=MINER, detail="A query for a name ..."),
    Deny(**common(), layer="dns", what="names", detail="a.example: over the sandbox's budget of 4096 names"),
]

EVENTS: list[Any] = [
    SandboxStart(
        **common(),
        policy="policy.yaml",
        cgroup_version=2,
        uid=1100,
        limits={"memory": 2**30, "cpu": 2.0, "processes": 256, "timeout": 60.0},
        degraded=["landlock"],
        workspace="/var/lib/corral/ws/392a225942c6",
    ),
    SandboxStop(**common(), reason="closed", duration=12.5),
    SandboxStop(**common(), reason="tripwire", duration=3.0, leftover=[MINER]),
    SandboxStop(**common(), reason="failed", duration=1.0, error="could not save the workspace: ENOSPC"),
    ExecStart(**common(), exec=2, command=["bash", "-lc", "pip install -e ."]),
    ExecStart(**common(), exec=5, command=[]),
    ExecExit(
        **common(),
        exec=2,
        exit_code=137,
        signal=9,
        duration=60.1,
        cpu_seconds=59.8,
        peak_memory=2**28,
        timed_out=True,
        leftover=[MINER],
    ),
    ProcExec(**common(), process=CURL, cwd="/workspace", stdio=["pipe", "pipe", "pipe"], exec=2),
    ProcExec(
        **common(), process=ProcessRef(pid=9, exe="/lib64/ld-linux-x86-64.so.2"), loader=["/lib64/ld.so"]
    ),
    ProcExec(**common(), process=ProcessRef(pid=10, cmdline=["python3", "-c", "1"])),
    ProcSeccomp(**common(), process=CURL, how="prctl", exec=2),
    ProcSeccomp(**common(), how="flags 0x0"),
    ProcExit(**common(), pid=4213, exit_code=0, duration=0.9, exec=2, cmdline=["curl", "-s", "x"]),
    ProcExit(**common(), pid=4214),
    *[net(p, d) for p in ("http", "ssh", "tls", "stratum", "unknown") for d in ("allow", "deny")],
    net("http", "allow", via="proxy", sni=None, name="[2001:db8::5]", port=8080, address="2001:db8::5"),
    net("tls", "deny", process=None, exec=None, name=None, destination="10.0.0.5"),
    net("unknown", "deny", destination="198.18.0.9", name=None),  # synthetic, no name: reported as dialled
    DnsQuery(
        **common(), name="pypi.org", qtype="A", decision="allow", answer=["198.18.0.7"], process=CURL, exec=2
    ),
    DnsQuery(**common(), name="pypi.org", qtype="AAAA", decision="allow"),
    DnsQuery(**common(), name="pool.minexmr.com", qtype="A", decision="deny", process=MINER),
    DnsQuery(**common(), name="aGVsbG8gd29ybGQ.t.evil.example", qtype="TXT", decision="deny"),
    *DENIALS,
    *[alert(r) for r in rules.load().rules],
    Alert(
        **common(),
        rule="custom",
        category="probe",
        severity="info",
        action="log",
        outcome="",
        message="m",
        tags=AlertTags(mitre=["T9999", "T9998.001"]),
    ),
    Alert(
        **common(),
        rule="untagged",
        category="resource",
        severity="low",
        action="freeze",
        outcome="frozen",
        message="m",
    ),
]
RESOURCE = ResourceSample(
    **common(),
    cpu=1.5,
    memory=2**27,
    processes=4,
    top=[ProcessUsage(pid=4400, cpu=1.4, rss=2**26)],
    gpu=[GpuUsage(index=0, pid=4400, memory=2**30, sm=98.0)],
)


def _expected_class(body: dict[str, Any]) -> int:
    """The class the mapping table names for this event: what the record is validated against."""
    row = ocsf._ROWS[(body["type"], ocsf._case(body))]
    assert row.cls is not None
    return row.cls.uid


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.type}")
def test_every_event_maps_to_valid_ocsf_of_its_class(event: Any) -> None:
    s = stored(event)
    record = check(to_ocsf(s, INFO), _expected_class(s.body))
    meta = record["metadata"]
    assert meta["version"] == OCSF_VERSION
    assert meta["product"] == {"name": "corral", "vendor_name": "corral", "version": "0.1.0"}
    assert meta["uid"] == f"{SANDBOX}:{s.seq}"
    assert meta["labels"] == ["run=r-17", "episode=412", "step=3"]
    assert {t["name"]: t["value"] for t in meta["tags"]} == INFO.labels
    assert meta["profiles"] == list(PROFILES)
    assert record["time"] == T0_MS  # 2026-11-27T03:42:46.527Z in epoch ms
    assert record["device"]["uid"] == INFO.host
    assert record["device"]["container"]["uid"] == SANDBOX
    assert record["unmapped"]["hash"] == s.hash


def test_every_event_type_has_a_decision_in_the_table() -> None:
    types = {m.model_fields["type"].default for m in get_args(get_args(Event)[0])}
    assert {r.type for r in MAPPING} == types
    assert {e.type for e in EVENTS} | {r.type for r in MAPPING if r.cls is None} == types


def test_without_the_sandbox_record_the_event_still_maps() -> None:
    for event in (EVENTS[0], net("ssh", "allow"), DENIALS[0]):
        s = stored(event)
        record = check(to_ocsf(s, None), _expected_class(s.body))
        assert "labels" not in record["metadata"]
        assert record["device"]["name"] == "unknown"


def test_resource_samples_are_not_exported() -> None:
    assert to_ocsf(stored(RESOURCE), INFO) is None


def test_phase_switches_are_not_exported() -> None:
    switch = PhaseChange(**common(), previous="setup", phase="agent", exec=2)
    assert to_ocsf(stored(switch), INFO) is None


def test_labels_added_after_the_start_are_not_exported() -> None:
    assert to_ocsf(stored(SandboxLabel(sandbox=SANDBOX, labels={"episode": "17"})), INFO) is None


# --- what the records say -------------------------------------------------------------------------


def test_net_connect_picks_its_class_by_protocol_and_blocks_denials() -> None:
    classes = {}
    for proto in ("http", "ssh", "tls", "stratum", "unknown"):
        for decision in ("allow", "deny"):
            r = to_ocsf(stored(net(proto, decision)), INFO)
            assert r is not None
            classes[proto, decision] = (r["class_uid"], r["activity_id"])
            if decision == "deny":
                assert (r["action_id"], r["disposition_id"], r["disposition"]) == (2, 2, "Blocked")
                assert r["status_detail"] == "no egress rule allows it"
            else:
                assert (r["action_id"], r["disposition_id"]) == (1, 1)
                assert r["traffic"] == {"bytes_out": 517, "bytes_in": 40_960, "bytes": 41_477}
    assert classes == {
        ("http", "allow"): (4002, 0),
        ("http", "deny"): (4002, 0),
        ("ssh", "allow"): (4007, 6),
        ("ssh", "deny"): (4007, 5),
        **{(p, "allow"): (4001, 6) for p in ("tls", "stratum", "unknown")},
        **{(p, "deny"): (4001, 5) for p in ("tls", "stratum", "unknown")},
    }


def test_net_connect_reports_the_real_address_not_the_synthetic_one() -> None:
    allowed = to_ocsf(stored(net("tls", "allow")), INFO)
    assert allowed is not None
    assert allowed["dst_endpoint"] == {"ip": "203.0.113.9", "hostname": "files.example.com", "port": 443}
    assert allowed["unmapped"]["destination"] == "198.18.0.7"  # what the program dialled
    assert allowed["unmapped"]["protocol"] == "tls"
    assert allowed["actor"]["process"]["pid"] == CURL.pid
    refused = to_ocsf(stored(net("tls", "deny")), INFO)
    assert refused is not None
    assert refused["dst_endpoint"] == {"hostname": "files.example.com", "port": 443}
    http = to_ocsf(stored(net("http", "allow")), INFO)
    assert http is not None
    assert http["http_request"]["url"]["url_string"] == "http://files.example.com"
    proxied = to_ocsf(stored(EVENTS[24]), INFO)
    assert proxied is not None
    assert proxied["http_request"]["url"]["url_string"] == "http://[2001:db8::5]:8080"


def test_process_fields_come_from_the_process_ref() -> None:
    r = to_ocsf(stored(ProcExec(**common(), process=CURL, cwd="/workspace")), INFO)
    assert r is not None
    assert r["process"] == {
        "pid": 4213,
        "namespace_pid": 3,
        "name": "curl",
        "file": {"name": "curl", "path": "/usr/bin/curl", "type_id": 1, "type": "Regular File"},
        "cmd_line": "curl -s https://pypi.org/simple/",
        "created_time": T0_MS - 1000,
        "parent_process": {"pid": 4200},
        "working_directory": "/workspace",
    }
    assert r["actor"] == {"process": {"pid": 4200}}
    assert (r["class_uid"], r["activity_id"], r["type_uid"]) == (1007, 1, 100701)


def test_lifecycle_events_are_process_launch_and_terminate() -> None:
    got = {}
    for event in EVENTS[:7]:
        r = to_ocsf(stored(event), INFO)
        assert r is not None
        got.setdefault(event.type, set()).add((r["class_uid"], r["activity_name"]))
    assert got == {
        "sandbox.start": {(1007, "Launch")},
        "sandbox.stop": {(1007, "Terminate")},
        "exec.start": {(1007, "Launch")},
        "exec.exit": {(1007, "Terminate")},
    }
    exit_ = to_ocsf(stored(EVENTS[6]), INFO)
    assert exit_ is not None
    assert (exit_["exit_code"], exit_["duration"], exit_["process"]["uid"]) == (
        137,
        60100,
        f"{SANDBOX}:exec:2",
    )
    assert exit_["unmapped"]["timed_out"] is True


@pytest.mark.parametrize("deny", DENIALS, ids=lambda d: f"{d.layer}-{d.what}")
def test_every_denial_is_blocked(deny: Deny) -> None:
    r = to_ocsf(stored(deny), INFO)
    assert r is not None
    assert (r["action"], r["disposition"], r["status"]) == ("Denied", "Blocked", "Failure")
    expected = {"egress": 4001, "dns": 4003, "seccomp": 1003}.get(deny.layer, 1007)
    assert r["class_uid"] == expected
    if deny.count > 1:
        assert r["count"] == deny.count


def test_denials_keep_what_was_refused() -> None:
    def one(deny: Deny) -> dict[str, Any]:
        r = to_ocsf(stored(deny), INFO)
        assert r is not None
        return r

    assert one(DENIALS[0])["kernel"]["name"] == "unshare"
    assert one(DENIALS[11])["dst_endpoint"] == {"hostname": "evil.example", "port": 22}
    udp = one(DENIALS[13])
    assert (udp["dst_endpoint"], udp["connection_info"]["protocol_name"]) == (
        {"ip": "8.8.8.8", "port": 53},
        "udp",
    )
    assert one(DENIALS[15])["unmapped"]["what"] == "bytes_out"
    landlock = one(DENIALS[3])["unmapped"]
    assert (landlock["layer"], landlock["what"]) == ("landlock", "/etc/shadow")
    assert (one(DENIALS[16])["query"]["hostname"], one(DENIALS[16])["rcode"]) == (
        "pool.minexmr.com",
        "NXDomain",
    )
    assert (one(DENIALS[17])["query"]["hostname"], one(DENIALS[17])["rcode"]) == ("a.example", "Refused")
    assert one(DENIALS[5])["process"] == {"uid": f"{SANDBOX}:exec:2"}  # the OOM kill, in command 2
    assert one(DENIALS[7])["process"] == {"uid": SANDBOX}  # the disk, the sandbox's


def test_alerts_carry_mitre_attack_in_the_finding() -> None:
    by_category: dict[str, dict[str, Any]] = {}
    for rule in rules.load().rules:
        r = to_ocsf(stored(alert(rule)), INFO)
        assert r is not None
        by_category[rule.category] = r
        attacks = r["finding_info"]["attacks"]
        assert [a.get("sub_technique", a["technique"])["uid"] for a in attacks] == list(rule.tags.mitre)
        for a in attacks:
            assert a["technique"]["name"] and a["tactic"]["uid"].startswith("TA") and a["tactic"]["name"]
        assert r["finding_info"]["analytic"]["name"] == rule.name
        assert r["severity"].lower() == {"info": "informational"}.get(rule.severity, rule.severity)
    assert set(by_category) == set(CATEGORIES), "a category without a built-in rule needs an alert here"
    tunnel = next(to_ocsf(stored(alert(r)), INFO) for r in rules.load().rules if "T1090.001" in r.tags.mitre)
    assert tunnel is not None
    assert {
        "technique": {"uid": "T1090", "name": "Proxy"},
        "sub_technique": {"uid": "T1090.001", "name": "Internal Proxy"},
        "tactic": {"uid": "TA0011", "name": "Command and Control"},
    } in tunnel["finding_info"]["attacks"]


def test_an_unknown_technique_keeps_its_id() -> None:
    r = to_ocsf(stored(EVENTS[-2]), INFO)
    assert r is not None
    assert r["finding_info"]["attacks"] == [
        {"technique": {"uid": "T9999"}},
        {"technique": {"uid": "T9998"}, "sub_technique": {"uid": "T9998.001"}},
    ]


def test_every_technique_the_built_in_rules_use_is_in_the_table() -> None:
    used = {t for r in rules.load().rules for t in r.tags.mitre}
    assert used - TECHNIQUES.keys() == set()
    for technique in used:  # each sub-technique's parent too, for the attack object's `technique`
        assert technique.split(".")[0] in TECHNIQUES
    assert {tactic for _, tactic in TECHNIQUES.values()} <= TACTICS.keys()


def test_alert_responses_become_actions_and_dispositions() -> None:
    got = {}
    for response in ("log", "alert", "kill", "freeze", "terminate"):
        event = Alert(
            **common(),
            rule="r",
            category="mining",
            severity="high",
            action=response,  # type: ignore[arg-type]
            outcome="done",
            message="m",
            tags=AlertTags(mitre=["T1496"]),
        )
        r = check(to_ocsf(stored(event), INFO), 2004)
        got[response] = (r["action"], r["disposition"], r["is_alert"])
    assert got == {
        "log": ("Observed", "Logged", False),
        "alert": ("Observed", "Alert", True),
        "kill": ("Denied", "Blocked", True),
        "freeze": ("Denied", "Quarantined", True),
        "terminate": ("Denied", "Blocked", True),
    }


# --- the names corral writes are the schema's ------------------------------------------------------


def test_class_category_and_activity_names_are_the_schemas() -> None:
    schema = get_ocsf_schema(version=OCSF_VERSION)
    for cls in ocsf.CLASSES:
        attrs = schema["classes"][_schemas().lookup_class_name_from_uid(cls.uid)]
        assert attrs["caption"] == cls.name
        assert attrs["category_name"] == cls.category_name
        activities = attrs["attributes"]["activity_id"]["enum"]
        for uid, name in cls.activities.items():
            assert activities[str(uid)]["caption"] == name, (cls.name, uid)


# --- the validator bites --------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    record = to_ocsf(stored(ProcExec(**common(), process=CURL)), INFO)
    assert record is not None and errors(record, 1007) == []
    return record


def _broken(change: Any) -> list[str]:
    record = copy.deepcopy(_valid())
    change(record)
    return errors(record, 1007)


@pytest.mark.parametrize(
    ("what", "change", "complaint"),
    [
        ("another class's uid", lambda r: r.update(class_uid=4001), "1007 was expected"),
        ("another class's type_uid", lambda r: r.update(type_uid=400106), "is not one of"),
        ("an activity the class lacks", lambda r: r.update(activity_id=42), "is not one of"),
        ("a severity out of the enum", lambda r: r.update(severity_id=7), "is not one of"),
        ("no time", lambda r: r.pop("time"), "'time' is a required property"),
        ("no metadata.version", lambda r: r["metadata"].pop("version"), "'version' is a required property"),
        ("no metadata.product", lambda r: r["metadata"].pop("product"), "'product' is a required property"),
        ("time as text", lambda r: r.update(time="2026-11-27T03:42:46Z"), "is not of type 'integer'"),
        ("pid as text", lambda r: r["process"].update(pid="4213"), "is not of type 'integer'"),
        ("an attribute OCSF lacks", lambda r: r.update(sandbox=SANDBOX), "Additional properties"),
        ("a nested one", lambda r: r["process"].update(exe="/x"), "Additional properties"),
        ("a process with no id", lambda r: r.update(process={"name": "curl"}), "is not valid under any"),
        ("a file with no name", lambda r: r["process"]["file"].pop("name"), "'name' is a required"),
        ("labels not a list", lambda r: r["metadata"].update(labels="run=1"), "is not of type 'array'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_the_validator_refuses_broken_records(what: str, change: Any, complaint: str) -> None:
    found = _broken(change)
    assert found, f"{what}: accepted"
    assert any(complaint in e for e in found), found


def test_the_schema_cannot_tie_type_uid_to_activity_id_so_check_does() -> None:
    record = _valid()
    record["type_uid"] = 100703  # Process Activity: Open, on a Launch
    assert errors(record, 1007) == []
    with pytest.raises(AssertionError):
        check(record, 1007)


def test_the_validator_refuses_a_bad_address() -> None:
    record = to_ocsf(stored(net("tls", "allow")), INFO)
    assert record is not None
    record["dst_endpoint"]["ip"] = "203.0.113.999"
    assert any("does not match" in e for e in errors(record, 4001))


def test_the_validator_refuses_a_finding_without_its_info() -> None:
    record = to_ocsf(stored(EVENTS[-1]), INFO)
    assert record is not None and errors(record, 2004) == []
    del record["finding_info"]["uid"]
    assert any("'uid' is a required property" in e for e in errors(record, 2004))
    record["finding_info"] = {"uid": "x", "attacks": [{"version": "v16"}]}  # an attack naming nothing
    assert errors(record, 2004)


# --- the export -----------------------------------------------------------------------------------


def _stream() -> list[StoredEvent]:
    return [stored(e) for e in (EVENTS[0], RESOURCE, net("ssh", "deny"), EVENTS[-1])]


def test_jsonl_export_is_the_event_with_its_place_and_labels() -> None:
    events, out = _stream(), io.StringIO()
    assert export(events, {SANDBOX: INFO}, "jsonl", out) == 4
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["sandbox.start", "resource.sample", "net.connect", "alert"]
    for line, event in zip(lines, events, strict=True):
        assert line == event.body | {"seq": event.seq, "hash": event.hash, "labels": INFO.labels}
    out = io.StringIO()
    export(events[:1], {}, "jsonl", out)
    assert json.loads(out.getvalue())["labels"] == {}


def test_ocsf_export_skips_what_is_not_exported() -> None:
    out = io.StringIO()
    assert export(_stream(), {SANDBOX: INFO}, "ocsf", out) == 3
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["class_uid"] for r in records] == [1007, 4007, 2004]
    for r in records:
        assert errors(r, r["class_uid"]) == []


@pytest.mark.parametrize("fmt", ["jsonl", "ocsf"])
def test_export_streams(fmt: str) -> None:
    """Each event is written before the next is asked for: an export holds one event at a time."""
    out = io.StringIO()

    def events() -> Iterator[StoredEvent]:
        for i in range(1_000):
            assert out.getvalue().count("\n") == i
            yield stored(net("tls", "allow"))

    assert export(events(), {SANDBOX: INFO}, fmt, out) == 1_000  # type: ignore[arg-type]


def test_an_unknown_format_is_refused_before_anything_is_read() -> None:
    def events() -> Iterator[StoredEvent]:
        raise AssertionError("read")
        yield

    with pytest.raises(ValueError, match=r"unknown export format 'csv': expected one of jsonl, ocsf"):
        export(events(), {}, "csv", io.StringIO())  # type: ignore[arg-type]


# --- the document ---------------------------------------------------------------------------------


def test_docs_show_the_mapping_table_and_version() -> None:
    text = DOC.read_text()
    assert ocsf.mapping_table() in text
    assert f"OCSF {OCSF_VERSION}" in text
    for row in MAPPING:
        assert f"| `{row.type}` |" in text
