"""The audit store: what goes in comes out, in order, filterable by label; each kind of tampering
is found and named; prune keeps the chains verifiable. Every test runs on SQLite and on a real
PostgreSQL server (tests/pg.py). The durability tests (a real sandbox, a full disk, a held lock, a
vanished file, a killed supervisor, a stopped database server) are in test_store_durability.py."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import pg
from corral import Store, StoreError
from corral.events import Alert, ExecStart, SandboxStart, SandboxStop
from corral.runtime._eventlog import EventLog
from corral.store import Filters, chain, verify
from corral.store._backend import backend
from corral.store.writer import AuditWriter
from helpers import wait_until


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.Server]:
    with pg.server() as server:
        yield server


_databases = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    server: pg.Server = request.getfixturevalue("pg_server")
    return server.create_database(f"corral_test_{next(_databases)}")


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "keys" / "audit.key")
    monkeypatch.setenv("CORRAL_AUDIT_KEY", path)  # what verify trusts by default
    return path


def _start(sid: str, labels: dict[str, str]) -> SandboxStart:
    return SandboxStart(
        sandbox=sid,
        policy="test.yaml",
        cgroup_version=1,
        uid=1_300_000,
        limits={},
        workspace="/tmp/x",
        labels=labels,
    )


def _alert(sid: str, category: Any = "mining", severity: Any = "critical") -> Alert:
    return Alert(
        sandbox=sid,
        rule="cpu_miner",
        category=category,
        severity=severity,
        action="kill",
        outcome="killed 1 process",
        message="a miner",
    )


def record(where: str, key: str, sandboxes: int = 3, commands: int = 20) -> list[str]:
    """Sandboxes as a real host records them (the event log chains, the writer commits), without
    the kernel parts: sandbox i has `commands` exec.start events, and an alert when i is odd."""
    writer = AuditWriter(where, key)
    ids = []
    try:
        for i in range(sandboxes):
            sid = f"{i:04d}aaaabbbb"
            labels = {"run": "r1" if i < 2 else "r2", "episode": str(i)}
            log = EventLog(sid, None, writer, labels)
            log.add(_start(sid, labels))
            for n in range(commands):
                log.add(ExecStart(sandbox=sid, exec=n + 1, command=["echo", str(n)]))
            if i % 2:
                log.add(_alert(sid))
            log.add(SandboxStop(sandbox=sid, reason="closed", duration=1.0))
            assert writer.wait_committed(sid, log.seq, 10)
            ids.append(sid)
    finally:
        writer.stop()
    return ids


def sql(where: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run `statement` on the store behind corral's back, as someone covering tracks would."""
    db = backend(where)
    conn = db.connect()
    try:
        cur = db.run(conn, statement, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def findings(where: str) -> list[tuple[str, str | None, int | None]]:
    with Store.open(where) as store:
        result = verify(store)
    return [(f.kind, f.sandbox, f.seq) for f in result.findings if f.tampered]


def test_what_goes_in_comes_out_in_order_and_filtered(where: str, key: str) -> None:
    ids = record(where, key)
    with Store.open(where) as store:
        run1 = store.sandboxes(labels={"run": "r1"})
        assert sorted(s.id for s in run1) == ids[:2]
        assert {s.verdict for s in run1} == {"clean", "critical"}
        [one] = store.sandboxes(labels={"run": "r1", "episode": "1"})
        assert (one.alerts, one.worst, one.categories, one.stop_reason) == (
            1,
            "critical",
            {"mining": 1},
            "closed",
        )
        events = list(store.events(Filters(sandbox=ids[1])))
        assert [e.seq for e in events] == list(range(1, 24))
        assert [e.type for e in events][:2] == ["sandbox.start", "exec.start"]
        assert events[-1].type == "sandbox.stop"
        # sandbox.stop carries the hash of everything before it: the chain's final link.
        assert events[-1].body["chain"] == events[-2].hash
        assert events[0].body["labels"] == {"run": "r1", "episode": "1"}
        alerts = list(store.events(Filters(labels={"run": "r1"}, types=["alert"])))
        assert [(e.sandbox, e.body["rule"]) for e in alerts] == [(ids[1], "cpu_miner")]
        assert [e.sandbox for e in store.events(Filters(categories=["mining"]))] == [ids[1]]
        assert store.label_values("run") == [("r1", 2), ("r2", 1)]
        assert store.find_sandbox(ids[2][:6]).id == ids[2]
        with pytest.raises(StoreError, match="more than one sandbox's id starts so"):
            store.find_sandbox("000")
        # Paging through more rows than one fetch returns every event once.
        assert len(list(store.events())) == 3 * 22 + 1
        assert len(list(store.events(limit=5))) == 5
        later = list(store.events(after=events[-1].n))
        assert all(e.n > events[-1].n for e in later)
        assert store.alert_counts() == [("mining", "critical", 1)]


def test_an_intact_store_verifies_and_names_its_checkpoints(where: str, key: str) -> None:
    record(where, key)
    with Store.open(where) as store:
        result = verify(store)
        anchor = chain.read_anchor(key, store.id)
    assert result.ok, result.findings
    assert (result.events, result.sandboxes) == (67, 3)
    assert result.checkpoints >= 3  # a sandbox's stop is always signed
    assert anchor is not None and anchor.seq == result.commits


def _body(where: str, sid: str, seq: int) -> str:
    [(body,)] = sql(where, "SELECT body FROM events WHERE sandbox = ? AND seq = ?", (sid, seq))
    return str(body)


def _hash(where: str, sid: str, seq: int) -> str:
    [(digest,)] = sql(where, "SELECT hash FROM events WHERE sandbox = ? AND seq = ?", (sid, seq))
    return str(digest)


def test_an_edited_event_is_found(where: str, key: str) -> None:
    sid = record(where, key)[0]
    sql(
        where,
        "UPDATE events SET body = ? WHERE sandbox = ? AND seq = 5",
        (_body(where, sid, 5).replace("echo", "true"), sid),
    )
    assert findings(where) == [("edited", sid, 5)]


def test_an_edited_column_that_hides_an_event_from_queries_is_found(where: str, key: str) -> None:
    sid = record(where, key)[1]
    sql(
        where,
        "UPDATE events SET type = 'exec.start', category = NULL WHERE sandbox = ? AND type = 'alert'",
        (sid,),
    )
    assert ("edited", sid, 22) in findings(where)


def test_a_deleted_event_is_found(where: str, key: str) -> None:
    sid = record(where, key)[0]
    sql(where, "DELETE FROM events WHERE sandbox = ? AND seq = 7", (sid,))
    assert findings(where) == [("deleted", sid, 8)]
    # Renumbering the rest to hide the gap doesn't help: the chain still breaks there.
    sql(where, "UPDATE events SET seq = seq - 1 WHERE sandbox = ? AND seq > 7", (sid,))
    assert findings(where)[0] == ("deleted", sid, 7)


def test_an_inserted_event_is_found_even_with_a_valid_hash(where: str, key: str) -> None:
    sid = record(where, key)[0]
    # Make room at seq 5 and slip in an event whose hash links correctly to event 4.
    sql(where, "UPDATE events SET seq = seq + 1000 WHERE sandbox = ? AND seq >= 5", (sid,))
    sql(where, "UPDATE events SET seq = seq - 999 WHERE sandbox = ? AND seq >= 1000", (sid,))
    prev = _hash(where, sid, 4)
    forged = ExecStart(sandbox=sid, exec=99, command=["nothing", "to", "see"]).model_dump_json()
    sql(
        where,
        "INSERT INTO events (sandbox, seq, time, type, category, severity, body, prev, hash) "
        "VALUES (?, 5, '2026-01-01T00:00:00.000000Z', 'exec.start', NULL, NULL, ?, ?, ?)",
        (sid, forged, prev, chain.link(prev, forged)),
    )
    found = findings(where)
    assert ("inserted", sid, 5) in found, found
    assert not [f for f in found if f[0] in ("deleted", "truncated")], found


def test_reordered_events_are_found(where: str, key: str) -> None:
    sid = record(where, key)[0]
    sql(where, "UPDATE events SET seq = -1 WHERE sandbox = ? AND seq = 10", (sid,))
    sql(where, "UPDATE events SET seq = 10 WHERE sandbox = ? AND seq = 11", (sid,))
    sql(where, "UPDATE events SET seq = 11 WHERE sandbox = ? AND seq = -1", (sid,))
    assert findings(where) == [("reordered", sid, 10)]


def test_a_truncated_sandbox_is_found_even_with_its_summary_fixed_up(where: str, key: str) -> None:
    sid = record(where, key)[1]
    sql(where, "DELETE FROM events WHERE sandbox = ? AND seq > 15", (sid,))
    sql(
        where,
        "UPDATE sandboxes SET events = 15, head = ?, alerts = 0, worst = NULL, categories = '{}', "
        "stopped = NULL WHERE id = ?",
        (_hash(where, sid, 15), sid),
    )
    found = findings(where)
    assert ("truncated", sid, 15) in found, found


def test_events_edited_and_rehashed_to_the_end_are_found(where: str, key: str) -> None:
    sid = record(where, key)[0]
    rows = sql(where, "SELECT seq, body, prev FROM events WHERE sandbox = ? ORDER BY seq", (sid,))
    prev = rows[2][2]
    for seq, body, _ in rows[2:]:
        body = body.replace('"echo"', '"true"')
        digest = chain.link(prev, body)
        sql(
            where,
            "UPDATE events SET body = ?, prev = ?, hash = ? WHERE sandbox = ? AND seq = ?",
            (body, prev, digest, sid, seq),
        )
        prev = digest
    assert findings(where) == [("rewritten", sid, None)]


def test_an_edited_summary_is_found(where: str, key: str) -> None:
    sid = record(where, key)[1]
    sql(where, "UPDATE sandboxes SET alerts = 0, worst = NULL, categories = '{}' WHERE id = ?", (sid,))
    assert findings(where) == [("edited", sid, None)]


def test_a_deleted_sandbox_is_found(where: str, key: str) -> None:
    sid = record(where, key)[1]
    for statement in (
        "DELETE FROM events WHERE sandbox = ?",
        "DELETE FROM labels WHERE sandbox = ?",
        "DELETE FROM sandboxes WHERE id = ?",
    ):
        sql(where, statement, (sid,))
    assert findings(where) == [("deleted", sid, None)]


def test_a_forged_sandbox_is_found(where: str, key: str) -> None:
    record(where, key)
    sql(where, "UPDATE sandboxes SET id = 'ffffffffffff' WHERE id = '0000aaaabbbb'")
    sql(where, "UPDATE events SET sandbox = 'ffffffffffff' WHERE sandbox = '0000aaaabbbb'")
    kinds = {(k, s) for k, s, _ in findings(where)}
    assert ("inserted", "ffffffffffff") in kinds and ("deleted", "0000aaaabbbb") in kinds


def test_cutting_the_store_tail_with_its_checkpoints_is_found_from_the_anchor(where: str, key: str) -> None:
    sid = record(where, key)[2]
    for statement in (
        "DELETE FROM events WHERE sandbox = ?",
        "DELETE FROM labels WHERE sandbox = ?",
        "DELETE FROM sandboxes WHERE id = ?",
    ):
        sql(where, statement, (sid,))
    # ... and every commit from the first that named it on, signed checkpoints included.
    first = min(int(seq) for seq, body in sql(where, "SELECT seq, body FROM chain") if sid in body)
    sql(where, "DELETE FROM chain WHERE seq >= ?", (first,))
    assert [k for k, _, _ in findings(where)] == ["truncated"]


def test_a_signature_made_without_the_host_key_is_found(where: str, key: str, tmp_path: Path) -> None:
    record(where, key)
    other = chain.Signer(tmp_path / "other.key")
    [(seq, digest)] = sql(where, "SELECT seq, hash FROM chain WHERE seq = 1")
    sql(where, "UPDATE chain SET signature = ? WHERE seq = ?", (other.sign(digest), seq))
    assert [k for k, _, _ in findings(where)] == ["rewritten"]


def test_without_the_hosts_public_key_the_store_is_not_called_intact(
    where: str, key: str, tmp_path: Path
) -> None:
    record(where, key)
    stranger = chain.Signer(tmp_path / "stranger.key")
    with Store.open(where) as store:
        result = verify(store, [stranger.public])
    assert not result.ok
    assert [f.kind for f in result.findings if f.tampered] == ["unverifiable"]


def test_prune_removes_whole_sandboxes_and_the_chain_still_verifies(where: str, key: str) -> None:
    ids = record(where, key)
    with Store.open(where) as store:
        assert store.prune(timedelta(days=30), chain.Signer(key)) == []  # nothing that old
        removed = store.prune(timedelta(0), chain.Signer(key))
        assert sorted(removed) == sorted(ids)
        assert store.sandboxes() == [] and list(store.events()) == []
        result = verify(store)
    assert result.ok, result.findings


def test_a_deletion_dressed_up_as_a_prune_is_found(where: str, key: str, tmp_path: Path) -> None:
    sid = record(where, key)[1]
    [(count, head)] = sql(where, "SELECT events, head FROM sandboxes WHERE id = ?", (sid,))
    body = chain.prune_body(sid, int(count), str(head), "2026-01-01T00:00:00.000000Z")
    forger = chain.Signer(tmp_path / "forger.key")
    sql(
        where,
        "INSERT INTO pruned (sandbox, host, body, signature) VALUES (?, ?, ?, ?)",
        (sid, chain.Signer(key).host, body, forger.sign(chain.link(chain.HOST_GENESIS, body))),
    )
    for statement in (
        "DELETE FROM events WHERE sandbox = ?",
        "DELETE FROM labels WHERE sandbox = ?",
        "DELETE FROM sandboxes WHERE id = ?",
    ):
        sql(where, statement, (sid,))
    kinds = [k for k, _, _ in findings(where)]
    assert kinds.count("deleted") == 2, kinds  # the forged record, and the sandbox it hides


def test_a_store_of_a_newer_schema_or_a_bad_location_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    Store.open(path).close()
    sql(str(path), "UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(StoreError, match=r"audit\.db: schema version 99; this corral reads version 1"):
        Store.open(path)
    with pytest.raises(StoreError, match="unknown kind of store; give a file path"):
        Store.open("mysql://somewhere/db")
    with pytest.raises(StoreError, match="no such file"):
        Store.open(tmp_path / "nothing.db", create=False)


def test_a_bad_key_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "audit.key"
    bad.write_text("not a key")
    with pytest.raises(StoreError, match=r"audit\.key: can't be read as an Ed25519 PEM key"):
        chain.Signer(bad)


def test_the_key_is_made_private_and_the_public_half_beside_it(tmp_path: Path) -> None:
    signer = chain.Signer(tmp_path / "k" / "audit.key")
    assert os.stat(tmp_path / "k" / "audit.key").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o700
    assert chain.fingerprint(chain.load_public(str(tmp_path / "k" / "audit.key.pub"))) == signer.host
    assert chain.Signer(tmp_path / "k" / "audit.key").host == signer.host  # loaded, not made again


def test_the_proof_of_a_sandbox_checks_with_only_its_events_and_the_public_key(where: str, key: str) -> None:
    sid = record(where, key)[1]
    with Store.open(where) as store:
        proof = store.proof(sid)
        bodies = [e for e in store.events(Filters(sandbox=sid))]
    prev = proof["genesis"]
    for link, e in zip(proof["events"], bodies, strict=True):
        assert link["prev"] == prev and chain.link(prev, json.dumps(e.body, separators=(",", ":"))) in (
            link["hash"],
            link["hash"],
        )
        prev = link["hash"]
    heads = [json.loads(entry["body"])["heads"] for entry in proof["host_chain"]]
    assert [sid, len(bodies), prev] in [h for hs in heads for h in hs]
    public = chain.load_public(key + ".pub")
    assert any(
        e["signature"] and chain.signature_ok(public, e["hash"], e["signature"]) for e in proof["host_chain"]
    )


def test_a_backlog_on_a_failing_store_stops_the_sandboxes_instead_of_dropping_events(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.store import writer as writer_module

    # Events an agent inflated (a command line of a megabyte each): the bytes bound, not the count.
    monkeypatch.setattr(writer_module, "PENDING_BYTES_MAX", 8 << 20)
    where = str(tmp_path / "audit.db")
    stopped: list[str] = []
    writer = AuditWriter(where, key, on_overflow=stopped.append)
    holder = sqlite3.connect(where, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # nothing can be committed now
    try:
        log = EventLog("0000ccccdddd", None, writer, {})
        for n in range(12):
            log.add(ExecStart(sandbox="0000ccccdddd", exec=n + 1, command=["x" * (1 << 20)]))
        assert writer.failure is not None and "locked" in writer.failure
        assert writer.pending() == 12  # every one kept
        assert wait_until(lambda: bool(stopped), timeout=5)
        assert "can't be written" in stopped[0] and "events wait for it" in stopped[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert writer.wait_committed("0000ccccdddd", 12, 10)
    writer.stop()
    with Store.open(where) as store:
        assert len(list(store.events(Filters(sandbox="0000ccccdddd")))) == 12
