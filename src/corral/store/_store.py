"""`Store`: the audit store's one code path over either backend (see `_backend`): the schema, the
appending of chained events with the host chain, the queries every reader uses, and pruning."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from corral._errors import StoreError
from corral.store import chain
from corral.store._backend import SCHEMA_VERSION, Backend, backend, errors
from corral.store.records import SEVERITIES, SandboxInfo, StoredEvent

_ZERO = timedelta(0)
_FETCH = 2_000  # rows fetched from the database at a time when streaming events


def stamp(t: datetime) -> str:
    """Times as stored: fixed width, so that text order is time order. (isoformat, not strftime:
    every event passes through here, and strftime is ten times slower.)"""
    if t.utcoffset() != _ZERO:
        t = t.astimezone(UTC)
    return t.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def stamp_text(t: str) -> str:
    """An event's RFC 3339 UTC time, as its JSON has it, in the form `stamp` gives ("" if it is
    not UTC: corral writes UTC only)."""
    if not t.endswith("Z"):
        return ""
    whole, _, fraction = t[:-1].partition(".")
    return f"{whole}.{fraction.ljust(6, '0')}Z"


def time_of(body: str) -> str:
    """The stored form of the time in an event's JSON (which opens {"v":N,"time":"...")."""
    start = body.find('"time":"', 0, 40) + 8
    return stamp_text(body[start : body.find('"', start)]) if start >= 8 else ""


def parse_stamp(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(slots=True)  # not frozen: made for every event, and a frozen dataclass is slower to make
class Chained:
    """One event on its way into the store, already in its sandbox's chain."""

    sandbox: str
    seq: int
    time: str  # stamp()
    type: str
    body: str  # the event's JSON, as hashed
    prev: str
    hash: str
    category: str | None = None  # an alert's category, a denial's layer
    severity: str | None = None  # an alert's severity
    stop_reason: str | None = None  # sandbox.stop's reason
    labels: dict[str, str] | None = None  # sandbox.label's labels


@dataclass(frozen=True)
class Tally:
    """A sandbox's row, as its writer keeps it between commits."""

    id: str
    host: str
    writer_pid: int
    writer_boot: str
    started: str
    labels: dict[str, str]
    policy: str = ""
    stopped: str | None = None
    stop_reason: str | None = None
    events: int = 0
    head: str = ""
    alerts: int = 0
    worst: str | None = None
    categories: dict[str, int] = field(default_factory=dict)
    relabeled: bool = False  # these events added labels: the labels table needs them

    def advanced(self, events: Sequence[Chained], policy: str | None) -> Tally:
        alerts, worst, categories = self.alerts, self.worst, dict(self.categories)
        stopped, reason = self.stopped, self.stop_reason
        labels, relabeled = self.labels, False
        for e in events:
            if e.labels is not None:
                # Only ever added (`SandboxLabel`): a key already set keeps its value.
                labels = {**e.labels, **labels}
                relabeled = True
            if e.type == "alert" and e.category is not None:
                alerts += 1
                categories[e.category] = categories.get(e.category, 0) + 1
                if e.severity is not None and (worst is None or _rank(e.severity) < _rank(worst)):
                    worst = e.severity
            elif e.type == "sandbox.stop":
                stopped, reason = e.time, e.stop_reason
        return replace(
            self,
            policy=policy if policy is not None else self.policy,
            stopped=stopped,
            stop_reason=reason,
            events=events[-1].seq,
            head=events[-1].hash,
            alerts=alerts,
            worst=worst,
            categories=categories,
            labels=labels,
            relabeled=relabeled,
        )


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


@dataclass(frozen=True)
class Filters:
    """What every reader can narrow events by (the CLI's --sandbox, --label, --type, ...)."""

    sandbox: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    types: Sequence[str] = ()
    categories: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None


class Store:
    """An audit store, open. `Store.open(where)`: a SQLite path or a postgresql:// URL; None for
    the default (CORRAL_STORE, else /var/lib/corral/audit.db). Thread-safe (one connection, one
    lock); for reading while a host writes, open a second Store."""

    def __init__(self, db: Backend, conn: Any) -> None:
        self._db = db
        self._conn = conn
        self._lock = threading.RLock()
        self.where = db.where
        self.kind = db.kind
        self.id = ""  # made when the store is set up; host-chain entries and anchors name it

    @classmethod
    def open(cls, where: str | os.PathLike[str] | None = None, *, create: bool = True) -> Store:
        db = backend(where)
        if not create and db.kind == "sqlite" and not os.path.exists(db.where):
            raise StoreError(f"audit store {db.where}: no such file (nothing has been recorded there)")
        conn = db.connect()
        store = cls(db, conn)
        try:
            with store._lock:
                db.create(conn)
                row = db.run(conn, "SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    # Another process may be setting the same store up: the first one's values stay.
                    for k, v in (("schema", SCHEMA_VERSION), ("id", uuid.uuid4().hex)):
                        db.run(
                            conn, "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (k, v)
                        )
                    row = db.run(conn, "SELECT value FROM meta WHERE key = 'schema'").fetchone()
                store.id = str(db.run(conn, "SELECT value FROM meta WHERE key = 'id'").fetchone()[0])
                if row[0] != SCHEMA_VERSION:
                    raise StoreError(
                        f"audit store {db.where}: schema version {row[0]}; this corral reads version "
                        f"{SCHEMA_VERSION}"
                    )
        except errors() as e:
            store.close()
            raise StoreError(f"audit store {db.where}: can't be set up: {e}") from e
        except StoreError:
            store.close()
            raise
        return store

    def _connection(self) -> Any:
        """The connection, made again if the server dropped it (a PostgreSQL restart). A SQLite
        store is never reopened: a file that went away would come back empty."""
        if self._db.kind == "postgresql" and (
            getattr(self._conn, "closed", False) or getattr(self._conn, "broken", False)
        ):
            self._conn = self._db.connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except errors():
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------------

    def append(
        self,
        events: Sequence[Chained],
        tallies: Mapping[str, Tally],
        signer: chain.Signer,
        *,
        sign: bool,
    ) -> tuple[int, str, str | None]:
        """Commit `events` (in order; each sandbox's contiguous with what was committed before) and
        the sandboxes' rows, and extend the host chain by one entry listing the heads they reach,
        signed when `sign`. All or nothing: a StoreError (and nothing committed) if the store can't
        take it. Returns the chain entry's (seq, hash, signature)."""
        db = self._db
        heads: dict[str, tuple[int, str]] = {}
        for e in events:
            heads[e.sandbox] = (e.seq, e.hash)
        with self._writing("written") as conn:
            for tally in tallies.values():
                if tally.events == 0:
                    continue
                self._upsert(tally)
            self._insert_events(events)
            row = db.run(
                conn,
                "SELECT seq, hash FROM chain WHERE host = ? ORDER BY seq DESC LIMIT 1",
                (signer.host,),
            ).fetchone()
            seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, chain.HOST_GENESIS)
            now = stamp(datetime.now(UTC))
            advanced = [(s, n, h) for s, (n, h) in sorted(heads.items())]
            body = chain.heads_body(self.id, seq, now, advanced)
            digest = chain.link(prev, body)
            signature = signer.sign(digest) if sign else None
            db.run(
                conn,
                "INSERT INTO chain (host, seq, time, body, prev, hash, signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (signer.host, seq, now, body, prev, digest, signature),
            )
        return seq, digest, signature

    @contextlib.contextmanager
    def _writing(self, done: str) -> Iterator[Any]:
        """A write transaction holding the store's write lock: committed if the block ends, rolled
        back if it raises; a StoreError saying the store can't be `done` if the store fails."""
        db = self._db
        with self._lock:
            try:
                db.check()
                conn = self._connection()
                db.begin_write(conn)
                try:
                    yield conn
                    db.run(conn, "COMMIT")
                except BaseException:
                    with contextlib.suppress(*errors()):
                        db.run(conn, "ROLLBACK")
                    raise
            except errors() as e:
                raise StoreError(f"audit store {db.where}: can't be {done}: {_why(e)}") from e

    # Rows per INSERT statement: one statement for many rows, because a statement run per row hands
    # the interpreter's lock back and forth once per row, and a writer competing with busy threads
    # then waits for it thousands of times a commit. 9 values a row, under SQLite's 32,766 limit.
    _ROWS_PER_INSERT = 3_000

    def _insert_events(self, events: Sequence[Chained]) -> None:
        for start in range(0, len(events), self._ROWS_PER_INSERT):
            chunk = events[start : start + self._ROWS_PER_INSERT]
            values: list[Any] = []
            for e in chunk:
                values += (e.sandbox, e.seq, e.time, e.type, e.category, e.severity, e.body, e.prev, e.hash)
            self._db.run(
                self._conn,
                "INSERT INTO events (sandbox, seq, time, type, category, severity, body, prev, hash) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                values,
            )

    def _upsert(self, t: Tally) -> None:
        first = self._db.run(self._conn, "SELECT 1 FROM sandboxes WHERE id = ?", (t.id,)).fetchone() is None
        values = (
            t.id,
            t.host,
            t.writer_pid,
            t.writer_boot,
            t.started,
            t.stopped,
            t.stop_reason,
            t.policy,
            json.dumps(t.labels, sort_keys=True),
            t.events,
            t.head,
            t.alerts,
            t.worst,
            json.dumps(t.categories, sort_keys=True),
        )
        if first:
            self._db.run(
                self._conn,
                "INSERT INTO sandboxes (id, host, writer_pid, writer_boot, started, stopped, stop_reason, "
                "policy, labels, events, head, alerts, worst, categories) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            self._db.run_many(
                self._conn,
                "INSERT INTO labels (key, value, sandbox) VALUES (?, ?, ?)",
                [(k, v, t.id) for k, v in sorted(t.labels.items())],
            )
        else:
            self._db.run(
                self._conn,
                "UPDATE sandboxes SET stopped = ?, stop_reason = ?, policy = ?, events = ?, head = ?, "
                "alerts = ?, worst = ?, categories = ? WHERE id = ?",
                (
                    t.stopped,
                    t.stop_reason,
                    t.policy,
                    t.events,
                    t.head,
                    t.alerts,
                    t.worst,
                    json.dumps(t.categories, sort_keys=True),
                    t.id,
                ),
            )
            if t.relabeled:
                # Labels given after the start (`sandbox.label`): the row and the table readers
                # filter by get them in the same transaction as the event that gave them.
                self._db.run(
                    self._conn,
                    "UPDATE sandboxes SET labels = ? WHERE id = ?",
                    (json.dumps(t.labels, sort_keys=True), t.id),
                )
                self._db.run(self._conn, "DELETE FROM labels WHERE sandbox = ?", (t.id,))
                self._db.run_many(
                    self._conn,
                    "INSERT INTO labels (key, value, sandbox) VALUES (?, ?, ?)",
                    [(k, v, t.id) for k, v in sorted(t.labels.items())],
                )

    # --- reading ---------------------------------------------------------------------------------

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                rows: list[Any] = self._db.run(self._connection(), statement, params).fetchall()
            except errors() as e:
                raise StoreError(f"audit store {self.where}: can't be read: {_why(e)}") from e
        return rows

    _SANDBOX_COLUMNS = (
        "id, started, stopped, stop_reason, policy, labels, host, writer_pid, events, head, alerts, "
        "worst, categories"
    )

    def sandboxes(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[SandboxInfo]:
        """Sandboxes, newest first, with every label in `labels`, started within [since, until]."""
        where, params = self._sandbox_where(labels or {}, "id")
        if since is not None:
            where.append("started >= ?")
            params.append(stamp(since))
        if until is not None:
            where.append("started <= ?")
            params.append(stamp(until))
        sql = f"SELECT {self._SANDBOX_COLUMNS} FROM sandboxes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_sandbox(r) for r in self._query(sql, params)]

    def sandbox(self, sandbox_id: str) -> SandboxInfo | None:
        rows = self._query(f"SELECT {self._SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?", (sandbox_id,))
        return _sandbox(rows[0]) if rows else None

    def find_sandbox(self, prefix: str) -> SandboxInfo:
        """The sandbox whose id is `prefix` or starts with it (as `git` takes short hashes)."""
        found = self.sandbox(prefix)
        if found is not None:
            return found
        rows = self._query(
            f"SELECT {self._SANDBOX_COLUMNS} FROM sandboxes WHERE id >= ? AND id < ? LIMIT 2",
            (prefix, prefix + "\uffff"),
        )
        if len(rows) == 1:
            return _sandbox(rows[0])
        raise StoreError(
            f"sandbox {prefix}: "
            + ("more than one sandbox's id starts so" if rows else f"not in the audit store {self.where}")
        )

    def label_values(self, key: str) -> list[tuple[str, int]]:
        """Each value label `key` takes, with how many sandboxes carry it (the dashboard's runs)."""
        rows = self._query(
            "SELECT value, COUNT(*) FROM labels WHERE key = ? GROUP BY value ORDER BY value", (key,)
        )
        return [(str(v), int(c)) for v, c in rows]

    def label_keys(self) -> list[str]:
        return [str(r[0]) for r in self._query("SELECT DISTINCT key FROM labels ORDER BY key")]

    def _sandbox_where(self, labels: Mapping[str, str], column: str) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for k, v in sorted(labels.items()):
            where.append(f"{column} IN (SELECT sandbox FROM labels WHERE key = ? AND value = ?)")
            params += [k, v]
        return where, params

    def events(
        self, filters: Filters = Filters(), *, after: int = 0, limit: int | None = None
    ) -> Iterator[StoredEvent]:
        """Events matching `filters`, in commit order (one sandbox's: in its chain's order), those
        with cursor `n` > `after`; streamed, a few thousand rows at a time."""
        where, params = self._sandbox_where(filters.labels, "sandbox")
        if filters.sandbox is not None:
            where.append("sandbox = ?")
            params.append(filters.sandbox)
        if filters.types:
            where.append(f"type IN ({', '.join('?' * len(filters.types))})")
            params += list(filters.types)
        if filters.categories:
            where.append(f"category IN ({', '.join('?' * len(filters.categories))})")
            params += list(filters.categories)
        if filters.since is not None:
            where.append("time >= ?")
            params.append(stamp(filters.since))
        if filters.until is not None:
            where.append("time <= ?")
            params.append(stamp(filters.until))
        order = "seq" if filters.sandbox is not None else "n"
        left = limit
        while left is None or left > 0:
            page = _FETCH if left is None else min(_FETCH, left)
            if filters.sandbox is not None:
                cursor_sql, cursor = "seq > ?", after if after else 0
            else:
                cursor_sql, cursor = "n > ?", after
            sql = (
                "SELECT sandbox, seq, time, type, body, hash, n FROM events WHERE "
                + " AND ".join([*where, cursor_sql])
                + f" ORDER BY {order} LIMIT {page}"
            )
            rows = self._query(sql, [*params, cursor])
            for r in rows:
                yield StoredEvent(
                    sandbox=r[0],
                    seq=int(r[1]),
                    time=parse_stamp(r[2]),
                    type=r[3],
                    body=json.loads(r[4]),
                    hash=r[5],
                    n=int(r[6]),
                )
            if len(rows) < page:
                return
            after = int(rows[-1][1] if filters.sandbox is not None else rows[-1][6])
            if left is not None:
                left -= len(rows)

    def last_cursor(self) -> int:
        rows = self._query("SELECT MAX(n) FROM events")
        return int(rows[0][0] or 0)

    def counts(self) -> dict[str, int]:
        """Totals for metrics: sandboxes, running (not stopped), events."""
        ((sandboxes, running),) = self._query(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN stopped IS NULL THEN 1 ELSE 0 END), 0) FROM sandboxes"
        )
        return {"sandboxes": int(sandboxes), "running": int(running), "events": self.last_cursor()}

    def alert_counts(self) -> list[tuple[str, str, int]]:
        """(category, severity, alerts) over the whole store."""
        rows = self._query(
            "SELECT category, severity, COUNT(*) FROM events WHERE type = 'alert' "
            "GROUP BY category, severity ORDER BY category, severity"
        )
        return [(str(c), str(s), int(n)) for c, s, n in rows]

    def deny_counts(self) -> list[tuple[str, int]]:
        """(layer, denials) over the whole store; an aggregated denial counts once."""
        rows = self._query(
            "SELECT category, COUNT(*) FROM events WHERE type = 'deny' GROUP BY category ORDER BY category"
        )
        return [(str(c), int(n)) for c, n in rows]

    def type_count(self, event_type: str, since: datetime | None = None) -> int:
        if since is None:
            rows = self._query("SELECT COUNT(*) FROM events WHERE type = ?", (event_type,))
        else:
            rows = self._query(
                "SELECT COUNT(*) FROM events WHERE type = ? AND time >= ?", (event_type, stamp(since))
            )
        return int(rows[0][0])

    def events_since(self, since: datetime) -> int:
        return int(self._query("SELECT COUNT(*) FROM events WHERE time >= ?", (stamp(since),))[0][0])

    def last_commit(self) -> datetime | None:
        """When the newest commit of any host was made."""
        rows = self._query("SELECT MAX(time) FROM chain")
        return parse_stamp(rows[0][0]) if rows and rows[0][0] else None

    def proof(self, sandbox_id: str) -> dict[str, Any]:
        """What shows a sandbox's events are the ones committed: its chain (seq, prev, hash of each
        event) and the host-chain entries that carry its head, with their signatures and the host's
        public key fingerprint. Verifiable with nothing but the events and the host's public key."""
        links = self._query(
            "SELECT seq, prev, hash FROM events WHERE sandbox = ? ORDER BY seq", (sandbox_id,)
        )
        info = self.sandbox(sandbox_id)
        entries = []
        if info is not None:
            rows = self._query(
                "SELECT seq, body, prev, hash, signature FROM chain WHERE host = ? AND body LIKE ? "
                "ORDER BY seq",
                (info.host, f'%"{sandbox_id}"%'),
            )
            entries = [
                {"seq": int(r[0]), "body": r[1], "prev": r[2], "hash": r[3], "signature": r[4]} for r in rows
            ]
            # The first signed entry at or after the last one carrying the head: the checkpoint that
            # vouches for it.
            if entries:
                last = entries[-1]["seq"]
                signed = self._query(
                    "SELECT seq, body, prev, hash, signature FROM chain WHERE host = ? AND seq >= ? "
                    "AND signature IS NOT NULL ORDER BY seq LIMIT 1",
                    (info.host, last),
                )
                if signed and int(signed[0][0]) != last:
                    r = signed[0]
                    entries.append(
                        {"seq": int(r[0]), "body": r[1], "prev": r[2], "hash": r[3], "signature": r[4]}
                    )
        return {
            "sandbox": sandbox_id,
            "genesis": chain.genesis(sandbox_id),
            "host": info.host if info else None,
            "events": [{"seq": int(s), "prev": p, "hash": h} for s, p, h in links],
            "host_chain": entries,
        }

    def verify(self, keys: Sequence[Any] | None = None) -> Any:
        """Check every chain and signature (see `corral.store.verify`); a `Verification`."""
        from corral.store.verify import verify  # verify reads through this class

        return verify(self, keys)

    # --- retention -------------------------------------------------------------------------------

    def prune(self, older_than: timedelta, signer: chain.Signer) -> list[str]:
        """Remove whole sandboxes that stopped more than `older_than` ago, each replaced by a record
        of its last (count, head) signed with the host key, so the host chain that names it still
        verifies. Sandboxes still running (or cut off) are kept. Returns the ids removed."""
        cutoff = stamp(datetime.now(UTC) - older_than)
        db = self._db
        removed: list[str] = []
        with self._writing("pruned") as conn:
            rows = db.run(
                conn,
                "SELECT id, events, head FROM sandboxes WHERE stopped IS NOT NULL AND stopped < ?",
                (cutoff,),
            ).fetchall()
            now = stamp(datetime.now(UTC))
            for sid, count, head in rows:
                body = chain.prune_body(sid, int(count), head, now)
                db.run(
                    conn,
                    "INSERT INTO pruned (sandbox, host, body, signature) VALUES (?, ?, ?, ?)",
                    (sid, signer.host, body, signer.sign(chain.link(chain.HOST_GENESIS, body))),
                )
                for statement in (
                    "DELETE FROM events WHERE sandbox = ?",
                    "DELETE FROM labels WHERE sandbox = ?",
                    "DELETE FROM sandboxes WHERE id = ?",
                ):
                    db.run(conn, statement, (sid,))
                removed.append(sid)
        if removed and db.kind == "sqlite":
            self._query("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    # for `verify`
    def raw(self, statement: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        """Rows of a read-only statement, streamed."""
        with self._lock:
            try:
                cur = self._db.run(self._conn, statement, params)
                while True:
                    rows = cur.fetchmany(_FETCH)
                    if not rows:
                        return
                    yield from rows
            except errors() as e:
                raise StoreError(f"audit store {self.where}: can't be read: {_why(e)}") from e


def _sandbox(r: Sequence[Any]) -> SandboxInfo:
    return SandboxInfo(
        id=r[0],
        started=parse_stamp(r[1]),
        stopped=parse_stamp(r[2]) if r[2] else None,
        stop_reason=r[3],
        policy=r[4],
        labels=json.loads(r[5]),
        host=r[6],
        writer_pid=int(r[7]),
        events=int(r[8]),
        head=r[9],
        alerts=int(r[10]),
        worst=r[11],
        categories=json.loads(r[12]),
    )


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "database or disk is full" in text or "No space left" in text:
        return f"{text} (the disk is full)"
    if "locked" in text:
        return f"{text} (another process holds the store's lock)"
    return text
