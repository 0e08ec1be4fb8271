"""Atomic Red Team's Linux tests, loaded from the corpus for corral's atomics suite.

The attack commands come from the YAML definitions in `../shared/corpora/atomic-red-team/` (MIT, see
SOURCE.md there), never retyped here: `load()` parses each technique file, keeps the tests whose
`supported_platforms` include linux, and fills `#{argument}` placeholders with the file's defaults, or
with an override from `OVERRIDES` where the default points at the real world (every override says why).

What this module adds is judgement, kept in tables keyed by each test's GUID so it survives upstream
renumbering:

- `NOT_RUNNABLE`: why a Linux test can't run here (a download, a tool this machine lacks, a login);
  executors other than sh/bash (`manual`) are refused without an entry;
- `EXPECTED`: the corral alert categories that should fire when the test runs, and why (an empty tuple
  is a claim too: nothing should fire, and a tripwire that does is a false alert);
- `TOOLS`: the programs a runnable test needs, checked by a unit test so a missing one fails loudly;
- `TIMEOUTS`: for the commands that would otherwise run for minutes or forever.

`python tests/atomics.py` rewrites docs/atomics.md from these tables; a unit test keeps it in step.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_args

import yaml

from corral.events.model import AlertCategory

REPO_ROOT = Path(__file__).resolve().parent.parent
# The corpus sits next to the repository (CI has the same layout), read-only and shared between checkouts;
# CORRAL_ATOMICS_CORPUS points elsewhere (a checkout with another layout).
CORPUS = Path(
    os.environ.get("CORRAL_ATOMICS_CORPUS") or REPO_ROOT.parent / "shared" / "corpora" / "atomic-red-team"
)
DOC = REPO_ROOT / "docs" / "atomics.md"
CASES_DOC_COMMAND = ".venv/bin/python tests/atomics.py"

TECHNIQUES = (
    "T1018",
    "T1046",
    "T1048",
    "T1048.003",
    "T1059.004",
    "T1090.001",
    "T1496",
    "T1552.005",
    "T1571",
    "T1572",
)
# The alert categories: the event schema's own.
CATEGORIES = frozenset(get_args(AlertCategory))
RUNNABLE_EXECUTORS = frozenset({"sh", "bash"})

# Atomic tests assume an administrator's PATH: arp, ip and useradd live in /usr/sbin on Debian. corral's
# default PATH has no sbin, so `command -v arp` would fail for a reason that has nothing to do with the
# sandbox. The sandbox policy of the atomics suite sets this PATH; tools are found on it, here and there.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TIMEOUT = 30.0

# Stand-ins the overrides point at. Names under example.internal are never real; 10.0.0.0/8 is private and
# 203.0.113.0/24 (TEST-NET-3) is documentation space: the egress fence refuses both unless a policy names
# them, and the suite runs in a loopback-only network namespace besides.
INTERNAL_ADDRESS = "10.0.0.1"
OUTSIDE_ADDRESS = "203.0.113.10"
PROXY_NAME = "proxy.example.internal"
PROXY_PORT = 3128
WEB_NAME = "web.example.internal"
SCRIPTS_NAME = "scripts.example.internal"


class Arg(NamedTuple):
    value: str
    why: str


# guid -> {input argument: replacement}. Only arguments whose default targets the outside world (or makes
# the run pointless or endless) are overridden; everything else keeps the corpus's default.
OVERRIDES: dict[str, dict[str, Arg]] = {
    # T1046 #1 Port Scan (bash /dev/tcp loop)
    "68e907da-2539-48f6-9fc9-257a78c05540": {
        "host": Arg(
            INTERNAL_ADDRESS, "192.168.1.1 is a real LAN address; scan the internal range the suite uses"
        ),
    },
    # T1046 #12 Port Scan using nmap (Port range)
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97": {
        "host": Arg(
            INTERNAL_ADDRESS,
            "127.0.0.1 would scan the sandbox's own loopback, which never reaches the fence; "
            "the technique is about internal hosts",
        ),
        "port_range": Arg(
            "1-100",
            "every refused port looks open through the fence, so -sV probes each one; 0-65535 would "
            "take minutes, 100 ports are still a scan",
        ),
    },
    # T1048 #1 Exfiltration Over Alternative Protocol - SSH (remote tar of /etc)
    "f6786cc8-beda-4915-a4d6-ac2f193bb988": {
        "domain": Arg(
            OUTSIDE_ADDRESS, "target.example.com is a registered domain; an outside address instead"
        ),
    },
    # T1048 #2 Exfiltration Over Alternative Protocol - SSH (tar | openssl | ssh)
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268": {
        "domain": Arg(
            OUTSIDE_ADDRESS, "target.example.com is a registered domain; an outside address instead"
        ),
    },
    # T1059.004 #1 Create and Execute Bash Shell Script
    "7e7ac3ed-f795-4fa5-b711-09d6fbe9b873": {
        "host": Arg(OUTSIDE_ADDRESS, "8.8.8.8 is a real public resolver; a documentation address instead"),
    },
    # T1059.004 #12 Detecting pipe-to-shell
    "fca246a8-a585-4f28-a2df-6495973976a1": {
        "remote_url": Arg(
            f"https://{SCRIPTS_NAME}/pipe-to-shell.sh",
            "the payload lives on GitHub; a name no policy allows, so the fetch is refused at the fence",
        ),
    },
    # T1090.001 #1 Connection Proxy
    "0ac21132-4485-4212-a681-349e8a6637cd": {
        "proxy_server": Arg(
            PROXY_NAME,
            "the default expects a proxy on the sandbox's own loopback (none there, nothing reaches the "
            "fence); an internal proxy the policy allows on port 3128, backed by a local listener",
        ),
        "test_url": Arg(
            f"http://{WEB_NAME}", "http://google.com is the real world; a name under example.internal"
        ),
    },
}

_DOWNLOAD = "its prerequisite downloads the tool from the internet ({what}), which this suite never does"
_LOGIN = "and the tunnel needs a logged-in account at the vendor's service"

# guid -> why the test can't run here. Executors other than sh/bash need no entry.
NOT_RUNNABLE: dict[str, str] = {
    # T1018 #7 Remote System Discovery - sweep
    "96db2632-8417-4dbb-b8bb-a8b92ba391de": (
        "ping (iputils-ping) is not installed here and the test declares no prerequisite for it, so all 254 "
        "iterations would only print 'not found'; in a sandbox ICMP is dropped by the fence anyway"
    ),
    # T1046 #2 Port Scan Nmap
    "515942b0-a09f-4163-a7bb-22fefb6f185f": (
        "prerequisite `command -v telnet` fails (telnet is not installed; get_prereq_command installs it "
        "with apt-get or yum, a download), and the command starts with sudo, which is not installed either"
    ),
    # T1048 #4 Exfiltrate Data using DNS Queries via dig
    "a27916da-05f2-4316-a3ee-feec67a437be": (
        "prerequisite `which dig` fails (bind9-dnsutils is not installed; get_prereq_command installs it "
        "with sudo and a package manager, a download)"
    ),
    # T1059.004 #2 Command-Line Interface
    "d0c88567-803d-4dca-99b4-7ce65e7b257c": (
        "pipes a script downloaded from raw.githubusercontent.com into bash; the URL is written into the "
        "command, not an input argument, so it can't be pointed at a stand-in without retyping the command"
    ),
    # T1059.004 #3 Harvest SUID executable files
    "46274fc6-08a7-4956-861b-24cbbaa0503c": _DOWNLOAD.format(what="AutoSUID.sh from GitHub"),
    # T1059.004 #4 LinEnum tool execution
    "a2b35a63-9df1-4806-9a4d-5fe0500845f2": _DOWNLOAD.format(what="LinEnum.sh from GitHub"),
    # T1059.004 #16 Shell Creation using busybox command
    "ab4d04af-68dc-4fee-9c16-6545265b3276": (
        "busybox is not installed here and the test declares no prerequisite for it"
    ),
    # T1059.004 #17 emacs spawning an interactive system shell
    "e0742e38-6efe-4dd4-ba5c-2078095b6156": (
        "prerequisite `command -v emacs` fails (get_prereq_command installs it with apt, a download), and "
        "sudo is not installed"
    ),
    # T1571 #2 Testing usage of uncommonly used port
    "5db21e1d-dd9c-4a50-b885-b1e748912767": (
        "prerequisite `which telnet` fails: telnet is not installed, and get_prereq_command only says "
        "'please install telnet'"
    ),
    # T1572 #5 Microsoft Dev tunnels
    "9f94a112-1ce2-464d-a63b-83c1f465f801": _DOWNLOAD.format(what="devtunnel from aka.ms") + ", " + _LOGIN,
    # T1572 #6 VSCode tunnels
    "b877943f-0377-44f4-8477-f79db7f07c4d": _DOWNLOAD.format(what="the VS Code CLI package") + ", " + _LOGIN,
    # T1572 #7 Cloudflare tunnels
    "228c336a-2f79-4043-8aef-bfa453a611d5": _DOWNLOAD.format(what="cloudflared from GitHub releases"),
}

_NOTHING_LEAVES = (
    "reads the sandbox's own network namespace (loopback only); no packet is sent, nothing to trip"
)

# guid -> (categories that should fire, why). Every Linux test has an entry, runnable or not.
EXPECTED: dict[str, tuple[tuple[str, ...], str]] = {
    # --- T1018 Remote System Discovery
    "acb6b1ff-e2ad-4d64-806c-6c35fe73b951": ((), "arp -a: " + _NOTHING_LEAVES),
    "96db2632-8417-4dbb-b8bb-a8b92ba391de": (
        ("probe",),
        "a ping sweep of 254 internal addresses is the textbook internal probe",
    ),
    "158bd4dd-6359-40ab-b13c-285b9ef6fa25": ((), "ip neighbour: " + _NOTHING_LEAVES),
    "1a4ebe70-31d0-417b-ade2-ef4cb3e7d0e1": ((), "ip route: " + _NOTHING_LEAVES),
    "d2791d72-b67f-4615-814f-ec824a91f514": ((), "netstat -r: " + _NOTHING_LEAVES),
    "6c2da894-0b57-43cb-87af-46ea3b501388": ((), "ip tcp_metrics: " + _NOTHING_LEAVES),
    # --- T1046 Network Service Discovery
    "68e907da-2539-48f6-9fc9-257a78c05540": (
        ("probe",),
        "connects to every port of an internal address in turn: a port scan, not a shell (the /dev/tcp "
        "redirection carries only a newline)",
    ),
    "515942b0-a09f-4163-a7bb-22fefb6f185f": (
        ("probe", "privilege"),
        "an nmap SYN sweep of an internal /24 then telnet and nc to one host: a probe, started through sudo",
    ),
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97": (
        ("probe",),
        "nmap scanning and fingerprinting an internal host's ports",
    ),
    # --- T1048 Exfiltration Over Alternative Protocol
    "f6786cc8-beda-4915-a4d6-ac2f193bb988": (
        ("tunnel",),
        "an SSH session to an outside host no policy allows; the archive flows in, not out, so the signal "
        "is the outbound SSH channel, not the volume sent",
    ),
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268": (
        ("exfiltration",),
        "an encrypted archive piped into ssh to an outside host: exfiltration by construction (on Linux "
        "/Users is missing and `-pass atomic` is rejected, so only the attempt is there to see)",
    ),
    "a27916da-05f2-4316-a3ee-feec67a437be": (
        ("exfiltration", "tunnel"),
        "a secret encoded into a DNS name sent to an outside resolver: exfiltration by intent, a DNS tunnel "
        "by mechanism",
    ),
    # --- T1048.003 Exfiltration Over Unencrypted Non-C2 Protocol
    "1d1abbd6-a3d3-4b2e-bef5-c59293f46eff": (
        (),
        "a web server in the sandbox for another machine to pull from: the sandbox has no inbound path",
    ),
    "c403b5a4-b5fc-49f2-b181-d1c80d27db45": (
        ("exfiltration", "tunnel"),
        "a file hex-encoded into DNS labels: exfiltration by intent, a DNS tunnel by mechanism",
    ),
    "3ea1f938-f80a-4305-9aa8-431bc4867313": (
        (),
        "python3 -m http.server binds port 9090 in the sandbox's own namespace, which nothing outside can "
        "reach, and is killed after 10 s: nothing is served, nothing leaves",
    ),
    # --- T1059.004 Unix Shell
    "7e7ac3ed-f795-4fa5-b711-09d6fbe9b873": (
        (),
        "writes a two-line script to /tmp and runs it; its ping line fails (ping is not installed): "
        "ordinary shell use",
    ),
    "d0c88567-803d-4dca-99b4-7ce65e7b257c": (
        (),
        "curl | bash of a script that echoes ASCII art; installers are fetched this way every day, and the "
        "fence refuses the download unless a policy allows GitHub",
    ),
    "46274fc6-08a7-4956-861b-24cbbaa0503c": (
        ("privilege",),
        "AutoSUID hunts for set-uid binaries to escalate with: a privilege-escalation attempt",
    ),
    "a2b35a63-9df1-4806-9a4d-5fe0500845f2": (
        ("privilege",),
        "LinEnum enumerates escalation paths (sudo -l, SUID files, shadow, cron): privilege reconnaissance",
    ),
    "8cd1947b-4a54-41fb-b5ea-07d0ace04f81": ((), "runs `id` from a temporary script: ordinary shell use"),
    "7b38e5cc-47be-44f0-a425-390305c76c17": ((), "prints $0 and $SHELL: ordinary shell use"),
    "bf23c7dc-1004-4949-8262-4c1d1ef87702": ((), "cat /etc/shells: ordinary shell use"),
    "b04ed73c-7d43-4dc8-b563-a2fc595cba1a": (
        (),
        "echo and sleep in a loop for five seconds: ordinary shell use",
    ),
    "5bec4cc8-f41e-437b-b417-33ff60acf9af": (
        (),
        "base64-decodes `id` into bash: obfuscated, but a harmless command with no socket anywhere",
    ),
    "c7ac59cb-13cc-4622-81dc-6d2fee9bfac7": (
        ("privilege",),
        "useradd, chsh and userdel change the host's account database, which only root may do: the attempt "
        "is the signal",
    ),
    "bdaebd56-368b-4970-a523-f905ff4a8a51": ((), "pipes an echo command to /bin/sh: ordinary shell use"),
    "fca246a8-a585-4f28-a2df-6495973976a1": (
        (),
        "curl | bash from a host the policy doesn't allow: the fetch is refused and bash runs nothing; one "
        "refused fetch is ordinary",
    ),
    "3a53734a-9e26-4f4b-ad15-059e767f5f14": ((), "uname -srm: ordinary shell use"),
    "ee72b37d-b8f5-46a5-a9e7-0ff50035ffd5": (
        (),
        "awk starts `/bin/sh &`, whose stdin is /dev/null, so it exits at once; no socket, so not a reverse "
        "shell, and nothing outlives the command",
    ),
    "bcd4c2bc-490b-4f91-bd31-3709fe75bbdf": (
        (),
        "cpan's shell escape starts `/bin/sh &`, which exits at once (stdin is /dev/null); cpan's own index "
        "downloads are refused by the fence, as any package manager's would be offline",
    ),
    "ab4d04af-68dc-4fee-9c16-6545265b3276": ((), "busybox sh in the background with no input: exits at once"),
    "e0742e38-6efe-4dd4-ba5c-2078095b6156": (
        ("privilege",),
        "sudo emacs to get a root shell from an editor: a privilege-escalation attempt",
    ),
    # --- T1090.001 Internal Proxy
    "0ac21132-4485-4212-a681-349e8a6637cd": (
        ("tunnel",),
        "curl sends a forward-proxy request for another host through an internal proxy: relaying traffic "
        "through a proxy is what the tunnel category covers",
    ),
    # --- T1496 Resource Hijacking
    "904a5a0e-fb02-490d-9f8d-0e256eb37549": (
        (),
        "`yes > /dev/null` inside the agent's own command: a foreground CPU burn can't be told from a build "
        "or a numeric job, which must not alert; the CPU quota and the command timeout bound it (mining "
        "rules fire on pools, miners, and CPU burnt outside a command)",
    ),
    # --- T1552.005 Cloud Instance Metadata API
    "c9aa1ca4-04df-4623-adac-1f199ca5ce42": (
        ("probe",),
        "three requests to the metadata address 169.254.169.254 for IAM credentials",
    ),
    # --- T1571 Non-Standard Port
    "5db21e1d-dd9c-4a50-b885-b1e748912767": (
        (),
        "one telnet to a name outside the policy on port 8081: a single refused lookup, which benign work "
        "produces too",
    ),
    # --- T1572 Protocol Tunneling
    "9f94a112-1ce2-464d-a63b-83c1f465f801": (
        ("tunnel", "lingering"),
        "devtunnel exposes a local port through Microsoft's relay, started in the background",
    ),
    "b877943f-0377-44f4-8477-f79db7f07c4d": (
        ("tunnel", "lingering"),
        "`code tunnel` exposes the machine through Microsoft's relay, left running with nohup",
    ),
    "228c336a-2f79-4043-8aef-bfa453a611d5": (
        ("tunnel", "lingering"),
        "cloudflared exposes a local port through Cloudflare, left running with nohup",
    ),
}

# guid -> programs the runnable test needs (beyond sh/bash). Where the test declares prerequisites, these
# include every tool its prereq_command checks for (a unit test holds the two together).
TOOLS: dict[str, tuple[str, ...]] = {
    "acb6b1ff-e2ad-4d64-806c-6c35fe73b951": ("arp", "grep"),  # net-tools
    "158bd4dd-6359-40ab-b13c-285b9ef6fa25": ("ip",),
    "1a4ebe70-31d0-417b-ade2-ef4cb3e7d0e1": ("ip",),
    "d2791d72-b67f-4615-814f-ec824a91f514": ("netstat", "grep"),  # net-tools
    "6c2da894-0b57-43cb-87af-46ea3b501388": ("ip", "grep"),
    "68e907da-2539-48f6-9fc9-257a78c05540": ("bash",),
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97": ("nmap",),
    "f6786cc8-beda-4915-a4d6-ac2f193bb988": ("ssh",),
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268": ("tar", "openssl", "ssh"),
    "3ea1f938-f80a-4305-9aa8-431bc4867313": ("python3", "sleep"),
    "7e7ac3ed-f795-4fa5-b711-09d6fbe9b873": ("chmod",),
    "8cd1947b-4a54-41fb-b5ea-07d0ace04f81": ("mktemp", "bash"),
    "7b38e5cc-47be-44f0-a425-390305c76c17": ("env", "grep", "printenv"),
    "bf23c7dc-1004-4949-8262-4c1d1ef87702": ("cat",),
    "b04ed73c-7d43-4dc8-b563-a2fc595cba1a": ("seq", "sleep"),
    "5bec4cc8-f41e-437b-b417-33ff60acf9af": ("base64", "bash"),
    "c7ac59cb-13cc-4622-81dc-6d2fee9bfac7": ("useradd", "chsh", "userdel", "cat", "grep"),
    "bdaebd56-368b-4970-a523-f905ff4a8a51": (),
    "fca246a8-a585-4f28-a2df-6495973976a1": ("curl", "bash", "ls"),
    "3a53734a-9e26-4f4b-ad15-059e767f5f14": ("uname",),
    "ee72b37d-b8f5-46a5-a9e7-0ff50035ffd5": ("awk",),
    "bcd4c2bc-490b-4f91-bd31-3709fe75bbdf": ("cpan",),  # perl, which git depends on
    "0ac21132-4485-4212-a681-349e8a6637cd": ("curl",),
    "904a5a0e-fb02-490d-9f8d-0e256eb37549": ("yes",),
    "c9aa1ca4-04df-4623-adac-1f199ca5ce42": ("curl",),
}

# guid -> (seconds, why): commands that never end on their own, or end only after minutes.
TIMEOUTS: dict[str, tuple[float, str]] = {
    "68e907da-2539-48f6-9fc9-257a78c05540": (
        5.0,
        "the loop over ports 1-65535 is written into the command; five seconds of it is the scan",
    ),
    "904a5a0e-fb02-490d-9f8d-0e256eb37549": (3.0, "`yes` runs until stopped; the command timeout stops it"),
}

# guid -> what a reader of the table should know about a runnable test's run here.
NOTES: dict[str, str] = {
    "7e7ac3ed-f795-4fa5-b711-09d6fbe9b873": "ping is not installed, so the script's second line fails",
    "7c3cb337-35ae-4d06-bf03-3032ed2ec268": "on Linux tar finds no /Users and openssl rejects `-pass atomic`",
    "c7ac59cb-13cc-4622-81dc-6d2fee9bfac7": "elevation_required: run unprivileged, it must fail contained",
    "0d5a2b03-3a26-45e4-96ae-89485b4d1f97": (
        "elevation_required: unprivileged nmap falls back to a connect scan"
    ),
    "bcd4c2bc-490b-4f91-bd31-3709fe75bbdf": "cpan's first run tries to fetch its index; the fence refuses it",
    "3ea1f938-f80a-4305-9aa8-431bc4867313": "sleeps 10 s by design",
    "c9aa1ca4-04df-4623-adac-1f199ca5ce42": (
        "metadata_endpoint keeps its default, 169.254.169.254: the fence must refuse the metadata address, "
        "and the suite's namespace has no route to it"
    ),
}

_PLACEHOLDER = re.compile(r"#\{(\w+)\}")


@dataclass(frozen=True)
class AtomicCase:
    technique: str
    number: int  # the test's position in its file, as Atomic Red Team numbers them (T1046-12)
    name: str
    guid: str
    platforms: tuple[str, ...]
    executor: str
    elevation_required: bool
    command: str  # after substitution
    cleanup: str  # after substitution; "" when the test has none
    prereqs: tuple[str, ...]  # each dependency's prereq_command, after substitution
    prereq_executor: str
    arguments: dict[str, str]  # every input argument's value, after overrides
    overrides: dict[str, Arg]
    runnable: bool
    reason: str  # why not runnable; "" when it runs
    expected: tuple[str, ...]  # alert categories that should fire
    why_expected: str
    tools: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    notes: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.technique}-{self.number}"

    def argv(self, command: str | None = None) -> list[str]:
        """How Atomic Red Team's runners start a command: the executor's shell with -c."""
        return [self.executor, "-c", self.command if command is None else command]


class CorpusMissing(RuntimeError):
    pass


def _substitute(text: str, values: dict[str, str]) -> str:
    # An unknown placeholder is left as is, as Atomic Red Team's runners do; a unit test checks that no
    # runnable command keeps one.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _default(spec: dict[str, Any]) -> str:
    value = spec.get("default")
    return "" if value is None else str(value)


def technique_file(technique: str, corpus: Path = CORPUS) -> Path:
    return corpus / f"{technique}.yaml"


def load(corpus: Path = CORPUS) -> list[AtomicCase]:
    """Every Linux atomic test of `TECHNIQUES`, in file order. Raises CorpusMissing when the corpus or a
    technique file is absent: the suite must fail then, never skip."""
    if not corpus.is_dir():
        raise CorpusMissing(
            f"Atomic Red Team corpus not found at {corpus}: it is expected next to the repository, at "
            "../shared/corpora/atomic-red-team/ (see its SOURCE.md)"
        )
    cases: list[AtomicCase] = []
    for technique in TECHNIQUES:
        path = technique_file(technique, corpus)
        if not path.is_file():
            raise CorpusMissing(f"{path}: technique file missing from the Atomic Red Team corpus")
        data = yaml.safe_load(path.read_text())
        if data.get("attack_technique") != technique:
            raise ValueError(f"{path}: attack_technique is {data.get('attack_technique')!r}, not {technique}")
        for number, test in enumerate(data["atomic_tests"], start=1):
            platforms = tuple(test["supported_platforms"])
            if "linux" not in platforms:
                continue
            cases.append(_case(technique, number, test, platforms))
    return cases


def _case(technique: str, number: int, test: dict[str, Any], platforms: tuple[str, ...]) -> AtomicCase:
    guid = test["auto_generated_guid"]
    executor = test["executor"]
    overrides = OVERRIDES.get(guid, {})
    specs: dict[str, dict[str, Any]] = test.get("input_arguments") or {}
    unknown = set(overrides) - set(specs)
    if unknown:
        raise ValueError(f"{technique}-{number}: overrides for arguments it doesn't have: {sorted(unknown)}")
    values = {name: _default(spec) for name, spec in specs.items()}
    values.update({name: arg.value for name, arg in overrides.items()})
    command = executor.get("command") or executor.get("steps") or ""
    dependencies = test.get("dependencies") or []
    if executor["name"] not in RUNNABLE_EXECUTORS:
        reason = (
            "manual steps for an operator on two machines; nothing to execute"
            if executor["name"] == "manual"
            else f"executor {executor['name']!r} is not a Unix shell"
        )
    else:
        reason = NOT_RUNNABLE.get(guid, "")
    expected, why = EXPECTED.get(guid, ((), ""))
    timeout, timeout_why = TIMEOUTS.get(guid, (DEFAULT_TIMEOUT, ""))
    notes = [f"{name} = {arg.value}: {arg.why}" for name, arg in overrides.items()]
    if timeout_why:
        notes.append(f"stopped after {timeout:g} s: {timeout_why}")
    if guid in NOTES:
        notes.append(NOTES[guid])
    return AtomicCase(
        technique=technique,
        number=number,
        name=test["name"],
        guid=guid,
        platforms=platforms,
        executor=executor["name"],
        elevation_required=bool(executor.get("elevation_required", False)),
        command=_substitute(command, values),
        cleanup=_substitute(executor.get("cleanup_command") or "", values),
        prereqs=tuple(_substitute(d["prereq_command"], values) for d in dependencies),
        prereq_executor=test.get("dependency_executor_name") or executor["name"],
        arguments=values,
        overrides=dict(overrides),
        runnable=not reason,
        reason=reason,
        expected=expected,
        why_expected=why,
        tools=TOOLS.get(guid, ()),
        timeout=timeout,
        notes=tuple(notes),
    )


_PREREQ_TOOL = re.compile(r"(?:command -v|which)\s+([\w.+-]+)")

# guid -> why the tools its prereq_command names are not needed with the arguments used here.
PREREQ_SHORT_CIRCUIT: dict[str, str] = {
    # T1090.001 #1: `[ "false" = "false" ] || (squid ...)`: squid only matters when run_squid is true.
    "0ac21132-4485-4212-a681-349e8a6637cd": "run_squid defaults to false: the squid check is never reached",
}


def prerequisite_tools(case: AtomicCase) -> set[str]:
    """The programs the test's own prereq_commands check for (`command -v X`, `which X`)."""
    if case.guid in PREREQ_SHORT_CIRCUIT:
        return set()
    return {m.group(1) for prereq in case.prereqs for m in _PREREQ_TOOL.finditer(prereq)}


# --------------------------------------------------------------------------------------------------
# docs/atomics.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_doc(cases: list[AtomicCase]) -> str:
    runnable = sum(c.runnable for c in cases)
    lines = [
        "# Atomic Red Team in corral sandboxes",
        "",
        f"<!-- Generated by `{CASES_DOC_COMMAND}` from tests/atomics.py and the corpus; do not edit. -->",
        "",
        "`tests/test_atomics.py` runs [Atomic Red Team](https://github.com/redcanaryco/atomic-red-team)'s "
        "Linux tests for the techniques an agent like ROME used, loaded from the YAML definitions in "
        "`../shared/corpora/atomic-red-team/` (MIT; `SOURCE.md` there names the commit). Commands are "
        "never retyped: `#{argument}` placeholders get the file's defaults, or an override (listed "
        "below with its reason) where the default points at the real world. Each runnable test runs in "
        "a fresh sandbox with a strict policy (egress only to the local stand-ins it needs), its "
        "prerequisite checks first, then its command, then its cleanup, and the suite asserts that it "
        "was **contained** (every connection refused or to a stand-in, nothing it names on the host "
        "changed, no process left) and **detected** (each expected category among the sandbox's "
        "alerts; where none is expected, no alert at all).",
        "",
        f"{len(cases)} Linux tests, {runnable} runnable here, {len(cases) - runnable} not.",
        "",
        "| Technique | Linux tests | Runnable | Not runnable |",
        "| --- | --- | --- | --- |",
    ]
    for technique in TECHNIQUES:
        mine = [c for c in cases if c.technique == technique]
        ran = sum(c.runnable for c in mine)
        lines.append(f"| {technique} | {len(mine)} | {ran} | {len(mine) - ran} |")
    lines += [
        "",
        '"Runs here" notes `elevation_required` where the corpus sets it: those tests run unprivileged '
        "anyway and must fail contained.",
        "",
        "| Technique | # | Test | Runs here | Expected alerts | Why | Not runnable because / notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        runs = "yes" if c.runnable else "no"
        if c.elevation_required:
            runs += " (elevation_required)"
        expected = ", ".join(c.expected) or "none"
        remarks = c.reason if not c.runnable else "; ".join(c.notes)
        lines.append(
            f"| {c.technique} | {c.number} | {_cell(c.name)} | {runs} | {expected} | "
            f"{_cell(c.why_expected)} | {_cell(remarks)} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    DOC.write_text(render_doc(load()))
    print(f"wrote {DOC.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
