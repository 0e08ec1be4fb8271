"""Work the host does for sandboxes, shared fairly: a few worker threads, one FIFO lane per sandbox,
lanes served in turn, at most one worker in a lane at a time, and each lane's worker time metered.

The egress fence finds who made a query or a connection this way. On the loop's one default
executor, shared by every sandbox, a DNS flood from one sandbox (each lookup scanning its
descriptors) delayed every other sandbox's answers. Here a flood fills its own lane and waits behind
itself. Taking turns is not enough on its own: all workers share the process's CPUs and its GIL with
everything else corral does, so a lane that keeps a worker busy still slows every other sandbox.
Each lane therefore has a `CpuMeter` (`share` of a core, bursts up to `burst` seconds); a lane in
debt waits until it has paid. A thread per sandbox would be simpler, but 1,000 idle sandboxes would
pay a stack each.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger("corral")

# Worker CPU one sandbox may use, in cores, sustained: far above what ordinary work costs (answering
# an exec takes a few hundred microseconds: 0.25 cores is about a thousand execs a second), low
# enough that a flood leaves the CPUs to the others.
SHARE = 0.25
BURST = 0.5  # seconds of worker CPU a quiet lane may spend at once


class CpuMeter:
    """A token bucket of CPU seconds: `share` of a core, sustained, bursts up to `burst` seconds."""

    __slots__ = ("burst", "share", "stamp", "tokens")

    def __init__(self, share: float = SHARE, burst: float = BURST) -> None:
        self.share, self.burst = share, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.share)
        self.stamp = now

    def charge(self, used: float) -> float:
        """Take `used` CPU seconds; how long to wait before the next piece of work (0: none)."""
        self.refill(time.monotonic())
        self.tokens -= used
        return 0.0 if self.tokens >= 0 else -self.tokens / self.share

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst


class Lanes:
    def __init__(self, name: str, workers: int, share: float = SHARE, burst: float = BURST) -> None:
        self.name = name
        self.workers = workers
        self.share, self.burst = share, burst
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._lanes: dict[Hashable, deque[Callable[[], None]]] = {}
        self._turns: deque[Hashable] = deque()  # lanes with work and no worker, in turn order
        self._deferred: list[tuple[float, int, Hashable]] = []  # lanes in debt: when they may go on
        self._seq = itertools.count()
        # Kept while a lane has work or debt, so that emptying its queue does not refill it.
        self._buckets: dict[Hashable, CpuMeter] = {}
        self._threads = 0
        self._idle = 0
        self._stopping = False

    def submit(self, lane: Hashable, fn: Callable[[], None]) -> None:
        """Run `fn` after everything submitted to `lane` before it; exceptions are logged. Dropped
        once the lanes are stopped."""
        with self._lock:
            if self._stopping:
                return
            queue = self._lanes.get(lane)
            if queue is not None:
                queue.append(fn)  # its turn is queued or deferred, or a worker takes this next
                return
            self._lanes[lane] = deque([fn])
            bucket = self._refill(lane, time.monotonic())
            if bucket.tokens < 0:
                self._defer(lane, bucket)  # an idle worker learns of the deadline as it wakes
            else:
                self._turns.append(lane)
            if self._idle:
                self._ready.notify()
            elif self._threads < self.workers:
                self._threads += 1
                threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the workers finish what they run and exit; work still queued is dropped (its
        sandboxes are closed). Waits up to `timeout` for them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            self._lanes.clear()
            self._turns.clear()
            self._deferred.clear()
            self._ready.notify_all()
            while self._threads and time.monotonic() < deadline:
                self._ready.wait(deadline - time.monotonic())

    def pending(self, lane: Hashable) -> int:
        """Items of `lane` not yet finished (the one running included)."""
        with self._lock:
            queue = self._lanes.get(lane)
            return 0 if queue is None else len(queue)

    def _refill(self, lane: Hashable, now: float) -> CpuMeter:
        bucket = self._buckets.get(lane)
        if bucket is None:
            bucket = self._buckets[lane] = CpuMeter(self.share, self.burst)
        bucket.refill(now)
        return bucket

    def _defer(self, lane: Hashable, bucket: CpuMeter) -> None:
        heapq.heappush(self._deferred, (bucket.stamp - bucket.tokens / self.share, next(self._seq), lane))

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        self._threads -= 1
                        self._ready.notify_all()  # stop() waits on the same condition
                        return
                    now = time.monotonic()
                    while self._deferred and self._deferred[0][0] <= now:
                        self._turns.append(heapq.heappop(self._deferred)[2])
                    if self._turns:
                        break
                    self._idle += 1
                    self._ready.wait(self._deferred[0][0] - now if self._deferred else None)
                    self._idle -= 1
                lane = self._turns.popleft()
                fn = self._lanes[lane][0]
            used = time.thread_time()
            try:
                fn()
            except Exception:
                log.exception("%s: work for a sandbox failed", self.name)
            used = time.thread_time() - used
            with self._lock:
                bucket = self._refill(lane, time.monotonic())
                bucket.tokens -= used
                queue = self._lanes.get(lane)
                if queue is None:  # dropped by stop()
                    continue
                queue.popleft()
                if not queue:
                    del self._lanes[lane]
                    if bucket.full:
                        del self._buckets[lane]
                elif bucket.tokens < 0:
                    self._defer(lane, bucket)  # in debt: the others' lanes go on meanwhile
                else:
                    self._turns.append(lane)  # one item per turn: the others' lanes go first
                    if self._idle:
                        self._ready.notify()
                self._sweep()

    def _sweep(self) -> None:
        """Forget the buckets of idle lanes that have refilled (their sandboxes may be gone)."""
        if len(self._buckets) <= 2 * len(self._lanes) + 64:
            return
        now = time.monotonic()
        for lane in [k for k in self._buckets if k not in self._lanes]:
            if self._refill(lane, now).full:
                del self._buckets[lane]
