"""The reward hook: a verdict turned into a penalty from the user's table, and into the `info` dict
trainers read (`info["corral"]`).

    reward = task_reward - corral.rl.penalty(verdict, {"mining": 20, "probe:low": 0.5, "high": 5})
    return obs, reward, terminated, truncated, corral.rl.info(verdict, {"task": task_id})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, get_args

from corral.events.model import AlertCategory
from corral.rl._verdict import Verdict
from corral.store.records import SEVERITIES

CATEGORIES: tuple[str, ...] = get_args(AlertCategory)

# The penalty of a category that fired, by its worst severity; infra_error and clean cost nothing.
DEFAULT_PENALTIES: Mapping[str, float] = MappingProxyType(
    {"critical": 10.0, "high": 5.0, "medium": 2.0, "low": 1.0, "info": 0.0}
)


def penalty(verdict: Verdict, table: Mapping[str, float] = DEFAULT_PENALTIES) -> float:
    """How much to take off the episode's reward for what its verdict says (0.0 or more when the
    table's values are; subtract it: `reward = task_reward - penalty(verdict, table)`).

    A `violated` verdict costs, for each category that fired (once per category, however many of
    its alerts there were: an agent can't run its penalty up, or down, by repeating itself), the
    table's most specific entry for it:

      1. "CATEGORY:SEVERITY", with the category's worst severity (e.g. "probe:low")
      2. "CATEGORY" (e.g. "mining")
      3. "SEVERITY", the category's worst (e.g. "critical")
      4. "default" (0.0 when absent)

    and the costs are added up. `clean` costs 0.0; `infra_error` costs the table's "infra_error"
    (0.0 when absent: the agent did nothing wrong; drop the episode rather than reward it).
    The default table (`DEFAULT_PENALTIES`) costs 10 / 5 / 2 / 1 / 0 per category by its worst
    severity, critical to info.

    ValueError for a key that is none of these (a misspelt category would otherwise cost nothing)
    or a value that is not a finite number.
    """
    _check(table)
    if verdict.status == "clean":
        return 0.0
    if verdict.status == "infra_error":
        return float(table.get("infra_error", 0.0))
    total = 0.0
    for category, c in verdict.categories.items():
        for key in (f"{category}:{c.worst}", category, c.worst, "default"):
            if key in table:
                total += float(table[key])
                break
    return total


def info(verdict: Verdict, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A new info dict: `base`'s entries and the verdict, as plain JSON, under "corral" (where
    corral's Gymnasium env puts it, and trainers' loggers pick it up)."""
    return {**(base or {}), "corral": verdict.to_dict()}


def _check(table: Mapping[str, float]) -> None:
    problems: list[str] = []
    for key, value in table.items():
        category, _, severity = key.partition(":")
        known = (
            key in ("default", "infra_error")
            or (not severity and (key in CATEGORIES or key in SEVERITIES))
            or (category in CATEGORIES and severity in SEVERITIES)
        )
        if not known:
            problems.append(
                f"penalty table: key {key!r}: a category ({', '.join(CATEGORIES)}), a severity "
                f"({', '.join(SEVERITIES)}), CATEGORY:SEVERITY, 'default' or 'infra_error' is accepted"
            )
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"penalty table: {key!r}: {value!r}: a finite number is accepted")
    if problems:
        raise ValueError("\n".join(problems))
