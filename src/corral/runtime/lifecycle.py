"""A sandbox's lifecycle: one `State`, and every allowed transition in one table.

    STARTING --> RUNNING --> FROZEN
        |           |          |
        |           v          v
        |        STOPPING <----+      (from STARTING too: a start the host refused at the end)
        |           |
        |           v
        +-----> STOPPED --> REAPED    (STARTING -> STOPPED: a start that failed part-way)

RUNNING: commands may run. FROZEN: a tripwire froze every process (kept, stopped, for inspection);
no command runs. STOPPING: the sandbox is being closed (workspace saved, processes killed, its last
events recorded). STOPPED: `sandbox.stop` is recorded; what is left on the host is being released.
REAPED: nothing of the sandbox is left (cgroup, state directory, uid claim, descriptors).

Whether a command is running is tracked beside the state, not in it: a command outlives the state it
started in (a sandbox closed under a command still records the command's exit).
"""

from __future__ import annotations

import enum
import threading
from typing import Literal

StopReason = Literal["closed", "lifetime", "failed", "tripwire"]


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    FROZEN = "frozen"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REAPED = "reaped"


ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.FROZEN, State.STOPPING, State.STOPPED}),
    State.RUNNING: frozenset({State.FROZEN, State.STOPPING}),
    State.FROZEN: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset({State.REAPED}),
    State.REAPED: frozenset(),
}


class Lifecycle:
    """The state of one sandbox, safe to move from any thread. A move the table does not allow is
    refused (False), never raised: the threads that end a sandbox (close, lifetime, a tripwire, a
    failed monitor) race, and only the first wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = State.STARTING
        self.stop_reason: StopReason | None = None  # why STOPPING was entered
        self.frozen_by: str | None = None  # the rule that froze the sandbox
        self._command = False  # a command runs (its exit not yet recorded)

    @property
    def state(self) -> State:
        return self._state

    def move(self, to: State) -> bool:
        with self._cond:
            if to not in ALLOWED[self._state]:
                return False
            self._state = to
            self._cond.notify_all()
            return True

    def freeze(self, rule: str) -> bool:
        with self._cond:
            if not self.move(State.FROZEN):
                return False
            self.frozen_by = rule
            return True

    def stop(self, reason: StopReason) -> bool:
        """Enter STOPPING, recording why; False if the sandbox is already stopping (or stopped)."""
        with self._cond:
            if not self.move(State.STOPPING):
                return False
            self.stop_reason = reason
            return True

    @property
    def ending(self) -> bool:
        """STOPPING or later: the sandbox is closed, or being closed."""
        return self._state in (State.STOPPING, State.STOPPED, State.REAPED)

    def wait_for(self, state: State, timeout: float | None = None) -> bool:
        """Wait until the sandbox is in `state` or past it (in the order of the enum)."""
        order = list(State)
        with self._cond:
            return self._cond.wait_for(lambda: order.index(self._state) >= order.index(state), timeout)

    # --- the running command ------------------------------------------------------------------------

    def command_started(self) -> None:
        with self._cond:
            self._command = True

    def command_recorded(self) -> None:
        with self._cond:
            self._command = False
            self._cond.notify_all()

    def wait_command_recorded(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._command, timeout)
