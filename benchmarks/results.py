"""What a benchmark returns (a row: corral's measure, a baseline's, a target) and the table they print as."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Measure:
    """Summary of samples (ms, MiB, ...): median, 90th percentile (nearest rank), mean, count."""

    median: float
    p90: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Measure:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        n = len(s)
        mid = n // 2
        median = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2
        p90 = s[max(0, math.ceil(0.9 * n) - 1)]
        return cls(median=median, p90=p90, mean=sum(s) / n, n=n)

    @classmethod
    def single(cls, value: float) -> Measure:
        return cls(median=value, p90=value, mean=value, n=1)


@dataclass(frozen=True)
class Target:
    """What the design asks for.

    kind "max": the headline value of corral is under `limit`.
    kind "min": the headline value of corral is at least `limit` (rates).
    kind "max_delta": corral's headline is at most `limit` above the baseline's.
    kind "min_ratio": corral's headline is at least `limit` times the baseline's (throughputs).
    kind "max_ratio": corral's headline is at most `limit` times the baseline's (slowdowns).
    """

    kind: Literal["max", "min", "max_delta", "min_ratio", "max_ratio"]
    limit: float
    text: str


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    key: str  # stable identifier (JSON)
    what: str  # what the table shows
    unit: str
    corral: Measure
    target: Target
    baseline: Measure | None = None
    baseline_name: str | None = None
    headline: Literal["median", "mean"] = "median"  # which statistic the target is about
    notes: dict[str, float | int | str] = field(default_factory=dict)

    def value(self, m: Measure) -> float:
        return m.median if self.headline == "median" else m.mean

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None else self.value(self.corral) - self.value(self.baseline)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.value(self.baseline) == 0:
            return None
        return self.value(self.corral) / self.value(self.baseline)

    @property
    def met(self) -> bool | None:
        t = self.target
        if t.kind == "max":
            return self.value(self.corral) < t.limit
        if t.kind == "min":
            return self.value(self.corral) >= t.limit
        if t.kind == "max_delta":
            return None if self.delta is None else self.delta <= t.limit
        if t.kind == "max_ratio":
            return None if self.ratio is None else self.ratio <= t.limit
        return None if self.ratio is None else self.ratio >= t.limit

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(delta=self.delta, ratio=self.ratio, met=self.met)
        return d


# --- output -------------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    digits = 3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    return f"{value:.{digits}f} {unit}"


def _cell(r: Result, m: Measure | None) -> str:
    if m is None:
        return "-"
    if m.n == 1:
        return _fmt(r.value(m), r.unit)
    stat = "" if r.headline == "median" else "mean "
    return f"{stat}{_fmt(r.value(m), r.unit)} (p90 {_fmt(m.p90, '').strip()})"


def _compare(r: Result) -> str:
    if r.baseline is None or r.delta is None:
        return "-"
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
    if r.target.kind == "max_delta":
        return f"{r.delta:+.3f} {r.unit}, {ratio}"
    return f"{ratio}, {r.delta:+.3f} {r.unit}"


def format_table(results: Sequence[Result]) -> str:
    header = ("what", "corral median (p90)", "baseline median (p90)", "ratio / delta", "target", "met?")
    rows = [header]
    for r in results:
        base = _cell(r, r.baseline)
        if r.baseline_name and r.baseline is not None:
            base = f"{base} {r.baseline_name}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        rows.append((r.what, _cell(r, r.corral), base, _compare(r), r.target.text, met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.notes:
            lines.append(f"  {r.key}: " + ", ".join(f"{k}={v}" for k, v in r.notes.items()))
    return "\n".join(lines)
