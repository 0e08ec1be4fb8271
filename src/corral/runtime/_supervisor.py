"""The host-side watcher shared by every sandbox in this process.

One thread, one selector: it answers seccomp notifications (recording who asked for what) and fires
sandbox lifetime deadlines. A thread per sandbox would cost a stack each; with 1,000 idle sandboxes
one selector is the difference between megabytes and a gigabyte.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import sys
import threading
import time
from collections.abc import Callable

from corral._once import process_wide
from corral.isolation import seccomp


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
            self._sel.register(fd, selectors.EVENT_READ, handler)
            self._ensure_thread()
        self._wake()

    def unwatch(self, fd: int) -> None:
        # Under the lock: once this returns, the loop will never touch `fd` again, so it can be closed.
        with self._lock:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass

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
                    note = seccomp.receive(key.fd)
                    if note is not None:
                        try:
                            key.data(note)
                        except Exception as e:
                            # One sandbox's failure must not park its caller forever, nor stop this
                            # thread, which every other sandbox depends on.
                            _report("handling a refused syscall", e)
                            try:
                                seccomp.respond_error(key.fd, note.id)
                            except OSError:
                                pass
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


def _report(what: str, error: BaseException) -> None:
    print(f"corral: supervisor: {what} failed: {error!r}", file=sys.stderr)


get = process_wide(Supervisor)
