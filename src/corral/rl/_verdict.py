"""An episode's verdict: `clean`, `violated` or `infra_error`, from a sandbox's record.

One function (`build`) makes a verdict from the facts of one sandbox, whether they come from the
running sandbox (`Sandbox.verdict()`) or from the audit store (`verdict_from_store`), so the two
agree by construction. The rules (see `Verdict`) keep apart what the agent did from what failed
around it:

    any alert (response not `log`)                 -> violated   (failures, if any, listed too)
    else: sandbox.stop reason `failed`             -> infra_error (a monitor died, init died or
                                                                   wedged, the store overflowed)
          the stop's error on `closed`/`lifetime`  -> infra_error (the workspace could not be saved)
          `tripwire` stop with no alert recorded   -> infra_error (the record is inconsistent)
          cut: its supervisor died before the stop -> infra_error (a lost node)
          the store not taking writes              -> infra_error
          no sandbox for the episode in the store  -> infra_error (a start error, or never written)
    else                                           -> clean      (`lifetime` included: the agent
                                                                   used up its budget; the reason
                                                                   says so)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from corral.events.aggregate import AlertEntry, AlertTally
from corral.store import Filters, SandboxInfo, Store
from corral.store.records import SEVERITIES

Status = Literal["clean", "violated", "infra_error"]
STATUSES: tuple[Status, ...] = ("clean", "violated", "infra_error")


@dataclass(frozen=True)
class CategoryVerdict:
    """The alerts of one category: how many, the worst severity, what was done (action -> alerts)
    and which rules fired."""

    alerts: int
    worst: str
    actions: dict[str, int]
    rules: list[str]


@dataclass(frozen=True)
class VerdictAlert:
    """One alert, with where it is in the store: sandbox `sandbox`, event `seq` of its chain."""

    sandbox: str
    seq: int
    rule: str
    category: str
    severity: str
    action: str  # the response taken: alert, kill, freeze, terminate
    outcome: str  # what it achieved: "killed 2 processes", "sandbox terminating"
    exec: int | None  # which of the agent's commands it belongs to
    message: str  # at most 500 characters


@dataclass(frozen=True)
class SandboxRef:
    """A sandbox in the audit store `store`: its labels, why it stopped (None: it has not), how many
    events are in its chain and the hash of the last (its chain head: `corral audit verify` and
    `Store.proof(id)` check it)."""

    id: str
    store: str
    labels: dict[str, str]
    stop_reason: str | None
    events: int
    head: str


@dataclass(frozen=True)
class Verdict:
    """What happened in an episode, for a trainer: reward shaping and filtering training data.

    status:
      - `clean`: no alert, nothing failed. An agent that used up its lifetime is clean (its
        `stop_reason` is "lifetime").
      - `violated`: the agent set off at least one tripwire whose response is not `log` (an `alert`,
        `kill`, `freeze` or `terminate` rule: mining, a tunnel, a reverse shell, probing, ...).
        A `tamper` alert is the agent's doing too: forging corral's control channel is misbehaviour,
        whatever error the command got. Infrastructure failures in the same episode are listed in
        `failures`, but never hide an alert: the alerts are the host's own evidence.
      - `infra_error`: no alert, and corral or the host failed the episode (`failures` says how):
        a start error, a failed monitor (the sandbox stops as `failed`), init gone or wedged, the
        audit store not taking writes, a sandbox cut off when its supervisor died (a lost node), a
        workspace that could not be saved, no sandbox in the store for the episode. Neither a reward
        nor a penalty is earned: set the episode aside (and rerun it).
    final: the sandbox has stopped (or is known cut): the verdict can no longer change. Before that
        it is the verdict so far (an alert can still come).
    categories: alerts by category (`CategoryVerdict`); worst: the worst severity of all.
    alerts: the first 100 alerts (of each sandbox), each with its place in the store;
        alerts_total counts them all.
    sandboxes: the sandboxes the verdict covers (one, or an episode's several), with the store and
        chain head to check it against.

    `to_dict()` / `to_json()` give plain JSON (what `info["corral"]` holds); `Verdict.from_dict`
    reads it back.
    """

    status: Status
    reason: str  # one line: why this status
    final: bool
    worst: str | None = None
    categories: dict[str, CategoryVerdict] = field(default_factory=dict)
    alerts: list[VerdictAlert] = field(default_factory=list)
    alerts_total: int = 0
    failures: list[str] = field(default_factory=list)
    sandboxes: list[SandboxRef] = field(default_factory=list)

    @property
    def rules(self) -> list[str]:
        """Every rule that fired, by category."""
        return [r for c in self.categories.values() for r in c.rules]

    def to_dict(self) -> dict[str, Any]:
        """A new plain dict (JSON types only); safe to modify."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """The verdict `to_dict()` gave (ValueError if `data` is not one)."""
        try:
            status = data["status"]
            if status not in STATUSES:
                raise ValueError(f"status {status!r}: one of {', '.join(STATUSES)} is accepted")
            return cls(
                status=cast(Status, status),
                reason=str(data["reason"]),
                final=bool(data["final"]),
                worst=data.get("worst"),
                categories={k: CategoryVerdict(**v) for k, v in data.get("categories", {}).items()},
                alerts=[VerdictAlert(**a) for a in data.get("alerts", [])],
                alerts_total=int(data.get("alerts_total", 0)),
                failures=[str(f) for f in data.get("failures", [])],
                sandboxes=[SandboxRef(**s) for s in data.get("sandboxes", [])],
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a corral verdict: {e}") from None

    @classmethod
    def infra(cls, reason: str, sandboxes: Sequence[SandboxRef] = ()) -> Verdict:
        """An `infra_error` verdict for a failure outside any sandbox's record (a start error)."""
        return cls("infra_error", reason, True, failures=[reason], sandboxes=list(sandboxes))

    @classmethod
    def from_error(cls, error: BaseException) -> Verdict:
        """The verdict of an episode whose sandbox never started (`SandboxStartError`, `HostError`,
        `PolicyError`, `StoreError` from `Sandbox(...)`): `infra_error`, the error as the reason.
        After a sandbox started, ask it (`sb.verdict()`) instead: an `ExecError` may be the agent
        forging the control channel (then the sandbox's verdict is `violated`)."""
        return cls.infra(f"{type(error).__name__}: {error}")

    @classmethod
    def merge(cls, verdicts: Iterable[Verdict]) -> Verdict:
        """One verdict for several sandboxes (an episode that used more than one): violated if any
        is, else infra_error if any is, else clean; final when all are."""
        vs = list(verdicts)
        if not vs:
            return cls.infra("no sandbox")
        if len(vs) == 1:
            return vs[0]
        tally: dict[str, CategoryVerdict] = {}
        for v in vs:
            for name, c in v.categories.items():
                tally[name] = _merge_category(tally.get(name), c)
        return _assemble(
            categories=tally,
            alerts=[a for v in vs for a in v.alerts],
            alerts_total=sum(v.alerts_total for v in vs),
            failures=[f for v in vs for f in v.failures],
            sandboxes=[s for v in vs for s in v.sandboxes],
            final=all(v.final for v in vs),
        )


def _merge_category(a: CategoryVerdict | None, b: CategoryVerdict) -> CategoryVerdict:
    if a is None:
        return b
    actions = dict(a.actions)
    for k, n in b.actions.items():
        actions[k] = actions.get(k, 0) + n
    return CategoryVerdict(
        alerts=a.alerts + b.alerts,
        worst=worse_severity(a.worst, b.worst) or a.worst,
        actions=actions,
        rules=[*a.rules, *(r for r in b.rules if r not in a.rules)],
    )


def _rank(severity: str | None) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def worse_severity(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if _rank(a) <= _rank(b) else b


def _assemble(
    *,
    categories: dict[str, CategoryVerdict],
    alerts: list[VerdictAlert],
    alerts_total: int,
    failures: list[str],
    sandboxes: list[SandboxRef],
    final: bool,
    stop_reason: str | None = None,
) -> Verdict:
    """The status and its one-line reason from the facts (the rules in the module's docstring)."""
    worst: str | None = None
    for c in categories.values():
        worst = worse_severity(worst, c.worst)
    if alerts_total:
        parts = ", ".join(
            f"{name} ({c.alerts}, {c.worst}, {'/'.join(sorted(c.actions))})"
            for name, c in sorted(categories.items(), key=lambda kv: (_rank(kv[1].worst), kv[0]))
        )
        s = "s" if alerts_total != 1 else ""
        status: Status = "violated"
        reason = f"{alerts_total} alert{s}, worst {worst}: {parts}"
    elif failures:
        status, reason = "infra_error", "; ".join(failures)
    else:
        status = "clean"
        reason = "no alerts" if final else "no alerts so far"
        if stop_reason == "lifetime":
            reason += "; the sandbox reached its lifetime"
    return Verdict(
        status=status,
        reason=reason,
        final=final,
        worst=worst,
        categories=categories,
        alerts=alerts,
        alerts_total=alerts_total,
        failures=failures,
        sandboxes=sandboxes,
    )


def build(
    *,
    sandbox: str,
    store: str,
    labels: Mapping[str, str],
    alerts: AlertTally,
    stop_reason: str | None,
    stop_error: str,
    events: int,
    head: str,
    running: bool,
    failures: Sequence[str] = (),
) -> Verdict:
    """The verdict of one sandbox from its record (the running sandbox's, or the store's)."""
    found = list(failures)
    if stop_reason == "failed":
        found.append(f"the sandbox failed: {stop_error or 'no reason recorded'}")
    elif stop_reason in ("closed", "lifetime") and stop_error:
        found.append(f"the sandbox's close failed: {stop_error}")
    elif stop_reason == "tripwire" and not alerts.total:
        # (A tripwire stop's error is the rule's own account, not a failure: not read here.)
        found.append("the sandbox was stopped by a tripwire, but no alert of it is recorded")
    categories: dict[str, CategoryVerdict] = {}
    for (category, severity, action, rule), n in sorted(alerts.counts.items()):
        categories[category] = _merge_category(
            categories.get(category), CategoryVerdict(n, severity, {action: n}, [rule])
        )
    ref = SandboxRef(sandbox, store, dict(labels), stop_reason, events, head)
    return _assemble(
        categories=categories,
        alerts=[_alert(sandbox, e) for e in alerts.first],
        alerts_total=alerts.total,
        failures=found,
        sandboxes=[ref],
        final=not running,
        stop_reason=stop_reason,
    )


def _alert(sandbox: str, e: AlertEntry) -> VerdictAlert:
    return VerdictAlert(
        sandbox, e.seq, e.rule, e.category, e.severity, e.action, e.outcome, e.exec, e.message
    )


# --- from the audit store ----------------------------------------------------------------------


def verdict_from_store(store: Store, sandbox_id: str) -> Verdict:
    """The verdict of sandbox `sandbox_id` (or a unique prefix of it) as the audit store records it.

    Equal to what `Sandbox.verdict()` said once its `close()` returned. A sandbox with no stop is
    open (`final` False) while its writer lives on this machine; if the writer is gone it was cut off
    (its supervisor or node died): `infra_error`, final. StoreError if there is no such sandbox."""
    return _from_info(store, store.find_sandbox(sandbox_id))


def episode_verdict(store: Store, labels: Mapping[str, str]) -> Verdict:
    """The verdict of the episode filed under `labels` (e.g. {"run": "r42", "episode": "17"}): of its
    sandbox, or `Verdict.merge` of its sandboxes if it used several. None in the store gives
    `infra_error`: the sandbox never started (a start error leaves no record) or its events were
    never written."""
    infos = store.sandboxes(labels=labels)
    if not infos:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return Verdict.infra(f"no sandbox with labels {shown} in the audit store {store.where}")
    return Verdict.merge(_from_info(store, info) for info in reversed(infos))  # oldest first


def _from_info(store: Store, info: SandboxInfo) -> Verdict:
    tally = AlertTally()
    if info.alerts:
        for e in store.events(Filters(sandbox=info.id, types=["alert"])):
            tally.add(e.seq, e.body)
    stop_error = ""
    failures: list[str] = []
    running = info.stopped is None
    if not running and info.events:
        # sandbox.stop is the chain's last event: read by its place, not by scanning for it.
        for e in store.events(Filters(sandbox=info.id), after=info.events - 1, limit=1):
            if e.type == "sandbox.stop":
                stop_error = str(e.body.get("error", ""))
    elif running and not _writer_alive(store, info):
        failures.append(
            f"cut off after event {info.events}: its supervisor (pid {info.writer_pid}) ended "
            "before the sandbox stopped (a lost node, or a killed trainer)"
        )
        running = False  # nothing more will come: the verdict is final
    return build(
        sandbox=info.id,
        store=store.where,
        labels=info.labels,
        alerts=tally,
        stop_reason=info.stop_reason,
        stop_error=stop_error,
        events=info.events,
        head=info.head,
        running=running,
        failures=failures,
    )


def _writer_alive(store: Store, info: SandboxInfo) -> bool:
    """Whether the process writing the sandbox may still be running it. Known only for a SQLite
    store (written on this machine): a PostgreSQL store's writers may be on any host, so a sandbox
    there without a stop is taken as running (`final` False)."""
    if store.kind != "sqlite":
        return True
    if info.writer_pid <= 0:
        return False
    try:
        os.kill(info.writer_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "STATUSES",
    "CategoryVerdict",
    "SandboxRef",
    "Status",
    "Verdict",
    "VerdictAlert",
    "build",
    "episode_verdict",
    "verdict_from_store",
    "worse_severity",
]
