"""The scenario corpus (`scenarios/`), read with the test suite's own loader and runner
(`tests/scenarios.py`), so each attack and each piece of benign work is written once: the tests prove
what it raises, the benchmark times it.

Everything a scenario dials is answered on this machine: its names by the sandbox's resolver, its servers
by local stand-ins on loopback (see `tests/scenarios.py`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import scenarios  # noqa: E402  (the corpus's runner lives beside the tests that use it most)
from corral import Sandbox  # noqa: E402
from scenarios import Scenario, ScenarioResult, check_steps  # noqa: E402

__all__ = ["Scenario", "ScenarioResult", "check_steps", "load", "opened", "run"]


def load(name: str) -> Scenario:
    """The scenario in `scenarios/NAME`, validated."""
    return scenarios.load(scenarios.SCENARIOS / name)


def run(scenario: Scenario, *, alert_only: bool = False) -> ScenarioResult:
    """Run `scenario` as the tests do (its servers, its workspace, its steps), in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        return scenarios.run(scenario, Path(tmp), alert_only=alert_only)


@contextlib.contextmanager
def opened(scenario: Scenario) -> Iterator[Sandbox]:
    """A sandbox under `scenario`'s policy whose workspace holds its files, for a benchmark that times
    its steps itself. Only for scenarios with neither servers nor includes."""
    if scenario.servers or scenario.include:
        raise ValueError(f"{scenario.name}: has servers or includes; run it with run()")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        workspace = Path(tmp) / "workspace"
        shutil.copytree(
            scenario.directory,
            workspace,
            ignore=shutil.ignore_patterns(scenarios.SCENARIO_FILE, "__pycache__"),
        )
        with Sandbox(scenarios.build_policy(scenario), workspace=workspace, keep_workspace=False) as sb:
            yield sb
