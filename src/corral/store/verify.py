"""`corral audit verify`: check an audit store against its chains, signatures and anchors.

Each sandbox's events are put back in chain order by following `prev` links from the sandbox's
genesis, which tells apart what was done to them:
  edited     a row whose hash is not the hash of its own text (the text changed, or its columns say
             other than its text: type, sandbox, time)
  deleted    the chain breaks: an event's predecessor is nowhere (deleted rows, or a deleted sandbox)
  inserted   a row the chain doesn't go through, or a sandbox no host chain names
  reordered  the chain goes through the rows in another order than their seq says
  truncated  the chain ends before the head the host chain committed for it
  rewritten  the chain is whole but ends at another head than the committed one (events edited and
             re-hashed), or a host-chain entry or signature doesn't check
Notes, not tampering: a sandbox cut off (its supervisor died before it stopped: where it was cut),
one still running, commits after the last signed checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from corral.store import chain
from corral.store._store import Store, time_of
from corral.store.records import SEVERITIES, SandboxInfo

TAMPER = ("edited", "deleted", "inserted", "reordered", "truncated", "rewritten", "unverifiable")
_PER_SANDBOX = 20  # findings reported per sandbox at most (the rest are counted)


@dataclass(frozen=True)
class Finding:
    kind: str  # one of TAMPER, or a note: cut, open, unsigned, pruned
    message: str
    sandbox: str | None = None
    seq: int | None = None

    @property
    def tampered(self) -> bool:
        return self.kind in TAMPER


@dataclass
class Verification:
    store: str
    events: int = 0
    sandboxes: int = 0
    commits: int = 0
    checkpoints: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.tampered for f in self.findings)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Committed:
    count: int = 0
    head: str = ""


@dataclass(slots=True)
class _Row:
    seq: int
    prev: str
    hash: str
    intact: bool  # the hash is the hash of the text, and the columns agree with the text


def verify(
    store: Store, keys: Sequence[Ed25519PublicKey] | None = None, *, sandbox: str | None = None
) -> Verification:
    """Check every sandbox and host chain in `store`. `keys`: the hosts' public keys (default: this
    host's, from CORRAL_AUDIT_KEY or /etc/corral/audit.key). `sandbox`: check that sandbox's chain
    only (the host chains are still walked whole: they say which head was committed for it)."""
    started = time.monotonic()
    result = Verification(store.where)
    trusted = {chain.fingerprint(k): k for k in (keys if keys is not None else _default_keys())}
    committed = _verify_host_chains(store, trusted, result)
    pruned = _pruned(store, trusted, result)
    infos = store.sandboxes() if sandbox is None else [i for i in [store.sandbox(sandbox)] if i is not None]
    if sandbox is not None:
        committed = {sid: c for sid, c in committed.items() if sid == sandbox}
    for info in infos:
        result.sandboxes += 1
        rows, stop_seen, checks = _read_sandbox(store, info.id, result)
        _check_sandbox(info.id, rows, checks.linear, committed.pop(info.id, None), result)
        _check_row(info, checks, result)
        if not stop_seen:
            result.findings.append(_open_or_cut(info.id, info.writer_pid, info.events, store))
    for sid, head in sorted(committed.items()):
        mark = pruned.get(sid)
        if mark is not None and (mark.count, mark.head) == (head.count, head.head):
            continue
        result.findings.append(
            Finding(
                "deleted",
                f"sandbox {sid}: committed ({head.count} events) but not in the store, and not pruned",
                sid,
            )
        )
    result.seconds = time.monotonic() - started
    return result


def _default_keys() -> list[Ed25519PublicKey]:
    path = os.environ.get("CORRAL_AUDIT_KEY", chain.DEFAULT_KEY)
    for candidate in (path + ".pub", path):
        if os.path.exists(candidate):
            return [chain.load_public(candidate)]
    return []


def _verify_host_chains(
    store: Store, trusted: dict[str, Ed25519PublicKey], result: Verification
) -> dict[str, _Committed]:
    committed: dict[str, _Committed] = {}
    host: str | None = None
    expect_seq, expect_prev, last_signed, last_seq = 1, chain.HOST_GENESIS, 0, 0
    key: Ed25519PublicKey | None = None

    def finish(h: str) -> None:
        if last_seq > last_signed:
            result.findings.append(
                Finding("unsigned", f"host {h}: {last_seq - last_signed} commits after the last checkpoint")
            )
        anchor = _anchor_for(store, h)
        if anchor is not None and anchor.seq > last_seq:
            result.findings.append(
                Finding(
                    "truncated",
                    f"host {h}: its chain ends at commit {last_seq}, but the checkpoint kept beside its "
                    f"key is commit {anchor.seq}: commits were cut off the store",
                )
            )

    rows = store.raw("SELECT host, seq, body, prev, hash, signature FROM chain ORDER BY host, seq")
    for h, seq, body, prev, digest, signature in rows:
        seq = int(seq)
        if h != host:
            if host is not None:
                finish(host)
            host, expect_seq, expect_prev, last_signed, last_seq = h, 1, chain.HOST_GENESIS, 0, 0
            key = trusted.get(h)
            if key is None:
                result.findings.append(
                    Finding(
                        "unverifiable",
                        f"host {h}: no public key for it (pass --key); its chain can't be checked",
                    )
                )
        result.commits += 1
        if seq != expect_seq or prev != expect_prev:
            result.findings.append(
                Finding(
                    "deleted" if seq > expect_seq else "rewritten",
                    f"host {h}: commit {seq} does not follow commit {expect_seq - 1}",
                )
            )
        if chain.link(prev, body) != digest:
            result.findings.append(Finding("rewritten", f"host {h}: commit {seq} was edited"))
        if signature is not None:
            result.checkpoints += 1
            if key is not None and not chain.signature_ok(key, digest, signature):
                result.findings.append(
                    Finding("rewritten", f"host {h}: commit {seq}'s signature is not the host key's")
                )
            else:
                last_signed = seq
        anchor = _anchor_for(store, h)
        if anchor is not None and anchor.seq == seq and anchor.hash != digest:
            result.findings.append(
                Finding(
                    "rewritten", f"host {h}: commit {seq} is not the one the checkpoint beside its key signed"
                )
            )
        try:
            data = json.loads(body)
            for sid, count, head in data["heads"]:
                committed[sid] = _Committed(int(count), str(head))
            if data["store"] != store.id:
                result.findings.append(
                    Finding(
                        "rewritten", f"host {h}: commit {seq} was made to another store ({data['store']})"
                    )
                )
        except (ValueError, KeyError, TypeError):
            result.findings.append(Finding("rewritten", f"host {h}: commit {seq} is not readable"))
        expect_seq, expect_prev, last_seq = seq + 1, digest, seq
    if host is not None:
        finish(host)
    return committed


def _anchor_for(store: Store, host: str) -> chain.Anchor | None:
    path = os.environ.get("CORRAL_AUDIT_KEY", chain.DEFAULT_KEY)
    anchor = chain.read_anchor(path, store.id)
    return anchor if anchor is not None and anchor.host == host else None


def _pruned(
    store: Store, trusted: dict[str, Ed25519PublicKey], result: Verification
) -> dict[str, _Committed]:
    marks: dict[str, _Committed] = {}
    for sid, host, body, signature in store.raw("SELECT sandbox, host, body, signature FROM pruned"):
        key = trusted.get(host)
        if key is None or not chain.signature_ok(key, chain.link(chain.HOST_GENESIS, body), signature):
            result.findings.append(
                Finding(
                    "deleted", f"sandbox {sid}: removed with a prune record the host key did not sign", sid
                )
            )
            continue
        data = json.loads(body)
        marks[sid] = _Committed(int(data["count"]), str(data["head"]))
    return marks


@dataclass
class _Checks:
    alerts: int = 0
    worst: str | None = None
    categories: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] | None = None
    linear: bool = True  # every row intact and linked to the one before it, seq 1, 2, ...


def _read_sandbox(store: Store, sid: str, result: Verification) -> tuple[list[_Row], bool, _Checks]:
    rows: list[_Row] = []
    checks = _Checks()
    stop_seen = False
    link = chain.link
    expect_prev, expect_seq = chain.genesis(sid), 1
    checks.linear = True
    for seq, time_col, typ, category, body, prev, digest in store.raw(
        "SELECT seq, time, type, category, body, prev, hash FROM events WHERE sandbox = ? ORDER BY seq",
        (sid,),
    ):
        result.events += 1
        intact = link(prev, body) == digest and _columns_agree(body, sid, typ, time_col)
        if typ == "alert" or typ == "sandbox.start" or typ == "sandbox.stop" or typ == "sandbox.label":
            data = json.loads(body)
            if typ == "alert":
                cat, sev = data.get("category"), data.get("severity")
                intact = intact and cat == category
                checks.alerts += 1
                checks.categories[cat] = checks.categories.get(cat, 0) + 1
                if sev in SEVERITIES and (
                    checks.worst is None or SEVERITIES.index(sev) < SEVERITIES.index(checks.worst)
                ):
                    checks.worst = sev
            elif typ == "sandbox.start":
                checks.labels = {**data.get("labels", {}), **(checks.labels or {})}
            elif typ == "sandbox.label":
                # Added after the start (a pool's episode); a key already set keeps its value, as
                # the writer files them.
                checks.labels = {**data.get("labels", {}), **(checks.labels or {})}
            else:
                stop_seen = True
        # The common case, checked as the rows stream by: each row links to the one before it.
        checks.linear = checks.linear and intact and prev == expect_prev and seq == expect_seq
        expect_prev, expect_seq = digest, seq + 1
        rows.append(_Row(seq, prev, digest, intact))
    return rows, stop_seen, checks


def _columns_agree(body: str, sid: str, typ: str, time_col: str) -> bool:
    # The events' JSON starts {"v":N,"time":"...","sandbox":"...","type":"...": the columns readers
    # filter by must say the same, or an edited column could hide an event from a query.
    return f'"sandbox":"{sid}","type":"{typ}"' in body[:160] and time_of(body) == time_col


def _check_sandbox(
    sid: str, rows: list[_Row], linear: bool, committed: _Committed | None, result: Verification
) -> None:
    found: list[Finding] = []
    if committed is None:
        found.append(Finding("inserted", f"sandbox {sid}: no host chain names it", sid))
    order: list[int]
    extra: list[int]
    if linear:
        order, extra = list(range(len(rows))), []
    else:
        for r in rows:
            if not r.intact:
                found.append(Finding("edited", f"sandbox {sid}: event {r.seq} was edited", sid, r.seq))
        order, extra = _follow(sid, rows, found)
    for i in extra:
        found.append(
            Finding("inserted", f"sandbox {sid}: event {rows[i].seq} is not in its chain", sid, rows[i].seq)
        )
    for a, b in itertools.pairwise(order):
        if rows[b].seq < rows[a].seq:
            found.append(
                Finding(
                    "reordered",
                    f"sandbox {sid}: event {rows[b].seq} comes after event {rows[a].seq} in its chain",
                    sid,
                    rows[b].seq,
                )
            )
    if committed is not None:
        count = len(order)
        head = rows[order[-1]].hash if order else chain.genesis(sid)
        if count < committed.count and not any(f.kind == "deleted" for f in found):
            found.append(
                Finding(
                    "truncated",
                    f"sandbox {sid}: its chain ends after {count} events; {committed.count} were committed",
                    sid,
                    count,
                )
            )
        elif count > committed.count:
            found.append(
                Finding(
                    "inserted",
                    f"sandbox {sid}: {count - committed.count} events after its committed head "
                    f"(event {committed.count})",
                    sid,
                    committed.count + 1,
                )
            )
        elif count == committed.count and head != committed.head and not found:
            found.append(
                Finding(
                    "rewritten", f"sandbox {sid}: its chain ends at another head than the committed one", sid
                )
            )
    if len(found) > _PER_SANDBOX:
        more = len(found) - _PER_SANDBOX
        found = [*found[:_PER_SANDBOX], Finding(found[_PER_SANDBOX].kind, f"sandbox {sid}: {more} more", sid)]
    result.findings += found


def _follow(sid: str, rows: list[_Row], found: list[Finding]) -> tuple[list[int], list[int]]:
    """The rows in chain order from the genesis (indexes), and the rows the chain doesn't go
    through. A break (a predecessor nowhere) is a deletion; the walk goes on from the next row."""
    after: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        after.setdefault(r.prev, []).append(i)
    successors = {r.prev for r in rows}
    visited = [False] * len(rows)
    order: list[int] = []
    extra: list[int] = []
    cur = chain.genesis(sid)
    nxt = 0  # the lowest-seq row not visited yet, for restarting after a break
    while True:
        candidates = [i for i in after.get(cur, ()) if not visited[i]]
        if not candidates:
            while nxt < len(rows) and visited[nxt]:
                nxt += 1
            if nxt == len(rows):
                return order, extra
            i = nxt
            if rows[i].hash not in successors and i != len(rows) - 1:
                visited[i] = True  # leads nowhere and isn't the last: a row slipped in
                extra.append(i)
                continue
            before = rows[order[-1]].seq if order else 0
            found.append(
                Finding(
                    "deleted",
                    f"sandbox {sid}: the event(s) between event {before} and event {rows[i].seq} are missing",
                    sid,
                    rows[i].seq,
                )
            )
            cur = rows[i].prev
            continue
        if len(candidates) > 1:
            # Two rows claim the same predecessor: the one the chain goes on from is the real one.
            keep = next((i for i in candidates if rows[i].hash in successors), candidates[0])
            for i in candidates:
                if i != keep:
                    visited[i] = True
                    extra.append(i)
            candidates = [keep]
        i = candidates[0]
        visited[i] = True
        order.append(i)
        cur = rows[i].hash


def _check_row(info: SandboxInfo, checks: _Checks, result: Verification) -> None:
    problems = []
    if (info.alerts, info.worst, info.categories) != (checks.alerts, checks.worst, checks.categories):
        problems.append(
            f"its alerts say {info.alerts} (worst {info.worst}), its events {checks.alerts} "
            f"(worst {checks.worst})"
        )
    if checks.labels is not None and checks.labels != info.labels:
        problems.append(
            f"its labels say {info.labels}, its sandbox.start and sandbox.label events {checks.labels}"
        )
    for p in problems:
        result.findings.append(Finding("edited", f"sandbox {info.id}: its summary was edited: {p}", info.id))


def _open_or_cut(sid: str, pid: int, count: int, store: Store) -> Finding:
    alive = False
    if pid > 0:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    if alive and store.kind == "sqlite":
        return Finding("open", f"sandbox {sid}: still running ({count} events so far)", sid)
    return Finding(
        "cut",
        f"sandbox {sid}: cut after event {count}: its supervisor (pid {pid}) ended before it stopped; "
        "the record is intact up to there",
        sid,
        count,
    )


def summary(v: Verification) -> Iterable[str]:
    for f in v.findings:
        yield f"{'TAMPERED' if f.tampered else 'note'}: {f.kind}: {f.message}"
    state = "intact" if v.ok else "TAMPERED"
    yield (
        f"{v.store}: {state}: {v.events} events in {v.sandboxes} sandboxes, {v.commits} commits "
        f"({v.checkpoints} signed) checked in {v.seconds:.2f}s ({v.rate:,.0f} events/s)"
    )
