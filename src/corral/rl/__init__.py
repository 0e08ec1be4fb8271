"""corral for reinforcement-learning training: episode verdicts, the reward hook, the trajectory
filter and a Gymnasium environment.

    verdict = sb.verdict()                          # or verdict_from_store(store, sandbox_id),
                                                    # episode_verdict(store, {"run": .., "episode": ..})
    reward = task_reward - penalty(verdict, table)  # the reward hook
    info(verdict)                                   # {"corral": verdict as JSON}
    filter_trajectories(["traj.jsonl"], store=None, field="meta.episode", output="kept.jsonl")

Importing this module registers `corral/Shell-v0` with Gymnasium when Gymnasium is installed
(the `rl` extra): `gymnasium.make("corral/Shell-v0", policy=..., reward_fn=..., max_steps=...)`, or
without importing it first, `gymnasium.make("corral.rl:corral/Shell-v0", ...)`.
"""

from __future__ import annotations

import typing as _typing

from corral._errors import TrajectoryError
from corral.rl._filter import FilterSummary, filter_trajectories
from corral.rl._reward import DEFAULT_PENALTIES, info, penalty
from corral.rl._verdict import (
    CategoryVerdict,
    SandboxRef,
    Status,
    Verdict,
    VerdictAlert,
    episode_verdict,
    verdict_from_store,
)

if _typing.TYPE_CHECKING:
    from corral.rl._gym import ShellEnv, Step, default_reward

ENV_ID = "corral/Shell-v0"

__all__ = [
    "DEFAULT_PENALTIES",
    "ENV_ID",
    "CategoryVerdict",
    "FilterSummary",
    "SandboxRef",
    "ShellEnv",
    "Status",
    "Step",
    "TrajectoryError",
    "Verdict",
    "VerdictAlert",
    "default_reward",
    "episode_verdict",
    "filter_trajectories",
    "info",
    "penalty",
    "verdict_from_store",
]

_GYM_NAMES = ("ShellEnv", "Step", "default_reward")


def __getattr__(name: str) -> _typing.Any:
    # The environment needs Gymnasium (the `rl` extra); everything else here does not.
    if name in _GYM_NAMES:
        from corral.rl import _gym

        value = getattr(_gym, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral.rl' has no attribute {name!r}")


def _register() -> None:
    try:
        import gymnasium
    except ImportError:
        return
    if ENV_ID not in gymnasium.registry:
        # Nondeterministic: commands see time, pids and the network, and each step's info names
        # its own sandbox (Gymnasium's checker skips its same-seed, same-result test for it).
        gymnasium.register(id=ENV_ID, entry_point="corral.rl._gym:ShellEnv", nondeterministic=True)


_register()
