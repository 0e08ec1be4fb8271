"""Which socket in a sandbox's network namespace has these addresses: asked of the kernel through
sock_diag (NETLINK_SOCK_DIAG), on a netlink socket opened inside that namespace.

The proxy knows a connection by its addresses and needs the socket's inode to find the process that
holds it. A TCP socket is found by an exact lookup, one probe of the kernel's connection hash (a few
microseconds). Reading /proc/<pid>/net/tcp instead walks the host's whole connection table for the
one namespace's entries: about 4 ms on a 24 GiB machine, on every connection's path. A UDP socket is
found by dumping the namespace's UDP sockets (tens of microseconds): a query sent to another resolver
and redirected to corral's went to an address the proxy does not see, so only the port is known.
"""

from __future__ import annotations

import socket
import struct
import threading

from corral.isolation import _linux

NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF
# struct inet_diag_msg: family, state, timer, retrans, then struct inet_diag_sockid (48 bytes:
# sport, dport, src[16], dst[16], if, cookie[2]), expires, rqueue, wqueue, uid, inode.
_MSG_SPORT = 4
# struct unix_diag_msg: family, type, state, pad, ino, cookie[2]; then attributes, the peer's among them.
_UNIX_MSG = 16
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_MSG_INODE = 68


def open_socket() -> socket.socket:
    """A sock_diag socket for the calling thread's network namespace (it keeps that namespace)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


def open_socket_in(namespace: str) -> socket.socket:
    """A sock_diag socket for the network namespace at `namespace` (/proc/PID/ns/net). The socket
    keeps the namespace it was made in; the setns happens on a thread that then exits, so the
    caller's threads stay where they are."""
    return _linux.made_in_network_namespace(namespace, open_socket)


class SocketTable:
    """The sockets of one network namespace, through a sock_diag socket opened in it. Safe to call
    from several threads."""

    def __init__(self, diag: socket.socket) -> None:
        self._diag = diag
        self._lock = threading.Lock()

    def tcp_inode(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """The inode of the IPv4 TCP socket at `local` connected to `remote` (or listening, with
        remote 0.0.0.0 port 0); None when there is none, or it is gone."""
        sockid = _sockid(local, remote)
        request = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, _ALL_STATES) + sockid
        with self._lock:
            self._send(request, _NLM_F_REQUEST)
            reply = self._diag.recv(65536)
        kind = struct.unpack_from("=H", reply, 4)[0]
        if kind == _NLMSG_ERROR:
            return None
        inode = int(struct.unpack_from("=I", reply, 16 + _MSG_INODE)[0])
        return inode or None  # a connection in TIME_WAIT has no socket left

    def udp_inode(self, local_port: int) -> int | None:
        """The inode of the IPv4 UDP socket bound to `local_port`; None when there is none."""
        request = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_UDP, 0, _ALL_STATES) + bytes(48)
        found = None
        with self._lock:
            self._send(request, _NLM_F_REQUEST | _NLM_F_DUMP)
            while True:
                data = self._diag.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                        return found
                    msg = off + 16
                    if struct.unpack_from(">H", data, msg + _MSG_SPORT)[0] == local_port:
                        found = int(struct.unpack_from("=I", data, msg + _MSG_INODE)[0])
                    off += (length + 3) & ~3

    def unix_peer(self, inode: int) -> int | None:
        """The inode of the socket at the other end of the AF_UNIX socket `inode` (a socketpair's
        other half, or the server side of a connection); None when it has none or is gone."""
        request = struct.pack(
            "=BBHIIIII", socket.AF_UNIX, 0, 0, _ALL_STATES, inode, _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE
        )
        with self._lock:
            self._send(request, _NLM_F_REQUEST)
            reply = self._diag.recv(65536)
        length, kind = struct.unpack_from("=IH", reply, 0)
        if kind == _NLMSG_ERROR or length > len(reply):
            return None
        off = 16 + _UNIX_MSG  # the rtattrs after struct unix_diag_msg
        while off + 4 <= length:
            alen, atype = struct.unpack_from("=HH", reply, off)
            if alen < 4:
                break
            if atype == _UNIX_DIAG_PEER and alen >= 8:
                return int(struct.unpack_from("=I", reply, off + 4)[0]) or None
            off += (alen + 3) & ~3
        return None

    def _send(self, request: bytes, flags: int) -> None:
        header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, flags, 0, 0)
        self._diag.send(header + request)


def _sockid(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """struct inet_diag_sockid for an exact lookup: the socket's own end first."""
    ends = struct.pack(
        ">HH16s16s",
        local[1],
        remote[1],
        socket.inet_aton(local[0]).ljust(16, b"\0"),
        socket.inet_aton(remote[0]).ljust(16, b"\0"),
    )
    return ends + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
