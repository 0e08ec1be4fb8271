"""Filtering training data by verdict: trajectory files (JSON lines) in, the lines of clean episodes
out, `violated` ones dropped or flagged, `infra_error` ones set aside.

Each line names its episode in a field the caller gives (`meta.episode`); the episode's sandbox is
found in the audit store by that label (`--label-key`, default `episode`) and the labels that scope
the run (`--label run=r42`), and its verdict decides where the line goes:

    clean, final         -> output, unchanged (byte for byte)
    violated             -> dropped (mode "drop"; to `dropped` if given), or kept with the verdict
                            under `flag_field` (mode "flag")
    infra_error          -> aside, with the verdict under `flag_field`
    clean, not yet final -> aside, with the verdict (the sandbox still runs: an alert may come)

Streams: one line in memory at a time, and the verdicts of the last `CACHE` episodes (a trajectory
file usually holds an episode's lines together). The outputs are written to temporary files and
renamed at the end, so a run that fails (bad input, a store that can't be read) leaves none
half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from tqdm import tqdm

from corral._errors import TrajectoryError
from corral.rl._verdict import episode_verdict, worse_severity
from corral.store import Store

Mode = Literal["drop", "flag"]
CACHE = 16_384  # episodes whose verdicts are kept while filtering
_EXAMPLES = 10  # infra_error episodes the summary names
_PROGRESS_EVERY = 1 << 20  # bytes between progress bar updates


@dataclass
class Disposition:
    """Where an episode's lines go, and what the summary counts of it."""

    status: str  # clean, violated, infra_error, open (clean so far, not final)
    flag: dict[str, Any] | None  # the verdict as JSON, for lines that carry it
    categories: tuple[tuple[str, str], ...]  # (category, worst severity)
    reason: str


@dataclass
class Tally:
    lines: int = 0
    episodes: int = 0


@dataclass
class FilterSummary:
    """What `filter_trajectories` did. Lines are counted exactly; an episode is counted when its
    verdict is looked up (exactly once unless more than `CACHE` episodes interleave in the input)."""

    files: list[str]
    output: str
    aside: str
    dropped_to: str | None
    mode: Mode
    lines: int = 0
    blank: int = 0
    episodes: int = 0
    kept: int = 0  # lines written to `output` (flagged ones included)
    flagged: int = 0
    dropped: int = 0
    set_aside: int = 0
    # clean, violated, infra_error (always there), open (when some episode was still running)
    statuses: dict[str, Tally] = field(
        default_factory=lambda: {status: Tally() for status in ("clean", "violated", "infra_error")}
    )
    categories: dict[str, Tally] = field(default_factory=dict)  # violated episodes by category
    worst: dict[str, str] = field(default_factory=dict)  # category -> worst severity seen
    examples: list[tuple[str, str]] = field(default_factory=list)  # (episode, why set aside)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "output": self.output,
            "aside": self.aside,
            "dropped_to": self.dropped_to,
            "mode": self.mode,
            "lines": self.lines,
            "blank": self.blank,
            "episodes": self.episodes,
            "kept": self.kept,
            "flagged": self.flagged,
            "dropped": self.dropped,
            "set_aside": self.set_aside,
            "statuses": {k: vars(v) for k, v in self.statuses.items()},
            "categories": {k: {**vars(v), "worst": self.worst.get(k)} for k, v in self.categories.items()},
            "examples": [{"episode": e, "reason": r} for e, r in self.examples],
        }

    def text(self) -> list[str]:
        """The summary as `corral filter` prints it."""

        def count(status: str) -> str:
            t = self.statuses.get(status, Tally())
            return f"{t.lines} lines ({t.episodes} episodes)"

        out = [
            f"{self.lines} lines, {self.episodes} episodes, from {len(self.files)} file"
            f"{'s' if len(self.files) != 1 else ''}",
            f"kept     {count('clean')} clean -> {self.output}",
        ]
        violated = count("violated")
        if self.mode == "flag":
            out.append(f"flagged  {violated} violated, kept with the verdict")
        else:
            to = f" -> {self.dropped_to}" if self.dropped_to else ""
            out.append(f"dropped  {violated} violated{to}")
        aside = f"aside    {count('infra_error')} infra_error"
        if "open" in self.statuses:
            aside += f", {count('open')} still running"
        out.append(f"{aside} -> {self.aside}")
        for name, t in sorted(self.categories.items(), key=lambda kv: (-kv[1].episodes, kv[0])):
            out.append(f"  {name}: {t.episodes} episodes, {t.lines} lines, worst {self.worst.get(name)}")
        for episode, reason in self.examples:
            out.append(f"  set aside: episode {episode}: {reason}")
        return out


def filter_trajectories(
    files: Sequence[str | os.PathLike[str]],
    *,
    store: Store | str | os.PathLike[str] | None,
    field: str,
    output: str | os.PathLike[str],
    aside: str | os.PathLike[str] | None = None,
    dropped: str | os.PathLike[str] | None = None,
    label_key: str = "episode",
    labels: Mapping[str, str] | None = None,
    mode: Mode = "drop",
    flag_field: str = "corral",
    progress: bool | None = None,
) -> FilterSummary:
    """Filter trajectory files by their episodes' verdicts (see the module's docstring).

    files: JSON-lines files, one JSON object a line (blank lines are skipped).
    store: the audit store (a `Store`, a SQLite path, a postgresql:// URL; None: the default).
    field: where each line names its episode: a key, or keys joined by dots (`meta.episode`); its
        value (a string or an integer) is the episode's `label_key` label.
    output: the kept lines. aside: the infra_error (and still running) lines; default OUTPUT with
        `.aside` before its extension. dropped: where dropped lines go (mode "drop"); default nowhere.
    labels: labels every episode of the run carries (`{"run": "r42"}`), narrowing the lookup.
    mode: "drop" or "flag" the violated episodes' lines. flag_field: the key the verdict goes under.
    progress: a progress bar on stderr (tqdm); default: when stderr is a terminal.

    Raises `TrajectoryError` naming the file and line for input that is not JSON lines or lacks the
    field (nothing is written then), `StoreError` if the store can't be read.
    """
    if mode not in ("drop", "flag"):
        raise ValueError(f"mode {mode!r}: 'drop' or 'flag' is accepted")
    if not field or any(not part for part in field.split(".")):
        raise ValueError(f"field {field!r}: a key, or keys joined by dots (meta.episode), is accepted")
    paths = [os.fspath(f) for f in files]
    out_path = os.fspath(output)
    aside_path = os.fspath(aside) if aside is not None else _beside(out_path, "aside")
    dropped_path = os.fspath(dropped) if dropped is not None else None
    scope = dict(labels or {})
    if label_key in scope:
        raise ValueError(f"labels: {label_key!r} is the episode's own label (label_key); scope by others")
    summary = FilterSummary(paths, out_path, aside_path, dropped_path, mode)
    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p)
        except OSError as e:
            raise TrajectoryError(f"{p}: can't be read: {e.strerror or e}") from None
    own_store = not isinstance(store, Store)
    db = store if isinstance(store, Store) else Store.open(store, create=False)
    try:
        with contextlib.ExitStack() as stack:
            outputs = _Outputs(stack, out_path, aside_path, dropped_path)
            bar = stack.enter_context(
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc="corral filter",
                    file=sys.stderr,
                    disable=not (sys.stderr.isatty() if progress is None else progress),
                    mininterval=0.5,
                )
            )
            _Run(db, field.split("."), label_key, scope, mode, flag_field, summary, outputs, bar).all(paths)
            outputs.commit()
    finally:
        if own_store:
            db.close()
    return summary


def _beside(path: str, what: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{what}{ext or '.jsonl'}"


class _Outputs:
    """The output files, written under temporary names and renamed only by `commit`."""

    def __init__(self, stack: contextlib.ExitStack, out: str, aside: str, dropped: str | None) -> None:
        self._final: list[tuple[str, str]] = []
        self._committed = False
        stack.callback(self._discard)
        self.out = self._open(stack, out)
        self.aside = self._open(stack, aside)
        self.dropped = self._open(stack, dropped) if dropped is not None else None

    def _open(self, stack: contextlib.ExitStack, path: str) -> IO[bytes]:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            f = stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 - closed by the stack
        except OSError as e:
            raise TrajectoryError(f"{path}: can't be written: {e.strerror or e}") from None
        self._final.append((tmp, path))
        return f

    def commit(self) -> None:
        for f in (self.out, self.aside, self.dropped):
            if f is not None:
                f.flush()
        for tmp, path in self._final:
            os.replace(tmp, path)
        self._committed = True

    def _discard(self) -> None:
        if not self._committed:
            for tmp, _ in self._final:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


class _Run:
    def __init__(
        self,
        store: Store,
        path: list[str],
        label_key: str,
        scope: dict[str, str],
        mode: Mode,
        flag_field: str,
        summary: FilterSummary,
        outputs: _Outputs,
        bar: tqdm[Any],
    ) -> None:
        self.store, self.path, self.label_key, self.scope = store, path, label_key, scope
        self.mode, self.flag_field, self.summary, self.outputs, self.bar = (
            mode,
            flag_field,
            summary,
            outputs,
            bar,
        )
        self.cache: OrderedDict[str, Disposition] = OrderedDict()

    def all(self, paths: list[str]) -> None:
        unreported = 0
        for p in paths:
            for number, raw in _lines(p):
                unreported += len(raw)
                if unreported >= _PROGRESS_EVERY:
                    self.bar.update(unreported)
                    unreported = 0
                self.line(p, number, raw)
        self.bar.update(unreported)

    def line(self, path: str, number: int, raw: bytes) -> None:
        s = self.summary
        if not raw.strip():
            s.blank += 1
            return
        s.lines += 1
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrajectoryError(f"{path}:{number}: not JSON: {e}") from None
        episode = _episode(record, self.path, path, number)
        d = self.disposition(episode)
        s.statuses.setdefault(d.status, Tally()).lines += 1
        for category, _ in d.categories:
            s.categories.setdefault(category, Tally()).lines += 1
        if d.status == "clean":
            s.kept += 1
            self.outputs.out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        elif d.status == "violated" and self.mode == "drop":
            s.dropped += 1
            if self.outputs.dropped is not None:
                self.outputs.dropped.write(raw if raw.endswith(b"\n") else raw + b"\n")
        else:
            flagged = self._with_flag(record, d, path, number)
            if d.status == "violated":
                s.kept += 1
                s.flagged += 1
                self.outputs.out.write(flagged)
            else:
                s.set_aside += 1
                self.outputs.aside.write(flagged)

    def _with_flag(self, record: Any, d: Disposition, path: str, number: int) -> bytes:
        if not isinstance(record, dict):  # (_episode found a field in it, so it is one)
            raise TrajectoryError(f"{path}:{number}: not a JSON object")
        record[self.flag_field] = d.flag
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def disposition(self, episode: str) -> Disposition:
        d = self.cache.get(episode)
        if d is not None:
            self.cache.move_to_end(episode)
            return d
        v = episode_verdict(self.store, {**self.scope, self.label_key: episode})
        status = "open" if v.status == "clean" and not v.final else v.status
        d = Disposition(
            status=status,
            flag=None if status == "clean" else v.to_dict(),
            categories=tuple((name, c.worst) for name, c in v.categories.items()),
            reason=v.reason if status != "open" else "the sandbox is still running",
        )
        self.cache[episode] = d
        if len(self.cache) > CACHE:
            self.cache.popitem(last=False)
        s = self.summary
        s.episodes += 1
        s.statuses.setdefault(status, Tally()).episodes += 1
        for category, worst in d.categories:
            s.categories.setdefault(category, Tally()).episodes += 1
            s.worst[category] = _worse(s.worst.get(category), worst)
        if status in ("infra_error", "open") and len(s.examples) < _EXAMPLES:
            s.examples.append((episode, d.reason))
        return d


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, start=1)
    except OSError as e:
        raise TrajectoryError(f"{path}: can't be read: {e.strerror or e}") from None


def _episode(record: Any, keys: list[str], path: str, number: int) -> str:
    value = record
    for i, key in enumerate(keys):
        if not isinstance(value, dict):
            where = ".".join(keys[:i]) or "the line"
            raise TrajectoryError(
                f"{path}:{number}: {where} is {_kind(value)}, not an object: can't read {'.'.join(keys)}"
            )
        if key not in value:
            raise TrajectoryError(f"{path}:{number}: no field {'.'.join(keys[: i + 1])}")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TrajectoryError(
            f"{path}:{number}: {'.'.join(keys)} is {_kind(value)}; a string or an integer is accepted"
        )
    return str(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _worse(a: str | None, b: str) -> str:
    return worse_severity(a, b) or b
