"""`corral`: run commands in sandboxes, check policies, print schemas.

Exit codes of `corral run`: the command's own code; 128+N when a signal N killed it; 124 when a
tripwire terminated or froze the sandbox (stopped from outside, as timeout(1) reports); 125 when
corral itself failed (the reason is on stderr) — the same convention as `docker run` and `env`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterable, Sequence
from types import FrameType

from corral import __version__
from corral._errors import CorralError, PolicyError
from corral.cli import _filter, _record
from corral.detect import rules as detect_rules
from corral.events import Alert, Deny, event_json_schema
from corral.isolation import plan as planning
from corral.policy import Policy
from corral.runtime.host import Host
from corral.runtime.rulesets import RulesetCache, rule_files
from corral.runtime.sandbox import ExecResult, Sandbox

CORRAL_FAILED = 125
TRIPWIRE_STOPPED = 124


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description="Permission-scoped Linux sandboxes for AI agents.")
    p.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one command in a fresh sandbox and exit with its code")
    run.add_argument("--policy", required=True, metavar="FILE", help="policy YAML file")
    run.add_argument("--events", metavar="OUT.jsonl", help="append the sandbox's events to this file")
    run.add_argument(
        "--workspace",
        metavar="DIR",
        help="host directory copied in and saved back at exit (created if missing)",
    )
    run.add_argument("--timeout", metavar="SECONDS", type=float, help="override resources.timeout")
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="file the sandbox under this label in the audit store (repeat), e.g. --label run=r42",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    shell = sub.add_parser("shell", help="an interactive shell in a sandbox")
    shell.add_argument("--policy", required=True, metavar="FILE")
    shell.add_argument("--events", metavar="OUT.jsonl")
    shell.add_argument("--workspace", metavar="DIR")

    pol = sub.add_parser("policy", help="check a policy, show its plan, or print the schema")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = psub.add_parser("check", help="validate a policy file (exit 0, or 1 with each problem)")
    check.add_argument("file")
    show = psub.add_parser("plan", help="print the setup steps a policy turns into on this host")
    show.add_argument("file")
    psub.add_parser("schema", help="print the policy file's JSON Schema")

    rules = sub.add_parser("rules", help="check rule files, or list the rules in force")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rcheck = rsub.add_parser("check", help="validate rule files (loaded after corral's own)")
    rcheck.add_argument("files", nargs="+", metavar="FILE")
    rlist = rsub.add_parser("list", help="the active rules, with the responses a policy gives them")
    rlist.add_argument("--policy", metavar="FILE", help="apply this policy's rule files and responses")
    rlist.add_argument("--rules", metavar="FILE", action="append", default=[], help="extra rule file")

    _record.add_parsers(sub)
    _filter.add_parser(sub)
    return p


def _fail(message: str) -> int:
    print(f"corral: {message}", file=sys.stderr)
    return CORRAL_FAILED


def _summary(result: ExecResult) -> None:
    """One stderr line when something was refused or stopped, so a human sees it without the log."""
    notes = [f"{d.layer} refused {d.what}" for d in result.denials if isinstance(d, Deny)]
    if result.leftover:
        notes.append(f"{len(result.leftover)} process(es) left running were killed")
    if notes:
        print(f"corral: {'; '.join(dict.fromkeys(notes))}", file=sys.stderr)


def _verdict(alerts: list[Alert], stopped: str | None) -> None:
    """The run's verdict on stderr, when a rule fired: each alert (rule, category, action) in one line.
    A clean run prints nothing, so a command's own stderr stays its own."""
    if not alerts:
        return
    worst = min(alerts, key=lambda a: _SEVERITY.index(a.severity))
    head = f"corral: verdict: {len(alerts)} alert{'s' if len(alerts) != 1 else ''}, worst {worst.severity}"
    if stopped:
        head += f"; sandbox {stopped}"
    print(head, file=sys.stderr)
    for a in alerts[:10]:
        print(f"corral:   {a.category}: {a.rule} -> {a.action} ({a.outcome}): {a.message}", file=sys.stderr)
    if len(alerts) > 10:
        print(f"corral:   ... and {len(alerts) - 10} more (see --events)", file=sys.stderr)


_SEVERITY = ("critical", "high", "medium", "low", "info")


def _one_sandbox() -> Host:
    """This process starts one sandbox: no network namespace is worth making ahead for a next."""
    return Host(networks_ahead=0)


def _make_workspace(path: str | None) -> None:
    """`--workspace` is where the sandbox's work is saved, so like any output directory a missing one
    is created (with its parents, mode 0755), once the policy is known to be valid."""
    if path is None:
        return
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as e:
        raise CorralError(f"--workspace {path}: cannot create it: {e.strerror}") from e


def _run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        return _fail("run: no command given; use: corral run --policy FILE -- CMD [ARG...]")
    policy = Policy.load(args.policy)
    _make_workspace(args.workspace)
    host = _one_sandbox()
    # Pipes and files pass straight through; a terminal never does (see `_Terminal`).
    terminals = [fd for fd in (0, 1, 2) if os.isatty(fd)]
    with contextlib.ExitStack() as stack:
        # Entered first, left last: the pty outlives the sandbox (see `_Terminal.__exit__`).
        term = stack.enter_context(_Terminal(terminals)) if terminals else None
        stack.enter_context(host)
        sb = stack.enter_context(
            Sandbox(
                policy,
                workspace=args.workspace,
                events=args.events,
                host=host,
                labels=_record.labels_arg(args.label),
            )
        )
        if term is not None:
            run = sb.stream(argv, timeout=args.timeout, stdio=term.stdio, tty=term.controlling)
            term.relay(run)
        else:
            run = sb.stream(argv, timeout=args.timeout, stdio=(0, 1, 2))
            for _ in run:
                pass
        assert run.result is not None
        alerts = sb.alerts()
    _summary(run.result)
    if run.result.timed_out:
        print(f"corral: timed out after {run.result.duration:.1f}s", file=sys.stderr)
    stopped = {"tripwire": "terminated", "frozen": "frozen"}.get(run.result.terminated or "")
    _verdict(alerts, stopped)
    return TRIPWIRE_STOPPED if stopped else run.result.exit_code


class _Terminal:
    """A pty of corral's own, standing in for the host's terminal in the sandbox.

    The host terminal itself never enters the sandbox: a command holding it could push keystrokes
    into the host's session (TIOCSTI), read what the user types after the sandbox exits, or leave
    it in a mode of its choosing (`stty -echo`). Each of stdin, stdout and stderr that is a
    terminal becomes the pty instead (the others pass through); corral relays between the two and
    restores the host terminal's modes at the end, whatever happened inside.
    """

    def __init__(self, terminals: list[int]) -> None:
        self.master, self.slave = os.openpty()
        self.stdio = (
            self.slave if 0 in terminals else 0,
            self.slave if 1 in terminals else 1,
            self.slave if 2 in terminals else 2,
        )
        self.controlling = 0 in terminals  # the pty becomes the command's controlling terminal
        self._input = 0 in terminals
        self._output = 1 if 1 in terminals else 2 if 2 in terminals else None
        self._saved = termios.tcgetattr(0) if self._input and os.isatty(0) else None
        host = next((fd for fd in terminals if os.isatty(fd)), None)
        if host is not None:
            termios.tcsetwinsize(self.slave, termios.tcgetwinsize(host))

    def __enter__(self) -> _Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        # Only once the sandbox is closed: the request that hands the slave over may have been in
        # flight until then.
        os.close(self.slave)
        os.close(self.master)

    def relay(self, run: Iterable[object]) -> None:
        """Copy keystrokes in and output out until `run` (iterated on a thread of its own) ends."""
        done = threading.Event()

        def wait() -> None:
            try:
                for _ in run:
                    pass
            finally:
                done.set()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        watched = [self.master, 0] if self._input else [self.master]
        try:
            if self._saved is not None and self._output is not None:
                # The pty echoes and edits lines now; TCSAFLUSH would drop what was typed ahead.
                tty.setraw(0, termios.TCSANOW)
            while not done.is_set():
                ready, _, _ = select.select(watched, [], [], 0.1)
                if self.master in ready and not self._copy_out():
                    break
                if 0 in ready:
                    data = os.read(0, 65536)
                    if not data:
                        # Passed on as the pty's end-of-file character; the command decides.
                        watched.remove(0)
                        data = termios.tcgetattr(self.slave)[6][termios.VEOF]
                    os.write(self.master, data)
            # What the command wrote just before it exited reaches the master a moment later.
            while select.select([self.master], [], [], 0.05)[0] and self._copy_out():
                pass
        finally:
            if self._saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
        done.wait(2)

    def _copy_out(self) -> bool:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command and everything on its terminal are gone
            return False
        if data and self._output is not None:
            os.write(self._output, data)
        return bool(data)


def _shell(args: argparse.Namespace) -> int:
    """An interactive shell on a pty of its own (see `_Terminal`)."""
    policy = Policy.load(args.policy)
    _make_workspace(args.workspace)
    code = CORRAL_FAILED
    # The shell gets the pty whatever stdin and stdout are; entered first, it outlives the sandbox.
    with (
        _Terminal([0, 1, 2]) as term,
        _one_sandbox() as host,
        Sandbox(policy, workspace=args.workspace, events=args.events, host=host) as sb,
    ):
        run = sb.stream(
            ["/bin/bash", "-i"] if os.path.exists("/bin/bash") else ["/bin/sh", "-i"],
            timeout=policy.resources.lifetime,
            stdio=(term.slave, term.slave, term.slave),
            tty=True,
        )
        term.relay(run)
        if run.result is not None:
            code = run.result.exit_code
    return code


def _policy(args: argparse.Namespace) -> int:
    if args.policy_command == "schema":
        print(json.dumps(Policy.json_schema(), indent=2))
        return 0
    try:
        policy = Policy.load(args.file)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    if args.policy_command == "check":
        if policy.tripwires.enabled:
            try:
                RulesetCache().load(policy)
            except PolicyError as e:
                print(e, file=sys.stderr)
                return 1
        print(f"{args.file}: ok")
        return 0
    plan = planning.build(policy, uid=1_300_000, gid=1_300_000, sandbox_id="00000000")
    print("\n".join(plan.describe()))
    return 0


def _rules(args: argparse.Namespace) -> int:
    if args.rules_command == "check":
        try:
            ruleset = detect_rules.load(args.files)
        except PolicyError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"ok: {len(ruleset.rules)} rules in force, {len(ruleset.disabled)} disabled")
        return 0
    responses: dict[str, str] = {}
    extra = list(args.rules)
    if args.policy:
        policy = Policy.load(args.policy)
        extra = [*rule_files(policy), *extra]
        responses = dict(policy.tripwires.responses)
        if not policy.tripwires.enabled:
            print(f"{args.policy}: tripwires are disabled (tripwires.enabled: false)", file=sys.stderr)
    ruleset = detect_rules.load(extra)
    rows = [("RULE", "CATEGORY", "SEVERITY", "RESPONSE", "TAGS")]
    for r in ruleset.rules:
        response = responses.get(r.name) or responses.get(r.category) or r.response
        tags = " ".join([*r.tags.mitre, *r.tags.owasp])
        rows.append((r.name, r.category, r.severity, response, tags))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for name in ruleset.disabled:
        print(f"{name}  (disabled)")
    return 0


class _Stopped(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the sandbox is closed and its events flushed.
    raise _Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "shell":
            return _shell(args)
        if args.command == "policy":
            return _policy(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "filter":
            return _filter.run(args)
        if args.command == "events" and args.what == "schema":
            print(json.dumps(event_json_schema(), indent=2))
            return 0
        return _record.run(args)  # events, report, export, audit, ui
    except PolicyError as e:
        print(e, file=sys.stderr)
        return CORRAL_FAILED
    except CorralError as e:
        return _fail(str(e))
    except _Stopped as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except OSError as e:
        return _fail(str(e))
