"""Hash chains and signed checkpoints: what makes the audit store tamper-evident.

Each sandbox's events form a chain: event n stores `prev` (event n-1's hash) and
`hash = sha256(prev "\\n" body)`, where `body` is the event's JSON exactly as stored; the first
event's `prev` is the sandbox's genesis, `sha256("corral-sandbox\\n" id)`. Each host keeps a second
chain, one entry per commit, listing the (sandbox, count, head) of every sandbox the commit
advanced; entries are linked the same way, and some of them (checkpoints) are signed with the host's
Ed25519 key, which lives outside the store (`/etc/corral/audit.key` by default). The latest
checkpoint of each store is also written beside the key (`audit.key.head`, by the store's id), so
cutting the store's tail off, checkpoints and all, shows.

What this proves: an edit, deletion, insertion, reordering or truncation of committed events is
found by `corral audit verify`, naming the sandbox and the event. What it can't: someone who holds
the host key (root on the host) can rewrite everything after the last checkpoint someone else kept a
copy of; events that were never committed (the supervisor killed within the 100 ms before a
commit) are not there to verify.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from corral._errors import StoreError

DEFAULT_KEY = "/etc/corral/audit.key"


def genesis(sandbox: str) -> str:
    return hashlib.sha256(b"corral-sandbox\n" + sandbox.encode()).hexdigest()


def link(prev: str, body: str) -> str:
    """The hash of a record whose predecessor's hash is `prev` and whose stored text is `body`."""
    return hashlib.sha256(prev.encode() + b"\n" + body.encode()).hexdigest()


HOST_GENESIS = hashlib.sha256(b"corral-host\n").hexdigest()


def heads_body(store: str, seq: int, time: str, heads: list[tuple[str, int, str]]) -> str:
    """The stored text of a host-chain entry: which sandboxes a commit to `store` (its id)
    advanced, to what."""
    return json.dumps({"store": store, "seq": seq, "time": time, "heads": heads}, separators=(",", ":"))


def prune_body(sandbox: str, count: int, head: str, time: str) -> str:
    return json.dumps({"pruned": sandbox, "count": count, "head": head, "time": time}, separators=(",", ":"))


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Anchor:
    """The latest signed checkpoint, as kept beside the key."""

    host: str
    seq: int
    hash: str
    signature: str


class Signer:
    """A host's Ed25519 key: made on first use (mode 0600, in a directory only root can enter) and
    kept outside the store, so whoever can edit the store can't sign what they wrote."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else os.environ.get("CORRAL_AUDIT_KEY", DEFAULT_KEY)
        self._key = self._load_or_make()
        self.public = self._key.public_key()
        self.host = fingerprint(self.public)

    def _load_or_make(self) -> Ed25519PrivateKey:
        try:
            with open(self.path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            return self._make()
        except (OSError, ValueError) as e:
            raise StoreError(f"audit key {self.path}: can't be read as an Ed25519 PEM key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise StoreError(f"audit key {self.path}: not an Ed25519 key")
        return key

    def _make(self) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_atomically(self.path, pem, 0o600, exclusive=True)
        except FileExistsError:
            return self._load_or_make()  # another process made it first
        except OSError as e:
            raise StoreError(f"audit key {self.path}: can't be created: {e}") from e
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_atomically(self.path + ".pub", pub, 0o644)
        return key

    def sign(self, digest: str) -> str:
        return self._key.sign(digest.encode()).hex()

    def anchor(self, store: str, seq: int, digest: str, signature: str) -> None:
        """Keep the latest checkpoint of `store` (its id) beside the key. Several processes may
        share a key and a store: the lock keeps their updates whole, and an anchor only moves
        forward."""
        head = self.path + ".head"
        with open(head + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            anchors = _read_anchors(head)
            current = anchors.get(store)
            if current is not None and current.get("host") == self.host and int(current.get("seq", 0)) >= seq:
                return
            anchors[store] = {"host": self.host, "seq": seq, "hash": digest, "signature": signature}
            # Not synced: after a power cut an older anchor still anchors, and a sandbox's close
            # (which signs) need not wait for the disk.
            _write_atomically(head, json.dumps(anchors, indent=1).encode(), 0o644, sync=False)


def _read_anchors(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StoreError(f"audit anchors {path}: unreadable: {e}") from e
    if not isinstance(data, dict):
        raise StoreError(f"audit anchors {path}: not a JSON object")
    return data


def read_anchor(key_path: str, store: str) -> Anchor | None:
    """The checkpoint of `store` kept beside the key at `key_path`, if there is one."""
    data = _read_anchors(key_path + ".head").get(store)
    if data is None:
        return None
    try:
        return Anchor(str(data["host"]), int(data["seq"]), str(data["hash"]), str(data["signature"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"audit anchors {key_path}.head: store {store}: unreadable: {e}") from e


def load_public(path: str) -> Ed25519PublicKey:
    """A public key from PEM: the `.pub` file, or the private key file itself."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StoreError(f"audit key {path}: {e.strerror or e}") from e
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public
    except ValueError as e:
        raise StoreError(f"audit key {path}: not a PEM key: {e}") from e
    raise StoreError(f"audit key {path}: not an Ed25519 key")


def signature_ok(public: Ed25519PublicKey, digest: str, signature: str) -> bool:
    try:
        public.verify(bytes.fromhex(signature), digest.encode())
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_atomically(
    path: str, data: bytes, mode: int, *, exclusive: bool = False, sync: bool = True
) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".corral-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # FileExistsError rather than replace a key someone else just made
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
