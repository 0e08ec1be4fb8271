"""Reading a stored event's body. The body is JSON the sandbox emitted, but a report must never fail on
one odd event (an older schema, a field a newer one added): each getter returns a default for a
missing or mistyped field instead of raising."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any


def text(body: Mapping[str, Any], key: str, default: str = "") -> str:
    value = body.get(key)
    return value if isinstance(value, str) else default


def opt_text(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def integer(body: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def opt_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def number(body: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = body.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def strings(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


def mapping(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


def clip(s: str, limit: int) -> str:
    """`s`, cut to `limit` characters with an ellipsis saying it was cut: an agent's command line
    can be megabytes, and a report keeps thousands of them."""
    return s if len(s) <= limit else s[: limit - 1] + "…"


def clip_list(items: list[str], limit: int) -> list[str]:
    """A command line cut to `limit` characters in all (the arguments past it dropped, the last kept
    one clipped), so one process can't make the report large."""
    kept: list[str] = []
    left = limit
    for item in items:
        if left <= 0:
            kept.append("…")
            break
        kept.append(clip(item, left) if len(item) > left else item)
        left -= len(item) + 1
    return kept


def command(argv: list[str], limit: int) -> str:
    """An argv as a shell would read it; `sh -c SCRIPT` shows as SCRIPT, as the agent wrote it."""
    if len(argv) == 3 and argv[0] in ("/bin/sh", "sh") and argv[1] == "-c":
        return clip(argv[2], limit)
    return clip(shlex.join(argv[:64]), limit)


def size(n: float) -> str:
    """Bytes, for people: 512 B, 1.5 KiB, 12.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_BYTE_LIMITS = ("memory", "disk", "output")
_SECOND_LIMITS = ("timeout", "lifetime")


def limits(values: Mapping[str, Any]) -> str:
    """sandbox.start's limits for people: 'memory 512.0 MiB, cpu 1, timeout 600s'."""
    shown = []
    for key, value in values.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if key in _BYTE_LIMITS:
            shown.append(f"{key} {size(value)}")
        elif key in _SECOND_LIMITS:
            shown.append(f"{key} {value:g}s")
        else:
            shown.append(f"{key} {value:g}")
    return ", ".join(shown)
