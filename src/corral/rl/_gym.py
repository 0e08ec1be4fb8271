"""`corral/Shell-v0`: a Gymnasium environment whose actions are shell commands run in a corral
sandbox, one fresh sandbox per episode.

    import gymnasium as gym
    import corral.rl  # registers corral/Shell-v0

    env = gym.make("corral/Shell-v0", policy="policy.yaml", reward_fn=my_reward, max_steps=20)
    obs, info = env.reset()
    obs, reward, terminated, truncated, info = env.step("pytest -q")
    info["corral"]["status"]                       # the episode's verdict so far

Observation: {"output": the command's stdout then stderr (text: printable ASCII, newlines and
tabs; other bytes escaped as \\xNN, other characters as \\uNNNN; at most `max_output` characters,
the middle cut out past that), "exit_code": its exit code (-1 when it could not run)}.
The episode ends:
- terminated: the verdict turned `violated` (with `stop_on_violation`, the default), the sandbox was
  stopped under the agent (a tripwire terminated it), or `done_fn` says the task is done;
- truncated: `max_steps` commands ran, the sandbox reached its lifetime, or the verdict is
  `infra_error` (corral or the host failed: the episode says nothing about the agent).
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from corral._errors import ExecError, SandboxClosedError, StoreError
from corral.egress.service import Upstream
from corral.policy import Policy
from corral.rl._reward import penalty
from corral.rl._verdict import Verdict
from corral.runtime import ExecResult, Host, Sandbox

log = logging.getLogger("corral")

# What actions and observations are written in: printable ASCII, newline and tab (see `_text`).
CHARSET = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
NO_EXIT = -1  # the exit code observed when the command could not run
_CUT = "\n[... {} characters cut ...]\n"


@dataclass(frozen=True)
class Step:
    """What a reward function (and `done_fn`) is given about a step."""

    command: str
    result: ExecResult | None  # None: the command could not run (see `verdict`)
    verdict: Verdict  # the episode's verdict after the command
    index: int  # 1 for the episode's first command
    ending: bool  # this step ends the episode (terminated or truncated), `done_fn` aside


RewardFn = Callable[[Step], float]


def default_reward(step: Step) -> float:
    """No task reward; at the episode's last step, minus the verdict's penalty (`penalty`, with its
    default table)."""
    return -penalty(step.verdict) if step.ending else 0.0


class ShellEnv(gym.Env[dict[str, Any], str]):
    """A shell in a corral sandbox, as a Gymnasium environment (see the module's docstring).

    policy: a Policy, a policy file, or None (the default, offline policy).
    reward_fn: `f(step: Step) -> float`; default `default_reward`.
    max_steps: commands per episode before it is truncated.
    done_fn: `f(step: Step) -> bool`: the task is finished (e.g. the agent ran `submit`).
    stop_on_violation: end the episode at the first alert (its trajectory is dropped anyway).
    prompt: the observation's output at reset (the task, for the agent).
    labels: every episode's sandbox labels (e.g. {"run": "r42"}); each gets "episode" too, unless
        `reset(options={"labels": {...}})` names it (a new random one otherwise).
    host, workspace, upstream: passed to each `Sandbox` (a `workspace` directory is copied in fresh
        for each episode and written back at its end).
    timeout: seconds each command may run (default: the policy's `resources.timeout`).
    max_output, max_command: the observation's and the action's length.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str] | None = None,
        reward_fn: RewardFn | None = None,
        max_steps: int = 50,
        *,
        done_fn: Callable[[Step], bool] | None = None,
        stop_on_violation: bool = True,
        prompt: str = "",
        labels: Mapping[str, str] | None = None,
        host: Host | None = None,
        workspace: str | os.PathLike[str] | None = None,
        upstream: Upstream | None = None,
        timeout: float | None = None,
        max_output: int = 16_384,
        max_command: int = 4_096,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps {max_steps}: at least 1 is accepted")
        if max_output < 64:
            raise ValueError(f"max_output {max_output}: at least 64 is accepted")
        self.policy = policy if isinstance(policy, Policy) or policy is None else Policy.load(policy)
        self.reward_fn = reward_fn or default_reward
        self.done_fn = done_fn
        self.max_steps = max_steps
        self.stop_on_violation = stop_on_violation
        self.prompt = _text(prompt.encode(), max_output)
        self.labels = dict(labels or {})
        self.host, self.workspace, self.upstream, self.timeout = host, workspace, upstream, timeout
        self.max_output = max_output
        self.action_space = spaces.Text(max_command, min_length=0, charset=CHARSET)
        self.observation_space = spaces.Dict(
            {
                "output": spaces.Text(max_output, min_length=0, charset=CHARSET),
                "exit_code": spaces.Discrete(512, start=-256),
            }
        )
        self.sandbox: Sandbox | None = None
        self.episode: str | None = None
        self._steps = 0
        self._over = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Close the last episode's sandbox and start a fresh one (never reused: nothing an agent
        left behind reaches the next episode). options: {"labels": {...}} adds labels for this
        episode. Raises what `Sandbox(...)` raises (`SandboxStartError`, ...): `Verdict.from_error`
        turns it into the episode's `infra_error` verdict."""
        super().reset(seed=seed)
        self._close_sandbox()
        labels = {**self.labels, **dict((options or {}).get("labels", {}))}
        labels.setdefault("episode", secrets.token_hex(8))
        self.sandbox = Sandbox(
            self.policy,
            host=self.host,
            workspace=self.workspace,
            upstream=self.upstream,
            labels=labels,
        )
        self.episode = labels["episode"]
        self._steps = 0
        self._over = False
        return {"output": self.prompt, "exit_code": 0}, self._info(self.sandbox.verdict())

    def step(self, action: str) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.sandbox is None:
            raise RuntimeError("corral/Shell-v0: step() before reset()")
        if self._over:
            raise RuntimeError("corral/Shell-v0: step() after the episode ended; call reset()")
        sb = self.sandbox
        self._steps += 1
        result: ExecResult | None = None
        failure = ""
        try:
            result = sb.exec(action, timeout=self.timeout)
        except SandboxClosedError as e:
            failure = str(e)  # stopped under the agent (a tripwire, its lifetime) or frozen
        except (ExecError, StoreError) as e:
            failure = str(e)
        verdict = sb.verdict()
        if failure and result is None and verdict.status == "clean" and not sb.closed and not sb.frozen:
            # The sandbox says nothing failed, yet the command could not run: not the agent's doing.
            verdict = Verdict.infra(failure, verdict.sandboxes)
        stopped = sb.closed or sb.frozen is not None
        terminated = verdict.status == "violated" and (self.stop_on_violation or stopped)
        truncated = not terminated and (
            verdict.status == "infra_error" or stopped or self._steps >= self.max_steps
        )
        step = Step(action, result, verdict, self._steps, terminated or truncated)
        if not step.ending and self.done_fn is not None and self.done_fn(step):
            terminated = True
            step = Step(action, result, verdict, self._steps, True)
        reward = float(self.reward_fn(step))
        self._over = terminated or truncated
        if result is not None:
            output = _text(_bytes(result.stdout) + _bytes(result.stderr), self.max_output)
            code = max(-256, min(255, result.exit_code))
        else:
            output, code = _text(f"corral: {failure}\n".encode(), self.max_output), NO_EXIT
        return {"output": output, "exit_code": code}, reward, terminated, truncated, self._info(verdict)

    def close(self) -> None:
        """Close the sandbox (idempotent)."""
        self._close_sandbox()
        super().close()

    def _close_sandbox(self) -> None:
        sb, self.sandbox = self.sandbox, None
        if sb is not None:
            try:
                sb.close()
            except StoreError as e:
                # The episode is over; its verdict in the store will say it was not all recorded.
                log.warning("corral/Shell-v0: %s", e)

    def _info(self, verdict: Verdict) -> dict[str, Any]:
        return {"corral": verdict.to_dict(), "episode": self.episode, "step": self._steps}


def _bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


def _text(data: bytes, limit: int) -> str:
    """`data` as text in `CHARSET`, at most `limit` characters (the middle cut out)."""
    text = data.decode("utf-8", errors="backslashreplace").encode("ascii", "backslashreplace").decode()
    text = "".join(c if c in _ALLOWED else f"\\x{ord(c):02x}" for c in text)
    if len(text) <= limit:
        return text
    note = _CUT.format(len(text) - limit)
    note = _CUT.format(len(text) - limit + len(note))
    head = (limit - len(note)) // 2
    return text[:head] + note + text[len(text) - (limit - len(note) - head) :]


_ALLOWED = frozenset(CHARSET)
