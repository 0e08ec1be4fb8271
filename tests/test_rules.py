"""Rules as data: the condition language, rule files, the stateful detector, and every built-in rule
on its positive and negative cases (tests/rule_cases.yaml). No root, no sandboxes: pure logic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral import PolicyError
from corral.detect import rules
from corral.detect._lang import ConditionError, compile_condition
from corral.detect.engine import Detector, Observation
from corral.detect.fields import FIELDS

CASES = Path(__file__).with_name("rule_cases.yaml")


def obs(**values: Any) -> Observation:
    return Observation({k.replace("__", "."): v for k, v in values.items()})


def holds(condition: str, values: dict[str, Any], lists: dict[str, list[str]] | None = None) -> bool:
    pred, _, _ = compile_condition(condition, {}, lists or {})
    return pred(Observation(dict(values)))


# --- the language ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "values", "expected"),
    [
        ("proc.name = xmrig", {"proc.name": "xmrig"}, True),
        ("proc.name != xmrig", {"proc.name": "bash"}, True),
        ("proc.name != xmrig", {}, False),  # absent is never "different"
        ("net.port > 1024 and net.port <= 3333", {"net.port": 3333}, True),
        ("net.port in (22, 443)", {"net.port": 443}, True),
        ("net.port in (22, 443)", {"net.port": 80}, False),
        ("proc.cmdline contains 'a b'", {"proc.cmdline": "x a b y"}, True),
        ('proc.cmdline icontains "STRATUM"', {"proc.cmdline": "stratum+tcp://x"}, True),
        ("proc.exe startswith /usr/", {"proc.exe": "/usr/bin/id"}, True),
        ("proc.exe endswith /id", {"proc.exe": "/usr/bin/id"}, True),
        ("proc.exe glob /usr/*/id", {"proc.exe": "/usr/bin/id"}, True),
        ("proc.cwd pmatch /workspace", {"proc.cwd": "/workspace/src"}, True),
        ("proc.cwd pmatch /workspace", {"proc.cwd": "/workspaces"}, False),
        ("net.name dmatch example.com", {"net.name": "a.b.example.com."}, True),
        ("net.name dmatch example.com", {"net.name": "badexample.com"}, False),
        ("proc.cmdline regex '^ssh .*-R'", {"proc.cmdline": "ssh -N -R 1:h:2 u@h"}, True),
        ("proc.args in (-R)", {"proc.args": ["-N", "-R", "x"]}, True),  # any element of a list
        ("proc.args != -R", {"proc.args": ["-N", "-R"]}, False),  # no element equals it
        ("proc.args startswith (-L, -D)", {"proc.args": ["x", "-D1080"]}, True),
        ("proc.args exists", {"proc.args": []}, False),
        ("proc.in_command", {"proc.in_command": True}, True),
        ("not proc.in_command", {}, True),
        ("not (proc.name = a or proc.name = b)", {"proc.name": "c"}, True),
        ("proc.content contains (mining.subscribe, xmrig)", {"proc.content": b"..xmrig.."}, True),
        ("proc.content icontains RANDOMX", {"proc.content": b"randomx"}, True),
        ("proc.content contains RandomX", {"proc.content": None}, False),
        (
            "evt.type = proc.exec and proc.name in (miners, cpuminer)",
            {"evt.type": "proc.exec", "proc.name": "m2"},
            True,
        ),
        ("proc.args in ()", {"proc.args": ["x"]}, False),
    ],
)
def test_condition(condition: str, values: dict[str, Any], expected: bool) -> None:
    assert holds(condition, values, {"miners": ["m1", "m2"]}) is expected


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("proc.nmae = x", "unknown field 'proc.nmae'; proc.* fields are proc.pid"),
        ("proc.name =", "the condition ends too early"),
        ("proc.name = x and", "the condition ends too early"),
        ("proc.name = x)", "unexpected ')'"),
        ("net.port > eighty", "net.port is a number; 'eighty' is not"),
        ("proc.name > 3", "proc.name is not a number; > compares numbers"),
        ("proc.in_command = yes", "proc.in_command is true/false"),
        ("proc.content = abc", "proc.content supports only contains and icontains"),
        ("proc.cmdline regex '('", "proc.cmdline regex '(': missing ), unterminated subpattern"),
        ("nosuchmacro", "unknown macro 'nosuchmacro'"),
        ("proc.cmdline", "proc.cmdline is not true/false"),
        ("proc.name contains ()", "proc.name contains (): the list is empty"),
    ],
)
def test_condition_errors_say_what_is_wrong(condition: str, message: str) -> None:
    with pytest.raises(ConditionError) as err:
        compile_condition(condition, {}, {})
    assert message in str(err.value)


def test_content_verdicts_are_cached_by_file_identity() -> None:
    reads: list[int] = []

    class Ref:
        identity = ("dev", "ino", 1, 2)

        def read(self) -> bytes:
            reads.append(1)
            return b"...mining.subscribe..."

    pred, _, _ = compile_condition("proc.content contains (mining.subscribe)", {}, {})
    assert all(pred(Observation({"proc.content": Ref()})) for _ in range(50))
    assert len(reads) == 1


def test_fields_set_after_an_observation_is_made_win_over_lazy_ones() -> None:
    computed: list[str] = []
    obs = Observation({"proc.name": "sh"}, lazy={"proc.cpu": lambda: computed.append("cpu") or 0.0})
    obs.update({"proc.cpu": 2.5, "proc.name": "bash"})
    assert (obs.get("proc.cpu"), obs.get("proc.name"), computed) == (2.5, "bash", [])


# --- rule files ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_RULE = """
- rule: my miner
  desc: The house miner. Misses everything else.
  condition: spawned and proc.name in (house_miners)
  severity: high
  category: mining
  tags: {mitre: [T1496], owasp: [ASI10]}
  response: kill
  output: "house miner %proc.cmdline"
- list: house_miners
  items: [hm]
"""


def test_a_user_file_adds_rules_and_extends_lists(tmp_path: Path) -> None:
    extra = write(tmp_path, GOOD_RULE + "- list: miner_names\n  items: [house-xmrig]\n  append: true\n")
    ruleset = rules.load([extra])
    assert ruleset.rule("my miner").response == "kill"
    assert "house-xmrig" in ruleset.lists["miner_names"] and "xmrig" in ruleset.lists["miner_names"]
    d = Detector(ruleset)
    fired = d.observe(obs(evt__type="proc.exec", proc__name="house-xmrig", proc__pid=3))
    assert [m.rule.name for m in fired] == ["miner executable"]


def test_a_user_file_replaces_lists_changes_responses_and_disables_rules(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        """
- list: scanners
  items: [my-scanner]
- rule: scanner started
  response: kill
- rule: netcat listener
  enabled: false
""",
    )
    ruleset = rules.load([extra])
    assert ruleset.lists["scanners"] == ("my-scanner",)
    assert ruleset.rule("scanner started").response == "kill"
    assert "netcat listener" in ruleset.disabled
    with pytest.raises(KeyError):
        ruleset.rule("netcat listener")
    d = Detector(ruleset)
    assert not d.observe(obs(evt__type="proc.exec", proc__name="nmap", proc__pid=1))
    assert [
        m.rule.name for m in d.observe(obs(evt__type="proc.exec", proc__name="my-scanner", proc__pid=2))
    ] == ["scanner started"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- rule: x\n  desc: d\n  condition: proc.nme = 1\n  severity: high\n  category: mining\n",
            "r.yaml: rule 'x': unknown field 'proc.nme'",
        ),
        (
            "- rule: x\n  desc: d\n  condition: spawned\n  severity: severe\n  category: mining\n",
            "r.yaml: rule 'x': severity: \"severe\" is not accepted; "
            "use one of critical, high, medium, low or info",
        ),
        (
            "- rule: x\n  desc: d\n  condition: spawned\n  severity: high\n  category: crypto\n",
            "r.yaml: rule 'x': category: \"crypto\" is not accepted",
        ),
        (
            "- rule: x\n  desc: d\n  condition: spawned\n  severity: high\n  category: mining\n"
            "  response: nuke\n",
            "r.yaml: rule 'x': response: \"nuke\" is not accepted",
        ),
        (
            "- rule: x\n  condition: spawned\n  severity: high\n  category: mining\n",
            "r.yaml: rule 'x': desc:",
        ),
        ("- rule: nope\n  enabled: false\n", "r.yaml: rule 'nope': no earlier rule 'nope' to change"),
        (
            "- list: nope\n  items: [a]\n  append: true\n",
            "r.yaml: list 'nope': append: there is no earlier list",
        ),
        ("- macro: m\n  condition: m\n", "r.yaml: macro 'm': macro 'm' uses itself"),
        ("- rule: x\n  list: y\n", "r.yaml: entry 1: needs exactly one of list, macro, rule"),
        ("rule: x\n", "r.yaml: a rule file is a YAML list of list/macro/rule entries"),
        (
            "- rule: x\n  desc: d\n  condition: connection\n  severity: high\n  category: probe\n"
            "  window: {seconds: 5, threshold: 3}\n",
            "r.yaml: rule 'x': window: a window needs exactly one of count: true, distinct: FIELD, "
            "sum: FIELD",
        ),
        (
            "- rule: x\n  desc: d\n  condition: connection\n  severity: high\n  category: probe\n"
            "  output: '%net.nope'\n",
            "r.yaml: rule 'x': output: unknown field %net.nope",
        ),
    ],
)
def test_rule_file_errors_name_the_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        rules.load([write(tmp_path, text)])
    assert any(message in p for p in err.value.problems), err.value.problems


def test_a_missing_rule_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read rule file"):
        rules.load([tmp_path / "nope.yaml"])


# --- the detector -------------------------------------------------------------------------------


def test_responses_are_overridden_by_rule_name_then_category() -> None:
    ruleset = rules.load()
    d = Detector(ruleset, {"mining": "alert", "miner executable": "freeze"})
    [m] = d.observe(obs(evt__type="proc.exec", proc__name="xmrig", proc__pid=5))
    assert (m.rule.name, m.response) == ("miner executable", "freeze")
    [m] = d.observe(obs(evt__type="net.connect", net__protocol="stratum", proc__pid=5))
    assert (m.rule.name, m.response) == ("stratum traffic", "alert")


def test_a_rule_fires_once_per_process_not_per_event() -> None:
    d = Detector(rules.load())
    hits = [
        d.observe(obs(evt__type="deny", deny__layer="seccomp", deny__what="mount", proc__pid=9))
        for _ in range(5)
    ]
    assert [len(h) for h in hits] == [1, 0, 0, 0, 0]
    assert len(d.observe(obs(evt__type="deny", deny__layer="seccomp", deny__what="mount", proc__pid=10))) == 1


def test_output_renders_fields() -> None:
    d = Detector(rules.load())
    [m] = d.observe(obs(evt__type="proc.exec", proc__name="xmrig", proc__cmdline="xmrig -o x", proc__pid=1))
    assert m.message == "miner xmrig started: xmrig -o x"


# --- every built-in rule, on its cases -------------------------------------------------------------


def _steps(case: Any) -> list[tuple[float, dict[str, Any]]]:
    if isinstance(case, dict) and "steps" in case:
        raw = case["steps"]
    elif isinstance(case, dict) and "repeat" in case:
        raw = []
        for i in range(case["repeat"]):
            step = {
                k: (v.replace("{i}", str(i + 1)) if isinstance(v, str) else v)
                for k, v in case["step"].items()
            }
            step = {k: (int(v) if k == "net.port" and isinstance(v, str) else v) for k, v in step.items()}
            raw.append({**step, "t": i * case.get("every", 1)})
    else:
        raw = [case]
    out = []
    for i, step in enumerate(raw):
        values = dict(step)
        t = float(values.pop("t", i * 0.01))
        if isinstance(values.get("proc.content"), str):
            values["proc.content"] = values["proc.content"].encode()
        unknown = set(values) - set(FIELDS)
        assert not unknown, f"rule_cases.yaml: unknown fields {unknown}"
        out.append((t, values))
    return out


def _fired(rule: str, case: Any) -> list[bool]:
    d = Detector(rules.load())
    return [any(m.rule.name == rule for m in d.observe(Observation(v), now=t)) for t, v in _steps(case)]


CASE_DATA: dict[str, dict[str, list[Any]]] = yaml.safe_load(CASES.read_text())


def test_every_built_in_rule_has_a_positive_and_a_negative_case() -> None:
    names = [r.name for r in rules.load().rules]
    missing = [
        n for n in names if not CASE_DATA.get(n, {}).get("fire") or not CASE_DATA.get(n, {}).get("quiet")
    ]
    assert not missing, f"rules without both a fire and a quiet case in {CASES.name}: {missing}"
    assert not set(CASE_DATA) - set(names), "cases for rules that do not exist"


@pytest.mark.parametrize(
    ("rule", "kind", "case"),
    [(r, k, c) for r, kinds in CASE_DATA.items() for k in ("fire", "quiet") for c in kinds.get(k, [])],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_built_in_rule_case(rule: str, kind: str, case: Any) -> None:
    fired = _fired(rule, case)
    if kind == "fire":
        assert fired[-1], f"{rule} did not fire on the last step: {fired}"
        assert not any(fired[:-1]), f"{rule} fired early: {fired}"
    else:
        assert not any(fired), f"{rule} fired on a negative case: {fired}"


def test_every_built_in_rule_states_its_limits_and_tags() -> None:
    for r in rules.load().rules:
        assert len(r.desc) > 40, r.name
        assert r.tags.mitre, f"{r.name} has no MITRE ATT&CK technique"


# --- the CLI ---------------------------------------------------------------------


def test_rules_check_and_list_on_the_command_line(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD_RULE, "good.yaml")
    bad = write(
        tmp_path,
        "- rule: x\n  desc: d\n  condition: proc.nme = 1\n  severity: high\n  category: mining\n",
        "bad.yaml",
    )
    cli = [sys.executable, "-m", "corral.cli"]
    ok = subprocess.run([*cli, "rules", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr
    fail = subprocess.run([*cli, "rules", "check", str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1 and f"{bad}: rule 'x': unknown field 'proc.nme'" in fail.stderr
    policy = write(
        tmp_path, "version: 1\ntripwires:\n  rules: [good.yaml]\n  responses: {probe: kill}\n", "p.yaml"
    )
    listed = subprocess.run([*cli, "rules", "list", "--policy", str(policy)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("  ")[0]: line.split() for line in listed.stdout.splitlines()}
    assert "my miner" in listed.stdout
    assert "kill" in rows["port scan"]  # the policy's response for the probe category
