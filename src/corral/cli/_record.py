"""The commands that read the audit store: `corral events`, `corral audit verify|prune`,
`corral report`, `corral export`, `corral ui`. Each takes `--store PATH|URL` (default: the host's
store: CORRAL_STORE, else /var/lib/corral/audit.db)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta

from corral._errors import CorralError, StoreError
from corral.events import Deny, Event
from corral.events.model import AlertCategory
from corral.policy._units import parse_duration
from corral.report import build as build_report
from corral.report import to_html as report_html
from corral.report import to_json as report_json
from corral.report import to_text as report_text
from corral.store import Filters, SandboxInfo, Store, StoredEvent, verify
from corral.store import chain as audit_chain
from corral.store.ocsf import FORMATS, OCSF_VERSION
from corral.store.ocsf import export as export_events
from corral.store.verify import summary

_FOLLOW_POLL = 0.25  # seconds between looks at the store while following


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser(
        "events",
        help="events from the audit store (or `corral events schema`: the events' JSON Schema)",
        description="Print events from the audit store, oldest first, filtered.",
    )
    ev.add_argument("what", nargs="?", choices=["schema"], help="print the events' JSON Schema instead")
    _filters(ev)
    ev.add_argument("--json", action="store_true", help="one JSON object per line (the stored event)")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing events as they are committed")
    ev.add_argument("--limit", type=int, metavar="N", help="at most N events")

    rep = sub.add_parser(
        "report",
        help="the report of a sandbox, or of every sandbox with some labels (a run, an episode)",
        description="The verdict, the timeline, the process tree, top destinations and resource use.",
    )
    rep.add_argument("sandbox", nargs="?", metavar="SANDBOX", help="a sandbox id (or the start of one)")
    _store_option(rep)
    rep.add_argument("--label", action="append", default=[], metavar="K=V", help="e.g. --label run=r42")
    rep.add_argument("--format", choices=["text", "json", "html"], default="text")
    rep.add_argument("--output", "-o", metavar="FILE", help="write it here instead of stdout")

    exp = sub.add_parser(
        "export",
        help="events as JSON lines, or as OCSF records for a SIEM",
        description="Write events one JSON object a line: as stored (jsonl), or as OCSF "
        f"{OCSF_VERSION} records (ocsf; see docs/ocsf.md for the mapping).",
    )
    exp.add_argument("--format", choices=list(FORMATS), required=True)
    _filters(exp)
    exp.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")

    ui = sub.add_parser(
        "ui",
        help="the web dashboard over the audit store, and Prometheus metrics at /metrics",
        description="Serve the dashboard until interrupted. It binds to loopback unless told otherwise, "
        "and then needs a token.",
    )
    ui.add_argument("--listen", default="127.0.0.1:8765", metavar="HOST:PORT")
    _store_option(ui)
    ui.add_argument(
        "--token",
        metavar="TOKEN",
        help="required of every request (default: CORRAL_UI_TOKEN); needed to listen beyond loopback",
    )

    audit = sub.add_parser("audit", help="check or prune the audit store")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    check = asub.add_parser(
        "verify",
        help="check every chain and signature; exit 1 if anything was edited, deleted, inserted, "
        "reordered or truncated",
    )
    _store_option(check)
    check.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUB",
        help="a host's public key (PEM; repeat for a fleet's hosts); default: this host's",
    )
    check.add_argument("--json", action="store_true", help="the findings as JSON")
    prune = asub.add_parser("prune", help="remove whole sandboxes that stopped long enough ago")
    _store_option(prune)
    prune.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: the host's)"
    )


def _filters(p: argparse.ArgumentParser) -> None:
    _store_option(p)
    p.add_argument("--sandbox", metavar="ID", help="one sandbox (an id, or the start of one)")
    p.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="sandboxes labelled so (repeat: all)"
    )
    p.add_argument(
        "--type", action="append", default=[], metavar="T", help="event type, e.g. alert, net.connect"
    )
    p.add_argument(
        "--category", action="append", default=[], metavar="C", help="alert category (or a denial's layer)"
    )
    p.add_argument("--since", metavar="T", help="RFC 3339 time, or an age such as 30m, 2h, 7d")
    p.add_argument("--until", metavar="T", help="RFC 3339 time, or an age")


def labels_arg(values: list[str], option: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CorralError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} run=r42")
        labels[key] = value
    return labels


def time_arg(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            return datetime.now(UTC) - timedelta(seconds=parse_duration(value))
        except ValueError:
            raise CorralError(
                f"{option} {value!r}: expected an RFC 3339 time (2026-12-04T10:00:00Z) or an age "
                "(30m, 2h, 7d)"
            ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def open_store(where: str | None) -> Store:
    return Store.open(where, create=False)


def filters_from(args: argparse.Namespace, store: Store) -> Filters:
    types = [t for item in args.type for t in item.split(",") if t]
    categories = [c for item in args.category for c in item.split(",") if c]
    return Filters(
        sandbox=store.find_sandbox(args.sandbox).id if args.sandbox else None,
        labels=labels_arg(args.label),
        types=types,
        categories=categories,
        since=time_arg(args.since, "--since"),
        until=time_arg(args.until, "--until"),
    )


def events(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        filters = filters_from(args, store)
        for e in _events(store, filters, args.follow, args.limit):
            if args.json:
                print(json.dumps({**e.body, "seq": e.seq, "hash": e.hash}), flush=args.follow)
            else:
                print(line(e), flush=args.follow)
        return 0


def _events(store: Store, filters: Filters, follow: bool, limit: int | None) -> Iterator[StoredEvent]:
    after, left = 0, limit
    while True:
        for e in store.events(filters, after=after, limit=left):
            after = e.seq if filters.sandbox is not None else e.n
            yield e
            if left is not None:
                left -= 1
                if left <= 0:
                    return
            if follow and filters.sandbox is not None and e.type == "sandbox.stop":
                return
        if not follow:
            return
        time.sleep(_FOLLOW_POLL)


def line(e: StoredEvent) -> str:
    """One terminal line for an event: when, which sandbox, what, and the gist of it. Every string
    in it came from the sandbox, so control characters are shown escaped, never sent."""
    b = e.body
    gist: str
    if e.type == "exec.start":
        gist = f"#{b.get('exec')} {_argv(b.get('command'))}"
    elif e.type == "exec.exit":
        gist = f"#{b.get('exec')} exit {b.get('exit_code')} in {b.get('duration', 0):.2f}s"
    elif e.type == "proc.exec":
        p = b.get("process") or {}
        gist = f"pid {p.get('pid')} {_argv(p.get('cmdline')) or p.get('exe')}"
    elif e.type == "proc.exit":
        gist = f"pid {b.get('pid')} exit {b.get('exit_code')}"
    elif e.type == "net.connect":
        where = b.get("name") or b.get("destination")
        gist = f"{b.get('decision')} {where}:{b.get('port')} {b.get('protocol')} ({b.get('reason')})"
    elif e.type == "dns.query":
        gist = f"{b.get('decision')} {b.get('name')} {b.get('qtype')}"
    elif e.type == "deny":
        count = f" x{b['count']}" if b.get("count", 1) > 1 else ""
        gist = f"{b.get('layer')} refused {b.get('what')}{count} {b.get('detail', '')}".rstrip()
    elif e.type == "alert":
        gist = (
            f"{b.get('severity')} {b.get('category')} {b.get('rule')} -> {b.get('action')}: "
            f"{b.get('message')}"
        )
    elif e.type == "sandbox.start":
        labels = " ".join(f"{k}={v}" for k, v in sorted((b.get("labels") or {}).items()))
        gist = f"policy {b.get('policy')} {labels}".rstrip()
    elif e.type == "sandbox.label":
        gist = " ".join(f"{k}={v}" for k, v in sorted((b.get("labels") or {}).items()))
    elif e.type == "sandbox.stop":
        gist = f"{b.get('reason')} after {b.get('duration', 0):.1f}s {b.get('error', '')}".rstrip()
    elif e.type == "resource.sample":
        mib = b.get("memory", 0) // 1024 // 1024
        gist = f"cpu {b.get('cpu', 0):.2f} memory {mib} MiB processes {b.get('processes')}"
    else:
        gist = ""
    stamp = e.time.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return _printable(f"{stamp}  {e.sandbox}  {e.type:<15} {gist}")


def _argv(value: object) -> str:
    return " ".join(str(a) for a in value) if isinstance(value, list) else ""


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def audit(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        keys = [audit_chain.load_public(k) for k in args.key] if args.key else None
        with open_store(args.store) as store:
            result = verify(store, keys)
        if args.json:
            print(
                json.dumps(
                    {
                        "store": result.store,
                        "ok": result.ok,
                        "events": result.events,
                        "sandboxes": result.sandboxes,
                        "commits": result.commits,
                        "checkpoints": result.checkpoints,
                        "seconds": result.seconds,
                        "findings": [
                            {
                                "kind": f.kind,
                                "tampered": f.tampered,
                                "sandbox": f.sandbox,
                                "seq": f.seq,
                                "message": f.message,
                            }
                            for f in result.findings
                        ],
                    },
                    indent=2,
                )
            )
        else:
            for text in summary(result):
                print(text)
        return 0 if result.ok else 1
    try:
        age = parse_duration(args.older_than)
    except ValueError as e:
        raise CorralError(f"--older-than {args.older_than!r}: {e}; e.g. 30d or 12h") from None
    with open_store(args.store) as store:
        removed = store.prune(timedelta(seconds=age), audit_chain.Signer())
    plural = "es" if len(removed) != 1 else ""
    print(f"{store.where}: pruned {len(removed)} sandbox{plural} stopped over {args.older_than} ago")
    return 0


def report(args: argparse.Namespace) -> int:
    labels = labels_arg(args.label)
    if (args.sandbox is None) == (not labels):
        raise CorralError("report: give a SANDBOX id or --label K=V (e.g. --label run=r42), not both")
    with open_store(args.store) as store:
        if args.sandbox is not None:
            sandboxes = [store.find_sandbox(args.sandbox)]
            filters = Filters(sandbox=sandboxes[0].id)
        else:
            sandboxes = store.sandboxes(labels=labels)
            if not sandboxes:
                raise StoreError(f"no sandbox in {store.where} is labelled {_labels_text(labels)}")
            filters = Filters(labels=labels)
        built = build_report(sandboxes, store.events(filters))
    render = {"text": report_text, "json": report_json, "html": report_html}[args.format]
    out = render(built)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
        print(f"{args.output}: {args.format} report of {built.title}", file=sys.stderr)
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


class _Sandboxes(Mapping[str, SandboxInfo]):
    """The sandboxes an export names, read from the store as they come up."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._known: dict[str, SandboxInfo | None] = {}

    def __getitem__(self, sandbox_id: str) -> SandboxInfo:
        if sandbox_id not in self._known:
            self._known[sandbox_id] = self._store.sandbox(sandbox_id)
        found = self._known[sandbox_id]
        if found is None:
            raise KeyError(sandbox_id)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(k for k, v in self._known.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for v in self._known.values() if v is not None)


def export(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        filters = filters_from(args, store)
        sandboxes = _Sandboxes(store)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                written = export_events(store.events(filters), sandboxes, args.format, out)
            print(f"{args.output}: {written} {args.format} records", file=sys.stderr)
        else:
            export_events(store.events(filters), sandboxes, args.format, sys.stdout)
    return 0


def dashboard(args: argparse.Namespace) -> int:
    from corral.ui import ListenError, serve  # the web server's imports, only for this command
    from corral.ui._guard import check_listen

    open_store(args.store).close()  # a clear error for a store that isn't there, before binding
    try:
        host, port = check_listen(args.listen, args.token or os.environ.get("CORRAL_UI_TOKEN"))
        print(
            f"corral ui: http://{host}:{port}/ over {args.store or 'the host store'} (Ctrl-C stops it)",
            file=sys.stderr,
        )
        serve(args.listen, args.store, args.token)
    except ListenError as e:
        raise CorralError(str(e)) from None
    return 0


def _labels_text(labels: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def run(args: argparse.Namespace) -> int:
    """The store-reading commands; a store that can't be read exits 1 with the reason."""
    try:
        if args.command == "events":
            _check_filters(args)
            return events(args)
        if args.command == "report":
            return report(args)
        if args.command == "export":
            _check_filters(args)
            return export(args)
        if args.command == "ui":
            return dashboard(args)
        return audit(args)
    except StoreError as e:
        print(f"corral: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `corral events | head`: the reader has what it wanted.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is quiet
        return 0


EVENT_TYPES = tuple(
    typing.get_args(cls.model_fields["type"].annotation)[0]
    for cls in typing.get_args(typing.get_args(Event)[0])
)
CATEGORIES = (*typing.get_args(AlertCategory), *typing.get_args(Deny.model_fields["layer"].annotation))


def _check_filters(args: argparse.Namespace) -> None:
    for t in (t for item in args.type for t in item.split(",") if t):
        if t not in EVENT_TYPES:
            raise CorralError(f"--type {t!r}: not an event type; one of {', '.join(EVENT_TYPES)}")
    for c in (c for item in args.category for c in item.split(",") if c):
        if c not in CATEGORIES:
            raise CorralError(
                f"--category {c!r}: not an alert category or a denial's layer; one of {', '.join(CATEGORIES)}"
            )
