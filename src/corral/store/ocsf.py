"""Export of stored events: as they were (JSON lines) or as OCSF records, one JSON object a line.

OCSF (the Open Cybersecurity Schema Framework) is what SIEMs and security data lakes ingest. Each
exported corral event becomes one record of the class `MAPPING` names for it; docs/ocsf.md shows that
table (generated from `MAPPING` by scripts/gen-docs) and the reasons behind it. Every record is
validated against the official schema of its class in tests/test_ocsf.py.

What every record carries:
- `metadata.uid` is `SANDBOX:SEQ`, the event's place in its sandbox's hash chain; `metadata.sequence`
  is SEQ, `metadata.correlation_uid` the sandbox, `metadata.event_code` corral's type, and
  `metadata.labels` (`KEY=VALUE`) and `metadata.tags` (`{name, value}`) the sandbox's labels, so a
  run, episode or step survives the trip into a SIEM.
- `device` is the host the sandbox ran on (`uid`: the host's id, when the store knows it) with the
  sandbox as its `container` (`uid`: the sandbox's id, `runtime`: corral).
- `actor.process` / `process` come from the event's ProcessRef: the host pid as `pid`, the pid inside
  the sandbox as `namespace_pid`, the executable as `file`, the command line as `cmd_line`.
- What has no OCSF attribute (the chain hash, the sniffed protocol, a command's CPU seconds, ...)
  goes in `unmapped`, under corral's own field names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, TextIO

from corral.egress.rules import SYNTHETIC
from corral.store.records import SandboxInfo, StoredEvent

OCSF_VERSION = "1.7.0"
# The OCSF profiles whose attributes the records use: `host` (actor on network classes), `container`
# (device.container, namespace_pid), `security_control` (action_id, disposition_id). Listed in each
# record's metadata.profiles; the tests validate against the schema with exactly these applied.
PROFILES = ("container", "host", "security_control")
PRODUCT = "corral"


# --- the classes and the mapping ------------------------------------------------------------------


@dataclass(frozen=True)
class OcsfClass:
    uid: int
    name: str
    category_uid: int
    category_name: str
    activities: Mapping[int, str]  # the activity ids corral uses, with the schema's names for them


PROCESS_ACTIVITY = OcsfClass(
    1007, "Process Activity", 1, "System Activity", {1: "Launch", 2: "Terminate", 99: "Other"}
)
KERNEL_ACTIVITY = OcsfClass(1003, "Kernel Activity", 1, "System Activity", {4: "Invoke"})
DETECTION_FINDING = OcsfClass(2004, "Detection Finding", 2, "Findings", {1: "Create"})
NETWORK_ACTIVITY = OcsfClass(4001, "Network Activity", 4, "Network Activity", {5: "Refuse", 6: "Traffic"})
HTTP_ACTIVITY = OcsfClass(4002, "HTTP Activity", 4, "Network Activity", {0: "Unknown"})
DNS_ACTIVITY = OcsfClass(4003, "DNS Activity", 4, "Network Activity", {1: "Query", 6: "Traffic"})
SSH_ACTIVITY = OcsfClass(4007, "SSH Activity", 4, "Network Activity", {5: "Refuse", 6: "Traffic"})
CLASSES = (
    PROCESS_ACTIVITY,
    KERNEL_ACTIVITY,
    DETECTION_FINDING,
    NETWORK_ACTIVITY,
    HTTP_ACTIVITY,
    DNS_ACTIVITY,
    SSH_ACTIVITY,
)


class Row(NamedTuple):
    """One line of the mapping: corral events of `type` (in the case `when`) become records of `cls`
    with `activity_id`; `cls` None: not exported."""

    type: str
    when: str
    cls: OcsfClass | None
    activity_id: int | None
    why: str


OTHER_LAYERS = "any other layer (landlock, unix, storage, output)"
MAPPING: tuple[Row, ...] = (
    Row("sandbox.start", "", PROCESS_ACTIVITY, 1, "the sandbox (`process.uid` = its id) starts"),
    Row("sandbox.stop", "", PROCESS_ACTIVITY, 2, "the sandbox ends; `status_detail` says why"),
    Row(
        "sandbox.label",
        "",
        None,
        None,
        "labels given after the start (a pool's episode): not an activity; every record of the sandbox "
        "carries its labels",
    ),
    Row("exec.start", "", PROCESS_ACTIVITY, 1, "a command (`process.uid` = `SANDBOX:exec:N`) starts"),
    Row("exec.exit", "", PROCESS_ACTIVITY, 2, "the command returns; `exit_code`, `duration`"),
    Row("proc.exec", "", PROCESS_ACTIVITY, 1, "a program started; the parent pid is the actor"),
    Row("proc.exit", "", PROCESS_ACTIVITY, 2, "a program ended"),
    Row(
        "proc.seccomp",
        "",
        KERNEL_ACTIVITY,
        4,
        "a program invoked prctl/seccomp(2) to install its own filter: a system call, let through",
    ),
    Row("net.connect", "protocol http, allowed", HTTP_ACTIVITY, 0, "the method is not recorded"),
    Row("net.connect", "protocol http, denied", HTTP_ACTIVITY, 0, "refused: action Denied, Blocked"),
    Row("net.connect", "protocol ssh, allowed", SSH_ACTIVITY, 6, "written when it ends, with its bytes"),
    Row("net.connect", "protocol ssh, denied", SSH_ACTIVITY, 5, "refused: action Denied, Blocked"),
    Row("net.connect", "any other protocol, allowed", NETWORK_ACTIVITY, 6, "tls, stratum, unknown"),
    Row("net.connect", "any other protocol, denied", NETWORK_ACTIVITY, 5, "refused: action Denied, Blocked"),
    Row("dns.query", "", DNS_ACTIVITY, 6, "the question and corral's answer; denied: Blocked"),
    Row("deny", "layer egress", NETWORK_ACTIVITY, 5, "also recorded as the net.connect it refused"),
    Row("deny", "layer dns", DNS_ACTIVITY, 1, "also recorded as the dns.query it refused"),
    Row("deny", "layer seccomp", KERNEL_ACTIVITY, 4, "a refused system call (`kernel.name`)"),
    Row("deny", "layer cgroup, what processes", PROCESS_ACTIVITY, 1, "a fork refused at the budget"),
    Row("deny", "layer cgroup, what memory", PROCESS_ACTIVITY, 2, "the OOM killer killed a process"),
    Row("deny", "layer timeout", PROCESS_ACTIVITY, 2, "the command was killed at its timeout"),
    Row("deny", "layer lifetime", PROCESS_ACTIVITY, 2, "the sandbox was closed at its lifetime"),
    Row("deny", OTHER_LAYERS, PROCESS_ACTIVITY, 99, "a refusal with no activity of its own"),
    Row("alert", "", DETECTION_FINDING, 1, "a rule fired: MITRE ATT&CK in `finding_info.attacks`"),
    Row(
        "phase",
        "",
        None,
        None,
        "the caller switched the sandbox's egress rules: a change of policy, not an activity of the "
        "sandbox's; the connections the switch cut are exported as their net.connect and deny",
    ),
    Row(
        "resource.sample",
        "",
        None,
        None,
        "periodic measurements, not security events: OCSF 1.x has no class for them, and at one per "
        "sandbox every few seconds they would drown the rest; the alerts they raise are exported",
    ),
)
_ROWS = {(r.type, r.when): r for r in MAPPING}


def mapping_table() -> str:
    """The mapping as a markdown table (docs/ocsf.md shows it; scripts/gen-docs writes it there)."""
    lines = ["| corral event | when | OCSF class | activity | note |", "| --- | --- | --- | --- | --- |"]
    for r in MAPPING:
        if r.cls is None or r.activity_id is None:
            target, activity = "not exported", ""
        else:
            target = f"{r.cls.name} ({r.cls.uid})"
            activity = f"{r.cls.activities[r.activity_id]} ({r.activity_id})"
        lines.append(f"| `{r.type}` | {r.when} | {target} | {activity} | {r.why} |")
    return "\n".join(lines) + "\n"


def _case(body: Mapping[str, Any]) -> str:
    """Which row of MAPPING an event falls under (its `when`)."""
    kind = body["type"]
    if kind == "net.connect":
        proto = body.get("protocol")
        outcome = "allowed" if body.get("decision") == "allow" else "denied"
        return (
            f"protocol {proto}, {outcome}" if proto in ("http", "ssh") else f"any other protocol, {outcome}"
        )
    if kind == "deny":
        layer, what = body.get("layer"), body.get("what")
        for when in (f"layer {layer}, what {what}", f"layer {layer}"):
            if ("deny", when) in _ROWS:
                return when
        return OTHER_LAYERS
    return ""


# --- MITRE ATT&CK ---------------------------------------------------------------------------------

TACTICS: dict[str, str] = {
    "TA0002": "Execution",
    "TA0003": "Persistence",
    "TA0004": "Privilege Escalation",
    "TA0005": "Defense Evasion",
    "TA0006": "Credential Access",
    "TA0007": "Discovery",
    "TA0008": "Lateral Movement",
    "TA0010": "Exfiltration",
    "TA0011": "Command and Control",
    "TA0040": "Impact",
}

# Every technique the built-in rules name (a test checks), and the parent of each sub-technique:
# its name and the tactic it serves in corral's rules (the first ATT&CK lists, where it lists more).
TECHNIQUES: dict[str, tuple[str, str]] = {
    "T1018": ("Remote System Discovery", "TA0007"),
    "T1021": ("Remote Services", "TA0008"),
    "T1021.004": ("SSH", "TA0008"),
    "T1030": ("Data Transfer Size Limits", "TA0010"),
    "T1036": ("Masquerading", "TA0005"),
    "T1046": ("Network Service Discovery", "TA0007"),
    "T1048": ("Exfiltration Over Alternative Protocol", "TA0010"),
    "T1048.002": ("Exfiltration Over Asymmetric Encrypted Non-C2 Protocol", "TA0010"),
    "T1048.003": ("Exfiltration Over Unencrypted Non-C2 Protocol", "TA0010"),
    "T1059": ("Command and Scripting Interpreter", "TA0002"),
    "T1059.004": ("Unix Shell", "TA0002"),
    "T1068": ("Exploitation for Privilege Escalation", "TA0004"),
    "T1071": ("Application Layer Protocol", "TA0011"),
    "T1071.004": ("DNS", "TA0011"),
    "T1090": ("Proxy", "TA0011"),
    "T1090.001": ("Internal Proxy", "TA0011"),
    "T1090.004": ("Domain Fronting", "TA0011"),
    "T1496": ("Resource Hijacking", "TA0040"),
    "T1499": ("Endpoint Denial of Service", "TA0040"),
    "T1543": ("Create or Modify System Process", "TA0003"),
    "T1548": ("Abuse Elevation Control Mechanism", "TA0004"),
    "T1552": ("Unsecured Credentials", "TA0006"),
    "T1552.001": ("Credentials In Files", "TA0006"),
    "T1552.005": ("Cloud Instance Metadata API", "TA0006"),
    "T1559": ("Inter-Process Communication", "TA0002"),
    "T1562": ("Impair Defenses", "TA0005"),
    "T1571": ("Non-Standard Port", "TA0011"),
    "T1572": ("Protocol Tunneling", "TA0011"),
    "T1611": ("Escape to Host", "TA0004"),
}


def attack(technique: str) -> dict[str, Any]:
    """OCSF's `attack` object for a technique id; a sub-technique (T1090.001) also names its parent
    as `technique`. An id the table lacks (a user's rule) keeps its uid, without name or tactic."""
    parent = technique.split(".", 1)[0]
    out: dict[str, Any] = {"technique": _named(parent)}
    if parent != technique:
        out["sub_technique"] = _named(technique)
    known = TECHNIQUES.get(technique) or TECHNIQUES.get(parent)
    if known is not None:
        out["tactic"] = {"uid": known[1], "name": TACTICS[known[1]]}
    return out


def _named(uid: str) -> dict[str, str]:
    known = TECHNIQUES.get(uid)
    return {"uid": uid} if known is None else {"uid": uid, "name": known[0]}


# --- one record -----------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEVERITY = {"critical": 5, "high": 4, "medium": 3, "low": 2, "info": 1}
_SEVERITY_NAMES = {1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
# An alert's response: (action_id, action, disposition_id, disposition).
_RESPONSE = {
    "log": (3, "Observed", 17, "Logged"),
    "alert": (3, "Observed", 19, "Alert"),
    "kill": (2, "Denied", 2, "Blocked"),
    "freeze": (2, "Denied", 3, "Quarantined"),
    "terminate": (2, "Denied", 2, "Blocked"),
}
_ALLOWED = {"action_id": 1, "action": "Allowed", "disposition_id": 1, "disposition": "Allowed"}
_BLOCKED = {"action_id": 2, "action": "Denied", "disposition_id": 2, "disposition": "Blocked"}
_OUTBOUND_TCP = {"direction_id": 2, "direction": "Outbound", "protocol_name": "tcp", "protocol_num": 6}
_COMMON = {"v", "time", "sandbox", "type"}


def to_ocsf(event: StoredEvent, sandbox: SandboxInfo | None) -> dict[str, Any] | None:
    """The OCSF record for one stored event, or None for a type that is not exported
    (`resource.sample`, `phase`: see MAPPING for why). `sandbox` (None when the store has no record of it)
    gives the labels and the host."""
    body = event.body
    row = _ROWS.get((event.type, _case(body)))
    if row is None:
        raise ValueError(
            f"no OCSF mapping for a {event.type!r} event (sandbox {event.sandbox}, seq {event.seq})"
        )
    if row.cls is None or row.activity_id is None:
        return None
    record, used = _BUILDERS[event.type](event, sandbox)
    severity = record.pop("severity_id", 1)
    cls, activity = row.cls, row.activity_id
    activity_name = cls.activities[activity]
    head: dict[str, Any] = {
        "class_uid": cls.uid,
        "class_name": cls.name,
        "category_uid": cls.category_uid,
        "category_name": cls.category_name,
        "activity_id": activity,
        "activity_name": activity_name,
        "type_uid": cls.uid * 100 + activity,
        "type_name": f"{cls.name}: {activity_name}",
        "time": _ms(event.time),
        "timezone_offset": 0,
        "severity_id": severity,
        "severity": _SEVERITY_NAMES[severity],
        "metadata": _metadata(event, sandbox),
        "device": _device(event.sandbox, sandbox),
    }
    unmapped = {k: v for k, v in body.items() if k not in used | _COMMON and v not in (None, "", [], {})}
    unmapped |= record.pop("unmapped", {})
    if event.hash:
        unmapped["hash"] = event.hash
    return head | record | ({"unmapped": unmapped} if unmapped else {})


def _metadata(event: StoredEvent, sandbox: SandboxInfo | None) -> dict[str, Any]:
    from corral import __version__

    meta: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT, "vendor_name": PRODUCT, "version": __version__},
        "profiles": list(PROFILES),
        "uid": f"{event.sandbox}:{event.seq}",
        "sequence": event.seq,
        "correlation_uid": event.sandbox,
        "event_code": event.type,
        "log_name": "events",
        "log_provider": PRODUCT,
        "log_version": str(event.body.get("v", "")),
    }
    if isinstance(event.body.get("time"), str):
        meta["original_time"] = event.body["time"]
    if sandbox is not None and sandbox.labels:
        meta["labels"] = [f"{k}={v}" for k, v in sandbox.labels.items()]
        meta["tags"] = [{"name": k, "value": v} for k, v in sandbox.labels.items()]
    return meta


def _device(sandbox_id: str, sandbox: SandboxInfo | None) -> dict[str, Any]:
    """The host, with the sandbox as its container. OCSF wants a device to name itself somehow: a
    host the store doesn't know is `name: unknown` (its records still join on container.uid)."""
    device: dict[str, Any] = {
        "type_id": 0,
        "type": "Unknown",
        "os": {"name": "Linux", "type_id": 200, "type": "Linux"},  # corral runs on Linux only
        "container": {"uid": sandbox_id, "runtime": PRODUCT},
    }
    if sandbox is not None and sandbox.host:
        device["uid"] = sandbox.host
    else:
        device["name"] = "unknown"
    return device


def _ms(t: datetime | str) -> int:
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # the store keeps UTC
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _seconds_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _process(ref: Mapping[str, Any]) -> dict[str, Any]:
    """OCSF `process` from a corral ProcessRef."""
    out: dict[str, Any] = {"pid": ref["pid"]}
    exe, cmdline = ref.get("exe"), ref.get("cmdline") or []
    if exe:
        name = os.path.basename(exe) or exe
        out["name"] = name
        out["file"] = {"name": name, "path": exe, "type_id": 1, "type": "Regular File"}
    elif cmdline:
        out["name"] = os.path.basename(cmdline[0]) or cmdline[0]
    if cmdline:
        out["cmd_line"] = shlex.join(cmdline)
    if ref.get("ns_pid") is not None:
        out["namespace_pid"] = ref["ns_pid"]
    if ref.get("started"):
        out["created_time"] = _ms(ref["started"])
    if ref.get("ppid") is not None:
        out["parent_process"] = {"pid": ref["ppid"]}
    return out


def _sandbox_process(sandbox: str) -> dict[str, Any]:
    """The sandbox as a whole: the process tree corral started for it."""
    return {"uid": sandbox}


def _command(sandbox: str, exec_id: int) -> dict[str, Any]:
    """A command run through the sandbox's exec (exec.start / exec.exit and what happened during it)."""
    return {"uid": f"{sandbox}:exec:{exec_id}"}


def _corral() -> dict[str, Any]:
    """The actor when corral itself acted: it starts and closes sandboxes and runs their commands."""
    return {"app_name": PRODUCT}


def _sandbox_actor(sandbox: str) -> dict[str, Any]:
    """The actor when a process in the sandbox acted but corral could not tell which."""
    return {"app_name": f"{PRODUCT} sandbox", "app_uid": sandbox}


def _actor(body: Mapping[str, Any]) -> dict[str, Any]:
    ref = body.get("process")
    return {"process": _process(ref)} if ref else _sandbox_actor(body["sandbox"])


def _subject(body: Mapping[str, Any]) -> dict[str, Any]:
    """The process an event is about: its ProcessRef, else the command, else the sandbox."""
    if body.get("process"):
        return _process(body["process"])
    if body.get("exec") is not None:
        return _command(body["sandbox"], body["exec"])
    return _sandbox_process(body["sandbox"])


def _sandbox_endpoint(sandbox: str) -> dict[str, Any]:
    return {"uid": sandbox, "container": {"uid": sandbox, "runtime": PRODUCT}}


def _endpoint(host: str | None, port: int | None) -> dict[str, Any] | None:
    """A network endpoint from an address or a name; None when there is neither."""
    out: dict[str, Any] = {}
    host = host.strip("[]") if host else host  # an IPv6 literal as a URL or CONNECT target writes it
    if host:
        try:
            ipaddress.ip_address(host)
            out["ip"] = host
        except ValueError:
            out["hostname"] = host
    if not out:
        return None
    if port is not None:
        out["port"] = port
    return out


_Built = tuple[dict[str, Any], set[str]]  # the class-specific attributes, the body fields they used


def _sandbox_start(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    process = _sandbox_process(event.sandbox) | {"user": {"uid": str(b["uid"])}}
    record = {"actor": {"app_name": PRODUCT}, "process": process, "status_id": 1, "status": "Success"}
    record["message"] = f"sandbox {event.sandbox} started"
    return record, {"uid"}


def _sandbox_stop(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    failed = b["reason"] == "failed"
    record: dict[str, Any] = {
        "actor": _corral(),
        "process": _sandbox_process(event.sandbox),
        "duration": _seconds_ms(b["duration"]),
        "status_id": 2 if failed else 1,
        "status": "Failure" if failed else "Success",
        "status_detail": b["reason"] + (f": {b['error']}" if b.get("error") else ""),
        "message": f"sandbox {event.sandbox} stopped ({b['reason']})",
    }
    if failed:
        record["severity_id"] = 2
    return record, {"reason", "duration", "error"}


def _exec_start(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    process = _command(event.sandbox, b["exec"])
    if b["command"]:
        process |= {"cmd_line": shlex.join(b["command"]), "name": os.path.basename(b["command"][0])}
    record = {"actor": _corral(), "process": process, "message": f"command {b['exec']} started"}
    return record, {"exec", "command"}


def _exec_exit(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    process = _command(event.sandbox, b["exec"])
    record = {
        "actor": {"process": process},  # it ended, or was ended by a signal corral does not trace
        "process": process,
        "exit_code": b["exit_code"],
        "duration": _seconds_ms(b["duration"]),
        "message": f"command {b['exec']} exited with {b['exit_code']}"
        + (" (timed out)" if b.get("timed_out") else ""),
    }
    return record, {"exec", "exit_code", "duration"}


def _proc_exec(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    process = _process(b["process"])
    if b.get("cwd"):
        process["working_directory"] = b["cwd"]
    parent = process.get("parent_process")
    actor = {"process": parent} if parent else _sandbox_actor(event.sandbox)
    record = {"actor": actor, "process": process, "message": f"started {process.get('cmd_line', '')}"}
    return record, {"process", "cwd"}


def _proc_exit(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    process = _process({"pid": b["pid"], "cmdline": b.get("cmdline") or []})
    record: dict[str, Any] = {"actor": {"process": process}, "process": process}
    if b.get("exit_code") is not None:
        record["exit_code"] = b["exit_code"]
    if b.get("duration") is not None:
        record["duration"] = _seconds_ms(b["duration"])
    record["message"] = f"pid {b['pid']} exited" + (
        f" with {b['exit_code']}" if b.get("exit_code") is not None else ""
    )
    return record, {"pid", "cmdline", "exit_code", "duration"}


def _proc_seccomp(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    call = "prctl" if b["how"] == "prctl" else "seccomp"
    record = {
        "actor": _actor(b),
        "kernel": {"name": call, "system_call": call, "type_id": 2, "type": "System Call"},
        "message": f"installed a seccomp filter ({b['how']})",
        "status_detail": b["how"],
        **_ALLOWED,
    }
    return record, {"process", "how"}


def _net_connect(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    allowed = b["decision"] == "allow"
    # The address to report: the one corral dialled; else what the program dialled, unless that is a
    # synthetic address corral's resolver made up for a name it knows (the name says more).
    address = b.get("address")
    synthetic = ipaddress.ip_address(b["destination"]) in SYNTHETIC
    if address is None and not (synthetic and b.get("name")):
        address = b["destination"]
    dst: dict[str, Any] = {"port": b["port"]}
    if address:
        dst["ip"] = address
    if b.get("name"):
        dst["hostname"] = b["name"]
    record: dict[str, Any] = {
        "actor": _actor(b),
        "src_endpoint": _sandbox_endpoint(event.sandbox),
        "dst_endpoint": dst,
        "connection_info": dict(_OUTBOUND_TCP),
        "traffic": {
            "bytes_out": b["bytes_out"],
            "bytes_in": b["bytes_in"],
            "bytes": b["bytes_out"] + b["bytes_in"],
        },
        "duration": _seconds_ms(b["duration"]),
        "status_id": 1 if allowed else 2,
        "status": "Success" if allowed else "Failure",
        "status_detail": b["reason"],
        "message": f"{b['protocol']} connection to {b.get('name') or b['destination']} port {b['port']} "
        f"{'allowed' if allowed else 'denied'}: {b['reason']}",
        **(_ALLOWED if allowed else _BLOCKED),
    }
    used = {"address", "port", "name", "decision", "reason", "bytes_out", "bytes_in", "duration", "process"}
    if not allowed:
        record["severity_id"] = 2
    if b["protocol"] == "http":
        host = (b.get("sni") or b.get("name") or address or b["destination"]).strip("[]")
        authority = f"[{host}]" if ":" in host else host
        url = {
            "hostname": host,
            "port": b["port"],
            "scheme": "http",
            "url_string": f"http://{authority}" + ("" if b["port"] == 80 else f":{b['port']}"),
        }
        record["http_request"] = {"url": url}
        used.add("sni")
    return record, used


def _dns_query(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    allowed = b["decision"] == "allow"
    record: dict[str, Any] = {
        "actor": _actor(b),
        "src_endpoint": _sandbox_endpoint(event.sandbox),
        "query": {"hostname": b["name"], "type": b["qtype"], "class": "IN"},
        "status_id": 1 if allowed else 2,
        "status": "Success" if allowed else "Failure",
        "message": f"{b['qtype']} query for {b['name']} {'answered' if allowed else 'refused'}",
        **(_ALLOWED if allowed else _BLOCKED),
    }
    if allowed:
        record["rcode_id"], record["rcode"] = 0, "NoError"
    else:
        record["severity_id"] = 2
    if b.get("answer"):
        # synthetic addresses corral's resolver gave out (see docs/events.md), not upstream answers
        record["answers"] = [
            {"rdata": a, "type": "AAAA" if ":" in a else "A", "class": "IN"} for a in b["answer"]
        ]
    return record, {"name", "qtype", "decision", "answer", "process"}


_EGRESS_WHAT = re.compile(r"^(?:(udp) )?(\S+) port (\d+)$")  # docs/events.md: `deny` of layer egress


def _deny(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    layer, what = b["layer"], b["what"]
    record: dict[str, Any] = {"severity_id": 2, "status_id": 2, "status": "Failure", **_BLOCKED}
    record["message"] = f"{layer} refused {what}" + (f": {b['detail']}" if b.get("detail") else "")
    if b.get("detail"):
        record["status_detail"] = b["detail"]
    if b.get("count", 1) > 1:
        record["count"] = b["count"]
    if b.get("first"):
        record["start_time"] = _ms(b["first"])
    if b.get("last"):
        record["end_time"] = _ms(b["last"])
    used = {"detail", "count", "first", "last", "process"}  # layer and what stay in unmapped too
    if layer == "egress":
        record["actor"] = _actor(b)
        record["src_endpoint"] = _sandbox_endpoint(event.sandbox)
        m = _EGRESS_WHAT.match(what)
        if m is not None:
            udp, host, port = m.groups()
            record["dst_endpoint"] = _endpoint(host, int(port))
            record["connection_info"] = (
                {"direction_id": 2, "direction": "Outbound", "protocol_name": "udp", "protocol_num": 17}
                if udp
                else dict(_OUTBOUND_TCP)
            )
    elif layer == "dns":
        # `names`: the sandbox's budget of names ran out; the name asked for opens `detail`
        # (resolver.py), and the query was answered REFUSED rather than NXDOMAIN
        budget = what == "names"
        name = b.get("detail", "").split(":", 1)[0] if budget and b.get("detail") else what
        record["actor"] = _actor(b)
        record["src_endpoint"] = _sandbox_endpoint(event.sandbox)
        record["query"] = {"hostname": name, "class": "IN"}
        record["rcode_id"], record["rcode"] = (5, "Refused") if budget else (3, "NXDomain")
    elif layer == "seccomp":
        record["actor"] = _actor(b)
        record["kernel"] = {"name": what, "system_call": what, "type_id": 2, "type": "System Call"}
    else:
        record["actor"] = _actor(b) if b.get("process") else _corral()
        record["process"] = _subject(b)
        used.add("exec")
    return record, used


def _alert(event: StoredEvent, _: SandboxInfo | None) -> _Built:
    b = event.body
    action_id, action, disposition_id, disposition = _RESPONSE[b["action"]]
    tags = b.get("tags") or {}
    finding: dict[str, Any] = {
        "uid": f"{event.sandbox}:{event.seq}",
        "title": b["rule"],
        "desc": b["message"],
        "types": [b["category"]],
        "analytic": {"name": b["rule"], "type_id": 1, "type": "Rule", "category": b["category"]},
        "created_time": _ms(event.time),
    }
    if tags.get("mitre"):
        finding["attacks"] = [attack(t) for t in tags["mitre"]]
    if tags.get("owasp"):
        finding["tags"] = [{"name": "owasp_agentic", "values": list(tags["owasp"])}]
    evidence = b.get("evidence") or {}
    evidences: list[dict[str, Any]] = [{"process": _process(p)} for p in evidence.get("processes") or []]
    for conn in evidence.get("connections") or []:
        dst = _endpoint(conn.get("address") or conn.get("destination"), conn.get("port"))
        if dst is not None:
            evidences.append({"dst_endpoint": dst, "connection_info": dict(_OUTBOUND_TCP)})
    severity = _SEVERITY[b["severity"]]
    record: dict[str, Any] = {
        "finding_info": finding,
        "severity_id": severity,
        "is_alert": b["action"] != "log",
        "status_id": 1,
        "status": "New",
        "message": b["message"],
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
    }
    if b.get("outcome"):
        record["status_detail"] = b["outcome"]
    if b.get("process"):
        record["actor"] = {"process": _process(b["process"])}
    if evidences:
        record["evidences"] = evidences
    rest = {k: v for k, v in evidence.items() if k in ("trigger", "related") and v}
    if rest:
        record["unmapped"] = {"evidence": rest}  # what the rule fired on: corral's own fields
    used = {"rule", "message", "category", "severity", "action", "outcome", "process", "tags", "evidence"}
    return record, used


_BUILDERS = {
    "sandbox.start": _sandbox_start,
    "sandbox.stop": _sandbox_stop,
    "exec.start": _exec_start,
    "exec.exit": _exec_exit,
    "proc.exec": _proc_exec,
    "proc.exit": _proc_exit,
    "proc.seccomp": _proc_seccomp,
    "net.connect": _net_connect,
    "dns.query": _dns_query,
    "deny": _deny,
    "alert": _alert,
}


# --- the export -----------------------------------------------------------------------------------

Format = Literal["jsonl", "ocsf"]
FORMATS: tuple[Format, ...] = ("jsonl", "ocsf")


def export(
    events: Iterable[StoredEvent], sandboxes: Mapping[str, SandboxInfo], fmt: Format, out: TextIO
) -> int:
    """Writes one JSON object a line to `out`, one event at a time (nothing is held but the event
    being written), and returns how many it wrote.

    jsonl: the event as stored, plus `seq`, `hash` and its sandbox's `labels`.
    ocsf: `to_ocsf`'s record; the types it doesn't export are skipped.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    written = 0
    for event in events:
        info = sandboxes.get(event.sandbox)
        record: dict[str, Any] | None
        if fmt == "jsonl":
            labels = dict(info.labels) if info is not None else {}
            record = {**event.body, "seq": event.seq, "hash": event.hash, "labels": labels}
        else:
            record = to_ocsf(event, info)
            if record is None:
                continue
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += 1
    return written
