"""`AuditWriter`: a host's one writer into its audit store.

Sandboxes hand it their events already chained (`SandboxChain` hashes them as they are recorded); a
thread commits them in groups: within 100 ms of being handed over, or at once when a sandbox closes
and waits for its events to be committed. Each commit also extends the host chain, and at most once
a second (and whenever a sandbox stops) the commit is a signed checkpoint.

Fail closed: when a commit fails (disk full, the database locked past its timeout, the file or the
server gone), the writer says so (`failure`), its host's sandboxes refuse new commands, and it
retries every second with the same events, which wait in memory. Nothing is dropped: past
`PENDING_MAX` events (or `PENDING_BYTES_MAX` of them) waiting on a failed store, the host's open
sandboxes are stopped (`on_overflow`), so the backlog stops growing; while the store is healthy, a
sandbox emitting faster than the store takes events waits for it instead (backpressure).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from corral._errors import StoreError
from corral.events import Alert, Deny, SandboxLabel, SandboxStart, SandboxStop
from corral.events.model import Event
from corral.store import chain
from corral.store._store import Chained, Store, Tally, stamp, time_of

log = logging.getLogger("corral")

COMMIT_INTERVAL = 0.1  # seconds an event may wait before its commit
BATCH_MAX = 20_000  # events in one commit at most
PENDING_MAX = 200_000  # events waiting on a failed store before the host's sandboxes are stopped
# ... or this many bytes of them: an event's text is the agent's to inflate (a command line of
# megabytes), so the count alone would not bound memory.
PENDING_BYTES_MAX = 256 << 20
CHECKPOINT_INTERVAL = 1.0  # seconds between signed checkpoints while events flow
RETRY_INTERVAL = 1.0
_BACKPRESSURE_WAIT = 5.0
_BATCH_BYTES = 32 << 20


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class SandboxChain:
    """One sandbox's events, chained in the order `record` is called (the caller serialises the
    calls), and handed to the writer. The chain ends with `sandbox.stop`, which carries the hash of
    everything before it; `record` refuses what comes after."""

    def __init__(self, writer: AuditWriter, sandbox: str, labels: Mapping[str, str]) -> None:
        self.sandbox = sandbox
        self.seq = 0  # events in the chain so far
        self.head = chain.genesis(sandbox)
        self.sealed = False
        self._writer = writer
        writer.open_sandbox(sandbox, labels, stamp(datetime.now(UTC)))

    def record(self, event: Event) -> tuple[Event, str] | None:
        """Chain `event` and hand it over; the event as recorded (a stop gets its `chain`) and its
        JSON, or None once the chain has ended."""
        if self.sealed:
            return None
        if isinstance(event, SandboxStop):
            event = event.model_copy(update={"chain": self.head})
            self.sealed = True
        body = event.model_dump_json()
        self.seq += 1
        digest = chain.link(self.head, body)
        self._writer.put(
            Chained(
                sandbox=self.sandbox,
                seq=self.seq,
                time=time_of(body),
                type=event.type,
                body=body,
                prev=self.head,
                hash=digest,
                category=event.category
                if isinstance(event, Alert)
                else event.layer
                if isinstance(event, Deny)
                else None,
                severity=event.severity if isinstance(event, Alert) else None,
                stop_reason=event.reason if isinstance(event, SandboxStop) else None,
                labels=dict(event.labels) if isinstance(event, SandboxLabel) else None,
            ),
            policy=event.policy if isinstance(event, SandboxStart) else None,
        )
        self.head = digest
        return event, body


class AuditWriter:
    def __init__(
        self,
        where: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        *,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        self.signer = chain.Signer(key)
        self.store = Store.open(where)
        self.where = self.store.where
        self._on_overflow = on_overflow
        self._cond = threading.Condition()
        self._pending: deque[Chained] = deque()
        self._pending_bytes = 0
        self._tallies: dict[str, Tally] = {}  # sandboxes with events not all committed, or still open
        self._policies: dict[str, str] = {}
        self._committed: dict[str, int] = {}  # sandbox -> last seq committed, until its stop is
        self._urgent = False
        self._stopping = False
        self._give_up = float("inf")
        self._overflowed = False
        self.failure: str | None = None
        self.commits = 0
        self.written = 0  # events committed by this writer
        self._last_signed = 0.0
        self._boot = _boot_id()
        self._thread = threading.Thread(target=self._run, name="corral-audit", daemon=True)
        self._thread.start()

    # --- what sandboxes call -----------------------------------------------------------------------

    def sandbox(self, sandbox: str, labels: Mapping[str, str]) -> SandboxChain:
        """A new sandbox's chain, its events to go into this writer's store."""
        return SandboxChain(self, sandbox, labels)

    def open_sandbox(self, sandbox: str, labels: Mapping[str, str], started: str) -> None:
        with self._cond:
            self._tallies[sandbox] = Tally(
                id=sandbox,
                host=self.signer.host,
                writer_pid=os.getpid(),
                writer_boot=self._boot,
                started=started,
                labels=dict(labels),
            )
            self._committed[sandbox] = 0

    def put(self, event: Chained, policy: str | None = None) -> None:
        with self._cond:
            if policy is not None:
                self._policies[event.sandbox] = policy
            if self._full():
                if self.failure is None:
                    # Healthy but outrun: the emitter waits for the writer (bounded memory, nothing
                    # dropped).
                    self._urgent = True
                    self._cond.notify_all()
                    self._cond.wait_for(
                        lambda: not self._full() or self.failure is not None, _BACKPRESSURE_WAIT
                    )
                if self.failure is not None and not self._overflowed:
                    self._overflowed = True
                    reason = (
                        f"audit store {self.where} can't be written ({self.failure}) and "
                        f"{len(self._pending)} events wait for it"
                    )
                    if self._on_overflow is not None:
                        threading.Thread(target=self._on_overflow, args=(reason,), daemon=True).start()
            self._pending.append(event)
            self._pending_bytes += len(event.body)
            if event.type == "sandbox.stop":
                self._urgent = True
                self._cond.notify_all()

    def _full(self) -> bool:
        return len(self._pending) >= PENDING_MAX or self._pending_bytes >= PENDING_BYTES_MAX

    def wait_committed(self, sandbox: str, seq: int, timeout: float) -> bool:
        """Commit now, and wait until `sandbox`'s events up to `seq` are in the store."""
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._committed.get(sandbox, seq) >= seq, timeout)

    def private_paths(self) -> list[str]:
        """What no sandbox may read, whatever its policy lists: the signing key, and the store's
        files (every sandbox's events) when it is a SQLite file."""
        paths = [self.signer.path]
        if self.store.kind == "sqlite":
            paths += [self.where + suffix for suffix in ("", "-wal", "-shm", "-journal")]
        return paths

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is waiting (trying for up to `timeout` on a failing store), then close."""
        with self._cond:
            self._give_up = time.monotonic() + timeout
            self._stopping = True
            self._urgent = True
            self._cond.notify_all()
        self._thread.join(timeout + RETRY_INTERVAL)
        with self._cond:
            left = len(self._pending)
        if left:
            log.error(
                "audit store %s: %d events could not be committed before the host shut down (%s)",
                self.where,
                left,
                self.failure,
            )
        self.store.close()

    # --- the writer's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._urgent or self._stopping, COMMIT_INTERVAL)
                if not self._pending and self._stopping:
                    return
                self._urgent = False
                batch = self._batch()
                tallies = self._advance(batch)
            if not batch:
                continue
            now = time.monotonic()
            sign = (
                self._stopping
                or any(e.type == "sandbox.stop" for e in batch)
                or (now - self._last_signed >= CHECKPOINT_INTERVAL)
            )
            try:
                seq, digest, signature = self.store.append(batch, tallies, self.signer, sign=sign)
            except StoreError as e:
                self._failed(str(e))
                if self._stopping and time.monotonic() >= self._give_up:
                    return  # stop() says what was left
                time.sleep(RETRY_INTERVAL)
                continue
            with self._cond:
                for _ in batch:
                    self._pending_bytes -= len(self._pending.popleft().body)
                for sid, tally in tallies.items():
                    self._committed[sid] = tally.events
                    if tally.stopped is not None:
                        # Its chain is sealed: nothing more of it comes, and a waiter that finds no
                        # entry is told all is committed. (Kept, one entry per sandbox ever started
                        # grew the writer by the hour on a training host.)
                        self._committed.pop(sid, None)
                        self._tallies.pop(sid, None)
                        self._policies.pop(sid, None)
                    else:
                        self._tallies[sid] = tally
                self.commits += 1
                self.written += len(batch)
                if self.failure is not None:
                    log.warning("audit store %s: writable again; %d events committed", self.where, len(batch))
                    self.failure = None
                    self._overflowed = False
                self._cond.notify_all()
            if signature is not None:
                # After the waiters are told: a closing sandbox waits for its commit, not for this.
                self._last_signed = now
                try:
                    self.signer.anchor(self.store.id, seq, digest, signature)
                except (OSError, StoreError) as e:
                    log.warning("audit anchor beside %s: can't be written: %s", self.signer.path, e)

    def _batch(self) -> list[Chained]:
        """The next events to commit: up to BATCH_MAX of them, or 32 MiB of text."""
        batch: list[Chained] = []
        size = 0
        for event in self._pending:
            if len(batch) >= BATCH_MAX or (batch and size + len(event.body) > _BATCH_BYTES):
                break
            batch.append(event)
            size += len(event.body)
        return batch

    def _advance(self, batch: list[Chained]) -> dict[str, Tally]:
        by_sandbox: dict[str, list[Chained]] = {}
        for e in batch:
            by_sandbox.setdefault(e.sandbox, []).append(e)
        tallies: dict[str, Tally] = {}
        for sid, events in by_sandbox.items():
            tally = self._tallies.get(sid)
            if tally is None:  # an event after the sandbox's stop was committed: keep the row's data
                tally = Tally(
                    id=sid,
                    host=self.signer.host,
                    writer_pid=os.getpid(),
                    writer_boot=self._boot,
                    started=events[0].time,
                    labels={},
                )
            tallies[sid] = tally.advanced(events, self._policies.get(sid))
        return tallies

    def _failed(self, reason: str) -> None:
        with self._cond:
            first = self.failure is None
            self.failure = reason
            self._cond.notify_all()
        if first:
            log.error("%s; sandboxes take no commands until it can be written again", reason)


def _category(event: Event) -> str | None:
    """What the store files an event under besides its type: an alert's category, a denial's layer."""
    if isinstance(event, Alert):
        return event.category
    if isinstance(event, Deny):
        return event.layer
    return None
