"""`AsyncSandbox`: the asyncio twin of `Sandbox`.

Sandbox setup and commands run in worker threads, so an event loop driving many sandboxes never
blocks on one of them; commands within one sandbox still run one at a time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from corral.events.model import Alert, Event
from corral.policy import Policy
from corral.runtime.sandbox import ExecResult, Output, Sandbox


class AsyncSandbox:
    """`async with AsyncSandbox(policy) as sb: r = await sb.exec("make test")`."""

    def __init__(self, policy: Policy | str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self._args = (policy, kwargs)
        self._sb: Sandbox | None = None

    @classmethod
    def adopt(cls, sandbox: Sandbox) -> AsyncSandbox:
        """The asyncio face of a sandbox already started (a pool's); closing it closes `sandbox`."""
        asb = cls(sandbox.policy)
        asb._sb = sandbox
        return asb

    @property
    def labels(self) -> dict[str, str]:
        return self.sandbox.labels

    async def label(self, labels: Mapping[str, str]) -> None:
        """See `Sandbox.label`."""
        self.sandbox.label(labels)

    async def start(self) -> AsyncSandbox:
        policy, kwargs = self._args
        self._sb = await asyncio.to_thread(Sandbox, policy, **kwargs)
        return self

    @property
    def sandbox(self) -> Sandbox:
        if self._sb is None:
            raise RuntimeError("AsyncSandbox is not started: use `async with` or `await sb.start()`")
        return self._sb

    @property
    def id(self) -> str:
        return self.sandbox.id

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._sb is not None:
            await asyncio.to_thread(self._sb.close)

    async def exec(self, command: str | Sequence[str], **kwargs: Any) -> ExecResult:
        return await asyncio.to_thread(self.sandbox.exec, command, **kwargs)

    async def stream(
        self,
        command: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncIterator[Output | ExecResult]:
        """Yield output chunks as they arrive, then the ExecResult last."""
        run = self.sandbox.stream(command, input=input, timeout=timeout, env=env, cwd=cwd)
        it = iter(run)
        sentinel = object()
        while True:
            chunk = await asyncio.to_thread(next, it, sentinel)
            if chunk is sentinel:
                break
            assert isinstance(chunk, Output)
            yield chunk
        assert run.result is not None
        yield run.result

    @property
    def current_phase(self) -> str | None:
        """The network phase in force; None when the policy has none (see `Sandbox.phase`)."""
        return self.sandbox.current_phase

    async def phase(self, name: str) -> None:
        """Switch to network phase `name`, live (see `Sandbox.phase`); a command may be running."""
        await asyncio.to_thread(self.sandbox.phase, name)

    async def write_file(self, path: str, data: bytes | str) -> None:
        await asyncio.to_thread(self.sandbox.write_file, path, data)

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self.sandbox.read_file, path)

    def events(self) -> list[Event]:
        return self.sandbox.events()

    def alerts(self) -> list[Alert]:
        return self.sandbox.alerts()
