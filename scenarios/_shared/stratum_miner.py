#!/usr/bin/env python3
"""A small but real CPU miner speaking Stratum v1 (the protocol of Bitcoin-style pools).

It does what cpuminer does, only slower: connect to the pool, mining.subscribe, mining.authorize, take the
mining.notify job, build the coinbase and merkle root, and hash block headers with double SHA-256 in a loop,
submitting a share (mining.submit) whenever a hash meets the pool's difficulty. When the pool cannot be
reached, or the connection drops, it keeps hashing a built-in benchmark job and retries the pool every
--retry-pause seconds, as real miners do. Standard library only: it runs on the sandbox's /usr/bin/python3.

    python3 stratum_miner.py -o stratum+tcp://pool.example.internal:3333 -u wallet.worker --duration 5
"""

from __future__ import annotations

import argparse
import binascii
import hashlib
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

USER_AGENT = "corral-scenario-miner/1.0"
DIFF1_TARGET = 0x00000000FFFF0000000000000000000000000000000000000000000000000000


@dataclass
class Job:
    job_id: str
    prevhash: str
    coinb1: str
    coinb2: str
    merkle_branch: list[str]
    version: str
    nbits: str
    ntime: str


# Bitcoin block 125552's fields, hashed when no pool is reachable (the "--benchmark" job).
BENCHMARK_JOB = Job(
    job_id="benchmark",
    prevhash="81cd02ab7e569e8bcd9317e2fe99f2de44d49ab2b8851ba4a308000000000000",
    coinb1="01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff",
    coinb2="ffffffff0100f2052a01000000434104678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61de",
    merkle_branch=[],
    version="00000001",
    nbits="1a44b9f2",
    ntime="4dd7f5c7",
)


def dsha256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def swap32(hex_words: str) -> bytes:
    """Stratum sends the previous hash as eight 32-bit words each byte-swapped; undo that."""
    raw = binascii.unhexlify(hex_words)
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


class Pool:
    """One Stratum connection: line-delimited JSON-RPC over TCP."""

    def __init__(self, url: str, user: str, password: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("stratum+tcp", "stratum"):
            raise ValueError(f"unsupported pool URL {url!r}; use stratum+tcp://host:port")
        self.sock = socket.create_connection((parts.hostname or "", parts.port or 3333), timeout=timeout)
        self.sock.settimeout(0.05)  # polled between hashing batches
        self.buffer = b""
        self.next_id = 1
        self.user, self.password = user, password
        self.extranonce1 = ""
        self.extranonce2_size = 4
        self.difficulty = 1.0
        self.job: Job | None = None
        self.accepted = 0

    def send(self, method: str, params: list[object]) -> None:
        message = {"id": self.next_id, "method": method, "params": params}
        self.next_id += 1
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def handshake(self, timeout: float) -> None:
        self.send("mining.subscribe", [USER_AGENT])
        self.send("mining.authorize", [self.user, self.password])
        deadline = time.monotonic() + timeout
        while self.job is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no job from the pool")
            self.poll()

    def poll(self) -> None:
        """Read whatever the pool sent; ConnectionError when it hung up."""
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return
        if not chunk:
            raise ConnectionError("pool closed the connection")
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, message: dict[str, object]) -> None:
        method, params, result = message.get("method"), message.get("params"), message.get("result")
        if method == "mining.set_difficulty" and isinstance(params, list):
            self.difficulty = float(params[0])
        elif method == "mining.notify" and isinstance(params, list):
            self.job = Job(*params[:8])
        elif message.get("id") == 1 and isinstance(result, list):  # the subscribe answer
            self.extranonce1, self.extranonce2_size = str(result[1]), int(result[2])
        elif message.get("id", 0) and result is True and self.job is not None:
            self.accepted += 1

    def submit(self, job: Job, extranonce2: str, nonce: int) -> None:
        self.send("mining.submit", [self.user, job.job_id, extranonce2, job.ntime, f"{nonce:08x}"])

    def close(self) -> None:
        self.sock.close()


def header_prefix(job: Job, extranonce1: str, extranonce2: str) -> bytes:
    """The first 76 bytes of the block header (everything but the nonce)."""
    coinbase = binascii.unhexlify(job.coinb1 + extranonce1 + extranonce2 + job.coinb2)
    root = dsha256(coinbase)
    for branch in job.merkle_branch:
        root = dsha256(root + binascii.unhexlify(branch))
    return (
        binascii.unhexlify(job.version)[::-1]
        + swap32(job.prevhash)
        + root
        + binascii.unhexlify(job.ntime)[::-1]
        + binascii.unhexlify(job.nbits)[::-1]
    )


def connect(url: str, user: str, timeout: float) -> Pool | None:
    try:
        pool = Pool(url, user, "x", timeout)
    except OSError as e:
        print(f"[pool] {url} unreachable ({e}); hashing the benchmark job", flush=True)
        return None
    try:
        pool.handshake(timeout)
    except (OSError, ValueError, TimeoutError) as e:
        print(f"[pool] {url} dropped the handshake ({e}); hashing the benchmark job", flush=True)
        pool.close()
        return None
    print(f"[pool] subscribed to {url}, difficulty {pool.difficulty:g}", flush=True)
    return pool


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Stratum v1 CPU miner (double SHA-256)")
    parser.add_argument("-o", "--url", default="stratum+tcp://pool.example.internal:3333")
    parser.add_argument("-u", "--user", default="bc1qcorralscenarioworker.rig1")
    parser.add_argument("--duration", type=float, default=0, help="seconds to mine; 0 = forever")
    parser.add_argument("--retry-pause", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    pool = connect(args.url, args.user, args.timeout)
    started = last_report = last_retry = time.monotonic()
    hashes = shares = 0
    extranonce2_counter = 0
    while args.duration <= 0 or time.monotonic() - started < args.duration:
        job = pool.job if pool is not None and pool.job is not None else BENCHMARK_JOB
        extranonce1 = pool.extranonce1 if pool is not None else "00000000"
        size = pool.extranonce2_size if pool is not None else 4
        extranonce2 = f"{extranonce2_counter:0{size * 2}x}"
        extranonce2_counter += 1
        prefix = header_prefix(job, extranonce1, extranonce2)
        target = int(DIFF1_TARGET / (pool.difficulty if pool is not None else 1.0))
        for nonce in range(0, 1 << 16):  # one batch; then talk to the pool
            digest = dsha256(prefix + struct.pack("<I", nonce))
            if int.from_bytes(digest, "little") <= target and pool is not None:
                pool.submit(job, extranonce2, nonce)
                shares += 1
        hashes += 1 << 16
        now = time.monotonic()
        if pool is not None:
            try:
                pool.poll()
            except (OSError, ValueError) as e:
                print(f"[pool] connection lost ({e}); hashing the benchmark job", flush=True)
                pool.close()
                pool = None
                last_retry = now
        elif now - last_retry >= args.retry_pause:
            last_retry = now
            pool = connect(args.url, args.user, args.timeout)
        if now - last_report >= 1.0:
            rate = hashes / (now - started) / 1000
            print(f"[miner] {rate:.1f} kH/s, {shares} shares submitted", flush=True)
            last_report = now
    if pool is not None:
        pool.close()
    print(f"[miner] done: {hashes} hashes, {shares} shares", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
