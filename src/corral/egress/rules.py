"""Egress decisions: which names, addresses, ports and protocols a sandbox may reach.

Decisions are made on names and checked on addresses. A name is allowed by a `host` rule (exact, or
`*.example.com` for its subdomains only) or by `network.hosts`. Whatever address an allowed name
resolves to is then checked: every address `address_class` does not call public (loopback, private
(RFC 1918, ULA), CGNAT, link-local, the cloud metadata addresses, unspecified, multicast,
documentation, benchmarking and reserved ranges), an IPv4 address written as IPv6 (::ffff:a.b.c.d),
and the host's own addresses are refused unless the policy names that address itself (in `hosts`,
or a `cidr` rule). The proxy then connects to exactly the address it checked, so a second DNS answer
can't rebind the name.

`address_class` is corral's one classification of addresses: the fence refuses by it and the
tripwires' `net.scope` field reports it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import psutil

if TYPE_CHECKING:
    from corral.policy import EgressRule, Policy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

AddressClass = Literal[
    "public",
    "metadata",
    "loopback",
    "link_local",
    "cgnat",
    "private",
    "multicast",
    "unspecified",
    "documentation",
    "benchmark",
    "reserved",
]

# The cloud metadata service, IPv4 and IPv6 (AWS's IMDS): credentials for whoever asks.
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# RFC 2544's benchmarking range, never routed: corral's resolver answers with addresses from it.
SYNTHETIC = ipaddress.ip_network("198.18.0.0/15")
# Named explicitly rather than with ipaddress's is_private, which also counts the documentation and
# benchmarking ranges: those are told apart below (TEST-NETs stand for the outside world in examples).
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def address_class(addr: IPAddress) -> AddressClass:
    """What kind of address `addr` is. An IPv4 address written as IPv6 (::ffff:a.b.c.d) is the IPv4
    address it reaches; the first class that applies wins (the metadata address before link-local,
    the IPv6 metadata address before private)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr in METADATA:
        return "metadata"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link_local"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "cgnat"
    if any(addr in n for n in _PRIVATE):
        return "private"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if any(addr in n for n in _DOCUMENTATION):
        return "documentation"
    if isinstance(addr, ipaddress.IPv4Address) and addr in SYNTHETIC:
        return "benchmark"
    if addr.is_reserved or addr.is_private:
        return "reserved"
    return "public"


# Why the fence refuses each class unless the policy names the address.
_REFUSED: dict[AddressClass, str] = {
    "metadata": "cloud metadata address",
    "loopback": "loopback address",
    "link_local": "link-local address",
    "cgnat": "shared (CGNAT) address",
    "private": "private address",
    "multicast": "multicast address",
    "unspecified": "unspecified address",
    "documentation": "documentation address",
    "benchmark": "benchmarking address",
    "reserved": "reserved address",
}


def name_matches(name: str, pattern: str) -> bool:
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        # Subdomains only: *.example.com covers a.example.com, never example.com itself.
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def host_addresses() -> frozenset[IPAddress]:
    """The host's own addresses: a sandbox must never reach services bound on them."""
    found: set[IPAddress] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(a.address.split("%")[0]))
                except ValueError:
                    continue
    return frozenset(found)


def forbidden_reason(addr: IPAddress, host_addrs: frozenset[IPAddress] = frozenset()) -> str | None:
    """Why `addr` is off limits unless the policy names it, or None if it is a public address."""
    reason = _REFUSED.get(address_class(addr))
    if reason is not None:
        return reason
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # A public IPv4 address in IPv6 dress, from an AAAA answer: nothing needs one, and a check
        # or a rule written for the IPv4 address would not match it.
        return "IPv4-mapped address"
    if addr in host_addrs:
        return "one of this host's addresses"
    return None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    rule: EgressRule | None = None
    address: IPAddress | None = None  # the checked address to connect to


class Rules:
    """The policy's network section, compiled for fast lookups: the egress rules of the phase in force
    (`network.egress` plus the phase's own), which `enter` changes."""

    def __init__(self, policy: Policy, host_addrs: frozenset[IPAddress] | None = None) -> None:
        self._network = policy.network
        self.phase = policy.network.initial_phase
        self.rules = policy.network.egress_in(self.phase)
        self.switches = 0  # phases entered since the start: a decision made under another is re-judged
        self.hosts = {k.lower(): v for k, v in policy.network.hosts.items()}
        self.host_addrs = host_addresses() if host_addrs is None else host_addrs
        self.limits = policy.network.limits

    def enter(self, phase: str) -> None:
        """Put `phase`'s rules in force (one of the policy's phases; KeyError otherwise). Called on the
        egress loop's thread; a reader on another (a parked connect being judged) sees the old rules or
        the new ones, each whole: the rules are one tuple, replaced in one assignment."""
        self.rules = self._network.egress_in(phase)
        self.phase = phase
        self.switches += 1

    def name_allowed(self, name: str) -> bool:
        """Whether the resolver may answer for `name` at all (some rule covers it, on any port)."""
        name = name.lower().rstrip(".")
        return name in self.hosts or any(
            r.host is not None and name_matches(name, r.host) for r in self.rules
        )

    def rule_for_name(self, name: str, port: int) -> EgressRule | None:
        name = name.lower().rstrip(".")
        for r in self.rules:
            if r.host is not None and port in r.ports and name_matches(name, r.host):
                return r
        return None

    def rule_for_address(self, addr: IPAddress, port: int) -> EgressRule | None:
        for r in self.rules:
            if r.cidr is not None and port in r.ports and addr in r.cidr:
                return r
        return None

    def check_name(self, name: str, port: int, resolved: list[IPAddress]) -> Verdict:
        """A connection to `name`:`port`; `resolved` is what the upstream resolver said (ignored for
        names in `hosts`, whose address is the policy author's explicit choice)."""
        name = name.lower().rstrip(".")
        rule = self.rule_for_name(name, port)
        if name in self.hosts:
            if rule is None:
                # hosts: says where a name is, not that it may be reached; a cidr rule may still allow it.
                rule = self.rule_for_address(self.hosts[name], port)
            if rule is None:
                return Verdict(False, f"no egress rule allows {name} port {port}")
            return Verdict(True, "allowed by policy (address from network.hosts)", rule, self.hosts[name])
        if rule is None:
            return Verdict(False, f"no egress rule allows {name} port {port}")
        if not resolved:
            return Verdict(False, f"{name} did not resolve", rule)
        for addr in resolved:
            reason = forbidden_reason(addr, self.host_addrs)
            if reason is None or self.rule_for_address(addr, port) is not None:
                return Verdict(True, "allowed by policy", rule, addr)
        addr = resolved[0]
        return Verdict(
            False, f"{name} resolves to {addr}, a {forbidden_reason(addr, self.host_addrs)}", rule, addr
        )

    def check_address(self, addr: IPAddress, port: int) -> Verdict:
        """A connection made to a bare address (no name known)."""
        rule = self.rule_for_address(addr, port)
        if rule is not None:
            return Verdict(True, "allowed by a cidr rule", rule, addr)
        reason = forbidden_reason(addr, self.host_addrs)
        what = f"{addr} port {port}" + (f" ({reason})" if reason else "")
        return Verdict(False, f"no egress rule allows {what}", None, addr)
