"""What a command gives back: its `ExecResult`, and `Output` chunks while it streams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from corral.events import Deny, ProcessRef


@dataclass(frozen=True)
class ExecResult:
    """What a command did. stdout/stderr are bytes, or str when `exec(..., text=True)`."""

    exit_code: int
    stdout: bytes | str
    stderr: bytes | str
    duration: float
    cpu_seconds: float
    peak_memory: int
    signal: int | None = None
    timed_out: bool = False
    # "lifetime", "closed" or "tripwire" when the sandbox ended under the command; "frozen" when a
    # tripwire froze the sandbox (the command's processes are kept, stopped, for inspection)
    terminated: str | None = None
    leftover: list[ProcessRef] = field(default_factory=list)
    denials: list[Deny] = field(default_factory=list)
    # stdout/stderr stop at the policy's `resources.output`; the rest was read and discarded
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Output:
    """A chunk of a streaming command's output."""

    stream: Literal["stdout", "stderr"]
    data: bytes


def with_output(r: ExecResult, out: bytes | str, err: bytes | str) -> ExecResult:
    """`r` with the command's collected stdout and stderr."""
    return dataclasses.replace(r, stdout=out, stderr=err)
