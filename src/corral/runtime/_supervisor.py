"""The host-side watcher shared by every sandbox of one `Host`.

One thread fires sandbox lifetime deadlines. A few threads (`_ANSWERERS`) answer seccomp
notifications (recording who asked for what), all waiting on one epoll set holding every sandbox's
notification fd. A thread per sandbox would cost a stack each; with 1,000 idle sandboxes shared
threads are the difference between megabytes and a gigabyte.

Answering is the sandbox's own work, and one sandbox must not buy another's time with it: one thread
answering everyone in arrival order let a sandbox whose 60 processes held 19,000 descriptors each
(scanned at every exec) move another sandbox's `exec("true")` from 3 ms to 4.8 s. So each fd is
registered one-shot: the thread that takes a notification answers it (no hand-off, so a quiet
sandbox's exec costs no more than before), and the fd stays disarmed meanwhile, so a sandbox
occupies at most one thread. The CPU an answer takes is charged to the sandbox's `CpuMeter`; a
sandbox in debt has its fd re-armed only once it has paid, its callers parked in the kernel until
then. A flood waits behind itself and leaves the CPUs (and the GIL) to the others.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import select
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from corral._lanes import CpuMeter
from corral.isolation import seccomp

log = logging.getLogger(__name__)

_ANSWERERS = 4  # sandboxes answered at the same time; a flooding one holds at most one thread
_ARMED = select.EPOLLIN | select.EPOLLONESHOT


class _Watch:
    """One sandbox's notification fd. `lock` is held while one of its notifications is answered, so
    `unwatch` can wait until none is in flight before the fd is closed (and its number reused)."""

    def __init__(self, fd: int, handler: Callable[[seccomp.Notification], None]) -> None:
        self.fd, self.handler = fd, handler
        self.lock = threading.RLock()
        self.alive = True
        self.meter = CpuMeter()


class Supervisor:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.RLock()
        # Heap entries are [deadline, handle, fn]; a cancelled one has fn None until the heap is
        # pruned. Dropping the callback at once matters: a sandbox's lifetime timer holds the whole
        # sandbox, and a closed sandbox's timer would otherwise keep it until its lifetime ran out
        # (two hours by default: hundreds of thousands of dead sandboxes on a training host).
        self._timers: list[list[Any]] = []
        self._pending: dict[int, list[Any]] = {}  # handle -> its heap entry, until it fires or is cancelled
        self._dead = 0  # cancelled entries still in the heap
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._epoll = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self._answerers: list[threading.Thread] = []
        # Written once by `stop`: level-triggered in the epoll set, it wakes every answerer for good.
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._stopping = False

    def _ensure_thread(self) -> None:
        if self._stopping:
            return
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
            self._watches[fd] = _Watch(fd, handler)
            self._epoll.register(fd, _ARMED)
            if not self._stopping and len(self._answerers) < min(_ANSWERERS, len(self._watches)):
                t = threading.Thread(target=self._answer_loop, name="corral-supervisor", daemon=True)
                self._answerers.append(t)
                t.start()

    def unwatch(self, fd: int) -> None:
        # Once this returns, no thread will touch `fd` again, so it can be closed.
        with self._lock:
            watch = self._watches.pop(fd, None)
            if watch is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        if watch is not None:
            with watch.lock:  # an answer in flight finishes first; later ones find it dead
                watch.alive = False

    def call_at(self, deadline: float, fn: Callable[[], None]) -> int:
        with self._lock:
            handle = next(self._seq)
            if self._stopping:
                return handle  # never fires: the host is shutting down
            entry: list[Any] = [deadline, handle, fn]
            heapq.heappush(self._timers, entry)
            self._pending[handle] = entry
            self._ensure_thread()
        self._wake()
        return handle

    def cancel(self, handle: int) -> None:
        with self._lock:
            entry = self._pending.pop(handle, None)
            if entry is None:
                return  # fired already, or cancelled
            entry[2] = None
            self._dead += 1
            if self._dead > 64 and self._dead > len(self._timers) // 2:
                self._timers = [e for e in self._timers if e[2] is not None]
                heapq.heapify(self._timers)
                self._dead = 0

    def stop(self, timeout: float = 5.0) -> None:
        """End the timer and answering threads and close what they used. Every sandbox was closed
        first (see `Host.shutdown`): nothing is watched, and no timer that is still due matters."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            threads = [*self._answerers, *([self._thread] if self._thread is not None else [])]
        os.write(self._stop_w, b"x")
        self._wake()
        for t in threads:
            t.join(timeout)
        self._sel.close()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            os.close(fd)

    def _answer_loop(self) -> None:
        while True:
            try:
                events = self._epoll.poll(-1, 1)  # one fd per wake-up: the others go to other threads
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self._stop_r:
                    return
                with self._lock:
                    watch = self._watches.get(fd)
                if watch is None:
                    continue
                if mask & (select.EPOLLHUP | select.EPOLLERR):
                    # Every process under that filter is gone. The fd stays disarmed (the sandbox
                    # closes it) instead of waking threads for a dead descriptor.
                    continue
                self._answer(watch)

    def _answer(self, watch: _Watch) -> None:
        with watch.lock:
            if not watch.alive:
                return
            started = time.thread_time()
            note = None
            try:
                # The event may be stale (the fd's number reused by another sandbox meanwhile), and
                # receiving blocks until a notification comes: only receive one that is there.
                if _pending(watch.fd):
                    note = seccomp.receive(watch.fd)
            except OSError as e:
                _report("receiving a notification", e)
            if note is not None:
                try:
                    watch.handler(note)
                except Exception as e:
                    # One sandbox's failure must not park its caller forever, nor stop this
                    # thread, which other sandboxes depend on.
                    _report("handling a refused syscall", e)
                    try:
                        seccomp.respond_error(watch.fd, note.id)
                    except OSError:
                        pass
            wait = watch.meter.charge(time.thread_time() - started)
        if wait <= 0:
            self._rearm(watch)
        else:
            self.call_at(time.monotonic() + wait, functools.partial(self._rearm, watch))

    def _rearm(self, watch: _Watch) -> None:
        with self._lock:
            if watch.alive and self._watches.get(watch.fd) is watch:
                with contextlib.suppress(OSError):
                    self._epoll.modify(watch.fd, _ARMED)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                while self._timers and self._timers[0][2] is None:
                    heapq.heappop(self._timers)
                    self._dead -= 1
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
            due: list[Callable[[], None]] = []
            with self._lock:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, handle, fn = heapq.heappop(self._timers)
                    if fn is None:
                        self._dead -= 1
                    else:
                        del self._pending[handle]
                        due.append(fn)
            for fn in due:
                try:
                    fn()
                except Exception as e:
                    _report("a sandbox timer", e)


def _pending(fd: int) -> bool:
    poller = select.poll()  # not select(): fds past 1,024 are ordinary with hundreds of sandboxes
    poller.register(fd, select.POLLIN)
    return any(mask & select.POLLIN for _, mask in poller.poll(0))


def _report(what: str, error: BaseException) -> None:
    log.error("supervisor: %s failed: %r", what, error, exc_info=error)
