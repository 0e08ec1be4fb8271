"""The rule engine: one `Detector` per sandbox, fed every observation, returning the rules that fire.

Pure logic, no I/O: observations come in as `Observation`s (field name -> value, some computed only
if a rule asks), time comes in as an argument, so every rule is testable on synthetic input.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.detect.rules import Rule, Ruleset, render_output

_UNSET = object()


class Observation:
    """One thing the monitors saw, readable by field name. `lazy` values are computed on first read
    (a file's content, a pipe's other end) and only if some rule's condition gets that far."""

    __slots__ = ("_lazy", "_values", "source")

    def __init__(
        self,
        values: dict[str, Any],
        lazy: Mapping[str, Callable[[], Any]] | None = None,
        source: Any = None,
    ) -> None:
        self._values = values
        self._lazy = lazy or {}
        self.source = source  # the event it was made from, if any (kept as evidence)

    def get(self, name: str) -> Any:
        v = self._values.get(name, _UNSET)
        if v is _UNSET:
            fn = self._lazy.get(name)
            v = fn() if fn is not None else None
            self._values[name] = v
        return v

    def update(self, values: Mapping[str, Any]) -> None:
        """Set fields known only once the observation was made (what a sample measured), or judged
        differently from what was recorded (a command line recorded bounded, judged whole)."""
        self._values.update(values)


@dataclass(frozen=True)
class Match:
    rule: Rule
    response: str  # the rule's default, or what the policy says for it or its category
    message: str
    observation: Observation
    related: list[Observation] = field(default_factory=list)  # a window's observations, oldest first
    key: tuple[Any, ...] = ()


@dataclass
class _Streak:
    since: float
    evt_type: Any


class Detector:
    """Evaluates a ruleset over one sandbox's observations. Thread-safe.

    `responses` overrides the rules' default responses, by rule name first, then by category.
    Each rule fires at most once per value of its `dedupe` fields (or window/sustained key), so a
    scan of 1,000 ports is one alert, not 1,000.
    """

    def __init__(self, ruleset: Ruleset, responses: Mapping[str, str] | None = None) -> None:
        self.ruleset = ruleset
        self._responses = dict(responses or {})
        self._lock = threading.Lock()
        self._fired: set[tuple[str, tuple[Any, ...]]] = set()
        self._windows: dict[tuple[str, tuple[Any, ...]], deque[tuple[float, Any, Observation]]] = {}
        self._streaks: dict[tuple[str, tuple[Any, ...]], _Streak] = {}
        self._after_seen: dict[str, float] = {}
        self._any_type, self._by_type = ruleset.by_type

    def response_for(self, rule: Rule) -> str:
        return self._responses.get(rule.name) or self._responses.get(rule.category) or rule.response

    def observe(self, obs: Observation, now: float | None = None) -> list[Match]:
        t = time.monotonic() if now is None else now
        out: list[Match] = []
        typed = self._by_type.get(obs.get("evt.type"), [])
        rules = self.ruleset.rules if self._any_type else typed
        if self._any_type:
            wanted = {id(r) for r in typed} | {id(r) for r in self._any_type}
            rules = [r for r in self.ruleset.rules if id(r) in wanted]
        with self._lock:
            for rule in rules:
                m = self._evaluate(rule, obs, t)
                if m is not None:
                    out.append(m)
        return out

    def _evaluate(self, rule: Rule, obs: Observation, t: float) -> Match | None:
        if rule.after is not None and rule.after(obs):
            self._after_seen[rule.name] = t
        hit = rule.predicate(obs)
        if rule.sustained is not None:
            key = tuple(obs.get(f) for f in rule.sustained.by)
            skey = (rule.name, key)
            if not hit:
                streak = self._streaks.get(skey)
                if streak is not None and streak.evt_type == obs.get("evt.type"):
                    del self._streaks[skey]
                return None
            streak = self._streaks.setdefault(skey, _Streak(t, obs.get("evt.type")))
            if t - streak.since < rule.sustained.seconds or skey in self._fired:
                return None
            return self._fire(rule, obs, skey)
        if not hit:
            return None
        if rule.after is not None:
            seen = self._after_seen.get(rule.name)
            if seen is None or t - seen > rule.after_within:
                return None
        if rule.window is not None:
            w = rule.window
            key = tuple(obs.get(f) for f in w.by)
            wkey = (rule.name, key)
            if wkey in self._fired:
                return None
            value: Any = 1
            if w.distinct is not None:
                value = obs.get(w.distinct)
            elif w.sum is not None:
                value = obs.get(w.sum) or 0
            q = self._windows.setdefault(wkey, deque())
            q.append((t, value, obs))
            while q and t - q[0][0] > w.seconds:
                q.popleft()
            if w.count:
                metric: float = len(q)
            elif w.distinct is not None:
                metric = len({v for _, v, _ in q if v is not None})
            else:
                metric = float(sum(v for _, v, _ in q))
            if metric < w.threshold:
                return None
            related = [o for _, _, o in q]
            del self._windows[wkey]
            return self._fire(rule, obs, wkey, related)
        dkey = (rule.name, tuple(obs.get(f) for f in rule.dedupe))
        if dkey in self._fired:
            return None
        return self._fire(rule, obs, dkey)

    def _fire(
        self,
        rule: Rule,
        obs: Observation,
        key: tuple[str, tuple[Any, ...]],
        related: list[Observation] | None = None,
    ) -> Match:
        self._fired.add(key)
        message = render_output(rule.output, obs.get) if rule.output else rule.name
        return Match(rule, self.response_for(rule), message, obs, related or [], key[1])
