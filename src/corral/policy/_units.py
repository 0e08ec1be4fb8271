"""Sizes and durations as people write them in policy files, and how values are shown in messages."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(B|[KMGT]i?B)?\s*$"
SIZE_HINT = "use e.g. 512MiB"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "ms" comes before "m" so that 500ms is not read as 500 minutes and a stray s.
_DURATION_PART = r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"\s*(?:{_DURATION_PART}\s*)+")
_NUMBER_RE = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*")
DURATION_PATTERN = rf"^\s*([0-9]+(\.[0-9]+)?\s*|({_DURATION_PART}\s*)+)$"
DURATION_HINT = "use e.g. 30s, 10m or 2h"


def show_value(value: object) -> str:
    """Show a value from a policy as the user wrote it in YAML: strings quoted, containers by kind."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple | set | frozenset):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def parse_size(value: str | int) -> int:
    """Bytes in `value`: an int, or a string like ``512MiB``, ``1.5GiB``, ``100MB`` (decimal) or ``4096``.

    Raises ValueError, with a message that says what is accepted, for anything else.
    """
    # bool is an int to Python, but `memory: yes` is a mistake, not one byte.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{show_value(value)} is not a size; {SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; {SIZE_HINT}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"{show_value(value)} is not a size; {SIZE_HINT}")
    number, unit = match.groups()
    if unit not in _SIZE_UNITS:
        units = ", ".join(u for u in _SIZE_UNITS if u)
        raise ValueError(f'{show_value(value)} has an unknown unit "{unit}"; use one of {units}')
    # Decimal keeps 1.5GiB exact, where a float could land one byte off.
    size = Decimal(number) * _SIZE_UNITS[unit]
    if size != size.to_integral_value():
        raise ValueError(f"{show_value(value)} is not a whole number of bytes; {SIZE_HINT}")
    return int(size)


def format_size(size: int) -> str:
    """`size` bytes in the largest unit that shows it exactly: ``512MiB``, ``100MB``, ``1000B``."""
    if size < 0:
        raise ValueError(f"{size} is negative; a size is a number of bytes >= 0")
    # Binary units first: limits are usually powers of two, and a decimal unit is kept when it was meant.
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: a number of seconds, or a string like ``10m``, ``1h30m``, ``1.5s``, ``500ms``.

    Units are ms, s, m, h and d. Raises ValueError, with a message that says what is accepted.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{show_value(value)} is not a duration; {DURATION_HINT}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a duration; {DURATION_HINT}")
        if value < 0:
            raise ValueError(f"{value} is negative; {DURATION_HINT}")
        return float(value)
    if _NUMBER_RE.fullmatch(value):
        return float(value)
    if not _DURATION_RE.fullmatch(value):
        raise ValueError(f"{show_value(value)} is not a duration; {DURATION_HINT}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in re.findall(_DURATION_PART, value))


def format_duration(seconds: float) -> str:
    """`seconds` the way a policy would say it: ``10m``, ``2h``, ``1h30m``, ``1.5s``, ``500ms``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{seconds} is not a duration; a duration is a number of seconds >= 0")
    if 0 < seconds < 1:
        return f"{_decimal(seconds * 1000)}ms"
    hours, rest = divmod(int(seconds), 3600)
    minutes, whole = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes else []
    remainder = whole + seconds - int(seconds)
    if remainder or not parts:
        parts.append(f"{_decimal(remainder)}s")
    return "".join(parts)


def _decimal(number: float) -> str:
    return f"{number:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Unit:
    """Marks a field whose number people read in a unit: bounds in messages are shown with `format`."""

    format: Callable[[int], str] | Callable[[float], str]
