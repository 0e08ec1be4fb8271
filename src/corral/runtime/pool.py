"""`Pool`: sandboxes started ahead, one per episode, never reused.

    pool = Pool(policy, size=8, template="/srv/tasks/repo-123", labels={"run": "r42"})
    with pool.episode(labels={"episode": "17"}) as sb:          # a Sandbox
        sb.exec("pytest -q")
    async with pool.episode(labels={"episode": "18"}) as asb:   # an AsyncSandbox
        await asb.exec("pytest -q")
    pool.close()

What a trainer relies on:
- Hand-out is taking a started sandbox off a list and recording the episode's labels in it (a
  `sandbox.label` event, see `Sandbox.label`): no fork, no mount, no cgroup on that path. An empty
  pool starts one on demand in the caller's thread (or a worker thread, under asyncio).
- Never reused: leaving the episode closes its sandbox (processes killed, workspace saved or not as
  the pool says, events committed), and the refiller starts a fresh one in its place. Nothing an
  agent left (files, processes, a poisoned ~/.bashrc or /tmp) can reach the next episode, which
  starts from a different uid, cgroup, namespace set and storage.
- The episode's sandbox is closed however the episode ends: normally, by an exception, by asyncio
  cancellation or a timeout (`asyncio.timeout`), or by the pool's or the host's close. A trainer
  killed outright (`kill -9`) takes its sandboxes with it, as any sandbox: init exits when its
  control socket closes, and the next `Host` to start on the machine sweeps what is left.
- Refilling stops after `max_failures` start failures in a row, instead of spinning: the error is
  logged, and `episode()` raises `PoolError` naming the last failure once the started sandboxes are
  used up. `resume()` starts again.

Threading: one refiller thread per pool starts sandboxes (one at a time) and closes nothing; handing
out and returning are safe from any thread and from an event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from corral._errors import HostError, PoolError, SandboxStartError
from corral.egress.service import Upstream
from corral.policy import Policy
from corral.runtime.aio import AsyncSandbox
from corral.runtime.host import Host, HostState, default_host
from corral.runtime.sandbox import Sandbox, _checked_labels

__all__ = ["MAX_FAILURES", "Pool"]

log = logging.getLogger("corral")

MAX_FAILURES = 5  # start failures in a row after which a pool stops refilling
_BACKOFF_FIRST = 0.05  # seconds before retrying after a failed start, doubled each time
_BACKOFF_MAX = 2.0


class Pool:
    """Keeps `size` sandboxes of `policy` started on `host`, and hands each out once, to one
    episode (`episode()`).

    policy: a Policy, a path to a policy file, or None for the default (offline) policy.
    size: sandboxes kept started and waiting (those handed out are not counted); 0 starts them on
        demand only.
    template: a host directory every sandbox gets as its /workspace, never copied and never modified
        (see `Sandbox`'s `template`).
    host: the `Host` the sandboxes run on; without it, the process's default host.
    labels: labels every sandbox of the pool gets at its start (run, task, ...); an episode's own
        labels are added when it is handed out.
    keep_workspace: save each episode's workspace to /var/lib/corral/workspaces/<id> at its close
        (with a template: what the agent changed). Off by default: a training run's episodes are
        many, and their graders run inside.
    max_failures: start failures in a row after which the pool stops refilling (see `PoolError`).
    upstream: how the egress fence reaches the network (see `Sandbox`).

    The pool's sandboxes start in the background from the moment it is made; `wait_ready()` waits
    for them. `close()` (or leaving `with pool:`) stops the refiller and closes every sandbox the
    pool still holds or has handed out.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str] | None = None,
        *,
        size: int = 4,
        template: str | os.PathLike[str] | None = None,
        host: Host | None = None,
        labels: Mapping[str, str] | None = None,
        keep_workspace: bool = False,
        max_failures: int = MAX_FAILURES,
        upstream: Upstream | None = None,
    ) -> None:
        if size < 0:
            raise ValueError(f"size: {size}; a pool keeps 0 or more sandboxes started")
        if max_failures < 1:
            raise ValueError(f"max_failures: {max_failures}; at least 1")
        if policy is None:
            policy = Policy.default()
        elif not isinstance(policy, Policy):
            policy = Policy.load(policy)
        self.policy = policy
        self.size = size
        self.template = os.fspath(template) if template is not None else None
        if self.template is not None and not os.path.isdir(self.template):
            raise SandboxStartError(f"template: {self.template} is not a directory")
        self.host = host if host is not None else default_host()
        self.labels = _checked_labels(labels or {})
        self.keep_workspace = keep_workspace
        self.max_failures = max_failures
        self._upstream = upstream
        self._cond = threading.Condition()
        self._ready: collections.deque[Sandbox] = collections.deque()
        self._out: set[Sandbox] = set()  # handed out, not yet returned
        self._starting = 0
        self._failures = 0  # start failures in a row
        self.failure: str | None = None  # why the pool stopped refilling; None while it refills
        self.started = 0  # sandboxes this pool started
        self._closed = False
        self._thread = threading.Thread(target=self._refill, name="corral-pool", daemon=True)
        self._thread.start()

    # --- handing out -----------------------------------------------------------------------------

    def episode(self, labels: Mapping[str, str] | None = None) -> Lease:
        """One episode's sandbox, with `labels` added to the pool's (`Sandbox.label`).

        `with pool.episode(...) as sb:` gives a `Sandbox`; `async with pool.episode(...) as sb:` an
        `AsyncSandbox`. Leaving the block closes the sandbox, whatever ended it. A label key the pool
        already sets is a ValueError; `PoolError` when the pool has no sandbox and has stopped
        starting them; `SandboxStartError` when one started on demand failed.
        """
        return Lease(self, dict(labels or {}))

    def _check_labels(self, labels: Mapping[str, str]) -> None:
        clash = sorted(k for k, v in labels.items() if k in self.labels and self.labels[k] != v)
        if clash:
            raise ValueError(
                "labels: the pool labels every sandbox with "
                + ", ".join(f"{k}={self.labels[k]!r}" for k in clash)
                + "; an episode's labels add to them and can't change them"
            )
        _checked_labels({**self.labels, **labels}, ValueError)

    def _take(self) -> Sandbox | None:
        """A started sandbox, off the list (the refiller is woken to replace it); None if there is
        none. A PoolError when there is none and the pool stopped refilling."""
        stale: list[Sandbox] = []
        try:
            with self._cond:
                self._refuse_if_closed()
                while self._ready:
                    sb = self._ready.popleft()
                    if sb.closed:  # ended while it waited (a tripwire, the host shutting down)
                        stale.append(sb)
                        continue
                    self._out.add(sb)
                    self._cond.notify_all()
                    return sb
                if self.failure is not None:
                    raise PoolError(
                        f"pool: no sandbox to hand out: {self.failure}; fix the cause, then resume()"
                    )
                return None
        finally:
            for sb in stale:
                sb.close()

    def _start_one(self) -> Sandbox:
        """Start a sandbox of this pool (on the caller's thread)."""
        return Sandbox(
            self.policy,
            template=self.template,
            host=self.host,
            labels=self.labels,
            keep_workspace=self.keep_workspace,
            upstream=self._upstream,
        )

    def _on_demand(self) -> Sandbox:
        try:
            sb = self._start_one()
        except (HostError, SandboxStartError) as e:
            self._failed(e)
            raise
        with self._cond:
            self.started += 1
            self._failures = 0
            if self._closed:
                closed = True
            else:
                closed = False
                self._out.add(sb)
        if closed:
            sb.close()
            self._refuse_if_closed()
        return sb

    def _hand_out(self, sb: Sandbox, labels: Mapping[str, str]) -> Sandbox:
        """Label `sb` for its episode; on failure it is closed and never handed out."""
        try:
            sb._rearm_lifetime()
            sb.label(labels)
        except BaseException:
            self._give_back(sb)
            raise
        return sb

    def _give_back(self, sb: Sandbox) -> None:
        """The episode is over: close its sandbox (never reused); the refiller replaces it."""
        try:
            sb.close()
        finally:
            with self._cond:
                self._out.discard(sb)
                self._cond.notify_all()

    def acquire(self, labels: Mapping[str, str] | None = None) -> Sandbox:
        """A sandbox for one episode, which the caller must `release()` (or close) itself; prefer
        `with pool.episode(...)`, which can't forget to."""
        labels = dict(labels or {})
        self._check_labels(labels)
        sb = self._take() or self._on_demand()
        return self._hand_out(sb, labels)

    def release(self, sb: Sandbox) -> None:
        """Close the episode's sandbox (a sandbox is never reused); the pool starts another."""
        self._give_back(sb)

    # --- the refiller ---------------------------------------------------------------------------

    def _wanted(self) -> bool:
        return (
            not self._closed
            and self.failure is None
            and len(self._ready) + self._starting < self.size
            and self.host.state is not HostState.SHUTTING_DOWN
            and self.host.state is not HostState.SHUT_DOWN
        )

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._wanted():
                    if self._closed or self.host.state is HostState.SHUT_DOWN:
                        return
                    self._cond.wait(1.0)  # also notices the host shutting down
                self._starting += 1
            try:
                sb = self._start_one()
            except BaseException as e:
                with self._cond:
                    self._starting -= 1
                if self.host.state in (HostState.SHUTTING_DOWN, HostState.SHUT_DOWN):
                    return  # not a failure of the pool's: the host is going away
                delay = self._failed(e)
                if delay:
                    with self._cond:
                        self._cond.wait_for(lambda: self._closed, delay)
                continue
            with self._cond:
                self._starting -= 1
                self.started += 1
                self._failures = 0
                keep = not self._closed
                if keep:
                    self._ready.append(sb)
                    self._cond.notify_all()
            if not keep:
                sb.close()

    def _failed(self, error: BaseException) -> float:
        """Count a failed start; once `max_failures` came in a row, stop refilling (and say why).
        How long to wait before the next try."""
        with self._cond:
            self._failures += 1
            failures = self._failures
            stop = failures >= self.max_failures and self.failure is None
            if stop:
                self.failure = (
                    f"{failures} sandbox starts failed in a row; the last: {type(error).__name__}: {error}"
                )
                self._cond.notify_all()
        if stop:
            log.error("pool: refilling stopped: %s", self.failure)
            return 0.0
        log.warning("pool: a sandbox failed to start (%d in a row): %s", failures, error)
        return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2.0 ** (failures - 1)))

    def resume(self) -> None:
        """Start refilling again after the pool stopped (see `failure`)."""
        with self._cond:
            self._refuse_if_closed()
            self.failure = None
            self._failures = 0
            self._cond.notify_all()

    # --- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        """Sandboxes started and waiting to be handed out."""
        with self._cond:
            return len(self._ready)

    @property
    def in_use(self) -> int:
        """Sandboxes handed out and not yet returned."""
        with self._cond:
            return len(self._out)

    def wait_ready(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Wait until `count` (default: `size`) sandboxes are started and waiting; False if `timeout`
        passed first, or the pool stopped refilling or was closed."""
        want = self.size if count is None else count
        with self._cond:
            return (
                self._cond.wait_for(
                    lambda: len(self._ready) >= want or self.failure is not None or self._closed, timeout
                )
                and len(self._ready) >= want
            )

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise PoolError("pool: closed; it hands out no more sandboxes")

    def close(self, timeout: float = 30.0) -> None:
        """Stop refilling and close every sandbox the pool holds or handed out. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)  # a start under way finishes, and its sandbox is closed
        with self._cond:
            left = [*self._ready, *self._out]
            self._ready.clear()
        for sb in left:
            try:
                sb.close()
            except Exception as e:  # one sandbox's failure must not leave the others running
                log.error("pool: closing sandbox %s failed: %s", sb.id, e)
        with self._cond:
            self._out.clear()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


class Lease:
    """One episode's hold on a pool sandbox: `with` gives the `Sandbox`, `async with` an
    `AsyncSandbox`; leaving either closes it. Made by `Pool.episode()`; used once."""

    def __init__(self, pool: Pool, labels: dict[str, str]) -> None:
        self._pool = pool
        self._labels = labels
        self.sandbox: Sandbox | None = None
        self.acquire_seconds: float | None = None  # how long the hand-out took

    # --- sync ---

    def __enter__(self) -> Sandbox:
        started = time.perf_counter()
        self.sandbox = self._pool.acquire(self._labels)
        self.acquire_seconds = time.perf_counter() - started
        return self.sandbox

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sb, self.sandbox = self.sandbox, None
        if sb is not None:
            _close_quietly_if(exc is not None, lambda: self._pool.release(sb), sb)

    # --- async ---

    async def __aenter__(self) -> AsyncSandbox:
        started = time.perf_counter()
        pool = self._pool
        pool._check_labels(self._labels)
        sb = pool._take()  # no waiting: a list and a lock
        if sb is None:
            sb = await _started_in_thread(pool)
        # Labelling records one event (the store's writer takes it in memory): no thread needed.
        self.sandbox = pool._hand_out(sb, self._labels)
        self.acquire_seconds = time.perf_counter() - started
        return AsyncSandbox.adopt(self.sandbox)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sb, self.sandbox = self.sandbox, None
        if sb is None:
            return
        pool = self._pool
        # In a thread of its own, which finishes the close even if this task is cancelled again
        # while it waits: the sandbox is closed whatever happens to the episode's task.
        closing = asyncio.get_running_loop().run_in_executor(None, pool.release, sb)
        try:
            await asyncio.shield(closing)
        except Exception as e:
            if exc is None:
                raise
            log.error("pool: closing sandbox %s after a failed episode: %s", sb.id, e)


async def _started_in_thread(pool: Pool) -> Sandbox:
    """A sandbox started on demand in a worker thread; if the waiting task is cancelled meanwhile,
    the sandbox, once started, is closed (it never reached an episode)."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, pool._on_demand)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def orphan(f: asyncio.Future[Sandbox]) -> None:
            if not f.cancelled() and f.exception() is None:
                loop.run_in_executor(None, pool._give_back, f.result())

        future.add_done_callback(orphan)
        raise


def _close_quietly_if(quiet: bool, close: Any, sb: Sandbox) -> None:
    """Close; when the episode already failed, a failure to close is logged, not raised over it."""
    try:
        close()
    except Exception as e:
        if not quiet:
            raise
        log.error("pool: closing sandbox %s after a failed episode: %s", sb.id, e)
