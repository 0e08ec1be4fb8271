"""mini-swe-agent on corral: `CorralEnvironment`, an environment whose commands run in a sandbox.

mini-swe-agent (2.x) asks an environment for three things: `execute(action, cwd="", *, timeout=None)`
returning `{"output", "returncode", "exception_info"}` (output is stdout and stderr merged, as its
local and docker environments give it), raising `Submitted` when the output's first line is
`COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`; `get_template_vars()` for its prompt templates; and
`serialize()`, merged into the trajectory it saves. This environment keeps that contract:

- every action is one `Sandbox.exec` (`bash -c COMMAND` by default, in `/workspace`): a fresh shell
  each time, as in mini's own environments, so every step is its own command in the audit store, with
  its own timeout and its own tripwire evidence;
- a timeout gives `returncode` -1 and `exception_info` as mini's environments word it;
- each observation carries `extra["corral"]`: the alerts raised during that step, what was refused,
  leftover processes;
- a sandbox that a tripwire terminated or froze ends the episode (`SandboxTerminated`, an exit
  message with `exit_status` "SandboxTerminated"), since no further command can run;
- `serialize()` puts the episode's verdict at `info["corral"]` of the saved trajectory.

```python
from minisweagent.agents.default import DefaultAgent
from corral.integrations.minisweagent import CorralEnvironment

with CorralEnvironment(policy="examples/policies/offline.yaml", labels={"run": "r1", "episode": "7"}) as env:
    agent = DefaultAgent(model, env, **agent_config)
    result = agent.run("fix the failing test")
    env.verdict()["status"]            # 'clean', 'violated' or 'infra_error'
```

Or through mini's own config: `environment_class: corral.integrations.minisweagent.CorralEnvironment`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

# mini-swe-agent prints a banner on import unless told not to; a library shouldn't print.
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.exceptions import InterruptAgentFlow, Submitted
from minisweagent.utils.serialize import recursive_merge

from corral._errors import ExecError, SandboxClosedError
from corral.integrations._verdict import episode_verdict
from corral.policy import Policy
from corral.runtime.host import Host
from corral.runtime.sandbox import ExecResult, Sandbox

__all__ = ["CorralEnvironment", "CorralEnvironmentConfig", "SandboxTerminated"]

# mini's marker for "the agent is done": the first line of a successful command's output.
SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
# Runs the interpreter with stderr on stdout, so the two arrive interleaved exactly as the program
# wrote them (mini's environments merge them the same way, with stderr=STDOUT).
_MERGED = ["/bin/sh", "-c", 'exec "$@" 2>&1', "corral-merge"]


class CorralEnvironmentConfig(BaseModel):
    """What `CorralEnvironment` takes from mini's config (`environment:` in its YAML)."""

    cwd: str = "/workspace"
    """Working directory of each command (in the sandbox)."""
    env: dict[str, str] = {}
    """Environment variables added to the policy's `env` for each command."""
    timeout: int = 30
    """Seconds a command may run (mini's default); the policy's `resources.timeout` still caps it."""
    interpreter: list[str] = ["bash", "-c"]
    """The program each command is given to, as its last argument."""
    policy: str | None = None
    """A policy file; None for corral's default (offline) policy, or pass a `Policy` as `policy=`."""
    labels: dict[str, str] = {}
    """Labels the sandbox is filed under in the audit store (run, episode, task...)."""
    keep_workspace: bool = False
    """Save /workspace to the host when the sandbox closes."""


class SandboxTerminated(InterruptAgentFlow):
    """The sandbox ended under the agent (a tripwire terminated or froze it, its lifetime ran out, or
    it was closed): mini's agent loop records the exit message and stops the episode."""


class CorralEnvironment:
    """A mini-swe-agent environment backed by a corral sandbox.

    The sandbox is `sandbox=` when given (a pool's episode: the caller closes it), else made by
    `factory()`, else `Sandbox(policy, labels=..., host=host)`; one it made is closed by `close()`.
    Other keyword arguments are `CorralEnvironmentConfig` fields.
    """

    def __init__(
        self,
        *,
        sandbox: Sandbox | None = None,
        factory: Callable[[], Sandbox] | None = None,
        host: Host | None = None,
        config_class: type[CorralEnvironmentConfig] = CorralEnvironmentConfig,
        **kwargs: Any,
    ) -> None:
        policy = kwargs.pop("policy", None)
        if isinstance(policy, Policy):
            given: Policy | str | None = policy
        else:
            given = policy
            kwargs["policy"] = policy
        self.config = config_class(**kwargs)
        if sandbox is not None:
            self.sandbox, self._owned = sandbox, False
        elif factory is not None:
            self.sandbox, self._owned = factory(), True
        else:
            self.sandbox = Sandbox(
                given,
                labels=self.config.labels,
                host=host,
                keep_workspace=self.config.keep_workspace,
            )
            self._owned = True

    # --- mini-swe-agent's Environment protocol ---------------------------------------------------

    def execute(self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        """Run `action["command"]` in the sandbox; mini's output dict (see the module's docstring)."""
        command = str(action.get("command", ""))
        limit = timeout or self.config.timeout
        seen = len(self.sandbox.alerts())
        try:
            r = self.sandbox.exec(
                [*_MERGED, *self.config.interpreter, command],
                cwd=cwd or self.config.cwd,
                env=self.config.env,
                timeout=limit,
            )
        except (SandboxClosedError, ExecError) as e:
            # ExecError: the command's result can't be trusted (its sandbox is being terminated for
            # tampering with corral's channel); either way no further command can run.
            raise self._ended(f"corral: {e}", "") from e
        output = _text(r.stdout)
        step = self._step(r, seen)
        if r.terminated is not None:
            raise self._ended(_ended_why(r, step), output)
        if r.timed_out:
            why = f"Command {command!r} timed out after {limit} seconds"
            result: dict[str, Any] = {
                "output": output,
                "returncode": -1,
                "exception_info": f"An error occurred while executing the command: {why}",
                "extra": {"exception_type": "TimeoutExpired", "exception": why, "corral": step},
            }
        else:
            result = {
                "output": output,
                "returncode": r.exit_code,
                "exception_info": "",
                "extra": {"corral": step},
            }
        self._check_finished(result)
        return result

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        # platform.uname() describes the kernel the sandbox shares (mini's templates name it); the
        # host's environment variables are left out: the sandbox doesn't see them.
        merged: dict[str, Any] = recursive_merge(
            self.config.model_dump(), platform.uname()._asdict(), {"sandbox": self.sandbox.id}, kwargs
        )
        return merged

    def serialize(self) -> dict[str, Any]:
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json"),
                    "environment_type": f"{type(self).__module__}.{type(self).__name__}",
                },
                "corral": self.verdict(),
            }
        }

    # --- corral's additions ----------------------------------------------------------------------

    def verdict(self) -> dict[str, Any]:
        """The episode's verdict so far (final once the sandbox is closed): see `episode_verdict`."""
        return episode_verdict(self.sandbox)

    def close(self) -> None:
        """Close the sandbox if this environment made it (its events are then in the audit store)."""
        if self._owned:
            self.sandbox.close()

    cleanup = close  # the name mini's docker and bubblewrap environments use

    def __enter__(self) -> CorralEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # mini's runners leave environments to the garbage collector, as its other environments
        # expect; a sandbox left open would otherwise live until the process ends.
        if getattr(self, "_owned", False) and not self.sandbox.closed:
            try:
                self.sandbox.close()
            except Exception:
                pass

    # --- helpers --------------------------------------------------------------------------------------

    def _step(self, r: ExecResult, seen: int) -> dict[str, Any]:
        """What corral saw during one command, for the observation's `extra`."""
        new = self.sandbox.alerts()[seen:]
        return {
            "alerts": [
                {"rule": a.rule, "category": a.category, "severity": a.severity, "action": a.action}
                for a in new
            ],
            "denials": len(r.denials),
            "leftover": len(r.leftover),
            "terminated": r.terminated,
            "output_truncated": r.output_truncated,
        }

    def _ended(self, why: str, output: str) -> SandboxTerminated:
        content = f"{output}\n{why}" if output else why
        return SandboxTerminated(
            {
                "role": "exit",
                "content": content,
                "extra": {"exit_status": "SandboxTerminated", "submission": "", "corral": self.verdict()},
            }
        )

    def _check_finished(self, output: dict[str, Any]) -> None:
        """Raise mini's `Submitted` when the agent signalled it is done (as its environments do)."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {
                    "role": "exit",
                    "content": submission,
                    "extra": {"exit_status": "Submitted", "submission": submission},
                }
            )


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


def _ended_why(r: ExecResult, step: dict[str, Any]) -> str:
    rules = ", ".join(f"{a['category']}: {a['rule']}" for a in step["alerts"])
    how = {"tripwire": "terminated by a tripwire", "frozen": "frozen by a tripwire"}.get(
        r.terminated or "", f"ended ({r.terminated})"
    )
    return f"corral: the sandbox was {how}" + (f" ({rules})" if rules else "")
