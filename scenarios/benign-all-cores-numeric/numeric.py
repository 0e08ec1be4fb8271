"""A CPU-bound numeric job on every core: each worker integrates a function by the midpoint rule, over and
over, until the time is up. Pure float math, no hashing, no network: what a simulation or a data-processing
step looks like from outside (all cores busy for a long time)."""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time


def work(args: tuple[int, float]) -> tuple[int, float]:
    worker, seconds = args
    deadline = time.monotonic() + seconds
    rounds, total, n = 0, 0.0, 20000
    while time.monotonic() < deadline:
        h = 1.0 / n
        total += sum(math.exp(-(((i + 0.5) * h) ** 2)) * math.cos(worker + i * h) for i in range(n)) * h
        rounds += 1
    return rounds, total


def main(seconds: float) -> int:
    workers = len(os.sched_getaffinity(0))
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(work, [(w, seconds) for w in range(workers)])
    rounds = sum(r for r, _ in results)
    print(f"workers={workers} rounds={rounds} checksum={sum(t for _, t in results):.6f} done")
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0))
