"""corral's errors.

    CorralError                  anything corral raises on purpose
    ├── PolicyError              the policy is wrong: names the file, the key and what is accepted
    ├── HostError                this host can't enforce what the policy asks (missing kernel feature,
    │                            not root, missing device); the policy may allow degrading some features
    ├── StoreError               the audit store can't be opened, read or written (names the store
    │                            and why); sandboxes take no commands while it can't be written
    ├── TrajectoryError          a trajectory file given to `corral filter` can't be read, or a line
    │                            of it is not JSON or lacks the episode's field (names file and line)
    └── SandboxError             a sandbox failed at run time
        ├── SandboxStartError    setting the sandbox up failed; nothing was left running
        │   └── PoolError        a pool stopped starting sandboxes after repeated failures (names the last)
        ├── SandboxClosedError   the sandbox is closed (by the user, its lifetime, or a failure)
        └── ExecError            a command could not be started (not: it exited non-zero)

Command failures are not exceptions: `Sandbox.exec` returns an `ExecResult` with the exit code, and
`signal`, `timed_out` and `terminated` say why it ended.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base class of every error corral raises on purpose."""


class PolicyError(CorralError):
    """The policy file or object is invalid.

    `str(err)` is one line per problem, each ``FILE: KEY: what is wrong; what is accepted``.
    Fix the policy; retrying won't help.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class HostError(CorralError):
    """The host cannot enforce something the policy requires (kernel feature, privilege, device).

    Run on a host that has it, or list the feature under the policy's ``degrade:`` key where corral
    allows running without it (the degradation is then reported in the ``sandbox.start`` event).
    """


class StoreError(CorralError):
    """The audit store (or the key that signs its checkpoints) can't be opened, read or written.

    While a host's store can't be written, its sandboxes refuse new commands (their events wait in
    memory, bounded); fix the store (disk space, the lock's holder, the database server) and they
    resume, every event written.
    """


class TrajectoryError(CorralError):
    """A trajectory file (`corral filter`, `corral.rl.filter_trajectories`) can't be read, or one of
    its lines is not a JSON object or lacks the episode's field. The message names the file and the
    line (``FILE:LINE: what``); nothing was written. Fix the file, or name the right field."""


class SandboxError(CorralError):
    """A sandbox failed at run time."""


class SandboxStartError(SandboxError):
    """Setting up the sandbox failed at a named step; everything created so far was torn down."""


class PoolError(SandboxStartError):
    """A `Pool` has no sandbox to hand out and starts no more: its last starts failed one after
    another (`Pool.max_failures` in a row), and the message names the last failure. An
    infrastructure failure, not the agent's doing. Fix the cause, then `Pool.resume()`."""


class SandboxClosedError(SandboxError):
    """The sandbox was already closed (by `close()`, its lifetime budget, or its supervisor)."""


class ExecError(SandboxError):
    """A command could not be started in the sandbox (for example: the sandbox's init is gone), or
    its result can't be trusted: something other than init wrote on the control channel, and the
    sandbox was terminated with a `tamper` alert."""
