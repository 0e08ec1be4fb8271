"""Rule files: lists, macros and rules, loaded in order, later files refining earlier ones.

    - list: miner_names
      items: [xmrig, minerd, cpuminer]
    - macro: spawned
      condition: evt.type = proc.exec
    - rule: miner executable
      desc: A known miner's executable name. Misses renamed copies (see the content rule).
      condition: spawned and proc.name in (miner_names)
      severity: critical
      category: mining
      tags: {mitre: [T1496], owasp: [ASI10]}
      response: kill
      output: "miner %proc.name started: %proc.cmdline"

A later file overrides without editing corral's own: a `list` with the same name replaces it (or
extends it with `append: true`); a `rule` with the same name replaces it; `{rule: NAME, enabled:
false}` turns it off and `{rule: NAME, response: alert}` changes only its response. The built-in
rules live in `corral/detect/rules/*.yaml` and are always loaded first.

Stateful rules add one of:
    window:    {seconds: 10, threshold: 8, distinct: net.port, by: [proc.pid]}   # or count / sum: FIELD
    sustained: {seconds: 1}          # the condition held on every observation for that long
    after:     {condition: ..., within: 60}   # an earlier observation matched this, recently
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from corral._errors import PolicyError
from corral.detect._lang import ConditionError, Predicate, compile_condition, event_types, mark_predicate
from corral.detect.fields import FIELDS, NUMERIC
from corral.events.model import AlertCategory, Response, Severity
from corral.policy._load import read_yaml, validate

Category = AlertCategory
CATEGORIES: tuple[str, ...] = get_args(AlertCategory)

_Name = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_ .:/()'-]+$")]
_Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
_Technique = Annotated[str, StringConstraints(pattern=r"^T\d{4}(\.\d{3})?$")]
_Owasp = Annotated[str, StringConstraints(pattern=r"^ASI\d{2}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tags(_Model):
    mitre: tuple[_Technique, ...] = Field((), description="MITRE ATT&CK technique ids, e.g. T1496")
    owasp: tuple[_Owasp, ...] = Field(
        (), description="OWASP Top 10 for Agentic Applications entries, e.g. ASI10 (rogue agents)"
    )


def _known_field(name: str) -> str:
    if name not in FIELDS:
        raise ValueError(f"unknown field {name!r}")
    return name


_FieldName = Annotated[str, StringConstraints(min_length=1)]


class Window(_Model):
    """Fires when, within `seconds`, the matching observations for one key reach `threshold`."""

    seconds: float = Field(gt=0, le=3600)
    threshold: float = Field(gt=0)
    count: bool = Field(False, description="count the observations")
    distinct: _FieldName | None = Field(None, description="count distinct values of this field")
    sum: _FieldName | None = Field(None, description="add up this numeric field")
    by: tuple[_FieldName, ...] = Field(("proc.pid",), description="fields that make the key")

    @model_validator(mode="after")
    def _one_metric(self) -> Window:
        chosen = [m for m in ("count", "distinct", "sum") if getattr(self, m)]
        if len(chosen) != 1:
            raise ValueError("a window needs exactly one of count: true, distinct: FIELD, sum: FIELD")
        for f in (self.distinct, self.sum, *self.by):
            if f is not None:
                _known_field(f)
        if self.sum is not None and FIELDS[self.sum].kind not in NUMERIC:
            raise ValueError(f"sum: {self.sum} is not a number")
        return self


class Sustained(_Model):
    """Fires once the condition has held, for one key, on every observation for `seconds`."""

    seconds: float = Field(gt=0, le=3600)
    by: tuple[_FieldName, ...] = ("proc.pid",)

    @model_validator(mode="after")
    def _fields(self) -> Sustained:
        for f in self.by:
            _known_field(f)
        return self


class After(_Model):
    """Fires only if an earlier observation in the same sandbox matched `condition` within `within` s."""

    condition: str
    within: float = Field(gt=0, le=86400)


class RuleSpec(_Model):
    rule: _Name
    desc: str = Field(min_length=1, description="what it detects, and what it misses")
    condition: str = Field(min_length=1)
    severity: Severity
    category: Category
    tags: Tags = Tags()
    response: Response = "alert"
    output: str = ""
    window: Window | None = None
    sustained: Sustained | None = None
    after: After | None = None
    dedupe: tuple[_FieldName, ...] = Field(
        ("proc.pid", "evt.exec"), description="one alert per distinct value of these fields"
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> RuleSpec:
        if self.window is not None and self.sustained is not None:
            raise ValueError("a rule has a window or is sustained, not both")
        for f in self.dedupe:
            _known_field(f)
        return self


class RuleOverride(_Model):
    rule: _Name
    enabled: bool | None = None
    response: Response | None = None


class ListSpec(_Model):
    list: _Ident
    items: tuple[Annotated[str, StringConstraints(min_length=1)], ...]
    append: bool = False


class MacroSpec(_Model):
    macro: _Ident
    condition: str = Field(min_length=1)


@dataclass(frozen=True)
class Rule:
    """A compiled rule."""

    name: str
    desc: str
    category: str
    severity: str
    response: str
    tags: Tags
    output: str
    predicate: Predicate
    source: str
    window: Window | None = None
    sustained: Sustained | None = None
    after: Predicate | None = None
    after_within: float = 0.0
    dedupe: tuple[str, ...] = ("proc.pid", "evt.exec")
    condition: str = ""


@dataclass
class Ruleset:
    rules: list[Rule] = field(default_factory=list)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    macros: dict[str, str] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @functools.cached_property
    def by_type(self) -> tuple[list[Rule], dict[str, list[Rule]]]:
        """Rules that don't say which observation type they fire on (tried on everything), and the
        others by type (most say: evt.type = proc.exec, ...). Built once per ruleset."""
        any_type = [r for r in self.rules if _types(r) is None]
        by_type: dict[str, list[Rule]] = {}
        for r in self.rules:
            for t in _types(r) or ():
                by_type.setdefault(t, []).append(r)
        return any_type, by_type

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """Every rule's name, disabled ones included."""
        return frozenset(r.name for r in self.rules) | frozenset(self.disabled)

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


@functools.cache
def _types(rule: Rule) -> frozenset[str] | None:
    """The types a rule needs: its condition's, and (for `after:` rules) also its earlier step's."""
    own = event_types(rule.predicate)
    if own is None or rule.after is None:
        return own
    before = event_types(rule.after)
    return None if before is None else own | before


def builtin_files() -> list[Path]:
    """corral's own rule files, in load order (lists and macros first)."""
    root = resources.files("corral.detect") / "rules"
    return sorted((Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)


def load(
    extra: Sequence[str | os.PathLike[str]] = (),
    *,
    builtin: bool = True,
) -> Ruleset:
    """The built-in rules, then each file of `extra` in order. PolicyError lists every problem, each
    naming the file and the entry."""
    paths: list[str] = [os.fspath(p) for p in builtin_files()] if builtin else []
    paths += [os.fspath(p) for p in extra]
    specs: dict[str, tuple[RuleSpec, str]] = {}  # insertion order is the order rules are evaluated in
    overrides: list[tuple[RuleOverride, str]] = []
    lists: dict[str, tuple[str, ...]] = {}
    macros: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for path in paths:
        data = read_yaml(path, "rule file")
        if data is None:
            continue
        if not isinstance(data, list):
            problems.append(f"{path}: a rule file is a YAML list of list/macro/rule entries")
            continue
        for i, entry in enumerate(data):
            where = f"{path}: entry {i + 1}"
            if not isinstance(entry, dict):
                problems.append(f"{where}: expected a mapping with list, macro or rule")
                continue
            kinds = [k for k in ("list", "macro", "rule") if k in entry]
            if len(kinds) != 1:
                problems.append(f"{where}: needs exactly one of list, macro, rule (got {sorted(entry)})")
                continue
            name = str(entry[kinds[0]])
            where = f"{path}: {kinds[0]} {name!r}"
            try:
                if kinds[0] == "list":
                    ls = validate(ListSpec, entry, where)
                    if ls.append and ls.list not in lists:
                        problems.append(f"{where}: append: there is no earlier list {ls.list!r} to extend")
                        continue
                    lists[ls.list] = (*lists.get(ls.list, ()), *ls.items) if ls.append else ls.items
                elif kinds[0] == "macro":
                    ms = validate(MacroSpec, entry, where)
                    macros[ms.macro] = (ms.condition, where)
                elif set(entry) <= {"rule", "enabled", "response"} and len(entry) > 1:
                    ov = validate(RuleOverride, entry, where)
                    if ov.rule not in specs:
                        problems.append(f"{where}: no earlier rule {ov.rule!r} to change")
                        continue
                    overrides.append((ov, where))
                    spec, src = specs[ov.rule]
                    changes: dict[str, Any] = {}
                    if ov.enabled is not None:
                        changes["enabled"] = ov.enabled
                    if ov.response is not None:
                        changes["response"] = ov.response
                    specs[ov.rule] = (spec.model_copy(update=changes), src)
                else:
                    rs = validate(RuleSpec, entry, where)
                    specs.pop(rs.rule, None)
                    specs[rs.rule] = (rs, where)
            except PolicyError as e:
                problems.extend(e.problems)
    compiled_macros = _compile_macros(macros, lists, problems)
    ruleset = Ruleset(lists=lists, macros={k: v[0] for k, v in macros.items()}, files=paths)
    for name, (spec, where) in specs.items():
        if not spec.enabled:
            ruleset.disabled.append(name)
            continue
        try:
            ruleset.rules.append(_compile_rule(spec, where, compiled_macros, lists))
        except ConditionError as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise PolicyError(problems)
    return ruleset


def _compile_macros(
    macros: Mapping[str, tuple[str, str]], lists: Mapping[str, Sequence[str]], problems: list[str]
) -> dict[str, Predicate | Callable[[], Predicate]]:
    """Macros compile on first use, so one may use another defined after it; a cycle is an error."""
    compiled: dict[str, Predicate | Callable[[], Predicate]] = {}
    active: list[str] = []

    def lazy(name: str) -> Callable[[], Predicate]:
        def build() -> Predicate:
            done = compiled[name]
            if getattr(done, "_corral_predicate", False):
                return done  # type: ignore[return-value]
            if name in active:
                raise ConditionError(f"macro {name!r} uses itself (through {' -> '.join(active)})")
            active.append(name)
            try:
                pred, _, _ = compile_condition(macros[name][0], compiled, lists)
            finally:
                active.pop()
            compiled[name] = mark_predicate(pred)
            return pred

        return build

    for name in macros:
        compiled[name] = lazy(name)
    for name in macros:
        try:
            build = compiled[name]
            if not getattr(build, "_corral_predicate", False):
                build()  # type: ignore[call-arg]
        except ConditionError as e:
            problems.append(f"{macros[name][1]}: {e}")
    return compiled


def _compile_rule(
    spec: RuleSpec,
    where: str,
    macros: Mapping[str, Predicate | Callable[[], Predicate]],
    lists: Mapping[str, Sequence[str]],
) -> Rule:
    pred, _, _ = compile_condition(spec.condition, macros, lists)
    after = None
    if spec.after is not None:
        try:
            after, _, _ = compile_condition(spec.after.condition, macros, lists)
        except ConditionError as e:
            raise ConditionError(f"after: {e}") from None
    for token in _output_fields(spec.output):
        if token not in FIELDS:
            raise ConditionError(f"output: unknown field %{token}")
    return Rule(
        name=spec.rule,
        desc=spec.desc.strip(),
        category=spec.category,
        severity=spec.severity,
        response=spec.response,
        tags=spec.tags,
        output=spec.output,
        predicate=pred,
        source=where,
        window=spec.window,
        sustained=spec.sustained,
        after=after,
        after_within=spec.after.within if spec.after is not None else 0.0,
        dedupe=spec.dedupe,
        condition=spec.condition,
    )


def _output_fields(template: str) -> list[str]:
    return re.findall(r"%([a-z][a-z0-9_]*\.[a-z0-9_.]*[a-z0-9_])", template)


def render_output(template: str, get: Callable[[str], Any]) -> str:
    """`template` with each %field replaced by its value (lists joined by spaces, absent as -)."""

    def sub(m: re.Match[str]) -> str:
        v = get(m.group(1))
        if v is None:
            return "-"
        if isinstance(v, list | tuple):
            return " ".join(str(x) for x in v)
        if isinstance(v, bytes | bytearray | memoryview):
            return "<content>"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    return re.sub(r"%([a-z][a-z0-9_]*\.[a-z0-9_.]*[a-z0-9_])", sub, template)
