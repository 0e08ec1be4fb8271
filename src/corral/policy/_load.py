"""Reading policy files; each problem becomes one line: ``FILE: KEY: what is wrong; what is accepted``."""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from corral._errors import PolicyError

from ._units import Unit, show_value

Model = TypeVar("Model", bound=BaseModel)

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses what plain YAML silently accepts in a policy.

    A duplicate key would let the last one win, so a tightened limit written twice can quietly be undone;
    a key YAML reads as a bool or a number (``yes:``, ``1:``) can never match a policy key.
    Problems are collected, not raised, so one run reports all of them.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.problems: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        kept = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                kept.append((key_node, value_node))
            elif key_node.tag != _STR_TAG:
                text = key_node.value if isinstance(key_node, yaml.ScalarNode) else ""
                fix = f'; quote it: "{text}"' if text else "; keys must be strings"
                self.problems.append((line, f"key {text or '(not a scalar)'} is not a string{fix}"))
            elif key_node.value in seen:
                self.problems.append((line, f'duplicate key "{key_node.value}"'))
            else:
                seen.add(key_node.value)
                kept.append((key_node, value_node))
        # Without the refused keys, so that the rest of the file is still read and checked.
        node.value = kept
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike[str], what: str = "policy file") -> object:
    """The YAML document in `path`; PolicyError when the file can't be read or isn't clean YAML."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyError([f"{source}: cannot read {what} ({err.strerror or err})"]) from None
    except UnicodeDecodeError as err:
        raise PolicyError([f"{source}: cannot read {what} (not UTF-8: byte {err.start})"]) from None
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        where = (
            f"line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}: "
            if err.problem_mark
            else ""
        )
        raise PolicyError([f"{source}: {where}not valid YAML ({err.problem or err.context})"]) from None
    except yaml.YAMLError as err:
        raise PolicyError([f"{source}: not valid YAML ({err})"]) from None
    finally:
        loader.dispose()
    if loader.problems:
        # Nested mappings are built after their parents; report in file order.
        raise PolicyError([f"{source}: line {line}: {problem}" for line, problem in sorted(loader.problems)])
    return data


def validate(model: type[Model], data: object, source: str) -> Model:
    """`data` validated as `model`; PolicyError with one line per problem, each naming `source` and key."""
    if not isinstance(data, dict):
        raise PolicyError([f"{source}: the policy must be a YAML mapping of keys, got {_kind(data)}"])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
    # pydantic also calls a list too short when its only items were invalid; the item errors say it all.
    errors = [e for e in errors if e["type"] != "too_short" or not _has_inner(e, errors)]
    raise PolicyError([f"{source}: {_describe(model, error)}" for error in errors])


def _has_inner(error: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    loc = error["loc"]
    return any(len(e["loc"]) > len(loc) and e["loc"][: len(loc)] == loc for e in errors)


# What each pydantic error type means in a policy. `{hint}` is "use e.g. ..." from the field's examples;
# our own validators ("value_error", "item_error") write the whole message themselves.
_MESSAGES = {
    "missing": "missing; use {key}: {example}",
    "extra_forbidden": "unknown key; allowed keys: {allowed}",
    "literal_error": "{input} is not accepted; {expected}",
    "value_error": "{error}",
    "item_error": "{msg}",
    "int_type": "{input} is not an integer; {hint}",
    "int_parsing": "{input} is not an integer; {hint}",
    "float_type": "{input} is not a number; {hint}",
    "float_parsing": "{input} is not a number; {hint}",
    "finite_number": "{input} is not a finite number; {hint}",
    "string_type": "{input} is not a string; {quote}",
    "list_type": "{input} is not a list; {hint}",
    "tuple_type": "{input} is not a list; {hint}",
    "frozen_set_type": "{input} is not a list; {hint}",
    "dict_type": "{input} is not a mapping; {hint}",
    "model_type": "{input} is not a mapping; {hint}",
    "greater_than": "must be greater than {gt}; {hint}",
    "greater_than_equal": "must be at least {ge}; {hint}",
    "less_than": "must be less than {lt}; {hint}",
    "less_than_equal": "must be at most {le}; {hint}",
    "too_short": "must list at least {min_length}; {hint}",
}
_FALLBACK = "{input} is not accepted here; {hint}"
_SEE_DOCS = "see docs/policy.md"
_BOUNDS = ("gt", "ge", "lt", "le")


def _describe(model: type[BaseModel], error: ErrorDetails) -> str:
    loc: tuple[int | str, ...] = error["loc"]
    ctx: dict[str, Any] = dict(error.get("ctx", {}))
    # pydantic marks a bad mapping key with a trailing "[key]"; the key itself already names the place.
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
    # A list-level check (like duplicate GPUs) knows which item is wrong; the message should point at it.
    if error["type"] == "item_error":
        loc = (*loc, ctx["index"])
    owner, field = _lookup(model, loc)
    examples: list[Any] = (field.examples if field else None) or []
    unit = next((m for m in field.metadata if isinstance(m, Unit)), None) if field else None
    for bound in _BOUNDS:
        if bound in ctx:
            ctx[bound] = unit.format(ctx[bound]) if unit else _flow(ctx[bound])
    expected = ctx.get("expected", "").replace("'", "")
    hint = f"use e.g. {_either([_flow(e) for e in examples])}" if examples else _SEE_DOCS
    key = str(loc[-1]) if loc else ""
    values = {
        **ctx,
        "input": show_value(error["input"]),
        "msg": error["msg"],
        "hint": hint,
        # YAML reads `DEBUG: 1` as a number; quoting is the fix the user is looking for.
        "quote": f'quote it: "{show_value(error["input"])}"' if _scalar(error["input"]) else hint,
        "key": key,
        "example": _flow(examples[0]) if examples else "...",
        "allowed": ", ".join(sorted(owner.model_fields)) if owner else _SEE_DOCS,
        "expected": f"use one of {expected}" if " or " in expected else f"use {key}: {expected}",
    }
    message = _MESSAGES.get(error["type"], _FALLBACK).format_map(values)
    where = _dotted(loc)
    return f"{where}: {message}" if where else message


def _lookup(
    model: type[BaseModel], loc: Sequence[int | str]
) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The innermost model that `loc` reaches and the last field on the way.

    List indices are skipped; a name that is not a field (an env variable, a host name) stays with the
    mapping field it belongs to.
    """
    owner: type[BaseModel] | None = model
    field = None
    named = False  # the next part is a name in a mapping of sections (network.phases.NAME)
    for part in loc:
        if isinstance(part, int):
            continue
        if named:
            named = False
            continue
        if owner is None or part not in owner.model_fields:
            break
        field = owner.model_fields[part]
        owner = _model_in(field.annotation)
        named = owner is not None and get_origin(field.annotation) is dict
    return owner, field


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def _dotted(loc: Sequence[int | str]) -> str:
    """``network.egress[0].ports``; keys with dots or spaces are quoted: ``network.hosts["db.internal"]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[\w-]+", part):
            text += f".{part}" if text else part
        else:
            text += f"[{show_value(part)}]"
    return text


def _flow(value: object) -> str:
    """`value` in YAML flow style, for examples in messages."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_flow, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else show_value(value)


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _scalar(value: object) -> bool:
    return isinstance(value, int | float | bool)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return show_value(value) if isinstance(value, list | dict) else type(value).__name__
