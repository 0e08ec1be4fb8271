"""A store full of synthetic but well-formed events, fast: for measuring the dashboard's pages over a
million events (the benchmark) and for tests. The events go in through the store's own write path,
chained and committed with signed host-chain entries exactly as a host's writer commits them, so
`corral audit verify` finds the store intact (with the key this returns)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from corral.store import Store, chain
from corral.store._store import Chained, Tally, stamp

BATCH = 20_000  # events per commit (the writer's BATCH_MAX)
_CYCLE = 10  # events per synthetic command


def synthetic_store(
    path: str | os.PathLike[str], sandboxes: int, events_per_sandbox: int, *, key: str | None = None
) -> str:
    """Fill the SQLite store at `path` with `sandboxes` stopped sandboxes of `events_per_sandbox`
    events each (at least 3: start, some work, stop), in runs of 10 sandboxes labelled run=synthetic-N,
    episode=M. Each sandbox's work repeats: a command, its processes (a shell and a child), a DNS query,
    a connection, a resource sample, exits; every 20th command a denial, every 100th an alert. Returns
    the signing key's path (default: beside the store) for `verify`."""
    where = os.fspath(path)
    key_path = key or where + ".key"
    signer = chain.Signer(key_path)
    base = datetime.now(UTC) - timedelta(hours=2)
    with Store.open(where) as store:
        pending: list[Chained] = []
        tallies: dict[str, Tally] = {}
        for i in range(sandboxes):
            sid = f"syn{i:09x}"
            started = base + timedelta(seconds=i)
            tally = Tally(
                id=sid,
                host=signer.host,
                writer_pid=os.getpid(),
                writer_boot="synthetic",
                started=stamp(started),
                labels={"run": f"synthetic-{i // 10}", "episode": str(i % 10)},
            )
            head = chain.genesis(sid)
            events = _events(sid, started, events_per_sandbox, tally.labels)
            for seq, (t, kind, body, category, severity) in enumerate(events, start=1):
                digest = chain.link(head, body)
                pending.append(
                    Chained(
                        sandbox=sid,
                        seq=seq,
                        time=t,
                        type=kind,
                        body=body,
                        prev=head,
                        hash=digest,
                        category=category,
                        severity=severity,
                        stop_reason="closed" if kind == "sandbox.stop" else None,
                    )
                )
                head = digest
                if len(pending) >= BATCH:
                    tallies[sid] = tally
                    tally = _commit(store, signer, pending, tallies)[sid]
                    pending = []
            tallies[sid] = tally
        if pending:
            _commit(store, signer, pending, tallies)
    return key_path


def _commit(
    store: Store, signer: chain.Signer, events: list[Chained], tallies: dict[str, Tally]
) -> dict[str, Tally]:
    by_sandbox: dict[str, list[Chained]] = {}
    for e in events:
        by_sandbox.setdefault(e.sandbox, []).append(e)
    advanced = {
        sid: tallies[sid].advanced(evs, "synthetic.yaml" if evs[0].seq == 1 else None)
        for sid, evs in by_sandbox.items()
    }
    store.append(events, advanced, signer, sign=True)
    for sid, t in advanced.items():
        tallies[sid] = t
    # Stopped sandboxes need no tally any more.
    for sid in [s for s, t in tallies.items() if t.stopped is not None]:
        del tallies[sid]
    return advanced


def _events(
    sid: str, started: datetime, count: int, labels: dict[str, str]
) -> Iterator[tuple[str, str, str, str | None, str | None]]:
    """(time, type, body, category, severity) of a sandbox's events, in order."""
    count = max(count, 3)
    t0 = started
    n = 0

    def head(kind: str) -> tuple[str, str]:
        t = t0 + timedelta(milliseconds=n)
        iso = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return iso, f'{{"v":1,"time":"{iso}","sandbox":"{sid}","type":"{kind}"'

    iso, h = head("sandbox.start")
    yield (
        iso,
        "sandbox.start",
        h + ',"policy":"synthetic.yaml","cgroup_version":2,"uid":60001,"limits":{"memory":1073741824.0},'
        '"degraded":[],"workspace":"/var/lib/corral/workspaces/'
        + sid
        + f'","labels":{json.dumps(labels, separators=(",", ":"))}}}',
        None,
        None,
    )
    n = 1
    pid = 10_000
    while n < count - 1:
        command = (n - 1) // _CYCLE + 1
        slot = (n - 1) % _CYCLE
        if slot == 0:
            command_line = ["bash", "-c", f"python3 -m pytest tests/test_{command}.py -q"]
            kind, extra = "exec.start", f',"exec":{command},"command":{json.dumps(command_line)}}}'
        elif slot in (1, 2):
            pid += 1
            ppid = pid - 1 if slot == 2 else 9_999
            argv = ["bash", "-c", "pytest -q"] if slot == 1 else ["python3", "-m", "pytest", "-q"]
            proc = {
                "pid": pid,
                "ns_pid": pid - 9_990,
                "exe": "/usr/bin/" + argv[0],
                "cmdline": argv,
                "started": None,
                "ppid": ppid,
                "exec": command,
            }
            kind = "proc.exec"
            extra = f',"process":{json.dumps(proc)},"cwd":"/workspace","stdio":["pipe","pipe","pipe"],' + (
                f'"exec":{command},"loader":null}}'
            )
        elif slot == 3:
            kind = "dns.query"
            extra = (
                ',"name":"pypi-mirror.internal","qtype":"A","decision":"allow","answer":["198.18.0.7"],'
                f'"exec":{command},"process":null}}'
            )
        elif slot == 4:
            kind = "net.connect"
            extra = (
                ',"destination":"198.18.0.7","port":443,"name":"pypi-mirror.internal","address":"127.0.0.1",'
                '"protocol":"tls","sni":"pypi-mirror.internal","decision":"allow","reason":"egress rule 1",'
                f'"via":"transparent","bytes_out":812,"bytes_in":40960,"duration":0.05,"exec":{command},'
                f'"process":{{"pid":{pid},"cmdline":["python3","-m","pytest","-q"],"ppid":{pid - 1}}}}}'
            )
        elif slot == 5:
            kind = "resource.sample"
            cpu = 0.5 + (command % 7) / 4
            memory = (200 + command % 50) << 20
            extra = f',"cpu":{cpu},"memory":{memory},"processes":2,"top":[],"gpu":[],"exec":{command}}}'
        elif slot in (6, 7):
            kind = "proc.exit"
            exiting = pid if slot == 6 else pid - 1
            extra = f',"pid":{exiting},"exit_code":0,"duration":0.4,"exec":{command},"cmdline":[]}}'
        elif slot == 8:
            kind = "exec.exit"
            extra = (
                f',"exec":{command},"exit_code":0,"signal":null,"duration":0.41,"cpu_seconds":0.38,'
                '"peak_memory":209715200,"timed_out":false,"leftover":[]}'
            )
        elif command % 100 == 0:
            kind = "alert"
            extra = (
                ',"rule":"synthetic_probe","category":"probe","severity":"high","action":"alert",'
                '"outcome":"recorded","message":"synthetic: connections to 12 internal addresses",'
                f'"exec":{command},"process":null,"evidence":{{"processes":[],"connections":[],'
                '"trigger":{"addresses":12},"related":[]},"tags":{"mitre":["T1046"],"owasp":[]}}'
            )
        elif command % 20 == 0:
            kind = "deny"
            extra = (
                f',"layer":"egress","what":"10.0.0.{command % 250} port 22","exec":{command},"process":null,'
                '"detail":"internal address","count":1,"first":null,"last":null}'
            )
        else:
            kind = "proc.exit"
            extra = f',"pid":{pid + 100000},"exit_code":0,"duration":0.01,"exec":{command},"cmdline":[]}}'
        iso, h = head(kind)
        category = "probe" if kind == "alert" else ("egress" if kind == "deny" else None)
        yield iso, kind, h + extra, category, "high" if kind == "alert" else None
        n += 1
    iso, h = head("sandbox.stop")
    yield (
        iso,
        "sandbox.stop",
        h + f',"reason":"closed","duration":{n / 1000},"leftover":[],"error":"","chain":""}}',
        None,
        None,
    )
