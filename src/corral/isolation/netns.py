"""The sandbox's side of the fence, set up inside its new network namespace (as root, by init).

Phase `apply_in_child()` runs in the sandbox's intermediate child (`child`) before privileges are
dropped, and returns the sockets the supervisor serves (they belong to the sandbox's namespace but
are handled on the host side):

- a default route through loopback, so any connect() reaches netfilter instead of failing early,
  and loopback segments as large as the kernel allows;
- nftables: every TCP connection to a non-loopback address is redirected to corral's transparent
  listener, every DNS query to corral's resolver; IPv6, other UDP and everything else is dropped
  (TCP over IPv6 refused with a reset, so the program fails at once instead of waiting out its
  timeout), and each drop is logged to an NFLOG group the supervisor reads (rate-limited, so a
  flood costs the supervisor nothing);
- listeners on loopback: transparent proxy, explicit HTTP proxy (for programs that honour
  HTTP(S)_PROXY) and DNS;
- a sock_diag socket, through which the supervisor learns which socket a connection came from.

There is no interface between this namespace and the host's: the only way out is a socket the
supervisor accepted, so a host that forwards packets has nothing of the sandbox's to forward, and if
the supervisor is gone the sandbox has no network at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from corral.isolation import sockdiag

TRANSPARENT_PORT = 15001
PROXY_PORT = 3128
DNS_PORT = 53
NFLOG_GROUP = 7

RULESET = f"""
table inet corral {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.0/8 return
        meta nfproto ipv4 meta l4proto tcp redirect to :{TRANSPARENT_PORT}
        meta nfproto ipv4 udp dport 53 redirect to :{DNS_PORT}
    }}
    chain filter_out {{
        type filter hook output priority 0; policy accept;
        ip daddr 127.0.0.0/8 accept
        ip6 daddr ::1 accept
        ct status dnat accept
        limit rate 20/second burst 40 packets log group {NFLOG_GROUP} snaplen 64
        meta l4proto tcp reject with tcp reset
        drop
    }}
}}
"""


@dataclass
class FenceSockets:
    transparent: socket.socket
    proxy: socket.socket
    dns: socket.socket
    nflog: socket.socket
    diag: socket.socket  # sock_diag, to find which socket a connection or query came from

    def all(self) -> list[socket.socket]:
        """The sockets, in the fields' order (the order they travel in)."""
        return [getattr(self, f.name) for f in fields(self)]

    def fds(self) -> list[int]:
        return [s.fileno() for s in self.all()]

    def close(self) -> None:
        for s in self.all():
            s.close()

    @classmethod
    def adopt(cls, fds: list[int]) -> FenceSockets:
        """The sockets for descriptors in `fds()`'s order (as they arrive from the zygote), owned by
        the objects returned from here on."""
        return cls(*(socket.socket(fileno=fd) for fd in fds))


@functools.cache
def _nft() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1", use_errno=True)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    return lib


def preload() -> None:
    """Load libnftables before forking (children must not dlopen)."""
    _nft()


def _apply_ruleset(text: str) -> None:
    lib = _nft()
    ctx = lib.nft_ctx_new(0)
    try:
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, text.encode()) != 0:
            raise OSError(0, f"nftables: {(lib.nft_ctx_get_error_buffer(ctx) or b'').decode().strip()}")
    finally:
        lib.nft_ctx_free(ctx)


def _request(nl: socket.socket, msg_type: int, flags: int, body: bytes, what: str) -> bytes:
    """Send one netlink request on `nl` and return the first reply; an error reply raises OSError."""
    nl.send(struct.pack("=IHHII", 16 + len(body), msg_type, 0x1 | flags, 1, 0) + body)
    reply = nl.recv(65536)
    if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == 2:  # NLMSG_ERROR
        err = struct.unpack_from("=i", reply, 16)[0]
        if err:
            raise OSError(-err, f"{what}: {os.strerror(-err)}")
    return reply


def _rtnetlink(msg_type: int, flags: int, body: bytes, what: str) -> bytes:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        return _request(nl, msg_type, flags, body, what)


def _default_route_via_loopback(family: int = socket.AF_INET) -> None:
    """RTM_NEWROUTE: the default route via lo (with source 127.0.0.1 for IPv4: without one the kernel
    would pick 0.0.0.0, and the proxy's replies to a redirected connection would go nowhere). With a
    route, every packet reaches netfilter, where it is redirected or dropped and recorded, instead of
    failing early with "network unreachable" and leaving no trace."""
    rtmsg = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 254, 3, 0, 1, 0)  # main table, boot, unicast
    attrs = struct.pack("=HHi", 8, 4, socket.if_nametoindex("lo"))  # RTA_OIF
    if family == socket.AF_INET:
        attrs += struct.pack("=HH4s", 8, 7, socket.inet_aton("127.0.0.1"))  # RTA_PREFSRC
    # RTM_NEWROUTE with ACK | CREATE | EXCL
    _rtnetlink(24, 0x4 | 0x400 | 0x200, rtmsg + attrs, "adding the default route")


def _large_loopback_segments() -> None:
    """Let TCP on lo build segments as large as lo takes (512 KiB where the kernel has BIG TCP, not
    64 KiB): every byte a sandbox exchanges with the fence crosses lo, and fewer, larger packets
    cost less to send, to pass through netfilter and to receive. Measured on 2 cores, the proxy's
    throughput rose by about a fifth. Only a speed-up: a kernel without it keeps the defaults."""
    index = socket.if_nametoindex("lo")
    ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
    reply = _rtnetlink(18, 0, ifinfo, "reading lo")  # RTM_GETLINK
    largest = _attribute_u32(reply[32:], 59)  # IFLA_TSO_MAX_SIZE
    if largest is None or largest <= 65536:
        return
    # IFLA_GSO_MAX_SIZE (IPv6) and IFLA_GSO_IPV4_MAX_SIZE; a kernel that does not know the latter
    # ignores it.
    attrs = b"".join(struct.pack("=HHI", 8, kind, largest) for kind in (41, 63))
    _rtnetlink(19, 0x4, ifinfo + attrs, "raising lo's segment size")  # RTM_SETLINK with ACK


def _attribute_u32(attrs: bytes, kind: int) -> int | None:
    for found, value in _attributes(attrs):
        if found == kind and len(value) >= 4:
            return int(struct.unpack_from("=I", value)[0])
    return None


def _attributes(attrs: bytes) -> Iterator[tuple[int, bytes]]:
    """The (type, value) pairs of a run of netlink attributes, flag bits masked off the type."""
    off = 0
    while off + 4 <= len(attrs):
        length, kind = struct.unpack_from("=HH", attrs, off)
        if length < 4:
            return
        yield kind & 0x3FFF, attrs[off + 4 : off + length]
        off += (length + 3) & ~3


def _nflog_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    s.bind((0, 0))
    # NFULNL_MSG_CONFIG to group NFLOG_GROUP: bind; copy the first 64 bytes of each packet; send each
    # one at once (the default batches 100 packets or waits a second).
    msg_type = (4 << 8) | 1
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFLOG_GROUP))
    bind = struct.pack("=HHB3x", 5, 1, 1)
    mode = struct.pack("=HH", 10, 2) + struct.pack(">IB3x", 64, 2)
    qthresh = struct.pack("=HH", 8, 5) + struct.pack(">I", 1)
    for attr in (bind, mode, qthresh):
        _request(s, msg_type, 0x4, nfgen + attr, "nflog: configuring the log group")  # with ACK
    s.setblocking(False)
    return s


def _loopback_ipv6_ready(proc: int, timeout: float = 2.0) -> bool:
    """Wait for ::1 on lo; False when this host has IPv6 off, so there is nothing to wait for. IPv6
    may configure a freshly raised lo asynchronously, and a route added before that is dropped when
    it happens. `proc` is a descriptor of the host's /proc (see `apply_in_child`)."""
    try:
        with open("sys/net/ipv6/conf/lo/disable_ipv6", opener=_at(proc)) as f:
            if f.read().strip() == "1":
                return False
    except FileNotFoundError:
        return False
    deadline = time.monotonic() + timeout
    while True:
        with open("self/net/if_inet6", opener=_at(proc)) as f:
            if any(line.split()[-1] == "lo" for line in f):
                return True
        if time.monotonic() > deadline:
            # Without the route, IPv6 attempts would fail without reaching the fence's log.
            raise OSError(0, f"IPv6 gave lo no address within {timeout:g}s")
        time.sleep(0.0005)


def _at(directory: int) -> Callable[[str, int], int]:
    """An `open()` opener resolving paths under the directory descriptor `directory`."""
    return lambda path, flags: os.open(path, flags, dir_fd=directory)


def apply_in_child(proc: int) -> FenceSockets:
    """Set up the fence in the current network namespace. `proc`: a descriptor of the host's /proc,
    opened before init was forked. Init builds the sandbox's root in the mount namespace this process
    shares, and once it has pivoted, "/proc" here is the sandbox's, where this process has no pid and
    /proc/self/net does not exist: a path lookup then failed now and again, and the sandbox started
    without its IPv6 route, its IPv6 attempts failing unrecorded."""
    _default_route_via_loopback(socket.AF_INET)
    _large_loopback_segments()
    if _loopback_ipv6_ready(proc):
        _default_route_via_loopback(socket.AF_INET6)
    _apply_ruleset(RULESET)
    transparent = socket.create_server(("127.0.0.1", TRANSPARENT_PORT), backlog=128)
    proxy = socket.create_server(("127.0.0.1", PROXY_PORT), backlog=128)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", DNS_PORT))
    for s in (transparent, proxy, dns):
        s.setblocking(False)
    diag = sockdiag.open_socket()
    check_attribution(diag, transparent)
    return FenceSockets(transparent, proxy, dns, _nflog_socket(), diag)


def check_attribution(diag: socket.socket, listener: socket.socket) -> None:
    """Connections are attributed through sock_diag: a kernel where it can't find `listener` would
    leave every connection unattributed, and such a sandbox must not start."""
    found = sockdiag.SocketTable(diag).tcp_inode(listener.getsockname(), ("0.0.0.0", 0))
    if found != os.fstat(listener.fileno()).st_ino:
        raise OSError(0, "sock_diag can't find the fence's own listener; connections would go unattributed")


@dataclass(frozen=True)
class Dropped:
    """A packet the fence dropped, as NFLOG reported it."""

    family: int
    protocol: str
    destination: str
    port: int | None
    uid: int | None


def parse_nflog(data: bytes) -> list[Dropped]:
    """Parse NFLOG netlink messages (each: nlmsghdr, nfgenmsg, attributes; the packet in NFULA_PAYLOAD)."""
    out: list[Dropped] = []
    off = 0
    while off + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if msg_type == (4 << 8):  # NFULNL_MSG_PACKET
            family = data[off + 16]
            attrs = data[off + 20 : off + length]
            payload, uid = b"", None
            for kind, value in _attributes(attrs):
                if kind == 9:  # NFULA_PAYLOAD
                    payload = value
                elif kind == 11 and len(value) >= 4:  # NFULA_UID
                    uid = struct.unpack(">I", value[:4])[0]
            dropped = _describe(family, payload, uid)
            if dropped is not None:
                out.append(dropped)
        off += (length + 3) & ~3
    return out


_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


def _describe(family: int, packet: bytes, uid: int | None) -> Dropped | None:
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        ihl = (packet[0] & 0xF) * 4
        proto = packet[9]
        dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
        transport = packet[ihl:]
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        proto = packet[6]
        dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
        transport = packet[40:]
    else:
        return None
    port = struct.unpack(">H", transport[2:4])[0] if proto in (6, 17, 132) and len(transport) >= 4 else None
    return Dropped(family, _PROTOCOLS.get(proto, str(proto)), dst, port, uid)
