"""One sandbox can't buy itself another's time or the host's memory: bounded names, output and
events, and supervisor work that waits behind its own sandbox.

Timing is only asserted with generous bounds; where possible the work done is counted instead.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from corral import Deny, Policy, Sandbox
from corral.egress import service
from corral.events import DnsQuery

pytestmark = pytest.mark.root


def egress_policy(egress: list[dict[str, Any]], **extra: Any) -> Policy:
    return Policy.from_dict(
        {"version": 1, "network": {"egress": egress}, "tripwires": {"enabled": False}, **extra}
    )


def test_a_spent_synthetic_pool_is_refused_and_recorded_and_the_resolver_keeps_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A /28 stands for 198.18.0.0/15: 14 addresses run out as the real pool did at 131,071 names
    # (the old resolver raised IndexError in the loop and answered nothing more for new names).
    monkeypatch.setattr(service, "_SYNTHETIC", ipaddress.ip_network("198.18.0.0/28"))
    with Sandbox(egress_policy([{"host": "*.example.internal", "ports": [443]}]), keep_workspace=False) as sb:
        r = sb.exec(
            "for i in $(seq 20); do getent hosts n$i.example.internal >/dev/null || echo miss; done; "
            "getent hosts n1.example.internal",
            text=True,
        )
        events = sb.events()
    assert r.exit_code == 0, r
    assert str(r.stdout).count("miss") == 6
    assert "198.18.0.1" in str(r.stdout)  # a name that had an address keeps it
    refused = [e for e in events if isinstance(e, Deny) and e.layer == "dns" and e.what == "names"]
    assert sum(e.count for e in refused) >= 6, refused
    assert "n15.example.internal" in refused[0].detail
    queries = [e for e in events if isinstance(e, DnsQuery) and e.qtype == "A"]
    assert {q.name for q in queries if q.decision == "deny"} >= {
        f"n{i}.example.internal" for i in range(15, 21)
    }


def test_idle_synthetic_addresses_are_reclaimed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "_SYNTHETIC", ipaddress.ip_network("198.18.0.0/28"))
    monkeypatch.setattr(service, "_NAMES_KEPT", 4)
    monkeypatch.setattr(service, "_NAME_IDLE", 0.0)
    with Sandbox(egress_policy([{"host": "*.example.internal", "ports": [443]}]), keep_workspace=False) as sb:
        r = sb.exec(
            "for i in $(seq 40); do getent hosts n$i.example.internal >/dev/null || echo miss; done",
            text=True,
        )
        events = sb.events()
    assert r.exit_code == 0 and "miss" not in str(r.stdout), r
    assert not [e for e in events if isinstance(e, Deny)]


def test_the_name_pool_gives_back_only_idle_names() -> None:
    pool = service._NamePool(kept=2, idle=3600.0)
    a, b = pool.address("a.test"), pool.address("b.test")
    assert a is not None and b is not None and a != b
    assert pool.address("c.test") is None  # budget spent, nothing idle: refused, not raised
    assert pool.address("a.test") == a and pool.name(b) == "b.test"
    pool.idle = 0.0
    c = pool.address("c.test")
    assert c == a  # a was used least recently (b was looked up by address since)
    assert pool.name(a) == "c.test" and len(pool) == 2


def test_output_past_the_budget_is_drained_not_kept_and_the_result_says_so() -> None:
    # 32 MiB of stdout against a 1 MiB budget: the command is neither blocked nor killed (it exits 0
    # after writing it all), the host keeps 1 MiB, and a deny records the cut.
    policy = Policy.from_dict(
        {"version": 1, "resources": {"output": "1MiB"}, "tripwires": {"enabled": False}}
    )
    with Sandbox(policy, keep_workspace=False) as sb:
        r = sb.exec("head -c 33554432 /dev/zero; echo done >&2; echo after")
        small = sb.exec("echo fine")
    assert r.exit_code == 0, r.exit_code
    assert r.output_truncated
    assert len(r.stdout) + len(r.stderr) == 1 << 20
    cut = [d for d in r.denials if d.layer == "output"]
    assert len(cut) == 1 and "1048576 bytes" in cut[0].detail
    assert small.stdout == b"fine\n" and not small.output_truncated and not small.denials


def test_repeated_denials_are_counted_not_kept_one_by_one() -> None:
    # 2,000 refused unshare calls: the first is recorded in full, the repeats as a count with the
    # first and last time (the old code kept 2,000 events).
    with Sandbox(
        Policy.from_dict({"version": 1, "tripwires": {"enabled": False}}), keep_workspace=False
    ) as sb:
        r = sb.exec(
            [
                "python3",
                "-c",
                "import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(2000):\n"
                "    libc.unshare(0x10000000)",  # CLONE_NEWUSER
            ]
        )
        events = sb.events()
    unshare = [e for e in events if isinstance(e, Deny) and e.what == "unshare"]
    assert sum(e.count for e in unshare) == 2000
    assert len(unshare) <= 10, len(unshare)
    assert unshare[0].count == 1 and unshare[0].process is not None
    folded = [e for e in unshare if e.count > 1]
    assert folded and all(e.first is not None and e.last is not None and e.first <= e.last for e in folded)
    assert sum(e.count for e in r.denials if e.what == "unshare") == 2000  # the result lists them too


def test_the_events_kept_in_memory_are_bounded_and_the_file_keeps_them_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from corral.runtime import sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_EVENTS_KEPT", 50)
    path = tmp_path / "events.jsonl"
    with Sandbox(
        Policy.from_dict({"version": 1, "tripwires": {"enabled": False}}), keep_workspace=False, events=path
    ) as sb:
        results = [sb.exec("true") for _ in range(60)]
        kept = sb.events()
        elided = sb.events_elided
    assert all(r.ok for r in results)
    assert len(kept) <= 51 and elided >= 60 * 2 - 50
    assert kept[0].type == "sandbox.start"
    assert len(path.read_text().splitlines()) == 1 + 60 * 2 + 1
