"""The two places an audit store can live, behind one interface: a SQLite file (the default, WAL
mode) and a PostgreSQL database (for a fleet). Everything above this module is the same code for
both; here is only what differs: how to connect, the SQL dialect's few differences, and how a
writer takes the store for itself while it appends (the host chains must be extended one commit
at a time, by whichever process commits)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from corral._errors import StoreError

DEFAULT_STORE = "/var/lib/corral/audit.db"
# How long a SQLite writer waits for another process's write to finish before the store counts as
# locked (and the host fails closed). Commits take milliseconds; a longer hold is a stuck holder.
LOCK_WAIT = 2.0
SCHEMA_VERSION = "1"


def _tables(auto_pk: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS sandboxes (
            id TEXT PRIMARY KEY, host TEXT NOT NULL, writer_pid INTEGER NOT NULL,
            writer_boot TEXT NOT NULL, started TEXT NOT NULL, stopped TEXT, stop_reason TEXT,
            policy TEXT NOT NULL, labels TEXT NOT NULL, events INTEGER NOT NULL, head TEXT NOT NULL,
            alerts INTEGER NOT NULL, worst TEXT, categories TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS sandboxes_started ON sandboxes (started)",
        """CREATE TABLE IF NOT EXISTS labels (
            key TEXT NOT NULL, value TEXT NOT NULL, sandbox TEXT NOT NULL,
            PRIMARY KEY (key, value, sandbox))""",
        "CREATE INDEX IF NOT EXISTS labels_sandbox ON labels (sandbox)",
        f"""CREATE TABLE IF NOT EXISTS events (
            n {auto_pk}, sandbox TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL,
            type TEXT NOT NULL, category TEXT, severity TEXT, body TEXT NOT NULL,
            prev TEXT NOT NULL, hash TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS events_sandbox ON events (sandbox, seq)",
        "CREATE INDEX IF NOT EXISTS events_time ON events (time)",
        "CREATE INDEX IF NOT EXISTS events_type ON events (type, category, severity)",
        """CREATE TABLE IF NOT EXISTS chain (
            host TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL, body TEXT NOT NULL,
            prev TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT, PRIMARY KEY (host, seq))""",
        "CREATE INDEX IF NOT EXISTS chain_time ON chain (time)",
        """CREATE TABLE IF NOT EXISTS pruned (
            sandbox TEXT PRIMARY KEY, host TEXT NOT NULL, body TEXT NOT NULL,
            signature TEXT NOT NULL)""",
    ]


class Backend(Protocol):
    kind: str  # "sqlite" or "postgresql"
    where: str  # the path, or the URL without its password: for messages

    def connect(self) -> Any: ...

    def create(self, conn: Any) -> None: ...

    def begin_write(self, conn: Any) -> None:
        """Start a transaction that holds the store's write lock until it ends."""
        ...

    def check(self) -> None:
        """Raise StoreError if the store is no longer where it was opened (the file removed)."""
        ...

    def sql(self, statement: str) -> str:
        """`statement` with `?` placeholders, in this backend's parameter style."""
        ...

    def run(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> Any: ...

    def run_many(self, conn: Any, statement: str, rows: Iterable[Sequence[Any]]) -> None: ...


class SQLite:
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = self.where = path
        self._inode: tuple[int, int] | None = None

    def connect(self) -> Any:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=LOCK_WAIT, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed; only a power cut may
            # lose the last commits (never corrupting the file). FULL would fsync every commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            st = os.stat(self.path)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"audit store {self.path}: can't be opened: {e}") from e
        self._inode = (st.st_dev, st.st_ino)
        return conn

    def create(self, conn: Any) -> None:
        for statement in _tables("INTEGER PRIMARY KEY"):
            conn.execute(statement)

    def begin_write(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def check(self) -> None:
        # A removed database file would go on taking writes into an unlinked inode, and lose them.
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise StoreError(f"audit store {self.path}: gone: {e.strerror}") from e
        if self._inode is not None and (st.st_dev, st.st_ino) != self._inode:
            raise StoreError(f"audit store {self.path}: replaced by another file since it was opened")

    def sql(self, statement: str) -> str:
        return statement

    def run(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(statement, params)

    def run_many(self, conn: Any, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        conn.executemany(statement, rows)


class PostgreSQL:
    kind = "postgresql"

    # Every writer of every host takes this one lock for its commit: commits are then in `events.n`
    # order, which is what `corral events --follow` reads by.
    _LOCK = 0x636F7272616C  # "corral"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, hostport = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}@{hostport}"
        # Shown in messages: the URL without its password.
        self.where = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    def connect(self) -> Any:
        import psycopg  # only a PostgreSQL store needs it

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.Error as e:
            raise StoreError(f"audit store {self.where}: can't connect: {e}") from e

    def create(self, conn: Any) -> None:
        # Two hosts creating the schema at once would race on the catalog.
        conn.execute("SELECT pg_advisory_lock(%s)", (self._LOCK,))
        try:
            for statement in _tables("BIGSERIAL PRIMARY KEY"):
                conn.execute(statement)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._LOCK,))

    def begin_write(self, conn: Any) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._LOCK,))

    def check(self) -> None:
        pass  # a server that went away fails the next statement

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def run(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self.sql(statement), params)

    def run_many(self, conn: Any, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        with conn.cursor() as cur:
            cur.executemany(self.sql(statement), list(rows))


def backend(where: str | os.PathLike[str] | None) -> Backend:
    """The backend for `where`: a postgresql:// URL, a file path, or None for the default (the
    CORRAL_STORE environment variable, else /var/lib/corral/audit.db)."""
    if where is None:
        where = os.environ.get("CORRAL_STORE") or DEFAULT_STORE
    where = os.fspath(where)
    if where.startswith(("postgresql://", "postgres://")):
        return PostgreSQL(where)
    if "://" in where:
        raise StoreError(
            f"audit store {where}: unknown kind of store; give a file path (SQLite) or a postgresql:// URL"
        )
    return SQLite(os.path.abspath(where))


def errors() -> tuple[type[BaseException], ...]:
    """The exceptions a backend's statements raise when the store can't do what was asked."""
    found: list[type[BaseException]] = [sqlite3.Error, OSError]
    try:
        import psycopg

        found.append(psycopg.Error)
    except ImportError:  # pragma: no cover - psycopg is a dependency; a SQLite store works without it
        pass
    return tuple(found)
