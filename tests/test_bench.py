"""The benchmark runs end to end and writes every row; it reports numbers, so no timing is asserted."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from corral import bench

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
