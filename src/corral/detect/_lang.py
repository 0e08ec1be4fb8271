"""Rule conditions: a small boolean language over the fields in `fields.py`, in the spirit of Falco's.

    evt.type = proc.exec and (proc.name in (miner_names) or proc.cmdline contains "stratum+tcp://")

Operators: = != < <= > >= in contains icontains startswith endswith glob pmatch (a path or one
below it) dmatch (a domain or one below it) regex exists; and, or,
not, parentheses. Values are quoted strings, numbers or bare words; a list is `(a, b, c)` and may name
lists defined in rule files. A bare name without a dot is a macro; a bare field is a truth test.

Conditions are parsed once, at load, into closures; a condition that names an unknown field, macro
or list, or applies an operator to a field it can't apply to, is refused then, with the reason. On a
list field (proc.args, proc.stdio), `=`/`in`/`contains`/... hold when they hold for any element. An
absent field (a net.* field on a proc.exec) makes every comparison false, `exists` tests for it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from corral.detect.fields import FIELDS, NUMERIC

_GRAMMAR = r"""
?start: or_
?or_: and_ ("or" and_)*
?and_: not_ ("and" not_)*
?not_: "not" not_ -> neg
     | atom
?atom: "(" or_ ")"
     | FIELD CMP value       -> compare
     | FIELD "in" vlist      -> member
     | FIELD SETOP vlist     -> set_compare
     | FIELD "exists"        -> exists
     | FIELD                 -> truth
     | MACRO                 -> macro
vlist: "(" [value ("," value)*] ")"
?value: STRING -> string
      | SQSTRING -> sqstring
      | NUMBER -> number
      | WORD -> word
CMP: "!=" | "<=" | ">=" | "=" | "<" | ">" | "icontains" | "contains" | "startswith" | "endswith"
   | "glob" | "pmatch" | "dmatch" | "regex"
SETOP.2: /(contains|icontains|startswith|endswith|pmatch|dmatch|glob)(?=\s*\()/
FIELD: /[a-z][a-z0-9_]*\.[a-z0-9_.]+/
MACRO: /[A-Za-z_][A-Za-z0-9_]*/
NUMBER.2: /-?\d+(\.\d+)?(?![^\s(),])/
WORD: /[^\s(),"']+/
STRING: /"(\\.|[^"\\])*"/
SQSTRING: /'(\\.|[^'\\])*'/
%import common.WS
%ignore WS
"""

_parser = Lark(_GRAMMAR, parser="lalr", lexer="contextual", maybe_placeholders=False)


class ConditionError(ValueError):
    """A condition that can't be compiled; the message says where and why."""


class Content(Protocol):
    """A file's bytes, read only if a rule gets that far; `identity` names the file's version."""

    @property
    def identity(self) -> Hashable: ...

    def read(self) -> bytes: ...


class Fields(Protocol):
    """What a compiled condition reads: a field's value, or None when the observation has none."""

    def get(self, name: str) -> Any: ...


Predicate = Callable[[Fields], bool]

_Missing = object()


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


class _Compiler(Transformer[Token, Predicate]):
    def __init__(
        self,
        macros: Mapping[str, Predicate | Callable[[], Predicate]],
        lists: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__()
        self.macros = macros
        self.lists = lists
        self.used_lists: set[str] = set()
        self.used_macros: set[str] = set()

    # values ---------------------------------------------------------------------------------
    def string(self, items: list[Token]) -> tuple[str, str]:
        return ("lit", _unquote(str(items[0])))

    def sqstring(self, items: list[Token]) -> tuple[str, str]:
        return ("lit", _unquote(str(items[0])))

    def number(self, items: list[Token]) -> tuple[str, str]:
        return ("num", str(items[0]))

    def word(self, items: list[Token]) -> tuple[str, str]:
        return ("word", str(items[0]))

    def vlist(self, items: list[tuple[str, str]]) -> list[str]:
        out: list[str] = []
        for kind, text in items:
            if kind == "word" and text in self.lists:
                self.used_lists.add(text)
                out.extend(self.lists[text])
            else:
                out.append(text)
        return out

    # boolean structure ------------------------------------------------------------------------
    def or_(self, items: list[Predicate]) -> Predicate:
        preds = tuple(items)
        kinds = [event_types(p) for p in preds]
        union = None if any(k is None for k in kinds) else frozenset().union(*kinds)  # type: ignore[arg-type]
        return _typed(lambda f: any(p(f) for p in preds), union)

    def and_(self, items: list[Predicate]) -> Predicate:
        preds = tuple(items)
        known = [k for k in (event_types(p) for p in preds) if k is not None]
        both = frozenset.intersection(*known) if known else None
        return _typed(lambda f: all(p(f) for p in preds), both)

    def neg(self, items: list[Predicate]) -> Predicate:
        p = items[0]
        return lambda f: not p(f)

    def macro(self, items: list[Token]) -> Predicate:
        name = str(items[0])
        if name not in self.macros:
            raise ConditionError(f"unknown macro {name!r} (a field needs a dot, e.g. proc.name)")
        self.used_macros.add(name)
        m = self.macros[name]
        # A macro may be compiled lazily (macros can use macros defined later in the file).
        return m if _is_predicate(m) else m()  # type: ignore[return-value,call-arg]

    # comparisons ------------------------------------------------------------------------------
    def truth(self, items: list[Token]) -> Predicate:
        name = _field(items[0])
        if FIELDS[name].kind != "bool":
            raise ConditionError(f"{name} is not true/false; compare it, e.g. `{name} exists`")
        return lambda f: bool(f.get(name))

    def exists(self, items: list[Token]) -> Predicate:
        name = _field(items[0])

        def test(f: Fields) -> bool:
            v = f.get(name)
            return v is not None and v != [] and v != ""

        return test

    def member(self, items: list[Any]) -> Predicate:
        name = _field(items[0])
        kind = FIELDS[name].kind
        if kind == "content":
            raise ConditionError(f"{name} supports only contains and icontains")
        values: list[str] = items[1]
        if kind in NUMERIC:
            wanted_n = frozenset(_number(name, v) for v in values)
            return lambda f: _any(f.get(name), lambda x: x in wanted_n)
        if kind == "bool":
            raise ConditionError(f"{name} is true/false: use it alone or with `not`")
        wanted = frozenset(values)
        pred: Predicate = lambda f: _any(f.get(name), lambda x: x in wanted)  # noqa: E731
        return _typed(pred, wanted if name == "evt.type" else None)

    def set_compare(self, items: list[Any]) -> Predicate:
        name = _field(items[0])
        op = str(items[1])
        values: list[str] = items[2]
        if not values:
            raise ConditionError(f"{name} {op} (): the list is empty")
        tests = [_string_op(name, op, v) for v in values]
        if FIELDS[name].kind == "content" and op in ("contains", "icontains"):
            return _content_any(name, op, values)
        # One test for the whole list where the operator allows it: rules run at every execve.
        one: Callable[[Any], bool] | None = None
        if op in ("contains", "icontains"):
            rx = re.compile("|".join(map(re.escape, values)), re.IGNORECASE if op == "icontains" else 0)
            one = lambda x: rx.search(x) is not None  # noqa: E731
        elif op in ("startswith", "endswith"):
            prefixes = tuple(values)
            one = (
                (lambda x: x.startswith(prefixes)) if op == "startswith" else (lambda x: x.endswith(prefixes))
            )
        if one is not None:
            test = one
            return lambda f: _any(f.get(name), lambda x: isinstance(x, str) and test(x))
        return lambda f: any(t(f) for t in tests)

    def compare(self, items: list[Any]) -> Predicate:
        name = _field(items[0])
        op = str(items[1])
        kind_, text = items[2]
        kind = FIELDS[name].kind
        if kind == "bool":
            raise ConditionError(f"{name} is true/false: use it alone or with `not`")
        if op in ("<", "<=", ">", ">=") or (kind in NUMERIC and op in ("=", "!=")):
            if kind not in NUMERIC:
                raise ConditionError(f"{name} is not a number; {op} compares numbers")
            n = _number(name, text)
            cmp = _NUMERIC_OPS[op]
            return lambda f: _any(f.get(name), lambda x: cmp(x, n))
        if kind == "content":
            if op not in ("contains", "icontains"):
                raise ConditionError(f"{name} supports only contains and icontains")
            return _content_any(name, op, [text])
        if kind_ == "num" and kind not in NUMERIC:
            text = str(text)
        return _typed(
            _string_op(name, op, text), frozenset({text}) if (name, op) == ("evt.type", "=") else None
        )


def _typed(p: Predicate, types: frozenset[str] | None) -> Predicate:
    p._corral_types = types  # type: ignore[attr-defined]
    return p


def event_types(p: Predicate) -> frozenset[str] | None:
    """The observation types (`evt.type`) a condition can hold for, when the condition says; None
    when it may hold for any. The detector evaluates a rule only on observations of its types."""
    return getattr(p, "_corral_types", None)


def _is_predicate(m: object) -> bool:
    return getattr(m, "_corral_predicate", False) is True


def mark_predicate(p: Predicate) -> Predicate:
    p._corral_predicate = True  # type: ignore[attr-defined]
    return p


def _field(tok: Token) -> str:
    name = str(tok)
    if name not in FIELDS:
        close = [f for f in FIELDS if f.split(".")[0] == name.split(".")[0]]
        hint = f"; {name.split('.')[0]}.* fields are {', '.join(close)}" if close else ""
        raise ConditionError(f"unknown field {name!r}{hint}")
    return name


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConditionError(f"{name} is a number; {text!r} is not") from None


_NUMERIC_OPS: dict[str, Callable[[Any, float], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _any(value: Any, test: Callable[[Any], bool]) -> bool:
    if value is None:
        return False
    if type(value) is str:
        return test(value)
    if isinstance(value, list | tuple):
        return any(test(v) for v in value if v is not None)
    return test(value)


def _string_op(name: str, op: str, text: str) -> Predicate:
    if FIELDS[name].kind in NUMERIC:
        raise ConditionError(f"{name} is a number; {op} compares text")
    test: Callable[[Any], bool]
    if op == "=":
        test = lambda x: x == text  # noqa: E731
    elif op == "!=":
        # Not equal for a list field: no element equals it.
        return lambda f: f.get(name) is not None and not _any(f.get(name), lambda x: x == text)
    elif op == "contains":
        test = lambda x: text in x  # noqa: E731
    elif op == "icontains":
        low = text.lower()
        test = lambda x: low in x.lower()  # noqa: E731
    elif op == "startswith":
        test = lambda x: x.startswith(text)  # noqa: E731
    elif op == "endswith":
        test = lambda x: x.endswith(text)  # noqa: E731
    elif op == "glob":
        pattern = re.compile(fnmatch.translate(text))
        test = lambda x: pattern.match(x) is not None  # noqa: E731
    elif op == "pmatch":
        prefix = text.rstrip("/")
        test = lambda x: x == prefix or x.startswith(prefix + "/")  # noqa: E731
    elif op == "dmatch":
        domain = text.lower().strip(".")
        test = lambda x: x.lower().rstrip(".") == domain or x.lower().rstrip(".").endswith("." + domain)  # noqa: E731
    elif op == "regex":
        try:
            rx = re.compile(text)
        except re.error as e:
            raise ConditionError(f"{name} regex {text!r}: {e}") from None
        test = lambda x: rx.search(x) is not None  # noqa: E731
    else:
        raise ConditionError(f"{name}: operator {op} does not apply to text")
    return lambda f: _any(f.get(name), lambda x: isinstance(x, str) and test(x))


def _content_any(name: str, op: str, needles: list[str]) -> Predicate:
    """One regular expression over the bytes for all needles: content can be megabytes."""
    flags = re.IGNORECASE if op == "icontains" else 0
    rx = re.compile(b"|".join(re.escape(n.encode()) for n in needles), flags)

    verdicts: dict[Any, bool] = {}

    def test(f: Fields) -> bool:
        data = f.get(name)
        if isinstance(data, bytes | bytearray | memoryview):
            return rx.search(data) is not None
        if data is not None and hasattr(data, "identity"):  # isinstance on a protocol is slow
            content: Content = data
            # The same file (same inode, size and mtime) gets the same answer: a build runs cc1
            # thousands of times, and it is read once.
            key = content.identity
            hit = verdicts.get(key)
            if hit is None:
                hit = rx.search(content.read()) is not None
                if len(verdicts) > 4096:
                    verdicts.clear()
                verdicts[key] = hit
            return hit
        return False

    return test


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Tree[Token]:
    return _parser.parse(text)


def compile_condition(
    text: str,
    macros: Mapping[str, Predicate | Callable[[], Predicate]] | None = None,
    lists: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Predicate, set[str], set[str]]:
    """Compile `text`; returns the predicate and the names of the lists and macros it used."""
    try:
        tree = _parse(text)
    except UnexpectedCharacters as e:
        raise ConditionError(f"unexpected {text[e.pos_in_stream or 0]!r} at column {e.column}") from None
    except UnexpectedToken as e:
        if e.token.type == "$END":
            raise ConditionError(
                "the condition ends too early (a value or a closing parenthesis is missing)"
            ) from None
        raise ConditionError(f"unexpected {str(e.token)!r} at column {e.column}") from None
    except UnexpectedInput as e:
        raise ConditionError(f"cannot parse at column {getattr(e, 'column', '?')}") from None
    except LarkError as e:
        raise ConditionError(str(e)) from None
    compiler = _Compiler(macros or {}, lists or {})
    try:
        pred = compiler.transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, ConditionError):
            raise e.orig_exc from None
        raise
    if isinstance(pred, Token):  # a bare token can't happen with this grammar, but be explicit
        raise ConditionError("a condition must test something")
    return mark_predicate(pred), compiler.used_lists, compiler.used_macros
