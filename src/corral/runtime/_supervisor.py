"""The host-side watcher shared by every sandbox in this process.

One thread, one selector: it receives seccomp notifications and fires sandbox lifetime deadlines. A
thread per sandbox would cost a stack each; with 1,000 idle sandboxes one selector is the difference
between megabytes and a gigabyte. Answering a notification (reading the caller, running the
tripwires, which may scan its descriptors) is the sandbox's own work: it runs in the sandbox's lane
of a few shared workers (see `Lanes`), so one sandbox's flood of execs or refused calls queues
behind itself, not in front of another's.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import selectors
import sys
import threading
import time
from collections.abc import Callable

from corral._lanes import Lanes
from corral._once import process_wide
from corral.isolation import seccomp

_WORKERS = 4  # sandboxes answered at the same time; a flooding one holds at most one worker


class _Watch:
    """One sandbox's notification fd. `lock` is held while its handler runs, so `unwatch` can wait
    until no answer is in flight before the fd is closed (and its number reused)."""

    def __init__(self, fd: int, handler: Callable[[seccomp.Notification], None]) -> None:
        self.fd, self.handler = fd, handler
        self.lock = threading.RLock()
        self.alive = True


class Supervisor:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.RLock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._watches: dict[int, _Watch] = {}
        self._lanes = Lanes("corral-supervisor-work", _WORKERS)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="corral-supervisor", daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def watch_notifications(self, fd: int, handler: Callable[[seccomp.Notification], None]) -> None:
        with self._lock:
            watch = _Watch(fd, handler)
            self._watches[fd] = watch
            self._sel.register(fd, selectors.EVENT_READ, watch)
            self._ensure_thread()
        self._wake()

    def unwatch(self, fd: int) -> None:
        # Under the lock: once this returns, the loop will never touch `fd` again, so it can be closed.
        with self._lock:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            watch = self._watches.pop(fd, None)
        if watch is not None:
            with watch.lock:  # an answer in flight finishes first; queued ones find it dead
                watch.alive = False

    def call_at(self, deadline: float, fn: Callable[[], None]) -> int:
        with self._lock:
            handle = next(self._seq)
            heapq.heappush(self._timers, (deadline, handle, fn))
            self._ensure_thread()
        self._wake()
        return handle

    def cancel(self, handle: int) -> None:
        with self._lock:
            self._cancelled.add(handle)

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._timers and self._timers[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._timers)[1])
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    if key.fd not in self._sel.get_map():
                        continue
                    if mask & selectors.EVENT_WRITE:
                        # EPOLLHUP: every process under that filter is gone. Stop watching (the
                        # sandbox closes the fd) instead of spinning on a dead descriptor.
                        self._sel.unregister(key.fd)
                        continue
                    try:
                        note = seccomp.receive(key.fd)
                    except OSError as e:
                        _report("receiving a notification", e)
                        continue
                    if note is not None:
                        # How many wait is bounded by the sandbox itself: each is a parked task.
                        watch: _Watch = key.data
                        self._lanes.submit(watch, functools.partial(_answer, watch, note))
            due: list[Callable[[], None]] = []
            with self._lock:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, handle, fn = heapq.heappop(self._timers)
                    if handle in self._cancelled:
                        self._cancelled.discard(handle)
                    else:
                        due.append(fn)
            for fn in due:
                try:
                    fn()
                except Exception as e:
                    _report("a sandbox timer", e)


def _answer(watch: _Watch, note: seccomp.Notification) -> None:
    with watch.lock:
        if not watch.alive:
            return  # the sandbox is gone, and its fd may be closed; its callers died with it
        try:
            watch.handler(note)
        except Exception as e:
            # One sandbox's failure must not park its caller forever, nor stop a worker, which
            # every other sandbox depends on.
            _report("handling a refused syscall", e)
            try:
                seccomp.respond_error(watch.fd, note.id)
            except OSError:
                pass


def _report(what: str, error: BaseException) -> None:
    print(f"corral: supervisor: {what} failed: {error!r}", file=sys.stderr)


get = process_wide(Supervisor)
