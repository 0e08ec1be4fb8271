"""The tripwire scenario corpus: real attacks and real benign work, each in a sandbox.

Every scenario under scenarios/ is a test; an attack is two:

- alert-only: every category's response is `alert`, so the tripwires raise alerts but stop nothing and the
  attack runs its course. Checked: (a) the evidence the fence and sandbox record (`expect`: the steps' exit
  codes and output, denied and allowed connections, DNS queries, what the stand-in servers received),
  which also proves the attack really worked, so a quiet verdict would be a miss and not an attack that did
  nothing; that no response stopped anything; and (b) the verdict (`assert_verdict`).
- responses: the tripwires' own responses (kill, freeze, ...), which may cut the attack short before it
  leaves any evidence; only (b) the verdict is checked.

A benign scenario runs once, with the tripwires' own responses: (a) and (b), and (b) means no alert at all.

The servers, names and ports each scenario uses are local (tests/servers.py); nothing leaves loopback.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scenarios import (
    CATEGORIES,
    SCENARIO_FILE,
    SCENARIOS,
    STOPPING_ACTIONS,
    ScenarioError,
    ScenarioResult,
    check_evidence,
    check_steps,
    load,
    load_all,
    run,
    scenario_dirs,
    stopped,
)

ALERT_ONLY = "alert-only"
RESPONSES = "responses"


def _cases() -> list[object]:
    """(scenario, mode) pairs: an attack in both modes, benign work with the tripwires' own responses."""
    cases: list[object] = []
    for directory in scenario_dirs():
        try:
            kind = load(directory).kind
        except ScenarioError:
            kind = "attack"  # collected anyway: the test reports the file's problems when it loads it
        modes = (ALERT_ONLY, RESPONSES) if kind == "attack" else (RESPONSES,)
        cases += [pytest.param(directory.name, m, id=f"{directory.name}/{m}") for m in modes]
    return cases


# The cases the corpus must cover: directory -> (kind, categories it must fire).
REQUIRED: dict[str, tuple[str, set[str]]] = {
    "attack-miner-stratum": ("attack", {"mining"}),
    "attack-miner-nohup": ("attack", {"mining", "lingering"}),
    "attack-miner-c-disguised": ("attack", {"mining"}),
    "attack-ssh-reverse-tunnel": ("attack", {"tunnel"}),
    "attack-socat-relay": ("attack", {"tunnel"}),
    "attack-bash-dev-tcp": ("attack", {"reverse_shell"}),
    "attack-python-pipe-shell": ("attack", {"reverse_shell"}),
    "attack-nmap-internal": ("attack", {"probe"}),
    "attack-python-scan": ("attack", {"probe"}),
    "attack-metadata-probe": ("attack", {"probe"}),
    "attack-dns-tunnel": ("attack", {"tunnel"}),
    "attack-exfil-burst": ("attack", {"exfiltration"}),
    "benign-make-c-project": ("benign", set()),
    "benign-python-unittest": ("benign", set()),
    "benign-pip-install": ("benign", set()),
    "benign-all-cores-numeric": ("benign", set()),
    "benign-git-workflow": ("benign", set()),
    "benign-long-sleep": ("benign", set()),
}

# How long a tripwire may take to raise an alert after the scenario's last step (the README's target:
# a miner is killed within 2 s; the rest alert at the first attempt).
ALERT_GRACE = 2.0


def assert_verdict(result: ScenarioResult) -> None:
    """(b) The tripwires' verdict: each `fire` category alerted; no `quiet` category did. A benign scenario
    raises no alert at all, of any category.

    When a response of a `fire` category stopped the attack (kill, freeze, terminate), the categories it
    would have earned later may never come about (a miner killed at exec never lingers): then one `fire`
    category is enough. Alert-only runs, where nothing stops, check the whole list."""
    scenario = result.scenario
    fire = set(scenario.verdict.fire)
    deadline = time.monotonic() + ALERT_GRACE
    while True:
        alerts = result.alerts
        fired = {a.category for a in alerts}
        stopped_by = {a.category for a in alerts if a.action in STOPPING_ACTIONS} & fire
        missing = set() if stopped_by else fire - fired
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shown = [(a.category, a.rule, a.action, a.severity) for a in alerts]
    if scenario.kind == "benign":
        assert not alerts, f"{scenario.name}: benign work raised alerts: {shown}"
        return
    assert not missing, f"{scenario.name}: no alert for {sorted(missing)}; alerts: {shown}"
    unwanted = fired & set(scenario.verdict.quiet_categories)
    assert not unwanted, f"{scenario.name}: alerts in quiet categories {sorted(unwanted)}: {shown}"


@pytest.mark.root
@pytest.mark.parametrize(("name", "mode"), _cases())
def test_scenario(name: str, mode: str, tmp_path: Path) -> None:
    scenario = load(SCENARIOS / name)
    result = run(scenario, tmp_path, alert_only=mode == ALERT_ONLY)
    if mode == ALERT_ONLY or scenario.kind == "benign":
        # (a) The evidence: what the fence and sandbox recorded, and that the attack really happened.
        problems = check_steps(result) + check_evidence(result, scenario.expect)
        outputs = [f"step {i} output: {result.output(i)[-1500:]!r}" for i in range(len(result.execs))]
        assert not problems, f"{name} ({mode}):\n" + "\n".join(problems + outputs)
    if mode == ALERT_ONLY:
        assert not stopped(result), f"{name}: alert-only responses still stopped: {stopped(result)}"
    # (b)
    assert_verdict(result)


# --------------------------------------------------------------------------------------------------
# The corpus itself (fast, no sandbox)


def test_every_scenario_loads() -> None:
    scenarios = load_all()
    assert len(scenarios) == len(scenario_dirs())
    for s in scenarios:
        assert s.steps, s.name
        assert set(s.verdict.quiet_categories) <= set(CATEGORIES)


def test_the_corpus_covers_every_required_case() -> None:
    found = {s.name: (s.kind, set(s.verdict.fire)) for s in load_all()}
    for name, (kind, fire) in REQUIRED.items():
        assert name in found, f"scenario {name} is missing"
        assert found[name][0] == kind, f"{name}: kind {found[name][0]}, expected {kind}"
        assert fire <= found[name][1], f"{name}: fires {sorted(found[name][1])}, expected {sorted(fire)}"
    kinds = {kind for kind, _ in found.values()}
    assert kinds == {"attack", "benign"}


_MINIMAL = "description: x\nkind: attack\nsteps: [{run: 'true'}]\nverdict: {fire: [mining]}\n"
BAD_FILES = {  # id: (scenario.yaml, what the error must say after the file name)
    "missing key": (_MINIMAL.replace("description: x\n", ""), ": description: missing"),
    "misspelt key": (_MINIMAL.replace("run: 'true'", "run: 'true', wiat: 3"), ": steps[0].wiat: unknown key"),
    "duplicate key": (_MINIMAL + "kind: benign\n", "duplicate key 'kind'"),
    "benign that fires": (
        _MINIMAL.replace("kind: attack", "kind: benign"),
        ": verdict: a benign scenario must have no fire",
    ),
    "unknown category": (_MINIMAL.replace("[mining]", "[crypto]"), ": verdict.fire[0]: Input should be"),
    "real host name": (
        _MINIMAL + "servers: {pool: {type: stratum_pool, host: pool.example.com, port: 3333}}\n",
        ": servers.pool.host: 'pool.example.com' is not under example.internal",
    ),
    "bad policy": (
        _MINIMAL + "policy: {network: {egress: [{host: pool.example.internal}]}}\n",
        ": policy: network.egress[0].ports: missing",
    ),
    "unknown server": (
        _MINIMAL + "expect: {received: {pool: {min_bytes: 1}}}\n",
        "received.pool: no such server",
    ),
    "not a mapping": ("- just\n- a list\n", ": expected a mapping of keys"),
}


@pytest.mark.parametrize(("text", "expected"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_a_bad_scenario_file_is_reported_with_its_file_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    directory = tmp_path / "bad-scenario"
    directory.mkdir()
    (directory / SCENARIO_FILE).write_text(text)
    with pytest.raises(ScenarioError) as caught:
        load(directory)
    message = str(caught.value)
    assert message.startswith(str(directory / SCENARIO_FILE)), message
    assert expected in message, message
