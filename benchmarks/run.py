"""corral's own benchmark: the numbers behind corral's performance targets, as ratios in one run.

    sudo .venv/bin/python -m benchmarks                  # warm exec, cold start, 100 idle sandboxes
    sudo .venv/bin/python -m benchmarks --idle 1000 --json bench.json
    sudo .venv/bin/python -m benchmarks --only warm_exec --runs 1000

Every row compares corral against a baseline measured in the same process, in the same run, on the
same machine, so the ratios mean something wherever it runs; the absolute numbers only describe this
machine. It reports numbers and whether each target is met; it never fails because one is missed
(exit status 1 means a benchmark could not run at all).

Adding a row: write a function `Config -> list[Result]` in the module of its subject and list it in
`BENCHMARKS` below. They run in that order; `--only name` runs just one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass

import psutil

from benchmarks import egress, fairness, pool, scale, startup, store, tripwires
from benchmarks.harness import MIB, BenchFn, Config, progress
from benchmarks.results import Result, format_table

BENCHMARKS: dict[str, BenchFn] = {
    "warm_exec": startup.bench_warm_exec,
    "cold": startup.bench_cold,
    "egress": egress.bench_egress,
    "tripwires": tripwires.bench_tripwires,
    "fairness": fairness.bench_fairness,
    "idle_memory": startup.bench_idle_memory,
    "store": store.bench_store,
    "pool": pool.bench_pool,
    "templates": pool.bench_templates,
    "scale": scale.bench_scale,
}


@dataclass(frozen=True)
class Machine:
    cpus: int | None
    memory_mib: int
    kernel: str
    python: str
    bwrap: str | None
    loadavg: tuple[float, float, float]  # at the end of the run: others' load skews the numbers

    @classmethod
    def here(cls) -> Machine:
        one, five, fifteen = os.getloadavg()
        return cls(
            cpus=os.cpu_count(),
            memory_mib=psutil.virtual_memory().total // MIB,
            kernel=platform.release(),
            python=platform.python_version(),
            bwrap=shutil.which("bwrap"),
            loadavg=(round(one, 2), round(five, 2), round(fifteen, 2)),
        )

    def describe(self) -> str:
        load = " ".join(f"{x:.2f}" for x in self.loadavg)
        return (
            f"corral bench: {self.cpus} CPUs, {self.memory_mib} MiB, kernel {self.kernel}, "
            f"Python {self.python}; load average {load} (1/5/15 min, at the end)"
        )


# --- entry --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, help="timed runs per row (default: 200 warm, 50 cold; --quick: 10/5)")
    p.add_argument(
        "--idle", type=int, help="idle sandboxes to open for the memory rows (default 100; 0 skips)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="few runs and short settling, for tests")
    p.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), help="run just this benchmark (repeatable)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else [os.fspath(a) for a in argv])
    if os.geteuid() != 0:
        print("benchmarks: must run as root (sandboxes need namespaces, cgroups, mounts)", file=sys.stderr)
        return 2
    cfg = Config(
        warm_runs=args.runs or (10 if args.quick else 200),
        cold_runs=args.runs or (5 if args.quick else 50),
        idle=args.idle if args.idle is not None else (5 if args.quick else 100),
        warmup=2 if args.quick else 10,
        settle=0.2 if args.quick else 2.0,
        quick=args.quick,
    )
    results: list[Result] = []
    errors: dict[str, str] = {}
    for name, fn in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        try:
            results += fn(cfg)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            progress(f"{name} failed: {errors[name]}")
    machine = Machine.here()
    print(machine.describe())
    print(format_table(results))
    for name, err in errors.items():
        print(f"FAILED {name}: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": asdict(machine),
                    "config": asdict(cfg),
                    "results": [r.to_json() for r in results],
                    "errors": errors,
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
