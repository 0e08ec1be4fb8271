"""corral's one classification of addresses (corral.egress.rules.address_class): what the fence
refuses and why, and what the tripwires' net.scope field says, for every kind of address.

The table keeps the cases where the fence and the tripwires once classified on their own and
disagreed: IPv4 addresses written as IPv6, the IPv6 metadata address, the documentation,
benchmarking and other reserved ranges."""

from __future__ import annotations

import ipaddress

import pytest

from corral import Policy
from corral.egress.rules import Rules, address_class, forbidden_reason
from corral.runtime._tripwires import address_scope

# address, its class, why the fence refuses it (None: it doesn't), net.scope
TABLE = [
    ("8.8.8.8", "public", None, "public"),
    ("2606:4700::1111", "public", None, "public"),
    ("169.254.169.254", "metadata", "cloud metadata address", "metadata"),
    ("fd00:ec2::254", "metadata", "cloud metadata address", "metadata"),
    ("::ffff:169.254.169.254", "metadata", "cloud metadata address", "metadata"),
    ("127.0.0.1", "loopback", "loopback address", "loopback"),
    ("127.8.9.10", "loopback", "loopback address", "loopback"),
    ("::1", "loopback", "loopback address", "loopback"),
    ("::ffff:127.0.0.1", "loopback", "loopback address", "loopback"),
    ("169.254.1.1", "link_local", "link-local address", "link_local"),
    ("fe80::1", "link_local", "link-local address", "link_local"),
    ("100.64.0.1", "cgnat", "shared (CGNAT) address", "cgnat"),
    ("10.0.0.5", "private", "private address", "private"),
    ("172.16.3.4", "private", "private address", "private"),
    ("192.168.1.1", "private", "private address", "private"),
    ("fd12:3456::1", "private", "private address", "private"),
    ("::ffff:10.1.2.3", "private", "private address", "private"),
    ("224.0.0.251", "multicast", "multicast address", "multicast"),
    ("ff02::1", "multicast", "multicast address", "multicast"),
    ("0.0.0.0", "unspecified", "unspecified address", "unspecified"),
    ("::", "unspecified", "unspecified address", "unspecified"),
    ("192.0.2.10", "documentation", "documentation address", "documentation"),
    ("203.0.113.7", "documentation", "documentation address", "documentation"),
    ("2001:db8::5", "documentation", "documentation address", "documentation"),
    # corral's own resolver answers with these: to the tripwires, a name was asked for
    ("198.18.0.5", "benchmark", "benchmarking address", "name"),
    ("0.1.2.3", "reserved", "reserved address", "reserved"),
    ("240.0.0.1", "reserved", "reserved address", "reserved"),
    ("255.255.255.255", "reserved", "reserved address", "reserved"),
    ("2002::1", "reserved", "reserved address", "reserved"),
    # a public IPv4 address in IPv6 dress: public to the tripwires, refused by the fence unless named
    ("::ffff:8.8.8.8", "public", "IPv4-mapped address", "public"),
]


@pytest.mark.parametrize(("text", "kind", "refused", "scope"), TABLE, ids=[row[0] for row in TABLE])
def test_one_classification_for_the_fence_and_the_tripwires(
    text: str, kind: str, refused: str | None, scope: str
) -> None:
    addr = ipaddress.ip_address(text)
    assert address_class(addr) == kind
    assert forbidden_reason(addr) == refused
    assert address_scope(text) == scope


def test_names_and_nothing() -> None:
    assert address_scope("pool.example.com") == "name"
    assert address_scope("") is None and address_scope(None) is None


def test_the_hosts_own_public_address_is_refused() -> None:
    own = ipaddress.ip_address("203.0.113.9")
    public = ipaddress.ip_address("8.8.4.4")
    assert forbidden_reason(public, frozenset({public})) == "one of this host's addresses"
    assert forbidden_reason(own, frozenset({own})) == "documentation address"


def rules(egress: list[dict[str, object]]) -> Rules:
    policy = Policy.from_dict({"version": 1, "network": {"egress": egress}, "tripwires": {"enabled": False}})
    return Rules(policy, host_addrs=frozenset())


@pytest.mark.parametrize("text", [row[0] for row in TABLE if row[2] is not None])
def test_every_refused_class_is_refused_by_address_and_by_name_unless_the_policy_names_it(text: str) -> None:
    addr = ipaddress.ip_address(text)
    # A name rule does not open an internal address the name resolves to (rebinding) ...
    by_name = rules([{"host": "svc.example.com", "ports": [443]}])
    verdict = by_name.check_name("svc.example.com", 443, [addr])
    assert not verdict.allowed and verdict.reason.endswith(f", a {forbidden_reason(addr)}")
    assert not by_name.check_address(addr, 443).allowed
    # ... a cidr rule naming the address does, on its ports only.
    named = rules([{"cidr": f"{addr}/{addr.max_prefixlen}", "ports": [443]}])
    assert named.check_address(addr, 443).allowed
    assert not named.check_address(addr, 80).allowed
