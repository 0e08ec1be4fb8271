"""The benchmark runs end to end and writes every row; it reports numbers, so no timing is asserted. It
drives corral as a user would: through what `corral` exports, and nothing private."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest

from benchmarks import run as bench

BENCHMARKS = Path(bench.__file__).parent

ROWS = {
    "proxy_throughput",
    "proxy_connect",
    "warm_exec",
    "cold_close",
    "cold_close_wait",
    "idle_mem_available",
    "idle_init_pss",
    "monitoring_overhead",
    "miner_cpu_kill",
    "miner_exec_kill",
    "first_attempt_probe_probe",
    "first_attempt_tunnel_tunnel",
    "first_attempt_reverse_shell_reverse",
    "first_attempt_probe_metadata",
    "benign_alerts",
    "fairness_exec",
    "fairness_dns",
    "store_ingest",
    "store_query",
    "store_verify",
    "dashboard_page",
    "pool_acquire",
    "template_start_empty",
    "template_start_50mib",  # and template_start_500mib, left out of --quick
    "scale_starts",
    "scale_exec",
    "scale_exec_p99",
    "scale_memory",
    "scale_acquire",
    "scale_acquire_p99",
}


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.root
def test_quick_benchmark_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--idle", "5", "--json", str(out)]) == 0

    data = json.loads(out.read_text())
    assert data["errors"] == {}
    rows = {r["key"]: r for r in data["results"]}
    assert set(rows) == ROWS
    for key, row in rows.items():
        for stat in ("median", "p90", "mean", "n"):
            assert _is_number(row["corral"][stat]), (key, stat, row["corral"])
        assert isinstance(row["met"], bool), key
        if row["baseline"] is not None:
            for stat in ("median", "p90", "mean", "n"):
                assert _is_number(row["baseline"][stat]), (key, stat, row["baseline"])
            assert _is_number(row["delta"]) and _is_number(row["ratio"]), key
    assert rows["warm_exec"]["baseline"] is not None  # subprocess.run is always there
    if shutil.which("bwrap"):
        assert rows["cold_close"]["baseline"] is not None, rows["cold_close"]["notes"]
        assert rows["cold_close_wait"]["baseline"] is not None
    assert rows["idle_init_pss"]["corral"]["n"] == 5
    assert rows["idle_mem_available"]["notes"]["alive_at_sample"] == 5


def _private_uses(path: Path) -> list[str]:
    """`x._name` reads and imports of anything but `corral` itself, as "file:line: what"."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("corral."):
            found.append(f"{path.name}:{node.lineno}: from {node.module}")
        elif isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("corral.")
            ]
    return found


def test_the_benchmark_reads_nothing_private() -> None:
    modules = sorted(BENCHMARKS.glob("*.py"))
    leaks = [use for m in modules for use in _private_uses(m)]
    assert leaks == [], f"the benchmark reaches past corral's public API: {leaks}"


def test_the_private_use_check_sees_one(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("from corral.runtime.sandbox import Sandbox\n\ndef f(sb):\n    return sb._cgroup\n")
    assert _private_uses(sneaky) == ["sneaky.py:1: from corral.runtime.sandbox", "sneaky.py:4: ._cgroup"]
