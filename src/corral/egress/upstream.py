"""How the fence reaches the world: name resolution and connections from the host.

`Upstream` is pluggable: tests map names and ports to local servers; production uses the host's
resolver and connects directly (`SystemUpstream`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Protocol

from corral.egress.rules import IPAddress


class Upstream(Protocol):
    """How the fence reaches the world: name resolution and connections from the host."""

    async def resolve(self, name: str) -> list[IPAddress]: ...
    async def connect(self, address: IPAddress, port: int) -> socket.socket:
        """A connected TCP socket to `address` port `port` (see `dial`); the fence owns it."""
        ...


async def dial(address: IPAddress, port: int) -> socket.socket:
    """A non-blocking TCP socket connected to `address` port `port`, with Nagle off (a relay passes
    on what it reads at once; coalescing would add a round trip to every small exchange).

    A plain socket rather than an asyncio stream: whatever the server sends first (an SSH banner
    arrives right after connect) waits in the kernel for the relay, instead of in a stream's buffer
    that has no public accessor."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


class SystemUpstream:
    """The host's resolver and direct connections."""

    async def resolve(self, name: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        return [ipaddress.ip_address(info[4][0]) for info in infos]

    async def connect(self, address: IPAddress, port: int) -> socket.socket:
        return await dial(address, port)
