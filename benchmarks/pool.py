"""Episodes from a warm pool, and starting on a workspace template of growing size.

- `pool_acquire`: how long `with pool.episode(...)` takes to hand out a sandbox the pool started
  ahead (the design's target: P50 2 ms), against starting one on demand (what an empty pool does).
- `template_start_*`: a sandbox's start with a template of 0, 50 and 500 MiB of files as its
  /workspace (an overlay: nothing copied), against `workspace=` on the same directory (copied in).
  The copy is measured on fewer runs: it is the slow path this replaces.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from benchmarks.harness import MIB, BenchError, Config, progress
from benchmarks.results import Measure, Result, Target
from corral import Policy, Pool, Sandbox

_POOL_SIZE = 4
_FILE = 1 * MIB  # template files of this size, like a repository's larger files and its git packs


def bench_pool(cfg: Config) -> list[Result]:
    runs = cfg.cold_runs * 2
    progress(f"pool: {runs} hand-outs from a warm pool of {_POOL_SIZE}")
    acquire: list[float] = []
    with Pool(size=_POOL_SIZE, labels={"bench": "pool"}) as pool:
        if not pool.wait_ready(timeout=120):
            raise BenchError(f"pool: did not fill ({pool.failure or 'timeout'})")
        for i in range(runs):
            if not pool.wait_ready(timeout=120):
                raise BenchError(f"pool: did not refill ({pool.failure or 'timeout'})")
            lease = pool.episode(labels={"episode": str(i)})
            with lease as sb:
                r = sb.exec(["true"])
                if r.exit_code != 0:
                    raise BenchError(f"`true` in a pool sandbox exited {r.exit_code}")
            assert lease.acquire_seconds is not None
            acquire.append(lease.acquire_seconds * 1000)
    demand: list[float] = []
    with Pool(size=0, labels={"bench": "pool"}) as empty:
        for i in range(max(3, cfg.cold_runs)):
            lease = empty.episode(labels={"episode": f"demand-{i}"})
            with lease:
                pass
            assert lease.acquire_seconds is not None
            demand.append(lease.acquire_seconds * 1000)
    ordered = sorted(acquire)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return [
        Result(
            key="pool_acquire",
            what=f"acquire an episode from a warm pool of {_POOL_SIZE}",
            unit="ms",
            corral=Measure.of(acquire),
            baseline=Measure.of(demand),
            baseline_name="empty pool (start on demand)",
            target=Target("max", 2.0, "P50 < 2 ms"),
            notes={"p99_ms": round(p99, 4), "max_ms": round(ordered[-1], 4), "runs": len(acquire)},
        )
    ]


def _fill(path: str, size: int) -> int:
    """Files of `_FILE` bytes under `path` (in directories of 50), `size` bytes in all; how many."""
    os.makedirs(path, exist_ok=True)
    count = size // _FILE
    block = os.urandom(_FILE)
    for i in range(count):
        d = f"{path}/d{i // 50}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{i}.bin", "wb") as f:
            f.write(block)
    return count


def _start_ms(make: Policy, runs: int, **kwargs: object) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sb = Sandbox(make, keep_workspace=False, **kwargs)  # type: ignore[arg-type]
        out.append((time.perf_counter_ns() - t0) / 1e6)
        sb.close(wait=True)
    return out


def bench_templates(cfg: Config) -> list[Result]:
    sizes = [("empty", 0), ("50mib", 50 * MIB)] + ([] if cfg.quick else [("500mib", 500 * MIB)])
    # Room for the copied-in baseline: the workspace's storage holds the whole copy.
    policy = Policy.from_dict({"version": 1, "resources": {"disk": "1GiB", "memory": "2GiB"}})
    runs = max(3, cfg.cold_runs // 2)
    results: list[Result] = []
    root = tempfile.mkdtemp(prefix="corral-bench-template-")
    try:
        _start_ms(policy, 2)  # untimed: the first starts load what every later one reuses
        plain = Measure.of(_start_ms(policy, runs)).median
        for name, size in sizes:
            path = f"{root}/{name}"
            files = _fill(path, size)
            progress(f"template {name}: {runs} starts with it as the template, 3 copying it in")
            ours = _start_ms(policy, runs, template=path)
            copied = _start_ms(policy, 3, workspace=path)
            results.append(
                Result(
                    key=f"template_start_{name}",
                    what=f"start on a {size // MIB} MiB template ({files} files)",
                    unit="ms",
                    corral=Measure.of(ours),
                    baseline=Measure.of(copied),
                    baseline_name="workspace= (copied in)",
                    target=Target("max", 25.0, "< 25 ms, as cold"),
                    notes={"template_mib": size // MIB, "files": files, "no_template_ms": round(plain, 3)},
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results
